//! START (COMMAND): the payload that creates an instance.
//!
//! The controller sends three YAML documents in one payload — the `start:`
//! document, the workload's cloud-init user data and its JSON meta data
//! (payloads.md §1.1.1). [`split_yaml`] separates them with the Go
//! launcher's line-based algorithm (launcher-behaviour.md §12, quirks
//! included, because controllers and hand-written payloads rely on them);
//! [`parse_start`] decodes and validates the start document into an
//! [`InstanceConfig`]. Both START shapes are read in every profile: 2016's
//! `image_uuid` + `requested_resources` list and 2018's `requirements`
//! mapping + `storage` volumes + `restart`. [`start_payload`] writes the
//! envelope the way a controller of either profile would (operator tool).

use std::net::IpAddr;

use super::config::{Firmware, InstanceConfig, Networking, VmType, Volume};
use super::yaml::{self, DecodeResult, Emitter, Field, YamlNode};
use super::{PayloadError, canonical_uuid, payload_text};
use crate::ssntp::Profile;

/// The three parts of a START payload, each a sequence of `\n`-terminated
/// lines (or empty).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SplitYaml {
    /// The `start:` document.
    pub start: String,
    /// Cloud-init user data for the guest.
    pub user_data: String,
    /// JSON meta data for the guest.
    pub meta_data: String,
}

/// Go's regexp `\s`: ASCII space, tab, newline, form feed, carriage return.
fn is_go_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0c' | '\r')
}

/// `^start\s*:\s*$`
fn is_start_line(line: &str) -> bool {
    line.strip_prefix("start")
        .map(|rest| rest.trim_start_matches(is_go_space))
        .and_then(|rest| rest.strip_prefix(':'))
        .is_some_and(|rest| rest.chars().all(is_go_space))
}

/// Go `bufio.Scanner` lines: split at `\n`, one trailing `\r` dropped, a
/// final unterminated line kept, no empty line after a final `\n`.
fn scan_lines(text: &str) -> Vec<&str> {
    let mut lines = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (line, next) = match rest.find('\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        lines.push(line.strip_suffix('\r').unwrap_or(line));
        rest = next;
    }
    lines
}

/// One document found by the backwards scan, as line indices.
#[derive(Debug, Clone)]
struct Doc {
    /// First line of the document (a directive, `---`, or content).
    first: usize,
    /// Content lines (no directives, `---` or `...`).
    content: std::ops::Range<usize>,
    /// End of the slice the document was cut from (exclusive); the span
    /// `first..end` includes its `...` marker.
    end: usize,
}

/// Partitions the lines into documents from the end backwards, each time
/// on the prefix before the previous document's first line.
fn find_documents(lines: &[&str]) -> Vec<Doc> {
    enum Stop {
        Dashes(usize),
        Dots(usize),
        Top,
    }
    let mut docs = Vec::new();
    let mut end = lines.len();
    while end > 0 {
        let content_end = if lines[end - 1].starts_with("...") {
            end - 1
        } else {
            end
        };
        let mut stop = Stop::Top;
        for k in (0..content_end).rev() {
            if lines[k].starts_with("---") {
                stop = Stop::Dashes(k);
                break;
            }
            if lines[k].starts_with("...") {
                stop = Stop::Dots(k);
                break;
            }
        }
        let (first, content_start) = match stop {
            Stop::Dashes(d) => {
                let mut first = d;
                while first > 0 && lines[first - 1].starts_with('%') {
                    first -= 1;
                }
                (first, d + 1)
            }
            // The `...` ends the previous document; this one starts after it.
            Stop::Dots(d) => (d + 1, d + 1),
            Stop::Top => (0, 0),
        };
        docs.push(Doc {
            first,
            content: content_start..content_end,
            end,
        });
        end = first;
    }
    docs.reverse();
    docs
}

fn join(lines: &[&str]) -> String {
    let mut s = String::new();
    for l in lines {
        s.push_str(l);
        s.push('\n');
    }
    s
}

/// extractStartYaml: the start block and the user data around it, from the
/// line span of one document.
fn extract_start(lines: &[&str], doc: &Doc, start: usize) -> (String, String) {
    let span = &lines[doc.first..doc.end];
    let s = start - doc.first;
    let before = &span[..s];
    let user_from = before
        .iter()
        .position(|l| l.starts_with("---"))
        .map_or(0, |p| p + 1);
    let mut user: Vec<&str> = before[user_from..].to_vec();
    // The start block continues over empty lines and over any line holding
    // whitespace anywhere (Go's unanchored `\s+.*`), so a later top-level
    // `foo: bar` is swallowed while `runcmd:` ends it.
    let mut j = s + 1;
    while j < span.len() && (span[j].is_empty() || span[j].contains(is_go_space)) {
        j += 1;
    }
    if j < span.len() && !span[j].starts_with("...") {
        user.extend_from_slice(&span[j..]);
    }
    (join(&span[s..j]), join(&user))
}

/// Splits a START payload into start document, user data and meta data
/// with the Go launcher's exact line-based rules (launcher-behaviour.md §12).
pub fn split_yaml(payload: &str) -> SplitYaml {
    let lines = scan_lines(payload);
    let found_start = lines.iter().position(|l| is_start_line(l));
    let docs = find_documents(&lines);
    let content = |d: &Doc| join(&lines[d.content.clone()]);
    let contains = |d: &Doc, i: usize| d.first <= i && i < d.end;
    match (docs.as_slice(), found_start) {
        ([], _) => SplitYaml::default(),
        ([doc], Some(st)) => {
            let (start, user_data) = extract_start(&lines, doc, st);
            SplitYaml {
                start,
                user_data,
                meta_data: String::new(),
            }
        }
        ([doc], None) => SplitYaml {
            user_data: content(doc),
            ..SplitYaml::default()
        },
        ([d0, d1], Some(st)) => {
            // Whichever document holds `start:` gives start and user data;
            // the other one is the meta data, even when it comes first.
            let (with_start, other) = if contains(d0, st) { (d0, d1) } else { (d1, d0) };
            let (start, user_data) = extract_start(&lines, with_start, st);
            SplitYaml {
                start,
                user_data,
                meta_data: content(other),
            }
        }
        ([d0, d1], None) => SplitYaml {
            start: String::new(),
            user_data: content(d0),
            meta_data: content(d1),
        },
        ([d0, d1, d2, ..], st) => {
            let three = [d0, d1, d2];
            match st.and_then(|st| three.iter().position(|d| contains(d, st))) {
                Some(k) => {
                    let mut others = three.iter().enumerate().filter(|(i, _)| *i != k);
                    let mut next = || others.next().map(|(_, d)| content(d)).unwrap_or_default();
                    let user_data = next();
                    let meta_data = next();
                    SplitYaml {
                        start: content(three[k]),
                        user_data,
                        meta_data,
                    }
                }
                // No start, or start in a later document: Go logs a warning
                // and returns nothing at all.
                None => SplitYaml::default(),
            }
        }
    }
}

