//! The Docker virtualizer: one container per instance, named after the
//! instance UUID and labelled with it, through the Engine API on its unix
//! socket ([`super::docker_api`]).
//!
//! Each running container has a monitor thread (`monitor-<uuid8>`): it
//! inspects the container, reports `Running`, then blocks on `/wait`; when
//! the container exits it reports `Exited` with the exit code. If the engine
//! goes away (dockerd restart) the monitor retries with backoff and re-reads
//! the container's state when the engine is back. Dropping the monitor handle
//! cancels the `/wait` and joins the thread without touching the container;
//! [`Monitor::stop`] asks the engine to stop it (`/stop?t=`), and the exit
//! then arrives through `/wait` as for any exit.
//!
//! Usage is sampled off the instance thread, by a short-lived thread per
//! sample (`usage-<uuid8>`): the engine's stats come from a collector that
//! publishes once a second, so a one-shot sample can take up to a second, and
//! an instance thread blocked that long would leave its commands waiting (a
//! DELETE sent right after a START waited ~0.9 s for the first sample). The
//! instance thread gets the latest finished sample at once, and a fresh one
//! as a [`MonitorEvent::Usage`] when it is ready.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};
use log::{debug, info, warn};

use super::docker_api::{CancellablePool, CreateSpec, DockerApi, DockerError, WaitCanceller};
use super::{Monitor, MonitorEvent, Usage, VirtError, Virtualizer, VirtualizerFactory};
use crate::payloads::config::InstanceConfig;

/// Label naming the instance a container belongs to (recovery finds them by it).
pub const LABEL_INSTANCE: &str = "org.ciao.instance";
pub const LABEL_TENANT: &str = "org.ciao.tenant";
/// Label naming the node (launcher) that made a container: a launcher only
/// ever removes containers that carry its instance label and, where present,
/// its node label, so that another launcher's containers on the same engine,
/// or a foreign container that merely has an instance's name, are left alone.
pub const LABEL_NODE: &str = "org.ciao.node";

/// How long a container's disk figure is reused before the engine is asked
/// again: computing it can be expensive (the vfs driver walks the whole
/// writable layer), unlike memory and CPU.
pub const DISK_SAMPLE_PERIOD: Duration = Duration::from_secs(10);

/// Makes Docker virtualizers that talk to one engine.
#[derive(Debug, Clone)]
pub struct DockerFactory {
    pub socket: PathBuf,
    pub stop_timeout: Duration,
    /// This node's UUID, for [`LABEL_NODE`].
    pub node: String,
}

impl VirtualizerFactory for DockerFactory {
    fn create(&self, cfg: &InstanceConfig) -> Box<dyn Virtualizer> {
        Box::new(Docker {
            socket: self.socket.clone(),
            stop_timeout: self.stop_timeout,
            node: self.node.clone(),
            cfg: cfg.clone(),
            api: None,
            sampling: Sampling::default(),
        })
    }

    /// Removes the containers of this node whose instance has no directory
    /// (created by a START that was killed before it wrote its state).
    fn sweep(&self, recorded: &dyn Fn(&str) -> bool) -> Vec<String> {
        let api = match DockerApi::connect(&self.socket) {
            Ok(a) => a,
            Err(e) => {
                info!("leftover sweep skipped (Docker): {e}");
                return Vec::new();
            }
        };
        let ours = match api.containers_by_label(LABEL_NODE, &self.node) {
            Ok(list) => list,
            Err(e) => {
                warn!("cannot list this node's containers: {e}");
                return Vec::new();
            }
        };
        let mut removed = Vec::new();
        for c in ours {
            let Some(instance) = c.labels.get(LABEL_INSTANCE) else {
                continue;
            };
            if recorded(instance) {
                continue;
            }
            let shown = format!(
                "container {} ({}) of instance {instance}",
                c.names.first().map_or("", |n| n.trim_start_matches('/')),
                &c.id[..c.id.len().min(12)]
            );
            match api.container_remove(&c.id, true, true) {
                Ok(()) | Err(DockerError::NotFound(_)) => removed.push(shown),
                Err(e) => warn!("cannot remove {shown}: {e}"),
            }
        }
        removed
    }
}

