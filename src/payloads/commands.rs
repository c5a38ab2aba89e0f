//! The commands other than START that reach the launcher, and their writers
//! for the operator tool (payloads.md §1.2-1.7, wire-2016.md).
//!
//! * DELETE `delete:` — remove an instance; the 2018 `stop` flag turns it
//!   into a stop-for-migration (InstanceStopped instead of InstanceDeleted).
//! * STOP `stop:` / RESTART `restart:` (2016 only) — power an instance off
//!   and boot it again from its stored configuration.
//! * EVACUATE `evacuate:` / Restore `restore:` — node maintenance on/off;
//!   the launcher ignores their payloads, the scheduler routes on
//!   `workload_agent_uuid`.
//! * AttachVolume `attach_volume:` — hot-plug a volume into an instance.
//! * CONFIGURE and the CONNECTED status payload `configure:` — the cluster
//!   configuration; the launcher uses the networks, limits, ceph id and
//!   child user.
//!
//! Parsers: undecodable YAML → `invalid_payload` (instance ""); an instance
//! or volume id that is missing or not a UUID → `invalid_data`.

use super::yaml::{DecodeResult, Emitter, Field};
use super::{PayloadError, canonical_uuid, parse_payload};
use crate::ssntp::Profile;

/// A DELETE command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteCmd {
    /// Canonical instance id.
    pub instance_uuid: String,
    /// 2018: stop (migrate/evacuate) rather than delete; always false in 2016.
    pub stop: bool,
}

/// An AttachVolume command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachVolumeCmd {
    pub instance_uuid: String,
    pub volume_uuid: String,
}

/// What the launcher takes from the cluster configuration (CONNECTED
/// payload or CONFIGURE). Missing keys give zero values, not the
/// scheduler's defaults, as in the Go launcher.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterConfig {
    /// `configure.launcher.compute_net` CIDRs.
    pub compute_net: Vec<String>,
    /// `configure.launcher.mgmt_net` CIDRs.
    pub mgmt_net: Vec<String>,
    /// `configure.launcher.disk_limit`.
    pub disk_limit: bool,
    /// `configure.launcher.mem_limit`.
    pub mem_limit: bool,
    /// `configure.storage.ceph_id`.
    pub ceph_id: String,
    /// `configure.launcher.child_user` ("" = run children as ourselves).
    pub child_user: String,
}

impl std::fmt::Display for ClusterConfig {
    /// One log line: what the launcher uses of the configuration.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &[String]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(",")
            }
        };
        write!(
            f,
            "compute_net {}, mgmt_net {}, disk_limit {}, mem_limit {}, ceph_id {}, child_user {}",
            list(&self.compute_net),
            list(&self.mgmt_net),
            self.disk_limit,
            self.mem_limit,
            if self.ceph_id.is_empty() {
                "-"
            } else {
                &self.ceph_id
            },
            if self.child_user.is_empty() {
                "-"
            } else {
                &self.child_user
            },
        )
    }
}

fn decoded<T>(r: DecodeResult<T>, what: &str) -> Result<T, PayloadError> {
    r.map_err(|e| PayloadError::invalid_payload(format!("{what} payload: {e}")))
}

/// The `instance_uuid` (or other id) under `top`, validated.
fn id_of(
    raw: &str,
    path: &str,
    what: &str,
    instance_for_error: &str,
) -> Result<String, PayloadError> {
    canonical_uuid(raw).ok_or_else(|| {
        let cut: String = raw.trim().chars().take(64).collect();
        // The id as received when it is the instance's own (so that the
        // scheduler can match the error to its request).
        let echoed = if instance_for_error.is_empty() {
            crate::payloads::as_received(raw)
        } else {
            instance_for_error.to_string()
        };
        PayloadError::invalid_data(
            &echoed,
            format!("{what} payload: {path}: {cut:?} is not a UUID"),
        )
    })
}

