//! The SSNTP server (used by `ciao-lc serve` and the tests as the scheduler).
//!
//! Threads: `ssntp-accept` polls the listener and a waker; each accepted
//! connection gets its own `ssntp-conn-<n>` thread that runs the handshake
//! (as ciao's Go server does it) and then the shared connection loop of
//! `conn::Transport`. Sessions are kept by client UUID; a client that
//! reconnects with the same UUID replaces its old session, as in Go.
//!
//! Handshake, per connection: TLS (client certificate required and verified);
//! read CONNECT; if the role it claims is not proven by the client's
//! certificate → ERROR ConnectionAborted and close; if it is not a CONNECT →
//! ERROR ConnectionFailure and close; else reply CONNECTED with our role and
//! the cluster configuration, register the session and report `Connected`.
//! Frames of an unknown type are answered with InvalidFrameType and not
//! reported. [`Server::stop`] closes every session and joins every thread.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{info, warn};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::StartError;
use super::client::stamp_rx;
use super::conn::{ConnError, Link, SendError, Transport};
use super::frame::{ConnectFrame, ConnectedFrame, ErrorCode, Frame, FrameType, Operation, Uuid16};
use super::gob::{DEFAULT_MAX_MESSAGE, Value};
use super::profile::Profile;
use super::role::Role;
use super::tls::{self, CertificateDer, Identity, PeerPolicy};

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub identity: Identity,
    pub ca: Vec<CertificateDer<'static>>,
    /// Our role in CONNECTED (default: our certificate's role).
    pub role: Role,
    pub uuid: Uuid16,
    pub listen: SocketAddr,
    /// Client certificates must carry one of these roles (default: any).
    pub client_roles: Role,
    /// The cluster configuration sent in CONNECTED.
    pub configuration: Vec<u8>,
    pub profile: Profile,
    pub handshake_timeout: Duration,
    pub max_message: usize,
}

impl ServerConfig {
    pub fn new(
        identity: Identity,
        ca: Vec<CertificateDer<'static>>,
        uuid: Uuid16,
        listen: SocketAddr,
    ) -> ServerConfig {
        ServerConfig {
            role: identity.role,
            identity,
            ca,
            uuid,
            listen,
            client_roles: Role::from_bits(0x3f),
            configuration: Vec::new(),
            profile: Profile::default(),
            handshake_timeout: Duration::from_secs(30),
            max_message: DEFAULT_MAX_MESSAGE,
        }
    }
}

/// What the server reports.
#[derive(Debug)]
pub enum ServerEvent {
    Connected {
        uuid: Uuid16,
        role: Role,
        peer: Option<SocketAddr>,
    },
    /// A session ended; `unsent` were queued for it but never written.
    /// `superseded`: a newer session of the same UUID had already replaced
    /// it (the peer reconnected before this one was seen to end), so the
    /// peer is still connected.
    Disconnected {
        uuid: Uuid16,
        reason: String,
        unsent: Vec<Frame>,
        superseded: bool,
    },
    Frame {
        uuid: Uuid16,
        frame: Frame,
    },
    /// A connection failed before becoming a session (TLS, role, bad CONNECT).
    Rejected {
        peer: Option<SocketAddr>,
        error: String,
    },
}

#[derive(Debug)]
struct Session {
    id: u64,
    role: Role,
    link: Link,
}

#[derive(Debug)]
struct Shared {
    config: ServerConfig,
    tls: Arc<rustls::ServerConfig>,
    sessions: Mutex<HashMap<Uuid16, Session>>,
    configuration: Mutex<Vec<u8>>,
    events: Sender<ServerEvent>,
    stopping: AtomicBool,
    next_id: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn sessions(&self) -> MutexGuard<'_, HashMap<Uuid16, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn threads(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn op(&self, e: ErrorCode) -> u8 {
        // Every profile defines the handshake errors; tested in profile.rs.
        self.config
            .profile
            .operand(Operation::Error(e))
            .unwrap_or(0)
    }
}

/// A running server. Dropping it stops it.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    events: Receiver<ServerEvent>,
    waker: UnixStream,
    accept: Option<JoinHandle<()>>,
}

const EVENT_QUEUE: usize = 65536;

