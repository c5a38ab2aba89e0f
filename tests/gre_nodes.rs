//! The real GRE datapath, end to end, in three TCG guests of the test image
//! (its kernel has bridge, gretap, tun, veth, macvtap and netns; the host's
//! has no GRE):
//!
//! ```text
//!  node 1 (10.99.0.11)            CNCI stand-in              node 2 (10.99.0.12)
//!  netnode: sbr_/sgt_/svn_ ─ eth0 ══ eth0 ─ ul0 ─ eth1 ══ eth0 ─ netnode: sbr_/sgt_/svn_
//!  a1 .2 (A), b1 .2 (B)           .21: cbrA 192.168.8.1      a2 .3 (A), b2 .4 (B)
//!                                 .22: cbrB (no gateway)
//! ```
//!
//! `══` are QEMU `socket,udp=` netdevs on 127.0.0.1 (free ports picked by
//! the test): nothing but loopback UDP leaves the guests. Each node VM runs
//! `examples/netnode.rs` (the launcher's network library with the real
//! `GreTap`) for two tenants with the same CIDR 192.168.8.0/21 and
//! different concentrators; an instance is a network namespace in the node
//! VM joined to the tenant bridge by a veth (tests/data/gre/node.sh). The
//! CNCI stand-in (tests/data/gre/cnci.sh) makes one bridge per tenant with
//! a gretap per node, keyed with the subnet key computed here from the
//! spec's formula, and tenant A's gateway (network + 1).
//!
//! Steps: 1. build netnode, gather it, iproute2's `ip` and their glibc
//! libraries onto each VM's config drive; 2. boot the three VMs; 3. wait for
//! each node's `GRE-CHECKS-DONE` and assert the VNIC lines, the gretap key
//! read back with `ip -d link`, and the pings (A↔A across nodes and to the
//! gateway; B↔B; never B→A); 4. send the go-ahead on each node's second
//! serial port, wait for `GRE-NODE-DONE`, and assert the deletes
//! (TenantRemoved with the key, no device left). Every wait has a deadline;
//! only the QEMUs started here are killed (by PID), and the temporary
//! directory goes also on failure.

mod common;

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{guest_image, require, text};

/// Boot plus the node scripts under TCG on two shared cores.
const CHECKS_WITHIN: Duration = Duration::from_secs(420);
const DELETE_WITHIN: Duration = Duration::from_secs(120);
const SUBNET: &str = "192.168.8.0/21";
const COMPUTE: &str = "10.99.0.0/24";
const CNCI_A: &str = "10.99.0.21";
const CNCI_B: &str = "10.99.0.22";
const NODE_IPS: [&str; 2] = ["10.99.0.11", "10.99.0.12"];
const TENANT_A: &str = "7e5a0000-0000-4000-8000-00000000000a";
const TENANT_B: &str = "7e5a0000-0000-4000-8000-00000000000b";

const NODE_SH: &str = include_str!("data/gre/node.sh");
const CNCI_SH: &str = include_str!("data/gre/cnci.sh");
const IPTABLES_STANDIN: &str = include_str!("data/gre/iptables");

/// The subnet key as the spec defines it: `a + b·2^8 + c·2^16 + d·2^24`
/// of the network address a.b.c.d (computed here, not by the library).
fn spec_key(net: Ipv4Addr) -> u32 {
    let [a, b, c, d] = net.octets().map(u32::from);
    a + (b << 8) + (c << 16) + (d << 24)
}

