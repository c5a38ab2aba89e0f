//! Logging in glog's shape, on the `log` facade:
//!
//! ```text
//! I1207 02:15:00.123456 overseer overseer.rs:212] instance 5f0c… running
//! ```
//!
//! a severity letter (`E` error, `W` warning, `I` info, and, where glog has
//! only its `-v` levels, `D` debug and `T` trace), the month and day, the
//! UTC time with a fixed six-digit fraction, the thread's name (`ssntp-io`,
//! `instance-1a2b3c4d`, …; its kernel id when unnamed), the source file and
//! line, `]` and the message. Each line is one `write(2)` to each
//! destination, so lines from different threads never interleave.
//!
//! [`init`] is the one set-up of both binaries: `ciao-launcher` logs to a
//! file and standard error as glog's flags say, `ciao-lc` to standard error.
//!
//! Repeated lines are rate-limited ([`RateLimited`]): of identical lines
//! (same level, thread and text) at most [`BURST`] are written per
//! [`WINDOW`]; the rest are counted, and once the window is over one line
//! says how many were left out ("last message repeated N times …"), the
//! way syslog does. Identical lines need not follow each other: a
//! connect/disconnect loop alternates two of them. A peer that makes the
//! launcher fail the same way over and over thus costs a few lines a minute,
//! not a gigabyte a day.
//!
//! Logging allocates nothing for an ordinary line: a line is formatted into
//! a buffer on the stack (the heap only for a line longer than
//! [`STACK_LINE`]), and the rate limit keys lines by a 64-bit hash, keeping
//! a line's text only once a repetition of it is left out. Instance threads
//! log from START paths, and every chunk a thread frees stays in its glibc
//! cache for as long as it lives.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::cli::LogConfig;

/// Where lines go and from which level.
#[derive(Debug)]
pub struct GlogLogger {
    /// The log file and its level.
    file: Option<(LevelFilter, Mutex<File>)>,
    stderr: LevelFilter,
}

impl GlogLogger {
    pub fn new(file: Option<(LevelFilter, File)>, stderr: LevelFilter) -> GlogLogger {
        GlogLogger {
            file: file.map(|(l, f)| (l, Mutex::new(f))),
            stderr,
        }
    }

    fn max_level(&self) -> LevelFilter {
        self.file
            .as_ref()
            .map_or(LevelFilter::Off, |(l, _)| *l)
            .max(self.stderr)
    }

    /// Installs this logger behind the rate limit; `false` if one was
    /// already installed (tests), which is then kept.
    pub fn install(self) -> bool {
        let max = self.max_level();
        if log::set_boxed_logger(Box::new(RateLimited::new(self))).is_err() {
            return false;
        }
        log::set_max_level(max);
        true
    }
}

impl Log for GlogLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.max_level()
    }

    fn log(&self, record: &Record) {
        let level = record.level();
        let to_file = self.file.as_ref().filter(|(l, _)| level <= *l);
        let to_stderr = level <= self.stderr;
        if to_file.is_none() && !to_stderr {
            return;
        }
        let now = SystemTime::now();
        let mut stack = StackLine::default();
        let long;
        let line = if write_line(&mut stack, record, now).is_ok() {
            stack.bytes()
        } else {
            long = format_line(record, now);
            long.as_bytes()
        };
        if let Some((_, file)) = to_file {
            let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
            let _ = f.write_all(line);
        }
        if to_stderr {
            let _ = io::stderr().lock().write_all(line);
        }
    }

    fn flush(&self) {
        if let Some((_, file)) = &self.file {
            let _ = file.lock().unwrap_or_else(|p| p.into_inner()).flush();
        }
    }
}

/// The severity letter of `level`.
pub fn letter(level: log::Level) -> char {
    match level {
        log::Level::Error => 'E',
        log::Level::Warn => 'W',
        log::Level::Info => 'I',
        log::Level::Debug => 'D',
        log::Level::Trace => 'T',
    }
}

