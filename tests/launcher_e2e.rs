//! The real `ciao-launcher` binary against the real `ciao-lc serve` over TLS
//! on 127.0.0.1, driven with the real `ciao-lc` commands (simulated
//! instances). Every process is started by this test and stopped by PID;
//! every wait is bounded polling of `ciao-lc list`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

const LAUNCHER: &str = env!("CARGO_BIN_EXE_ciao-launcher");
const LC: &str = env!("CARGO_BIN_EXE_ciao-lc");
const WAIT: Duration = Duration::from_secs(20);

/// A child process killed (SIGKILL) and reaped when dropped.
struct Proc {
    child: Child,
    name: &'static str,
}

impl Proc {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status within `within`.
    fn terminate(mut self, within: Duration) -> Option<i32> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            eprintln!("stopping {} (pid {})", self.name, self.child.id());
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

struct Env {
    dir: PathBuf,
}

impl Env {
    fn new() -> Env {
        let dir = std::env::temp_dir().join(format!("ciao-e2e-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("tmpdir");
        let out = Command::new(LC)
            .arg("certs")
            .arg("--dir")
            .arg(dir.join("certs"))
            .output()
            .expect("certs");
        assert!(out.status.success(), "{out:?}");
        Env { dir }
    }

    fn certs(&self) -> PathBuf {
        self.dir.join("certs")
    }

    /// Starts `ciao-lc serve` and returns it with the address it listens on.
    fn serve(&self, listen: &str, profile: &str) -> (Proc, SocketAddr) {
        let mut child = Command::new(LC)
            .args([
                "serve",
                "--listen",
                listen,
                "--protocol",
                profile,
                "--certs",
            ])
            .arg(self.certs())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("serve");
        let stdout = child.stdout.take().expect("stdout");
        let lines = lines_of(stdout);
        let first = lines.recv_timeout(WAIT).expect("serve prints its address");
        let addr = first
            .split_whitespace()
            .skip_while(|w| *w != "on")
            .nth(1)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {first:?}"));
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines.iter() {});
        (
            Proc {
                child,
                name: "ciao-lc serve",
            },
            addr,
        )
    }

    fn launcher(&self, server: SocketAddr, profile: &str) -> Proc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("launcher.log"))
            .expect("log");
        let child = Command::new(LAUNCHER)
            .arg("-cacert")
            .arg(self.certs().join("CAcert.pem"))
            .arg("-cert")
            .arg(self.certs().join("cert-CNAgent.pem"))
            .arg(format!("-server={server}"))
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args([
                "-simulation",
                "--protocol",
                profile,
                "--stats-interval",
                "1",
                "--disk-limit=false",
                "-logtostderr",
            ])
            .stderr(log)
            .spawn()
            .expect("launcher");
        Proc {
            child,
            name: "ciao-launcher",
        }
    }

    fn lc(&self, args: &[&str]) -> Output {
        Command::new(LC)
            .args(args)
            .arg("--certs")
            .arg(self.certs())
            .output()
            .expect("ciao-lc")
    }

