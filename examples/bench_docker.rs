//! Docker benchmark: N containers started together through the launcher, and
//! deleted together, next to the same work issued directly to the engine:
//!
//! - **Engine API** (the target's baseline): N threads in this process, each
//!   doing `POST /containers/create` then `POST /containers/{name}/start`
//!   (and later `DELETE /containers/{name}?force=true`) over the engine's unix
//!   socket with a minimal HTTP/1.1 client (one connection per request), so
//!   no process start-up hides the engine's own cost;
//! - `docker run -d` / `docker rm -f`, one CLI process per container
//!   (`--cli`).
//!
//! Every N is measured in `--runs` rounds (medians printed). In a round,
//! every launcher (the one under test, and `--baseline BIN` if given; their
//! order rotates) runs right after an Engine API round of its own, and its
//! ratio is against that one: the machine's load drifts, a pair shares it.
//! Each launcher round is a fresh launcher process with an empty data
//! directory: its peak RSS (VmHWM) and thread count once all N containers
//! run, and where its resident memory is then (/proc/<pid>/smaps, see
//! [`Breakdown`]; a thread's resident stack is how deep it ever went, so the
//! `instance` row's maximum is the deepest Docker START).
//!
//! Launcher START is done when it has sent one STATUS per START (sent once
//! the container is started); launcher DELETE when every InstanceDeleted has
//! arrived (sent once the container is removed). Uses a private dockerd
//! (scripts/start-dockerd.sh) and an in-process SSNTP scheduler over TLS on
//! 127.0.0.1.
//!
//! Usage: bench_docker --launcher PATH [--baseline PATH] [--n 10,50] [--runs 3] [--cli]
//! (see scripts/bench-docker.sh)

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ciao_launcher::payloads::commands::delete_payload;
use ciao_launcher::payloads::config::VmType;
use ciao_launcher::payloads::start::{StartRequest, start_payload};
use ciao_launcher::ssntp::conn::send_patiently;
use ciao_launcher::ssntp::server::{Server, ServerEvent};
use ciao_launcher::ssntp::{Command as Cmd, Event, Frame, FrameType, Operation, Profile};

#[path = "support/proc_status.rs"]
mod proc_status;
#[path = "support/scheduler.rs"]
mod support_scheduler;

use proc_status::{Breakdown, breakdown, status_field};
use support_scheduler::{scheduler, spawn_launcher};

const PROFILE: Profile = Profile::P2016;
const IMAGE: &str = "ciao-busybox:latest";
const WAIT: Duration = Duration::from_secs(300);
/// The API version the launcher negotiates with current engines.
const API: &str = "v1.41";

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

/// One HTTP/1.1 request on a fresh connection (`Connection: close`, read to
/// EOF); the status code, or the status line and body of an error answer.
fn api_call(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Result<u16, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    s.set_read_timeout(Some(WAIT)).map_err(|e| e.to_string())?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} /{API}{path} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("{method} {path}: no status in {text:?}"))?;
    if status >= 300 {
        return Err(format!("{method} {path}: {text}"));
    }
    Ok(status)
}

/// A create body like the one the launcher sends for this benchmark's
/// STARTs: same image, command and limits, no network.
fn create_body(name: &str) -> String {
    serde_json::json!({
        "Image": IMAGE,
        "Cmd": ["sleep", "300"],
        "Hostname": &name[..12],
        "Labels": {"org.ciao.bench": name},
        "HostConfig": {"Memory": 64i64 << 20, "NanoCpus": 1_000_000_000i64, "NetworkMode": "none"},
        "NetworkDisabled": true,
    })
    .to_string()
}

