//! `ciao-lc`, the operator's companion tool: makes ciao-style certificates
//! and runs an embedded SSNTP scheduler that shows what a launcher sends.
//!
//! `serve` threads: main (waits for a signal), `signals` (signal-hook →
//! channel), `lc-events` (prints server events), plus the SSNTP server's own
//! accept and connection threads.

use std::ffi::OsString;
use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::thread;

use clap::{Parser, Subcommand};
use crossbeam_channel::select;

use crate::ssntp::certgen::{self, CertSpec};
use crate::ssntp::server::{Server, ServerConfig, ServerEvent};
use crate::ssntp::{Profile, Role, tls};

/// Exit codes of `ciao-lc`.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LcExit {
    Ok = 0,
    /// Command-line error (clap uses 2 as well).
    Usage = 2,
    /// Certificates could not be written or read.
    Certs = 3,
    /// The server could not start (address in use, …).
    Serve = 4,
}

impl From<LcExit> for ExitCode {
    fn from(e: LcExit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}

/// The operator's companion for ciao-launcher: certificates and an embedded SSNTP scheduler.
#[derive(Debug, Parser)]
#[command(name = "ciao-lc", version, about)]
pub struct LcCli {
    #[command(subcommand)]
    pub command: LcCommand,
}

#[derive(Debug, Subcommand)]
pub enum LcCommand {
    /// Create a CA (the scheduler's certificate, as ciao makes it) and launcher certificates.
    Certs {
        /// Directory to write into (created; existing files are never overwritten).
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Organisation name in the certificates' subject.
        #[arg(long, default_value = "ciao")]
        org: String,
        /// DNS names for the scheduler certificate (launchers dial them).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// IP addresses for the scheduler certificate (launchers dial them first).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
    },
    /// Run the embedded SSNTP scheduler and print every connection and frame.
    Serve {
        /// Directory made by `ciao-lc certs`.
        #[arg(long, default_value = "certs")]
        certs: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8888")]
        listen: SocketAddr,
        /// Protocol profile used to name operands.
        #[arg(long, default_value = "2016")]
        protocol: Profile,
        /// Cluster configuration YAML sent in CONNECTED.
        #[arg(long)]
        configuration: Option<PathBuf>,
    },
}

/// Entry point of the `ciao-lc` binary.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = match LcCli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                LcExit::Usage.into()
            } else {
                LcExit::Ok.into()
            };
        }
    };
    crate::logging::to_stderr(log::LevelFilter::Info);
    match cli.command {
        LcCommand::Certs {
            dir,
            org,
            hosts,
            ips,
        } => certs(&dir, &org, hosts, ips),
        LcCommand::Serve {
            certs,
            listen,
            protocol,
            configuration,
        } => serve(&certs, listen, protocol, configuration),
    }
    .into()
}

/// File names inside a certificate directory.
pub const CA_FILE: &str = "CAcert.pem";
pub const SCHEDULER_FILE: &str = "cert-Scheduler.pem";
pub const AGENT_FILE: &str = "cert-CNAgent.pem";
pub const NETAGENT_FILE: &str = "cert-NetworkingAgent.pem";

fn certs(dir: &Path, org: &str, hosts: Vec<String>, ips: Vec<IpAddr>) -> LcExit {
    let result = (|| -> Result<(), String> {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut spec = CertSpec::new(Role::SCHEDULER);
        spec.org = org.to_string();
        spec.is_ca = true;
        spec.dns = hosts;
        spec.ips = ips;
        let (ca, ca_cert) = certgen::self_signed_ca(&spec).map_err(|e| e.to_string())?;
        let ca_path = dir.join(CA_FILE);
        write_new(&ca_path, ca_cert.cert_pem.as_bytes())?;
        write_new(&dir.join(SCHEDULER_FILE), ca_cert.combined_pem().as_bytes())?;
        for (role, file) in [(Role::AGENT, AGENT_FILE), (Role::NETAGENT, NETAGENT_FILE)] {
            let mut s = CertSpec::new(role);
            s.org = org.to_string();
            let issued = certgen::issue(&ca, &s).map_err(|e| e.to_string())?;
            write_new(&dir.join(file), issued.combined_pem().as_bytes())?;
        }
        println!(
            "wrote {CA_FILE}, {SCHEDULER_FILE}, {AGENT_FILE} and {NETAGENT_FILE} in {}",
            dir.display()
        );
        Ok(())
    })();
    match result {
        Ok(()) => LcExit::Ok,
        Err(e) => {
            eprintln!("ciao-lc certs: {e}");
            LcExit::Certs
        }
    }
}

fn write_new(path: &Path, data: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn serve(
    dir: &Path,
    listen: SocketAddr,
    profile: Profile,
    configuration: Option<PathBuf>,
) -> LcExit {
    let loaded = (|| -> Result<_, String> {
        let ca = tls::load_ca(&dir.join(CA_FILE)).map_err(|e| e.to_string())?;
        let id = tls::load_identity(&dir.join(SCHEDULER_FILE)).map_err(|e| e.to_string())?;
        let conf = match &configuration {
            Some(p) => fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?,
            None => Vec::new(),
        };
        Ok((ca, id, conf))
    })();
    let (ca, id, conf) = match loaded {
        Ok(x) => x,
        Err(e) => {
            eprintln!("ciao-lc serve: {e}");
            return LcExit::Certs;
        }
    };
    let mut cfg = ServerConfig::new(id, ca, *uuid::Uuid::new_v4().as_bytes(), listen);
    cfg.profile = profile;
    cfg.configuration = conf;
    let server = match Server::start(cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ciao-lc serve: cannot serve on {listen}: {e}");
            return LcExit::Serve;
        }
    };
    println!(
        "ciao-lc: SSNTP scheduler {} listening on {}",
        uuid::Uuid::from_bytes(server.uuid()),
        server.local_addr()
    );
    let signals = match crate::signals::spawn() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ciao-lc serve: signals: {e}");
            return LcExit::Serve;
        }
    };
    let events = server.events().clone();
    let printer = thread::Builder::new()
        .name("lc-events".into())
        .spawn(move || {
            for ev in events.iter() {
                println!("{}", describe(profile, &ev));
            }
        });
    select! {
        recv(signals.done) -> _ => {}
    }
    server.stop();
    drop(signals);
    if let Ok(p) = printer {
        let _ = p.join();
    }
    LcExit::Ok
}

/// One line per server event.
pub fn describe(profile: Profile, ev: &ServerEvent) -> String {
    let id = |u: &[u8; 16]| uuid::Uuid::from_bytes(*u).to_string();
    match ev {
        ServerEvent::Connected { uuid, role, peer } => {
            format!(
                "connected    {} {role} from {}",
                id(uuid),
                peer.map_or_else(|| "?".into(), |p| p.to_string())
            )
        }
        ServerEvent::Disconnected { uuid, reason, .. } => {
            format!("disconnected {} ({reason})", id(uuid))
        }
        ServerEvent::Rejected { peer, error } => {
            format!(
                "rejected     {}: {error}",
                peer.map_or_else(|| "?".into(), |p| p.to_string())
            )
        }
        ServerEvent::Frame { uuid, frame } => {
            let op = profile
                .frame_operation(frame)
                .map_or_else(|e| e.to_string(), |o| o.to_string());
            let payload = String::from_utf8_lossy(&frame.payload);
            format!(
                "frame        {} {op} ({} bytes)\n{}",
                id(uuid),
                frame.payload.len(),
                payload.trim_end()
            )
        }
    }
}
