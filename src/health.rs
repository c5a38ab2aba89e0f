//! The node's health file, `<data-dir>/status`: what an operator can read on
//! the node without the scheduler (`ciao-lc node-status`).
//!
//! Written by the overseer thread (it owns the instance map and the node's
//! READY/FULL/MAINTENANCE, and hears of every connection change), never by a
//! thread of its own:
//! 1. After each input it handles, the overseer builds a [`Health`] (O(1):
//!    the instance counts are kept up to date as states change) and offers it
//!    to its [`StatusFile`] with the time of its injected [`Clock`]
//!    ([`RealClock`]; tests use [`ManualClock`]).
//! 2. Unchanged from what the file holds: nothing happens. So an idle node
//!    neither writes nor wakes up for it.
//! 3. Changed, and the last write is at least [`MIN_INTERVAL`] old: written
//!    now, atomically (a temporary file beside it, then `rename`; no fsync: a
//!    lost update after a power cut is harmless, a torn file is never seen).
//! 4. Changed within [`MIN_INTERVAL`] of the last write: the overseer arms a
//!    one-shot timer for the rest of the interval and offers the then current
//!    state when it fires. A burst of changes is one write a second.
//!
//! # Format
//! UTF-8 lines `key: value`, in this order; lines starting with `#` are
//! comments; readers ignore keys they do not know. Times are whole seconds
//! since the Unix epoch followed by the same time in UTC in parentheses.
//!
//! ```text
//! # ciao-launcher node status (read it with: ciao-lc node-status)
//! written: 1796634000 (2026-12-07 09:00:00 UTC)
//! pid: 4242
//! node-uuid: 5f0c6a4e-…
//! scheduler: 127.0.0.1:8888
//! connected: yes
//! since: 1796633990 (2026-12-07 08:59:50 UTC)
//! status: READY
//! instances: 3
//! pending: 0
//! running: 2
//! exited: 1
//! last-error: START_FAILURE for 9d3a…: full_cn
//! last-error-at: 1796633000 (2026-12-07 08:43:20 UTC)
//! ```
//!
//! `connected: no` with `since` is the time the connection was lost (or the
//! launcher started, if it never connected). `last-error` is `none`, or one
//! line: the last error frame sent to the scheduler, or why the connection
//! failed or was lost.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use log::warn;

use crate::instance::InstanceState;

/// The file's name in the data directory.
pub const FILE_NAME: &str = "status";
/// The shortest time between two writes.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// The longest `last-error` kept (one line, cut on a character boundary).
const MAX_ERROR: usize = 300;
/// Error notes that may wait for the overseer; more are dropped (only the
/// last one matters).
const ERROR_NOTES: usize = 64;

/// The time the rate limit is measured in, and its one-shot timer.
pub trait Clock: Send + std::fmt::Debug {
    fn now(&self) -> Instant;
    /// A channel that delivers once, `wait` after [`Clock::now`].
    fn after(&self, wait: Duration) -> Receiver<Instant>;
}

/// The production clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealClock;

impl Clock for RealClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn after(&self, wait: Duration) -> Receiver<Instant> {
        crossbeam_channel::after(wait)
    }
}

/// A clock that moves only when told (deterministic tests): its timer fires
/// when [`ManualClock::advance`] reaches it.
#[derive(Debug, Clone)]
pub struct ManualClock {
    state: Arc<Mutex<ManualState>>,
    fire: Sender<Instant>,
    fired: Receiver<Instant>,
}

#[derive(Debug)]
struct ManualState {
    now: Instant,
    due: Option<Instant>,
}

impl ManualClock {
    pub fn new(start: Instant) -> ManualClock {
        let (fire, fired) = crossbeam_channel::unbounded();
        ManualClock {
            state: Arc::new(Mutex::new(ManualState {
                now: start,
                due: None,
            })),
            fire,
            fired,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ManualState> {
        // Two instants: a poisoned lock still holds usable ones.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves time on by `d`, firing the timer if it is due by then.
    pub fn advance(&self, d: Duration) {
        let mut s = self.lock();
        s.now += d;
        if s.due.is_some_and(|due| due <= s.now) {
            s.due = None;
            let _ = self.fire.send(s.now);
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.lock().now
    }

    fn after(&self, wait: Duration) -> Receiver<Instant> {
        let mut s = self.lock();
        s.due = Some(s.now + wait);
        self.fired.clone()
    }
}

/// Whether the node is connected to its scheduler, and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub connected: bool,
    pub since: SystemTime,
}

/// What the status file says (besides the time it was written and the pid).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub node_uuid: String,
    /// The scheduler addresses the launcher dials, in order.
    pub scheduler: String,
    pub link: Link,
    /// READY, FULL or MAINTENANCE.
    pub status: &'static str,
    pub counts: Counts,
    /// One line, and when it happened.
    pub last_error: Option<(String, SystemTime)>,
}

/// Instances by state (an instance whose START is under way is pending).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub pending: usize,
    pub running: usize,
    pub exited: usize,
}

impl Counts {
    pub fn total(&self) -> usize {
        self.pending + self.running + self.exited
    }

