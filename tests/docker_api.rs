//! Integration tests of `virt::docker_api` against a real, private dockerd.
//!
//! The engine is started by `scripts/start-dockerd.sh` (which needs
//! docker.io and busybox-static, failing at once without them, and imports
//! `ciao-busybox:latest`)
//! and stopped by `scripts/stop-dockerd.sh` when the last test holding it
//! finishes. Tests share it through a `Mutex<Weak<Engine>>`: while tests run
//! concurrently there is one engine; if every holder has finished before the
//! next test asks, a fresh one is started (in a fresh directory), so nothing
//! is ever left running. A script failure fails the test with its output:
//! these tests never skip.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

mod common;

use ciao_launcher::virt::docker_api::{
    ApiVersion, CreateSpec, DockerApi, DockerError, MAX_API_VERSION,
};
use common::{Engine, IMAGE, engine};

fn api(e: &Engine) -> DockerApi {
    DockerApi::connect(&e.socket).unwrap_or_else(|err| panic!("connect: {err}"))
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Force-removes a container on drop, so failing tests leave nothing behind.
struct Cleanup<'a>(&'a DockerApi, String);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = self.0.container_remove(&self.1, true, true);
    }
}

/// Polls `f` every 100 ms until it yields `Some`, for at most `limit`.
fn poll<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `Waiter::wait` on a thread; the receiver gets its result.
fn wait_in_thread(
    api: &DockerApi,
    id: &str,
) -> (
    mpsc::Receiver<Result<i64, DockerError>>,
    ciao_launcher::virt::docker_api::WaitCanceller,
) {
    let waiter = api.waiter();
    let canceller = waiter.canceller();
    let (tx, rx) = mpsc::channel();
    let id = id.to_string();
    thread::Builder::new()
        .name("docker-wait".into())
        .spawn(move || {
            let _ = tx.send(waiter.wait(&id));
        })
        .expect("spawn waiter");
    (rx, canceller)
}

#[test]
fn version_is_negotiated_from_the_engine() {
    let e = engine();
    let api = api(&e);
    let v = api.version();
    eprintln!("{v:?}");
    assert!(!v.engine_version.is_empty());
    assert_eq!(
        v.negotiated,
        ApiVersion::negotiate(v.api_version, v.min_api_version)
    );
    assert!(v.negotiated <= MAX_API_VERSION.max(v.min_api_version));
    assert!(v.negotiated >= v.min_api_version);
    assert!(
        v.negotiated >= ApiVersion(1, 24),
        "an old pinned version: {v:?}"
    );
}

#[test]
fn image_inspect_present_and_missing() {
    let e = engine();
    let api = api(&e);
    let img = api
        .image_inspect(IMAGE)
        .expect("inspect")
        .expect("ciao-busybox:latest is imported by start-dockerd.sh");
    assert!(img.id.starts_with("sha256:"), "{img:?}");
    assert!(img.repo_tags.iter().any(|t| t == IMAGE), "{img:?}");
    assert!(img.size > 0);
    assert_eq!(
        api.image_inspect("ciao-no-such-image:nope")
            .expect("inspect"),
        None
    );
}

#[test]
fn pull_without_a_registry_fails_with_dockers_message() {
    let e = engine();
    let api = api(&e);
    // Port 1 on loopback refuses at once, so the engine fails fast.
    let t = Instant::now();
    match api.image_pull("127.0.0.1:1/ciao-none:latest") {
        Err(DockerError::Api { status, message }) => {
            eprintln!("pull failed after {:?}: {status} {message}", t.elapsed());
            assert!(message.contains("127.0.0.1:1"), "{message}");
        }
        other => panic!("expected an Api error, got {other:?}"),
    }
}

#[test]
fn invalid_references_are_api_errors_with_dockers_message() {
    let e = engine();
    let api = api(&e);
    for r in [
        api.image_pull("UPPER:case!!"),
        api.container_create(
            &unique("ciao-bad"),
            &CreateSpec {
                image: "UPPER:case!!".into(),
                ..CreateSpec::default()
            },
        )
        .map(drop),
    ] {
        match r {
            Err(DockerError::Api { status, message }) => {
                assert_eq!(status, 400, "{message}");
                assert!(message.contains("invalid reference format"), "{message}");
            }
            other => panic!("expected Api 400, got {other:?}"),
        }
    }
}

#[test]
fn missing_socket_is_a_connect_error_naming_the_path() {
    let p = std::env::temp_dir()
        .join(unique("ciao-no-dockerd"))
        .join("docker.sock");
    match DockerApi::connect(&p) {
        Err(err @ DockerError::Connect(_)) => {
            assert!(err.to_string().contains(&*p.to_string_lossy()), "{err}");
        }
        other => panic!("expected Connect, got {other:?}"),
    }
}

