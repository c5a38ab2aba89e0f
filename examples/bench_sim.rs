//! Simulation scale benchmark: an in-process SSNTP scheduler (over real TLS
//! on 127.0.0.1) sends N START commands back to back to the real
//! `ciao-launcher` binary running with `-simulation`, and measures
//! - ack: until the launcher has sent one STATUS per START (it sends one
//!   after each successful start, once the state is on disk);
//! - running: until a STATS reports all N instances running (STATS every
//!   0.5 s, so this is an upper bound with 0.5 s resolution);
//! - peak RSS (VmHWM) and thread count of the launcher process;
//! - SIGTERM → exit.
//!
//! Usage: bench_sim --launcher PATH [--n 1000,4000,10000] [--stack-kib K]
//! (run it through scripts/bench-sim.sh, which builds the release binary).
//! Environment: BENCH_DEBUG=1 shows the launcher's log; BENCH_PAUSE=S waits
//! S seconds before the SIGTERM (to inspect /proc/<pid>/smaps).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use ciao_launcher::payloads::config::VmType;
use ciao_launcher::payloads::outgoing;
use ciao_launcher::payloads::start::{StartRequest, start_payload};
use ciao_launcher::ssntp::conn::send_patiently;
use ciao_launcher::ssntp::server::ServerEvent;
use ciao_launcher::ssntp::{Command as Cmd, Frame, FrameType, Operation, Profile};

#[path = "support/scheduler.rs"]
mod support_scheduler;
use support_scheduler::{scheduler, spawn_launcher};

const PROFILE: Profile = Profile::P2016;

struct Row {
    n: usize,
    ack: Duration,
    running: Duration,
    hwm_mb: f64,
    threads: usize,
    sigterm: Duration,
    dirs: usize,
}

