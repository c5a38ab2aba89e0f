//! One thread per instance: its configuration, its virtualizer and its state
//! machine. Every command for an instance is handled here, one at a time;
//! different instances run in parallel.
//!
//! Inputs (one `select!`): the bounded command inbox (the server thread
//! `try_send`s into it and answers "busy" when it is full), monitor events,
//! the usage tick, and the shutdown channel (closed by the overseer).
//! Outputs: error/event frames through the node's outbox, and
//! [`InstanceUpdate`]s to the overseer (state, usage, "send STATUS now",
//! "gone"). The overseer never sends to an instance.
//!
//! ```text
//!           START ok            monitor: Running
//!   New ────────────> Pending ────────────────────> Running
//!    │ START fails      ▲ RESTART (2016)                │  STOP (2016), or exit/crash (2016)
//!    v                  │                               v
//!   Gone <── DELETE ── Exited <─────────────────────────┘
//!           (any state; 2018: an exit or crash deletes at once, InstanceStopped)
//! ```
//!
//! Files are written (atomically) before the scheduler hears of a change.
//! A VM's START writes its state while qemu-img makes its disk (see
//! `Virtualizer::create_image_while`), before the VM boots.
//! Shutdown leaves the instance running: the monitor is detached, not stopped.

use std::path::PathBuf;
use std::thread::{self, JoinHandle};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, select};
use log::{debug, info, warn};

use crate::node::NodeContext;
use crate::payloads::Reason;
use crate::payloads::config::{InstanceConfig, VmType, Volume};
use crate::payloads::outgoing::ErrorKind;
use crate::ssntp::Profile;
use crate::state::{StateError, StateFile};
use crate::virt::{Monitor, MonitorEvent, Unavailable, Usage, VirtError, Virtualizer};

/// Commands queued in an instance's inbox before the server answers "busy".
pub const INBOX: usize = 16;

/// A type with no values: the shutdown channels carry none, they only close.
#[derive(Debug)]
pub enum Never {}

/// Commands for one instance (server → instance).
#[derive(Debug)]
pub enum InstanceCmd {
    Start(Box<InstanceConfig>),
    /// 2016: stop, keep the instance.
    Stop,
    /// 2016: boot a stopped instance again from its stored configuration.
    Restart,
    /// Stop if running, remove every file; `stop` selects InstanceStopped
    /// over InstanceDeleted (2018).
    Delete {
        stop: bool,
    },
    AttachVolume {
        volume: String,
    },
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

/// Instance → overseer.
#[derive(Debug)]
pub enum InstanceUpdate {
    State {
        id: String,
        state: InstanceState,
    },
    Usage {
        id: String,
        usage: Usage,
        volumes: Vec<String>,
    },
    /// Send a STATUS now (after a successful START or a DELETE).
    StatusNow,
    /// The instance removed itself: forget it and free its allocations.
    Gone {
        id: String,
    },
}

/// What an instance thread starts from.
#[derive(Debug)]
pub enum Seed {
    /// A new instance; its START follows in the inbox.
    New,
    /// Found on disk at launcher start.
    Recovered(Box<StateFile>),
}

/// What the overseer keeps of a running instance thread.
#[derive(Debug)]
pub struct InstanceHandle {
    pub inbox: Sender<InstanceCmd>,
    pub thread: JoinHandle<()>,
}

/// Starts the thread of instance `id` (a validated, canonical UUID).
pub fn spawn(
    ctx: NodeContext,
    id: String,
    seed: Seed,
    updates: Sender<InstanceUpdate>,
    shutdown: Receiver<Never>,
    tick: Receiver<Instant>,
) -> std::io::Result<InstanceHandle> {
    let (inbox, cmds) = crossbeam_channel::bounded(INBOX);
    let name = format!("instance-{}", &id[..id.len().min(8)]);
    let cfg = match &seed {
        Seed::Recovered(s) => s.config.clone(),
        Seed::New => InstanceConfig {
            instance_uuid: id.clone(),
            ..Default::default()
        },
    };
    // A new instance gets its virtualizer from its START configuration.
    let vm: Box<dyn Virtualizer> = match &seed {
        Seed::Recovered(_) => ctx.factory.create(&cfg),
        Seed::New => Box::new(Unavailable("the instance has not been started")),
    };
    let (mon_tx, mon_rx) = crossbeam_channel::unbounded();
    let dir = ctx.store.instance_dir(&id).unwrap_or_default();
    let stack = ctx.instance_stack;
    let inst = Instance {
        ctx,
        id,
        dir,
        cfg,
        vm,
        monitor: None,
        mon_tx,
        mon_rx,
        exists: false,
        stopped: false,
        state: InstanceState::Pending,
        updates,
    };
    let thread = thread::Builder::new()
        .name(name)
        .stack_size(stack)
        .spawn(move || inst.run(seed, cmds, shutdown, tick))?;
    Ok(InstanceHandle { inbox, thread })
}

/// The overseer closed the shutdown channel (it carries no messages).
fn shutting_down(shutdown: &Receiver<Never>) -> bool {
    matches!(
        shutdown.try_recv(),
        Err(crossbeam_channel::TryRecvError::Disconnected)
    )
}

#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Exit,
}

