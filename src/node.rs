//! What the daemon's threads share: the node's identity and settings, the
//! on-disk store, the virtualizer factory, and the [`Outbox`] through which
//! they send frames to the scheduler.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use log::{debug, info, warn};

use crate::health::ErrorNotes;
use crate::network::TenantNetwork;
use crate::payloads::Reason;
use crate::payloads::outgoing::{self, ErrorKind, TenantEvent};
use crate::ssntp::conn::{Link, SendError};
use crate::ssntp::frame::Uuid16;
use crate::ssntp::{ErrorCode, Event, Frame, Operation, Profile};
use crate::state::Store;
use crate::virt::VirtualizerFactory;

/// A type with no values: the shutdown channels carry none, they only
/// close (shutdown is a broadcast by dropping the sender).
#[derive(Debug)]
pub enum Never {}

/// Where frames for the scheduler go.
pub trait Outbox: Send + Sync + fmt::Debug {
    /// Sends `op` with `payload`. Failures (not connected, queue full) are
    /// logged by the implementation: like the Go launcher, the node does not
    /// queue STATUS/STATS/errors while disconnected, but it says so.
    fn send(&self, op: Operation, payload: Vec<u8>);
}

/// The production outbox: the SSNTP client's link.
#[derive(Debug, Clone)]
pub struct LinkOutbox {
    pub link: Link,
    pub profile: Profile,
    pub origin: Uuid16,
}

impl Outbox for LinkOutbox {
    fn send(&self, op: Operation, payload: Vec<u8>) {
        let operand = match self.profile.operand(op) {
            Ok(o) => o,
            Err(e) => {
                warn!("not sent: {e}");
                return;
            }
        };
        let frame = Frame::new(op.frame_type(), operand, self.origin, payload);
        match self.link.send(frame) {
            Ok(()) => debug!("sent {op}"),
            Err(e @ SendError::NotConnected(_)) => debug!("{op}: {e}"),
            Err(e) => warn!("{op}: {e}"),
        }
    }
}

/// An outbox that hands every frame to a channel (deterministic tests).
#[derive(Debug, Clone)]
pub struct ChannelOutbox(pub Sender<(Operation, Vec<u8>)>);

impl Outbox for ChannelOutbox {
    fn send(&self, op: Operation, payload: Vec<u8>) {
        let _ = self.0.send((op, payload));
    }
}

/// Settings and services shared by the overseer and every instance thread.
#[derive(Debug, Clone)]
pub struct NodeContext {
    pub profile: Profile,
    /// Canonical text of this node's SSNTP UUID.
    pub node_uuid: String,
    pub outbox: Arc<dyn Outbox>,
    pub store: Store,
    pub factory: Arc<dyn VirtualizerFactory>,
    /// How long an instance thread waits for a stopping instance to go.
    pub stop_wait: Duration,
    /// Stack size of instance threads.
    pub instance_stack: usize,
    /// The node's tenant networking (off with `-network none`).
    pub network: Arc<TenantNetwork>,
    /// Where error frames are noted for the status file's `last-error`.
    pub errors: ErrorNotes,
}

impl NodeContext {
    /// Sends an error frame for `kind` with the profile's payload shape.
    pub fn send_error(
        &self,
        kind: ErrorKind,
        instance: &str,
        reason: Reason,
        restart: bool,
        volume: &str,
    ) {
        let code = match kind {
            ErrorKind::Start => ErrorCode::StartFailure,
            ErrorKind::Stop => ErrorCode::StopFailure,
            ErrorKind::Restart => ErrorCode::RestartFailure,
            ErrorKind::Delete => ErrorCode::DeleteFailure,
            ErrorKind::AttachVolume => ErrorCode::AttachVolumeFailure,
        };
        let payload = outgoing::error_payload(
            self.profile,
            kind,
            &self.node_uuid,
            instance,
            reason,
            restart,
            volume,
        );
        let op = Operation::Error(code);
        self.errors
            .note(format!("{op} for {instance}: {}", reason.as_str()));
        self.outbox.send(op, payload);
    }

    /// Sends InstanceDeleted, or InstanceStopped where the profile has it.
    /// TenantAdded (`added`) or TenantRemoved for the concentrator.
    /// Fire and forget, as ciao: not connected means not sent.
    pub fn send_tenant_event(&self, added: bool, ev: &TenantEvent) {
        let (event, payload) = if added {
            (Event::TenantAdded, outgoing::tenant_added_payload(ev))
        } else {
            (Event::TenantRemoved, outgoing::tenant_removed_payload(ev))
        };
        info!(
            "{} for tenant {} subnet {} (concentrator {}, key {})",
            if added {
                "TenantAdded"
            } else {
                "TenantRemoved"
            },
            ev.tenant_uuid,
            ev.tenant_subnet,
            ev.concentrator_ip,
            ev.subnet_key
        );
        self.outbox.send(Operation::Event(event), payload);
    }

    pub fn send_gone_event(&self, instance: &str, stopped: bool) {
        let stopped_exists = self
            .profile
            .operand(Operation::Event(Event::InstanceStopped))
            .is_ok();
        if stopped && stopped_exists {
            self.outbox.send(
                Operation::Event(Event::InstanceStopped),
                outgoing::instance_stopped_payload(instance),
            );
        } else {
            self.outbox.send(
                Operation::Event(Event::InstanceDeleted),
                outgoing::instance_deleted_payload(instance),
            );
        }
    }
}