/// One container.
#[derive(Debug)]
pub struct Docker {
    socket: PathBuf,
    stop_timeout: Duration,
    node: String,
    cfg: InstanceConfig,
    /// Connected lazily, so an engine that is down at launcher start does not
    /// prevent recovery; reconnected after errors.
    api: Option<DockerApi>,
    sampling: Sampling,
}

fn verr(what: &str, e: DockerError) -> VirtError {
    let message = format!("{what}: {e}");
    match e {
        DockerError::Connect(_) => VirtError::unreachable(message),
        _ => VirtError::other(message),
    }
}

impl Docker {
    fn name(&self) -> &str {
        &self.cfg.instance_uuid
    }

    fn api(&mut self) -> Result<DockerApi, VirtError> {
        if let Some(a) = &self.api {
            return Ok(a.clone());
        }
        let a = DockerApi::connect(&self.socket).map_err(|e| verr("docker engine", e))?;
        self.api = Some(a.clone());
        Ok(a)
    }

    /// A container of ours carries this instance's label and, where it has
    /// one (containers made before node labels have none), this node's.
    fn is_ours(&self, labels: &BTreeMap<String, String>) -> bool {
        labels.get(LABEL_INSTANCE).map(String::as_str) == Some(self.name())
            && labels.get(LABEL_NODE).is_none_or(|n| *n == self.node)
    }

    fn spec(&self) -> CreateSpec {
        let mut labels = BTreeMap::new();
        labels.insert(LABEL_INSTANCE.to_string(), self.cfg.instance_uuid.clone());
        labels.insert(LABEL_TENANT.to_string(), self.cfg.tenant_uuid.clone());
        labels.insert(LABEL_NODE.to_string(), self.node.clone());
        CreateSpec {
            image: self.cfg.docker_image.clone(),
            cmd: first_runcmd(&self.cfg.user_data),
            hostname: hostname(&self.cfg.meta_data, &self.cfg.instance_uuid),
            labels,
            memory_bytes: (self.cfg.mem_mb > 0)
                .then(|| (self.cfg.mem_mb as i64).saturating_mul(1 << 20)),
            nano_cpus: (self.cfg.vcpus > 0).then(|| i64::from(self.cfg.vcpus) * 1_000_000_000),
            // Docker gives no network: a tenant NIC is plugged in by the
            // launcher after each start (`network::container`).
            network_none: true,
            privileged: self.cfg.privileged,
            env: Vec::new(),
            dns: tenant_dns(&self.cfg).into_iter().collect(),
        }
    }
}

/// A tenant container's name server, as ciao: its subnet's network + 1.
fn tenant_dns(cfg: &InstanceConfig) -> Option<String> {
    if cfg.network_node || cfg.networking.private_ip.trim().is_empty() {
        return None;
    }
    crate::network::Cidr::parse(cfg.networking.subnet.trim())
        .ok()
        .map(|c| c.gateway().to_string())
}

/// The container command: the first `runcmd` entry of the cloud-init user
/// data, as ciao does (a list is the argv, a string is run by `sh -c`).
pub fn first_runcmd(user_data: &str) -> Vec<String> {
    let Ok(doc) = serde_yaml::from_str::<serde_yaml::Value>(user_data) else {
        return Vec::new();
    };
    let Some(first) = doc
        .get("runcmd")
        .and_then(|r| r.as_sequence())
        .and_then(|s| s.first())
    else {
        return Vec::new();
    };
    match first {
        serde_yaml::Value::Sequence(argv) => argv
            .iter()
            .filter_map(|a| match a {
                serde_yaml::Value::String(s) => Some(s.clone()),
                serde_yaml::Value::Number(n) => Some(n.to_string()),
                serde_yaml::Value::Bool(b) => Some(b.to_string()),
                _ => None,
            })
            .collect(),
        serde_yaml::Value::String(s) => vec!["sh".into(), "-c".into(), s.clone()],
        _ => Vec::new(),
    }
}

/// The `hostname` of the meta-data JSON; the instance UUID if it is not JSON.
pub fn hostname(meta_data: &str, instance: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(meta_data) {
        Ok(v) => v
            .get("hostname")
            .and_then(|h| h.as_str())
            .unwrap_or_default()
            .to_string(),
        Err(_) => instance.to_string(),
    }
}

