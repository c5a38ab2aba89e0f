//! The real `ciao-launcher` binary against the real `ciao-lc serve` over TLS
//! on 127.0.0.1, driven with the real `ciao-lc` commands (simulated
//! instances). Every process is started by this test and stopped by PID;
//! every wait is bounded polling of `ciao-lc list`.

use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::*;

#[test]
fn lifecycle_through_ciao_lc_2016() {
    let env = Env::new();
    let (_serve, addr) = env.serve("127.0.0.1:0", "2016");
    let launcher = env.launcher(addr, "2016");
    env.wait_connected();

    let id = env.start();
    env.wait_list("running", |l| state_of(l, &id) == Some("running"));
    env.lc_ok(&["stop", &id]);
    env.wait_list("exited", |l| state_of(l, &id) == Some("exited"));
    env.lc_ok(&["restart", &id]);
    env.wait_list("running again", |l| state_of(l, &id) == Some("running"));
    let stats = env.lc_ok(&["stats"]);
    assert!(stats.contains("READY"), "{stats}");
    env.lc_ok(&["delete", &id]);
    env.wait_list("deleted", |l| state_of(l, &id).is_none());
    assert_eq!(env.instance_dirs(), 0);

    // SIGTERM: exit status 0, well within a second.
    let t = Instant::now();
    assert_eq!(launcher.terminate(Duration::from_secs(5)), Some(0));
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

#[test]
fn kill9_mid_way_and_restart_finds_every_instance_once() {
    let env = Env::new();
    let (_serve, addr) = env.serve("127.0.0.1:0", "2016");
    let launcher = env.launcher(addr, "2016");
    env.wait_connected();
    let ids: Vec<String> = (0..5).map(|_| env.start()).collect();
    env.wait_list("5 running", |l| {
        ids.iter().all(|i| state_of(l, i) == Some("running"))
    });
    env.lc_ok(&["stop", &ids[0]]);
    env.wait_list("one exited", |l| state_of(l, &ids[0]) == Some("exited"));
    let before = env.list();

    let old = env.peer().expect("connected");
    launcher.kill9();
    let _launcher = env.launcher(addr, "2016");
    env.wait_reconnected(&old);
    let after = env.wait_list("all back", |l| l.len() == 5 && l == before.as_slice());
    assert_eq!(
        after, before,
        "same instances, same states, none duplicated"
    );
    assert_eq!(env.instance_dirs(), 5);
    // And they are still under control.
    env.lc_ok(&["delete", &ids[1]]);
    env.wait_list("one deleted", |l| l.len() == 4);
}

#[test]
fn scheduler_goes_away_and_comes_back() {
    let env = Env::new();
    let (serve, addr) = env.serve("127.0.0.1:0", "2018");
    let _launcher = env.launcher(addr, "2018");
    env.wait_connected();
    let ids: Vec<String> = (0..3).map(|_| env.start()).collect();
    env.wait_list("3 active", |l| {
        ids.iter().all(|i| state_of(l, i) == Some("active"))
    });

    serve.kill9();
    let (_serve, _) = env.serve(&addr.to_string(), "2018");
    // Reconnected (backoff 1–5 s first), STATS resume with every instance.
    env.wait_list("instances reported again", |l| {
        ids.iter().all(|i| state_of(l, i) == Some("active"))
    });
    assert_eq!(env.instance_dirs(), 3);
    assert!(
        env.log().contains("disconnected from the scheduler"),
        "{}",
        env.log()
    );
}

#[test]
fn second_launcher_on_the_same_data_dir_is_refused() {
    let env = Env::new();
    let (_serve, addr) = env.serve("127.0.0.1:0", "2016");
    let _first = env.launcher(addr, "2016");
    env.wait_connected();
    let out = Command::new(LAUNCHER)
        .arg("-cacert")
        .arg(env.certs().join("CAcert.pem"))
        .arg("-cert")
        .arg(env.certs().join("cert-CNAgent.pem"))
        .arg("--data-dir")
        .arg(env.dir.join("data"))
        .arg("-simulation")
        .output()
        .expect("second launcher");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_says(&out.stderr, "another launcher");
}

#[test]
fn hard_reset_removes_every_instance() {
    let env = Env::new();
    let (_serve, addr) = env.serve("127.0.0.1:0", "2016");
    let launcher = env.launcher(addr, "2016");
    env.wait_connected();
    for _ in 0..3 {
        env.start();
    }
    env.wait_list("3 instances", |l| l.len() == 3);
    assert_eq!(launcher.terminate(Duration::from_secs(5)), Some(0));
    let out = Command::new(LAUNCHER)
        .args(["-hard-reset", "--data-dir"])
        .arg(env.dir.join("data"))
        .output()
        .expect("hard reset");
    assert!(out.status.success(), "{out:?}");
    assert_says(&out.stdout, "removed 3 instance(s)");
    assert_eq!(env.instance_dirs(), 0);
}

/// `<data-dir>/status` through `ciao-lc node-status`, as an operator reads it
/// on the node: absent before the first launcher, then after connect, after a
/// START, after the scheduler goes away, and after the launcher stops.
#[test]
fn node_status_after_connect_start_and_disconnect() {
    let env = Env::new();
    let out = env.node_status();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_says(&out.stderr, "no status file");

    let (serve, addr) = env.serve("127.0.0.1:0", "2016");
    let launcher = env.launcher(addr, "2016");
    env.wait_connected();
    let node = env.node_uuid();
    let s = env.wait_node_status("connected", |s| {
        s.get("connected").map(String::as_str) == Some("yes")
    });
    assert_eq!(s["node-uuid"], node);
    assert_eq!(s["scheduler"], addr.to_string());
    assert_eq!(s["status"], "READY");
    assert_eq!(s["instances"], "0");
    assert_eq!(s["last-error"], "none");
    assert_eq!(
        s["launcher"],
        format!("running (pid {})", launcher.pid()),
        "{s:?}"
    );
    assert!(s["age"].ends_with(" s"), "{s:?}");
    let connected_since: u64 = s["since"]
        .split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .expect("since");

    let id = env.start();
    env.wait_list("running", |l| state_of(l, &id) == Some("running"));
    let s = env.wait_node_status("one running instance", |s| {
        s.get("running").map(String::as_str) == Some("1")
    });
    assert_eq!(s["instances"], "1", "{s:?}");
    assert_eq!(s["pending"], "0", "{s:?}");
    assert_eq!(s["exited"], "0", "{s:?}");
    assert_eq!(s["connected"], "yes", "{s:?}");

    serve.kill9();
    let s = env.wait_node_status("disconnected", |s| {
        s.get("connected").map(String::as_str) == Some("no")
    });
    assert!(
        s["last-error"].contains("disconnected from the scheduler"),
        "{s:?}"
    );
    let lost_since: u64 = s["since"]
        .split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .expect("since");
    assert!(lost_since >= connected_since, "{s:?}");
    assert_eq!(s["running"], "1", "the instance runs on: {s:?}");
    assert!(s.contains_key("last-error-at"), "{s:?}");

    // Written atomically: nothing but the file itself.
    let leftovers: Vec<_> = std::fs::read_dir(env.dir.join("data"))
        .expect("data dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("status") && n != "status")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The launcher gone: what it last wrote, said to be so.
    assert_eq!(launcher.terminate(Duration::from_secs(5)), Some(0));
    let out = env.node_status();
    assert!(out.status.success(), "{out:?}");
    assert_says(&out.stdout, "launcher: not running");
}

#[test]
fn watch_node_streams_only_that_nodes_events() {
    let env = Env::new();
    let (_serve, addr) = env.serve("127.0.0.1:0", "2016");
    let _launcher = env.launcher(addr, "2016");
    env.wait_connected();
    let node = env.node_uuid();
    let other = uuid::Uuid::new_v4().to_string();
    let watch = |n: &str| {
        let mut child = Command::new(LC)
            .args(["watch", "--node", n, "--certs"])
            .arg(env.certs())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("ciao-lc watch");
        let lines = lines_of(child.stdout.take().expect("stdout"));
        let first = lines.recv_timeout(WAIT).expect("watch answers");
        assert!(first.starts_with("watching"), "{first}");
        (child, lines)
    };
    let (mut mine, mine_lines) = watch(&node);
    let (mut theirs, theirs_lines) = watch(&other);
    // The launcher reports every second: two of its events seen by the
    // watcher of its node means both watchers were offered them.
    for _ in 0..2 {
        let l = mine_lines.recv_timeout(WAIT).expect("an event of the node");
        assert!(l.contains(&node), "{l}");
    }
    assert!(
        theirs_lines.try_recv().is_err(),
        "the other node's watcher heard of this one"
    );
    let _ = mine.kill();
    let _ = theirs.kill();
    let _ = (mine.wait(), theirs.wait());
    let bad = env.lc(&["watch", "--node", "not-a-uuid"]);
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("not a node UUID"),
        "{}",
        text(&bad.stderr)
    );
}
