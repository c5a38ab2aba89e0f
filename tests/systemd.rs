//! The systemd side of `ciao-launcher`: readiness sent to `$NOTIFY_SOCKET`
//! (`Type=notify`) by the real launcher against the real `ciao-lc serve`,
//! and the unit in `packaging/` agreeing with the launcher's exit codes.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use ciao_launcher::daemon::LauncherExit;
use common::*;

/// The datagrams received on `sock` until one contains `want` (bounded).
fn recv_until(sock: &UnixDatagram, want: &str, env: &Env) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            if got.last().is_some_and(|m| m.lines().any(|l| l == want)) {
                return got;
            }
        }
    }
    panic!(
        "no {want:?} on $NOTIFY_SOCKET; got {got:?}\nlauncher log:\n{}",
        env.log()
    );
}

#[test]
fn launcher_tells_notify_socket_ready_then_stopping() {
    let env = Env::new();
    let path = env.dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let (_serve, addr) = env.serve("127.0.0.1:0", "2016");
    let launcher = env.launcher_env(
        addr,
        "2016",
        &["-simulation"],
        &[("NOTIFY_SOCKET", path.as_os_str())],
    );
    let pid = launcher.pid();
    let ready = recv_until(&sock, "READY=1", &env);
    let msg = ready.last().expect("a message");
    assert!(msg.contains(&format!("MAINPID={pid}")), "{msg:?}");
    assert!(msg.contains("STATUS=serving"), "{msg:?}");
    // Ready means serving: it connects and answers as usual.
    env.wait_connected();
    let id = env.start();
    env.wait_list("the instance running", |l| {
        state_of(l, &id) == Some("running")
    });
    let code = launcher.terminate(Duration::from_secs(5));
    recv_until(&sock, "STOPPING=1", &env);
    assert_eq!(code, Some(0));
}

#[test]
fn launcher_tells_an_abstract_notify_socket() {
    use std::os::linux::net::SocketAddrExt;
    let env = Env::new();
    let name = format!(
        "ciao-test-notify-{}",
        env.dir.file_name().and_then(|n| n.to_str()).unwrap_or("x")
    );
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .expect("abstract address");
    let sock = UnixDatagram::bind_addr(&addr).expect("bind");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let (_serve, server) = env.serve("127.0.0.1:0", "2018");
    let at = format!("@{name}");
    let launcher = env.launcher_env(
        server,
        "2018",
        &["-simulation"],
        &[("NOTIFY_SOCKET", std::ffi::OsStr::new(&at))],
    );
    recv_until(&sock, "READY=1", &env);
    assert_eq!(launcher.terminate(Duration::from_secs(5)), Some(0));
}

fn unit() -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/ciao-launcher.service"
    );
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn setting<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    unit.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::trim)
}

/// RestartPreventExitStatus= names exactly the exit codes a restart cannot fix.
#[test]
fn unit_prevents_restarts_that_cannot_help() {
    let unit = unit();
    let listed: Vec<u8> = setting(&unit, "RestartPreventExitStatus")
        .expect("RestartPreventExitStatus=")
        .split_whitespace()
        .map(|c| c.parse().expect("a number"))
        .collect();
    let want = [
        LauncherExit::Locked,
        LauncherExit::Usage,
        LauncherExit::Certificates,
        LauncherExit::Security,
        LauncherExit::DataDir,
    ]
    .map(|e| e as u8);
    assert_eq!(listed, want);
    assert_eq!(setting(&unit, "Type"), Some("notify"));
    assert_eq!(setting(&unit, "KillMode"), Some("process"));
    assert_eq!(setting(&unit, "Restart"), Some("on-failure"));
    assert!(
        setting(&unit, "EnvironmentFile")
            .is_some_and(|f| f.ends_with("/etc/default/ciao-launcher"))
    );
    assert_eq!(
        setting(&unit, "ExecStart"),
        Some("/usr/bin/ciao-launcher $CIAO_LAUNCHER_ARGS")
    );
    // TCG writes code it then runs; a mount namespace would outlive the service in its VMs.
    for forbidden in [
        "MemoryDenyWriteExecute",
        "PrivateDevices",
        "ProtectSystem",
        "PrivateTmp",
        "PrivateNetwork",
    ] {
        assert_eq!(setting(&unit, forbidden), None, "{forbidden}= breaks QEMU");
    }
}

/// systemd itself finds nothing wrong with the unit (run with the test
/// build's binary in ExecStart, as the packaged one is not installed here).
#[test]
fn systemd_analyze_verifies_the_unit() {
    require(&[(&["systemd-analyze"], "systemd")]);
    let env = Env::new();
    let unit = unit().replace("/usr/bin/ciao-launcher", LAUNCHER);
    let path = env.dir.join("ciao-launcher.service");
    std::fs::write(&path, unit).expect("write the unit");
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}