/// N threads at once, each running `work(i)`; the time until all are done.
fn threads(
    n: usize,
    work: impl Fn(usize) -> Result<(), String> + Sync,
) -> Result<Duration, String> {
    let t = Instant::now();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|i| {
                s.spawn({
                    let work = &work;
                    move || work(i)
                })
            })
            .collect();
        for h in hs {
            h.join()
                .map_err(|_| "a baseline thread panicked".to_string())??;
        }
        Ok::<(), String>(())
    })?;
    Ok(t.elapsed())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut launcher: Option<PathBuf> = None;
    let mut baseline: Option<PathBuf> = None;
    let mut cli = false;
    let mut runs = 3usize;
    let mut ns = vec![10usize, 50];
    let usage = || {
        eprintln!(
            "usage: bench_docker --launcher PATH [--baseline PATH] [--n 10,50] [--runs 3] [--cli]"
        );
        std::process::exit(2);
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--cli" {
            cli = true;
            continue;
        }
        match (a.as_str(), it.next()) {
            ("--launcher", Some(p)) => launcher = Some(PathBuf::from(p)),
            ("--baseline", Some(p)) => baseline = Some(PathBuf::from(p)),
            ("--runs", Some(v)) => runs = v.parse().unwrap_or(0).max(1),
            ("--n", Some(v)) => ns = v.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
            _ => usage(),
        }
    }
    let Some(launcher) = launcher else {
        usage();
        return;
    };
    let mut who = vec![("launcher", launcher)];
    if let Some(b) = baseline {
        who.push(("baseline", b));
    }
    if let Err(e) = run(&who, &ns, runs, cli) {
        eprintln!("bench_docker: {e}");
        std::process::exit(1);
    }
}

/// What one launcher process measured for one N.
struct LauncherRow {
    start: Duration,
    delete: Duration,
    hwm_kib: u64,
    threads: u64,
    mem: Breakdown,
}

/// Runs `--runs` rounds per N; in each, every launcher right after an Engine
/// API round of its own (so a ratio compares work done under the same load),
/// the order of the launchers rotating from round to round. Prints medians.
fn run(who: &[(&str, PathBuf)], ns: &[usize], runs: usize, cli: bool) -> Result<(), String> {
    let engine = start_dockerd()?;
    let dir = std::env::temp_dir().join(format!("ciao-bench-docker-{}", uuid::Uuid::new_v4()));
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let server = scheduler(&dir, PROFILE)?;
    let result = (|| {
        let mut notes = Vec::new();
        println!(
            "| N | who | START → running | Engine API create + start | ratio | DELETE → removed | Engine API remove | ratio | `docker run -d` | `docker rm -f` | peak RSS | threads |"
        );
        println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for &n in ns {
            // Per launcher: (launcher, API) pairs of START and of DELETE.
            let mut pairs: Vec<Vec<(LauncherRow, Duration, Duration)>> =
                who.iter().map(|_| Vec::new()).collect();
            for r in 0..runs {
                for k in 0..who.len() {
                    let w = (k + r) % who.len();
                    let (api_start, api_delete) = api_round(&engine.socket, n)?;
                    let row = launcher_round(&who[w].1, &dir, &server, &engine.socket, n)?;
                    pairs[w].push((row, api_start, api_delete));
                }
            }
            let (cli_start, cli_delete) = if cli {
                let (s, d) = cli_round(&engine.socket, n)?;
                (Some(s), Some(d))
            } else {
                (None, None)
            };
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            let opt =
                |d: Option<Duration>| d.map_or("–".to_string(), |d| format!("{:.0} ms", ms(d)));
            for (w, rows) in pairs.into_iter().enumerate() {
                let med = |f: &dyn Fn(&(LauncherRow, Duration, Duration)) -> f64| {
                    median(rows.iter().map(f).collect())
                };
                println!(
                    "| {n} | {} | {:.0} ms | {:.0} ms | {:.2}× | {:.0} ms | {:.0} ms | {:.2}× | {} | {} | {:.1} MB | {} |",
                    who[w].0,
                    med(&|(r, _, _)| ms(r.start)),
                    med(&|(_, a, _)| ms(*a)),
                    med(&|(r, a, _)| ms(r.start) / ms(*a)),
                    med(&|(r, _, _)| ms(r.delete)),
                    med(&|(_, _, a)| ms(*a)),
                    med(&|(r, _, a)| ms(r.delete) / ms(*a)),
                    opt(cli_start),
                    opt(cli_delete),
                    med(&|(r, _, _)| r.hwm_kib as f64) / 1024.0,
                    med(&|(r, _, _)| r.threads as f64),
                );
                if let Some((r, _, _)) = rows.into_iter().last() {
                    notes.push((n, who[w].0, r));
                }
            }
        }
        Ok::<_, String>(notes)
    })();
    server.stop();
    let _ = fs::remove_dir_all(&dir);
    drop(engine);
    let notes = result?;
    println!();
    println!(
        "(medians of {runs} rounds; ratios are per round, launcher / the API round just before it)"
    );
    println!();
    println!(
        "Resident memory once all N run, last round (KiB; stacks: threads × summed RSS, deepest one):"
    );
    for (n, name, r) in &notes {
        let m = &r.mem;
        let s: Vec<String> = m
            .stacks
            .iter()
            .map(|(k, (c, sum, max))| format!("{k} {c}× {sum} (max {max})"))
            .collect();
        println!(
            "- N = {n}, {name}: VmHWM {}; stacks: {}; malloc arenas: {}, {}; [heap] {}; other {}",
            r.hwm_kib,
            s.join(", "),
            m.arenas,
            m.arena_kib,
            m.heap_kib,
            m.other_kib
        );
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        l if l % 2 == 1 => v[l / 2],
        l => (v[l / 2 - 1] + v[l / 2]) / 2.0,
    }
}