/// Decodes `top: {instance_uuid, workload_agent_uuid[, stop]}` and returns
/// the raw instance id and the stop flag.
fn instance_command(
    payload: &[u8],
    top: &str,
    what: &str,
    with_stop: bool,
) -> Result<(String, bool), PayloadError> {
    let root = parse_payload(payload, what)?;
    let decode = || -> DecodeResult<(String, bool)> {
        let t = Field::root(&root).get(top)?;
        t.get("workload_agent_uuid")?.string()?;
        let stop = if with_stop {
            t.get("stop")?.bool()?
        } else {
            false
        };
        Ok((t.get("instance_uuid")?.string()?, stop))
    };
    decoded(decode(), what)
}

/// Parses a DELETE payload (`delete: {instance_uuid, workload_agent_uuid, stop}`;
/// 2016 has no `stop`, which reads as false).
pub fn parse_delete(payload: &[u8]) -> Result<DeleteCmd, PayloadError> {
    let (raw, stop) = instance_command(payload, "delete", "DELETE", true)?;
    let instance_uuid = id_of(&raw, "delete.instance_uuid", "DELETE", "")?;
    Ok(DeleteCmd {
        instance_uuid,
        stop,
    })
}

/// Parses a 2016 STOP payload (`stop: {instance_uuid, workload_agent_uuid}`)
/// and returns the canonical instance id.
pub fn parse_stop(payload: &[u8]) -> Result<String, PayloadError> {
    let (raw, _) = instance_command(payload, "stop", "STOP", false)?;
    id_of(&raw, "stop.instance_uuid", "STOP", "")
}

/// Parses a 2016 RESTART payload (`restart: {instance_uuid, ...}`); only the
/// instance id is used — the instance restarts with its stored config, so
/// the START-like fields a controller may add are not even decoded.
pub fn parse_restart(payload: &[u8]) -> Result<String, PayloadError> {
    let (raw, _) = instance_command(payload, "restart", "RESTART", false)?;
    id_of(&raw, "restart.instance_uuid", "RESTART", "")
}

/// Parses an AttachVolume payload
/// (`attach_volume: {instance_uuid, volume_uuid, workload_agent_uuid}`).
/// A bad volume id is `invalid_data` carrying the (valid) instance id.
pub fn parse_attach_volume(payload: &[u8]) -> Result<AttachVolumeCmd, PayloadError> {
    let what = "AttachVolume";
    let root = parse_payload(payload, what)?;
    let top = decoded(Field::root(&root).get("attach_volume"), what)?;
    let raw_instance = decoded(top.get("instance_uuid").and_then(|f| f.string()), what)?;
    let raw_volume = decoded(top.get("volume_uuid").and_then(|f| f.string()), what)?;
    decoded(
        top.get("workload_agent_uuid").and_then(|f| f.string()),
        what,
    )?;
    let instance_uuid = id_of(&raw_instance, "attach_volume.instance_uuid", what, "")?;
    let volume_uuid = id_of(
        &raw_volume,
        "attach_volume.volume_uuid",
        what,
        &instance_uuid,
    )?;
    Ok(AttachVolumeCmd {
        instance_uuid,
        volume_uuid,
    })
}

/// Parses the cluster configuration (`configure:` document of CONNECTED or
/// CONFIGURE). Only the keys the launcher uses are decoded; a lone CIDR
/// string is accepted where a list is expected.
pub fn parse_configure(payload: &[u8]) -> Result<ClusterConfig, PayloadError> {
    let what = "configuration";
    let root = parse_payload(payload, what)?;
    let decode = || -> DecodeResult<ClusterConfig> {
        let c = Field::root(&root).get("configure")?;
        let launcher = c.get("launcher")?;
        Ok(ClusterConfig {
            compute_net: launcher.get("compute_net")?.strings_lenient()?,
            mgmt_net: launcher.get("mgmt_net")?.strings_lenient()?,
            disk_limit: launcher.get("disk_limit")?.bool()?,
            mem_limit: launcher.get("mem_limit")?.bool()?,
            ceph_id: c.get("storage")?.get("ceph_id")?.string()?,
            child_user: launcher.get("child_user")?.string()?,
        })
    };
    decoded(decode(), what)
}