/// The start document as decoded, before validation (yaml.v2 decodes the
/// whole struct first, so type errors win over invalid values).
#[derive(Debug, Default)]
struct RawStart {
    tenant_uuid: String,
    instance_uuid: String,
    image_uuid: String,
    docker_image: String,
    fw_type: String,
    vm_type: String,
    networking: Networking,
    storage: Vec<(String, bool)>,
    vcpus: i64,
    mem_mb: i64,
    disk_mb: i64,
    /// `vcpus` / `mem_mb` were in the payload (an absent size is left to
    /// the virtualizer's default; a zero one is refused).
    vcpus_given: bool,
    mem_given: bool,
    network_node: bool,
    privileged: bool,
    restart: bool,
}

fn trimmed(f: &Field<'_>) -> DecodeResult<String> {
    Ok(f.string()?.trim().to_string())
}

fn decode_start(root: &YamlNode) -> DecodeResult<RawStart> {
    let s = Field::root(root).get("start")?;
    let mut raw = RawStart {
        tenant_uuid: trimmed(&s.get("tenant_uuid")?)?,
        instance_uuid: s.get("instance_uuid")?.string()?,
        image_uuid: trimmed(&s.get("image_uuid")?)?,
        docker_image: trimmed(&s.get("docker_image")?)?,
        fw_type: s.get("fw_type")?.string()?,
        vm_type: s.get("vm_type")?.string()?,
        restart: s.get("restart")?.bool()?,
        ..RawStart::default()
    };
    // Read but unused, type-checked like Go does.
    s.get("persistence")?.string()?;

    let net = s.get("networking")?;
    raw.networking = Networking {
        vnic_mac: trimmed(&net.get("vnic_mac")?)?,
        vnic_uuid: trimmed(&net.get("vnic_uuid")?)?,
        concentrator_uuid: trimmed(&net.get("concentrator_uuid")?)?,
        concentrator_ip: trimmed(&net.get("concentrator_ip")?)?,
        subnet: trimmed(&net.get("subnet")?)?,
        private_ip: trimmed(&net.get("private_ip")?)?,
    };
    net.get("subnet_key")?.string()?;
    net.get("subnet_uuid")?.string()?;
    net.get("public_ip")?.bool()?;

    for item in s.get("storage")?.items()? {
        let id = item.get("id")?.string()?;
        let boot = item.get("boot")?.bool()?;
        for key in ["ephemeral", "local", "swap"] {
            item.get(key)?.bool()?;
        }
        item.get("boot_index")?.int()?;
        item.get("size")?.int()?;
        item.get("tag")?.string()?;
        raw.storage.push((id, boot));
    }

    // 2016 shape: a list of typed resources (network_node: value != 0).
    for item in s.get("requested_resources")?.items()? {
        let kind = item.get("type")?.string()?;
        let value = item.get("value")?.int()?;
        item.get("value_string")?.string()?;
        item.get("mandatory")?.bool()?;
        match kind.as_str() {
            "vcpus" => (raw.vcpus, raw.vcpus_given) = (value, true),
            "mem_mb" => (raw.mem_mb, raw.mem_given) = (value, true),
            "disk_mb" => raw.disk_mb = value,
            "network_node" => raw.network_node = value != 0,
            _ => {}
        }
    }
    for item in s.get("estimated_resources")?.items()? {
        item.get("type")?.string()?;
        item.get("value")?.int()?;
    }

    // 2018 shape: keys present in `requirements` override the list.
    let req = s.get("requirements")?;
    if let Some(v) = req.get("vcpus")?.opt_int()? {
        (raw.vcpus, raw.vcpus_given) = (v, true);
    }
    if let Some(v) = req.get("mem_mb")?.opt_int()? {
        (raw.mem_mb, raw.mem_given) = (v, true);
    }
    // Not a ciao key: lets a 2018-shaped START carry a disk size (ours
    // round-trips it; Go peers ignore it).
    if let Some(v) = req.get("disk_mb")?.opt_int()? {
        raw.disk_mb = v;
    }
    let nn = req.get("network_node")?;
    if nn.is_set() {
        raw.network_node = nn.bool()?;
    }
    raw.privileged = req.get("privileged")?.bool()?;
    req.get("node_id")?.string()?;
    req.get("hostname")?.string()?;
    Ok(raw)
}

/// A value for error messages: quoted, cut to a readable length.
fn shown(s: &str) -> String {
    let cut: String = s.chars().take(64).collect();
    if cut.len() < s.len() {
        format!("{cut:?}…")
    } else {
        format!("{cut:?}")
    }
}

/// The node port forwarded to the instance's SSH port: 33000 + the last
/// two octets of its IPv4 address; 0 for network nodes, no/invalid
/// address, or a result that is not a usable port.
fn ssh_port(network_node: bool, private_ip: &str) -> u16 {
    if network_node {
        return 0;
    }
    let v4 = match private_ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4,
        Ok(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => v4,
            None => return 0,
        },
        Err(_) => return 0,
    };
    let [_, _, hi, lo] = v4.octets();
    let port = 33000 + u32::from(hi) * 256 + u32::from(lo);
    u16::try_from(port).ok().filter(|p| *p < 65535).unwrap_or(0)
}

