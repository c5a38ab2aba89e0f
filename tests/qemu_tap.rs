//! A real QEMU gets a real tap by inherited file descriptor, the way the
//! node's tenant network hands a VM its NIC: the test makes a private
//! network namespace with a persistent multi-queue tap in it (names
//! `cnq-<pid>-<n>`), opens the tap there, hands the open descriptor to the
//! QEMU virtualizer as `Nic::Tap`, boots the test guest with it, and pings
//! across the tap in both directions. The namespace and the tap are removed
//! when the test ends, also after a failure; the host's own links are never
//! touched.

mod common;

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ciao_launcher::payloads::config::{Firmware, InstanceConfig, VmType};
use ciao_launcher::virt::VirtualizerFactory;
use ciao_launcher::virt::qemu::{
    AccelChoice, ChildUser, ChildUsers, ImageCache, Nic, QemuFactory, Ui, choose_accel, quit_vm,
};
use common::*;

const IMAGE: &str = "7e57a9e0-0c1a-4000-8000-000000000002";
/// Booting under TCG on two shared cores.
const BOOT: Duration = Duration::from_secs(240);
const HOST_IP: &str = "10.251.0.1";
const GUEST_IP: &str = "10.251.0.2";
/// A locally administered unicast MAC, as ciao's `vnic_mac`s are.
const MAC: [u8; 6] = [0x02, 0x00, 0x0a, 0xfb, 0x00, 0x02];

