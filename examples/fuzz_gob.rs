//! Mutation fuzzer for the SSNTP receive path: the gob stream [`Decoder`] and
//! the conversions of decoded values into [`Frame`], [`ConnectFrame`] and
//! [`ConnectedFrame`]. Runs on the stable toolchain with no extra crates.
//!
//! ```text
//! cargo run --release --example fuzz_gob -- [--iterations N] [--seconds S]
//!     [--seed X] [--max-rss-mb M] [--corpus DIR]...
//! cargo run --example fuzz_gob -- --replay target/fuzz-crashes/<hash>.bin
//! cargo run --example fuzz_gob -- --write-seeds fuzz/corpus/gob_decoder
//! ```
//!
//! Seeds: the Go-produced golden streams, streams our encoder writes from
//! random frames, hand-built streams for the other gob kinds, and any
//! `--corpus` directories. Inputs showing a feedback feature not seen before
//! (see `Features`) join the corpus. Each input's chunking is derived from
//! its own bytes, so a saved file replays identically.
//!
//! Failures (exit status non-zero, reproducer in `target/fuzz-crashes/`):
//! a panic anywhere in the per-input work, one input taking more than 1 s,
//! one input reserving more heap than the memory limit, or the process peak
//! RSS (VmHWM) exceeding it.
//!
//! The release profile of this crate uses `panic = "abort"`, where
//! `catch_unwind` cannot catch anything: the panic hook then reports the
//! failure itself before the process aborts. Release binaries are also
//! stripped, so for a symbolized backtrace replay the reproducer with a debug
//! build (`--replay`, no `--release`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ciao_launcher::ssntp::frame::{FrameTrace, GoTime, TraceHop};
use ciao_launcher::ssntp::gob::{
    Decoder, Encoder, GobEncode, GobError, Value, write_int, write_uint,
};
use ciao_launcher::ssntp::{ConnectFrame, ConnectedFrame, Frame, FrameType, Profile, Role};

/// The message limit the brief asks for (the daemon uses a larger default).
const MAX_MESSAGE: usize = 1 << 20;
/// One input running longer than this is a failure (a hang, in practice).
const INPUT_TIMEOUT: Duration = Duration::from_secs(1);
/// Mutants are cut to this size: large enough for multi-message streams with
/// big payloads, small enough to keep throughput up.
const MAX_INPUT: usize = 64 << 10;
/// The size cap for the rare inputs grown towards the decoder's limits;
/// they are executed but never kept in the corpus.
const MAX_BIG_INPUT: usize = MAX_MESSAGE + 64;
/// Corpus bounds: entries and total bytes (the latter keeps RSS well under
/// the default limit even if the feedback loop keeps many large inputs).
const MAX_CORPUS: usize = 4096;
const MAX_CORPUS_BYTES: usize = 32 << 20;

// ---------------------------------------------------------------------------
// Heap accounting: VmHWM only sees touched pages, so a decoder that reserves
// gigabytes it never writes would pass unnoticed. Counting requested bytes
// attributes every reservation to the input that caused it.

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn note_growth(by: usize) {
    let now = LIVE.fetch_add(by, Relaxed) + by;
    PEAK.fetch_max(now, Relaxed);
}

