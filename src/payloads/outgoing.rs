//! What the launcher sends (payloads.md §2-4, wire-2016.md), and readers of
//! the same payloads for the operator tool.
//!
//! * STATUS READY — the node's raw capacity, for the scheduler's placement
//!   (FULL and MAINTENANCE carry no payload).
//! * STATS — READY's numbers plus the status and one entry per instance,
//!   forwarded to the controllers.
//! * InstanceDeleted / InstanceStopped events — a DELETE (or a stop, an
//!   evacuation, a lost VM) completed.
//! * Failure errors — StartFailure, StopFailure, RestartFailure,
//!   DeleteFailure, AttachVolumeFailure with their reason codes.
//! * TenantAdded / TenantRemoved events — this node got the first VNIC of a
//!   tenant subnet (bridge and tunnel made) or lost its last one; the
//!   scheduler forwards them to the subnet's concentrator (CNCI).
//!
//! Writers produce yaml.v2's exact bytes: struct key order, every key
//! present, `""` and `[]` for empty values, yaml.v2 quoting.

use super::yaml::{DecodeResult, Emitter, Field};
use super::{PayloadError, Reason, parse_payload};
use crate::ssntp::Profile;

/// One compute-network interface of the node (READY/STATS `networks`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetworkInfo {
    pub ip: String,
    pub mac: String,
}

/// The node part of READY and STATS. −1 means "could not be measured".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub node_uuid: String,
    /// MiB.
    pub mem_total_mb: i64,
    /// MiB.
    pub mem_available_mb: i64,
    /// Decimal MB.
    pub disk_total_mb: i64,
    /// Decimal MB.
    pub disk_available_mb: i64,
    pub load: i64,
    pub cpus_online: i64,
    /// "" when networking is disabled.
    pub hostname: String,
    pub networks: Vec<NetworkInfo>,
}

impl NodeStatus {
    /// Every number unknown (−1), as Go's `Init()` leaves a payload before
    /// decoding or measuring.
    pub fn unknown(node_uuid: &str) -> NodeStatus {
        NodeStatus {
            node_uuid: node_uuid.to_string(),
            mem_total_mb: -1,
            mem_available_mb: -1,
            disk_total_mb: -1,
            disk_available_mb: -1,
            load: -1,
            cpus_online: -1,
            hostname: String::new(),
            networks: Vec::new(),
        }
    }
}

/// One instance in STATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceStat {
    pub instance_uuid: String,
    /// `pending`, `running` (2016) / `active` (2018), `exited`.
    pub state: String,
    pub ssh_ip: String,
    pub ssh_port: i64,
    /// −1 = unknown.
    pub memory_usage_mb: i64,
    /// −1 = unknown.
    pub disk_usage_mb: i64,
    /// Percent of the instance's CPUs; −1 = unknown.
    pub cpu_usage: i64,
    /// Attached volume ids (not sent in 2016).
    pub volumes: Vec<String>,
}

/// One instance in STATS as [`stats_payload`] writes it: borrowed from
/// whoever keeps the instance (the overseer's records), so that a STATS of
/// thousands of instances copies nothing but its text.
#[derive(Debug, Clone, Copy)]
pub struct InstanceStatRef<'a> {
    pub instance_uuid: &'a str,
    pub state: &'a str,
    pub ssh_ip: &'a str,
    pub ssh_port: i64,
    pub memory_usage_mb: i64,
    pub disk_usage_mb: i64,
    pub cpu_usage: i64,
    pub volumes: &'a [String],
}

impl InstanceStat {
    pub fn as_ref(&self) -> InstanceStatRef<'_> {
        InstanceStatRef {
            instance_uuid: &self.instance_uuid,
            state: &self.state,
            ssh_ip: &self.ssh_ip,
            ssh_port: self.ssh_port,
            memory_usage_mb: self.memory_usage_mb,
            disk_usage_mb: self.disk_usage_mb,
            cpu_usage: self.cpu_usage,
            volumes: &self.volumes,
        }
    }
}

/// A decoded STATS payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    pub node: NodeStatus,
    /// `READY`, `FULL` or `MAINTENANCE`.
    pub status: String,
    pub instances: Vec<InstanceStat>,
}

