//! Docker benchmark: N containers started together through the launcher, and
//! deleted together, next to the same work issued directly to the engine in
//! parallel (`docker run -d` / `docker rm -f`, one CLI process per
//! container). Uses a private dockerd (scripts/start-dockerd.sh) and an
//! in-process SSNTP scheduler over TLS on 127.0.0.1.
//!
//! Launcher START is done when it has sent one STATUS per START (sent once
//! the container is started); launcher DELETE when every InstanceDeleted has
//! arrived (sent once the container is removed).
//!
//! Usage: bench_docker --launcher PATH [--n 10,50]  (see scripts/bench-docker.sh)

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ciao_launcher::payloads::commands::delete_payload;
use ciao_launcher::payloads::config::VmType;
use ciao_launcher::payloads::start::{StartRequest, start_payload};
use ciao_launcher::ssntp::conn::send_patiently;
use ciao_launcher::ssntp::server::ServerEvent;
use ciao_launcher::ssntp::{Command as Cmd, Event, Frame, FrameType, Operation, Profile};

#[path = "support/scheduler.rs"]
mod support_scheduler;
use support_scheduler::{scheduler, spawn_launcher};

const PROFILE: Profile = Profile::P2016;
const IMAGE: &str = "ciao-busybox:latest";
const WAIT: Duration = Duration::from_secs(300);

struct Dockerd {
    dir: PathBuf,
    socket: PathBuf,
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let _ = Command::new("scripts/stop-dockerd.sh")
            .arg(&self.dir)
            .output();
    }
}

fn start_dockerd() -> Result<Dockerd, String> {
    let out = Command::new("scripts/start-dockerd.sh")
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let socket = PathBuf::from(stdout.lines().last().unwrap_or("").trim());
    let dir = socket.parent().ok_or("no socket path")?.to_path_buf();
    Ok(Dockerd { dir, socket })
}

/// Runs `docker -H … args` for every item at once; the time until all returned.
fn direct(socket: &Path, items: &[Vec<String>]) -> Result<Duration, String> {
    let t = Instant::now();
    let children: Vec<Child> = items
        .iter()
        .map(|args| {
            Command::new("docker")
                .arg("-H")
                .arg(format!("unix://{}", socket.display()))
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
        })
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    for c in children {
        let out = c.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
    }
    Ok(t.elapsed())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut launcher: Option<PathBuf> = None;
    let mut ns = vec![10usize, 50];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--launcher", Some(p)) => launcher = Some(PathBuf::from(p)),
            ("--n", Some(v)) => ns = v.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
            _ => {
                eprintln!("usage: bench_docker --launcher PATH [--n 10,50]");
                std::process::exit(2);
            }
        }
    }
    let Some(launcher) = launcher else {
        eprintln!("usage: bench_docker --launcher PATH [--n 10,50]");
        std::process::exit(2);
    };
    if let Err(e) = run(&launcher, &ns) {
        eprintln!("bench_docker: {e}");
        std::process::exit(1);
    }
}

