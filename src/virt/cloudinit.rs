//! The cloud-init config drive of a VM: an ISO 9660 volume labelled
//! `config-2` (OpenStack's ConfigDrive data source) holding
//! `openstack/latest/user_data` (the START payload's cloud-init document) and
//! `openstack/latest/meta_data.json`, built with `xorriso -as mkisofs`
//! (`genisoimage` when xorriso is absent), as ciao does. With a child user
//! the tool runs as that user ([`as_child`]): the staging tree and
//! `seed.iso` are made the child's, the instance directory stays root's.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::virt::VirtError;
use crate::virt::qemu::{ChildUser, as_child, create_for};

/// The ISO tools tried in order: xorriso in its mkisofs mode, then genisoimage.
const ISO_TOOLS: [(&str, &[&str]); 2] = [("xorriso", &["-as", "mkisofs"]), ("genisoimage", &[])];

/// The meta data: the payload's JSON object with `uuid` and `hostname`
/// filled in (as the instance UUID) when it lacks them; ciao's default
/// document when the payload has none or it is not a JSON object.
pub fn meta_data(payload_meta: &str, instance: &str) -> String {
    if let Ok(Value::Object(mut m)) = serde_json::from_str::<Value>(payload_meta) {
        let mut changed = false;
        for key in ["uuid", "hostname"] {
            let missing = m
                .get(key)
                .and_then(Value::as_str)
                .is_none_or(|s| s.is_empty());
            if missing {
                m.insert(key.into(), Value::String(instance.into()));
                changed = true;
            }
        }
        if !changed {
            // Byte for byte what the scheduler sent.
            return payload_meta.to_string();
        }
        return serde_json::to_string_pretty(&Value::Object(m))
            .map(|s| s + "\n")
            .unwrap_or_default();
    }
    if !payload_meta.trim().is_empty() {
        log::warn!("{instance}: the START meta data is not a JSON object; using the default");
    }
    format!("{{\n  \"uuid\": \"{instance}\",\n  \"hostname\": \"{instance}\"\n}}\n")
}

/// Writes `<dir>/seed.iso` for `instance`, with the ISO tool run as
/// `child` when given; the staging tree `<dir>/clr-cloud-init` is removed
/// afterwards, whatever happened.
pub fn make_config_drive(
    dir: &Path,
    instance: &str,
    user_data: &str,
    payload_meta: &str,
    child: Option<&ChildUser>,
) -> Result<PathBuf, VirtError> {
    let staging = dir.join("clr-cloud-init");
    let iso = dir.join("seed.iso");
    if child.is_some()
        && let Err(e) = fs::remove_dir_all(&staging)
        && e.kind() != io::ErrorKind::NotFound
    {
        // A tree left by an interrupted build was the child's: never write
        // through it (it may hold links by now).
        return Err(VirtError::other(format!("{}: {e}", staging.display())));
    }
    let result = build(&staging, &iso, instance, user_data, payload_meta, child);
    if let Err(e) = fs::remove_dir_all(&staging)
        && e.kind() != io::ErrorKind::NotFound
    {
        log::warn!("{}: {e}", staging.display());
    }
    result.map(|()| iso)
}

fn build(
    staging: &Path,
    iso: &Path,
    instance: &str,
    user_data: &str,
    payload_meta: &str,
    child: Option<&ChildUser>,
) -> Result<(), VirtError> {
    let latest = staging.join("openstack/latest");
    let io_err = |p: &Path, e: io::Error| VirtError::other(format!("{}: {e}", p.display()));
    fs::create_dir_all(&latest).map_err(|e| io_err(&latest, e))?;
    let ud = latest.join("user_data");
    fs::write(&ud, user_data).map_err(|e| io_err(&ud, e))?;
    let md = latest.join("meta_data.json");
    fs::write(&md, meta_data(payload_meta, instance)).map_err(|e| io_err(&md, e))?;
    if let Some(u) = child {
        // The user data may hold secrets: only its owner, the child, reads it.
        use std::os::unix::fs::PermissionsExt;
        for (p, mode) in [
            (staging.to_path_buf(), 0o700),
            (staging.join("openstack"), 0o700),
            (latest.clone(), 0o700),
            (ud, 0o600),
            (md, 0o600),
        ] {
            // Just made by root, in a tree made afresh: no link to follow.
            fs::set_permissions(&p, fs::Permissions::from_mode(mode))
                .and_then(|()| std::os::unix::fs::lchown(&p, Some(u.uid), Some(u.gid)))
                .map_err(|e| io_err(&p, e))?;
        }
        create_for(iso, u)?;
    }

    let mut missing = Vec::new();
    for (tool, pre) in ISO_TOOLS {
        let mut cmd = Command::new(tool);
        as_child(&mut cmd, child);
        let out = cmd
            .args(pre)
            .args(["-quiet", "-R", "-J", "-V", "config-2", "-o"])
            .arg(iso)
            .arg(staging)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        match out {
            Ok(o) if o.status.success() => return Ok(()),
            Ok(o) => {
                return Err(VirtError::other(format!(
                    "config drive: {tool} failed ({}): {}",
                    o.status,
                    last_lines(&o.stderr, 3)
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(tool),
            Err(e) => return Err(VirtError::other(format!("config drive: {tool}: {e}"))),
        }
    }
    Err(VirtError::other(format!(
        "config drive: none of {} is installed (package xorriso)",
        missing.join(", ")
    )))
}

/// The last `n` non-empty lines of a tool's output, joined, for messages.
pub fn last_lines(out: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(out);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const ID: &str = "d7d86208-b46c-4465-9018-ee14087d415f";

    #[test]
    fn meta_data_defaults_and_fills_in() {
        let d = meta_data("", ID);
        assert_eq!(
            d,
            format!("{{\n  \"uuid\": \"{ID}\",\n  \"hostname\": \"{ID}\"\n}}\n")
        );
        assert_eq!(meta_data("[1, 2]", ID), d);
        let given = "{\"uuid\": \"u\", \"hostname\": \"h\", \"x\": 1}";
        assert_eq!(meta_data(given, ID), given);
        let filled: Value = serde_json::from_str(&meta_data("{\"hostname\": \"h\"}", ID)).unwrap();
        assert_eq!(filled["uuid"], ID);
        assert_eq!(filled["hostname"], "h");
    }

    /// The ISO tool as a child user writes the seed.iso made for it, in an
    /// instance directory that stays root's (needs root and xorriso).
    #[test]
    fn config_drive_as_child_user() {
        use std::os::unix::fs::MetadataExt;
        let have_tool = ISO_TOOLS
            .iter()
            .any(|(t, _)| Command::new(t).arg("-version").output().is_ok());
        if !nix::unistd::getuid().is_root() || !have_tool {
            return;
        }
        let nobody = ChildUser {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
        };
        let dir = std::env::temp_dir().join(format!("ciao-seed-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let iso = make_config_drive(&dir, ID, "#cloud-config\n", "", Some(&nobody)).unwrap();
        let m = fs::metadata(&iso).unwrap();
        assert_eq!((m.uid(), m.gid()), (65534, 65534));
        assert!(m.len() > 0);
        assert_eq!(fs::metadata(&dir).unwrap().uid(), 0);
        assert!(!dir.join("clr-cloud-init").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn last_lines_of_output() {
        assert_eq!(last_lines(b"a\n\nb\r\nc\n", 2), "b | c");
        assert_eq!(last_lines(b"", 2), "");
    }
}
