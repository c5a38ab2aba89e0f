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

use std::fs::File;
use std::io::{self, Write};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{LevelFilter, Log, Metadata, Record};

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

    /// Installs this logger; `false` if one was already installed (tests),
    /// which is then kept.
    pub fn install(self) -> bool {
        let max = self.max_level();
        if log::set_boxed_logger(Box::new(self)).is_err() {
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
        let line = format_line(record, SystemTime::now());
        if let Some((_, file)) = to_file {
            let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
            let _ = f.write_all(line.as_bytes());
        }
        if to_stderr {
            let _ = io::stderr().lock().write_all(line.as_bytes());
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

/// One line, newline included.
pub fn format_line(record: &Record, now: SystemTime) -> String {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (_, month, day) = civil_from_days((secs / 86_400) as i64);
    let sod = secs % 86_400;
    let thread = std::thread::current();
    let name = match thread.name() {
        Some(n) => n.to_string(),
        None => nix::unistd::gettid().to_string(),
    };
    let file = record
        .file()
        .map(|f| f.rsplit('/').next().unwrap_or(f))
        .unwrap_or("?");
    format!(
        "{}{month:02}{day:02} {:02}:{:02}:{:02}.{:06} {name} {file}:{}] {}\n",
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
fn civil_from_days(z: i64) -> (i64, u32, u32) {
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

/// Logs to standard error only (`ciao-lc`). A second call is a no-op.
pub fn to_stderr(level: LevelFilter) {
    GlogLogger::new(None, level).install();
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
