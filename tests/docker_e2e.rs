//! Containers through the real `ciao-launcher` (no simulation) and a real
//! private dockerd, driven with `ciao-lc` over TLS.

mod common;

use common::*;

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
    let out = engine.cli(&["exec", &id, "cat", "/tmp/marker"]);
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
        // NODE INSTANCE STATE <mem> MiB <disk> MiB <cpu%> SSH VNIC ("-" when unknown).
        let number = |v: Option<&&str>| v.and_then(|v| v.parse::<u64>().ok());
        let disk = (row.get(6) == Some(&"MiB"))
            .then(|| number(row.get(5)))
            .flatten();
        if number(row.get(3)).is_some() && number(row.get(7)).is_some() && disk >= Some(5) {
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
    let out = engine.cli(
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
    let out = engine.cli(&["inspect", &id]);
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
    assert!(!engine.cli(&["inspect", &id]).status.success());
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
        let out = engine.cli(&["inspect", "-f", "{{.State.Running}}", id]);
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
fn invalid_reference_is_an_image_failure_and_a_missing_engine_a_launch_failure() {
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
    // The engine, not the image, is at fault; the cause is logged once.
    wait_log(&env, "launch_failure");
    let log = env.log();
    let told = log
        .lines()
        .filter(|l| l.contains(&id) && l.contains("/nonexistent/docker.sock"))
        .count();
    assert_eq!(told, 1, "{log}");
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
    while engine.cli(&["inspect", &id]).status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "container {id} still there"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(env.instance_dirs(), 0);
}

// ---- Reliability: each test below failed on the code before the fix ----

fn container_exists(engine: &Engine, name: &str) -> bool {
    engine
        .cli(&["inspect", "-f", "{{.Id}}", name])
        .status
        .success()
}

/// Polls until `done` holds (bounded), with what was seen on failure.
fn wait_for(what: &str, env: &Env, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + WAIT;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}; launcher log:\n{}",
            env.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Defect: a START of a uuid that names someone else's container failed
/// with a 409 and then force-removed that container. It is left alone now.
#[test]
fn failed_start_never_removes_a_foreign_container() {
    let (engine, env, _serve, _addr, _launcher) = setup("2016");
    let id = uuid::Uuid::new_v4().to_string();
    let made = engine.cli(&[
        "create",
        "--name",
        &id,
        "--label",
        "owner=someone-else",
        "--network",
        "none",
        IMAGE,
        "sleep",
        "300",
    ]);
    assert!(made.status.success(), "{}", text(&made.stderr));
    let out = env.lc(&["start", "--docker-image", IMAGE, "--instance", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_for("the START to fail", &env, || {
        env.log().contains("exists already")
    });
    assert!(
        container_exists(&engine, &id),
        "the foreign container was removed"
    );
    let labels = engine.cli(&["inspect", "-f", "{{index .Config.Labels \"owner\"}}", &id]);
    assert_eq!(text(&labels.stdout).trim(), "someone-else");
    env.wait_list("nothing listed", |l| state_of(l, &id).is_none());
    assert!(!env.dir.join("data/instances").join(&id).exists());
    engine.cli(&["rm", "-f", &id]);
}

/// The node UUID a launcher on `env` uses (its persisted identity).
fn node_uuid(env: &Env) -> String {
    let path = env.dir.join("data/local/uuid-storage/role/client/0x4");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

/// Defect: `kill -9` during a START left a stateless directory and a
/// `Created` container that blocked the id forever. Recovery removes both
/// (only containers with this node's labels), and the id is usable again.
#[test]
fn recovery_removes_an_interrupted_starts_container() {
    let (engine, env, _serve, addr, launcher) = setup("2016");
    let node = node_uuid(&env);
    launcher.kill9();
    // What a kill between `create container` and the state write leaves.
    let id = uuid::Uuid::new_v4().to_string();
    std::fs::create_dir_all(env.dir.join("data/instances").join(&id)).expect("dir");
    let label_instance = format!("org.ciao.instance={id}");
    let label_node = format!("org.ciao.node={node}");
    let made = engine.cli(&[
        "create",
        "--name",
        &id,
        "--label",
        &label_instance,
        "--label",
        &label_node,
        "--network",
        "none",
        IMAGE,
        "sleep",
        "300",
    ]);
    assert!(made.status.success(), "{}", text(&made.stderr));
    // Another node's container with an instance label: not ours.
    let other = uuid::Uuid::new_v4().to_string();
    let other_label = format!("org.ciao.instance={other}");
    let made = engine.cli(&[
        "create",
        "--name",
        &other,
        "--label",
        &other_label,
        "--label",
        "org.ciao.node=another-node",
        "--network",
        "none",
        IMAGE,
        "sleep",
        "300",
    ]);
    assert!(made.status.success(), "{}", text(&made.stderr));

    // The first launcher may have been killed before it said it runs (its
    // sweep can outlast its connection): count the second one's line only.
    let runs = |env: &Env| env.log().matches("instance(s) recovered)").count();
    let before = runs(&env);
    let _launcher = launcher_again(&env, &engine, addr);
    // Recovery (and its sweep) is done when the launcher says it runs.
    wait_for("the second launcher's recovery", &env, || {
        runs(&env) > before
    });
    env.wait_connected();
    assert!(
        !container_exists(&engine, &id),
        "our leftover container is still there"
    );
    assert!(
        container_exists(&engine, &other),
        "another node's container was removed"
    );
    assert!(!env.dir.join("data/instances").join(&id).exists());
    assert!(env.log().contains("interrupted START"), "{}", env.log());
    let ud = env.dir.join("ud-sleep");
    std::fs::write(&ud, "#cloud-config\nruncmd:\n  - [ sleep, \"300\" ]\n").expect("user data");
    let ud = ud.to_string_lossy().into_owned();
    let out = env.lc(&[
        "start",
        "--docker-image",
        IMAGE,
        "--instance",
        &id,
        "--user-data",
        &ud,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    env.wait_list("the id usable again", |l| {
        state_of(l, &id) == Some("running")
    });
    env.lc_ok(&["delete", &id]);
    env.wait_list("deleted", |l| state_of(l, &id).is_none());
    engine.cli(&["rm", "-f", &other]);
}

fn launcher_again(env: &Env, engine: &Engine, addr: std::net::SocketAddr) -> Proc {
    launcher(env, engine, addr, "2016")
}

/// Defect: `kill -9` during a DELETE of a stopped container left a phantom
/// (state `exited`, container gone) whose RESTART failed forever. Recovery
/// sees that the container no longer exists and removes the instance.
#[test]
fn recovery_sees_a_vanished_container_for_what_it_is() {
    let (engine, env, _serve, addr, launcher) = setup("2016");
    let id = start_container(&env, "#cloud-config\nruncmd:\n  - [ sleep, \"300\" ]\n");
    env.wait_list("running", |l| state_of(l, &id) == Some("running"));
    env.lc_ok(&["stop", &id]);
    env.wait_list("exited", |l| state_of(l, &id) == Some("exited"));
    launcher.kill9();
    // The DELETE removed the container, then the launcher was killed.
    assert!(engine.cli(&["rm", "-f", &id]).status.success());
    let _launcher = launcher_again(&env, &engine, addr);
    env.wait_connected();
    // The list can be empty before the recovered instance's thread has
    // looked at its container: wait for that look, then for the directory.
    env.wait_log_line(&[&id, "no longer exists"], WAIT);
    let dir = env.dir.join("data/instances").join(&id);
    wait_for("the phantom's directory removed", &env, || !dir.exists());
    env.wait_list("the phantom gone", |l| state_of(l, &id).is_none());
    // A RESTART now finds no instance (before the fix: a launch_failure,
    // forever). `ciao-lc restart` only sends: the outcome is in the log.
    env.lc_ok(&["restart", &id]);
    env.wait_log_line(&["RestartFailure for", &id, "no such instance"], WAIT);
    assert!(
        !env.log()
            .lines()
            .any(|l| l.contains(&id) && l.contains("launch_failure")),
        "{}",
        env.log()
    );
}
