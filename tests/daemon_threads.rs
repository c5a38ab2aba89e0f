//! Deterministic tests of the server, overseer and instance threads: frames
//! go in through the server thread's event handler, frames come out through a
//! channel outbox, time enters only through a test-driven stats tick, and the
//! simulation virtualizer stands in for QEMU/Docker. No sleeps: every wait is
//! a bounded receive.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ciao_launcher::health::{ErrorNotes, ManualClock, StatusFile, StatusReport};
use ciao_launcher::instance::InstanceState;
use ciao_launcher::network::TenantNetwork;
use ciao_launcher::node::Never;
use ciao_launcher::node::{ChannelOutbox, NodeContext};
use ciao_launcher::nodestats::{FixedNodeStats, NodeFigures};
use ciao_launcher::overseer::{
    Awaited, HealthSetup, IdleThreads, Limits, Overseer, OverseerInputs, OverseerReq,
};
use ciao_launcher::payloads::commands;
use ciao_launcher::payloads::config::VmType;
use ciao_launcher::payloads::outgoing;
use ciao_launcher::payloads::start::{StartRequest, start_payload};
use ciao_launcher::server::Server;
use ciao_launcher::ssntp::client::ClientEvent;
use ciao_launcher::ssntp::{
    Command, ErrorCode, Event, Frame, FrameType, Operation, Profile, Role, Status,
};
use ciao_launcher::state::{StateFile, Store};
use ciao_launcher::virt::sim::{SimControl, SimFactory};
use crossbeam_channel::{Receiver, Sender};

const WAIT: Duration = Duration::from_secs(10);
const NODE: &str = "4481631c-dce9-48d6-b83a-a717417072ce";

fn big_node() -> NodeFigures {
    NodeFigures {
        mem_total_mb: 1_000_000,
        mem_available_mb: 1_000_000,
        disk_total_mb: 10_000_000,
        disk_available_mb: 10_000_000,
        load: 0,
        cpus_online: 64,
    }
}

struct TestNode {
    profile: Profile,
    server: Server,
    out: Receiver<(Operation, Vec<u8>)>,
    sim: SimControl,
    tick: Sender<Instant>,
    requests: Sender<OverseerReq>,
    overseer_shutdown: Option<Sender<Never>>,
    overseer: Option<JoinHandle<IdleThreads>>,
    awaited: Awaited,
    dir: PathBuf,
}

fn tmpdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("ciao-threads-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&d).expect("tmpdir");
    d
}

impl TestNode {
    fn start(profile: Profile, limits: Limits) -> TestNode {
        TestNode::start_in(profile, limits, tmpdir(), SimControl::new())
    }

    fn start_in(profile: Profile, limits: Limits, dir: PathBuf, sim: SimControl) -> TestNode {
        TestNode::start_full(profile, limits, dir, sim, None)
    }

    /// With the status file kept in `dir`, its rate limit on `clock`.
    fn start_keeping_status(profile: Profile, clock: &ManualClock) -> TestNode {
        let c = clock.clone();
        TestNode::start_full(profile, limits(8), tmpdir(), SimControl::new(), Some(c))
    }

    fn start_full(
        profile: Profile,
        limits: Limits,
        dir: PathBuf,
        sim: SimControl,
        status_clock: Option<ManualClock>,
    ) -> TestNode {
        let (out_tx, out) = crossbeam_channel::unbounded();
        let (errors, errors_rx) = ErrorNotes::channel();
        let store = Store::new(&dir);
        store.ensure_dirs().expect("dirs");
        let ctx = NodeContext {
            profile,
            node_uuid: NODE.into(),
            outbox: Arc::new(ChannelOutbox(out_tx)),
            store,
            factory: Arc::new(SimFactory {
                control: sim.clone(),
            }),
            stop_wait: Duration::from_secs(60),
            instance_stack: 128 * 1024,
            network: TenantNetwork::off(),
            errors: if status_clock.is_some() {
                errors
            } else {
                ErrorNotes::default()
            },
        };
        let mut ovs = Overseer::new(
            ctx.clone(),
            limits,
            Box::new(FixedNodeStats(big_node())),
            dir.join("maintenance"),
        )
        .with_usage_period(None);
        if let Some(clock) = status_clock {
            ovs = ovs.with_health(HealthSetup {
                file: StatusFile::new(&dir),
                scheduler: "192.0.2.1:8888".into(),
                errors: errors_rx,
                clock: Box::new(clock),
            });
        }
        ovs.recover();
        let awaited = ovs.awaited();
        let (requests, req_rx) = crossbeam_channel::bounded(64);
        let (tick, tick_rx) = crossbeam_channel::bounded(0);
        let (shutdown, shutdown_rx) = crossbeam_channel::bounded::<Never>(0);
        let overseer = ovs
            .spawn(OverseerInputs {
                requests: req_rx,
                stats_tick: tick_rx,
                shutdown: shutdown_rx,
                sweep_again: crossbeam_channel::never(),
            })
            .expect("overseer");
        let server = Server::new(ctx, requests.clone());
        TestNode {
            profile,
            server,
            out,
            sim,
            tick,
            requests,
            overseer_shutdown: Some(shutdown),
            overseer: Some(overseer),
            awaited,
            dir,
        }
    }

