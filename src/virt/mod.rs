//! The virtualizer interface (docs/architecture.md, Virtualizers) and its
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

pub mod cloudinit;
pub mod docker;
pub mod docker_api;
pub mod qemu;
pub mod qmp;
pub mod sim;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use crossbeam_channel::Sender;

use crate::payloads::Reason;
use crate::payloads::config::InstanceConfig;

/// What kind of failure a [`VirtError`] is: it decides the reason the
/// scheduler is given ([`VirtError::reason`]), the only place that mapping
/// is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtErrorKind {
    /// The engine (dockerd) or a program (qemu, qemu-img) cannot be reached
    /// or run.
    Unreachable,
    /// An image, backing file, volume or config drive is missing or unusable.
    Image,
    /// The instance was made but could not be launched.
    Launch,
    /// The running instance's monitor (QMP, the engine's wait) failed.
    Monitor,
    /// A resource has the instance's name but is not ours: left alone.
    NotOurs,
    /// Anything else; the caller's phase decides the reason.
    Other,
}

/// Why a virtualizer operation failed: its kind, and a text that names the
/// cause (it goes to the launcher's log, once, by whoever gives up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtError {
    pub kind: VirtErrorKind,
    message: String,
}

impl VirtError {
    pub fn new(kind: VirtErrorKind, message: impl Into<String>) -> VirtError {
        VirtError {
            kind,
            message: message.into(),
        }
    }
    pub fn other(message: impl Into<String>) -> VirtError {
        VirtError::new(VirtErrorKind::Other, message)
    }
    pub fn unreachable(message: impl Into<String>) -> VirtError {
        VirtError::new(VirtErrorKind::Unreachable, message)
    }
    pub fn image(message: impl Into<String>) -> VirtError {
        VirtError::new(VirtErrorKind::Image, message)
    }
    pub fn launch(message: impl Into<String>) -> VirtError {
        VirtError::new(VirtErrorKind::Launch, message)
    }
    pub fn monitor(message: impl Into<String>) -> VirtError {
        VirtError::new(VirtErrorKind::Monitor, message)
    }
    pub fn not_ours(message: impl Into<String>) -> VirtError {
        VirtError::new(VirtErrorKind::NotOurs, message)
    }

    /// The reason for the scheduler: by kind, or `phase` (what the step
    /// that failed stands for, e.g. `image_failure` while making the disk)
    /// for [`VirtErrorKind::Other`]. An engine that cannot be reached is a
    /// launch failure wherever it happens (the image is not at fault); a
    /// foreign resource with our name is an image failure (ciao's reason
    /// for "could not create the container").
    pub fn reason(&self, phase: Reason) -> Reason {
        match self.kind {
            VirtErrorKind::Unreachable | VirtErrorKind::Launch => Reason::LaunchFailure,
            VirtErrorKind::Image | VirtErrorKind::NotOurs => Reason::ImageFailure,
            VirtErrorKind::Monitor => Reason::InstanceFailure,
            VirtErrorKind::Other => phase,
        }
    }
}

impl fmt::Display for VirtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for VirtError {}

/// What a monitor reports to its instance thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MonitorEvent {
    /// The instance is seen running (Docker: also again after the engine
    /// was unreachable).
    Running,
    /// The instance is seen not running any more (with what is known of why).
    Exited(String),
    /// A fresh usage sample, for virtualizers that sample off the instance
    /// thread because sampling can take long (Docker). Boxed: every slot of
    /// the per-instance channel is as large as the largest event, and an
    /// unbounded channel allocates its slots 31 at a time on its first
    /// message (24-byte events: a 1 000-byte block instead of 1 744).
    Usage(Box<Usage>),
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
    /// True when the instance was known to be running as the monitor was
    /// attached, and that was not sent as a `Running` event (the instance
    /// thread acts on it at once instead). An instance whose monitor never
    /// sends anything then never pays for its channel's first block.
    fn running_at_attach(&self) -> bool {
        false
    }
    /// Asks for a graceful stop; `Exited` follows when it is done.
    fn stop(&mut self) -> Result<(), VirtError>;
    /// Ends the instance at once (DELETE); `Exited` follows. Defaults to a stop.
    fn kill(&mut self) -> Result<(), VirtError> {
        self.stop()
    }
    /// Hot-plugs the local volume `id` into the running instance.
    fn attach_volume(&mut self, id: &str) -> Result<(), VirtError> {
        Err(VirtError::other(format!(
            "volume {id}: this virtualizer cannot hot-plug volumes"
        )))
    }
}

