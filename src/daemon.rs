//! The `ciao-launcher` main thread. [`run`] is the launcher's life as a
//! list of steps, each a function; the first that fails ends it with a
//! [`DaemonError`], which maps to the documented exit code
//! ([`LauncherExit`], through `From`):
//!
//! 1. create the data directory and take its lock ([`LauncherExit::Locked`]
//!    when another launcher holds it, [`LauncherExit::DataDir`] when it is
//!    unusable);
//! 2. logging ([`crate::logging::init`], the set-up `ciao-lc` shares);
//! 3. `-hard-reset`: remove every instance and stop here;
//! 4. raise RLIMIT_NOFILE (it decides the 2018 profile's `-max-vm`);
//! 5. the certificates: readable, ours valid now and an agent or netagent
//!    ([`LauncherExit::Certificates`]);
//! 6. the node UUID, the virtualizers (the start-up checks), the SSNTP
//!    client's settings;
//! 7. the signal thread, then the [`Launcher`]; `READY=1` to systemd;
//! 8. wait for a signal, or for the client to stop for good
//!    ([`LauncherExit::Security`]); stop with the 1-second rule
//!    ([`LauncherExit::Stuck`]).
//!
//! Threads: main (this module), `signals`, and what [`Launcher`] starts
//! (`server`, `ssntp-io`, `overseer`, `instance-…`). On the first SIGTERM,
//! SIGINT or SIGHUP main drops the shutdown sender and gives the threads
//! that are in the middle of something (server, ssntp-io, overseer, and
//! every instance thread carrying out a command, its START, a state write or
//! a monitor's stop) one second to finish; instances keep running. Idle
//! instance threads own nothing that is not on disk: they are not woken,
//! and the process exit ends them. If a thread waited for is still at it
//! after that second, main logs the names of those threads and exits with
//! [`LauncherExit::Stuck`]. Later signals are ignored.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::select;
use log::{debug, error, info, warn};

use crate::capabilities::{Capabilities, Probe};
use crate::cli::{self, Config, Mode, NetworkMode};
use crate::launcher::{Ended, Launcher, Settings};
use crate::logging::{self, LoggingError};
use crate::network::{NetSetup, TenantNetwork};
use crate::nodestats::ProcNodeStats;
use crate::overseer::Limits;
use crate::payloads::config::VmType;
use crate::signals::SignalThread;
use crate::ssntp::client::{self, ClientConfig, NodeUuid};
use crate::ssntp::tls::{CertificateDer, Identity, TlsError};
use crate::ssntp::{Profile, Role, StartError, tls};
use crate::state::journal::{Journal, JournalSettings};
use crate::state::{StateError, Store};
use crate::virt::docker::DockerFactory;
use crate::virt::docker_api::{DockerApi, DockerError};
use crate::virt::sim::SimFactory;
use crate::virt::{NodeFactory, VirtualizerFactory, qemu};

/// Exit codes of `ciao-launcher` (documented in the man page).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LauncherExit {
    Ok = 0,
    /// Another launcher holds this data directory's lock.
    Locked = 1,
    /// Bad command line (or signal handlers could not be installed).
    Usage = 2,
    /// Certificates unreadable, ours expired or not yet valid, or ours
    /// proves no agent/netagent role.
    Certificates = 3,
    /// The scheduler refused our identity (ConnectionAborted), claimed a
    /// role its certificate does not prove, or (host-name verification on)
    /// its certificate does not name the address dialled: a security
    /// failure, not retried.
    Security = 4,
    /// The data directory (or the log directory) is unusable.
    DataDir = 5,
    /// Threads were still alive one second after a signal.
    Stuck = 6,
}

