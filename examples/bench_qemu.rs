//! QEMU benchmark: N VMs of the test guest started together through the
//! launcher, next to the same work done bare (per VM, in parallel:
//! `qemu-img create` of the overlay, the config-drive ISO with xorriso, and
//! `qemu-system-x86_64` with the same arguments), then a graceful STOP.
//! The bare work is timed twice: as a plain script would do it, and with
//! QEMU started in a session of its own (`setsid`), as the launcher starts
//! it — with the kernel's autogroups that decides how much CPU the QEMUs
//! being started get next to the guests already booting.
//!
//! Launcher timings: "QMP connected" from the launcher's own log (each line
//! carries its time, in ns), as the bare runs time their own QMP handshake;
//! "running" as the scheduler sees it, from STATS every 10 ms
//! (`--stats-interval 0.01`, so ±10 ms), which adds the reporting delay; the
//! STOP from STATS too. `GUEST-BOOTED` is read from each VM's console log,
//! for the bare runs as well.
//!
//! Usage: bench_qemu --launcher PATH --image GUEST.img [--n 1,5,20] [--mem 48] [--runs 5]
//! (see scripts/bench-qemu.sh)

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ciao_launcher::nodestats::process_identity;
use ciao_launcher::payloads::commands::{delete_payload, stop_payload};
use ciao_launcher::payloads::config::{Firmware, VmType};
use ciao_launcher::payloads::outgoing::parse_stats;
use ciao_launcher::payloads::start::{StartRequest, start_payload};
use ciao_launcher::ssntp::conn::send_patiently;
use ciao_launcher::ssntp::server::ServerEvent;
use ciao_launcher::ssntp::{Command as Cmd, Event, Frame, FrameType, Operation, Profile};
use ciao_launcher::virt::qemu::{AccelChoice, LaunchSpec, choose_accel, command_line, own_session};
use ciao_launcher::virt::qmp::Qmp;

#[path = "support/proc_status.rs"]
mod proc_status;
#[path = "support/scheduler.rs"]
mod support_scheduler;

use proc_status::{breakdown, status_field};
use support_scheduler::{scheduler, spawn_launcher};

const PROFILE: Profile = Profile::P2016;
const IMAGE: &str = "7e57a9e0-0c1a-4000-8000-000000000001";
const WAIT: Duration = Duration::from_secs(180);
const USER_DATA: &str = "#cloud-config\n";

/// A condition on the (instance, state) pairs of a STATS frame.
type StatesPred<'a> = dyn Fn(&[(String, String)]) -> bool + 'a;

struct Args {
    launcher: PathBuf,
    image: PathBuf,
    ns: Vec<usize>,
    mem: u64,
    /// Runs per N (default 5); the table shows medians and the spread.
    runs: usize,
}

