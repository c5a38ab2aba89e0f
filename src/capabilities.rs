//! Start-up checks: which virtualizers this node can serve, and if not,
//! why. [`Capabilities::probe`] looks once, at start: QEMU and qemu-img
//! (found, their versions), the accelerator, OVMF, the config-drive tool
//! (xorriso or genisoimage), and the Docker engine (reachable, its API
//! version). [`Capabilities::log`] writes one line per virtualizer; the node
//! runs with what it has either way.
//!
//! [`Capabilities::refusal`] is what a START for a virtualizer the node
//! lacks can be refused with at once (the reason, ready for a StartFailure).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::payloads::config::VmType;
use crate::virt::docker_api::{ApiVersion, DockerApi};
use crate::virt::qemu::{self, Accel, Ovmf};

/// How long a `--version` of a tool may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(5);

/// What to look at (from the command line).
#[derive(Debug, Clone)]
pub struct Probe {
    pub qemu: PathBuf,
    pub qemu_img: PathBuf,
    /// `--ovmf`; `None`: the usual places.
    pub ovmf: Option<PathBuf>,
    /// The accelerator chosen and why ([`qemu::choose_accel`]).
    pub accel: (Accel, String),
    pub docker_socket: PathBuf,
}

/// What the node can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// Virtual machines, or why not.
    pub qemu: Result<QemuCaps, String>,
    /// Containers, or why not.
    pub docker: Result<DockerCaps, String>,
}

/// QEMU as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuCaps {
    /// First line of `qemu-system-x86_64 --version`'s version, e.g. `7.2.18`.
    pub qemu_version: String,
    pub qemu_img_version: String,
    pub accel: Accel,
    pub accel_why: String,
    /// EFI firmware (fw_type efi), or why EFI guests cannot start.
    pub ovmf: Result<Ovmf, String>,
    /// The config-drive tool and its version, e.g. `xorriso 1.5.4`.
    pub iso_tool: String,
}

/// The Docker engine as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerCaps {
    pub engine_version: String,
    pub api_version: ApiVersion,
    /// The version this launcher speaks with it.
    pub negotiated: ApiVersion,
}

impl Capabilities {
    /// Looks at the host (runs `--version` of the tools, `GET /version` of
    /// the engine; a few tens of milliseconds).
    pub fn probe(p: &Probe) -> Capabilities {
        Capabilities {
            qemu: probe_qemu(p),
            docker: probe_docker(&p.docker_socket),
        }
    }

    /// One log line per virtualizer.
    pub fn log(&self) {
        match &self.qemu {
            Ok(q) => log::info!("virtual machines: yes — {}", q.describe()),
            Err(why) => log::warn!("virtual machines: no — {why}"),
        }
        match &self.docker {
            Ok(d) => log::info!(
                "containers: yes — Docker engine {}, API {} (speaking {})",
                d.engine_version,
                d.api_version,
                d.negotiated
            ),
            Err(why) => log::warn!("containers: no — {why}"),
        }
    }

    /// Why a START of `vm_type` (EFI firmware if `efi`) cannot succeed on
    /// this node, or `None` if it can be tried.
    pub fn refusal(&self, vm_type: VmType, efi: bool) -> Option<String> {
        match vm_type {
            VmType::Qemu => match &self.qemu {
                Err(why) => Some(format!("this node cannot run virtual machines: {why}")),
                Ok(q) if efi => q.ovmf.as_ref().err().cloned(),
                Ok(_) => None,
            },
            VmType::Docker => self
                .docker
                .as_ref()
                .err()
                .map(|why| format!("this node cannot run containers: {why}")),
        }
    }
}

impl QemuCaps {
    fn describe(&self) -> String {
        let ovmf = match &self.ovmf {
            Ok(Ovmf::Combined(p)) => format!("OVMF {}", p.display()),
            Ok(Ovmf::Split { code, .. }) => format!("OVMF {}", code.display()),
            Err(why) => format!("legacy BIOS only ({why})"),
        };
        format!(
            "QEMU {}, qemu-img {}, run with {} ({}), {ovmf}, config drives by {}",
            self.qemu_version,
            self.qemu_img_version,
            self.accel.name(),
            self.accel_why,
            self.iso_tool
        )
    }
}

fn probe_qemu(p: &Probe) -> Result<QemuCaps, String> {
    let qemu_version = tool_version(&p.qemu, &["--version"], "qemu-system-x86")?;
    let qemu_img_version = tool_version(&p.qemu_img, &["--version"], "qemu-utils")?;
    let iso_tool = match tool_version(Path::new("xorriso"), &["-version"], "xorriso") {
        Ok(v) => format!("xorriso {v}"),
        Err(x) => match tool_version(Path::new("genisoimage"), &["--version"], "genisoimage") {
            Ok(v) => format!("genisoimage {v}"),
            Err(_) => return Err(format!("no config-drive tool: {x}")),
        },
    };
    Ok(QemuCaps {
        qemu_version,
        qemu_img_version,
        accel: p.accel.0,
        accel_why: p.accel.1.clone(),
        ovmf: qemu::find_ovmf(p.ovmf.as_deref()).map_err(|e| e.to_string()),
        iso_tool,
    })
}

