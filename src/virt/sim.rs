//! The simulation virtualizer (`-simulation`, scale tests, threading tests).
//!
//! Nothing runs: a "started" instance is a flag in a table shared by every
//! simulated instance of the process ([`SimControl`]). It needs no thread of
//! its own, so 10 000 simulated instances cost 10 000 instance threads and
//! nothing more. The monitor reports `Running` as soon as it is attached
//! (by [`Monitor::running_at_attach`], not through the event channel),
//! unless the control is in *manual* mode, where a test releases each
//! instance with [`SimControl::report_running`]. Tests inject failures
//! ([`SimControl::fail_image`], [`SimControl::fail_start`]) and crashes
//! ([`SimControl::crash`]).
//!
//! An instance this process never saw is assumed to have outlived a launcher
//! restart (as a VM would), unless [`SimControl::power_cut`] simulated a
//! host reboot.
//!
//! Usage figures follow ciao's simulation: a tenth of the configured memory,
//! disk and vCPUs. They never change, so a simulated instance is not
//! sampled on the usage tick: an idle one does not wake at all.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use crossbeam_channel::{Receiver, Sender};

use super::{Monitor, MonitorEvent, Usage, VirtError, Virtualizer, VirtualizerFactory};
use crate::payloads::config::InstanceConfig;

/// An instance id as the simulation keeps it: shared, not copied.
type Id = Arc<str>;

#[derive(Debug, Default)]
struct Table {
    /// Monitors attached, by instance. The instance ids here and in the sets
    /// of running, stopped and held instances share one allocation with the
    /// instance's `Sim` (a node of thousands of simulated instances).
    monitors: HashMap<Id, Sender<MonitorEvent>>,
    /// Instances "running" (survives a launcher restart within the process,
    /// like a VM survives the launcher).
    running: HashSet<Id>,
    /// Instances stopped or crashed in this process.
    stopped: HashSet<Id>,
    /// After [`SimControl::power_cut`] nothing survives.
    rebooted: bool,
    /// Instances whose Running report is held back (manual mode).
    held: HashSet<Id>,
    manual: bool,
    fail_image: HashSet<String>,
    fail_start: HashSet<String>,
    /// Instances whose stop never completes (a wedged guest).
    hang_stop: HashSet<String>,
    /// Instances whose next `ensure_backing_image` waits for the test.
    gates: HashMap<String, Receiver<()>>,
}

/// The simulated "hypervisor": shared by every simulated instance; tests keep
/// a clone to steer it.
#[derive(Debug, Clone, Default)]
pub struct SimControl {
    table: Arc<Mutex<Table>>,
}

impl SimControl {
    pub fn new() -> SimControl {
        SimControl::default()
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // Every critical section is a few set/map operations: a poisoned
        // lock still holds a consistent table.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// In manual mode a monitor reports `Running` only when the test says so.
    pub fn set_manual(&self, manual: bool) {
        self.lock().manual = manual;
    }

    /// Releases a held `Running` report; false if the instance has no monitor
    /// waiting.
    pub fn report_running(&self, id: &str) -> bool {
        let mut t = self.lock();
        if !t.held.remove(id) {
            return false;
        }
        t.monitors
            .get(id)
            .is_some_and(|m| m.send(MonitorEvent::Running).is_ok())
    }

    /// Simulates the instance dying by itself; false if it was not running.
    pub fn crash(&self, id: &str) -> bool {
        let mut t = self.lock();
        if !t.running.remove(id) {
            return false;
        }
        t.stopped.insert(Id::from(id));
        t.held.remove(id);
        if let Some(m) = t.monitors.get(id) {
            let _ = m.send(MonitorEvent::Exited("simulated crash".into()));
        }
        true
    }

    /// The next `ensure_backing_image` of `id` fails.
    pub fn fail_image(&self, id: &str) {
        self.lock().fail_image.insert(id.to_string());
    }

    /// The next `start` of `id` fails.
    pub fn fail_start(&self, id: &str) {
        self.lock().fail_start.insert(id.to_string());
    }

    /// The next `ensure_backing_image` of `id` waits until the returned
    /// sender is used or dropped (at most a minute): the instance thread is
    /// busy in its START meanwhile, so commands queue in its inbox.
    pub fn gate_image(&self, id: &str) -> Sender<()> {
        let (open, gate) = crossbeam_channel::bounded(1);
        self.lock().gates.insert(id.to_string(), gate);
        open
    }

    /// Stops of `id` are accepted but never complete.
    pub fn hang_stop(&self, id: &str) {
        self.lock().hang_stop.insert(id.to_string());
    }

    pub fn is_running(&self, id: &str) -> bool {
        self.lock().running.contains(id)
    }

    pub fn running_count(&self) -> usize {
        self.lock().running.len()
    }

    /// Forgets everything "running", as a host reboot would.
    pub fn power_cut(&self) {
        let mut t = self.lock();
        t.running.clear();
        t.held.clear();
        t.rebooted = true;
    }
}

/// Makes simulated virtualizers that share one [`SimControl`].
#[derive(Debug, Clone, Default)]
pub struct SimFactory {
    pub control: SimControl,
}

impl VirtualizerFactory for SimFactory {
    fn create(&self, cfg: &InstanceConfig) -> Box<dyn Virtualizer> {
        Box::new(Sim {
            id: Id::from(cfg.instance_uuid.as_str()),
            usage: Sim::usage_of(cfg),
            control: self.control.clone(),
        })
    }
}

/// One simulated instance.
#[derive(Debug)]
pub struct Sim {
    id: Id,
    /// All a simulated instance needs of its configuration (no copy of the
    /// rest is kept: the instance thread has it).
    usage: Usage,
    control: SimControl,
}

impl Sim {
    fn usage_of(cfg: &InstanceConfig) -> Usage {
        Usage {
            memory_mb: Some((cfg.mem_mb / 10) as i64),
            disk_mb: Some((cfg.disk_mb / 10) as i64),
            cpu_percent: Some(i64::from(cfg.vcpus / 10)),
        }
    }
}

#[derive(Debug)]
struct SimMonitor {
    id: Id,
    control: SimControl,
    running_at_attach: bool,
}

impl Monitor for SimMonitor {
    fn running_at_attach(&self) -> bool {
        self.running_at_attach
    }