/// A network namespace of this test, removed (with every device in it) on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create(name: String) -> Netns {
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip` inside the namespace; must succeed.
    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Whether `busybox ping` from inside the namespace gets an answer.
    fn ping(&self, ip: &str) -> bool {
        Command::new("ip")
            .args([
                "netns", "exec", &self.name, "busybox", "ping", "-c", "1", "-W", "1", ip,
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace removes the devices in it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// `struct ifreq` as TUNSETIFF reads it: a name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

const IFF_TAP: i16 = 0x0002;
const IFF_MULTI_QUEUE: i16 = 0x0100;
const IFF_NO_PI: i16 = 0x1000;
nix::ioctl_write_ptr_bad!(tunsetiff, 0x4004_54ca, IfReq);

/// Opens a queue of the persistent tap `name` of namespace `ns`: a thread
/// enters the namespace (a namespace is per thread) and attaches to the tap
/// there, as the node's network does in its own.
fn open_tap(ns: &str, name: &str) -> OwnedFd {
    let (ns, name) = (ns.to_string(), name.to_string());
    std::thread::spawn(move || {
        let nsfd = fs::File::open(Path::new("/run/netns").join(&ns)).expect("namespace file");
        nix::sched::setns(&nsfd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let tun = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("/dev/net/tun");
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads a struct ifreq, which `req` is laid out as.
        unsafe { tunsetiff(tun.as_raw_fd(), &req) }.expect("TUNSETIFF");
        OwnedFd::from(tun)
    })
    .join()
    .expect("tap opener")
}

/// The serial console so far (CR LF made LF).
fn console(dir: &Path) -> String {
    fs::read_to_string(dir.join("console.log"))
        .unwrap_or_default()
        .replace('\r', "")
}

fn wait_console(dir: &Path, needle: &str) -> String {
    let deadline = Instant::now() + BOOT;
    loop {
        let c = console(dir);
        if c.contains(needle) {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} on the console:\n{c}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The descriptors of process `pid` that are the tun device.
fn tun_fds(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| fs::read_link(e.path()).is_ok_and(|t| t == Path::new("/dev/net/tun")))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn vm_gets_a_real_tap_by_descriptor_and_pings_through_it() {
    tap_vm(0, None);
}

/// The same with QEMU dropping to a child user (and -sandbox where this
/// QEMU takes it): the tap was opened by root, the VM uses it as the user.
#[test]
fn vm_of_a_child_user_gets_its_tap_too() {
    let nobody = ChildUser::lookup("nobody").expect("user nobody");
    let uid = nobody.uid;
    let qemu = tap_vm(2, Some(nobody));
    assert_eq!(qemu, uid, "the uid QEMU ran as");
}

/// Boots a VM with a tap of namespace `cnq-<pid>-<n>` (the tap is
/// `cnq-<pid>-<n+1>`), run as `child` if given; returns the uid QEMU ran as.
fn tap_vm(n: u32, child: Option<ChildUser>) -> u32 {
    require_qemu();
    require(&[(&["ip"], "iproute2"), (&["busybox"], "busybox-static")]);
    assert!(
        Path::new("/dev/net/tun").exists(),
        "/dev/net/tun missing: the kernel needs tun/tap"
    );
    let image = guest_image();
    let pid = std::process::id();
    // Declared before the environment: dropped after it, once its VM is killed.
    let ns = Netns::create(format!("cnq-{pid}-{n}"));
    let tap = format!("cnq-{pid}-{}", n + 1);
    ns.ip(&["tuntap", "add", "dev", &tap, "mode", "tap", "multi_queue"]);
    ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", &tap]);
    ns.ip(&["link", "set", &tap, "up"]);
    let fd = open_tap(&ns.name, &tap);
    let raw = fd.as_raw_fd();

    let env = Env::new();
    let data: PathBuf = env.dir.join("data");
    fs::create_dir_all(data.join("images")).expect("images dir");
    fs::copy(image, data.join("images").join(IMAGE)).expect("install the guest image");
    let (accel, _) = choose_accel(AccelChoice::Auto, Path::new("/sys"), Path::new("/dev/kvm"));
    let factory = QemuFactory {
        data_dir: data.clone(),
        qemu: "qemu-system-x86_64".into(),
        qemu_img: "qemu-img".into(),
        accel,
        ovmf: None,
        ui: Ui::None,
        stop_timeout: Duration::from_secs(10),
        images: ImageCache::default(),
        child_users: Arc::new(ChildUsers::new(child)),
        confinement: Arc::default(),
        user_net: false,
    };
    let id = uuid::Uuid::new_v4().to_string();
    let cfg = InstanceConfig {
        instance_uuid: id.clone(),
        image_uuid: IMAGE.into(),
        vm_type: VmType::Qemu,
        firmware: Firmware::Legacy,
        vcpus: 1,
        mem_mb: 64,
        user_data: format!(
            "#cloud-config\nruncmd:\n  - ip addr add {GUEST_IP}/24 dev eth0\n  - \
             i=0; until ping -c 1 -W 1 {HOST_IP} >/dev/null; do i=$((i+1)); [ $i -lt 30 ] || exit 1; done; echo GUEST-PINGED-HOST\n"
        ),
        ..InstanceConfig::default()
    };
    let dir = data.join("instances").join(&id);
    fs::create_dir_all(&dir).expect("instance dir");
    let mut vm = factory.create(&cfg);
    vm.init(&cfg, &dir);
    vm.ensure_backing_image().expect("backing image");
    vm.create_image().expect("overlay and config drive");
    vm.set_nic(Nic::Tap {
        fds: vec![fd],
        mac: MAC,
        vhost: false,
    })
    .expect("set the NIC");
    vm.start().expect("QEMU starts with the tap");

    let qemu: i32 = fs::read_to_string(dir.join("qemu.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .expect("qemu.pid");
    let uid = fs::read_to_string(format!("/proc/{qemu}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Uid:"))?.to_string();
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .expect("QEMU's uid");
    // QEMU holds the tap; the launcher's copy is closed.
    assert_eq!(tun_fds(qemu), 1, "QEMU's descriptors of /dev/net/tun");
    assert!(
        fs::read_link(format!("/proc/self/fd/{raw}"))
            .map_or(true, |t| t != Path::new("/dev/net/tun")),
        "the launcher still holds the tap"
    );
    // The guest sees the MAC it was given, then reaches the namespace ...
    wait_console(
        &dir,
        &format!(
            "GUEST-NIC eth0 mac={}",
            ciao_launcher::network::format_mac(&MAC)
        ),
    );
    let c = wait_console(&dir, "GUEST-RUNCMD-DONE");
    assert!(
        c.contains("GUEST-PINGED-HOST") && c.contains("GUEST-RUNCMD-DONE rc=0"),
        "{c}"
    );
    // ... and the namespace reaches the guest.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ns.ping(GUEST_IP) {
        assert!(
            Instant::now() < deadline,
            "no answer from {GUEST_IP} in the namespace"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("ping through the tap both ways; QEMU pid {qemu}");

    // quit_vm returns once the QEMU process is gone.
    assert!(quit_vm(&dir.join("qmp.sock"), Duration::from_secs(10)).expect("quit"));
    // The persistent tap outlives QEMU, as the node's network needs.
    ns.ip(&["link", "show", &tap]);
    ns.ip(&["link", "del", &tap]);
    drop(env);
    let name = ns.name.clone();
    drop(ns);
    assert!(
        !run("ip", &["netns", "list"])
            .lines()
            .any(|l| l.split_whitespace().next() == Some(&name)),
        "namespace {name} left behind"
    );
    uid
}
