//! The overseer thread: the instance map, admission and resource
//! accounting, command routing, node status, and the STATUS/STATS reports
//! (docs/architecture.md).
//!
//! Inputs (one `select!`):
//! * [`OverseerReq`] from the server thread: a START's configuration, a
//!   command for an instance, EVACUATE, maintenance, "connected: report
//!   now", "connection lost" (for the status file), and snapshots for
//!   tests and tools (those carry a reply channel);
//! * [`InstanceUpdate`]s from instance threads (bounded; always drained);
//! * the stats tick (injected: `tick()` in production, a test channel in tests);
//! * error notes of every thread and the status file's one-shot timer (both
//!   `never` unless the status file is kept, see below);
//! * shutdown (the server drops the sender).
//!
//! Outputs: STATUS, STATS and error frames (the outbox), commands into
//! instance inboxes, and `<data-dir>/status`.
//!
//! # Routing: exactly one outcome per command
//! 1. A START for an unknown id is admitted (maintenance, capacity, sanity
//!    of its sizes against the node) and its instance thread is spawned with
//!    the configuration; a refusal is a StartFailure with the reason.
//! 2. Any other command, and a START for a known id, is `try_send`ed into
//!    the instance's bounded inbox; a full inbox is `instance_busy`, an
//!    unknown id `no_instance`. The overseer never blocks on an instance
//!    (it never uses a blocking send), which is the reason for the
//!    original's rule that it must not send to instances.
//! 3. An instance that goes says `Gone`; the overseer then drops its inbox.
//!    Commands the instance received after it decided to go come back as
//!    `Unhandled` (after `Gone`, on the same channel) and are routed again
//!    from step 1.
//! 4. At shutdown, requests still queued are answered with `instance_busy`.
//!
//! # Shutdown: only work in hand is waited for
//! 1. Requests still queued are answered (step 4 above).
//! 2. The node's [`Closing`] flag is set, then the instances' shutdown
//!    channel is closed: that wakes only the threads waiting inside a command
//!    (a stopping instance) or handing back commands after their `Gone`,
//!    never an idle one.
//! 3. The update receiver is dropped, so that no exiting instance can block
//!    on it.
//! 4. Every instance thread with work in hand ([`InHand`]: a command, its
//!    START or recovery, an event it acts on) is joined; its name is listed
//!    in [`Awaited`] until then, which is what the daemon names if the one
//!    second it allows runs out.
//! 5. The idle ones are handed back as [`IdleThreads`], still blocked: the
//!    daemon leaves them to the process exit (waking and joining thousands
//!    of idle threads costs far more than the exit takes); dropping the value
//!    lets them end (in-process users, tests).
//!
//! Threads of deleted instances are reaped once finished, never waited for.
//!
//! # The status file
//! After every input, the overseer offers the node's health (connection,
//! READY/FULL/MAINTENANCE, instance counts, last error) to the status file
//! (`src/health.rs`): written only when it changed, at most once a second
//! (a one-shot timer, armed only after a change, covers the rest of the
//! second). An idle node writes nothing and is woken by nothing more.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender, TrySendError, select};
use log::{error, info, warn};

use crate::health::{Clock, Counts, Health, Link, Offered, StatusFile};
use crate::instance::{
    self, Closing, Farewell, InHand, InstanceCmd, InstanceState, InstanceUpdate, NewStart, Seed,
    SshUpdate, UsageUpdate, Wiring,
};
use crate::node::{Never, NodeContext};
use crate::nodestats::{NodeFigures, NodeStatsSource};
use crate::payloads::Reason;
use crate::payloads::config::InstanceConfig;
use crate::payloads::outgoing::{self, ErrorKind, InstanceStatRef, NodeStatus};
use crate::ssntp::{Command, Operation, Profile, Status};
use crate::state::StateError;
use crate::virt::Usage;

/// Server → overseer. Snapshots answer on the channel inside the request.
#[derive(Debug)]
pub enum OverseerReq {
    /// A decoded START: admit and spawn, or route to the known instance.
    Start(Box<NewStart>),
    /// A command for instance `id` (canonical UUID).
    Command {
        id: String,
        cmd: InstanceCmd,
    },
    /// Maintenance on, then DELETE (InstanceStopped) of every instance.
    Evacuate,
    Maintenance {
        on: bool,
    },
    /// (Re)connected to the scheduler: send STATUS and STATS now, and what
    /// was held back until the first connection.
    Connected,
    /// The connection was lost, or a pass over the scheduler addresses
    /// failed: `why` is the status file's last error.
    LinkDown {
        why: String,
    },
    /// Snapshot for tests and the operator: (id, state) of every instance
    /// thread, also of one not yet in STATS.
    List {
        reply: Sender<Vec<(String, InstanceState)>>,
    },
}

