//! One thread per instance: its configuration, its virtualizer and its life.
//! Every command for an instance is handled here, one at a time; different
//! instances run in parallel.
//!
//! Inputs (one `select!`): the bounded command inbox (the overseer
//! `try_send`s into it and answers "busy" when it is full), monitor events
//! and the usage tick. The shutdown channel (closed by the overseer) is
//! selected only while a command waits for something (a stopping instance,
//! the overseer's forgetting it): an idle thread is not woken by a shutdown.
//! Outputs: error frames and TenantAdded/TenantRemoved events through the
//! node's outbox, and [`InstanceUpdate`]s to the overseer (state, usage,
//! "send STATUS now", "gone", and commands that reached the thread after the
//! instance had gone). The instance's tenant NIC is made and removed here,
//! under the node-wide network lock (`network::TenantNetwork`): a VM's tap
//! before its image, a container's veth once it runs.
//!
//! The life of an instance is one value of [`Life`]; every handler is a
//! `match` on it, and a monitor exists exactly while the instance is
//! starting or running:
//!
//! ```text
//!             START made, booted        monitor: Running
//!   Creating ───────────────> Starting ────────────────> Running
//!     │ START fails             ▲ RESTART (2016)            │ STOP (2016), exit or crash (2016)
//!     v                         │                           v
//!    Gone <──── DELETE ──────  Exited <─────────────────────┘
//!          (from any state; 2018: an exit or crash deletes at once, InstanceStopped;
//!           an instance whose container or VM no longer exists goes too)
//! ```
//!
//! # Exactly one outcome per command
//! 1. The thread is spawned with the START's configuration and carries it out
//!    before it reads its inbox.
//! 2. Each command from the inbox is applied (an event, a STATUS, a state in
//!    STATS) or answered with an error frame naming the reason.
//! 3. When the instance goes (DELETE, a START that failed, a 2018 exit), the
//!    thread tells the overseer `Gone` and then hands every command that still
//!    reaches its inbox back to the overseer (`Unhandled`) until the overseer
//!    has dropped the inbox. The overseer routes them again: a START then
//!    starts a new instance, anything else gets `no_instance`.
//! 4. At shutdown, commands still queued are answered with `instance_busy`.
//!
//! # Persist, then tell
//! A change is on disk before the scheduler hears of it: STOP and RESTART
//! write the new `stopped` flag before acting (and write the old one back if
//! the action fails), DELETE removes the state before InstanceDeleted. A
//! change that cannot be written is an error frame with `state_failure`, and
//! nothing is changed. A VM's START writes its state while qemu-img makes its
//! disk (see `Virtualizer::create_image_while`), before the VM boots.
//!
//! Shutdown leaves the instance running: the monitor is detached, not stopped.
//!
//! # Shutdown waits only for work in hand
//! An idle instance thread owns nothing that is not already durable (its
//! state is on disk before any acknowledgement), so the shutdown neither
//! wakes nor joins it: the process exit ends it. Each thread shares an
//! [`InHand`] count with the overseer, which tells the two apart without
//! waking anyone:
//! 1. The thread is born with one in hand: its START or recovery. It puts
//!    it down when that is done.
//! 2. The overseer takes one up for each command before it `try_send`s it
//!    (and puts it down again if the inbox refuses it); the thread puts it
//!    down once the command is carried out, refused or handed back.
//! 3. Woken by anything else (a monitor event, the usage tick), the thread
//!    takes one up and then reads the node's [`Closing`] flag: set, it puts
//!    it down and leaves without acting; else it acts and then puts it down.
//! 4. At shutdown the overseer sets `Closing` and then reads every count:
//!    threads with work in hand are joined (within the daemon's one-second
//!    rule); the others are left blocked. Both sides use sequentially
//!    consistent order, so either the overseer sees the count or the thread
//!    sees the flag: no thread starts work the shutdown does not wait for.
//! 5. After each piece of work the thread reads `Closing`; set, it answers
//!    what is still queued with `instance_busy` and ends.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, select};
use log::{debug, error, info, warn};

use crate::network::VnicRequest;
use crate::node::{Never, NodeContext};
use crate::payloads::Reason;
use crate::payloads::config::{InstanceConfig, VmType, Volume};
use crate::payloads::outgoing::ErrorKind;
use crate::ssntp::Profile;
use crate::state::{StateError, StateFile};
use crate::virt::qemu::Nic;
use crate::virt::{Monitor, MonitorEvent, Usage, VirtError, Virtualizer};

/// Commands queued in an instance's inbox before the overseer answers "busy".
pub const INBOX: usize = 16;

/// A START as the server thread decoded it: the configuration, and the text
/// of the state file a new instance starts with, encoded there, before any
/// instance thread exists. The YAML encoder's deep frames and short-lived
/// allocations then never touch an instance thread's stack or heap, where
/// they would stay (a touched stack page, freed chunks cached per thread)
/// for the instance's whole life. `None`: the thread encodes it itself.
#[derive(Debug)]
pub struct NewStart {
    pub cfg: InstanceConfig,
    pub state: Option<Vec<u8>>,
}

impl NewStart {
    /// Decoded configuration → START, with its state encoded now.
    pub fn encode(cfg: InstanceConfig) -> NewStart {
        let state = crate::state::encode(&cfg, false)
            .map_err(|e| warn!("{}: state not encoded ahead: {e}", cfg.instance_uuid))
            .ok();
        NewStart { cfg, state }
    }
}

/// Commands for one instance (overseer → instance).
#[derive(Debug)]
pub enum InstanceCmd {
    /// A START for an instance that exists already (a new one is spawned
    /// with it instead).
    Start(Box<NewStart>),
    /// 2016: stop, keep the instance.
    Stop,
    /// 2016: boot a stopped instance again from its stored configuration.
    Restart,
    /// Stop if running, remove every file; `stop` selects InstanceStopped
    /// over InstanceDeleted (2018).
    Delete { stop: bool },
    /// Boxed, as `Start`: the inbox holds [`INBOX`] slots of the largest
    /// command for each instance's life, and two words per slot do.
    AttachVolume(Box<VolumeAttach>),
}

