//! YAML payloads of SSNTP frames (docs/protocol.md).
//!
//! * [`start`] — the START command: the three-document envelope, `splitYaml`,
//!   both START shapes (2016 `requested_resources`, 2018 `requirements`).
//! * [`commands`] — the other commands the launcher receives (DELETE, STOP,
//!   RESTART, AttachVolume, CONFIGURE/CONNECTED) and their writers for the
//!   operator tool.
//! * [`outgoing`] — what the launcher sends (READY, STATS, events, errors)
//!   and readers for the operator tool.
//! * [`config`] — the normalised instance configuration a START becomes.
//!
//! Readers are tolerant the way the Go peers' yaml.v2 is (unknown keys
//! ignored, missing keys zero); writers reproduce yaml.v2's bytes.

pub mod commands;
pub mod config;
pub mod outgoing;
pub mod start;
mod yaml;

use std::fmt;
use std::str::FromStr;

/// Reason codes of the failure payloads (StartFailure, StopFailure,
/// RestartFailure, DeleteFailure, AttachVolumeFailure), with their exact
/// wire strings (payloads.md §4, wire-2016.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// `full_cloud` — every node is full (scheduler only).
    FullCloud,
    /// `full_cn` — this node lacks the resources (StartFailure).
    FullCn,
    /// `node_maintenance` — START while the node is in maintenance.
    NodeMaintenance,
    /// `no_cn` — no compute node (scheduler only).
    NoCn,
    /// `no_net_cn` — no network node (scheduler only).
    NoNetCn,
    /// `invalid_payload` — the YAML could not be decoded.
    InvalidPayload,
    /// `invalid_data` — decoded, but a value is invalid (ids, fw/vm type, storage).
    InvalidData,
    /// `already_running` — START/RESTART of an instance that runs here.
    AlreadyRunning,
    /// `already_stopped` — STOP of a stopped instance (2016 StopFailure).
    AlreadyStopped,
    /// `instance_exists` — START whose instance directory already exists.
    InstanceExists,
    /// `instance_corrupt` — RESTART of an instance whose state is unusable (2016).
    InstanceCorrupt,
    /// `image_failure` — the image could not be prepared.
    ImageFailure,
    /// `launch_failure` — created but could not be launched.
    LaunchFailure,
    /// `network_failure` — VNIC creation failed.
    NetworkFailure,
    /// `no_instance` — the instance is unknown here.
    NoInstance,
    /// `instance_failure` — the instance is shutting down (AttachVolume).
    InstanceFailure,
    /// `not_supported` — e.g. attaching a volume to a container.
    NotSupported,
    /// `already_attached` — the volume is already attached.
    AlreadyAttached,
    /// `attach_failure` — mapping or hot-plugging the volume failed.
    AttachFailure,
    /// `state_failure` — the instance state file could not be written.
    StateFailure,
    /// Not in ciao: the instance's command queue is full (a flood of commands
    /// for one instance is refused instead of stalling the node).
    InstanceBusy,
}

impl Reason {
    pub const ALL: [Reason; 21] = [
        Reason::FullCloud,
        Reason::FullCn,
        Reason::NodeMaintenance,
        Reason::NoCn,
        Reason::NoNetCn,
        Reason::InvalidPayload,
        Reason::InvalidData,
        Reason::AlreadyRunning,
        Reason::AlreadyStopped,
        Reason::InstanceExists,
        Reason::InstanceCorrupt,
        Reason::ImageFailure,
        Reason::LaunchFailure,
        Reason::NetworkFailure,
        Reason::NoInstance,
        Reason::InstanceFailure,
        Reason::NotSupported,
        Reason::AlreadyAttached,
        Reason::AttachFailure,
        Reason::StateFailure,
        Reason::InstanceBusy,
    ];

