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

fn setup(profile: &str, extra: &[&str]) -> (Env, Proc, std::net::SocketAddr, Proc) {
    // Before the guest is built or anything started: a missing QEMU is one line, at once.
    require_qemu();
    let env = Env::new();
    env.install_guest(IMAGE);
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
        log.contains("run with TCG") || log.contains("run with KVM"),
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
    env.wait_log_line(&["StartFailure for", &c], BOOT);
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
    // Refused at once by the start-up check, naming the missing program.
    env.wait_log_line(
        &[
            &id,
            "cannot run virtual machines: /nonexistent/qemu-system-x86_64 not found",
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

/// The throw-away system user the child-user tests run VMs as: made when
/// missing (`nobody` where it cannot be made).
fn test_child_user() -> &'static str {
    static USER: OnceLock<&'static str> = OnceLock::new();
    USER.get_or_init(|| {
        const NAME: &str = "ciao-test-child";
        let known = |n: &str| nix::unistd::User::from_name(n).ok().flatten().is_some();
        if !known(NAME) {
            let made = Command::new("useradd")
                .args([
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                ])
                .arg(NAME)
                .status();
            eprintln!("useradd {NAME}: {made:?}");
        }
        if known(NAME) { NAME } else { "nobody" }
    })
}

/// (uid, gid) of `name`.
fn ids_of(name: &str) -> (u32, u32) {
    let u = nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("no user {name}"));
    (u.uid.as_raw(), u.gid.as_raw())
}

/// The values of a `/proc/<pid>/status` line (`Uid:` real, effective,
/// saved, file system).
fn status_line(pid: i32, key: &str) -> Vec<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    s.lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no {key} in the status of {pid}"))
        .split_whitespace()
        .skip(1)
        .map(str::to_string)
        .collect()
}

fn owner(p: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.uid(), m.gid())
}

/// Checks that the VM's QEMU runs as `user` (real and effective ids, its
/// primary group only), confined, with its files the child's and nothing
/// else changed hands.
fn assert_runs_as(env: &Env, id: &str, user: &str) -> i32 {
    let (uid, gid) = ids_of(user);
    let pid = qemu_pid(env, id);
    assert_eq!(status_line(pid, "Uid:"), vec![uid.to_string(); 4]);
    assert_eq!(status_line(pid, "Gid:"), vec![gid.to_string(); 4]);
    assert_eq!(status_line(pid, "Groups:"), vec![gid.to_string()]);
    println!(
        "QEMU pid {pid} of {id}: Uid {:?}, Gid {:?}, Seccomp {:?}",
        status_line(pid, "Uid:"),
        status_line(pid, "Gid:"),
        status_line(pid, "Seccomp:")
    );
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let ids = format!("{uid}:{gid}");
    assert!(
        args.windows(2).any(|w| (w[0] == "-runas" && w[1] == ids)
            || (w[0] == "-run-with" && w[1] == format!("user={ids}"))),
        "{args:?}"
    );
    // Debian's QEMU has seccomp: the filter is on.
    if args.iter().any(|a| a == "-sandbox") {
        assert_eq!(status_line(pid, "Seccomp:"), ["2"]);
    }
    let dir = instance_dir(env, id);
    for f in ["image.qcow2", "seed.iso", "console.log", "qmp.sock"] {
        assert_eq!(owner(&dir.join(f)), (uid, gid), "{f}");
    }
    // The instance directory and its state stay root's, as does the
    // backing image that other VMs share.
    assert_eq!(owner(&dir), (0, 0));
    assert_eq!(owner(&dir.join("state")), (0, 0));
    assert_eq!(owner(&env.dir.join("data/images").join(IMAGE)), (0, 0));
    pid
}

