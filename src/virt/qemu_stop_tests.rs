//! The stop escalation of a VM (`Watch::run`: power-down → quit → SIGKILL)
//! against a fake QMP peer: a unix socket this test serves, speaking the
//! greeting, `qmp_capabilities` and a `return` to every command, with a
//! real child process (`sleep`) standing in for QEMU's. Time is a manual
//! clock: the test sets it and ticks the monitor's timer, so no step waits
//! for real time and every wait below has a deadline.
//!
//! (The monitor is handed a connection made here, with the child's pid: the
//! peer's credentials would name this test process.)

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::AtomicI32;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use serde_json::Value;

use super::{MonCmd, StopClock, Watch};
use crate::nodestats::process_identity;
use crate::virt::MonitorEvent;
use crate::virt::qmp::Qmp;

/// How long any one expected thing may take.
const DEADLINE: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The fake QEMU: a `sleep` process for its pid, and the QMP peer.
struct FakeVm {
    dir: PathBuf,
    child: Option<Child>,
    pid: i32,
    /// The peer's write side: events are written here, and shut down to
    /// close the connection.
    peer: Arc<Mutex<UnixStream>>,
    /// Every command the monitor executed, in order.
    commands: Receiver<String>,
    /// The monitor thread's ends.
    cmds: Option<Sender<MonCmd>>,
    events: Receiver<MonitorEvent>,
    now: Arc<Mutex<Instant>>,
    ticks: Sender<Instant>,
    t0: Instant,
    monitor: Option<thread::JoinHandle<()>>,
}