    /// The wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::FullCloud => "full_cloud",
            Reason::FullCn => "full_cn",
            Reason::NodeMaintenance => "node_maintenance",
            Reason::NoCn => "no_cn",
            Reason::NoNetCn => "no_net_cn",
            Reason::InvalidPayload => "invalid_payload",
            Reason::InvalidData => "invalid_data",
            Reason::AlreadyRunning => "already_running",
            Reason::AlreadyStopped => "already_stopped",
            Reason::InstanceExists => "instance_exists",
            Reason::InstanceCorrupt => "instance_corrupt",
            Reason::ImageFailure => "image_failure",
            Reason::LaunchFailure => "launch_failure",
            Reason::NetworkFailure => "network_failure",
            Reason::NoInstance => "no_instance",
            Reason::InstanceFailure => "instance_failure",
            Reason::NotSupported => "not_supported",
            Reason::AlreadyAttached => "already_attached",
            Reason::AttachFailure => "attach_failure",
            Reason::StateFailure => "state_failure",
            Reason::InstanceBusy => "instance_busy",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A reason string no ciao version defines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownReason(pub String);

impl fmt::Display for UnknownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown failure reason {:?}", self.0)
    }
}

impl std::error::Error for UnknownReason {}

impl FromStr for Reason {
    type Err = UnknownReason;
    fn from_str(s: &str) -> Result<Reason, UnknownReason> {
        Reason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownReason(s.to_string()))
    }
}

/// Validates an instance or volume id and returns its canonical form.
///
/// The id (surrounding whitespace trimmed, as the Go launcher trims) must be
/// a hyphenated 8-4-4-4-12 hex UUID; the result is lower-case. This is
/// stricter than Go's `^[0-9a-fA-F]+(-[0-9a-fA-F]+)*$` on purpose: ids become
/// directory and file names, so only a fixed-shape string of hex digits and
/// hyphens may pass — nothing that could contain `/`, `..` or be empty.
pub fn canonical_uuid(s: &str) -> Option<String> {
    let s = s.trim();
    let b = s.as_bytes();
    if b.len() != 36 {
        return None;
    }
    let shape_ok = b.iter().enumerate().all(|(i, c)| match i {
        8 | 13 | 18 | 23 => *c == b'-',
        _ => c.is_ascii_hexdigit(),
    });
    shape_ok.then(|| s.to_ascii_lowercase())
}

/// Why a received payload was refused, ready to become a failure frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadError {
    /// [`Reason::InvalidPayload`] (the YAML could not be decoded, including
    /// type mismatches) or [`Reason::InvalidData`] (a decoded value is invalid).
    pub reason: Reason,
    /// The canonical instance id when the payload carried a valid one; an
    /// invalid id as received (see [`as_received`]); "" for YAML errors and
    /// a missing id. (The Go launcher always reported START parse failures
    /// with an empty `instance_uuid`; ours lets a scheduler match them.)
    pub instance_uuid: String,
    /// Human text: which field, what was wrong, the YAML error position.
    pub detail: String,
}

impl PayloadError {
    pub(crate) fn invalid_payload(detail: impl Into<String>) -> PayloadError {
        PayloadError {
            reason: Reason::InvalidPayload,
            instance_uuid: String::new(),
            detail: detail.into(),
        }
    }

    pub(crate) fn invalid_data(instance: &str, detail: impl Into<String>) -> PayloadError {
        PayloadError {
            reason: Reason::InvalidData,
            instance_uuid: instance.to_string(),
            detail: detail.into(),
        }
    }
}

impl fmt::Display for PayloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)?;
        if !self.instance_uuid.is_empty() {
            write!(f, " (instance {})", self.instance_uuid)?;
        }
        Ok(())
    }
}

impl std::error::Error for PayloadError {}

/// An id that is not a UUID, as an error frame carries it back: as
/// received, but at most [`ID_ECHO_LIMIT`] characters (a peer could send
/// megabytes).
pub(crate) fn as_received(raw: &str) -> String {
    raw.chars().take(ID_ECHO_LIMIT).collect()
}

/// How much of an invalid id an error frame echoes.
pub const ID_ECHO_LIMIT: usize = 256;

