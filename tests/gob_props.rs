//! Round-trip properties of the gob codec and the SSNTP frames, over many
//! pseudo-random cases from a fixed seed (reproducible; the seed and case
//! number are printed on failure). No property-testing crate: a xorshift
//! generator is enough here and keeps the dependency list short.

use ciao_launcher::ssntp::frame::{FrameTrace, GoTime, NODE, TIME, TraceHop};
use ciao_launcher::ssntp::gob::{Decoder, Encoder, GobEncode, StructWriter, TypeDesc, Value};
use ciao_launcher::ssntp::{ConnectFrame, ConnectedFrame, Frame, Role};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
    /// Integers biased towards gob's encoding boundaries.
    fn uint(&mut self) -> u64 {
        match self.below(6) {
            0 => 0,
            1 => self.below(128),
            2 => 128 + self.below(128),
            3 => self.next() >> self.below(64),
            4 => u64::MAX - self.below(3),
            _ => self.next(),
        }
    }
    fn bytes(&mut self, max: u64) -> Vec<u8> {
        let n = if self.below(4) == 0 {
            0
        } else {
            self.below(max)
        };
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn uuid(&mut self) -> [u8; 16] {
        let mut u = [0u8; 16];
        for b in u.iter_mut() {
            *b = self.next() as u8;
        }
        u
    }
    fn time(&mut self) -> Option<GoTime> {
        self.coin().then(|| GoTime {
            secs: self.next() as i64,
            nanos: self.below(1_000_000_000) as i32,
            offset_min: if self.coin() {
                -1
            } else {
                self.below(1440) as i16
            },
            offset_sec: if self.below(4) == 0 {
                self.below(60) as i8
            } else {
                0
            },
        })
    }
}

fn random_frame(r: &mut Rng) -> Frame {
    let trace = (r.below(3) == 0).then(|| {
        Box::new(FrameTrace {
            label: r.bytes(8),
            start: r.time(),
            end: r.time(),
            path_length: r.below(256) as u8,
            path: (0..r.below(4))
                .map(|_| TraceHop {
                    uuid: r.bytes(17),
                    role: Role::from_bits(r.next() as u32),
                    tx: r.time(),
                    rx: r.time(),
                })
                .collect(),
        })
    });
    Frame {
        major: r.next() as u8,
        minor: r.next() as u8,
        ftype: r.below(5) as u8,
        operand: r.next() as u8,
        origin: if r.coin() { [0; 16] } else { r.uuid() },
        payload_length: r.uint() as u32,
        trace,
        payload: r.bytes(3000),
    }
}

/// Feeds `bytes` in random chunks and returns every decoded value.
fn decode_chunked(r: &mut Rng, bytes: &[u8]) -> Vec<Value> {
    let mut d = Decoder::default();
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let n = (1 + r.below(700) as usize).min(bytes.len() - pos);
        d.feed(&bytes[pos..pos + n]);
        pos += n;
        while let Some((_, v)) = d.next_value().expect("decode") {
            out.push(v);
        }
    }
    assert_eq!(d.buffered(), 0);
    out
}

#[test]
fn frames_round_trip_on_one_stream() {
    let seed = 0x5eed_c1a0_u64;
    let mut r = Rng(seed);
    for case in 0..300 {
        let n = 1 + r.below(20) as usize;
        let frames: Vec<Frame> = (0..n).map(|_| random_frame(&mut r)).collect();
        let connect = ConnectFrame::new(Role::from_bits(r.next() as u32), r.uuid());
        let mut enc = Encoder::new();
        let mut bytes = Vec::new();
        enc.encode(&connect, &mut bytes);
        for f in &frames {
            enc.encode(f, &mut bytes);
        }
        let values = decode_chunked(&mut r, &bytes);
        assert_eq!(values.len(), n + 1, "seed {seed:#x} case {case}");
        let Value::Struct(s) = &values[0] else {
            panic!("case {case}: not a struct")
        };
        assert_eq!(
            ConnectFrame::from_struct(s).expect("connect"),
            connect,
            "case {case}"
        );
        for (f, v) in frames.iter().zip(values.into_iter().skip(1)) {
            assert_eq!(
                &Frame::from_value(v).expect("frame"),
                f,
                "seed {seed:#x} case {case}"
            );
        }
    }
}

#[test]
fn connected_round_trip() {
    let mut r = Rng(42);
    for case in 0..200 {
        let c = ConnectedFrame::new(
            Role::from_bits(r.next() as u32),
            r.uuid(),
            &r.bytes(20),
            r.bytes(500),
        );
        let mut bytes = Vec::new();
        Encoder::starting_at(65 + r.below(1000) as i64).encode(&c, &mut bytes);
        let values = decode_chunked(&mut r, &bytes);
        let Value::Struct(s) = &values[0] else {
            panic!("case {case}")
        };
        assert_eq!(
            ConnectedFrame::from_struct(s).expect("connected"),
            c,
            "case {case}"
        );
    }
}

/// A struct that uses every kind our encoder can send.
#[derive(Debug, Clone, PartialEq, Default)]
struct Everything {
    b: bool,
    i: i64,
    u: u64,
    s: Vec<u8>,
    bs: Vec<u8>,
    arr: [u8; 4],
    t: Option<GoTime>,
    inner: Option<TraceHop>,
    list: Vec<TraceHop>,
}

