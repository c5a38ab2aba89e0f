//! The running launcher as a library object: [`Launcher::start`] spawns the
//! `server` thread (which owns the SSNTP client's `ssntp-io` thread, the
//! `overseer`, which owns the instance threads, and the `state-journal`
//! thread, which makes instance states durable) and returns a handle;
//! [`Launcher::stop`] broadcasts shutdown by dropping a sender and waits,
//! within a deadline, for the threads that are in the middle of something:
//! the server, ssntp-io, the overseer and every instance thread with work in
//! hand. Idle instance threads are handed back still blocked
//! ([`IdleThreads`]): nothing they own is not on disk. The binary (`daemon.rs`) adds
//! the command line, the lock, logging and signals around it; tests start it
//! in-process with a simulated virtualizer and injected node figures.
//!
//! ```text
//! main ──> server ──> ssntp-io
//!             ├─────> overseer ──> instance-<id> …
//!             └─────> state-journal
//! ```
//!
//! The journal is replayed into the state files before recovery scans them,
//! and stopped once the overseer has joined the instance threads with work
//! in hand (they may still be writing a state).

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{info, warn};

use crate::health::{ErrorNotes, RealClock, StatusFile};
use crate::network::TenantNetwork;
use crate::node::Never;
use crate::node::{LinkOutbox, NodeContext};
use crate::nodestats::NodeStatsSource;
use crate::overseer::{Awaited, HealthSetup, IdleThreads, Limits, Overseer, OverseerInputs};
use crate::ssntp::client::{Client, ClientConfig};
use crate::ssntp::{Profile, StartError};
use crate::state::Store;
use crate::state::journal::{Journal, JournalSettings};
use crate::virt::VirtualizerFactory;

/// Everything a launcher needs, resolved.
#[derive(Debug)]
pub struct Settings {
    pub client: ClientConfig,
    pub profile: Profile,
    pub data_dir: PathBuf,
    pub limits: Limits,
    pub stats_interval: Duration,
    pub factory: Arc<dyn VirtualizerFactory>,
    pub node_stats: Box<dyn NodeStatsSource>,
    pub instance_stack: usize,
    /// The node's tenant networking, started by the caller.
    pub network: Arc<TenantNetwork>,
    pub stop_wait: Duration,
    /// Per-instance usage sampling period (None: never, for deterministic tests).
    pub usage_period: Option<Duration>,
}

/// How the launcher ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Shut down on request.
    Stopped,
    /// The SSNTP client stopped for good (a security failure).
    ClientFailed(String),
}

/// A launcher that has stopped.
#[derive(Debug)]
pub struct Stopped {
    pub ended: Ended,
    /// Instance threads that were idle, still blocked.
    pub idle: IdleThreads,
}

/// A running launcher.
#[derive(Debug)]
pub struct Launcher {
    shutdown: Option<Sender<Never>>,
    done: Receiver<Ended>,
    server: Option<JoinHandle<IdleThreads>>,
    awaited: Awaited,
    /// Instances recovered from disk at start.
    pub recovered: usize,
}

/// The launcher did not finish within the deadline.
#[derive(Debug)]
pub struct Stuck {
    /// Names of the threads the shutdown still waits for: those of server,
    /// ssntp-io and overseer still alive, and the instance threads with work
    /// in hand not yet finished.
    pub threads: Vec<String>,
}

/// The launcher's own threads besides the instances'.
/// (`state-journal` is not one: alive until the server stops it last, it is
/// waited for only as part of the server.)
const CORE_THREADS: [&str; 3] = ["server", "ssntp-io", "overseer"];