    fn stop(&mut self) -> Result<(), VirtError> {
        let mut t = self.control.lock();
        if t.hang_stop.contains(&*self.id) {
            return Ok(());
        }
        t.running.remove(&self.id);
        t.stopped.insert(self.id.clone());
        t.held.remove(&self.id);
        match t.monitors.get(&self.id) {
            Some(m) => m
                .send(MonitorEvent::Exited("stopped".into()))
                .map_err(|_| VirtError::other("the instance is no longer watched")),
            None => Err(VirtError::other("no monitor attached")),
        }
    }
}

impl Drop for SimMonitor {
    /// Detaching leaves the instance "running".
    fn drop(&mut self) {
        self.control.lock().monitors.remove(&self.id);
    }
}

impl Virtualizer for Sim {
    fn init(&mut self, cfg: &InstanceConfig, _dir: &Path) {
        // The factory made it from this configuration: nothing to copy again.
        if *self.id != *cfg.instance_uuid {
            self.id = Id::from(cfg.instance_uuid.as_str());
        }
        self.usage = Sim::usage_of(cfg);
    }

    /// A pretend instance takes any NIC and lets its descriptors go (a
    /// tenant tap stays on its bridge: it is persistent).
    fn set_nic(&mut self, _nic: super::qemu::Nic) -> Result<(), VirtError> {
        Ok(())
    }

    fn ensure_backing_image(&mut self) -> Result<(), VirtError> {
        let gate = self.control.lock().gates.remove(&*self.id);
        if let Some(gate) = gate {
            let _ = gate.recv_timeout(std::time::Duration::from_secs(60));
        }
        if self.control.lock().fail_image.remove(&*self.id) {
            return Err(VirtError::other("simulated image failure"));
        }
        Ok(())
    }

    fn create_image(&mut self) -> Result<(), VirtError> {
        Ok(())
    }

    fn delete_image(&mut self) -> Result<(), VirtError> {
        Ok(())
    }

    fn start(&mut self) -> Result<(), VirtError> {
        let mut t = self.control.lock();
        if t.fail_start.remove(&*self.id) {
            return Err(VirtError::other("simulated launch failure"));
        }
        t.running.insert(self.id.clone());
        t.stopped.remove(&self.id);
        Ok(())
    }

