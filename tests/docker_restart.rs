//! A dockerd restart under a running launcher: containers keep running
//! (the private engine uses --live-restore), the launcher's monitors
//! reconnect with backoff and re-read the containers' state, and the
//! instances stay under control, without restarting the launcher.
//! Its own test binary: it restarts the engine it shares with nobody.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn user_data(env: &Env) -> String {
    let ud = env.dir.join("ud");
    std::fs::write(
        &ud,
        "#cloud-config\nruncmd:\n  - [ sh, -c, \"sleep 300\" ]\n",
    )
    .expect("user data");
    ud.to_string_lossy().into_owned()
}

#[test]
fn launcher_survives_a_dockerd_restart() {
    let engine = engine();
    let env = Env::new();
    let (_serve, addr) = env.serve("127.0.0.1:0", "2016");
    let socket = engine.socket.display().to_string();
    let launcher = env.launcher_with(
        addr,
        "2016",
        &["--docker-socket", &socket, "--stop-timeout", "2"],
    );
    env.wait_connected();
    let ud = user_data(&env);
    let ids: Vec<String> = (0..2)
        .map(|_| {
            let out = env.lc_ok(&["start", "--docker-image", IMAGE, "--user-data", &ud]);
            out.split_whitespace().nth(1).expect("id").to_string()
        })
        .collect();
    env.wait_list("2 running", |l| {
        ids.iter().all(|i| state_of(l, i) == Some("running"))
    });

    // Stop the engine (by its pidfile) and start it again on the same directory.
    let pid: i32 = std::fs::read_to_string(engine.dir.join("dockerd.pid"))
        .expect("pidfile")
        .trim()
        .parse()
        .expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM dockerd");
    let deadline = Instant::now() + WAIT;
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "dockerd {pid} did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/start-dockerd.sh");
    let out = Command::new(script)
        .arg(&engine.dir)
        .output()
        .expect("restart dockerd");
    assert!(out.status.success(), "{}", text(&out.stderr));

    // The launcher is still the same process and its instances are still running.
    let after = env.wait_list("running after the restart", |l| {
        ids.iter().all(|i| state_of(l, i) == Some("running"))
    });
    assert_eq!(after.len(), 2);
    // Its monitors work again: a STOP goes through and is seen.
    env.lc_ok(&["stop", &ids[0]]);
    env.wait_list("stopped", |l| state_of(l, &ids[0]) == Some("exited"));
    for id in &ids {
        env.lc_ok(&["delete", id]);
    }
    env.wait_list("deleted", |l| l.is_empty());
    assert_eq!(launcher.terminate(Duration::from_secs(5)), Some(0));
}
