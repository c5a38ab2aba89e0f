//! The `ciao-launcher` main thread: command line, the data directory's lock,
//! logging, hard reset, RLIMIT_NOFILE, then the [`Launcher`] and the signal
//! wait with the 1-second rule.
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
use std::fs::{self, File, OpenOptions};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::select;
use log::{debug, error, info, warn};

use crate::capabilities::{Capabilities, Probe};
use crate::cli::{self, Config, LogConfig, Mode, NetworkMode};
use crate::launcher::{Ended, Launcher, Settings};
use crate::logging::GlogLogger;
use crate::nodestats::ProcNodeStats;
use crate::overseer::Limits;
use crate::payloads::config::VmType;
use crate::ssntp::client::{self, ClientConfig};
use crate::ssntp::{Profile, Role, tls};
use crate::state::Store;
use crate::virt::docker_api::{DockerApi, DockerError};
use crate::virt::qemu;
use crate::virt::sim::SimFactory;

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
    run(cfg).into()
}

fn run(cfg: Config) -> LauncherExit {
    if let Err(e) = fs::create_dir_all(&cfg.data_dir) {
        eprintln!("ciao-launcher: {}: {e}", cfg.data_dir.display());
        return LauncherExit::DataDir;
    }
    // One launcher per data directory; the lock lives as long as the process.
    let _lock = match lock(&cfg.data_dir) {
        Ok(l) => l,
        Err(code) => return code,
    };
    if let Err(e) = init_logging(&cfg.log) {
        eprintln!("ciao-launcher: {e}");
        return LauncherExit::DataDir;
    }
    for flag in &cfg.ignored {
        warn!(
            "{flag}: glog flag accepted for compatibility and ignored (-v sets the verbosity of every module)"
        );
    }
    let (cacert, cert) = match &cfg.mode {
        Mode::HardReset => return hard_reset(&cfg),
        Mode::Run { cacert, cert } => (cacert.clone(), cert.clone()),
    };
    if cfg.network != NetworkMode::None {
        warn!(
            "tenant networking ({:?}) is not implemented yet: running with -network none",
            cfg.network
        );
    }
    if cfg.user_net {
        info!(
            "--user-net: virtual machines get a user-mode NIC that reaches nothing outside QEMU, with guest port 22 forwarded from a free port on 127.0.0.1"
        );
    }
    let nofile = raise_nofile();
    let max_vm = match (cfg.max_vm, cfg.protocol) {
        (Some(n), _) => n as usize,
        (None, Profile::P2016) => 32,
        // ciao master: one instance per five descriptors (QMP socket, files, …).
        (None, Profile::P2018) => (nofile / 5).max(1) as usize,
    };

    let (ca, identity) = match (tls::load_ca(&cacert), tls::load_identity(&cert)) {
        (Ok(ca), Ok(id)) => (ca, id),
        (Err(e), _) | (_, Err(e)) => {
            error!("{e}");
            if cacert.as_os_str() == cli::DEFAULT_CACERT || cert.as_os_str() == cli::DEFAULT_CERT {
                error!(
                    "(give the certificates with -cacert and -cert; these are the Go launcher's default paths)"
                );
            }
            return LauncherExit::Certificates;
        }
    };
    // Expired (or not yet valid) is said here, naming the file: the peer
    // would only answer with an anonymous TLS alert, on every attempt.
    if let Err(e) = tls::check_own_validity(
        &identity,
        &cert.display().to_string(),
        std::time::SystemTime::now(),
    ) {
        error!("{e}");
        return LauncherExit::Certificates;
    }
    if !identity.role.intersects(Role::AGENT.union(Role::NETAGENT)) {
        error!(
            "{}: role {} is neither agent nor netagent",
            cert.display(),
            identity.role
        );
        return LauncherExit::Certificates;
    }
    let node = match client::node_uuid(&cfg.data_dir, identity.role) {
        Ok(n) => n,
        Err(e) => {
            error!("{}: cannot keep the node UUID: {e}", cfg.data_dir.display());
            return LauncherExit::DataDir;
        }
    };
    let factory: Arc<dyn crate::virt::VirtualizerFactory> = if cfg.simulation {
        info!("simulation: instances are pretend, no virtualizer is checked or used");
        Arc::new(SimFactory::default())
    } else {
        let (qemu, accel_why) = qemu_factory(&cfg);
        // What this node can serve, one line per virtualizer; it runs with what it has.
        let caps = Capabilities::probe(&Probe {
            qemu: cfg.qemu.clone(),
            qemu_img: cfg.qemu_img.clone(),
            ovmf: cfg.ovmf.clone(),
            accel: (qemu.accel, accel_why),
            docker_socket: cfg.docker_socket.clone(),
        });
        caps.log();
        Arc::new(crate::virt::NodeFactory {
            caps: Some(Arc::new(caps)),
            docker: crate::virt::docker::DockerFactory {
                socket: cfg.docker_socket.clone(),
                stop_timeout: cfg.stop_timeout,
                node: node.uuid.to_string(),
            },
            qemu,
        })
    };
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
    let mut client_cfg = ClientConfig::new(identity, ca, *node.uuid.as_bytes(), servers);
    client_cfg.profile = cfg.protocol;
    client_cfg.verify_hostname = cfg.verify_hostname;

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
    let settings = Settings {
        client: client_cfg,
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
    };
    // Signals before the launcher: a signal during start-up is not lost.
    let signals = match crate::signals::spawn() {
        Ok(s) => s,
        Err(e) => {
            error!("cannot install signal handlers: {e}");
            return LauncherExit::Usage;
        }
    };
    let launcher = match Launcher::start(settings) {
        Ok(l) => l,
        Err(e) => {
            error!("{e}");
            return LauncherExit::DataDir;
        }
    };
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
    let result = match ended {
        Some(Ended::ClientFailed(e)) => {
            error!("{e}");
            if let Ok(s) = launcher.stop(SHUTDOWN_GRACE) {
                s.idle.leave_to_process_exit();
            }
            LauncherExit::Security
        }
        _ => match launcher.stop(SHUTDOWN_GRACE) {
            Ok(s) => {
                // The exit below ends them: no wake-up and join each.
                s.idle.leave_to_process_exit();
                match s.ended {
                    Ended::ClientFailed(e) => {
                        error!("{e}");
                        LauncherExit::Security
                    }
                    Ended::Stopped => LauncherExit::Ok,
                }
            }
            Err(stuck) => {
                error!(
                    "threads still in the middle of something {SHUTDOWN_GRACE:?} after the signal: {}",
                    stuck.threads.join(", ")
                );
                LauncherExit::Stuck
            }
        },
    };
    log::logger().flush();
    result
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

fn lock(data_dir: &Path) -> Result<File, LauncherExit> {
    let path = data_dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| {
            eprintln!("ciao-launcher: {}: {e}", path.display());
            LauncherExit::DataDir
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            eprintln!(
                "ciao-launcher: another launcher is running with data directory {}",
                data_dir.display()
            );
            Err(LauncherExit::Locked)
        }
        Err(std::fs::TryLockError::Error(e)) => {
            eprintln!("ciao-launcher: {}: {e}", path.display());
            Err(LauncherExit::DataDir)
        }
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
/// force-removed), then removes their files.
fn hard_reset(cfg: &Config) -> LauncherExit {
    let data_dir = &cfg.data_dir;
    let store = Store::new(data_dir);
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
    match store.hard_reset() {
        Ok(n) => {
            info!("hard reset: removed {n} instance(s)");
            println!(
                "hard reset: removed {n} instance(s) from {}",
                store.instances_dir().display()
            );
            let _ = fs::remove_file(data_dir.join("maintenance"));
            LauncherExit::Ok
        }
        Err(e) => {
            error!("hard reset: {e}");
            eprintln!("ciao-launcher: hard reset: {e}");
            LauncherExit::DataDir
        }
    }
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

/// glog's behaviour: a log file in the log directory, and on standard error
/// what reaches the threshold (everything with -logtostderr, which also
/// disables the file). Lines in glog's shape, repeated identical lines
/// rate-limited ([`crate::logging`]).
fn init_logging(log: &LogConfig) -> Result<(), String> {
    let file = if log.logtostderr {
        None
    } else {
        fs::create_dir_all(&log.dir).map_err(|e| format!("{}: {e}", log.dir.display()))?;
        let path = log.dir.join("ciao-launcher.log");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Some((log.verbosity, file))
    };
    let stderr_level = if log.logtostderr || log.alsologtostderr {
        log.verbosity
    } else {
        log.verbosity.min(log.stderr_threshold)
    };
    // Fails only if a logger is already set (tests): keep that one.
    GlogLogger::new(file, stderr_level).install();
    Ok(())
}