/// The volume of an ATTACH_VOLUME.
#[derive(Debug)]
pub struct VolumeAttach {
    pub volume: String,
}

impl InstanceCmd {
    /// The failure frame family of this command.
    pub fn kind(&self) -> ErrorKind {
        match self {
            InstanceCmd::Start(_) => ErrorKind::Start,
            InstanceCmd::Stop => ErrorKind::Stop,
            InstanceCmd::Restart => ErrorKind::Restart,
            InstanceCmd::Delete { .. } => ErrorKind::Delete,
            InstanceCmd::AttachVolume(_) => ErrorKind::AttachVolume,
        }
    }

    /// Answers the command for instance `id` with an error frame: it is not
    /// carried out, for `reason`.
    pub fn refuse(&self, ctx: &NodeContext, id: &str, reason: Reason) {
        let (restart, volume) = match self {
            InstanceCmd::Start(s) => (s.cfg.restart, ""),
            InstanceCmd::AttachVolume(a) => (false, a.volume.as_str()),
            _ => (false, ""),
        };
        ctx.send_error(self.kind(), id, reason, restart, volume);
    }
}

/// The state reported in STATS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    Pending,
    Running,
    Exited,
}

impl InstanceState {
    pub fn wire_name(self, profile: Profile) -> &'static str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Running => profile.running_state(),
            InstanceState::Exited => "exited",
        }
    }
}

/// What the scheduler is told when an instance goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Farewell {
    /// Nothing (a START that failed has had its StartFailure).
    Silent,
    /// InstanceDeleted.
    Deleted,
    /// InstanceStopped where the profile has it, else InstanceDeleted.
    Stopped,
}

// Sizes the inbox and the overseer's queue are built on (slots allocated
// for every instance, and for the node, up front).
const _: () = assert!(std::mem::size_of::<InstanceCmd>() == 16);
const _: () = assert!(std::mem::size_of::<InstanceUpdate>() <= 40);

/// Instance → overseer.
#[derive(Debug)]
pub enum InstanceUpdate {
    State {
        id: String,
        state: InstanceState,
    },
    /// Boxed, as `Ssh`: the overseer's queue holds `UPDATES` slots of the
    /// largest update, and the frequent ones are a String and a word.
    Usage(Box<UsageUpdate>),
    /// The SSH address STATS shows changed (a forward chosen for a boot);
    /// sent once it is persisted.
    Ssh(Box<SshUpdate>),
    /// Send a STATUS now (after a successful START).
    StatusNow,
    /// The instance's files are gone: forget it, free its allocations, send
    /// `farewell` (queued until the first connection, for instances that go
    /// during recovery) and a STATUS.
    Gone {
        id: String,
        farewell: Farewell,
    },
    /// A command that reached the instance after it had gone: route it again.
    Unhandled {
        id: String,
        cmd: InstanceCmd,
    },
}

/// An instance's usage sample and the volumes STATS shows with it.
#[derive(Debug)]
pub struct UsageUpdate {
    pub id: String,
    pub usage: Usage,
    pub volumes: Vec<String>,
}

/// The SSH address STATS shows for an instance.
#[derive(Debug)]
pub struct SshUpdate {
    pub id: String,
    pub ip: String,
    pub port: u16,
}

/// What an instance thread starts from.
#[derive(Debug)]
pub enum Seed {
    /// A new instance: its START (admitted by the overseer).
    New(Box<NewStart>),
    /// Found on disk at launcher start.
    Recovered(Box<StateFile>),
}

/// The pieces of work an instance thread has in hand (see the module docs,
/// "Shutdown waits only for work in hand"): commands sent to it and not yet
/// settled, its START or recovery, or the event it is acting on.
#[derive(Debug)]
pub struct InHand(AtomicUsize);

impl InHand {
    /// One in hand: the seed the thread is spawned with.
    pub fn new() -> Arc<InHand> {
        Arc::new(InHand(AtomicUsize::new(1)))
    }

