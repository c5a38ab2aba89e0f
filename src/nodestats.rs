//! Node and per-process statistics read from `/proc` and `statfs`
//! (docs/architecture.md, "Overseer" and "Virtualizers").
//!
//! Node figures, as the STATUS and STATS payloads carry them:
//!
//! * memory, in MiB (divided by 1024): `MemTotal` from `/proc/meminfo`, and
//!   available = `MemFree + Active(file) + Inactive(file)` (only when all
//!   three are present);
//! * disk, in decimal MB (divided by 1 000 000): the total and available space
//!   of the file system that holds the instances directory;
//! * load: the first field of `/proc/loadavg`, truncated to an integer;
//! * CPUs: the number of consecutive `cpuN` lines after the first line of
//!   `/proc/stat`.
//!
//! A figure that cannot be read or parsed is −1 ("unknown"); the others are
//! still reported. Nothing here panics on odd input: the files are hand-parsed
//! and every number is checked.
//!
//! The `/proc` root is a parameter so that tests can point it at fixture files.
//!
//! [`ProcessSampler`] samples one process (a QEMU) for the per-instance STATS:
//! resident memory and CPU use between two samples.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Node figures as the STATUS/STATS payloads carry them; −1 = unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeFigures {
    pub mem_total_mb: i64,
    pub mem_available_mb: i64,
    pub disk_total_mb: i64,
    pub disk_available_mb: i64,
    pub load: i64,
    pub cpus_online: i64,
}

impl NodeFigures {
    /// Every figure unknown.
    pub const UNKNOWN: NodeFigures = NodeFigures {
        mem_total_mb: -1,
        mem_available_mb: -1,
        disk_total_mb: -1,
        disk_available_mb: -1,
        load: -1,
        cpus_online: -1,
    };
}

/// Where the overseer gets node figures from; injected so tests can supply them.
pub trait NodeStatsSource: Send + std::fmt::Debug {
    /// Takes one sample of the node figures.
    fn sample(&mut self) -> NodeFigures;
}

/// Reads `/proc` (under `proc_root`, `/proc` in production) and
/// `statfs(instances_dir)`.
#[derive(Debug)]
pub struct ProcNodeStats {
    proc_root: PathBuf,
    instances_dir: PathBuf,
}

impl ProcNodeStats {
    pub fn new(proc_root: impl Into<PathBuf>, instances_dir: impl Into<PathBuf>) -> Self {
        ProcNodeStats {
            proc_root: proc_root.into(),
            instances_dir: instances_dir.into(),
        }
    }
}

impl NodeStatsSource for ProcNodeStats {
    fn sample(&mut self) -> NodeFigures {
        let (mem_total_mb, mem_available_mb) = read_small(&self.proc_root.join("meminfo"))
            .map(|t| parse_meminfo(&t))
            .unwrap_or((-1, -1));
        let (disk_total_mb, disk_available_mb) = disk_figures(&self.instances_dir);
        let load = read_small(&self.proc_root.join("loadavg"))
            .map(|t| parse_loadavg(&t))
            .unwrap_or(-1);
        let cpus_online = read_small(&self.proc_root.join("stat"))
            .map(|t| parse_cpu_count(&t))
            .unwrap_or(-1);
        NodeFigures {
            mem_total_mb,
            mem_available_mb,
            disk_total_mb,
            disk_available_mb,
            load,
            cpus_online,
        }
    }
}

/// A fixed-figures source for tests and the simulation.
#[derive(Debug, Clone)]
pub struct FixedNodeStats(pub NodeFigures);

impl NodeStatsSource for FixedNodeStats {
    fn sample(&mut self) -> NodeFigures {
        self.0
    }
}

/// Upper bound on what is read from one `/proc` file: far above any real
/// meminfo/stat/status, and it keeps a misconfigured proc root (a huge or
/// endless file) from exhausting memory.
const READ_LIMIT: u64 = 4 << 20;

