//! Start-up checks of the real launcher: one log line per virtualizer says
//! whether the node can serve it (versions, accelerator, firmware, engine)
//! or why not, and the node runs with what it has.

mod common;

use std::time::Duration;

use common::*;

fn line<'a>(log: &'a str, prefix: &str) -> &'a str {
    let mut found = log.lines().filter(|l| l.contains(prefix));
    let first = found
        .next()
        .unwrap_or_else(|| panic!("no {prefix:?} line in the log:\n{log}"));
    assert!(
        found.next().is_none(),
        "more than one {prefix:?} line:\n{log}"
    );
    first
}

#[test]
fn missing_virtualizers_are_one_line_each_and_the_node_serves() {
    let env = Env::new();
    let (_serve, addr) = env.serve("127.0.0.1:0", "2018");
    let nodocker = env.dir.join("no-docker.sock");
    let launcher = env.launcher_with(
        addr,
        "2018",
        &[
            "--qemu",
            "/nonexistent/qemu-system-x86_64",
            "--docker-socket",
            nodocker.to_str().expect("path"),
        ],
    );
    env.wait_connected();
    let log = env.log();
    let vm = line(&log, "virtual machines: ");
    assert!(
        vm.starts_with('W')
            && vm.contains("virtual machines: no — /nonexistent/qemu-system-x86_64 not found"),
        "{vm}"
    );
    let ct = line(&log, "containers: ");
    assert!(
        ct.starts_with('W') && ct.contains("containers: no — ") && ct.contains("no-docker.sock"),
        "{ct}"
    );
    // A VM START gets its error at once, with the start-up check's reason.
    let out = env.lc_ok(&["start", "--image", "b286cd45-7d0c-4525-a140-4db6c95e41fa"]);
    let id = out.split_whitespace().nth(1).expect("id").to_string();
    env.wait_log_line(
        &[&id, "launch_failure", "cannot run virtual machines"],
        WAIT,
    );
    env.wait_list("nothing listed", |l| state_of(l, &id).is_none());
    assert_eq!(env.instance_dirs(), 0);
    assert_eq!(launcher.terminate(Duration::from_secs(5)), Some(0));
}

#[test]
fn qemu_found_is_reported_with_versions_accelerator_firmware_and_iso_tool() {
    require_qemu();
    let env = Env::new();
    let (_serve, addr) = env.serve("127.0.0.1:0", "2016");
    let nodocker = env.dir.join("no-docker.sock");
    let launcher = env.launcher_with(
        addr,
        "2016",
        &["--docker-socket", nodocker.to_str().expect("path")],
    );
    env.wait_connected();
    let log = env.log();
    let vm = line(&log, "virtual machines: ");
    assert!(vm.starts_with('I'), "{vm}");
    for part in [
        "yes — QEMU ",
        ", qemu-img ",
        "run with ",
        "OVMF ",
        "config drives by ",
    ] {
        assert!(vm.contains(part), "no {part:?} in {vm}");
    }
    assert_eq!(launcher.terminate(Duration::from_secs(5)), Some(0));
}
