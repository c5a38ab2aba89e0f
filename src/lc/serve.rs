//! `ciao-lc serve`: the embedded SSNTP scheduler and its control socket.
//!
//! Threads: main (waits for a signal), `signals`, `lc-events` (takes the
//! SSNTP server's events, keeps a view of every node — its last STATUS and
//! STATS — and copies a line per event to every watcher), `lc-control`
//! (accepts connections on the control socket) and one `lc-request` thread
//! per control connection ([`super::control`] has the protocol), plus the
//! SSNTP server's own threads.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::SystemTime;

use crossbeam_channel::{Sender, select};

use super::control::{Request, Response};
use super::table::{list_table, stats_table};
use super::{CA_FILE, CONTROL_SOCKET, LcExit, SCHEDULER_FILE};
use crate::payloads::outgoing::{self, Stats};
use crate::payloads::{canonical_uuid, commands};
use crate::ssntp::frame::Uuid16;
use crate::ssntp::server::{Server, ServerConfig, ServerEvent};
use crate::ssntp::{Command, Event, Frame, FrameType, Operation, Profile, Role, Status, tls};

/// What `serve` knows of one launcher.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub role: Role,
    pub peer: String,
    pub status: Option<Status>,
    pub stats: Option<Stats>,
}

#[derive(Debug)]
struct ServeState {
    profile: Profile,
    nodes: BTreeMap<Uuid16, NodeView>,
    /// Each watcher, with the node it watches (`None`: every event).
    watchers: Vec<(Option<Uuid16>, Sender<String>)>,
    /// Instance → (private IP, MAC) of the STARTs sent (for `list`).
    vnics: BTreeMap<String, (String, String)>,
}

type Shared = Arc<Mutex<ServeState>>;

fn lock(s: &Shared) -> MutexGuard<'_, ServeState> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

pub(super) fn serve(
    dir: &Path,
    listen: SocketAddr,
    profile: Profile,
    configuration: Option<PathBuf>,
    verbose: bool,
) -> LcExit {
    let loaded = (|| -> Result<_, String> {
        let ca = tls::load_ca(&dir.join(CA_FILE)).map_err(|e| e.to_string())?;
        let id_path = dir.join(SCHEDULER_FILE);
        let id = tls::load_identity(&id_path).map_err(|e| e.to_string())?;
        tls::check_own_validity(&id, &id_path.display().to_string(), SystemTime::now())
            .map_err(|e| e.to_string())?;
        let conf = match &configuration {
            Some(p) => fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?,
            None => Vec::new(),
        };
        Ok((ca, id, conf))
    })();
    let (ca, id, conf) = match loaded {
        Ok(x) => x,
        Err(e) => {
            eprintln!("ciao-lc serve: {e}");
            return LcExit::Certs;
        }
    };
    let mut cfg = ServerConfig::new(id, ca, *uuid::Uuid::new_v4().as_bytes(), listen);
    cfg.profile = profile;
    cfg.configuration = conf;
    let server = match Server::start(cfg) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("ciao-lc serve: cannot serve on {listen}: {e}");
            return LcExit::Serve;
        }
    };
    let sock_path = dir.join(CONTROL_SOCKET);
    // A socket left by a previous serve that is not answering any more.
    if UnixStream::connect(&sock_path).is_err() {
        let _ = fs::remove_file(&sock_path);
    }
    let control = match UnixListener::bind(&sock_path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "ciao-lc serve: control socket {}: {e} (is another serve running?)",
                sock_path.display()
            );
            return LcExit::Serve;
        }
    };
    println!(
        "ciao-lc: SSNTP scheduler {} listening on {} ({} profile), control socket {}",
        uuid::Uuid::from_bytes(server.uuid()),
        server.local_addr(),
        profile,
        sock_path.display()
    );
    let signals = match crate::signals::spawn() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ciao-lc serve: signals: {e}");
            return LcExit::Serve;
        }
    };
    let state: Shared = Arc::new(Mutex::new(ServeState {
        profile,
        nodes: BTreeMap::new(),
        watchers: Vec::new(),
        vnics: BTreeMap::new(),
    }));

    let events = server.events().clone();
    let st = Arc::clone(&state);
    let printer = thread::Builder::new()
        .name("lc-events".into())
        .spawn(move || {
            for ev in events.iter() {
                let short = describe(profile, &ev, false);
                if verbose {
                    println!("{}", describe(profile, &ev, true));
                } else {
                    println!("{short}");
                }
                // A launcher that reconnects (same node UUID) replaces its old
                // session, whose disconnection may be reported after the new
                // connection: forget the node only if no session of it remains.
                if let ServerEvent::Disconnected {
                    superseded: true, ..
                } = &ev
                {
                    continue;
                }
                let mut s = lock(&st);
                record(&mut s, &ev);
                let about = match &ev {
                    ServerEvent::Connected { uuid, .. }
                    | ServerEvent::Disconnected { uuid, .. }
                    | ServerEvent::Frame { uuid, .. } => Some(*uuid),
                    ServerEvent::Rejected { .. } => None,
                };
                s.watchers.retain(|(node, w)| {
                    // A watcher of one node hears of it only (and of
                    // rejected connections, which name no node).
                    if node.is_some() && about.is_some() && *node != about {
                        return true;
                    }
                    w.send(short.clone()).is_ok()
                });
            }
        });
    let (st, srv) = (Arc::clone(&state), Arc::downgrade(&server));
    let _control = thread::Builder::new()
        .name("lc-control".into())
        .spawn(move || {
            for conn in control.incoming() {
                let Ok(conn) = conn else { continue };
                // A request holds the server only while it runs.
                let Some(srv) = srv.upgrade() else { break };
                let st = Arc::clone(&st);
                let _ = thread::Builder::new()
                    .name("lc-request".into())
                    .spawn(move || handle(conn, &st, &srv));
            }
        });
    select! {
        recv(signals.done) -> _ => {}
    }
    let _ = fs::remove_file(&sock_path);
    lock(&state).watchers.clear();
    // Stop the server (close_notify to every launcher) unless a request is
    // still using it; then process exit closes the sockets.
    match Arc::try_unwrap(server) {
        Ok(s) => s.stop(),
        Err(_) => log::warn!("a control request is still running: not waiting for it"),
    }
    drop(signals);
    if let Ok(p) = printer
        && p.is_finished()
    {
        let _ = p.join();
    }
    LcExit::Ok
}

