//! The gob streams produced by the real Go ssntp types (tests/data/gob-golden-dumps.txt,
//! recorded from ciao's Go code) decode to the expected values, and our encoder reproduces
//! them byte for byte when given the same type ids.

use std::time::{Duration, UNIX_EPOCH};

use ciao_launcher::ssntp::frame::{FrameTrace, GoTime, TraceHop};
use ciao_launcher::ssntp::gob::{Decoder, Encoder, GobEncode, Value};
use ciao_launcher::ssntp::{ConnectFrame, ConnectedFrame, Frame, Role};

const CLIENT: [u8; 16] = [
    0x44, 0x81, 0x63, 0x1c, 0xdc, 0xe9, 0x48, 0xd6, 0xb8, 0x3a, 0xa7, 0x17, 0x41, 0x70, 0x72, 0xce,
];
const SERVER: [u8; 16] = [
    0x33, 0x90, 0x74, 0x0c, 0xdc, 0xe9, 0x48, 0xd6, 0xb8, 0x3a, 0xa7, 0x17, 0x41, 0x70, 0x72, 0xce,
];

/// Parses the `=== title (N bytes)` sections of hexdump -C output.
fn dumps() -> Vec<(String, Vec<u8>)> {
    let text = include_str!("data/gob-golden-dumps.txt");
    let mut out: Vec<(String, Vec<u8>, usize)> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("=== ") {
            let (title, size) = rest.rsplit_once(" (").expect("section size");
            let size: usize = size.trim_end_matches(" bytes)").parse().expect("size");
            out.push((title.to_string(), Vec::new(), size));
        } else if line.len() > 10 && line.as_bytes()[8] == b' ' && !line.starts_with('#') {
            let hex = line[10..].split('|').next().expect("hex part");
            let cur = out.last_mut().expect("hex before a section");
            cur.1.extend(
                hex.split_whitespace()
                    .map(|h| u8::from_str_radix(h, 16).expect("hex byte")),
            );
        }
    }
    for (title, bytes, size) in &out {
        assert_eq!(bytes.len(), *size, "section {title}");
    }
    out.into_iter().map(|(t, b, _)| (t, b)).collect()
}

fn dump(prefix: &str) -> Vec<u8> {
    dumps()
        .into_iter()
        .find(|(t, _)| t.starts_with(prefix))
        .unwrap_or_else(|| panic!("no dump {prefix}"))
        .1
}

/// Decodes every value of a stream, feeding it one byte at a time (the
/// decoder must be resumable) and all at once; both must agree.
fn decode_all(bytes: &[u8]) -> Vec<Value> {
    let mut whole = Decoder::default();
    whole.feed(bytes);
    let mut a = Vec::new();
    while let Some((_, v)) = whole.next_value().expect("decode") {
        a.push(v);
    }
    assert_eq!(whole.buffered(), 0);
    let mut trickle = Decoder::default();
    let mut b = Vec::new();
    for byte in bytes {
        trickle.feed(std::slice::from_ref(byte));
        while let Some((_, v)) = trickle.next_value().expect("decode") {
            b.push(v);
        }
    }
    assert_eq!(a, b);
    a
}

fn encode_with<T: GobEncode>(enc: &mut Encoder, v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    enc.encode(v, &mut out);
    out
}

fn strukt(v: &Value) -> &ciao_launcher::ssntp::gob::StructValue {
    match v {
        Value::Struct(s) => s,
        other => panic!("not a struct: {other:?}"),
    }
}

fn stats_frame() -> Frame {
    let payload = b"node_uuid: 4481631c-dce9-48d6-b83a-a717417072ce\nstatus: READY\n".to_vec();
    Frame::new(ciao_launcher::ssntp::FrameType::Command, 2, CLIENT, payload)
}

