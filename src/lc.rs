//! `ciao-lc`, the operator's companion: makes ciao-style certificates, runs an
//! embedded SSNTP scheduler (`serve`), and drives launchers through it from
//! the command line (`start`, `stop`, `restart`, `delete`, `list`, `stats`,
//! `watch`, `evacuate`, `restore`).
//!
//! `serve` threads: main (waits for a signal), `signals`, `lc-events` (takes
//! the SSNTP server's events, keeps a view of every node — its last STATUS
//! and STATS — and copies a line per event to every watcher), `lc-control`
//! (accepts connections on the control socket) and one `lc-request` thread
//! per control connection, plus the SSNTP server's own threads.
//!
//! Control protocol: a client connects to `<certs>/ciao-lc.sock`, writes one
//! YAML [`Request`] and shuts down its write half. `serve` answers with one
//! YAML [`Response`] and closes, except for `watch`, which streams text lines
//! until the client goes away.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand};
use crossbeam_channel::{Sender, select};
use serde::{Deserialize, Serialize};

use crate::payloads::config::{Firmware, VmType};
use crate::payloads::outgoing::{self, Stats};
use crate::payloads::start::{StartRequest, start_payload};
use crate::payloads::{canonical_uuid, commands};
use crate::ssntp::certgen::{self, CertSpec};
use crate::ssntp::frame::Uuid16;
use crate::ssntp::server::{Server, ServerConfig, ServerEvent};
use crate::ssntp::{Command, Event, Frame, FrameType, Operation, Profile, Role, Status, tls};

/// Exit codes of `ciao-lc`.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LcExit {
    Ok = 0,
    /// The command failed (unknown node or instance, launcher not connected, …).
    Failed = 1,
    /// Command-line error (clap uses 2 as well).
    Usage = 2,
    /// Certificates could not be written or read.
    Certs = 3,
    /// `serve` could not start (address in use, …).
    Serve = 4,
    /// No `ciao-lc serve` answers on the control socket.
    NoServer = 5,
}