#[derive(Debug)]
struct Instance {
    ctx: NodeContext,
    id: String,
    dir: PathBuf,
    cfg: InstanceConfig,
    vm: Box<dyn Virtualizer>,
    /// Present while the instance is (believed) running.
    monitor: Option<Box<dyn Monitor>>,
    mon_tx: Sender<MonitorEvent>,
    mon_rx: Receiver<MonitorEvent>,
    /// The instance directory exists (created by START or recovered).
    exists: bool,
    /// 2016: stopped and kept (persisted).
    stopped: bool,
    state: InstanceState,
    updates: Sender<InstanceUpdate>,
}

impl Instance {
    fn run(
        mut self,
        seed: Seed,
        cmds: Receiver<InstanceCmd>,
        shutdown: Receiver<Never>,
        tick: Receiver<Instant>,
    ) {
        if let Seed::Recovered(s) = seed {
            self.recover(*s);
        }
        loop {
            let flow = select! {
                recv(shutdown) -> _ => Flow::Exit,
                recv(cmds) -> c => match c {
                    Ok(c) => self.handle(c, &shutdown),
                    Err(_) => Flow::Exit,
                },
                recv(self.mon_rx) -> ev => match ev {
                    Ok(ev) => self.monitor_event(ev),
                    Err(_) => Flow::Continue,
                },
                recv(tick) -> _ => {
                    self.report_usage();
                    Flow::Continue
                }
            };
            if flow == Flow::Exit {
                break;
            }
        }
        // Dropping the monitor detaches it; the instance keeps running.
    }

    fn update(&self, u: InstanceUpdate) {
        // The overseer always drains this channel; it only fails at shutdown.
        let _ = self.updates.send(u);
    }

    fn set_state(&mut self, state: InstanceState) {
        self.state = state;
        self.update(InstanceUpdate::State {
            id: self.id.clone(),
            state,
        });
    }

    fn report_usage(&mut self) {
        let usage = self.vm.stats();
        self.send_usage(usage);
    }

    fn send_usage(&self, usage: Usage) {
        let volumes = self.cfg.volumes.iter().map(|v| v.uuid.clone()).collect();
        self.update(InstanceUpdate::Usage {
            id: self.id.clone(),
            usage,
            volumes,
        });
    }

    /// What is written to the instance's state file.
    fn state_file(&self) -> StateFile {
        StateFile {
            config: self.cfg.clone(),
            stopped: self.stopped,
        }
    }

    fn save(&self) -> Result<(), StateError> {
        self.ctx.store.save(&self.id, &self.state_file())
    }

    fn fail(&self, kind: ErrorKind, reason: Reason) {
        warn!("{kind:?} failure for {}: {}", self.id, reason.as_str());
        self.ctx
            .send_error(kind, &self.id, reason, self.cfg.restart, "");
    }

