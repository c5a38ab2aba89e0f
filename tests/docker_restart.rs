//! The Docker engine going away and coming back. Each test has an engine of
//! its own (it stops and starts it); the engines run with --live-restore, so
//! containers keep running while dockerd is down.
//!
//! * A dockerd restart under a running launcher: the launcher's monitors
//!   reconnect with backoff and re-read the containers' state, and the
//!   instances stay under control, without restarting the launcher.
//! * A launcher started while the engine is down, with containers recorded
//!   by an earlier run: it keeps them (pending) and keeps retrying, and once
//!   the engine is back they are running and under control again.

mod common;

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

fn start_two(env: &Env) -> Vec<String> {
    let ud = user_data(env);
    let ids: Vec<String> = (0..2)
        .map(|_| {
            let out = env.lc_ok(&["start", "--docker-image", IMAGE, "--user-data", &ud]);
            out.split_whitespace().nth(1).expect("id").to_string()
        })
        .collect();
    env.wait_list("2 running", |l| {
        ids.iter().all(|i| state_of(l, i) == Some("running"))
    });
    ids
}

fn docker_running(engine: &Engine, id: &str) -> String {
    let out = std::process::Command::new("docker")
        .arg("-H")
        .arg(format!("unix://{}", engine.socket.display()))
        .args(["inspect", "-f", "{{.State.Running}}", id])
        .output()
        .expect("docker CLI");
    text(&out.stdout).trim().to_string()
}

/// Polls the launcher log until `want` holds (bounded).
fn wait_log(env: &Env, what: &str, want: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + WAIT;
    while !want(&env.log()) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} in the log:\n{}",
            env.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Both STOPped and DELETEd through the launcher, which then exits cleanly.
fn stop_and_delete(env: &Env, engine: &Engine, ids: &[String], launcher: Proc) {
    env.lc_ok(&["stop", &ids[0]]);
    env.wait_list("stopped", |l| state_of(l, &ids[0]) == Some("exited"));
    assert_eq!(docker_running(engine, &ids[0]), "false");
    for id in ids {
        env.lc_ok(&["delete", id]);
    }
    env.wait_list("deleted", |l| l.is_empty());
    assert_eq!(launcher.terminate(Duration::from_secs(5)), Some(0));
}

#[test]
fn launcher_survives_a_dockerd_restart() {
    let engine = private_engine();
    let env = Env::new();
    let (_serve, addr) = env.serve("127.0.0.1:0", "2016");
    let socket = engine.socket.display().to_string();
    let launcher = env.launcher_with(
        addr,
        "2016",
        &["--docker-socket", &socket, "--stop-timeout", "2"],
    );
    env.wait_connected();
    let ids = start_two(&env);

    engine.stop_keeping_containers();
    engine.start_again();

    // The launcher is still the same process and its instances are still running.
    let after = env.wait_list("running after the restart", |l| {
        ids.iter().all(|i| state_of(l, i) == Some("running"))
    });
    assert_eq!(after.len(), 2);
    // Its monitors work again: a STOP goes through and is seen.
    stop_and_delete(&env, &engine, &ids, launcher);
}

#[test]
fn launcher_started_while_the_engine_is_down_keeps_and_regains_its_containers() {
    let engine = private_engine();
    let env = Env::new();
    let (_serve, addr) = env.serve("127.0.0.1:0", "2016");
    let socket = engine.socket.display().to_string();
    // -v 1: the monitors' retries are logged at debug level.
    let flags = [
        "--docker-socket",
        &socket,
        "--stop-timeout",
        "2",
        "--usage-interval",
        "0.5",
        "-v",
        "1",
    ];
    let first = env.launcher_with(addr, "2016", &flags);
    env.wait_connected();
    let ids = start_two(&env);

    // The launcher dies, then the engine goes away; the containers live on.
    let old = env.peer().expect("connected");
    first.kill9();
    engine.stop_keeping_containers();
    let log_before = env.log().len();
    let second = env.launcher_with(addr, "2016", &flags);
    env.wait_reconnected(&old);

    // It reports both instances (from its data directory) as pending, not
    // deleted and not running...
    env.wait_list("2 pending", |l| {
        l.len() == 2 && ids.iter().all(|i| state_of(l, i) == Some("pending"))
    });
    // ...and keeps retrying: several attempts per container, with backoff.
    let retries = |log: &str, id: &str| {
        log[log_before.min(log.len())..]
            .lines()
            .filter(|l| l.contains(&id[..8]) && l.contains("retrying in"))
            .count()
    };
    // (5 attempts: 0.2 + 0.4 + 0.8 + 1.6 s of backoff at least.)
    wait_log(&env, "5 attempts of each monitor", |log| {
        ids.iter().all(|id| retries(log, id) >= 5)
    });
    let log = env.log();
    assert!(
        log[log_before..].contains("engine unreachable"),
        "no warning about the engine:\n{log}"
    );
    assert!(!log[log_before..].contains("exited by itself"), "{log}");
    assert_eq!(env.instance_dirs(), 2, "instance files removed");
    let l = env.list();
    assert!(
        ids.iter().all(|i| state_of(&l, i) == Some("pending")),
        "{l:?}"
    );

    // The engine comes back: the same containers are running and under control.
    engine.start_again();
    env.wait_list("2 running again", |l| {
        l.len() == 2 && ids.iter().all(|i| state_of(l, i) == Some("running"))
    });
    for id in &ids {
        assert_eq!(docker_running(&engine, id), "true", "{id}");
    }
    stop_and_delete(&env, &engine, &ids, second);
}
