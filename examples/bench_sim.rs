//! Simulation scale benchmark: an in-process SSNTP scheduler (over real TLS
//! on 127.0.0.1) sends N START commands back to back to the real
//! `ciao-launcher` binary running with `-simulation`, and measures
//! - ack: until the launcher has sent one STATUS per START (it sends one
//!   after each successful start, once the state is on disk);
//! - running: until a STATS reports all N instances running (STATS every
//!   0.5 s, so this is an upper bound with 0.5 s resolution);
//! - peak RSS (VmHWM) and thread count of the launcher process;
//! - SIGTERM → exit;
//! - in the same run, the floor (`--floor PATH`, the bench_thread_floor
//!   binary): N bare instance-shaped threads in a fresh process, its peak RSS
//!   and its exit with the threads not woken, and the ratios to it;
//! - with `--baseline BIN`, the same measurements of another launcher binary,
//!   run alternately with the first.
//!
//! `--idle N [--window S]` measures instead what N idle simulated instances
//! cost: after they are all acknowledged (profile defaults for the STATS and
//! usage periods), the launcher's CPU over S seconds (60 by default) as % of
//! one core, from utime + stime in /proc/<pid>/stat, and its wake-ups per
//! second: voluntary context switches summed over /proc/<pid>/task/*/status.
//!
//! Usage: bench_sim --launcher PATH [--n 1000,4000,10000] [--stack-kib K]
//! [--floor PATH] [--baseline BIN] [--idle N --window S]
//! (run it through scripts/bench-sim.sh, which builds the release binaries).
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

#[path = "support/proc_status.rs"]
#[allow(dead_code)] // the memory breakdown is the Docker and QEMU benchmarks'
mod proc_status;
#[path = "support/scheduler.rs"]
mod support_scheduler;

use proc_status::status_field;
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

/// What one run measures: the scale row, or the idle cost over a window.
#[derive(Clone, Copy)]
enum Mode {
    Scale,
    Idle { window: Duration },
}

/// Idle cost of the launcher over a window.
struct Idle {
    n: usize,
    window: Duration,
    cpu_percent: f64,
    wakeups_per_s: f64,
    threads: usize,
}

fn run_one(launcher: &Path, n: usize, stack_kib: usize) -> Result<Row, String> {
    match run_mode(launcher, n, stack_kib, Mode::Scale)? {
        Measured::Scale(r) => Ok(r),
        Measured::Idle(_) => Err("idle row in scale mode".into()),
    }
}

enum Measured {
    Scale(Row),
    Idle(Idle),
}

fn run_mode(launcher: &Path, n: usize, stack_kib: usize, mode: Mode) -> Result<Measured, String> {
    let dir = std::env::temp_dir().join(format!("ciao-bench-sim-{}", uuid::Uuid::new_v4()));
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let result = run_in(&dir, launcher, n, stack_kib, mode);
    let _ = fs::remove_dir_all(&dir);
    result
}