fn status_field(pid: u32, key: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn run_one(launcher: &Path, n: usize, stack_kib: usize) -> Result<Row, String> {
    let dir = std::env::temp_dir().join(format!("ciao-bench-sim-{}", uuid::Uuid::new_v4()));
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let result = run_in(&dir, launcher, n, stack_kib);
    let _ = fs::remove_dir_all(&dir);
    result
}

fn run_in(dir: &Path, launcher: &Path, n: usize, stack_kib: usize) -> Result<Row, String> {
    let server = scheduler(dir, PROFILE)?;

    let (max_vm, stack) = ((n + 16).to_string(), stack_kib.to_string());
    let mut child: Child = spawn_launcher(
        launcher,
        dir,
        &server,
        PROFILE,
        &[
            "-simulation",
            "--stats-interval",
            "0.5",
            "--max-vm",
            &max_vm,
            "--instance-stack-kib",
            &stack,
            "-stderrthreshold",
            "ERROR",
        ],
        None,
    )?;
    let pid = child.id();
    let wait = Duration::from_secs(120);
    let node = loop {
        match server
            .events()
            .recv_timeout(wait)
            .map_err(|_| "the launcher did not connect")?
        {
            ServerEvent::Connected { uuid, .. } => break uuid,
            ServerEvent::Rejected { error, .. } => return Err(error),
            _ => {}
        }
    };
    // The STATUS + STATS sent on connect.
    let payloads: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            start_payload(
                PROFILE,
                &StartRequest {
                    instance_uuid: format!("{i:08x}-0000-4000-8000-000000000000"),
                    tenant_uuid: "67d86208-0000-4465-9018-fe14087d415f".into(),
                    image_uuid: "b286cd45-7d0c-4525-a140-4db6c95e41fa".into(),
                    vm_type: VmType::Qemu,
                    vcpus: 1,
                    mem_mb: 64,
                    user_data: "#cloud-config\n".into(),
                    meta_data: "{}\n".into(),
                    ..Default::default()
                },
            )
        })
        .collect();
    // Let the connect-time STATUS/STATS pass (reports keep coming every 0.5 s).
    let settle = Instant::now() + Duration::from_millis(300);
    while let Some(left) = settle.checked_duration_since(Instant::now()) {
        let _ = server.events().recv_timeout(left);
    }
    if std::env::var_os("BENCH_DEBUG").is_some() {
        eprintln!("N={n}: launcher pid {pid} connected; sending");
    }
    let op = PROFILE
        .operand(Operation::Command(Cmd::Start))
        .map_err(|e| e.to_string())?;

    let t0 = Instant::now();
    for p in payloads {
        let f = Frame::new(FrameType::Command, op, server.uuid(), p);
        send_patiently(|f| server.send(&node, f), f, wait).map_err(|e| e.to_string())?;
    }
    let (mut statuses, mut ack, mut running) = (0usize, None, None);
    while running.is_none() {
        let ev = server
            .events()
            .recv_timeout(wait)
            .map_err(|_| format!("stalled: {statuses} acks"))?;
        let ServerEvent::Frame { frame, .. } = ev else {
            continue;
        };
        match PROFILE.frame_operation(&frame) {
            Ok(Operation::Status(_)) => {
                statuses += 1;
                if statuses == n {
                    ack = Some(t0.elapsed());
                }
            }
            // Parsing a 10 000-instance STATS takes a while: only once every
            // START is acknowledged, so it never delays the ack count.
            Ok(Operation::Command(Cmd::Stats)) if ack.is_some() => {
                if let Ok(s) = outgoing::parse_stats(&frame.payload)
                    && s.instances.len() == n
                    && s.instances
                        .iter()
                        .all(|i| i.state == PROFILE.running_state())
                {
                    running = Some(t0.elapsed());
                }
            }
            Ok(Operation::Error(_)) => {
                return Err(format!(
                    "launcher error: {}",
                    String::from_utf8_lossy(&frame.payload)
                ));
            }
            _ => {}
        }
    }
    // Periodic STATUS frames count as acks too; the first N cover the STARTs.
    let hwm_mb = status_field(pid, "VmHWM:").unwrap_or(0) as f64 / 1024.0;
    let threads = status_field(pid, "Threads:").unwrap_or(0) as usize;
    if let Some(secs) =
        std::env::var_os("BENCH_PAUSE").and_then(|v| v.into_string().ok()?.parse().ok())
    {
        eprintln!("pausing {secs} s before SIGTERM: launcher pid {pid}");
        std::thread::sleep(Duration::from_secs(secs));
    }
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .map_err(|e| e.to_string())?;
    let status = child.wait().map_err(|e| e.to_string())?;
    let sigterm = t.elapsed();
    if !status.success() {
        return Err(format!("launcher exit status {status}"));
    }
    let dirs = fs::read_dir(dir.join("data/instances")).map_or(0, |d| d.count());
    server.stop();
    Ok(Row {
        n,
        ack: ack.unwrap_or_default(),
        running: running.unwrap_or_default(),
        hwm_mb,
        threads,
        sigterm,
        dirs,
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut launcher: Option<PathBuf> = None;
    let mut ns = vec![1000usize, 4000, 10000];
    let mut stack_kib = 128usize;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--launcher", Some(p)) => launcher = Some(PathBuf::from(p)),
            ("--n", Some(v)) => ns = v.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
            ("--stack-kib", Some(v)) => stack_kib = v.parse().unwrap_or(stack_kib),
            _ => {
                eprintln!("usage: bench_sim --launcher PATH [--n 1000,4000,10000] [--stack-kib K]");
                std::process::exit(2);
            }
        }
    }
    let Some(launcher) = launcher else {
        eprintln!("usage: bench_sim --launcher PATH [--n 1000,4000,10000]");
        std::process::exit(2);
    };
    println!(
        "| N | all STARTs acked | all running (STATS, ±0.5 s) | peak RSS (VmHWM) | threads | SIGTERM → exit | instance dirs |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut failed = false;
    for n in ns {
        match run_one(&launcher, n, stack_kib) {
            Ok(r) => println!(
                "| {} | {:.0} ms | {:.0} ms | {:.1} MB | {} | {:.1} ms | {} |",
                r.n,
                r.ack.as_secs_f64() * 1e3,
                r.running.as_secs_f64() * 1e3,
                r.hwm_mb,
                r.threads,
                r.sigterm.as_secs_f64() * 1e3,
                r.dirs
            ),
            Err(e) => {
                println!("| {n} | failed: {e} | | | | | |");
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