struct CountingAlloc;

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged; the counters are side bookkeeping that never touch the memory.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract for `layout`.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note_growth(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note_growth(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was returned by this allocator (hence by `System`) for `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr`/`layout` come from this allocator and the caller
        // guarantees `new_size` is valid for `layout.align()`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                note_growth(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

// ---------------------------------------------------------------------------
// Random numbers

/// xorshift64*: tiny, fast and good enough to drive mutations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // Zero is xorshift's fixed point.
        Rng(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Random bytes, a random count of them below `max`.
    fn bytes_below(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max);
        self.bytes(n)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// FNV-1a: names crash files and seeds the per-input chunking.
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

// ---------------------------------------------------------------------------
// Seeds

/// The Go-produced streams: `=== title (N bytes)` headers followed by
/// `hexdump -C` lines (8-digit offset, hex bytes, `|ascii|`).
fn golden_streams() -> Vec<(String, Vec<u8>)> {
    let text = include_str!("../tests/data/gob-golden-dumps.txt");
    let mut out: Vec<(String, Vec<u8>, usize)> = Vec::new();
    for line in text.lines() {
        if let Some(header) = line.strip_prefix("=== ") {
            let (title, size) = header
                .rsplit_once(" (")
                .expect("golden header ends in (N bytes)");
            let size = size
                .strip_suffix(" bytes)")
                .and_then(|s| s.parse().ok())
                .expect("golden header size");
            out.push((title.to_string(), Vec::new(), size));
            continue;
        }
        let is_offset = line.len() > 10 && line.as_bytes()[..8].iter().all(u8::is_ascii_hexdigit);
        if !is_offset {
            continue;
        }
        let hex = line[8..].split('|').next().unwrap_or("");
        let section = out.last_mut().expect("hex lines follow a header");
        section.1.extend(
            hex.split_whitespace()
                .map(|h| u8::from_str_radix(h, 16).expect("golden hex byte")),
        );
    }
    out.into_iter()
        .map(|(title, bytes, size)| {
            assert_eq!(bytes.len(), size, "golden section {title}");
            (title, bytes)
        })
        .collect()
}

fn random_time(r: &mut Rng) -> Option<GoTime> {
    r.coin().then(|| GoTime {
        secs: r.next() as i64 >> r.below(40),
        nanos: r.below(1_000_000_000) as i32,
        offset_min: if r.coin() { -1 } else { r.below(1440) as i16 },
        offset_sec: if r.below(4) == 0 {
            r.below(60) as i8
        } else {
            0
        },
    })
}

fn random_frame(r: &mut Rng) -> Frame {
    let len = [0, 1, 16, 200, 3000][r.below(5)];
    let payload = r.bytes_below(len + 1);
    let mut f = Frame::new(
        *r.pick(&[
            FrameType::Command,
            FrameType::Status,
            FrameType::Error,
            FrameType::Event,
        ]),
        r.below(16) as u8,
        if r.coin() { [0; 16] } else { uuid(r) },
        payload,
    );
    if r.below(3) == 0 {
        f.major |= 0x80;
        f.trace = Some(Box::new(FrameTrace {
            label: r.bytes_below(8),
            start: random_time(r),
            end: random_time(r),
            path_length: r.below(4) as u8,
            path: (0..r.below(4))
                .map(|_| TraceHop {
                    uuid: r.bytes_below(17),
                    role: Role::from_bits(1 << r.below(6)),
                    tx: random_time(r),
                    rx: random_time(r),
                })
                .collect(),
        }));
    }
    if r.below(4) == 0 {
        f.payload_length = r.next() as u32;
    }
    f
}

fn uuid(r: &mut Rng) -> [u8; 16] {
    let mut u = [0u8; 16];
    u.iter_mut().for_each(|b| *b = r.next() as u8);
    u
}

fn encode<T: GobEncode>(enc: &mut Encoder, v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    enc.encode(v, &mut out);
    out
}

/// Streams our own encoder writes, shaped like real connections: a CONNECT
/// or CONNECTED then frames, with type ids starting where Go might.
fn encoded_streams(r: &mut Rng, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|_| {
            let mut enc = Encoder::starting_at(65 + r.below(64) as i64);
            let mut out = match r.below(3) {
                0 => encode(&mut enc, &ConnectFrame::new(Role::AGENT, uuid(r))),
                1 => {
                    let config = r.bytes_below(300);
                    let c = ConnectedFrame::new(Role::SCHEDULER, uuid(r), &uuid(r), config);
                    encode(&mut enc, &c)
                }
                _ => Vec::new(),
            };
            for _ in 0..1 + r.below(3) {
                out.extend(encode(&mut enc, &random_frame(r)));
            }
            out
        })
        .collect()
}

/// One length-prefixed message.
fn message(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_uint(&mut out, body.len() as u64);
    out.extend_from_slice(body);
    out
}

fn gob_string(out: &mut Vec<u8>, s: &[u8]) {
    write_uint(out, s.len() as u64);
    out.extend_from_slice(s);
}

/// A type definition message for id `id`: `kind` is the wireType field
/// (0 array, 1 slice, 2 struct, 3 map, 4–6 opaque) and `rest` the fields of
/// that kind after its CommonType, already delta-encoded from field 0.
fn definition(id: i64, kind: u64, name: &str, rest: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    write_int(&mut body, -id);
    write_uint(&mut body, kind + 1);
    write_uint(&mut body, 1); // CommonType is field 0
    write_uint(&mut body, 1);
    gob_string(&mut body, name.as_bytes());
    write_uint(&mut body, 1);
    write_int(&mut body, id);
    body.push(0); // end CommonType
    body.extend_from_slice(rest);
    body.push(0); // end of the kind's struct
    body.push(0); // end wireType
    message(&body)
}

/// A top-level value of type `id`: non-struct values carry a zero delta first.
fn value(id: i64, singleton: bool, content: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    write_int(&mut body, id);
    if singleton {
        body.push(0);
    }
    body.extend_from_slice(content);
    message(&body)
}

fn ints(values: &[i64]) -> Vec<u8> {
    let mut out = Vec::new();
    values.iter().for_each(|&v| write_int(&mut out, v));
    out
}

fn uints(values: &[u64]) -> Vec<u8> {
    let mut out = Vec::new();
    values.iter().for_each(|&v| write_uint(&mut out, v));
    out
}

/// Hand-built streams for the gob features the SSNTP types never use (maps,
/// floats, recursive types, …) so the mutator starts near those paths too.
fn handmade_streams() -> Vec<Vec<u8>> {
    let float = |f: f64| f.to_bits().swap_bytes();
    let time = GoTime::from_system_time(UNIX_EPOCH + Duration::new(1_509_537_600, 500)).to_bytes();
    let mut v = vec![
        Vec::new(),
        vec![0],
        vec![0xf8, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        value(1, true, &[1]),
        value(2, true, &ints(&[-5])),
        value(3, true, &uints(&[300])),
        value(4, true, &uints(&[float(1.5)])),
        value(5, true, &[3, 1, 2, 3]),
        value(6, true, b"\x02hi"),
        value(7, true, &uints(&[float(-2.0), float(0.25)])),
        value(8, true, &[0]),
    ];
    // map[string]int
    let key_elem = [&[1u8][..], &ints(&[6]), &[1], &ints(&[2])].concat();
    let mut m = definition(65, 3, "map[string]int", &key_elem);
    m.extend(value(
        65,
        true,
        &[&[2u8, 1, b'a'][..], &ints(&[3]), &[1, b'b'], &ints(&[-4])].concat(),
    ));
    v.push(m);
    // [4]uint8
    let mut a = definition(65, 0, "[4]uint8", &[1, 6, 1, 8]);
    a.extend(value(65, true, &uints(&[4, 1, 2, 255, 0])));
    v.push(a);
    // type S []S, nested three deep
    let mut s = definition(65, 1, "S", &[&[1u8][..], &ints(&[65])].concat());
    s.extend(value(65, true, &[1, 1, 0]));
    v.push(s);
    // type L struct { Next *L; V int }: a two-element list
    let mut fields = Vec::new();
    write_uint(&mut fields, 1); // structType.Field is field 1
    write_uint(&mut fields, 2);
    for (name, id) in [("Next", 65), ("V", 2)] {
        fields.push(1);
        gob_string(&mut fields, name.as_bytes());
        fields.push(1);
        write_int(&mut fields, id);
        fields.push(0);
    }
    let mut l = definition(65, 2, "L", &fields);
    l.extend(value(
        65,
        false,
        &[&[1u8, 2][..], &ints(&[7]), &[0, 1], &ints(&[8]), &[0]].concat(),
    ));
    v.push(l);
    // time.Time as a GobEncoder
    let mut t = definition(65, 4, "Time", &[]);
    t.extend(value(
        65,
        true,
        &[&uints(&[time.len() as u64])[..], &time].concat(),
    ));
    v.push(t);
    v
}

// ---------------------------------------------------------------------------
// Mutations

/// Reads a gob uint at the front of `buf`.
fn read_uint(buf: &[u8]) -> Option<(u64, usize)> {
    let &b = buf.first()?;
    if b < 0x80 {
        return Some((u64::from(b), 1));
    }
    let n = 256 - usize::from(b);
    if n > 8 || buf.len() < 1 + n {
        return None;
    }
    let v = buf[1..=n]
        .iter()
        .fold(0u64, |acc, &x| (acc << 8) | u64::from(x));
    Some((v, 1 + n))
}

/// Splits a stream into message bodies by their length prefixes; bytes that
/// do not form a whole message are returned as the tail.
fn split_messages(data: &[u8]) -> (Vec<Vec<u8>>, Vec<u8>) {
    let mut msgs = Vec::new();
    let mut pos = 0;
    while let Some((len, hdr)) = read_uint(&data[pos..]) {
        let end = usize::try_from(len)
            .ok()
            .and_then(|len| (pos + hdr).checked_add(len))
            .filter(|&end| len != 0 && end <= data.len());
        let Some(end) = end else {
            break;
        };
        msgs.push(data[pos + hdr..end].to_vec());
        pos = end;
    }
    (msgs, data[pos..].to_vec())
}

fn join_messages(msgs: &[Vec<u8>], tail: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    msgs.iter().for_each(|m| out.extend(message(m)));
    out.extend_from_slice(tail);
    out
}

/// Replaces the gob uint at `pos` (or inserts one if none parses there).
fn rewrite_uint(data: &mut Vec<u8>, pos: usize, v: u64) {
    let mut enc = Vec::new();
    write_uint(&mut enc, v);
    let old = read_uint(&data[pos..]).map_or(0, |(_, n)| n);
    data.splice(pos..pos + old, enc);
}

const BOUNDARY_BYTES: [u8; 9] = [0x00, 0x01, 0x7f, 0x80, 0x81, 0xf7, 0xf8, 0xfe, 0xff];

fn huge_uint(r: &mut Rng) -> u64 {
    let random = r.next();
    *r.pick(&[
        u64::MAX,
        u64::MAX - 1,
        1 << 63,
        (1 << 63) - 1,
        1 << 32,
        u64::from(u32::MAX),
        MAX_MESSAGE as u64,
        MAX_MESSAGE as u64 + 1,
        (usize::MAX >> 1) as u64,
        random,
    ])
}

/// Values that sit on decoder decisions: encoding widths, the count check
/// (`remaining` is the bytes after the integer), type id ranges.
fn interesting_uint(r: &mut Rng, remaining: u64) -> u64 {
    match r.below(8) {
        0 => *r.pick(&[0, 1, 2, 0x7f, 0x80, 0xff, 0x100, 0xffff, 0x1_0000]),
        1 => remaining,
        2 => remaining.saturating_sub(1),
        3 => remaining + 1,
        // Type ids as gob ints: builtins, user ids, definitions (negative).
        4 => (r.below(75) as u64) << 1,
        5 => ((64 + r.below(12) as u64) << 1) | 1,
        6 => r.below(16) as u64,
        _ => r.next() >> r.below(64),
    }
}

/// One byte-level mutation in place.
fn mutate_bytes(r: &mut Rng, data: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    if data.is_empty() {
        let n = 1 + r.below(16);
        data.extend(r.bytes(n));
        return;
    }
    let len = data.len();
    let pos = r.below(len);
    match r.below(11) {
        0 => data[pos] ^= 1 << r.below(8),
        1 => data[pos] = *r.pick(&BOUNDARY_BYTES),
        2 => data[pos] = r.next() as u8,
        3 => {
            let n = 1 + r.below(16);
            let fill = r.bytes(n);
            data.splice(pos..pos, fill);
        }
        4 => {
            let n = 1 + r.below((len - pos).min(64));
            data.drain(pos..pos + n);
        }
        5 => {
            let n = 1 + r.below((len - pos).min(256));
            let chunk = data[pos..pos + n].to_vec();
            let at = r.below(len + 1);
            data.splice(at..at, chunk);
        }
        6 => {
            let other = r.pick(corpus);
            let from = r.below(other.len() + 1);
            data.truncate(r.below(len + 1));
            data.extend_from_slice(&other[from..]);
        }
        7 => rewrite_uint(data, pos, huge_uint(r)),
        8 => {
            let rest = read_uint(&data[pos..]).map_or(len - pos, |(_, n)| len - pos - n);
            rewrite_uint(data, pos, interesting_uint(r, rest as u64));
        }
        9 => data.truncate(r.below(len)),
        _ => {
            let n = 1 + r.below(32);
            data.extend(r.bytes(n));
        }
    }
}

/// One mutation of the message structure: bodies keep valid length
/// prefixes, so mutations land in the decoder's value and type logic
/// instead of always breaking the framing.
fn mutate_messages(r: &mut Rng, data: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    let (mut msgs, tail) = split_messages(data);
    if msgs.is_empty() {
        return mutate_bytes(r, data, corpus);
    }
    let i = r.below(msgs.len());
    match r.below(6) {
        0 => {
            let m = msgs[i].clone();
            msgs.insert(r.below(msgs.len() + 1), m);
        }
        1 => {
            msgs.remove(i);
        }
        2 => {
            let j = r.below(msgs.len());
            msgs.swap(i, j);
        }
        3 => {
            let other: &Vec<u8> = r.pick(corpus);
            let (theirs, _) = split_messages(other);
            if !theirs.is_empty() {
                let m = r.pick(&theirs).clone();
                msgs.insert(r.below(msgs.len() + 1), m);
            }
        }
        _ => {
            for _ in 0..1 + r.below(3) {
                mutate_bytes(r, &mut msgs[i], corpus);
            }
            if msgs[i].is_empty() {
                msgs.remove(i);
            }
        }
    }
    *data = join_messages(&msgs, &tail);
}

fn mutate(r: &mut Rng, base: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut data = base.to_vec();
    // Mostly one or two mutations, occasionally a long stack.
    let rounds = 1 + (r.next() | (1 << 5)).trailing_zeros() as usize;
    for _ in 0..rounds {
        if r.below(3) == 0 {
            mutate_messages(r, &mut data, corpus);
        } else {
            mutate_bytes(r, &mut data, corpus);
        }
    }
    if r.below(2048) == 0 {
        grow(r, &mut data);
        data.truncate(MAX_BIG_INPUT);
    } else {
        data.truncate(MAX_INPUT);
    }
    data
}

/// Rarely, inputs grow towards the decoder's own limits (one message of up
/// to `MAX_MESSAGE`, streams of thousands of messages): costs that scale with
/// size only show there. Either one message is repeated many times or a
/// byte range inside one message body is.
fn grow(r: &mut Rng, data: &mut Vec<u8>) {
    let (mut msgs, tail) = split_messages(data);
    if msgs.is_empty() {
        let copies = MAX_BIG_INPUT / data.len().max(1);
        *data = data.repeat(1 + r.below(copies));
        return;
    }
    let i = r.below(msgs.len());
    if r.coin() {
        let copies = 1 + r.below(MAX_BIG_INPUT / (msgs[i].len() + 4));
        let m = msgs[i].clone();
        msgs.splice(i..i, std::iter::repeat_n(m, copies));
    } else {
        let body = &mut msgs[i];
        let start = r.below(body.len());
        let n = 1 + r.below((body.len() - start).min(16));
        let copies = 1 + r.below(MAX_MESSAGE / n);
        let range = body[start..start + n].repeat(copies);
        body.splice(start..start, range);
        body.truncate(MAX_MESSAGE);
    }
    *data = join_messages(&msgs, &tail);
}

// ---------------------------------------------------------------------------
// Executing one input

fn error_kind(e: &GobError) -> &'static str {
    match e {
        GobError::MessageTooLarge { .. } => "MessageTooLarge",
        GobError::EmptyMessage => "EmptyMessage",
        GobError::Truncated => "Truncated",
        GobError::BadUint => "BadUint",
        GobError::ExtraData => "ExtraData",
        GobError::UnknownType(_) => "UnknownType",
        GobError::BadDefinition(_) => "BadDefinition",
        GobError::TooManyTypes => "TooManyTypes",
        GobError::TooDeep => "TooDeep",
        GobError::Unsupported(_) => "Unsupported",
        GobError::Corrupt(_) => "Corrupt",
        GobError::Mismatch(_) => "Mismatch",
    }
}

/// The shape of an error message without its variable parts (numbers and
/// peer-chosen type names), so feedback rewards new error *paths* rather
/// than new names.
fn message_shape(e: &GobError) -> String {
    let text = match e {
        // The Corrupt messages that name a type start with the peer's name,
        // unquoted; their last words identify the template.
        GobError::Corrupt(m) => {
            let words: Vec<&str> = m.split_whitespace().collect();
            words[words.len().saturating_sub(3)..].join(" ")
        }
        // Elsewhere peer names are quoted ({:?}); local field names are not
        // and are worth keeping (each is a separate branch).
        other => {
            let t = other.to_string();
            match (t.find('"'), t.rfind('"')) {
                (Some(a), Some(b)) if a < b => format!("{}{}", &t[..a], &t[b + 1..]),
                _ => t,
            }
        }
    };
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if !c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('#') {
            out.push('#');
        }
    }
    out
}

#[derive(Default)]
struct Stats {
    values: u64,
    clean: u64,
    incomplete: u64,
    decode_errors: BTreeMap<&'static str, u64>,
    conversion_ok: BTreeMap<&'static str, u64>,
    conversion_errors: BTreeMap<(&'static str, &'static str), u64>,
}

/// Feedback: hashes of what one input made the code under test do. An input
/// showing any feature not seen before joins the corpus. Features are kept
/// separate rather than folded into one signature, so the corpus grows with
/// new behaviour, not with new combinations of known behaviours.
#[derive(Default)]
struct Features(Vec<u64>);

impl Features {
    fn add(&mut self, f: std::fmt::Arguments<'_>) {
        self.0.push(fnv(f.to_string().as_bytes()));
    }
}

/// Values of one input whose conversions produce features; the rest are
/// only counted (shaping every error message of a long stream costs time).
const FEATURE_VALUES: u64 = 8;

/// Runs the receive path over one input and returns its features.
/// Chunking is derived from the input itself so a saved file replays
/// exactly the same sequence of `feed`/`next_value` calls.
fn execute(data: &[u8], stats: &mut Stats) -> Features {
    let mut chunks = Rng::new(fnv(data) ^ 0x5eed);
    let max_chunk = match chunks.below(4) {
        0 => data.len().max(1),
        1 => 1,
        2 => 16,
        _ => 1 + chunks.below(data.len().max(1)),
    };
    let mut dec = Decoder::new(MAX_MESSAGE);
    let mut feats = Features::default();
    let mut values = 0u64;
    let mut error = None;
    let mut pos = 0;
    'feed: while pos < data.len() {
        let n = (1 + chunks.below(max_chunk)).min(data.len() - pos);
        dec.feed(&data[pos..pos + n]);
        pos += n;
        loop {
            match dec.next_value() {
                Ok(None) => break,
                Ok(Some((_, v))) => {
                    values += 1;
                    convert(v, stats, (values <= FEATURE_VALUES).then_some(&mut feats));
                }
                Err(e) => {
                    error = Some(e);
                    break 'feed;
                }
            }
        }
    }
    stats.values += values;
    // Exact counts for short streams only: rewarding ever longer streams
    // fills the corpus with inputs that are slow to run and add nothing.
    let bucket = values.min(8);
    let end = match &error {
        Some(e) => {
            *stats.decode_errors.entry(error_kind(e)).or_default() += 1;
            feats.add(format_args!("error {} {}", error_kind(e), message_shape(e)));
            error_kind(e)
        }
        None if dec.buffered() == 0 => {
            stats.clean += 1;
            "clean"
        }
        None => {
            stats.incomplete += 1;
            "incomplete"
        }
    };
    // The (error kind, number of values) pair.
    feats.add(format_args!("end {end} {bucket}"));
    feats
}