impl From<LcExit> for ExitCode {
    fn from(e: LcExit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}

/// The operator's companion for ciao-launcher: certificates, an embedded SSNTP
/// scheduler, and commands to drive launchers through it.
#[derive(Debug, Parser)]
#[command(name = "ciao-lc", version = crate::build_info::VERSION)]
pub struct LcCli {
    #[command(subcommand)]
    pub command: LcCommand,
}

/// Where a client command finds `ciao-lc serve`.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// Certificate directory of the running `ciao-lc serve` (its control socket lives there).
    #[arg(long, value_name = "DIR", default_value = "certs")]
    pub certs: PathBuf,
    /// The launcher to address (node UUID); default: the only connected one.
    #[arg(long, value_name = "UUID")]
    pub node: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum LcCommand {
    /// Create a CA (the scheduler's certificate, as ciao makes it) and launcher certificates.
    Certs {
        /// Directory to write into (created; existing files are never overwritten).
        #[arg(long, value_name = "DIR", default_value = "certs")]
        dir: PathBuf,
        /// Organisation name in the certificates' subject.
        #[arg(long, value_name = "NAME", default_value = "ciao")]
        org: String,
        /// A DNS name for the scheduler certificate (repeatable). With --host or --ip, only the names given are written, not the defaults (localhost, 127.0.0.1 and this machine's host name).
        #[arg(long = "host", value_name = "NAME")]
        hosts: Vec<String>,
        /// An IP address for the scheduler certificate (repeatable; launchers without -server dial these first). Replaces the defaults, as --host does.
        #[arg(long = "ip", value_name = "ADDR")]
        ips: Vec<IpAddr>,
        /// Also name this machine's non-loopback addresses (link-local IPv6 ones excepted) in the scheduler certificate, for launchers on other machines.
        #[arg(long)]
        all_addresses: bool,
        /// Write the scheduler certificate without subject alternative names, as ciao-deploy's launcher certificates and 2016 setups look. Launchers that check the scheduler's name (the 2018 profile by default, Go's ciao master launcher always) refuse such a scheduler.
        #[arg(long, conflicts_with_all = ["hosts", "ips", "all_addresses"])]
        no_san: bool,
    },
    /// Run the embedded SSNTP scheduler and its control socket; print every connection and frame.
    Serve {
        /// Certificate directory made by "ciao-lc certs"; the control socket is created in it.
        #[arg(long, value_name = "DIR", default_value = "certs")]
        certs: PathBuf,
        /// Address to listen on.
        #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8888")]
        listen: SocketAddr,
        /// Protocol profile of the launchers: 2016 or 2018.
        #[arg(long, value_name = "PROFILE", default_value = "2016")]
        protocol: Profile,
        /// Cluster configuration YAML sent in CONNECTED.
        #[arg(long, value_name = "FILE")]
        configuration: Option<PathBuf>,
        /// Print every frame's payload too.
        #[arg(long)]
        verbose: bool,
    },
    /// Start an instance: from a START payload file, or built from flags.
    Start {
        #[command(flatten)]
        target: Target,
        /// A START payload (YAML, as a scheduler sends it); flags are ignored then.
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
        /// A simulated instance (for launchers run with -simulation): no image needed.
        #[arg(long)]
        sim: bool,
        /// Backing image UUID of a VM (the file images/UUID in the node's data directory).
        #[arg(long, value_name = "UUID")]
        image: Option<String>,
        /// Run a container of this image instead of a VM.
        #[arg(long = "docker-image", value_name = "IMAGE")]
        docker_image: Option<String>,
        #[arg(long, value_name = "N", default_value_t = 1)]
        vcpus: u32,
        #[arg(long = "mem-mb", value_name = "MB", default_value_t = 128)]
        mem_mb: u64,
        #[arg(long = "disk-mb", value_name = "MB", default_value_t = 0)]
        disk_mb: u64,
        /// Boot the VM with legacy BIOS instead of EFI.
        #[arg(long)]
        legacy: bool,
        /// cloud-init user data file (default: a #cloud-config with no commands).
        #[arg(long = "user-data", value_name = "FILE")]
        user_data: Option<PathBuf>,
        /// Instance UUID (default: a new random one).
        #[arg(long, value_name = "UUID")]
        instance: Option<String>,
    },
    /// Stop an instance (2016: STOP, kept as exited; 2018: DELETE with stop).
    Stop {
        #[command(flatten)]
        target: Target,
        #[arg(value_name = "INSTANCE")]
        instance: String,
    },
    /// Boot a stopped instance again from its stored configuration (2016 profile).
    Restart {
        #[command(flatten)]
        target: Target,
        #[arg(value_name = "INSTANCE")]
        instance: String,
    },
    /// Delete an instance and all its files.
    Delete {
        #[command(flatten)]
        target: Target,
        #[arg(value_name = "INSTANCE")]
        instance: String,
    },
    /// Hot-plug a volume (the file volumes/VOLUME in the node's data directory) into an instance (2018 profile).
    Attach {
        #[command(flatten)]
        target: Target,
        #[arg(value_name = "INSTANCE")]
        instance: String,
        #[arg(value_name = "VOLUME")]
        volume: String,
    },
    /// List the instances of every connected launcher (from their last STATS).
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Show node statistics of every connected launcher (from their last STATS).
    Stats {
        #[command(flatten)]
        target: Target,
    },
    /// Print events, errors and status changes as they arrive, until interrupted.
    Watch {
        #[command(flatten)]
        target: Target,
    },
    /// Put a launcher in maintenance and move its instances away (2018 profile).
    Evacuate {
        #[command(flatten)]
        target: Target,
    },
    /// Take a launcher out of maintenance (2018 profile).
    Restore {
        #[command(flatten)]
        target: Target,
    },
}

/// Entry point of the `ciao-lc` binary.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = match LcCli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                LcExit::Usage.into()
            } else {
                LcExit::Ok.into()
            };
        }
    };
    match cli.command {
        LcCommand::Certs {
            dir,
            org,
            hosts,
            ips,
            all_addresses,
            no_san,
        } => {
            let (hosts, ips) = if no_san {
                (Vec::new(), Vec::new())
            } else {
                scheduler_names(hosts, ips, all_addresses)
            };
            certs(&dir, &org, hosts, ips)
        }
        LcCommand::Serve {
            certs,
            listen,
            protocol,
            configuration,
            verbose,
        } => {
            // Only what goes wrong: serve prints its own lines on standard output.
            let _ =
                crate::logging::init(&crate::cli::LogConfig::stderr_only(log::LevelFilter::Warn));
            serve(&certs, listen, protocol, configuration, verbose)
        }
        LcCommand::Start {
            target,
            file,
            sim,
            image,
            docker_image,
            vcpus,
            mem_mb,
            disk_mb,
            legacy,
            user_data,
            instance,
        } => {
            let spec = StartSpec {
                file,
                sim,
                image,
                docker_image,
                vcpus,
                mem_mb,
                disk_mb,
                legacy,
                user_data,
                instance,
            };
            start(&target, spec)
        }
        LcCommand::Stop { target, instance } => simple(&target, "stop", &instance),
        LcCommand::Restart { target, instance } => simple(&target, "restart", &instance),
        LcCommand::Delete { target, instance } => simple(&target, "delete", &instance),
        LcCommand::Attach {
            target,
            instance,
            volume,
        } => {
            let req = Request {
                command: "attach".into(),
                node: target.node.clone().unwrap_or_default(),
                instance,
                payload: volume,
            };
            call(&target, &req)
        }
        LcCommand::List { target } => simple(&target, "list", ""),
        LcCommand::Stats { target } => simple(&target, "stats", ""),
        LcCommand::Evacuate { target } => simple(&target, "evacuate", ""),
        LcCommand::Restore { target } => simple(&target, "restore", ""),
        LcCommand::Watch { target } => watch(&target),
    }
    .into()
}

