//! libFuzzer target: the same per-input work as `examples/fuzz_gob.rs`
//! (decode a gob stream fed in chunks, convert every value into the three
//! SSNTP frame shapes). Chunk sizes are derived from the input exactly as
//! there, so a crash file from either fuzzer replays in the other:
//! `cargo run --example fuzz_gob -- --replay fuzz/artifacts/gob_decoder/crash-…`.
#![no_main]

use ciao_launcher::ssntp::gob::{Decoder, Value};
use ciao_launcher::ssntp::{ConnectFrame, ConnectedFrame, Frame, Profile};
use libfuzzer_sys::fuzz_target;

const MAX_MESSAGE: usize = 1 << 20;

/// xorshift64* and FNV-1a, as in the stable harness (must stay identical
/// for replays to match).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
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
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn convert(v: Value) {
    if let Value::Struct(s) = &v {
        if let Ok(c) = ConnectFrame::from_struct(s) {
            std::hint::black_box(format!("{c:?}"));
        }
        if let Ok(c) = ConnectedFrame::from_struct(s) {
            std::hint::black_box(format!("{c:?}"));
        }
    }
    if let Ok(f) = Frame::from_value(v) {
        std::hint::black_box((f.version_major(), f.path_trace(), f.frame_type()));
        for p in [Profile::P2016, Profile::P2018] {
            std::hint::black_box(p.frame_operation(&f).ok());
        }
        if let Some(t) = &f.trace {
            let hops = t.path.iter().flat_map(|n| [n.tx, n.rx]);
            for time in [t.start, t.end].into_iter().chain(hops).flatten() {
                std::hint::black_box(time.to_system_time());
            }
        }
        std::hint::black_box(format!("{f:?}"));
    }
}

fuzz_target!(|data: &[u8]| {
    let mut chunks = Rng::new(fnv(data) ^ 0x5eed);
    let max_chunk = match chunks.below(4) {
        0 => data.len().max(1),
        1 => 1,
        2 => 16,
        _ => 1 + chunks.below(data.len().max(1)),
    };
    let mut dec = Decoder::new(MAX_MESSAGE);
    let mut pos = 0;
    while pos < data.len() {
        let n = (1 + chunks.below(max_chunk)).min(data.len() - pos);
        dec.feed(&data[pos..pos + n]);
        pos += n;
        loop {
            match dec.next_value() {
                Ok(None) => break,
                Ok(Some((_, v))) => convert(v),
                // The stream is unusable after any error.
                Err(_) => return,
            }
        }
    }
});