    fn command(&mut self, c: Command, payload: Vec<u8>) {
        let op = self
            .profile
            .operand(Operation::Command(c))
            .expect("operand");
        let f = Frame::new(FrameType::Command, op, [1; 16], payload);
        self.server.event(ClientEvent::Frame(f));
    }

    fn connected(&mut self) {
        self.server.event(ClientEvent::Connected {
            server_uuid: [2; 16],
            server_role: Role::SCHEDULER,
            configuration: Vec::new(),
        });
    }

    /// The next frame the node sends, whatever it is.
    fn next(&self) -> (Operation, Vec<u8>) {
        self.out.recv_timeout(WAIT).expect("a frame in time")
    }

    /// Skips frames until one with `op` arrives.
    fn expect(&self, op: Operation) -> Vec<u8> {
        loop {
            let (o, p) = self.next();
            if o == op {
                return p;
            }
        }
    }

    fn expect_error(&self, code: ErrorCode) -> outgoing::ErrorReport {
        let p = self.expect(Operation::Error(code));
        outgoing::parse_error(&p).expect("error payload")
    }

    /// Drives one stats tick and returns (STATUS, STATS payload).
    /// The STATUS and STATS of one tick. A STATUS an instance asked for
    /// earlier (`StatusNow`, STATUS only) may still be queued before them:
    /// the tick's own STATUS is the one right before its STATS.
    fn tick(&self) -> (Status, outgoing::Stats) {
        self.tick.send(Instant::now()).expect("tick");
        let mut status = None;
        loop {
            match self.next() {
                (Operation::Status(s), _) => status = Some(s),
                (Operation::Command(Command::Stats), p) => {
                    let stats = outgoing::parse_stats(&p).expect("stats");
                    return (status.expect("a STATUS before the STATS"), stats);
                }
                _ => {}
            }
        }
    }

    fn list(&self) -> Vec<(String, InstanceState)> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.requests
            .send(OverseerReq::List { reply })
            .expect("overseer");
        answer.recv_timeout(WAIT).expect("list")
    }

    /// Waits until `id` reaches `state` (polling the overseer, bounded).
    fn wait_state(&self, id: &str, state: InstanceState) {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if self.list().iter().any(|(i, s)| i == id && *s == state) {
                return;
            }
            std::thread::yield_now();
        }
        panic!("{id} never reached {state:?}: {:?}", self.list());
    }

    fn wait_gone(&self, id: &str) {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if !self.list().iter().any(|(i, _)| i == id) {
                return;
            }
            std::thread::yield_now();
        }
        panic!("{id} never went away");
    }

    /// Returns once the overseer has finished with every input before,
    /// including what it does after each (the status file): the second
    /// snapshot is taken only after the first one's input was done with.
    fn barrier(&self) {
        self.list();
        self.list();
    }

    /// The status file, read after a barrier.
    fn status_file(&self) -> StatusReport {
        self.barrier();
        StatusReport::read(&self.dir).expect("status file")
    }

    fn start_instance(&mut self, id: &str) {
        let req = request(id);
        let payload = start_payload(self.profile, &req);
        self.command(Command::Start, payload);
    }

    /// Shuts the overseer down; returns how long that took and the idle
    /// instance threads it left blocked.
    fn shutdown_leaving_idle(&mut self) -> (Duration, IdleThreads) {
        let t = Instant::now();
        self.overseer_shutdown.take();
        let idle = match self.overseer.take() {
            Some(o) => o.join().expect("overseer joined"),
            None => IdleThreads::default(),
        };
        (t.elapsed(), idle)
    }

    /// Shuts down and lets every idle thread end too.
    fn shutdown(&mut self) -> Duration {
        let (took, idle) = self.shutdown_leaving_idle();
        idle.end_and_join();
        took
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn request(id: &str) -> StartRequest {
    StartRequest {
        instance_uuid: id.into(),
        tenant_uuid: "67d86208-0000-4465-9018-fe14087d415f".into(),
        image_uuid: "b286cd45-7d0c-4525-a140-4db6c95e41fa".into(),
        docker_image: String::new(),
        vm_type: VmType::Qemu,
        firmware: Default::default(),
        vcpus: 2,
        mem_mb: 370,
        disk_mb: 8000,
        volumes: Vec::new(),
        restart: false,
        user_data: "#cloud-config\nruncmd:\n- [touch, /etc/bootdone]\n".into(),
        meta_data: "{\"uuid\": \"ciao\", \"hostname\": \"ciao\"}".into(),
        ..StartRequest::default()
    }
}

/// This process's threads named `prefix…`: how many, how many asleep
/// (state S), and their voluntary context switches summed (/proc).
fn instance_threads(prefix: &str) -> (usize, usize, u64) {
    let (mut threads, mut asleep, mut switches) = (0, 0, 0);
    let tasks = std::fs::read_dir("/proc/self/task").expect("/proc/self/task");
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or("")
                .to_string()
        };
        threads += 1;
        if field("State:").starts_with('S') {
            asleep += 1;
        }
        switches += field("voluntary_ctxt_switches:")
            .parse::<u64>()
            .unwrap_or(0);
    }
    (threads, asleep, switches)
}