fn validate(raw: RawStart, split: SplitYaml) -> Result<InstanceConfig, PayloadError> {
    let instance = canonical_uuid(&raw.instance_uuid).ok_or_else(|| {
        // The id as received, so that the scheduler can match the error to
        // its request.
        PayloadError::invalid_data(
            &super::as_received(&raw.instance_uuid),
            format!(
                "start.instance_uuid: {} is not a UUID",
                shown(raw.instance_uuid.trim())
            ),
        )
    })?;
    let bad = |detail: String| PayloadError::invalid_data(&instance, detail);
    let firmware = match raw.fw_type.as_str() {
        "" | "efi" => Firmware::Efi,
        "legacy" => Firmware::Legacy,
        other => {
            return Err(bad(format!(
                "start.fw_type: {} is not \"\", legacy or efi",
                shown(other)
            )));
        }
    };
    let vm_type = match raw.vm_type.as_str() {
        "" | "qemu" => VmType::Qemu,
        "docker" => VmType::Docker,
        other => {
            return Err(bad(format!(
                "start.vm_type: {} is not \"\", qemu or docker",
                shown(other)
            )));
        }
    };
    let mut volumes = Vec::with_capacity(raw.storage.len());
    for (i, (id, bootable)) in raw.storage.iter().enumerate() {
        if id.trim().is_empty() {
            return Err(bad(format!(
                "start.storage[{i}].id is empty (volumes must exist; local disks are not supported)"
            )));
        }
        // Volume ids name files under volumes/: same rule as instance ids.
        let uuid = canonical_uuid(id).ok_or_else(|| {
            bad(format!(
                "start.storage[{i}].id: {} is not a UUID",
                shown(id.trim())
            ))
        })?;
        volumes.push(Volume {
            uuid,
            bootable: *bootable,
        });
    }
    // Image ids name backing files under images/.
    let image_uuid = if raw.image_uuid.is_empty() {
        String::new()
    } else {
        canonical_uuid(&raw.image_uuid).ok_or_else(|| {
            bad(format!(
                "start.image_uuid: {} is not a UUID",
                shown(&raw.image_uuid)
            ))
        })?
    };
    let vcpus = u32::try_from(raw.vcpus)
        .map_err(|_| bad(format!("vcpus: {} is out of range", raw.vcpus)))?;
    let mem_mb = u64::try_from(raw.mem_mb)
        .map_err(|_| bad(format!("mem_mb: {} is out of range", raw.mem_mb)))?;
    let disk_mb = u64::try_from(raw.disk_mb)
        .map_err(|_| bad(format!("disk_mb: {} is out of range", raw.disk_mb)))?;
    // Zero is no size QEMU or Docker can run with (ciao's scheduler never
    // sends it); sizes beyond the node are refused at admission.
    if raw.vcpus_given && vcpus == 0 {
        return Err(bad("vcpus: 0 (an instance needs at least one)".into()));
    }
    if raw.mem_given && mem_mb == 0 {
        return Err(bad("mem_mb: 0 (an instance needs memory)".into()));
    }

    let ssh_port = ssh_port(raw.network_node, &raw.networking.private_ip);
    Ok(InstanceConfig {
        instance_uuid: instance,
        tenant_uuid: raw.tenant_uuid,
        image_uuid,
        docker_image: raw.docker_image,
        vm_type,
        firmware,
        vcpus,
        mem_mb,
        disk_mb,
        network_node: raw.network_node,
        privileged: raw.privileged,
        networking: raw.networking,
        ssh_port,
        // Chosen by the launcher at boot, never by the scheduler.
        ssh_forward: None,
        volumes,
        restart: raw.restart,
        user_data: split.user_data,
        meta_data: split.meta_data,
    })
}

/// Decodes and validates a whole START frame payload (the three-document
/// envelope or a lone start document, either START shape).
///
/// Errors, in the Go launcher's order (payloads.md §1.1.2):
/// non-UTF-8 or undecodable start document (syntax, type mismatch such as
/// `vcpus: two`) → `invalid_payload`; instance id not a UUID (also when
/// missing, e.g. no `start:` line at all) → `invalid_data` with an empty
/// `instance_uuid`; bad `fw_type`, `vm_type`, empty or malformed storage
/// id, malformed `image_uuid`, negative sizes → `invalid_data` carrying the
/// instance id.
pub fn parse_start(payload: &[u8]) -> Result<InstanceConfig, PayloadError> {
    let text = payload_text(payload, "START")?;
    let split = split_yaml(text);
    let root = yaml::parse_first_document(&split.start)
        .map_err(|e| PayloadError::invalid_payload(format!("START start document: {e}")))?;
    let raw = decode_start(&root)
        .map_err(|e| PayloadError::invalid_payload(format!("START start document: {e}")))?;
    if split.start.is_empty() && raw.instance_uuid.is_empty() {
        // Same outcome as Go (the empty document decodes to nothing and
        // the id check fails), with a clearer detail.
        return Err(PayloadError::invalid_data(
            "",
            "START payload has no usable `start:` document",
        ));
    }
    validate(raw, split)
}

/// What an operator asks to start; [`start_payload`] turns it into the
/// envelope a controller would send.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StartRequest {
    pub instance_uuid: String,
    pub tenant_uuid: String,
    /// VM backing image (2016); empty for containers and volume-booted VMs.
    pub image_uuid: String,
    pub docker_image: String,
    pub vm_type: VmType,
    pub firmware: Firmware,
    pub vcpus: u32,
    pub mem_mb: u64,
    pub disk_mb: u64,
    pub volumes: Vec<Volume>,
    pub restart: bool,
    /// Cloud-init user data, e.g. `"#cloud-config\nruncmd:\n..."`.
    pub user_data: String,
    /// JSON meta data.
    pub meta_data: String,
    /// Tenant networking (empty strings: none).
    pub networking: Networking,
    /// A CNCI: runs on a network node with a macvtap VNIC.
    pub network_node: bool,
}

fn write_start_document(profile: Profile, req: &StartRequest) -> String {
    let mut e = Emitter::new();
    e.open(0, "start");
    e.str(1, "tenant_uuid", &req.tenant_uuid);
    e.str(1, "instance_uuid", &req.instance_uuid);
    if profile == Profile::P2016 || !req.image_uuid.is_empty() {
        e.str(1, "image_uuid", &req.image_uuid);
    }
    e.str(1, "docker_image", &req.docker_image);
    e.str(
        1,
        "fw_type",
        match req.firmware {
            Firmware::Efi => "efi",
            Firmware::Legacy => "legacy",
        },
    );
    e.str(1, "persistence", "host");
    e.str(
        1,
        "vm_type",
        match req.vm_type {
            VmType::Qemu => "qemu",
            VmType::Docker => "docker",
        },
    );
    if profile == Profile::P2016 {
        let mut resources = vec![
            ("vcpus", u64::from(req.vcpus)),
            ("mem_mb", req.mem_mb),
            ("disk_mb", req.disk_mb),
        ];
        let estimated = resources.clone();
        if req.network_node {
            resources.push(("network_node", 1));
        }
        e.map_list(1, "requested_resources", &resources, |e, l, (t, v)| {
            e.str(l, "type", t);
            e.int(l, "value", *v);
            e.bool(l, "mandatory", true);
        });
        e.map_list(1, "estimated_resources", &estimated, |e, l, (t, v)| {
            e.str(l, "type", t);
            e.int(l, "value", *v);
        });
    }
    e.open(1, "networking");
    let n = &req.networking;
    for (key, value) in [
        ("vnic_mac", &n.vnic_mac),
        ("vnic_uuid", &n.vnic_uuid),
        ("concentrator_uuid", &n.concentrator_uuid),
        ("concentrator_ip", &n.concentrator_ip),
        ("subnet", &n.subnet),
        ("subnet_key", &String::new()),
        ("subnet_uuid", &String::new()),
        ("private_ip", &n.private_ip),
    ] {
        e.str(2, key, value);
    }
    e.bool(2, "public_ip", false);
    // `storage` is omitempty in Go.
    if !req.volumes.is_empty() {
        e.map_list(1, "storage", &req.volumes, |e, l, v| {
            e.str(l, "id", &v.uuid);
            e.bool(l, "boot", v.bootable);
        });
    }
    if profile == Profile::P2018 {
        e.open(1, "requirements");
        e.int(2, "mem_mb", req.mem_mb);
        e.int(2, "vcpus", req.vcpus);
        if req.disk_mb != 0 {
            e.int(2, "disk_mb", req.disk_mb);
        }
        if req.network_node {
            e.bool(2, "network_node", true);
        }
        e.bool(1, "restart", req.restart);
    } else if req.restart {
        e.bool(1, "restart", true);
    }
    e.into_string()
}

