//! The overseer thread: the instance map, resource accounting, node status,
//! and the STATUS/STATS reports (spec/launcher-behaviour.md §5).
//!
//! Inputs (one `select!`):
//! * [`OverseerReq`] from the server thread; each request carries its own
//!   reply channel (admission of a START, looking up an instance's inbox,
//!   maintenance, "connected: report now");
//! * [`InstanceUpdate`]s from instance threads (bounded; always drained);
//! * the stats tick (injected: `tick()` in production, a test channel in tests);
//! * shutdown (the server drops the sender).
//!
//! The overseer never sends to an instance (that would let a busy instance
//! stall the node): it only starts instance threads and hands their inbox to
//! the server. At shutdown it closes the instances' shutdown channel and
//! joins every instance thread, having dropped the update receiver so that no
//! exiting instance can block on it. Threads of deleted instances are reaped
//! once finished, never waited for.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};
use log::{error, info, warn};

use crate::instance::{self, InstanceCmd, InstanceState, InstanceUpdate, Never, Seed};
use crate::node::NodeContext;
use crate::nodestats::{NodeFigures, NodeStatsSource};
use crate::payloads::Reason;
use crate::payloads::config::InstanceConfig;
use crate::payloads::outgoing::{self, InstanceStat, NodeStatus};
use crate::ssntp::{Command, Operation, Profile, Status};
use crate::virt::Usage;

/// Server → overseer. Replies travel on the channel inside the request.
#[derive(Debug)]
pub enum OverseerReq {
    /// Admit a new instance (or return the inbox of a known one).
    Add {
        cfg: Box<InstanceConfig>,
        reply: Sender<Result<Sender<InstanceCmd>, Reason>>,
    },
    /// The inbox of a known instance.
    Get {
        id: String,
        reply: Sender<Option<Sender<InstanceCmd>>>,
    },
    /// Inboxes of every instance (EVACUATE).
    All {
        reply: Sender<Vec<(String, Sender<InstanceCmd>)>>,
    },
    Maintenance {
        on: bool,
    },
    /// (Re)connected to the scheduler: send STATUS and STATS now.
    Connected,
    /// Snapshot for tests and the operator: (id, state) of every instance.
    List {
        reply: Sender<Vec<(String, InstanceState)>>,
    },
}

/// Resource thresholds (spec/launcher-behaviour.md §5.2), in MB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_instances: usize,
    pub disk_limit: bool,
    pub mem_limit: bool,
    /// FULL below these.
    pub disk_full_mb: i64,
    pub mem_full_mb: i64,
    /// START refused below these (after the request's own size).
    pub disk_refuse_mb: i64,
    pub mem_refuse_mb: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_instances: 32,
            disk_limit: true,
            mem_limit: true,
            disk_full_mb: 80_000,
            mem_full_mb: 1_000,
            disk_refuse_mb: 40_000,
            mem_refuse_mb: 512,
        }
    }
}

/// Updates instance threads may queue before they wait for the overseer.
const UPDATES: usize = 4096;
/// How often instance threads sample their usage.
pub const USAGE_PERIOD: Duration = Duration::from_secs(30);

/// What one instance adds to the used-resource sums (spec §5.2).
fn contribution(usage: &Usage, mem_mb: i64) -> (i64, i64) {
    (
        usage.disk_mb.unwrap_or(0).max(0),
        usage.memory_mb.map_or(0, |m| m.clamp(0, mem_mb.max(0))),
    )
}

#[derive(Debug)]
struct Record {
    inbox: Sender<InstanceCmd>,
    thread: Option<JoinHandle<()>>,
    state: InstanceState,
    usage: Usage,
    volumes: Vec<String>,
    vcpus: i64,
    mem_mb: i64,
    disk_mb: i64,
    ssh_ip: String,
    ssh_port: i64,
}

