//! The SSNTP client: dial, handshake, reconnect, and the `ssntp-io` thread.
//!
//! [`Client::start`] spawns one thread, `ssntp-io`, that owns the connection
//! for the client's whole life and hands back a [`Client`]: a [`Link`] to send
//! frames (cloneable, thread-safe) and a channel of [`ClientEvent`]s.
//!
//! The io thread loops:
//! 1. one *pass* over the server list ([`server_list`]): TCP connect, TLS
//!    handshake, send CONNECT, then send nothing until the CONNECTED reply;
//! 2. on success: `Connected`, then frames in both directions until the
//!    connection fails: `Disconnected` (with any frames that were queued but
//!    not written);
//! 3. after a failed pass (`ConnectFailed`) and after a broken session alike,
//!    wait `1 s + rand(0 ‥ window−1 s)` with the window cycling 5, 10, 20,
//!    40 s as in Go (tests inject shorter ones), then back to 1. The window
//!    moves on with every wait and starts again at 5 s only after a session
//!    that stayed up for [`ClientConfig::healthy_session`] (60 s): a
//!    scheduler that breaks every session at once (a protocol error, a
//!    zero-length message) gets one attempt per backoff period, not dozens a
//!    second. Go redials at once after a broken session; we wait even after a
//!    healthy one, so that the nodes of a restarted scheduler come back spread
//!    over a few seconds rather than all in the same instant.
//!
//! Unlike the Go client, a failed SSNTP handshake is retried too; only a
//! security failure stops the client for good (`Stopped`): the server answered
//! ConnectionAborted (our certificate does not prove the role we claim), the
//! server claimed a role its certificate does not carry, or (with
//! [`ClientConfig::verify_hostname`]) its certificate does not name the
//! address dialled. Closing the client (drop or [`Client::close`]) wakes the
//! thread wherever it waits.
//!
//! Time enters through [`ClientConfig::timer`] (backoff waits), so tests can
//! see each wait and end it themselves.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};
use log::{debug, info, warn};

use super::StartError;
use super::conn::{ConnError, DEFAULT_FRAME_TIMEOUT, Link, Transport};
use super::frame::{
    ConnectFrame, ConnectedFrame, ErrorCode, Frame, FrameType, GoTime, Operation, Status, TraceHop,
    Uuid16,
};
use super::gob::{DEFAULT_MAX_MESSAGE, Value};
use super::profile::Profile;
use super::role::Role;
use super::tls::{self, CertificateDer, Identity, PeerPolicy, ServerName};

/// The SSNTP port when none is given.
pub const DEFAULT_PORT: u16 = 8888;

/// Reconnection delays: `min + rand(0 ..= window − min)`, the window cycling
/// through `windows` one failed pass after another.
#[derive(Debug, Clone)]
pub struct Backoff {
    pub min: Duration,
    pub windows: Vec<Duration>,
}

impl Default for Backoff {
    /// Go's schedule: 1–5 s, 1–10 s, 1–20 s, 1–40 s, then again.
    fn default() -> Self {
        Backoff {
            min: Duration::from_secs(1),
            windows: [5, 10, 20, 40].map(Duration::from_secs).to_vec(),
        }
    }
}

impl Backoff {
    /// The delay after failed pass number `pass` (0-based).
    pub fn delay(&self, pass: usize) -> Duration {
        let Some(window) =
            (!self.windows.is_empty()).then(|| self.windows[pass % self.windows.len()])
        else {
            return self.min;
        };
        let span = window.saturating_sub(self.min).as_millis() as u64;
        let jitter = if span == 0 {
            0
        } else {
            random_u64() % (span + 1)
        };
        self.min + Duration::from_millis(jitter)
    }
}

/// Where the client's backoff waits come from: a function that returns a
/// channel receiving once the delay is over (production:
/// `crossbeam_channel::after`). Tests inject their own to see every wait and
/// end it when they choose.
#[derive(Clone)]
pub struct Timer(Arc<dyn Fn(Duration) -> Receiver<Instant> + Send + Sync>);