/// Updates the node views from one server event.
fn record(s: &mut ServeState, ev: &ServerEvent) {
    match ev {
        ServerEvent::Connected { uuid, role, peer } => {
            s.nodes.insert(
                *uuid,
                NodeView {
                    role: *role,
                    peer: peer.map_or_else(String::new, |p| p.to_string()),
                    status: None,
                    stats: None,
                },
            );
        }
        ServerEvent::Disconnected { uuid, .. } => {
            s.nodes.remove(uuid);
        }
        ServerEvent::Frame { uuid, frame } => {
            let op = s.profile.frame_operation(frame);
            let Some(node) = s.nodes.get_mut(uuid) else {
                return;
            };
            match op {
                Ok(Operation::Status(st)) => node.status = Some(st),
                Ok(Operation::Command(Command::Stats)) => {
                    if let Ok(stats) = outgoing::parse_stats(&frame.payload) {
                        node.stats = Some(stats);
                    }
                }
                _ => {}
            }
        }
        ServerEvent::Rejected { .. } => {}
    }
}

fn handle(mut conn: UnixStream, state: &Shared, server: &Server) {
    let mut text = String::new();
    // One request per connection, bounded: a client cannot make us buffer forever.
    if Read::by_ref(&mut conn)
        .take(64 << 20)
        .read_to_string(&mut text)
        .is_err()
    {
        return;
    }
    let req: Request = match serde_yaml::from_str(&text) {
        Ok(r) => r,
        Err(e) => return reply(&mut conn, false, format!("bad request: {e}")),
    };
    if let Request::Watch { node } = &req {
        let node = match node.trim() {
            "" => None,
            n => match canonical_uuid(n).and_then(|u| uuid::Uuid::parse_str(&u).ok()) {
                Some(u) => Some(*u.as_bytes()),
                None => return reply(&mut conn, false, format!("{n:?} is not a node UUID")),
            },
        };
        let (tx, rx) = crossbeam_channel::unbounded();
        lock(state).watchers.push((node, tx));
        let _ = writeln!(conn, "watching; interrupt to stop");
        for line in rx.iter() {
            if writeln!(conn, "{line}").is_err() {
                break;
            }
        }
        return;
    }
    let (ok, message) = match execute(&req, state, server) {
        Ok(m) => (true, m),
        Err(m) => (false, m),
    };
    reply(&mut conn, ok, message);
}

