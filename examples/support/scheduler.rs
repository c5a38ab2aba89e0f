//! Shared by the benchmarks: an in-process SSNTP scheduler over TLS on
//! 127.0.0.1, with ciao-style certificates written into `dir` (`ca.pem` for
//! `-cacert`, `agent.pem` for `-cert`).

use std::fs;
use std::path::Path;

use ciao_launcher::ssntp::certgen::{self, CertSpec};
use ciao_launcher::ssntp::server::{Server, ServerConfig};
use ciao_launcher::ssntp::{Profile, Role, tls};

pub fn scheduler(dir: &Path, profile: Profile) -> Result<Server, String> {
    let mut spec = CertSpec::new(Role::SCHEDULER);
    spec.is_ca = true;
    let (ca, ca_cert) = certgen::self_signed_ca(&spec).map_err(|e| e.to_string())?;
    let agent = certgen::issue(&ca, &CertSpec::new(Role::AGENT)).map_err(|e| e.to_string())?;
    fs::write(dir.join("ca.pem"), &ca_cert.cert_pem).map_err(|e| e.to_string())?;
    fs::write(dir.join("agent.pem"), agent.combined_pem()).map_err(|e| e.to_string())?;
    let sid = tls::identity_from_pem(ca_cert.combined_pem().as_bytes(), "ca")
        .map_err(|e| e.to_string())?;
    let listen = "127.0.0.1:0".parse().map_err(|_| "address")?;
    let mut cfg = ServerConfig::new(
        sid,
        vec![ca_cert.der.clone()],
        *uuid::Uuid::new_v4().as_bytes(),
        listen,
    );
    cfg.profile = profile;
    Server::start(cfg).map_err(|e| e.to_string())
}

/// Starts the launcher at `path` against `server`, with the certificates
/// [`scheduler`] wrote into `dir`, its data in `dir/data`, no FULL
/// thresholds, the given profile, and `extra` flags. It logs to standard
/// error: into the file `log` if given, else shown with `BENCH_DEBUG=1`.
pub fn spawn_launcher(
    path: &Path,
    dir: &Path,
    server: &Server,
    profile: Profile,
    extra: &[&str],
    log: Option<&Path>,
) -> Result<std::process::Child, String> {
    use std::process::{Command, Stdio};
    let mut cmd = Command::new(path);
    // The launcher gets a session of its own, as a daemon has: the scheduler
    // in this process stands for another machine, and with the kernel's
    // autogroups one session's threads share one CPU share, so the two
    // would compete for it (the bare runs of the QEMU benchmark do not
    // share theirs with a scheduler).
    ciao_launcher::virt::qemu::own_session(&mut cmd);
    cmd.arg("-cacert")
        .arg(dir.join("ca.pem"))
        .arg("-cert")
        .arg(dir.join("agent.pem"))
        .arg(format!("-server={}", server.local_addr()))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--disk-limit=false", "--mem-limit=false", "-logtostderr"])
        .args(["--protocol", profile.name()])
        .args(extra)
        // BENCH_DEBUG: the launcher's debug log on standard error.
        .args(if std::env::var_os("BENCH_DEBUG").is_some() {
            &["-v", "2"][..]
        } else {
            &[]
        })
        .stderr(match log {
            Some(p) => {
                Stdio::from(fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?)
            }
            None if std::env::var_os("BENCH_DEBUG").is_some() => Stdio::inherit(),
            None => Stdio::null(),
        })
        .spawn()
        .map_err(|e| format!("{}: {e}", path.display()))
}