    /// The count of `state` (`None`: not yet known, i.e. pending).
    fn of(&mut self, state: Option<InstanceState>) -> &mut usize {
        match state {
            None | Some(InstanceState::Pending) => &mut self.pending,
            Some(InstanceState::Running) => &mut self.running,
            Some(InstanceState::Exited) => &mut self.exited,
        }
    }

    pub fn add(&mut self, state: Option<InstanceState>) {
        *self.of(state) += 1;
    }

    pub fn remove(&mut self, state: Option<InstanceState>) {
        let n = self.of(state);
        *n = n.saturating_sub(1);
    }
}

/// Formats `t` as the file writes times: `<unix seconds> (<UTC>)`.
pub fn time_text(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let (y, m, d) = crate::logging::civil_from_days((secs / 86_400) as i64);
    let sod = secs % 86_400;
    format!(
        "{secs} ({y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC)",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

/// Makes `text` one line of at most 300 bytes (`MAX_ERROR`).
pub fn one_line(text: &str) -> String {
    let mut s: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.len() > MAX_ERROR {
        let mut cut = MAX_ERROR;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

impl Health {
    /// The file's text, as written at `written` by process `pid`.
    pub fn render(&self, written: SystemTime, pid: u32) -> String {
        let mut s = String::with_capacity(512);
        let yes_no = if self.link.connected { "yes" } else { "no" };
        // Writing into a String cannot fail.
        let _ = writeln!(
            s,
            "# ciao-launcher node status (read it with: ciao-lc node-status)"
        );
        let _ = writeln!(s, "written: {}", time_text(written));
        let _ = writeln!(s, "pid: {pid}");
        let _ = writeln!(s, "node-uuid: {}", self.node_uuid);
        let _ = writeln!(s, "scheduler: {}", self.scheduler);
        let _ = writeln!(s, "connected: {yes_no}");
        let _ = writeln!(s, "since: {}", time_text(self.link.since));
        let _ = writeln!(s, "status: {}", self.status);
        let _ = writeln!(s, "instances: {}", self.counts.total());
        let _ = writeln!(s, "pending: {}", self.counts.pending);
        let _ = writeln!(s, "running: {}", self.counts.running);
        let _ = writeln!(s, "exited: {}", self.counts.exited);
        match &self.last_error {
            None => {
                let _ = writeln!(s, "last-error: none");
            }
            Some((e, at)) => {
                let _ = writeln!(s, "last-error: {}", one_line(e));
                let _ = writeln!(s, "last-error-at: {}", time_text(*at));
            }
        }
        s
    }
}

/// What [`StatusFile::offer`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// The file already says this.
    Unchanged,
    /// Written (or the write failed: logged once, retried on the next change).
    Written,
    /// Too soon after the last write: offer again after this long.
    TooSoon(Duration),
}

/// The writer's side of the status file: what it holds and when it was
/// written (module docs, steps 2–4). Time comes in as an argument.
#[derive(Debug)]
pub struct StatusFile {
    path: PathBuf,
    on_disk: Option<Health>,
    last_write: Option<Instant>,
    /// The last write failed (so the next failure is not logged again).
    failing: bool,
}

impl StatusFile {
    pub fn new(data_dir: &Path) -> StatusFile {
        StatusFile {
            path: data_dir.join(FILE_NAME),
            on_disk: None,
            last_write: None,
            failing: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `h` unless the file says it already or the last write was
    /// less than [`MIN_INTERVAL`] before `now`.
    pub fn offer(&mut self, h: &Health, now: Instant) -> Offered {
        if self.on_disk.as_ref() == Some(h) {
            return Offered::Unchanged;
        }
        if let Some(last) = self.last_write {
            let since = now.saturating_duration_since(last);
            if since < MIN_INTERVAL {
                return Offered::TooSoon(MIN_INTERVAL - since);
            }
        }
        self.last_write = Some(now);
        let text = h.render(SystemTime::now(), std::process::id());
        match write_replacing(&self.path, text.as_bytes()) {
            Ok(()) => {
                self.failing = false;
                self.on_disk = Some(h.clone());
            }
            Err(e) => {
                if !self.failing {
                    warn!(
                        "{}: {e} (the status file is not kept up to date)",
                        self.path.display()
                    );
                }
                self.failing = true;
                // Tried again on the next change.
                self.on_disk = None;
            }
        }
        Offered::Written
    }
}

/// Writes `data` to a temporary file beside `path` and renames it over
/// `path`: a reader sees the old file or the new one, never a torn one.
fn write_replacing(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(data)?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Where threads note an error for the status file's `last-error` (the
/// overseer reads them). The default notes nothing.
#[derive(Debug, Clone, Default)]
pub struct ErrorNotes(Option<Sender<(String, SystemTime)>>);

impl ErrorNotes {
    /// A sender and the overseer's receiver.
    pub fn channel() -> (ErrorNotes, Receiver<(String, SystemTime)>) {
        let (tx, rx) = crossbeam_channel::bounded(ERROR_NOTES);
        (ErrorNotes(Some(tx)), rx)
    }

    /// Never blocks: a note that finds the queue full is dropped.
    pub fn note(&self, what: String) {
        if let Some(tx) = &self.0 {
            // Full (a flood of errors: the overseer has plenty to show) or
            // no overseer any more: nothing to do.
            let _ = tx.try_send((what, SystemTime::now()));
        }
    }
}

/// The status file as `ciao-lc node-status` reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    /// (key, value) in the file's order.
    pub fields: Vec<(String, String)>,
}

/// Why the status file could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// No file: no launcher has run on this data directory (or not yet).
    Absent(PathBuf),
    Io(PathBuf, io::Error),
    /// A line that is not `key: value`.
    Malformed {
        path: PathBuf,
        line: usize,
    },
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Absent(p) => write!(
                f,
                "{}: no status file (no ciao-launcher has run with this --data-dir, or it has not started yet)",
                p.display()
            ),
            ReadError::Io(p, e) => write!(f, "{}: {e}", p.display()),
            ReadError::Malformed { path, line } => {
                write!(f, "{}: line {line} is not \"key: value\"", path.display())
            }
        }
    }
}

impl std::error::Error for ReadError {}

impl StatusReport {
    /// Reads and parses `<data_dir>/status`.
    pub fn read(data_dir: &Path) -> Result<StatusReport, ReadError> {
        let path = data_dir.join(FILE_NAME);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ReadError::Absent(path)),
            Err(e) => return Err(ReadError::Io(path, e)),
        };
        StatusReport::parse(&text).map_err(|line| ReadError::Malformed { path, line })
    }

    /// Parses the file's text; the error is the 1-based number of a bad line.
    pub fn parse(text: &str) -> Result<StatusReport, usize> {
        let mut fields = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line.split_once(": ").ok_or(i + 1)?;
            if k.is_empty() || k.contains(char::is_whitespace) {
                return Err(i + 1);
            }
            fields.push((k.to_string(), v.to_string()));
        }
        Ok(StatusReport { fields })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A time field's Unix seconds.
    pub fn time(&self, key: &str) -> Option<SystemTime> {
        let secs = self
            .get(key)?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()?;
        Some(UNIX_EPOCH + Duration::from_secs(secs))
    }

    /// How long ago the file was written, seen at `now` (None: no valid
    /// `written`; zero if it lies in the future).
    pub fn age(&self, now: SystemTime) -> Option<Duration> {
        Some(
            now.duration_since(self.time("written")?)
                .unwrap_or_default(),
        )
    }
}

/// Whether process `pid` is a running ciao-launcher: its name in
/// `/proc/<pid>/stat` (the pid may have been reused), and not a zombie.
pub fn launcher_alive(proc_root: &Path, pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(proc_root.join(pid.to_string()).join("stat")) else {
        return false;
    };
    // "<pid> (<comm>) <state> …"; comm may itself hold ") ".
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return false;
    };
    let comm = stat.get(open + 1..close).unwrap_or("");
    let state = stat
        .get(close + 1..)
        .unwrap_or("")
        .split_whitespace()
        .next();
    comm == "ciao-launcher" && !matches!(state, Some("Z" | "X" | "x"))
}