impl From<LauncherExit> for ExitCode {
    fn from(e: LauncherExit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}

/// Why `ciao-launcher` stopped before (or instead of) a normal exit. Each
/// maps to one exit code ([`LauncherExit::from`]); [`DaemonError::report`]
/// says what happened, on standard error before logging is up and in the log
/// afterwards.
#[derive(Debug)]
pub enum DaemonError {
    /// The data directory (or its lock file) cannot be created or opened.
    DataDir { path: PathBuf, source: io::Error },
    /// Another launcher holds the data directory's lock.
    Locked { data_dir: PathBuf },
    /// The log directory or file cannot be opened.
    Logging(LoggingError),
    /// The CA certificate or our own certificate cannot be used; `defaults`:
    /// one of them is the Go launcher's default path (a hint to give them).
    Certificates { error: TlsError, defaults: bool },
    /// Our certificate has expired or is not valid yet.
    Expired(TlsError),
    /// Our certificate proves neither the agent nor the netagent role.
    NotAnAgent { cert: PathBuf, role: Role },
    /// The node UUID cannot be kept in the data directory.
    NodeUuid {
        data_dir: PathBuf,
        source: io::Error,
    },
    /// Signal handlers cannot be installed.
    Signals(io::Error),
    /// The launcher's directories or threads cannot be made.
    Launcher(StartError),
    /// A hard reset could not remove every instance's files.
    HardReset(StateError),
    /// The SSNTP client stopped for good: a security failure.
    Security(String),
    /// Threads still alive [`SHUTDOWN_GRACE`] after the signal (their names).
    Stuck(Vec<String>),
}

impl From<&DaemonError> for LauncherExit {
    fn from(e: &DaemonError) -> LauncherExit {
        match e {
            DaemonError::Locked { .. } => LauncherExit::Locked,
            DaemonError::Signals(_) => LauncherExit::Usage,
            DaemonError::Certificates { .. }
            | DaemonError::Expired(_)
            | DaemonError::NotAnAgent { .. } => LauncherExit::Certificates,
            DaemonError::Security(_) => LauncherExit::Security,
            DaemonError::DataDir { .. }
            | DaemonError::Logging(_)
            | DaemonError::NodeUuid { .. }
            | DaemonError::Launcher(_)
            | DaemonError::HardReset(_) => LauncherExit::DataDir,
            DaemonError::Stuck(_) => LauncherExit::Stuck,
        }
    }
}

impl From<LoggingError> for DaemonError {
    fn from(e: LoggingError) -> DaemonError {
        DaemonError::Logging(e)
    }
}

impl From<StartError> for DaemonError {
    fn from(e: StartError) -> DaemonError {
        DaemonError::Launcher(e)
    }
}

impl fmt::Display for DaemonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DaemonError::DataDir { path, source } => write!(f, "{}: {source}", path.display()),
            DaemonError::Locked { data_dir } => write!(
                f,
                "another launcher is running with data directory {}",
                data_dir.display()
            ),
            DaemonError::Logging(e) => write!(f, "{e}"),
            DaemonError::Certificates { error, .. } | DaemonError::Expired(error) => {
                write!(f, "{error}")
            }
            DaemonError::NotAnAgent { cert, role } => write!(
                f,
                "{}: role {role} is neither agent nor netagent",
                cert.display()
            ),
            DaemonError::NodeUuid { data_dir, source } => write!(
                f,
                "{}: cannot keep the node UUID: {source}",
                data_dir.display()
            ),
            DaemonError::Signals(e) => write!(f, "cannot install signal handlers: {e}"),
            DaemonError::Launcher(e) => write!(f, "{e}"),
            DaemonError::HardReset(e) => write!(f, "hard reset: {e}"),
            DaemonError::Security(e) => write!(f, "{e}"),
            DaemonError::Stuck(threads) => write!(
                f,
                "threads still in the middle of something {SHUTDOWN_GRACE:?} after the signal: {}",
                threads.join(", ")
            ),
        }
    }
}

impl std::error::Error for DaemonError {}

impl DaemonError {
    /// Says what happened where the operator looks: standard error while
    /// there is no log yet, the log (errors also reach standard error) after.
    fn report(&self) {
        match self {
            DaemonError::DataDir { .. } | DaemonError::Locked { .. } | DaemonError::Logging(_) => {
                eprintln!("ciao-launcher: {self}")
            }
            DaemonError::Certificates { defaults: true, .. } => {
                error!("{self}");
                error!(
                    "(give the certificates with -cacert and -cert; these are the Go launcher's default paths)"
                );
            }
            _ => error!("{self}"),
        }
    }
}

/// The lock file inside the data directory.
pub const LOCK_FILE: &str = "ciao-launcher.lock";
/// How long threads get after a signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Entry point of the `ciao-launcher` binary.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cfg = match cli::parse_launcher_args(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(e.exit_code());
        }
    };
    let exit = match run(&cfg) {
        Ok(()) => LauncherExit::Ok,
        Err(e) => {
            e.report();
            LauncherExit::from(&e)
        }
    };
    log::logger().flush();
    exit.into()
}

