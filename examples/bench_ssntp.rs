//! SSNTP throughput: the gob codec on a 1 KiB STATS frame, and frames/s end
//! to end over loopback TLS between our client and our server (one io thread
//! each). Prints a table; run through `scripts/bench-ssntp.sh`.
//!
//! Usage: bench_ssntp [--frames N] [--codec-frames N]

use std::time::{Duration, Instant};

use ciao_launcher::ssntp::certgen::{self, CertSpec};
use ciao_launcher::ssntp::client::{Client, ClientConfig, ClientEvent};
use ciao_launcher::ssntp::conn::{SendError, send_patiently};
use ciao_launcher::ssntp::gob::{Decoder, Encoder};
use ciao_launcher::ssntp::server::{Server, ServerConfig, ServerEvent};
use ciao_launcher::ssntp::tls;
use ciao_launcher::ssntp::{Frame, FrameType, Role};

fn stats_frame() -> Frame {
    // A realistic 1 KiB STATS payload: node figures and a few instances.
    let mut p = String::from(
        "node_uuid: 4481631c-dce9-48d6-b83a-a717417072ce\nstatus: READY\nmem_total_mb: 24105\n\
         mem_available_mb: 23099\ndisk_total_mb: 270553\ndisk_available_mb: 76645\nload: 3\n\
         cpus_online: 2\nhostname: node-1\nnetworks: []\ninstances:\n",
    );
    let mut i = 0;
    while p.len() < 1024 - 120 {
        p.push_str(&format!(
            "- instance_uuid: 11111111-2222-4333-8444-{i:012}\n  state: running\n  memory_usage_mb: 1\n"
        ));
        i += 1;
    }
    p.push_str(&"#".repeat(1024 - p.len()));
    Frame::new(
        FrameType::Command,
        3,
        *uuid::Uuid::new_v4().as_bytes(),
        p.into_bytes(),
    )
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn codec(n: usize) -> (f64, f64) {
    let f = stats_frame();
    let mut enc = Encoder::new();
    let mut out = Vec::with_capacity(2048);
    enc.encode(&f, &mut out); // definitions once, as on a real stream
    let t = Instant::now();
    for _ in 0..n {
        out.clear();
        enc.encode(&f, &mut out);
    }
    let enc_rate = rate(n, t.elapsed());

    let mut stream = Vec::new();
    let mut enc = Encoder::new();
    for _ in 0..n {
        enc.encode(&f, &mut stream);
    }
    let t = Instant::now();
    let mut dec = Decoder::default();
    let mut got = 0;
    for chunk in stream.chunks(64 * 1024) {
        dec.feed(chunk);
        while let Some((_, v)) = dec.next_value().expect("decode") {
            let fr = Frame::from_value(v).expect("frame");
            assert_eq!(fr.payload.len(), 1024);
            got += 1;
        }
    }
    assert_eq!(got, n);
    (enc_rate, rate(n, t.elapsed()))
}

fn send_all(mut send: impl FnMut(Frame) -> Result<(), SendError>, f: &Frame, n: usize) {
    for _ in 0..n {
        send_patiently(&mut send, f.clone(), Duration::from_secs(30)).expect("send");
    }
}

fn tls_pair() -> (Server, Client, [u8; 16]) {
    let mut spec = CertSpec::new(Role::SCHEDULER);
    spec.is_ca = true;
    let (ca, ca_cert) = certgen::self_signed_ca(&spec).expect("ca");
    let agent = certgen::issue(&ca, &CertSpec::new(Role::AGENT)).expect("agent");
    let anchors = vec![ca_cert.der.clone()];
    let sid = tls::identity_from_pem(ca_cert.combined_pem().as_bytes(), "ca").expect("id");
    let cid = tls::identity_from_pem(agent.combined_pem().as_bytes(), "agent").expect("id");
    let server = Server::start(ServerConfig::new(
        sid,
        anchors.clone(),
        *uuid::Uuid::new_v4().as_bytes(),
        "127.0.0.1:0".parse().expect("addr"),
    ))
    .expect("server");
    let client = Client::start(ClientConfig::new(
        cid,
        anchors,
        *uuid::Uuid::new_v4().as_bytes(),
        vec![server.local_addr().to_string()],
    ))
    .expect("client");
    let wait = Duration::from_secs(10);
    loop {
        match client.events().recv_timeout(wait).expect("connect in time") {
            ClientEvent::Connected { .. } => break,
            ClientEvent::ConnectFailed { error, .. } => panic!("{error}"),
            _ => {}
        }
    }
    let uuid = match server.events().recv_timeout(wait).expect("server connect") {
        ServerEvent::Connected { uuid, .. } => uuid,
        other => panic!("{other:?}"),
    };
    (server, client, uuid)
}

fn main() {
    let mut frames = 200_000usize;
    let mut codec_frames = 500_000usize;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next().and_then(|v| v.parse().ok());
        match (a.as_str(), v) {
            ("--frames", Some(v)) => frames = v,
            ("--codec-frames", Some(v)) => codec_frames = v,
            _ => {
                eprintln!("usage: bench_ssntp [--frames N] [--codec-frames N]");
                std::process::exit(2);
            }
        }
    }
    let f = stats_frame();
    let (enc, dec) = codec(codec_frames);

    let (server, client, uuid) = tls_pair();
    let t = Instant::now();
    let link = client.link();
    let sender = std::thread::spawn({
        let f = f.clone();
        move || send_all(|fr| link.send(fr), &f, frames)
    });
    let mut got = 0;
    while got < frames {
        match server
            .events()
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("stalled after {got} frames: {e}"))
        {
            ServerEvent::Frame { .. } => got += 1,
            other => panic!("{other:?}"),
        }
    }
    sender.join().expect("sender");
    let up = rate(frames, t.elapsed());

    let t = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| send_all(|fr| server.send(&uuid, fr), &f, frames));
        let mut got = 0;
        while got < frames {
            match client
                .events()
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("stalled after {got} frames: {e}"))
            {
                ClientEvent::Frame(_) => got += 1,
                other => panic!("{other:?}"),
            }
        }
    });
    let down = rate(frames, t.elapsed());

    let mb = |r: f64| r * (f.payload.len() as f64 + 50.0) / 1e6;
    println!("| measurement (1 KiB STATS frame) | frames/s | MB/s | target |");
    println!("|---|---:|---:|---:|");
    println!("| gob encode | {enc:.0} | {:.0} | ≥ 500 000 |", mb(enc));
    println!(
        "| gob decode + Frame | {dec:.0} | {:.0} | ≥ 500 000 |",
        mb(dec)
    );
    println!(
        "| TLS loopback, client → server ({frames} frames) | {up:.0} | {:.0} | ≥ 100 000 |",
        mb(up)
    );
    println!(
        "| TLS loopback, server → client ({frames} frames) | {down:.0} | {:.0} | ≥ 100 000 |",
        mb(down)
    );
    client.close();
    server.stop();
}