/// utime + stime of the whole process (every thread, also ended ones), in
/// clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses).
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 here.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Voluntary context switches summed over the process's live threads.
fn voluntary_switches(pid: u32) -> u64 {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("voluntary_ctxt_switches:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

fn run_in(
    dir: &Path,
    launcher: &Path,
    n: usize,
    stack_kib: usize,
    mode: Mode,
) -> Result<Measured, String> {
    let server = scheduler(dir, PROFILE)?;

    let (max_vm, stack) = ((n + 16).to_string(), stack_kib.to_string());
    let mut args = vec![
        "-simulation",
        "--max-vm",
        &max_vm,
        "--instance-stack-kib",
        &stack,
        "-stderrthreshold",
        "ERROR",
    ];
    if matches!(mode, Mode::Scale) {
        args.extend(["--stats-interval", "0.5"]);
    }
    let mut child: Child = spawn_launcher(launcher, dir, &server, PROFILE, &args, None)?;
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
    if let Mode::Idle { window } = mode {
        while statuses < n {
            let ev = server
                .events()
                .recv_timeout(wait)
                .map_err(|_| format!("stalled: {statuses} acks"))?;
            if let ServerEvent::Frame { frame, .. } = ev
                && let Ok(Operation::Status(_)) = PROFILE.frame_operation(&frame)
            {
                statuses += 1;
            }
        }
        // Let the last monitors report and the burst's frames drain.
        let settle = Instant::now() + Duration::from_secs(2);
        while let Some(left) = settle.checked_duration_since(Instant::now()) {
            let _ = server.events().recv_timeout(left);
        }
        let (c0, v0, t0) = (cpu_ticks(pid), voluntary_switches(pid), Instant::now());
        let end = t0 + window;
        // Keep reading what the launcher sends (its STATS) meanwhile.
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            let _ = server.events().recv_timeout(left);
        }
        let (c1, v1, took) = (cpu_ticks(pid), voluntary_switches(pid), t0.elapsed());
        let threads = status_field(pid, "Threads:").unwrap_or(0) as usize;
        let tck = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        let (Some(c0), Some(c1)) = (c0, c1) else {
            return Err("cannot read /proc/<pid>/stat".into());
        };
        let cpu_s = c1.saturating_sub(c0) as f64 / tck;
        let _ = child.kill();
        let _ = child.wait();
        server.stop();
        return Ok(Measured::Idle(Idle {
            n,
            window: took,
            cpu_percent: 100.0 * cpu_s / took.as_secs_f64(),
            wakeups_per_s: v1.saturating_sub(v0) as f64 / took.as_secs_f64(),
            threads,
        }));
    }
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
    Ok(Measured::Scale(Row {
        n,
        ack: ack.unwrap_or_default(),
        running: running.unwrap_or_default(),
        hwm_mb,
        threads,
        sigterm,
        dirs,
    }))
}

/// The floor for N: a fresh bench_thread_floor child with N bare
/// instance-shaped threads; its peak RSS and its exit with the threads not
/// woken.
struct Floor {
    hwm_mb: f64,
    exit: Duration,
}

fn floor(bin: &Path, n: usize, stack_kib: usize) -> Result<Floor, String> {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    let mut c = Command::new(bin)
        .args(["--child", &n.to_string(), &stack_kib.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let out = c.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let hwm_kib: Option<u64> = line.split_whitespace().nth(2).and_then(|v| v.parse().ok());
    let Some(hwm_kib) = hwm_kib else {
        let _ = c.kill();
        let _ = c.wait();
        return Err(format!("floor child said {line:?}"));
    };
    let mut stdin = c.stdin.take().ok_or("no stdin")?;
    let t = Instant::now();
    writeln!(stdin, "exit").map_err(|e| e.to_string())?;
    let st = c.wait().map_err(|e| e.to_string())?;
    let exit = t.elapsed();
    if !st.success() {
        return Err(format!("floor child exited with {st}"));
    }
    Ok(Floor {
        hwm_mb: hwm_kib as f64 / 1024.0,
        exit,
    })
}

fn usage() -> ! {
    eprintln!(
        "usage: bench_sim --launcher PATH [--n 1000,4000,10000] [--stack-kib K] [--floor PATH] [--baseline BIN] [--idle N [--window SECONDS]]"
    );
    std::process::exit(2);
}

fn print_row(who: &str, r: &Row, f: Option<&Floor>) {
    let (floor_rss, per, floor_exit, ratio) = match f {
        Some(f) => (
            format!("{:.1} MB", f.hwm_mb),
            format!("{:+.1} KB", (r.hwm_mb - f.hwm_mb) * 1024.0 / r.n as f64),
            format!("{:.1} ms", f.exit.as_secs_f64() * 1e3),
            format!("{:.2}×", r.sigterm.as_secs_f64() / f.exit.as_secs_f64()),
        ),
        None => Default::default(),
    };
    println!(
        "| {} | {who} | {:.0} ms | {:.0} ms | {:.1} MB | {floor_rss} | {per} | {} | {:.1} ms | {floor_exit} | {ratio} | {} |",
        r.n,
        r.ack.as_secs_f64() * 1e3,
        r.running.as_secs_f64() * 1e3,
        r.hwm_mb,
        r.threads,
        r.sigterm.as_secs_f64() * 1e3,
        r.dirs
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut launcher: Option<PathBuf> = None;
    let mut baseline: Option<PathBuf> = None;
    let mut floor_bin: Option<PathBuf> = None;
    let mut ns = vec![1000usize, 4000, 10000];
    let mut stack_kib = 128usize;
    let mut idle: Option<usize> = None;
    let mut window = Duration::from_secs(60);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--launcher", Some(p)) => launcher = Some(PathBuf::from(p)),
            ("--baseline", Some(p)) => baseline = Some(PathBuf::from(p)),
            ("--floor", Some(p)) => floor_bin = Some(PathBuf::from(p)),
            ("--n", Some(v)) => ns = v.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
            ("--stack-kib", Some(v)) => stack_kib = v.parse().unwrap_or_else(|_| usage()),
            ("--idle", Some(v)) => idle = Some(v.parse().unwrap_or_else(|_| usage())),
            ("--window", Some(v)) => {
                window = Duration::from_secs_f64(v.parse().unwrap_or_else(|_| usage()))
            }
            _ => usage(),
        }
    }
    let Some(launcher) = launcher else { usage() };
    let mut sides = vec![("launcher", launcher)];
    if let Some(b) = baseline {
        sides.push(("baseline", b));
    }
    let mut failed = false;
    if let Some(n) = idle {
        println!(
            "| N idle | who | window | CPU (% of one core) | wake-ups/s (voluntary switches, all threads) | threads | target |"
        );
        println!("|---:|---|---:|---:|---:|---:|---|");
        for (who, bin) in &sides {
            match run_mode(bin, n, stack_kib, Mode::Idle { window }) {
                Ok(Measured::Idle(i)) => println!(
                    "| {} | {who} | {:.0} s | {:.3} % | {:.1} | {} | ≤ 0.2 %, ≤ 50/s |",
                    i.n,
                    i.window.as_secs_f64(),
                    i.cpu_percent,
                    i.wakeups_per_s,
                    i.threads
                ),
                Ok(Measured::Scale(_)) => unreachable!("scale row in idle mode"),
                Err(e) => {
                    println!("| {n} | {who} | failed: {e} | | | | |");
                    failed = true;
                }
            }
        }
        if failed {
            std::process::exit(1);
        }
        return;
    }
    println!(
        "| N | who | all STARTs acked | all running (STATS, ±0.5 s) | peak RSS (VmHWM) | floor RSS | per instance over floor | threads | SIGTERM → exit | floor: exit, not woken | exit / floor | instance dirs |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for n in ns {
        let f = match floor_bin.as_deref().map(|b| floor(b, n, stack_kib)) {
            Some(Ok(f)) => Some(f),
            Some(Err(e)) => {
                println!("| {n} | floor | failed: {e} |");
                failed = true;
                None
            }
            None => None,
        };
        for (who, bin) in &sides {
            match run_one(bin, n, stack_kib) {
                Ok(r) => print_row(who, &r, f.as_ref()),
                Err(e) => {
                    println!("| {n} | {who} | failed: {e} | | | | | | | | | |");
                    failed = true;
                }
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
