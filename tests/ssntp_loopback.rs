//! Our SSNTP client against our SSNTP server over real TLS on 127.0.0.1, with
//! certificates generated at test time the way ciao makes them (anyEKU + role
//! OIDs, no SANs). Every wait is a bounded `recv_timeout`.

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use ciao_launcher::ssntp::certgen::{self, Authority, CertSpec, Issued};
use ciao_launcher::ssntp::client::{Backoff, Client, ClientConfig, ClientEvent, Timer};
use ciao_launcher::ssntp::conn::{SendError, send_patiently};
use ciao_launcher::ssntp::gob::Encoder;
use ciao_launcher::ssntp::server::{Server, ServerConfig, ServerEvent};
use ciao_launcher::ssntp::tls::{self, CertificateDer, Identity};
use ciao_launcher::ssntp::{ErrorCode, Frame, FrameType, Operation, Profile, Role};
use crossbeam_channel::Receiver;

const WAIT: Duration = Duration::from_secs(10);

struct Pki {
    ca: Authority,
    ca_cert: Issued,
}

impl Pki {
    fn new() -> Pki {
        let mut spec = CertSpec::new(Role::SCHEDULER);
        spec.is_ca = true;
        let (ca, ca_cert) = certgen::self_signed_ca(&spec).expect("CA");
        Pki { ca, ca_cert }
    }

    fn anchors(&self) -> Vec<CertificateDer<'static>> {
        vec![self.ca_cert.der.clone()]
    }

    /// The classic ciao scheduler identity: the CA certificate itself.
    fn ca_identity(&self) -> Identity {
        tls::identity_from_pem(self.ca_cert.combined_pem().as_bytes(), "CA").expect("CA identity")
    }

    fn issue(&self, spec: &CertSpec) -> Identity {
        let issued = certgen::issue(&self.ca, spec).expect("issue");
        tls::identity_from_pem(issued.combined_pem().as_bytes(), "leaf").expect("identity")
    }

    fn leaf(&self, role: Role) -> Identity {
        self.issue(&CertSpec::new(role))
    }
}

fn server_with(
    identity: Identity,
    ca: Vec<CertificateDer<'static>>,
    f: impl FnOnce(&mut ServerConfig),
) -> Server {
    let mut cfg = ServerConfig::new(
        identity,
        ca,
        *uuid::Uuid::new_v4().as_bytes(),
        "127.0.0.1:0".parse().expect("addr"),
    );
    cfg.configuration = b"configure:\n  launcher:\n    disk_limit: false\n".to_vec();
    cfg.handshake_timeout = Duration::from_secs(5);
    f(&mut cfg);
    Server::start(cfg).expect("server")
}

fn fast_backoff() -> Backoff {
    Backoff {
        min: Duration::from_millis(20),
        windows: vec![Duration::from_millis(100), Duration::from_millis(200)],
    }
}

fn client_with(
    identity: Identity,
    ca: Vec<CertificateDer<'static>>,
    addr: SocketAddr,
    f: impl FnOnce(&mut ClientConfig),
) -> Client {
    let mut cfg = ClientConfig::new(
        identity,
        ca,
        *uuid::Uuid::new_v4().as_bytes(),
        vec![addr.to_string()],
    );
    cfg.backoff = fast_backoff();
    cfg.handshake_timeout = Duration::from_secs(5);
    f(&mut cfg);
    Client::start(cfg).expect("client")
}

/// The next client event that is not a `ConnectFailed` retry notice.
fn next_client_event(rx: &Receiver<ClientEvent>) -> ClientEvent {
    loop {
        match rx.recv_timeout(WAIT).expect("client event in time") {
            ClientEvent::ConnectFailed { .. } => continue,
            ev => return ev,
        }
    }
}

fn expect_connected(c: &Client) -> (Role, Vec<u8>) {
    match next_client_event(c.events()) {
        ClientEvent::Connected {
            server_role,
            configuration,
            ..
        } => (server_role, configuration),
        other => panic!("expected Connected, got {other:?}"),
    }
}