impl FakeVm {
    /// Serves the socket, connects to it as the instance thread does and
    /// starts the monitor thread on that connection.
    fn start() -> FakeVm {
        let dir = std::env::temp_dir().join(format!("ciao-qmp-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("qmp.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let child = Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("sleep(1) stands in for QEMU's process");
        let pid = i32::try_from(child.id()).unwrap();

        let (accepted_tx, accepted) = crossbeam_channel::bounded(1);
        let (commands_tx, commands) = crossbeam_channel::unbounded();
        thread::spawn(move || serve(&listener, &accepted_tx, &commands_tx));
        let qmp = Qmp::connect(&socket, DEADLINE, "fake").expect("QMP handshake with the fake");
        let peer = accepted.recv_timeout(DEADLINE).expect("the peer accepted");
        assert_eq!(
            commands.recv_timeout(DEADLINE).as_deref(),
            Ok("qmp_capabilities")
        );

        let t0 = Instant::now();
        let now = Arc::new(Mutex::new(t0));
        // A rendezvous: a tick is sent once the monitor takes it.
        let (ticks, ticks_rx) = crossbeam_channel::bounded(0);
        let w = Watch {
            name: "fake-vm".into(),
            short: "fake".into(),
            socket,
            pidfile: dir.join("qemu.pid"),
            pid: Arc::new(AtomicI32::new(pid)),
            stop_timeout: STOP_TIMEOUT,
            boot: false,
            clock: StopClock::Manual {
                now: Arc::clone(&now),
                ticks: ticks_rx,
            },
        };
        let identity = process_identity(std::path::Path::new("/proc"), pid);
        assert!(identity.is_some(), "the stand-in process runs");
        let (cmds, cmds_rx) = crossbeam_channel::bounded(4);
        let (events_tx, events) = crossbeam_channel::unbounded();
        let monitor =
            thread::spawn(move || w.run(Some((qmp, Some(pid), identity)), &events_tx, &cmds_rx));
        FakeVm {
            dir,
            child: Some(child),
            pid,
            peer: Arc::new(Mutex::new(peer)),
            commands,
            cmds: Some(cmds),
            events,
            now,
            ticks,
            t0,
            monitor: Some(monitor),
        }
    }

    fn send(&self, c: MonCmd) {
        self.cmds.as_ref().unwrap().send(c).unwrap();
    }

    /// Sets the clock to `t0 + at` and fires the monitor's timer (returns
    /// once the monitor has taken the tick).
    fn tick(&self, at: Duration) {
        let t = self.t0 + at;
        *self.now.lock().unwrap() = t;
        if self.ticks.send_timeout(t, DEADLINE).is_err() {
            panic!("the monitor's timer was not armed at {at:?}");
        }
    }

    /// Returns once the monitor has handled everything before: a volume
    /// attach (two QMP commands, answered) round trip, which it handles after
    /// the tick or command it is busy with.
    fn sync(&self) {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.send(MonCmd::Attach {
            id: "00000000-0000-4000-8000-000000000001".into(),
            path: self.dir.join("vol"),
            format: "raw".into(),
            reply,
        });
        let r = answer.recv_timeout(DEADLINE).expect("attach answered");
        assert!(r.is_ok(), "{r:?}");
        self.expect_command("blockdev-add");
        self.expect_command("device_add");
    }

    fn expect_command(&self, want: &str) {
        match self.commands.recv_timeout(DEADLINE) {
            Ok(c) => assert_eq!(c, want),
            Err(_) => panic!("the monitor did not send {want} within {DEADLINE:?}"),
        }
    }

    /// A QMP event from "QEMU".
    fn event(&self, name: &str, data: &Value) {
        let line = serde_json::json!({
            "timestamp": {"seconds": 1, "microseconds": 0},
            "event": name,
            "data": data,
        });
        let mut p = self.peer.lock().unwrap();
        writeln!(p, "{line}").unwrap();
    }

    /// "QEMU" exits: its process ends (reaped here), then its socket closes.
    fn exit(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.close();
    }

    /// The socket closes (the process is left as it is).
    fn close(&self) {
        let _ = self.peer.lock().unwrap().shutdown(Shutdown::Both);
    }

    /// Waits (bounded) for the stand-in process to be killed by the monitor.
    fn expect_killed(&mut self) {
        let mut child = self.child.take().expect("the process still ours");
        let (done_tx, done) = crossbeam_channel::bounded(1);
        let pid = self.pid;
        thread::spawn(move || {
            let _ = done_tx.send(child.wait().map(|s| (s, child)));
        });
        match done.recv_timeout(DEADLINE) {
            Ok(Ok((status, _))) => {
                use std::os::unix::process::ExitStatusExt;
                assert_eq!(status.signal(), Some(9), "SIGKILL, {status:?}");
            }
            Ok(Err(e)) => panic!("wait for {pid}: {e}"),
            Err(_) => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                panic!("the monitor did not kill pid {pid} within {DEADLINE:?}");
            }
        }
    }

    fn expect_exited(&self) -> String {
        match self.events.recv_timeout(DEADLINE) {
            Ok(MonitorEvent::Exited(why)) => why,
            Ok(other) => panic!("expected Exited, got {other:?}"),
            Err(_) => panic!("no Exited within {DEADLINE:?}"),
        }
    }

    /// The monitor thread has ended; nothing else was sent or reported.
    fn finish(mut self) {
        let monitor = self.monitor.take().unwrap();
        let (done_tx, done) = crossbeam_channel::bounded(1);
        thread::spawn(move || {
            let _ = done_tx.send(monitor.join().is_ok());
        });
        assert_eq!(
            done.recv_timeout(DEADLINE),
            Ok(true),
            "monitor ended cleanly"
        );
        let rest: Vec<String> = self.commands.try_iter().collect();
        assert!(rest.is_empty(), "nothing more sent: {rest:?}");
        assert!(self.events.try_recv().is_err(), "nothing more reported");
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        self.cmds.take();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.close();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The peer: one connection; the greeting, then a `return` to every command
/// (forwarding its name), until the connection closes.
fn serve(listener: &UnixListener, accepted: &Sender<UnixStream>, commands: &Sender<String>) {
    let Ok((stream, _)) = listener.accept() else {
        return;
    };
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": []}}"#;
    if writeln!(writer, "{greeting}").is_err() {
        return;
    }
    let Ok(events_side) = stream.try_clone() else {
        return;
    };
    let _ = accepted.send(events_side);
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let Some(cmd) = v.get("execute").and_then(Value::as_str) else {
            continue;
        };
        if writeln!(writer, r#"{{"return": {{}}}}"#).is_err() {
            return;
        }
        let _ = commands.send(cmd.to_string());
    }
}

/// Power-down answered but the VM does not go: again every 2 s, `quit` at
/// the stop timeout, SIGKILL when that is not obeyed within 5 s.
#[test]
fn powerdown_ignored_then_quit_ignored_then_kill() {
    let mut vm = FakeVm::start();
    vm.send(MonCmd::Stop);
    vm.expect_command("system_powerdown");
    vm.tick(Duration::from_secs(2));
    vm.expect_command("system_powerdown");
    // A second STOP changes nothing.
    vm.send(MonCmd::Stop);
    vm.sync();
    vm.tick(STOP_TIMEOUT);
    vm.expect_command("quit");
    // Not due yet: nothing happens, the process lives.
    vm.tick(STOP_TIMEOUT + Duration::from_millis(4900));
    vm.sync();
    assert!(process_identity(std::path::Path::new("/proc"), vm.pid).is_some());
    vm.tick(STOP_TIMEOUT + Duration::from_secs(5));
    vm.expect_killed();
    // The killed process's socket closes.
    vm.close();
    assert_eq!(vm.expect_exited(), "QEMU killed");
    vm.finish();
}

/// The guest obeys the power button: no quit, no kill.
#[test]
fn powerdown_obeyed() {
    let mut vm = FakeVm::start();
    vm.send(MonCmd::Stop);
    vm.expect_command("system_powerdown");
    vm.event(
        "SHUTDOWN",
        &serde_json::json!({"guest": true, "reason": "guest-shutdown"}),
    );
    vm.exit();
    assert_eq!(vm.expect_exited(), "the guest powered off");
    vm.finish();
}

/// The guest ignores the power button; QEMU obeys `quit`: no kill.
#[test]
fn quit_after_the_stop_timeout_obeyed() {
    let mut vm = FakeVm::start();
    vm.send(MonCmd::Stop);
    vm.expect_command("system_powerdown");
    vm.tick(STOP_TIMEOUT);
    vm.expect_command("quit");
    // QEMU reports its own quit as a SHUTDOWN that the guest did not ask for.
    vm.event(
        "SHUTDOWN",
        &serde_json::json!({"guest": false, "reason": "host-qmp-quit"}),
    );
    vm.exit();
    assert_eq!(vm.expect_exited(), "QEMU quit");
    vm.finish();
}

/// DELETE: `quit` at once, also in the middle of a power-down.
#[test]
fn delete_quits_at_once() {
    let mut vm = FakeVm::start();
    vm.send(MonCmd::Stop);
    vm.expect_command("system_powerdown");
    vm.send(MonCmd::Kill);
    vm.expect_command("quit");
    vm.exit();
    assert_eq!(vm.expect_exited(), "QEMU quit");
    vm.finish();
}

/// The instance thread lets go of the monitor: QEMU runs on, untouched.
#[test]
fn detach_leaves_the_vm_alone() {
    let mut vm = FakeVm::start();
    vm.cmds.take();
    let monitor = vm.monitor.take().unwrap();
    let (done_tx, done) = crossbeam_channel::bounded(1);
    thread::spawn(move || {
        let _ = done_tx.send(monitor.join().is_ok());
    });
    assert_eq!(done.recv_timeout(DEADLINE), Ok(true));
    assert!(vm.commands.try_recv().is_err(), "nothing sent");
    assert!(vm.events.try_recv().is_err(), "nothing reported");
    assert!(
        process_identity(std::path::Path::new("/proc"), vm.pid).is_some(),
        "still running"
    );
    vm.exit();
}