#[test]
fn container_lifecycle_limits_labels_stats_cancel_stop() {
    let e = engine();
    let api = api(&e);
    let name = unique("ciao-test");
    let label_value = unique("inst");
    let labels = BTreeMap::from([
        ("ciao.instance".to_string(), label_value.clone()),
        ("ciao.test".to_string(), "docker_api".to_string()),
    ]);
    let spec = CreateSpec {
        image: IMAGE.into(),
        cmd: ["sh", "-c", "echo hi > /tmp/marker; sleep 300"]
            .map(String::from)
            .to_vec(),
        hostname: "ciao-host".into(),
        labels: labels.clone(),
        memory_bytes: Some(64 << 20),
        nano_cpus: Some(500_000_000),
        network_none: true,
        privileged: false,
        env: vec!["CIAO=1".into()],
        dns: Vec::new(),
    };
    let t = Instant::now();
    let id = api.container_create(&name, &spec).expect("create");
    let _cleanup = Cleanup(&api, id.clone());
    api.container_start(&id).expect("start");
    eprintln!("create + start: {:?}", t.elapsed());

    let info = api
        .container_inspect(&id)
        .expect("inspect")
        .expect("exists");
    assert_eq!(info.id, id);
    assert_eq!(info.name, name);
    assert!(info.running, "{info:?}");
    assert_eq!(info.status, "running");
    assert!(info.pid > 0);
    assert_eq!(info.memory_limit, 64 << 20);
    assert_eq!(info.nano_cpus, 500_000_000);
    assert_eq!(info.network_mode, "none");
    assert_eq!(info.labels, labels);
    // By name as well as by id.
    assert_eq!(
        api.container_inspect(&name).expect("inspect").map(|i| i.id),
        Some(id.clone())
    );

    let found = api
        .containers_by_label("ciao.instance", &label_value)
        .expect("list");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].id, id);
    assert_eq!(found[0].state, "running");
    assert_eq!(found[0].names, vec![format!("/{name}")]);
    assert!(
        api.containers_by_label("ciao.instance", "nobody")
            .expect("list")
            .is_empty()
    );

    // The first sample after start may lack figures: poll, bounded.
    let stats = poll(Duration::from_secs(20), || {
        api.container_stats_once(&id).expect("stats")
    })
    .expect("no stats sample with memory usage within 20 s");
    eprintln!("stats: {stats:?}");
    assert!(stats.memory_usage_bytes > 0);
    if let Some(p) = stats.cpu_percent {
        assert!(p >= 0.0, "{p}");
    }

    // A blocked wait is cancelled promptly, and the container keeps running.
    let (rx, canceller) = wait_in_thread(&api, &id);
    // The wait must still be blocked: the container runs `sleep 300`.
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "wait returned early"
    );
    let t = Instant::now();
    canceller.cancel();
    match rx.recv_timeout(Duration::from_secs(2)) {
        Ok(Err(DockerError::Cancelled)) => eprintln!("wait cancelled in {:?}", t.elapsed()),
        other => panic!("expected Cancelled within 2 s, got {other:?}"),
    }
    let info = api
        .container_inspect(&id)
        .expect("inspect")
        .expect("exists");
    assert!(
        info.running,
        "cancelling the wait must not stop the container: {info:?}"
    );
    // The shared client is unaffected by the waiter's shutdown.
    api.container_inspect(&id).expect("inspect after cancel");

    // Stop (SIGTERM, SIGKILL after 1 s): a blocked waiter gets the exit code.
    let (rx, _canceller) = wait_in_thread(&api, &id);
    let t = Instant::now();
    api.container_stop(&id, 1).expect("stop");
    let code = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("wait did not return within 30 s of stop")
        .expect("wait");
    eprintln!("stop + wait: {:?}, exit code {code}", t.elapsed());
    let info = api
        .container_inspect(&id)
        .expect("inspect")
        .expect("exists");
    assert!(!info.running);
    assert_eq!(info.exit_code, code);
    // sh as PID 1 ignores SIGTERM, so the engine kills it: 128 + 9.
    assert!(code == 137 || code == 143, "{code}");
    // Stopping or starting twice is a no-op.
    api.container_stop(&id, 1).expect("stop again");

    api.container_remove(&id, true, true).expect("remove");
    assert_eq!(api.container_inspect(&id).expect("inspect"), None);
    assert!(matches!(
        api.container_remove(&id, true, true),
        Err(DockerError::NotFound(_))
    ));
    assert!(matches!(
        api.waiter().wait(&id),
        Err(DockerError::NotFound(_))
    ));
}

