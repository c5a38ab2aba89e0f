//! Virtual machines through the real `ciao-launcher` and the real
//! `qemu-system-x86_64`, booting the project's test guest
//! (`scripts/build-guest-image.sh`: a tiny kernel + busybox that prints
//! `GUEST-BOOTED uuid=… hostname=…` from its config drive, runs `runcmd` and
//! powers off on the ACPI button), driven with `ciao-lc` over TLS. The
//! accelerator is chosen by the launcher (`auto`): TCG on machines whose
//! /dev/kvm cannot run guests.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ciao_launcher::nodestats::process_identity;
use common::*;

/// The backing image's UUID in every test's data directory.
const IMAGE: &str = "7e57a9e0-0c1a-4000-8000-000000000001";
/// Booting under TCG on two shared cores, several VMs at once.
const BOOT: Duration = Duration::from_secs(240);

/// The test guest, built (or found in its cache) once per test binary.
fn guest_image() -> &'static Path {
    static IMG: OnceLock<PathBuf> = OnceLock::new();
    IMG.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/build-guest-image.sh");
        let out = Command::new("bash")
            .arg(script)
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("run build-guest-image.sh");
        assert!(
            out.status.success(),
            "scripts/build-guest-image.sh failed: the QEMU tests need the test guest"
        );
        let path = PathBuf::from(text(&out.stdout).lines().last().unwrap_or("").trim());
        assert!(path.is_file(), "no guest image at {}", path.display());
        path
    })
}

fn setup(profile: &str, extra: &[&str]) -> (Env, Proc, std::net::SocketAddr, Proc) {
    // Before the guest is built or anything started: a missing QEMU is one line, at once.
    require_qemu();
    let env = Env::new();
    let images = env.dir.join("data/images");
    std::fs::create_dir_all(&images).expect("images dir");
    std::fs::copy(guest_image(), images.join(IMAGE)).expect("install the guest image");
    let (serve, addr) = env.serve("127.0.0.1:0", profile);
    let launcher = launcher(&env, addr, profile, extra);
    env.wait_connected();
    (env, serve, addr, launcher)
}

fn launcher(env: &Env, addr: std::net::SocketAddr, profile: &str, extra: &[&str]) -> Proc {
    let mut flags = vec!["--stop-timeout", "30", "--usage-interval", "0.5"];
    flags.extend_from_slice(extra);
    env.launcher_with(addr, profile, &flags)
}

/// STARTs a VM of the test guest; returns its id.
fn start_vm(env: &Env, efi: bool, mem_mb: u32, user_data: &str) -> String {
    let ud = env.dir.join(format!("ud-{}", uuid::Uuid::new_v4()));
    std::fs::write(&ud, user_data).expect("user data");
    let mem = mem_mb.to_string();
    let mut args = vec![
        "start",
        "--image",
        IMAGE,
        "--vcpus",
        "1",
        "--mem-mb",
        &mem,
        "--user-data",
        ud.to_str().expect("path"),
    ];
    if !efi {
        args.push("--legacy");
    }
    let out = env.lc_ok(&args);
    out.split_whitespace()
        .nth(1)
        .expect("instance id")
        .to_string()
}

fn instance_dir(env: &Env, id: &str) -> PathBuf {
    env.dir.join("data/instances").join(id)
}

/// The VM's serial console so far (CR LF line ends made LF).
fn console(env: &Env, id: &str) -> String {
    std::fs::read_to_string(instance_dir(env, id).join("console.log"))
        .unwrap_or_default()
        .replace('\r', "")
}