/// The launcher's life as a list of steps; the first that fails ends it.
fn run(cfg: &Config) -> Result<(), DaemonError> {
    // One launcher per data directory; the lock lives as long as the process.
    let _lock = lock_data_dir(&cfg.data_dir)?;
    logging::init(&cfg.log)?;
    warn_about_ignored_flags(cfg);
    let (cacert, cert) = match &cfg.mode {
        Mode::HardReset => return hard_reset(cfg),
        Mode::Run { cacert, cert } => (cacert, cert),
    };
    let max_vm = max_instances(cfg, raise_nofile());
    let (ca, identity) = load_certificates(cacert, cert)?;
    let node = client::node_uuid(&cfg.data_dir, identity.role).map_err(|source| {
        DaemonError::NodeUuid {
            data_dir: cfg.data_dir.clone(),
            source,
        }
    })?;
    let factory = virtualizers(cfg, &node);
    let network = tenant_network(cfg, &node);
    let client = client_config(cfg, identity, ca, &node, max_vm);
    // Signals before the launcher: a signal during start-up is not lost.
    let signals = crate::signals::spawn().map_err(DaemonError::Signals)?;
    let launcher = Launcher::start(settings(cfg, client, factory, network, max_vm))?;
    serve_until_signal(launcher, &signals)
}

/// Creates the data directory and takes its lock.
fn lock_data_dir(data_dir: &Path) -> Result<File, DaemonError> {
    let io_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DaemonError::DataDir { path, source }
    };
    fs::create_dir_all(data_dir).map_err(io_error(data_dir))?;
    let path = data_dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_error(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(DaemonError::Locked {
            data_dir: data_dir.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io_error(&path)(e)),
    }
}

/// Flags accepted for compatibility but not acted on, and what
/// `--user-net` means.
fn warn_about_ignored_flags(cfg: &Config) {
    for flag in &cfg.ignored {
        warn!(
            "{flag}: glog flag accepted for compatibility and ignored (-v sets the verbosity of every module)"
        );
    }
    if cfg.user_net {
        info!(
            "--user-net: virtual machines get a user-mode NIC that reaches nothing outside QEMU, with guest port 22 forwarded from a free port on 127.0.0.1; containers keep network mode none (loopback only)"
        );
    }
}

/// `-max-vm`, else the profile's default given the open-file limit.
fn max_instances(cfg: &Config, nofile: u64) -> usize {
    match (cfg.max_vm, cfg.protocol) {
        (Some(n), _) => n as usize,
        (None, Profile::P2016) => 32,
        // ciao master: one instance per five descriptors (QMP socket, files, …).
        (None, Profile::P2018) => (nofile / 5).max(1) as usize,
    }
}

/// The CA and our identity, checked now: expired (or not yet valid) is said
/// here, naming the file, as the peer would only answer with an anonymous
/// TLS alert, on every attempt.
fn load_certificates(
    cacert: &Path,
    cert: &Path,
) -> Result<(Vec<CertificateDer<'static>>, Identity), DaemonError> {
    let (ca, identity) = match (tls::load_ca(cacert), tls::load_identity(cert)) {
        (Ok(ca), Ok(id)) => (ca, id),
        (Err(error), _) | (_, Err(error)) => {
            let defaults =
                cacert.as_os_str() == cli::DEFAULT_CACERT || cert.as_os_str() == cli::DEFAULT_CERT;
            return Err(DaemonError::Certificates { error, defaults });
        }
    };
    tls::check_own_validity(
        &identity,
        &cert.display().to_string(),
        std::time::SystemTime::now(),
    )
    .map_err(DaemonError::Expired)?;
    if !identity.role.intersects(Role::AGENT.union(Role::NETAGENT)) {
        return Err(DaemonError::NotAnAgent {
            cert: cert.to_path_buf(),
            role: identity.role,
        });
    }
    Ok((ca, identity))
}

/// The virtualizers this node serves: pretend ones with `-simulation`,
/// else QEMU and Docker as far as the start-up checks find them (one log
/// line per virtualizer; the node runs with what it has).
fn virtualizers(cfg: &Config, node: &NodeUuid) -> Arc<dyn VirtualizerFactory> {
    if cfg.simulation {
        info!("simulation: instances are pretend, no virtualizer is checked or used");
        return Arc::new(SimFactory::default());
    }
    let (qemu, accel_why) = qemu_factory(cfg);
    let caps = Capabilities::probe(&Probe {
        qemu: cfg.qemu.clone(),
        qemu_img: cfg.qemu_img.clone(),
        ovmf: cfg.ovmf.clone(),
        accel: (qemu.accel, accel_why),
        docker_socket: cfg.docker_socket.clone(),
    });
    caps.log();
    Arc::new(NodeFactory {
        caps: Some(Arc::new(caps)),
        docker: DockerFactory {
            socket: cfg.docker_socket.clone(),
            stop_timeout: cfg.stop_timeout,
            node: node.uuid.to_string(),
        },
        qemu,
    })
}