fn uuid_n(n: u32) -> String {
    format!("{n:08x}-0000-4000-8000-000000000000")
}

fn limits(max: usize) -> Limits {
    Limits {
        max_instances: max,
        ..Limits::default()
    }
}

#[test]
fn ready_then_full_at_max_vm_and_full_cn_beyond() {
    for profile in Profile::ALL {
        let mut n = TestNode::start(profile, limits(2));
        n.connected();
        assert_eq!(n.next().0, Operation::Status(Status::Ready));
        assert!(!n.expect(Operation::Command(Command::Stats)).is_empty());
        n.start_instance(&uuid_n(1));
        n.start_instance(&uuid_n(2));
        n.wait_state(&uuid_n(1), InstanceState::Running);
        n.wait_state(&uuid_n(2), InstanceState::Running);
        let (status, stats) = n.tick();
        assert_eq!(status, Status::Full, "{profile}");
        assert_eq!(stats.status, "FULL");
        assert_eq!(stats.instances.len(), 2);
        assert!(
            stats
                .instances
                .iter()
                .all(|i| i.state == profile.running_state())
        );
        n.start_instance(&uuid_n(3));
        let e = n.expect_error(ErrorCode::StartFailure);
        assert_eq!(
            (e.instance_uuid.as_str(), e.reason.as_str()),
            (uuid_n(3).as_str(), "full_cn"),
            "{profile}"
        );
    }
}

#[test]
fn stop_restart_delete_2016() {
    let mut n = TestNode::start(Profile::P2016, limits(8));
    let id = uuid_n(7);
    n.start_instance(&id);
    assert!(!n.expect(Operation::Status(Status::Ready)).is_empty());
    n.wait_state(&id, InstanceState::Running);
    assert!(n.sim.is_running(&id));

    n.command(Command::Stop, commands::stop_payload(&id, NODE));
    n.wait_state(&id, InstanceState::Exited);
    assert!(!n.sim.is_running(&id));
    let (_, stats) = n.tick();
    assert_eq!(stats.instances[0].state, "exited");
    // Stopped state survives on disk.
    assert!(Store::new(&n.dir).load(&id).expect("state").stopped);

    n.command(Command::Stop, commands::stop_payload(&id, NODE));
    assert_eq!(
        n.expect_error(ErrorCode::StopFailure).reason,
        "already_stopped"
    );

    n.command(Command::Restart, commands::restart_payload(&id, NODE));
    n.wait_state(&id, InstanceState::Running);
    assert!(!Store::new(&n.dir).load(&id).expect("state").stopped);
    n.command(Command::Restart, commands::restart_payload(&id, NODE));
    assert_eq!(
        n.expect_error(ErrorCode::RestartFailure).reason,
        "already_running"
    );

    n.command(
        Command::Delete,
        commands::delete_payload(Profile::P2016, &id, NODE, false),
    );
    let ev = n.expect(Operation::Event(Event::InstanceDeleted));
    assert_eq!(outgoing::parse_instance_event(&ev).expect("event"), id);
    n.wait_gone(&id);
    assert!(!n.dir.join("instances").join(&id).exists());
    assert!(!n.sim.is_running(&id));
}

#[test]
fn delete_with_stop_sends_instance_stopped_2018() {
    let mut n = TestNode::start(Profile::P2018, limits(8));
    let id = uuid_n(8);
    n.start_instance(&id);
    n.wait_state(&id, InstanceState::Running);
    n.command(
        Command::Delete,
        commands::delete_payload(Profile::P2018, &id, NODE, true),
    );
    let ev = n.expect(Operation::Event(Event::InstanceStopped));
    assert_eq!(outgoing::parse_instance_event(&ev).expect("event"), id);
    n.wait_gone(&id);
}

#[test]
fn duplicate_start_and_unknown_delete() {
    for profile in Profile::ALL {
        let mut n = TestNode::start(profile, limits(8));
        let id = uuid_n(9);
        n.start_instance(&id);
        n.wait_state(&id, InstanceState::Running);
        n.start_instance(&id);
        assert_eq!(
            n.expect_error(ErrorCode::StartFailure).reason,
            "already_running",
            "{profile}"
        );
        n.command(
            Command::Delete,
            commands::delete_payload(profile, &uuid_n(10), NODE, false),
        );
        let e = n.expect_error(ErrorCode::DeleteFailure);
        assert_eq!(
            (e.instance_uuid, e.reason),
            (uuid_n(10), "no_instance".to_string()),
            "{profile}"
        );
    }
}

#[test]
fn crash_2016_is_exited_and_restartable() {
    let mut n = TestNode::start(Profile::P2016, limits(8));
    let id = uuid_n(11);
    n.start_instance(&id);
    n.wait_state(&id, InstanceState::Running);
    assert!(n.sim.crash(&id));
    n.wait_state(&id, InstanceState::Exited);
    n.command(Command::Restart, commands::restart_payload(&id, NODE));
    n.wait_state(&id, InstanceState::Running);
}