fn record(
    stats: &mut Stats,
    what: &'static str,
    r: Result<(), GobError>,
    feats: &mut Option<&mut Features>,
) {
    let shape = match r {
        Ok(()) => {
            *stats.conversion_ok.entry(what).or_default() += 1;
            None
        }
        Err(e) => {
            let kind = error_kind(&e);
            *stats.conversion_errors.entry((what, kind)).or_default() += 1;
            feats.is_some().then(|| message_shape(&e))
        }
    };
    if let Some(f) = feats {
        f.add(format_args!("{what} {}", shape.as_deref().unwrap_or("ok")));
    }
}

/// Everything the daemon does with a decoded value: read it as each of the
/// three frame shapes, then look at the frame the way sessions do.
fn convert(v: Value, stats: &mut Stats, mut feats: Option<&mut Features>) {
    if let Value::Struct(s) = &v {
        let c = ConnectFrame::from_struct(s).map(|c| {
            std::hint::black_box(format!("{c:?}"));
        });
        record(stats, "ConnectFrame", c, &mut feats);
        let c = ConnectedFrame::from_struct(s).map(|c| {
            std::hint::black_box(format!("{c:?}"));
        });
        record(stats, "ConnectedFrame", c, &mut feats);
    }
    let mut bits = 0u32;
    let f = Frame::from_value(v).map(|f| {
        let facts = [
            f.trace.is_some(),
            f.path_trace(),
            f.frame_type().is_some(),
            f.payload.is_empty(),
            Profile::P2016.frame_operation(&f).is_ok(),
            Profile::P2018.frame_operation(&f).is_ok(),
        ];
        bits = facts.iter().fold(0, |acc, &b| (acc << 1) | u32::from(b));
        std::hint::black_box(f.version_major());
        if let Some(t) = &f.trace {
            let hops = t.path.iter().flat_map(|n| [n.tx, n.rx]);
            for time in [t.start, t.end].into_iter().chain(hops).flatten() {
                std::hint::black_box(time.to_system_time());
            }
        }
        std::hint::black_box(format!("{f:?}"));
    });
    let ok = f.is_ok();
    record(stats, "Frame", f, &mut feats);
    if let (true, Some(feats)) = (ok, feats) {
        feats.add(format_args!("frame facts {bits:06b}"));
    }
}