/// One way of running instances.
pub trait Virtualizer: Send + fmt::Debug {
    /// Remembers the configuration and directory; called first, also on recovery.
    fn init(&mut self, cfg: &InstanceConfig, dir: &Path);
    /// Gives the next boot its network device (a tenant tap or macvtap);
    /// the boot consumes it. Only VMs take one (the simulation takes any
    /// and lets it go); a container's NIC goes into its namespace instead.
    fn set_nic(&mut self, nic: qemu::Nic) -> Result<(), VirtError> {
        match nic {
            qemu::Nic::None => Ok(()),
            _ => Err(VirtError::other("this virtualizer takes no QEMU NIC")),
        }
    }
    /// The process whose network namespace is the running instance's (a
    /// container's main process): a container's tenant NIC is plugged in
    /// there after each start. Only containers have one.
    fn netns_pid(&mut self) -> Result<u32, VirtError> {
        Err(VirtError::other(
            "this virtualizer has no network namespace",
        ))
    }
    /// Chooses, before each boot (START, RESTART), the host address
    /// forwarded to the guest's SSH port (QEMU with `--user-net`), which
    /// the caller persists in the instance's state before the boot and
    /// reports in STATS; `None`: no forward.
    fn choose_ssh_forward(&mut self) -> Result<Option<SocketAddr>, VirtError> {
        Ok(None)
    }
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
    /// Whether usage changes while the instance runs, so that it is worth
    /// sampling on the usage tick. False lets an idle instance thread sleep
    /// until something happens (each tick is a wake-up of the thread and of
    /// the overseer it reports to).
    fn usage_varies(&self) -> bool {
        true
    }
    /// Whether it keeps files of its own in the instance directory (disk
    /// images, a config drive, sockets), which must then exist before the
    /// image is made. One that keeps none (the simulation) lets a journaled
    /// store make the directory later, with the state file, off the
    /// acknowledgement path.
    fn keeps_files(&self) -> bool {
        true
    }
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
    /// Why this node cannot run VMs (QEMU or qemu-img missing; OVMF for
    /// EFI guests), from the start-up checks: such a START is refused at
    /// once with that reason. (Docker is tried at each START: an engine that
    /// was down at start may be up now.)
    pub caps: Option<Arc<crate::capabilities::Capabilities>>,
}

impl VirtualizerFactory for NodeFactory {
    fn create(&self, cfg: &InstanceConfig) -> Box<dyn Virtualizer> {
        match cfg.vm_type {
            crate::payloads::config::VmType::Docker => self.docker.create(cfg),
            crate::payloads::config::VmType::Qemu => {
                let efi = cfg.firmware == crate::payloads::config::Firmware::Efi;
                match self.caps.as_ref().and_then(|c| c.refusal(cfg.vm_type, efi)) {
                    Some(why) => Box::new(Unavailable(why)),
                    None => self.qemu.create(cfg),
                }
            }
        }
    }

    fn sweep(&self, recorded: &dyn Fn(&str) -> bool) -> Vec<String> {
        self.docker.sweep(recorded)
    }
}

/// A virtualizer that refuses everything, saying why (this node cannot run
/// such instances).
#[derive(Debug)]
pub struct Unavailable(pub String);

impl Virtualizer for Unavailable {
    fn init(&mut self, _cfg: &InstanceConfig, _dir: &Path) {}
    fn ensure_backing_image(&mut self) -> Result<(), VirtError> {
        Err(VirtError::unreachable(self.0.clone()))
    }
    fn create_image(&mut self) -> Result<(), VirtError> {
        Err(VirtError::unreachable(self.0.clone()))
    }
    fn delete_image(&mut self) -> Result<(), VirtError> {
        Ok(())
    }
    fn start(&mut self) -> Result<(), VirtError> {
        Err(VirtError::unreachable(self.0.clone()))
    }
    fn monitor(
        &mut self,
        _events: Sender<MonitorEvent>,
        _boot: bool,
    ) -> Result<Box<dyn Monitor>, VirtError> {
        Err(VirtError::unreachable(self.0.clone()))
    }
    fn stats(&mut self) -> Usage {
        Usage::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reason_comes_from_the_kind_or_the_phase() {
        let phase = Reason::ImageFailure;
        assert_eq!(
            VirtError::unreachable("x").reason(phase),
            Reason::LaunchFailure
        );
        assert_eq!(VirtError::launch("x").reason(phase), Reason::LaunchFailure);
        assert_eq!(
            VirtError::image("x").reason(Reason::LaunchFailure),
            Reason::ImageFailure
        );
        assert_eq!(VirtError::not_ours("x").reason(phase), Reason::ImageFailure);
        assert_eq!(
            VirtError::monitor("x").reason(phase),
            Reason::InstanceFailure
        );
        assert_eq!(VirtError::other("x").reason(phase), phase);
        assert_eq!(VirtError::other("a cause").to_string(), "a cause");
    }
}