impl Virtualizer for Docker {
    fn init(&mut self, cfg: &InstanceConfig, _dir: &Path) {
        self.cfg = cfg.clone();
    }

    fn connected(&mut self) {
        self.sampling.new_life(false);
    }

    fn lost(&mut self) {
        self.sampling.new_life(true);
    }

    fn ensure_backing_image(&mut self) -> Result<(), VirtError> {
        if self.cfg.docker_image.is_empty() {
            return Err(VirtError::image("no docker_image in the START payload"));
        }
        let api = self.api()?;
        let image = self.cfg.docker_image.clone();
        match api.image_inspect(&image) {
            Ok(Some(_)) => Ok(()),
            Ok(None) => {
                info!("{}: pulling {image}", self.name());
                api.image_pull(&image).map_err(|e| match e {
                    DockerError::Connect(_) => verr(&format!("pull {image}"), e),
                    _ => VirtError::image(format!("pull {image}: {e}")),
                })
            }
            Err(e) => Err(verr(&format!("image {image}"), e)),
        }
    }

    fn create_image(&mut self) -> Result<(), VirtError> {
        let api = self.api()?;
        let spec = self.spec();
        match api.container_create(self.name(), &spec) {
            Ok(_) => Ok(()),
            Err(DockerError::Api { status: 409, .. }) => Err(VirtError::not_ours(format!(
                "a container named {} exists already; this START did not make it and leaves it alone",
                self.name()
            ))),
            Err(e) => Err(verr("create container", e)),
        }
    }

    /// Removes the instance's container, if it is ours: it carries this
    /// instance's label and, where it has one, this node's label. Any
    /// other container of that name is left alone (and logged).
    fn delete_image(&mut self) -> Result<(), VirtError> {
        let api = self.api()?;
        let info = match api.container_inspect(self.name()) {
            Ok(Some(info)) => info,
            Ok(None) | Err(DockerError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(verr("inspect container", e)),
        };
        if !self.is_ours(&info.labels) {
            warn!(
                "{}: container {} is not this instance's (labels {:?}): left alone",
                self.name(),
                &info.id[..info.id.len().min(12)],
                info.labels
            );
            return Ok(());
        }
        match api.container_remove(&info.id, true, true) {
            Ok(()) | Err(DockerError::NotFound(_)) => Ok(()),
            Err(e) => Err(verr("remove container", e)),
        }
    }

    fn vanished(&mut self) -> Option<String> {
        let api = self.api().ok()?;
        match api.container_inspect(self.name()) {
            Ok(None) | Err(DockerError::NotFound(_)) => {
                Some(format!("container {} not found", self.name()))
            }
            _ => None,
        }
    }

    fn start(&mut self) -> Result<(), VirtError> {
        let api = self.api()?;
        api.container_start(self.name())
            .map_err(|e| verr("start container", e))
    }

    fn netns_pid(&mut self) -> Result<u32, VirtError> {
        let api = self.api()?;
        match api.container_inspect(self.name()) {
            Ok(Some(info)) if info.running && info.pid > 0 => u32::try_from(info.pid)
                .map_err(|_| VirtError::other(format!("container PID {} out of range", info.pid))),
            Ok(Some(info)) => Err(VirtError::launch(format!(
                "container {} is not running ({})",
                self.name(),
                info.status
            ))),
            Ok(None) | Err(DockerError::NotFound(_)) => Err(VirtError::launch(format!(
                "container {} not found",
                self.name()
            ))),
            Err(e) => Err(verr("inspect container", e)),
        }
    }

    fn monitor(
        &mut self,
        events: Sender<MonitorEvent>,
        _boot: bool,
    ) -> Result<Box<dyn Monitor>, VirtError> {
        self.sampling.events(events.clone());
        let name = self.name().to_string();
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let api = self.api.clone();
        let socket = self.socket.clone();
        let waiter_slot: std::sync::Arc<std::sync::Mutex<Option<WaitCanceller>>> =
            Default::default();
        let slot = std::sync::Arc::clone(&waiter_slot);
        let thread = thread::Builder::new()
            .name(format!("monitor-{}", &name[..name.len().min(8)]))
            .stack_size(256 * 1024)
            .spawn(move || watch(api, &socket, &name, &events, &stop_rx, &slot))
            .map_err(|e| VirtError::other(format!("monitor thread: {e}")))?;
        Ok(Box::new(DockerMonitor {
            name: self.name().to_string(),
            api: self.api.clone(),
            socket: self.socket.clone(),
            stop_timeout: self.stop_timeout,
            stop_tx: Some(stop_tx),
            waiter: waiter_slot,
            thread: Some(thread),
        }))
    }

    /// The latest finished sample; asks for a fresh one, which follows as a
    /// [`MonitorEvent::Usage`] once a monitor has been attached.
    fn stats(&mut self) -> Usage {
        let name = self.cfg.instance_uuid.clone();
        self.sampling.request(
            &name,
            &self.socket,
            self.api.as_ref(),
            self.cfg.vcpus.max(1),
        );
        self.sampling.latest()
    }
}

/// What the instance thread and the sampling threads share.
#[derive(Debug, Default)]
struct Shared {
    /// Bumped when the container starts or stops: samples begun before are
    /// dropped, and CPU % starts afresh.
    life: u64,
    latest: Usage,
    /// The instance thread's monitor channel, once known.
    events: Option<Sender<MonitorEvent>>,
}

/// Usage sampling of one container, one sample at a time (see the module
/// docs). The sampler's state travels into each sampling thread and back
/// through its `JoinHandle`, so no thread waits between samples.
#[derive(Debug, Default)]
struct Sampling {
    shared: Arc<Mutex<Shared>>,
    /// The sample being taken (or just taken).
    busy: Option<JoinHandle<Box<Sampler>>>,
    /// The sampler between samples. Neither this nor `busy` before the first
    /// sample, or after a thread failed to start (its state is lost: begin
    /// anew).
    idle: Option<Box<Sampler>>,
    /// Interrupts the sampler's engine calls when the virtualizer goes.
    canceller: Option<WaitCanceller>,
}

impl Sampling {
    fn events(&mut self, events: Sender<MonitorEvent>) {
        if let Ok(mut sh) = self.shared.lock() {
            sh.events = Some(events);
        }
    }