/// Everything the overseer thread owns. Built by [`Overseer::new`], moved
/// into its thread by [`Overseer::spawn`].
#[derive(Debug)]
pub struct Overseer {
    ctx: NodeContext,
    limits: Limits,
    stats: Box<dyn NodeStatsSource>,
    instances: HashMap<String, Record>,
    /// Threads of instances that said Gone; joined once finished (never
    /// waited for here: the overseer must not block on an instance).
    exiting: Vec<JoinHandle<()>>,
    vcpus_allocated: i64,
    mem_allocated: i64,
    disk_allocated: i64,
    disk_available: i64,
    mem_available: i64,
    /// Σ disk usage and Σ min(memory usage, configured memory) over the
    /// instances, kept up to date with every update so a STATUS costs O(1).
    disk_used: i64,
    mem_used: i64,
    maintenance: bool,
    maintenance_file: PathBuf,
    last_figures: NodeFigures,
    updates_tx: Sender<InstanceUpdate>,
    updates: Receiver<InstanceUpdate>,
    /// Dropped at shutdown: closes every instance's shutdown channel.
    instance_shutdown: Option<Sender<Never>>,
    instance_shutdown_rx: Receiver<Never>,
    /// How often instance threads sample their usage (None: never, for
    /// deterministic tests).
    usage_period: Option<Duration>,
}

/// The overseer's inputs, kept apart from its state.
#[derive(Debug)]
pub struct OverseerInputs {
    pub requests: Receiver<OverseerReq>,
    pub stats_tick: Receiver<Instant>,
    pub shutdown: Receiver<Never>,
}

impl Overseer {
    pub fn new(
        ctx: NodeContext,
        limits: Limits,
        stats: Box<dyn NodeStatsSource>,
        maintenance_file: PathBuf,
    ) -> Overseer {
        let (updates_tx, updates) = crossbeam_channel::bounded(UPDATES);
        let (instance_shutdown, instance_shutdown_rx) = crossbeam_channel::bounded(0);
        Overseer {
            ctx,
            limits,
            stats,
            instances: HashMap::new(),
            exiting: Vec::new(),
            vcpus_allocated: 0,
            mem_allocated: 0,
            disk_allocated: 0,
            disk_available: 0,
            mem_available: 0,
            disk_used: 0,
            mem_used: 0,
            maintenance: false,
            maintenance_file,
            last_figures: NodeFigures::UNKNOWN,
            updates_tx,
            updates,
            instance_shutdown: Some(instance_shutdown),
            instance_shutdown_rx,
            usage_period: Some(USAGE_PERIOD),
        }
    }

    /// Sets how often instance threads sample their usage (None: never).
    pub fn with_usage_period(mut self, period: Option<Duration>) -> Overseer {
        self.usage_period = period;
        self
    }

    /// Scans the store and starts a thread for every instance found (their
    /// monitors re-attach). Unreadable entries are reported and skipped.
    pub fn recover(&mut self) -> usize {
        self.maintenance = self.maintenance_file.exists();
        let mut n = 0;
        for entry in self.ctx.store.scan() {
            match entry {
                Ok((id, state)) => {
                    if self.instances.contains_key(&id) {
                        continue;
                    }
                    if let Err(e) = self.launch(
                        id.clone(),
                        Seed::Recovered(Box::new(state.clone())),
                        &state.config,
                    ) {
                        error!("cannot recover {id}: {e}");
                        continue;
                    }
                    n += 1;
                }
                Err(e) => warn!("skipped while recovering: {e}"),
            }
        }
        if n > 0 {
            info!("recovered {n} instance(s)");
        }
        n
    }

    fn launch(
        &mut self,
        id: String,
        seed: Seed,
        cfg: &InstanceConfig,
    ) -> std::io::Result<Sender<InstanceCmd>> {
        let h = instance::spawn(
            self.ctx.clone(),
            id.clone(),
            seed,
            self.updates_tx.clone(),
            self.instance_shutdown_rx.clone(),
            self.usage_period
                .map_or_else(crossbeam_channel::never, crossbeam_channel::tick),
        )?;
        let rec = Record {
            inbox: h.inbox.clone(),
            thread: Some(h.thread),
            state: InstanceState::Pending,
            usage: Usage::default(),
            volumes: cfg.volumes.iter().map(|v| v.uuid.clone()).collect(),
            vcpus: i64::from(cfg.vcpus),
            mem_mb: cfg.mem_mb as i64,
            disk_mb: cfg.disk_mb as i64,
            ssh_ip: cfg.networking.concentrator_ip.clone(),
            ssh_port: i64::from(cfg.ssh_port),
        };
        self.vcpus_allocated += rec.vcpus;
        self.mem_allocated += rec.mem_mb;
        self.disk_allocated += rec.disk_mb;
        self.instances.insert(id, rec);
        Ok(h.inbox)
    }