    pub fn take_up(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    pub fn put_down(&self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }

    /// True while the thread has anything in hand.
    pub fn any(&self) -> bool {
        self.0.load(Ordering::SeqCst) > 0
    }
}

/// The node is shutting down: set once by the overseer, before it looks at
/// any [`InHand`]; read by instance threads.
#[derive(Debug, Default)]
pub struct Closing(AtomicBool);

impl Closing {
    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What the overseer keeps of a running instance thread.
#[derive(Debug)]
pub struct InstanceHandle {
    pub inbox: Sender<InstanceCmd>,
    pub thread: JoinHandle<()>,
    pub in_hand: Arc<InHand>,
}

/// The channels and flags an instance thread is wired to.
#[derive(Debug)]
pub struct Wiring {
    pub updates: Sender<InstanceUpdate>,
    /// Closed at shutdown; selected only while a command waits.
    pub shutdown: Receiver<Never>,
    pub closing: Arc<Closing>,
    pub tick: Receiver<Instant>,
}

/// Starts the thread of instance `id` (a validated, canonical UUID).
///
/// The instance (its configuration, virtualizer and monitor channel) is
/// built here, on the caller's thread, before its own thread exists: what
/// that building allocates and frees then never lands in the instance
/// thread's heap (glibc keeps a thread's freed chunks in a per-thread cache
/// for as long as the thread lives) or deepens its stack.
pub fn spawn(
    ctx: Arc<NodeContext>,
    id: String,
    seed: Seed,
    wiring: Wiring,
) -> std::io::Result<InstanceHandle> {
    let (inbox, cmds) = crossbeam_channel::bounded(INBOX);
    let name = thread_name(&id);
    let stack = ctx.instance_stack;
    let in_hand = InHand::new();
    let (inst, first, tick) = Instance::new(ctx, id, seed, wiring.updates, wiring.tick);
    let body = Body {
        inst,
        first,
        cmds,
        tick,
        shutdown: wiring.shutdown,
        closing: wiring.closing,
        in_hand: in_hand.clone(),
    };
    let thread = thread::Builder::new()
        .name(name)
        .stack_size(stack)
        .spawn(move || body.run())?;
    Ok(InstanceHandle {
        inbox,
        thread,
        in_hand,
    })
}

/// The name of instance `id`'s thread.
pub fn thread_name(id: &str) -> String {
    format!("instance-{}", &id[..id.len().min(8)])
}

/// What the thread's first piece of work is.
#[derive(Debug)]
enum First {
    /// Carry out the START; the state file's text if the server encoded it.
    Start(Option<Vec<u8>>),
    /// Re-attach to an instance found on disk, `stopped` or not.
    Recover { stopped: bool },
}

/// Everything an instance thread owns, moved into it at spawn.
#[derive(Debug)]
struct Body {
    inst: Box<Instance>,
    first: First,
    cmds: Receiver<InstanceCmd>,
    /// The usage tick, or `never` for a virtualizer whose usage cannot change.
    tick: Receiver<Instant>,
    shutdown: Receiver<Never>,
    closing: Arc<Closing>,
    in_hand: Arc<InHand>,
}

impl Body {
    /// The thread's body: carry out the seed, serve the inbox until the
    /// instance goes or the launcher shuts down, then settle what is left
    /// in the inbox. The work itself happens in functions that are never
    /// inlined here, so that the frame an idle thread waits in stays small
    /// (every stack page a thread ever touched stays resident).
    fn run(self) {
        let Body {
            mut inst,
            first,
            cmds,
            tick,
            shutdown,
            closing,
            in_hand,
        } = self;
        // Step 1: the seed is in hand from birth.
        match first {
            First::Start(state) => inst.start(state),
            First::Recover { stopped } => inst.recover(stopped),
        }
        in_hand.put_down();
        while !inst.life.is_gone() && !closing.is_set() {
            // No shutdown arm: an idle thread is left blocked at shutdown.
            select! {
                recv(cmds) -> c => match c {
                    // Step 2: the overseer took it up for us.
                    Ok(c) => {
                        if closing.is_set() {
                            inst.refuse_shutting_down(&c);
                        } else {
                            inst.handle(c, &shutdown, &closing);
                        }
                        in_hand.put_down();
                    }
                    // The overseer forgot this instance (after Gone, or a
                    // shutdown's idle threads being let go in-process).
                    Err(_) => break,
                },
                recv(inst.mon_rx) -> ev => if let Ok(ev) = ev {
                    // Step 3.
                    in_hand.take_up();
                    if !closing.is_set() {
                        inst.monitor_event(ev);
                    }
                    in_hand.put_down();
                },
                recv(tick) -> _ => {
                    in_hand.take_up();
                    if !closing.is_set() {
                        inst.report_usage();
                    }
                    in_hand.put_down();
                }
            }
        }
        if inst.life.is_gone() {
            inst.hand_back(&cmds, &shutdown, &in_hand);
        } else {
            inst.refuse_queued(&cmds, &in_hand);
        }
        // Dropping the monitor detaches it; the instance keeps running.
    }
}

/// The life of an instance. A monitor exists exactly while it is starting or
/// running.
#[derive(Debug)]
enum Life {
    /// Spawned for a START that is being carried out: nothing is booted yet.
    Creating,
    /// Booted and watched; not yet seen running.
    Starting(Box<dyn Monitor>),
    /// Seen running.
    Running(Box<dyn Monitor>),
    /// 2016: stopped, or exited by itself; kept (persisted) and restartable.
    Exited,
    /// Its files are removed and the overseer told: the thread is leaving.
    Gone,
}

impl Life {
    fn is_gone(&self) -> bool {
        matches!(self, Life::Gone)
    }

    /// What STATS shows.
    fn reported(&self) -> InstanceState {
        match self {
            Life::Creating | Life::Starting(_) => InstanceState::Pending,
            Life::Running(_) => InstanceState::Running,
            Life::Exited | Life::Gone => InstanceState::Exited,
        }
    }
}

/// Why waiting for a stopping instance ended without its exit.
#[derive(Debug)]
enum WaitError {
    MonitorGone,
    Shutdown,
    Timeout,
}

impl std::fmt::Display for WaitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WaitError::MonitorGone => "its monitor went away",
            WaitError::Shutdown => "the launcher is shutting down",
            WaitError::Timeout => "it did not stop in time",
        })
    }
}

#[derive(Debug)]
struct Instance {
    ctx: Arc<NodeContext>,
    dir: PathBuf,
    /// Its `instance_uuid` is the instance's id (no other copy is kept).
    cfg: InstanceConfig,
    vm: Box<dyn Virtualizer>,
    life: Life,
    /// This START made (or re-opened) the instance's tenant VNIC: a
    /// failure from here on removes it again.
    vnic_made: bool,
    mon_tx: Sender<MonitorEvent>,
    mon_rx: Receiver<MonitorEvent>,
    updates: Sender<InstanceUpdate>,
}