/// Seconds as an operator reads them: `42 s`, `3 min 5 s`, `2 h 1 min`, `3 d 4 h`.
pub fn age_text(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        3600..=86_399 => format!("{} h {} min", s / 3600, s / 60 % 60),
        _ => format!("{} d {} h", s / 86_400, s / 3600 % 24),
    }
}

#[cfg(test)]
// In tests a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn health() -> Health {
        Health {
            node_uuid: "5f0c6a4e-0000-4000-8000-000000000001".into(),
            scheduler: "127.0.0.1:8888".into(),
            link: Link {
                connected: true,
                since: UNIX_EPOCH + Duration::from_secs(1_796_633_990),
            },
            status: "READY",
            counts: Counts {
                pending: 1,
                running: 2,
                exited: 0,
            },
            last_error: None,
        }
    }

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("ciao-health-{}", uuid::Uuid::new_v4()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn renders_and_parses_back() {
        let mut h = health();
        h.last_error = Some((
            "disconnected:\nreset".into(),
            UNIX_EPOCH + Duration::from_secs(86_400),
        ));
        let text = h.render(UNIX_EPOCH + Duration::from_secs(1_796_634_000), 42);
        let r = StatusReport::parse(&text).unwrap();
        assert_eq!(
            r.get("written"),
            Some("1796634000 (2026-12-07 09:00:00 UTC)")
        );
        assert_eq!(r.get("pid"), Some("42"));
        assert_eq!(r.get("connected"), Some("yes"));
        assert_eq!(r.get("instances"), Some("3"));
        assert_eq!(r.get("running"), Some("2"));
        assert_eq!(r.get("last-error"), Some("disconnected: reset"));
        assert_eq!(
            r.get("last-error-at"),
            Some("86400 (1970-01-02 00:00:00 UTC)")
        );
        let at = UNIX_EPOCH + Duration::from_secs(1_796_634_065);
        assert_eq!(r.age(at), Some(Duration::from_secs(65)));
        assert_eq!(age_text(Duration::from_secs(65)), "1 min 5 s");
        assert_eq!(StatusReport::parse("ok: 1\nbroken\n"), Err(2));
    }

    #[test]
    fn a_long_error_is_one_cut_line() {
        let long = "é".repeat(400);
        let l = one_line(&long);
        assert!(l.len() <= MAX_ERROR + '…'.len_utf8(), "{}", l.len());
        assert!(l.ends_with('…'));
    }

    /// Injected time: an unchanged state is never written; a change is
    /// written at once, then at most once per MIN_INTERVAL.
    #[test]
    fn written_on_change_at_most_once_a_second() {
        let d = dir();
        let mut f = StatusFile::new(&d);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut h = health();
        assert_eq!(f.offer(&h, at(0)), Offered::Written);
        let first = fs::read_to_string(f.path()).unwrap();
        assert!(first.contains("running: 2"), "{first}");
        assert_eq!(f.offer(&h, at(10)), Offered::Unchanged);
        assert_eq!(f.offer(&h, at(5000)), Offered::Unchanged);

        h.counts.running = 3;
        assert_eq!(f.offer(&h, at(5000)), Offered::Written);
        h.counts.running = 4;
        assert_eq!(
            f.offer(&h, at(5300)),
            Offered::TooSoon(Duration::from_millis(700))
        );
        // Not written yet: the file still says 3.
        assert!(fs::read_to_string(f.path()).unwrap().contains("running: 3"));
        assert_eq!(f.offer(&h, at(6000)), Offered::Written);
        assert!(fs::read_to_string(f.path()).unwrap().contains("running: 4"));
        // No temporary file is left beside it.
        let names: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(FILE_NAME)]);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_failed_write_is_tried_again_on_the_next_offer() {
        let d = dir();
        let mut f = StatusFile::new(&d.join("missing"));
        let t0 = Instant::now();
        let h = health();
        assert_eq!(f.offer(&h, t0), Offered::Written);
        assert!(!f.path().exists());
        fs::create_dir(d.join("missing")).unwrap();
        assert_eq!(
            f.offer(&h, t0 + MIN_INTERVAL),
            Offered::Written,
            "same state, but not on disk yet"
        );
        assert!(f.path().exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn absent_file_is_a_clear_error() {
        let d = dir();
        let e = StatusReport::read(&d).unwrap_err();
        assert!(matches!(e, ReadError::Absent(_)));
        assert!(e.to_string().contains("no status file"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn error_notes_never_block() {
        let (notes, rx) = ErrorNotes::channel();
        for i in 0..ERROR_NOTES + 10 {
            notes.note(format!("e{i}"));
        }
        assert_eq!(rx.len(), ERROR_NOTES);
        drop(rx);
        notes.note("after the reader went".into());
        ErrorNotes::default().note("nobody listens".into());
    }
}