#[test]
fn crash_2018_sends_instance_stopped_and_forgets() {
    let mut n = TestNode::start(Profile::P2018, limits(8));
    let id = uuid_n(12);
    n.start_instance(&id);
    n.wait_state(&id, InstanceState::Running);
    assert!(n.sim.crash(&id));
    let ev = n.expect(Operation::Event(Event::InstanceStopped));
    assert_eq!(outgoing::parse_instance_event(&ev).expect("event"), id);
    n.wait_gone(&id);
    assert!(!n.dir.join("instances").join(&id).exists());
}

#[test]
fn failed_start_reports_and_leaves_nothing() {
    let mut n = TestNode::start(Profile::P2018, limits(8));
    let (a, b) = (uuid_n(13), uuid_n(14));
    n.sim.fail_image(&a);
    n.start_instance(&a);
    assert_eq!(
        n.expect_error(ErrorCode::StartFailure).reason,
        "image_failure"
    );
    n.wait_gone(&a);
    n.sim.fail_start(&b);
    n.start_instance(&b);
    assert_eq!(
        n.expect_error(ErrorCode::StartFailure).reason,
        "launch_failure"
    );
    n.wait_gone(&b);
    assert_eq!(
        std::fs::read_dir(n.dir.join("instances"))
            .expect("dir")
            .count(),
        0
    );
}

#[test]
fn evacuate_maintenance_and_restore_2018() {
    let mut n = TestNode::start(Profile::P2018, limits(8));
    let ids = [uuid_n(20), uuid_n(21)];
    for id in &ids {
        n.start_instance(id);
        n.wait_state(id, InstanceState::Running);
    }
    n.command(Command::Evacuate, commands::evacuate_payload(NODE));
    let mut stopped = Vec::new();
    while stopped.len() < 2 {
        let p = n.expect(Operation::Event(Event::InstanceStopped));
        stopped.push(outgoing::parse_instance_event(&p).expect("event"));
    }
    stopped.sort();
    assert_eq!(stopped, ids);
    assert_eq!(n.tick().0, Status::Maintenance);
    n.start_instance(&uuid_n(22));
    assert_eq!(
        n.expect_error(ErrorCode::StartFailure).reason,
        "node_maintenance"
    );
    n.command(Command::Restore, commands::restore_payload(NODE));
    assert_eq!(n.tick().0, Status::Ready);
}

#[test]
fn flooded_instance_does_not_delay_another_start() {
    let mut n = TestNode::start(Profile::P2016, limits(8));
    let (busy, other) = (uuid_n(30), uuid_n(31));
    n.start_instance(&busy);
    n.wait_state(&busy, InstanceState::Running);
    // Its stop hangs: the instance thread is stuck in the STOP handler.
    n.sim.hang_stop(&busy);
    for _ in 0..40 {
        n.command(Command::Stop, commands::stop_payload(&busy, NODE));
    }
    // The inbox overflows: the node answers instead of stalling.
    assert_eq!(
        n.expect_error(ErrorCode::StopFailure).reason,
        "instance_busy"
    );
    n.start_instance(&other);
    n.wait_state(&other, InstanceState::Running);
}

#[test]
fn hostile_payloads_get_error_frames() {
    let mut n = TestNode::start(Profile::P2018, limits(8));
    let mut traversal = request("../../../etc");
    traversal.instance_uuid = "../../../etc".into();
    n.command(Command::Start, start_payload(Profile::P2018, &traversal));
    let e = n.expect_error(ErrorCode::StartFailure);
    assert_eq!(e.reason, "invalid_data");
    assert!(!n.dir.join("etc").exists());

    n.command(
        Command::Start,
        b"start:\n  instance_uuid: [unclosed\n".to_vec(),
    );
    assert_eq!(
        n.expect_error(ErrorCode::StartFailure).reason,
        "invalid_payload"
    );
    n.command(Command::Start, b"start:\n  vcpus: two\n".to_vec());
    assert!(
        ["invalid_payload", "invalid_data"]
            .contains(&n.expect_error(ErrorCode::StartFailure).reason.as_str())
    );
    n.command(Command::Delete, b"delete: {}\n".to_vec());
    assert_eq!(
        n.expect_error(ErrorCode::DeleteFailure).reason,
        "invalid_data"
    );
    n.command(
        Command::Delete,
        b"delete:\n  instance_uuid: ../x\n".to_vec(),
    );
    assert_eq!(
        n.expect_error(ErrorCode::DeleteFailure).reason,
        "invalid_data"
    );
    // 100 MB: no start document at all (invalid_data, as in Go), then a
    // start document with a 100 MB value (invalid_data: no usable id).
    n.command(Command::Start, vec![b'x'; 100 << 20]);
    assert_eq!(
        n.expect_error(ErrorCode::StartFailure).reason,
        "invalid_data"
    );
    let mut huge = b"start:\n  instance_uuid: ".to_vec();
    huge.resize(100 << 20, b'a');
    huge.push(b'\n');
    n.command(Command::Start, huge);
    let reason = n.expect_error(ErrorCode::StartFailure).reason;
    assert!(
        ["invalid_data", "invalid_payload"].contains(&reason.as_str()),
        "{reason}"
    );
    // An unknown operand is ignored, and the node still works.
    n.server.event(ClientEvent::Frame(Frame::new(
        FrameType::Command,
        200,
        [1; 16],
        b"x".to_vec(),
    )));
    let id = uuid_n(40);
    n.start_instance(&id);
    n.wait_state(&id, InstanceState::Running);
}