/// Reads a small text file; invalid UTF-8 is replaced rather than refused so
/// one odd byte costs at most the line it is on.
fn read_small(path: &Path) -> io::Result<String> {
    let mut buf = Vec::new();
    File::open(path)?.take(READ_LIMIT).read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// `kB` → MiB, or −1 when it does not fit.
fn kib_to_mib(kib: u64) -> i64 {
    i64::try_from(kib / 1024).unwrap_or(-1)
}

/// `(total MiB, available MiB)` from the text of `/proc/meminfo`.
fn parse_meminfo(text: &str) -> (i64, i64) {
    let (mut total, mut free, mut active, mut inactive) = (None, None, None, None);
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let slot = match key.trim() {
            "MemTotal" => &mut total,
            "MemFree" => &mut free,
            "Active(file)" => &mut active,
            "Inactive(file)" => &mut inactive,
            _ => continue,
        };
        // First occurrence wins, as in the original's scan.
        if slot.is_none() {
            *slot = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok());
        }
        if total.is_some() && free.is_some() && active.is_some() && inactive.is_some() {
            break;
        }
    }
    let total_mb = total.map_or(-1, kib_to_mib);
    let available_mb = match (free, active, inactive) {
        (Some(f), Some(a), Some(i)) => f
            .checked_add(a)
            .and_then(|s| s.checked_add(i))
            .map_or(-1, kib_to_mib),
        _ => -1,
    };
    (total_mb, available_mb)
}

