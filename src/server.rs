//! The server thread: routes what the scheduler sends.
//!
//! Inputs (one `select!`): events of the SSNTP client (connected,
//! disconnected, frames) and shutdown. For each COMMAND it parses the payload
//! (a malformed one is answered with the right error frame and reason; the
//! node carries on), asks the overseer for the instance's inbox (the request
//! carries its reply channel), and `try_send`s the command there. It never
//! blocks on an instance: a full inbox is answered with `instance_busy`.
//! Node commands (EVACUATE, Restore) go to the overseer.

use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError, select};
use log::{debug, info, warn};

use crate::instance::{InstanceCmd, Never};
use crate::node::NodeContext;
use crate::overseer::OverseerReq;
use crate::payloads::commands::{self, ClusterConfig};
use crate::payloads::outgoing::ErrorKind;
use crate::payloads::{PayloadError, Reason, start};
use crate::ssntp::client::ClientEvent;
use crate::ssntp::{Command, Frame, Operation, Profile};

/// How long the server waits for the overseer's answer. The overseer never
/// blocks, so this only guards against a bug turning into a hang.
const OVERSEER_REPLY: Duration = Duration::from_secs(10);

/// The server thread's state.
#[derive(Debug)]
pub struct Server {
    ctx: NodeContext,
    overseer: Sender<OverseerReq>,
    /// The cluster configuration from the first CONNECTED.
    pub cluster: Option<ClusterConfig>,
}

impl Server {
    pub fn new(ctx: NodeContext, overseer: Sender<OverseerReq>) -> Server {
        Server {
            ctx,
            overseer,
            cluster: None,
        }
    }

    /// Runs until shutdown or until the client stops for good; returns the
    /// client's fatal error, if any.
    pub fn run(
        mut self,
        events: Receiver<ClientEvent>,
        shutdown: Receiver<Never>,
    ) -> Option<String> {
        loop {
            select! {
                recv(shutdown) -> _ => return None,
                recv(events) -> ev => match ev {
                    Ok(ClientEvent::Stopped { error }) => return error,
                    Ok(ev) => self.event(ev),
                    Err(_) => return None,
                },
            }
        }
    }

    /// Handles one client event (public for tests that drive the server directly).
    pub fn event(&mut self, ev: ClientEvent) {
        match ev {
            ClientEvent::Connected {
                server_role,
                configuration,
                ..
            } => {
                info!("connected to the {server_role}");
                if self.cluster.is_none() && !configuration.is_empty() {
                    match commands::parse_configure(&configuration) {
                        Ok(c) => {
                            info!("cluster configuration: {c:?}");
                            crate::virt::qemu::cluster_child_user(&c.child_user);
                            self.cluster = Some(c);
                        }
                        Err(e) => warn!("cluster configuration ignored: {e}"),
                    }
                }
                let _ = self.overseer.send(OverseerReq::Connected);
            }
            ClientEvent::Disconnected { reason, unsent } => {
                warn!(
                    "disconnected from the scheduler: {reason} ({} frame(s) not sent)",
                    unsent.len()
                );
            }
            ClientEvent::ConnectFailed { error, retry_in } => {
                warn!("{error}; retrying in {retry_in:.1?}")
            }
            ClientEvent::Frame(f) => self.frame(&f),
            ClientEvent::Stopped { .. } => {}
        }
    }

    fn frame(&mut self, f: &Frame) {
        match self.ctx.profile.frame_operation(f) {
            Ok(Operation::Command(c)) => self.command(c, &f.payload),
            Ok(op @ (Operation::Error(_) | Operation::Event(_))) => {
                info!(
                    "scheduler sent {op}: {}",
                    String::from_utf8_lossy(&f.payload).trim_end()
                )
            }
            Ok(op) => debug!("scheduler sent {op}"),
            Err(e) => warn!("ignored frame: {e}"),
        }
    }