// ---------------------------------------------------------------------------
// Failure handling. The main loop, the watchdog thread and the panic hook
// can each detect a failure; the first one to claim it reports.

static T0: OnceLock<Instant> = OnceLock::new();
/// Nanoseconds since T0 (plus one) when the current input started; 0 = idle.
static INPUT_START: AtomicU64 = AtomicU64::new(0);
static REPLAYING: AtomicBool = AtomicBool::new(false);
static PASSED: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicBool = AtomicBool::new(false);
/// A copy of the input being executed, for the watchdog and the panic hook.
static CURRENT: Mutex<Vec<u8>> = Mutex::new(Vec::new());
/// Message, location and backtrace of the last panic (set by the hook).
static PANIC_REPORT: Mutex<String> = Mutex::new(String::new());

fn now_ns() -> u64 {
    T0.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn crash_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-crashes")
}

fn current_input() -> Vec<u8> {
    // The owner only holds the lock for a memcpy; never wait forever in a
    // panic hook though (the panic may have happened while it was held).
    for _ in 0..100 {
        if let Ok(g) = CURRENT.try_lock() {
            return g.clone();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Vec::new()
}

/// Saves the reproducer (if the failure has one) and prints it. Returns
/// false if another thread already claimed the failure.
fn report_failure(kind: &str, detail: &str, input: Option<&[u8]>) -> bool {
    if FAILED.swap(true, Relaxed) {
        return false;
    }
    let mut out = String::new();
    let _ = writeln!(out, "\n=== FAILURE: {kind}");
    let _ = writeln!(out, "{detail}");
    let Some(input) = input else {
        let _ = writeln!(out, "(not attributable to a single input)");
        eprint!("{out}");
        return true;
    };
    let dir = crash_dir();
    let path = dir.join(format!("{:016x}.bin", fnv(input)));
    let saved = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, input));
    match saved {
        Ok(()) => {
            let n = input.len();
            let _ = writeln!(out, "reproducer: {} ({n} bytes)", path.display());
        }
        Err(e) => {
            let _ = writeln!(out, "could not save reproducer to {}: {e}", path.display());
        }
    }
    let _ = writeln!(
        out,
        "replay: cargo run --example fuzz_gob -- --replay {}",
        path.display()
    );
    let _ = writeln!(out, "input hex (xxd -r -p rebuilds it):");
    // Grown inputs can be a megabyte: past the usual size the file is the record.
    for line in input[..input.len().min(MAX_INPUT)].chunks(32) {
        line.iter().for_each(|b| {
            let _ = write!(out, "{b:02x}");
        });
        out.push('\n');
    }
    if input.len() > MAX_INPUT {
        let _ = writeln!(out, "… {} more bytes in the file", input.len() - MAX_INPUT);
    }
    // stderr is unbuffered: this survives an abort right after.
    eprint!("{out}");
    true
}