fn expect_server_connected(s: &Server) -> ([u8; 16], Role) {
    match s.events().recv_timeout(WAIT).expect("server event") {
        ServerEvent::Connected { uuid, role, .. } => (uuid, role),
        other => panic!("expected Connected, got {other:?}"),
    }
}

/// The first connection failure the client reports.
fn expect_connect_failed(c: &Client) -> String {
    match c.events().recv_timeout(WAIT).expect("client event") {
        ClientEvent::ConnectFailed { error, .. } => error,
        other => panic!("expected ConnectFailed, got {other:?}"),
    }
}

fn expect_rejected(s: &Server) -> String {
    match s.events().recv_timeout(WAIT).expect("server event") {
        ServerEvent::Rejected { error, .. } => error,
        other => panic!("expected Rejected, got {other:?}"),
    }
}

/// A scheduler of a fresh CA and an agent connected to it: the server, the
/// client and the client's UUID as the server saw it.
fn connected_agent() -> (Server, Client, [u8; 16]) {
    let pki = Pki::new();
    let server = server_with(pki.ca_identity(), pki.anchors(), |_| {});
    let client = client_with(
        pki.leaf(Role::AGENT),
        pki.anchors(),
        server.local_addr(),
        |_| {},
    );
    expect_connected(&client);
    let (uuid, _) = expect_server_connected(&server);
    (server, client, uuid)
}

fn frame(op: u8, origin: [u8; 16], payload: &str) -> Frame {
    Frame::new(FrameType::Command, op, origin, payload.as_bytes().to_vec())
}

#[test]
fn classic_ca_as_server_and_agent() {
    let pki = Pki::new();
    let server = server_with(pki.ca_identity(), pki.anchors(), |_| {});
    let client = client_with(
        pki.leaf(Role::AGENT),
        pki.anchors(),
        server.local_addr(),
        |_| {},
    );
    let (role, config) = expect_connected(&client);
    assert_eq!(role, Role::SCHEDULER);
    assert_eq!(config, b"configure:\n  launcher:\n    disk_limit: false\n");
    let (uuid, crole) = expect_server_connected(&server);
    assert_eq!(uuid, client.uuid());
    assert_eq!(crole, Role::AGENT);
    assert_eq!(server.sessions(), vec![(uuid, Role::AGENT)]);
}

#[test]
fn leaf_server_certificate() {
    let pki = Pki::new();
    let server = server_with(pki.leaf(Role::SERVER), pki.anchors(), |_| {});
    let client = client_with(
        pki.leaf(Role::AGENT),
        pki.anchors(),
        server.local_addr(),
        |_| {},
    );
    assert_eq!(expect_connected(&client).0, Role::SERVER);
}

#[test]
fn netagent_controller_and_dual_role_clients() {
    let pki = Pki::new();
    let server = server_with(pki.ca_identity(), pki.anchors(), |_| {});
    for role in [
        Role::NETAGENT,
        Role::CONTROLLER,
        Role::AGENT.union(Role::NETAGENT),
    ] {
        let client = client_with(pki.leaf(role), pki.anchors(), server.local_addr(), |_| {});
        expect_connected(&client);
        assert_eq!(expect_server_connected(&server).1, role);
        drop(client);
        assert!(matches!(
            server.events().recv_timeout(WAIT),
            Ok(ServerEvent::Disconnected { .. })
        ));
    }
}

