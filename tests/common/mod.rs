//! Harness shared by the integration tests: real processes started by the
//! tests and stopped by PID ([`Proc`], [`Env`]), and a private dockerd shared
//! by the tests of one binary ([`engine`]).
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

pub const LAUNCHER: &str = env!("CARGO_BIN_EXE_ciao-launcher");
pub const LC: &str = env!("CARGO_BIN_EXE_ciao-lc");
pub const WAIT: Duration = Duration::from_secs(20);

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    child: Child,
    name: &'static str,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status within `within`.
    pub fn terminate(mut self, within: Duration) -> Option<i32> {
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

pub struct Env {
    pub dir: PathBuf,
    /// Run `serve` and the launcher in this network namespace (`ip netns
    /// exec`, which keeps the PID); `ciao-lc` reaches `serve` through its
    /// unix control socket from anywhere.
    pub netns: Option<String>,
}

/// `program`, inside `netns` when given.
fn command_in(netns: &Option<String>, program: &str) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => Command::new(program),
    }
}

impl Env {
    pub fn new() -> Env {
        // Short: a VM's QMP socket path inside must fit a unix socket (107 bytes).
        let id = uuid::Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("ciao-{}", &id[..12]));
        std::fs::create_dir_all(&dir).expect("tmpdir");
        let out = Command::new(LC)
            .arg("certs")
            .arg("--dir")
            .arg(dir.join("certs"))
            .output()
            .expect("certs");
        assert!(out.status.success(), "{out:?}");
        Env { dir, netns: None }
    }

    /// An environment whose `serve` and launchers run in namespace `netns`.
    pub fn in_netns(netns: &str) -> Env {
        let mut env = Env::new();
        env.netns = Some(netns.to_string());
        env
    }

    pub fn certs(&self) -> PathBuf {
        self.dir.join("certs")
    }

    /// Starts `ciao-lc serve` and returns it with the address it listens on.
    pub fn serve(&self, listen: &str, profile: &str) -> (Proc, SocketAddr) {
        self.serve_with(listen, profile, &[])
    }

    /// [`Env::serve`] with `extra` flags (e.g. `--verbose`: every frame's
    /// payload in [`Env::serve_log`]).
    pub fn serve_with(&self, listen: &str, profile: &str, extra: &[&str]) -> (Proc, SocketAddr) {
        let mut child = command_in(&self.netns, LC)
            .args([
                "serve",
                "--listen",
                listen,
                "--protocol",
                profile,
                "--certs",
            ])
            .arg(self.certs())
            .args(extra)
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
        // Keep draining its output (into serve.log: what the scheduler
        // side saw, e.g. events) so it never blocks on a full pipe.
        let path = self.dir.join("serve.log");
        std::thread::spawn(move || {
            use std::io::Write;
            let mut log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok();
            for l in lines.iter() {
                if let Some(f) = log.as_mut() {
                    let _ = writeln!(f, "{l}");
                }
            }
        });
        (
            Proc {
                child,
                name: "ciao-lc serve",
            },
            addr,
        )
    }

    pub fn launcher(&self, server: SocketAddr, profile: &str) -> Proc {
        self.launcher_with(server, profile, &["-simulation"])
    }

    /// A launcher with `extra` flags instead of `-simulation`.
    pub fn launcher_with(&self, server: SocketAddr, profile: &str, extra: &[&str]) -> Proc {
        self.launcher_env(server, profile, extra, &[])
    }

    /// [`Env::launcher_with`] with `env` added to its environment.
    pub fn launcher_env(
        &self,
        server: SocketAddr,
        profile: &str,
        extra: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Proc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("launcher.log"))
            .expect("log");
        let child = command_in(&self.netns, LAUNCHER)
            .arg("-cacert")
            .arg(self.certs().join("CAcert.pem"))
            .arg("-cert")
            .arg(self.certs().join("cert-CNAgent.pem"))
            .arg(format!("-server={server}"))
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(extra)
            .args([
                "--protocol",
                profile,
                "--stats-interval",
                "1",
                "--disk-limit=false",
                "-logtostderr",
            ])
            .envs(env.iter().copied())
            .stderr(log)
            .spawn()
            .expect("launcher");
        Proc {
            child,
            name: "ciao-launcher",
        }
    }

    pub fn lc(&self, args: &[&str]) -> Output {
        Command::new(LC)
            .args(args)
            .arg("--certs")
            .arg(self.certs())
            .output()
            .expect("ciao-lc")
    }

    pub fn lc_ok(&self, args: &[&str]) -> String {
        let out = self.lc(args);
        assert!(
            out.status.success(),
            "ciao-lc {args:?}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// The connected node's UUID, as `ciao-lc stats` shows it (first column
    /// of the first row under the heading).
    pub fn node_uuid(&self) -> String {
        let stats = self.lc_ok(&["stats"]);
        stats
            .lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("no node in ciao-lc stats:\n{stats}"))
            .to_string()
    }

    /// (instance, state) from `ciao-lc list`.
    pub fn list(&self) -> Vec<(String, String)> {
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
    pub fn wait_list(
        &self,
        what: &str,
        want: impl Fn(&[(String, String)]) -> bool,
    ) -> Vec<(String, String)> {
        self.wait_list_within(WAIT, what, want)
    }

    /// [`Env::wait_list`] with its own bound.
    pub fn wait_list_within(
        &self,
        limit: Duration,
        what: &str,
        want: impl Fn(&[(String, String)]) -> bool,
    ) -> Vec<(String, String)> {
        let deadline = Instant::now() + limit;
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

    pub fn wait_connected(&self) {
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

    /// The address the (single) connected launcher's session comes from,
    /// per `ciao-lc stats`.
    pub fn peer(&self) -> Option<String> {
        let out = self.lc(&["stats"]);
        let t = text(&out.stdout);
        let line = t.lines().nth(1)?;
        line.split_whitespace().nth(2).map(str::to_string)
    }

    /// Waits until the launcher is connected again through a new session
    /// (not `old`): after a restart, the scheduler may still show the dead
    /// launcher's last session and STATS for a moment.
    pub fn wait_reconnected(&self, old: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            if self.peer().is_some_and(|p| p != old) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the launcher did not reconnect\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `ciao-lc node-status` on this environment's data directory.
    pub fn node_status(&self) -> Output {
        Command::new(LC)
            .arg("node-status")
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .output()
            .expect("ciao-lc node-status")
    }

    /// Polls `ciao-lc node-status` until `want` holds of its `key: value`
    /// lines (bounded); returns them.
    pub fn wait_node_status(
        &self,
        what: &str,
        want: impl Fn(&HashMap<String, String>) -> bool,
    ) -> HashMap<String, String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let out = self.node_status();
            let fields: HashMap<String, String> = text(&out.stdout)
                .lines()
                .filter_map(|l| l.split_once(": "))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            if out.status.success() && want(&fields) {
                return fields;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for node-status to show {what}: {}{}\nlauncher log:\n{}",
                    text(&out.stdout),
                    text(&out.stderr),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn start(&self) -> String {
        let out = self.lc_ok(&["start", "--sim", "--vcpus", "2", "--mem-mb", "256"]);
        out.split_whitespace()
            .nth(1)
            .expect("instance id")
            .to_string()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("launcher.log")).unwrap_or_default()
    }

    /// Installs the test guest as backing image `uuid` of this data directory.
    pub fn install_guest(&self, uuid: &str) {
        let images = self.dir.join("data/images");
        std::fs::create_dir_all(&images).expect("images dir");
        std::fs::copy(guest_image(), images.join(uuid)).expect("install the guest image");
    }

    /// The serial console of VM `id` so far (CR LF made LF).
    pub fn console(&self, id: &str) -> String {
        std::fs::read_to_string(self.dir.join("data/instances").join(id).join("console.log"))
            .unwrap_or_default()
            .replace('\r', "")
    }

    /// Waits (bounded by `limit`) until `needle` is on VM `id`'s console.
    pub fn wait_console(&self, id: &str, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let c = self.console(id);
            if c.contains(needle) {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on the console of {id}:\n{c}\nlauncher log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// What `serve` printed so far (one line per event it saw).
    pub fn serve_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default()
    }

    /// Waits (bounded by `limit`) for a launcher log line containing every
    /// one of `parts`, e.g. an instance id and its error; returns the line.
    pub fn wait_log_line(&self, parts: &[&str], limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let log = self.log();
            if let Some(l) = log.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
                return l.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {parts:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn instance_dirs(&self) -> usize {
        std::fs::read_dir(self.dir.join("data/instances")).map_or(0, |d| d.count())
    }
}

impl Env {
    /// Pids of the QEMU processes of this environment's VMs (from their pid
    /// files, checked against the process's command line).
    pub fn vm_pids(&self) -> Vec<i32> {
        let Ok(dirs) = std::fs::read_dir(self.dir.join("data/instances")) else {
            return Vec::new();
        };
        let me = self.dir.to_string_lossy().into_owned();
        dirs.flatten()
            .filter_map(|d| std::fs::read_to_string(d.path().join("qemu.pid")).ok())
            .filter_map(|p| p.trim().parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&me))
            })
            .collect()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // VMs outlive the launcher: stop the ones this test started, by pid.
        for pid in self.vm_pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where `program` is found in `PATH` (as `execvp` would look), if anywhere.
pub fn in_path(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Fails the calling test at once, in one line, if a program it needs is
/// missing: `needs` is (what, alternatives…, Debian package). Every
/// alternative missing is a failure; `scripts/test.sh` installs them all
/// (`scripts/deps.sh`).
pub fn require(needs: &[(&[&str], &str)]) {
    for (programs, package) in needs {
        if programs.iter().all(|p| in_path(p).is_none()) {
            panic!(
                "{} not found in PATH: install {package} (scripts/test.sh installs every test dependency)",
                programs.join(" or ")
            );
        }
    }
}

/// The test guest, built (or found in its cache) once per test binary.
pub fn guest_image() -> &'static Path {
    static IMG: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    IMG.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/build-guest-image.sh");
        let out = Command::new("bash")
            .arg(script)
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("run build-guest-image.sh");
        assert!(
            out.status.success(),
            "scripts/build-guest-image.sh failed: the QEMU tests need the test guest"
        );
        let path = PathBuf::from(text(&out.stdout).lines().last().unwrap_or("").trim());
        assert!(path.is_file(), "no guest image at {}", path.display());
        path
    })
}

/// What the VM tests need on the host, checked before anything is built or started.
pub fn require_qemu() {
    require(&[
        (&["qemu-system-x86_64"], "qemu-system-x86"),
        (&["qemu-img"], "qemu-utils"),
        (&["xorriso", "genisoimage"], "xorriso"),
    ]);
    // The launcher's own search, so that the test and the node agree.
    if let Err(e) = ciao_launcher::virt::qemu::find_ovmf(None) {
        panic!("{e} (scripts/test.sh installs every test dependency)");
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts that a command's output (`stdout` or `stderr`) says `needle`,
/// and shows the whole output when it does not.
#[track_caller]
pub fn assert_says(output: &[u8], needle: &str) {
    let t = text(output);
    assert!(t.contains(needle), "{needle:?} not in:\n{t}");
}

pub fn lines_of(r: impl std::io::Read + Send + 'static) -> Receiver<String> {
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

pub fn state_of<'a>(l: &'a [(String, String)], id: &str) -> Option<&'a str> {
    l.iter().find(|(i, _)| i == id).map(|(_, s)| s.as_str())
}

pub const IMAGE: &str = "ciao-busybox:latest";

/// A private dockerd; stopped (and its directory removed) on drop.
#[derive(Debug)]
pub struct Engine {
    pub dir: PathBuf,
    pub socket: PathBuf,
}

impl Engine {
    /// `docker -H <this engine> args…`, its output (the CLI of the private
    /// engine, never the host's).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .output()
            .expect("docker CLI")
    }

    /// The pid of this engine's dockerd, if it runs (from its pidfile,
    /// checked against the process's command line: pids get reused).
    pub fn daemon_pid(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.dir.join("dockerd.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline)
            .contains(&*self.socket.to_string_lossy())
            .then_some(pid)
    }

    /// Stops the dockerd (SIGTERM by its pid, then waits for it to exit),
    /// leaving its containers running (it runs with --live-restore) and its
    /// directory in place, so [`Engine::start_again`] brings them back.
    pub fn stop_keeping_containers(&self) {
        let pid = self.daemon_pid().expect("dockerd is running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM dockerd");
        let deadline = Instant::now() + WAIT;
        while Path::new(&format!("/proc/{pid}")).exists() {
            assert!(Instant::now() < deadline, "dockerd {pid} did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the dockerd again on the same directory (and socket).
    pub fn start_again(&self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/start-dockerd.sh");
        let out = Command::new(script)
            .arg(&self.dir)
            .output()
            .expect("start-dockerd.sh");
        assert!(
            out.status.success(),
            "restarting dockerd: {}",
            text(&out.stderr)
        );
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Stopped by a test that then failed: its containers still run. Start
        // the engine again so that stop-dockerd.sh can remove them.
        if self.daemon_pid().is_none() && self.dir.join("root").exists() {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/start-dockerd.sh");
            let _ = Command::new(script).arg(&self.dir).output();
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/stop-dockerd.sh");
        let failure = match Command::new(&script).arg(&self.dir).output() {
            Ok(o) if o.status.success() => return,
            Ok(o) => format!(
                "stop-dockerd.sh {} failed ({}):\n{}{}",
                self.dir.display(),
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("cannot run {}: {e}", script.display()),
        };
        // Fail the test that dropped the last handle, unless it is already
        // failing (a second panic would abort the test binary).
        if thread::panicking() {
            eprintln!("{failure}");
        } else {
            panic!("{failure}");
        }
    }
}

static ENGINE: Mutex<Weak<Engine>> = Mutex::new(Weak::new());

/// The shared engine, started on first use.
pub fn engine() -> Arc<Engine> {
    // A panicking test poisons the lock but leaves the Weak intact.
    let mut slot = ENGINE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = slot.upgrade() {
        return e;
    }
    let e = Arc::new(private_engine());
    *slot = Arc::downgrade(&e);
    e
}

/// An engine of the caller's own (for tests that stop and start it).
pub fn private_engine() -> Engine {
    require(&[(&["dockerd"], "docker.io"), (&["docker"], "docker.io")]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/start-dockerd.sh");
    let started = Instant::now();
    let out = Command::new(&script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        script.display(),
        out.status
    );
    let socket = PathBuf::from(stdout.lines().last().unwrap_or("").trim());
    let dir = socket
        .parent()
        .unwrap_or_else(|| panic!("no socket path in the output of start-dockerd.sh:\n{stdout}"))
        .to_path_buf();
    assert!(
        socket.ends_with("docker.sock"),
        "start-dockerd.sh printed no socket path:\n{stdout}\n{stderr}"
    );
    eprintln!(
        "private dockerd on {} ready in {:?}\n{stderr}",
        socket.display(),
        started.elapsed()
    );
    Engine { dir, socket }
}

/// A private network namespace, deleted (with every link in it) on drop,
/// also after a failed assertion.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> Netns {
        require(&[(&["ip"], "iproute2")]);
        let out = Command::new("ip")
            .args(["netns", "add", name])
            .output()
            .expect("run ip netns add");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            text(&out.stderr)
        );
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// A node whose compute link is the bridge `phys0` holding `ip`/24 (the
    /// discovery takes a bridge not named docker*/virbr* for a real NIC).
    pub fn compute_node(name: &str, ip: &str) -> Netns {
        let ns = Netns::create(name);
        ns.ip(&["link", "add", "phys0", "type", "bridge"]);
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "phys0"]);
        ns.ip(&["link", "set", "phys0", "up"]);
        ns
    }

    /// `ip -n <ns> <args>`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        self.ip_out(args);
    }

    /// `ip -n <ns> <args>`'s output; it must succeed.
    pub fn ip_out(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip -n {} {args:?}: {}",
            self.name,
            text(&out.stderr)
        );
        text(&out.stdout)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Tenants, concentrators and the node address of the tenant networking
/// tests (two tenants, same CIDR).
pub const T_A: &str = "67d86208-0000-4465-9018-fe14087d415f";
pub const T_B: &str = "77d86208-0000-4465-9018-fe14087d4150";
pub const C_A: &str = "67d86208-b46c-4465-0000-fe14087d415f";
pub const C_B: &str = "77d86208-b46c-4465-0000-fe14087d4150";
pub const SUBNET: &str = "172.16.0.0/24";
pub const NODE_IP: &str = "10.9.0.2";

impl Netns {
    /// The names of our devices in the namespace, sorted.
    pub fn our_links(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .ip_out(&["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or_default().to_string())
            .filter(|n| {
                ["sbr_", "sgt_", "svn_", "svp_", "svc_", "tpr_"]
                    .iter()
                    .any(|p| n.starts_with(p))
            })
            .collect();
        v.sort();
        v
    }

    /// How many FORWARD rules of our bridges the namespace has.
    pub fn forward_rules(&self) -> usize {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &self.name, "iptables", "-w", "-S", "FORWARD",
            ])
            .output()
            .expect("iptables");
        assert!(out.status.success(), "iptables: {}", text(&out.stderr));
        text(&out.stdout)
            .lines()
            .filter(|l| l.contains("sbr_"))
            .count()
    }
}

impl Netns {
    /// No device and no FORWARD rule of ours is left in the namespace.
    pub fn assert_nothing_of_ours(&self, when: &str) {
        assert_eq!(
            self.our_links(),
            Vec::<String>::new(),
            "{when}: devices left"
        );
        assert_eq!(self.forward_rules(), 0, "{when}: FORWARD rules left");
    }
}

/// How many of `links` start with `prefix`.
pub fn count(links: &[String], prefix: &str) -> usize {
    links.iter().filter(|l| l.starts_with(prefix)).count()
}

/// A compute node for the tenant networking tests: a namespace (with the
/// bridge `phys0` holding [`NODE_IP`] as its compute link), `serve
/// --verbose` in it, and launchers started in it by the test.
pub struct TenantNode {
    // Dropped first: the environment kills its VMs before the namespace goes.
    pub env: Env,
    pub ns: Netns,
    pub addr: SocketAddr,
    _serve: Proc,
}

impl TenantNode {
    /// Namespace `<prefix>-<pid>-<tag>`.
    pub fn new(prefix: &str, tag: u32) -> TenantNode {
        TenantNode::with_serve(prefix, tag, |_| Vec::new())
    }

    /// [`TenantNode::new`] with more `serve` flags, made from the node's
    /// namespace and environment before `serve` starts.
    pub fn with_serve(
        prefix: &str,
        tag: u32,
        flags: impl FnOnce(&(Netns, Env)) -> Vec<String>,
    ) -> TenantNode {
        require(&[(&["ip"], "iproute2"), (&["iptables"], "iptables")]);
        let name = format!("{prefix}-{}-{tag}", std::process::id());
        let ns = Netns::compute_node(&name, NODE_IP);
        let env = Env::in_netns(&ns.name);
        let pair = (ns, env);
        let mut extra = vec!["--verbose".to_string()];
        extra.extend(flags(&pair));
        let (ns, env) = pair;
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let (serve, addr) = env.serve_with("127.0.0.1:0", "2016", &extra);
        TenantNode {
            env,
            ns,
            addr,
            _serve: serve,
        }
    }

    /// A launcher (2016) whose compute and management network is the
    /// node's, with `extra` flags; returned once it is connected.
    pub fn launcher(&self, extra: &[&str]) -> Proc {
        let mut args = vec!["--compute-net", "10.9.0.0/24", "--mgmt-net", "10.9.0.0/24"];
        args.extend_from_slice(extra);
        let p = self.env.launcher_with(self.addr, "2016", &args);
        self.env.wait_connected();
        p
    }

    /// `ciao-lc start <what>` for `tenant` at `ip` with `mac` on [`SUBNET`];
    /// returns the instance id.
    pub fn start(&self, what: &[&str], tenant: &str, conc: &str, ip: &str, mac: &str) -> String {
        let mut args = vec!["start"];
        args.extend_from_slice(what);
        args.extend_from_slice(&[
            "--tenant",
            tenant,
            "--subnet",
            SUBNET,
            "--private-ip",
            ip,
            "--vnic-mac",
            mac,
            "--concentrator-uuid",
            conc,
            "--concentrator-ip",
            "10.9.0.200",
        ]);
        let out = self.env.lc_ok(&args);
        out.split_whitespace()
            .nth(1)
            .expect("instance id")
            .to_string()
    }

    /// Event lines `serve` saw with `what` in them ("Tenant Added").
    pub fn events(&self, what: &str) -> Vec<String> {
        self.env
            .serve_log()
            .lines()
            .filter(|l| l.contains(what))
            .map(str::to_string)
            .collect()
    }

    /// Waits (bounded) until `serve` saw `n` events with `what` in them.
    pub fn wait_events(&self, what: &str, n: usize) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let e = self.events(what);
            if e.len() >= n {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "waited for {n} {what:?} event(s), saw {e:?}\nlauncher log:\n{}",
                self.env.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