    /// Moves the overseer into its thread.
    pub fn spawn(self, inputs: OverseerInputs) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("overseer".into())
            .spawn(move || self.run(inputs))
    }

    fn run(mut self, inputs: OverseerInputs) {
        // Availability starts from real figures, not from zero (Go's started
        // at 0 and refused every START until its first STATUS).
        self.status(true);
        loop {
            select! {
                recv(inputs.shutdown) -> _ => break,
                recv(inputs.requests) -> r => match r {
                    Ok(r) => self.request(r),
                    Err(_) => break,
                },
                recv(self.updates) -> u => {
                    if let Ok(u) = u {
                        self.instance_update(u);
                    }
                }
                recv(inputs.stats_tick) -> _ => {
                    self.reap();
                    self.report(true);
                }
            }
        }
        self.shutdown();
    }

    fn request(&mut self, r: OverseerReq) {
        match r {
            OverseerReq::Add { cfg, reply } => {
                let _ = reply.send(self.add(&cfg));
            }
            OverseerReq::Get { id, reply } => {
                let _ = reply.send(self.instances.get(&id).map(|r| r.inbox.clone()));
            }
            OverseerReq::All { reply } => {
                let _ = reply.send(
                    self.instances
                        .iter()
                        .map(|(id, r)| (id.clone(), r.inbox.clone()))
                        .collect(),
                );
            }
            OverseerReq::Maintenance { on } => self.set_maintenance(on),
            OverseerReq::Connected => self.report(true),
            OverseerReq::List { reply } => {
                let mut v: Vec<_> = self
                    .instances
                    .iter()
                    .map(|(id, r)| (id.clone(), r.state))
                    .collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                let _ = reply.send(v);
            }
        }
    }

    /// Admission (spec §5.2), using availability from the last status.
    fn add(&mut self, cfg: &InstanceConfig) -> Result<Sender<InstanceCmd>, Reason> {
        if let Some(r) = self.instances.get(&cfg.instance_uuid) {
            return Ok(r.inbox.clone());
        }
        if self.maintenance {
            return Err(Reason::NodeMaintenance);
        }
        if self.instances.len() >= self.limits.max_instances {
            return Err(Reason::FullCn);
        }
        if self.limits.disk_limit
            && self.disk_available - (cfg.disk_mb as i64) < self.limits.disk_refuse_mb
        {
            return Err(Reason::FullCn);
        }
        if self.limits.mem_limit
            && self.mem_available - (cfg.mem_mb as i64) < self.limits.mem_refuse_mb
        {
            return Err(Reason::FullCn);
        }
        let id = cfg.instance_uuid.clone();
        self.launch(id, Seed::New, cfg).map_err(|e| {
            error!("cannot start a thread for {}: {e}", cfg.instance_uuid);
            Reason::LaunchFailure
        })
    }

    fn instance_update(&mut self, u: InstanceUpdate) {
        match u {
            InstanceUpdate::State { id, state } => {
                if let Some(r) = self.instances.get_mut(&id) {
                    r.state = state;
                }
            }
            InstanceUpdate::Usage { id, usage, volumes } => {
                if let Some(r) = self.instances.get_mut(&id) {
                    let (d0, m0) = contribution(&r.usage, r.mem_mb);
                    let (d1, m1) = contribution(&usage, r.mem_mb);
                    self.disk_used += d1 - d0;
                    self.mem_used += m1 - m0;
                    r.usage = usage;
                    r.volumes = volumes;
                }
            }
            InstanceUpdate::StatusNow => self.report(false),
            InstanceUpdate::Gone { id } => {
                if let Some(mut r) = self.instances.remove(&id) {
                    let (d, m) = contribution(&r.usage, r.mem_mb);
                    self.disk_used -= d;
                    self.mem_used -= m;
                    self.vcpus_allocated = (self.vcpus_allocated - r.vcpus).max(0);
                    self.mem_allocated = (self.mem_allocated - r.mem_mb).max(0);
                    self.disk_allocated = (self.disk_allocated - r.disk_mb).max(0);
                    if let Some(t) = r.thread.take() {
                        self.exiting.push(t);
                    }
                }
                self.reap();
            }
        }
    }

    /// Joins the exited instance threads that have finished.
    fn reap(&mut self) {
        let (done, running): (Vec<_>, Vec<_>) =
            self.exiting.drain(..).partition(|t| t.is_finished());
        self.exiting = running;
        for t in done {
            if t.join().is_err() {
                error!("an instance thread panicked");
            }
        }
    }

    fn set_maintenance(&mut self, on: bool) {
        if on == self.maintenance {
            return;
        }
        self.maintenance = on;
        let r = if on {
            crate::state::write_atomic(&self.maintenance_file, b"", 0o600)
        } else {
            fs::remove_file(&self.maintenance_file).or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
        };
        if let Err(e) = r {
            warn!("{}: {e}", self.maintenance_file.display());
        }
        info!("maintenance {}", if on { "on" } else { "off" });
        self.report(false);
    }

    /// Recomputes availability and the node status (spec §5.2).
    /// `resample`: read the node's figures again (the stats tick, a
    /// connection); STATUS after a START or DELETE reuses the last ones, so a
    /// burst of commands does not re-read /proc each time.
    fn status(&mut self, resample: bool) -> Status {
        if resample {
            self.last_figures = self.stats.sample();
        }
        let f = self.last_figures;
        self.disk_available = f.disk_available_mb + self.disk_used - self.disk_allocated;
        self.mem_available = f.mem_available_mb + self.mem_used - self.mem_allocated;
        if self.maintenance {
            Status::Maintenance
        } else if self.instances.len() >= self.limits.max_instances
            || (self.limits.disk_limit && self.disk_available < self.limits.disk_full_mb)
            || (self.limits.mem_limit && self.mem_available < self.limits.mem_full_mb)
        {
            Status::Full
        } else {
            Status::Ready
        }
    }

    fn node_status(&self) -> NodeStatus {
        let f = self.last_figures;
        NodeStatus {
            node_uuid: self.ctx.node_uuid.clone(),
            mem_total_mb: f.mem_total_mb,
            mem_available_mb: f.mem_available_mb,
            disk_total_mb: f.disk_total_mb,
            disk_available_mb: f.disk_available_mb,
            load: f.load,
            cpus_online: f.cpus_online,
            hostname: String::new(),
            networks: Vec::new(),
        }
    }

    /// Sends STATUS, and STATS too when `with_stats`.
    fn report(&mut self, with_stats: bool) {
        let status = self.status(with_stats);
        let node = self.node_status();
        let profile = self.ctx.profile;
        // Master sends FULL/MAINTENANCE without payload; 2016 sent the READY body.
        let payload = if status == Status::Ready || profile == Profile::P2016 {
            outgoing::ready_payload(profile, &node)
        } else {
            Vec::new()
        };
        self.ctx.outbox.send(Operation::Status(status), payload);
        if !with_stats {
            return;
        }
        let mut stats: Vec<InstanceStat> = self
            .instances
            .iter()
            .map(|(id, r)| InstanceStat {
                instance_uuid: id.clone(),
                state: r.state.wire_name(profile).to_string(),
                ssh_ip: r.ssh_ip.clone(),
                ssh_port: r.ssh_port,
                memory_usage_mb: r.usage.memory_mb.unwrap_or(-1),
                disk_usage_mb: r.usage.disk_mb.unwrap_or(-1),
                cpu_usage: r.usage.cpu_percent.unwrap_or(-1),
                volumes: r.volumes.clone(),
            })
            .collect();
        stats.sort_by(|a, b| a.instance_uuid.cmp(&b.instance_uuid));
        let payload = outgoing::stats_payload(profile, &node, status_name(status), &stats);
        self.ctx
            .outbox
            .send(Operation::Command(Command::Stats), payload);
    }

    /// Closes every instance's shutdown channel and joins the threads.
    /// Dropping the update receiver first makes any update an instance sends
    /// while exiting fail at once, so none can block on a full channel.
    fn shutdown(mut self) {
        self.instance_shutdown.take();
        let threads: Vec<JoinHandle<()>> = self
            .instances
            .values_mut()
            .filter_map(|r| r.thread.take())
            .collect();
        drop(self.updates);
        for t in threads {
            if t.join().is_err() {
                error!("an instance thread panicked");
            }
        }
    }
}

fn status_name(s: Status) -> &'static str {
    match s {
        Status::Ready => "READY",
        Status::Full => "FULL",
        Status::Maintenance => "MAINTENANCE",
        Status::Offline => "OFFLINE",
        Status::Connected => "CONNECTED",
    }
}
