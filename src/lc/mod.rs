//! `ciao-lc`, the operator's companion: makes ciao-style certificates, runs an
//! embedded SSNTP scheduler (`serve`), and drives launchers through it from
//! the command line (`start`, `stop`, `restart`, `delete`, `attach`, `list`,
//! `stats`, `watch`, `evacuate`, `restore`); `node-status` reads a
//! launcher's status file on its own node, without any scheduler.
//!
//! Parts: [`cli`] (the command line), [`certs`] (`ciao-lc certs`),
//! [`serve`] (the embedded scheduler, its threads and its view of every
//! launcher), [`node_status`] (the status file, offline), [`control`] (the
//! control socket's protocol, requests as an enum, and the client side of
//! every other command) and [`table`] (what `list` and `stats` print). This
//! file dispatches a command line to them.

pub mod certs;
pub mod cli;
pub mod control;
pub mod node_status;
pub mod serve;
pub mod table;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;

pub use cli::{LcCli, LcCommand, Target};
pub use control::Request;

/// Exit codes of `ciao-lc`.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LcExit {
    Ok = 0,
    /// The command failed (unknown node or instance, launcher not connected, …).
    Failed = 1,
    /// Command-line error (clap uses 2 as well).
    Usage = 2,
    /// Certificates could not be written or read.
    Certs = 3,
    /// `serve` could not start (address in use, …).
    Serve = 4,
    /// No `ciao-lc serve` answers on the control socket.
    NoServer = 5,
}

impl From<LcExit> for ExitCode {
    fn from(e: LcExit) -> ExitCode {
        ExitCode::from(e as u8)
    }
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
    match cli.command {
        LcCommand::Certs {
            dir,
            org,
            hosts,
            ips,
            all_addresses,
            no_san,
        } => {
            let (hosts, ips) = if no_san {
                (Vec::new(), Vec::new())
            } else {
                certs::scheduler_names(hosts, ips, all_addresses)
            };
            certs::certs(&dir, &org, hosts, ips)
        }
        LcCommand::Serve {
            certs,
            listen,
            protocol,
            configuration,
            verbose,
        } => {
            // Only what goes wrong: serve prints its own lines on standard output.
            let _ =
                crate::logging::init(&crate::cli::LogConfig::stderr_only(log::LevelFilter::Warn));
            serve::serve(&certs, listen, protocol, configuration, verbose)
        }
        LcCommand::Start { target, spec } => control::start(&target, &spec),
        LcCommand::Stop { target, instance } => {
            call(&target, |node| Request::Stop { node, instance })
        }
        LcCommand::Restart { target, instance } => {
            call(&target, |node| Request::Restart { node, instance })
        }
        LcCommand::Delete { target, instance } => {
            call(&target, |node| Request::Delete { node, instance })
        }
        LcCommand::Attach {
            target,
            instance,
            volume,
        } => call(&target, |node| Request::Attach {
            node,
            instance,
            volume,
        }),
        LcCommand::List { target } => call(&target, |_| Request::List),
        LcCommand::Stats { target } => call(&target, |_| Request::Stats),
        LcCommand::Evacuate { target } => call(&target, |node| Request::Evacuate { node }),
        LcCommand::Restore { target } => call(&target, |node| Request::Restore { node }),
        LcCommand::Watch { target } => control::watch(&target),
        LcCommand::NodeStatus { data_dir } => node_status::node_status(&data_dir),
    }
    .into()
}

/// Sends the request `make` builds from `--node` (empty: the only launcher).
fn call(target: &Target, make: impl FnOnce(String) -> Request) -> LcExit {
    control::call(target, &make(target.node.clone().unwrap_or_default()))
}

/// File names inside a certificate directory.
pub const CA_FILE: &str = "CAcert.pem";
pub const SCHEDULER_FILE: &str = "cert-Scheduler.pem";
pub const AGENT_FILE: &str = "cert-CNAgent.pem";
pub const NETAGENT_FILE: &str = "cert-NetworkingAgent.pem";
/// The control socket of `serve`, inside the certificate directory.
pub const CONTROL_SOCKET: &str = "ciao-lc.sock";