#[test]
fn recovery_restores_instances_and_skips_garbage() {
    let dir = tmpdir();
    let sim = SimControl::new();
    let (a, b) = (uuid_n(50), uuid_n(51));
    {
        let mut n = TestNode::start_in(Profile::P2016, limits(8), dir.clone(), sim.clone());
        n.start_instance(&a);
        n.start_instance(&b);
        n.wait_state(&a, InstanceState::Running);
        n.wait_state(&b, InstanceState::Running);
        n.command(Command::Stop, commands::stop_payload(&b, NODE));
        n.wait_state(&b, InstanceState::Exited);
        n.shutdown();
        // Keep the directory: forget the node without its Drop cleanup.
        n.dir = tmpdir();
    }
    std::fs::create_dir_all(dir.join("instances/not-a-uuid")).expect("junk");
    std::fs::create_dir_all(dir.join("instances").join(uuid_n(52))).expect("no state");
    std::fs::write(
        dir.join("instances").join(uuid_n(52)).join("state"),
        "config: [",
    )
    .expect("corrupt");
    let n = TestNode::start_in(Profile::P2016, limits(8), dir, sim.clone());
    n.wait_state(&a, InstanceState::Running);
    n.wait_state(&b, InstanceState::Exited);
    assert_eq!(n.list().len(), 2);
    let _: StateFile = Store::new(&n.dir).load(&a).expect("kept");
}

#[test]
fn shutdown_with_1000_idle_instances_wakes_none_of_them() {
    // Ids no other test uses, so their threads' names (cut to 15 bytes by
    // the kernel: "instance-0010xx") are this test's alone.
    const FIRST: u32 = 0x0010_0000;
    let mut n = TestNode::start(Profile::P2018, limits(2000));
    for i in 0..1000 {
        n.start_instance(&uuid_n(FIRST + i));
    }
    for i in 0..1000 {
        n.wait_state(&uuid_n(FIRST + i), InstanceState::Running);
    }
    // Every one asleep in its inbox, then: no thread woken by the shutdown.
    let deadline = Instant::now() + WAIT;
    let before = loop {
        let (threads, asleep, switches) = instance_threads("instance-0010");
        if threads == 1000 && asleep == 1000 {
            break switches;
        }
        assert!(
            Instant::now() < deadline,
            "{asleep} of {threads} instance threads asleep"
        );
        std::thread::yield_now();
    };
    let (took, idle) = n.shutdown_leaving_idle();
    assert!(took < Duration::from_secs(1), "shutdown took {took:?}");
    let (_, _, after) = instance_threads("instance-0010");
    assert_eq!(
        after, before,
        "idle instance threads were woken by the shutdown"
    );
    // Nothing in hand: none was waited for, all are left blocked.
    assert_eq!(idle.len(), 1000);
    assert!(n.awaited.names().is_empty());
    // Shutdown leaves instances running.
    assert_eq!(n.sim.running_count(), 1000);
    // In-process, letting them go ends every one of them.
    idle.end_and_join();
}

/// The shutdown waits for an instance thread in the middle of its START
/// (and names it while it does), not for the idle ones.
#[test]
fn shutdown_waits_only_for_the_thread_with_work_in_hand() {
    let mut n = TestNode::start(Profile::P2016, limits(64));
    for i in 0..20 {
        n.start_instance(&uuid_n(2000 + i));
    }
    for i in 0..20 {
        n.wait_state(&uuid_n(2000 + i), InstanceState::Running);
    }
    let busy = uuid_n(2100);
    let gate = n.sim.gate_image(&busy);
    n.start_instance(&busy);
    // Its thread is in the START (blocked on the gate) once the overseer
    // lists it.
    n.wait_state(&busy, InstanceState::Pending);
    n.overseer_shutdown.take();
    let overseer = n.overseer.take().expect("overseer");
    // Named as awaited, alone, while its START is held.
    let deadline = Instant::now() + WAIT;
    while n.awaited.names().is_empty() {
        assert!(Instant::now() < deadline, "the shutdown never began");
        std::thread::yield_now();
    }
    assert_eq!(n.awaited.names(), vec![format!("instance-{}", &busy[..8])]);
    assert!(!overseer.is_finished());
    drop(gate);
    let idle = overseer.join().expect("overseer joined");
    assert!(n.awaited.names().is_empty());
    assert_eq!(idle.len(), 20);
    // The START it finished is durable.
    assert!(!Store::new(&n.dir).load(&busy).expect("saved").stopped);
    idle.end_and_join();
}

