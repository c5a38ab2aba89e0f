//! A small, blocking Docker Engine API client over the engine's Unix socket.
//!
//! # Why ureq over a Unix socket
//! The launcher is synchronous and thread-per-instance, so the client must be
//! blocking and must not pull in an async runtime. ureq 3 is a blocking
//! HTTP/1.1 client whose transport is replaceable: `UnixConnector` opens a
//! `UnixStream` to the engine socket for every connection ureq asks for, and a
//! no-op resolver (`NoResolve`) keeps ureq from doing DNS on the dummy host
//! in `http://docker/...`. ureq then handles what a hand-rolled client would
//! get wrong: chunked bodies (pull progress, `/wait`), headers flushed before
//! the body, keep-alive pooling and per-phase timeouts. The transport API is
//! marked "unversioned" by ureq, hence the `~3.5` pin in Cargo.toml.
//!
//! # API version
//! The original launcher pinned `/v1.22`, which current engines refuse (their
//! minimum is 1.24 or later). [`DockerApi::connect`] calls the unversioned
//! `GET /version` once and uses `min(ApiVersion, 1.41)`, raised to the
//! engine's `MinAPIVersion` if that is higher. 1.41 (Engine 20.10) is the
//! newest version whose request and response shapes this module was written
//! and tested against; newer engines still serve it.
//!
//! # Timeouts
//! Connecting is bounded by the kernel (a Unix connect does not wait on the
//! network). Ordinary calls get [`CALL_TIMEOUT`] end to end; `stop` gets its
//! own grace period on top; a pull gets a per-read timeout instead (a healthy
//! pull keeps sending progress, a long one may legitimately take minutes).
//!
//! # Cancelling a blocked wait
//! `POST /containers/{id}/wait` answers with its headers at once and sends the
//! body only when the container exits, so a waiting thread is blocked in a
//! socket read. A [`Waiter`] owns its *own* ureq `Agent`; the transport
//! registers every socket it opens with that agent
//! (`ConnectionDetails::register_shutdown`), and [`WaitCanceller::cancel`]
//! sets a flag and calls `Agent::shutdown()`, which shuts the socket down and
//! makes the blocked read fail at once. The flag turns that I/O error into
//! [`DockerError::Cancelled`]. The container is not touched: cancelling only
//! drops our connection. Since shutdown is per agent, one agent per waiter
//! keeps a cancel from breaking unrelated calls; a cancelled `Waiter` is
//! spent (make a new one to wait again).

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde_json::{Map, Value, json};
use ureq::Agent;
use ureq::http::Response;
use ureq::unversioned::resolver::{ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, LazyBuffers, NextTimeout, ShutdownHandle, Transport,
};

/// End-to-end bound of an ordinary API call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Per-read bound while a pull streams progress.
pub const PULL_READ_TIMEOUT: Duration = Duration::from_secs(120);
/// Newest API version this client speaks.
pub const MAX_API_VERSION: ApiVersion = ApiVersion(1, 41);
/// Bound on receiving the headers of `/wait` (the engine sends them at once).
const WAIT_HEADERS_TIMEOUT: Duration = Duration::from_secs(30);
/// Per-connection buffers. ureq's defaults (128 KiB each way) are allocated
/// zero-filled, so every connection made them resident: a container's
/// instance, `/wait` and sampler connections held ~0.75 MB, in the malloc
/// arenas of the threads that made them. The engine's answer headers are a
/// few hundred bytes, and bodies stream through the input buffer; requests
/// are a header and a small JSON body.
const INPUT_BUFFER: usize = 16 * 1024;
const OUTPUT_BUFFER: usize = 4 * 1024;

/// Why a Docker call failed.
#[derive(Debug)]
pub enum DockerError {
    /// The engine socket could not be reached (missing, refused, no permission).
    Connect(String),
    /// The engine answered with an error; `message` is Docker's JSON `message`
    /// (or the `error` of a failed pull stream, with status 200).
    Api { status: u16, message: String },
    /// 404: the container or image does not exist (Docker's message).
    NotFound(String),
    /// The engine's answer could not be understood, or the connection broke.
    Protocol(String),
    /// A [`Waiter`] was cancelled through its [`WaitCanceller`].
    Cancelled,
}

impl fmt::Display for DockerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DockerError::Connect(m) => write!(f, "cannot reach the Docker engine: {m}"),
            DockerError::Api { status, message } => {
                write!(f, "Docker engine error (HTTP {status}): {message}")
            }
            DockerError::NotFound(m) => write!(f, "not found: {m}"),
            DockerError::Protocol(m) => write!(f, "Docker protocol error: {m}"),
            DockerError::Cancelled => f.write_str("cancelled"),
        }
    }
}

impl std::error::Error for DockerError {}

/// An Engine API version `major.minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiVersion(pub u32, pub u32);

impl ApiVersion {
    /// Parses `"1.41"`; `None` for anything else.
    pub fn parse(s: &str) -> Option<ApiVersion> {
        let (a, b) = s.trim().split_once('.')?;
        Some(ApiVersion(a.parse().ok()?, b.parse().ok()?))
    }

    /// The version to use with an engine offering `[min, max]`.
    pub fn negotiate(engine_max: ApiVersion, engine_min: ApiVersion) -> ApiVersion {
        engine_max.min(MAX_API_VERSION).max(engine_min)
    }
}