/// A directory removed on drop (declared before the VMs, so dropped after).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A QEMU this test started; killed by its PID on drop.
struct Vm {
    name: &'static str,
    dir: PathBuf,
    child: Child,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vm {
    fn console(&self) -> String {
        fs::read_to_string(self.dir.join("console.log"))
            .unwrap_or_default()
            .replace('\r', "")
    }

    /// Waits until the console has `needle` (fails when the VM or its script
    /// ends first, or at `by`).
    fn wait_for(&mut self, needle: &str, by: Instant) -> String {
        loop {
            let c = self.console();
            if c.contains(needle) {
                return c;
            }
            // The role scripts end only after their last line: an early
            // end is a failure now, not at the deadline.
            if c.contains("GUEST-RUNCMD-DONE") {
                panic!("{}: the script ended before {needle:?}:\n{c}", self.name);
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("{}: QEMU exited ({st}) before {needle:?}:\n{c}", self.name);
            }
            assert!(
                Instant::now() < by,
                "{}: no {needle:?} on the console in time:\n{c}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// One line on the second serial port (the node script's go-ahead).
    fn send_control(&self, line: &str) {
        let mut s = UnixStream::connect(self.dir.join("ctl.sock")).expect("connect ctl.sock");
        s.write_all(line.as_bytes()).expect("write ctl.sock");
    }
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
fn free_udp_port() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP port on 127.0.0.1");
    s.local_addr().expect("local addr").port()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Builds `examples/netnode.rs` with this test's cargo and profile.
fn build_netnode() -> PathBuf {
    let manifest = env!("CARGO_MANIFEST_DIR");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "--example",
        "netnode",
        "--manifest-path",
    ])
    .arg(Path::new(manifest).join("Cargo.toml"))
    .stdout(Stdio::null());
    // What cargo sets for this test binary would differ from a plain build
    // and make build scripts (ring's) run again, for this build and the
    // next one of the suite.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if [
            "CARGO_PKG_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_MANIFEST_",
            "CARGO_PRIMARY_",
        ]
        .iter()
        .any(|p| k.starts_with(p))
            || k == "CARGO_TARGET_TMPDIR"
            || k == "OUT_DIR"
        {
            cmd.env_remove(&k);
        }
    }
    run(&mut cmd);
    // tests/ binaries sit in <target>/<profile>/deps/.
    let exe = std::env::current_exe().expect("current_exe");
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir");
    let bin = profile.join("examples").join("netnode");
    assert!(bin.is_file(), "no {} after cargo build", bin.display());
    bin
}

/// The shared objects `bin` loads, and its interpreter, from `ldd`.
fn libraries(bin: &Path) -> Vec<PathBuf> {
    let out = run(Command::new("ldd").arg(bin));
    out.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, r)) => r.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// The files every VM's config drive carries under `gre/`.
fn stage_payload(dir: &Path, netnode: &Path) {
    let bin = dir.join("bin");
    let lib = dir.join("lib");
    fs::create_dir_all(&bin).expect("mkdir bin");
    fs::create_dir_all(&lib).expect("mkdir lib");
    let ip = common::in_path("ip").expect("ip");
    let mut interp = None;
    for (src, name) in [(netnode, "netnode"), (ip.as_path(), "ip")] {
        let dst = bin.join(format!("{name}.real"));
        fs::copy(src, &dst).expect("copy binary");
        run(Command::new("strip").arg("--strip-debug").arg(&dst));
        for l in libraries(src) {
            let file = l.file_name().expect("lib name").to_owned();
            if file.to_string_lossy().starts_with("ld-linux") {
                interp = Some(file.clone());
            }
            fs::copy(&l, lib.join(&file)).expect("copy library");
        }
        // The guest has no glibc of its own: run through the copied loader.
        let wrapper = format!(
            "#!/bin/sh\nG=/mnt/config/gre\nexec $G/lib/{} --library-path $G/lib $G/bin/{name}.real \"$@\"\n",
            interp
                .as_ref()
                .expect("ldd names the loader")
                .to_string_lossy()
        );
        write_exec(&bin.join(name), &wrapper);
    }
    write_exec(&bin.join("iptables"), IPTABLES_STANDIN);
}