    fn recover(&mut self, s: StateFile) {
        self.cfg = s.config;
        self.stopped = s.stopped;
        self.exists = true;
        self.vm.init(&self.cfg, &self.dir);
        self.report_usage();
        if self.stopped {
            self.set_state(InstanceState::Exited);
            return;
        }
        self.attach(true);
    }

    /// Attaches a monitor; an error is treated as the instance having exited.
    fn attach(&mut self, boot: bool) -> bool {
        match self.vm.monitor(self.mon_tx.clone(), boot) {
            Ok(m) => {
                self.monitor = Some(m);
                true
            }
            Err(e) => {
                warn!("{}: cannot watch the instance: {e}", self.id);
                let _ = self.mon_tx.send(MonitorEvent::Exited(e.to_string()));
                false
            }
        }
    }

    fn handle(&mut self, cmd: InstanceCmd, shutdown: &Receiver<Never>) -> Flow {
        match cmd {
            InstanceCmd::Start(cfg) => self.start(*cfg),
            InstanceCmd::Stop => self.stop(shutdown),
            InstanceCmd::Restart => self.restart(),
            InstanceCmd::Delete { stop } => self.delete(stop, shutdown),
            InstanceCmd::AttachVolume { volume } => self.attach_volume(volume),
        }
    }

    fn start(&mut self, cfg: InstanceConfig) -> Flow {
        if self.monitor.is_some() {
            let restart = cfg.restart;
            self.ctx.send_error(
                ErrorKind::Start,
                &self.id,
                Reason::AlreadyRunning,
                restart,
                "",
            );
            return Flow::Continue;
        }
        if self.exists {
            self.ctx.send_error(
                ErrorKind::Start,
                &self.id,
                Reason::InstanceExists,
                cfg.restart,
                "",
            );
            return Flow::Continue;
        }
        self.cfg = cfg;
        self.cfg.instance_uuid = self.id.clone();
        match self.ctx.store.create_instance_dir(&self.id) {
            Ok(dir) => self.dir = dir,
            Err(StateError::Exists(_)) => {
                // Files of an instance we do not know: never touch them.
                self.fail(ErrorKind::Start, Reason::InstanceExists);
                return self.forget();
            }
            Err(e) => {
                warn!("{}: {e}", self.id);
                self.fail(ErrorKind::Start, Reason::ImageFailure);
                return self.forget();
            }
        }
        self.exists = true;
        // The configuration decides the virtualizer (container or VM): a new
        // instance only learns it here.
        self.vm = self.ctx.factory.create(&self.cfg);
        self.vm.init(&self.cfg, &self.dir);
        if let Err(e) = self.vm.ensure_backing_image() {
            warn!("{}: image: {e}", self.id);
            return self.start_failed(Reason::ImageFailure);
        }
        let t0 = Instant::now();
        let (made, saved) = self.create_image_and_save();
        if let Err(e) = made {
            warn!("{}: instance image: {e}", self.id);
            return self.start_failed(Reason::ImageFailure);
        }
        if let Err(e) = saved {
            warn!("{}: {e}", self.id);
            return self.start_failed(Reason::ImageFailure);
        }
        if let Err(e) = self.vm.start() {
            warn!("{}: launch: {e}", self.id);
            return self.start_failed(Reason::LaunchFailure);
        }
        debug!("{}: started {:?} after its START", self.id, t0.elapsed());
        info!(
            "{} started ({:?}, {} vCPU, {} MB)",
            self.id, self.cfg.vm_type, self.cfg.vcpus, self.cfg.mem_mb
        );
        self.set_state(InstanceState::Pending);
        self.attach(false);
        self.update(InstanceUpdate::StatusNow);
        Flow::Continue
    }