fn reply(conn: &mut UnixStream, ok: bool, message: String) {
    let text = serde_yaml::to_string(&Response { ok, message }).unwrap_or_default();
    let _ = conn.write_all(text.as_bytes());
}

/// Picks the node a request addresses: the one it names, else the only
/// connected launcher.
fn pick_node(req: &Request, s: &ServeState) -> Result<Uuid16, String> {
    if let Some(node) = req.node() {
        let id = canonical_uuid(node).ok_or_else(|| format!("{node:?} is not a node UUID"))?;
        return s
            .nodes
            .keys()
            .find(|u| uuid::Uuid::from_bytes(**u).to_string() == id)
            .copied()
            .ok_or_else(|| format!("node {id} is not connected"));
    }
    let agents: Vec<_> = s
        .nodes
        .iter()
        .filter(|(_, n)| n.role.intersects(Role::AGENT.union(Role::NETAGENT)))
        .collect();
    match agents.as_slice() {
        [(u, _)] => Ok(**u),
        [] => Err("no launcher is connected".into()),
        many => Err(format!(
            "{} launchers are connected; choose one with --node: {}",
            many.len(),
            many.iter()
                .map(|(u, _)| uuid::Uuid::from_bytes(**u).to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// `text` as an instance (or volume) UUID.
fn uuid_of(what: &str, text: &str) -> Result<String, String> {
    canonical_uuid(text).ok_or_else(|| format!("{text:?} is not {what} UUID"))
}

/// Carries out one request (not `watch`): answers it from the node views,
/// or sends its frame to the launcher and says what was sent.
fn execute(req: &Request, state: &Shared, server: &Server) -> Result<String, String> {
    let (profile, node) = {
        let s = lock(state);
        let node = if req.addresses_a_node() {
            Some(pick_node(req, &s)?)
        } else {
            None
        };
        (s.profile, node)
    };
    let node_text = node
        .map(|n| uuid::Uuid::from_bytes(n).to_string())
        .unwrap_or_default();
    let p2016 = profile == Profile::P2016;
    let (cmd, payload, done) = match req {
        Request::Profile => return Ok(profile.to_string()),
        Request::List => {
            let s = lock(state);
            return Ok(list_table(&s.nodes, &s.vnics));
        }
        Request::Stats => return Ok(stats_table(&lock(state).nodes)),
        Request::Watch { .. } => return Err("watch streams; it has no single answer".into()),
        Request::Start { payload, .. } => {
            let cfg = crate::payloads::start::parse_start(payload.as_bytes())
                .map_err(|e| e.to_string())?;
            let n = &cfg.networking;
            if !n.vnic_mac.is_empty() || !n.private_ip.is_empty() {
                lock(state).vnics.insert(
                    cfg.instance_uuid.clone(),
                    (n.private_ip.clone(), n.vnic_mac.clone()),
                );
            }
            (
                Command::Start,
                payload.clone().into_bytes(),
                format!("START {} sent", cfg.instance_uuid),
            )
        }
        Request::Stop { instance, .. } if p2016 => {
            let id = uuid_of("an instance", instance)?;
            (
                Command::Stop,
                commands::stop_payload(&id, &node_text),
                format!("STOP {id} sent"),
            )
        }
        Request::Stop { instance, .. } => {
            let id = uuid_of("an instance", instance)?;
            (
                Command::Delete,
                commands::delete_payload(profile, &id, &node_text, true),
                format!("DELETE (stop) {id} sent"),
            )
        }
        Request::Restart { instance, .. } if p2016 => {
            let id = uuid_of("an instance", instance)?;
            (
                Command::Restart,
                commands::restart_payload(&id, &node_text),
                format!("RESTART {id} sent"),
            )
        }
        Request::Restart { .. } => {
            return Err("the 2018 profile has no RESTART: start the instance again".into());
        }
        Request::Delete { instance, .. } => {
            let id = uuid_of("an instance", instance)?;
            (
                Command::Delete,
                commands::delete_payload(profile, &id, &node_text, false),
                format!("DELETE {id} sent"),
            )
        }
        Request::Attach { .. } if p2016 => {
            return Err("the 2016 profile has no AttachVolume".into());
        }
        Request::Attach {
            instance, volume, ..
        } => {
            let id = uuid_of("an instance", instance)?;
            let volume = uuid_of("a volume", volume)?;
            (
                Command::AttachVolume,
                commands::attach_volume_payload(&id, &volume, &node_text),
                format!("AttachVolume {volume} → {id} sent"),
            )
        }
        Request::Evacuate { .. } => (
            Command::Evacuate,
            commands::evacuate_payload(&node_text),
            "EVACUATE sent".to_string(),
        ),
        Request::Restore { .. } if p2016 => {
            return Err("the 2016 profile has no Restore".into());
        }
        Request::Restore { .. } => (
            Command::Restore,
            commands::restore_payload(&node_text),
            "Restore sent".to_string(),
        ),
    };
    let operand = profile
        .operand(Operation::Command(cmd))
        .map_err(|e| e.to_string())?;
    let node = node.ok_or("no node")?;
    server
        .send(
            &node,
            Frame::new(FrameType::Command, operand, server.uuid(), payload),
        )
        .map_err(|e| e.to_string())?;
    Ok(done)
}

/// One line per server event (with the payload when `verbose`).
pub fn describe(profile: Profile, ev: &ServerEvent, verbose: bool) -> String {
    let id = |u: &[u8; 16]| uuid::Uuid::from_bytes(*u).to_string();
    let now = humantime(SystemTime::now());
    match ev {
        ServerEvent::Connected { uuid, role, peer } => {
            format!(
                "{now} connected     {} {role} from {}",
                id(uuid),
                peer.map_or_else(|| "?".into(), |p| p.to_string())
            )
        }
        ServerEvent::Disconnected { uuid, reason, .. } => {
            format!("{now} disconnected  {} ({reason})", id(uuid))
        }
        ServerEvent::Rejected { peer, error } => {
            format!(
                "{now} rejected      {}: {error}",
                peer.map_or_else(|| "?".into(), |p| p.to_string())
            )
        }
        ServerEvent::Frame { uuid, frame } => {
            let op = profile.frame_operation(frame);
            let name = op.map_or_else(|e| e.to_string(), |o| o.to_string());
            let summary = match op {
                Ok(Operation::Error(_)) => outgoing::parse_error(&frame.payload)
                    .map(|e| format!(": {} {}", e.instance_uuid, e.reason))
                    .unwrap_or_default(),
                Ok(Operation::Event(Event::InstanceDeleted | Event::InstanceStopped)) => {
                    outgoing::parse_instance_event(&frame.payload)
                        .map(|i| format!(": {i}"))
                        .unwrap_or_default()
                }
                Ok(Operation::Event(Event::TenantAdded | Event::TenantRemoved)) => {
                    outgoing::parse_tenant_event(&frame.payload)
                        .map(|(_, t)| {
                            format!(
                                ": tenant {} subnet {} key {} from {} to {}",
                                t.tenant_uuid,
                                t.tenant_subnet,
                                t.subnet_key,
                                t.agent_ip,
                                t.concentrator_ip
                            )
                        })
                        .unwrap_or_default()
                }
                Ok(Operation::Command(Command::Stats)) => outgoing::parse_stats(&frame.payload)
                    .map(|s| format!(": {} instance(s)", s.instances.len()))
                    .unwrap_or_default(),
                _ => String::new(),
            };
            let mut line = format!("{now} {name:<13} {}{summary}", id(uuid));
            if verbose && !frame.payload.is_empty() {
                line.push('\n');
                line.push_str(String::from_utf8_lossy(&frame.payload).trim_end());
            }
            line
        }
    }
}

/// `HH:MM:SS` (UTC) for event lines.
fn humantime(t: SystemTime) -> String {
    let s = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{:02}:{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}
