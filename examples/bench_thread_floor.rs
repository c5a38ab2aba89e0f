//! The floor under `scripts/bench-sim.sh`: what N bare threads shaped like
//! the launcher's instance threads cost on this machine, with no launcher
//! code at all. Each thread owns a bounded(16) inbox, an unbounded monitor
//! channel and a tick that never fires, shares one shutdown channel, and
//! blocks in `select!` over the four (exactly what an idle instance thread
//! does). Per N, in a fresh child process each time:
//! - spawn: until every thread is blocked in its `select!`;
//! - RSS: the child's VmHWM then (its binary and libc included);
//! - exit, joined: close the shutdown channel, join every thread, exit;
//! - exit, not woken: exit at once with every thread still blocked (the
//!   kernel alone tearing N threads down: no thread can be faster).
//!
//! Usage: bench_thread_floor [--n 1000,4000,10000] [--stack-kib 128]
//! (run it through scripts/bench-thread-floor.sh).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, bounded, never, select, unbounded};

enum Never {}

fn status_kib(key: &str) -> Result<u64, String> {
    let s = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no {key} in /proc/self/status"))
}

/// The child: N threads, then one command on stdin ("join" or "exit").
fn child(n: usize, stack: usize) -> Result<(), String> {
    let (shutdown_tx, shutdown) = bounded::<Never>(0);
    let (ready_tx, ready) = bounded::<()>(n);
    let t = Instant::now();
    let mut threads = Vec::with_capacity(n);
    let mut inboxes = Vec::with_capacity(n);
    for i in 0..n {
        let (inbox, cmds) = bounded::<u64>(16);
        let (mon_tx, mon_rx) = unbounded::<u64>();
        let (shutdown, ready_tx) = (shutdown.clone(), ready_tx.clone());
        let tick: Receiver<Instant> = never();
        let h = std::thread::Builder::new()
            .name(format!("instance-{i:08x}"))
            .stack_size(stack)
            .spawn(move || {
                let _ = ready_tx.send(());
                let _mon_tx = mon_tx;
                loop {
                    select! {
                        recv(shutdown) -> _ => break,
                        recv(cmds) -> c => if c.is_err() { break },
                        recv(mon_rx) -> _ => {},
                        recv(tick) -> _ => {},
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        threads.push(h);
        inboxes.push(inbox);
    }
    for _ in 0..n {
        ready
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| "a thread did not start")?;
    }
    let spawn = t.elapsed();
    let hwm = status_kib("VmHWM:")?;
    println!("ready {} {hwm}", spawn.as_micros());
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    if line.trim() == "join" {
        drop(shutdown_tx);
        for h in threads {
            h.join().map_err(|_| "a thread panicked")?;
        }
    }
    std::process::exit(0);
}

struct Row {
    spawn: Duration,
    hwm_kib: u64,
    exit: Duration,
}

/// One child: spawn N threads, then time "join" or "exit" until it is reaped.
fn measure(n: usize, stack_kib: usize, how: &str) -> Result<Row, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut c = Command::new(exe)
        .args(["--child", &n.to_string(), &stack_kib.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let out = c.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let mut f = line.split_whitespace().skip(1).map(str::parse::<u64>);
    let (Some(Ok(spawn_us)), Some(Ok(hwm_kib))) = (f.next(), f.next()) else {
        let _ = c.kill();
        let _ = c.wait();
        return Err(format!("child said {line:?}"));
    };
    let mut stdin = c.stdin.take().ok_or("no stdin")?;
    let t = Instant::now();
    writeln!(stdin, "{how}").map_err(|e| e.to_string())?;
    let st = c.wait().map_err(|e| e.to_string())?;
    let exit = t.elapsed();
    if !st.success() {
        return Err(format!("child exited with {st}"));
    }
    Ok(Row {
        spawn: Duration::from_micros(spawn_us),
        hwm_kib,
        exit,
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child") {
        let n = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(1000);
        let kib: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(128);
        if let Err(e) = child(n, kib * 1024) {
            eprintln!("bench_thread_floor child: {e}");
            std::process::exit(1);
        }
        return;
    }
    let mut ns = vec![1000usize, 4000, 10000];
    let mut stack_kib = 128usize;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--n", Some(v)) => ns = v.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
            ("--stack-kib", Some(v)) => stack_kib = v.parse().unwrap_or(stack_kib),
            _ => {
                eprintln!("usage: bench_thread_floor [--n 1000,4000,10000] [--stack-kib 128]");
                std::process::exit(2);
            }
        }
    }
    println!(
        "bare instance-shaped threads, {stack_kib} KiB stacks (no launcher code; each row a fresh process)\n"
    );
    println!(
        "| N | spawn, all blocked | peak RSS (VmHWM) | per thread | wake + join all + exit | exit, threads not woken |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    let mut failed = false;
    for n in ns {
        let rows =
            measure(n, stack_kib, "join").and_then(|j| Ok((j, measure(n, stack_kib, "exit")?)));
        match rows {
            Ok((j, e)) => {
                // The empty process: the same binary with one thread.
                let base = measure(1, stack_kib, "exit").map_or(0, |b| b.hwm_kib);
                println!(
                    "| {n} | {:.0} ms | {:.1} MB | {:.1} KB | {:.0} ms | {:.0} ms |",
                    j.spawn.as_secs_f64() * 1e3,
                    j.hwm_kib as f64 / 1024.0,
                    (j.hwm_kib.saturating_sub(base)) as f64 / n as f64,
                    j.exit.as_secs_f64() * 1e3,
                    e.exit.as_secs_f64() * 1e3,
                );
            }
            Err(e) => {
                println!("| {n} | failed: {e} | | | | |");
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