/// `<top>:` with `instance_uuid` and `workload_agent_uuid`.
fn instance_payload(top: &str, instance: &str, node: &str) -> Emitter {
    let mut e = Emitter::new();
    e.open(0, top);
    e.str(1, "instance_uuid", instance);
    e.str(1, "workload_agent_uuid", node);
    e
}

/// DELETE as the controller sends it; `stop` exists only in 2018 (a 2016
/// peer would ignore it, so it is not written there).
pub fn delete_payload(profile: Profile, instance: &str, node: &str, stop: bool) -> Vec<u8> {
    let mut e = instance_payload("delete", instance, node);
    if profile == Profile::P2018 {
        e.bool(1, "stop", stop);
    }
    e.finish()
}

/// 2016 STOP.
pub fn stop_payload(instance: &str, node: &str) -> Vec<u8> {
    instance_payload("stop", instance, node).finish()
}

/// 2016 RESTART (only the fields the launcher and scheduler read).
pub fn restart_payload(instance: &str, node: &str) -> Vec<u8> {
    instance_payload("restart", instance, node).finish()
}

fn node_payload(top: &str, node: &str) -> Vec<u8> {
    let mut e = Emitter::new();
    e.open(0, top);
    e.str(1, "workload_agent_uuid", node);
    e.finish()
}

/// EVACUATE (the scheduler routes it on `workload_agent_uuid`).
pub fn evacuate_payload(node: &str) -> Vec<u8> {
    node_payload("evacuate", node)
}

/// Restore (leave maintenance).
pub fn restore_payload(node: &str) -> Vec<u8> {
    node_payload("restore", node)
}