impl Instance {
    /// The instance of `seed`, not yet started or recovered, with its first
    /// piece of work and its usage tick (`never` when its usage cannot
    /// change: reported at each change of life only).
    fn new(
        ctx: Arc<NodeContext>,
        id: String,
        seed: Seed,
        updates: Sender<InstanceUpdate>,
        tick: Receiver<Instant>,
    ) -> (Box<Instance>, First, Receiver<Instant>) {
        let (mon_tx, mon_rx) = crossbeam_channel::unbounded();
        let (mut cfg, first, dir) = match seed {
            // Its directory is made by the START.
            Seed::New(s) => {
                let s = *s;
                (s.cfg, First::Start(s.state), PathBuf::new())
            }
            Seed::Recovered(s) => {
                let s = *s;
                let dir = ctx.store.instance_dir(&id).unwrap_or_default();
                (s.config, First::Recover { stopped: s.stopped }, dir)
            }
        };
        // The instance's id is its configuration's (one copy, not two). A
        // recovered file may name it in upper case or not at all (older
        // files): the id it was found under is the one kept.
        if cfg.instance_uuid != id {
            cfg.instance_uuid = id;
        }
        let vm = ctx.factory.create(&cfg);
        let tick = if vm.usage_varies() {
            tick
        } else {
            crossbeam_channel::never()
        };
        let inst = Box::new(Instance {
            ctx,
            dir,
            cfg,
            vm,
            life: Life::Creating,
            vnic_made: false,
            mon_tx,
            mon_rx,
            updates,
        });
        (inst, first, tick)
    }

    fn update(&self, u: InstanceUpdate) {
        // The overseer always drains this channel; it only fails at shutdown.
        let _ = self.updates.send(u);
    }

    /// Moves to `life` and tells the overseer what STATS now shows.
    fn become_(&mut self, life: Life) {
        self.life = life;
        self.update(InstanceUpdate::State {
            id: self.cfg.instance_uuid.clone(),
            state: self.life.reported(),
        });
    }

    #[inline(never)] // Keeps the waiting frame small (`Body::run`).
    fn report_usage(&mut self) {
        let usage = self.vm.stats();
        self.send_usage(usage);
    }

    fn send_usage(&self, usage: Usage) {
        let volumes = self.cfg.volumes.iter().map(|v| v.uuid.clone()).collect();
        self.update(InstanceUpdate::Usage(Box::new(UsageUpdate {
            id: self.cfg.instance_uuid.clone(),
            usage,
            volumes,
        })));
    }

    /// Tells the overseer the SSH address STATS shows (once persisted).
    fn tell_ssh(&self) {
        let (ip, port) = self.cfg.ssh_address();
        self.update(InstanceUpdate::Ssh(Box::new(SshUpdate {
            id: self.cfg.instance_uuid.clone(),
            ip,
            port,
        })));
    }

    /// Gives the next boot its tenant NIC (networking on, see
    /// `network::tenant`): the VNIC is made, or re-opened for a RESTART,
    /// under the node lock; TenantAdded is sent when this made the subnet's
    /// bridge and tunnel here. Err: the failure's reason and cause.
    fn plug_vnic(&mut self) -> Result<(), (Reason, String)> {
        if !self.ctx.network.is_on() {
            return Ok(());
        }
        if self.cfg.vm_type == VmType::Docker {
            // Its VNIC needs its running process (`plug_container`): only
            // the request is checked now, so bad input creates nothing.
            if self.cfg.network_node {
                return Err((
                    Reason::NetworkFailure,
                    "a container cannot be a CNCI (network_node)".into(),
                ));
            }
            return self
                .ctx
                .network
                .check(&VnicRequest::of(&self.cfg))
                .map_err(|e| (e.reason(), e.to_string()));
        }
        let granted = self
            .ctx
            .network
            .create_vnic(&VnicRequest::of(&self.cfg))
            .map_err(|e| (e.reason(), e.to_string()))?;
        self.vnic_made = true;
        if let Some(ev) = &granted.tenant_added {
            self.ctx.send_tenant_event(true, ev);
        }
        info!(
            "{}: VNIC {} with MAC {}",
            self.cfg.instance_uuid,
            granted.name,
            crate::network::format_mac(&granted.mac)
        );
        let nic = if self.cfg.network_node {
            Nic::Macvtap {
                fds: granted.fds,
                mac: granted.mac,
            }
        } else {
            Nic::Tap {
                fds: granted.fds,
                mac: granted.mac,
                vhost: granted.vhost,
            }
        };
        self.vm
            .set_nic(nic)
            .map_err(|e| (e.reason(Reason::NetworkFailure), e.to_string()))
    }

    /// After a container's start (networking on): its VNIC is made and
    /// plugged into its network namespace as `eth0` (a new veth pair each
    /// time: the last one died with the container's previous namespace).
    fn plug_container(&mut self) -> Result<(), (Reason, String)> {
        if !self.ctx.network.is_on() || self.cfg.vm_type != VmType::Docker {
            return Ok(());
        }
        let pid = self
            .vm
            .netns_pid()
            .map_err(|e| (Reason::NetworkFailure, e.to_string()))?;
        // From here a failure may leave a recorded VNIC to remove.
        self.vnic_made = true;
        let plugged = self
            .ctx
            .network
            .plug_container_vnic(&VnicRequest::of(&self.cfg), pid)
            .map_err(|e| (e.reason(), e.to_string()))?;
        if let Some(ev) = &plugged.tenant_added {
            self.ctx.send_tenant_event(true, ev);
        }
        info!(
            "{}: VNIC {} plugged in as eth0 ({}/{}, MAC {}, gateway {})",
            self.cfg.instance_uuid,
            plugged.name,
            plugged.ip,
            plugged.prefix,
            crate::network::format_mac(&plugged.mac),
            plugged.gateway
        );
        Ok(())
    }