impl fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

/// What `GET /version` says, plus the version this client chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// Engine release, e.g. `20.10.24+dfsg1`.
    pub engine_version: String,
    pub api_version: ApiVersion,
    pub min_api_version: ApiVersion,
    /// The version in every request path of this client.
    pub negotiated: ApiVersion,
    pub os: String,
    pub arch: String,
}

/// An image as seen by `GET /images/{name}/json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub id: String,
    pub repo_tags: Vec<String>,
    pub size: i64,
}

/// What a container is created with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateSpec {
    pub image: String,
    /// Empty: the image's default command.
    pub cmd: Vec<String>,
    /// Empty: Docker's default (the short container id).
    pub hostname: String,
    pub labels: BTreeMap<String, String>,
    /// `HostConfig.Memory`.
    pub memory_bytes: Option<i64>,
    /// CPU limit in 1e-9 CPUs (`HostConfig.NanoCpus`; 500_000_000 = half a CPU).
    pub nano_cpus: Option<i64>,
    /// `HostConfig.NetworkMode = "none"`.
    pub network_none: bool,
    pub privileged: bool,
    /// `KEY=value` entries.
    pub env: Vec<String>,
    /// `HostConfig.Dns`: name servers for the container's resolv.conf.
    pub dns: Vec<String>,
}

/// A container as seen by `GET /containers/{id}/json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    /// Without Docker's leading `/`.
    pub name: String,
    pub image: String,
    pub running: bool,
    /// `created`, `running`, `exited`, …
    pub status: String,
    pub exit_code: i64,
    /// Host PID of the main process; 0 when not running.
    pub pid: i64,
    pub labels: BTreeMap<String, String>,
    /// `HostConfig.Memory` (0 = unlimited).
    pub memory_limit: i64,
    /// `HostConfig.NanoCpus` (0 = unset).
    pub nano_cpus: i64,
    /// `HostConfig.CpuQuota` / `CpuPeriod` (0 = unset).
    pub cpu_quota: i64,
    pub cpu_period: i64,
    pub network_mode: String,
}

/// One entry of `GET /containers/json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSummary {
    pub id: String,
    /// As Docker lists them, with the leading `/`.
    pub names: Vec<String>,
    /// `created`, `running`, `exited`, …
    pub state: String,
    pub labels: BTreeMap<String, String>,
}

/// What `GET /containers/{id}/json?size=true` says of a container's file
/// systems, in bytes; `None` where the engine gives no (or a negative,
/// i.e. failed) figure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContainerSize {
    /// `SizeRw`: what the container wrote (its writable layer).
    pub rw_bytes: Option<u64>,
    /// `SizeRootFs`: image and writable layer together.
    pub root_fs_bytes: Option<u64>,
}

/// One stats sample of a container.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerStats {
    /// `memory_stats.usage`: the cgroup's usage including page cache, the
    /// number the original launcher reported.
    pub memory_usage_bytes: u64,
    /// `memory_stats.limit` (the host's memory when unlimited).
    pub memory_limit_bytes: Option<u64>,
    /// Cumulative CPU time of the container, ns.
    pub cpu_total_usage_ns: Option<u64>,
    /// Host CPUs online, as Docker reports them.
    pub online_cpus: Option<u32>,
    /// CPU use between Docker's previous and this sample, as the `docker
    /// stats` CLI computes it: `Δcontainer / Δsystem × online CPUs × 100`, so
    /// 100.0 is one host CPU fully used. `None` when Docker has no previous
    /// sample. Divide by the container's CPU limit in CPUs (see
    /// [`ContainerStats::cpu_percent_of_limit`]) for "percent of its quota".
    pub cpu_percent: Option<f64>,
}

impl ContainerStats {
    /// [`cpu_percent`](Self::cpu_percent) relative to a limit of `cpus`
    /// CPUs (e.g. 0.5), i.e. 100.0 = the whole quota used.
    pub fn cpu_percent_of_limit(&self, cpus: f64) -> Option<f64> {
        if cpus > 0.0 {
            self.cpu_percent.map(|p| p / cpus)
        } else {
            None
        }
    }
}

/// A blocking Engine API client. Cheap to clone: clones share one connection
/// pool.
#[derive(Debug, Clone)]
pub struct DockerApi {
    agent: Agent,
    socket: PathBuf,
    version: VersionInfo,
}

impl DockerApi {
    /// Connects to the engine at `socket` and negotiates the API version.
    pub fn connect(socket: &Path) -> Result<DockerApi, DockerError> {
        DockerApi::connect_on(new_agent(socket, Some(CALL_TIMEOUT)), socket)
    }

