//! `ciao-lc node-status`: prints the launcher's status file
//! (`<data-dir>/status`, see `crate::health`) on the node itself, without the
//! scheduler: how old it is, whether the launcher that wrote it still runs,
//! then every field as written.

use std::path::Path;
use std::time::SystemTime;

use crate::health::{self, StatusReport};

use super::LcExit;

/// Prints the report of `data_dir`; a missing or unreadable file is one line
/// on standard error and [`LcExit::Failed`].
pub fn node_status(data_dir: &Path) -> LcExit {
    match StatusReport::read(data_dir) {
        Ok(r) => {
            print!("{}", render(&r, SystemTime::now(), Path::new("/proc")));
            LcExit::Ok
        }
        Err(e) => {
            eprintln!("ciao-lc node-status: {e}");
            LcExit::Failed
        }
    }
}

/// The text printed: `age:` and `launcher:` first, then the file's fields.
pub fn render(r: &StatusReport, now: SystemTime, proc_root: &Path) -> String {
    let mut out = String::new();
    match r.age(now) {
        Some(a) => out.push_str(&format!("age: {}\n", health::age_text(a))),
        None => out.push_str("age: unknown (no valid \"written\" line)\n"),
    }
    let launcher = match r.get("pid").and_then(|p| p.parse::<u32>().ok()) {
        Some(pid) if health::launcher_alive(proc_root, pid) => format!("running (pid {pid})"),
        Some(pid) => format!("not running (pid {pid} is gone: this is what it last wrote)"),
        None => "unknown (no pid in the file)".to_string(),
    };
    out.push_str(&format!("launcher: {launcher}\n"));
    for (k, v) in &r.fields {
        out.push_str(&format!("{k}: {v}\n"));
    }
    out
}

#[cfg(test)]
// In tests a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn says_how_old_and_whether_the_writer_runs() {
        let proc_root = std::env::temp_dir().join(format!("ciao-proc-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(proc_root.join("77")).unwrap();
        std::fs::write(proc_root.join("77/stat"), "77 (ciao-launcher) S 1 77\n").unwrap();
        let text = "# c\nwritten: 1000 (1970-01-01 00:16:40 UTC)\npid: 77\nconnected: yes\n";
        let r = StatusReport::parse(text).unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1042);
        let out = render(&r, now, &proc_root);
        assert_eq!(
            out,
            "age: 42 s\nlauncher: running (pid 77)\nwritten: 1000 (1970-01-01 00:16:40 UTC)\npid: 77\nconnected: yes\n"
        );
        for other in ["77 (bash) S 1 77\n", "77 (ciao-launcher) Z 1 77\n"] {
            std::fs::write(proc_root.join("77/stat"), other).unwrap();
            assert!(render(&r, now, &proc_root).contains("launcher: not running (pid 77 is gone"));
        }
        std::fs::remove_dir_all(&proc_root).unwrap();
    }
}