/// Which failure an error payload reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Start,
    /// 2016 only.
    Stop,
    /// 2016 only.
    Restart,
    Delete,
    /// 2018 only.
    AttachVolume,
}

impl ErrorKind {
    /// The failure's name in log lines ("StartFailure", ...).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Start => "StartFailure",
            ErrorKind::Stop => "StopFailure",
            ErrorKind::Restart => "RestartFailure",
            ErrorKind::Delete => "DeleteFailure",
            ErrorKind::AttachVolume => "AttachVolumeFailure",
        }
    }
}

/// A decoded failure payload (any kind, either profile; absent keys empty).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorReport {
    pub instance_uuid: String,
    /// The reason string as sent (see [`Reason`] for the known ones).
    pub reason: String,
    pub node_uuid: String,
    pub restart: bool,
    pub volume_uuid: String,
}

fn write_numbers(e: &mut Emitter, node: &NodeStatus) {
    e.int(0, "mem_total_mb", node.mem_total_mb);
    e.int(0, "mem_available_mb", node.mem_available_mb);
    e.int(0, "disk_total_mb", node.disk_total_mb);
    e.int(0, "disk_available_mb", node.disk_available_mb);
    e.int(0, "load", node.load);
    e.int(0, "cpus_online", node.cpus_online);
}

fn write_networks(e: &mut Emitter, networks: &[NetworkInfo]) {
    e.map_list(0, "networks", networks, |e, l, n| {
        e.str(l, "ip", &n.ip);
        e.str(l, "mac", &n.mac);
    });
}

/// STATUS READY payload. 2016 has only the node id and the six numbers;
/// 2018 adds `networks` and `hostname` (in that order).
pub fn ready_payload(profile: Profile, node: &NodeStatus) -> Vec<u8> {
    let mut e = Emitter::new();
    e.str(0, "node_uuid", &node.node_uuid);
    write_numbers(&mut e, node);
    if profile == Profile::P2018 {
        write_networks(&mut e, &node.networks);
        e.str(0, "hostname", &node.hostname);
    }
    e.finish()
}

/// STATS payload. Both profiles carry `hostname` and `networks`; only 2018
/// has the per-instance `volumes` list (added mid-2016, history.md §3).
pub fn stats_payload<'a>(
    profile: Profile,
    node: &NodeStatus,
    status: &str,
    instances: impl IntoIterator<Item = InstanceStatRef<'a>>,
) -> Vec<u8> {
    let mut e = Emitter::new();
    e.str(0, "node_uuid", &node.node_uuid);
    e.str(0, "status", status);
    write_numbers(&mut e, node);
    e.str(0, "hostname", &node.hostname);
    write_networks(&mut e, &node.networks);
    e.map_list(0, "instances", instances, |e, l, i| {
        e.str(l, "instance_uuid", i.instance_uuid);
        e.str(l, "state", i.state);
        e.str(l, "ssh_ip", i.ssh_ip);
        e.int(l, "ssh_port", i.ssh_port);
        e.int(l, "memory_usage_mb", i.memory_usage_mb);
        e.int(l, "disk_usage_mb", i.disk_usage_mb);
        e.int(l, "cpu_usage", i.cpu_usage);
        if profile == Profile::P2018 {
            e.str_list(l, "volumes", i.volumes);
        }
    });
    e.finish()
}

fn instance_event(top: &str, instance: &str) -> Vec<u8> {
    let mut e = Emitter::new();
    e.open(0, top);
    e.str(1, "instance_uuid", instance);
    e.finish()
}

/// InstanceDeleted event (both profiles).
pub fn instance_deleted_payload(instance: &str) -> Vec<u8> {
    instance_event("instance_deleted", instance)
}

/// InstanceStopped event (2018).
pub fn instance_stopped_payload(instance: &str) -> Vec<u8> {
    instance_event("instance_stopped", instance)
}

/// The body of TenantAdded and TenantRemoved: which tunnel end the
/// concentrator must add or remove. Both events of one subnet carry the
/// same values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantEvent {
    /// This launcher's SSNTP UUID.
    pub agent_uuid: String,
    /// The node's local tunnel address (the first compute address).
    pub agent_ip: String,
    pub tenant_uuid: String,
    /// The START `subnet` string as received (not re-formatted).
    pub tenant_subnet: String,
    pub concentrator_uuid: String,
    /// Canonical dotted form.
    pub concentrator_ip: String,
    /// The little-endian subnet key (see `network::subnet_key`).
    pub subnet_key: u32,
}

