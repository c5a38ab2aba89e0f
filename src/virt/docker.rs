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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};
use log::{debug, info, warn};

use super::docker_api::{CreateSpec, DockerApi, DockerError, WaitCanceller};
use super::{Monitor, MonitorEvent, Usage, VirtError, Virtualizer, VirtualizerFactory};
use crate::payloads::config::InstanceConfig;

/// Label naming the instance a container belongs to (recovery finds them by it).
pub const LABEL_INSTANCE: &str = "org.ciao.instance";
pub const LABEL_TENANT: &str = "org.ciao.tenant";

/// How long a container's disk figure is reused before the engine is asked
/// again: computing it can be expensive (the vfs driver walks the whole
/// writable layer), unlike memory and CPU.
pub const DISK_SAMPLE_PERIOD: Duration = Duration::from_secs(10);

/// Makes Docker virtualizers that talk to one engine.
#[derive(Debug, Clone)]
pub struct DockerFactory {
    pub socket: PathBuf,
    pub stop_timeout: Duration,
}

impl VirtualizerFactory for DockerFactory {
    fn create(&self, cfg: &InstanceConfig) -> Box<dyn Virtualizer> {
        Box::new(Docker {
            socket: self.socket.clone(),
            stop_timeout: self.stop_timeout,
            cfg: cfg.clone(),
            api: None,
            last_cpu: None,
            disk: None,
        })
    }
}

/// One container.
#[derive(Debug)]
pub struct Docker {
    socket: PathBuf,
    stop_timeout: Duration,
    cfg: InstanceConfig,
    /// Connected lazily, so an engine that is down at launcher start does not
    /// prevent recovery; reconnected after errors.
    api: Option<DockerApi>,
    /// The previous CPU sample (when, total CPU ns) for CPU %.
    last_cpu: Option<(Instant, u64)>,
    /// The last disk figure (when sampled, MB), reused for
    /// [`DISK_SAMPLE_PERIOD`].
    disk: Option<(Instant, Option<i64>)>,
}

fn verr(what: &str, e: DockerError) -> VirtError {
    VirtError(format!("{what}: {e}"))
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

    fn spec(&self) -> CreateSpec {
        let mut labels = BTreeMap::new();
        labels.insert(LABEL_INSTANCE.to_string(), self.cfg.instance_uuid.clone());
        labels.insert(LABEL_TENANT.to_string(), self.cfg.tenant_uuid.clone());
        CreateSpec {
            image: self.cfg.docker_image.clone(),
            cmd: first_runcmd(&self.cfg.user_data),
            hostname: hostname(&self.cfg.meta_data, &self.cfg.instance_uuid),
            labels,
            memory_bytes: (self.cfg.mem_mb > 0)
                .then(|| (self.cfg.mem_mb as i64).saturating_mul(1 << 20)),
            nano_cpus: (self.cfg.vcpus > 0).then(|| i64::from(self.cfg.vcpus) * 1_000_000_000),
            // Tenant networking is not implemented: containers get no network.
            network_none: true,
            privileged: self.cfg.privileged,
            env: Vec::new(),
        }
    }
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
        self.last_cpu = None;
    }

    fn lost(&mut self) {
        self.last_cpu = None;
    }

    fn ensure_backing_image(&mut self) -> Result<(), VirtError> {
        if self.cfg.docker_image.is_empty() {
            return Err(VirtError("no docker_image in the START payload".into()));
        }
        let api = self.api()?;
        let image = self.cfg.docker_image.clone();
        match api.image_inspect(&image) {
            Ok(Some(_)) => Ok(()),
            Ok(None) => {
                info!("{}: pulling {image}", self.name());
                api.image_pull(&image)
                    .map_err(|e| verr(&format!("pull {image}"), e))
            }
            Err(e) => Err(verr(&format!("image {image}"), e)),
        }
    }

    fn create_image(&mut self) -> Result<(), VirtError> {
        let api = self.api()?;
        let spec = self.spec();
        api.container_create(self.name(), &spec)
            .map(|_| ())
            .map_err(|e| verr("create container", e))
    }

    fn delete_image(&mut self) -> Result<(), VirtError> {
        let api = self.api()?;
        match api.container_remove(self.name(), true, true) {
            Ok(()) | Err(DockerError::NotFound(_)) => Ok(()),
            Err(e) => Err(verr("remove container", e)),
        }
    }

    fn start(&mut self) -> Result<(), VirtError> {
        let api = self.api()?;
        api.container_start(self.name())
            .map_err(|e| verr("start container", e))
    }

    fn monitor(
        &mut self,
        events: Sender<MonitorEvent>,
        _boot: bool,
    ) -> Result<Box<dyn Monitor>, VirtError> {
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
            .map_err(|e| VirtError(format!("monitor thread: {e}")))?;
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

    fn stats(&mut self) -> Usage {
        let Ok(api) = self.api() else {
            return Usage::default();
        };
        // The writable layer outlives a stop, so it is reported either way.
        let disk_mb = self.disk_mb(&api);
        match api.container_stats_once(self.name()) {
            Ok(Some(s)) => {
                let now = Instant::now();
                // CPU % of the instance's vCPUs between this sample and the last.
                let cpu = match (s.cpu_total_usage_ns, self.last_cpu) {
                    (Some(ns), Some((then, prev))) if ns >= prev => {
                        let wall = now.duration_since(then).as_nanos() as f64;
                        let vcpus = f64::from(self.cfg.vcpus.max(1));
                        (wall > 0.0)
                            .then(|| ((ns - prev) as f64 / wall * 100.0 / vcpus).round() as i64)
                    }
                    _ => None,
                };
                self.last_cpu = s.cpu_total_usage_ns.map(|ns| (now, ns));
                Usage {
                    memory_mb: Some((s.memory_usage_bytes >> 20) as i64),
                    disk_mb,
                    cpu_percent: cpu,
                }
            }
            _ => Usage {
                disk_mb,
                ..Usage::default()
            },
        }
    }
}

impl Docker {
    /// The container's writable layer in MB, asked of the engine at most
    /// once per [`DISK_SAMPLE_PERIOD`].
    fn disk_mb(&mut self, api: &DockerApi) -> Option<i64> {
        let now = Instant::now();
        if let Some((at, mb)) = self.disk
            && now.duration_since(at) < DISK_SAMPLE_PERIOD
        {
            return mb;
        }
        let mb = match api.container_size(self.name()) {
            Ok(size) => size.and_then(|s| s.rw_bytes).map(bytes_to_mb),
            Err(e) => {
                debug!("{}: size: {e}", self.name());
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
    let mut delay = Duration::from_millis(200);
    loop {
        // (Re)connect: the engine may be restarting. Every retry starts from
        // a fresh connection.
        let a = match api.take() {
            Some(a) => a,
            None => match DockerApi::connect(socket) {
                Ok(a) => a,
                Err(e) => {
                    debug!("{name}: engine unreachable ({e}); retrying in {delay:?}");
                    if backoff(stop, &mut delay) {
                        return;
                    }
                    continue;
                }
            },
        };
        match a.container_inspect(name) {
            Ok(Some(info)) if info.running => {
                if !announced {
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
                let _ = events.send(MonitorEvent::Exited("container not found".into()));
                return;
            }
            Err(e) => {
                warn!("{name}: inspect: {e}; retrying");
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
                warn!("{name}: wait: {e}; re-reading the container's state");
                if backoff(stop, &mut delay) {
                    return;
                }
            }
        }
    }
}

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
        self.api()?
            .container_kill(&self.name)
            .map_err(|e| verr("kill container", e))
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