fn fail_line() -> String {
    format!("fuzz: {} passed, 1 failed", PASSED.load(Relaxed))
}

fn install_panic_hook() {
    panic::set_hook(Box::new(|info| {
        let bt = std::backtrace::Backtrace::force_capture();
        let thread = std::thread::current();
        let text = format!(
            "panic in thread '{}': {}\nbacktrace:\n{bt}",
            thread.name().unwrap_or("?"),
            info
        );
        if REPLAYING.load(Relaxed) {
            eprintln!("{text}");
        } else if INPUT_START.load(Relaxed) == 0 {
            // Outside `execute`: a bug in this harness, not in the code under test.
            eprintln!("fuzz_gob internal error, not a finding: {text}");
        } else if cfg!(panic = "abort") {
            // Nothing will unwind back to the main loop: report from here.
            if report_failure("panic", &text, Some(&current_input())) {
                eprintln!("{}", fail_line());
                let _ = std::io::stdout().flush();
            }
        } else if let Ok(mut slot) = PANIC_REPORT.lock() {
            *slot = text;
        }
    }));
}

fn vm_hwm_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Catches inputs that never return (the main loop can only time inputs that
/// finish) and RSS growth while the run is in progress.
fn spawn_watchdog(max_rss_kb: u64) {
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            let mut ticks = 0u64;
            loop {
                std::thread::sleep(Duration::from_millis(20));
                ticks += 1;
                let started = INPUT_START.load(Relaxed);
                let running = Duration::from_nanos(now_ns().saturating_sub(started));
                let detail = if started != 0 && running > INPUT_TIMEOUT * 2 {
                    // Twice the limit: slow inputs that finish are reported by
                    // the main loop with their exact time.
                    Some(("hang", format!("input still running after {running:?}")))
                } else if ticks.is_multiple_of(10) && vm_hwm_kb() > max_rss_kb {
                    let mb = vm_hwm_kb() / 1024;
                    Some(("memory", format!("peak RSS {mb} MB exceeds the limit")))
                } else {
                    None
                };
                if let Some((kind, detail)) = detail {
                    if report_failure(kind, &detail, Some(&current_input())) {
                        eprintln!("{}", fail_line());
                        std::process::exit(1);
                    }
                    return;
                }
            }
        })
        .expect("spawn watchdog thread");
}