    /// A container seen running (after a launcher restart, or the engine
    /// came back): if it lacks its tenant NIC, it gets it now. A failure is
    /// logged; the container runs on without it.
    fn ensure_container_nic(&mut self) {
        if !self.ctx.network.is_on() || self.cfg.vm_type != VmType::Docker {
            return;
        }
        let Ok(mac) = crate::network::parse_mac(self.cfg.networking.vnic_mac.trim()) else {
            return;
        };
        let has = self.vm.netns_pid().and_then(|pid| {
            crate::network::ContainerNetns::of_pid(pid)
                .and_then(|ns| ns.has_nic(mac))
                .map_err(|e| VirtError::other(e.to_string()))
        });
        match has {
            Ok(true) => {}
            Ok(false) => {
                info!(
                    "{}: running without its tenant NIC: plugging it in",
                    self.cfg.instance_uuid
                );
                if let Err((_, cause)) = self.plug_container() {
                    error!(
                        "{}: tenant NIC not plugged in: {cause}",
                        self.cfg.instance_uuid
                    );
                }
            }
            Err(e) => warn!(
                "{}: cannot check its tenant NIC: {e}",
                self.cfg.instance_uuid
            ),
        }
    }

    /// Removes the VNIC of an instance that goes (idempotent; none: no-op).
    /// A failure is logged only: the instance goes anyway, as in ciao.
    fn unplug_vnic(&mut self) {
        // An instance without networking fields never had a VNIC.
        if !self.ctx.network.is_on() || self.cfg.networking.vnic_mac.trim().is_empty() {
            return;
        }
        self.vnic_made = false;
        match self.ctx.network.delete_vnic(&VnicRequest::of(&self.cfg)) {
            Ok(Some(ev)) => self.ctx.send_tenant_event(false, &ev),
            Ok(None) => {}
            Err(e) => warn!("{}: VNIC not removed: {e}", self.cfg.instance_uuid),
        }
    }

    /// Writes the state file with the `stopped` flag given.
    fn save(&self, stopped: bool) -> Result<(), StateError> {
        self.ctx
            .store
            .save_config(&self.cfg.instance_uuid, &self.cfg, stopped)
    }

    /// An error frame for `kind`, logged once with its cause.
    fn fail(&self, kind: ErrorKind, reason: Reason, cause: &dyn std::fmt::Display) {
        warn!(
            "{} for {}: {} ({cause})",
            kind.name(),
            self.cfg.instance_uuid,
            reason.as_str()
        );
        self.ctx
            .send_error(kind, &self.cfg.instance_uuid, reason, self.cfg.restart, "");
    }

    /// The instance's files are gone: tell the overseer, which forgets it.
    fn leave(&mut self, farewell: Farewell) {
        self.life = Life::Gone;
        self.update(InstanceUpdate::Gone {
            id: self.cfg.instance_uuid.clone(),
            farewell,
        });
    }

    /// After `Gone`: every command that still reaches the inbox goes back to
    /// the overseer, until the overseer has dropped the inbox. One the
    /// overseer can no longer take (it is shutting down) is answered here.
    #[inline(never)] // Keeps the waiting frame small (`Body::run`).
    fn hand_back(
        &self,
        cmds: &Receiver<InstanceCmd>,
        shutdown: &Receiver<Never>,
        in_hand: &InHand,
    ) {
        loop {
            select! {
                recv(cmds) -> c => match c {
                    Ok(cmd) => {
                        let back = InstanceUpdate::Unhandled {
                            id: self.cfg.instance_uuid.clone(),
                            cmd,
                        };
                        if let Err(crossbeam_channel::SendError(u)) = self.updates.send(back)
                            && let InstanceUpdate::Unhandled { cmd, .. } = u
                        {
                            self.refuse_shutting_down(&cmd);
                        }
                        in_hand.put_down();
                    }
                    Err(_) => return,
                },
                recv(shutdown) -> _ => return self.refuse_queued(cmds, in_hand),
            }
        }
    }

    /// At shutdown: what is still queued is answered, not dropped.
    #[inline(never)] // Keeps the waiting frame small (`Body::run`).
    fn refuse_queued(&self, cmds: &Receiver<InstanceCmd>, in_hand: &InHand) {
        while let Ok(cmd) = cmds.try_recv() {
            self.refuse_shutting_down(&cmd);
            in_hand.put_down();
        }
    }

    #[inline(never)] // Keeps the waiting frame small (`Body::run`).
    fn refuse_shutting_down(&self, cmd: &InstanceCmd) {
        info!(
            "{}: {} not carried out: the launcher is shutting down",
            self.cfg.instance_uuid,
            cmd.kind().name()
        );
        cmd.refuse(&self.ctx, &self.cfg.instance_uuid, Reason::InstanceBusy);
    }

    #[inline(never)] // Keeps the waiting frame small (`Body::run`).
    fn recover(&mut self, stopped: bool) {
        self.vm.init(&self.cfg, &self.dir);
        if self.ctx.network.is_on() && !self.cfg.networking.vnic_mac.is_empty() {
            // Ownership is not in the kernel: re-learned devices get it back
            // here, so no other START can take this instance's VNIC.
            self.ctx.network.claim_vnic(&VnicRequest::of(&self.cfg));
        }
        self.report_usage();
        if !stopped {
            return self.watch(true);
        }
        if let Some(why) = self.vm.vanished() {
            return self.vanished(&why);
        }
        self.become_(Life::Exited);
    }

    /// Attaches a monitor (`boot`: re-attaching after a launcher restart);
    /// an instance that cannot be watched is treated as having exited.
    fn watch(&mut self, boot: bool) {
        match self.vm.monitor(self.mon_tx.clone(), boot) {
            Ok(m) => {
                let up = m.running_at_attach();
                self.become_(Life::Starting(m));
                if up {
                    // As if it had come through the channel.
                    self.monitor_event(MonitorEvent::Running);
                }
            }
            Err(e) => {
                warn!("{}: cannot watch the instance: {e}", self.cfg.instance_uuid);
                self.life = Life::Exited;
                self.exited(&e.to_string());
            }
        }
    }