/// The node's tenant networking: off with `-network none`; else up, or
/// down with one error line (the node serves anyway, tenant STARTs are
/// refused with `network_failure`).
fn tenant_network(cfg: &Config, node: &NodeUuid) -> Arc<TenantNetwork> {
    if cfg.network == NetworkMode::None {
        return TenantNetwork::off();
    }
    let text = |l: &[cli::Cidr]| l.iter().map(ToString::to_string).collect();
    TenantNetwork::start(NetSetup {
        compute_nets: text(&cfg.compute_net),
        mgmt_nets: text(&cfg.mgmt_net),
        agent_uuid: node.uuid.to_string(),
        tunnel: cfg.tunnel_kind,
    })
}

/// The SSNTP client's settings; logs the start-up line naming the node and
/// the schedulers it dials.
fn client_config(
    cfg: &Config,
    identity: Identity,
    ca: Vec<CertificateDer<'static>>,
    node: &NodeUuid,
    max_vm: usize,
) -> ClientConfig {
    let servers = client::server_list(cfg.server.as_deref(), &ca, client::DEFAULT_PORT);
    info!(
        "ciao-launcher {} starting: node {} ({}), {} profile, up to {max_vm} instances, dialling {}",
        crate::build_info::VERSION,
        node.uuid,
        identity.role,
        cfg.protocol,
        servers.join(", ")
    );
    if !cfg.verify_hostname && cfg.protocol == Profile::P2018 {
        warn!(
            "--verify-hostname=false: the scheduler's certificate is not checked against the \
             address dialled; any holder of a certificate from this CA with the scheduler \
             role can pose as the scheduler"
        );
    }
    let mut client = ClientConfig::new(identity, ca, *node.uuid.as_bytes(), servers);
    client.profile = cfg.protocol;
    client.verify_hostname = cfg.verify_hostname;
    client
}

/// Everything [`Launcher::start`] needs, from the configuration.
fn settings(
    cfg: &Config,
    client: ClientConfig,
    factory: Arc<dyn VirtualizerFactory>,
    network: Arc<TenantNetwork>,
    max_vm: usize,
) -> Settings {
    let store = Store::new(&cfg.data_dir);
    let limits = Limits {
        max_instances: max_vm,
        disk_limit: cfg.disk_limit,
        mem_limit: cfg.mem_limit,
        disk_full_mb: cfg.disk_limit_mb as i64,
        mem_full_mb: cfg.mem_limit_mb as i64,
        // ciao refuses STARTs at half its FULL marks (40 000 / 512 vs 80 000 / 1 000).
        disk_refuse_mb: (cfg.disk_limit_mb / 2) as i64,
        mem_refuse_mb: (cfg.mem_limit_mb * 512 / 1000) as i64,
    };
    Settings {
        client,
        profile: cfg.protocol,
        data_dir: cfg.data_dir.clone(),
        limits,
        stats_interval: cfg.stats_interval,
        factory,
        node_stats: Box::new(ProcNodeStats::new("/proc", store.instances_dir())),
        instance_stack: cfg.instance_stack_size,
        // The virtualizer escalates within its own timeout; allow it that and more.
        stop_wait: cfg.stop_timeout + Duration::from_secs(30),
        usage_period: Some(cfg.usage_interval),
        network,
    }
}

/// Tells systemd the node serves, waits for a signal (or for the client to
/// stop for good), then stops the launcher within [`SHUTDOWN_GRACE`].
fn serve_until_signal(launcher: Launcher, signals: &SignalThread) -> Result<(), DaemonError> {
    info!("running ({} instance(s) recovered)", launcher.recovered);
    sd_notify(&format!(
        "READY=1\nSTATUS=serving, {} instance(s) recovered\nMAINPID={}",
        launcher.recovered,
        std::process::id()
    ));
    let ended = select! {
        recv(signals.done) -> s => {
            info!("signal {}: shutting down, instances keep running", s.unwrap_or(0));
            sd_notify("STOPPING=1");
            None
        }
        recv(launcher.done()) -> e => e.ok(),
    };
    // The client's own failure, or how the stop went.
    let ended = match ended {
        Some(Ended::ClientFailed(e)) => {
            if let Ok(s) = launcher.stop(SHUTDOWN_GRACE) {
                s.idle.leave_to_process_exit();
            }
            Ended::ClientFailed(e)
        }
        _ => {
            let s = launcher
                .stop(SHUTDOWN_GRACE)
                .map_err(|stuck| DaemonError::Stuck(stuck.threads))?;
            // The exit below ends them: no wake-up and join each.
            s.idle.leave_to_process_exit();
            s.ended
        }
    };
    match ended {
        Ended::ClientFailed(e) => Err(DaemonError::Security(e)),
        Ended::Stopped => Ok(()),
    }
}