/// Lines of a document body, `\n`-terminated.
fn body(s: &str) -> String {
    if s.is_empty() || s.ends_with('\n') {
        s.to_string()
    } else {
        format!("{s}\n")
    }
}

/// The START payload as a controller of `profile` sends it:
/// `---\n<start>...\n---\n<user data>...\n---\n<meta data>...\n`.
///
/// 2016 writes `image_uuid` and the `requested_resources` list; 2018 writes
/// `requirements`, `storage` and `restart`. Values a profile has no key for
/// are written only when set (2018 `image_uuid`/`requirements.disk_mb`,
/// 2016 `storage`/`restart`), so [`parse_start`] recovers the request in
/// both profiles. User data and meta data must not contain lines starting
/// with `---` or `...`, nor a `start:` line (the format cannot escape them).
pub fn start_payload(profile: Profile, req: &StartRequest) -> Vec<u8> {
    let mut out = String::from("---\n");
    out.push_str(&write_start_document(profile, req));
    out.push_str("...\n---\n");
    out.push_str(&body(&req.user_data));
    out.push_str("...\n---\n");
    out.push_str(&body(&req.meta_data));
    out.push_str("...\n");
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payloads::Reason;

    // Parts for the splitYaml conformance table (tests.md §2.2).
    const START: &str = "start:\n  requirements:\n    vcpus: 2\n    mem_mb: 370\n  instance_uuid: d7d86208-b46c-4465-9018-ee14087d415f\n";
    const CLOUD_INIT: &str = "#cloud-config\nruncmd:\n  - [ touch, \"/etc/bootdone\" ]\n";
    const CLOUD_INIT2: &str = "write_files:\n  - path: /etc/motd\n    content: hi\n";
    const META: &str = "{\n  \"uuid\": \"ciao\",\n  \"hostname\": \"ciao\"\n}\n";
    // Directives always precede a `---` marker.
    const DIRECTIVES: &str = "%YAML 1.1\n%TAG ! tag:ciao.example,2016:\n---\n";
    const COMMENT: &str = "# a comment\n";

    fn split(input: &str) -> (String, String, String) {
        let s = split_yaml(input);
        (s.start, s.user_data, s.meta_data)
    }

    #[test]
    fn split_yaml_conformance_table() {
        let s = START;
        let c = CLOUD_INIT;
        let m = META;
        let d = DIRECTIVES;
        let cases: Vec<(&str, String, &str, String, &str)> = vec![
            ("start only", s.to_string(), s, String::new(), ""),
            (
                "leading newline + start",
                format!("\n{s}"),
                s,
                "\n".into(),
                "",
            ),
            ("--- + start", format!("---\n{s}"), s, String::new(), ""),
            (
                "--- + comment + start",
                format!("---\n{COMMENT}{s}"),
                s,
                COMMENT.into(),
                "",
            ),
            (
                "--- + wibble: + start",
                format!("---\nwibble:\n{s}"),
                s,
                "wibble:\n".into(),
                "",
            ),
            (
                "directives + --- + start",
                format!("{d}{s}"),
                s,
                String::new(),
                "",
            ),
            (
                "directives + start ... cloudInit",
                format!("{d}{s}...\n{c}"),
                s,
                String::new(),
                c,
            ),
            (
                "cloudInit + directives + start",
                format!("{c}{d}{s}"),
                s,
                String::new(),
                c,
            ),
            ("cloudInit + start", format!("{c}{s}"), s, c.into(), ""),
            (
                "cloudInit + start + cloudInit2",
                format!("{c}{s}{CLOUD_INIT2}"),
                s,
                format!("{c}{CLOUD_INIT2}"),
                "",
            ),
            ("empty string", String::new(), "", String::new(), ""),
            (
                "three ... without final newline",
                "...\n...\n...".into(),
                "",
                String::new(),
                "",
            ),
            (
                "cloudInit ... start ... metaData",
                format!("{c}...\n{s}...\n{m}"),
                s,
                c.into(),
                m,
            ),
            (
                "--- and ... around each",
                format!("---\n{c}...\n---\n{s}...\n---\n{m}...\n"),
                s,
                c.into(),
                m,
            ),
            (
                "start ... cloudInit ... metaData",
                format!("{s}...\n{c}...\n{m}"),
                s,
                c.into(),
                m,
            ),
            (
                "cloudInit ... metaData --- start",
                format!("{c}...\n{m}---\n{s}"),
                s,
                c.into(),
                m,
            ),
            (
                "directives cloudInit ... directives start ... metaData",
                format!("{d}{c}...\n{d}{s}...\n{m}"),
                s,
                c.into(),
                m,
            ),
            (
                "... x3 + start",
                format!("...\n...\n...\n{s}"),
                "",
                String::new(),
                "",
            ),
            (
                "cloudInit ... metaData, no start",
                format!("{c}...\n{m}"),
                "",
                c.into(),
                m,
            ),
            (
                "directives cloudInit ... directives start ... --- metaData",
                format!("{d}{c}...\n{d}{s}...\n---\n{m}"),
                s,
                c.into(),
                m,
            ),
            (
                "directives ... --- ... --- ...",
                format!("{d}...\n---\n...\n---\n...\n"),
                "",
                String::new(),
                "",
            ),
            ("...\\n x3", "...\n...\n...\n".into(), "", String::new(), ""),
            ("---\\n x3", "---\n---\n---\n".into(), "", String::new(), ""),
            ("nothing at all", String::new(), "", String::new(), ""),
        ];
        assert_eq!(cases.len(), 24);
        for (name, input, start, user, meta) in cases {
            assert_eq!(
                split(&input),
                (start.to_string(), user, meta.to_string()),
                "case {name:?}: {input:?}"
            );
        }
    }

    /// The full wire example of payloads.md §1.1.1 (start_legacy.yaml).
    const WIRE_START: &str = "---
start:
  requirements:
    vcpus: 2
    mem_mb: 370
  instance_uuid: d7d86208-b46c-4465-9018-ee14087d415f
  tenant_uuid: 67d86208-000-4465-9018-fe14087d415f
  fw_type: legacy
  networking:
    vnic_mac: 02:00:e6:f5:af:f9
    vnic_uuid: 67d86208-b46c-0000-9018-fe14087d415f
    concentrator_ip: 192.168.42.21
    concentrator_uuid: 67d86208-b46c-4465-0000-fe14087d415f
    subnet: 192.168.8.0/21
    private_ip: 192.168.8.2
  storage:
    - id: 73a86d7e-93c0-480e-9c41-ab42f69b7799
      boot: true
...
---
#cloud-config
runcmd:
  - [ touch, \"/etc/bootdone\" ]
...
---
{
  \"uuid\": \"ciao\",
  \"hostname\": \"ciao\"
}
...
";

    const WIRE_START_DOC: &str = "start:
  requirements:
    vcpus: 2
    mem_mb: 370
  instance_uuid: d7d86208-b46c-4465-9018-ee14087d415f
  tenant_uuid: 67d86208-000-4465-9018-fe14087d415f
  fw_type: legacy
  networking:
    vnic_mac: 02:00:e6:f5:af:f9
    vnic_uuid: 67d86208-b46c-0000-9018-fe14087d415f
    concentrator_ip: 192.168.42.21
    concentrator_uuid: 67d86208-b46c-4465-0000-fe14087d415f
    subnet: 192.168.8.0/21
    private_ip: 192.168.8.2
  storage:
    - id: 73a86d7e-93c0-480e-9c41-ab42f69b7799
      boot: true
";

    #[test]
    fn split_controller_envelope() {
        assert_eq!(
            split(WIRE_START),
            (
                WIRE_START_DOC.to_string(),
                CLOUD_INIT.to_string(),
                META.to_string()
            )
        );
    }

    #[test]
    fn split_swallows_top_level_lines_with_spaces() {
        let input = "start:\n  instance_uuid: x\nfoo: bar\nruncmd:\n  - ls\n";
        assert_eq!(
            split(input),
            (
                "start:\n  instance_uuid: x\nfoo: bar\n".to_string(),
                "runcmd:\n  - ls\n".to_string(),
                String::new()
            )
        );
        // CRLF lines and `start :` with blanks are recognised.
        let crlf = "start :  \r\n  instance_uuid: x\r\n";
        assert_eq!(split(crlf).0, "start :  \n  instance_uuid: x\n");
    }

    fn wire_config() -> InstanceConfig {
        InstanceConfig {
            instance_uuid: "d7d86208-b46c-4465-9018-ee14087d415f".into(),
            tenant_uuid: "67d86208-000-4465-9018-fe14087d415f".into(),
            image_uuid: String::new(),
            docker_image: String::new(),
            vm_type: VmType::Qemu,
            firmware: Firmware::Legacy,
            vcpus: 2,
            mem_mb: 370,
            disk_mb: 0,
            network_node: false,
            privileged: false,
            networking: Networking {
                vnic_mac: "02:00:e6:f5:af:f9".into(),
                vnic_uuid: "67d86208-b46c-0000-9018-fe14087d415f".into(),
                concentrator_uuid: "67d86208-b46c-4465-0000-fe14087d415f".into(),
                concentrator_ip: "192.168.42.21".into(),
                subnet: "192.168.8.0/21".into(),
                private_ip: "192.168.8.2".into(),
            },
            ssh_port: 35050,
            ssh_forward: None,
            volumes: vec![Volume {
                uuid: "73a86d7e-93c0-480e-9c41-ab42f69b7799".into(),
                bootable: true,
            }],
            restart: false,
            user_data: CLOUD_INIT.into(),
            meta_data: META.into(),
        }
    }

    #[test]
    fn parse_wire_example() {
        assert_eq!(parse_start(WIRE_START.as_bytes()), Ok(wire_config()));
        // A lone start document works too.
        let lone = parse_start(WIRE_START_DOC.as_bytes()).expect("lone start document");
        assert_eq!(lone.ssh_port, 35050);
        assert_eq!(lone.user_data, "");
        assert_eq!(lone.meta_data, "");
    }

    /// The controller's marshalled start document (payloads.md §1.1.2, Go output).
    const GO_START_DOC: &str = "start:
  tenant_uuid: 67d86208-0000-4465-9018-fe14087d415f
  instance_uuid: d7d86208-b46c-4465-9018-ee14087d415f
  docker_image: \"\"
  fw_type: legacy
  persistence: host
  vm_type: qemu
  networking:
    vnic_mac: 02:00:c0:a8:08:02
    vnic_uuid: 67d86208-b46c-0000-9018-fe14087d415f
    concentrator_uuid: 67d86208-b46c-4465-0000-fe14087d415f
    concentrator_ip: 192.168.42.21
    subnet: 192.168.8.0/21
    subnet_key: \"\"
    subnet_uuid: \"\"
    private_ip: 192.168.8.2
    public_ip: false
  storage:
  - id: 73a86d7e-93c0-480e-9c41-ab42f69b7799
    boot: true
  requirements:
    mem_mb: 370
    vcpus: 2
  restart: false
";

    #[test]
    fn parse_go_marshalled_2018_start() {
        let cfg = parse_start(GO_START_DOC.as_bytes()).expect("valid");
        let mut want = wire_config();
        want.tenant_uuid = "67d86208-0000-4465-9018-fe14087d415f".into();
        want.networking.vnic_mac = "02:00:c0:a8:08:02".into();
        want.user_data = String::new();
        want.meta_data = String::new();
        assert_eq!(cfg, want);
        let restarted = GO_START_DOC.replace("restart: false", "restart: true");
        assert!(parse_start(restarted.as_bytes()).expect("valid").restart);
    }

    /// wire-2016.md's start_legacy.yaml at e7061307 (comments included).
    const LEGACY_2016: &str = "---
start:
  requested_resources:
     - type: vcpus        # vcpus | mem_mb | disk_mb | network_node
       value: 2
     - type: mem_mb       # the scheduler requires mem_mb > 0
       value: 370
     - type: disk_mb
       value: 8000
  instance_uuid: d7d86208-b46c-4465-9018-fe14087d415f
  tenant_uuid: 67d86208-000-4465-9018-fe14087d415f
  image_uuid: b286cd45-7d0c-4525-a140-4db6c95e41fa
  docker_image: ubuntu:latest
  vm_type: qemu
  fw_type: legacy
  persistence: host
  estimated_resources: [ {type: mem_mb, value: 370} ]
  networking:
    vnic_mac: 02:00:e6:f5:af:f9
    vnic_uuid: 67d86208-b46c-0000-9018-fe14087d415f
    concentrator_ip: 192.168.42.21
    concentrator_uuid: 67d86208-b46c-4465-0000-fe14087d415f
    subnet: 192.168.8.0/21
    subnet_key: \"\"
    subnet_uuid: \"\"
    private_ip: 192.168.8.2
    public_ip: false
...
---
#cloud-config
runcmd:
  - [ touch, \"/etc/bootdone\" ]
...
---
{
  \"uuid\": \"ciao\",
  \"hostname\": \"ciao\"
}
...
";

    #[test]
    fn parse_legacy_2016_shape() {
        let cfg = parse_start(LEGACY_2016.as_bytes()).expect("valid");
        assert_eq!(cfg.instance_uuid, "d7d86208-b46c-4465-9018-fe14087d415f");
        assert_eq!(cfg.image_uuid, "b286cd45-7d0c-4525-a140-4db6c95e41fa");
        assert_eq!(cfg.docker_image, "ubuntu:latest");
        assert_eq!((cfg.vcpus, cfg.mem_mb, cfg.disk_mb), (2, 370, 8000));
        assert_eq!(cfg.vm_type, VmType::Qemu);
        assert_eq!(cfg.firmware, Firmware::Legacy);
        assert_eq!(cfg.ssh_port, 35050);
        assert!(cfg.volumes.is_empty());
        assert!(!cfg.network_node && !cfg.restart);
        assert_eq!(cfg.user_data, CLOUD_INIT);
        assert_eq!(cfg.meta_data, META);
    }

    #[test]
    fn parse_container_start() {
        let payload = "---
start:
  requirements:
    vcpus: 2
    mem_mb: 370
  instance_uuid: d7d86208-b46c-4465-9018-ee14087d415f
  tenant_uuid: 67d86208-000-4465-9018-fe14087d415f
  vm_type: docker
  docker_image: ubuntu:latest
  networking:
    vnic_mac: 02:00:e6:f5:af:f9
    vnic_uuid: 67d86208-b46c-0000-9018-fe14087d415f
    concentrator_ip: 192.168.42.21
    concentrator_uuid: 67d86208-b46c-4465-0000-fe14087d415f
    subnet: 192.168.8.0/21
    private_ip: 192.168.8.2
...
---
#cloud-config
runcmd:
  - [ /bin/bash, -c, \"while true; do sleep 60; done\" ]
...
---
{
  \"uuid\": \"ciao\",
  \"hostname\": \"ciao\"
}
...
";
        let cfg = parse_start(payload.as_bytes()).expect("valid");
        assert_eq!(cfg.vm_type, VmType::Docker);
        assert_eq!(cfg.docker_image, "ubuntu:latest");
        assert_eq!(cfg.firmware, Firmware::Efi);
        assert!(cfg.volumes.is_empty());
        assert_eq!(
            cfg.user_data,
            "#cloud-config\nruncmd:\n  - [ /bin/bash, -c, \"while true; do sleep 60; done\" ]\n"
        );
        assert_eq!(cfg.meta_data, META);
    }

    #[test]
    fn parse_network_node_start() {
        let payload = "---
start:
  requirements:
    vcpus: 4
    mem_mb: 2048
    network_node: true
  instance_uuid: 67d86208-b46c-4465-0000-fe14087d415f
  tenant_uuid: 67d86208-0000-4465-9018-fe14087d415f
  fw_type: efi
  networking:
    vnic_mac: 02:00:8c:ba:f9:45
    vnic_uuid: 67d86208-b46c-0000-9018-fe14087d415f
  storage:
    - id: 73a86d7e-93c0-480e-9c41-ab42f69b7799
      boot: true
...
";
        let cfg = parse_start(payload.as_bytes()).expect("valid");
        assert!(cfg.network_node);
        assert_eq!(cfg.ssh_port, 0);
        assert_eq!(cfg.networking.vnic_mac, "02:00:8c:ba:f9:45");
        assert_eq!(cfg.networking.private_ip, "");
        // The 2016 spelling of the same request.
        let old = "start:\n  instance_uuid: 67d86208-b46c-4465-0000-fe14087d415f\n  requested_resources:\n  - type: network_node\n    value: 1\n  networking:\n    private_ip: 192.168.8.2\n";
        let cfg = parse_start(old.as_bytes()).expect("valid");
        assert!(cfg.network_node);
        assert_eq!(cfg.ssh_port, 0);
    }

    fn err(payload: &str) -> PayloadError {
        parse_start(payload.as_bytes()).expect_err(payload)
    }

    #[test]
    fn invalid_instance_ids() {
        for id in [
            "../../etc",
            "abc",
            "imnotvalid",
            "67d86208-000-4465-9018-fe14087d415f",
            "d7d86208-b46c-4465-9018-ee14087d415f/..",
            "\"\"",
        ] {
            let doc = GO_START_DOC.replace("d7d86208-b46c-4465-9018-ee14087d415f", id);
            let e = err(&doc);
            assert_eq!(e.reason, Reason::InvalidData, "{id}: {e}");
            // As received, so that a scheduler can match it to its request.
            let echoed = if id == "\"\"" { "" } else { id };
            assert_eq!(e.instance_uuid, echoed, "{id}");
            assert!(e.detail.contains("instance_uuid"), "{e}");
        }
        // Upper case and surrounding blanks are fine: canonical form.
        let doc = GO_START_DOC.replace(
            "d7d86208-b46c-4465-9018-ee14087d415f",
            "\"  D7D86208-B46C-4465-9018-EE14087D415F \"",
        );
        assert_eq!(
            parse_start(doc.as_bytes()).expect("valid").instance_uuid,
            "d7d86208-b46c-4465-9018-ee14087d415f"
        );
    }

    #[test]
    fn invalid_values() {
        let id = "d7d86208-b46c-4465-9018-ee14087d415f";
        let cases = [
            ("fw_type: legacy", "fw_type: imnotvalid", "fw_type"),
            ("vm_type: qemu", "vm_type: askajajlsj", "vm_type"),
            (
                "  - id: 73a86d7e-93c0-480e-9c41-ab42f69b7799",
                "  - id: \"\"",
                "storage[0].id",
            ),
            (
                "  - id: 73a86d7e-93c0-480e-9c41-ab42f69b7799",
                "  - id: ../../dev/sda",
                "storage[0].id",
            ),
            ("vcpus: 2", "vcpus: -1", "vcpus"),
            ("mem_mb: 370", "mem_mb: -5", "mem_mb"),
            (
                "  restart: false",
                "  image_uuid: ../x\n  restart: false",
                "image_uuid",
            ),
        ];
        for (from, to, field) in cases {
            let doc = GO_START_DOC.replace(from, to);
            assert_ne!(doc, GO_START_DOC, "{from}");
            let e = err(&doc);
            assert_eq!(e.reason, Reason::InvalidData, "{to}: {e}");
            assert_eq!(e.instance_uuid, id, "{to}");
            assert!(e.detail.contains(field), "{to}: {e}");
        }
        // fw_type "" means EFI, vm_type "" means qemu.
        let doc = GO_START_DOC
            .replace("fw_type: legacy", "fw_type: \"\"")
            .replace("vm_type: qemu", "vm_type: \"\"");
        let cfg = parse_start(doc.as_bytes()).expect("valid");
        assert_eq!((cfg.firmware, cfg.vm_type), (Firmware::Efi, VmType::Qemu));
    }

    #[test]
    fn validation_order_follows_go() {
        // A type error anywhere beats a bad id; a bad id beats a bad fw_type;
        // fw_type beats vm_type, which beats storage.
        let doc = GO_START_DOC
            .replace("d7d86208-b46c-4465-9018-ee14087d415f", "abc")
            .replace("vcpus: 2", "vcpus: two");
        assert_eq!(err(&doc).reason, Reason::InvalidPayload);
        let doc = GO_START_DOC
            .replace("d7d86208-b46c-4465-9018-ee14087d415f", "abc")
            .replace("fw_type: legacy", "fw_type: bios");
        assert!(err(&doc).detail.contains("instance_uuid"));
        let doc = GO_START_DOC
            .replace("fw_type: legacy", "fw_type: bios")
            .replace("vm_type: qemu", "vm_type: kvm");
        assert!(err(&doc).detail.contains("fw_type"));
        let doc = GO_START_DOC
            .replace("vm_type: qemu", "vm_type: kvm")
            .replace("boot: true", "boot: true\n  - id: \"\"");
        assert!(err(&doc).detail.contains("vm_type"));
    }

    #[test]
    fn invalid_payloads() {
        let cases = [
            GO_START_DOC.replace("vcpus: 2", "vcpus: two"),
            GO_START_DOC.replace("public_ip: false", "public_ip: maybe"),
            GO_START_DOC.replace("    mem_mb: 370\n", "    mem_mb: [370]\n"),
            GO_START_DOC.replace("  storage:\n", "  storage: 5\n  x:\n"),
            "start:\n  instance_uuid: [\n".to_string(),
            "start:\n  instance_uuid: a\n   bad: indent\n".to_string(),
            "start:\n- a\n- b\n".to_string(),
            "start:\n  requirements: 12\n".to_string(),
            "start:\n  vcpus: 99999999999999999999999\n  requirements:\n    vcpus: 99999999999999999999999\n".to_string(),
        ];
        for doc in cases {
            let e = err(&doc);
            assert_eq!(e.reason, Reason::InvalidPayload, "{doc}: {e}");
            assert_eq!(e.instance_uuid, "");
        }
        let e = err(&GO_START_DOC.replace("vcpus: 2", "vcpus: two"));
        assert!(e.detail.contains("start.requirements.vcpus"), "{e}");
        assert!(e.detail.contains("two"), "{e}");
        let e = err("start:\n  instance_uuid: [\n");
        assert!(e.detail.contains("line"), "position expected: {e}");
    }

    #[test]
    fn missing_or_empty_start() {
        for payload in ["", "\n", "start", "foo: bar\n", "---\n#cloud-config\n...\n"] {
            let e = err(payload);
            assert_eq!(e.reason, Reason::InvalidData, "{payload:?}: {e}");
            assert_eq!(e.instance_uuid, "");
        }
        let e = err("");
        assert!(e.detail.contains("`start:` document"), "{e}");
        let e = err("start:\n  tenant_uuid: x\n");
        assert_eq!(e.reason, Reason::InvalidData);
        assert!(e.detail.contains("instance_uuid"), "{e}");
    }

    #[test]
    fn non_utf8_and_garbage() {
        let mut bad = GO_START_DOC.as_bytes().to_vec();
        bad[30] = 0xff;
        assert_eq!(
            parse_start(&bad).expect_err("not UTF-8").reason,
            Reason::InvalidPayload
        );
        // 1 MB of pseudo-random bytes, then of printable junk: refused, no panic.
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let bytes: Vec<u8> = (0..1 << 20).map(|_| rng.next() as u8).collect();
        assert!(parse_start(&bytes).is_err());
        let junk = b" \n:-[]{}#&*!|>'\"%@`abc123.\t";
        let printable: Vec<u8> = (0..1 << 20)
            .map(|_| junk[(rng.next() % junk.len() as u64) as usize])
            .collect();
        assert!(parse_start(&printable).is_err());
        let deep = format!("start:\n  x: {}\n", "[".repeat(100_000));
        // Refused before parsing (the scanner is quadratic in flow depth).
        let e = err(&deep);
        assert_eq!(e.reason, Reason::InvalidPayload);
        assert!(e.detail.contains("nested"), "{e}");
        let deep = format!("start:\n  x: {}\n", "{a: [".repeat(100));
        assert_eq!(err(&deep).reason, Reason::InvalidPayload);
    }

    #[test]
    fn ssh_ports() {
        assert_eq!(ssh_port(false, "192.168.8.2"), 35050);
        assert_eq!(ssh_port(true, "192.168.8.2"), 0);
        assert_eq!(ssh_port(false, ""), 0);
        assert_eq!(ssh_port(false, "fe80::1"), 0);
        assert_eq!(ssh_port(false, "::ffff:192.168.8.2"), 35050);
        assert_eq!(ssh_port(false, "10.0.127.22"), 65534);
        assert_eq!(ssh_port(false, "10.0.127.23"), 0);
        assert_eq!(ssh_port(false, "10.0.255.255"), 0);
        assert_eq!(ssh_port(false, "192.168.8"), 0);
    }

    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn mutated_payloads_never_panic() {
        let seeds = [WIRE_START, LEGACY_2016, GO_START_DOC];
        let alphabet = b"-.:# \n\t[]{}&*!|>'\"%@`~?,0123456789abcdef\xff";
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        for i in 0..10_000 {
            let mut p = seeds[i % seeds.len()].as_bytes().to_vec();
            for _ in 0..=(rng.next() % 8) {
                let at = (rng.next() as usize) % (p.len() + 1);
                let c = alphabet[(rng.next() as usize) % alphabet.len()];
                match rng.next() % 4 {
                    0 if at < p.len() => p[at] = c,
                    1 => p.insert(at, c),
                    2 if at < p.len() => {
                        p.remove(at);
                    }
                    _ => {
                        // Duplicate or drop a chunk of lines.
                        let end = (at + (rng.next() as usize % 64)).min(p.len());
                        if rng.next().is_multiple_of(2) {
                            let chunk = p[at..end].to_vec();
                            p.splice(at..at, chunk);
                        } else {
                            p.drain(at..end);
                        }
                    }
                }
            }
            let _ = parse_start(&p);
        }
    }

    fn request() -> StartRequest {
        StartRequest {
            instance_uuid: "d7d86208-b46c-4465-9018-ee14087d415f".into(),
            tenant_uuid: "67d86208-0000-4465-9018-fe14087d415f".into(),
            image_uuid: "b286cd45-7d0c-4525-a140-4db6c95e41fa".into(),
            docker_image: String::new(),
            vm_type: VmType::Qemu,
            firmware: Firmware::Legacy,
            vcpus: 2,
            mem_mb: 370,
            disk_mb: 8000,
            volumes: vec![],
            restart: false,
            user_data: CLOUD_INIT.into(),
            meta_data: META.into(),
            ..StartRequest::default()
        }
    }

    fn config_of(req: &StartRequest) -> InstanceConfig {
        InstanceConfig {
            instance_uuid: req.instance_uuid.clone(),
            tenant_uuid: req.tenant_uuid.clone(),
            image_uuid: req.image_uuid.clone(),
            docker_image: req.docker_image.clone(),
            vm_type: req.vm_type,
            firmware: req.firmware,
            vcpus: req.vcpus,
            mem_mb: req.mem_mb,
            disk_mb: req.disk_mb,
            volumes: req.volumes.clone(),
            restart: req.restart,
            user_data: req.user_data.clone(),
            meta_data: req.meta_data.clone(),
            networking: req.networking.clone(),
            network_node: req.network_node,
            ssh_port: ssh_port(req.network_node, &req.networking.private_ip),
            ..InstanceConfig::default()
        }
    }

    #[test]
    fn start_payload_round_trips() {
        let container = StartRequest {
            image_uuid: String::new(),
            docker_image: "ubuntu:latest".into(),
            vm_type: VmType::Docker,
            firmware: Firmware::Efi,
            disk_mb: 0,
            user_data: String::new(),
            meta_data: String::new(),
            ..request()
        };
        let volumes = StartRequest {
            image_uuid: String::new(),
            volumes: vec![
                Volume {
                    uuid: "73a86d7e-93c0-480e-9c41-ab42f69b7799".into(),
                    bootable: true,
                },
                Volume {
                    uuid: "67d86208-b46c-4465-9018-e14287d415f0".into(),
                    bootable: false,
                },
            ],
            restart: true,
            ..request()
        };
        let tenant_net = StartRequest {
            networking: Networking {
                vnic_mac: "02:00:c0:a8:08:02".into(),
                vnic_uuid: "67d86208-b46c-0000-9018-fe14087d415f".into(),
                concentrator_uuid: "67d86208-b46c-4465-0000-fe14087d415f".into(),
                concentrator_ip: "192.168.42.21".into(),
                subnet: "192.168.8.0/21".into(),
                private_ip: "192.168.8.2".into(),
            },
            ..request()
        };
        let cnci = StartRequest {
            networking: Networking {
                vnic_mac: "02:00:8c:ba:f9:45".into(),
                vnic_uuid: "67d86208-b46c-0000-9018-fe14087d4150".into(),
                ..Networking::default()
            },
            network_node: true,
            ..request()
        };
        for profile in Profile::ALL {
            for req in [
                request(),
                container.clone(),
                volumes.clone(),
                tenant_net.clone(),
                cnci.clone(),
            ] {
                let payload = start_payload(profile, &req);
                let text = String::from_utf8(payload.clone()).expect("utf8");
                let cfg =
                    parse_start(&payload).unwrap_or_else(|e| panic!("{profile}: {e}\n{text}"));
                assert_eq!(cfg, config_of(&req), "{profile}\n{text}");
            }
        }
    }

    #[test]
    fn start_payload_shapes() {
        let p2016 = String::from_utf8(start_payload(Profile::P2016, &request())).expect("utf8");
        assert!(p2016.starts_with(
            "---\nstart:\n  tenant_uuid: 67d86208-0000-4465-9018-fe14087d415f\n  instance_uuid: d7d86208-b46c-4465-9018-ee14087d415f\n  image_uuid: b286cd45-7d0c-4525-a140-4db6c95e41fa\n  docker_image: \"\"\n  fw_type: legacy\n  persistence: host\n  vm_type: qemu\n  requested_resources:\n  - type: vcpus\n    value: 2\n    mandatory: true\n  - type: mem_mb\n    value: 370\n"
        ), "{p2016}");
        assert!(!p2016.contains("requirements:") && !p2016.contains("restart:"));
        assert!(p2016.ends_with(&format!("...\n---\n{CLOUD_INIT}...\n---\n{META}...\n")));

        let req = StartRequest {
            image_uuid: String::new(),
            disk_mb: 0,
            volumes: vec![Volume {
                uuid: "73a86d7e-93c0-480e-9c41-ab42f69b7799".into(),
                bootable: true,
            }],
            ..request()
        };
        let p2018 = String::from_utf8(start_payload(Profile::P2018, &req)).expect("utf8");
        let want = GO_START_DOC
            .replace("    vnic_mac: 02:00:c0:a8:08:02\n", "    vnic_mac: \"\"\n")
            .replace(
                "    vnic_uuid: 67d86208-b46c-0000-9018-fe14087d415f\n    concentrator_uuid: 67d86208-b46c-4465-0000-fe14087d415f\n    concentrator_ip: 192.168.42.21\n    subnet: 192.168.8.0/21\n",
                "    vnic_uuid: \"\"\n    concentrator_uuid: \"\"\n    concentrator_ip: \"\"\n    subnet: \"\"\n",
            )
            .replace("    private_ip: 192.168.8.2\n", "    private_ip: \"\"\n");
        assert_eq!(
            p2018,
            format!("---\n{want}...\n---\n{CLOUD_INIT}...\n---\n{META}...\n")
        );
    }
}