    #[inline(never)] // Keeps the waiting frame small (`Body::run`).
    fn handle(&mut self, cmd: InstanceCmd, shutdown: &Receiver<Never>, closing: &Closing) {
        match cmd {
            InstanceCmd::Start(s) => self.start_again(&s.cfg),
            InstanceCmd::Stop => self.stop(shutdown, closing),
            InstanceCmd::Restart => self.restart(shutdown),
            InstanceCmd::Delete { stop } => self.delete(stop, shutdown, closing),
            InstanceCmd::AttachVolume(a) => self.attach_volume(a.volume),
        }
    }

    /// A START for this instance while it exists.
    fn start_again(&self, cfg: &InstanceConfig) {
        let reason = match self.life {
            Life::Starting(_) | Life::Running(_) => Reason::AlreadyRunning,
            _ => Reason::InstanceExists,
        };
        info!(
            "START {} refused: {}",
            self.cfg.instance_uuid,
            reason.as_str()
        );
        self.ctx.send_error(
            ErrorKind::Start,
            &self.cfg.instance_uuid,
            reason,
            cfg.restart,
            "",
        );
    }

    /// Carries out the START this thread was spawned for; `state`: the
    /// state file's text, if the server encoded it.
    #[inline(never)] // Keeps the waiting frame small (`Body::run`).
    fn start(&mut self, state: Option<Vec<u8>>) {
        let dir = if self.vm.keeps_files() {
            self.ctx.store.create_instance_dir(&self.cfg.instance_uuid)
        } else {
            // Made with the state file, after the acknowledgement.
            self.ctx.store.claim_instance_dir(&self.cfg.instance_uuid)
        };
        match dir {
            Ok(dir) => self.dir = dir,
            Err(e @ StateError::Exists(_)) => {
                // Files of an instance we do not know: never touch them.
                self.fail(ErrorKind::Start, Reason::InstanceExists, &e);
                return self.leave(Farewell::Silent);
            }
            Err(e) => {
                self.fail(ErrorKind::Start, Reason::ImageFailure, &e);
                return self.leave(Farewell::Silent);
            }
        }
        self.vm.init(&self.cfg, &self.dir);
        if let Err(e) = self.vm.ensure_backing_image() {
            return self.start_failed(e.reason(Reason::ImageFailure), &e, false);
        }
        // Before the image, as ciao: TenantAdded reaches the concentrator
        // before the instance boots.
        if let Err((reason, cause)) = self.plug_vnic() {
            return self.start_failed(reason, &cause, false);
        }
        // Chosen before the state is written, which records it.
        let mut state = state;
        match self.vm.choose_ssh_forward() {
            Ok(a) if a != self.cfg.ssh_forward => {
                self.cfg.ssh_forward = a;
                // Encoded by the server before this choice: encode it anew.
                state = None;
            }
            Ok(_) => {}
            Err(e) => return self.start_failed(e.reason(Reason::LaunchFailure), &e, false),
        }
        let t0 = Instant::now();
        let (made, saved) = self.create_image_and_save(state);
        if let Err(e) = made {
            return self.start_failed(e.reason(Reason::ImageFailure), &e, true);
        }
        // StartFailure has no `state_failure` in ciao's scheduler: a state
        // that cannot be written is reported as the instance's image.
        if let Err(e) = saved {
            return self.start_failed(Reason::ImageFailure, &e, true);
        }
        if self.cfg.ssh_forward.is_some() {
            self.tell_ssh();
        }
        if let Err(e) = self.vm.start() {
            return self.start_failed(e.reason(Reason::LaunchFailure), &e, true);
        }
        // A container's NIC can only go in once it runs; failing that, the
        // container goes again (nothing is left behind).
        if let Err((reason, cause)) = self.plug_container() {
            return self.start_failed(reason, &cause, true);
        }
        debug!(
            "{}: started {:?} after its START",
            self.cfg.instance_uuid,
            t0.elapsed()
        );
        info!(
            "{} started ({}, {} vCPU, {} MB)",
            self.cfg.instance_uuid,
            self.cfg.vm_type.name(),
            self.cfg.vcpus,
            self.cfg.mem_mb
        );
        self.watch(false);
        self.update(InstanceUpdate::StatusNow);
    }

    /// Creates the instance's artefacts and makes its state durable, both
    /// before the instance boots or the scheduler hears of it. The state is
    /// written while the virtualizer's external programs run (a VM's overlay
    /// is made by qemu-img), on this thread: a helper thread per START cost
    /// more than it saved on a host busy booting guests.
    fn create_image_and_save(
        &mut self,
        state: Option<Vec<u8>>,
    ) -> (Result<(), VirtError>, Result<(), StateError>) {
        let (store, id, vm, cfg) = (
            &self.ctx.store,
            &self.cfg.instance_uuid,
            &mut self.vm,
            &self.cfg,
        );
        // Called once; the server's text is handed over to the store.
        let mut state = Some(state);
        let mut save = || match state.take().flatten() {
            Some(text) => store.save_encoded(id, text),
            None => store.save_config(id, cfg, false),
        };
        let t = Instant::now();
        let mut saved = None;
        let made = vm.create_image_while(&mut || {
            if saved.is_none() {
                let t = Instant::now();
                saved = Some(save());
                debug!("{id}: state saved in {:?}", t.elapsed());
            }
        });
        debug!("{id}: disk, config drive and state in {:?}", t.elapsed());
        // A virtualizer that never ran `meanwhile`: save now.
        let saved = saved.unwrap_or_else(save);
        (made, saved)
    }