impl Server {
    /// Binds, then accepts in the `ssntp-accept` thread.
    pub fn start(config: ServerConfig) -> Result<Server, StartError> {
        let tls = tls::server_config(
            &config.identity,
            &config.ca,
            &PeerPolicy {
                accepted_roles: config.client_roles,
                verify_hostname: false,
            },
        )
        .map_err(StartError::Tls)?;
        let listener = TcpListener::bind(config.listen).map_err(StartError::Io)?;
        listener.set_nonblocking(true).map_err(StartError::Io)?;
        let local_addr = listener.local_addr().map_err(StartError::Io)?;
        let (waker, waker_rx) = UnixStream::pair().map_err(StartError::Io)?;
        waker_rx.set_nonblocking(true).map_err(StartError::Io)?;
        let (ev_tx, events) = crossbeam_channel::bounded(EVENT_QUEUE);
        let shared = Arc::new(Shared {
            configuration: Mutex::new(config.configuration.clone()),
            config,
            tls,
            sessions: Mutex::new(HashMap::new()),
            events: ev_tx,
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            threads: Mutex::new(Vec::new()),
        });
        let sh = Arc::clone(&shared);
        let accept = thread::Builder::new()
            .name("ssntp-accept".into())
            .spawn(move || accept_loop(sh, listener, waker_rx))
            .map_err(StartError::Io)?;
        info!("SSNTP server listening on {local_addr}");
        Ok(Server {
            shared,
            local_addr,
            events,
            waker,
            accept: Some(accept),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn uuid(&self) -> Uuid16 {
        self.shared.config.uuid
    }

    pub fn events(&self) -> &Receiver<ServerEvent> {
        &self.events
    }

    /// Sends to one client.
    pub fn send(&self, to: &Uuid16, frame: Frame) -> Result<(), SendError> {
        let link = self.shared.sessions().get(to).map(|s| s.link.clone());
        match link {
            Some(l) => l.send(frame),
            None => Err(SendError::NotConnected(frame)),
        }
    }

    /// Sends to every client whose role includes `role`; returns how many took it.
    pub fn send_to_role(&self, role: Role, frame: &Frame) -> usize {
        let links: Vec<Link> = self
            .shared
            .sessions()
            .values()
            .filter(|s| s.role.contains(role))
            .map(|s| s.link.clone())
            .collect();
        links
            .iter()
            .filter(|l| l.send(frame.clone()).is_ok())
            .count()
    }

    /// The connected clients and their claimed roles.
    pub fn sessions(&self) -> Vec<(Uuid16, Role)> {
        self.shared
            .sessions()
            .iter()
            .map(|(u, s)| (*u, s.role))
            .collect()
    }

    /// The configuration later CONNECTED replies carry.
    pub fn set_configuration(&self, configuration: Vec<u8>) {
        *self
            .shared
            .configuration
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = configuration;
    }

    /// Closes the listener and every session, and joins all threads.
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = (&self.waker).write(&[1]);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for s in self.shared.sessions().values() {
            s.link.close();
        }
        let threads: Vec<_> = self.shared.threads().drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shut();
    }
}

fn accept_loop(shared: Arc<Shared>, listener: TcpListener, mut waker: UnixStream) {
    let mut n = 0u64;
    while !shared.stopping.load(Ordering::SeqCst) {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(waker.as_fd(), PollFlags::POLLIN),
        ];
        if let Err(e) = poll(&mut fds, PollTimeout::NONE)
            && e != nix::Error::EINTR
        {
            warn!("SSNTP server: poll: {e}");
            break;
        }
        let mut sink = [0u8; 16];
        while matches!(waker.read(&mut sink), Ok(k) if k > 0) {}
        loop {
            match listener.accept() {
                Ok((sock, peer)) => {
                    n += 1;
                    let sh = Arc::clone(&shared);
                    let spawned = thread::Builder::new()
                        .name(format!("ssntp-conn-{n}"))
                        .spawn(move || connection(sh, sock, peer));
                    match spawned {
                        Ok(h) => {
                            let mut threads = shared.threads();
                            threads.retain(|t| !t.is_finished());
                            threads.push(h);
                        }
                        Err(e) => warn!("SSNTP server: cannot start a connection thread: {e}"),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: say so, keep serving existing sessions.
                    warn!("SSNTP server: accept: {e}");
                    break;
                }
            }
        }
    }
}

fn connection(shared: Arc<Shared>, sock: std::net::TcpStream, peer: SocketAddr) {
    let stopping = || shared.stopping.load(Ordering::SeqCst);
    let result = (|| {
        let conn = rustls::ServerConnection::new(Arc::clone(&shared.tls))?;
        let mut t = Transport::new(sock, conn.into(), shared.config.max_message)?;
        let deadline = Instant::now() + shared.config.handshake_timeout;
        t.handshake(deadline, &stopping)?;
        let v = t.recv_value(deadline, "CONNECT", &stopping)?;
        Ok::<_, ConnError>((t, v))
    })();
    let (mut t, v) = match result {
        Ok(ok) => ok,
        Err(e) => {
            reject(&shared, Some(peer), e.to_string());
            return;
        }
    };
    let connect = match v {
        Value::Struct(s) => ConnectFrame::from_struct(&s).map_err(|e| e.to_string()),
        _ => Err("CONNECT is not a struct".to_string()),
    };
    let connect = match connect {
        Ok(c) => c,
        Err(e) => {
            return refuse(
                &shared,
                t,
                ErrorCode::ConnectionFailure,
                peer,
                format!("bad CONNECT: {e}"),
            );
        }
    };
    // The role check comes before the frame check, as in Go.
    let cert_role = t
        .tls()
        .peer_certificates()
        .map_or(Role::UNKNOWN, tls::peer_role);
    if !cert_role.contains(connect.role) {
        let why = format!(
            "client claims role {} that its certificate ({cert_role}) does not prove",
            connect.role
        );
        return refuse(&shared, t, ErrorCode::ConnectionAborted, peer, why);
    }
    if connect.ftype != FrameType::Command.to_u8()
        || connect.operand != 0
        || connect.source.len() < 16
    {
        let why = format!(
            "expected CONNECT, got type {} operand {}",
            connect.ftype, connect.operand
        );
        return refuse(&shared, t, ErrorCode::ConnectionFailure, peer, why);
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&connect.source[..16]);
    let configuration = shared
        .configuration
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let cfg = &shared.config;
    t.queue(&ConnectedFrame::new(
        cfg.role,
        cfg.uuid,
        &uuid,
        configuration,
    ));

    let link = Link::new();
    let Ok(Some(out)) = link.up() else { return };
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let replaced = shared.sessions().insert(
        uuid,
        Session {
            id,
            role: connect.role,
            link: link.clone(),
        },
    );
    if let Some(old) = replaced {
        info!(
            "SSNTP server: {} reconnected; closing its old session",
            uuid::Uuid::from_bytes(uuid)
        );
        old.link.close();
    }
    if stopping() {
        link.close();
    }
    let _ = shared.events.send(ServerEvent::Connected {
        uuid,
        role: connect.role,
        peer: Some(peer),
    });

    let (profile, me, my_role) = (cfg.profile, cfg.uuid, cfg.role);
    let result = t.run(&out, |t, v| {
        let mut frame = Frame::from_value(v)?;
        if frame.frame_type().is_none() {
            let op = profile
                .operand(Operation::Error(ErrorCode::InvalidFrameType))
                .unwrap_or(0);
            t.queue(&Frame::new(FrameType::Error, op, me, Vec::new()));
            return Ok(());
        }
        stamp_rx(&mut frame, me, my_role);
        shared
            .events
            .send(ServerEvent::Frame { uuid, frame })
            .map_err(|_| ConnError::Shutdown)
    });
    let unsent = link.down(&out);
    let superseded = {
        let mut sessions = shared.sessions();
        let current = sessions.get(&uuid).is_some_and(|s| s.id == id);
        if current {
            sessions.remove(&uuid);
        }
        !current
    };
    let reason = match result {
        Err(ConnError::Shutdown) => {
            t.close();
            "closed by the server".to_string()
        }
        Err(e) => e.to_string(),
        Ok(()) => "closed".to_string(),
    };
    let _ = shared.events.send(ServerEvent::Disconnected {
        uuid,
        reason,
        unsent,
        superseded,
    });
}

/// Ends a handshake with an ERROR frame (on the still-fresh encoder, as Go's
/// throw-away one) and reports why.
fn refuse(shared: &Shared, mut t: Transport, code: ErrorCode, peer: SocketAddr, why: String) {
    t.queue(&Frame::new(
        FrameType::Error,
        shared.op(code),
        [0; 16],
        Vec::new(),
    ));
    let _ = t.flush_all(Instant::now() + Duration::from_secs(1));
    reject(shared, Some(peer), why);
}

fn reject(shared: &Shared, peer: Option<SocketAddr>, error: String) {
    warn!(
        "SSNTP server: rejected {}: {error}",
        peer.map_or_else(|| "?".into(), |p| p.to_string())
    );
    let _ = shared.events.send(ServerEvent::Rejected { peer, error });
}
