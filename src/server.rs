//! The server thread: routes what the scheduler sends.
//!
//! Inputs (one `select!`): events of the SSNTP client (connected,
//! disconnected, frames) and shutdown. For each COMMAND it parses the payload
//! (a malformed one is answered with the right error frame and reason; the
//! node carries on) and hands the typed request to the overseer, which
//! admits STARTs and routes every command to its instance (one hop, no
//! reply awaited). Node commands (EVACUATE, Restore) go there too. The
//! first CONNECTED's cluster configuration is applied here, once: the
//! child user and, when the command line named none, the tenant networks.

use crossbeam_channel::{Receiver, Sender, select};
use log::{debug, info, warn};

use crate::instance::{InstanceCmd, NewStart as InstanceNewStart, VolumeAttach};
use crate::node::Never;
use crate::node::NodeContext;
use crate::overseer::OverseerReq;
use crate::payloads::commands::{self, ClusterConfig};
use crate::payloads::outgoing::ErrorKind;
use crate::payloads::{PayloadError, start};
use crate::ssntp::client::ClientEvent;
use crate::ssntp::{Command, Frame, Operation, Profile};

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
                            info!("cluster configuration: {c}");
                            crate::virt::qemu::cluster_child_user(&c.child_user);
                            self.ctx
                                .network
                                .cluster_configured(&c.compute_net, &c.mgmt_net);
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
                let why = format!("disconnected from the scheduler: {reason}");
                let _ = self.overseer.send(OverseerReq::LinkDown { why });
            }
            ClientEvent::ConnectFailed { error, retry_in } => {
                warn!("{error}; retrying in {retry_in:.1?}");
                let _ = self.overseer.send(OverseerReq::LinkDown { why: error });
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
        let parsed = match c {
            Command::Start => {
                // The state is encoded here, off the instance thread (see NewStart).
                start::parse_start(payload)
                    .map(|cfg| OverseerReq::Start(Box::new(InstanceNewStart::encode(cfg))))
            }
            Command::Stop => commands::parse_stop(payload).map(|id| OverseerReq::Command {
                id,
                cmd: InstanceCmd::Stop,
            }),
            Command::Restart => commands::parse_restart(payload).map(|id| OverseerReq::Command {
                id,
                cmd: InstanceCmd::Restart,
            }),
            Command::Delete => commands::parse_delete(payload).map(|d| OverseerReq::Command {
                id: d.instance_uuid,
                cmd: InstanceCmd::Delete { stop: d.stop },
            }),
            Command::AttachVolume => {
                commands::parse_attach_volume(payload).map(|a| OverseerReq::Command {
                    id: a.instance_uuid,
                    cmd: InstanceCmd::AttachVolume(Box::new(VolumeAttach {
                        volume: a.volume_uuid,
                    })),
                })
            }
            // The 2016 launcher ignored EVACUATE.
            Command::Evacuate if p2016 => return info!("EVACUATE ignored (2016 profile)"),
            Command::Evacuate => Ok(OverseerReq::Evacuate),
            Command::Restore => Ok(OverseerReq::Maintenance { on: false }),
            other => return debug!("command {other} ignored"),
        };
        match parsed {
            // The overseer always drains its requests; this fails only at shutdown.
            Ok(req) => {
                let _ = self.overseer.send(req);
            }
            Err(e) => self.payload_error(c, e),
        }
    }

    fn payload_error(&self, c: Command, e: PayloadError) {
        let kind = match c {
            Command::Stop => ErrorKind::Stop,
            Command::Restart => ErrorKind::Restart,
            Command::Delete => ErrorKind::Delete,
            Command::AttachVolume => ErrorKind::AttachVolume,
            _ => ErrorKind::Start,
        };
        warn!("{} refused: {e}", kind.name());
        self.ctx
            .send_error(kind, &e.instance_uuid, e.reason, false, "");
    }
}
