//! Containers through the real `ciao-launcher` (no simulation) and a real
//! private dockerd, driven with `ciao-lc` over TLS.

mod common;

use std::process::Command;

use common::*;

fn docker(engine: &Engine, args: &[&str]) -> std::process::Output {
    Command::new("docker")
        .arg("-H")
        .arg(format!("unix://{}", engine.socket.display()))
        .args(args)
        .output()
        .expect("docker CLI")
}

fn launcher(env: &Env, engine: &Engine, addr: std::net::SocketAddr, profile: &str) -> Proc {
    let socket = engine.socket.display().to_string();
    let flags = [
        "--docker-socket",
        &socket,
        "--stop-timeout",
        "2",
        "--usage-interval",
        "0.5",
    ];
    env.launcher_with(addr, profile, &flags)
}

/// A private engine, a scheduler and a connected launcher for one test. Bind
/// them in this order: they drop in reverse (launcher, scheduler, files,
/// engine).
fn setup(
    profile: &str,
) -> (
    std::sync::Arc<Engine>,
    Env,
    Proc,
    std::net::SocketAddr,
    Proc,
) {
    let engine = engine();
    let env = Env::new();
    let (serve, addr) = env.serve("127.0.0.1:0", profile);
    let launcher = launcher(&env, &engine, addr, profile);
    env.wait_connected();
    (engine, env, serve, addr, launcher)
}

fn start_container(env: &Env, user_data: &str) -> String {
    let ud = env.dir.join(format!("ud-{}", uuid::Uuid::new_v4()));
    std::fs::write(&ud, user_data).expect("user data");
    let out = env.lc_ok(&[
        "start",
        "--docker-image",
        IMAGE,
        "--vcpus",
        "1",
        "--mem-mb",
        "64",
        "--user-data",
        ud.to_str().expect("path"),
    ]);
    out.split_whitespace()
        .nth(1)
        .expect("instance id")
        .to_string()
}