#[test]
fn vm_as_child_user_2016() {
    let user = test_child_user();
    let flag = format!("-child-user={user}");
    let (env, _serve, _addr, _launcher) = setup("2016", &[&flag]);
    let id = start_vm(
        &env,
        false,
        64,
        "#cloud-config\nruncmd:\n  - echo as-child > /root/marker\n",
    );
    wait_console(
        &env,
        &id,
        &format!("GUEST-BOOTED uuid={id} hostname={id}"),
        1,
    );
    wait_console(&env, &id, "GUEST-RUNCMD-DONE rc=0", 1);
    env.wait_list("running", |l| state_of(l, &id) == Some("running"));
    let pid = assert_runs_as(&env, &id, user);
    let log = env.log();
    assert!(
        log.contains(&format!("virtual machines run as {user}")),
        "{log}"
    );
    assert!(log.contains("VMs of a child user drop privileges"), "{log}");

    // STOP: the guest powers off; QEMU (not root) is gone.
    env.lc_ok(&["stop", &id]);
    env.wait_list_within(BOOT, "exited", |l| state_of(l, &id) == Some("exited"));
    wait_console(&env, &id, "GUEST-POWERDOWN", 1);
    wait_dead(pid);
    // RESTART: the same disk, written by the child at the first boot.
    env.lc_ok(&["restart", &id]);
    let c = wait_console(&env, &id, "GUEST-RUNCMD-DONE", 2);
    assert!(
        c.lines()
            .filter(|l| l.starts_with("GUEST-PERSIST"))
            .nth(1)
            .is_some_and(|l| l.contains("marker")),
        "{c}"
    );
    env.wait_list("running again", |l| state_of(l, &id) == Some("running"));
    let pid = assert_runs_as(&env, &id, user);

    // A child that rewrote its overlay's header to have root QEMU open
    // another file at the next boot: that boot is refused.
    env.lc_ok(&["stop", &id]);
    env.wait_list_within(BOOT, "exited again", |l| state_of(l, &id) == Some("exited"));
    wait_dead(pid);
    let overlay = instance_dir(&env, &id).join("image.qcow2");
    let ok = Command::new("qemu-img")
        .args([
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            "/etc/shadow",
        ])
        .arg(&overlay)
        .status()
        .expect("qemu-img rebase");
    assert!(ok.success());
    env.lc_ok(&["restart", &id]);
    wait_log(&env, "names /etc/shadow as its backing file: refused");
    wait_log(&env, "launch_failure");
    assert!(env.vm_pids().is_empty());
    // DELETE: every file goes, the child's too.
    env.lc_ok(&["delete", &id]);
    env.wait_list("deleted", |l| state_of(l, &id).is_none());
    assert!(!instance_dir(&env, &id).exists());
    assert_eq!(env.instance_dirs(), 0);
}

/// `ciao-lc serve` with a cluster configuration (CONNECTED), killed on drop.
struct Serve(std::process::Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve_configured(env: &Env, profile: &str, child_user: &str) -> (Serve, std::net::SocketAddr) {
    let conf = env.dir.join("configuration.yaml");
    std::fs::write(
        &conf,
        format!("configure:\n  launcher:\n    disk_limit: false\n    mem_limit: false\n    child_user: {child_user}\n"),
    )
    .expect("configuration");
    let mut child = Command::new(LC)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--protocol",
            profile,
            "--certs",
        ])
        .arg(env.certs())
        .arg("--configuration")
        .arg(&conf)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("serve");
    let lines = lines_of(child.stdout.take().expect("stdout"));
    let serve = Serve(child);
    let first = lines.recv_timeout(WAIT).expect("serve prints its address");
    let addr = first
        .split_whitespace()
        .skip_while(|w| *w != "on")
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {first:?}"));
    std::thread::spawn(move || for _ in lines.iter() {});
    (serve, addr)
}

fn configured_setup(child_user: &str, extra: &[&str]) -> (Env, Serve, Proc) {
    let env = Env::new();
    env.install_guest(IMAGE);
    let (serve, addr) = serve_configured(&env, "2018", child_user);
    let launcher = launcher(&env, addr, "2018", extra);
    env.wait_connected();
    (env, serve, launcher)
}

/// The 2018 CONNECTED frame's `launcher.child_user`, without the flag.
#[test]
fn vm_as_the_cluster_configurations_child_user_2018() {
    let user = test_child_user();
    let (env, _serve, _launcher) = configured_setup(user, &[]);
    wait_log(
        &env,
        &format!("cluster configuration: virtual machines run as {user}"),
    );
    let id = start_vm(&env, false, 48, "#cloud-config\n");
    wait_console(&env, &id, "GUEST-BOOTED", 1);
    env.wait_list("active", |l| state_of(l, &id) == Some("active"));
    let pid = assert_runs_as(&env, &id, user);
    env.lc_ok(&["delete", &id]);
    env.wait_list("deleted", |l| state_of(l, &id).is_none());
    wait_dead(pid);
    assert_eq!(env.instance_dirs(), 0);
}