    fn command(&mut self, c: Command, payload: &[u8]) {
        let p2016 = self.ctx.profile == Profile::P2016;
        match c {
            Command::Start => self.start(payload),
            Command::Stop => match commands::parse_stop(payload) {
                Ok(id) => self.route(ErrorKind::Stop, &id, InstanceCmd::Stop),
                Err(e) => self.payload_error(ErrorKind::Stop, e),
            },
            Command::Restart => match commands::parse_restart(payload) {
                Ok(id) => self.route(ErrorKind::Restart, &id, InstanceCmd::Restart),
                Err(e) => self.payload_error(ErrorKind::Restart, e),
            },
            Command::Delete => match commands::parse_delete(payload) {
                Ok(d) => self.route(
                    ErrorKind::Delete,
                    &d.instance_uuid,
                    InstanceCmd::Delete { stop: d.stop },
                ),
                Err(e) => self.payload_error(ErrorKind::Delete, e),
            },
            Command::AttachVolume => match commands::parse_attach_volume(payload) {
                Ok(a) => {
                    let cmd = InstanceCmd::AttachVolume {
                        volume: a.volume_uuid.clone(),
                    };
                    self.route_volume(&a.instance_uuid, &a.volume_uuid, cmd)
                }
                Err(e) => self
                    .ctx
                    .send_error(ErrorKind::AttachVolume, "", e.reason, false, ""),
            },
            // The 2016 launcher ignored EVACUATE.
            Command::Evacuate if p2016 => info!("EVACUATE ignored (2016 profile)"),
            Command::Evacuate => self.evacuate(),
            Command::Restore => {
                let _ = self.overseer.send(OverseerReq::Maintenance { on: false });
            }
            other => debug!("command {other} ignored"),
        }
    }

    fn payload_error(&self, kind: ErrorKind, e: PayloadError) {
        warn!("{kind:?}: {e}");
        self.ctx
            .send_error(kind, &e.instance_uuid, e.reason, false, "");
    }

    fn start(&mut self, payload: &[u8]) {
        let cfg = match start::parse_start(payload) {
            Ok(c) => c,
            Err(e) => return self.payload_error(ErrorKind::Start, e),
        };
        let (id, restart) = (cfg.instance_uuid.clone(), cfg.restart);
        let (reply, answer) = crossbeam_channel::bounded(1);
        let cfg = Box::new(cfg);
        if self
            .overseer
            .send(OverseerReq::Add {
                cfg: cfg.clone(),
                reply,
            })
            .is_err()
        {
            return;
        }
        match answer.recv_timeout(OVERSEER_REPLY) {
            Ok(Ok(inbox)) => self.deliver(
                ErrorKind::Start,
                &id,
                &inbox,
                InstanceCmd::Start(cfg),
                restart,
            ),
            Ok(Err(reason)) => {
                info!("START {id} refused: {}", reason.as_str());
                self.ctx
                    .send_error(ErrorKind::Start, &id, reason, restart, "");
            }
            Err(e) => warn!("overseer did not answer: {e}"),
        }
    }

    fn lookup(&self, id: &str) -> Option<Sender<InstanceCmd>> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.overseer
            .send(OverseerReq::Get {
                id: id.to_string(),
                reply,
            })
            .ok()?;
        answer.recv_timeout(OVERSEER_REPLY).ok().flatten()
    }

    fn route(&self, kind: ErrorKind, id: &str, cmd: InstanceCmd) {
        match self.lookup(id) {
            Some(inbox) => self.deliver(kind, id, &inbox, cmd, false),
            None => self.ctx.send_error(kind, id, Reason::NoInstance, false, ""),
        }
    }

    fn route_volume(&self, id: &str, volume: &str, cmd: InstanceCmd) {
        match self.lookup(id) {
            Some(inbox) => {
                if let Err(e) = inbox.try_send(cmd) {
                    let reason = if matches!(e, TrySendError::Full(_)) {
                        Reason::InstanceBusy
                    } else {
                        Reason::NoInstance
                    };
                    self.ctx
                        .send_error(ErrorKind::AttachVolume, id, reason, false, volume);
                }
            }
            None => self.ctx.send_error(
                ErrorKind::AttachVolume,
                id,
                Reason::NoInstance,
                false,
                volume,
            ),
        }
    }

    fn deliver(
        &self,
        kind: ErrorKind,
        id: &str,
        inbox: &Sender<InstanceCmd>,
        cmd: InstanceCmd,
        restart: bool,
    ) {
        match inbox.try_send(cmd) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                warn!("{kind:?} {id}: the instance's inbox is full");
                self.ctx
                    .send_error(kind, id, Reason::InstanceBusy, restart, "");
            }
            // The instance went away between lookup and delivery.
            Err(TrySendError::Disconnected(_)) => {
                self.ctx
                    .send_error(kind, id, Reason::NoInstance, restart, "")
            }
        }
    }

    /// Maintenance on, then stop and remove every instance (InstanceStopped).
    fn evacuate(&self) {
        let _ = self.overseer.send(OverseerReq::Maintenance { on: true });
        let (reply, answer) = crossbeam_channel::bounded(1);
        if self.overseer.send(OverseerReq::All { reply }).is_err() {
            return;
        }
        let Ok(all) = answer.recv_timeout(OVERSEER_REPLY) else {
            return;
        };
        info!("evacuating {} instance(s)", all.len());
        for (id, inbox) in all {
            self.deliver(
                ErrorKind::Delete,
                &id,
                &inbox,
                InstanceCmd::Delete { stop: true },
                false,
            );
        }
    }
}