/// Resource thresholds (ciao's FULL and refusal marks), in MB.
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
fn contribution(usage: Shown, mem_mb: i64) -> (i64, i64) {
    (
        i64::from(usage.disk_mb).max(0),
        i64::from(usage.memory_mb).clamp(0, mem_mb.max(0)),
    )
}

/// An instance's last usage sample as its record keeps it: −1 where it is
/// unknown, as STATS shows it. (Twelve bytes, where `Usage` is 48: there is
/// a record per instance.)
#[derive(Debug, Clone, Copy)]
struct Shown {
    memory_mb: i32,
    disk_mb: i32,
    cpu_percent: i32,
}

impl Shown {
    const UNKNOWN: Shown = Shown {
        memory_mb: -1,
        disk_mb: -1,
        cpu_percent: -1,
    };

    fn of(u: &Usage) -> Shown {
        let shown = |v: Option<i64>| v.map_or(-1, |v| v.clamp(-1, i64::from(i32::MAX)) as i32);
        Shown {
            memory_mb: shown(u.memory_mb),
            disk_mb: shown(u.disk_mb),
            cpu_percent: shown(u.cpu_percent),
        }
    }
}

#[derive(Debug)]
struct Record {
    /// Dropped when the instance says Gone: that ends its thread's hand-back.
    inbox: Sender<InstanceCmd>,
    thread: Option<JoinHandle<()>>,
    /// Shared with the thread: what it has in hand (taken up here for each
    /// command sent).
    in_hand: Arc<InHand>,
    /// What STATS shows; `None` until the instance's state is durable (a
    /// new instance says its first state once its START has booted it), so
    /// that the scheduler never hears of an instance a crash would lose.
    state: Option<InstanceState>,
    usage: Shown,
    sizes: Sizes,
}

/// What the overseer keeps of an instance's configuration: its allocation
/// and what STATS shows.
/// (The figures are 32 bits: a START larger than the node is refused.)
#[derive(Debug)]
struct Sizes {
    volumes: Vec<String>,
    vcpus: u32,
    mem_mb: u32,
    disk_mb: u32,
    ssh_port: u16,
    ssh_ip: String,
}

impl Sizes {
    fn of(cfg: &InstanceConfig) -> Sizes {
        let (ssh_ip, ssh_port) = cfg.ssh_address();
        let mb = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        Sizes {
            volumes: cfg.volumes.iter().map(|v| v.uuid.clone()).collect(),
            vcpus: cfg.vcpus,
            mem_mb: mb(cfg.mem_mb),
            disk_mb: mb(cfg.disk_mb),
            ssh_port,
            ssh_ip,
        }
    }

    fn vcpus(&self) -> i64 {
        i64::from(self.vcpus)
    }

    fn mem_mb(&self) -> i64 {
        i64::from(self.mem_mb)
    }

    fn disk_mb(&self) -> i64 {
        i64::from(self.disk_mb)
    }
}

/// Everything the overseer thread owns. Built by [`Overseer::new`], moved
/// into its thread by [`Overseer::spawn`].
#[derive(Debug)]
pub struct Overseer {
    /// Shared with every instance thread (one allocation, not a copy each).
    ctx: Arc<NodeContext>,
    limits: Limits,
    stats: Box<dyn NodeStatsSource>,
    /// A B-tree, not a hash map: a hash table's buckets (a `Record` each)
    /// are up to half empty, twice the memory at some thousands of
    /// instances; STATS lists them in this order.
    instances: BTreeMap<String, Record>,
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
    /// Set at shutdown, before any [`InHand`] is looked at.
    closing: Arc<Closing>,
    /// The threads the shutdown is still waiting for.
    awaited: Awaited,
    /// How often instance threads sample their usage (None: never, for
    /// deterministic tests).
    usage_period: Option<Duration>,
    /// Connected to the scheduler at least once.
    connected: bool,
    /// Events of instances that went before the first connection (found
    /// gone during recovery), sent when it comes.
    held_farewells: Vec<(String, Farewell)>,
    /// The last status computed (what STATUS said last).
    last_status: Status,
    /// Instances by state (kept with every change, so a health check is O(1)).
    counts: Counts,
    /// The status file, when kept (module docs, "The status file").
    health: Option<Keeper>,
    /// The keeper's error notes and its one-shot timer (`never` when unused).
    health_errors: Receiver<(String, SystemTime)>,
    health_due: Receiver<Instant>,
}