fn probe_docker(socket: &Path) -> Result<DockerCaps, String> {
    if !socket.exists() {
        return Err(format!(
            "no Docker engine socket at {} (install docker.io, or --docker-socket)",
            socket.display()
        ));
    }
    let api = DockerApi::connect(socket).map_err(|e| format!("Docker engine unreachable: {e}"))?;
    let v = api.version();
    Ok(DockerCaps {
        engine_version: v.engine_version.clone(),
        api_version: v.api_version,
        negotiated: v.negotiated,
    })
}

/// The version a tool prints (the first word that starts with a digit, on
/// its first line), or why it cannot be run; `package` is named in the error.
fn tool_version(program: &Path, args: &[&str], package: &str) -> Result<String, String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                format!("{} not found (install {package})", program.display())
            } else {
                format!("{}: {e}", program.display())
            }
        })?;
    let deadline = Instant::now() + VERSION_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} {} did not answer within {VERSION_TIMEOUT:?}",
                    program.display(),
                    args.join(" ")
                ));
            }
            Err(e) => return Err(format!("{}: {e}", program.display())),
        }
    };
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if !status.success() {
        return Err(format!(
            "{} {} failed ({status})",
            program.display(),
            args.join(" ")
        ));
    }
    Ok(parse_version(&out).unwrap_or_else(|| "(version unknown)".into()))
}

/// `QEMU emulator version 7.2.18 (Debian …)` → `7.2.18`;
/// `xorriso 1.5.4 : RockRidge …` → `1.5.4`.
fn parse_version(out: &str) -> Option<String> {
    out.lines()
        .next()?
        .split_whitespace()
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
        .map(|w| w.trim_end_matches([',', ':']).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_from_first_lines() {
        assert_eq!(
            parse_version("QEMU emulator version 7.2.18 (Debian 1:7.2+dfsg-7+deb12u18)\nCopyright"),
            Some("7.2.18".into())
        );
        assert_eq!(
            parse_version("qemu-img version 7.2.18 (Debian 1:7.2+dfsg-7+deb12u18)"),
            Some("7.2.18".into())
        );
        assert_eq!(
            parse_version("xorriso 1.5.4 : RockRidge filesystem manipulator, libburnia project."),
            Some("1.5.4".into())
        );
        assert_eq!(
            parse_version("genisoimage 1.1.11 (Linux)"),
            Some("1.1.11".into())
        );
        assert_eq!(parse_version(""), None);
    }

    fn probe(dir: &Path) -> Probe {
        Probe {
            qemu: dir.join("no-qemu"),
            qemu_img: dir.join("no-qemu-img"),
            ovmf: Some(dir.join("no-ovmf.fd")),
            accel: (Accel::Tcg, "test".into()),
            docker_socket: dir.join("no-docker.sock"),
        }
    }

    #[test]
    fn missing_tools_and_engine_are_reasons_naming_them() {
        let dir = std::env::temp_dir().join(format!("caps-{}", std::process::id()));
        let caps = Capabilities::probe(&probe(&dir));
        let q = caps.qemu.clone().expect_err("no qemu");
        assert!(
            q.contains("no-qemu not found") && q.contains("qemu-system-x86"),
            "{q}"
        );
        let d = caps.docker.clone().expect_err("no docker");
        assert!(d.contains("no-docker.sock"), "{d}");
        let r = caps.refusal(VmType::Qemu, false).expect("refused");
        assert!(
            r.contains("cannot run virtual machines") && r.contains("no-qemu"),
            "{r}"
        );
        assert!(caps.refusal(VmType::Docker, false).is_some());
    }

    #[test]
    fn efi_needs_ovmf_but_bios_does_not() {
        let caps = Capabilities {
            qemu: Ok(QemuCaps {
                qemu_version: "7.2.18".into(),
                qemu_img_version: "7.2.18".into(),
                accel: Accel::Tcg,
                accel_why: "test".into(),
                ovmf: Err("no EFI firmware".into()),
                iso_tool: "xorriso 1.5.4".into(),
            }),
            docker: Ok(DockerCaps {
                engine_version: "20.10.24".into(),
                api_version: ApiVersion(1, 41),
                negotiated: ApiVersion(1, 41),
            }),
        };
        assert_eq!(caps.refusal(VmType::Qemu, false), None);
        assert_eq!(
            caps.refusal(VmType::Qemu, true),
            Some("no EFI firmware".into())
        );
        assert_eq!(caps.refusal(VmType::Docker, false), None);
        let q = caps.qemu.as_ref().expect("qemu");
        assert!(
            q.describe().contains("legacy BIOS only"),
            "{}",
            q.describe()
        );
    }
}
