//! Log set-up with `log` + `simplelog` (UTC timestamps, no colour). Every line
//! names its thread (`ssntp-io`, `instance-1a2b3c4d`, …).

use log::LevelFilter;
use simplelog::{ConfigBuilder, ThreadLogMode, WriteLogger};

/// Logs to standard error. A second call is a no-op.
pub fn to_stderr(level: LevelFilter) {
    let config = ConfigBuilder::new()
        // "Error and more verbose": every line carries its thread's name.
        .set_thread_level(LevelFilter::Error)
        .set_thread_mode(ThreadLogMode::Names)
        .build();
    let _ = WriteLogger::init(level, config, std::io::stderr());
}