/// The payload as text; anything else is `invalid_payload`.
pub(crate) fn payload_text<'a>(payload: &'a [u8], what: &str) -> Result<&'a str, PayloadError> {
    std::str::from_utf8(payload).map_err(|e| {
        PayloadError::invalid_payload(format!(
            "{what} payload is not UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })
}

/// The first YAML document of a payload as a tree; syntax errors are
/// `invalid_payload` with the parser's position.
pub(crate) fn parse_payload(payload: &[u8], what: &str) -> Result<yaml::YamlNode, PayloadError> {
    let text = payload_text(payload, what)?;
    yaml::parse_first_document(text)
        .map_err(|e| PayloadError::invalid_payload(format!("{what} payload: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip() {
        for r in Reason::ALL {
            assert_eq!(r.as_str().parse::<Reason>(), Ok(r));
            assert_eq!(r.to_string(), r.as_str());
        }
        assert_eq!(
            "full_compute_node".parse::<Reason>(),
            Err(UnknownReason("full_compute_node".to_string()))
        );
        assert_eq!(Reason::FullCn.as_str(), "full_cn");
        assert_eq!(Reason::NodeMaintenance.as_str(), "node_maintenance");
    }

    #[test]
    fn uuids() {
        let ok = "D7D86208-b46c-4465-9018-ee14087d415f";
        assert_eq!(
            canonical_uuid(ok).as_deref(),
            Some("d7d86208-b46c-4465-9018-ee14087d415f")
        );
        assert_eq!(
            canonical_uuid(" d7d86208-b46c-4465-9018-ee14087d415f\n").as_deref(),
            Some("d7d86208-b46c-4465-9018-ee14087d415f")
        );
        for bad in [
            "",
            "abc",
            "../../etc",
            "67d86208-000-4465-9018-fe14087d415f",
            "d7d86208b46c44659018ee14087d415f",
            "{d7d86208-b46c-4465-9018-ee14087d415f}",
            "d7d86208-b46c-4465-9018-ee14087d415g",
            "d7d86208-b46c-4465-9018/ee14087d415f",
            "d7d86208-b46c-4465-9018-ee14087d415f0",
            "d7d86208-b46c-4465-9018-ee14087d41\u{e9}",
        ] {
            assert_eq!(canonical_uuid(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn mutated_payloads_never_panic_any_parser() {
        use crate::ssntp::Profile;
        let node = outgoing::NodeStatus::unknown("4481631c-dce9-48d6-b83a-a717417072ce");
        let stat = outgoing::InstanceStat {
            instance_uuid: "d7d86208-b46c-4465-9018-ee14087d415f".into(),
            state: "active".into(),
            ssh_ip: "192.168.42.21".into(),
            ssh_port: 35050,
            memory_usage_mb: 1,
            disk_usage_mb: 2,
            cpu_usage: 3,
            volumes: vec!["73a86d7e-93c0-480e-9c41-ab42f69b7799".into()],
        };
        let id = "d7d86208-b46c-4465-9018-ee14087d415f";
        let seeds = [
            commands::delete_payload(Profile::P2018, id, id, true),
            commands::attach_volume_payload(id, id, id),
            commands::stop_payload(id, id),
            outgoing::stats_payload(Profile::P2018, &node, "READY", [stat.as_ref()]),
            outgoing::error_payload(
                Profile::P2018,
                outgoing::ErrorKind::AttachVolume,
                id,
                id,
                Reason::AttachFailure,
                true,
                id,
            ),
            outgoing::instance_stopped_payload(id),
            b"configure:\n  launcher:\n    compute_net:\n    - 10.0.0.0/8\n    disk_limit: true\n"
                .to_vec(),
        ];
        let alphabet = b"-.:# \n[]{}&*!|>'\"%@~?,0129af\xff";
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..3000 {
            let mut p = seeds[i % seeds.len()].clone();
            for _ in 0..=(next() % 6) {
                let at = (next() as usize) % (p.len() + 1);
                let c = alphabet[(next() as usize) % alphabet.len()];
                if next().is_multiple_of(2) && at < p.len() {
                    p[at] = c;
                } else {
                    p.insert(at, c);
                }
            }
            let _ = commands::parse_delete(&p);
            let _ = commands::parse_stop(&p);
            let _ = commands::parse_restart(&p);
            let _ = commands::parse_attach_volume(&p);
            let _ = commands::parse_configure(&p);
            let _ = outgoing::parse_stats(&p);
            let _ = outgoing::parse_ready(&p);
            let _ = outgoing::parse_error(&p);
            let _ = outgoing::parse_instance_event(&p);
        }
    }

    #[test]
    fn error_display() {
        let e = PayloadError::invalid_data("x", "fw_type: bad");
        assert_eq!(e.to_string(), "invalid_data: fw_type: bad (instance x)");
        let e = PayloadError::invalid_payload("oops");
        assert_eq!(e.to_string(), "invalid_payload: oops");
    }
}
