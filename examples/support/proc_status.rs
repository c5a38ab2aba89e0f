//! Reading a process's figures from `/proc`, shared by the benchmarks.

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
