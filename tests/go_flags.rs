//! Command lines written for the Go launcher work with the real binary:
//! glog's `-vmodule` and `-log_backtrace_at` (accepted, ignored with a
//! warning), a bare `-with-ui`, and the Go default certificate paths.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn go_glog_flags_are_accepted_with_a_warning_and_the_node_serves() {
    let env = Env::new();
    let (_serve, addr) = env.serve("127.0.0.1:0", "2016");
    let launcher = env.launcher_with(
        addr,
        "2016",
        &[
            "-simulation",
            "-vmodule=overseer=2,qemu*=3",
            "-log_backtrace_at=main.go:42",
            "-with-ui",
            "-v=1",
        ],
    );
    env.wait_connected();
    let log = env.log();
    for flag in [
        "-vmodule=overseer=2,qemu*=3",
        "-log_backtrace_at=main.go:42",
    ] {
        let line = log
            .lines()
            .find(|l| l.contains(flag))
            .unwrap_or_else(|| panic!("no warning about {flag}:\n{log}"));
        assert!(line.starts_with('W') && line.contains("ignored"), "{line}");
    }
    // glog's shape: letter + MMDD, time with a six-digit fraction, thread, file:line].
    let first = log.lines().next().expect("a log line");
    let w: Vec<&str> = first.split_whitespace().collect();
    assert!(w.len() > 4, "{first}");
    assert!(w[0].len() == 5 && "EWIDT".contains(&w[0][..1]), "{first}");
    let (hms, frac) = w[1].split_once('.').expect("fraction");
    assert_eq!((hms.len(), frac.len()), (8, 6), "{first}");
    assert!(w[3].ends_with(']') && w[3].contains(".rs:"), "{first}");
    assert_eq!(launcher.terminate(Duration::from_secs(5)), Some(0));
}

#[test]
fn without_cacert_and_cert_the_go_default_paths_are_read() {
    let defaults = [
        "/etc/pki/ciao/CAcert-server-localhost.pem",
        "/etc/pki/ciao/cert-client-localhost.pem",
    ];
    if defaults.iter().all(|p| std::path::Path::new(p).exists()) {
        // A node set up the Go way: the launcher would run with them.
        eprintln!("both default certificates exist here; nothing to check");
        return;
    }
    let env = Env::new();
    let out = Command::new(LAUNCHER)
        .arg("--data-dir")
        .arg(env.dir.join("data"))
        .args(["-logtostderr", "-server=127.0.0.1:1"])
        .output()
        .expect("run the launcher");
    let err = text(&out.stderr);
    // No such files on a test machine (or unusable ones): exit 3, naming the path.
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("/etc/pki/ciao/CAcert-server-localhost.pem")
            || err.contains("/etc/pki/ciao/cert-client-localhost.pem"),
        "{err}"
    );
}