#[test]
fn client_connect_then_stats_stream() {
    let connect = dump("client CONNECT");
    let stats1 = dump("client first Frame");
    let stats2 = dump("client second Frame");
    let stream = [connect.clone(), stats1.clone(), stats2.clone()].concat();

    let values = decode_all(&stream);
    assert_eq!(values.len(), 3);
    let c = ConnectFrame::from_struct(strukt(&values[0])).expect("connect");
    assert_eq!(c, ConnectFrame::new(Role::AGENT, CLIENT));
    for v in &values[1..] {
        assert_eq!(Frame::from_struct(strukt(v)).expect("frame"), stats_frame());
    }

    // One encoder for the whole connection, as in the Go client.
    let mut enc = Encoder::new();
    assert_eq!(encode_with(&mut enc, &c), connect);
    assert_eq!(encode_with(&mut enc, &stats_frame()), stats1);
    assert_eq!(encode_with(&mut enc, &stats_frame()), stats2);
}

#[test]
fn server_connected() {
    let bytes = dump("server CONNECTED");
    let values = decode_all(&bytes);
    let c = ConnectedFrame::from_struct(strukt(&values[0])).expect("connected");
    let config = b"configure:\n  launcher:\n    disk_limit: true\n".to_vec();
    let want = ConnectedFrame::new(Role::SCHEDULER, SERVER, &CLIENT, config);
    assert_eq!(c, want);
    assert_eq!(encode_with(&mut Encoder::starting_at(72), &want), bytes);
}

#[test]
fn server_start_frame() {
    let bytes = dump("server START");
    let values = decode_all(&bytes);
    let f = Frame::from_struct(strukt(&values[0])).expect("frame");
    let want = Frame::new(
        ciao_launcher::ssntp::FrameType::Command,
        1,
        SERVER,
        b"start: {}\n".to_vec(),
    );
    assert_eq!(f, want);
    assert_eq!(encode_with(&mut Encoder::starting_at(66), &want), bytes);
}

#[test]
fn connection_failure_has_zero_origin_array() {
    let bytes = dump("server ConnectionFailure");
    let values = decode_all(&bytes);
    let f = Frame::from_struct(strukt(&values[0])).expect("frame");
    let want = Frame::new(
        ciao_launcher::ssntp::FrameType::Error,
        2,
        [0; 16],
        Vec::new(),
    );
    assert_eq!(f, want);
    assert_eq!(encode_with(&mut Encoder::starting_at(66), &want), bytes);
    // A client reads the handshake reply as a ConnectedFrame, by field name.
    let as_connected = ConnectedFrame::from_struct(strukt(&values[0])).expect("by name");
    assert_eq!((as_connected.ftype, as_connected.operand), (2, 2));
}

#[test]
fn traced_start_frame() {
    let bytes = dump("traced START");
    let values = decode_all(&bytes);
    let f = Frame::from_struct(strukt(&values[0])).expect("frame");
    let t = GoTime::from_system_time(UNIX_EPOCH + Duration::new(1_509_537_600, 500));
    let mut want = Frame::new(
        ciao_launcher::ssntp::FrameType::Command,
        1,
        SERVER,
        b"start: {}\n".to_vec(),
    );
    want.major = 0x80;
    want.trace = Some(Box::new(FrameTrace {
        label: b"L".to_vec(),
        start: Some(t),
        end: None,
        path_length: 1,
        path: vec![TraceHop {
            uuid: SERVER.to_vec(),
            role: Role::SCHEDULER,
            tx: Some(t),
            rx: None,
        }],
    }));
    assert_eq!(f, want);
    assert!(f.path_trace());
    assert_eq!(encode_with(&mut Encoder::starting_at(66), &want), bytes);
}

#[test]
fn time_marshal_binary() {
    let bytes = dump("time.Time");
    let t = GoTime::from_bytes(&bytes).expect("time");
    assert_eq!(
        t.to_system_time(),
        Some(UNIX_EPOCH + Duration::new(1_509_537_600, 500))
    );
    assert_eq!(t.to_bytes(), bytes);
}

#[test]
fn every_dump_is_covered() {
    let titles: Vec<String> = dumps().into_iter().map(|(t, _)| t).collect();
    assert_eq!(titles.len(), 8, "{titles:?}");
}