// ---------------------------------------------------------------------------
// Command line and main loop

struct Args {
    iterations: u64,
    seconds: f64,
    seed: u64,
    max_rss_mb: u64,
    replay: Vec<PathBuf>,
    write_seeds: Option<PathBuf>,
    corpus: Vec<PathBuf>,
}

const USAGE: &str = "usage: fuzz_gob [--iterations N] [--seconds S] [--seed X] [--max-rss-mb M] \
                     [--corpus DIR]... [--write-seeds DIR] [--replay FILE...]";

fn parse_args() -> Result<Args, String> {
    let clock = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut a = Args {
        iterations: 200_000,
        seconds: 60.0,
        seed: clock ^ u64::from(std::process::id()),
        max_rss_mb: 256,
        replay: Vec::new(),
        write_seeds: None,
        corpus: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            return Err(USAGE.into());
        }
        if flag == "--replay" {
            a.replay.extend(it.by_ref().map(PathBuf::from));
            break;
        }
        const TAKES_VALUE: &[&str] = &[
            "--iterations",
            "--seconds",
            "--seed",
            "--max-rss-mb",
            "--corpus",
            "--write-seeds",
        ];
        if !TAKES_VALUE.contains(&flag.as_str()) {
            return Err(format!("unknown option {flag}\n{USAGE}"));
        }
        let val = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = |_| format!("bad value {val:?} for {flag}");
        match flag.as_str() {
            "--iterations" => a.iterations = val.replace('_', "").parse().map_err(bad)?,
            "--seconds" => {
                a.seconds = val
                    .parse()
                    .map_err(|_| format!("bad value {val:?} for {flag}"))?
            }
            "--seed" => {
                a.seed = match val.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16).map_err(bad)?,
                    None => val.parse().map_err(bad)?,
                }
            }
            "--write-seeds" => a.write_seeds = Some(PathBuf::from(val)),
            "--corpus" => a.corpus.push(PathBuf::from(val)),
            "--max-rss-mb" => a.max_rss_mb = val.parse().map_err(bad)?,
            _ => return Err(format!("unknown option {flag}\n{USAGE}")),
        }
    }
    if a.seconds.is_nan() || a.seconds <= 0.0 {
        return Err("--seconds must be positive".into());
    }
    Ok(a)
}

