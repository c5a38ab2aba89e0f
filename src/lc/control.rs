//! The control protocol between the `ciao-lc` commands and a running
//! `ciao-lc serve`, and its client side.
//!
//! 1. The client connects to `<certs>/ciao-lc.sock` and writes one YAML
//!    [`Request`]: a map whose `command` names the request (`list`, `stop`,
//!    …) beside that request's own fields (`node`, `instance`, `payload`);
//!    then it shuts down its write half.
//! 2. `serve` reads the request (at most 64 MiB) and answers with one YAML
//!    [`Response`] and closes, except for `watch`, which streams text lines
//!    until the client goes away.
//!
//! `node` is a node UUID, or empty for "the only connected launcher".

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::cli::{StartArgs, Target};
use super::{CONTROL_SOCKET, LcExit};
use crate::payloads::canonical_uuid;
use crate::payloads::config::{Firmware, Networking, VmType};
use crate::payloads::start::{StartRequest, start_payload};
use crate::ssntp::Profile;

/// One control request; on the wire, `command: <name>` and the fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum Request {
    /// The protocol profile `serve` runs (`ciao-lc start` builds its START by it).
    Profile,
    /// The instances of every launcher, from their last STATS.
    List,
    /// Every launcher's node figures, from their last STATS.
    Stats,
    /// Stream a line per event until the client goes.
    Watch {
        #[serde(default)]
        node: String,
    },
    /// Send this START payload (YAML text).
    Start {
        #[serde(default)]
        node: String,
        payload: String,
    },
    Stop {
        #[serde(default)]
        node: String,
        instance: String,
    },
    Restart {
        #[serde(default)]
        node: String,
        instance: String,
    },
    Delete {
        #[serde(default)]
        node: String,
        instance: String,
    },
    /// Hot-plug `volume` into `instance` (the wire field is `payload`).
    Attach {
        #[serde(default)]
        node: String,
        instance: String,
        #[serde(rename = "payload")]
        volume: String,
    },
    Evacuate {
        #[serde(default)]
        node: String,
    },
    Restore {
        #[serde(default)]
        node: String,
    },
}

impl Request {
    /// The command's name, as on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Profile => "profile",
            Request::List => "list",
            Request::Stats => "stats",
            Request::Watch { .. } => "watch",
            Request::Start { .. } => "start",
            Request::Stop { .. } => "stop",
            Request::Restart { .. } => "restart",
            Request::Delete { .. } => "delete",
            Request::Attach { .. } => "attach",
            Request::Evacuate { .. } => "evacuate",
            Request::Restore { .. } => "restore",
        }
    }

    /// The node a request for one launcher names (`None`: the only one
    /// connected); `None` too for requests about every launcher.
    pub fn node(&self) -> Option<&str> {
        match self {
            Request::Profile | Request::List | Request::Stats => None,
            Request::Watch { node }
            | Request::Start { node, .. }
            | Request::Stop { node, .. }
            | Request::Restart { node, .. }
            | Request::Delete { node, .. }
            | Request::Attach { node, .. }
            | Request::Evacuate { node }
            | Request::Restore { node } => Some(node.as_str()).filter(|n| !n.is_empty()),
        }
    }

    /// Whether the request goes to one launcher (so one must be picked).
    pub fn addresses_a_node(&self) -> bool {
        !matches!(
            self,
            Request::Profile | Request::List | Request::Stats | Request::Watch { .. }
        )
    }
}

/// The answer to a request (not `watch`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Response {
    pub ok: bool,
    pub message: String,
}

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

/// Sends `req`, prints the answer; the exit code says how it went.
pub fn call(target: &Target, req: &Request) -> LcExit {
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
            eprintln!("ciao-lc {}: {}", req.name(), r.message);
            LcExit::Failed
        }
        Err(e) => {
            eprintln!("ciao-lc: unreadable answer from serve: {e}");
            LcExit::Failed
        }
    }
}

