//! Crash-consistency campaign: a scheduler (in this process, over real TLS)
//! drives the real `ciao-launcher` with random START / STOP / RESTART /
//! DELETE batches and kills it with SIGKILL at random points, restarting it
//! each time. After every restart it checks what the launcher recovered
//! against what it had acknowledged:
//! - every acknowledged START exists (seen in STATS, not DELETEd since);
//! - every acknowledged DELETE (InstanceDeleted) stays gone;
//! - no instance twice in STATS;
//! - no instance directory without a state, no temporary state file, no
//!   directory whose instance is not reported (a blocked id);
//! - (Docker) no container of this node without an instance directory.
//!
//! Seeded and reproducible: `CIAO_CAMPAIGN_SEED=N`; `CIAO_CAMPAIGN_LONG=1`
//! runs ≥ 1 000 kills (scripts/crash-campaign.sh --long). The launcher is
//! `CIAO_CAMPAIGN_LAUNCHER` if set (scripts/test.sh points it at the release
//! build), else the test build. Prints its counts.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use ciao_launcher::payloads::commands;
use ciao_launcher::payloads::config::VmType;
use ciao_launcher::payloads::outgoing;
use ciao_launcher::payloads::start::{StartRequest, start_payload};
use ciao_launcher::ssntp::conn::send_patiently;
use ciao_launcher::ssntp::server::{Server, ServerEvent};
use ciao_launcher::ssntp::{Command, Event, Frame, FrameType, Operation, Profile};

// Also used by the benchmarks; the campaign spawns its launcher itself.
#[allow(dead_code)]
#[path = "../examples/support/scheduler.rs"]
mod support_scheduler;

const PROFILE: Profile = Profile::P2016;
const WAIT: Duration = Duration::from_secs(30);

/// xorshift64*: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What the scheduler knows of one instance id, since its last START.
#[derive(Debug, Default, Clone)]
struct Known {
    /// Seen in a STATS since the last START was sent.
    acked: bool,
    /// A DELETE was sent since the last START.
    delete_sent: bool,
    /// InstanceDeleted received since the last DELETE was sent.
    deleted: bool,
    /// Believed to exist now (acked and not deleted).
    exists: bool,
}

#[derive(Debug, Default)]
struct Counts {
    operations: usize,
    kills: usize,
    clean_restarts: usize,
    lost_starts: usize,
    resurrected_deletes: usize,
    duplicates: usize,
    stateless_dirs: usize,
    temp_files: usize,
    blocked_ids: usize,
    stray_containers: usize,
}

impl Counts {
    fn losses(&self) -> usize {
        self.lost_starts
            + self.resurrected_deletes
            + self.duplicates
            + self.stateless_dirs
            + self.temp_files
            + self.blocked_ids
            + self.stray_containers
    }
}

struct Campaign<'a> {
    dir: PathBuf,
    server: Server,
    launcher: PathBuf,
    extra: Vec<String>,
    vm_type: VmType,
    engine: Option<&'a common::Engine>,
    child: Option<Child>,
    node: [u8; 16],
    known: HashMap<String, Known>,
    rng: Rng,
    counts: Counts,
    next_id: u32,
    tag: u32,
    /// Containers of this node without an instance directory at the last check.
    unrecorded: HashSet<String>,
}

