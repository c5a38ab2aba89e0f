//! Reading a process's figures from `/proc`, shared by the benchmarks.

use std::collections::BTreeMap;
use std::fs;

/// The number after `key` (e.g. `VmHWM:`) in `/proc/<pid>/status`.
pub fn status_field(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Where a process's resident memory is, from /proc/<pid>/smaps. A thread's
/// stack is the mapping holding the stack pointer it is blocked with
/// (/proc/<pid>/task/<tid>/syscall), so its resident size is how deep that
/// thread's stack ever went (in pages, TCB and TLS at its top included).
/// glibc's per-thread malloc arenas are the anonymous mappings that start on
/// a 64 MiB boundary (each arena heap is aligned to its maximum size).
#[derive(Default)]
pub struct Breakdown {
    /// Per thread-name prefix (`instance`, `monitor`, …): threads, summed
    /// and largest stack RSS, KiB.
    pub stacks: BTreeMap<String, (usize, u64, u64)>,
    pub arenas: usize,
    pub arena_kib: u64,
    /// `[heap]`: the main arena.
    pub heap_kib: u64,
    /// Everything else (binary, libraries, other anonymous memory).
    pub other_kib: u64,
}

pub fn breakdown(pid: u32) -> Breakdown {
    let mut b = Breakdown::default();
    let Ok(smaps) = fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return b;
    };
    // Stack pointer → thread name.
    let mut sps: Vec<(u64, String)> = Vec::new();
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let p = t.path();
            let comm = fs::read_to_string(p.join("comm")).unwrap_or_default();
            let sp = fs::read_to_string(p.join("syscall"))
                .ok()
                .and_then(|s| s.split_whitespace().nth(7).map(str::to_string))
                .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok());
            if let Some(sp) = sp {
                let kind = comm.trim().split('-').next().unwrap_or("").to_string();
                sps.push((sp, kind));
            }
        }
    }
    let mut range: Option<(u64, u64, bool, bool)> = None;
    let account = |range: Option<(u64, u64, bool, bool)>, rss: u64, b: &mut Breakdown| {
        let Some((lo, hi, anon, heap)) = range else {
            return;
        };
        if let Some((_, kind)) = sps.iter().find(|(sp, _)| (lo..hi).contains(sp)) {
            let e = b.stacks.entry(kind.clone()).or_default();
            e.0 += 1;
            e.1 += rss;
            e.2 = e.2.max(rss);
        } else if heap {
            b.heap_kib += rss;
        } else if anon && lo % (64 << 20) == 0 {
            b.arenas += 1;
            b.arena_kib += rss;
        } else {
            b.other_kib += rss;
        }
    };
    let mut rss = 0;
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or("");
        if first == "Rss:" {
            rss = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        } else if let Some((lo, hi)) = first.split_once('-')
            && let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16))
        {
            account(range, rss, &mut b);
            rss = 0;
            let rest: Vec<&str> = f.collect();
            // perms offset dev inode [path]
            let path = rest.get(4).copied().unwrap_or("");
            range = Some((lo, hi, path.is_empty(), path == "[heap]"));
        }
    }
    account(range, rss, &mut b);
    b
}