/// An unknown child user in CONNECTED: one error line, VM STARTs refused
/// (nothing runs as root instead); `--child-user` overrides it.
#[test]
fn unknown_child_user_of_the_cluster_refuses_vms_2018() {
    let unknown = "no-such-user-ciao-x";
    let (env, _serve, _launcher) = configured_setup(unknown, &[]);
    wait_log(&env, "cluster configuration: launcher.child_user: no user");
    for _ in 0..2 {
        let out = env.lc_ok(&["start", "--image", IMAGE, "--legacy", "--mem-mb", "48"]);
        let id = out.split_whitespace().nth(1).expect("id").to_string();
        env.wait_list("refused", |l| state_of(l, &id).is_none());
    }
    let deadline = Instant::now() + WAIT;
    while env.log().matches("image_failure").count() < 2 {
        assert!(Instant::now() < deadline, "two refusals:\n{}", env.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = env.log();
    assert_eq!(
        log.matches("refused: the cluster configuration's launcher.child_user")
            .count(),
        2,
        "{log}"
    );
    assert_eq!(
        log.matches("cluster configuration: launcher.child_user")
            .count(),
        1,
        "{log}"
    );
    assert_eq!(log.matches("image_failure").count(), 2, "{log}");
    // The refused instances' directories go right after the refusal.
    let deadline = Instant::now() + WAIT;
    while env.instance_dirs() > 0 {
        assert!(Instant::now() < deadline, "files left by refused STARTs");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(env.vm_pids().is_empty());

    // The flag wins over the configuration.
    let user = test_child_user();
    let flag = format!("--child-user={user}");
    let (env, _serve, _launcher) = configured_setup(unknown, &[&flag]);
    wait_log(&env, "overridden by --child-user");
    let id = start_vm(&env, false, 48, "#cloud-config\n");
    env.wait_list("active", |l| state_of(l, &id) == Some("active"));
    let pid = assert_runs_as(&env, &id, user);
    env.lc_ok(&["delete", &id]);
    env.wait_list("deleted", |l| state_of(l, &id).is_none());
    wait_dead(pid);
}

/// An unknown `--child-user` is a command-line error: exit status 2.
#[test]
fn unknown_child_user_flag_is_a_usage_error() {
    let env = Env::new();
    let out = Command::new(LAUNCHER)
        .arg("-cacert")
        .arg(env.certs().join("CAcert.pem"))
        .arg("-cert")
        .arg(env.certs().join("cert-CNAgent.pem"))
        .arg("--data-dir")
        .arg(env.dir.join("data"))
        .args(["-child-user", "no-such-user-ciao-x"])
        .output()
        .expect("launcher");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains("--child-user") && err.contains("no-such-user-ciao-x"),
        "{err}"
    );
}

/// EFI (the VM's own EFI variables) and a hot-plugged volume, which QEMU
/// opens after it dropped to the child user: the volume is given to it.
#[test]
fn efi_and_hotplug_as_child_user_2018() {
    let user = test_child_user();
    let (uid, gid) = ids_of(user);
    let (env, _serve, _addr, _launcher) = setup("2018", &["--child-user", user]);
    let watcher = "#!/bin/sh\n( o=; while :; do n=$(ls /sys/block | grep '^vd' | tr '\\n' ' '); [ \"$n\" != \"$o\" ] && echo \"GUEST-DISKS $n\" > /dev/console; o=$n; sleep 0.5; done ) > /dev/null 2>&1 &\n";
    let id = start_vm(&env, true, 128, watcher);
    wait_console(&env, &id, "GUEST-DISKS", 1);
    env.wait_list("active", |l| state_of(l, &id) == Some("active"));
    let pid = assert_runs_as(&env, &id, user);
    assert_eq!(
        owner(&instance_dir(&env, &id).join("OVMF_VARS.fd")),
        (uid, gid)
    );

    let volumes = env.dir.join("data/volumes");
    std::fs::create_dir_all(&volumes).expect("volumes dir");
    let vol = "0f0f0f0f-0000-4000-8000-000000000002";
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(volumes.join(vol))
        .arg("8M")
        .status()
        .expect("qemu-img");
    assert!(ok.success());
    // Another volume, not this instance's, stays root's.
    let other = volumes.join("0f0f0f0f-0000-4000-8000-0000000000aa");
    std::fs::write(&other, [0u8; 4096]).expect("other volume");
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
    assert_eq!(owner(&volumes.join(vol)), (uid, gid));
    assert_eq!(owner(&other), (0, 0));
    env.lc_ok(&["delete", &id]);
    env.wait_list("deleted", |l| state_of(l, &id).is_none());
    wait_dead(pid);
    assert_eq!(env.instance_dirs(), 0);
}

/// The SSH address `ciao-lc list` shows for `id` (the column before the
/// VNIC's `-`: this VM has no tenant VNIC), once it shows one.
fn wait_ssh(env: &Env, id: &str) -> std::net::SocketAddr {
    let deadline = Instant::now() + WAIT;
    loop {
        let out = env.lc_ok(&["list"]);
        let shown = out
            .lines()
            .find(|l| l.contains(id))
            .and_then(|l| l.split_whitespace().rev().nth(1))
            .and_then(|w| w.parse().ok());
        if let Some(a) = shown {
            return a;
        }
        assert!(Instant::now() < deadline, "no SSH address for {id}:\n{out}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One line through `addr` and back.
fn try_echo(addr: std::net::SocketAddr, what: &str) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let line = format!("{what}\n");
    s.write_all(line.as_bytes())?;
    let mut back = vec![0; line.len()];
    s.read_exact(&mut back)?;
    if back != line.as_bytes() {
        return Err(std::io::Error::other(format!(
            "sent {line:?}, got {:?}",
            String::from_utf8_lossy(&back)
        )));
    }
    Ok(())
}

/// Echoes a line through the forward, retrying (bounded) while the guest's
/// listener is not up yet (QEMU accepts on the host side and closes).
fn echo_through(addr: std::net::SocketAddr, what: &str) {
    let deadline = Instant::now() + BOOT;
    loop {
        match try_echo(addr, what) {
            Ok(()) => return,
            Err(e) => assert!(
                Instant::now() < deadline,
                "no echo of {what:?} through {addr}: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Local addresses (kernel hex form, e.g. 0100007F for 127.0.0.1) of the
/// TCP listeners on `port` in this network namespace, IPv4 and IPv6.
fn listeners(port: u16) -> Vec<String> {
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let t = std::fs::read_to_string(table).unwrap_or_default();
        for line in t.lines().skip(1) {
            let w: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state)) = (w.get(1), w.get(3)) else {
                continue;
            };
            let Some((ip, p)) = local.split_once(':') else {
                continue;
            };
            if *state == "0A" && u16::from_str_radix(p, 16) == Ok(port) {
                found.push(ip.to_string());
            }
        }
    }
    found
}

/// `--user-net`: the guest's port 22 (a TCP echo server from runcmd here:
/// the test guest has no sshd) is forwarded from a free 127.0.0.1 port that
/// STATS reports as the instance's SSH address and `ciao-lc list` shows,
/// bound to 127.0.0.1 only. The address is in the instance's state and
/// stays the same across a launcher kill -9 and a STOP/RESTART; DELETE
/// frees it.
#[test]
fn user_net_forwards_the_guest_ssh_port_from_loopback_only_2016() {
    let (env, _serve, addr, first) = setup("2016", &["--user-net"]);
    let id = start_vm(
        &env,
        false,
        64,
        "#cloud-config\nruncmd:\n  - nc -ll -p 22 -e /bin/cat &\n",
    );
    // QEMU's user-mode DHCP answered the guest.
    wait_console(&env, &id, "GUEST-DHCP eth0 10.0.2.15/24", 1);
    wait_console(&env, &id, "GUEST-RUNCMD-DONE rc=0", 1);
    let ssh = wait_ssh(&env, &id);
    assert_eq!(ssh.ip(), std::net::Ipv4Addr::LOCALHOST, "{ssh}");
    echo_through(ssh, "first boot");
    println!("guest port 22 reached through {ssh}");
    // Bound to 127.0.0.1 only: no other listener on the port, and another
    // loopback address of this host is refused.
    assert_eq!(listeners(ssh.port()), ["0100007F"]);
    let other = std::net::SocketAddr::from(([127, 0, 0, 2], ssh.port()));
    match std::net::TcpStream::connect_timeout(&other, Duration::from_secs(2)) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        r => panic!("{other}: {r:?}"),
    }
    let state = std::fs::read_to_string(instance_dir(&env, &id).join("state")).expect("state");
    assert!(state.contains(&format!("ssh_forward: {ssh}")), "{state}");

    // kill -9 the launcher: the new one reports the same forward.
    let old = env.peer().expect("connected");
    first.kill9();
    let _second = launcher(&env, addr, "2016", &["--user-net"]);
    env.wait_reconnected(&old);
    wait_log(&env, "1 instance(s) recovered");
    env.wait_list("running after the restart", |l| {
        state_of(l, &id) == Some("running")
    });
    assert_eq!(wait_ssh(&env, &id), ssh);
    echo_through(ssh, "after the launcher restart");

    // STOP and RESTART: the VM boots again behind the same port.
    env.lc_ok(&["stop", &id]);
    env.wait_list_within(BOOT, "exited", |l| state_of(l, &id) == Some("exited"));
    env.lc_ok(&["restart", &id]);
    wait_console(&env, &id, "GUEST-RUNCMD-DONE rc=0", 2);
    env.wait_list_within(BOOT, "running again", |l| {
        state_of(l, &id) == Some("running")
    });
    assert_eq!(wait_ssh(&env, &id), ssh);
    echo_through(ssh, "after RESTART");

    // DELETE: nothing listens there any more.
    let pid = qemu_pid(&env, &id);
    env.lc_ok(&["delete", &id]);
    env.wait_list("deleted", |l| state_of(l, &id).is_none());
    wait_dead(pid);
    assert!(listeners(ssh.port()).is_empty());
}