/// Runs saved inputs once each, without catching anything, so a panic shows
/// the standard message and (in a debug build) a symbolized backtrace.
fn replay(paths: &[PathBuf]) -> ExitCode {
    REPLAYING.store(true, Relaxed);
    for p in paths {
        let data = match std::fs::read(p) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("{}: {e}", p.display());
                return ExitCode::FAILURE;
            }
        };
        let mut stats = Stats::default();
        let live_before = LIVE.load(Relaxed);
        PEAK.store(live_before, Relaxed);
        let t = Instant::now();
        execute(&data, &mut stats);
        let took = t.elapsed();
        let heap_mb = PEAK.load(Relaxed).saturating_sub(live_before) as f64 / f64::from(1 << 20);
        let end = match stats.decode_errors.keys().next() {
            Some(kind) => format!("error {kind}"),
            None if stats.clean == 1 => "clean end".into(),
            None => "incomplete".into(),
        };
        println!(
            "{}: {} bytes, {} values, {end}, {took:?}, heap peak {heap_mb:.1} MB, \
             conversions ok {:?} err {:?}",
            p.display(),
            data.len(),
            stats.values,
            stats.conversion_ok,
            stats.conversion_errors,
        );
    }
    ExitCode::SUCCESS
}

/// Extra seeds, e.g. a cargo-fuzz corpus or saved reproducers.
fn read_corpus_dir(dir: &Path) -> std::io::Result<Vec<Vec<u8>>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    paths.sort();
    let mut out = Vec::new();
    for p in paths.iter().filter(|p| p.is_file()) {
        let data = std::fs::read(p)?;
        if data.len() <= MAX_BIG_INPUT {
            out.push(data);
        }
    }
    Ok(out)
}

fn write_seeds(dir: &Path, seeds: &[Vec<u8>]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for s in seeds {
        std::fs::write(dir.join(format!("seed-{:016x}", fnv(s))), s)?;
    }
    Ok(())
}

struct Corpus {
    entries: Vec<Vec<u8>>,
    bytes: usize,
    seeds: usize,
    features: HashSet<u64>,
    added: u64,
}