fn write_exec(path: &Path, content: &str) {
    fs::write(path, content).expect("write script");
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// A config drive (ISO9660 "config-2") with `user_data` and the payload.
fn config_drive(dir: &Path, payload: &Path, name: &str, user_data: &str) -> PathBuf {
    let root = dir.join(format!("{name}-cfg"));
    let latest = root.join("openstack").join("latest");
    fs::create_dir_all(&latest).expect("mkdir config");
    fs::write(
        latest.join("meta_data.json"),
        format!(
            "{{\"uuid\": \"7e5a0000-0000-4000-8000-0000000000{name}\", \"hostname\": \"{name}\"}}"
        ),
    )
    .expect("meta_data");
    fs::write(latest.join("user_data"), user_data).expect("user_data");
    let iso = dir.join(format!("{name}.iso"));
    run(Command::new("xorriso")
        .args([
            "-as", "mkisofs", "-quiet", "-V", "config-2", "-J", "-R", "-o",
        ])
        .arg(&iso)
        .arg("-graft-points")
        .arg(&root)
        .arg(format!("gre={}", payload.display())));
    iso
}

/// Boots the test guest with `iso` and one NIC per (local, remote) port pair.
fn boot(
    name: &'static str,
    vm_no: u8,
    dir: &Path,
    image: &Path,
    iso: &Path,
    nics: &[(u16, u16)],
) -> Vm {
    let vdir = dir.join(name);
    fs::create_dir_all(&vdir).expect("vm dir");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-machine", "q35", "-accel", "tcg", "-m", "192", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .arg("-serial")
        .arg(format!("file:{}", vdir.join("console.log").display()))
        .arg("-chardev")
        .arg(format!(
            "socket,id=ctl,path={},server=on,wait=off",
            vdir.join("ctl.sock").display()
        ))
        .args(["-device", "isa-serial,chardev=ctl"])
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=raw,snapshot=on",
            image.display()
        ))
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=raw,readonly=on",
            iso.display()
        ));
    for (i, (local, remote)) in nics.iter().enumerate() {
        let id = format!("n{i}");
        cmd.arg("-netdev")
            .arg(format!(
                "socket,id={id},udp=127.0.0.1:{remote},localaddr=127.0.0.1:{local}"
            ))
            .arg("-device")
            .arg(format!(
                "virtio-net-pci,netdev={id},mac=52:54:00:9e:{vm_no:02x}:{i:02x}"
            ));
    }
    // Own temp dir for snapshot=on's overlay, removed with ours.
    cmd.env("TMPDIR", &vdir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(vdir.join("qemu.stderr")).expect("stderr file"));
    let child = cmd.spawn().expect("spawn qemu-system-x86_64");
    Vm {
        name,
        dir: vdir,
        child,
    }
}

/// `#!/bin/sh` user data: the variables, then the role script.
fn user_data(vars: &[(&str, String)], script: &str) -> String {
    let mut s = String::from("#!/bin/sh\n");
    for (k, v) in vars {
        // Single-quoted: no value here contains a quote.
        assert!(!v.contains('\''), "{v}");
        let _ = writeln!(s, "{k}='{v}'");
    }
    s.push_str(script);
    s
}

/// One instance: veth name, tenant, concentrator address, private IP, MAC.
struct Inst {
    veth: &'static str,
    tenant: &'static str,
    cnci_ip: &'static str,
    ip: &'static str,
}

fn spec(i: &Inst) -> String {
    let o = i.ip.parse::<Ipv4Addr>().expect("ip").octets();
    let cnci = if i.cnci_ip == CNCI_A { "a" } else { "b" };
    format!(
        "instance=1e5a0000-0000-4000-8000-0000000000{v},tenant={t},subnet={SUBNET},\
         cnci=c0c10000-0000-4000-8000-00000000000{cnci},cnci_ip={c},ip={ip},\
         mac=02:00:{:02x}:{:02x}:{:02x}:{:02x},vnic=5a1c0000-0000-4000-8000-0000000000{v},veth={v}",
        o[0],
        o[1],
        o[2],
        o[3],
        v = i.veth,
        t = i.tenant,
        c = i.cnci_ip,
        ip = i.ip,
    )
}

fn node_user_data(n: usize, insts: &[Inst], checks: &[(&str, &str, &str)]) -> String {
    let specs: Vec<String> = insts.iter().map(spec).collect();
    let instances: Vec<String> = insts
        .iter()
        .map(|i| format!("{} {}/21 192.168.8.1", i.veth, i.ip))
        .collect();
    let checks: Vec<String> = checks
        .iter()
        .map(|(w, f, t)| format!("{w} {f} {t}"))
        .collect();
    user_data(
        &[
            ("NODE_IP", NODE_IPS[n].to_string()),
            ("COMPUTE", COMPUTE.to_string()),
            ("CNCI_IPS", format!("{CNCI_A} {CNCI_B}")),
            ("SPECS", specs.join(" ")),
            ("INSTANCES", instances.join("\n")),
            ("CHECKS", checks.join("\n")),
        ],
        NODE_SH,
    )
}

/// The lines of `console` that start with `prefix`.
fn lines<'a>(console: &'a str, prefix: &str) -> Vec<&'a str> {
    console
        .lines()
        .filter_map(|l| l.find(prefix).map(|i| &l[i..]))
        .collect()
}