impl Timer {
    pub fn new(f: impl Fn(Duration) -> Receiver<Instant> + Send + Sync + 'static) -> Timer {
        Timer(Arc::new(f))
    }

    pub fn after(&self, delay: Duration) -> Receiver<Instant> {
        (self.0)(delay)
    }
}

impl Default for Timer {
    fn default() -> Self {
        Timer::new(crossbeam_channel::after)
    }
}

impl std::fmt::Debug for Timer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Timer")
    }
}

/// Which backoff window the next wait uses (module doc, step 3).
#[derive(Debug, Default)]
struct Retry {
    pass: usize,
}

impl Retry {
    /// The wait after a failed pass over the server list.
    fn after_failed_pass(&mut self, backoff: &Backoff) -> Duration {
        let d = backoff.delay(self.pass);
        self.pass += 1;
        d
    }

    /// The wait after a session that ended after `lasted`: the windows start
    /// again only if it was healthy.
    fn after_session(
        &mut self,
        lasted: Duration,
        healthy: Duration,
        backoff: &Backoff,
    ) -> Duration {
        if lasted >= healthy {
            self.pass = 0;
        }
        self.after_failed_pass(backoff)
    }
}

/// How long a session must stay up before the backoff starts again from its
/// first window.
pub const HEALTHY_SESSION: Duration = Duration::from_secs(60);

fn random_u64() -> u64 {
    // uuid's v4 generator draws from the OS RNG; no extra crate needed.
    uuid::Uuid::new_v4().as_u64_pair().0
}

/// Everything the client needs to connect.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub identity: Identity,
    pub ca: Vec<CertificateDer<'static>>,
    /// The role claimed in CONNECT (default: our certificate's role).
    pub role: Role,
    pub uuid: Uuid16,
    /// `host:port` strings, tried in order each pass (see [`server_list`]).
    pub servers: Vec<String>,
    /// Roles a server certificate may carry (default SCHEDULER | SERVER).
    pub server_roles: Role,
    /// Check that the server's certificate names the address dialled; a
    /// mismatch stops the client (a security failure, not retried).
    pub verify_hostname: bool,
    pub profile: Profile,
    pub backoff: Backoff,
    /// A session that lasted this long resets the backoff ([`HEALTHY_SESSION`]).
    pub healthy_session: Duration,
    /// Backoff waits (module doc).
    pub timer: Timer,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    /// How long the rest of a begun frame may take ([`DEFAULT_FRAME_TIMEOUT`]).
    pub frame_timeout: Duration,
    pub max_message: usize,
}

impl ClientConfig {
    /// Defaults for everything but identity, trust and where to dial.
    pub fn new(
        identity: Identity,
        ca: Vec<CertificateDer<'static>>,
        uuid: Uuid16,
        servers: Vec<String>,
    ) -> ClientConfig {
        ClientConfig {
            role: identity.role,
            identity,
            ca,
            uuid,
            servers,
            server_roles: Role::SCHEDULER.union(Role::SERVER),
            verify_hostname: false,
            profile: Profile::default(),
            backoff: Backoff::default(),
            healthy_session: HEALTHY_SESSION,
            timer: Timer::default(),
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(30),
            frame_timeout: DEFAULT_FRAME_TIMEOUT,
            max_message: DEFAULT_MAX_MESSAGE,
        }
    }
}