    /// The container started (`stopped` false) or stopped: what was sampled
    /// before no longer describes it. The disk figure stays true.
    fn new_life(&mut self, stopped: bool) {
        if let Ok(mut sh) = self.shared.lock() {
            sh.life += 1;
            sh.latest.cpu_percent = None;
            if stopped {
                sh.latest.memory_mb = None;
            }
        }
    }

    fn latest(&self) -> Usage {
        self.shared.lock().map(|sh| sh.latest).unwrap_or_default()
    }

    /// Takes the sampler back from a finished sampling thread (joining it
    /// then does not wait). A panicked sampler (debug builds; release builds
    /// abort) only loses its state.
    fn reap(&mut self) {
        if let Some(t) = self.busy.take_if(|t| t.is_finished()) {
            self.idle = t.join().ok();
        }
    }

    /// Starts a sample unless one is being taken.
    /// `known`: the instance's client, whose API version a new sampler
    /// reuses (one engine call fewer per container).
    fn request(&mut self, name: &str, socket: &Path, known: Option<&DockerApi>, vcpus: u32) {
        self.reap();
        if self.busy.is_some() {
            return;
        }
        // Taken now: a start or stop from here on makes the sample stale.
        let Ok(life) = self.shared.lock().map(|sh| sh.life) else {
            return;
        };
        let mut sampler = self.idle.take().unwrap_or_else(|| {
            let pool = CancellablePool::new(socket);
            self.canceller = Some(pool.canceller());
            Box::new(Sampler {
                name: name.to_string(),
                api: known.map(|k| pool.client_like(k)),
                pool,
                vcpus,
                last_cpu: None,
                disk: None,
            })
        });
        sampler.vcpus = vcpus;
        let shared = Arc::clone(&self.shared);
        let spawned = thread::Builder::new()
            .name(format!("usage-{}", &name[..name.len().min(8)]))
            .stack_size(256 * 1024)
            .spawn(move || {
                sampler.sample(life, &shared);
                sampler
            });
        match spawned {
            Ok(t) => self.busy = Some(t),
            Err(e) => warn!("{name}: usage sampling thread: {e}"),
        }
    }
}

impl Drop for Sampling {
    /// Interrupts a sample being taken and joins its thread.
    fn drop(&mut self) {
        if let Some(t) = self.busy.take() {
            if !t.is_finished()
                && let Some(c) = &self.canceller
            {
                c.cancel();
            }
            let _ = t.join();
        }
    }
}

/// A sampler's state between samples.
#[derive(Debug)]
struct Sampler {
    name: String,
    pool: CancellablePool,
    /// On `pool`: made with the instance's API version when it had one,
    /// else connected lazily (the engine may be down).
    api: Option<DockerApi>,
    vcpus: u32,
    /// The previous CPU figure (life, when, total CPU ns) for CPU %.
    last_cpu: Option<(u64, Instant, u64)>,
    /// The last disk figure (when sampled, MB), reused for
    /// [`DISK_SAMPLE_PERIOD`].
    disk: Option<(Instant, Option<i64>)>,
}

impl Sampler {
    /// Takes one sample and hands it to the instance thread, unless the
    /// container's `life` ended meanwhile.
    fn sample(&mut self, life: u64, shared: &Mutex<Shared>) {
        let usage = self.usage(life);
        if self.pool.cancelled() {
            return;
        }
        let Ok(mut sh) = shared.lock() else {
            return;
        };
        // Begun before a start or stop: it would describe the previous life.
        if sh.life != life {
            return;
        }
        sh.latest = usage;
        if let Some(events) = &sh.events {
            // Unbounded; fails only when the instance thread is gone.
            let _ = events.send(MonitorEvent::Usage(Box::new(usage)));
        }
    }