/// Number of online CPUs from the text of `/proc/stat`: the consecutive
/// `cpuN` lines after the aggregate first line; none → −1.
fn parse_cpu_count(text: &str) -> i64 {
    let count = text
        .lines()
        .skip(1)
        .take_while(|line| {
            line.strip_prefix("cpu")
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count();
    if count == 0 {
        -1
    } else {
        i64::try_from(count).unwrap_or(-1)
    }
}

/// The 1-minute load average truncated to an integer, from `/proc/loadavg`.
fn parse_loadavg(text: &str) -> i64 {
    match text.split_whitespace().next().map(str::parse::<f64>) {
        // Rust parses "nan" and "inf" too; those are not a load.
        Some(Ok(v)) if v.is_finite() && v >= 0.0 => v.trunc() as i64,
        _ => -1,
    }
}

/// `(total MB, available MB)` of the file system holding `dir`, in decimal MB.
fn disk_figures(dir: &Path) -> (i64, i64) {
    let Ok(st) = nix::sys::statvfs::statvfs(dir) else {
        return (-1, -1);
    };
    // Block counts of statvfs are in units of the fragment size; Linux
    // reports 0 there only on very old kernels, where the block size applies.
    let unit = match u128::from(st.fragment_size()) {
        0 => u128::from(st.block_size()),
        n => n,
    };
    if unit == 0 {
        return (-1, -1);
    }
    let mb = |blocks: u64| i64::try_from(unit * u128::from(blocks) / 1_000_000).unwrap_or(-1);
    #[allow(clippy::useless_conversion)] // fsblkcnt_t is u64 on some targets only
    let (blocks, avail) = (u64::from(st.blocks()), u64::from(st.blocks_available()));
    (mb(blocks), mb(avail))
}

/// `(state, start time in clock ticks)` of a live process, from
/// `<proc_root>/<pid>/stat`; `None` when it is gone or a zombie. The start
/// time tells a process from a later one that got the same pid.
pub fn process_identity(proc_root: &Path, pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = read_small(&proc_root.join(pid.to_string()).join("stat")).ok()?;
    let p = parse_pid_stat(&stat)?;
    (!matches!(p.state, 'Z' | 'X')).then_some(p.start_time)
}

/// Resource use of one process at one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessUsage {
    /// Resident set size in MiB; −1 when it could not be read.
    pub rss_mb: i64,
    /// CPU use since the previous sample in percent of ONE cpu (a process
    /// busy on two cpus shows 200); `None` on the first sample, after a
    /// process change or when it cannot be computed. Callers that report
    /// per-instance figures divide by the vCPU count (spec §7.5).
    pub cpu_percent: Option<i64>,
}

/// What is remembered between two samples.
#[derive(Debug, Clone, Copy)]
struct CpuMark {
    ticks: u64,
    start_time: u64,
    at: Instant,
}

/// Samples one process for the per-instance STATS: RSS from
/// `/proc/<pid>/status` (`VmRSS`, else `statm`), CPU % between two samples
/// from `utime + stime` of `/proc/<pid>/stat`.
#[derive(Debug)]
pub struct ProcessSampler {
    proc_root: PathBuf,
    pid: i32,
    clock_ticks: u64,
    page_size: u64,
    last: Option<CpuMark>,
}

/// `AT_PAGESZ` and `AT_CLKTCK` of the ELF auxiliary vector.
const AT_PAGESZ: usize = 6;
const AT_CLKTCK: usize = 17;
/// `USER_HZ` on every Linux architecture we run on; the usual 4 KiB page.
const DEFAULT_CLOCK_TICKS: u64 = 100;
const DEFAULT_PAGE_SIZE: u64 = 4096;

impl ProcessSampler {
    /// A sampler for `pid`. The clock-tick rate and page size come from
    /// `<proc_root>/self/auxv` (what `sysconf(_SC_CLK_TCK)` and
    /// `sysconf(_SC_PAGESIZE)` return: nix's `sysconf` needs a nix feature
    /// this crate does not enable), with 100 Hz and 4 KiB when unreadable.
    pub fn new(proc_root: impl Into<PathBuf>, pid: i32) -> Self {
        let proc_root = proc_root.into();
        let (clock_ticks, page_size) = read_auxv(&proc_root.join("self/auxv"));
        ProcessSampler {
            proc_root,
            pid,
            clock_ticks: clock_ticks.unwrap_or(DEFAULT_CLOCK_TICKS),
            page_size: page_size.unwrap_or(DEFAULT_PAGE_SIZE),
            last: None,
        }
    }

    /// The sampled pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Forgets the previous sample (the next `cpu_percent` is `None`), e.g.
    /// after re-attaching to the process.
    pub fn reset(&mut self) {
        self.last = None;
    }

    /// One sample at `now`; `None` when the process is gone (or a zombie).
    pub fn sample(&mut self, now: Instant) -> Option<ProcessUsage> {
        let usage = self.sample_inner(now);
        if usage.is_none() {
            self.last = None;
        }
        usage
    }

    fn sample_inner(&mut self, now: Instant) -> Option<ProcessUsage> {
        // pid 0 and negatives are not processes; a path built from them
        // would name something else (or nothing).
        if self.pid <= 0 {
            return None;
        }
        let dir = self.proc_root.join(self.pid.to_string());
        let stat = read_small(&dir.join("stat")).ok()?;
        let parsed = parse_pid_stat(&stat);
        if let Some(p) = parsed
            && matches!(p.state, 'Z' | 'X')
        {
            return None;
        }
        let rss_mb = self.read_rss_mb(&dir);
        let cpu_percent = match (parsed, self.last) {
            (Some(cur), Some(prev)) => cpu_percent(prev, cur, now, self.clock_ticks),
            _ => None,
        };
        self.last = parsed.map(|p| CpuMark {
            ticks: p.ticks,
            start_time: p.start_time,
            at: now,
        });
        Some(ProcessUsage {
            rss_mb,
            cpu_percent,
        })
    }

    fn read_rss_mb(&self, dir: &Path) -> i64 {
        if let Some(kib) = read_small(&dir.join("status"))
            .ok()
            .and_then(|t| parse_vmrss_kib(&t))
        {
            return kib_to_mib(kib);
        }
        // Some processes have no VmRSS line; statm counts resident pages.
        read_small(&dir.join("statm"))
            .ok()
            .and_then(|t| t.split_whitespace().nth(1)?.parse::<u64>().ok())
            .and_then(|pages| pages.checked_mul(self.page_size))
            .map_or(-1, |bytes| i64::try_from(bytes >> 20).unwrap_or(-1))
    }
}

/// CPU % of one cpu between two marks, or `None` when it is meaningless:
/// a different process behind the pid (start time changed), a counter that
/// went backwards, or no wall time elapsed.
fn cpu_percent(prev: CpuMark, cur: PidStat, now: Instant, clock_ticks: u64) -> Option<i64> {
    if cur.start_time != prev.start_time || clock_ticks == 0 {
        return None;
    }
    let ticks = cur.ticks.checked_sub(prev.ticks)?;
    let wall_ns = now.checked_duration_since(prev.at)?.as_nanos();
    if wall_ns == 0 {
        return None;
    }
    // 100 × cpu_ns / wall_ns with cpu_ns = ticks × 10⁹ / CLK_TCK, in one
    // division so nothing is truncated twice.
    let pct = 100 * u128::from(ticks) * 1_000_000_000 / (u128::from(clock_ticks) * wall_ns);
    Some(i64::try_from(pct).unwrap_or(i64::MAX))
}

#[derive(Debug, Clone, Copy)]
struct PidStat {
    state: char,
    ticks: u64,
    start_time: u64,
}

/// The fields of `/proc/<pid>/stat` that matter here. The command name
/// (field 2) is in parentheses and may itself contain spaces and `)`, so the
/// fields are counted from the *last* `)`.
fn parse_pid_stat(text: &str) -> Option<PidStat> {
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); utime/stime are fields 14/15, starttime 22.
    let state = fields.first()?.chars().next()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let start_time: u64 = fields.get(19)?.parse().ok()?;
    Some(PidStat {
        state,
        ticks: utime.checked_add(stime)?,
        start_time,
    })
}