fn tenant_event(top: &str, t: &TenantEvent) -> Vec<u8> {
    let mut e = Emitter::new();
    e.open(0, top);
    e.str(1, "agent_uuid", &t.agent_uuid);
    e.str(1, "agent_ip", &t.agent_ip);
    e.str(1, "tenant_uuid", &t.tenant_uuid);
    e.str(1, "tenant_subnet", &t.tenant_subnet);
    e.str(1, "concentrator_uuid", &t.concentrator_uuid);
    e.str(1, "concentrator_ip", &t.concentrator_ip);
    e.int(1, "subnet_key", t.subnet_key);
    e.finish()
}

/// TenantAdded event (EVENT 0x00).
pub fn tenant_added_payload(t: &TenantEvent) -> Vec<u8> {
    tenant_event("tenant_added", t)
}

/// TenantRemoved event (EVENT 0x01): TenantAdded's values under another key.
pub fn tenant_removed_payload(t: &TenantEvent) -> Vec<u8> {
    tenant_event("tenant_removed", t)
}

/// Reads a TenantAdded (`tenant_added`) or TenantRemoved (`tenant_removed`)
/// payload, for stand-in concentrators and tests. Returns whether it was an
/// addition, and the body.
pub fn parse_tenant_event(payload: &[u8]) -> Result<(bool, TenantEvent), PayloadError> {
    let root = parse_payload(payload, "tenant event")?;
    let decode = || -> DecodeResult<Option<(bool, TenantEvent)>> {
        let r = Field::root(&root);
        r.mapping()?;
        let added = r.get("tenant_added")?;
        let removed = r.get("tenant_removed")?;
        let (is_added, body) = if added.is_set() {
            (true, added)
        } else if removed.is_set() {
            (false, removed)
        } else {
            return Ok(None);
        };
        let s = |k: &str| body.get(k)?.string();
        let key = body.get("subnet_key")?.int()?;
        Ok(Some((
            is_added,
            TenantEvent {
                agent_uuid: s("agent_uuid")?,
                agent_ip: s("agent_ip")?,
                tenant_uuid: s("tenant_uuid")?,
                tenant_subnet: s("tenant_subnet")?,
                concentrator_uuid: s("concentrator_uuid")?,
                concentrator_ip: s("concentrator_ip")?,
                // Out of range is reported below, as invalid data.
                subnet_key: u32::try_from(key).unwrap_or(0),
            },
        )))
    };
    match decoded(decode(), "tenant event")? {
        Some((_, ev)) if ev.subnet_key == 0 => Err(PayloadError::invalid_data(
            "",
            "tenant event: subnet_key must be a non-zero 32-bit value",
        )),
        Some(found) => Ok(found),
        None => Err(PayloadError::invalid_data(
            "",
            "tenant event payload has neither tenant_added nor tenant_removed",
        )),
    }
}

/// A failure payload (flat mapping).
///
/// 2016, and Stop/Restart failures in any profile: `{instance_uuid,
/// reason}`. 2018: StartFailure `{node_uuid, instance_uuid, reason,
/// restart}`, DeleteFailure `{node_uuid, instance_uuid, reason}`,
/// AttachVolumeFailure `{node_uuid, instance_uuid, volume_uuid, reason}`.
/// Arguments a shape has no key for are ignored.
pub fn error_payload(
    profile: Profile,
    kind: ErrorKind,
    node_uuid: &str,
    instance_uuid: &str,
    reason: Reason,
    restart: bool,
    volume_uuid: &str,
) -> Vec<u8> {
    let mut e = Emitter::new();
    let flat_2016 =
        profile == Profile::P2016 || matches!(kind, ErrorKind::Stop | ErrorKind::Restart);
    if flat_2016 {
        e.str(0, "instance_uuid", instance_uuid);
        e.str(0, "reason", reason.as_str());
        return e.finish();
    }
    e.str(0, "node_uuid", node_uuid);
    e.str(0, "instance_uuid", instance_uuid);
    if kind == ErrorKind::AttachVolume {
        e.str(0, "volume_uuid", volume_uuid);
    }
    e.str(0, "reason", reason.as_str());
    if kind == ErrorKind::Start {
        e.bool(0, "restart", restart);
    }
    e.finish()
}