    fn usage(&mut self, life: u64) -> Usage {
        let api = match &self.api {
            Some(a) => a.clone(),
            None => match self.pool.connect() {
                Ok(a) => {
                    self.api = Some(a.clone());
                    a
                }
                Err(e) => {
                    debug!("{}: usage: {e}", self.name);
                    return Usage::default();
                }
            },
        };
        // The writable layer outlives a stop, so it is reported either way.
        let disk_mb = self.disk_mb(&api);
        let stats = match api.container_stats_once(&self.name) {
            Ok(Some(s)) => s,
            Ok(None) => {
                return Usage {
                    disk_mb,
                    ..Usage::default()
                };
            }
            Err(e) => {
                debug!("{}: stats: {e}", self.name);
                return Usage {
                    disk_mb,
                    ..Usage::default()
                };
            }
        };
        let now = Instant::now();
        // CPU % of the instance's vCPUs between this sample and the last.
        let cpu = match (stats.cpu_total_usage_ns, self.last_cpu) {
            (Some(ns), Some((l, then, prev))) if l == life && ns >= prev => {
                let wall = now.duration_since(then).as_nanos() as f64;
                let vcpus = f64::from(self.vcpus.max(1));
                (wall > 0.0).then(|| ((ns - prev) as f64 / wall * 100.0 / vcpus).round() as i64)
            }
            _ => None,
        };
        self.last_cpu = stats.cpu_total_usage_ns.map(|ns| (life, now, ns));
        Usage {
            memory_mb: Some((stats.memory_usage_bytes >> 20) as i64),
            disk_mb,
            cpu_percent: cpu,
        }
    }