/// The dial list: `explicit` (`host` or `host:port`) if given, else every IP
/// SAN of the CA certificate, then every DNS SAN, then `localhost`
/// (the order of the Go client), all on `port` unless `explicit` names one.
pub fn server_list(explicit: Option<&str>, ca: &[CertificateDer<'_>], port: u16) -> Vec<String> {
    if let Some(s) = explicit.map(str::trim).filter(|s| !s.is_empty()) {
        return vec![with_port(s, port)];
    }
    let mut out = Vec::new();
    if let Some(first) = ca.first()
        && let Ok((ips, dns)) = tls::cert_sans(first)
    {
        out.extend(ips.iter().map(|ip| SocketAddr::new(*ip, port).to_string()));
        out.extend(dns.iter().map(|d| format!("{d}:{port}")));
    }
    out.push(format!("localhost:{port}"));
    out.dedup();
    out
}

fn with_port(s: &str, port: u16) -> String {
    if s.parse::<SocketAddr>().is_ok() {
        return s.to_string();
    }
    if let Ok(ip) = s.trim_matches(|c| c == '[' || c == ']').parse::<IpAddr>() {
        return SocketAddr::new(ip, port).to_string();
    }
    match s.rsplit_once(':') {
        Some((_, p)) if p.parse::<u16>().is_ok() => s.to_string(),
        _ => format!("{s}:{port}"),
    }
}

/// The host part of `host:port`, as a TLS server name.
fn server_name(server: &str) -> Result<ServerName<'static>, ConnError> {
    let host = match server.parse::<SocketAddr>() {
        Ok(a) => return Ok(ServerName::IpAddress(a.ip().into())),
        Err(_) => server.rsplit_once(':').map_or(server, |(h, _)| h),
    };
    ServerName::try_from(host.to_string())
        .map_err(|_| ConnError::Protocol(format!("{host:?} is not a valid host name")))
}

/// What the io thread reports.
#[derive(Debug)]
pub enum ClientEvent {
    /// The SSNTP handshake completed.
    Connected {
        server_uuid: Uuid16,
        server_role: Role,
        configuration: Vec<u8>,
    },
    /// The connection was lost; `unsent` were queued but never written.
    Disconnected { reason: String, unsent: Vec<Frame> },
    /// A whole pass over the server list failed; the next starts after `retry_in`.
    ConnectFailed { error: String, retry_in: Duration },
    /// A frame from the server.
    Frame(Frame),
    /// The client stopped for good: closed by us (`error` None) or a security failure.
    Stopped { error: Option<String> },
}

/// A running client. Dropping it closes the connection and joins the thread.
#[derive(Debug)]
pub struct Client {
    link: Link,
    events: Receiver<ClientEvent>,
    shutdown: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    uuid: Uuid16,
    role: Role,
}

/// Events buffered before the io thread waits for the consumer. Small:
/// frames beyond it wait in the socket's buffers (the kernel's, then the
/// peer's), not in this process. A burst of thousands of STARTs otherwise
/// sat here decoded (~1 KB each, 3 MB at 4 000), and the freed payloads
/// stayed resident in the io thread's malloc arena.
const EVENT_QUEUE: usize = 256;

impl Client {
    /// Validates the configuration and starts the `ssntp-io` thread.
    pub fn start(config: ClientConfig) -> Result<Client, StartError> {
        let tls_config = tls::client_config(
            &config.identity,
            &config.ca,
            &PeerPolicy {
                accepted_roles: config.server_roles,
                verify_hostname: config.verify_hostname,
            },
        )
        .map_err(StartError::Tls)?;
        let link = Link::new();
        let (ev_tx, events) = crossbeam_channel::bounded(EVENT_QUEUE);
        let (shutdown, shutdown_rx) = crossbeam_channel::bounded::<()>(0);
        let (uuid, role) = (config.uuid, config.role);
        let worker = IoThread {
            config,
            tls: tls_config,
            link: link.clone(),
            events: ev_tx,
            shutdown: shutdown_rx,
        };
        let thread = thread::Builder::new()
            .name("ssntp-io".into())
            .spawn(move || worker.run())
            .map_err(StartError::Io)?;
        Ok(Client {
            link,
            events,
            shutdown: Some(shutdown),
            thread: Some(thread),
            uuid,
            role,
        })
    }

    /// A handle to send frames; refused while disconnected.
    pub fn link(&self) -> Link {
        self.link.clone()
    }

    pub fn send(&self, frame: Frame) -> Result<(), super::conn::SendError> {
        self.link.send(frame)
    }

    pub fn events(&self) -> &Receiver<ClientEvent> {
        &self.events
    }