#[test]
fn wait_returns_the_exit_code_of_a_command_that_exits() {
    let e = engine();
    let api = api(&e);
    let name = unique("ciao-exit");
    let spec = CreateSpec {
        image: IMAGE.into(),
        // Writes 2 MiB to its writable layer first.
        cmd: [
            "sh",
            "-c",
            "busybox dd if=/dev/zero of=/tmp/f bs=1k count=2048 2>/dev/null; exit 3",
        ]
        .map(String::from)
        .to_vec(),
        network_none: true,
        ..CreateSpec::default()
    };
    let id = api.container_create(&name, &spec).expect("create");
    let _cleanup = Cleanup(&api, id.clone());
    api.container_start(&id).expect("start");
    // Waited on after the start: "not-running" would return at once for a
    // container that was created but not yet started.
    let (rx, _c) = wait_in_thread(&api, &id);
    let code = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("wait did not return within 30 s")
        .expect("wait");
    assert_eq!(code, 3);
    // Waiting on an exited container answers at once.
    assert_eq!(api.waiter().wait(&id).expect("wait again"), 3);
    let info = api
        .container_inspect(&id)
        .expect("inspect")
        .expect("exists");
    assert_eq!(
        (info.running, info.status.as_str(), info.exit_code),
        (false, "exited", 3)
    );
    // Stats of a stopped container: no data, not an error or a panic.
    assert_eq!(api.container_stats_once(&id).expect("stats"), None);
    // Its writable layer outlives it, file included.
    let size = api.container_size(&id).expect("size").expect("exists");
    eprintln!("{size:?}");
    assert!(size.rw_bytes >= Some(2 << 20), "{size:?}");
    assert!(size.root_fs_bytes >= size.rw_bytes, "{size:?}");
    // Killing a stopped container is refused by the engine.
    assert!(matches!(
        api.container_kill(&id),
        Err(DockerError::Api { status: 409, .. })
    ));
    api.container_remove(&id, false, true).expect("remove");
    assert_eq!(api.container_inspect(&id).expect("inspect"), None);
    assert_eq!(api.container_size(&id).expect("size"), None);
}

#[test]
fn kill_ends_a_running_container() {
    let e = engine();
    let api = api(&e);
    let id = api
        .container_create(
            &unique("ciao-kill"),
            &CreateSpec {
                image: IMAGE.into(),
                cmd: ["sleep", "300"].map(String::from).to_vec(),
                network_none: true,
                ..CreateSpec::default()
            },
        )
        .expect("create");
    let _cleanup = Cleanup(&api, id.clone());
    api.container_start(&id).expect("start");
    let (rx, _c) = wait_in_thread(&api, &id);
    api.container_kill(&id).expect("kill");
    let code = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("wait did not return within 30 s of kill")
        .expect("wait");
    assert_eq!(code, 137);
}

/// A request body and an answer body several times the client's
/// per-connection buffers (16 KiB in, 4 KiB out) go through whole: 200
/// labels of 300 bytes (~64 KB of JSON each way), read back by inspect and by
/// the label listing.
#[test]
fn bodies_larger_than_the_connection_buffers() {
    let e = engine();
    let api = api(&e);
    let name = unique("ciao-test-big");
    let tag = unique("big");
    let labels: BTreeMap<String, String> = (0..200)
        .map(|i| {
            (
                format!("ciao.big.{i:03}"),
                format!("{tag}-{}", "x".repeat(300)),
            )
        })
        .collect();
    let spec = CreateSpec {
        image: IMAGE.into(),
        cmd: ["sleep", "300"].map(String::from).to_vec(),
        labels: labels.clone(),
        network_none: true,
        ..CreateSpec::default()
    };
    let id = api
        .container_create(&name, &spec)
        .expect("create with ~64 KB of labels");
    let _cleanup = Cleanup(&api, id.clone());
    let info = api
        .container_inspect(&id)
        .expect("inspect")
        .expect("the container exists");
    assert_eq!(info.labels, labels, "every label comes back whole");
    let listed = api
        .containers_by_label("ciao.big.000", &labels["ciao.big.000"])
        .expect("list by label");
    assert_eq!(
        listed.len(),
        1,
        "{:?}",
        listed.iter().map(|c| &c.id).collect::<Vec<_>>()
    );
    assert_eq!(listed[0].labels, labels);
}