    /// Creates the instance's artefacts and makes its state durable, both
    /// before the instance boots or the scheduler hears of it. The state is
    /// written while the virtualizer's external programs run (a VM's overlay
    /// is made by qemu-img), on this thread: a helper thread per START cost
    /// more than it saved on a host busy booting guests.
    fn create_image_and_save(&mut self) -> (Result<(), VirtError>, Result<(), StateError>) {
        let state = self.state_file();
        let (store, id, vm) = (&self.ctx.store, &self.id, &mut self.vm);
        let t = Instant::now();
        let mut saved = None;
        let made = vm.create_image_while(&mut || {
            if saved.is_none() {
                let t = Instant::now();
                saved = Some(store.save(id, &state));
                debug!("{id}: state saved in {:?}", t.elapsed());
            }
        });
        debug!("{id}: disk, config drive and state in {:?}", t.elapsed());
        // A virtualizer that never ran `meanwhile`: save now.
        let saved = saved.unwrap_or_else(|| store.save(id, &state));
        (made, saved)
    }

    /// A failed START: report it, remove what was made, and go away.
    fn start_failed(&mut self, reason: Reason) -> Flow {
        self.fail(ErrorKind::Start, reason);
        self.remove_files();
        self.forget()
    }

    /// Tells the overseer to drop this instance and ends the thread.
    fn forget(&mut self) -> Flow {
        self.update(InstanceUpdate::Gone {
            id: self.id.clone(),
        });
        Flow::Exit
    }

    fn remove_files(&mut self) {
        if let Err(e) = self.vm.delete_image() {
            warn!("{}: {e}", self.id);
        }
        if self.exists {
            if let Err(e) = self.ctx.store.remove(&self.id) {
                warn!("{}: {e}", self.id);
            }
            self.exists = false;
        }
    }