fn usage() -> ! {
    eprintln!(
        "usage: bench_qemu --launcher PATH --image GUEST.img [--n 1,5,20] [--mem 48] [--runs 5]"
    );
    std::process::exit(2);
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let (mut launcher, mut image, mut ns, mut mem, mut runs) =
        (None, None, vec![1usize, 5, 20], 48u64, 5usize);
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--launcher", Some(p)) => launcher = Some(PathBuf::from(p)),
            ("--image", Some(p)) => image = Some(PathBuf::from(p)),
            ("--n", Some(v)) => ns = v.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
            ("--mem", Some(v)) => mem = v.parse().unwrap_or_else(|_| usage()),
            ("--runs", Some(v)) => runs = v.parse::<usize>().unwrap_or_else(|_| usage()).max(1),
            _ => usage(),
        }
    }
    let (Some(launcher), Some(image)) = (launcher, image) else {
        usage()
    };
    let args = Args {
        launcher,
        image,
        ns,
        mem,
        runs,
    };
    if let Err(e) = run(&args) {
        eprintln!("bench_qemu: {e}");
        std::process::exit(1);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn booted(console: &Path) -> bool {
    fs::read(console).is_ok_and(|c| {
        c.windows(b"GUEST-BOOTED".len())
            .any(|w| w == b"GUEST-BOOTED")
    })
}

/// Launcher figures for one N.
struct Measured {
    /// START → the last "QMP connected" in the launcher's log.
    qmp: Duration,
    /// START → every VM running in a STATS frame.
    running: Duration,
    boot: Duration,
    stop: Duration,
    /// The launcher's threads once every guest booted.
    threads: u64,
    /// The launcher's VmHWM then, KiB (one launcher process serves every
    /// run and every N, so this is its peak so far).
    hwm_kib: u64,
    /// Then, per thread kind: threads and the deepest resident stack, KiB
    /// (instance threads have done their START; see `Breakdown`).
    stacks: Vec<(String, usize, u64)>,
}

fn run(a: &Args) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!(
        "ciao-bq-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    let data = dir.join("data");
    fs::create_dir_all(data.join("images")).map_err(|e| e.to_string())?;
    fs::copy(&a.image, data.join("images").join(IMAGE)).map_err(|e| e.to_string())?;
    let server = scheduler(&dir, PROFILE)?;
    let log = dir.join("launcher.log");
    let mut child = spawn_launcher(
        &a.launcher,
        &dir,
        &server,
        PROFILE,
        &[
            "--max-vm",
            "1000",
            "--stats-interval",
            &std::env::var("BENCH_STATS_INTERVAL").unwrap_or_else(|_| "0.01".into()),
            "--usage-interval",
            "3600",
            "--stop-timeout",
            "30",
        ],
        Some(&log),
    )?;
    let pid = child.id();
    let result = (|| {
        let node = loop {
            if let ServerEvent::Connected { uuid, .. } = server
                .events()
                .recv_timeout(WAIT)
                .map_err(|_| "the launcher did not connect")?
            {
                break uuid;
            }
        };
        let mut rows = Vec::new();
        let mut spreads = Vec::new();
        for &n in &a.ns {
            // Launcher and bare runs take turns; each starts from a flushed
            // page cache so the previous run's writeback does not land on it.
            // The order rotates (launcher, bare, bare with setsid; then bare,
            // bare with setsid, launcher; …) so a drift in the machine's load
            // does not favour any side.
            let (mut ls, mut bs, mut ss) = (Vec::new(), Vec::new(), Vec::new());
            for r in 0..a.runs {
                // 0 launcher, 1 bare, 2 bare with setsid; rotated per run.
                for k in 0..3 {
                    let side = (r + k) % 3;
                    nix::unistd::sync();
                    if side == 0 {
                        ls.push(through_launcher(&server, node, &data, &log, n, a.mem, pid)?);
                    } else {
                        let out = bare(
                            &dir.join(format!("bare-{n}-{r}-{side}")),
                            &a.image,
                            n,
                            a.mem,
                            side == 2,
                        )?;
                        if side == 1 {
                            bs.push(out)
                        } else {
                            ss.push(out)
                        }
                    }
                }
                if let (Some(l), Some(b), Some(s)) = (ls.last(), bs.last(), ss.last()) {
                    eprintln!(
                        "N={n} run {}: launcher QMP {:.0} ms, running in STATS {:.0} ms, booted {:.0} ms, STOP {:.0} ms | bare QMP {:.0} ms, booted {:.0} ms | bare+setsid QMP {:.0} ms, booted {:.0} ms",
                        r + 1,
                        ms(l.qmp),
                        ms(l.running),
                        ms(l.boot),
                        ms(l.stop),
                        ms(b.0),
                        ms(b.1),
                        ms(s.0),
                        ms(s.1)
                    );
                }
            }
            let med = |mut v: Vec<Duration>| {
                v.sort();
                v[v.len() / 2]
            };
            let spread = |v: Vec<Duration>| {
                let lo = v.iter().min().copied().unwrap_or_default();
                let hi = v.iter().max().copied().unwrap_or_default();
                format!("{:.0}–{:.0}", ms(lo), ms(hi))
            };
            spreads.push((
                n,
                spread(ls.iter().map(|m| m.qmp).collect()),
                spread(bs.iter().map(|b| b.0).collect()),
                spread(ss.iter().map(|b| b.0).collect()),
            ));
            let l = Measured {
                qmp: med(ls.iter().map(|m| m.qmp).collect()),
                running: med(ls.iter().map(|m| m.running).collect()),
                boot: med(ls.iter().map(|m| m.boot).collect()),
                stop: med(ls.iter().map(|m| m.stop).collect()),
                threads: ls.iter().map(|m| m.threads).max().unwrap_or(0),
                hwm_kib: ls.iter().map(|m| m.hwm_kib).max().unwrap_or(0),
                stacks: deepest(ls.iter().flat_map(|m| m.stacks.iter())),
            };
            let b = (
                med(bs.iter().map(|b| b.0).collect()),
                med(bs.iter().map(|b| b.1).collect()),
            );
            let s = med(ss.iter().map(|b| b.0).collect());
            rows.push((n, l, b, s));
        }
        let (accel, _) = choose_accel(AccelChoice::Auto, Path::new("/sys"), Path::new("/dev/kvm"));
        println!(
            "\nQEMU benchmark ({accel:?}, legacy BIOS, {} MB per VM; release launcher; STATS every 10 ms; median of {} runs)\n",
            a.mem, a.runs
        );
        println!(
            "| N | launcher START → all QMP connected | bare | ratio | bare, QEMU via setsid | ratio | launcher START → all running in STATS | launcher START → all GUEST-BOOTED | bare | ratio | launcher STOP (ACPI) → all exited | launcher peak RSS | threads |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for &(n, ref l, b, s) in &rows {
            println!(
                "| {n} | {:.0} ms | {:.0} ms | {:.2}× | {:.0} ms | {:.2}× | {:.0} ms | {:.0} ms | {:.0} ms | {:.2}× | {:.0} ms | {:.1} MB | {} |",
                ms(l.qmp),
                ms(b.0),
                ms(l.qmp) / ms(b.0),
                ms(s),
                ms(l.qmp) / ms(s),
                ms(l.running),
                ms(l.boot),
                ms(b.1),
                ms(l.boot) / ms(b.1),
                ms(l.stop),
                l.hwm_kib as f64 / 1024.0,
                l.threads,
            );
        }
        println!(
            "\nDeepest thread stacks once every guest booted (resident KiB of each kind's stack, the most over all runs; TCB and TLS at the top included):\n"
        );
        for (n, l, _, _) in &rows {
            let s: Vec<String> = l
                .stacks
                .iter()
                .map(|(k, c, max)| format!("{k} {c}× max {max} KiB"))
                .collect();
            println!("- N = {n}: {}", s.join(", "));
        }
        println!("\nSTART → all QMP connected, every run (min–max):\n");
        println!("| N | launcher | bare | bare, QEMU via setsid |");
        println!("|---:|---:|---:|---:|");
        for (n, l, b, s) in spreads {
            println!("| {n} | {l} ms | {b} ms | {s} ms |");
        }
        Ok::<(), String>(())
    })();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    server.stop();
    if std::env::var_os("BENCH_DEBUG").is_some()
        && let Ok(text) = fs::read_to_string(&log)
    {
        eprint!("--- the launcher's log ---\n{text}");
    }
    // VMs outlive the launcher: after a failed run, end the ones it left.
    kill_vms(&data);
    let _ = fs::remove_dir_all(&dir);
    result
}

/// SIGKILLs the QEMU of every instance under `data` (by its pid file, if
/// that process's command line names the directory).
fn kill_vms(data: &Path) {
    let Ok(dirs) = fs::read_dir(data.join("instances")) else {
        return;
    };
    for d in dirs.flatten() {
        let Some(pid) = fs::read_to_string(d.path().join("qemu.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        else {
            continue;
        };
        let ours = fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*d.path().to_string_lossy()));
        if ours {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The states of `ids` in a STATS frame, if it is one.
fn states(frame: &Frame) -> Option<Vec<(String, String)>> {
    if PROFILE.frame_operation(frame) != Ok(Operation::Command(Cmd::Stats)) {
        return None;
    }
    let s = parse_stats(&frame.payload).ok()?;
    Some(
        s.instances
            .into_iter()
            .map(|i| (i.instance_uuid, i.state))
            .collect(),
    )
}

fn through_launcher(
    server: &ciao_launcher::ssntp::server::Server,
    node: [u8; 16],
    data: &Path,
    log: &Path,
    n: usize,
    mem: u64,
    pid: u32,
) -> Result<Measured, String> {
    let op = |c| {
        PROFILE
            .operand(Operation::Command(c))
            .map_err(|e| e.to_string())
    };
    let (start_op, stop_op, delete_op) = (op(Cmd::Start)?, op(Cmd::Stop)?, op(Cmd::Delete)?);
    let node_text = uuid::Uuid::from_bytes(node).to_string();
    let send = |operand, payload| {
        let f = Frame::new(FrameType::Command, operand, server.uuid(), payload);
        send_patiently(|f| server.send(&node, f), f, WAIT).map_err(|e| e.to_string())
    };
    // Wait until `all(states)` holds in a STATS frame; Err on an error frame.
    let wait_states =
        |what: &str, on_tick: &mut dyn FnMut(), all: &StatesPred<'_>| -> Result<(), String> {
            let deadline = Instant::now() + WAIT;
            let mut last = None;
            loop {
                on_tick();
                if Instant::now() > deadline {
                    return Err(format!("{what} stalled; last states: {last:?}"));
                }
                if let Ok(ServerEvent::Frame { frame, .. }) =
                    server.events().recv_timeout(Duration::from_millis(20))
                {
                    if let Ok(Operation::Error(_)) = PROFILE.frame_operation(&frame) {
                        return Err(format!(
                            "launcher error: {}",
                            String::from_utf8_lossy(&frame.payload)
                        ));
                    }
                    if let Some(s) = states(&frame) {
                        if all(&s) {
                            return Ok(());
                        }
                        last = Some(s);
                    }
                }
            }
        };
    let ids: Vec<String> = (0..n).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let consoles: Vec<PathBuf> = ids
        .iter()
        .map(|id| data.join("instances").join(id).join("console.log"))
        .collect();
    let mut boot_at: Vec<Option<Duration>> = vec![None; n];
    // The STATS sent (every 10 ms) while a bare run had the machine are
    // still queued: drop them first, or reading through that backlog would
    // be timed as the launcher's START.
    // (What is still in flight is a STATS or two, without the new VMs.)
    while server.events().try_recv().is_ok() {}
    let t = Instant::now();
    let wall = SystemTime::now();
    for id in &ids {
        let payload = start_payload(
            PROFILE,
            &StartRequest {
                instance_uuid: id.clone(),
                tenant_uuid: uuid::Uuid::new_v4().to_string(),
                image_uuid: IMAGE.into(),
                vm_type: VmType::Qemu,
                firmware: Firmware::Legacy,
                vcpus: 1,
                mem_mb: mem,
                user_data: USER_DATA.into(),
                meta_data: String::new(),
                ..Default::default()
            },
        );
        send(start_op, payload)?;
    }
    let check = |boot_at: &mut Vec<Option<Duration>>| {
        for (i, c) in consoles.iter().enumerate() {
            if boot_at[i].is_none() && booted(c) {
                boot_at[i] = Some(t.elapsed());
            }
        }
    };
    let running = |s: &[(String, String)]| {
        ids.iter()
            .all(|id| s.iter().any(|(i, st)| i == id && st == "running"))
    };
    // Consoles are read only afterwards, as in the bare run: polling twenty
    // files meanwhile would take CPU from the QEMUs being timed.
    wait_states("START", &mut || {}, &running)?;
    let running_at = t.elapsed();
    let qmp = qmp_connected(log, &ids, wall)?;
    let deadline = Instant::now() + WAIT;
    loop {
        check(&mut boot_at);
        if boot_at.iter().all(Option::is_some) {
            break;
        }
        if Instant::now() > deadline {
            let stuck: Vec<String> = consoles
                .iter()
                .zip(&boot_at)
                .filter(|(_, b)| b.is_none())
                .map(|(c, _)| {
                    let text = fs::read_to_string(c).unwrap_or_default().replace('\r', "");
                    let tail: Vec<&str> = text.lines().rev().take(5).collect();
                    format!("{}: …{:?}", c.display(), tail)
                })
                .collect();
            return Err(format!("guests did not boot: {stuck:?}"));
        }
        // Drain STATS meanwhile so the channel does not grow.
        let _ = server.events().recv_timeout(Duration::from_millis(20));
    }
    let boot = boot_at.iter().flatten().max().copied().unwrap_or_default();
    let threads = status_field(pid, "Threads:").unwrap_or(0);
    let hwm_kib = status_field(pid, "VmHWM:").unwrap_or(0);
    let stacks = breakdown(pid)
        .stacks
        .into_iter()
        .map(|(kind, (threads, _, max))| (kind, threads, max))
        .collect();

    let t = Instant::now();
    for id in &ids {
        send(stop_op, stop_payload(id, &node_text))?;
    }
    let exited = |s: &[(String, String)]| {
        ids.iter()
            .all(|id| s.iter().any(|(i, st)| i == id && st == "exited"))
    };
    wait_states("STOP", &mut || {}, &exited)?;
    let stop = t.elapsed();

    for id in &ids {
        send(delete_op, delete_payload(PROFILE, id, &node_text, false))?;
    }
    let mut gone = 0;
    let deadline = Instant::now() + WAIT;
    while gone < n && Instant::now() < deadline {
        if let Ok(ServerEvent::Frame { frame, .. }) =
            server.events().recv_timeout(Duration::from_secs(1))
            && PROFILE.frame_operation(&frame) == Ok(Operation::Event(Event::InstanceDeleted))
        {
            gone += 1;
        }
    }
    Ok(Measured {
        qmp,
        running: running_at,
        boot,
        stop,
        threads,
        hwm_kib,
        stacks,
    })
}

/// Per thread kind, the most threads and the deepest stack of `all`.
fn deepest<'a>(all: impl Iterator<Item = &'a (String, usize, u64)>) -> Vec<(String, usize, u64)> {
    let mut by_kind: std::collections::BTreeMap<&str, (usize, u64)> = Default::default();
    for (kind, threads, max) in all {
        let e = by_kind.entry(kind).or_default();
        e.0 = e.0.max(*threads);
        e.1 = e.1.max(*max);
    }
    by_kind
        .into_iter()
        .map(|(k, (c, m))| (k.to_string(), c, m))
        .collect()
}

/// When the last of `ids` logged "QMP connected", counted from `wall`.
/// Every VM reported running has logged it: the line precedes the report.
fn qmp_connected(log: &Path, ids: &[String], wall: SystemTime) -> Result<Duration, String> {
    let text = fs::read_to_string(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let wall = wall
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs_f64();
    let mut last = 0f64;
    for id in ids {
        let needle = format!("{id}: QMP connected");
        let at = text
            .lines()
            .find(|l| l.contains(&needle))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(second_of_day)
            .ok_or_else(|| format!("no \"{needle}\" line in {}", log.display()))?;
        // Runs last minutes, so the time of day tells (also across midnight).
        last = last.max((at - wall).rem_euclid(86_400.0));
    }
    Ok(Duration::from_secs_f64(last))
}

/// The UTC second of the day of a time as the launcher logs it, glog's
/// second field (`I1122 04:16:32.476133 …`).
fn second_of_day(time: &str) -> Option<f64> {
    let mut hms = time.splitn(3, ':').map(|x| x.parse::<f64>().ok());
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    Some(h * 3_600.0 + m * 60.0 + s)
}

fn run_ok(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// One bare VM: overlay, ISO, QEMU (in a session of its own if `setsid`),
/// then our own QMP handshake; returns (time to QMP connected, the QMP
/// connection).
fn bare_one(
    dir: &Path,
    image: &Path,
    mem: u64,
    t: Instant,
    setsid: bool,
) -> Result<(Duration, Qmp), String> {
    let id = uuid::Uuid::new_v4().to_string();
    fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(image)
            .arg(dir.join("image.qcow2")),
    )?;
    let latest = dir.join("cfg/openstack/latest");
    fs::create_dir_all(&latest).map_err(|e| e.to_string())?;
    fs::write(latest.join("user_data"), USER_DATA).map_err(|e| e.to_string())?;
    fs::write(
        latest.join("meta_data.json"),
        format!("{{\"uuid\": \"{id}\", \"hostname\": \"{id}\"}}\n"),
    )
    .map_err(|e| e.to_string())?;
    run_ok(
        Command::new("xorriso")
            .args([
                "-as", "mkisofs", "-quiet", "-R", "-J", "-V", "config-2", "-o",
            ])
            .arg(dir.join("seed.iso"))
            .arg(dir.join("cfg")),
    )?;
    let (accel, _) = choose_accel(AccelChoice::Auto, Path::new("/sys"), Path::new("/dev/kvm"));
    let root = dir.join("image.qcow2");
    let args = command_line(&LaunchSpec {
        name: &id,
        dir,
        accel,
        vcpus: 1,
        mem_mb: mem,
        root: (&root, "qcow2"),
        volumes: &[],
        ovmf: None,
        ui: None,
        nic: &ciao_launcher::virt::qemu::Nic::None,
    });
    let made = t.elapsed();
    let mut qemu = Command::new("qemu-system-x86_64");
    if setsid {
        own_session(&mut qemu);
    }
    run_ok(qemu.args(&args))?;
    let launched = t.elapsed();
    let qmp = Qmp::connect(&dir.join("qmp.sock"), Duration::from_secs(10), "bench")
        .map_err(|e| e.to_string())?;
    if std::env::var_os("BENCH_DEBUG").is_some() {
        eprintln!(
            "bare {id}: disk and config drive at {made:?}, launched at {launched:?}, QMP at {:?}",
            t.elapsed()
        );
    }
    Ok((t.elapsed(), qmp))
}

/// N bare VMs in parallel: (all QMP connected, all GUEST-BOOTED).
fn bare(
    dir: &Path,
    image: &Path,
    n: usize,
    mem: u64,
    setsid: bool,
) -> Result<(Duration, Duration), String> {
    let image = fs::canonicalize(image).map_err(|e| e.to_string())?;
    let t = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let d = dir.join(i.to_string());
            let image = image.clone();
            std::thread::spawn(move || bare_one(&d, &image, mem, t, setsid))
        })
        .collect();
    let mut vms = Vec::new();
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(v)) => vms.push(v),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert("a bare VM thread panicked".into());
            }
        }
    }
    let qmp = vms.iter().map(|v| v.0).max().unwrap_or_default();
    let consoles: Vec<PathBuf> = (0..n)
        .map(|i| dir.join(i.to_string()).join("console.log"))
        .collect();
    let deadline = Instant::now() + WAIT;
    let mut done = vec![false; n];
    let mut boot = Duration::ZERO;
    while first_err.is_none() && !done.iter().all(|d| *d) {
        for (i, c) in consoles.iter().enumerate() {
            if !done[i] && booted(c) {
                done[i] = true;
                boot = t.elapsed();
            }
        }
        if Instant::now() > deadline {
            let stuck: Vec<String> = consoles
                .iter()
                .zip(&done)
                .filter(|(_, d)| !**d)
                .map(|(c, _)| {
                    let text = fs::read_to_string(c).unwrap_or_default().replace('\r', "");
                    let tail: Vec<&str> = text.lines().rev().take(8).collect();
                    format!("{}: …{:?}", c.display(), tail)
                })
                .collect();
            first_err = Some(format!("bare guests did not boot: {stuck:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Tear down: quit each VM and wait until its socket closes.
    let mut quitting: Vec<Qmp> = Vec::new();
    for (_, mut q) in vms {
        let _ = q.send("quit", None);
        quitting.push(q);
    }
    for q in &quitting {
        while q.messages().recv_timeout(Duration::from_secs(10)).is_ok() {}
    }
    // The socket closes before QEMU has finished exiting: wait for the
    // processes too, so the next run does not share the CPUs with them
    // (the launcher's DELETE waits for its QEMUs the same way).
    let deadline = Instant::now() + Duration::from_secs(10);
    for pid in quitting.iter().filter_map(|q| q.pid) {
        while process_identity(Path::new("/proc"), pid).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    drop(quitting);
    let _ = fs::remove_dir_all(dir);
    match first_err {
        Some(e) => Err(e),
        None => Ok((qmp, boot)),
    }
}