/// AttachVolume.
pub fn attach_volume_payload(instance: &str, volume: &str, node: &str) -> Vec<u8> {
    let mut e = Emitter::new();
    e.open(0, "attach_volume");
    e.str(1, "instance_uuid", instance);
    e.str(1, "volume_uuid", volume);
    e.str(1, "workload_agent_uuid", node);
    e.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payloads::Reason;

    const INSTANCE: &str = "d7d86208-b46c-4465-9018-ee14087d415f";
    const NODE: &str = "4481631c-dce9-48d6-b83a-a717417072ce";
    const VOLUME: &str = "67d86208-b46c-4465-9018-e14287d415f0";

    // Go output, payloads.md §1.2, §1.4, §1.5, §1.6.
    const DELETE_2018: &str = "delete:\n  instance_uuid: d7d86208-b46c-4465-9018-ee14087d415f\n  workload_agent_uuid: 4481631c-dce9-48d6-b83a-a717417072ce\n  stop: true\n";
    const EVACUATE: &str =
        "evacuate:\n  workload_agent_uuid: 4481631c-dce9-48d6-b83a-a717417072ce\n";
    const RESTORE: &str = "restore:\n  workload_agent_uuid: 4481631c-dce9-48d6-b83a-a717417072ce\n";
    const ATTACH: &str = "attach_volume:\n  instance_uuid: d7d86208-b46c-4465-9018-ee14087d415f\n  volume_uuid: 67d86208-b46c-4465-9018-e14287d415f0\n  workload_agent_uuid: 4481631c-dce9-48d6-b83a-a717417072ce\n";
    // wire-2016.md: `stop|restart|delete: {instance_uuid, workload_agent_uuid}`.
    const DELETE_2016: &str = "delete:\n  instance_uuid: d7d86208-b46c-4465-9018-ee14087d415f\n  workload_agent_uuid: 4481631c-dce9-48d6-b83a-a717417072ce\n";
    const STOP_2016: &str = "stop:\n  instance_uuid: d7d86208-b46c-4465-9018-ee14087d415f\n  workload_agent_uuid: 4481631c-dce9-48d6-b83a-a717417072ce\n";
    const RESTART_2016: &str = "restart:\n  instance_uuid: d7d86208-b46c-4465-9018-ee14087d415f\n  workload_agent_uuid: 4481631c-dce9-48d6-b83a-a717417072ce\n";

    fn text(b: Vec<u8>) -> String {
        String::from_utf8(b).expect("utf8")
    }

    #[test]
    fn writers_match_go_output() {
        assert_eq!(
            text(delete_payload(Profile::P2018, INSTANCE, NODE, true)),
            DELETE_2018
        );
        assert_eq!(
            text(delete_payload(Profile::P2018, INSTANCE, NODE, false)),
            DELETE_2018.replace("stop: true", "stop: false")
        );
        assert_eq!(
            text(delete_payload(Profile::P2016, INSTANCE, NODE, true)),
            DELETE_2016
        );
        assert_eq!(text(stop_payload(INSTANCE, NODE)), STOP_2016);
        assert_eq!(text(restart_payload(INSTANCE, NODE)), RESTART_2016);
        assert_eq!(text(evacuate_payload(NODE)), EVACUATE);
        assert_eq!(text(restore_payload(NODE)), RESTORE);
        assert_eq!(text(attach_volume_payload(INSTANCE, VOLUME, NODE)), ATTACH);
        // An empty node id is written the way yaml.v2 writes it.
        assert_eq!(
            text(evacuate_payload("")),
            "evacuate:\n  workload_agent_uuid: \"\"\n"
        );
    }

    #[test]
    fn parse_delete_both_profiles() {
        assert_eq!(
            parse_delete(DELETE_2018.as_bytes()),
            Ok(DeleteCmd {
                instance_uuid: INSTANCE.into(),
                stop: true
            })
        );
        assert_eq!(
            parse_delete(DELETE_2016.as_bytes()),
            Ok(DeleteCmd {
                instance_uuid: INSTANCE.into(),
                stop: false
            })
        );
        for p in Profile::ALL {
            for stop in [false, true] {
                let cmd = parse_delete(&delete_payload(p, INSTANCE, NODE, stop)).expect("valid");
                assert_eq!(cmd.stop, stop && p == Profile::P2018);
            }
        }
    }

    #[test]
    fn parse_stop_restart() {
        assert_eq!(parse_stop(STOP_2016.as_bytes()).as_deref(), Ok(INSTANCE));
        assert_eq!(
            parse_restart(RESTART_2016.as_bytes()).as_deref(),
            Ok(INSTANCE)
        );
        // RESTART with START-like extras: only the id matters.
        let full = "restart:\n  tenant_uuid: t\n  instance_uuid: D7D86208-B46C-4465-9018-EE14087D415F\n  requested_resources: [ {type: vcpus, value: 2} ]\n";
        assert_eq!(parse_restart(full.as_bytes()).as_deref(), Ok(INSTANCE));
        // The wrong wrapper key leaves the id empty.
        let e = parse_stop(RESTART_2016.as_bytes()).expect_err("no stop:");
        assert_eq!(e.reason, Reason::InvalidData);
    }

    #[test]
    fn command_errors() {
        type Parse = fn(&[u8]) -> Result<String, PayloadError>;
        let delete: Parse = |p| parse_delete(p).map(|c| c.instance_uuid);
        let attach: Parse = |p| parse_attach_volume(p).map(|c| c.instance_uuid);
        let cases: [(&str, Parse, &str); 4] = [
            ("delete", delete, DELETE_2018),
            ("stop", parse_stop, STOP_2016),
            ("restart", parse_restart, RESTART_2016),
            ("attach_volume", attach, ATTACH),
        ];
        for (top, parse, good) in cases {
            for bad_yaml in [
                "  -",
                "[",
                &format!("{top}: [1, 2]\n"),
                "x: \"unterminated\n",
            ] {
                let e = parse(bad_yaml.as_bytes()).expect_err(bad_yaml);
                assert_eq!(
                    (e.reason, e.instance_uuid.as_str()),
                    (Reason::InvalidPayload, ""),
                    "{top} {bad_yaml:?}"
                );
            }
            assert_eq!(
                parse(b"\xff\xfe").expect_err("utf8").reason,
                Reason::InvalidPayload
            );
            for bad_id in [
                "../../etc",
                "abc",
                "67d86208-000-4465-9018-fe14087d415f",
                "\"\"",
            ] {
                let doc = good.replace(INSTANCE, bad_id);
                let e = parse(doc.as_bytes()).expect_err(&doc);
                // The id comes back as received (the YAML `""` is empty).
                let echoed = if bad_id == "\"\"" { "" } else { bad_id };
                assert_eq!(
                    (e.reason, e.instance_uuid.as_str()),
                    (Reason::InvalidData, echoed)
                );
            }
            for empty in ["", "{}\n", &format!("{top}:\n")] {
                let e = parse(empty.as_bytes()).expect_err(empty);
                assert_eq!(e.reason, Reason::InvalidData, "{top} {empty:?}");
            }
        }
        let e = parse_delete(DELETE_2018.replace("stop: true", "stop: sure").as_bytes())
            .expect_err("bad bool");
        assert_eq!(e.reason, Reason::InvalidPayload);
        assert!(e.detail.contains("delete.stop"), "{e}");
    }

    #[test]
    fn attach_volume() {
        assert_eq!(
            parse_attach_volume(ATTACH.as_bytes()),
            Ok(AttachVolumeCmd {
                instance_uuid: INSTANCE.into(),
                volume_uuid: VOLUME.into()
            })
        );
        let e = parse_attach_volume(ATTACH.replace(VOLUME, "../v").as_bytes()).expect_err("bad");
        assert_eq!(e.reason, Reason::InvalidData);
        assert_eq!(e.instance_uuid, INSTANCE);
        assert!(e.detail.contains("volume_uuid"), "{e}");
    }

    // payloads.md §1.7 (Go output).
    const CONFIGURE: &str = "configure:
  scheduler:
    storage_uri: file:///etc/ciao/configuration.yaml
  storage:
    ceph_id: ciao
  controller:
    ciao_port: 8889
    compute_ca: /etc/pki/ciao/controller_cert.pem
    compute_cert: /etc/pki/ciao/controller_key.pem
    cnci_vcpus: 4
    cnci_mem: 2048
    cnci_disk: 2048
    admin_ssh_key: \"\"
    client_auth_ca_cert_path: /etc/pki/ciao/auth-CA.pem
    cnci_net: 192.168.0.0
  launcher:
    compute_net:
    - 192.168.1.0/24
    mgmt_net:
    - 192.168.1.0/24
    disk_limit: true
    mem_limit: true
    child_user: ciao
";

    #[test]
    fn configure() {
        assert_eq!(
            parse_configure(CONFIGURE.as_bytes()),
            Ok(ClusterConfig {
                compute_net: vec!["192.168.1.0/24".into()],
                mgmt_net: vec!["192.168.1.0/24".into()],
                disk_limit: true,
                mem_limit: true,
                ceph_id: "ciao".into(),
                child_user: "ciao".into(),
            })
        );
        // Missing keys are zero values, not the scheduler's defaults.
        let partial = "configure:\n  launcher:\n    compute_net: 10.0.0.0/8\n";
        assert_eq!(
            parse_configure(partial.as_bytes()),
            Ok(ClusterConfig {
                compute_net: vec!["10.0.0.0/8".into()],
                ..ClusterConfig::default()
            })
        );
        assert_eq!(parse_configure(b""), Ok(ClusterConfig::default()));
        let e = parse_configure(b"configure:\n  launcher:\n    disk_limit: maybe\n")
            .expect_err("bad bool");
        assert_eq!(
            (e.reason, e.instance_uuid.as_str()),
            (Reason::InvalidPayload, "")
        );
        assert!(e.detail.contains("configure.launcher.disk_limit"), "{e}");
        let e = parse_configure(b"configure: [\n").expect_err("syntax");
        assert_eq!(e.reason, Reason::InvalidPayload);
    }
}