/// File names inside a certificate directory.
pub const CA_FILE: &str = "CAcert.pem";
pub const SCHEDULER_FILE: &str = "cert-Scheduler.pem";
pub const AGENT_FILE: &str = "cert-CNAgent.pem";
pub const NETAGENT_FILE: &str = "cert-NetworkingAgent.pem";
/// The control socket of `serve`, inside the certificate directory.
pub const CONTROL_SOCKET: &str = "ciao-lc.sock";

/// The subject alternative names of the scheduler certificate. Launchers
/// that verify the scheduler's name (the 2018 profile by default, and every
/// Go launcher of ciao master) accept a scheduler only under a name or
/// address its certificate carries, so by default it names `localhost`,
/// `127.0.0.1` and this machine's host name; `--host`/`--ip` replace that
/// list; `--all-addresses` adds the machine's non-loopback addresses.
pub fn scheduler_names(
    hosts: Vec<String>,
    ips: Vec<IpAddr>,
    all_addresses: bool,
) -> (Vec<String>, Vec<IpAddr>) {
    let (mut hosts, mut ips) = if hosts.is_empty() && ips.is_empty() {
        let mut hosts = vec!["localhost".to_string()];
        match nix::unistd::gethostname().map(|h| h.into_string()) {
            Ok(Ok(h)) if usable_dns_name(&h) => hosts.push(h),
            Ok(Ok(h)) => eprintln!(
                "ciao-lc certs: host name {h:?} is not a DNS name; not written (use --host)"
            ),
            Ok(Err(h)) => eprintln!("ciao-lc certs: host name {h:?} is not UTF-8; not written"),
            Err(e) => eprintln!("ciao-lc certs: cannot read the host name: {e}"),
        }
        (hosts, vec![IpAddr::from([127, 0, 0, 1])])
    } else {
        (hosts, ips)
    };
    if all_addresses {
        ips.extend(own_addresses());
    }
    dedup(&mut hosts);
    dedup(&mut ips);
    (hosts, ips)
}

/// Removes later repetitions, keeping the first of each in place.
fn dedup<T: PartialEq + Clone>(v: &mut Vec<T>) {
    let mut seen: Vec<T> = Vec::with_capacity(v.len());
    v.retain(|x| {
        let new = !seen.contains(x);
        if new {
            seen.push(x.clone());
        }
        new
    });
}

/// What a TLS client accepts as a DNS name (no IP literals, no `_`, …).
fn usable_dns_name(name: &str) -> bool {
    name.parse::<IpAddr>().is_err()
        && matches!(
            tls::ServerName::try_from(name),
            Ok(tls::ServerName::DnsName(_))
        )
}

/// This machine's addresses, without loopback and link-local IPv6 ones.
fn own_addresses() -> Vec<IpAddr> {
    let addrs = match nix::ifaddrs::getifaddrs() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ciao-lc certs: cannot list this machine's addresses: {e}");
            return Vec::new();
        }
    };
    addrs
        .filter_map(|a| a.address)
        .filter_map(|sa| {
            if let Some(v4) = sa.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .filter(|ip| {
            !ip.is_loopback()
                && !ip.is_unspecified()
                && !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local())
        })
        .collect()
}

