//! The `ciao-launcher` main thread.
//!
//! At this stage the daemon is the SSNTP agent only: it loads its
//! certificate, keeps its node UUID, connects to the scheduler (reconnecting
//! as needed) and logs what it receives. Instance management (server,
//! overseer and instance threads) is not built yet.
//!
//! Threads: main (this module: waits for the first signal or a fatal client
//! event), `signals`, and the SSNTP client's `ssntp-io`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use crossbeam_channel::select;
use log::{error, info, warn};

use crate::ssntp::client::{self, Client, ClientConfig, ClientEvent};
use crate::ssntp::{Profile, Role, tls};

/// Exit codes of `ciao-launcher` (documented in the man page).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LauncherExit {
    Ok = 0,
    /// Bad command line.
    Usage = 2,
    /// Certificates unreadable, or ours proves no agent/netagent role.
    Certificates = 3,
    /// The scheduler refused our identity (ConnectionAborted) or proved a
    /// role it does not hold: a security failure, not retried.
    Security = 4,
    /// The data directory is unusable.
    DataDir = 5,
}

impl From<LauncherExit> for ExitCode {
    fn from(e: LauncherExit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}

/// ciao-launcher: the CIAO compute-node agent (SSNTP client).
#[derive(Debug, Parser)]
#[command(name = "ciao-launcher", version, about)]
pub struct Cli {
    /// CA certificate (PEM); its SANs name the scheduler when -server is not given.
    #[arg(long)]
    pub cacert: PathBuf,
    /// This node's certificate and key in one PEM file (role agent and/or netagent).
    #[arg(long)]
    pub cert: PathBuf,
    /// Scheduler address host[:port] (default: the CA certificate's SANs, then localhost; port 8888).
    #[arg(long)]
    pub server: Option<String>,
    /// Root of the launcher's files.
    #[arg(long = "data-dir", default_value = "/var/lib/ciao")]
    pub data_dir: PathBuf,
    /// Protocol profile: 2016 (the seed-era scheduler) or 2018 (ciao master).
    #[arg(long, default_value = "2016")]
    pub protocol: Profile,
    /// Also require the scheduler certificate to name the host dialled.
    #[arg(long = "verify-hostname")]
    pub verify_hostname: bool,
    /// Log verbosity (glog style: 0 info, 1+ debug, 3+ trace).
    #[arg(short = 'v', long = "v", default_value_t = 0)]
    pub verbosity: u8,
}

/// Entry point of the `ciao-launcher` binary.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let args = crate::cli::normalize_args(&Cli::command(), args);
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                LauncherExit::Usage.into()
            } else {
                LauncherExit::Ok.into()
            };
        }
    };
    let level = match cli.verbosity {
        0 => log::LevelFilter::Info,
        1 | 2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    crate::logging::to_stderr(level);
    run(cli).into()
}

fn run(cli: Cli) -> LauncherExit {
    let (ca, identity) = match (tls::load_ca(&cli.cacert), tls::load_identity(&cli.cert)) {
        (Ok(ca), Ok(id)) => (ca, id),
        (Err(e), _) | (_, Err(e)) => {
            error!("{e}");
            return LauncherExit::Certificates;
        }
    };
    if !identity.role.intersects(Role::AGENT.union(Role::NETAGENT)) {
        error!(
            "{}: role {} is neither agent nor netagent",
            cli.cert.display(),
            identity.role
        );
        return LauncherExit::Certificates;
    }
    let node = match client::node_uuid(&cli.data_dir, identity.role) {
        Ok(n) => n,
        Err(e) => {
            error!("{}: cannot keep the node UUID: {e}", cli.data_dir.display());
            return LauncherExit::DataDir;
        }
    };
    let servers = client::server_list(cli.server.as_deref(), &ca, client::DEFAULT_PORT);
    info!(
        "node {} ({}) dialling {}",
        node.uuid,
        identity.role,
        servers.join(", ")
    );
    let mut cfg = ClientConfig::new(identity, ca, *node.uuid.as_bytes(), servers);
    cfg.profile = cli.protocol;
    cfg.verify_hostname = cli.verify_hostname;
    let client = match Client::start(cfg) {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            return LauncherExit::Certificates;
        }
    };
    let signals = match crate::signals::spawn() {
        Ok(s) => s,
        Err(e) => {
            error!("cannot install signal handlers: {e}");
            return LauncherExit::Usage;
        }
    };
    let exit = loop {
        select! {
            recv(signals.done) -> s => {
                info!("signal {}: shutting down", s.unwrap_or(0));
                break LauncherExit::Ok;
            }
            recv(client.events()) -> ev => match ev {
                Ok(ClientEvent::Connected { server_role, .. }) => info!("connected to the {server_role}"),
                Ok(ClientEvent::Disconnected { reason, unsent }) => {
                    warn!("disconnected: {reason} ({} frames not sent)", unsent.len())
                }
                Ok(ClientEvent::ConnectFailed { error, retry_in }) => warn!("{error}; retrying in {retry_in:?}"),
                Ok(ClientEvent::Frame(f)) => {
                    let op = cli.protocol.frame_operation(&f).map_or_else(|e| e.to_string(), |o| o.to_string());
                    info!("received {op} ({} bytes)", f.payload.len());
                }
                Ok(ClientEvent::Stopped { error: Some(e) }) => {
                    error!("{e}");
                    break LauncherExit::Security;
                }
                Ok(ClientEvent::Stopped { error: None }) | Err(_) => break LauncherExit::Ok,
            }
        }
    };
    client.close();
    exit
}