    fn monitor(
        &mut self,
        events: Sender<MonitorEvent>,
        boot: bool,
    ) -> Result<Box<dyn Monitor>, VirtError> {
        let mut t = self.control.lock();
        // Re-attaching to an instance this process never saw (the launcher
        // restarted): like a VM, it outlived the launcher.
        if boot && !t.rebooted && !t.running.contains(&self.id) && !t.stopped.contains(&self.id) {
            t.running.insert(self.id.clone());
        }
        let up = t.running.contains(&self.id);
        let mut running_at_attach = false;
        if !up {
            // Re-attached after a "reboot", or never started.
            let _ = events.send(MonitorEvent::Exited("not running".into()));
        } else if t.manual {
            t.held.insert(self.id.clone());
        } else {
            // Said by the return value, not sent: most simulated instances
            // then never send anything through their channel.
            running_at_attach = true;
        }
        t.monitors.insert(self.id.clone(), events);
        Ok(Box::new(SimMonitor {
            id: self.id.clone(),
            control: self.control.clone(),
            running_at_attach,
        }))
    }

    /// A fixed share of the configuration: never sampled again.
    fn usage_varies(&self) -> bool {
        false
    }

    /// A simulated instance has no files: only its state.
    fn keeps_files(&self) -> bool {
        false
    }

    fn stats(&mut self) -> Usage {
        self.usage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sim(control: &SimControl, id: &str) -> Box<dyn Virtualizer> {
        let cfg = InstanceConfig {
            instance_uuid: id.into(),
            mem_mb: 370,
            vcpus: 2,
            ..Default::default()
        };
        SimFactory {
            control: control.clone(),
        }
        .create(&cfg)
    }

    #[test]
    fn create_image_while_runs_meanwhile_once() {
        let control = SimControl::new();
        let mut vm = sim(&control, "9f5d3e1c-2b4a-4c6d-8e7f-0a1b2c3d4e5f");
        let mut calls = 0;
        vm.create_image_while(&mut || calls += 1)
            .expect("a simulated image is always made");
        assert_eq!(calls, 1);
    }

    #[test]
    fn start_monitor_stop() {
        let c = SimControl::new();
        let mut v = sim(&c, "a");
        v.ensure_backing_image().expect("image");
        v.start().expect("start");
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut m = v.monitor(tx, false).expect("monitor");
        assert!(m.running_at_attach());
        assert!(rx.try_recv().is_err(), "said by the monitor, not sent");
        m.stop().expect("stop");
        assert!(matches!(rx.try_recv(), Ok(MonitorEvent::Exited(_))));
        assert!(!c.is_running("a"));
        assert_eq!(v.stats().memory_mb, Some(37));
    }

    #[test]
    fn crash_and_detach() {
        let c = SimControl::new();
        let mut v = sim(&c, "b");
        v.start().expect("start");
        let (tx, rx) = crossbeam_channel::unbounded();
        let m = v.monitor(tx.clone(), false).expect("monitor");
        assert!(m.running_at_attach());
        drop(m); // detach: still running
        assert!(c.is_running("b"));
        let m = v.monitor(tx, true).expect("re-attach");
        assert!(m.running_at_attach());
        assert!(rx.try_recv().is_err());
        assert!(c.crash("b"));
        assert!(matches!(rx.try_recv(), Ok(MonitorEvent::Exited(_))));
        assert!(!c.crash("b"));
    }

    #[test]
    fn manual_mode_and_injected_failures() {
        let c = SimControl::new();
        c.set_manual(true);
        let mut v = sim(&c, "c");
        c.fail_image("c");
        assert!(v.ensure_backing_image().is_err());
        assert!(v.ensure_backing_image().is_ok());
        c.fail_start("c");
        assert!(v.start().is_err());
        v.start().expect("second start");
        let (tx, rx) = crossbeam_channel::unbounded();
        let m = v.monitor(tx, false).expect("monitor");
        assert!(!m.running_at_attach(), "held back in manual mode");
        assert!(rx.try_recv().is_err());
        assert!(c.report_running("c"));
        assert_eq!(rx.try_recv(), Ok(MonitorEvent::Running));
    }

    #[test]
    fn unknown_instances_outlive_a_launcher_restart() {
        // A fresh control is a fresh launcher process.
        let c = SimControl::new();
        let mut v = sim(&c, "e");
        let (tx, rx) = crossbeam_channel::unbounded();
        let m = v.monitor(tx, true).expect("re-attach");
        assert!(m.running_at_attach());
        assert!(rx.try_recv().is_err());
        assert!(c.is_running("e"));
    }

    #[test]
    fn power_cut_makes_recovery_see_exits() {
        let c = SimControl::new();
        let mut v = sim(&c, "d");
        v.start().expect("start");
        c.power_cut();
        let (tx, rx) = crossbeam_channel::unbounded();
        let m = v.monitor(tx, true).expect("monitor");
        assert!(!m.running_at_attach());
        assert!(matches!(rx.try_recv(), Ok(MonitorEvent::Exited(_))));
    }
}