fn decoded<T>(r: DecodeResult<T>, what: &str) -> Result<T, PayloadError> {
    r.map_err(|e| PayloadError::invalid_payload(format!("{what} payload: {e}")))
}

/// Node fields; absent numbers stay −1 as after Go's `Init()`.
fn decode_node(root: &Field<'_>) -> DecodeResult<NodeStatus> {
    let num = |key: &str| -> DecodeResult<i64> { Ok(root.get(key)?.opt_int()?.unwrap_or(-1)) };
    let mut networks = Vec::new();
    for n in root.get("networks")?.items()? {
        networks.push(NetworkInfo {
            ip: n.get("ip")?.string()?,
            mac: n.get("mac")?.string()?,
        });
    }
    Ok(NodeStatus {
        node_uuid: root.get("node_uuid")?.string()?,
        mem_total_mb: num("mem_total_mb")?,
        mem_available_mb: num("mem_available_mb")?,
        disk_total_mb: num("disk_total_mb")?,
        disk_available_mb: num("disk_available_mb")?,
        load: num("load")?,
        cpus_online: num("cpus_online")?,
        hostname: root.get("hostname")?.string()?,
        networks,
    })
}

/// Reads a READY payload (either profile).
pub fn parse_ready(payload: &[u8]) -> Result<NodeStatus, PayloadError> {
    let root = parse_payload(payload, "READY")?;
    let r = Field::root(&root);
    decoded(r.mapping().and_then(|()| decode_node(&r)), "READY")
}

/// Reads a STATS payload (either profile). Absent node numbers are −1;
/// absent instance fields are zero values (Go's `Init()` covers only the
/// node part).
pub fn parse_stats(payload: &[u8]) -> Result<Stats, PayloadError> {
    let root = parse_payload(payload, "STATS")?;
    let decode = || -> DecodeResult<Stats> {
        let r = Field::root(&root);
        r.mapping()?;
        let mut instances = Vec::new();
        for i in r.get("instances")?.items()? {
            let volumes = i
                .get("volumes")?
                .items()?
                .iter()
                .map(Field::string)
                .collect::<DecodeResult<Vec<String>>>()?;
            instances.push(InstanceStat {
                instance_uuid: i.get("instance_uuid")?.string()?,
                state: i.get("state")?.string()?,
                ssh_ip: i.get("ssh_ip")?.string()?,
                ssh_port: i.get("ssh_port")?.int()?,
                memory_usage_mb: i.get("memory_usage_mb")?.int()?,
                disk_usage_mb: i.get("disk_usage_mb")?.int()?,
                cpu_usage: i.get("cpu_usage")?.int()?,
                volumes,
            });
        }
        Ok(Stats {
            node: decode_node(&r)?,
            status: r.get("status")?.string()?,
            instances,
        })
    };
    decoded(decode(), "STATS")
}

/// Reads any launcher failure payload, 2016 or 2018 shape.
pub fn parse_error(payload: &[u8]) -> Result<ErrorReport, PayloadError> {
    let root = parse_payload(payload, "error")?;
    let decode = || -> DecodeResult<ErrorReport> {
        let r = Field::root(&root);
        r.mapping()?;
        Ok(ErrorReport {
            instance_uuid: r.get("instance_uuid")?.string()?,
            reason: r.get("reason")?.string()?,
            node_uuid: r.get("node_uuid")?.string()?,
            restart: r.get("restart")?.bool()?,
            volume_uuid: r.get("volume_uuid")?.string()?,
        })
    };
    decoded(decode(), "error")
}