/// `ciao-lc watch`: prints the lines `serve` streams until it closes.
pub fn watch(target: &Target) -> LcExit {
    let req = Request::Watch {
        node: target.node.clone().unwrap_or_default(),
    };
    let conn = match send_request(target, &req) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let mut lines = BufReader::new(conn).lines();
    // `serve` streams after a first "watching" line, or answers a refusal
    // (a bad --node) as any request is answered.
    match lines.next() {
        Some(Ok(l)) if l.starts_with("watching") => println!("{l}"),
        Some(Ok(first)) => {
            let rest: Vec<String> = lines.map_while(Result::ok).collect();
            let text = std::iter::once(first)
                .chain(rest)
                .collect::<Vec<_>>()
                .join("\n");
            return match serde_yaml::from_str::<Response>(&text) {
                Ok(r) if !r.ok => {
                    eprintln!("ciao-lc watch: {}", r.message);
                    LcExit::Failed
                }
                _ => {
                    eprintln!("ciao-lc: unreadable answer from serve: {text}");
                    LcExit::Failed
                }
            };
        }
        _ => return LcExit::Ok,
    }
    for line in lines {
        match line {
            Ok(l) => println!("{l}"),
            Err(_) => break,
        }
    }
    LcExit::Ok
}

/// `ciao-lc start`: builds the START (or reads it) and sends it.
pub fn start(target: &Target, spec: &StartArgs) -> LcExit {
    let payload = match build_start(target, spec) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ciao-lc start: {e}");
            return LcExit::Usage;
        }
    };
    let req = Request::Start {
        node: target.node.clone().unwrap_or_default(),
        payload,
    };
    call(target, &req)
}

fn build_start(target: &Target, spec: &StartArgs) -> Result<String, String> {
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
    let tenant = match &spec.tenant {
        Some(t) => canonical_uuid(t).ok_or_else(|| format!("{t:?} is not a tenant UUID"))?,
        None => uuid::Uuid::new_v4().to_string(),
    };
    let given = |v: &Option<String>| v.clone().unwrap_or_default();
    let networking = Networking {
        vnic_mac: given(&spec.vnic_mac),
        // A VNIC needs an identity; one is made up when a MAC is given.
        vnic_uuid: match (&spec.vnic_uuid, &spec.vnic_mac) {
            (Some(v), _) => v.clone(),
            (None, Some(_)) => uuid::Uuid::new_v4().to_string(),
            (None, None) => String::new(),
        },
        concentrator_uuid: given(&spec.concentrator_uuid),
        concentrator_ip: given(&spec.concentrator_ip),
        subnet: given(&spec.subnet),
        private_ip: given(&spec.private_ip),
    };
    let req = StartRequest {
        instance_uuid: instance.clone(),
        tenant_uuid: tenant,
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
        networking,
        network_node: spec.cnci,
    };
    String::from_utf8(start_payload(profile, &req)).map_err(|e| e.to_string())
}

/// The profile `serve` runs.
fn current_profile(target: &Target) -> Option<Profile> {
    let mut conn = send_request(target, &Request::Profile).ok()?;
    let mut text = String::new();
    conn.read_to_string(&mut text).ok()?;
    let r: Response = serde_yaml::from_str(&text).ok()?;
    r.message.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the earlier string-typed requests looked like on the socket
    /// still parses, and what we send reads back the same.
    #[test]
    fn requests_keep_their_wire_form() {
        let old = "command: list\nnode: ''\ninstance: ''\npayload: ''\n";
        assert_eq!(
            serde_yaml::from_str::<Request>(old).ok(),
            Some(Request::List)
        );
        let old = "command: attach\nnode: n\ninstance: i\npayload: v\n";
        assert_eq!(
            serde_yaml::from_str::<Request>(old).ok(),
            Some(Request::Attach {
                node: "n".into(),
                instance: "i".into(),
                volume: "v".into()
            })
        );
        let req = Request::Stop {
            node: String::new(),
            instance: "x".into(),
        };
        let text = serde_yaml::to_string(&req).expect("yaml");
        assert!(text.starts_with("command: stop\n"), "{text}");
        assert_eq!(
            serde_yaml::from_str::<Request>(&text).ok(),
            Some(req.clone())
        );
        assert_eq!(req.node(), None);
        assert!(serde_yaml::from_str::<Request>("command: reboot\n").is_err());
    }
}