fn certs(dir: &Path, org: &str, hosts: Vec<String>, ips: Vec<IpAddr>) -> LcExit {
    let result = (|| -> Result<(), String> {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut spec = CertSpec::new(Role::SCHEDULER);
        spec.org = org.to_string();
        spec.is_ca = true;
        let names: Vec<String> = hosts
            .iter()
            .map(|h| format!("DNS:{h}"))
            .chain(ips.iter().map(|ip| format!("IP:{ip}")))
            .collect();
        spec.dns = hosts;
        spec.ips = ips;
        let (ca, ca_cert) = certgen::self_signed_ca(&spec).map_err(|e| e.to_string())?;
        write_new(&dir.join(CA_FILE), ca_cert.cert_pem.as_bytes())?;
        write_new(&dir.join(SCHEDULER_FILE), ca_cert.combined_pem().as_bytes())?;
        for (role, file) in [(Role::AGENT, AGENT_FILE), (Role::NETAGENT, NETAGENT_FILE)] {
            let mut s = CertSpec::new(role);
            s.org = org.to_string();
            let issued = certgen::issue(&ca, &s).map_err(|e| e.to_string())?;
            write_new(&dir.join(file), issued.combined_pem().as_bytes())?;
        }
        println!(
            "wrote {CA_FILE}, {SCHEDULER_FILE}, {AGENT_FILE} and {NETAGENT_FILE} in {}",
            dir.display()
        );
        if names.is_empty() {
            println!("the scheduler certificate names no host (--no-san)");
        } else {
            println!("the scheduler certificate names {}", names.join(", "));
        }
        Ok(())
    })();
    match result {
        Ok(()) => LcExit::Ok,
        Err(e) => {
            eprintln!("ciao-lc certs: {e}");
            LcExit::Certs
        }
    }
}

fn write_new(path: &Path, data: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// Control protocol

/// One control request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Request {
    pub command: String,
    pub node: String,
    pub instance: String,
    /// START payload text.
    pub payload: String,
}

/// The answer to a request (not `watch`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Response {
    pub ok: bool,
    pub message: String,
}

/// What `serve` knows of one launcher.
#[derive(Debug, Clone)]
struct NodeView {
    role: Role,
    peer: String,
    status: Option<Status>,
    stats: Option<Stats>,
}

#[derive(Debug)]
struct ServeState {
    profile: Profile,
    nodes: BTreeMap<Uuid16, NodeView>,
    watchers: Vec<Sender<String>>,
}

type Shared = Arc<Mutex<ServeState>>;

fn lock(s: &Shared) -> MutexGuard<'_, ServeState> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

fn serve(
    dir: &Path,
    listen: SocketAddr,
    profile: Profile,
    configuration: Option<PathBuf>,
    verbose: bool,
) -> LcExit {
    let loaded = (|| -> Result<_, String> {
        let ca = tls::load_ca(&dir.join(CA_FILE)).map_err(|e| e.to_string())?;
        let id_path = dir.join(SCHEDULER_FILE);
        let id = tls::load_identity(&id_path).map_err(|e| e.to_string())?;
        tls::check_own_validity(&id, &id_path.display().to_string(), SystemTime::now())
            .map_err(|e| e.to_string())?;
        let conf = match &configuration {
            Some(p) => fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?,
            None => Vec::new(),
        };
        Ok((ca, id, conf))
    })();
    let (ca, id, conf) = match loaded {
        Ok(x) => x,
        Err(e) => {
            eprintln!("ciao-lc serve: {e}");
            return LcExit::Certs;
        }
    };
    let mut cfg = ServerConfig::new(id, ca, *uuid::Uuid::new_v4().as_bytes(), listen);
    cfg.profile = profile;
    cfg.configuration = conf;
    let server = match Server::start(cfg) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("ciao-lc serve: cannot serve on {listen}: {e}");
            return LcExit::Serve;
        }
    };
    let sock_path = dir.join(CONTROL_SOCKET);
    // A socket left by a previous serve that is not answering any more.
    if UnixStream::connect(&sock_path).is_err() {
        let _ = fs::remove_file(&sock_path);
    }
    let control = match UnixListener::bind(&sock_path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "ciao-lc serve: control socket {}: {e} (is another serve running?)",
                sock_path.display()
            );
            return LcExit::Serve;
        }
    };
    println!(
        "ciao-lc: SSNTP scheduler {} listening on {} ({} profile), control socket {}",
        uuid::Uuid::from_bytes(server.uuid()),
        server.local_addr(),
        profile,
        sock_path.display()
    );
    let signals = match crate::signals::spawn() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ciao-lc serve: signals: {e}");
            return LcExit::Serve;
        }
    };
    let state: Shared = Arc::new(Mutex::new(ServeState {
        profile,
        nodes: BTreeMap::new(),
        watchers: Vec::new(),
    }));

    let events = server.events().clone();
    let st = Arc::clone(&state);
    let printer = thread::Builder::new()
        .name("lc-events".into())
        .spawn(move || {
            for ev in events.iter() {
                let line = describe(profile, &ev, verbose);
                println!("{line}");
                let short = describe(profile, &ev, false);
                // A launcher that reconnects (same node UUID) replaces its old
                // session, whose disconnection may be reported after the new
                // connection: forget the node only if no session of it remains.
                if let ServerEvent::Disconnected {
                    superseded: true, ..
                } = &ev
                {
                    continue;
                }
                let mut s = lock(&st);
                record(&mut s, &ev);
                s.watchers.retain(|w| w.send(short.clone()).is_ok());
            }
        });
    let (st, srv) = (Arc::clone(&state), Arc::downgrade(&server));
    let _control = thread::Builder::new()
        .name("lc-control".into())
        .spawn(move || {
            for conn in control.incoming() {
                let Ok(conn) = conn else { continue };
                // A request holds the server only while it runs.
                let Some(srv) = srv.upgrade() else { break };
                let st = Arc::clone(&st);
                let _ = thread::Builder::new()
                    .name("lc-request".into())
                    .spawn(move || handle(conn, &st, &srv));
            }
        });
    select! {
        recv(signals.done) -> _ => {}
    }
    let _ = fs::remove_file(&sock_path);
    lock(&state).watchers.clear();
    // Stop the server (close_notify to every launcher) unless a request is
    // still using it; then process exit closes the sockets.
    match Arc::try_unwrap(server) {
        Ok(s) => s.stop(),
        Err(_) => log::warn!("a control request is still running: not waiting for it"),
    }
    drop(signals);
    if let Ok(p) = printer
        && p.is_finished()
    {
        let _ = p.join();
    }
    LcExit::Ok
}