fn run(launcher: &Path, ns: &[usize]) -> Result<(), String> {
    let engine = start_dockerd()?;
    let dir = std::env::temp_dir().join(format!("ciao-bench-docker-{}", uuid::Uuid::new_v4()));
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let server = scheduler(&dir, PROFILE)?;
    let socket = engine.socket.to_string_lossy().into_owned();
    let mut child = spawn_launcher(
        launcher,
        &dir,
        &server,
        PROFILE,
        &[
            "--docker-socket",
            &socket,
            "--max-vm",
            "1000",
            "--stats-interval",
            "3600",
            "--stop-timeout",
            "1",
        ],
        None,
    )?;
    let result = (|| {
        let node = loop {
            let ev = server
                .events()
                .recv_timeout(WAIT)
                .map_err(|_| "the launcher did not connect")?;
            if let ServerEvent::Connected { uuid, .. } = ev {
                break uuid;
            }
        };
        // Let the connect-time STATUS/STATS pass.
        while server
            .events()
            .recv_timeout(Duration::from_millis(300))
            .is_ok()
        {}
        let start_op = PROFILE
            .operand(Operation::Command(Cmd::Start))
            .map_err(|e| e.to_string())?;
        let delete_op = PROFILE
            .operand(Operation::Command(Cmd::Delete))
            .map_err(|e| e.to_string())?;
        let node_text = uuid::Uuid::from_bytes(node).to_string();
        println!(
            "| N | launcher START → running | direct `docker run -d` | ratio | launcher DELETE | direct `docker rm -f` | ratio |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|");
        for &n in ns {
            let ids: Vec<String> = (0..n).map(|_| uuid::Uuid::new_v4().to_string()).collect();
            let t = Instant::now();
            for id in &ids {
                let payload = start_payload(
                    PROFILE,
                    &StartRequest {
                        instance_uuid: id.clone(),
                        tenant_uuid: uuid::Uuid::new_v4().to_string(),
                        docker_image: IMAGE.into(),
                        vm_type: VmType::Docker,
                        vcpus: 1,
                        mem_mb: 64,
                        user_data: "#cloud-config\nruncmd:\n  - [ sleep, \"300\" ]\n".into(),
                        meta_data: "{}\n".into(),
                        ..Default::default()
                    },
                );
                let f = Frame::new(FrameType::Command, start_op, server.uuid(), payload);
                send_patiently(|f| server.send(&node, f), f, WAIT).map_err(|e| e.to_string())?;
            }
            let mut acks = 0;
            while acks < n {
                let ev = server
                    .events()
                    .recv_timeout(WAIT)
                    .map_err(|_| format!("START stalled at {acks}"))?;
                let ServerEvent::Frame { frame, .. } = ev else {
                    continue;
                };
                match PROFILE.frame_operation(&frame) {
                    Ok(Operation::Status(_)) => acks += 1,
                    Ok(Operation::Error(_)) => {
                        return Err(format!(
                            "launcher error: {}",
                            String::from_utf8_lossy(&frame.payload)
                        ));
                    }
                    _ => {}
                }
            }
            let l_start = t.elapsed();
            let t = Instant::now();
            for id in &ids {
                let f = Frame::new(
                    FrameType::Command,
                    delete_op,
                    server.uuid(),
                    delete_payload(PROFILE, id, &node_text, false),
                );
                send_patiently(|f| server.send(&node, f), f, WAIT).map_err(|e| e.to_string())?;
            }
            let mut gone = 0;
            while gone < n {
                if let ServerEvent::Frame { frame, .. } = server
                    .events()
                    .recv_timeout(WAIT)
                    .map_err(|_| format!("DELETE stalled at {gone}"))?
                    && PROFILE.frame_operation(&frame)
                        == Ok(Operation::Event(Event::InstanceDeleted))
                {
                    gone += 1;
                }
            }
            let l_delete = t.elapsed();

            let names: Vec<String> = (0..n)
                .map(|i| format!("bench-direct-{i}-{}", uuid::Uuid::new_v4().simple()))
                .collect();
            let runs: Vec<Vec<String>> = names
                .iter()
                .map(|name| {
                    [
                        "run",
                        "-d",
                        "--name",
                        name,
                        "--network",
                        "none",
                        "--memory",
                        "64m",
                        "--cpus",
                        "1",
                        IMAGE,
                        "sleep",
                        "300",
                    ]
                    .iter()
                    .map(|s| s.to_string())
                    .collect()
                })
                .collect();
            let d_start = direct(&engine.socket, &runs)?;
            let rms: Vec<Vec<String>> = names
                .iter()
                .map(|name| vec!["rm".into(), "-f".into(), name.clone()])
                .collect();
            let d_delete = direct(&engine.socket, &rms)?;
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            println!(
                "| {n} | {:.0} ms | {:.0} ms | {:.2}× | {:.0} ms | {:.0} ms | {:.2}× |",
                ms(l_start),
                ms(d_start),
                ms(l_start) / ms(d_start),
                ms(l_delete),
                ms(d_delete),
                ms(l_delete) / ms(d_delete)
            );
        }
        Ok::<(), String>(())
    })();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    server.stop();
    let _ = fs::remove_dir_all(&dir);
    drop(engine);
    result
}