/// Longest line formatted on the stack.
pub const STACK_LINE: usize = 256;

/// A line being formatted on the stack; writing past [`STACK_LINE`] fails.
struct StackLine {
    buf: [u8; STACK_LINE],
    len: usize,
}

impl Default for StackLine {
    fn default() -> Self {
        StackLine {
            buf: [0; STACK_LINE],
            len: 0,
        }
    }
}

impl StackLine {
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl fmt::Write for StackLine {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        let room = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        room.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// The calling thread's name, or its kernel id when unnamed.
struct ThreadName(std::thread::Thread);

impl fmt::Display for ThreadName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "{}", nix::unistd::gettid()),
        }
    }
}

/// One line, newline included.
pub fn format_line(record: &Record, now: SystemTime) -> String {
    let mut line = String::new();
    // Writing to a String cannot fail.
    let _ = write_line(&mut line, record, now);
    line
}

/// Writes one line, newline included, to `out`.
fn write_line(out: &mut impl fmt::Write, record: &Record, now: SystemTime) -> fmt::Result {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (_, month, day) = civil_from_days((secs / 86_400) as i64);
    let sod = secs % 86_400;
    let name = ThreadName(std::thread::current());
    let file = record
        .file()
        .map(|f| f.rsplit('/').next().unwrap_or(f))
        .unwrap_or("?");
    writeln!(
        out,
        "{}{month:02}{day:02} {:02}:{:02}:{:02}.{:06} {name} {file}:{}] {}",
        letter(record.level()),
        sod / 3600,
        sod / 60 % 60,
        sod % 60,
        since.subsec_micros(),
        record.line().unwrap_or(0),
        record.args()
    )
}

/// (year, month, day) of a day counted from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, proleptic Gregorian).
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The log file could not be opened.
#[derive(Debug)]
pub struct LoggingError {
    pub path: PathBuf,
    pub source: io::Error,
}

impl std::fmt::Display for LoggingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.source)
    }
}

impl std::error::Error for LoggingError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// The one logging set-up of both binaries, glog's behaviour: a log file in
/// the log directory, and on standard error what reaches the threshold
/// (everything with `-logtostderr`, which also disables the file). Lines in
/// glog's shape, identical lines rate-limited. `ciao-lc` asks for standard
/// error only ([`LogConfig::stderr_only`]). A second call keeps the first
/// logger (tests start several launchers in one process).
pub fn init(log: &LogConfig) -> Result<(), LoggingError> {
    let file = if log.logtostderr {
        None
    } else {
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LoggingError { path, source }
        };
        fs::create_dir_all(&log.dir).map_err(err(&log.dir))?;
        let path = log.dir.join(LOG_FILE);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(err(&path))?;
        Some((log.verbosity, file))
    };
    let stderr_level = if log.logtostderr || log.alsologtostderr {
        log.verbosity
    } else {
        log.verbosity.min(log.stderr_threshold)
    };
    GlogLogger::new(file, stderr_level).install();
    Ok(())
}

/// The log file's name in the log directory.
pub const LOG_FILE: &str = "ciao-launcher.log";

/// Identical lines written per window before the rest are only counted.
pub const BURST: u32 = 5;
/// The rate limit's window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Distinct lines remembered at once; beyond that the oldest is forgotten
/// (its count, if any, written first).
const MAX_KEYS: usize = 256;

/// The time source of [`RateLimited`] (injected in tests).
pub type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

/// A line's identity: a 64-bit hash of its level, target, thread and text,
/// made without formatting the text into memory. (Two different lines
/// with the same hash would share one count: a chance of 2⁻⁶⁴ per pair.)
type Key = u64;

fn key_of(record: &Record<'_>) -> Key {
    /// Feeds formatted text to the hasher as it is produced.
    struct Feed<'a>(&'a mut DefaultHasher);
    impl fmt::Write for Feed<'_> {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            self.0.write(s.as_bytes());
            Ok(())
        }
    }
    let mut h = DefaultHasher::new();
    record.level().hash(&mut h);
    record.target().hash(&mut h);
    std::thread::current().name().hash(&mut h);
    let _ = fmt::write(&mut Feed(&mut h), *record.args());
    h.finish()
}