/// Updates the node views from one server event.
fn record(s: &mut ServeState, ev: &ServerEvent) {
    match ev {
        ServerEvent::Connected { uuid, role, peer } => {
            s.nodes.insert(
                *uuid,
                NodeView {
                    role: *role,
                    peer: peer.map_or_else(String::new, |p| p.to_string()),
                    status: None,
                    stats: None,
                },
            );
        }
        ServerEvent::Disconnected { uuid, .. } => {
            s.nodes.remove(uuid);
        }
        ServerEvent::Frame { uuid, frame } => {
            let op = s.profile.frame_operation(frame);
            let Some(node) = s.nodes.get_mut(uuid) else {
                return;
            };
            match op {
                Ok(Operation::Status(st)) => node.status = Some(st),
                Ok(Operation::Command(Command::Stats)) => {
                    if let Ok(stats) = outgoing::parse_stats(&frame.payload) {
                        node.stats = Some(stats);
                    }
                }
                _ => {}
            }
        }
        ServerEvent::Rejected { .. } => {}
    }
}

fn handle(mut conn: UnixStream, state: &Shared, server: &Server) {
    let mut text = String::new();
    // One request per connection, bounded: a client cannot make us buffer forever.
    if Read::by_ref(&mut conn)
        .take(64 << 20)
        .read_to_string(&mut text)
        .is_err()
    {
        return;
    }
    let req: Request = match serde_yaml::from_str(&text) {
        Ok(r) => r,
        Err(e) => return reply(&mut conn, false, format!("bad request: {e}")),
    };
    if req.command == "watch" {
        let (tx, rx) = crossbeam_channel::unbounded();
        lock(state).watchers.push(tx);
        let _ = writeln!(conn, "watching; interrupt to stop");
        for line in rx.iter() {
            if writeln!(conn, "{line}").is_err() {
                break;
            }
        }
        return;
    }
    let (ok, message) = match execute(&req, state, server) {
        Ok(m) => (true, m),
        Err(m) => (false, m),
    };
    reply(&mut conn, ok, message);
}

fn reply(conn: &mut UnixStream, ok: bool, message: String) {
    let text = serde_yaml::to_string(&Response { ok, message }).unwrap_or_default();
    let _ = conn.write_all(text.as_bytes());
}