    /// The container's writable layer in MB, asked of the engine at most
    /// once per [`DISK_SAMPLE_PERIOD`].
    fn disk_mb(&mut self, api: &DockerApi) -> Option<i64> {
        let now = Instant::now();
        if let Some((at, mb)) = self.disk
            && now.duration_since(at) < DISK_SAMPLE_PERIOD
        {
            return mb;
        }
        let mb = match api.container_size(&self.name) {
            Ok(size) => size.and_then(|s| s.rw_bytes).map(bytes_to_mb),
            Err(e) => {
                debug!("{}: size: {e}", self.name);
                None
            }
        };
        self.disk = Some((now, mb));
        mb
    }
}

/// Bytes in decimal MB, as the node's disk figures (`nodestats`).
fn bytes_to_mb(bytes: u64) -> i64 {
    i64::try_from(bytes / 1_000_000).unwrap_or(i64::MAX)
}

/// The monitor thread's body.
fn watch(
    mut api: Option<DockerApi>,
    socket: &Path,
    name: &str,
    events: &Sender<MonitorEvent>,
    stop: &Receiver<()>,
    slot: &std::sync::Mutex<Option<WaitCanceller>>,
) {
    let mut announced = false;
    let mut delay = FIRST_RETRY;
    // Failed attempts in a row: the first is a warning, the retries only
    // debug lines (an engine down for long would flood the log otherwise).
    let mut failures = 0u32;
    let failed = |failures: &mut u32, what: &str, e: &DockerError, delay: Duration| {
        if *failures == 0 {
            warn!("{name}: {what}: {e}; retrying in {delay:?}, with backoff");
        } else {
            debug!("{name}: {what}: {e}; retrying in {delay:?}");
        }
        *failures += 1;
    };
    loop {
        // (Re)connect: the engine may be restarting. Every retry starts from
        // a fresh connection.
        let a = match api.take() {
            Some(a) => a,
            None => match DockerApi::connect(socket) {
                Ok(a) => a,
                Err(e) => {
                    failed(&mut failures, "docker engine unreachable", &e, delay);
                    if backoff(stop, &mut delay) {
                        return;
                    }
                    continue;
                }
            },
        };
        match a.container_inspect(name) {
            Ok(Some(info)) if info.running => {
                let back = failures > 0;
                if back {
                    info!("{name}: docker engine reachable again, container running");
                }
                failures = 0;
                delay = FIRST_RETRY;
                // Again after the engine was away: the instance thread then
                // checks that the container still has its tenant NIC.
                if !announced || back {
                    announced = true;
                    let _ = events.send(MonitorEvent::Running);
                }
            }
            Ok(Some(info)) => {
                let _ = events.send(MonitorEvent::Exited(format!(
                    "container {} (exit code {})",
                    info.status, info.exit_code
                )));
                return;
            }
            Ok(None) => {
                let _ = events.send(MonitorEvent::Vanished(format!(
                    "container {name} not found"
                )));
                return;
            }
            Err(e) => {
                failed(&mut failures, "inspect", &e, delay);
                if backoff(stop, &mut delay) {
                    return;
                }
                continue;
            }
        }
        let waiter = a.waiter();
        if let Ok(mut s) = slot.lock() {
            *s = Some(waiter.canceller());
        }
        // Detached meanwhile: do not block.
        if matches!(
            stop.try_recv(),
            Err(crossbeam_channel::TryRecvError::Disconnected)
        ) {
            return;
        }
        let waited = waiter.wait(name);
        // Done waiting: nothing for the handle to cancel any more (cancelling
        // shuts the agent down, which lingers), so clear it before reporting.
        if let Ok(mut s) = slot.lock() {
            *s = None;
        }
        match waited {
            Ok(code) => {
                let _ = events.send(MonitorEvent::Exited(format!(
                    "container exited with code {code}"
                )));
                return;
            }
            Err(DockerError::Cancelled) => return,
            Err(e) => {
                failed(
                    &mut failures,
                    "wait (re-reading the container's state)",
                    &e,
                    delay,
                );
                if backoff(stop, &mut delay) {
                    return;
                }
            }
        }
    }
}

/// The monitor's first retry delay after the engine failed it.
const FIRST_RETRY: Duration = Duration::from_millis(200);

/// Waits `delay` (doubling up to 5 s) unless detached; true if detached.
fn backoff(stop: &Receiver<()>, delay: &mut Duration) -> bool {
    let d = *delay;
    *delay = (*delay * 2).min(Duration::from_secs(5));
    select! {
        recv(stop) -> _ => true,
        default(d) => false,
    }
}

#[derive(Debug)]
struct DockerMonitor {
    name: String,
    api: Option<DockerApi>,
    socket: PathBuf,
    stop_timeout: Duration,
    /// Dropped to detach the monitor thread.
    stop_tx: Option<Sender<()>>,
    waiter: std::sync::Arc<std::sync::Mutex<Option<WaitCanceller>>>,
    thread: Option<JoinHandle<()>>,
}

impl Monitor for DockerMonitor {
    /// DELETE force-removes, as `docker rm -f` (and ciao, which killed).
    fn kill(&mut self) -> Result<(), VirtError> {
        info!("{}: killing the container", self.name);
        match self.api()?.container_kill(&self.name) {
            Ok(()) => Ok(()),
            // Not running (it exited meanwhile): its exit reaches the
            // monitor through /wait, as the kill's would.
            Err(DockerError::Api { status: 409, .. }) => Ok(()),
            Err(e) => Err(verr("kill container", e)),
        }
    }