/// Waits until `needle` appears `n` times on the console.
fn wait_console(env: &Env, id: &str, needle: &str, n: usize) -> String {
    let deadline = Instant::now() + BOOT;
    loop {
        let c = console(env, id);
        if c.matches(needle).count() >= n {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} (×{n}) on the console of {id}:\n{c}\nlauncher log:\n{}",
            env.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_log(env: &Env, what: &str) {
    let deadline = Instant::now() + BOOT;
    while !env.log().contains(what) {
        assert!(
            Instant::now() < deadline,
            "no {what:?} in the log:\n{}",
            env.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn qemu_pid(env: &Env, id: &str) -> i32 {
    std::fs::read_to_string(instance_dir(env, id).join("qemu.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no qemu.pid for {id}"))
}

/// The process exists and is not a zombie.
fn alive(pid: i32) -> bool {
    process_identity(Path::new("/proc"), pid).is_some()
}

fn wait_dead(pid: i32) {
    let deadline = Instant::now() + WAIT;
    while alive(pid) {
        assert!(Instant::now() < deadline, "QEMU pid {pid} still alive");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (memory MiB, disk MiB, cpu %) of an instance from `ciao-lc list`; None
/// for unknown figures.
fn figures(env: &Env, id: &str) -> Option<(i64, i64, i64)> {
    let out = env.lc_ok(&["list"]);
    let line = out.lines().find(|l| l.contains(id))?;
    let w: Vec<&str> = line.split_whitespace().collect();
    // NODE INSTANCE STATE MEM MiB DISK MiB CPU
    let n = |i: usize| w.get(i).and_then(|v| v.parse::<i64>().ok());
    Some((n(3)?, n(5)?, n(7)?))
}

fn kill9(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill QEMU");
}

#[test]
fn vm_lifecycle_bios_2016() {
    let (env, _serve, _addr, _launcher) = setup("2016", &[]);
    let id = start_vm(
        &env,
        false,
        64,
        "#cloud-config\nruncmd:\n  - echo first-boot > /root/marker\n  - dd if=/dev/zero of=/root/blob bs=1M count=3\n  - sync\n",
    );
    // The guest read its config drive (uuid and hostname = the instance).
    wait_console(
        &env,
        &id,
        &format!("GUEST-BOOTED uuid={id} hostname={id}"),
        1,
    );
    wait_console(&env, &id, "GUEST-RUNCMD-DONE rc=0", 1);
    env.wait_list("running", |l| state_of(l, &id) == Some("running"));
    let log = env.log();
    assert!(
        log.contains("run with Tcg") || log.contains("run with Kvm"),
        "{log}"
    );

    // Real figures: QEMU's RSS, the overlay's size, a CPU percentage.
    let deadline = Instant::now() + WAIT;
    let (mem, disk, cpu) = loop {
        // The guest wrote 3 MB: the overlay's allocated size shows it.
        if let Some(f) = figures(&env, &id).filter(|f| f.0 > 0 && f.1 >= 3) {
            break f;
        }
        assert!(
            Instant::now() < deadline,
            "no figures:\n{}",
            env.lc_ok(&["list"])
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("STATS of a running VM: memory {mem} MiB, disk {disk} MiB, cpu {cpu}%");
    // QEMU's own threads can take a VM a little over 100 % of its vCPUs.
    assert!(disk >= 0 && cpu >= 0);

    // STOP: the guest powers itself off on the ACPI button.
    let pid = qemu_pid(&env, &id);
    let t = Instant::now();
    env.lc_ok(&["stop", &id]);
    env.wait_list_within(BOOT, "exited", |l| state_of(l, &id) == Some("exited"));
    println!("STOP → exited in {:?}", t.elapsed());
    assert!(!alive(pid));
    wait_console(&env, &id, "GUEST-POWERDOWN", 1);
    wait_log(&env, "stopped (the guest powered off)");
    assert!(instance_dir(&env, &id).join("image.qcow2").is_file());

    // RESTART: the same disk; the first boot's file is still there.
    env.lc_ok(&["restart", &id]);
    let c = wait_console(&env, &id, "GUEST-RUNCMD-DONE", 2);
    env.wait_list_within(BOOT, "running again", |l| {
        state_of(l, &id) == Some("running")
    });
    let persisted = c
        .lines()
        .filter(|l| l.starts_with("GUEST-PERSIST"))
        .nth(1)
        .unwrap_or_else(|| panic!("no second GUEST-PERSIST line:\n{c}"));
    assert!(
        persisted.contains("marker") && persisted.contains("blob"),
        "{persisted}"
    );

    // DELETE: no process, no file, no socket.
    let pid = qemu_pid(&env, &id);
    env.lc_ok(&["delete", &id]);
    env.wait_list("deleted", |l| state_of(l, &id).is_none());
    wait_dead(pid);
    assert!(!instance_dir(&env, &id).exists());
    assert_eq!(env.instance_dirs(), 0);
}

#[test]
fn vm_efi_boots_2018() {
    let (env, _serve, _addr, _launcher) = setup("2018", &[]);
    let id = start_vm(&env, true, 128, "#cloud-config\nruncmd:\n  - [ true ]\n");
    wait_console(
        &env,
        &id,
        &format!("GUEST-BOOTED uuid={id} hostname={id}"),
        1,
    );
    env.wait_list("active", |l| state_of(l, &id) == Some("active"));
    // Debian's OVMF comes as code + variables: each VM has its own variables.
    assert!(instance_dir(&env, &id).join("OVMF_VARS.fd").is_file());
    let pid = qemu_pid(&env, &id);
    env.lc_ok(&["delete", &id]);
    env.wait_list("deleted", |l| state_of(l, &id).is_none());
    wait_dead(pid);
    assert_eq!(env.instance_dirs(), 0);
}

#[test]
fn kill9_launcher_with_three_vms_then_a_crash_2016() {
    let (env, _serve, addr, first) = setup("2016", &[]);
    let ids: Vec<String> = (0..3)
        .map(|_| start_vm(&env, false, 48, "#cloud-config\n"))
        .collect();
    for id in &ids {
        wait_console(&env, id, "GUEST-BOOTED", 1);
    }
    env.wait_list("3 running", |l| {
        ids.iter().all(|id| state_of(l, id) == Some("running"))
    });
    let pids: Vec<i32> = ids.iter().map(|id| qemu_pid(&env, id)).collect();

    let old = env.peer().expect("connected");
    first.kill9();
    let _second = launcher(&env, addr, "2016", &[]);
    env.wait_reconnected(&old);
    wait_log(&env, "3 instance(s) recovered");
    env.wait_list("3 running after the restart", |l| {
        l.len() == 3 && ids.iter().all(|id| state_of(l, id) == Some("running"))
    });
    // The same VMs, re-attached, not new ones.
    for (id, pid) in ids.iter().zip(&pids) {
        assert_eq!(qemu_pid(&env, id), *pid);
        assert!(alive(*pid));
    }
    // Stoppable.
    for id in &ids[..2] {
        env.lc_ok(&["stop", id]);
    }
    env.wait_list_within(BOOT, "2 exited", |l| {
        ids[..2].iter().all(|id| state_of(l, id) == Some("exited"))
    });
    for pid in &pids[..2] {
        wait_dead(*pid);
    }
    // A crash (kill -9 QEMU) of the third: 2016 keeps it as exited.
    kill9(pids[2]);
    env.wait_list_within(WAIT, "crash reported", |l| {
        state_of(l, &ids[2]) == Some("exited")
    });
    wait_log(&env, "exited by itself: QEMU exited unexpectedly");
    assert!(instance_dir(&env, &ids[2]).is_dir());
}

#[test]
fn qemu_crash_2018_is_instance_stopped() {
    let (env, _serve, _addr, _launcher) = setup("2018", &[]);
    let id = start_vm(&env, false, 48, "#cloud-config\n");
    env.wait_list("active", |l| state_of(l, &id) == Some("active"));
    let pid = qemu_pid(&env, &id);
    kill9(pid);
    env.wait_list("gone", |l| state_of(l, &id).is_none());
    wait_log(&env, "exited by itself: QEMU exited unexpectedly");
    assert!(!instance_dir(&env, &id).exists());
}

#[test]
fn bad_inputs_leave_nothing_behind() {
    let (env, _serve, _addr, _launcher) = setup("2016", &["--ovmf", "/nonexistent/OVMF.fd"]);
    // Unknown image.
    let unknown = "0000aaaa-0000-4000-8000-00000000dead";
    let out = env.lc_ok(&["start", "--image", unknown, "--legacy"]);
    let a = out.split_whitespace().nth(1).expect("id").to_string();
    wait_log(&env, &format!("images/{unknown} not found"));
    // Corrupt image: a qcow2 header with nothing sensible behind it.
    let corrupt = "0000aaaa-0000-4000-8000-00000000beef";
    let mut junk = b"QFI\xfb\x00\x00\x00\x03".to_vec();
    junk.extend(std::iter::repeat_n(0xA5u8, 4096));
    std::fs::write(env.dir.join("data/images").join(corrupt), junk).expect("corrupt image");
    let out = env.lc_ok(&["start", "--image", corrupt, "--legacy"]);
    let b = out.split_whitespace().nth(1).expect("id").to_string();
    wait_log(&env, "is not a usable image");
    // EFI without firmware.
    let out = env.lc_ok(&["start", "--image", IMAGE]);
    let c = out.split_whitespace().nth(1).expect("id").to_string();
    // (The start-up check names the missing firmware too: wait for this START's line.)
    env.wait_log_line(&[&c, "/nonexistent/OVMF.fd not found"], BOOT);
    env.wait_log_line(&["Start failure for", &c], BOOT);
    for id in [&a, &b, &c] {
        env.wait_list("nothing listed", |l| state_of(l, id).is_none());
    }
    let log = env.log();
    assert_eq!(log.matches("image_failure").count(), 2, "{log}");
    assert_eq!(log.matches("launch_failure").count(), 1, "{log}");
    assert_eq!(env.instance_dirs(), 0);

    // disk_mb smaller than the image: not an error, the image's size wins.
    let out = env.lc_ok(&[
        "start",
        "--image",
        IMAGE,
        "--legacy",
        "--mem-mb",
        "48",
        "--disk-mb",
        "1",
    ]);
    let d = out.split_whitespace().nth(1).expect("id").to_string();
    env.wait_list("running", |l| state_of(l, &d) == Some("running"));
    let size = |p: &Path| -> u64 {
        let o = Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(p)
            .output()
            .expect("qemu-img");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        v["virtual-size"].as_u64().expect("size")
    };
    assert_eq!(
        size(&instance_dir(&env, &d).join("image.qcow2")),
        size(guest_image())
    );
    env.lc_ok(&["delete", &d]);
    env.wait_list("deleted", |l| state_of(l, &d).is_none());
}

#[test]
fn qemu_missing_is_a_launch_failure() {
    let (env, _serve, _addr, _launcher) =
        setup("2016", &["--qemu", "/nonexistent/qemu-system-x86_64"]);
    let out = env.lc_ok(&["start", "--image", IMAGE, "--legacy"]);
    let id = out.split_whitespace().nth(1).expect("id").to_string();
    wait_log(&env, "launch_failure");
    env.wait_log_line(
        &[
            &id,
            "/nonexistent/qemu-system-x86_64: No such file or directory",
        ],
        BOOT,
    );
    env.wait_list("nothing listed", |l| state_of(l, &id).is_none());
    assert_eq!(env.instance_dirs(), 0);
}

#[test]
fn attach_volume_hotplug_2018() {
    let (env, _serve, _addr, _launcher) = setup("2018", &[]);
    // The guest reports its disks whenever they change.
    let watcher = "#!/bin/sh\n( o=; while :; do n=$(ls /sys/block | grep '^vd' | tr '\\n' ' '); [ \"$n\" != \"$o\" ] && echo \"GUEST-DISKS $n\" > /dev/console; o=$n; sleep 0.5; done ) > /dev/null 2>&1 &\n";
    let id = start_vm(&env, false, 64, watcher);
    wait_console(&env, &id, "GUEST-RUNCMD-DONE", 1);
    wait_console(&env, &id, "GUEST-DISKS", 1);

    let volumes = env.dir.join("data/volumes");
    std::fs::create_dir_all(&volumes).expect("volumes dir");
    let vol = "0f0f0f0f-0000-4000-8000-000000000001";
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(volumes.join(vol))
        .arg("8M")
        .status()
        .expect("qemu-img");
    assert!(ok.success());
    env.lc_ok(&["attach", &id, vol]);
    wait_log(&env, &format!("volume {vol} attached"));
    let c = wait_console(&env, &id, "GUEST-DISKS", 2);
    let last = c
        .lines()
        .rfind(|l| l.starts_with("GUEST-DISKS"))
        .unwrap_or_default()
        .to_string();
    assert!(
        last.contains("vdc"),
        "a third disk after the hot-plug: {last}"
    );
    let state = std::fs::read_to_string(instance_dir(&env, &id).join("state")).expect("state");
    assert!(state.contains(vol), "{state}");

    // Again → already_attached; a volume that does not exist → attach_failure.
    env.lc_ok(&["attach", &id, vol]);
    wait_log(&env, "already_attached");
    env.lc_ok(&["attach", &id, "0f0f0f0f-0000-4000-8000-0000000000ff"]);
    wait_log(&env, "attach_failure");
    env.lc_ok(&["delete", &id]);
    env.wait_list("deleted", |l| state_of(l, &id).is_none());
}

#[test]
fn vm_that_died_while_the_launcher_was_down_is_a_crash_2018() {
    let (env, _serve, addr, first) = setup("2018", &[]);
    let id = start_vm(&env, false, 48, "#cloud-config\n");
    env.wait_list("active", |l| state_of(l, &id) == Some("active"));
    let pid = qemu_pid(&env, &id);
    let old = env.peer().expect("connected");
    first.kill9();
    kill9(pid);
    wait_dead(pid);
    let _second = launcher(&env, addr, "2018", &[]);
    env.wait_reconnected(&old);
    wait_log(&env, "1 instance(s) recovered");
    wait_log(&env, "VM not running after the launcher restarted");
    env.wait_list("gone", |l| state_of(l, &id).is_none());
    assert!(!instance_dir(&env, &id).exists());
}