    /// Waits for the monitor to confirm the instance is gone.
    fn wait_exit(&mut self, shutdown: &Receiver<Never>) -> Result<String, &'static str> {
        let deadline = crossbeam_channel::after(self.ctx.stop_wait);
        loop {
            select! {
                recv(self.mon_rx) -> ev => match ev {
                    Ok(MonitorEvent::Exited(why)) => return Ok(why),
                    Ok(MonitorEvent::Running) => continue,
                    Ok(MonitorEvent::Usage(u)) => self.send_usage(u),
                    Err(_) => return Err("monitor gone"),
                },
                recv(shutdown) -> _ => return Err("launcher shutting down"),
                recv(deadline) -> _ => return Err("the instance did not stop in time"),
            }
        }
    }

    /// Stops (gracefully, or at once with `kill`) a running instance and
    /// waits until it is gone; false if it would not stop.
    fn end_running(&mut self, kill: bool, shutdown: &Receiver<Never>) -> bool {
        let Some(mut m) = self.monitor.take() else {
            return true;
        };
        let asked = if kill { m.kill() } else { m.stop() };
        if let Err(e) = asked {
            warn!("{}: stop: {e}", self.id);
            self.monitor = Some(m);
            return false;
        }
        match self.wait_exit(shutdown) {
            Ok(why) => {
                info!("{} stopped ({why})", self.id);
                self.vm.lost();
                true
            }
            Err(e) => {
                warn!("{}: {e}", self.id);
                self.monitor = Some(m);
                false
            }
        }
    }

    fn stop(&mut self, shutdown: &Receiver<Never>) -> Flow {
        if self.monitor.is_none() {
            self.fail(ErrorKind::Stop, Reason::AlreadyStopped);
            return Flow::Continue;
        }
        if !self.end_running(false, shutdown) {
            if shutting_down(shutdown) {
                return Flow::Exit;
            }
            self.fail(ErrorKind::Stop, Reason::InstanceFailure);
            return Flow::Continue;
        }
        self.stopped = true;
        if let Err(e) = self.save() {
            warn!("{}: {e}", self.id);
        }
        self.set_state(InstanceState::Exited);
        self.report_usage();
        Flow::Continue
    }

    fn restart(&mut self) -> Flow {
        if self.monitor.is_some() {
            self.fail(ErrorKind::Restart, Reason::AlreadyRunning);
            return Flow::Continue;
        }
        if !self.exists {
            self.fail(ErrorKind::Restart, Reason::NoInstance);
            return Flow::Continue;
        }
        if let Err(e) = self.vm.start() {
            warn!("{}: restart: {e}", self.id);
            self.fail(ErrorKind::Restart, Reason::LaunchFailure);
            return Flow::Continue;
        }
        self.stopped = false;
        if let Err(e) = self.save() {
            warn!("{}: {e}", self.id);
        }
        info!("{} restarted", self.id);
        self.set_state(InstanceState::Pending);
        self.attach(false);
        Flow::Continue
    }

    fn delete(&mut self, stop: bool, shutdown: &Receiver<Never>) -> Flow {
        if self.monitor.is_some() && !self.end_running(true, shutdown) {
            if shutting_down(shutdown) {
                return Flow::Exit;
            }
            self.fail(ErrorKind::Delete, Reason::InstanceFailure);
            return Flow::Continue;
        }
        self.remove_files();
        info!("{} deleted", self.id);
        self.ctx.send_gone_event(&self.id, stop);
        self.update(InstanceUpdate::Gone {
            id: self.id.clone(),
        });
        self.update(InstanceUpdate::StatusNow);
        Flow::Exit
    }

    /// An AttachVolumeFailure, logged.
    fn fail_attach(&self, volume: &str, reason: Reason) {
        warn!(
            "AttachVolume failure for {} (volume {volume}): {}",
            self.id,
            reason.as_str()
        );
        self.ctx
            .send_error(ErrorKind::AttachVolume, &self.id, reason, false, volume);
    }

    fn attach_volume(&mut self, volume: String) -> Flow {
        if self.cfg.vm_type == VmType::Docker {
            self.fail_attach(&volume, Reason::NotSupported);
            return Flow::Continue;
        }
        if self.cfg.volumes.iter().any(|v| v.uuid == volume) {
            self.fail_attach(&volume, Reason::AlreadyAttached);
            return Flow::Continue;
        }
        // A running VM gets it now; a stopped one at its next boot.
        // The monitor checks the volume as it attaches it; a stopped
        // instance only checks it now.
        let attached = match &mut self.monitor {
            Some(m) => m.attach_volume(&volume),
            None => self.vm.check_volume(&volume),
        };
        if let Err(e) = attached {
            warn!("{}: attach {volume}: {e}", self.id);
            self.fail_attach(&volume, Reason::AttachFailure);
            return Flow::Continue;
        }
        info!("{}: volume {volume} attached", self.id);
        self.cfg.volumes.push(Volume {
            uuid: volume.clone(),
            bootable: false,
        });
        if let Err(e) = self.save() {
            warn!("{}: {e}", self.id);
            self.cfg.volumes.retain(|v| v.uuid != volume);
            self.fail_attach(&volume, Reason::StateFailure);
            return Flow::Continue;
        }
        self.report_usage();
        Flow::Continue
    }

    fn monitor_event(&mut self, ev: MonitorEvent) -> Flow {
        match ev {
            MonitorEvent::Usage(u) => {
                self.send_usage(u);
                Flow::Continue
            }
            MonitorEvent::Running => {
                if self.monitor.is_some() && self.state != InstanceState::Running {
                    self.vm.connected();
                    self.set_state(InstanceState::Running);
                    self.report_usage();
                }
                Flow::Continue
            }
            MonitorEvent::Exited(why) => {
                if self.monitor.take().is_none() && self.state == InstanceState::Exited {
                    return Flow::Continue;
                }
                warn!("{} exited by itself: {why}", self.id);
                self.vm.lost();
                self.report_usage();
                match self.ctx.profile {
                    // 2016: kept as `exited`, restartable.
                    Profile::P2016 => {
                        self.stopped = true;
                        if let Err(e) = self.save() {
                            warn!("{}: {e}", self.id);
                        }
                        self.set_state(InstanceState::Exited);
                        Flow::Continue
                    }
                    // 2018: instances never stay stopped.
                    Profile::P2018 => {
                        self.set_state(InstanceState::Exited);
                        self.remove_files();
                        self.ctx.send_gone_event(&self.id, true);
                        self.update(InstanceUpdate::Gone {
                            id: self.id.clone(),
                        });
                        self.update(InstanceUpdate::StatusNow);
                        Flow::Exit
                    }
                }
            }
        }
    }
}