/// What the overseer needs to keep the status file.
#[derive(Debug)]
pub struct HealthSetup {
    pub file: StatusFile,
    /// The scheduler addresses dialled, as the file shows them.
    pub scheduler: String,
    /// Error notes of every thread ([`crate::health::ErrorNotes::channel`]).
    pub errors: Receiver<(String, SystemTime)>,
    /// The time the rate limit is measured in, and its timer (production:
    /// [`crate::health::RealClock`]).
    pub clock: Box<dyn Clock>,
}

#[derive(Debug)]
struct Keeper {
    file: StatusFile,
    scheduler: String,
    link: Link,
    last_error: Option<(String, SystemTime)>,
    clock: Box<dyn Clock>,
    /// When `health_due` fires: the state is offered again then.
    due: Option<Instant>,
}

/// The overseer's inputs, kept apart from its state.
#[derive(Debug)]
pub struct OverseerInputs {
    pub requests: Receiver<OverseerReq>,
    pub stats_tick: Receiver<Instant>,
    pub shutdown: Receiver<Never>,
    /// When to sweep leftovers once more after recovery (production:
    /// `after(SWEEP_AGAIN)`; tests: `never()`).
    pub sweep_again: Receiver<Instant>,
}

/// How long after start the overseer sweeps leftovers a second time.
pub const SWEEP_AGAIN: Duration = Duration::from_secs(30);

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
            ctx: Arc::new(ctx),
            limits,
            stats,
            instances: BTreeMap::new(),
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
            closing: Arc::default(),
            awaited: Awaited::default(),
            usage_period: Some(USAGE_PERIOD),
            connected: false,
            held_farewells: Vec::new(),
            last_status: Status::Ready,
            counts: Counts::default(),
            health: None,
            health_errors: crossbeam_channel::never(),
            health_due: crossbeam_channel::never(),
        }
    }

    /// Keeps the status file (module docs, "The status file").
    pub fn with_health(mut self, h: HealthSetup) -> Overseer {
        self.health_errors = h.errors;
        self.health = Some(Keeper {
            file: h.file,
            scheduler: h.scheduler,
            link: Link {
                connected: false,
                since: SystemTime::now(),
            },
            last_error: None,
            clock: h.clock,
            due: None,
        });
        self
    }

    /// The names of the instance threads a shutdown is still waiting for
    /// (empty until the shutdown begins).
    pub fn awaited(&self) -> Awaited {
        self.awaited.clone()
    }

    /// Sets how often instance threads sample their usage (None: never).
    pub fn with_usage_period(mut self, period: Option<Duration>) -> Overseer {
        self.usage_period = period;
        self
    }

    /// Scans the store and starts a thread for every instance found (their
    /// monitors re-attach). Finishes what an interrupted START left: an
    /// instance directory without a state is removed, and so are resources
    /// of this node that belong to no instance directory (a container
    /// created just before the crash). Unreadable states are reported and
    /// left in place for inspection; their ids stay taken.
    pub fn recover(&mut self) -> usize {
        self.maintenance = self.maintenance_file.exists();
        let mut n = 0;
        for entry in self.ctx.store.scan() {
            match entry {
                Ok((id, state)) => {
                    if self.instances.contains_key(&id) {
                        continue;
                    }
                    if let Err(e) = self.launch(id.clone(), Seed::Recovered(Box::new(state))) {
                        error!("cannot recover {id}: {e}");
                        continue;
                    }
                    n += 1;
                }
                Err(StateError::NoState { id, path }) => match self.ctx.store.remove_dir(&id) {
                    Ok(()) => info!(
                        "removed {}: an interrupted START of {id} left it without a state",
                        path.display()
                    ),
                    Err(e) => warn!("cannot remove what an interrupted START left: {e}"),
                },
                Err(e) => {
                    error!("not recovered (kept for inspection; remove it to free the id): {e}")
                }
            }
        }
        self.sweep();
        if n > 0 {
            info!("recovered {n} instance(s)");
        }
        n
    }

    /// Removes the virtualizers' resources of this node that belong to no
    /// instance directory. At recovery, and once more a while later: an
    /// engine may finish a create that a killed launcher had asked for only
    /// after its successor's first sweep. A new START makes its directory
    /// before anything else, so its resources are never taken for leftovers.
    fn sweep(&self) {
        let store = &self.ctx.store;
        // A live instance counts even before the journal has made its
        // directory (`Store::claim_instance_dir`).
        let recorded = |id: &str| {
            self.instances.contains_key(id) || store.instance_dir(id).is_ok_and(|d| d.exists())
        };
        for what in self.ctx.factory.sweep(&recorded) {
            info!("removed {what}: left by an interrupted START");
        }
    }

    fn launch(&mut self, id: String, seed: Seed) -> std::io::Result<()> {
        let sizes = Sizes::of(match &seed {
            Seed::New(s) => &s.cfg,
            Seed::Recovered(state) => &state.config,
        });
        // A recovered instance is on disk already.
        let state = matches!(seed, Seed::Recovered(_)).then_some(InstanceState::Pending);
        let wiring = Wiring {
            updates: self.updates_tx.clone(),
            shutdown: self.instance_shutdown_rx.clone(),
            closing: self.closing.clone(),
            tick: self
                .usage_period
                .map_or_else(crossbeam_channel::never, crossbeam_channel::tick),
        };
        let h = instance::spawn(self.ctx.clone(), id.clone(), seed, wiring)?;
        self.vcpus_allocated += sizes.vcpus();
        self.mem_allocated += sizes.mem_mb();
        self.disk_allocated += sizes.disk_mb();
        self.counts.add(state);
        let rec = Record {
            inbox: h.inbox,
            thread: Some(h.thread),
            in_hand: h.in_hand,
            state,
            usage: Shown::UNKNOWN,
            sizes,
        };
        self.instances.insert(id, rec);
        Ok(())
    }

    /// Moves the overseer into its thread; joining it gives the instance
    /// threads that were idle at shutdown.
    pub fn spawn(self, inputs: OverseerInputs) -> std::io::Result<JoinHandle<IdleThreads>> {
        std::thread::Builder::new()
            .name("overseer".into())
            .spawn(move || self.run(inputs))
    }

    fn run(mut self, mut inputs: OverseerInputs) -> IdleThreads {
        // Availability starts from real figures, not from zero (Go's started
        // at 0 and refused every START until its first STATUS).
        self.status(true);
        self.keep_health();
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
                recv(inputs.sweep_again) -> _ => {
                    inputs.sweep_again = crossbeam_channel::never();
                    self.sweep();
                }
                recv(self.health_errors) -> e => {
                    if let (Ok(e), Some(k)) = (e, &mut self.health) {
                        k.last_error = Some(e);
                    }
                }
                // Only a wake-up: keep_health sees the time has come.
                recv(self.health_due) -> _ => {}
            }
            self.keep_health();
        }
        // Accepted by the server, never carried out: answered, not dropped.
        while let Ok(r) = inputs.requests.try_recv() {
            let (id, cmd) = match r {
                OverseerReq::Start(s) => (s.cfg.instance_uuid.clone(), InstanceCmd::Start(s)),
                OverseerReq::Command { id, cmd } => (id, cmd),
                _ => continue,
            };
            info!(
                "{} for {id} not carried out: shutting down",
                cmd.kind().name()
            );
            cmd.refuse(&self.ctx, &id, Reason::InstanceBusy);
        }
        self.shutdown()
    }

    fn request(&mut self, r: OverseerReq) {
        if matches!(
            r,
            OverseerReq::Start(_) | OverseerReq::Command { .. } | OverseerReq::Evacuate
        ) {
            // A command comes over a connection.
            self.scheduler_heard();
        }
        match r {
            OverseerReq::Start(s) => {
                let id = s.cfg.instance_uuid.clone();
                self.route(id, InstanceCmd::Start(s));
            }
            OverseerReq::Command { id, cmd } => self.route(id, cmd),
            OverseerReq::Evacuate => self.evacuate(),
            OverseerReq::Maintenance { on } => self.set_maintenance(on),
            OverseerReq::Connected => {
                self.scheduler_heard();
                self.link_changed(true, None);
                self.report(true);
            }
            OverseerReq::LinkDown { why } => self.link_changed(false, Some(why)),
            OverseerReq::List { reply } => {
                let mut v: Vec<_> = self
                    .instances
                    .iter()
                    // Every instance, also one whose START is still under
                    // way (not yet in STATS): pending.
                    .map(|(id, r)| (id.clone(), r.state.unwrap_or(InstanceState::Pending)))
                    .collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                let _ = reply.send(v);
            }
        }
    }

    /// The scheduler is (or was) connected: send what waited for it.
    fn scheduler_heard(&mut self) {
        self.connected = true;
        for (id, farewell) in std::mem::take(&mut self.held_farewells) {
            self.farewell(&id, farewell);
        }
    }

    /// Delivers `cmd` to instance `id` (see the module docs, steps 1–3).
    fn route(&mut self, id: String, cmd: InstanceCmd) {
        let Some(r) = self.instances.get(&id) else {
            return match cmd {
                InstanceCmd::Start(s) => self.admit(s),
                other => {
                    info!("{} for {id}: no such instance", other.kind().name());
                    other.refuse(&self.ctx, &id, Reason::NoInstance);
                }
            };
        };
        // Taken up before the send: the thread may put it down at once.
        r.in_hand.take_up();
        let sent = r.inbox.try_send(cmd);
        if sent.is_err() {
            r.in_hand.put_down();
        }
        match sent {
            Ok(()) => {}
            Err(TrySendError::Full(cmd)) => {
                warn!(
                    "{} for {id}: the instance's inbox is full",
                    cmd.kind().name()
                );
                cmd.refuse(&self.ctx, &id, Reason::InstanceBusy);
            }
            Err(TrySendError::Disconnected(cmd)) => {
                // Its thread ended without saying Gone: it panicked.
                error!("the thread of {id} is gone; forgetting the instance");
                self.forget(&id);
                self.route(id, cmd);
            }
        }
    }

    /// Admission of a new instance (docs/architecture.md), using
    /// availability from the last status; spawns its thread with the START.
    fn admit(&mut self, start: Box<NewStart>) {
        let id = start.cfg.instance_uuid.clone();
        let restart = start.cfg.restart;
        if let Err((reason, why)) = self.admission(&start.cfg) {
            info!("START {id} refused: {} ({why})", reason.as_str());
            return self
                .ctx
                .send_error(ErrorKind::Start, &id, reason, restart, "");
        }
        if let Err(e) = self.launch(id.clone(), Seed::New(start)) {
            error!("cannot start a thread for {id}: {e}");
            self.ctx
                .send_error(ErrorKind::Start, &id, Reason::LaunchFailure, restart, "");
        }
    }

    fn admission(&self, cfg: &InstanceConfig) -> Result<(), (Reason, String)> {
        if self.maintenance {
            return Err((Reason::NodeMaintenance, "maintenance".into()));
        }
        sane_sizes(cfg, &self.last_figures).map_err(|why| (Reason::InvalidData, why))?;
        if self.instances.len() >= self.limits.max_instances {
            return Err((
                Reason::FullCn,
                format!("{} instances, the most allowed", self.instances.len()),
            ));
        }
        if self.limits.disk_limit
            && self.disk_available - (cfg.disk_mb as i64) < self.limits.disk_refuse_mb
        {
            return Err((Reason::FullCn, "disk".into()));
        }
        if self.limits.mem_limit
            && self.mem_available - (cfg.mem_mb as i64) < self.limits.mem_refuse_mb
        {
            return Err((Reason::FullCn, "memory".into()));
        }
        Ok(())
    }

    /// Maintenance on, then a DELETE (InstanceStopped) for every instance.
    fn evacuate(&mut self) {
        self.set_maintenance(true);
        let ids: Vec<String> = self.instances.keys().cloned().collect();
        info!("evacuating {} instance(s)", ids.len());
        for id in ids {
            self.route(id, InstanceCmd::Delete { stop: true });
        }
    }

    fn instance_update(&mut self, u: InstanceUpdate) {
        match u {
            InstanceUpdate::State { id, state } => {
                if let Some(r) = self.instances.get_mut(&id) {
                    self.counts.remove(r.state);
                    self.counts.add(Some(state));
                    r.state = Some(state);
                }
            }
            InstanceUpdate::Usage(u) => {
                let UsageUpdate { id, usage, volumes } = *u;
                if let Some(r) = self.instances.get_mut(&id) {
                    let usage = Shown::of(&usage);
                    let (d0, m0) = contribution(r.usage, r.sizes.mem_mb());
                    let (d1, m1) = contribution(usage, r.sizes.mem_mb());
                    self.disk_used += d1 - d0;
                    self.mem_used += m1 - m0;
                    r.usage = usage;
                    r.sizes.volumes = volumes;
                }
            }
            InstanceUpdate::Ssh(u) => {
                let SshUpdate { id, ip, port } = *u;
                if let Some(r) = self.instances.get_mut(&id) {
                    r.sizes.ssh_ip = ip;
                    r.sizes.ssh_port = port;
                }
            }
            InstanceUpdate::StatusNow => self.report(false),
            InstanceUpdate::Gone { id, farewell } => {
                self.forget(&id);
                self.reap();
                if self.connected {
                    self.farewell(&id, farewell);
                } else if farewell != Farewell::Silent {
                    self.held_farewells.push((id, farewell));
                }
                self.report(false);
            }
            InstanceUpdate::Unhandled { id, cmd } => self.route(id, cmd),
        }
    }

    fn farewell(&self, id: &str, farewell: Farewell) {
        match farewell {
            Farewell::Silent => {}
            Farewell::Deleted => self.ctx.send_gone_event(id, false),
            Farewell::Stopped => self.ctx.send_gone_event(id, true),
        }
    }

    /// Drops instance `id` and its allocations; its inbox closes.
    fn forget(&mut self, id: &str) {
        if let Some(mut r) = self.instances.remove(id) {
            self.counts.remove(r.state);
            let (d, m) = contribution(r.usage, r.sizes.mem_mb());
            self.disk_used -= d;
            self.mem_used -= m;
            self.vcpus_allocated = (self.vcpus_allocated - r.sizes.vcpus()).max(0);
            self.mem_allocated = (self.mem_allocated - r.sizes.mem_mb()).max(0);
            self.disk_allocated = (self.disk_allocated - r.sizes.disk_mb()).max(0);
            if let Some(t) = r.thread.take() {
                self.exiting.push(t);
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
        self.last_status = if self.maintenance {
            Status::Maintenance
        } else if self.instances.len() >= self.limits.max_instances
            || (self.limits.disk_limit && self.disk_available < self.limits.disk_full_mb)
            || (self.limits.mem_limit && self.mem_available < self.limits.mem_full_mb)
        {
            Status::Full
        } else {
            Status::Ready
        };
        self.last_status
    }

    /// The scheduler connection came up or went down (`why`: the error).
    fn link_changed(&mut self, connected: bool, why: Option<String>) {
        let Some(k) = &mut self.health else { return };
        let now = SystemTime::now();
        if k.link.connected != connected {
            k.link = Link {
                connected,
                since: now,
            };
        }
        if let Some(why) = why {
            k.last_error = Some((why, now));
        }
    }

    /// Offers the node's health to the status file (module docs, "The
    /// status file"); arms the one-shot timer when it is too soon to write.
    fn keep_health(&mut self) {
        let Some(k) = &mut self.health else { return };
        let now = k.clock.now();
        if let Some(due) = k.due {
            if now < due {
                return;
            }
            k.due = None;
            self.health_due = crossbeam_channel::never();
        }
        // Notes queued meanwhile, also by this thread (its own error frames).
        for e in self.health_errors.try_iter() {
            k.last_error = Some(e);
        }
        let h = Health {
            node_uuid: self.ctx.node_uuid.clone(),
            scheduler: k.scheduler.clone(),
            link: k.link.clone(),
            status: status_name(self.last_status),
            counts: self.counts,
            last_error: k.last_error.clone(),
        };
        let Some(k) = &mut self.health else { return };
        if let Offered::TooSoon(wait) = k.file.offer(&h, now) {
            k.due = Some(now + wait);
            self.health_due = k.clock.after(wait);
        }
    }

    fn node_status(&self) -> NodeStatus {
        let f = self.last_figures;
        let (hostname, networks) = self.ctx.network.reported();
        NodeStatus {
            node_uuid: self.ctx.node_uuid.clone(),
            mem_total_mb: f.mem_total_mb,
            mem_available_mb: f.mem_available_mb,
            disk_total_mb: f.disk_total_mb,
            disk_available_mb: f.disk_available_mb,
            load: f.load,
            cpus_online: f.cpus_online,
            hostname,
            networks,
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
        // In id order, as the map keeps them; borrowed, not copied.
        let stats = self
            .instances
            .iter()
            .filter_map(|(id, r)| Some((id, r, r.state?)))
            .map(|(id, r, state)| InstanceStatRef {
                instance_uuid: id,
                state: state.wire_name(profile),
                ssh_ip: &r.sizes.ssh_ip,
                ssh_port: i64::from(r.sizes.ssh_port),
                memory_usage_mb: i64::from(r.usage.memory_mb),
                disk_usage_mb: i64::from(r.usage.disk_mb),
                cpu_usage: i64::from(r.usage.cpu_percent),
                volumes: &r.sizes.volumes,
            });
        let payload = outgoing::stats_payload(profile, &node, status_name(status), stats);
        self.ctx
            .outbox
            .send(Operation::Command(Command::Stats), payload);
    }

    /// Waits for the instance threads with work in hand and hands back the
    /// idle ones (see the module docs, "Shutdown", steps 2–5).
    fn shutdown(mut self) -> IdleThreads {
        self.closing.set();
        self.instance_shutdown.take();
        drop(self.updates);
        let mut busy = Vec::new();
        let mut idle = IdleThreads::default();
        for (id, mut r) in std::mem::take(&mut self.instances) {
            let Some(thread) = r.thread.take() else {
                continue;
            };
            if r.in_hand.any() {
                busy.push((instance::thread_name(&id), thread, r.inbox));
            } else {
                idle.inboxes.push(r.inbox);
                idle.threads.push(thread);
            }
        }
        self.awaited
            .set(busy.iter().map(|(name, ..)| name.clone()).collect());
        if !busy.is_empty() {
            info!(
                "shutdown: waiting for {} instance thread(s) with work in hand; {} idle left as they are",
                busy.len(),
                idle.threads.len()
            );
        }
        for (name, thread, inbox) in busy {
            if thread.join().is_err() {
                error!("an instance thread panicked");
            }
            drop(inbox);
            self.awaited.done(&name);
        }
        idle
    }
}

/// The names of the instance threads a shutdown is waiting for (it joins
/// them one by one); shared with whoever enforces the time limit.
#[derive(Debug, Clone, Default)]
pub struct Awaited(Arc<Mutex<Vec<String>>>);

impl Awaited {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        // A list of names: a poisoned lock still holds a usable one.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, names: Vec<String>) {
        *self.lock() = names;
    }

    fn done(&self, name: &str) {
        let mut l = self.lock();
        if let Some(i) = l.iter().position(|n| n == name) {
            l.swap_remove(i);
        }
    }

    /// The threads still waited for, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v = self.lock().clone();
        v.sort();
        v
    }
}