#[test]
fn both_directions_concurrently() {
    let (server, client, uuid) = connected_agent();
    const N: usize = 2000;
    let origin = client.uuid();

    // Two client threads and the server send at the same time.
    let senders: Vec<_> = (0..2)
        .map(|t| {
            let link = client.link();
            thread::spawn(move || {
                for i in 0..N {
                    // A full queue hands the frame back: wait, never lose it.
                    let f = frame(2, origin, &format!("t{t} {i}"));
                    send_patiently(|f| link.send(f), f, WAIT).expect("client send");
                }
            })
        })
        .collect();
    for i in 0..N {
        let f = frame(1, server.uuid(), &format!("s {i}"));
        send_patiently(|f| server.send(&uuid, f), f, WAIT).expect("server send");
    }
    for s in senders {
        s.join().expect("sender thread");
    }

    let mut next = [0usize; 2];
    while next != [N, N] {
        match server.events().recv_timeout(WAIT).expect("frame at server") {
            ServerEvent::Frame { frame, .. } => {
                let text = String::from_utf8(frame.payload).expect("utf8");
                let (t, i) = text.split_once(' ').expect("payload");
                let t: usize = t[1..].parse().expect("thread");
                assert_eq!(
                    i.parse::<usize>().expect("seq"),
                    next[t],
                    "per-sender order"
                );
                next[t] += 1;
                assert_eq!(frame.origin, origin);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    for i in 0..N {
        match next_client_event(client.events()) {
            ClientEvent::Frame(f) => assert_eq!(f.payload, format!("s {i}").as_bytes()),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn rejects_server_with_wrong_role() {
    let pki = Pki::new();
    let server = server_with(pki.leaf(Role::AGENT), pki.anchors(), |_| {});
    let client = client_with(
        pki.leaf(Role::AGENT),
        pki.anchors(),
        server.local_addr(),
        |_| {},
    );
    let err = expect_connect_failed(&client);
    assert!(
        err.contains("CNAgent"),
        "client error names the role: {err}"
    );
    expect_rejected(&server);
}

#[test]
fn rejects_client_from_foreign_ca() {
    let pki = Pki::new();
    let foreign = Pki::new();
    let server = server_with(pki.ca_identity(), pki.anchors(), |_| {});
    let client = client_with(
        foreign.leaf(Role::AGENT),
        pki.anchors(),
        server.local_addr(),
        |_| {},
    );
    let err = expect_rejected(&server).to_lowercase();
    assert!(
        err.contains("issuer") || err.contains("configured ca"),
        "{err}"
    );
    expect_connect_failed(&client);
}

#[test]
fn rejects_expired_client_certificate() {
    let pki = Pki::new();
    let mut spec = CertSpec::new(Role::AGENT);
    spec.not_before = SystemTime::now() - Duration::from_secs(3 * 86400);
    spec.not_after = SystemTime::now() - Duration::from_secs(86400);
    let server = server_with(pki.ca_identity(), pki.anchors(), |_| {});
    let client = client_with(pki.issue(&spec), pki.anchors(), server.local_addr(), |_| {});
    let err = expect_rejected(&server).to_lowercase();
    assert!(err.contains("expired"), "{err}");
    expect_connect_failed(&client);
}

#[test]
fn rejects_expired_scheduler_ca() {
    let mut spec = CertSpec::new(Role::SCHEDULER);
    spec.is_ca = true;
    spec.not_before = SystemTime::now() - Duration::from_secs(3 * 86400);
    spec.not_after = SystemTime::now() - Duration::from_secs(86400);
    let (ca, ca_cert) = certgen::self_signed_ca(&spec).expect("ca");
    let anchors = vec![ca_cert.der.clone()];
    let server_id = tls::identity_from_pem(ca_cert.combined_pem().as_bytes(), "ca").expect("id");
    let agent = certgen::issue(&ca, &CertSpec::new(Role::AGENT)).expect("agent");
    let agent = tls::identity_from_pem(agent.combined_pem().as_bytes(), "agent").expect("id");
    let server = server_with(server_id, anchors.clone(), |_| {});
    let client = client_with(agent, anchors, server.local_addr(), |_| {});
    let err = expect_connect_failed(&client).to_lowercase();
    assert!(err.contains("expired"), "{err}");
}

#[test]
fn connect_role_not_in_certificate_is_aborted_for_good() {
    let pki = Pki::new();
    let server = server_with(pki.ca_identity(), pki.anchors(), |_| {});
    let client = client_with(
        pki.leaf(Role::AGENT),
        pki.anchors(),
        server.local_addr(),
        |c| c.role = Role::NETAGENT,
    );
    let err = expect_rejected(&server);
    assert!(err.contains("NetworkingAgent"), "{err}");
    match next_client_event(client.events()) {
        ClientEvent::Stopped { error: Some(e) } => assert!(e.contains("aborted"), "{e}"),
        other => panic!("expected Stopped, got {other:?}"),
    }
    // A security failure is not retried: nothing more arrives at the server.
    assert!(
        server
            .events()
            .recv_timeout(Duration::from_millis(500))
            .is_err()
    );
    let f = frame(2, client.uuid(), "x");
    assert!(matches!(client.send(f), Err(SendError::Closed(_))));
}

#[test]
fn server_claiming_a_role_its_certificate_lacks_is_refused() {
    let pki = Pki::new();
    let server = server_with(pki.ca_identity(), pki.anchors(), |s| {
        s.role = Role::CONTROLLER
    });
    let client = client_with(
        pki.leaf(Role::AGENT),
        pki.anchors(),
        server.local_addr(),
        |_| {},
    );
    match next_client_event(client.events()) {
        ClientEvent::Stopped { error: Some(e) } => assert!(e.contains("Controller"), "{e}"),
        other => panic!("expected Stopped, got {other:?}"),
    }
    // The client tells the server why, as Go does.
    expect_server_connected(&server);
    match server.events().recv_timeout(WAIT).expect("event") {
        ServerEvent::Frame { frame, .. } => {
            assert_eq!(
                Profile::P2016.frame_operation(&frame),
                Ok(Operation::Error(ErrorCode::ConnectionFailure))
            );
        }
        other => panic!("expected the ConnectionFailure frame, got {other:?}"),
    }
}

#[test]
fn reconnects_after_server_restart_and_refuses_sends_meanwhile() {
    let pki = Pki::new();
    let server = server_with(pki.ca_identity(), pki.anchors(), |_| {});
    let addr = server.local_addr();
    let client = client_with(pki.leaf(Role::AGENT), pki.anchors(), addr, |_| {});
    expect_connected(&client);
    expect_server_connected(&server);
    server.stop();

    match next_client_event(client.events()) {
        ClientEvent::Disconnected { .. } => {}
        other => panic!("expected Disconnected, got {other:?}"),
    }
    // While down, sends are refused with the frame handed back.
    let f = frame(2, client.uuid(), "while down");
    match client.send(f.clone()) {
        Err(SendError::NotConnected(back)) => assert_eq!(back, f),
        other => panic!("expected NotConnected, got {other:?}"),
    }
    // The client retries on its own; it must report failures while the port is closed.
    let failure = expect_connect_failed(&client);
    assert!(!failure.is_empty());

    let server = server_with(pki.ca_identity(), pki.anchors(), |s| s.listen = addr);
    expect_connected(&client);
    expect_server_connected(&server);
    client
        .send(frame(2, client.uuid(), "after"))
        .expect("send after reconnect");
    match server.events().recv_timeout(WAIT).expect("frame") {
        ServerEvent::Frame { frame, .. } => assert_eq!(frame.payload, b"after"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn invalid_frame_type_is_answered_not_forwarded() {
    let (server, client, _) = connected_agent();
    let mut bad = frame(0, client.uuid(), "");
    bad.ftype = 9;
    client.send(bad).expect("send");
    client.send(frame(2, client.uuid(), "good")).expect("send");
    match next_client_event(client.events()) {
        ClientEvent::Frame(f) => {
            assert_eq!(
                Profile::P2016.frame_operation(&f),
                Ok(Operation::Error(ErrorCode::InvalidFrameType))
            )
        }
        other => panic!("unexpected {other:?}"),
    }
    match server.events().recv_timeout(WAIT).expect("frame") {
        ServerEvent::Frame { frame, .. } => assert_eq!(frame.payload, b"good"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn oversized_frame_drops_the_connection_not_the_server() {
    let pki = Pki::new();
    let server = server_with(pki.ca_identity(), pki.anchors(), |s| s.max_message = 4096);
    let client = client_with(
        pki.leaf(Role::AGENT),
        pki.anchors(),
        server.local_addr(),
        |_| {},
    );
    expect_connected(&client);
    expect_server_connected(&server);
    client
        .send(frame(2, client.uuid(), &"x".repeat(100_000)))
        .expect("queued");
    match server.events().recv_timeout(WAIT).expect("event") {
        ServerEvent::Disconnected { reason, .. } => {
            assert!(reason.contains("exceeds the limit"), "{reason}")
        }
        other => panic!("unexpected {other:?}"),
    }
    // The client notices, reconnects, and small frames flow again.
    assert!(matches!(
        next_client_event(client.events()),
        ClientEvent::Disconnected { .. }
    ));
    expect_connected(&client);
    expect_server_connected(&server);
    client.send(frame(2, client.uuid(), "small")).expect("send");
    assert!(matches!(
        server.events().recv_timeout(WAIT),
        Ok(ServerEvent::Frame { .. })
    ));
}

#[test]
fn garbage_and_silent_peers_do_not_disturb_the_server() {
    use std::io::Write;
    let pki = Pki::new();
    let server = server_with(pki.ca_identity(), pki.anchors(), |s| {
        s.handshake_timeout = Duration::from_millis(300)
    });
    // Not TLS at all.
    let mut raw = std::net::TcpStream::connect(server.local_addr()).expect("connect");
    raw.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("write");
    expect_rejected(&server);
    // TCP but never a handshake: timed out, not a stuck thread.
    let _silent = std::net::TcpStream::connect(server.local_addr()).expect("connect");
    assert!(expect_rejected(&server).contains("timed out"));
    // A real client still gets in.
    let client = client_with(
        pki.leaf(Role::AGENT),
        pki.anchors(),
        server.local_addr(),
        |_| {},
    );
    expect_connected(&client);
}

#[test]
fn send_to_role_reaches_only_that_role() {
    let pki = Pki::new();
    let server = server_with(pki.ca_identity(), pki.anchors(), |_| {});
    let agent = client_with(
        pki.leaf(Role::AGENT),
        pki.anchors(),
        server.local_addr(),
        |_| {},
    );
    expect_connected(&agent);
    expect_server_connected(&server);
    let net = client_with(
        pki.leaf(Role::NETAGENT),
        pki.anchors(),
        server.local_addr(),
        |_| {},
    );
    expect_connected(&net);
    expect_server_connected(&server);
    assert_eq!(
        server.send_to_role(Role::NETAGENT, &frame(1, server.uuid(), "nn")),
        1
    );
    match next_client_event(net.events()) {
        ClientEvent::Frame(f) => assert_eq!(f.payload, b"nn"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        agent
            .events()
            .recv_timeout(Duration::from_millis(300))
            .is_err()
    );
}

#[test]
fn bulk_transfer_larger_than_every_buffer_in_both_directions() {
    // More than the TLS and socket buffers hold, with no other traffic to
    // wake the io threads: the backlog must drain by itself.
    let (server, client, uuid) = connected_agent();
    let payload = "y".repeat(16 * 1024);
    for i in 0..200 {
        server
            .send(&uuid, frame(1, server.uuid(), &format!("{i} {payload}")))
            .expect("queued");
    }
    for i in 0..200 {
        match next_client_event(client.events()) {
            ClientEvent::Frame(f) => assert!(f.payload.starts_with(format!("{i} ").as_bytes())),
            other => panic!("unexpected {other:?}"),
        }
    }
    for i in 0..200 {
        client
            .send(frame(2, client.uuid(), &format!("{i} {payload}")))
            .expect("queued");
    }
    for i in 0..200 {
        match server.events().recv_timeout(WAIT).expect("frame") {
            ServerEvent::Frame { frame, .. } => {
                assert!(frame.payload.starts_with(format!("{i} ").as_bytes()))
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn close_is_not_held_by_frames_nobody_reads() {
    // The consumer stops reading with its queue full and the io thread
    // waiting to hand over the next frame (a SIGTERM in a START burst):
    // closing the client must still end the io thread.
    let (server, client, uuid) = connected_agent();
    for i in 0..2_000 {
        server
            .send(&uuid, frame(1, server.uuid(), &format!("frame {i}")))
            .expect("queued");
    }
    let deadline = Instant::now() + WAIT;
    while !client.events().is_full() {
        assert!(Instant::now() < deadline, "the client's queue never filled");
        thread::yield_now();
    }
    let (done_tx, done) = crossbeam_channel::bounded(1);
    thread::spawn(move || {
        client.close();
        let _ = done_tx.send(());
    });
    done.recv_timeout(WAIT)
        .expect("close() held by frames waiting for a consumer that stopped reading");
}

#[test]
fn saturated_outbound_queue_keeps_draining() {
    // A sender that keeps the queue full while the io thread alternates
    // between a full socket and an empty one: the io thread must never park
    // with frames queued (a lost wake-up found by the benchmark).
    let (server, client, _) = connected_agent();
    const N: usize = 60_000;
    let link = client.link();
    let origin = client.uuid();
    let body = "z".repeat(1000);
    let sender = thread::spawn(move || {
        for _ in 0..N {
            send_patiently(|f| link.send(f), frame(2, origin, &body), WAIT).expect("send");
        }
    });
    for got in 0..N {
        match server.events().recv_timeout(WAIT) {
            Ok(ServerEvent::Frame { .. }) => {}
            other => panic!("stalled after {got} frames: {other:?}"),
        }
    }
    sender.join().expect("sender");
}

// ---------------------------------------------------------------------------
// Host names: the scheduler's certificate must name the address dialled when
// the client asks (the launcher's 2018 profile does by default).

impl Pki {
    /// A classic CA-as-scheduler whose certificate carries these SANs.
    fn with_names(dns: &[&str], ips: &[&str]) -> Pki {
        let mut spec = CertSpec::new(Role::SCHEDULER);
        spec.is_ca = true;
        spec.dns = dns.iter().map(|d| d.to_string()).collect();
        spec.ips = ips
            .iter()
            .map(|ip| ip.parse().expect("ip literal"))
            .collect();
        let (ca, ca_cert) = certgen::self_signed_ca(&spec).expect("CA");
        Pki { ca, ca_cert }
    }
}

/// A client that verifies the server's name, dialling `host:port`.
fn strict_client(pki: &Pki, host: &str, port: u16, verify: bool) -> Client {
    let mut cfg = ClientConfig::new(
        pki.leaf(Role::AGENT),
        pki.anchors(),
        *uuid::Uuid::new_v4().as_bytes(),
        vec![format!("{host}:{port}")],
    );
    cfg.backoff = fast_backoff();
    cfg.handshake_timeout = Duration::from_secs(5);
    cfg.verify_hostname = verify;
    Client::start(cfg).expect("client")
}

/// The client's first event must be a security stop (no retry before it).
fn expect_security_stop(c: &Client) -> String {
    match c.events().recv_timeout(WAIT).expect("client event") {
        ClientEvent::Stopped { error: Some(e) } => e,
        other => panic!("expected a security stop, got {other:?}"),
    }
}

#[test]
fn scheduler_name_matches_ip_and_dns_sans() {
    let pki = Pki::with_names(&["localhost"], &["127.0.0.1"]);
    let server = server_with(pki.ca_identity(), pki.anchors(), |_| {});
    let port = server.local_addr().port();
    let mut clients = Vec::new();
    for host in ["127.0.0.1", "localhost"] {
        let client = strict_client(&pki, host, port, true);
        assert_eq!(expect_connected(&client).0, Role::SCHEDULER, "{host}");
        expect_server_connected(&server);
        clients.push(client);
    }
}

#[test]
fn scheduler_without_a_matching_san_is_refused_for_good() {
    // No SANs at all (ciao-lc certs --no-san, old setups).
    let pki = Pki::new();
    let server = server_with(pki.ca_identity(), pki.anchors(), |_| {});
    let port = server.local_addr().port();
    let e = expect_security_stop(&strict_client(&pki, "127.0.0.1", port, true));
    assert!(
        e.contains("not valid for name \"127.0.0.1\"")
            && e.contains("it has no subject alternative names")
            && e.contains("--verify-hostname=false"),
        "{e}"
    );

    // IP case: a DNS SAN does not vouch for an IP address (Go's rule).
    let pki = Pki::with_names(&["localhost"], &["127.0.0.2"]);
    let server = server_with(pki.ca_identity(), pki.anchors(), |_| {});
    let port = server.local_addr().port();
    let e = expect_security_stop(&strict_client(&pki, "127.0.0.1", port, true));
    assert!(
        e.contains("not valid for name \"127.0.0.1\"")
            && e.contains("its subject alternative names are DNS:localhost, IP:127.0.0.2"),
        "{e}"
    );
    // DNS case: an IP SAN does not vouch for a name.
    let pki = Pki::with_names(&["sched.example"], &["127.0.0.1"]);
    let server = server_with(pki.ca_identity(), pki.anchors(), |_| {});
    let port = server.local_addr().port();
    let e = expect_security_stop(&strict_client(&pki, "localhost", port, true));
    assert!(
        e.contains("not valid for name \"localhost\"")
            && e.contains("DNS:sched.example, IP:127.0.0.1"),
        "{e}"
    );
    // The server saw a refused TLS handshake, never a session.
    assert!(matches!(
        server.events().recv_timeout(WAIT),
        Ok(ServerEvent::Rejected { .. })
    ));
    assert!(server.sessions().is_empty());
}

#[test]
fn unverified_name_connects_to_a_scheduler_without_sans() {
    let pki = Pki::new();
    let server = server_with(pki.ca_identity(), pki.anchors(), |_| {});
    let port = server.local_addr().port();
    let client = strict_client(&pki, "127.0.0.1", port, false);
    expect_connected(&client);
}

// ---------------------------------------------------------------------------
// A hostile scheduler: our handshake, then whatever bytes the test chooses.

/// Completes TLS and the CONNECT/CONNECTED exchange, then writes what `then`
/// returns (given the session's gob encoder, CONNECTED already encoded with
/// it) inside TLS and holds the connection until the client closes it.
/// Sessions are served one after the other; each is announced on `sessions`.
struct Hostile {
    addr: SocketAddr,
    sessions: Receiver<usize>,
    _thread: thread::JoinHandle<()>,
}

impl Hostile {
    fn start(pki: &Pki, then: impl Fn(&mut Encoder) -> Vec<u8> + Send + 'static) -> Hostile {
        use ciao_launcher::ssntp::ConnectedFrame;
        use ciao_launcher::ssntp::gob::Decoder;
        use ciao_launcher::ssntp::tls::PeerPolicy;
        use std::io::{Read, Write};

        let config = tls::server_config(
            &pki.ca_identity(),
            &pki.anchors(),
            &PeerPolicy {
                accepted_roles: Role::AGENT,
                verify_hostname: false,
            },
        )
        .expect("server config");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, sessions) = crossbeam_channel::unbounded();
        let thread = thread::spawn(move || {
            for (n, sock) in listener.incoming().enumerate() {
                let Ok(sock) = sock else { return };
                // Every read of this peer is bounded.
                let _ = sock.set_read_timeout(Some(WAIT));
                let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                    return;
                };
                let mut tls = rustls::StreamOwned::new(conn, sock);
                let mut dec = Decoder::new(1 << 20);
                let mut buf = [0u8; 4096];
                let connect = loop {
                    match dec.next_value() {
                        Ok(Some((_, v))) => break Some(v),
                        Ok(None) => {}
                        Err(_) => break None,
                    }
                    match tls.read(&mut buf) {
                        Ok(0) | Err(_) => break None,
                        Ok(k) => dec.feed(&buf[..k]),
                    }
                };
                if connect.is_none() {
                    continue;
                }
                let mut out = Vec::new();
                let mut enc = Encoder::new();
                enc.encode(
                    &ConnectedFrame::new(Role::SCHEDULER, [9; 16], &[0; 16], Vec::new()),
                    &mut out,
                );
                out.extend_from_slice(&then(&mut enc));
                if tls.write_all(&out).and_then(|()| tls.flush()).is_err() {
                    continue;
                }
                if tx.send(n).is_err() {
                    return;
                }
                // Until the client hangs up (or the bounded read gives up).
                while matches!(tls.read(&mut buf), Ok(k) if k > 0) {}
            }
        });
        Hostile {
            addr,
            sessions,
            _thread: thread,
        }
    }
}

/// A Timer whose waits the test sees and ends: each wait is announced with
/// its delay and a sender that ends it.
fn test_timer() -> (
    Timer,
    Receiver<(Duration, crossbeam_channel::Sender<Instant>)>,
) {
    let (tx, waits) = crossbeam_channel::unbounded();
    let timer = Timer::new(move |delay| {
        let (end, wait) = crossbeam_channel::bounded(1);
        let _ = tx.send((delay, end));
        wait
    });
    (timer, waits)
}

#[test]
fn broken_sessions_reconnect_after_the_backoff_not_at_once() {
    // One zero-length gob message right after CONNECTED, every session: the
    // client used to redial at once (~30 TLS connections a second).
    let pki = Pki::new();
    let hostile = Hostile::start(&pki, |_| vec![0x00]);
    let (timer, waits) = test_timer();
    let client = client_with(pki.leaf(Role::AGENT), pki.anchors(), hostile.addr, |c| {
        c.backoff = Backoff::default();
        c.timer = timer;
    });
    for round in 0..3 {
        hostile.sessions.recv_timeout(WAIT).expect("a session");
        expect_connected(&client);
        match next_client_event(client.events()) {
            ClientEvent::Disconnected { reason, .. } => {
                assert!(
                    reason.contains("zero-length") || reason.contains("empty"),
                    "{reason}"
                )
            }
            other => panic!("expected Disconnected, got {other:?}"),
        }
        // Before it dials again, the client must wait out a backoff delay.
        crossbeam_channel::select! {
            recv(waits) -> w => {
                let (delay, end) = w.expect("timer alive");
                let window = [5, 10, 20][round];
                assert!(
                    delay >= Duration::from_secs(1) && delay <= Duration::from_secs(window),
                    "round {round}: {delay:?}"
                );
                end.send(Instant::now()).expect("client waits");
            }
            recv(hostile.sessions) -> _ => panic!("round {round}: redialled without a backoff"),
            default(WAIT) => panic!("round {round}: neither a wait nor a new session"),
        }
    }
}

#[test]
fn a_frame_that_stops_halfway_ends_the_session() {
    // The Frame type's definition and all but the last bytes of one frame,
    // then silence.
    let pki = Pki::new();
    let hostile = Hostile::start(&pki, |enc| {
        let mut bytes = Vec::new();
        enc.encode(&frame(1, [9; 16], &"p".repeat(1000)), &mut bytes);
        bytes.truncate(bytes.len() - 100);
        bytes
    });
    let (timer, _waits) = test_timer();
    let client = client_with(pki.leaf(Role::AGENT), pki.anchors(), hostile.addr, |c| {
        c.frame_timeout = Duration::from_millis(300);
        c.timer = timer;
    });
    hostile.sessions.recv_timeout(WAIT).expect("a session");
    expect_connected(&client);
    match next_client_event(client.events()) {
        ClientEvent::Disconnected { reason, .. } => assert!(
            reason.contains("timed out waiting for the rest of a frame"),
            "{reason}"
        ),
        other => panic!("expected Disconnected, got {other:?}"),
    }
}
