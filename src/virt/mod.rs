//! The virtualizer interface (spec/launcher-behaviour.md §4) and its
//! implementations. Every method is called only from the owning instance
//! thread, so implementations need no locking.
//!
//! A running instance is watched by a *monitor* that reports to the instance
//! thread on a channel of [`MonitorEvent`]s: `Running` once the instance is
//! seen up, `Exited` once it is seen gone (guest power-off, crash, engine or
//! QMP connection lost). The instance thread holds a [`Monitor`] handle:
//! [`Monitor::stop`] asks for a graceful stop (the `Exited` event confirms it);
//! dropping the handle detaches the monitor *without* stopping the instance
//! (launcher shutdown leaves instances running).

pub mod docker;
pub mod docker_api;
pub mod qemu;
pub mod qmp;
pub mod sim;

use std::fmt;
use std::path::Path;

use crossbeam_channel::Sender;

use crate::payloads::config::InstanceConfig;

/// Why a virtualizer operation failed; the text is sent to the scheduler's log
/// and the launcher's, so it should name the cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtError(pub String);

impl fmt::Display for VirtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for VirtError {}

/// What a monitor reports to its instance thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MonitorEvent {
    /// The instance is seen running.
    Running,
    /// The instance is seen not running any more (with what is known of why).
    Exited(String),
    /// A fresh usage sample, for virtualizers that sample off the instance
    /// thread because sampling can take long (Docker).
    Usage(Usage),
    /// The instance's container or VM no longer exists at all (not merely
    /// stopped): nothing is left to restart.
    Vanished(String),
}

/// Resource usage of one instance; `None` = unknown (−1 on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub memory_mb: Option<i64>,
    pub disk_mb: Option<i64>,
    /// Percent of the instance's vCPUs.
    pub cpu_percent: Option<i64>,
}

/// The instance thread's handle on a running monitor.
pub trait Monitor: Send + fmt::Debug {
    /// Asks for a graceful stop; `Exited` follows when it is done.
    fn stop(&mut self) -> Result<(), VirtError>;
    /// Ends the instance at once (DELETE); `Exited` follows. Defaults to a stop.
    fn kill(&mut self) -> Result<(), VirtError> {
        self.stop()
    }
    /// Hot-plugs the local volume `id` into the running instance.
    fn attach_volume(&mut self, id: &str) -> Result<(), VirtError> {
        Err(VirtError(format!(
            "volume {id}: this virtualizer cannot hot-plug volumes"
        )))
    }
}

/// One way of running instances.
pub trait Virtualizer: Send + fmt::Debug {
    /// Remembers the configuration and directory; called first, also on recovery.
    fn init(&mut self, cfg: &InstanceConfig, dir: &Path);
    /// Makes sure the root image exists (`image_failure` otherwise).
    fn ensure_backing_image(&mut self) -> Result<(), VirtError>;
    /// Creates the per-instance artefacts (`image_failure` otherwise).
    fn create_image(&mut self) -> Result<(), VirtError>;
    /// `create_image`, calling `meanwhile` once while external programs do
    /// the work (the instance writes its state then, so the two overlap
    /// without a thread of their own). Default: create, then `meanwhile`.
    fn create_image_while(&mut self, meanwhile: &mut dyn FnMut()) -> Result<(), VirtError> {
        let made = self.create_image();
        meanwhile();
        made
    }
    /// Removes state kept outside the instance directory (errors are logged only).
    fn delete_image(&mut self) -> Result<(), VirtError>;
    /// Boots the instance (`launch_failure` otherwise).
    fn start(&mut self) -> Result<(), VirtError>;
    /// Starts watching the instance; `boot` is true when re-attaching after a
    /// launcher restart (the instance may have died meanwhile).
    fn monitor(
        &mut self,
        events: Sender<MonitorEvent>,
        boot: bool,
    ) -> Result<Box<dyn Monitor>, VirtError>;
    /// Current usage.
    fn stats(&mut self) -> Usage;
    /// Checks that the volume `id` can be attached at the next boot
    /// (AttachVolume while the instance is not running; a running one's
    /// monitor checks as it hot-plugs).
    fn check_volume(&mut self, _id: &str) -> Result<(), VirtError> {
        Ok(())
    }
    /// `Some(why)` when the instance's container or VM no longer exists at
    /// all (an interrupted DELETE, or removed behind the launcher's back);
    /// `None` when it exists or that cannot be told now (an engine that is
    /// down proves nothing).
    fn vanished(&mut self) -> Option<String> {
        None
    }
    /// The monitor saw the instance running.
    fn connected(&mut self) {}
    /// The instance is gone (monitor saw it exit, or a stop completed).
    fn lost(&mut self) {}
}

/// Makes a virtualizer for a new or recovered instance.
pub trait VirtualizerFactory: Send + Sync + fmt::Debug {
    fn create(&self, cfg: &InstanceConfig) -> Box<dyn Virtualizer>;
    /// Removes, at launcher start, what an interrupted START left outside
    /// the instance directories: resources that carry this node's labels
    /// but belong to no instance directory (`recorded` says which ids have
    /// one). Returns a line per resource removed, for the log.
    fn sweep(&self, _recorded: &dyn Fn(&str) -> bool) -> Vec<String> {
        Vec::new()
    }
}

/// Production: containers through Docker, VMs through QEMU.
#[derive(Debug, Clone)]
pub struct NodeFactory {
    pub docker: docker::DockerFactory,
    pub qemu: qemu::QemuFactory,
}

impl VirtualizerFactory for NodeFactory {
    fn create(&self, cfg: &InstanceConfig) -> Box<dyn Virtualizer> {
        match cfg.vm_type {
            crate::payloads::config::VmType::Docker => self.docker.create(cfg),
            crate::payloads::config::VmType::Qemu => self.qemu.create(cfg),
        }
    }

    fn sweep(&self, recorded: &dyn Fn(&str) -> bool) -> Vec<String> {
        self.docker.sweep(recorded)
    }
}

/// A virtualizer that refuses everything, saying why.
#[derive(Debug)]
pub struct Unavailable(pub &'static str);

impl Virtualizer for Unavailable {
    fn init(&mut self, _cfg: &InstanceConfig, _dir: &Path) {}
    fn ensure_backing_image(&mut self) -> Result<(), VirtError> {
        Err(VirtError(self.0.into()))
    }
    fn create_image(&mut self) -> Result<(), VirtError> {
        Err(VirtError(self.0.into()))
    }
    fn delete_image(&mut self) -> Result<(), VirtError> {
        Ok(())
    }
    fn start(&mut self) -> Result<(), VirtError> {
        Err(VirtError(self.0.into()))
    }
    fn monitor(
        &mut self,
        _events: Sender<MonitorEvent>,
        _boot: bool,
    ) -> Result<Box<dyn Monitor>, VirtError> {
        Err(VirtError(self.0.into()))
    }
    fn stats(&mut self) -> Usage {
        Usage::default()
    }
}