/// A fresh launcher with an empty data directory: N STARTs, N DELETEs, then
/// SIGTERM.
fn launcher_round(
    bin: &Path,
    dir: &Path,
    server: &Server,
    socket: &Path,
    n: usize,
) -> Result<LauncherRow, String> {
    let _ = fs::remove_dir_all(dir.join("data"));
    let socket = socket.to_string_lossy().into_owned();
    let mut child = spawn_launcher(
        bin,
        dir,
        server,
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
    let pid = child.id();
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
        let start = t.elapsed();
        // All N run, each with its monitor: the peak of threads, and the
        // memory as it stays while they run (the first usage samples come
        // from short-lived threads, so let them finish).
        std::thread::sleep(Duration::from_secs(1));
        let threads = status_field(pid, "Threads:").unwrap_or(0);
        let mem = breakdown(pid);
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
                && PROFILE.frame_operation(&frame) == Ok(Operation::Event(Event::InstanceDeleted))
            {
                gone += 1;
            }
        }
        let delete = t.elapsed();
        Ok(LauncherRow {
            start,
            delete,
            hwm_kib: status_field(pid, "VmHWM:").unwrap_or(0),
            threads,
            mem,
        })
    })();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    // The next launcher must not be taken for this one.
    while let Ok(ev) = server.events().recv_timeout(Duration::from_millis(200)) {
        if matches!(ev, ServerEvent::Disconnected { .. }) {
            break;
        }
    }
    result
}

/// The Engine API baseline: N threads create and start one container each,
/// then N threads force-remove them.
fn api_round(socket: &Path, n: usize) -> Result<(Duration, Duration), String> {
    let names: Vec<String> = (0..n)
        .map(|_| format!("bench-api-{}", uuid::Uuid::new_v4().simple()))
        .collect();
    let start = threads(n, |i| {
        let name = &names[i];
        api_call(
            socket,
            "POST",
            &format!("/containers/create?name={name}"),
            Some(&create_body(name)),
        )?;
        api_call(socket, "POST", &format!("/containers/{name}/start"), None).map(drop)
    })?;
    let delete = threads(n, |i| {
        api_call(
            socket,
            "DELETE",
            &format!("/containers/{}?force=true", names[i]),
            None,
        )
        .map(drop)
    })?;
    Ok((start, delete))
}

/// `docker run -d` and `docker rm -f`, one CLI process per container.
fn cli_round(socket: &Path, n: usize) -> Result<(Duration, Duration), String> {
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
    let start = direct(socket, &runs)?;
    let rms: Vec<Vec<String>> = names
        .iter()
        .map(|name| vec!["rm".into(), "-f".into(), name.clone()])
        .collect();
    let delete = direct(socket, &rms)?;
    Ok((start, delete))
}