#[test]
fn container_lifecycle_2016() {
    let (engine, env, _serve, _addr, _launcher) = setup("2016");
    // The start-up check found the engine and named its API version.
    let log = env.log();
    assert!(
        log.lines()
            .any(|l| l.contains("containers: yes — Docker engine") && l.contains(", API 1.")),
        "{log}"
    );

    let id = start_container(
        &env,
        "#cloud-config\nruncmd:\n  - [ sh, -c, \"busybox dd if=/dev/zero of=/tmp/f bs=1M count=5; echo hi > /tmp/marker; sleep 300\" ]\n",
    );
    env.wait_list("running", |l| state_of(l, &id) == Some("running"));
    // The runcmd ran inside the container.
    let out = docker(&engine, &["exec", &id, "cat", "/tmp/marker"]);
    assert_eq!(text(&out.stdout).trim(), "hi", "{}", text(&out.stderr));
    // STATS carry the container's real figures (sampled every 0.5 s): known
    // memory (a busybox sleep uses under 1 MiB, so it may read 0), CPU, and
    // disk: the writable layer holds the 5 MiB file (≥ 5 decimal MB; the
    // launcher asks for the size at most every 10 s, and its first sample
    // may predate the file).
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let list = env.lc_ok(&["list"]);
        let row: Vec<&str> = list
            .lines()
            .find(|l| l.contains(&id))
            .map(|l| l.split_whitespace().collect())
            .unwrap_or_default();
        // NODE INSTANCE STATE <mem> MiB <disk> MiB <cpu%> ("-" when unknown).
        let number = |v: Option<&&str>| v.and_then(|v| v.parse::<u64>().ok());
        let disk = (row.get(6) == Some(&"MiB"))
            .then(|| number(row.get(5)))
            .flatten();
        if number(row.get(3)).is_some() && number(row.last()).is_some() && disk >= Some(5) {
            eprintln!("{list}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no memory, CPU or disk (≥ 5 MB) figure in STATS:\n{list}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Limits and labels from the payload.
    let out = docker(
        &engine,
        &[
            "inspect",
            "-f",
            "{{.HostConfig.Memory}} {{.HostConfig.NanoCpus}} {{index .Config.Labels \"org.ciao.instance\"}}",
            &id,
        ],
    );
    assert_eq!(
        text(&out.stdout).trim(),
        format!("{} 1000000000 {id}", 64 << 20)
    );

    env.lc_ok(&["stop", &id]);
    env.wait_list("exited", |l| state_of(l, &id) == Some("exited"));
    env.lc_ok(&["restart", &id]);
    env.wait_list("running again", |l| state_of(l, &id) == Some("running"));
    env.lc_ok(&["delete", &id]);
    env.wait_list("deleted", |l| state_of(l, &id).is_none());
    let out = docker(&engine, &["inspect", &id]);
    assert!(!out.status.success(), "container still there");
    assert_eq!(env.instance_dirs(), 0);
}

#[test]
fn container_that_exits_by_itself_is_exited_2016() {
    let (_engine, env, _serve, _addr, _launcher) = setup("2016");
    let id = start_container(
        &env,
        "#cloud-config\nruncmd:\n  - [ sh, -c, \"sleep 1; exit 3\" ]\n",
    );
    env.wait_list("exited by itself", |l| state_of(l, &id) == Some("exited"));
    assert!(env.log().contains("exited with code 3"), "{}", env.log());
    env.lc_ok(&["delete", &id]);
    env.wait_list("deleted", |l| state_of(l, &id).is_none());
}

#[test]
fn missing_image_is_an_image_failure_and_leaves_nothing() {
    let (engine, env, _serve, _addr, _launcher) = setup("2016");
    let out = env.lc_ok(&["start", "--docker-image", "127.0.0.1:1/none/such:tag"]);
    let id = out.split_whitespace().nth(1).expect("id").to_string();
    // The failure reaches the log; nothing is left on disk or in the engine.
    wait_log(&env, "image_failure");
    env.wait_list("nothing listed", |l| state_of(l, &id).is_none());
    assert_eq!(env.instance_dirs(), 0);
    assert!(!docker(&engine, &["inspect", &id]).status.success());
}

#[test]
fn kill9_with_5_containers_then_restart_finds_and_stops_them() {
    let (engine, env, _serve, addr, first) = setup("2016");
    let ids: Vec<String> = (0..5)
        .map(|_| {
            start_container(
                &env,
                "#cloud-config\nruncmd:\n  - [ sh, -c, \"sleep 300\" ]\n",
            )
        })
        .collect();
    env.wait_list("5 running", |l| {
        ids.iter().all(|i| state_of(l, i) == Some("running"))
    });

    let old = env.peer().expect("connected");
    first.kill9();
    let _second = launcher(&env, &engine, addr, "2016");
    env.wait_reconnected(&old);
    let after = env.wait_list("5 found again", |l| {
        l.len() == 5 && ids.iter().all(|i| state_of(l, i) == Some("running"))
    });
    assert_eq!(after.len(), 5, "none duplicated");
    for id in &ids {
        env.lc_ok(&["stop", id]);
    }
    env.wait_list("5 stopped", |l| {
        ids.iter().all(|i| state_of(l, i) == Some("exited"))
    });
    for id in &ids {
        let out = docker(&engine, &["inspect", "-f", "{{.State.Running}}", id]);
        assert_eq!(text(&out.stdout).trim(), "false", "{id}");
        env.lc_ok(&["delete", id]);
    }
    env.wait_list("all deleted", |l| l.is_empty());
}

/// Waits until the launcher log contains `what`.
fn wait_log(env: &Env, what: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    while !env.log().contains(what) {
        assert!(
            std::time::Instant::now() < deadline,
            "no {what:?} in the log:\n{}",
            env.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn invalid_reference_and_missing_engine_are_image_failures() {
    let (_engine, env, _serve, addr, first) = setup("2016");
    let out = env.lc_ok(&["start", "--docker-image", "UPPER:case!!"]);
    let bad = out.split_whitespace().nth(1).expect("id").to_string();
    wait_log(&env, "invalid reference format");
    wait_log(&env, "image_failure");
    env.wait_list("nothing listed", |l| state_of(l, &bad).is_none());
    assert_eq!(env.instance_dirs(), 0);
    assert_eq!(first.terminate(std::time::Duration::from_secs(5)), Some(0));

    // An engine socket that does not exist: the START fails clearly.
    let _second = env.launcher_with(
        addr,
        "2016",
        &["--docker-socket", "/nonexistent/docker.sock"],
    );
    env.wait_connected();
    let out = env.lc_ok(&["start", "--docker-image", IMAGE]);
    let id = out.split_whitespace().nth(1).expect("id").to_string();
    // (The start-up check names the socket too: wait for this START's line.)
    env.wait_log_line(&[&id, "/nonexistent/docker.sock"], WAIT);
    env.wait_list("nothing listed", |l| state_of(l, &id).is_none());
    assert_eq!(env.instance_dirs(), 0);
}

#[test]
fn container_that_exits_by_itself_is_stopped_and_gone_2018() {
    let (engine, env, _serve, _addr, _launcher) = setup("2018");
    let id = start_container(
        &env,
        "#cloud-config\nruncmd:\n  - [ sh, -c, \"sleep 1; exit 4\" ]\n",
    );
    // 2018: an exit deletes the instance (InstanceStopped), container included.
    wait_log(&env, "exited with code 4");
    env.wait_list("gone", |l| state_of(l, &id).is_none());
    let deadline = std::time::Instant::now() + WAIT;
    while docker(&engine, &["inspect", &id]).status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "container {id} still there"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(env.instance_dirs(), 0);
}