static ARR4: TypeDesc = TypeDesc::Array {
    name: "Arr4",
    elem: &TypeDesc::Uint,
    len: 4,
};
static NODES: TypeDesc = TypeDesc::Slice {
    name: "[]Node",
    elem: &NODE,
};
static EVERYTHING: TypeDesc = TypeDesc::Struct {
    name: "Everything",
    fields: &[
        ("B", &TypeDesc::Bool),
        ("I", &TypeDesc::Int),
        ("U", &TypeDesc::Uint),
        ("S", &TypeDesc::String),
        ("Bs", &TypeDesc::Bytes),
        ("Arr", &ARR4),
        ("T", &TIME),
        ("Inner", &NODE),
        ("List", &NODES),
    ],
};

impl GobEncode for Everything {
    const TYPE: &'static TypeDesc = &EVERYTHING;
    fn encode_fields(&self, w: &mut StructWriter<'_>) {
        w.bool(0, self.b);
        w.int(1, self.i);
        w.uint(2, self.u);
        w.bytes(3, &self.s);
        w.bytes(4, &self.bs);
        w.byte_array(5, &self.arr);
        w.encoded(6, self.t.map(GoTime::to_bytes).as_deref());
        w.structure(7, self.inner.as_ref());
        w.struct_slice(8, &self.list);
    }
}

fn node_of(v: &Value) -> TraceHop {
    let Value::Struct(s) = v else {
        panic!("node is not a struct")
    };
    let mut n = TraceHop::default();
    for (name, v) in s.iter() {
        match (name, v) {
            ("UUID", Value::Bytes(b)) => n.uuid = b.clone(),
            ("Role", Value::Uint(x)) => n.role = Role::from_bits(*x as u32),
            ("TxTimestamp", Value::Opaque(b)) => n.tx = Some(GoTime::from_bytes(b).expect("tx")),
            ("RxTimestamp", Value::Opaque(b)) => n.rx = Some(GoTime::from_bytes(b).expect("rx")),
            other => panic!("unexpected node field {other:?}"),
        }
    }
    n
}

fn everything_of(v: &Value) -> Everything {
    let Value::Struct(s) = v else {
        panic!("not a struct")
    };
    let mut e = Everything::default();
    for (name, v) in s.iter() {
        match (name, v) {
            ("B", Value::Bool(b)) => e.b = *b,
            ("I", Value::Int(i)) => e.i = *i,
            ("U", Value::Uint(u)) => e.u = *u,
            ("S", Value::String(s)) => e.s = s.clone(),
            ("Bs", Value::Bytes(b)) => e.bs = b.clone(),
            ("Arr", a) => e.arr = a.as_byte_array::<4>("Arr").expect("array"),
            ("T", Value::Opaque(b)) => e.t = Some(GoTime::from_bytes(b).expect("time")),
            ("Inner", n) => e.inner = Some(node_of(n)),
            ("List", Value::Slice(items)) => e.list = items.iter().map(node_of).collect(),
            other => panic!("unexpected field {other:?}"),
        }
    }
    e
}

#[test]
fn every_kind_round_trips_and_zero_fields_are_omitted() {
    let mut r = Rng(7);
    for case in 0..500 {
        let node = |r: &mut Rng| TraceHop {
            uuid: r.bytes(20),
            role: Role::from_bits(r.next() as u32),
            tx: r.time(),
            rx: r.time(),
        };
        let e = Everything {
            b: r.coin(),
            i: if r.coin() {
                r.uint() as i64
            } else {
                -(r.uint() as i64 >> 1)
            },
            u: r.uint(),
            s: r.bytes(40),
            bs: r.bytes(40),
            arr: [r.next() as u8, 0, r.next() as u8, 255],
            t: r.time(),
            inner: r.coin().then(|| node(&mut r)),
            list: (0..r.below(5)).map(|_| node(&mut r)).collect(),
        };
        let mut bytes = Vec::new();
        let mut enc = Encoder::new();
        enc.encode(&e, &mut bytes);
        enc.encode(&e, &mut bytes);
        let values = decode_chunked(&mut r, &bytes);
        assert_eq!(values.len(), 2);
        for v in &values {
            assert_eq!(everything_of(v), e, "case {case}");
            let Value::Struct(s) = v else { unreachable!() };
            // Only non-zero fields travel; the array always does.
            let sent: Vec<&str> = s.iter().map(|(n, _)| n).collect();
            assert!(sent.contains(&"Arr"));
            assert_eq!(sent.contains(&"B"), e.b, "case {case}");
            assert_eq!(sent.contains(&"List"), !e.list.is_empty(), "case {case}");
        }
    }
}

#[test]
fn every_prefix_of_a_stream_is_incomplete_not_an_error() {
    let mut r = Rng(99);
    let mut bytes = Vec::new();
    let mut enc = Encoder::new();
    for _ in 0..3 {
        enc.encode(&random_frame(&mut r), &mut bytes);
    }
    for cut in 0..bytes.len() {
        let mut d = Decoder::default();
        d.feed(&bytes[..cut]);
        while d
            .next_value()
            .expect("a prefix is never an error")
            .is_some()
        {}
    }
}