#[test]
fn tenants_reach_each_other_across_nodes_only_through_their_own_gre_tunnels() {
    require(&[
        (&["qemu-system-x86_64"], "qemu-system-x86"),
        (&["xorriso"], "xorriso"),
        (&["ip"], "iproute2"),
        (&["ldd"], "libc-bin"),
        (&["strip"], "binutils"),
    ]);
    let image = guest_image();
    let network: Ipv4Addr = SUBNET
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .expect("subnet");
    let key = spec_key(network);
    assert_eq!(key, 567_488, "the spec's example value");
    // `ip -d link` prints the GRE key field as a dotted quad of its bytes.
    let dotted = Ipv4Addr::from(key.to_be_bytes()).to_string();

    let tmp = TempDir(std::env::temp_dir().join(format!("ciao-gre-nodes-{}", std::process::id())));
    let _ = fs::remove_dir_all(&tmp.0);
    fs::create_dir_all(&tmp.0).expect("temp dir");
    let payload = tmp.0.join("payload");
    let started = Instant::now();
    stage_payload(&payload, &build_netnode());
    println!("payload staged in {:?}", started.elapsed());

    // Step 2: the CNCI stand-in: tenant A's bridge with the gateway, tenant
    // B's without (same CIDR: one gateway address per namespace).
    let tunnels = [
        ("gA1", "cbrA", CNCI_A, NODE_IPS[0]),
        ("gA2", "cbrA", CNCI_A, NODE_IPS[1]),
        ("gB1", "cbrB", CNCI_B, NODE_IPS[0]),
        ("gB2", "cbrB", CNCI_B, NODE_IPS[1]),
    ]
    .map(|(t, b, l, r)| format!("{t} {b} {l} {r} {key}"))
    .join("\n");
    let cnci_ud = user_data(
        &[
            ("UNDERLAY", format!("{CNCI_A}/24 {CNCI_B}/24")),
            ("BRIDGES", "cbrA 192.168.8.1/21\ncbrB".to_string()),
            ("TUNNELS", tunnels),
        ],
        CNCI_SH,
    );
    let node1 = [
        Inst {
            veth: "a1",
            tenant: TENANT_A,
            cnci_ip: CNCI_A,
            ip: "192.168.8.2",
        },
        Inst {
            veth: "b1",
            tenant: TENANT_B,
            cnci_ip: CNCI_B,
            ip: "192.168.8.2",
        },
    ];
    let node2 = [
        Inst {
            veth: "a2",
            tenant: TENANT_A,
            cnci_ip: CNCI_A,
            ip: "192.168.8.3",
        },
        Inst {
            veth: "b2",
            tenant: TENANT_B,
            cnci_ip: CNCI_B,
            ip: "192.168.8.4",
        },
    ];
    // Positive checks first, so a refused ping later is isolation, not a
    // peer still booting.
    let checks1 = [
        ("ok", "a1", "192.168.8.1"),
        ("ok", "a1", "192.168.8.3"),
        ("ok", "b1", "192.168.8.4"),
        ("fail", "b1", "192.168.8.3"),
        ("fail", "b1", "192.168.8.1"),
    ];
    let checks2 = [
        ("ok", "a2", "192.168.8.1"),
        ("ok", "a2", "192.168.8.2"),
        ("ok", "b2", "192.168.8.2"),
        ("fail", "b2", "192.168.8.3"),
        ("fail", "b2", "192.168.8.1"),
        ("fail", "a2", "192.168.8.4"),
    ];
    let iso_c = config_drive(&tmp.0, &payload, "cn", &cnci_ud);
    let iso_1 = config_drive(&tmp.0, &payload, "n1", &node_user_data(0, &node1, &checks1));
    let iso_2 = config_drive(&tmp.0, &payload, "n2", &node_user_data(1, &node2, &checks2));

    let ports: Vec<u16> = (0..4).map(|_| free_udp_port()).collect();
    let mut cnci = boot(
        "cnci",
        0,
        &tmp.0,
        image,
        &iso_c,
        &[(ports[0], ports[1]), (ports[2], ports[3])],
    );
    let mut vm1 = boot("node1", 1, &tmp.0, image, &iso_1, &[(ports[1], ports[0])]);
    let mut vm2 = boot("node2", 2, &tmp.0, image, &iso_2, &[(ports[3], ports[2])]);

    // Step 3.
    let by = Instant::now() + CHECKS_WITHIN;
    let cc = cnci.wait_for("GRE-CNCI-READY", by);
    assert_eq!(lines(&cc, "GRE-LINK ").len(), 4, "{cc}");
    for (vm, node_ip, insts) in [
        (&mut vm1, NODE_IPS[0], &node1),
        (&mut vm2, NODE_IPS[1], &node2),
    ] {
        let c = vm.wait_for("GRE-CHECKS-DONE", by);
        let name = vm.name;
        assert!(
            c.contains(&format!("NETNODE-INIT agent_ip={node_ip}")),
            "{name}:\n{c}"
        );
        // One TenantAdded per tenant (each VNIC is its subnet's first here),
        // with the spec's key.
        let vnics = lines(&c, "NETNODE-VNIC ");
        assert_eq!(vnics.len(), 2, "{name}:\n{c}");
        for (v, i) in vnics.iter().zip(insts.iter()) {
            assert!(
                v.contains(&format!("tenant={} ip={} tap=svn_", i.tenant, i.ip)),
                "{v}"
            );
            assert!(v.contains("gateway=192.168.8.1"), "{v}");
            assert!(
                v.contains(&format!("tenant_added=key={key},agent_ip={node_ip}")),
                "{v}"
            );
        }
        // The kernel's gretaps: one per concentrator, both with key K.
        let links = lines(&c, "GRE-LINK ");
        assert_eq!(links.len(), 2, "{name}:\n{c}");
        for remote in [CNCI_A, CNCI_B] {
            let l = links
                .iter()
                .find(|l| l.contains(&format!("remote {remote} local {node_ip} ")))
                .unwrap_or_else(|| panic!("{name}: no gretap to {remote}:\n{c}"));
            assert!(l.contains(": sgt_"), "{l}");
            assert!(
                l.contains(&format!("ikey {dotted} okey {dotted}")),
                "{name}: gretap key is not {key} ({dotted}): {l}"
            );
        }
        assert_eq!(
            lines(&c, "GRE-IPTABLES -A FORWARD ").len(),
            2,
            "{name}:\n{c}"
        );
        let pings = lines(&c, "GRE-PING ");
        assert!(!pings.is_empty(), "{name}:\n{c}");
        for p in &pings {
            let want = p
                .split("want=")
                .nth(1)
                .and_then(|s| s.split_whitespace().next());
            let got = p
                .split("got=")
                .nth(1)
                .and_then(|s| s.split_whitespace().next());
            assert_eq!(want, got, "{name}: {p}\n{c}");
        }
        println!("{name}: {} pings as expected", pings.len());
    }
    println!("checks done after {:?}", started.elapsed());

    // Step 4: only now may either node take its instances away.
    let by = Instant::now() + DELETE_WITHIN;
    for vm in [&vm1, &vm2] {
        vm.send_control("delete\n");
    }
    for vm in [&mut vm1, &mut vm2] {
        let c = vm.wait_for("GRE-NODE-DONE", by);
        let name = vm.name;
        let deleted = lines(&c, "NETNODE-DELETED ");
        assert_eq!(deleted.len(), 2, "{name}:\n{c}");
        for d in &deleted {
            assert!(
                d.ends_with(&format!("tenant_removed=key={key}")),
                "{name}: {d}"
            );
        }
        assert!(c.contains("NETNODE-LEFT []"), "{name}:\n{c}");
        assert!(c.contains("NETNODE-DONE subnets=0"), "{name}:\n{c}");
        assert!(c.contains("GRE-AFTER-DELETE []"), "{name}:\n{c}");
        assert_eq!(
            lines(&c, "GRE-IPTABLES -D FORWARD ").len(),
            2,
            "{name}:\n{c}"
        );
    }
    // The evidence, shortened, for the log of a passing run.
    for vm in [&vm1, &vm2] {
        for l in vm.console().lines() {
            let l = l.trim();
            if let Some(i) = l.find(" gretap remote ") {
                let name = l.split(':').nth(1).unwrap_or("").trim();
                let end = l[i..].find(" \\").map_or(l.len(), |e| i + e);
                println!("{}: GRE-LINK {name}{}", vm.name, &l[i..end]);
            } else if l.starts_with("GRE-") || l.starts_with("NETNODE-") {
                println!("{}: {l}", vm.name);
            }
        }
    }
    drop(vm1);
    drop(vm2);
    drop(cnci);
    println!("GRE nodes test done in {:?}", started.elapsed());
}