/// The instance id of an `instance_deleted:` or `instance_stopped:` event,
/// trimmed but not otherwise validated (a reader for display: Go launchers
/// accept ids ours would refuse). No id at all is `invalid_data`.
pub fn parse_instance_event(payload: &[u8]) -> Result<String, PayloadError> {
    let root = parse_payload(payload, "event")?;
    let decode = || -> DecodeResult<String> {
        let r = Field::root(&root);
        for top in ["instance_deleted", "instance_stopped"] {
            let id = r.get(top)?.get("instance_uuid")?.string()?;
            if !id.trim().is_empty() {
                return Ok(id.trim().to_string());
            }
        }
        Ok(String::new())
    };
    let id = decoded(decode(), "event")?;
    if id.is_empty() {
        return Err(PayloadError::invalid_data(
            "",
            "event payload: no instance_deleted.instance_uuid or instance_stopped.instance_uuid",
        ));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str = "4481631c-dce9-48d6-b83a-a717417072ce";
    const INSTANCE: &str = "d7d86208-b46c-4465-9018-ee14087d415f";

    fn text(b: Vec<u8>) -> String {
        String::from_utf8(b).expect("utf8")
    }

    fn node(load: i64) -> NodeStatus {
        NodeStatus {
            node_uuid: NODE.into(),
            mem_total_mb: 7856,
            mem_available_mb: 5220,
            disk_total_mb: 231782,
            disk_available_mb: 166163,
            load,
            cpus_online: 4,
            hostname: "cn1".into(),
            networks: vec![NetworkInfo {
                ip: "192.168.1.10".into(),
                mac: "52:54:00:12:34:56".into(),
            }],
        }
    }

    fn instances() -> Vec<InstanceStat> {
        vec![
            InstanceStat {
                instance_uuid: INSTANCE.into(),
                state: "active".into(),
                ssh_ip: "192.168.42.21".into(),
                ssh_port: 35050,
                memory_usage_mb: 492,
                disk_usage_mb: 0,
                cpu_usage: 3,
                volumes: vec!["73a86d7e-93c0-480e-9c41-ab42f69b7799".into()],
            },
            InstanceStat {
                instance_uuid: "67d86208-b46c-4465-9018-e14087d415f0".into(),
                state: "pending".into(),
                ssh_ip: String::new(),
                ssh_port: 0,
                memory_usage_mb: -1,
                disk_usage_mb: -1,
                cpu_usage: -1,
                volumes: vec![],
            },
        ]
    }

    // payloads.md §2.1 (Go output).
    const READY: &str = "node_uuid: 4481631c-dce9-48d6-b83a-a717417072ce
mem_total_mb: 7856
mem_available_mb: 5220
disk_total_mb: 231782
disk_available_mb: 166163
load: 0
cpus_online: 4
networks:
- ip: 192.168.1.10
  mac: \"52:54:00:12:34:56\"
hostname: cn1
";

    // payloads.md §2.3 (Go output).
    const STATS: &str = "node_uuid: 4481631c-dce9-48d6-b83a-a717417072ce
status: READY
mem_total_mb: 7856
mem_available_mb: 5220
disk_total_mb: 231782
disk_available_mb: 166163
load: 1
cpus_online: 4
hostname: cn1
networks:
- ip: 192.168.1.10
  mac: \"52:54:00:12:34:56\"
instances:
- instance_uuid: d7d86208-b46c-4465-9018-ee14087d415f
  state: active
  ssh_ip: 192.168.42.21
  ssh_port: 35050
  memory_usage_mb: 492
  disk_usage_mb: 0
  cpu_usage: 3
  volumes:
  - 73a86d7e-93c0-480e-9c41-ab42f69b7799
- instance_uuid: 67d86208-b46c-4465-9018-e14087d415f0
  state: pending
  ssh_ip: \"\"
  ssh_port: 0
  memory_usage_mb: -1
  disk_usage_mb: -1
  cpu_usage: -1
  volumes: []
";

    // wire-2016.md §1 (observed from the 2016 launcher).
    const STATS_2016: &str = "node_uuid: 3bffa13b-eb85-4f43-9a30-e646f684efa0
status: READY
mem_total_mb: 24105
mem_available_mb: 23099
disk_total_mb: 270553
disk_available_mb: 76645
load: 3
cpus_online: 2
hostname: \"\"
networks: []
instances:
- instance_uuid: 11111111-2222-4333-8444-555555555555
  state: running
  ssh_ip: \"\"
  ssh_port: 0
  memory_usage_mb: 1
  disk_usage_mb: 0
  cpu_usage: 0
";

    #[test]
    fn ready_matches_go_output() {
        assert_eq!(text(ready_payload(Profile::P2018, &node(0))), READY);
        let old = text(ready_payload(Profile::P2016, &node(0)));
        assert_eq!(
            old,
            "node_uuid: 4481631c-dce9-48d6-b83a-a717417072ce\nmem_total_mb: 7856\nmem_available_mb: 5220\ndisk_total_mb: 231782\ndisk_available_mb: 166163\nload: 0\ncpus_online: 4\n"
        );
        assert_eq!(parse_ready(READY.as_bytes()), Ok(node(0)));
        let mut partial = NodeStatus::unknown(NODE);
        partial.mem_total_mb = 7856;
        assert_eq!(
            parse_ready(format!("node_uuid: {NODE}\nmem_total_mb: 7856\n").as_bytes()),
            Ok(partial)
        );
    }

    #[test]
    fn stats_match_go_output() {
        assert_eq!(
            text(stats_payload(
                Profile::P2018,
                &node(1),
                "READY",
                instances().iter().map(InstanceStat::as_ref)
            )),
            STATS
        );
        let empty = NodeStatus {
            hostname: String::new(),
            networks: vec![],
            ..node(1)
        };
        let want = "node_uuid: 4481631c-dce9-48d6-b83a-a717417072ce\nstatus: FULL\nmem_total_mb: 7856\nmem_available_mb: 5220\ndisk_total_mb: 231782\ndisk_available_mb: 166163\nload: 1\ncpus_online: 4\nhostname: \"\"\nnetworks: []\ninstances: []\n";
        for p in Profile::ALL {
            assert_eq!(text(stats_payload(p, &empty, "FULL", [])), want);
        }
    }

    #[test]
    fn stats_2016_shape() {
        let n = NodeStatus {
            node_uuid: "3bffa13b-eb85-4f43-9a30-e646f684efa0".into(),
            mem_total_mb: 24105,
            mem_available_mb: 23099,
            disk_total_mb: 270553,
            disk_available_mb: 76645,
            load: 3,
            cpus_online: 2,
            hostname: String::new(),
            networks: vec![],
        };
        let i = InstanceStat {
            instance_uuid: "11111111-2222-4333-8444-555555555555".into(),
            state: Profile::P2016.running_state().into(),
            ssh_ip: String::new(),
            ssh_port: 0,
            memory_usage_mb: 1,
            disk_usage_mb: 0,
            cpu_usage: 0,
            volumes: vec!["ignored-in-2016".into()],
        };
        assert_eq!(
            text(stats_payload(Profile::P2016, &n, "READY", [i.as_ref()])),
            STATS_2016
        );
        let parsed = parse_stats(STATS_2016.as_bytes()).expect("valid");
        assert_eq!(parsed.node, n);
        assert_eq!(parsed.status, "READY");
        assert_eq!(
            parsed.instances,
            vec![InstanceStat {
                volumes: vec![],
                ..i
            }]
        );
    }

    #[test]
    fn stats_round_trip_and_partial() {
        for p in Profile::ALL {
            let mut inst = instances();
            if p == Profile::P2016 {
                inst.iter_mut().for_each(|i| i.volumes.clear());
            }
            let payload = stats_payload(
                p,
                &node(1),
                "MAINTENANCE",
                inst.iter().map(InstanceStat::as_ref),
            );
            assert_eq!(
                parse_stats(&payload),
                Ok(Stats {
                    node: node(1),
                    status: "MAINTENANCE".into(),
                    instances: inst,
                })
            );
        }
        let partial = "node_uuid: x\ninstances:\n- instance_uuid: y\n";
        let s = parse_stats(partial.as_bytes()).expect("valid");
        assert_eq!(s.node, NodeStatus::unknown("x"));
        assert_eq!(s.status, "");
        assert_eq!(s.instances[0].memory_usage_mb, 0);
        assert_eq!(
            parse_stats(b"").map(|s| s.node),
            Ok(NodeStatus::unknown(""))
        );
        let e = parse_stats(b"load: high\n").expect_err("type");
        assert_eq!(e.reason, Reason::InvalidPayload);
        assert!(e.detail.contains("load"), "{e}");
        assert_eq!(
            parse_stats(b"- 1\n").expect_err("sequence").reason,
            Reason::InvalidPayload
        );
    }

    #[test]
    fn events_match_go_output() {
        let deleted = text(instance_deleted_payload(INSTANCE));
        assert_eq!(
            deleted,
            "instance_deleted:\n  instance_uuid: d7d86208-b46c-4465-9018-ee14087d415f\n"
        );
        let stopped = text(instance_stopped_payload(INSTANCE));
        assert_eq!(
            stopped,
            "instance_stopped:\n  instance_uuid: d7d86208-b46c-4465-9018-ee14087d415f\n"
        );
        assert_eq!(
            parse_instance_event(deleted.as_bytes()).as_deref(),
            Ok(INSTANCE)
        );
        assert_eq!(
            parse_instance_event(stopped.as_bytes()).as_deref(),
            Ok(INSTANCE)
        );
        assert_eq!(
            parse_instance_event(b"tenant_added:\n  agent_uuid: x\n")
                .expect_err("no id")
                .reason,
            Reason::InvalidData
        );
        assert_eq!(
            parse_instance_event(b"instance_deleted: [")
                .expect_err("yaml")
                .reason,
            Reason::InvalidPayload
        );
    }

    // The Go writer's bytes for the networking spec's example (first VNIC of
    // 192.168.8.0/21 on CN 10.0.0.11); TenantRemoved differs only in the key.
    const TENANT_ADDED: &str = "tenant_added:
  agent_uuid: 4481631c-dce9-48d6-b83a-a717417072ce
  agent_ip: 10.0.0.11
  tenant_uuid: 67d86208-0000-4465-9018-fe14087d415f
  tenant_subnet: 192.168.8.0/21
  concentrator_uuid: 67d86208-b46c-4465-0000-fe14087d415f
  concentrator_ip: 192.168.42.21
  subnet_key: 567488
";

    fn tenant() -> TenantEvent {
        TenantEvent {
            agent_uuid: NODE.into(),
            agent_ip: "10.0.0.11".into(),
            tenant_uuid: "67d86208-0000-4465-9018-fe14087d415f".into(),
            tenant_subnet: "192.168.8.0/21".into(),
            concentrator_uuid: "67d86208-b46c-4465-0000-fe14087d415f".into(),
            concentrator_ip: "192.168.42.21".into(),
            subnet_key: 567488,
        }
    }

    #[test]
    fn tenant_events_match_go_output() {
        let added = text(tenant_added_payload(&tenant()));
        assert_eq!(added, TENANT_ADDED);
        let removed = text(tenant_removed_payload(&tenant()));
        assert_eq!(
            removed,
            TENANT_ADDED.replace("tenant_added:", "tenant_removed:")
        );
        assert_eq!(parse_tenant_event(added.as_bytes()), Ok((true, tenant())));
        assert_eq!(
            parse_tenant_event(removed.as_bytes()),
            Ok((false, tenant()))
        );
        // Values yaml.v2 would quote stay quoted; an empty one is "".
        let mut odd = tenant();
        odd.tenant_subnet = String::new();
        odd.agent_uuid = "12:30".into();
        let t = text(tenant_added_payload(&odd));
        assert!(t.contains("  tenant_subnet: \"\"\n"), "{t}");
        assert!(t.contains("  agent_uuid: \"12:30\"\n"), "{t}");
        assert_eq!(parse_tenant_event(t.as_bytes()), Ok((true, odd)));
        assert_eq!(
            parse_tenant_event(b"instance_deleted:\n  instance_uuid: x\n")
                .expect_err("neither")
                .reason,
            Reason::InvalidData
        );
        assert_eq!(
            parse_tenant_event(b"tenant_added:\n  subnet_key: 0\n")
                .expect_err("key 0")
                .reason,
            Reason::InvalidData
        );
    }

    // payloads.md §4 (Go output).
    const START_FAILURE: &str = "node_uuid: 4481631c-dce9-48d6-b83a-a717417072ce\ninstance_uuid: d7d86208-b46c-4465-9018-ee14087d415f\nreason: full_cn\nrestart: false\n";
    const DELETE_FAILURE: &str = "node_uuid: 4481631c-dce9-48d6-b83a-a717417072ce\ninstance_uuid: d7d86208-b46c-4465-9018-ee14087d415f\nreason: no_instance\n";
    const ATTACH_FAILURE: &str = "node_uuid: 4481631c-dce9-48d6-b83a-a717417072ce\ninstance_uuid: d7d86208-b46c-4465-9018-ee14087d415f\nvolume_uuid: 67d86208-b46c-4465-9018-e14287d415f0\nreason: already_attached\n";
    const VOLUME: &str = "67d86208-b46c-4465-9018-e14287d415f0";

    #[test]
    fn errors_match_go_output() {
        let p = Profile::P2018;
        let err = |kind, reason, restart| {
            text(error_payload(
                p, kind, NODE, INSTANCE, reason, restart, VOLUME,
            ))
        };
        assert_eq!(err(ErrorKind::Start, Reason::FullCn, false), START_FAILURE);
        assert_eq!(
            err(ErrorKind::Delete, Reason::NoInstance, false),
            DELETE_FAILURE
        );
        assert_eq!(
            err(ErrorKind::AttachVolume, Reason::AlreadyAttached, false),
            ATTACH_FAILURE
        );
        // A parse failure: empty instance id, restart false.
        assert_eq!(
            text(error_payload(
                p,
                ErrorKind::Start,
                NODE,
                "",
                Reason::InvalidPayload,
                false,
                ""
            )),
            "node_uuid: 4481631c-dce9-48d6-b83a-a717417072ce\ninstance_uuid: \"\"\nreason: invalid_payload\nrestart: false\n"
        );
        // 2016 shapes (and the historical Stop/Restart failures): instance + reason.
        for (profile, kind, reason) in [
            (Profile::P2016, ErrorKind::Start, Reason::AlreadyRunning),
            (Profile::P2016, ErrorKind::Stop, Reason::AlreadyStopped),
            (Profile::P2016, ErrorKind::Restart, Reason::InstanceCorrupt),
            (Profile::P2016, ErrorKind::Delete, Reason::NoInstance),
            (Profile::P2018, ErrorKind::Stop, Reason::NoInstance),
        ] {
            assert_eq!(
                text(error_payload(
                    profile, kind, NODE, INSTANCE, reason, true, VOLUME
                )),
                format!("instance_uuid: {INSTANCE}\nreason: {reason}\n")
            );
        }
    }

    #[test]
    fn errors_round_trip() {
        for profile in Profile::ALL {
            for kind in [
                ErrorKind::Start,
                ErrorKind::Stop,
                ErrorKind::Restart,
                ErrorKind::Delete,
                ErrorKind::AttachVolume,
            ] {
                for reason in [Reason::FullCn, Reason::InvalidData, Reason::AttachFailure] {
                    let payload =
                        error_payload(profile, kind, NODE, INSTANCE, reason, true, VOLUME);
                    let got = parse_error(&payload).expect("valid");
                    let full = profile == Profile::P2018
                        && !matches!(kind, ErrorKind::Stop | ErrorKind::Restart);
                    assert_eq!(
                        got,
                        ErrorReport {
                            instance_uuid: INSTANCE.into(),
                            reason: reason.as_str().into(),
                            node_uuid: if full { NODE.into() } else { String::new() },
                            restart: full && kind == ErrorKind::Start,
                            volume_uuid: if full && kind == ErrorKind::AttachVolume {
                                VOLUME.into()
                            } else {
                                String::new()
                            },
                        },
                        "{profile} {kind:?}"
                    );
                    assert_eq!(got.reason.parse::<Reason>(), Ok(reason));
                }
            }
        }
        assert_eq!(
            parse_error(b"reason: [").expect_err("yaml").reason,
            Reason::InvalidPayload
        );
    }

    #[test]
    fn awkward_strings_survive() {
        let mut n = node(0);
        n.hostname = "123".into();
        n.networks[0].mac = "02:00:e6:f5:af:f9".into();
        n.node_uuid = "a: b # c".into();
        let text_ready = text(ready_payload(Profile::P2018, &n));
        assert!(text_ready.contains("hostname: \"123\"\n"), "{text_ready}");
        assert!(
            text_ready.contains("  mac: 02:00:e6:f5:af:f9\n"),
            "{text_ready}"
        );
        assert_eq!(parse_ready(text_ready.as_bytes()), Ok(n));
    }
}