    /// A failed START: report it, remove what this START made (`made`: it
    /// got as far as making the instance's image or container), and go
    /// away. The scheduler never saw the instance, so its state and
    /// directory go even when the virtualizer cannot clean up now; what it
    /// leaves carries our labels and is swept at the next start.
    fn start_failed(&mut self, reason: Reason, cause: &dyn std::fmt::Display, made: bool) {
        self.fail(ErrorKind::Start, reason, cause);
        if made && let Err(e) = self.vm.delete_image() {
            warn!(
                "{}: clean-up after the failed START: {e}",
                self.cfg.instance_uuid
            );
        }
        if self.vnic_made {
            self.unplug_vnic();
        }
        if let Err(e) = self.ctx.store.remove(&self.cfg.instance_uuid) {
            // No usable state is left in it: recovery removes the rest.
            warn!(
                "{}: clean-up after the failed START: {e}",
                self.cfg.instance_uuid
            );
        }
        self.leave(Farewell::Silent);
    }

    /// Removes what the virtualizer keeps, then the state (the commit point
    /// of a deletion), then the rest of the instance directory.
    fn remove_all(&mut self) -> Result<(), String> {
        self.vm.delete_image().map_err(|e| e.to_string())?;
        // The instance is gone from the virtualizer: its VNIC can go.
        self.unplug_vnic();
        self.ctx
            .store
            .remove_state(&self.cfg.instance_uuid)
            .map_err(|e| e.to_string())?;
        if let Err(e) = self.ctx.store.remove_dir(&self.cfg.instance_uuid) {
            // No state any more: the instance is gone; recovery sweeps the rest.
            warn!("{}: {e}", self.cfg.instance_uuid);
        }
        Ok(())
    }

    /// Waits for the monitor to confirm the instance is gone.
    fn wait_exit(&mut self, shutdown: &Receiver<Never>) -> Result<String, WaitError> {
        let deadline = crossbeam_channel::after(self.ctx.stop_wait);
        loop {
            select! {
                recv(self.mon_rx) -> ev => match ev {
                    Ok(MonitorEvent::Exited(why) | MonitorEvent::Vanished(why)) => return Ok(why),
                    Ok(MonitorEvent::Running) => continue,
                    Ok(MonitorEvent::Usage(u)) => self.send_usage(*u),
                    Err(_) => return Err(WaitError::MonitorGone),
                },
                recv(shutdown) -> _ => return Err(WaitError::Shutdown),
                recv(deadline) -> _ => return Err(WaitError::Timeout),
            }
        }
    }

    /// Ends a starting or running instance (gracefully, or at once with
    /// `kill`) and waits until it is gone. On success the life is `Exited`;
    /// otherwise it is unchanged and the error says why.
    fn end_running(&mut self, kill: bool, shutdown: &Receiver<Never>) -> Result<(), String> {
        let (mut m, seen_running) = match std::mem::replace(&mut self.life, Life::Exited) {
            Life::Starting(m) => (m, false),
            Life::Running(m) => (m, true),
            other => {
                self.life = other;
                return Ok(());
            }
        };
        let restore = |m| {
            if seen_running {
                Life::Running(m)
            } else {
                Life::Starting(m)
            }
        };
        let asked = if kill { m.kill() } else { m.stop() };
        if let Err(e) = asked {
            self.life = restore(m);
            return Err(e.to_string());
        }
        match self.wait_exit(shutdown) {
            Ok(why) => {
                info!("{} stopped ({why})", self.cfg.instance_uuid);
                self.vm.lost();
                drop(m);
                self.become_(Life::Exited);
                Ok(())
            }
            Err(e) => {
                self.life = restore(m);
                Err(e.to_string())
            }
        }
    }

    fn stop(&mut self, shutdown: &Receiver<Never>, closing: &Closing) {
        if !matches!(self.life, Life::Starting(_) | Life::Running(_)) {
            return self.fail(ErrorKind::Stop, Reason::AlreadyStopped, &"not running");
        }
        if let Err(e) = self.save(true) {
            return self.fail(ErrorKind::Stop, Reason::StateFailure, &e);
        }
        if let Err(e) = self.end_running(false, shutdown) {
            // Not stopped: the disk says so again.
            if let Err(e) = self.save(false) {
                error!("{}: state left saying stopped: {e}", self.cfg.instance_uuid);
            }
            let reason = if closing.is_set() {
                Reason::InstanceBusy
            } else {
                Reason::InstanceFailure
            };
            return self.fail(ErrorKind::Stop, reason, &e);
        }
        self.report_usage();
    }

    fn restart(&mut self, shutdown: &Receiver<Never>) {
        if !matches!(self.life, Life::Exited) {
            return self.fail(ErrorKind::Restart, Reason::AlreadyRunning, &"running");
        }
        if let Some(why) = self.vm.vanished() {
            self.fail(ErrorKind::Restart, Reason::NoInstance, &why);
            return self.vanished(&why);
        }
        // The VNIC outlives a stop (persistent tap): re-opened for the boot.
        if let Err((reason, cause)) = self.plug_vnic() {
            return self.fail(ErrorKind::Restart, reason, &cause);
        }
        let before = self.cfg.ssh_forward;
        match self.vm.choose_ssh_forward() {
            Ok(a) => self.cfg.ssh_forward = a,
            Err(e) => return self.fail(ErrorKind::Restart, e.reason(Reason::LaunchFailure), &e),
        }
        if let Err(e) = self.save(false) {
            self.cfg.ssh_forward = before;
            return self.fail(ErrorKind::Restart, Reason::StateFailure, &e);
        }
        if self.cfg.ssh_forward != before {
            self.tell_ssh();
        }
        if let Err(e) = self.vm.start() {
            if let Err(e) = self.save(true) {
                error!("{}: state left saying running: {e}", self.cfg.instance_uuid);
            }
            return self.fail(ErrorKind::Restart, e.reason(Reason::LaunchFailure), &e);
        }
        self.watch(false);
        // A container that cannot get its NIC is not restarted after all:
        // it is ended again and stays stopped, so the RestartFailure is
        // the only outcome the scheduler sees.
        if let Err((reason, cause)) = self.plug_container() {
            if let Err(e) = self.end_running(true, shutdown) {
                error!(
                    "{}: running without its tenant NIC: {e}",
                    self.cfg.instance_uuid
                );
            } else if let Err(e) = self.save(true) {
                error!("{}: state left saying running: {e}", self.cfg.instance_uuid);
            }
            return self.fail(ErrorKind::Restart, reason, &cause);
        }
        info!("{} restarted", self.cfg.instance_uuid);
    }

