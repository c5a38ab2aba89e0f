//! Our SSNTP client against our SSNTP server over real TLS on 127.0.0.1, with
//! certificates generated at test time the way ciao makes them (anyEKU + role
//! OIDs, no SANs). Every wait is a bounded `recv_timeout`.

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, SystemTime};

use ciao_launcher::ssntp::certgen::{self, Authority, CertSpec, Issued};
use ciao_launcher::ssntp::client::{Backoff, Client, ClientConfig, ClientEvent};
use ciao_launcher::ssntp::conn::{SendError, send_patiently};
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
    let pki = Pki::new();
    let server = server_with(pki.ca_identity(), pki.anchors(), |_| {});
    let client = client_with(
        pki.leaf(Role::AGENT),
        pki.anchors(),
        server.local_addr(),
        |_| {},
    );
    expect_connected(&client);
    expect_server_connected(&server);
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
fn saturated_outbound_queue_keeps_draining() {
    // A sender that keeps the queue full while the io thread alternates
    // between a full socket and an empty one: the io thread must never park
    // with frames queued (a lost wake-up found by the benchmark).
    let pki = Pki::new();
    let server = server_with(pki.ca_identity(), pki.anchors(), |_| {});
    let client = client_with(
        pki.leaf(Role::AGENT),
        pki.anchors(),
        server.local_addr(),
        |_| {},
    );
    expect_connected(&client);
    expect_server_connected(&server);
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