/// What a summary line repeats: kept once a repetition is left out.
#[derive(Debug)]
struct Sample {
    level: Level,
    target: String,
    thread: String,
    text: String,
}

impl Sample {
    fn of(record: &Record<'_>) -> Box<Sample> {
        Box::new(Sample {
            level: record.level(),
            target: record.target().to_owned(),
            thread: std::thread::current()
                .name()
                .unwrap_or("unnamed")
                .to_owned(),
            text: record.args().to_string(),
        })
    }
}

#[derive(Debug)]
struct Entry {
    window_start: Instant,
    /// Lines of this key in the current window, written or not.
    seen: u32,
    suppressed: u64,
    /// Order of first sight, to forget the oldest.
    order: u64,
    /// The line, from its first left-out repetition on.
    sample: Option<Box<Sample>>,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<Key, Entry>,
    next_order: u64,
    last_sweep: Option<Instant>,
}

/// A logger that rate-limits identical lines in front of another (module doc).
pub struct RateLimited<L> {
    inner: L,
    state: Mutex<State>,
    clock: Clock,
    burst: u32,
    window: Duration,
}

impl<L> std::fmt::Debug for RateLimited<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimited")
            .field("burst", &self.burst)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl<L: Log> RateLimited<L> {
    /// [`BURST`] lines per [`WINDOW`], on the monotonic clock.
    pub fn new(inner: L) -> Self {
        Self::with_clock(inner, BURST, WINDOW, Arc::new(Instant::now))
    }

    pub fn with_clock(inner: L, burst: u32, window: Duration, clock: Clock) -> Self {
        RateLimited {
            inner,
            state: Mutex::new(State::default()),
            clock,
            burst,
            window,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the map consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The line that stands for `n` left-out repetitions of `sample`.
    fn summary(&self, sample: Option<Box<Sample>>, n: u64) {
        let Some(s) = sample.filter(|_| n > 0) else {
            return;
        };
        self.inner.log(
            &Record::builder()
                .level(s.level)
                .target(&s.target)
                .args(format_args!(
                    "last message repeated {n} times in {}s ({}): {}",
                    self.window.as_secs(),
                    s.thread,
                    s.text
                ))
                .build(),
        );
    }

    /// Writes the counts of windows that are over (all of them if `all`).
    fn sweep(&self, st: &mut State, now: Instant, all: bool) {
        let window = self.window;
        let mut due: Vec<(Option<Box<Sample>>, u64)> = Vec::new();
        st.entries.retain(|_, e| {
            let over = now.saturating_duration_since(e.window_start) >= window;
            if (over || all) && e.suppressed > 0 {
                due.push((e.sample.take(), std::mem::take(&mut e.suppressed)));
            }
            !over && !all
        });
        for (sample, n) in due {
            self.summary(sample, n);
        }
        st.last_sweep = Some(now);
    }

    /// Whether to write `record` (whose key is `key`) now, counting it
    /// either way.
    fn admit(&self, key: Key, record: &Record<'_>, now: Instant) -> bool {
        let mut st = self.lock();
        if st
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
        {
            self.sweep(&mut st, now, false);
        }
        if let Some(e) = st.entries.get_mut(&key) {
            if now.saturating_duration_since(e.window_start) < self.window {
                e.seen = e.seen.saturating_add(1);
                if e.seen > self.burst {
                    if e.sample.is_none() {
                        e.sample = Some(Sample::of(record));
                    }
                    e.suppressed += 1;
                    return false;
                }
                return true;
            }
            let n = std::mem::take(&mut e.suppressed);
            let sample = e.sample.take();
            e.window_start = now;
            e.seen = 1;
            self.summary(sample, n);
            return true;
        }
        if st.entries.len() >= MAX_KEYS {
            let oldest = st
                .entries
                .iter()
                .min_by_key(|(_, e)| e.order)
                .map(|(&k, _)| k);
            if let Some(e) = oldest.and_then(|k| st.entries.remove(&k)) {
                self.summary(e.sample, e.suppressed);
            }
        }
        let order = st.next_order;
        st.next_order += 1;
        st.entries.insert(
            key,
            Entry {
                window_start: now,
                seen: 1,
                suppressed: 0,
                order,
                sample: None,
            },
        );
        true
    }
}

impl<L: Log> Log for RateLimited<L> {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.inner.enabled(record.metadata()) {
            return;
        }
        if self.admit(key_of(record), record, (self.clock)()) {
            self.inner.log(record);
        }
    }

    /// Writes every pending count, then flushes the inner logger (the
    /// launcher does so at exit).
    fn flush(&self) {
        {
            let mut st = self.lock();
            let now = (self.clock)();
            self.sweep(&mut st, now, true);
        }
        self.inner.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn days_to_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(59), (1970, 3, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_794), (2026, 12, 7));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn lines_have_glogs_shape() {
        let at = UNIX_EPOCH + Duration::from_nanos(1_796_609_700_000_042_999);
        let line = std::thread::Builder::new()
            .name("overseer".into())
            .spawn(move || {
                format_line(
                    &Record::builder()
                        .level(log::Level::Warn)
                        .file(Some("src/virt/qemu.rs"))
                        .line(Some(42))
                        .args(format_args!("a message"))
                        .build(),
                    at,
                )
            })
            .expect("thread")
            .join()
            .expect("join");
        assert_eq!(
            line,
            "W1207 02:15:00.000042 overseer qemu.rs:42] a message\n"
        );
    }

    #[test]
    fn lines_past_the_stack_buffer_are_written_whole() {
        let path = std::env::temp_dir().join(format!("ciao-log-{}", std::process::id()));
        let file = File::create(&path).expect("log file");
        let logger = GlogLogger::new(Some((LevelFilter::Info, file)), LevelFilter::Off);
        let short = "s".repeat(10);
        let long = "l".repeat(STACK_LINE * 3);
        for text in [&short, &long] {
            logger.log(
                &Record::builder()
                    .level(log::Level::Info)
                    .args(format_args!("{text}"))
                    .build(),
            );
        }
        let written = fs::read_to_string(&path).expect("read log");
        let _ = fs::remove_file(&path);
        let lines: Vec<&str> = written.lines().collect();
        assert_eq!(lines.len(), 2, "{written}");
        assert!(lines[0].ends_with(&format!("] {short}")), "{written}");
        assert!(lines[1].ends_with(&format!("] {long}")), "{written}");
    }

    #[test]
    fn every_level_has_its_letter() {
        let letters: String = [
            log::Level::Error,
            log::Level::Warn,
            log::Level::Info,
            log::Level::Debug,
            log::Level::Trace,
        ]
        .into_iter()
        .map(letter)
        .collect();
        assert_eq!(letters, "EWIDT");
    }
}

#[cfg(test)]
mod rate_limit_tests {
    use super::*;

    /// Collects what reaches it.
    #[derive(Default, Clone)]
    struct Sink(Arc<Mutex<Vec<String>>>);

    impl Log for Sink {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn log(&self, r: &Record<'_>) {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(format!("{} {}", r.level(), r.args()));
        }
        fn flush(&self) {}
    }

    impl Sink {
        fn lines(&self) -> Vec<String> {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
        }
    }

    fn line(l: &RateLimited<Sink>, level: Level, text: &str) {
        l.log(
            &Record::builder()
                .level(level)
                .target("t")
                .args(format_args!("{text}"))
                .build(),
        );
    }

    /// A clock the test moves by hand.
    fn clock() -> (Clock, Arc<Mutex<Instant>>) {
        let now = Arc::new(Mutex::new(Instant::now()));
        let read = Arc::clone(&now);
        let clock: Clock = Arc::new(move || *read.lock().unwrap_or_else(|p| p.into_inner()));
        (clock, now)
    }

    fn advance(now: &Mutex<Instant>, d: Duration) {
        let mut t = now.lock().unwrap_or_else(|p| p.into_inner());
        *t += d;
    }

    #[test]
    fn a_storm_of_identical_lines_is_counted_not_written() {
        let sink = Sink::default();
        let (clock, now) = clock();
        let l = RateLimited::with_clock(sink.clone(), 5, Duration::from_secs(60), clock);
        // A reconnect loop: two lines alternating, 1 000 times in 50 s.
        for _ in 0..1000 {
            line(&l, Level::Info, "SSNTP connected to 127.0.0.1:8888");
            line(
                &l,
                Level::Warn,
                "SSNTP disconnected: gob: zero-length message",
            );
            advance(&now, Duration::from_millis(50));
        }
        let lines = sink.lines();
        assert_eq!(lines.len(), 10, "{lines:?}");
        // A different line still gets through at once.
        line(&l, Level::Error, "something else");
        assert_eq!(sink.lines().len(), 11);
        // The window ends: each count is written once, then lines flow again.
        advance(&now, Duration::from_secs(11));
        line(
            &l,
            Level::Warn,
            "SSNTP disconnected: gob: zero-length message",
        );
        let lines = sink.lines();
        let summary = |level: &str, text: &str| {
            lines.iter().any(|s| {
                s.starts_with(&format!("{level} last message repeated 995 times in 60s ("))
                    && s.ends_with(text)
            })
        };
        assert!(
            summary("WARN", "): SSNTP disconnected: gob: zero-length message"),
            "{lines:?}"
        );
        assert!(
            summary("INFO", "): SSNTP connected to 127.0.0.1:8888"),
            "{lines:?}"
        );
        assert_eq!(
            lines.last().map(String::as_str),
            Some("WARN SSNTP disconnected: gob: zero-length message")
        );
        assert_eq!(lines.len(), 14, "{lines:?}");
    }

    #[test]
    fn counts_are_written_at_flush_and_bursts_pass() {
        let sink = Sink::default();
        let (clock, now) = clock();
        let l = RateLimited::with_clock(sink.clone(), 3, Duration::from_secs(60), clock);
        for _ in 0..3 {
            line(&l, Level::Info, "a few");
        }
        assert_eq!(sink.lines().len(), 3, "a burst passes whole");
        for _ in 0..7 {
            line(&l, Level::Info, "a few");
        }
        assert_eq!(sink.lines().len(), 3);
        advance(&now, Duration::from_secs(1));
        l.flush();
        let last = sink.lines().last().cloned().unwrap_or_default();
        assert!(
            last.starts_with("INFO last message repeated 7 times in 60s (")
                && last.ends_with("): a few"),
            "{last}"
        );
        // Nothing pending any more: a second flush writes nothing.
        l.flush();
        assert_eq!(sink.lines().len(), 4);
    }

    #[test]
    fn distinct_lines_beyond_the_memory_are_forgotten_oldest_first() {
        let sink = Sink::default();
        let (clock, _now) = clock();
        let l = RateLimited::with_clock(sink.clone(), 1, Duration::from_secs(60), clock);
        line(&l, Level::Info, "first");
        line(&l, Level::Info, "first");
        for i in 0..MAX_KEYS {
            line(&l, Level::Info, &format!("line {i}"));
        }
        let lines = sink.lines();
        assert!(
            lines
                .iter()
                .any(|s| s.starts_with("INFO last message repeated 1 times")
                    && s.ends_with("): first")),
            "{:?}",
            &lines[..3]
        );
        // Forgotten, so written again.
        line(&l, Level::Info, "first");
        assert_eq!(sink.lines().last().map(String::as_str), Some("INFO first"));
    }
}