    fn connect_on(agent: Agent, socket: &Path) -> Result<DockerApi, DockerError> {
        let resp = agent
            .get("http://docker/version")
            .call()
            .map_err(|e| map_ureq(e, socket))?;
        let v = expect_json(resp, socket)?;
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let api_version = ApiVersion::parse(&s("ApiVersion")).ok_or_else(|| {
            DockerError::Protocol(format!("GET /version: no usable ApiVersion in {v}"))
        })?;
        // Engines older than 1.25 do not report a minimum; they accept anything.
        let min_api_version = ApiVersion::parse(&s("MinAPIVersion")).unwrap_or(ApiVersion(1, 12));
        let negotiated = ApiVersion::negotiate(api_version, min_api_version);
        let version = VersionInfo {
            engine_version: s("Version"),
            api_version,
            min_api_version,
            negotiated,
            os: s("Os"),
            arch: s("Arch"),
        };
        log::debug!(
            "docker {}: engine {} API {} (min {}), using {}",
            socket.display(),
            version.engine_version,
            api_version,
            min_api_version,
            negotiated
        );
        Ok(DockerApi {
            agent,
            socket: socket.to_path_buf(),
            version,
        })
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// What the engine reported at connect time, with the negotiated version.
    pub fn version(&self) -> &VersionInfo {
        &self.version
    }

    fn url(&self, path: &str) -> String {
        format!("http://docker/v{}{path}", self.version.negotiated)
    }

    fn err(&self, e: ureq::Error) -> DockerError {
        map_ureq(e, &self.socket)
    }

    /// `GET /images/{name}/json`; `None` when the image is not present.
    pub fn image_inspect(&self, name: &str) -> Result<Option<ImageInfo>, DockerError> {
        let resp = self
            .agent
            .get(self.url(&format!("/images/{}/json", encode_path(name, true))))
            .call()
            .map_err(|e| self.err(e))?;
        let Some(v) = expect_json_opt(resp, &self.socket)? else {
            return Ok(None);
        };
        Ok(Some(ImageInfo {
            id: str_at(&v, &["Id"]),
            repo_tags: strings_at(&v, &["RepoTags"]),
            size: i64_at(&v, &["Size"]),
        }))
    }

    /// `POST /images/create?fromImage=…&tag=…`, reading the progress stream
    /// to its end. Progress goes to `log::debug!`; an `error`/`errorDetail`
    /// message inside the (HTTP 200) stream fails the pull.
    pub fn image_pull(&self, name: &str) -> Result<(), DockerError> {
        let (repo, tag) = split_reference(name);
        let mut req = self
            .agent
            .post(self.url("/images/create"))
            .query("fromImage", repo);
        // Without a tag the engine would pull every tag of the repository.
        if let Some(tag) = tag {
            req = req.query("tag", tag);
        }
        let resp = req
            .config()
            .timeout_per_call(None)
            .timeout_per_read(Some(PULL_READ_TIMEOUT))
            .build()
            .send_empty()
            .map_err(|e| self.err(e))?;
        let resp = check_status(resp)?;
        let reader = BufReader::new(resp.into_body().into_reader());
        for line in reader.lines() {
            let line = line.map_err(|e| {
                DockerError::Protocol(format!("reading the pull stream of {name}: {e}"))
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let msg: Value = serde_json::from_str(&line).map_err(|e| {
                DockerError::Protocol(format!("pull {name}: bad stream line {line:?}: {e}"))
            })?;
            let detail = msg
                .get("errorDetail")
                .and_then(|d| d.get("message"))
                .and_then(Value::as_str);
            let error = msg.get("error").and_then(Value::as_str);
            if let Some(message) = error.or(detail) {
                return Err(DockerError::Api {
                    status: 200,
                    message: message.to_string(),
                });
            }
            if msg.get("errorDetail").is_some() {
                return Err(DockerError::Api {
                    status: 200,
                    message: msg.to_string(),
                });
            }
            log::debug!(
                "pull {name}: {} {} {}",
                str_at(&msg, &["id"]),
                str_at(&msg, &["status"]),
                str_at(&msg, &["progress"])
            );
        }
        Ok(())
    }

    /// `POST /containers/create?name=…`; returns the new container's id.
    pub fn container_create(&self, name: &str, spec: &CreateSpec) -> Result<String, DockerError> {
        let mut host = Map::new();
        if let Some(m) = spec.memory_bytes {
            host.insert("Memory".into(), json!(m));
        }
        if let Some(n) = spec.nano_cpus {
            if self.version.negotiated >= ApiVersion(1, 25) {
                host.insert("NanoCpus".into(), json!(n));
            } else {
                // NanoCpus arrived in 1.25; express it as a CFS quota instead.
                host.insert("CpuPeriod".into(), json!(100_000));
                host.insert("CpuQuota".into(), json!(n / 10_000));
            }
        }
        if spec.network_none {
            host.insert("NetworkMode".into(), json!("none"));
        }
        if spec.privileged {
            host.insert("Privileged".into(), json!(true));
        }
        if !spec.dns.is_empty() {
            host.insert("Dns".into(), json!(spec.dns));
        }
        let mut body = Map::new();
        body.insert("Image".into(), json!(spec.image));
        if !spec.cmd.is_empty() {
            body.insert("Cmd".into(), json!(spec.cmd));
        }
        if !spec.hostname.is_empty() {
            body.insert("Hostname".into(), json!(spec.hostname));
        }
        if !spec.env.is_empty() {
            body.insert("Env".into(), json!(spec.env));
        }
        body.insert("Labels".into(), json!(spec.labels));
        body.insert("HostConfig".into(), Value::Object(host));
        // A tenant container (name servers given) keeps Docker's sandbox:
        // with NetworkDisabled the engine writes no resolv.conf.
        if spec.network_none && spec.dns.is_empty() {
            body.insert("NetworkDisabled".into(), json!(true));
        }
        let body = Value::Object(body).to_string();
        let resp = self
            .agent
            .post(self.url("/containers/create"))
            .query("name", name)
            .content_type("application/json")
            .send(body.as_bytes())
            .map_err(|e| self.err(e))?;
        let v = expect_json(resp, &self.socket)?;
        for w in strings_at(&v, &["Warnings"]) {
            log::warn!("docker create {name}: {w}");
        }
        match v.get("Id").and_then(Value::as_str) {
            Some(id) if !id.is_empty() => Ok(id.to_string()),
            _ => Err(DockerError::Protocol(format!(
                "create {name}: no Id in the answer {v}"
            ))),
        }
    }

    fn post_empty(&self, path: &str, query: &[(&str, &str)]) -> Result<(), DockerError> {
        let mut req = self.agent.post(self.url(path));
        for (k, v) in query {
            req = req.query(*k, *v);
        }
        let resp = req.send_empty().map_err(|e| self.err(e))?;
        check_status(resp).map(drop)
    }

    /// `POST /containers/{id}/start`; starting a running container is a no-op.
    pub fn container_start(&self, id: &str) -> Result<(), DockerError> {
        self.post_empty(
            &format!("/containers/{}/start", encode_path(id, false)),
            &[],
        )
    }

    /// `POST /containers/{id}/stop?t=…`: SIGTERM, then SIGKILL after
    /// `timeout_secs`. Stopping a stopped container is a no-op.
    pub fn container_stop(&self, id: &str, timeout_secs: u32) -> Result<(), DockerError> {
        let t = timeout_secs.to_string();
        let resp = self
            .agent
            .post(self.url(&format!("/containers/{}/stop", encode_path(id, false))))
            .query("t", &t)
            .config()
            // The engine answers only once the container is gone.
            .timeout_per_call(Some(
                CALL_TIMEOUT + Duration::from_secs(timeout_secs.into()),
            ))
            .build()
            .send_empty()
            .map_err(|e| self.err(e))?;
        check_status(resp).map(drop)
    }

    /// `POST /containers/{id}/kill?signal=KILL` (409 if it is not running).
    pub fn container_kill(&self, id: &str) -> Result<(), DockerError> {
        self.post_empty(
            &format!("/containers/{}/kill", encode_path(id, false)),
            &[("signal", "KILL")],
        )
    }

    /// `DELETE /containers/{id}?force=…&v=…`. `NotFound` if it does not exist.
    pub fn container_remove(
        &self,
        id: &str,
        force: bool,
        volumes: bool,
    ) -> Result<(), DockerError> {
        let resp = self
            .agent
            .delete(self.url(&format!("/containers/{}", encode_path(id, false))))
            .query("force", if force { "1" } else { "0" })
            .query("v", if volumes { "1" } else { "0" })
            .call()
            .map_err(|e| self.err(e))?;
        check_status(resp).map(drop)
    }

    /// `GET /containers/{id}/json`; `None` when there is no such container.
    pub fn container_inspect(&self, id: &str) -> Result<Option<ContainerInfo>, DockerError> {
        let resp = self
            .agent
            .get(self.url(&format!("/containers/{}/json", encode_path(id, false))))
            .call()
            .map_err(|e| self.err(e))?;
        let Some(v) = expect_json_opt(resp, &self.socket)? else {
            return Ok(None);
        };
        let id = str_at(&v, &["Id"]);
        if id.is_empty() {
            return Err(DockerError::Protocol(format!("inspect: no Id in {v}")));
        }
        let name = str_at(&v, &["Name"]);
        Ok(Some(ContainerInfo {
            id,
            name: name.strip_prefix('/').unwrap_or(&name).to_string(),
            image: str_at(&v, &["Config", "Image"]),
            running: v
                .pointer("/State/Running")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            status: str_at(&v, &["State", "Status"]),
            exit_code: i64_at(&v, &["State", "ExitCode"]),
            pid: i64_at(&v, &["State", "Pid"]),
            labels: labels_at(&v, &["Config", "Labels"]),
            memory_limit: i64_at(&v, &["HostConfig", "Memory"]),
            nano_cpus: i64_at(&v, &["HostConfig", "NanoCpus"]),
            cpu_quota: i64_at(&v, &["HostConfig", "CpuQuota"]),
            cpu_period: i64_at(&v, &["HostConfig", "CpuPeriod"]),
            network_mode: str_at(&v, &["HostConfig", "NetworkMode"]),
        }))
    }

    /// `GET /containers/{id}/json?size=true`: the sizes of the container's
    /// file systems; `None` when there is no such container. The engine
    /// computes them on every call (the vfs driver walks the whole tree), so
    /// callers should not ask often.
    pub fn container_size(&self, id: &str) -> Result<Option<ContainerSize>, DockerError> {
        let resp = self
            .agent
            .get(self.url(&format!("/containers/{}/json", encode_path(id, false))))
            .query("size", "true")
            .call()
            .map_err(|e| self.err(e))?;
        Ok(expect_json_opt(resp, &self.socket)?.map(|v| parse_size(&v)))
    }

    /// `GET /containers/json?all=1` filtered on the label `key=value`.
    pub fn containers_by_label(
        &self,
        key: &str,
        value: &str,
    ) -> Result<Vec<ContainerSummary>, DockerError> {
        let filters = json!({ "label": [format!("{key}={value}")] }).to_string();
        let resp = self
            .agent
            .get(self.url("/containers/json"))
            .query("all", "1")
            .query("filters", &filters)
            .call()
            .map_err(|e| self.err(e))?;
        let v = expect_json(resp, &self.socket)?;
        let list = v.as_array().ok_or_else(|| {
            DockerError::Protocol(format!("GET /containers/json: not an array: {v}"))
        })?;
        Ok(list
            .iter()
            .map(|c| ContainerSummary {
                id: str_at(c, &["Id"]),
                names: strings_at(c, &["Names"]),
                state: str_at(c, &["State"]),
                labels: labels_at(c, &["Labels"]),
            })
            .collect())
    }

    /// One `GET /containers/{id}/stats?stream=false` sample. `Ok(None)` when
    /// the sample carries no memory figure yet (right after start, or when the
    /// container is not running); `NotFound` when there is no such container.
    /// From API 1.41 on it asks for `one-shot`: without it the engine waits
    /// about a second for a second CPU sample, which would block the caller
    /// (an instance thread) for that long; `cpu_percent` is then `None` and
    /// callers compute CPU use from successive `cpu_total_usage_ns`.
    pub fn container_stats_once(&self, id: &str) -> Result<Option<ContainerStats>, DockerError> {
        let mut req = self
            .agent
            .get(self.url(&format!("/containers/{}/stats", encode_path(id, false))))
            .query("stream", "false");
        if self.version.negotiated >= ApiVersion(1, 41) {
            req = req.query("one-shot", "true");
        }
        let resp = req.call().map_err(|e| self.err(e))?;
        let v = expect_json(resp, &self.socket)?;
        Ok(parse_stats(&v))
    }

    /// A waiter on its own connection pool, so it can be cancelled alone.
    pub fn waiter(&self) -> Waiter {
        Waiter {
            agent: new_agent(&self.socket, None),
            base: self.url(""),
            socket: self.socket.clone(),
            cancelled: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// The sizes in an inspect document. The engine reports -1 when its storage
/// driver failed to compute a size.
fn parse_size(v: &Value) -> ContainerSize {
    let size = |k: &str| {
        v.get(k)
            .and_then(Value::as_i64)
            .and_then(|n| u64::try_from(n).ok())
    };
    ContainerSize {
        rw_bytes: size("SizeRw"),
        root_fs_bytes: size("SizeRootFs"),
    }
}

/// Turns a stats document into a sample; `None` when it has no memory usage.
fn parse_stats(v: &Value) -> Option<ContainerStats> {
    let u64_ptr = |p: &str| v.pointer(p).and_then(Value::as_u64);
    let memory_usage_bytes = u64_ptr("/memory_stats/usage").filter(|&u| u > 0)?;
    let cpu_total = u64_ptr("/cpu_stats/cpu_usage/total_usage");
    let online_cpus = u64_ptr("/cpu_stats/online_cpus")
        .filter(|&n| n > 0)
        .or_else(|| {
            // Engines before 1.27 only list per-CPU usage.
            v.pointer("/cpu_stats/cpu_usage/percpu_usage")
                .and_then(Value::as_array)
                .map(|a| a.len() as u64)
                .filter(|&n| n > 0)
        })
        .and_then(|n| u32::try_from(n).ok());
    let cpu_percent = (|| {
        let cur = cpu_total?;
        let pre = u64_ptr("/precpu_stats/cpu_usage/total_usage")?;
        let sys = u64_ptr("/cpu_stats/system_cpu_usage")?;
        let presys = u64_ptr("/precpu_stats/system_cpu_usage")?;
        let cpus = online_cpus?;
        // A zero previous system figure means Docker had no previous sample.
        if presys == 0 || sys <= presys || cur < pre {
            return None;
        }
        Some((cur - pre) as f64 / (sys - presys) as f64 * f64::from(cpus) * 100.0)
    })();
    Some(ContainerStats {
        memory_usage_bytes,
        memory_limit_bytes: u64_ptr("/memory_stats/limit"),
        cpu_total_usage_ns: cpu_total,
        online_cpus,
        cpu_percent,
    })
}

/// Blocks on `POST /containers/{id}/wait`; see the module docs.
#[derive(Debug)]
pub struct Waiter {
    agent: Agent,
    base: String,
    socket: PathBuf,
    cancelled: Arc<AtomicBool>,
}

/// A connection pool of its own for a client that another thread may need
/// to interrupt (through [`CancellablePool::canceller`]), e.g. one that
/// samples usage on behalf of a thread that must not wait for it. The
/// canceller exists before the client connects, so even a connect to a hung
/// engine can be interrupted.
#[derive(Debug)]
pub struct CancellablePool {
    agent: Agent,
    socket: PathBuf,
    cancelled: Arc<AtomicBool>,
}

impl CancellablePool {
    pub fn new(socket: &Path) -> CancellablePool {
        CancellablePool {
            agent: new_agent(socket, Some(CALL_TIMEOUT)),
            socket: socket.to_path_buf(),
            cancelled: Arc::new(AtomicBool::new(false)),
        }
    }

    /// [`DockerApi::connect`] on this pool: every call of the client it
    /// returns fails at once after a cancel, as does this one.
    pub fn connect(&self) -> Result<DockerApi, DockerError> {
        if self.cancelled() {
            return Err(DockerError::Cancelled);
        }
        DockerApi::connect_on(self.agent.clone(), &self.socket).map_err(|e| {
            if self.cancelled() {
                DockerError::Cancelled
            } else {
                e
            }
        })
    }

    /// A client on this pool that speaks the version `known` negotiated with
    /// the same engine, without asking the engine again.
    pub fn client_like(&self, known: &DockerApi) -> DockerApi {
        DockerApi {
            agent: self.agent.clone(),
            socket: self.socket.clone(),
            version: known.version.clone(),
        }
    }

    /// True once the pool was cancelled (its clients' errors are due to that).
    pub fn cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// A handle that cancels this pool.
    pub fn canceller(&self) -> WaitCanceller {
        WaitCanceller {
            agent: self.agent.clone(),
            cancelled: self.cancelled.clone(),
        }
    }
}

/// Cancels the [`Waiter`] or [`CancellablePool`] it came from, from any
/// thread.
#[derive(Debug, Clone)]
pub struct WaitCanceller {
    agent: Agent,
    cancelled: Arc<AtomicBool>,
}

impl WaitCanceller {
    /// Makes the waiter's blocked (or next) `wait` return
    /// [`DockerError::Cancelled`], or the pool's calls fail. The container is
    /// left alone.
    pub fn cancel(&self) {
        // The flag first, so the waiter sees it when its read fails.
        self.cancelled.store(true, Ordering::SeqCst);
        self.agent.clone().shutdown();
    }
}

impl Waiter {
    /// A handle that cancels this waiter.
    pub fn canceller(&self) -> WaitCanceller {
        WaitCanceller {
            agent: self.agent.clone(),
            cancelled: self.cancelled.clone(),
        }
    }

    /// Blocks until the container is not running and returns its exit code
    /// (`condition=not-running`: at once if it already exited, and also for
    /// a container created but not yet started, so wait after starting).
    /// `NotFound` if it does not exist.
    pub fn wait(&self, id: &str) -> Result<i64, DockerError> {
        let cancelled = || self.cancelled.load(Ordering::SeqCst);
        if cancelled() {
            return Err(DockerError::Cancelled);
        }
        let result = self.wait_inner(id);
        // Whatever broke after a cancel was caused by it.
        if result.is_err() && cancelled() {
            return Err(DockerError::Cancelled);
        }
        result
    }

    fn wait_inner(&self, id: &str) -> Result<i64, DockerError> {
        let resp = self
            .agent
            .post(format!(
                "{}/containers/{}/wait",
                self.base,
                encode_path(id, false)
            ))
            .query("condition", "not-running")
            .send_empty()
            .map_err(|e| map_ureq(e, &self.socket))?;
        let v = expect_json(resp, &self.socket)?;
        if let Some(msg) = v.pointer("/Error/Message").and_then(Value::as_str)
            && !msg.is_empty()
        {
            return Err(DockerError::Api {
                status: 200,
                message: msg.to_string(),
            });
        }
        v.get("StatusCode")
            .and_then(Value::as_i64)
            .ok_or_else(|| DockerError::Protocol(format!("wait {id}: no StatusCode in {v}")))
    }
}

// ---- HTTP plumbing ---------------------------------------------------------

/// An agent whose every connection is a fresh `UnixStream` to `socket`.
/// `per_call`: the end-to-end bound of each call (`None` for the waiter).
fn new_agent(socket: &Path, per_call: Option<Duration>) -> Agent {
    let mut cfg = Agent::config_builder()
        // 4xx/5xx are answers with a JSON message, not transport errors.
        .http_status_as_error(false)
        .user_agent("ciao-launcher-rs")
        .timeout_connect(Some(Duration::from_secs(5)))
        .timeout_per_write(Some(Duration::from_secs(30)))
        .timeout_per_call(per_call)
        .input_buffer_size(INPUT_BUFFER)
        .output_buffer_size(OUTPUT_BUFFER)
        // The headers must fit the input buffer: larger ones fail naming the
        // limit instead of as a stalled read.
        .max_response_header_size(INPUT_BUFFER);
    if per_call.is_none() {
        // The waiter: the body may take forever, the headers must not.
        cfg = cfg.timeout_recv_response(Some(WAIT_HEADERS_TIMEOUT));
    }
    Agent::with_parts(cfg.build(), UnixConnector(socket.to_path_buf()), NoResolve)
}

/// Maps a ureq failure, recognising our connector's connect errors.
fn map_ureq(e: ureq::Error, socket: &Path) -> DockerError {
    if let ureq::Error::Io(io) = &e
        && let Some(c) = io.get_ref().and_then(|i| i.downcast_ref::<ConnectFailed>())
    {
        return DockerError::Connect(c.to_string());
    }
    DockerError::Protocol(format!("{} (socket {})", e, socket.display()))
}

/// Docker's error `message` from an error body (or the raw text).
fn error_message(resp: Response<ureq::Body>) -> (u16, String) {
    let status = resp.status().as_u16();
    let text = resp
        .into_body()
        .with_config()
        .limit(64 * 1024)
        .read_to_string()
        .unwrap_or_default();
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| text.trim().to_string());
    (status, message)
}

/// Passes 1xx–3xx answers; turns 404 into `NotFound`, others into `Api`.
fn check_status(resp: Response<ureq::Body>) -> Result<Response<ureq::Body>, DockerError> {
    let status = resp.status().as_u16();
    if status < 400 {
        return Ok(resp);
    }
    let (status, message) = error_message(resp);
    if status == 404 {
        Err(DockerError::NotFound(message))
    } else {
        Err(DockerError::Api { status, message })
    }
}

fn read_json(resp: Response<ureq::Body>, socket: &Path) -> Result<Value, DockerError> {
    let text = resp
        .into_body()
        .with_config()
        .limit(16 * 1024 * 1024)
        .read_to_string()
        .map_err(|e| map_ureq(e, socket))?;
    serde_json::from_str(&text).map_err(|e| {
        DockerError::Protocol(format!("invalid JSON from the engine: {e}: {text:.200}"))
    })
}

fn expect_json(resp: Response<ureq::Body>, socket: &Path) -> Result<Value, DockerError> {
    let resp = check_status(resp)?;
    read_json(resp, socket)
}

/// Like [`expect_json`], with 404 as `None`.
fn expect_json_opt(
    resp: Response<ureq::Body>,
    socket: &Path,
) -> Result<Option<Value>, DockerError> {
    match expect_json(resp, socket) {
        Ok(v) => Ok(Some(v)),
        Err(DockerError::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn str_at(v: &Value, path: &[&str]) -> String {
    at(v, path)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn i64_at(v: &Value, path: &[&str]) -> i64 {
    at(v, path).and_then(Value::as_i64).unwrap_or(0)
}

fn strings_at(v: &Value, path: &[&str]) -> Vec<String> {
    at(v, path)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn labels_at(v: &Value, path: &[&str]) -> BTreeMap<String, String> {
    at(v, path)
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// Percent-encodes a path segment; `keep_slash` for image names, whose
/// `/`s the engine's router accepts as they are.
fn encode_path(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let keep = b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~' | b':' | b'@')
            || (keep_slash && b == b'/');
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Splits `repo[:tag]` / `repo@digest`; a missing tag means `latest`.
fn split_reference(name: &str) -> (&str, Option<&str>) {
    if name.contains('@') {
        return (name, None);
    }
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    match name[last_slash..].rfind(':') {
        Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
        None => (name, Some("latest")),
    }
}

// ---- ureq transport over a Unix socket ------------------------------------

/// Why connecting to the engine socket failed (carried inside `io::Error`
/// through ureq, and recognised again in [`map_ureq`]).
#[derive(Debug)]
struct ConnectFailed {
    socket: PathBuf,
    source: io::Error,
}

impl fmt::Display for ConnectFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "connect to {}: {}", self.socket.display(), self.source)
    }
}

impl std::error::Error for ConnectFailed {}

/// Opens a `UnixStream` to the engine for each connection ureq wants.
#[derive(Debug)]
struct UnixConnector(PathBuf);

impl<In: Transport> Connector<In> for UnixConnector {
    type Out = UnixTransport;

    fn connect(
        &self,
        details: &ConnectionDetails,
        _chained: Option<In>,
    ) -> Result<Option<UnixTransport>, ureq::Error> {
        let stream = UnixStream::connect(&self.0).map_err(|source| {
            let kind = source.kind();
            ureq::Error::Io(io::Error::new(
                kind,
                ConnectFailed {
                    socket: self.0.clone(),
                    source,
                },
            ))
        })?;
        let stream = Arc::new(Sock(stream));
        // Lets Agent::shutdown() interrupt a read blocked on this socket.
        (details.register_shutdown)(Arc::downgrade(&stream) as Weak<dyn ShutdownHandle>)?;
        let config = details.config;
        Ok(Some(UnixTransport {
            stream,
            buffers: LazyBuffers::new(config.input_buffer_size(), config.output_buffer_size()),
            read_timeout: None,
            write_timeout: None,
        }))
    }
}

/// A newtype so the foreign `UnixStream` can implement ureq's `ShutdownHandle`.
#[derive(Debug)]
struct Sock(UnixStream);

impl ShutdownHandle for Sock {
    fn shutdown(&self) {
        // Errors mean the socket is already closed: nothing left to interrupt.
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

#[derive(Debug)]
struct UnixTransport {
    stream: Arc<Sock>,
    buffers: LazyBuffers,
    // Cached so a syscall is made only when the timeout changes.
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
}

/// The timeout to set on the socket, or a ureq timeout error when it is spent.
fn socket_timeout(t: NextTimeout) -> Result<Option<Duration>, ureq::Error> {
    if !t.after.is_not_happening() && t.after.is_zero() {
        return Err(ureq::Error::Timeout(t.reason));
    }
    Ok(t.not_zero().map(|d| *d))
}

fn io_to_ureq(e: io::Error, t: NextTimeout) -> ureq::Error {
    match e.kind() {
        // SO_RCVTIMEO/SO_SNDTIMEO expiry shows up as WouldBlock on Linux.
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ureq::Error::Timeout(t.reason),
        _ => ureq::Error::Io(e),
    }
}

impl Transport for UnixTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        let timeout = timeout.for_write();
        let t = socket_timeout(timeout)?;
        if t != self.write_timeout {
            self.stream.0.set_write_timeout(t)?;
            self.write_timeout = t;
        }
        let output = &self.buffers.output()[..amount];
        (&self.stream.0)
            .write_all(output)
            .map_err(|e| io_to_ureq(e, timeout))
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        let timeout = timeout.for_read();
        let t = socket_timeout(timeout)?;
        if t != self.read_timeout {
            self.stream.0.set_read_timeout(t)?;
            self.read_timeout = t;
        }
        let buf = self.buffers.input_append_buf();
        let n = loop {
            match (&self.stream.0).read(buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_to_ureq(e, timeout)),
            }
        };
        self.buffers.input_appended(n);
        Ok(n > 0)
    }

    fn is_open(&mut self) -> bool {
        // A pooled connection is usable if a non-blocking read would block:
        // no EOF and no stray bytes from the engine.
        let s = &self.stream.0;
        if s.set_nonblocking(true).is_err() {
            return false;
        }
        let mut b = [0u8; 1];
        let open = matches!((&*s).read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        open && s.set_nonblocking(false).is_ok()
    }
}

/// ureq resolves the host of every URL; `docker` is not a real host, and the
/// connector ignores addresses anyway, so hand back one placeholder.
#[derive(Debug)]
struct NoResolve;

impl Resolver for NoResolve {
    fn resolve(
        &self,
        _uri: &ureq::http::Uri,
        _config: &ureq::config::Config,
        _timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let mut addrs = self.empty();
        addrs.push(std::net::SocketAddr::from(([127, 0, 0, 1], 2375)));
        Ok(addrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_clamps_to_supported_range() {
        let v = |a, b| ApiVersion(a, b);
        assert_eq!(ApiVersion::negotiate(v(1, 41), v(1, 12)), v(1, 41));
        assert_eq!(ApiVersion::negotiate(v(1, 47), v(1, 24)), v(1, 41));
        assert_eq!(ApiVersion::negotiate(v(1, 30), v(1, 12)), v(1, 30));
        // An engine whose minimum is above our maximum: use its minimum.
        assert_eq!(ApiVersion::negotiate(v(1, 50), v(1, 44)), v(1, 44));
        assert_eq!(ApiVersion::parse("1.41"), Some(v(1, 41)));
        assert_eq!(ApiVersion::parse("x"), None);
        assert!(v(1, 9) < v(1, 10));
    }

    #[test]
    fn references_split_into_repo_and_tag() {
        assert_eq!(split_reference("busybox"), ("busybox", Some("latest")));
        assert_eq!(split_reference("a/b:1.0"), ("a/b", Some("1.0")));
        assert_eq!(
            split_reference("reg:5000/a/b"),
            ("reg:5000/a/b", Some("latest"))
        );
        assert_eq!(split_reference("a@sha256:00"), ("a@sha256:00", None));
    }

    #[test]
    fn path_encoding() {
        assert_eq!(encode_path("a/b:c", true), "a/b:c");
        assert_eq!(encode_path("a/b c", false), "a%2Fb%20c");
    }

    #[test]
    fn stats_without_memory_are_no_data() {
        assert_eq!(parse_stats(&json!({"memory_stats": {}})), None);
        assert_eq!(parse_stats(&json!({})), None);
        assert_eq!(parse_stats(&json!({"memory_stats": {"usage": "x"}})), None);
    }

    #[test]
    fn sizes_from_inspect() {
        let v = json!({"Id": "x", "SizeRw": 5_242_880, "SizeRootFs": 7_225_136});
        assert_eq!(
            parse_size(&v),
            ContainerSize {
                rw_bytes: Some(5_242_880),
                root_fs_bytes: Some(7_225_136)
            }
        );
        // Inspect without ?size=true, a failed size (-1), garbage.
        assert_eq!(parse_size(&json!({"Id": "x"})), ContainerSize::default());
        assert_eq!(
            parse_size(&json!({"SizeRw": -1, "SizeRootFs": "big"})),
            ContainerSize::default()
        );
        assert_eq!(parse_size(&json!({"SizeRw": 0})).rw_bytes, Some(0));
    }

    #[test]
    fn stats_cpu_percent() {
        let s = parse_stats(&json!({
            "memory_stats": {"usage": 1000, "limit": 4096},
            "cpu_stats": {"cpu_usage": {"total_usage": 1_500}, "system_cpu_usage": 20_000, "online_cpus": 2},
            "precpu_stats": {"cpu_usage": {"total_usage": 500}, "system_cpu_usage": 10_000}
        }))
        .expect("sample");
        assert_eq!(s.memory_usage_bytes, 1000);
        assert_eq!(s.cpu_percent, Some(20.0));
        assert_eq!(s.cpu_percent_of_limit(0.5), Some(40.0));
        // First sample: no previous system figure.
        let s = parse_stats(&json!({
            "memory_stats": {"usage": 1},
            "cpu_stats": {"cpu_usage": {"total_usage": 1}, "system_cpu_usage": 2, "online_cpus": 2},
            "precpu_stats": {"cpu_usage": {}, }
        }))
        .expect("sample");
        assert_eq!(s.cpu_percent, None);
    }

    #[test]
    fn missing_socket_is_a_connect_error_naming_it() {
        let p = Path::new("/nonexistent/ciao-test/docker.sock");
        match DockerApi::connect(p) {
            Err(DockerError::Connect(m)) => {
                assert!(m.contains("/nonexistent/ciao-test/docker.sock"), "{m}")
            }
            other => panic!("expected Connect, got {other:?}"),
        }
    }
}