    fn lc_ok(&self, args: &[&str]) -> String {
        let out = self.lc(args);
        assert!(
            out.status.success(),
            "ciao-lc {args:?}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// (instance, state) from `ciao-lc list`.
    fn list(&self) -> Vec<(String, String)> {
        let out = self.lc(&["list"]);
        if !out.status.success() {
            return Vec::new();
        }
        let mut v: Vec<_> = text(&out.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                (w.len() >= 3).then(|| (w[1].to_string(), w[2].to_string()))
            })
            .collect();
        v.sort();
        v
    }

    /// Polls `ciao-lc list` until `want` holds (bounded).
    fn wait_list(
        &self,
        what: &str,
        want: impl Fn(&[(String, String)]) -> bool,
    ) -> Vec<(String, String)> {
        let deadline = Instant::now() + WAIT;
        loop {
            let l = self.list();
            if want(&l) {
                return l;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; last list: {l:?}\nlauncher log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_connected(&self) {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            let out = self.lc(&["stats"]);
            if out.status.success() && text(&out.stdout).lines().count() > 1 {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the launcher never connected\n{}", self.log());
    }

    fn start(&self) -> String {
        let out = self.lc_ok(&["start", "--sim", "--vcpus", "2", "--mem-mb", "256"]);
        out.split_whitespace()
            .nth(1)
            .expect("instance id")
            .to_string()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("launcher.log")).unwrap_or_default()
    }

    fn instance_dirs(&self) -> usize {
        std::fs::read_dir(self.dir.join("data/instances")).map_or(0, |d| d.count())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn lines_of(r: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

fn state_of<'a>(l: &'a [(String, String)], id: &str) -> Option<&'a str> {
    l.iter().find(|(i, _)| i == id).map(|(_, s)| s.as_str())
}

#[test]
fn lifecycle_through_ciao_lc_2016() {
    let env = Env::new();
    let (_serve, addr) = env.serve("127.0.0.1:0", "2016");
    let launcher = env.launcher(addr, "2016");
    env.wait_connected();

    let id = env.start();
    env.wait_list("running", |l| state_of(l, &id) == Some("running"));
    env.lc_ok(&["stop", &id]);
    env.wait_list("exited", |l| state_of(l, &id) == Some("exited"));
    env.lc_ok(&["restart", &id]);
    env.wait_list("running again", |l| state_of(l, &id) == Some("running"));
    let stats = env.lc_ok(&["stats"]);
    assert!(stats.contains("READY"), "{stats}");
    env.lc_ok(&["delete", &id]);
    env.wait_list("deleted", |l| state_of(l, &id).is_none());
    assert_eq!(env.instance_dirs(), 0);

    // SIGTERM: exit status 0, well within a second.
    let t = Instant::now();
    assert_eq!(launcher.terminate(Duration::from_secs(5)), Some(0));
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

#[test]
fn kill9_mid_way_and_restart_finds_every_instance_once() {
    let env = Env::new();
    let (_serve, addr) = env.serve("127.0.0.1:0", "2016");
    let launcher = env.launcher(addr, "2016");
    env.wait_connected();
    let ids: Vec<String> = (0..5).map(|_| env.start()).collect();
    env.wait_list("5 running", |l| {
        ids.iter().all(|i| state_of(l, i) == Some("running"))
    });
    env.lc_ok(&["stop", &ids[0]]);
    env.wait_list("one exited", |l| state_of(l, &ids[0]) == Some("exited"));
    let before = env.list();

    launcher.kill9();
    let _launcher = env.launcher(addr, "2016");
    let after = env.wait_list("all back", |l| l.len() == 5 && l == before.as_slice());
    assert_eq!(
        after, before,
        "same instances, same states, none duplicated"
    );
    assert_eq!(env.instance_dirs(), 5);
    // And they are still under control.
    env.lc_ok(&["delete", &ids[1]]);
    env.wait_list("one deleted", |l| l.len() == 4);
}

#[test]
fn scheduler_goes_away_and_comes_back() {
    let env = Env::new();
    let (serve, addr) = env.serve("127.0.0.1:0", "2018");
    let _launcher = env.launcher(addr, "2018");
    env.wait_connected();
    let ids: Vec<String> = (0..3).map(|_| env.start()).collect();
    env.wait_list("3 active", |l| {
        ids.iter().all(|i| state_of(l, i) == Some("active"))
    });

    serve.kill9();
    let (_serve, _) = env.serve(&addr.to_string(), "2018");
    // Reconnected (backoff 1–5 s first), STATS resume with every instance.
    env.wait_list("instances reported again", |l| {
        ids.iter().all(|i| state_of(l, i) == Some("active"))
    });
    assert_eq!(env.instance_dirs(), 3);
    assert!(
        env.log().contains("disconnected from the scheduler"),
        "{}",
        env.log()
    );
}

#[test]
fn second_launcher_on_the_same_data_dir_is_refused() {
    let env = Env::new();
    let (_serve, addr) = env.serve("127.0.0.1:0", "2016");
    let _first = env.launcher(addr, "2016");
    env.wait_connected();
    let out = Command::new(LAUNCHER)
        .arg("-cacert")
        .arg(env.certs().join("CAcert.pem"))
        .arg("-cert")
        .arg(env.certs().join("cert-CNAgent.pem"))
        .arg("--data-dir")
        .arg(env.dir.join("data"))
        .arg("-simulation")
        .output()
        .expect("second launcher");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text(&out.stderr).contains("another launcher"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn hard_reset_removes_every_instance() {
    let env = Env::new();
    let (_serve, addr) = env.serve("127.0.0.1:0", "2016");
    let launcher = env.launcher(addr, "2016");
    env.wait_connected();
    for _ in 0..3 {
        env.start();
    }
    env.wait_list("3 instances", |l| l.len() == 3);
    assert_eq!(launcher.terminate(Duration::from_secs(5)), Some(0));
    let out = Command::new(LAUNCHER)
        .args(["-hard-reset", "--data-dir"])
        .arg(env.dir.join("data"))
        .output()
        .expect("hard reset");
    assert!(out.status.success(), "{out:?}");
    assert!(
        text(&out.stdout).contains("removed 3 instance(s)"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(env.instance_dirs(), 0);
}