/// Tells systemd (`Type=notify`, `$NOTIFY_SOCKET`) how we are; a failure
/// only costs a warning.
fn sd_notify(state: &str) {
    match crate::notify::notify(state) {
        Ok(true) => debug!("told systemd {:?}", state.replace('\n', " ")),
        Ok(false) => {}
        Err(e) => warn!("cannot notify systemd: {e}"),
    }
}

/// The QEMU virtualizer's settings, with the accelerator chosen, and why
/// it was chosen.
fn qemu_factory(cfg: &Config) -> (qemu::QemuFactory, String) {
    let choice = match cfg.qemu_accel {
        cli::QemuAccel::Auto => qemu::AccelChoice::Auto,
        cli::QemuAccel::Kvm => qemu::AccelChoice::Kvm,
        cli::QemuAccel::Tcg => qemu::AccelChoice::Tcg,
    };
    let (accel, why) = qemu::choose_accel(choice, Path::new("/sys"), Path::new("/dev/kvm"));
    let factory = qemu::QemuFactory {
        data_dir: cfg.data_dir.clone(),
        qemu: cfg.qemu.clone(),
        qemu_img: cfg.qemu_img.clone(),
        accel,
        ovmf: cfg.ovmf.clone(),
        ui: match cfg.with_ui {
            cli::UiMode::None => qemu::Ui::None,
            cli::UiMode::Nc => qemu::Ui::Nc,
            cli::UiMode::Spice => qemu::Ui::Spice,
        },
        stop_timeout: cfg.stop_timeout,
        images: qemu::ImageCache::default(),
        child_users: child_users(cfg),
        confinement: Arc::default(),
        user_net: cfg.user_net,
    };
    (factory, why)
}

/// `--child-user`, which the 2018 cluster configuration's
/// `launcher.child_user` reaches too (the flag wins).
fn child_users(cfg: &Config) -> Arc<qemu::ChildUsers> {
    if let Some(u) = &cfg.child_user {
        info!("virtual machines run as {u} (--child-user)");
    }
    let c = Arc::new(qemu::ChildUsers::new(cfg.child_user.clone()));
    c.receive_cluster_configuration();
    c
}

/// `-hard-reset`: ends every instance (VMs quit through QMP, containers
/// force-removed), removes our tenant network devices and FORWARD rules,
/// then the instances' files.
fn hard_reset(cfg: &Config) -> Result<(), DaemonError> {
    let data_dir = &cfg.data_dir;
    let store = Store::new(data_dir);
    // States only the journal holds (a power cut) are instances too.
    if let Err(e) = Journal::open(data_dir, JournalSettings::default()) {
        warn!("hard reset: state journal not replayed: {e}");
    }
    for (id, state) in store.scan().into_iter().flatten() {
        match state.config.vm_type {
            VmType::Qemu => {
                let socket = store.instances_dir().join(&id).join("qmp.sock");
                match qemu::quit_vm(&socket, Duration::from_secs(30)) {
                    Ok(true) => info!("hard reset: VM {id} ended"),
                    Ok(false) => {}
                    Err(e) => warn!("hard reset: VM {id}: {e}"),
                }
            }
            VmType::Docker => {
                let removed = DockerApi::connect(&cfg.docker_socket)
                    .and_then(|api| api.container_remove(&id, true, true));
                match removed {
                    Ok(()) => info!("hard reset: container {id} removed"),
                    Err(DockerError::NotFound(_)) => {}
                    Err(e) => warn!("hard reset: container {id}: {e}"),
                }
            }
        }
    }
    // Our tenant devices by alias and kind (never another aliased link),
    // whatever -network says now: the node may have run with it before.
    match crate::network::hard_reset(cfg.tunnel_kind.link_kind()) {
        Ok(gone) if gone.is_empty() => {}
        Ok(gone) => {
            info!("hard reset: removed network devices {}", gone.join(" "));
            println!("hard reset: removed network devices {}", gone.join(" "));
        }
        Err(e) => warn!("hard reset: tenant network: {e}"),
    }
    let n = store.hard_reset().map_err(DaemonError::HardReset)?;
    info!("hard reset: removed {n} instance(s)");
    println!(
        "hard reset: removed {n} instance(s) from {}",
        store.instances_dir().display()
    );
    let _ = fs::remove_file(data_dir.join("maintenance"));
    Ok(())
}

/// Lets the launcher hold a descriptor per instance connection and file;
/// returns the soft limit in force afterwards.
fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(e) => {
            warn!("cannot read the open-file limit: {e}");
            1024
        }
    }
}