/// Picks the node a request addresses.
fn pick_node(req: &Request, s: &ServeState) -> Result<Uuid16, String> {
    if !req.node.is_empty() {
        let id = canonical_uuid(&req.node)
            .ok_or_else(|| format!("{:?} is not a node UUID", req.node))?;
        return s
            .nodes
            .keys()
            .find(|u| uuid::Uuid::from_bytes(**u).to_string() == id)
            .copied()
            .ok_or_else(|| format!("node {id} is not connected"));
    }
    let agents: Vec<_> = s
        .nodes
        .iter()
        .filter(|(_, n)| n.role.intersects(Role::AGENT.union(Role::NETAGENT)))
        .collect();
    match agents.as_slice() {
        [(u, _)] => Ok(**u),
        [] => Err("no launcher is connected".into()),
        many => Err(format!(
            "{} launchers are connected; choose one with --node: {}",
            many.len(),
            many.iter()
                .map(|(u, _)| uuid::Uuid::from_bytes(**u).to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn execute(req: &Request, state: &Shared, server: &Server) -> Result<String, String> {
    let (profile, node) = {
        let s = lock(state);
        let node = match req.command.as_str() {
            "list" | "stats" | "profile" => None,
            _ => Some(pick_node(req, &s)?),
        };
        (s.profile, node)
    };
    let node_text = node
        .map(|n| uuid::Uuid::from_bytes(n).to_string())
        .unwrap_or_default();
    let instance = || {
        canonical_uuid(&req.instance)
            .ok_or_else(|| format!("{:?} is not an instance UUID", req.instance))
    };
    let (cmd, payload, done) = match req.command.as_str() {
        "profile" => return Ok(profile.to_string()),
        "list" => return Ok(list_table(&lock(state))),
        "stats" => return Ok(stats_table(&lock(state))),
        "start" => {
            let cfg = crate::payloads::start::parse_start(req.payload.as_bytes())
                .map_err(|e| e.to_string())?;
            (
                Command::Start,
                req.payload.clone().into_bytes(),
                format!("START {} sent", cfg.instance_uuid),
            )
        }
        "stop" if profile == Profile::P2016 => {
            let id = instance()?;
            (
                Command::Stop,
                commands::stop_payload(&id, &node_text),
                format!("STOP {id} sent"),
            )
        }
        "stop" => {
            let id = instance()?;
            (
                Command::Delete,
                commands::delete_payload(profile, &id, &node_text, true),
                format!("DELETE (stop) {id} sent"),
            )
        }
        "restart" if profile == Profile::P2016 => {
            let id = instance()?;
            (
                Command::Restart,
                commands::restart_payload(&id, &node_text),
                format!("RESTART {id} sent"),
            )
        }
        "restart" => return Err("the 2018 profile has no RESTART: start the instance again".into()),
        "delete" => {
            let id = instance()?;
            (
                Command::Delete,
                commands::delete_payload(profile, &id, &node_text, false),
                format!("DELETE {id} sent"),
            )
        }
        "attach" if profile == Profile::P2016 => {
            return Err("the 2016 profile has no AttachVolume".into());
        }
        "attach" => {
            let id = instance()?;
            let volume = canonical_uuid(&req.payload)
                .ok_or_else(|| format!("{:?} is not a volume UUID", req.payload))?;
            (
                Command::AttachVolume,
                commands::attach_volume_payload(&id, &volume, &node_text),
                format!("AttachVolume {volume} → {id} sent"),
            )
        }
        "evacuate" => (
            Command::Evacuate,
            commands::evacuate_payload(&node_text),
            "EVACUATE sent".to_string(),
        ),
        "restore" if profile == Profile::P2016 => {
            return Err("the 2016 profile has no Restore".into());
        }
        "restore" => (
            Command::Restore,
            commands::restore_payload(&node_text),
            "Restore sent".to_string(),
        ),
        other => return Err(format!("unknown command {other:?}")),
    };
    let operand = profile
        .operand(Operation::Command(cmd))
        .map_err(|e| e.to_string())?;
    let node = node.ok_or("no node")?;
    server
        .send(
            &node,
            Frame::new(FrameType::Command, operand, server.uuid(), payload),
        )
        .map_err(|e| e.to_string())?;
    Ok(done)
}

/// Human units for MB figures (−1 = unknown).
fn human_mb(mb: i64) -> String {
    match mb {
        m if m < 0 => "-".into(),
        m if m >= 10 * 1024 => format!("{:.1} GiB", m as f64 / 1024.0),
        m => format!("{m} MiB"),
    }
}

fn list_table(s: &ServeState) -> String {
    let mut out = format!(
        "{:<36}  {:<36}  {:<8}  {:>10}  {:>10}  {:>4}\n",
        "NODE", "INSTANCE", "STATE", "MEMORY", "DISK", "CPU%"
    );
    for (u, n) in &s.nodes {
        let Some(stats) = &n.stats else { continue };
        for i in &stats.instances {
            let cpu = if i.cpu_usage < 0 {
                "-".into()
            } else {
                i.cpu_usage.to_string()
            };
            let _ = writeln!(
                out,
                "{:<36}  {:<36}  {:<8}  {:>10}  {:>10}  {:>4}",
                uuid::Uuid::from_bytes(*u),
                i.instance_uuid,
                i.state,
                human_mb(i.memory_usage_mb),
                human_mb(i.disk_usage_mb),
                cpu
            );
        }
    }
    out
}

fn stats_table(s: &ServeState) -> String {
    let mut out = format!(
        "{:<36}  {:<16}  {:<21}  {:<11}  {:>21}  {:>21}  {:>4}  {:>4}  {:>9}\n",
        "NODE",
        "ROLE",
        "ADDRESS",
        "STATUS",
        "MEMORY avail/total",
        "DISK avail/total",
        "LOAD",
        "CPUS",
        "INSTANCES"
    );
    for (u, n) in &s.nodes {
        let status = n.status.map_or("-".to_string(), |s| s.to_string());
        let (mem, disk, load, cpus, count) = match &n.stats {
            Some(st) => (
                format!(
                    "{} / {}",
                    human_mb(st.node.mem_available_mb),
                    human_mb(st.node.mem_total_mb)
                ),
                format!(
                    "{} / {}",
                    human_mb(st.node.disk_available_mb),
                    human_mb(st.node.disk_total_mb)
                ),
                st.node.load.to_string(),
                st.node.cpus_online.to_string(),
                st.instances.len().to_string(),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into(), "-".into()),
        };
        let _ = writeln!(
            out,
            "{:<36}  {:<16}  {:<21}  {:<11}  {:>21}  {:>21}  {:>4}  {:>4}  {:>9}",
            uuid::Uuid::from_bytes(*u),
            n.role.to_string(),
            n.peer,
            status,
            mem,
            disk,
            load,
            cpus,
            count
        );
    }
    out
}

/// One line per server event (with the payload when `verbose`).
pub fn describe(profile: Profile, ev: &ServerEvent, verbose: bool) -> String {
    let id = |u: &[u8; 16]| uuid::Uuid::from_bytes(*u).to_string();
    let now = humantime(SystemTime::now());
    match ev {
        ServerEvent::Connected { uuid, role, peer } => {
            format!(
                "{now} connected     {} {role} from {}",
                id(uuid),
                peer.map_or_else(|| "?".into(), |p| p.to_string())
            )
        }
        ServerEvent::Disconnected { uuid, reason, .. } => {
            format!("{now} disconnected  {} ({reason})", id(uuid))
        }
        ServerEvent::Rejected { peer, error } => {
            format!(
                "{now} rejected      {}: {error}",
                peer.map_or_else(|| "?".into(), |p| p.to_string())
            )
        }
        ServerEvent::Frame { uuid, frame } => {
            let op = profile.frame_operation(frame);
            let name = op.map_or_else(|e| e.to_string(), |o| o.to_string());
            let summary = match op {
                Ok(Operation::Error(_)) => outgoing::parse_error(&frame.payload)
                    .map(|e| format!(": {} {}", e.instance_uuid, e.reason))
                    .unwrap_or_default(),
                Ok(Operation::Event(Event::InstanceDeleted | Event::InstanceStopped)) => {
                    outgoing::parse_instance_event(&frame.payload)
                        .map(|i| format!(": {i}"))
                        .unwrap_or_default()
                }
                Ok(Operation::Command(Command::Stats)) => outgoing::parse_stats(&frame.payload)
                    .map(|s| format!(": {} instance(s)", s.instances.len()))
                    .unwrap_or_default(),
                _ => String::new(),
            };
            let mut line = format!("{now} {name:<13} {}{summary}", id(uuid));
            if verbose && !frame.payload.is_empty() {
                line.push('\n');
                line.push_str(String::from_utf8_lossy(&frame.payload).trim_end());
            }
            line
        }
    }
}

/// `HH:MM:SS` (UTC) for event lines.
fn humantime(t: SystemTime) -> String {
    let s = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{:02}:{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

// ---------------------------------------------------------------------------
// Client side

fn connect(target: &Target) -> Result<UnixStream, LcExit> {
    let path = target.certs.join(CONTROL_SOCKET);
    UnixStream::connect(&path).map_err(|e| {
        eprintln!(
            "ciao-lc: no ciao-lc serve answers on {}: {e}",
            path.display()
        );
        LcExit::NoServer
    })
}

fn send_request(target: &Target, req: &Request) -> Result<UnixStream, LcExit> {
    let mut conn = connect(target)?;
    let text = serde_yaml::to_string(req).map_err(|e| {
        eprintln!("ciao-lc: {e}");
        LcExit::Failed
    })?;
    conn.write_all(text.as_bytes())
        .and_then(|()| conn.shutdown(std::net::Shutdown::Write))
        .map_err(|e| {
            eprintln!("ciao-lc: control socket: {e}");
            LcExit::NoServer
        })?;
    Ok(conn)
}

fn call(target: &Target, req: &Request) -> LcExit {
    let mut conn = match send_request(target, req) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut text = String::new();
    if let Err(e) = conn.read_to_string(&mut text) {
        eprintln!("ciao-lc: control socket: {e}");
        return LcExit::NoServer;
    }
    match serde_yaml::from_str::<Response>(&text) {
        Ok(r) if r.ok => {
            print!("{}", r.message);
            if !r.message.ends_with('\n') {
                println!();
            }
            LcExit::Ok
        }
        Ok(r) => {
            eprintln!("ciao-lc {}: {}", req.command, r.message);
            LcExit::Failed
        }
        Err(e) => {
            eprintln!("ciao-lc: unreadable answer from serve: {e}");
            LcExit::Failed
        }
    }
}

fn simple(target: &Target, command: &str, instance: &str) -> LcExit {
    let req = Request {
        command: command.into(),
        node: target.node.clone().unwrap_or_default(),
        instance: instance.into(),
        payload: String::new(),
    };
    call(target, &req)
}

fn watch(target: &Target) -> LcExit {
    let req = Request {
        command: "watch".into(),
        node: target.node.clone().unwrap_or_default(),
        ..Default::default()
    };
    let conn = match send_request(target, &req) {
        Ok(c) => c,
        Err(e) => return e,
    };
    for line in BufReader::new(conn).lines() {
        match line {
            Ok(l) => println!("{l}"),
            Err(_) => break,
        }
    }
    LcExit::Ok
}

/// The flags of `ciao-lc start`.
#[derive(Debug)]
struct StartSpec {
    file: Option<PathBuf>,
    sim: bool,
    image: Option<String>,
    docker_image: Option<String>,
    vcpus: u32,
    mem_mb: u64,
    disk_mb: u64,
    legacy: bool,
    user_data: Option<PathBuf>,
    instance: Option<String>,
}

fn start(target: &Target, spec: StartSpec) -> LcExit {
    let payload = match build_start(target, &spec) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ciao-lc start: {e}");
            return LcExit::Usage;
        }
    };
    let req = Request {
        command: "start".into(),
        node: target.node.clone().unwrap_or_default(),
        instance: String::new(),
        payload,
    };
    call(target, &req)
}

fn build_start(target: &Target, spec: &StartSpec) -> Result<String, String> {
    if let Some(f) = &spec.file {
        return fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()));
    }
    let instance = match &spec.instance {
        Some(i) => canonical_uuid(i).ok_or_else(|| format!("{i:?} is not a UUID"))?,
        None => uuid::Uuid::new_v4().to_string(),
    };
    let (vm_type, image, docker) = match (&spec.image, &spec.docker_image, spec.sim) {
        (Some(_), Some(_), _) => return Err("give --image or --docker-image, not both".into()),
        (None, Some(d), _) => (VmType::Docker, String::new(), d.clone()),
        (Some(i), None, _) => (
            VmType::Qemu,
            canonical_uuid(i).ok_or_else(|| format!("{i:?} is not an image UUID"))?,
            String::new(),
        ),
        (None, None, true) => (
            VmType::Qemu,
            "00000000-0000-4000-8000-000000000000".to_string(),
            String::new(),
        ),
        (None, None, false) => {
            return Err(
                "say what to run: --sim, --image UUID, --docker-image IMAGE, or a FILE".into(),
            );
        }
    };
    let user_data = match &spec.user_data {
        Some(f) => fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?,
        None => "#cloud-config\n".to_string(),
    };
    // The profile decides the START shape; ask serve which one it runs.
    let profile = current_profile(target).unwrap_or_default();
    let req = StartRequest {
        instance_uuid: instance.clone(),
        tenant_uuid: uuid::Uuid::new_v4().to_string(),
        image_uuid: image,
        docker_image: docker,
        vm_type,
        firmware: if spec.legacy {
            Firmware::Legacy
        } else {
            Firmware::Efi
        },
        vcpus: spec.vcpus,
        mem_mb: spec.mem_mb,
        disk_mb: spec.disk_mb,
        volumes: Vec::new(),
        restart: false,
        user_data,
        meta_data: format!("{{\n  \"uuid\": \"{instance}\",\n  \"hostname\": \"{instance}\"\n}}"),
    };
    String::from_utf8(start_payload(profile, &req)).map_err(|e| e.to_string())
}

/// The profile `serve` runs, read from its `stats` answer header.
fn current_profile(target: &Target) -> Option<Profile> {
    let req = Request {
        command: "profile".into(),
        ..Default::default()
    };
    let mut conn = send_request(target, &req).ok()?;
    let mut text = String::new();
    conn.read_to_string(&mut text).ok()?;
    let r: Response = serde_yaml::from_str(&text).ok()?;
    r.message.trim().parse().ok()
}