    pub fn uuid(&self) -> Uuid16 {
        self.uuid
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// Closes the connection and waits for the io thread.
    pub fn close(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        self.link.close();
        self.shutdown.take();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            warn!("ssntp-io thread panicked");
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.shut();
    }
}

/// A failed connection attempt, and whether to try again.
struct AttemptError {
    error: ConnError,
    fatal: bool,
}

impl From<ConnError> for AttemptError {
    fn from(error: ConnError) -> Self {
        AttemptError {
            error,
            fatal: false,
        }
    }
}

/// How a session ended.
enum SessionEnd {
    /// The client must stop (closed, or nobody listens any more).
    Stop,
    /// The connection broke; reconnect after the backoff.
    Broken(String),
}

struct IoThread {
    config: ClientConfig,
    tls: Arc<rustls::ClientConfig>,
    link: Link,
    events: Sender<ClientEvent>,
    shutdown: Receiver<()>,
}

impl IoThread {
    fn closing(&self) -> bool {
        self.link.is_closed()
    }

    /// Hands `ev` to the consumer, waiting while its queue is full; false
    /// once the consumer is gone or the client is being closed (a full
    /// queue nobody reads any more must not hold the shutdown).
    fn emit(&self, ev: ClientEvent) -> bool {
        select! {
            send(self.events, ev) -> sent => sent.is_ok(),
            recv(self.shutdown) -> _ => false,
        }
    }

    fn run(self) {
        let mut retry = Retry::default();
        loop {
            if self.closing() {
                break;
            }
            let delay = match self.connect_pass() {
                Ok((transport, connected)) => {
                    let began = Instant::now();
                    match self.session(transport, connected) {
                        SessionEnd::Stop => break,
                        SessionEnd::Broken(reason) => {
                            let delay = retry.after_session(
                                began.elapsed(),
                                self.config.healthy_session,
                                &self.config.backoff,
                            );
                            warn!("SSNTP disconnected: {reason}; reconnecting in {delay:?}");
                            delay
                        }
                    }
                }
                Err(AttemptError {
                    error: ConnError::Shutdown,
                    ..
                }) => break,
                Err(AttemptError { error, fatal: true }) => {
                    warn!("SSNTP client stops: {error}");
                    self.emit(ClientEvent::Stopped {
                        error: Some(error.to_string()),
                    });
                    self.link.close();
                    return;
                }
                Err(AttemptError {
                    error,
                    fatal: false,
                }) => {
                    let delay = retry.after_failed_pass(&self.config.backoff);
                    debug!("SSNTP connection failed ({error}); retrying in {delay:?}");
                    if !self.emit(ClientEvent::ConnectFailed {
                        error: error.to_string(),
                        retry_in: delay,
                    }) {
                        break;
                    }
                    delay
                }
            };
            select! {
                recv(self.shutdown) -> _ => break,
                recv(self.config.timer.after(delay)) -> _ => {}
            }
        }
        self.link.close();
        self.emit(ClientEvent::Stopped { error: None });
    }

    /// One pass over the server list; the last error if none answered.
    fn connect_pass(&self) -> Result<(Transport, ConnectedFrame), AttemptError> {
        let mut last = AttemptError {
            error: ConnError::Protocol("no server to dial".into()),
            fatal: false,
        };
        for server in &self.config.servers {
            match self.attempt(server) {
                Ok(ok) => return Ok(ok),
                Err(e) if e.fatal || matches!(e.error, ConnError::Shutdown) => return Err(e),
                Err(e) => {
                    debug!("SSNTP: {server}: {}", e.error);
                    last = AttemptError {
                        error: ConnError::Unreachable(format!("{server}: {}", e.error)),
                        fatal: false,
                    };
                }
            }
        }
        Err(last)
    }