impl Campaign<'_> {
    fn spawn(&mut self) {
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let log = self.dir.join("launcher.log");
        let child = std::process::Command::new(&self.launcher)
            .arg("-cacert")
            .arg(self.dir.join("ca.pem"))
            .arg("-cert")
            .arg(self.dir.join("agent.pem"))
            .arg(format!("-server={}", self.server.local_addr()))
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--disk-limit=false", "--mem-limit=false", "-logtostderr"])
            .args(["--protocol", PROFILE.name(), "--stats-interval", "0.2"])
            .args(["--max-vm", "1000"])
            .args(&extra)
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .expect("log"),
            )
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", self.launcher.display()));
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("the launcher did not connect\n{}", self.log_tail()));
            match self.server.events().recv_timeout(left) {
                Ok(ServerEvent::Connected { uuid, .. }) => {
                    self.node = uuid;
                    return;
                }
                Ok(ServerEvent::Rejected { error, .. }) => panic!("rejected: {error}"),
                Ok(_) => {}
                Err(_) => panic!("the launcher did not connect\n{}", self.log_tail()),
            }
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("launcher.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let status = c.wait().expect("wait");
            // 6: a thread was still in the middle of a command after the
            // second a shutdown allows (documented); like a kill, then.
            assert!(
                matches!(status.code(), Some(0 | 6)),
                "launcher exit after SIGTERM: {status}"
            );
        }
    }

    fn send(&mut self, c: Command, payload: Vec<u8>) {
        let op = PROFILE.operand(Operation::Command(c)).expect("operand");
        let f = Frame::new(FrameType::Command, op, self.server.uuid(), payload);
        let node = self.node;
        // A frame the dying launcher never reads is simply not acknowledged.
        let _ = send_patiently(|f| self.server.send(&node, f), f, WAIT);
        self.counts.operations += 1;
    }

    fn new_id(&mut self) -> String {
        self.next_id += 1;
        format!(
            "{:08x}-{:04x}-4000-8000-000000000000",
            self.next_id, self.tag
        )
    }

    fn start(&mut self, id: &str) {
        let mut req = StartRequest {
            instance_uuid: id.into(),
            tenant_uuid: "67d86208-0000-4465-9018-fe14087d415f".into(),
            vm_type: self.vm_type,
            vcpus: 1,
            mem_mb: 64,
            user_data: "#cloud-config\nruncmd:\n  - [ sleep, \"600\" ]\n".into(),
            meta_data: "{}\n".into(),
            ..Default::default()
        };
        match self.vm_type {
            VmType::Docker => req.docker_image = common::IMAGE.into(),
            VmType::Qemu => req.image_uuid = "b286cd45-7d0c-4525-a140-4db6c95e41fa".into(),
        }
        self.known.insert(id.to_string(), Known::default());
        self.send(Command::Start, start_payload(PROFILE, &req));
    }

    /// One random command (or a pair of DELETEs).
    fn random_op(&mut self) {
        let existing: Vec<String> = {
            let mut v: Vec<String> = self
                .known
                .iter()
                .filter(|(_, k)| k.exists)
                .map(|(i, _)| i.clone())
                .collect();
            v.sort();
            v
        };
        let gone: Vec<String> = {
            let mut v: Vec<String> = self
                .known
                .iter()
                .filter(|(_, k)| !k.exists && (k.deleted || !k.acked) && k.delete_sent)
                .map(|(i, _)| i.clone())
                .collect();
            v.sort();
            v
        };
        let node = uuid::Uuid::from_bytes(self.node).to_string();
        let roll = self.rng.below(100);
        if existing.is_empty() || roll < 30 {
            let id = self.new_id();
            return self.start(&id);
        }
        if roll < 38 && !gone.is_empty() {
            let id = gone[self.rng.below(gone.len() as u64) as usize].clone();
            return self.start(&id);
        }
        let id = existing[self.rng.below(existing.len() as u64) as usize].clone();
        match roll {
            0..=54 => self.send(Command::Stop, commands::stop_payload(&id, &node)),
            55..=69 => self.send(Command::Restart, commands::restart_payload(&id, &node)),
            _ => {
                let times = if roll >= 95 { 2 } else { 1 };
                for _ in 0..times {
                    self.send(
                        Command::Delete,
                        commands::delete_payload(PROFILE, &id, &node, false),
                    );
                }
                if let Some(k) = self.known.get_mut(&id) {
                    k.delete_sent = true;
                    k.deleted = false;
                }
            }
        }
    }

    /// Takes in what the launcher says: STATS (acknowledged STARTs) and
    /// InstanceDeleted. Returns the STATS ids when the frame was a STATS.
    fn take(&mut self, ev: ServerEvent) -> Option<Vec<String>> {
        let ServerEvent::Frame { frame, .. } = ev else {
            return None;
        };
        match PROFILE.frame_operation(&frame) {
            Ok(Operation::Command(Command::Stats)) => {
                let stats = outgoing::parse_stats(&frame.payload).expect("STATS");
                let ids: Vec<String> = stats
                    .instances
                    .into_iter()
                    .map(|i| i.instance_uuid)
                    .collect();
                for id in &ids {
                    if let Some(k) = self.known.get_mut(id)
                        && !k.delete_sent
                    {
                        k.acked = true;
                        k.exists = true;
                    }
                }
                Some(ids)
            }
            Ok(Operation::Event(Event::InstanceDeleted)) => {
                let id = outgoing::parse_instance_event(&frame.payload).expect("event");
                // Also when the launcher removed it by itself (its
                // container found gone): the scheduler knows it is gone.
                if let Some(k) = self.known.get_mut(&id) {
                    k.delete_sent = true;
                    k.deleted = true;
                    k.exists = false;
                }
                None
            }
            _ => None,
        }
    }

    /// The next STATS's instance ids (bounded wait).
    fn next_stats(&mut self) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("no STATS after a restart\n{}", self.log_tail()));
            let ev = self
                .server
                .events()
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no STATS after a restart\n{}", self.log_tail()));
            if let Some(ids) = self.take(ev) {
                return ids;
            }
        }
    }

    /// After a restart: the first STATS (sent once recovery is done) against
    /// what was acknowledged, and the data directory.
    fn check(&mut self) {
        let ids = self.next_stats();
        let reported: HashSet<&String> = ids.iter().collect();
        self.counts.duplicates += ids.len() - reported.len();
        for (id, k) in &mut self.known {
            let there = reported.contains(id);
            if k.acked && !k.delete_sent && !there {
                eprintln!("LOST: acknowledged START of {id} not recovered");
                self.counts.lost_starts += 1;
            }
            if k.delete_sent && k.deleted && there {
                eprintln!("RESURRECTED: acknowledged DELETE of {id} undone");
                self.counts.resurrected_deletes += 1;
            }
            // What the scheduler knows from now on.
            k.exists = there;
            if there {
                k.acked = true;
                k.delete_sent = false;
            } else {
                k.delete_sent = true;
                k.deleted = true;
            }
        }
        // The launcher keeps working while the directory is read (a state
        // being rewritten has a temporary file for a moment, an instance
        // being removed has no state for a moment): a leftover is what two
        // readings one STATS apart both show.
        let first = self.data_dir_issues(&ids);
        let ids = self.next_stats();
        let second = self.data_dir_issues(&ids);
        for (kind, what) in first.intersection(&second) {
            eprintln!("{kind}: {what}");
            match *kind {
                "STATELESS" => self.counts.stateless_dirs += 1,
                "TEMP FILE" => self.counts.temp_files += 1,
                _ => self.counts.blocked_ids += 1,
            }
        }
        if let Some(engine) = self.engine {
            // A container whose create the engine finished only after the
            // killed launcher's successor had swept is removed by the next
            // sweep: stray is what survives two restarts.
            let node = uuid::Uuid::from_bytes(self.node).to_string();
            let dirs = self.instance_dirs();
            let unrecorded: HashSet<String> = containers_of(engine, &node)
                .into_iter()
                .filter(|i| !dirs.contains(i))
                .collect();
            for instance in unrecorded.intersection(&self.unrecorded) {
                eprintln!("STRAY CONTAINER of {instance}");
                self.counts.stray_containers += 1;
            }
            self.unrecorded = unrecorded;
        }
    }

    fn instance_dirs(&self) -> HashSet<String> {
        std::fs::read_dir(self.dir.join("data/instances"))
            .expect("instances dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// Stateless directories, temporary state files, and directories of
    /// instances that STATS does not report (blocked ids).
    fn data_dir_issues(&self, reported: &[String]) -> HashSet<(&'static str, String)> {
        let mut issues = HashSet::new();
        for e in std::fs::read_dir(self.dir.join("data/instances"))
            .expect("instances dir")
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if !e.path().join("state").is_file() {
                issues.insert(("STATELESS", name.clone()));
            }
            for f in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
                if f.file_name().to_string_lossy().starts_with(".state.tmp-") {
                    issues.insert(("TEMP FILE", f.path().display().to_string()));
                }
            }
            if !reported.contains(&name) {
                issues.insert(("BLOCKED", name));
            }
        }
        issues
    }

    /// One round: a batch of commands, then a kill after a random number of
    /// the launcher's frames (0: at once, in the middle of its work), or now
    /// and then a clean SIGTERM; restart and check.
    fn round(&mut self) {
        let batch = 1 + self.rng.below(6);
        for _ in 0..batch {
            self.random_op();
        }
        let frames = self.rng.below(3 * batch + 1);
        let deadline = Instant::now() + Duration::from_secs(3);
        for _ in 0..frames {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            match self.server.events().recv_timeout(left) {
                Ok(ev) => {
                    self.take(ev);
                }
                Err(_) => break,
            }
        }
        if self.rng.below(10) == 0 {
            self.terminate();
            self.counts.clean_restarts += 1;
        } else {
            self.kill();
            self.counts.kills += 1;
        }
        self.drain_session();
        self.spawn();
        self.check();
    }

    /// Takes in what the ended session still sent, up to its end: its
    /// frames count as received, and none can be mistaken for the next
    /// session's.
    fn drain_session(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("the killed session never ended"));
            match self.server.events().recv_timeout(left) {
                Ok(ServerEvent::Disconnected { .. }) => return,
                Ok(ev) => {
                    self.take(ev);
                }
                Err(_) => panic!("the killed session never ended"),
            }
        }
    }
}