/// `VmRSS` in kB from `/proc/<pid>/status`.
fn parse_vmrss_kib(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `(clock ticks, page size)` from an ELF auxiliary vector file: pairs of
/// native-endian machine words, ended by a zero key.
fn read_auxv(path: &Path) -> (Option<u64>, Option<u64>) {
    let mut buf = Vec::new();
    if File::open(path)
        .and_then(|f| f.take(64 * 1024).read_to_end(&mut buf))
        .is_err()
    {
        return (None, None);
    }
    parse_auxv(&buf)
}

fn parse_auxv(buf: &[u8]) -> (Option<u64>, Option<u64>) {
    const W: usize = std::mem::size_of::<usize>();
    let word = |b: &[u8]| -> Option<usize> { Some(usize::from_ne_bytes(b.try_into().ok()?)) };
    let (mut ticks, mut page) = (None, None);
    for pair in buf.chunks_exact(2 * W) {
        let (Some(key), Some(val)) = (word(&pair[..W]), word(&pair[W..])) else {
            break;
        };
        let val = u64::try_from(val).ok().filter(|&v| v > 0);
        match key {
            0 => break,
            AT_CLKTCK => ticks = val,
            AT_PAGESZ => page = val,
            _ => {}
        }
    }
    (ticks, page)
}

#[cfg(test)]
// In tests a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::fs;
    use std::time::Duration;

    /// A temporary directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("ciao-nodestats-{tag}-{}", uuid::Uuid::new_v4()));
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
        fn write(&self, rel: &str, data: impl AsRef<[u8]>) {
            let p = self.0.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, data).unwrap();
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const MEMINFO: &str = "MemTotal:       16384000 kB\n\
        MemFree:         1024000 kB\n\
        MemAvailable:    9000000 kB\n\
        Buffers:          100000 kB\n\
        Active:          5000000 kB\n\
        Inactive:        4000000 kB\n\
        Active(anon):    2000000 kB\n\
        Inactive(anon):  1000000 kB\n\
        Active(file):    3000000 kB\n\
        Inactive(file):  3000000 kB\n";

    const STAT_2CPU: &str = "cpu  100 0 50 1000 0 0 0 0 0 0\n\
        cpu0 50 0 25 500 0 0 0 0 0 0\n\
        cpu1 50 0 25 500 0 0 0 0 0 0\n\
        intr 12345 0 0\n\
        ctxt 999\n\
        cpu7 this line is not counted: the run ended at intr\n";

    #[test]
    fn meminfo_all_keys() {
        // (1024000 + 3000000 + 3000000) / 1024 = 6859.375
        assert_eq!(parse_meminfo(MEMINFO), (16000, 6859));
    }

    #[test]
    fn meminfo_some_keys() {
        let no_inactive: String = MEMINFO
            .lines()
            .filter(|l| !l.starts_with("Inactive(file)"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(parse_meminfo(&no_inactive), (16000, -1));
        let no_total: String = MEMINFO
            .lines()
            .filter(|l| !l.starts_with("MemTotal"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(parse_meminfo(&no_total), (-1, 6859));
        assert_eq!(
            parse_meminfo("MemTotal: lots kB\nMemFree: 2048 kB\n"),
            (-1, -1)
        );
        assert_eq!(
            parse_meminfo("MemTotal: 99999999999999999999999 kB\n").0,
            -1
        );
    }

    #[test]
    fn meminfo_overflowing_sum_is_unknown() {
        let t = "MemTotal: 2048 kB\nMemFree: 18446744073709551615 kB\n\
                 Active(file): 1 kB\nInactive(file): 1 kB\n";
        assert_eq!(parse_meminfo(t), (2, -1));
    }

    #[test]
    fn meminfo_garbage() {
        assert_eq!(parse_meminfo(""), (-1, -1));
        assert_eq!(parse_meminfo("\u{0}\u{1}garbage:::\n:\n\n"), (-1, -1));
    }

    #[test]
    fn cpu_count() {
        assert_eq!(parse_cpu_count(STAT_2CPU), 2);
        assert_eq!(parse_cpu_count("cpu 1 2 3\nintr 1\n"), -1);
        assert_eq!(parse_cpu_count(""), -1);
        // The first line is skipped whatever it is.
        assert_eq!(parse_cpu_count("cpu0 1\ncpu1 1\n"), 1);
        // "cpu" alone or followed by a non-digit is not a CPU line.
        assert_eq!(parse_cpu_count("x\ncpu\ncpu0\n"), -1);
        assert_eq!(parse_cpu_count("x\ncpux 1\n"), -1);
    }

    #[test]
    fn loadavg() {
        assert_eq!(parse_loadavg("1.97 0.50 0.25 2/345 6789\n"), 1);
        assert_eq!(parse_loadavg("0.99 1 1 1/1 1\n"), 0);
        assert_eq!(parse_loadavg("12 1 1\n"), 12);
        assert_eq!(parse_loadavg(""), -1);
        assert_eq!(parse_loadavg("garbage 1 2"), -1);
        assert_eq!(parse_loadavg("nan 1 2"), -1);
        assert_eq!(parse_loadavg("inf"), -1);
        assert_eq!(parse_loadavg("-3.5"), -1);
    }

    #[test]
    fn fixture_proc_root() {
        let proc = TempDir::new("proc");
        let inst = TempDir::new("inst");
        proc.write("meminfo", MEMINFO);
        proc.write("stat", STAT_2CPU);
        proc.write("loadavg", "3.50 2.00 1.00 1/100 42\n");
        let mut src = ProcNodeStats::new(&proc.0, &inst.0);
        let f = src.sample();
        assert_eq!(f.mem_total_mb, 16000);
        assert_eq!(f.mem_available_mb, 6859);
        assert_eq!(f.load, 3);
        assert_eq!(f.cpus_online, 2);
        assert!(f.disk_total_mb > 0, "{f:?}");
        assert!(f.disk_available_mb >= 0 && f.disk_available_mb <= f.disk_total_mb);
    }

    #[test]
    fn garbage_and_missing_files_give_unknown() {
        let proc = TempDir::new("garbage");
        proc.write("meminfo", [0xffu8, 0xfe, 0, b'\n', b':', b'x']);
        proc.write("stat", "garbage\n\n");
        // A directory where a file is expected.
        fs::create_dir_all(proc.0.join("loadavg")).unwrap();
        let mut src = ProcNodeStats::new(&proc.0, proc.0.join("no-such-dir"));
        assert_eq!(src.sample(), NodeFigures::UNKNOWN);

        let mut src = ProcNodeStats::new(proc.0.join("nothing-here"), proc.0.join("nope"));
        assert_eq!(src.sample(), NodeFigures::UNKNOWN);
    }

    #[test]
    fn real_proc_and_statfs() {
        let inst = TempDir::new("real");
        let f = ProcNodeStats::new("/proc", &inst.0).sample();
        assert!(f.mem_total_mb > 0, "{f:?}");
        assert!(
            f.mem_available_mb > 0 && f.mem_available_mb <= f.mem_total_mb,
            "{f:?}"
        );
        assert!(f.disk_total_mb > 0, "{f:?}");
        assert!(f.disk_available_mb >= 0, "{f:?}");
        assert!(f.load >= 0, "{f:?}");
        // Not compared with available_parallelism: that honours affinity
        // and cgroup quotas, /proc/stat does not.
        assert!(f.cpus_online >= 1, "{f:?}");
    }

    #[test]
    fn fixed_source() {
        let figs = NodeFigures {
            mem_total_mb: 1,
            mem_available_mb: 2,
            disk_total_mb: 3,
            disk_available_mb: 4,
            load: 5,
            cpus_online: 6,
        };
        let mut src: Box<dyn NodeStatsSource> = Box::new(FixedNodeStats(figs));
        assert_eq!(src.sample(), figs);
        assert_eq!(src.sample(), figs);
    }

    /// A `/proc/<pid>/stat` line with an awkward command name.
    fn pid_stat(state: char, utime: u64, stime: u64, start: u64) -> String {
        format!(
            "4242 (qemu (x) y) {state} 1 4242 4242 0 -1 4194560 100 0 0 0 \
             {utime} {stime} 0 0 20 0 3 0 {start} 1000000 250 18446744073709551615 \
             1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n"
        )
    }

    #[test]
    fn pid_stat_parsing() {
        let p = parse_pid_stat(&pid_stat('S', 7, 5, 99)).unwrap();
        assert_eq!((p.state, p.ticks, p.start_time), ('S', 12, 99));
        assert!(parse_pid_stat("").is_none());
        assert!(parse_pid_stat("1 (x) S 1 2 3").is_none());
        assert!(parse_pid_stat("garbage without parens").is_none());
    }

    #[test]
    fn sampler_on_fixtures() {
        let proc = TempDir::new("pid");
        proc.write("4242/stat", pid_stat('S', 100, 50, 777));
        proc.write(
            "4242/status",
            "Name:\tqemu\nVmRSS:\t  524288 kB\nThreads:\t3\n",
        );
        let mut s = ProcessSampler::new(&proc.0, 4242);
        let t0 = Instant::now();
        let first = s.sample(t0).unwrap();
        assert_eq!(
            first,
            ProcessUsage {
                rss_mb: 512,
                cpu_percent: None
            }
        );

        // 50 more ticks at the 100 Hz fallback over 1 s: 50 %.
        proc.write("4242/stat", pid_stat('R', 130, 70, 777));
        let second = s.sample(t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(second.cpu_percent, Some(50));

        // Two cpus busy for 2 s: 200 % of one cpu.
        proc.write("4242/stat", pid_stat('R', 330, 270, 777));
        assert_eq!(
            s.sample(t0 + Duration::from_secs(3)).unwrap().cpu_percent,
            Some(200)
        );

        // Same instant: no wall time elapsed.
        assert_eq!(
            s.sample(t0 + Duration::from_secs(3)).unwrap().cpu_percent,
            None
        );

        // A different process behind the same pid (start time changed).
        proc.write("4242/stat", pid_stat('S', 1, 1, 778));
        assert_eq!(
            s.sample(t0 + Duration::from_secs(4)).unwrap().cpu_percent,
            None
        );
        proc.write("4242/stat", pid_stat('S', 11, 1, 778));
        assert_eq!(
            s.sample(t0 + Duration::from_secs(5)).unwrap().cpu_percent,
            Some(10)
        );

        // Reset forgets the baseline.
        s.reset();
        assert_eq!(
            s.sample(t0 + Duration::from_secs(6)).unwrap().cpu_percent,
            None
        );

        // Zombie = gone; the baseline is dropped too.
        proc.write("4242/stat", pid_stat('Z', 11, 1, 778));
        assert_eq!(s.sample(t0 + Duration::from_secs(7)), None);

        // Gone altogether.
        fs::remove_dir_all(proc.0.join("4242")).unwrap();
        assert_eq!(s.sample(t0 + Duration::from_secs(8)), None);
        assert_eq!(ProcessSampler::new(&proc.0, 0).sample(t0), None);
        assert_eq!(ProcessSampler::new(&proc.0, -1).sample(t0), None);
    }

    #[test]
    fn sampler_rss_fallbacks_and_garbled_stat() {
        let proc = TempDir::new("statm");
        // No VmRSS (kernel-thread-like status): statm resident pages × 4 KiB.
        proc.write("7/stat", pid_stat('S', 1, 1, 1));
        proc.write("7/status", "Name:\tkthread\n");
        proc.write("7/statm", "1000 65536 10 0 0 0 0\n");
        let mut s = ProcessSampler::new(&proc.0, 7);
        assert_eq!(s.sample(Instant::now()).unwrap().rss_mb, 256);

        // Neither readable: rss unknown; a garbled stat still means "alive".
        proc.write("7/statm", "x");
        proc.write("7/stat", "garbage");
        let t = Instant::now();
        assert_eq!(
            s.sample(t),
            Some(ProcessUsage {
                rss_mb: -1,
                cpu_percent: None
            })
        );
        assert_eq!(
            s.sample(t + Duration::from_secs(1)),
            Some(ProcessUsage {
                rss_mb: -1,
                cpu_percent: None
            })
        );
    }

    #[test]
    fn sampler_uses_auxv_clock_ticks() {
        let proc = TempDir::new("auxv");
        let mut auxv = Vec::new();
        for (k, v) in [(AT_PAGESZ, 16384usize), (AT_CLKTCK, 1000), (0, 0)] {
            auxv.extend_from_slice(&k.to_ne_bytes());
            auxv.extend_from_slice(&v.to_ne_bytes());
        }
        proc.write("self/auxv", &auxv);
        proc.write("9/stat", pid_stat('S', 0, 0, 5));
        proc.write("9/statm", "1 64 0\n");
        let mut s = ProcessSampler::new(&proc.0, 9);
        assert_eq!((s.clock_ticks, s.page_size), (1000, 16384));
        let t0 = Instant::now();
        assert_eq!(s.sample(t0).unwrap().rss_mb, 1);
        proc.write("9/stat", pid_stat('S', 50, 0, 5));
        assert_eq!(
            s.sample(t0 + Duration::from_secs(1)).unwrap().cpu_percent,
            Some(5)
        );

        assert_eq!(parse_auxv(&[]), (None, None));
        assert_eq!(parse_auxv(&[1, 2, 3]), (None, None));
    }

    #[test]
    fn real_auxv_has_clock_ticks() {
        let (ticks, page) = read_auxv(Path::new("/proc/self/auxv"));
        assert!(ticks.is_some_and(|t| t > 0));
        assert!(page.is_some_and(|p| p.is_power_of_two()));
    }

    #[test]
    fn sampler_on_this_process() {
        let mut s = ProcessSampler::new("/proc", std::process::id() as i32);
        let first = s.sample(Instant::now()).expect("this process exists");
        assert!(first.rss_mb > 0, "{first:?}");
        assert_eq!(first.cpu_percent, None);
        // Burn some CPU so there is something to measure.
        let start = Instant::now();
        let mut x: u64 = 1;
        while start.elapsed() < Duration::from_millis(150) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let second = s.sample(Instant::now()).expect("this process exists");
        assert!(second.rss_mb > 0, "{second:?}");
        assert!(second.cpu_percent.is_some_and(|c| c >= 0), "{second:?}");
    }
}