    fn stop(&mut self) -> Result<(), VirtError> {
        let api = self.api()?;
        let secs = u32::try_from(self.stop_timeout.as_secs()).unwrap_or(u32::MAX);
        info!("{}: stopping the container (timeout {secs} s)", self.name);
        api.container_stop(&self.name, secs)
            .map_err(|e| verr("stop container", e))
    }
}

impl DockerMonitor {
    fn api(&self) -> Result<DockerApi, VirtError> {
        match &self.api {
            Some(a) => Ok(a.clone()),
            None => DockerApi::connect(&self.socket).map_err(|e| verr("docker engine", e)),
        }
    }
}

impl Drop for DockerMonitor {
    /// Detaches: the container keeps running.
    fn drop(&mut self) {
        self.stop_tx.take();
        // Only a monitor still blocked in /wait needs cancelling (and
        // cancelling shuts its HTTP agent down, which is not free).
        let running = self.thread.as_ref().is_some_and(|t| !t.is_finished());
        if running
            && let Ok(s) = self.waiter.lock()
            && let Some(c) = s.as_ref()
        {
            c.cancel();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A stand-in engine on a unix socket: `/version`, inspect with sizes,
    /// and stats that answer only when the test opens `gate` (as the real
    /// engine answers only at its collector's next tick).
    struct FakeEngine {
        dir: PathBuf,
        socket: PathBuf,
        stop: Arc<AtomicBool>,
        size_calls: Arc<AtomicUsize>,
        accept: Option<JoinHandle<()>>,
    }

    impl FakeEngine {
        fn start(gate: Receiver<()>) -> FakeEngine {
            let id = uuid::Uuid::new_v4().simple().to_string();
            let dir = std::env::temp_dir().join(format!("ciao-fake-docker-{}", &id[..12]));
            std::fs::create_dir_all(&dir).expect("dir");
            let socket = dir.join("docker.sock");
            let listener = UnixListener::bind(&socket).expect("bind");
            let stop = Arc::new(AtomicBool::new(false));
            let size_calls = Arc::new(AtomicUsize::new(0));
            let (st, sc) = (Arc::clone(&stop), Arc::clone(&size_calls));
            let accept = thread::spawn(move || {
                for conn in listener.incoming() {
                    if st.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let (gate, sc) = (gate.clone(), Arc::clone(&sc));
                    // Ends when the client closes the connection.
                    thread::spawn(move || serve(conn, &gate, &sc));
                }
            });
            FakeEngine {
                dir,
                socket,
                stop,
                size_calls,
                accept: Some(accept),
            }
        }
    }

    impl Drop for FakeEngine {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            // Wakes the accept loop so that it sees the flag.
            let _ = UnixStream::connect(&self.socket);
            if let Some(t) = self.accept.take() {
                let _ = t.join();
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn serve(conn: UnixStream, gate: &Receiver<()>, size_calls: &AtomicUsize) {
        let Ok(mut out) = conn.try_clone() else {
            return;
        };
        let mut lines = BufReader::new(conn).lines();
        while let Some(Ok(request)) = lines.next() {
            // GETs only: no body after the headers.
            while lines.next().is_some_and(|l| l.is_ok_and(|l| !l.is_empty())) {}
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let body = if path == "/version" {
                r#"{"ApiVersion":"1.41","MinAPIVersion":"1.12","Version":"fake"}"#
            } else if path.contains("/stats?") {
                if gate.recv_timeout(Duration::from_secs(20)).is_err() {
                    return;
                }
                r#"{"memory_stats":{"usage":3145728},"cpu_stats":{"cpu_usage":{"total_usage":1000}}}"#
            } else if path.contains("/json?size=true") {
                size_calls.fetch_add(1, Ordering::SeqCst);
                r#"{"Id":"c","SizeRw":5242880,"SizeRootFs":9000000}"#
            } else {
                return;
            };
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            if out.write_all(head.as_bytes()).is_err() || out.write_all(body.as_bytes()).is_err() {
                return;
            }
        }
    }

    const SAMPLED: Usage = Usage {
        memory_mb: Some(3),
        disk_mb: Some(5),
        cpu_percent: None,
    };

    #[test]
    fn usage_is_sampled_off_the_calling_thread() {
        let (gate, gate_rx) = crossbeam_channel::bounded::<()>(0);
        let engine = FakeEngine::start(gate_rx);
        let (events, rx) = crossbeam_channel::unbounded();
        let mut s = Sampling::default();
        s.events(events);

        // The engine holds the stats call, yet the caller gets an answer now.
        s.request("c", &engine.socket, None, 1);
        assert_eq!(s.latest(), Usage::default());
        // A second request while one is under way starts nothing.
        s.request("c", &engine.socket, None, 1);
        gate.send(()).expect("stats answered");
        let ev = rx.recv_timeout(Duration::from_secs(10)).expect("a sample");
        assert_eq!(ev, MonitorEvent::Usage(Box::new(SAMPLED)));
        assert_eq!(s.latest(), SAMPLED);
        // (It may still be ending after sending.)
        let t = s.busy.take().expect("the first sample");
        s.idle = Some(t.join().expect("sampler"));

        // A sample begun before the container stopped is dropped; the disk
        // figure is kept, and reused (not asked again within 10 s).
        s.request("c", &engine.socket, None, 1);
        s.new_life(true);
        gate.send(()).expect("stats answered");
        s.busy
            .take()
            .expect("a sample under way")
            .join()
            .expect("sampler");
        assert!(rx.try_recv().is_err(), "stale sample delivered");
        assert_eq!(
            s.latest(),
            Usage {
                disk_mb: Some(5),
                ..Usage::default()
            }
        );
        assert_eq!(engine.size_calls.load(Ordering::SeqCst), 1);

        // Dropped while the engine holds a sample: interrupted, not waited for.
        s.request("c", &engine.socket, None, 1);
        let t = Instant::now();
        drop(s);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    #[test]
    fn unreachable_engine_is_an_unknown_sample() {
        let (events, rx) = crossbeam_channel::unbounded();
        let mut s = Sampling::default();
        s.events(events);
        s.request("c", Path::new("/nonexistent/ciao/docker.sock"), None, 1);
        let ev = rx.recv_timeout(Duration::from_secs(10)).expect("a sample");
        assert_eq!(ev, MonitorEvent::Usage(Box::default()));
    }

    #[test]
    fn command_from_cloud_init() {
        let ud = "#cloud-config\nruncmd:\n  - [ /bin/sh, -c, \"echo hi > /tmp/m; sleep 60\" ]\n  - [ ignored ]\n";
        assert_eq!(
            first_runcmd(ud),
            ["/bin/sh", "-c", "echo hi > /tmp/m; sleep 60"]
        );
        assert_eq!(
            first_runcmd("runcmd:\n  - touch /x\n"),
            ["sh", "-c", "touch /x"]
        );
        assert!(first_runcmd("#cloud-config\n").is_empty());
        assert!(first_runcmd("runcmd: [[").is_empty());
    }

    #[test]
    fn disk_in_decimal_mb() {
        assert_eq!(bytes_to_mb(5 * 1024 * 1024), 5);
        assert_eq!(bytes_to_mb(999_999), 0);
        assert_eq!(bytes_to_mb(u64::MAX), 18_446_744_073_709);
    }

    #[test]
    fn hostname_from_meta_data() {
        assert_eq!(hostname("{\"uuid\": \"u\", \"hostname\": \"h\"}", "i"), "h");
        assert_eq!(hostname("{\"uuid\": \"u\"}", "i"), "");
        assert_eq!(hostname("not json", "i"), "i");
    }
}