    fn attempt(&self, server: &str) -> Result<(Transport, ConnectedFrame), AttemptError> {
        let cfg = &self.config;
        let deadline = Instant::now() + cfg.handshake_timeout;
        let addrs: Vec<SocketAddr> = server.to_socket_addrs().map_err(ConnError::Io)?.collect();
        let mut sock = Err(io::Error::new(io::ErrorKind::NotFound, "no address"));
        for a in &addrs {
            sock = TcpStream::connect_timeout(a, cfg.connect_timeout);
            if sock.is_ok() {
                break;
            }
        }
        let sock = sock.map_err(ConnError::Io)?;
        let name = server_name(server)?;
        let conn =
            rustls::ClientConnection::new(Arc::clone(&self.tls), name).map_err(ConnError::Tls)?;
        let mut t = Transport::new(sock, conn.into(), cfg.max_message).map_err(ConnError::Io)?;
        t.set_frame_timeout(cfg.frame_timeout);
        let closing = || self.closing();
        match t.handshake(deadline, &closing) {
            Ok(()) => {}
            Err(ConnError::Tls(e)) if tls::hostname_mismatch(&e).is_some() => {
                let why = tls::hostname_mismatch(&e).map_or_else(String::new, |m| m.to_string());
                return Err(AttemptError {
                    error: ConnError::Security(format!(
                        "{server}: the server's {why}; refusing to talk to it \
                         (--verify-hostname=false turns the check off)"
                    )),
                    fatal: true,
                });
            }
            Err(e) => return Err(e.into()),
        }

        // CONNECT, then nothing until CONNECTED: the Go server reads CONNECT
        // with a throw-away buffered decoder.
        t.queue(&ConnectFrame::new(cfg.role, cfg.uuid));
        t.flush_all(deadline)?;
        let reply = t.recv_value(deadline, "CONNECTED", &closing)?;
        let Value::Struct(s) = reply else {
            return Err(ConnError::Protocol("handshake reply is not a struct".into()).into());
        };
        // Read by field name: an ERROR Frame fills the same fields.
        let c = ConnectedFrame::from_struct(&s).map_err(ConnError::Gob)?;
        match cfg.profile.operation(c.ftype, c.operand) {
            Ok(Operation::Status(Status::Connected)) => {}
            Ok(Operation::Error(ErrorCode::ConnectionAborted)) => {
                return Err(AttemptError {
                    error: ConnError::Protocol(format!(
                        "{server} aborted the connection: our certificate does not prove role {}",
                        cfg.role
                    )),
                    fatal: true,
                });
            }
            Ok(op) => {
                return Err(
                    ConnError::Protocol(format!("{server} answered CONNECT with {op}")).into(),
                );
            }
            Err(e) => {
                return Err(
                    ConnError::Protocol(format!("{server} answered CONNECT with {e}")).into(),
                );
            }
        }
        if c.source.len() < 16 {
            return Err(
                ConnError::Protocol(format!("{server}: CONNECTED without a server UUID")).into(),
            );
        }
        let cert_role = t
            .tls()
            .peer_certificates()
            .map_or(Role::UNKNOWN, tls::peer_role);
        if !cert_role.contains(c.role) {
            // As Go does: tell the server, then give up on it for good.
            let op = cfg
                .profile
                .operand(Operation::Error(ErrorCode::ConnectionFailure))
                .unwrap_or(0);
            t.queue(&Frame::new(FrameType::Error, op, cfg.uuid, Vec::new()));
            let _ = t.flush_all(Instant::now() + Duration::from_secs(1));
            return Err(AttemptError {
                error: ConnError::Protocol(format!(
                    "{server} claims role {} but its certificate proves only {}",
                    c.role,
                    if cert_role.is_empty() {
                        "no role".to_string()
                    } else {
                        cert_role.to_string()
                    }
                )),
                fatal: true,
            });
        }
        Ok((t, c))
    }