    fn delete(&mut self, stop: bool, shutdown: &Receiver<Never>, closing: &Closing) {
        if let Err(e) = self.end_running(true, shutdown) {
            let reason = if closing.is_set() {
                Reason::InstanceBusy
            } else {
                Reason::InstanceFailure
            };
            return self.fail(ErrorKind::Delete, reason, &e);
        }
        if let Err(e) = self.remove_all() {
            // Still here, exited: a later DELETE tries again.
            return self.fail(ErrorKind::Delete, Reason::StateFailure, &e);
        }
        info!("{} deleted", self.cfg.instance_uuid);
        self.leave(if stop {
            Farewell::Stopped
        } else {
            Farewell::Deleted
        });
    }

    /// An AttachVolumeFailure, logged.
    fn fail_attach(&self, volume: &str, reason: Reason, cause: &dyn std::fmt::Display) {
        warn!(
            "AttachVolume failure for {} (volume {volume}): {} ({cause})",
            self.cfg.instance_uuid,
            reason.as_str()
        );
        self.ctx.send_error(
            ErrorKind::AttachVolume,
            &self.cfg.instance_uuid,
            reason,
            false,
            volume,
        );
    }

    fn attach_volume(&mut self, volume: String) {
        if self.cfg.vm_type == VmType::Docker {
            return self.fail_attach(&volume, Reason::NotSupported, &"a container");
        }
        if self.cfg.volumes.iter().any(|v| v.uuid == volume) {
            return self.fail_attach(&volume, Reason::AlreadyAttached, &"listed already");
        }
        // A running VM gets it now; a stopped one at its next boot. The
        // monitor checks the volume as it attaches it; a stopped instance
        // only checks it now.
        let attached = match &mut self.life {
            Life::Starting(m) | Life::Running(m) => m.attach_volume(&volume),
            _ => self.vm.check_volume(&volume),
        };
        if let Err(e) = attached {
            return self.fail_attach(&volume, Reason::AttachFailure, &e);
        }
        info!("{}: volume {volume} attached", self.cfg.instance_uuid);
        self.cfg.volumes.push(Volume {
            uuid: volume.clone(),
            bootable: false,
        });
        let stopped = matches!(self.life, Life::Exited);
        if let Err(e) = self.save(stopped) {
            self.cfg.volumes.retain(|v| v.uuid != volume);
            return self.fail_attach(&volume, Reason::StateFailure, &e);
        }
        self.report_usage();
    }

    #[inline(never)] // Keeps the waiting frame small (`Body::run`).
    fn monitor_event(&mut self, ev: MonitorEvent) {
        match ev {
            MonitorEvent::Usage(u) => self.send_usage(*u),
            MonitorEvent::Running => {
                // Recovered, or the engine came back: still on its network?
                self.ensure_container_nic();
                // Only a starting instance changes (a repeated report does not).
                if !matches!(self.life, Life::Starting(_)) {
                    return;
                }
                if let Life::Starting(m) = std::mem::replace(&mut self.life, Life::Exited) {
                    self.vm.connected();
                    self.become_(Life::Running(m));
                    self.report_usage();
                }
            }
            MonitorEvent::Exited(why) => {
                // Late events of a monitor already dropped mean nothing.
                if matches!(self.life, Life::Starting(_) | Life::Running(_)) {
                    warn!("{} exited by itself: {why}", self.cfg.instance_uuid);
                    self.life = Life::Exited;
                    self.exited(&why);
                }
            }
            MonitorEvent::Vanished(why) => {
                if !self.life.is_gone() {
                    self.vanished(&why);
                }
            }
        }
    }

    /// The instance is no longer running (the monitor has been dropped).
    fn exited(&mut self, why: &str) {
        self.vm.lost();
        self.report_usage();
        match self.ctx.profile {
            // 2016: kept as `exited`, restartable.
            Profile::P2016 => {
                if let Err(e) = self.save(true) {
                    // The disk still says running; at the next start the
                    // monitor sees it exited again.
                    error!(
                        "{}: cannot record that it exited ({why}): {e}",
                        self.cfg.instance_uuid
                    );
                }
                self.become_(Life::Exited);
            }
            // 2018: instances never stay stopped.
            Profile::P2018 => {
                self.become_(Life::Exited);
                match self.remove_all() {
                    Ok(()) => self.leave(Farewell::Stopped),
                    Err(e) => error!(
                        "{}: exited, but cannot be removed: {e}",
                        self.cfg.instance_uuid
                    ),
                }
            }
        }
    }

    /// The instance's container or VM no longer exists at all (an
    /// interrupted DELETE, or removed behind the launcher's back): what is
    /// left of it is removed and it is reported gone.
    fn vanished(&mut self, why: &str) {
        warn!(
            "{}: no longer exists ({why}): removing what is left",
            self.cfg.instance_uuid
        );
        self.life = Life::Exited;
        self.vm.lost();
        match self.remove_all() {
            Ok(()) => self.leave(Farewell::Stopped),
            Err(e) => {
                error!(
                    "{}: cannot remove what is left: {e}",
                    self.cfg.instance_uuid
                );
                self.become_(Life::Exited);
            }
        }
    }
}