impl Corpus {
    /// Keeps `data` if it showed an unseen feature; seeds are never evicted.
    fn offer(&mut self, r: &mut Rng, data: Vec<u8>, feats: &Features) {
        // Record every feature, not just the first new one.
        let new = feats
            .0
            .iter()
            .fold(false, |new, f| self.features.insert(*f) | new);
        if !new {
            return;
        }
        self.added += 1;
        self.bytes += data.len();
        if self.entries.len() < MAX_CORPUS {
            self.entries.push(data);
        } else {
            let i = self.seeds + r.below(self.entries.len() - self.seeds);
            self.bytes -= self.entries[i].len();
            self.entries[i] = data;
        }
        while self.bytes > MAX_CORPUS_BYTES && self.entries.len() > self.seeds {
            let i = self.seeds + r.below(self.entries.len() - self.seeds);
            self.bytes -= self.entries.swap_remove(i).len();
        }
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    T0.get_or_init(Instant::now);
    install_panic_hook();
    if !args.replay.is_empty() {
        return replay(&args.replay);
    }
    let max_rss_kb = args.max_rss_mb * 1024;
    let max_heap = (args.max_rss_mb as usize) << 20;
    spawn_watchdog(max_rss_kb);

    let mut rng = Rng::new(args.seed);
    let mut corpus = Corpus {
        entries: Vec::new(),
        bytes: 0,
        seeds: 0,
        features: HashSet::new(),
        added: 0,
    };
    let golden = golden_streams();
    let client_stream: Vec<u8> = golden.iter().take(3).flat_map(|(_, b)| b.clone()).collect();
    corpus.entries.extend(golden.into_iter().map(|(_, b)| b));
    corpus.entries.push(client_stream);
    corpus.entries.extend(encoded_streams(&mut rng, 64));
    corpus.entries.extend(handmade_streams());
    for dir in &args.corpus {
        match read_corpus_dir(dir) {
            Ok(inputs) => corpus.entries.extend(inputs),
            Err(e) => {
                eprintln!("{}: {e}", dir.display());
                return ExitCode::from(2);
            }
        }
    }
    corpus.seeds = corpus.entries.len();
    corpus.bytes = corpus.entries.iter().map(Vec::len).sum();
    if let Some(dir) = &args.write_seeds {
        // Lets other fuzzers (cargo fuzz) start from the same seeds.
        return match write_seeds(dir, &corpus.entries) {
            Ok(()) => {
                println!("wrote {} seeds to {}", corpus.seeds, dir.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", dir.display());
                ExitCode::FAILURE
            }
        };
    }
    println!(
        "fuzz_gob: seed {:#x}, {} seed inputs, up to {} inputs or {} s, memory limit {} MB",
        args.seed, corpus.seeds, args.iterations, args.seconds, args.max_rss_mb
    );

    let mut stats = Stats::default();
    let mut executed = 0u64;
    let mut slowest = Duration::ZERO;
    let mut max_heap_input = 0usize;
    let start = Instant::now();
    let deadline = Duration::from_secs_f64(args.seconds);
    let mut next_progress = Duration::from_secs(10);
    let mut failure: Option<(&str, String, Option<Vec<u8>>)> = None;

    while executed < args.iterations && start.elapsed() < deadline {
        // Seeds run unmutated first, then mutants of random corpus entries.
        let input = if (executed as usize) < corpus.seeds {
            corpus.entries[executed as usize].clone()
        } else {
            let base = rng.pick(&corpus.entries);
            mutate(&mut rng, base, &corpus.entries)
        };
        if let Ok(mut cur) = CURRENT.lock() {
            cur.clear();
            cur.extend_from_slice(&input);
        }
        let live_before = LIVE.load(Relaxed);
        PEAK.store(live_before, Relaxed);
        let t = Instant::now();
        INPUT_START.store(now_ns() + 1, Relaxed);
        let result = panic::catch_unwind(AssertUnwindSafe(|| execute(&input, &mut stats)));
        INPUT_START.store(0, Relaxed);
        let took = t.elapsed();
        let heap = PEAK.load(Relaxed).saturating_sub(live_before);
        slowest = slowest.max(took);
        max_heap_input = max_heap_input.max(heap);
        executed += 1;

        match result {
            Err(_) => {
                let report = PANIC_REPORT.lock().map(|s| s.clone()).unwrap_or_default();
                failure = Some(("panic", report, Some(input)));
            }
            Ok(_) if took > INPUT_TIMEOUT => {
                failure = Some((
                    "slow input",
                    format!("one input took {took:?}"),
                    Some(input),
                ));
            }
            Ok(_) if heap > max_heap => {
                let mb = heap >> 20;
                let detail = format!(
                    "one input reserved {mb} MB of heap (limit {} MB)",
                    args.max_rss_mb
                );
                failure = Some(("memory", detail, Some(input)));
            }
            Ok(feats) => {
                PASSED.fetch_add(1, Relaxed);
                if input.len() <= MAX_INPUT {
                    corpus.offer(&mut rng, input, &feats);
                }
            }
        }
        if failure.is_some() {
            break;
        }
        if start.elapsed() >= next_progress {
            eprintln!(
                "[{:>5.0} s] {executed} inputs, {:.0}/s, corpus {} ({} kB)",
                start.elapsed().as_secs_f64(),
                executed as f64 / start.elapsed().as_secs_f64(),
                corpus.entries.len(),
                corpus.bytes >> 10,
            );
            next_progress += Duration::from_secs(10);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let hwm_kb = vm_hwm_kb();
    if failure.is_none() && hwm_kb > max_rss_kb {
        let detail = format!("peak RSS {} MB exceeds the limit", hwm_kb / 1024);
        failure = Some(("memory", detail, None));
    }

    let mut s = String::new();
    let _ = writeln!(s, "\n--- fuzz_gob summary (seed {:#x}) ---", args.seed);
    let _ = writeln!(s, "inputs executed      {executed}");
    let _ = writeln!(s, "elapsed              {elapsed:.1} s");
    let _ = writeln!(
        s,
        "inputs/s             {:.0}",
        executed as f64 / elapsed.max(1e-9)
    );
    let _ = writeln!(s, "values decoded       {}", stats.values);
    let _ = writeln!(
        s,
        "streams clean/incomplete/error  {}/{}/{}",
        stats.clean,
        stats.incomplete,
        stats.decode_errors.values().sum::<u64>()
    );
    let _ = writeln!(s, "decode errors by kind");
    for (kind, n) in &stats.decode_errors {
        let _ = writeln!(s, "  {kind:<16} {n}");
    }
    let _ = writeln!(s, "conversions ok       {:?}", stats.conversion_ok);
    let _ = writeln!(s, "conversion errors by kind");
    for ((what, kind), n) in &stats.conversion_errors {
        let _ = writeln!(s, "  {what:<15} {kind:<16} {n}");
    }
    let _ = writeln!(
        s,
        "corpus               {} entries ({} seeds, {} kept for new features, {} features, {} kB)",
        corpus.entries.len(),
        corpus.seeds,
        corpus.added,
        corpus.features.len(),
        corpus.bytes >> 10
    );
    let _ = writeln!(s, "slowest input        {} µs", slowest.as_micros());
    let _ = writeln!(
        s,
        "max heap per input   {:.1} MB",
        max_heap_input as f64 / f64::from(1 << 20)
    );
    let _ = writeln!(
        s,
        "peak RSS             {:.1} MB (limit {} MB)",
        hwm_kb as f64 / 1024.0,
        args.max_rss_mb
    );
    match failure {
        None => {
            let _ = writeln!(s, "fuzz: {executed} passed, 0 failed");
            print!("{s}");
            ExitCode::SUCCESS
        }
        Some((kind, detail, input)) => {
            if !report_failure(kind, &detail, input.as_deref()) {
                // The watchdog is reporting and exiting.
                std::thread::sleep(Duration::from_secs(5));
            }
            let _ = writeln!(s, "{}", fail_line());
            print!("{s}");
            ExitCode::FAILURE
        }
    }
}