    /// Runs one connection until it ends.
    fn session(&self, mut t: Transport, c: ConnectedFrame) -> SessionEnd {
        let Ok(Some(out)) = self.link.up() else {
            return SessionEnd::Stop;
        };
        let mut server_uuid = [0u8; 16];
        server_uuid.copy_from_slice(&c.source[..16]);
        info!(
            "SSNTP connected to {} ({} {})",
            t.peer_addr().map_or_else(|| "?".into(), |a| a.to_string()),
            c.role,
            uuid::Uuid::from_bytes(server_uuid)
        );
        if !self.emit(ClientEvent::Connected {
            server_uuid,
            server_role: c.role,
            configuration: c.payload,
        }) {
            self.link.down(&out);
            return SessionEnd::Stop;
        }
        let (profile, uuid, role) = (self.config.profile, self.config.uuid, self.config.role);
        let result = t.run(&out, |t, v| {
            let mut frame = Frame::from_value(v)?;
            if frame.frame_type().is_none() {
                warn!(
                    "SSNTP: frame of invalid type {} from the server",
                    frame.ftype
                );
                let op = profile
                    .operand(Operation::Error(ErrorCode::InvalidFrameType))
                    .unwrap_or(0);
                t.queue(&Frame::new(FrameType::Error, op, uuid, Vec::new()));
                return Ok(());
            }
            stamp_rx(&mut frame, uuid, role);
            if !self.emit(ClientEvent::Frame(frame)) {
                return Err(ConnError::Shutdown);
            }
            Ok(())
        });
        let unsent = self.link.down(&out);
        let reason = match result {
            Err(ConnError::Shutdown) => {
                t.close();
                return SessionEnd::Stop;
            }
            Err(e) => e.to_string(),
            Ok(()) => "the session ended".to_string(),
        };
        if self.emit(ClientEvent::Disconnected {
            reason: reason.clone(),
            unsent,
        }) {
            SessionEnd::Broken(reason)
        } else {
            SessionEnd::Stop
        }
    }
}

/// Go's receive-side tracing: a path-traced frame gets a node for us.
pub(crate) fn stamp_rx(frame: &mut Frame, uuid: Uuid16, role: Role) {
    if frame.path_trace()
        && let Some(trace) = frame.trace.as_mut()
    {
        trace.path.push(TraceHop {
            uuid: uuid.to_vec(),
            role,
            tx: None,
            rx: Some(GoTime::now()),
        });
        trace.path_length = trace.path_length.saturating_add(1);
    }
}

// ---------------------------------------------------------------------------
// Node UUID persistence

/// This node's SSNTP UUID and the lock that keeps it ours.
#[derive(Debug)]
pub struct NodeUuid {
    pub uuid: uuid::Uuid,
    /// False when another process holds the lock (or the file is unusable)
    /// and this run uses a random UUID.
    pub persisted: bool,
    pub path: PathBuf,
    _lock: Option<File>,
}

/// Loads (or creates) the node UUID for `role` under
/// `<data_dir>/local/uuid-storage/role/client/0x<role>`, locked for this
/// process's lifetime. A second process with the same role gets a random UUID
/// (that is how several simulated launchers share a host, as in ciao).
pub fn node_uuid(data_dir: &Path, role: Role) -> io::Result<NodeUuid> {
    let dir = data_dir.join("local/uuid-storage/role/client");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&dir)?;
    let path = dir.join(format!("0x{:x}", role.bits()));
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)?;
    let random = |path: PathBuf| NodeUuid {
        uuid: uuid::Uuid::new_v4(),
        persisted: false,
        path,
        _lock: None,
    };
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            warn!(
                "{} is locked by another process: using a random node UUID for this run",
                path.display()
            );
            return Ok(random(path));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(e),
    }
    let mut text = String::new();
    Read::by_ref(&mut f)
        .take(36)
        .read_to_string(&mut text)
        .or_else(|e| {
            if e.kind() == io::ErrorKind::InvalidData {
                Ok(0)
            } else {
                Err(e)
            }
        })?;
    if text.is_empty() {
        let id = uuid::Uuid::new_v4();
        f.rewind()?;
        f.write_all(id.hyphenated().to_string().as_bytes())?;
        f.sync_all()?;
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        info!("new node UUID {id} stored in {}", path.display());
        return Ok(NodeUuid {
            uuid: id,
            persisted: true,
            path,
            _lock: Some(f),
        });
    }
    match uuid::Uuid::try_parse(text.trim()) {
        Ok(id) if text.len() == 36 => Ok(NodeUuid {
            uuid: id,
            persisted: true,
            path,
            _lock: Some(f),
        }),
        _ => {
            // Keep the operator's file as it is; say loudly what happened.
            warn!(
                "{} does not hold a UUID ({text:?}): using a random node UUID for this run",
                path.display()
            );
            Ok(NodeUuid {
                _lock: Some(f),
                ..random(path)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_windows_cycle_like_go() {
        let b = Backoff::default();
        for pass in 0..12 {
            let d = b.delay(pass);
            let w = [5, 10, 20, 40][pass % 4];
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(w),
                "pass {pass}: {d:?}"
            );
        }
    }

    #[test]
    fn broken_sessions_move_the_backoff_on_healthy_ones_reset_it() {
        let b = Backoff::default();
        let healthy = HEALTHY_SESSION;
        let within =
            |d: Duration, w: u64| d >= Duration::from_secs(1) && d <= Duration::from_secs(w);
        let mut r = Retry::default();
        assert!(within(r.after_failed_pass(&b), 5));
        assert!(within(r.after_failed_pass(&b), 10));
        // A session that broke at once is one more failure, not a fresh start.
        assert!(within(
            r.after_session(Duration::from_millis(3), healthy, &b),
            20
        ));
        assert_eq!(r.pass, 3);
        assert!(within(r.after_session(healthy / 2, healthy, &b), 40));
        assert_eq!(r.pass, 4);
        // One that stayed up long enough starts the windows again, and still waits.
        assert!(within(r.after_session(healthy, healthy, &b), 5));
        assert_eq!(r.pass, 1);
        assert!(within(r.after_session(Duration::ZERO, healthy, &b), 10));
    }

    #[test]
    fn explicit_server_with_and_without_port() {
        assert_eq!(server_list(Some("sched"), &[], 8888), ["sched:8888"]);
        assert_eq!(server_list(Some("sched:9000"), &[], 8888), ["sched:9000"]);
        assert_eq!(server_list(Some("10.0.0.1"), &[], 8888), ["10.0.0.1:8888"]);
        assert_eq!(server_list(Some("::1"), &[], 8888), ["[::1]:8888"]);
        assert_eq!(server_list(Some("[::1]:7"), &[], 8888), ["[::1]:7"]);
        assert_eq!(server_list(None, &[], 8888), ["localhost:8888"]);
    }

    #[test]
    fn server_names() {
        assert!(matches!(
            server_name("127.0.0.1:8888"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(
            server_name("localhost:8888"),
            Ok(ServerName::DnsName(_))
        ));
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ciao-uuid-{tag}-{}", uuid::Uuid::new_v4()));
        fs::create_dir_all(&d).expect("tmpdir");
        d
    }

    #[test]
    fn node_uuid_is_persisted_and_locked() {
        let dir = tmpdir("persist");
        let a = node_uuid(&dir, Role::AGENT).expect("first");
        assert!(a.persisted);
        assert!(a.path.ends_with("local/uuid-storage/role/client/0x4"));
        // Locked while `a` lives: a second user gets a random one.
        let b = node_uuid(&dir, Role::AGENT).expect("second");
        assert!(!b.persisted);
        assert_ne!(a.uuid, b.uuid);
        let id = a.uuid;
        drop(a);
        drop(b);
        let c = node_uuid(&dir, Role::AGENT).expect("again");
        assert!(c.persisted);
        assert_eq!(c.uuid, id);
        // Another role, another file.
        let n = node_uuid(&dir, Role::AGENT.union(Role::NETAGENT)).expect("netagent");
        assert!(n.path.ends_with("0x14"));
        assert_ne!(n.uuid, id);
        drop((c, n));
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn garbage_uuid_file_is_kept() {
        let dir = tmpdir("garbage");
        let p = dir.join("local/uuid-storage/role/client");
        fs::create_dir_all(&p).expect("mkdir");
        fs::write(p.join("0x4"), "not-a-uuid").expect("write");
        let a = node_uuid(&dir, Role::AGENT).expect("load");
        assert!(!a.persisted);
        assert_eq!(
            fs::read_to_string(p.join("0x4")).expect("read"),
            "not-a-uuid"
        );
        drop(a);
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