// ---- Reliability: each test below failed on the code before the fix ----

/// Events and errors for `id` among the frames that arrive until `until`
/// has been seen `times` times (bounded by WAIT per frame).
fn outcomes_until(n: &TestNode, until: Operation, times: usize) -> Vec<(Operation, String)> {
    let mut seen = Vec::new();
    let mut hits = 0;
    while hits < times {
        let (op, p) = n.next();
        match op {
            Operation::Error(_) => {
                let e = outgoing::parse_error(&p).expect("error payload");
                seen.push((op, e.reason));
            }
            Operation::Event(_) => seen.push((op, String::new())),
            _ => continue,
        }
        if op == until {
            hits += 1;
        }
    }
    seen
}

/// Defect: commands queued behind a DELETE vanished (no reply, no effect):
/// the instance thread left its loop and dropped its inbox. Three DELETEs
/// queued while the START is still being carried out: one deletes, the two
/// others each get `no_instance`.
#[test]
fn every_delete_queued_behind_a_delete_gets_an_outcome() {
    for profile in Profile::ALL {
        let mut n = TestNode::start(profile, limits(8));
        let id = uuid_n(60);
        let gate = n.sim.gate_image(&id);
        n.start_instance(&id);
        for _ in 0..3 {
            n.command(
                Command::Delete,
                commands::delete_payload(profile, &id, NODE, false),
            );
        }
        drop(gate);
        let seen = outcomes_until(&n, Operation::Error(ErrorCode::DeleteFailure), 2);
        let deleted = seen
            .iter()
            .filter(|(op, _)| *op == Operation::Event(Event::InstanceDeleted))
            .count();
        assert_eq!(deleted, 1, "{profile}: {seen:?}");
        assert!(
            seen.iter()
                .filter(|(op, _)| matches!(op, Operation::Error(_)))
                .all(|(_, r)| r == "no_instance"),
            "{profile}: {seen:?}"
        );
        n.wait_gone(&id);
    }
}

/// Defect: a START right after a DELETE was swallowed (handed the inbox of
/// the instance whose thread was ending). It now starts a new instance.
#[test]
fn start_queued_behind_a_delete_starts_a_new_instance() {
    let mut n = TestNode::start(Profile::P2016, limits(8));
    let id = uuid_n(61);
    let gate = n.sim.gate_image(&id);
    n.start_instance(&id);
    n.command(
        Command::Delete,
        commands::delete_payload(Profile::P2016, &id, NODE, false),
    );
    n.command(Command::Stop, commands::stop_payload(&id, NODE));
    n.start_instance(&id);
    n.command(Command::Stop, commands::stop_payload(&id, NODE));
    drop(gate);
    // DELETE → InstanceDeleted; the first STOP (behind it) → no_instance;
    // the START → a new instance; the second STOP stops that one.
    let ev = n.expect(Operation::Event(Event::InstanceDeleted));
    assert_eq!(outgoing::parse_instance_event(&ev).expect("event"), id);
    assert_eq!(n.expect_error(ErrorCode::StopFailure).reason, "no_instance");
    n.wait_state(&id, InstanceState::Exited);
    assert!(Store::new(&n.dir).load(&id).expect("the new one").stopped);
    n.command(Command::Restart, commands::restart_payload(&id, NODE));
    n.wait_state(&id, InstanceState::Running);
}

/// Commands still queued when the launcher shuts down are answered.
#[test]
fn commands_queued_at_shutdown_are_answered() {
    let mut n = TestNode::start(Profile::P2016, limits(8));
    let id = uuid_n(62);
    let gate = n.sim.gate_image(&id);
    n.start_instance(&id);
    n.command(Command::Stop, commands::stop_payload(&id, NODE));
    n.command(Command::Stop, commands::stop_payload(&id, NODE));
    // Shut down while the START is still under way, then let it finish.
    n.overseer_shutdown.take();
    drop(gate);
    let mut busy = 0;
    while busy < 2 {
        if n.expect_error(ErrorCode::StopFailure).reason == "instance_busy" {
            busy += 1;
        }
    }
    n.shutdown();
}