/// The instance labels of the containers that carry this node's label.
fn containers_of(engine: &common::Engine, node: &str) -> Vec<String> {
    let out = std::process::Command::new("docker")
        .arg("-H")
        .arg(format!("unix://{}", engine.socket.display()))
        .args(["ps", "-a", "--filter"])
        .arg(format!("label=org.ciao.node={node}"))
        .args(["--format", "{{.Label \"org.ciao.instance\"}}"])
        .output()
        .expect("docker CLI");
    assert!(out.status.success(), "{}", common::text(&out.stderr));
    common::text(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

fn launcher_binary() -> PathBuf {
    match std::env::var_os("CIAO_CAMPAIGN_LAUNCHER") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(common::LAUNCHER),
    }
}

fn seed() -> u64 {
    std::env::var("CIAO_CAMPAIGN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261207)
}

fn long() -> bool {
    std::env::var_os("CIAO_CAMPAIGN_LONG").is_some()
}

fn run(
    what: &str,
    vm_type: VmType,
    extra: Vec<String>,
    engine: Option<&common::Engine>,
    min_ops: usize,
    min_kills: usize,
) {
    let dir = std::env::temp_dir().join(format!("ciao-campaign-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    let server = support_scheduler::scheduler(&dir, PROFILE).expect("scheduler");
    let seed = seed() ^ (vm_type as u64);
    let launcher = launcher_binary();
    let mut c = Campaign {
        dir: dir.clone(),
        server,
        launcher: launcher.clone(),
        extra,
        vm_type,
        engine,
        child: None,
        node: [0; 16],
        known: HashMap::new(),
        rng: Rng(seed | 1),
        counts: Counts::default(),
        next_id: 0,
        tag: (seed & 0xffff) as u32,
        unrecorded: HashSet::new(),
    };
    let started = Instant::now();
    c.spawn();
    while c.counts.operations < min_ops || c.counts.kills < min_kills {
        c.round();
        if c.counts.losses() > 0 {
            break;
        }
    }
    // Clean up through the launcher: everything left is DELETEd.
    let node = uuid::Uuid::from_bytes(c.node).to_string();
    let left: Vec<String> = c
        .known
        .iter()
        .filter(|(_, k)| k.exists)
        .map(|(i, _)| i.clone())
        .collect();
    let deadline = Instant::now() + WAIT;
    let mut left = left;
    while !left.is_empty() && Instant::now() < deadline {
        // Again after a while: a DELETE may fail (e.g. instance_busy).
        for id in &left {
            c.send(
                Command::Delete,
                commands::delete_payload(PROFILE, id, &node, false),
            );
        }
        let again = Instant::now() + Duration::from_secs(3);
        while let Some(wait) = again.checked_duration_since(Instant::now()) {
            if let Ok(ev) = c.server.events().recv_timeout(wait) {
                c.take(ev);
            }
            if c.known.values().all(|k| !k.exists) {
                break;
            }
        }
        left.retain(|id| c.known.get(id).is_some_and(|k| k.exists));
    }
    // One more restart: its recovery sweeps what the last kill left.
    c.terminate();
    c.drain_session();
    c.spawn();
    c.check();
    c.check();
    c.terminate();
    let n = &c.counts;
    println!(
        "campaign {what} (seed {}, {}): {} operations, {} kills, {} clean restarts in {:.1} s; \
         lost STARTs {}, resurrected DELETEs {}, duplicates {}, stateless dirs {}, temp files {}, \
         blocked ids {}, stray containers {}",
        seed,
        launcher.display(),
        n.operations,
        n.kills,
        n.clean_restarts,
        started.elapsed().as_secs_f64(),
        n.lost_starts,
        n.resurrected_deletes,
        n.duplicates,
        n.stateless_dirs,
        n.temp_files,
        n.blocked_ids,
        n.stray_containers
    );
    let losses = n.losses();
    let leftover = std::fs::read_dir(dir.join("data/instances")).map_or(0, |d| d.count());
    let tail = c.log_tail();
    c.server.stop();
    assert_eq!(
        losses, 0,
        "losses or leaks (see the lines above); log tail:\n{tail}"
    );
    assert_eq!(leftover, 0, "instances left after the final DELETEs");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn campaign_simulation() {
    let (ops, kills) = if long() { (5000, 1000) } else { (300, 60) };
    run(
        "simulation",
        VmType::Qemu,
        vec!["-simulation".into()],
        None,
        ops,
        kills,
    );
}

#[test]
fn campaign_docker() {
    let engine = common::engine();
    let socket = engine.socket.display().to_string();
    let (ops, kills) = if long() { (600, 150) } else { (60, 15) };
    let extra = vec![
        "--docker-socket".to_string(),
        socket,
        "--stop-timeout".into(),
        "1".into(),
    ];
    run("docker", VmType::Docker, extra, Some(&engine), ops, kills);
}