impl Launcher {
    /// Creates the directories, recovers instances and starts the threads.
    pub fn start(s: Settings) -> Result<Launcher, StartError> {
        let io_error =
            |e: crate::state::StateError| StartError::Io(std::io::Error::other(e.to_string()));
        Store::new(&s.data_dir).ensure_dirs().map_err(io_error)?;
        let (journal, replayed) =
            Journal::open(&s.data_dir, JournalSettings::default()).map_err(io_error)?;
        if replayed.records > 0 {
            info!(
                "state journal: {} record(s) replayed, {} state file(s) written again, {} removed",
                replayed.records, replayed.restored, replayed.deleted
            );
        }
        let store = journal.store();
        let journal = journal.spawn().map_err(StartError::Io)?;
        let scheduler = s.client.servers.join(", ");
        let client = Client::start(s.client)?;
        let (errors, errors_rx) = ErrorNotes::channel();
        let ctx = NodeContext {
            profile: s.profile,
            node_uuid: uuid::Uuid::from_bytes(client.uuid()).to_string(),
            outbox: Arc::new(LinkOutbox {
                link: client.link(),
                profile: s.profile,
                origin: client.uuid(),
            }),
            store,
            factory: s.factory,
            stop_wait: s.stop_wait,
            instance_stack: s.instance_stack,
            network: s.network,
            errors,
        };
        let mut overseer = Overseer::new(
            ctx.clone(),
            s.limits,
            s.node_stats,
            s.data_dir.join("maintenance"),
        );
        overseer = overseer
            .with_usage_period(s.usage_period)
            .with_health(HealthSetup {
                file: StatusFile::new(&s.data_dir),
                scheduler,
                errors: errors_rx,
                clock: Box::new(RealClock),
            });
        let awaited = overseer.awaited();
        let recovered = overseer.recover();
        let (req_tx, req_rx) = crossbeam_channel::bounded(1024);
        let (ovs_shutdown, ovs_shutdown_rx) = crossbeam_channel::bounded::<Never>(0);
        let inputs = OverseerInputs {
            requests: req_rx,
            stats_tick: crossbeam_channel::tick(s.stats_interval),
            shutdown: ovs_shutdown_rx,
            sweep_again: crossbeam_channel::after(crate::overseer::SWEEP_AGAIN),
        };
        let overseer = overseer.spawn(inputs).map_err(StartError::Io)?;
        let (shutdown, shutdown_rx) = crossbeam_channel::bounded::<Never>(0);
        let (done_tx, done) = crossbeam_channel::bounded(1);
        let server = thread::Builder::new()
            .name("server".into())
            .spawn(move || {
                let events = client.events().clone();
                let end = crate::server::Server::new(ctx, req_tx).run(events, shutdown_rx);
                // Instances first (they may still send), then the connection.
                drop(ovs_shutdown);
                let idle = overseer.join().unwrap_or_else(|_| {
                    warn!("the overseer thread panicked");
                    IdleThreads::default()
                });
                // No instance thread is writing now; what is not compacted
                // is in the journal.
                journal.stop();
                client.close();
                let _ = done_tx.send(end.map_or(Ended::Stopped, Ended::ClientFailed));
                idle
            })
            .map_err(StartError::Io)?;
        Ok(Launcher {
            shutdown: Some(shutdown),
            done,
            server: Some(server),
            awaited,
            recovered,
        })
    }

    /// Waits until the launcher ends by itself (client failure).
    pub fn done(&self) -> &Receiver<Ended> {
        &self.done
    }

    /// Shuts down and waits for the threads in the middle of something, or
    /// reports who is still at it after `within`. Instances keep running
    /// either way.
    pub fn stop(mut self, within: Duration) -> Result<Stopped, Stuck> {
        let start = Instant::now();
        self.shutdown.take();
        match self.done.recv_timeout(within) {
            Ok(ended) => {
                let idle = match self.server.take().map(JoinHandle::join) {
                    Some(Ok(idle)) => idle,
                    _ => IdleThreads::default(),
                };
                info!(
                    "launcher stopped in {:?} ({} idle instance thread(s) left as they are)",
                    start.elapsed(),
                    idle.len()
                );
                Ok(Stopped { ended, idle })
            }
            Err(_) => {
                let mut threads: Vec<String> = live_threads()
                    .into_iter()
                    .filter(|n| CORE_THREADS.contains(&n.as_str()))
                    .collect();
                threads.extend(self.awaited.names());
                Err(Stuck { threads })
            }
        }
    }
}

/// The names of this process's threads (from /proc/self/task/*/comm).
pub fn live_threads() -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc/self/task") {
        for e in dir.flatten() {
            if let Ok(n) = fs::read_to_string(e.path().join("comm")) {
                names.push(n.trim().to_string());
            }
        }
    }
    names.sort();
    names
}