/// A private tmpfs mounted on `path`, made read-only on demand (a full or
/// failing disk); unmounted on drop.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(path: &std::path::Path) -> Mount {
        std::fs::create_dir_all(path).expect("mount point");
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                "size=16m",
                "ciao-test",
                &path.to_string_lossy(),
            ])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "mount -t tmpfs on {} failed (needs root)",
            path.display()
        );
        Mount(path.to_path_buf())
    }

    fn set_read_only(&self, ro: bool) {
        let opt = if ro { "remount,ro" } else { "remount,rw" };
        let ok = std::process::Command::new("mount")
            .args(["-o", opt, &self.0.to_string_lossy()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mount -o {opt} {} failed", self.0.display());
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .args(["-l", &self.0.to_string_lossy()])
            .status();
    }
}

/// Defect: with `instances/` read-only, DELETE sent InstanceDeleted and STOP
/// showed `exited`, yet after a restart both came back running. Now nothing
/// is told that is not on disk.
#[test]
fn nothing_is_confirmed_that_did_not_reach_the_disk() {
    let dir = tmpdir();
    let mount = Mount::tmpfs(&dir.join("instances"));
    let sim = SimControl::new();
    let (a, b) = (uuid_n(63), uuid_n(64));
    {
        let mut n = TestNode::start_in(Profile::P2016, limits(8), dir.clone(), sim.clone());
        n.start_instance(&a);
        n.start_instance(&b);
        n.wait_state(&a, InstanceState::Running);
        n.wait_state(&b, InstanceState::Running);
        mount.set_read_only(true);
        n.command(Command::Stop, commands::stop_payload(&a, NODE));
        assert_eq!(
            n.expect_error(ErrorCode::StopFailure).reason,
            "state_failure"
        );
        assert!(
            sim.is_running(&a),
            "stopped although the stop was not recorded"
        );
        n.command(
            Command::Delete,
            commands::delete_payload(Profile::P2016, &b, NODE, false),
        );
        assert_eq!(
            n.expect_error(ErrorCode::DeleteFailure).reason,
            "state_failure"
        );
        let (_, stats) = n.tick();
        let state_of = |id: &str| {
            stats
                .instances
                .iter()
                .find(|i| i.instance_uuid == id)
                .map(|i| i.state.clone())
        };
        assert_eq!(state_of(&a).as_deref(), Some("running"));
        // B was ended before its state could not be removed: it is kept,
        // exited, and a later DELETE tries again.
        assert_eq!(state_of(&b).as_deref(), Some("exited"));
        n.shutdown();
        n.dir = tmpdir();
    }
    mount.set_read_only(false);
    let mut n = TestNode::start_in(Profile::P2016, limits(8), dir.clone(), sim.clone());
    n.wait_state(&a, InstanceState::Running);
    n.wait_state(&b, InstanceState::Exited);
    n.command(
        Command::Delete,
        commands::delete_payload(Profile::P2016, &b, NODE, false),
    );
    n.expect(Operation::Event(Event::InstanceDeleted));
    n.wait_gone(&b);
    n.shutdown();
    drop(mount);
}

/// Defect: a kill during a START left a directory without a state (and a
/// temporary file); recovery skipped it forever and the id was blocked
/// (START: instance_exists, DELETE: no_instance). Recovery removes it.
#[test]
fn recovery_removes_what_an_interrupted_start_left() {
    let dir = tmpdir();
    let id = uuid_n(65);
    let inst = dir.join("instances").join(&id);
    std::fs::create_dir_all(&inst).expect("instance dir");
    std::fs::write(inst.join(".state.tmp-0123"), vec![b'x'; 4096]).expect("temp");
    let kept = uuid_n(66);
    let kept_dir = dir.join("instances").join(&kept);
    std::fs::create_dir_all(&kept_dir).expect("dir");
    let mut n = TestNode::start_in(Profile::P2016, limits(8), dir, SimControl::new());
    assert!(!inst.exists(), "the stateless directory is still there");
    assert!(!kept_dir.exists());
    n.start_instance(&id);
    n.wait_state(&id, InstanceState::Running);
    n.command(
        Command::Delete,
        commands::delete_payload(Profile::P2016, &id, NODE, false),
    );
    n.expect(Operation::Event(Event::InstanceDeleted));
}

/// Defect: a truncated state file came back with defaults (a stopped
/// instance running). It is now refused, reported and left in place.
#[test]
fn truncated_state_is_not_recovered_with_defaults() {
    let dir = tmpdir();
    let sim = SimControl::new();
    let id = uuid_n(67);
    {
        let mut n = TestNode::start_in(Profile::P2016, limits(8), dir.clone(), sim.clone());
        n.start_instance(&id);
        n.wait_state(&id, InstanceState::Running);
        n.command(Command::Stop, commands::stop_payload(&id, NODE));
        n.wait_state(&id, InstanceState::Exited);
        n.shutdown();
        n.dir = tmpdir();
    }
    let path = dir.join("instances").join(&id).join("state");
    let whole = std::fs::read(&path).expect("state");
    std::fs::write(&path, &whole[..whole.len() - 40]).expect("truncate");
    let mut n = TestNode::start_in(Profile::P2016, limits(8), dir, sim);
    assert!(n.list().is_empty(), "{:?}", n.list());
    assert_eq!(
        std::fs::read(&path).expect("kept"),
        whole[..whole.len() - 40]
    );
    n.start_instance(&id);
    assert_eq!(
        n.expect_error(ErrorCode::StartFailure).reason,
        "instance_exists"
    );
}

/// Sizes of zero, or beyond the node, are refused before any work.
#[test]
fn insane_sizes_are_invalid_data() {
    let mut n = TestNode::start(Profile::P2018, limits(8));
    let cases: [(u32, u64); 3] = [(0, 370), (2, 0), (100_000, 370)];
    for (i, (vcpus, mem_mb)) in cases.into_iter().enumerate() {
        let id = uuid_n(70 + i as u32);
        let mut req = request(&id);
        req.vcpus = vcpus;
        req.mem_mb = mem_mb;
        n.command(Command::Start, start_payload(Profile::P2018, &req));
        let e = n.expect_error(ErrorCode::StartFailure);
        assert_eq!(
            (e.instance_uuid.as_str(), e.reason.as_str()),
            (id.as_str(), "invalid_data"),
            "vcpus {vcpus}, mem_mb {mem_mb}"
        );
    }
    let mut req = request(&uuid_n(73));
    req.mem_mb = 2_000_000; // more than the node's 1 000 000 MB
    n.command(Command::Start, start_payload(Profile::P2018, &req));
    assert_eq!(
        n.expect_error(ErrorCode::StartFailure).reason,
        "invalid_data"
    );
    assert!(n.list().is_empty());
    assert_eq!(
        std::fs::read_dir(n.dir.join("instances"))
            .expect("dir")
            .count(),
        0
    );
}

/// An error frame for an invalid id carries the id as received.
#[test]
fn invalid_ids_come_back_as_received() {
    let mut n = TestNode::start(Profile::P2016, limits(8));
    n.command(Command::Stop, commands::stop_payload("not-a-uuid", NODE));
    let e = n.expect_error(ErrorCode::StopFailure);
    assert_eq!(
        (e.instance_uuid.as_str(), e.reason.as_str()),
        ("not-a-uuid", "invalid_data")
    );
    let mut req = request("x-1");
    req.instance_uuid = "x-1".into();
    n.command(Command::Start, start_payload(Profile::P2016, &req));
    let e = n.expect_error(ErrorCode::StartFailure);
    assert_eq!(
        (e.instance_uuid.as_str(), e.reason.as_str()),
        ("x-1", "invalid_data")
    );
}

/// The status file, driven deterministically: contents after connect, a
/// START, a refused command and a disconnect; the rate limit on a manual
/// clock (a change within a second of the last write waits for the timer);
/// nothing rewritten while idle.
#[test]
fn status_file_follows_the_node_at_most_once_a_second() {
    let clock = ManualClock::new(Instant::now());
    let mut n = TestNode::start_keeping_status(Profile::P2016, &clock);
    let f = n.status_file();
    assert_eq!(f.get("connected"), Some("no"));
    assert_eq!(f.get("node-uuid"), Some(NODE));
    assert_eq!(f.get("scheduler"), Some("192.0.2.1:8888"));
    assert_eq!(f.get("status"), Some("READY"));
    assert_eq!(f.get("instances"), Some("0"));
    assert_eq!(f.get("last-error"), Some("none"));
    let started = f.time("since").expect("since");

    // Connected within the second of the first write: not written yet.
    n.connected();
    n.expect(Operation::Command(Command::Stats));
    assert_eq!(n.status_file().get("connected"), Some("no"));
    // The second passes: the timer fires and the file says so.
    clock.advance(Duration::from_secs(1));
    let f = n.status_file();
    assert_eq!(f.get("connected"), Some("yes"));
    assert!(f.time("since").expect("since") >= started);

    clock.advance(Duration::from_secs(1));
    let id = uuid_n(1);
    n.start_instance(&id);
    n.wait_state(&id, InstanceState::Running);
    // Admitted (pending) was written at once; running came within the
    // same second, so it waits for the timer.
    let f = n.status_file();
    assert_eq!(f.get("pending"), Some("1"), "{f:?}");
    clock.advance(Duration::from_secs(1));
    let f = n.status_file();
    assert_eq!(f.get("instances"), Some("1"), "{f:?}");
    assert_eq!(f.get("running"), Some("1"), "{f:?}");
    assert_eq!(f.get("pending"), Some("0"), "{f:?}");

    // Idle: stats ticks and time passing rewrite nothing.
    use std::os::unix::fs::MetadataExt;
    let inode = || {
        std::fs::metadata(n.dir.join("status"))
            .expect("status")
            .ino()
    };
    let before = inode();
    for _ in 0..3 {
        clock.advance(Duration::from_secs(10));
        n.tick();
    }
    n.barrier();
    assert_eq!(inode(), before, "rewritten while nothing changed");

    // A refused command is the last error.
    clock.advance(Duration::from_secs(1));
    let unknown = uuid_n(2);
    n.command(
        Command::Delete,
        commands::delete_payload(Profile::P2016, &unknown, NODE, false),
    );
    n.expect_error(ErrorCode::DeleteFailure);
    let f = n.status_file();
    let e = f.get("last-error").expect("last-error");
    assert!(e.contains(&unknown) && e.contains("no_instance"), "{e}");
    assert!(f.get("last-error-at").is_some());

    clock.advance(Duration::from_secs(1));
    n.server.event(ClientEvent::Disconnected {
        reason: "connection reset by peer".into(),
        unsent: Vec::new(),
    });
    let f = n.status_file();
    assert_eq!(f.get("connected"), Some("no"));
    assert_eq!(
        f.get("last-error"),
        Some("disconnected from the scheduler: connection reset by peer")
    );
    assert_eq!(f.get("running"), Some("1"), "the instance runs on");
}