/// Instance threads that were idle at shutdown, still blocked in their
/// `select!` (nothing they own is not on disk already). Dropping this closes
/// their inboxes, so they end; [`IdleThreads::leave_to_process_exit`] keeps
/// them blocked until the process ends.
#[derive(Debug, Default)]
pub struct IdleThreads {
    inboxes: Vec<Sender<InstanceCmd>>,
    threads: Vec<JoinHandle<()>>,
}

impl IdleThreads {
    pub fn len(&self) -> usize {
        self.threads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    /// The daemon's way: the exit that follows ends these threads, without
    /// one wake-up or join each.
    pub fn leave_to_process_exit(self) {
        std::mem::forget(self);
    }

    /// Lets them end and joins them (in-process users).
    pub fn end_and_join(mut self) {
        self.inboxes.clear();
        for t in self.threads.drain(..) {
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

/// Sizes a START may ask for: not beyond what the node has (when its
/// figures are known). Zero sizes are refused when the payload is parsed.
fn sane_sizes(cfg: &InstanceConfig, node: &NodeFigures) -> Result<(), String> {
    if node.cpus_online > 0 && i64::from(cfg.vcpus) > node.cpus_online {
        return Err(format!(
            "vcpus: {} is more than the node's {} CPUs",
            cfg.vcpus, node.cpus_online
        ));
    }
    if node.mem_total_mb > 0 && cfg.mem_mb as i64 > node.mem_total_mb {
        return Err(format!(
            "mem_mb: {} is more than the node's {} MB",
            cfg.mem_mb, node.mem_total_mb
        ));
    }
    if node.disk_total_mb > 0 && cfg.disk_mb as i64 > node.disk_total_mb {
        return Err(format!(
            "disk_mb: {} is more than the node's {} MB",
            cfg.disk_mb, node.disk_total_mb
        ));
    }
    Ok(())
}
