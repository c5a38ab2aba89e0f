//! The QEMU virtualizer: one `qemu-system-x86_64` process per VM, started
//! in a session of its own ([`own_session`], then `-daemonize`), so VMs
//! outlive the launcher.
//!
//! Files of an instance (`<data-dir>/instances/<uuid>/`): `image.qcow2` (a
//! qcow2 overlay on `<data-dir>/images/<image_uuid>`; a VM started from a
//! volume boots `<data-dir>/volumes/<id>` itself), `seed.iso` (the cloud-init
//! config drive, [`super::cloudinit`]), `qmp.sock` (QMP), `qemu.pid`,
//! `console.log` (the serial console), `OVMF_VARS.fd` (EFI variables, when
//! the firmware comes as code + variables).
//!
//! With a child user ([`ChildUsers`]: `--child-user`, else the 2018 cluster
//! configuration's `launcher.child_user`) QEMU opens its files and devices
//! as root and then drops to that user and its primary group itself
//! (`-run-with user=UID:GID` from QEMU 9.1, `-runas UID:GID` before), with
//! `-sandbox` where the build takes it ([`probe_confinement`], once);
//! `qemu-img` and the ISO tool run as the user from exec ([`as_child`]).
//! The instance directory and its state stay root's; the files the user
//! writes (overlay, config drive, console log, EFI variables, QMP socket)
//! and the instance's volumes are made its own ([`create_for`], [`give`]);
//! shared backing images are not. Without a child user nothing changes.
//!
//! Each running VM has a monitor thread (`monitor-<uuid8>`) holding the QMP
//! connection (whose reader is a second thread, `qmp-<uuid8>`). `Running` is
//! reported after the QMP handshake — for a VM just launched, made by the
//! instance thread itself the moment QEMU has daemonized, then handed to the
//! monitor; after a launcher restart, by the monitor with retries — and
//! `Exited` when the socket closes and the QEMU process (known from
//! `SO_PEERCRED`) is gone. The instance thread
//! talks to it through [`QemuMonitor`]:
//! * stop: ACPI `system_powerdown` (repeated every 2 s: a press before the
//!   guest's ACPI daemon runs is lost), then `quit` after `--stop-timeout`,
//!   then SIGKILL after 5 more seconds — each step logged;
//! * kill (DELETE): `quit`, then SIGKILL after 5 s;
//! * attach: `blockdev-add` + `device_add` of a local volume;
//! * dropping the handle detaches: the monitor closes its QMP connection and
//!   ends; QEMU keeps running.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};
use log::{debug, info, warn};
use serde_json::{Value, json};

use super::cloudinit::{last_lines, make_config_drive};
use super::qmp::{Qmp, QmpError, QmpMsg};
use super::{Monitor, MonitorEvent, Usage, VirtError, Virtualizer, VirtualizerFactory};
use crate::nodestats::{ProcessSampler, process_identity};
use crate::payloads::config::{Firmware, InstanceConfig};

/// How long a QMP handshake or command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// Between two ACPI power-button presses of a graceful stop.
const POWERDOWN_RETRY: Duration = Duration::from_secs(2);
/// How long `quit`, then SIGKILL, get before the next step.
const QUIT_WAIT: Duration = Duration::from_secs(5);
/// Console ports of `--with-ui nc|spice`, as ciao.
const UI_PORTS: std::ops::Range<u16> = 5900..6900;

/// The accelerator asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// The accelerator VMs run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// For log lines.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "KVM",
            Accel::Tcg => "TCG",
        }
    }
}

/// Picks the accelerator: KVM only when `/dev/kvm` is usable *and* backed
/// by a hardware module (`kvm_intel`/`kvm_amd`); nested "PVM" KVM
/// (`kvm_pvm`) accepts `-enable-kvm` but cannot run real guests. Returns
/// the choice and why, for the log.
pub fn choose_accel(choice: AccelChoice, sys: &Path, dev_kvm: &Path) -> (Accel, String) {
    match choice {
        AccelChoice::Kvm => (Accel::Kvm, "forced by --qemu-accel kvm".into()),
        AccelChoice::Tcg => (Accel::Tcg, "forced by --qemu-accel tcg".into()),
        AccelChoice::Auto => {
            let rw = nix::unistd::access(
                dev_kvm,
                nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK,
            )
            .is_ok();
            let module = |m: &str| sys.join("module").join(m).exists();
            if !rw {
                (
                    Accel::Tcg,
                    format!("{} is missing or not read-write", dev_kvm.display()),
                )
            } else if module("kvm_intel") || module("kvm_amd") {
                (
                    Accel::Kvm,
                    format!("{} backed by hardware", dev_kvm.display()),
                )
            } else if module("kvm_pvm") {
                (
                    Accel::Tcg,
                    format!(
                        "{} is nested PVM KVM (kvm_pvm), which cannot run real guests",
                        dev_kvm.display()
                    ),
                )
            } else {
                (Accel::Kvm, format!("{} is usable", dev_kvm.display()))
            }
        }
    }
}

/// Console of a VM (`--with-ui`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ui {
    /// Headless; the serial console goes to `console.log` only.
    #[default]
    None,
    /// The serial console also on a loopback TCP port (netcat).
    Nc,
    /// A SPICE display on a loopback port.
    Spice,
}

/// EFI firmware: one combined file (`-bios`) or code + a variables template
/// that each instance copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ovmf {
    Combined(PathBuf),
    Split { code: PathBuf, vars: PathBuf },
}

/// Where Debian (package `ovmf`) and Clear Linux put OVMF.
const OVMF_SPLIT: [(&str, &str); 3] = [
    (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
    ),
    (
        "/usr/share/OVMF/OVMF_CODE.fd",
        "/usr/share/OVMF/OVMF_VARS.fd",
    ),
    (
        "/usr/share/edk2/ovmf/OVMF_CODE.fd",
        "/usr/share/edk2/ovmf/OVMF_VARS.fd",
    ),
];
const OVMF_COMBINED: [&str; 3] = [
    "/usr/share/qemu/OVMF.fd",
    "/usr/share/ovmf/OVMF.fd",
    "/usr/share/clear-containers/OVMF.fd",
];

/// The EFI firmware: `configured` (`--ovmf`, a combined image or a code
/// file with its `*VARS*` sibling) or the first one found in the usual
/// places. The error names what was looked for.
pub fn find_ovmf(configured: Option<&Path>) -> Result<Ovmf, VirtError> {
    if let Some(p) = configured {
        if !p.is_file() {
            return Err(VirtError::other(format!(
                "EFI firmware {} not found (--ovmf); install package ovmf or use fw_type: legacy",
                p.display()
            )));
        }
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.contains("CODE") {
            let vars = p.with_file_name(name.replace("CODE", "VARS"));
            if vars.is_file() {
                return Ok(Ovmf::Split {
                    code: p.to_path_buf(),
                    vars,
                });
            }
        }
        return Ok(Ovmf::Combined(p.to_path_buf()));
    }
    for (code, vars) in OVMF_SPLIT {
        if Path::new(code).is_file() && Path::new(vars).is_file() {
            return Ok(Ovmf::Split {
                code: code.into(),
                vars: vars.into(),
            });
        }
    }
    for c in OVMF_COMBINED {
        if Path::new(c).is_file() {
            return Ok(Ovmf::Combined(c.into()));
        }
    }
    Err(VirtError::other(format!(
        "no EFI firmware (OVMF) found in {} or {}; install package ovmf or use fw_type: legacy",
        OVMF_SPLIT.map(|(c, _)| c).join(", "),
        OVMF_COMBINED.join(", ")
    )))
}

/// Makes QEMU virtualizers.
#[derive(Debug, Clone)]
pub struct QemuFactory {
    /// `<data-dir>`: images under `images/`, volumes under `volumes/`.
    pub data_dir: PathBuf,
    pub qemu: PathBuf,
    pub qemu_img: PathBuf,
    pub accel: Accel,
    /// `--ovmf`; `None`: search the usual places.
    pub ovmf: Option<PathBuf>,
    pub ui: Ui,
    pub stop_timeout: Duration,
    /// What `qemu-img info` said of each backing image, shared by all VMs.
    pub images: ImageCache,
    /// Whom VMs run as (shared by all VMs).
    pub child_users: Arc<ChildUsers>,
    /// What QEMU offers to confine VMs of a child user, once learnt.
    pub confinement: Arc<Mutex<Option<Confinement>>>,
    /// `--user-net`: VMs without a tenant NIC get a user-mode NIC whose
    /// guest port 22 is forwarded from a free loopback port.
    pub user_net: bool,
}

impl QemuFactory {
    /// How to confine a VM of a child user with this QEMU (probed once).
    fn confinement(&self) -> Confinement {
        let mut known = self
            .confinement
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = &*known {
            return c.clone();
        }
        match probe_confinement(&self.qemu) {
            Some(c) => {
                *known = Some(c.clone());
                c
            }
            // QEMU cannot be run: the launch fails anyway, and says why.
            None => Confinement {
                drop: DropFlag::Runas,
                sandbox: None,
            },
        }
    }
}

/// `qemu-img info` results by path, valid while the file's identity, size
/// and modification time stay the same: a START does not pay for a
/// `qemu-img` run to learn what it learnt for the previous VM of the image.
#[derive(Debug, Clone, Default)]
pub struct ImageCache(Arc<Mutex<std::collections::HashMap<PathBuf, (FileKey, ImageInfo)>>>);

/// (device, inode, size, mtime in ns).
type FileKey = (u64, u64, u64, i128);

impl ImageCache {
    fn key(meta: &fs::Metadata) -> FileKey {
        use std::os::unix::fs::MetadataExt;
        (
            meta.dev(),
            meta.ino(),
            meta.size(),
            i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        )
    }

    /// The info of `path` (whose metadata is `meta`), from the cache or
    /// from `qemu-img info` (run as `user`).
    pub fn info(
        &self,
        qemu_img: &Path,
        path: &Path,
        meta: &fs::Metadata,
        user: Option<&ChildUser>,
    ) -> Result<ImageInfo, VirtError> {
        let key = Self::key(meta);
        if let Ok(m) = self.0.lock()
            && let Some((k, info)) = m.get(path)
            && *k == key
        {
            return Ok(info.clone());
        }
        let info = image_info(qemu_img, path, user)?;
        if let Ok(mut m) = self.0.lock() {
            m.insert(path.to_path_buf(), (key, info.clone()));
        }
        Ok(info)
    }
}

impl VirtualizerFactory for QemuFactory {
    fn create(&self, cfg: &InstanceConfig) -> Box<dyn Virtualizer> {
        Box::new(Qemu {
            f: Arc::new(self.clone()),
            cfg: cfg.clone(),
            dir: PathBuf::new(),
            child: None,
            backing: None,
            pid: Arc::new(AtomicI32::new(0)),
            sampler: None,
            port: None,
            nic: Nic::None,
        })
    }
}

/// Waits for the `qemu-img create` of [`Qemu::start_overlay`].
fn finish_overlay(child: std::process::Child) -> Result<(), VirtError> {
    let out = child
        .wait_with_output()
        .map_err(|e| VirtError::other(format!("qemu-img create: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(VirtError::other(format!(
            "qemu-img create: {}",
            last_lines(&out.stderr, 2)
        )))
    }
}

/// What `qemu-img info` says of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: String,
    pub virtual_size: u64,
    /// The backing file its header names (full path), if any.
    pub backing: Option<String>,
    /// An external data file its header names (qcow2), if any.
    pub data_file: Option<String>,
}

impl ImageInfo {
    /// A disk that a child user can write, QEMU opens as root at each boot
    /// (before it drops): its header must not make root QEMU open other
    /// files than `backing` (the overlay's own backing image; `None` for a
    /// volume) on its behalf.
    fn check_header(&self, path: &Path, backing: Option<&Path>) -> Result<(), VirtError> {
        let want = backing.map(|b| b.to_string_lossy().into_owned());
        if self.backing != want || self.data_file.is_some() {
            return Err(VirtError::other(format!(
                "{} names {} as its backing file{}: refused for a VM of a child user (QEMU opens its disks as root)",
                path.display(),
                self.backing.as_deref().unwrap_or("nothing"),
                self.data_file
                    .as_deref()
                    .map_or(String::new(), |d| format!(" and {d} as its data file")),
            )));
        }
        Ok(())
    }
}

/// `qemu-img info` of `path` (with `-U`: the image may be in use), run as
/// `user` when given.
pub fn image_info(
    qemu_img: &Path,
    path: &Path,
    user: Option<&ChildUser>,
) -> Result<ImageInfo, VirtError> {
    let mut cmd = Command::new(qemu_img);
    as_child(&mut cmd, user);
    let out = cmd
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .output()
        .map_err(|e| VirtError::other(format!("{}: {e}", qemu_img.display())))?;
    if !out.status.success() {
        return Err(VirtError::other(format!(
            "{} is not a usable image: {}",
            path.display(),
            last_lines(&out.stderr, 2)
        )));
    }
    let v: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| VirtError::other(format!("qemu-img info {}: {e}", path.display())))?;
    let format = v.get("format").and_then(Value::as_str).unwrap_or_default();
    let size = v.get("virtual-size").and_then(Value::as_u64).unwrap_or(0);
    if format.is_empty() || size == 0 {
        return Err(VirtError::other(format!(
            "{}: qemu-img reports no format or an empty image",
            path.display()
        )));
    }
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    Ok(ImageInfo {
        format: format.into(),
        virtual_size: size,
        backing: text(v.get("full-backing-filename").or(v.get("backing-filename"))),
        data_file: text(v.pointer("/format-specific/data/data-file")),
    })
}

/// One VM.
#[derive(Debug)]
pub struct Qemu {
    f: Arc<QemuFactory>,
    cfg: InstanceConfig,
    dir: PathBuf,
    /// Whom this VM's programs run as, decided at its START (and again at
    /// each boot); `None`: the launcher's own user.
    child: Option<ChildUser>,
    /// The backing image (or boot volume) checked by `ensure_backing_image`.
    backing: Option<(PathBuf, ImageInfo)>,
    /// QEMU's pid, set by the monitor once it is connected; 0 = unknown.
    pid: Arc<AtomicI32>,
    sampler: Option<ProcessSampler>,
    /// Console port held while running with a UI.
    port: Option<u16>,
    /// The NIC of the next boot (consumed by it), from [`Virtualizer::set_nic`].
    nic: Nic,
}

impl Qemu {
    fn images_dir(&self) -> PathBuf {
        self.f.data_dir.join("images")
    }

    fn volume_path(&self, id: &str) -> PathBuf {
        self.f.data_dir.join("volumes").join(id)
    }

    fn overlay(&self) -> PathBuf {
        self.dir.join("image.qcow2")
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    fn boot_volume(&self) -> Option<&str> {
        self.cfg
            .volumes
            .iter()
            .find(|v| v.bootable)
            .map(|v| v.uuid.as_str())
    }

    /// The root disk and its format: the overlay, or the boot volume itself.
    fn root_disk(&self) -> Result<(PathBuf, String), VirtError> {
        if !self.cfg.image_uuid.is_empty() {
            return Ok((self.overlay(), "qcow2".into()));
        }
        let id = self
            .boot_volume()
            .ok_or_else(|| VirtError::other("neither an image nor a bootable volume"))?;
        let path = self.volume_path(id);
        let info = image_info(&self.f.qemu_img, &path, self.child.as_ref())?;
        if self.child.is_some() {
            info.check_header(&path, None)?;
        }
        Ok((path, info.format))
    }

    /// The instance's volumes (its own: the scheduler gave them to it),
    /// made the child user's.
    fn give_volumes(&self) -> Result<(), VirtError> {
        if let Some(u) = &self.child {
            for v in &self.cfg.volumes {
                give(&self.volume_path(&v.uuid), u)?;
            }
        }
        Ok(())
    }

    fn args(
        &self,
        ovmf: Option<&Ovmf>,
        confine: Option<&Confine>,
        nic: &Nic,
    ) -> Result<Vec<OsString>, VirtError> {
        let (root, root_fmt) = self.root_disk()?;
        let mut extra = Vec::new();
        for v in self.cfg.volumes.iter().filter(|v| !v.bootable) {
            let path = self.volume_path(&v.uuid);
            let info = image_info(&self.f.qemu_img, &path, self.child.as_ref())
                .and_then(|i| {
                    if self.child.is_some() {
                        i.check_header(&path, None)?;
                    }
                    Ok(i)
                })
                .map_err(|e| VirtError::other(format!("volume {}: {e}", v.uuid)))?;
            extra.push((v.uuid.clone(), path, info.format));
        }
        Ok(confined_command_line(
            &LaunchSpec {
                name: &self.cfg.instance_uuid,
                dir: &self.dir,
                accel: self.f.accel,
                vcpus: self.cfg.vcpus,
                mem_mb: self.cfg.mem_mb,
                root: (&root, &root_fmt),
                volumes: &extra,
                ovmf,
                ui: self.port.map(|p| (self.f.ui, p)),
                nic,
            },
            confine,
        ))
    }

    /// Starts `qemu-img create` of the instance's overlay on its backing
    /// image (None when the VM boots from a volume instead).
    fn start_overlay(&mut self) -> Result<Option<std::process::Child>, VirtError> {
        if self.cfg.image_uuid.is_empty() {
            return Ok(None);
        }
        if self.backing.is_none() {
            self.ensure_backing_image()?;
        }
        let Some((backing, info)) = &self.backing else {
            return Err(VirtError::other("no backing image"));
        };
        let backing = fs::canonicalize(backing)
            .map_err(|e| VirtError::other(format!("{}: {e}", backing.display())))?;
        // The README: disk_mb, or the image's own size when larger.
        let size = (self.cfg.disk_mb << 20).max(info.virtual_size);
        let mut cmd = Command::new(&self.f.qemu_img);
        if let Some(u) = &self.child {
            // The instance directory stays root's: the child writes only
            // the files made for it.
            create_for(&self.overlay(), u)?;
        }
        as_child(&mut cmd, self.child.as_ref());
        cmd.args(["create", "-q", "-f", "qcow2", "-F", &info.format, "-b"])
            .arg(&backing)
            .arg(self.overlay())
            .arg(size.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map(Some)
            .map_err(|e| VirtError::other(format!("{}: {e}", self.f.qemu_img.display())))
    }

    /// Runs QEMU; returns once it has daemonized (set up and running).
    fn launch(&mut self) -> Result<(), VirtError> {
        // Again at each boot: a RESTART boots under the setting of its time.
        self.child = self.f.child_users.current()?;
        let ovmf = match self.cfg.firmware {
            Firmware::Legacy => None,
            Firmware::Efi => Some(find_ovmf(self.f.ovmf.as_deref())?),
        };
        if let Some(Ovmf::Split { vars, .. }) = &ovmf {
            let copy = self.dir.join("OVMF_VARS.fd");
            if !copy.exists() {
                fs::copy(vars, &copy)
                    .map_err(|e| VirtError::other(format!("{}: {e}", copy.display())))?;
            }
        }
        // QEMU opens its files as root and then drops to the child user;
        // they are the child's all the same, as its writes are.
        let confine = match self.child.clone() {
            None => None,
            Some(u) => {
                for f in ["image.qcow2", "seed.iso", "OVMF_VARS.fd"] {
                    give(&self.dir.join(f), &u)?;
                }
                create_for(&self.dir.join("console.log"), &u)?;
                self.give_volumes()?;
                self.check_overlay(&u)?;
                let c = self.f.confinement();
                Some(Confine {
                    uid: u.uid,
                    gid: u.gid,
                    drop: c.drop,
                    sandbox: c.sandbox,
                })
            }
        };
        // A socket or pid file left by an earlier run would confuse the
        // monitor.
        for stale in [self.socket(), self.dir.join("qemu.pid")] {
            match fs::remove_file(&stale) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(VirtError::other(format!("{}: {e}", stale.display())));
                }
                _ => {}
            }
        }
        check_socket_path(&self.socket())?;
        // This boot's NIC; a tap's descriptors are closed (here) when it
        // returns, QEMU keeps its own copies.
        let nic = match std::mem::take(&mut self.nic) {
            Nic::None => match (self.f.user_net, self.cfg.ssh_forward) {
                (true, Some(ssh_forward)) => Nic::User { ssh_forward },
                _ => Nic::None,
            },
            given => given,
        };
        let tries = if self.f.ui == Ui::None { 1 } else { 10 };
        for attempt in 1..=tries {
            if self.f.ui != Ui::None {
                self.port = grab_port();
                if self.port.is_none() {
                    warn!(
                        "{}: no free console port in {UI_PORTS:?}; running headless",
                        self.cfg.instance_uuid
                    );
                }
            }
            let args = self.args(ovmf.as_ref(), confine.as_ref(), &nic)?;
            debug!(
                "{}: {} {}",
                self.cfg.instance_uuid,
                self.f.qemu.display(),
                args.iter()
                    .map(|a| a.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            let mut cmd = Command::new(&self.f.qemu);
            own_session(&mut cmd);
            inherit_fds(&mut cmd, nic.inherited());
            let out = cmd
                .args(&args)
                .current_dir(&self.dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
                .map_err(|e| VirtError::unreachable(format!("{}: {e}", self.f.qemu.display())))?;
            if out.status.success() {
                if let Some(u) = &self.child {
                    give(&self.socket(), u)?;
                }
                if let Some(p) = self.port {
                    info!("{}: console on 127.0.0.1:{p}", self.cfg.instance_uuid);
                }
                if let Nic::User { ssh_forward } = &nic {
                    info!(
                        "{}: user-mode NIC, guest port 22 forwarded from {ssh_forward}",
                        self.cfg.instance_uuid
                    );
                }
                return Ok(());
            }
            let msg = last_lines(&out.stderr, 3);
            self.release_port();
            // Somebody else took the port: try another one.
            let port_clash = msg.contains("socket") || msg.contains("spice");
            if !(port_clash && attempt < tries) {
                return Err(VirtError::other(format!(
                    "{} exited ({}): {msg}",
                    self.f.qemu.display(),
                    out.status
                )));
            }
        }
        Err(VirtError::other("no usable console port"))
    }

    /// The overlay (the child's to write) still names its own backing
    /// image, and nothing else, in its header.
    fn check_overlay(&self, u: &ChildUser) -> Result<(), VirtError> {
        if self.cfg.image_uuid.is_empty() {
            return Ok(());
        }
        let backing = self.images_dir().join(&self.cfg.image_uuid);
        let backing = fs::canonicalize(&backing)
            .map_err(|e| VirtError::other(format!("{}: {e}", backing.display())))?;
        let overlay = self.overlay();
        image_info(&self.f.qemu_img, &overlay, Some(u))?.check_header(&overlay, Some(&backing))
    }

    fn release_port(&mut self) {
        if let Some(p) = self.port.take()
            && let Ok(mut used) = PORTS.lock()
        {
            used.remove(&p);
        }
    }

    /// Allocated size of the root disk (what the VM wrote), in MB.
    fn disk_mb(&self) -> Option<i64> {
        use std::os::unix::fs::MetadataExt;
        let path = if self.cfg.image_uuid.is_empty() {
            self.volume_path(self.boot_volume()?)
        } else {
            self.overlay()
        };
        let m = fs::metadata(path).ok()?;
        i64::try_from(m.blocks() * 512 / 1_000_000).ok()
    }
}

/// Makes `cmd` start in a session of its own. QEMU's `-daemonize` makes
/// one too, but only after its early setup (loading its libraries, parsing
/// its options): until then a Ctrl-C or SIGHUP meant for the launcher's
/// process group would kill the VM being started, and, with the kernel's
/// autogroups (one CPU share per session), all the QEMUs being started
/// would share the launcher's one share while every booted guest has one
/// of its own.
pub fn own_session(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the closure only calls setsid(2), which
    // is async-signal-safe and touches no memory of this process.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(io::Error::from));
    }
}

/// The user, and its primary group, that a VM's programs run as
/// (`--child-user`, or `launcher.child_user` of the 2018 cluster
/// configuration): QEMU drops to it itself, the helper programs
/// (`qemu-img`, `xorriso`/`genisoimage`) through [`as_child`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildUser {
    pub name: String,
    pub uid: u32,
    /// The user's primary group, the only group the children keep.
    pub gid: u32,
}

impl ChildUser {
    /// Looks `name` up in the user database (the numeric uid of an existing
    /// user is accepted too); the error says why not.
    pub fn lookup(name: &str) -> Result<ChildUser, String> {
        use nix::unistd::{Uid, User};
        let err = |e: nix::Error| format!("cannot look up user {name:?}: {e}");
        let found = match User::from_name(name).map_err(err)? {
            Some(u) => Some(u),
            None => match name.parse::<u32>() {
                Ok(n) => User::from_uid(Uid::from_raw(n)).map_err(err)?,
                Err(_) => None,
            },
        };
        let u = found.ok_or_else(|| format!("no user {name:?} on this node"))?;
        Ok(ChildUser {
            name: u.name,
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
        })
    }

    /// The user of a running process, from `/proc/<pid>/status` (real uid
    /// and gid): whom a hot-plugged volume must be readable by.
    fn of_process(proc: &Path, pid: i32) -> Option<ChildUser> {
        let status = fs::read_to_string(proc.join(pid.to_string()).join("status")).ok()?;
        let first = |key: &str| -> Option<u32> {
            let line = status.lines().find(|l| l.starts_with(key))?;
            line[key.len()..].split_whitespace().next()?.parse().ok()
        };
        let (uid, gid) = (first("Uid:")?, first("Gid:")?);
        Some(ChildUser {
            name: format!("uid {uid}"),
            uid,
            gid,
        })
    }
}

impl std::fmt::Display for ChildUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (uid {}, gid {})", self.name, self.uid, self.gid)
    }
}

/// Makes `cmd` run as `user` with its primary group as its only group
/// (setgroups, setgid, setuid between fork and exec); nothing for `None`.
/// Other `pre_exec` steps ([`own_session`]) run in the order they were added.
pub fn as_child(cmd: &mut Command, user: Option<&ChildUser>) {
    use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};
    use std::os::unix::process::CommandExt;
    let Some(u) = user else { return };
    let (uid, gid) = (Uid::from_raw(u.uid), Gid::from_raw(u.gid));
    // SAFETY: between fork and exec the closure only makes the setgroups(2),
    // setgid(2) and setuid(2) system calls on values copied in beforehand
    // (the group list is an array on the stack): async-signal-safe, no
    // allocation, no lock.
    unsafe {
        cmd.pre_exec(move || {
            setgroups(&[gid])?;
            setgid(gid)?;
            setuid(uid)?;
            Ok(())
        });
    }
}

/// Makes `path` (a regular file or the QMP socket of an instance, or one of
/// its volumes) owned by `user`. Anything else (a symbolic link: `lchown`
/// would change the link, not what it points to; a directory) is left
/// alone; a missing file is fine.
pub fn give(path: &Path, user: &ChildUser) -> Result<(), VirtError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(VirtError::other(format!("{}: {e}", path.display()))),
    };
    let kind = meta.file_type();
    if !(kind.is_file() || kind.is_socket()) || (meta.uid(), meta.gid()) == (user.uid, user.gid) {
        return Ok(());
    }
    std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid)).map_err(|e| {
        VirtError::other(format!(
            "cannot give {} to the child user {user}: {e}",
            path.display()
        ))
    })
}

/// Creates `path` (mode 0600, never through a symbolic link) if missing,
/// owned by `user`: a file a child program writes in the instance
/// directory, which stays root's.
pub fn create_for(path: &Path, user: &ChildUser) -> Result<(), VirtError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
        .map_err(|e| VirtError::other(format!("{}: {e}", path.display())))?;
    std::os::unix::fs::fchown(&file, Some(user.uid), Some(user.gid)).map_err(|e| {
        VirtError::other(format!(
            "cannot give {} to the child user {user}: {e}",
            path.display()
        ))
    })
}

/// The child user of `launcher.child_user` in the cluster configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum ClusterChild {
    /// None configured (or ""): the children run as the launcher.
    #[default]
    Unset,
    User(ChildUser),
    /// Named but not on this node: VM STARTs are refused until it is.
    Unknown(String),
}

/// Whom a VM's programs run as: `--child-user` when given, else the
/// cluster configuration's `launcher.child_user`, else the launcher's own
/// user (root) as before there was a child user.
#[derive(Debug, Default)]
pub struct ChildUsers {
    flag: Option<ChildUser>,
    cluster: Mutex<ClusterChild>,
}

/// The [`ChildUsers`] that [`cluster_child_user`] reaches: the running
/// launcher's QEMU virtualizer, if it has one.
static CLUSTER_SINK: Mutex<std::sync::Weak<ChildUsers>> = Mutex::new(std::sync::Weak::new());

/// Hands the cluster configuration's `launcher.child_user` (from CONNECTED)
/// to the running launcher's QEMU virtualizer; nothing without one
/// (simulation, tests of the daemon's threads).
pub fn cluster_child_user(name: &str) {
    let sink = CLUSTER_SINK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .upgrade();
    if let Some(c) = sink {
        c.configure(name);
    }
}

impl ChildUsers {
    /// `flag`: the resolved `--child-user`, which wins over the cluster
    /// configuration.
    pub fn new(flag: Option<ChildUser>) -> ChildUsers {
        ChildUsers {
            flag,
            cluster: Mutex::new(ClusterChild::Unset),
        }
    }

    /// Makes this the setting that [`cluster_child_user`] configures.
    pub fn receive_cluster_configuration(self: &Arc<Self>) {
        *CLUSTER_SINK
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::downgrade(self);
    }

    /// Takes the cluster configuration's `launcher.child_user` and logs
    /// what it means: one error line when the user does not exist here
    /// (and `--child-user` does not override it).
    pub fn configure(&self, name: &str) {
        let name = name.trim();
        let new = if name.is_empty() {
            ClusterChild::Unset
        } else {
            match ChildUser::lookup(name) {
                Ok(u) => ClusterChild::User(u),
                Err(e) => {
                    if self.flag.is_none() {
                        log::error!(
                            "cluster configuration: launcher.child_user: {e}; virtual machine STARTs are refused until the user exists (or the launcher runs with --child-user)"
                        );
                    }
                    ClusterChild::Unknown(name.to_string())
                }
            }
        };
        match (&self.flag, &new) {
            (Some(f), ClusterChild::User(_) | ClusterChild::Unknown(_)) if f.name != name => {
                info!(
                    "cluster configuration: launcher.child_user {name:?} overridden by --child-user {f}"
                )
            }
            (None, ClusterChild::User(u)) => {
                info!("cluster configuration: virtual machines run as {u}")
            }
            _ => {}
        }
        *self
            .cluster
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = new;
    }

    /// Whom a VM's programs run as now (`None`: the launcher's user). A
    /// cluster child user that is not on this node is looked up again at
    /// each call, and is an error until it exists.
    pub fn current(&self) -> Result<Option<ChildUser>, VirtError> {
        if let Some(f) = &self.flag {
            return Ok(Some(f.clone()));
        }
        let mut c = self
            .cluster
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*c {
            ClusterChild::Unset => Ok(None),
            ClusterChild::User(u) => Ok(Some(u.clone())),
            ClusterChild::Unknown(name) => match ChildUser::lookup(name) {
                Ok(u) => {
                    info!("the child user {u} now exists: virtual machines run as it");
                    *c = ClusterChild::User(u.clone());
                    Ok(Some(u))
                }
                Err(e) => Err(VirtError::other(format!(
                    "refused: the cluster configuration's launcher.child_user: {e} (create the user, or run the launcher with --child-user)"
                ))),
            },
        }
    }
}

/// How QEMU drops its privileges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropFlag {
    /// `-run-with user=UID:GID` (QEMU 9.1 and later).
    RunWith,
    /// `-runas UID:GID` (older QEMU; deprecated from 9.1).
    Runas,
}

/// What the QEMU build offers to confine a VM run as a child user, learnt
/// once per launcher ([`probe_confinement`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confinement {
    pub drop: DropFlag,
    /// The `-sandbox` argument; `None` when the build has no usable one.
    pub sandbox: Option<String>,
}

/// The `-sandbox` settings tried, strictest first. Neither `spawn=deny`
/// nor `elevateprivileges=deny` can be used: QEMU installs its filter
/// before `-daemonize` forks and calls setsid(2) and before `-runas` /
/// `-run-with user=` calls setgid(2)/setuid(2), so either kills QEMU at
/// start (with `-daemonize`, `spawn=deny` has been fatal since QEMU 7.0).
pub const SANDBOX_TRIED: [&str; 2] = ["on,obsolete=deny,resourcecontrol=deny", "on"];

/// Whether `qemu` accepts `args`, asked with `-version` (QEMU checks these
/// options as it parses them, before printing its version): `Err` carries
/// QEMU's message; `Ok(None)` when QEMU cannot be run at all.
fn qemu_accepts(qemu: &Path, args: &[&str]) -> Option<Result<(), String>> {
    let out = Command::new(qemu)
        .args(args)
        .arg("-version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .ok()?;
    Some(if out.status.success() {
        Ok(())
    } else {
        Err(last_lines(&out.stderr, 1))
    })
}

/// Learns how `qemu` can drop privileges and which `-sandbox` it takes,
/// logging the outcome (a missing sandbox as a warning); `None` when
/// `qemu` cannot be run (nothing learnt: ask again later).
pub fn probe_confinement(qemu: &Path) -> Option<Confinement> {
    let drop = match qemu_accepts(qemu, &["-run-with", "user=0:0"])? {
        Ok(()) => DropFlag::RunWith,
        Err(_) => DropFlag::Runas,
    };
    let mut why = String::new();
    let mut sandbox = None;
    for s in SANDBOX_TRIED {
        match qemu_accepts(qemu, &["-sandbox", s])? {
            Ok(()) => {
                sandbox = Some(s.to_string());
                break;
            }
            Err(e) if why.is_empty() => why = e,
            Err(_) => {}
        }
    }
    let flag = match drop {
        DropFlag::RunWith => "-run-with user=",
        DropFlag::Runas => "-runas",
    };
    match &sandbox {
        Some(s) => info!(
            "{}: VMs of a child user drop privileges with {flag} and run with -sandbox {s}",
            qemu.display()
        ),
        None => warn!(
            "{}: no usable -sandbox ({why}): VMs of a child user drop privileges with {flag} but run without QEMU's system-call filter",
            qemu.display()
        ),
    }
    Some(Confinement { drop, sandbox })
}

/// A VM run as a child user: the QEMU options that drop to it and filter
/// system calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confine {
    pub uid: u32,
    pub gid: u32,
    pub drop: DropFlag,
    pub sandbox: Option<String>,
}

/// The network device of a VM. The file descriptors are the launcher's
/// copies: QEMU inherits them across exec (and only them, see
/// [`inherit_fds`]), and the launcher closes its copies once QEMU runs (the
/// value is consumed by the boot).
#[derive(Debug, Default)]
pub enum Nic {
    /// No network device at all (`-network none`, the default).
    #[default]
    None,
    /// A tenant VM's tap on this node's tenant bridge: one open queue of the
    /// tap per descriptor (normally one), the guest's MAC (`vnic_mac`), and
    /// whether QEMU should open `/dev/vhost-net` for it (only where it
    /// exists; without it the tap works in userspace).
    Tap {
        fds: Vec<OwnedFd>,
        mac: [u8; 6],
        vhost: bool,
    },
    /// A CNCI VM's macvtap on the compute link: `/dev/tap<ifindex>` opened
    /// once per queue; the MAC must be the macvtap's own.
    Macvtap { fds: Vec<OwnedFd>, mac: [u8; 6] },
    /// QEMU user-mode networking with `restrict=on` (the guest reaches
    /// nothing outside QEMU) and the guest's TCP port 22 forwarded from
    /// `ssh_forward`, a loopback address (`--user-net`).
    User { ssh_forward: SocketAddr },
}

/// The id of the VM's `-netdev` (one NIC per VM).
const NETDEV_ID: &str = "nic0";

impl Nic {
    /// The descriptors QEMU must inherit.
    pub fn inherited(&self) -> Vec<RawFd> {
        match self {
            Nic::Tap { fds, .. } | Nic::Macvtap { fds, .. } => {
                fds.iter().map(AsRawFd::as_raw_fd).collect()
            }
            Nic::None | Nic::User { .. } => Vec::new(),
        }
    }

    /// The `-netdev` and `-device` options. A tap (or macvtap) is passed
    /// by descriptor number (`fds=`, the numbers are the same in QEMU as
    /// here, see [`inherit_fds`]); several queues make the device
    /// multi-queue with 2·queues + 2 MSI-X vectors. The NIC has no option
    /// ROM (`romfile=`): the guest boots from its disk, never the network.
    pub fn args(&self) -> Vec<String> {
        let tap = |fds: &[OwnedFd], mac: &[u8; 6], vhost: bool| {
            let list = fds
                .iter()
                .map(|f| f.as_raw_fd().to_string())
                .collect::<Vec<_>>()
                .join(":");
            let mut netdev = format!("tap,id={NETDEV_ID},fds={list}");
            if vhost {
                netdev.push_str(",vhost=on");
            }
            let mut device = format!(
                "virtio-net-pci,netdev={NETDEV_ID},mac={},romfile=",
                crate::network::format_mac(mac)
            );
            if fds.len() > 1 {
                device.push_str(&format!(",mq=on,vectors={}", 2 * fds.len() + 2));
            }
            vec!["-netdev".into(), netdev, "-device".into(), device]
        };
        match self {
            Nic::None => Vec::new(),
            Nic::Tap { fds, mac, vhost } => tap(fds, mac, *vhost),
            Nic::Macvtap { fds, mac } => tap(fds, mac, false),
            Nic::User { ssh_forward } => {
                let host = match ssh_forward.ip() {
                    IpAddr::V4(ip) => ip.to_string(),
                    IpAddr::V6(ip) => format!("[{ip}]"),
                };
                vec![
                    "-netdev".into(),
                    format!(
                        "user,id={NETDEV_ID},restrict=on,hostfwd=tcp:{host}:{}-:22",
                        ssh_forward.port()
                    ),
                    "-device".into(),
                    format!("virtio-net-pci,netdev={NETDEV_ID},romfile="),
                ]
            }
        }
    }
}

/// Makes exactly `fds` survive the exec of `cmd`: the child clears their
/// close-on-exec flag between fork and exec. Everything the launcher opens
/// is close-on-exec (Rust's standard library opens everything so), so
/// nothing else leaks into QEMU, and a QEMU started at the same time by
/// another instance thread never inherits these: the flag is only cleared
/// in this child's copy of the descriptor table. The numbers stay the same
/// in the child, which is what [`Nic::args`] names.
pub fn inherit_fds(cmd: &mut Command, fds: Vec<RawFd>) {
    use std::os::unix::process::CommandExt;
    if fds.is_empty() {
        return;
    }
    // SAFETY: between fork and exec the closure only makes fcntl(2) calls on
    // numbers copied in beforehand (iterating the vector does not
    // allocate): async-signal-safe, no lock. The descriptors are open: the
    // caller holds them until `cmd` has run.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
                nix::fcntl::fcntl(
                    fd,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                )?;
            }
            Ok(())
        });
    }
}

/// Loopback ports forwarded to guests by this launcher (`--user-net`).
static FORWARDS: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A loopback address for a VM's SSH forward: `keep` (the VM's address of
/// before) when nobody else holds it, else a port the kernel has free now
/// (bound to port 0 and closed again, and not forwarded to another VM of
/// this launcher). The port is recorded until [`release_forward`].
pub fn reserve_forward(keep: Option<SocketAddr>) -> Result<SocketAddr, VirtError> {
    let mut used = FORWARDS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(a) = keep {
        used.remove(&a.port());
        if a.ip().is_loopback() && std::net::TcpListener::bind(a).is_ok() {
            used.insert(a.port());
            return Ok(a);
        }
    }
    // The kernel hands out different ports in turn; a few tries step over
    // one that another VM of ours holds but has not bound yet.
    for _ in 0..16 {
        let l = std::net::TcpListener::bind(("127.0.0.1", 0))
            .map_err(|e| VirtError::launch(format!("no free loopback port for SSH: {e}")))?;
        let a = l
            .local_addr()
            .map_err(|e| VirtError::launch(format!("no free loopback port for SSH: {e}")))?;
        if used.insert(a.port()) {
            return Ok(a);
        }
    }
    Err(VirtError::launch(
        "no free loopback port for SSH that no other VM uses",
    ))
}

/// Records that `addr` is the SSH forward of a running VM (recovery).
fn hold_forward(addr: SocketAddr) {
    FORWARDS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(addr.port());
}

/// The VM of `addr` is gone: the port may go to another VM.
pub fn release_forward(addr: SocketAddr) {
    FORWARDS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(&addr.port());
}

/// Console ports in use by this launcher.
static PORTS: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A console port free here and bindable on loopback.
fn grab_port() -> Option<u16> {
    let mut used = PORTS.lock().ok()?;
    for p in UI_PORTS {
        if !used.contains(&p) && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            used.insert(p);
            return Some(p);
        }
    }
    None
}

/// Unix socket paths are limited to 107 bytes.
fn check_socket_path(p: &Path) -> Result<(), VirtError> {
    use std::os::unix::ffi::OsStrExt;
    let n = p.as_os_str().as_bytes().len();
    if n > 107 {
        return Err(VirtError::other(format!(
            "QMP socket path {} is {n} bytes, longer than a unix socket allows (107): use a shorter --data-dir",
            p.display()
        )));
    }
    Ok(())
}

/// What a QEMU command line is made of.
#[derive(Debug)]
pub struct LaunchSpec<'a> {
    pub name: &'a str,
    pub dir: &'a Path,
    pub accel: Accel,
    pub vcpus: u32,
    pub mem_mb: u64,
    /// Root disk path and format.
    pub root: (&'a Path, &'a str),
    /// Further volumes: (id, path, format).
    pub volumes: &'a [(String, PathBuf, String)],
    pub ovmf: Option<&'a Ovmf>,
    /// Console UI and its port.
    pub ui: Option<(Ui, u16)>,
    /// The network device.
    pub nic: &'a Nic,
}

/// The QEMU command line (with explicit devices: the root disk first and
/// bootable, the volumes, the config drive, then the NIC if there is one;
/// see docs/architecture.md, "Virtualizers").
pub fn command_line(s: &LaunchSpec<'_>) -> Vec<OsString> {
    confined_command_line(s, None)
}

/// [`command_line`], with the options that make QEMU drop to a child user
/// once it has opened its files and devices (and filter its system calls)
/// when `confine` is given; exactly [`command_line`] without.
pub fn confined_command_line(s: &LaunchSpec<'_>, confine: Option<&Confine>) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |parts: &[&str]| a.extend(parts.iter().map(OsString::from));
    let dir = |f: &str| s.dir.join(f).to_string_lossy().into_owned();
    let (accel, cpu) = match s.accel {
        Accel::Kvm => ("kvm", Some("host")),
        Accel::Tcg => ("tcg", None),
    };
    push(&["-name", s.name, "-machine", &format!("pc,accel={accel}")]);
    if let Some(cpu) = cpu {
        push(&["-cpu", cpu]);
    }
    push(&["-nodefaults", "-no-user-config"]);
    if s.mem_mb > 0 {
        push(&["-m", &s.mem_mb.to_string()]);
    }
    if s.vcpus > 0 {
        push(&["-smp", &format!("cpus={}", s.vcpus)]);
    }
    match s.ovmf {
        None => {}
        Some(Ovmf::Combined(p)) => push(&["-bios", &p.to_string_lossy()]),
        Some(Ovmf::Split { code, .. }) => push(&[
            "-drive",
            &format!(
                "if=pflash,unit=0,format=raw,readonly=on,file={}",
                drive_path(code)
            ),
            "-drive",
            &format!(
                "if=pflash,unit=1,format=raw,file={}",
                drive_path(&s.dir.join("OVMF_VARS.fd"))
            ),
        ]),
    }
    push(&[
        "-drive",
        &format!(
            "file={},if=none,id=root,format={},cache=none,aio=threads",
            drive_path(s.root.0),
            s.root.1
        ),
        "-device",
        "virtio-blk-pci,drive=root,id=device_root,bootindex=0",
    ]);
    for (id, path, fmt) in s.volumes {
        push(&[
            "-drive",
            &format!(
                "file={},if=none,id=drive_{id},format={fmt}",
                drive_path(path)
            ),
            "-device",
            &format!("virtio-blk-pci,drive=drive_{id},id=device_{id}"),
        ]);
    }
    push(&[
        "-drive",
        &format!(
            "file={},if=none,id=seed,format=raw,readonly=on",
            drive_path(&s.dir.join("seed.iso"))
        ),
        "-device",
        "virtio-blk-pci,drive=seed,id=device_seed",
    ]);
    let nic = s.nic.args();
    push(&nic.iter().map(String::as_str).collect::<Vec<_>>());
    let console_log = dir("console.log");
    match s.ui {
        Some((Ui::Nc, port)) => push(&[
            "-chardev",
            &format!(
                "socket,id=console,host=127.0.0.1,port={port},server=on,wait=off,logfile={console_log},logappend=on"
            ),
            "-serial",
            "chardev:console",
            "-display",
            "none",
        ]),
        Some((Ui::Spice, port)) => push(&[
            "-chardev",
            &format!("file,id=console,path={console_log},append=on"),
            "-serial",
            "chardev:console",
            "-vga",
            "std",
            "-spice",
            &format!("port={port},addr=127.0.0.1,disable-ticketing=on"),
        ]),
        _ => push(&[
            "-chardev",
            &format!("file,id=console,path={console_log},append=on"),
            "-serial",
            "chardev:console",
            "-display",
            "none",
        ]),
    }
    if let Some(c) = confine {
        if let Some(sandbox) = &c.sandbox {
            push(&["-sandbox", sandbox]);
        }
        let ids = format!("{}:{}", c.uid, c.gid);
        match c.drop {
            DropFlag::RunWith => push(&["-run-with", &format!("user={ids}")]),
            DropFlag::Runas => push(&["-runas", &ids]),
        }
    }
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", dir("qmp.sock")),
        "-pidfile",
        &dir("qemu.pid"),
        "-daemonize",
    ]);
    a
}

/// A path inside a `-drive` option: commas are doubled, QEMU's escape.
fn drive_path(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

impl Virtualizer for Qemu {
    fn init(&mut self, cfg: &InstanceConfig, dir: &Path) {
        self.cfg = cfg.clone();
        self.dir = dir.to_path_buf();
        // A recovered VM still listens there: no other VM may get the port.
        if let Some(a) = cfg.ssh_forward {
            hold_forward(a);
        }
    }

    fn set_nic(&mut self, nic: Nic) -> Result<(), VirtError> {
        self.nic = nic;
        Ok(())
    }

    fn choose_ssh_forward(&mut self) -> Result<Option<SocketAddr>, VirtError> {
        let chosen = if self.f.user_net {
            Some(reserve_forward(self.cfg.ssh_forward)?)
        } else {
            // Booted once with --user-net, now without: no forward any more.
            if let Some(a) = self.cfg.ssh_forward {
                release_forward(a);
            }
            None
        };
        self.cfg.ssh_forward = chosen;
        Ok(chosen)
    }

    fn ensure_backing_image(&mut self) -> Result<(), VirtError> {
        // The first step of a START: whom this VM runs as is decided here
        // (a child user that does not exist refuses the START).
        self.child = self.f.child_users.current()?;
        self.give_volumes()?;
        let path = if !self.cfg.image_uuid.is_empty() {
            self.images_dir().join(&self.cfg.image_uuid)
        } else if let Some(v) = self.boot_volume() {
            self.volume_path(v)
        } else {
            return Err(VirtError::other(
                "the START payload names neither an image nor a bootable volume",
            ));
        };
        let meta = fs::metadata(&path).map_err(|e| {
            VirtError::other(if e.kind() == io::ErrorKind::NotFound {
                format!("image {} not found", path.display())
            } else {
                format!("image {}: {e}", path.display())
            })
        })?;
        if !meta.is_file() {
            return Err(VirtError::other(format!(
                "image {} is not a regular file",
                path.display()
            )));
        }
        // A boot volume is written by its VM: always look again.
        let child = self.child.as_ref();
        let info = if self.cfg.image_uuid.is_empty() {
            image_info(&self.f.qemu_img, &path, child)?
        } else {
            self.f.images.info(&self.f.qemu_img, &path, &meta, child)?
        };
        self.backing = Some((path, info));
        Ok(())
    }

    fn create_image(&mut self) -> Result<(), VirtError> {
        self.create_image_while(&mut || {})
    }

    /// qemu-img makes the overlay while `meanwhile` runs and the config
    /// drive is built: the two external programs overlap.
    fn create_image_while(&mut self, meanwhile: &mut dyn FnMut()) -> Result<(), VirtError> {
        let overlay = match self.start_overlay() {
            Ok(child) => child,
            Err(e) => {
                meanwhile();
                return Err(e);
            }
        };
        meanwhile();
        let drive = make_config_drive(
            &self.dir,
            &self.cfg.instance_uuid,
            &self.cfg.user_data,
            &self.cfg.meta_data,
            self.child.as_ref(),
        );
        // Always reaped, even when the config drive failed.
        let made = overlay.map_or(Ok(()), finish_overlay);
        made?;
        drive?;
        Ok(())
    }

    fn delete_image(&mut self) -> Result<(), VirtError> {
        // Everything lives in the instance directory, which the caller removes.
        self.release_port();
        if let Some(a) = self.cfg.ssh_forward {
            release_forward(a);
        }
        Ok(())
    }

    fn start(&mut self) -> Result<(), VirtError> {
        self.launch()
    }

    fn monitor(
        &mut self,
        events: Sender<MonitorEvent>,
        boot: bool,
    ) -> Result<Box<dyn Monitor>, VirtError> {
        let name = self.cfg.instance_uuid.clone();
        let short = name[..name.len().min(8)].to_string();
        let (cmd_tx, cmd_rx) = crossbeam_channel::bounded::<MonCmd>(4);
        let w = Watch {
            name: name.clone(),
            short: short.clone(),
            socket: self.socket(),
            pidfile: self.dir.join("qemu.pid"),
            pid: Arc::clone(&self.pid),
            stop_timeout: self.f.stop_timeout,
            boot,
            clock: StopClock::Real,
        };
        // A VM just launched has daemonized, so its QMP socket answers at
        // once: connect here rather than after the monitor thread's first
        // scheduling round (which a host busy with booting guests can make
        // long). Recovery, or a failure here, leaves it to the monitor's
        // patient connect loop.
        let pre = if boot {
            None
        } else {
            match Qmp::connect(&w.socket, QMP_TIMEOUT, &short) {
                Ok(q) => {
                    let (pid, identity) = w.connected(&q, &events);
                    Some((q, pid, identity))
                }
                Err(e) => {
                    debug!("{name}: first QMP connect: {e}; the monitor retries");
                    None
                }
            }
        };
        let thread = thread::Builder::new()
            .name(format!("monitor-{short}"))
            .stack_size(256 * 1024)
            .spawn(move || w.run(pre, &events, &cmd_rx))
            .map_err(|e| VirtError::other(format!("monitor thread: {e}")))?;
        Ok(Box::new(QemuMonitor {
            name,
            pid: Arc::clone(&self.pid),
            qemu_img: self.f.qemu_img.clone(),
            volumes: self.f.data_dir.join("volumes"),
            cmds: Some(cmd_tx),
            thread: Some(thread),
        }))
    }

    fn stats(&mut self) -> Usage {
        let pid = self.pid.load(Ordering::Relaxed);
        let disk_mb = self.disk_mb();
        if pid <= 0 {
            return Usage {
                disk_mb,
                ..Usage::default()
            };
        }
        if self.sampler.as_ref().is_none_or(|s| s.pid() != pid) {
            self.sampler = Some(ProcessSampler::new("/proc", pid));
        }
        let sample = self.sampler.as_mut().and_then(|s| s.sample(Instant::now()));
        match sample {
            Some(u) => Usage {
                memory_mb: (u.rss_mb >= 0).then_some(u.rss_mb),
                disk_mb,
                cpu_percent: u.cpu_percent.map(|c| c / i64::from(self.cfg.vcpus.max(1))),
            },
            None => Usage {
                disk_mb,
                ..Usage::default()
            },
        }
    }

    fn check_volume(&mut self, id: &str) -> Result<(), VirtError> {
        let path = self.volume_path(id);
        if !path.is_file() {
            return Err(VirtError::other(format!(
                "volume {} not found",
                path.display()
            )));
        }
        // The next boot attaches it as the child user of its time.
        let child = self.f.child_users.current()?;
        if let Some(u) = &child {
            give(&path, u)?;
        }
        image_info(&self.f.qemu_img, &path, child.as_ref()).map(|_| ())
    }

    fn connected(&mut self) {
        if let Some(s) = &mut self.sampler {
            s.reset();
        }
    }

    fn lost(&mut self) {
        self.pid.store(0, Ordering::Relaxed);
        self.sampler = None;
        self.release_port();
    }
}

/// Instance → monitor thread.
#[derive(Debug)]
enum MonCmd {
    Stop,
    Kill,
    Attach {
        id: String,
        path: PathBuf,
        format: String,
        reply: Sender<Result<(), VirtError>>,
    },
}

/// The instance thread's handle on a VM's monitor thread.
#[derive(Debug)]
pub struct QemuMonitor {
    name: String,
    /// QEMU's pid once known (0 before): a hot-plugged volume must be
    /// usable by the user QEMU runs as.
    pid: Arc<AtomicI32>,
    qemu_img: PathBuf,
    volumes: PathBuf,
    /// Dropped to detach the monitor.
    cmds: Option<Sender<MonCmd>>,
    thread: Option<JoinHandle<()>>,
}

impl QemuMonitor {
    fn send(&self, c: MonCmd) -> Result<(), VirtError> {
        self.cmds
            .as_ref()
            .and_then(|tx| tx.send(c).ok())
            .ok_or_else(|| VirtError::other(format!("{}: the monitor has ended", self.name)))
    }
}

impl Monitor for QemuMonitor {
    fn stop(&mut self) -> Result<(), VirtError> {
        self.send(MonCmd::Stop)
    }

    fn kill(&mut self) -> Result<(), VirtError> {
        self.send(MonCmd::Kill)
    }

    fn attach_volume(&mut self, volume: &str) -> Result<(), VirtError> {
        let path = self.volumes.join(volume);
        // QEMU opens a hot-plugged volume as the user it runs as, which is
        // not necessarily today's setting (it may have started before a
        // launcher restart): ask the process.
        let pid = self.pid.load(Ordering::Relaxed);
        let user = (pid > 0)
            .then(|| ChildUser::of_process(Path::new("/proc"), pid))
            .flatten()
            .filter(|u| u.uid != 0);
        if let Some(u) = &user {
            if !path.is_file() {
                return Err(VirtError::other(format!(
                    "volume {} not found",
                    path.display()
                )));
            }
            give(&path, u)?;
        }
        // Also tells a missing or unusable volume file, with qemu-img's reason.
        let info = image_info(&self.qemu_img, &path, user.as_ref())?;
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.send(MonCmd::Attach {
            id: volume.to_string(),
            path,
            format: info.format,
            reply,
        })?;
        answer
            .recv_timeout(QMP_TIMEOUT * 2)
            .map_err(|_| VirtError::other("the monitor did not answer the attach"))?
    }
}

impl Drop for QemuMonitor {
    /// Detaches: the VM keeps running.
    fn drop(&mut self) {
        self.cmds.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The monitor thread's state.
#[derive(Debug)]
struct Watch {
    name: String,
    short: String,
    socket: PathBuf,
    pidfile: PathBuf,
    pid: Arc<AtomicI32>,
    stop_timeout: Duration,
    boot: bool,
    clock: StopClock,
}

/// The time of a stop's escalation: the real clock, or (tests) one the test
/// sets, whose timer fires when the test ticks it (with the time it is then).
#[derive(Debug)]
enum StopClock {
    Real,
    #[cfg(test)]
    Manual {
        now: Arc<std::sync::Mutex<Instant>>,
        ticks: Receiver<Instant>,
    },
}

impl StopClock {
    fn now(&self) -> Instant {
        match self {
            StopClock::Real => Instant::now(),
            #[cfg(test)]
            StopClock::Manual { now, .. } => *now.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// The time a timer fired (`at`: what its channel delivered).
    fn fired(&self, at: Option<Instant>) -> Instant {
        match self {
            // As before: the time the monitor handles it.
            StopClock::Real => {
                let _ = at;
                Instant::now()
            }
            #[cfg(test)]
            StopClock::Manual { .. } => at.unwrap_or_else(|| self.now()),
        }
    }

    /// Fires at `due` (never without one).
    fn timer(&self, due: Option<Instant>) -> Receiver<Instant> {
        match (self, due) {
            (_, None) => crossbeam_channel::never(),
            (StopClock::Real, Some(at)) => crossbeam_channel::at(at),
            #[cfg(test)]
            (StopClock::Manual { ticks, .. }, Some(_)) => ticks.clone(),
        }
    }
}

/// Where a stop is: the escalation power-down → quit → SIGKILL as a value
/// with one method per input, time passed in (so it is tested with an
/// injected clock); [`Watch::run`] carries out the [`StopStep`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Powerdown { until: Instant, next: Instant },
    Quit { until: Instant },
    Killed { until: Instant },
}

/// What the monitor does now for a stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopStep {
    /// `system_powerdown`: the first press, or again.
    Powerdown { first: bool },
    /// `quit`; `timed_out`: the guest did not power off in time.
    Quit { timed_out: bool },
    /// SIGKILL to QEMU's process.
    Kill,
    /// Still alive after SIGKILL: say so (and keep waiting).
    StillAlive,
}

impl Phase {
    /// STOP: press the power button (ignored while a stop is under way).
    fn stop(self, now: Instant, stop_timeout: Duration) -> (Phase, Option<StopStep>) {
        match self {
            Phase::Idle => (
                Phase::Powerdown {
                    until: now + stop_timeout,
                    next: now + POWERDOWN_RETRY,
                },
                Some(StopStep::Powerdown { first: true }),
            ),
            other => (other, None),
        }
    }

    /// DELETE: quit at once (unless quitting or killed already).
    fn kill(self, now: Instant) -> (Phase, Option<StopStep>) {
        match self {
            Phase::Idle | Phase::Powerdown { .. } => (
                Phase::Quit {
                    until: now + QUIT_WAIT,
                },
                Some(StopStep::Quit { timed_out: false }),
            ),
            other => (other, None),
        }
    }

    /// When the phase next needs the monitor's attention.
    fn due(self) -> Option<Instant> {
        match self {
            Phase::Idle => None,
            Phase::Powerdown { until, next } => Some(until.min(next)),
            Phase::Quit { until } | Phase::Killed { until } => Some(until),
        }
    }

    /// The timer fired at `now`.
    fn fire(self, now: Instant) -> (Phase, Option<StopStep>) {
        match self {
            Phase::Idle => (self, None),
            Phase::Powerdown { until, .. } if now >= until => (
                Phase::Quit {
                    until: now + QUIT_WAIT,
                },
                Some(StopStep::Quit { timed_out: true }),
            ),
            Phase::Powerdown { until, next } if now >= next => (
                Phase::Powerdown {
                    until,
                    next: now + POWERDOWN_RETRY,
                },
                Some(StopStep::Powerdown { first: false }),
            ),
            Phase::Powerdown { .. } => (self, None),
            Phase::Quit { until } if now >= until => (
                Phase::Killed {
                    until: now + QUIT_WAIT,
                },
                Some(StopStep::Kill),
            ),
            Phase::Killed { until } if now >= until => (
                Phase::Killed {
                    until: now + QUIT_WAIT,
                },
                Some(StopStep::StillAlive),
            ),
            Phase::Quit { .. } | Phase::Killed { .. } => (self, None),
        }
    }
}

/// Whether the process `pid` (started at `identity`, when known) is gone:
/// exited, a zombie, or the pid now belongs to a later process.
fn gone(pid: i32, identity: Option<u64>) -> bool {
    let now = process_identity(Path::new("/proc"), pid);
    now.is_none() || (identity.is_some() && now != identity)
}

/// The pid named in QEMU's pid file, if that process is alive.
fn pid_from_file(p: &Path) -> Option<i32> {
    let pid = fs::read_to_string(p).ok()?.trim().parse::<i32>().ok()?;
    process_identity(Path::new("/proc"), pid).map(|_| pid)
}

fn detached(cmds: &Receiver<MonCmd>) -> bool {
    matches!(
        cmds.try_recv(),
        Err(crossbeam_channel::TryRecvError::Disconnected)
    )
}

impl Watch {
    /// Records QEMU's pid, logs, and reports `Running`.
    fn connected(&self, qmp: &Qmp, events: &Sender<MonitorEvent>) -> (Option<i32>, Option<u64>) {
        let pid = qmp.pid.or_else(|| pid_from_file(&self.pidfile));
        let identity = pid.and_then(|p| process_identity(Path::new("/proc"), p));
        self.pid.store(pid.unwrap_or(0), Ordering::Relaxed);
        info!(
            "{}: QMP connected (QEMU {}.{}.{}, pid {})",
            self.name,
            qmp.version.0,
            qmp.version.1,
            qmp.version.2,
            pid.map_or("unknown".into(), |p| p.to_string())
        );
        let _ = events.send(MonitorEvent::Running);
        (pid, identity)
    }

    /// `pre`: a connection the instance thread already made (and reported
    /// as `Running`) right after QEMU daemonized.
    fn run(
        self,
        pre: Option<(Qmp, Option<i32>, Option<u64>)>,
        events: &Sender<MonitorEvent>,
        cmds: &Receiver<MonCmd>,
    ) {
        let (mut qmp, pid, identity) = match pre {
            Some(p) => p,
            None => {
                let Some(qmp) = self.connect(cmds, events) else {
                    return;
                };
                let (pid, identity) = self.connected(&qmp, events);
                (qmp, pid, identity)
            }
        };

        let mut phase = Phase::Idle;
        let mut guest_shutdown = false;
        loop {
            let timer = self.clock.timer(phase.due());
            let step = select! {
                recv(cmds) -> c => match c {
                    // Detached: QEMU runs on.
                    Err(_) => return,
                    Ok(MonCmd::Stop) => {
                        let (next, step) = phase.stop(self.clock.now(), self.stop_timeout);
                        phase = next;
                        step
                    }
                    Ok(MonCmd::Kill) => {
                        let (next, step) = phase.kill(self.clock.now());
                        phase = next;
                        step
                    }
                    Ok(MonCmd::Attach { id, path, format, reply }) => {
                        let r = attach(&mut qmp, &id, &path, &format, &mut guest_shutdown);
                        let _ = reply.send(r);
                        None
                    }
                },
                recv(qmp.messages()) -> m => match m {
                    Ok(QmpMsg::Event(name, data)) => {
                        // Only a shutdown the guest asked for is a power-off
                        // (QEMU also reports its own `quit`).
                        if name == "SHUTDOWN" && data.get("guest").and_then(Value::as_bool) == Some(true) {
                            guest_shutdown = true;
                        }
                        info!("{}: QMP event {name} {data}", self.name);
                        None
                    }
                    Ok(QmpMsg::Error(e)) => {
                        warn!("{}: QMP: {e}", self.name);
                        None
                    }
                    Ok(QmpMsg::Return(_)) => None,
                    // The socket closed: QEMU is exiting.
                    Err(_) => break,
                },
                recv(timer) -> at => {
                    let (next, step) = phase.fire(self.clock.fired(at.ok()));
                    phase = next;
                    step
                }
            };
            match step {
                None => {}
                Some(StopStep::Powerdown { first: true }) => {
                    info!(
                        "{}: ACPI power-down (stop timeout {:?})",
                        self.name, self.stop_timeout
                    );
                    self.send(&mut qmp, "system_powerdown", None);
                }
                Some(StopStep::Powerdown { first: false }) => {
                    debug!("{}: ACPI power-down again", self.name);
                    self.send(&mut qmp, "system_powerdown", None);
                }
                Some(StopStep::Quit { timed_out }) => {
                    if timed_out {
                        warn!(
                            "{}: the guest did not power off within {:?}; quit",
                            self.name, self.stop_timeout
                        );
                    } else {
                        info!("{}: quit", self.name);
                    }
                    self.send(&mut qmp, "quit", None);
                }
                Some(StopStep::Kill) => {
                    warn!(
                        "{}: QEMU did not quit within {QUIT_WAIT:?}; SIGKILL",
                        self.name
                    );
                    self.sigkill(pid, identity);
                }
                Some(StopStep::StillAlive) => {
                    warn!(
                        "{}: QEMU (pid {}) still alive after SIGKILL",
                        self.name,
                        pid.map_or("unknown".into(), |p| p.to_string())
                    );
                }
            }
        }
        drop(qmp);
        // The process may still be tearing down: report only once it is gone.
        if !self.wait_gone(pid, identity, cmds) {
            return;
        }
        let why = match (guest_shutdown, phase) {
            (true, _) => "the guest powered off",
            (false, Phase::Quit { .. }) => "QEMU quit",
            (false, Phase::Killed { .. }) => "QEMU killed",
            _ => "QEMU exited unexpectedly",
        };
        let _ = events.send(MonitorEvent::Exited(why.into()));
    }

    /// Connects and negotiates; on failure reports `Exited` (the VM is gone,
    /// or unreachable and killed) unless detached. Retries while the QEMU
    /// process is alive: its monitor may be busy.
    fn connect(&self, cmds: &Receiver<MonCmd>, events: &Sender<MonitorEvent>) -> Option<Qmp> {
        let mut delay = Duration::from_millis(50);
        let mut tries = 0;
        loop {
            tries += 1;
            match Qmp::connect(&self.socket, QMP_TIMEOUT, &self.short) {
                Ok(q) => return Some(q),
                Err(e) => {
                    let alive = pid_from_file(&self.pidfile);
                    if alive.is_none() || tries >= 20 {
                        let why = if self.boot {
                            format!("VM not running after the launcher restarted ({e})")
                        } else {
                            format!("cannot reach the VM's QMP socket: {e}")
                        };
                        if let Some(p) = alive {
                            warn!("{}: {why}; killing QEMU (pid {p})", self.name);
                            self.sigkill(Some(p), process_identity(Path::new("/proc"), p));
                            if !self.wait_gone(Some(p), None, cmds) {
                                return None;
                            }
                        }
                        let _ = events.send(MonitorEvent::Exited(why));
                        return None;
                    }
                    debug!("{}: {e}; QEMU alive, retrying in {delay:?}", self.name);
                    select! {
                        recv(cmds) -> c => if c.is_err() { return None },
                        default(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    fn send(&self, qmp: &mut Qmp, cmd: &str, args: Option<Value>) {
        if let Err(e) = qmp.send(cmd, args) {
            // A closed socket shows up on the message channel too.
            debug!("{}: {cmd}: {e}", self.name);
        }
    }

    fn sigkill(&self, pid: Option<i32>, identity: Option<u64>) {
        let Some(p) = pid else {
            warn!("{}: QEMU's pid is unknown; cannot kill it", self.name);
            return;
        };
        // Never kill a process that merely inherited the pid.
        if gone(p, identity) {
            return;
        }
        if let Err(e) = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGKILL,
        ) {
            warn!("{}: kill {p}: {e}", self.name);
        }
    }

    /// Waits until QEMU's process is gone (SIGKILL after 5 s); false if
    /// detached meanwhile.
    fn wait_gone(&self, pid: Option<i32>, identity: Option<u64>, cmds: &Receiver<MonCmd>) -> bool {
        let Some(p) = pid else { return true };
        let start = Instant::now();
        let mut killed = false;
        loop {
            if gone(p, identity) {
                return true;
            }
            if !killed && start.elapsed() > QUIT_WAIT {
                warn!("{}: QEMU closed QMP but did not exit; SIGKILL", self.name);
                self.sigkill(Some(p), identity);
                killed = true;
            }
            if start.elapsed() > QUIT_WAIT * 3 {
                warn!("{}: QEMU (pid {p}) does not go away", self.name);
                return true;
            }
            if detached(cmds) {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Hot-plugs a volume: `blockdev-add` of the file, then `device_add` of a
/// virtio disk on it (the block node removed again if that fails).
fn attach(
    qmp: &mut Qmp,
    id: &str,
    path: &Path,
    format: &str,
    shutdown: &mut bool,
) -> Result<(), VirtError> {
    let mut node: String = format!("d_{}", id.replace('-', ""));
    node.truncate(31);
    let mut on_event = |name: &str, data: &Value| {
        if name == "SHUTDOWN" && data.get("guest").and_then(Value::as_bool) == Some(true) {
            *shutdown = true;
        }
    };
    let verr = |what: &str, e: QmpError| VirtError::other(format!("{what}: {e}"));
    qmp.execute(
        "blockdev-add",
        Some(json!({
            "driver": format,
            "node-name": node,
            "file": {"driver": "file", "filename": path.to_string_lossy()},
        })),
        QMP_TIMEOUT,
        &mut on_event,
    )
    .map_err(|e| verr("blockdev-add", e))?;
    if let Err(e) = qmp.execute(
        "device_add",
        Some(json!({
            "driver": "virtio-blk-pci",
            "drive": node,
            "id": format!("device_{id}"),
        })),
        QMP_TIMEOUT,
        &mut on_event,
    ) {
        let _ = qmp.execute(
            "blockdev-del",
            Some(json!({ "node-name": node })),
            QMP_TIMEOUT,
            &mut on_event,
        );
        return Err(verr("device_add", e));
    }
    Ok(())
}

/// Asks the VM behind `socket` to quit at once (hard reset), waiting up to
/// `timeout` for it to go; Ok(false) when nothing answered there.
pub fn quit_vm(socket: &Path, timeout: Duration) -> Result<bool, VirtError> {
    let mut qmp = match Qmp::connect(socket, timeout, "reset") {
        Ok(q) => q,
        Err(QmpError::Io(e))
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(false);
        }
        Err(e) => return Err(VirtError::other(e.to_string())),
    };
    let pid = qmp.pid;
    let identity = pid.and_then(|p| process_identity(Path::new("/proc"), p));
    let _ = qmp.send("quit", None);
    let deadline = Instant::now() + timeout;
    // Drain until QEMU closes the socket.
    while let Ok(_m) = qmp.messages().recv_deadline(deadline) {}
    drop(qmp);
    if let Some(p) = pid {
        while Instant::now() < deadline {
            if gone(p, identity) {
                return Ok(true);
            }
            thread::sleep(Duration::from_millis(5));
        }
        return Err(VirtError::other(format!("QEMU (pid {p}) did not quit")));
    }
    Ok(true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The stop escalation with an injected clock: power-down, again every
    /// 2 s, quit at the stop timeout, SIGKILL 5 s later, then a warning
    /// every 5 s; a DELETE quits at once; a second STOP changes nothing.
    #[test]
    fn stop_escalation_on_an_injected_clock() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let timeout = Duration::from_secs(5);
        let (p, step) = Phase::Idle.stop(at(0), timeout);
        assert_eq!(step, Some(StopStep::Powerdown { first: true }));
        assert_eq!(p.due(), Some(at(2000)));
        assert_eq!(p.stop(at(100), timeout), (p, None));
        assert_eq!(p.fire(at(1999)), (p, None));
        let (p, step) = p.fire(at(2000));
        assert_eq!(step, Some(StopStep::Powerdown { first: false }));
        assert_eq!(p.due(), Some(at(4000)));
        let (p, step) = p.fire(at(4000));
        assert_eq!(step, Some(StopStep::Powerdown { first: false }));
        assert_eq!(p.due(), Some(at(5000)));
        let (p, step) = p.fire(at(5000));
        assert_eq!(step, Some(StopStep::Quit { timed_out: true }));
        assert_eq!(p, Phase::Quit { until: at(10_000) });
        assert_eq!(p.kill(at(6000)), (p, None));
        let (p, step) = p.fire(at(10_000));
        assert_eq!(step, Some(StopStep::Kill));
        let (p, step) = p.fire(at(15_000));
        assert_eq!(step, Some(StopStep::StillAlive));
        assert_eq!(p.due(), Some(at(20_000)));

        let (p, step) = Phase::Idle.kill(at(0));
        assert_eq!(step, Some(StopStep::Quit { timed_out: false }));
        assert_eq!(p.due(), Some(at(5000)));
        let (powering, _) = Phase::Idle.stop(at(0), timeout);
        assert_eq!(
            powering.kill(at(1000)).1,
            Some(StopStep::Quit { timed_out: false })
        );
        assert_eq!(Phase::Idle.fire(at(1)), (Phase::Idle, None));
        assert_eq!(Phase::Idle.due(), None);
    }

    /// A child started through `own_session` leads a session of its own
    /// from the moment `spawn` returns (exec has happened by then).
    #[test]
    fn child_in_own_session() {
        let mut cmd = Command::new("cat");
        cmd.stdin(Stdio::piped()).stdout(Stdio::null());
        own_session(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let session = nix::unistd::getsid(Some(pid)).unwrap();
        drop(child.stdin.take());
        child.wait().unwrap();
        assert_eq!(session, pid);
        assert_ne!(session, nix::unistd::getsid(None).unwrap());
    }

    #[test]
    fn accelerator_choice() {
        let tmp = std::env::temp_dir().join(format!("ciao-accel-{}", std::process::id()));
        let sys = tmp.join("sys");
        fs::create_dir_all(sys.join("module")).unwrap();
        let kvm = tmp.join("kvm");
        // No /dev/kvm: TCG.
        assert_eq!(choose_accel(AccelChoice::Auto, &sys, &kvm).0, Accel::Tcg);
        fs::write(&kvm, "").unwrap();
        assert_eq!(choose_accel(AccelChoice::Auto, &sys, &kvm).0, Accel::Kvm);
        fs::create_dir_all(sys.join("module/kvm_pvm")).unwrap();
        let (a, why) = choose_accel(AccelChoice::Auto, &sys, &kvm);
        assert_eq!(a, Accel::Tcg);
        assert!(why.contains("kvm_pvm"), "{why}");
        fs::create_dir_all(sys.join("module/kvm_intel")).unwrap();
        assert_eq!(choose_accel(AccelChoice::Auto, &sys, &kvm).0, Accel::Kvm);
        assert_eq!(choose_accel(AccelChoice::Tcg, &sys, &kvm).0, Accel::Tcg);
        assert_eq!(
            choose_accel(AccelChoice::Kvm, &sys, &tmp.join("none")).0,
            Accel::Kvm
        );
        fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn command_line_order() {
        let dir = Path::new("/d/i");
        let root = Path::new("/d/i/image.qcow2");
        let vols = vec![(
            "v1".to_string(),
            PathBuf::from("/d/volumes/v,1"),
            "raw".to_string(),
        )];
        let ovmf = Ovmf::Split {
            code: "/fw/CODE.fd".into(),
            vars: "/fw/VARS.fd".into(),
        };
        let args = command_line(&LaunchSpec {
            name: "n",
            dir,
            accel: Accel::Kvm,
            vcpus: 2,
            mem_mb: 370,
            root: (root, "qcow2"),
            volumes: &vols,
            ovmf: Some(&ovmf),
            ui: None,
            nic: &Nic::None,
        });
        let s: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let pos = |x: &str| s.iter().position(|a| a.starts_with(x)).unwrap();
        let flag = |x: &str| s.iter().position(|a| a == x).unwrap();
        assert_eq!(s[flag("-machine") + 1], "pc,accel=kvm");
        assert_eq!(s[flag("-cpu") + 1], "host");
        assert_eq!(s[flag("-m") + 1], "370");
        assert_eq!(s[flag("-smp") + 1], "cpus=2");
        assert!(s.contains(&"file=/d/volumes/v,,1,if=none,id=drive_v1,format=raw".to_string()));
        // Root first (bootable), then volumes, then the config drive.
        assert!(pos("file=/d/i/image.qcow2") < pos("file=/d/volumes"));
        assert!(pos("file=/d/volumes") < pos("file=/d/i/seed.iso"));
        assert!(s.contains(&"if=pflash,unit=1,format=raw,file=/d/i/OVMF_VARS.fd".to_string()));
        assert_eq!(s[flag("-qmp") + 1], "unix:/d/i/qmp.sock,server=on,wait=off");
        assert_eq!(s.last().unwrap(), "-daemonize");

        let args = command_line(&LaunchSpec {
            name: "n",
            dir,
            accel: Accel::Tcg,
            vcpus: 0,
            mem_mb: 0,
            root: (root, "qcow2"),
            volumes: &[],
            ovmf: None,
            ui: Some((Ui::Nc, 5901)),
            nic: &Nic::None,
        });
        let s: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(
            !s.iter()
                .any(|a| a == "-cpu" || a == "-m" || a == "-smp" || a == "-bios")
        );
        assert!(
            s.iter()
                .any(|a| a.contains("port=5901") && a.contains("logfile=/d/i/console.log"))
        );
    }

    fn spec<'a>(dir: &'a Path, root: &'a Path) -> LaunchSpec<'a> {
        LaunchSpec {
            name: "n",
            dir,
            accel: Accel::Tcg,
            vcpus: 1,
            mem_mb: 64,
            root: (root, "qcow2"),
            volumes: &[],
            ovmf: None,
            ui: None,
            nic: &Nic::None,
        }
    }

    /// Open descriptors to stand in for tap queues.
    fn fds(n: usize) -> Vec<OwnedFd> {
        (0..n)
            .map(|_| OwnedFd::from(fs::File::open("/dev/null").unwrap()))
            .collect()
    }

    /// The `-netdev` and `-device` values of a command line, if any.
    fn nic_of(args: &[String]) -> Option<(String, String)> {
        let i = args.iter().position(|a| a == "-netdev")?;
        assert_eq!(args[i + 2], "-device");
        assert_eq!(
            args.iter().filter(|a| *a == "-netdev").count(),
            1,
            "one NIC"
        );
        Some((args[i + 1].clone(), args[i + 3].clone()))
    }

    const MAC: [u8; 6] = [0x02, 0x00, 0xaa, 0x0b, 0xcd, 0xef];

    #[test]
    fn command_line_without_a_nic_has_no_network_device() {
        let (dir, root) = (Path::new("/d/i"), Path::new("/d/i/image.qcow2"));
        let s = strings(&command_line(&spec(dir, root)));
        assert!(nic_of(&s).is_none());
        assert!(
            !s.iter()
                .any(|a| a.starts_with("-net") || a.contains("virtio-net"))
        );
        assert!(
            s.contains(&"-nodefaults".to_string()),
            "no default NIC either"
        );
        assert!(Nic::None.inherited().is_empty());
    }

    #[test]
    fn command_line_with_a_tap() {
        let (dir, root) = (Path::new("/d/i"), Path::new("/d/i/image.qcow2"));
        let tap = Nic::Tap {
            fds: fds(1),
            mac: MAC,
            vhost: false,
        };
        let n = tap.inherited();
        assert_eq!(n.len(), 1);
        let s = strings(&command_line(&LaunchSpec {
            nic: &tap,
            ..spec(dir, root)
        }));
        let (netdev, device) = nic_of(&s).unwrap();
        assert_eq!(netdev, format!("tap,id=nic0,fds={}", n[0]));
        assert_eq!(
            device,
            "virtio-net-pci,netdev=nic0,mac=02:00:aa:0b:cd:ef,romfile="
        );
        // After the disks (the root disk keeps the first PCI slot), before
        // the QMP socket; the rest as without a NIC.
        let at = |x: &str| s.iter().position(|a| a == x).unwrap();
        assert!(at("-netdev") > s.iter().position(|a| a.contains("seed.iso")).unwrap());
        assert!(at("-netdev") < at("-qmp"));
        assert_eq!(s.len(), strings(&command_line(&spec(dir, root))).len() + 4);

        // vhost only when asked; two queues make a multi-queue device.
        let tap = Nic::Tap {
            fds: fds(2),
            mac: MAC,
            vhost: true,
        };
        let n = tap.inherited();
        let s = strings(&command_line(&LaunchSpec {
            nic: &tap,
            ..spec(dir, root)
        }));
        let (netdev, device) = nic_of(&s).unwrap();
        assert_eq!(
            netdev,
            format!("tap,id=nic0,fds={}:{},vhost=on", n[0], n[1])
        );
        assert!(device.ends_with(",romfile=,mq=on,vectors=6"), "{device}");
    }

    #[test]
    fn command_line_with_a_macvtap() {
        let (dir, root) = (Path::new("/d/i"), Path::new("/d/i/image.qcow2"));
        let tap = Nic::Macvtap {
            fds: fds(4),
            mac: MAC,
        };
        let n = tap.inherited();
        assert_eq!(n.len(), 4);
        let s = strings(&command_line(&LaunchSpec {
            nic: &tap,
            ..spec(dir, root)
        }));
        let (netdev, device) = nic_of(&s).unwrap();
        let list = n.iter().map(i32::to_string).collect::<Vec<_>>().join(":");
        assert_eq!(netdev, format!("tap,id=nic0,fds={list}"));
        assert_eq!(
            device,
            "virtio-net-pci,netdev=nic0,mac=02:00:aa:0b:cd:ef,romfile=,mq=on,vectors=10"
        );
    }

    #[test]
    fn command_line_with_a_user_mode_nic() {
        let (dir, root) = (Path::new("/d/i"), Path::new("/d/i/image.qcow2"));
        let user = Nic::User {
            ssh_forward: "127.0.0.1:40022".parse().unwrap(),
        };
        assert!(user.inherited().is_empty());
        let s = strings(&command_line(&LaunchSpec {
            nic: &user,
            ..spec(dir, root)
        }));
        let (netdev, device) = nic_of(&s).unwrap();
        assert_eq!(
            netdev,
            "user,id=nic0,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22"
        );
        assert_eq!(device, "virtio-net-pci,netdev=nic0,romfile=");
        let v6 = Nic::User {
            ssh_forward: "[::1]:40022".parse().unwrap(),
        };
        assert!(v6.args()[1].ends_with("hostfwd=tcp:[::1]:40022-:22"));
    }

    /// Exactly the NIC's descriptors survive exec: another descriptor of
    /// this process (close-on-exec, as all of them) does not.
    #[test]
    fn only_the_nic_descriptors_are_inherited() {
        let nic = Nic::Tap {
            fds: fds(2),
            mac: MAC,
            vhost: false,
        };
        let other = fds(1);
        let kept = nic.inherited();
        let script = format!(
            "for fd in {} {}; do [ -e /proc/$$/fd/$fd ] || exit 1; done; [ ! -e /proc/$$/fd/{} ]",
            kept[0],
            kept[1],
            other[0].as_raw_fd()
        );
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &script]);
        own_session(&mut cmd);
        inherit_fds(&mut cmd, kept);
        assert!(cmd.status().unwrap().success(), "{script}");
        // Without inherit_fds nothing survives.
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            &format!("[ ! -e /proc/$$/fd/{} ]", nic.inherited()[0]),
        ]);
        assert!(cmd.status().unwrap().success());
    }

    #[test]
    fn ssh_forwards_are_loopback_ports_no_two_vms_share() {
        let a = reserve_forward(None).unwrap();
        let b = reserve_forward(None).unwrap();
        assert!(a.ip().is_loopback() && b.ip().is_loopback());
        assert_ne!(a.port(), b.port());
        // A VM booting again keeps its port while nobody listens there.
        assert_eq!(reserve_forward(Some(a)).unwrap(), a);
        // Taken by somebody else meanwhile: another one.
        let squatter = std::net::TcpListener::bind(b).unwrap();
        let c = reserve_forward(Some(b)).unwrap();
        assert_ne!(c, b);
        drop(squatter);
        // A non-loopback address is never kept.
        let d = reserve_forward(Some("0.0.0.0:40999".parse().unwrap())).unwrap();
        assert!(d.ip().is_loopback());
        for x in [a, c, d] {
            release_forward(x);
        }
    }

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn command_line_with_and_without_child_user() {
        let (dir, root) = (Path::new("/d/i"), Path::new("/d/i/image.qcow2"));
        let plain = command_line(&spec(dir, root));
        // No child user: the command line of before.
        assert_eq!(confined_command_line(&spec(dir, root), None), plain);
        let p = strings(&plain);
        assert!(
            !p.iter()
                .any(|a| a == "-runas" || a == "-run-with" || a == "-sandbox")
        );

        let mut c = Confine {
            uid: 999,
            gid: 998,
            drop: DropFlag::Runas,
            sandbox: Some(SANDBOX_TRIED[0].to_string()),
        };
        let s = strings(&confined_command_line(&spec(dir, root), Some(&c)));
        let flag = |s: &[String], x: &str| s.iter().position(|a| a == x).unwrap();
        assert_eq!(s[flag(&s, "-runas") + 1], "999:998");
        assert_eq!(
            s[flag(&s, "-sandbox") + 1],
            "on,obsolete=deny,resourcecontrol=deny"
        );
        // Everything else as without a child user.
        assert_eq!(s.len(), p.len() + 4);
        assert_eq!(s.last().unwrap(), "-daemonize");

        c.drop = DropFlag::RunWith;
        c.sandbox = None;
        let s = strings(&confined_command_line(&spec(dir, root), Some(&c)));
        assert_eq!(s[flag(&s, "-run-with") + 1], "user=999:998");
        assert!(!s.iter().any(|a| a == "-runas" || a == "-sandbox"));
        assert_eq!(s.len(), p.len() + 2);
    }

    /// A fake QEMU that knows `-runas` but not `-run-with`, and `-sandbox`
    /// without the `obsolete` setting.
    #[test]
    fn confinement_probe() {
        let tmp = std::env::temp_dir().join(format!("ciao-probe-{}", std::process::id()));
        fs::create_dir_all(&tmp).unwrap();
        let fake = tmp.join("qemu");
        fs::write(
            &fake,
            "#!/bin/sh\ncase \"$*\" in\n  *run-with*) echo \"-run-with: invalid option\" >&2; exit 1 ;;\n  *obsolete*) echo \"Invalid parameter 'obsolete'\" >&2; exit 1 ;;\nesac\nexit 0\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            probe_confinement(&fake),
            Some(Confinement {
                drop: DropFlag::Runas,
                sandbox: Some("on".into())
            })
        );
        assert_eq!(probe_confinement(&tmp.join("none")), None);
        fs::remove_dir_all(&tmp).unwrap();
        // The real one, where installed: Debian's QEMU 7.2 has -runas and
        // the strict sandbox (9.1 and later: -run-with).
        if let Some(c) = probe_confinement(Path::new("qemu-system-x86_64")) {
            assert_eq!(c.sandbox.as_deref(), Some(SANDBOX_TRIED[0]), "{c:?}");
        }
    }

    #[test]
    fn child_user_settings() {
        let root = ChildUser::lookup("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(ChildUser::lookup("0").unwrap(), root);
        let e = ChildUser::lookup("no-such-user-ciao-x").unwrap_err();
        assert!(e.contains("no user"), "{e}");
        assert_eq!(
            ChildUser::of_process(Path::new("/proc"), std::process::id() as i32).map(|u| u.uid),
            Some(nix::unistd::getuid().as_raw())
        );

        // Nothing configured: the launcher's own user.
        let none = ChildUsers::new(None);
        assert_eq!(none.current(), Ok(None));
        // The cluster configuration's user…
        none.configure("root");
        assert_eq!(none.current(), Ok(Some(root.clone())));
        none.configure("");
        assert_eq!(none.current(), Ok(None));
        // …refuses VMs while it does not exist.
        none.configure("no-such-user-ciao-x");
        let e = none.current().unwrap_err();
        assert!(
            e.to_string().contains("launcher.child_user")
                && e.to_string().contains("no-such-user-ciao-x"),
            "{e}"
        );
        // The flag wins over the configuration, also over an unknown user.
        let flag = ChildUsers::new(Some(root.clone()));
        flag.configure("no-such-user-ciao-x");
        assert_eq!(flag.current(), Ok(Some(root)));
    }

    /// The helpers' privilege drop (needs root to drop).
    #[test]
    fn child_runs_as_user_and_primary_group_only() {
        if !nix::unistd::getuid().is_root() {
            return;
        }
        let nobody = ChildUser {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
        };
        let mut cmd = Command::new("cat");
        cmd.arg("/proc/self/status");
        own_session(&mut cmd);
        as_child(&mut cmd, Some(&nobody));
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let status = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = |k: &str| {
            status
                .lines()
                .find(|l| l.starts_with(k))
                .unwrap()
                .split_whitespace()
                .skip(1)
                .collect::<Vec<_>>()
        };
        assert_eq!(line("Uid:"), ["65534"; 4]);
        assert_eq!(line("Gid:"), ["65534"; 4]);
        assert_eq!(line("Groups:"), ["65534"]);
        // Without a child user: the launcher's own.
        let mut cmd = Command::new("id");
        cmd.arg("-u");
        as_child(&mut cmd, None);
        assert_eq!(
            String::from_utf8_lossy(&cmd.output().unwrap().stdout).trim(),
            "0"
        );
    }

    /// Files given to the child: never through a symbolic link.
    #[test]
    fn files_for_the_child() {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::getuid().is_root() {
            return;
        }
        let u = ChildUser {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
        };
        let tmp = std::env::temp_dir().join(format!("ciao-give-{}", std::process::id()));
        fs::create_dir_all(&tmp).unwrap();
        let made = tmp.join("console.log");
        create_for(&made, &u).unwrap();
        let m = fs::metadata(&made).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (65534, 65534, 0o600));
        let outside = tmp.join("outside");
        fs::write(&outside, "x").unwrap();
        let link = tmp.join("link");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        assert!(create_for(&link, &u).is_err());
        give(&link, &u).unwrap();
        assert_eq!(fs::metadata(&outside).unwrap().uid(), 0);
        give(&outside, &u).unwrap();
        assert_eq!(fs::metadata(&outside).unwrap().uid(), 65534);
        give(&tmp.join("missing"), &u).unwrap();
        // Directories are not given away.
        give(&tmp, &u).unwrap();
        assert_eq!(fs::metadata(&tmp).unwrap().uid(), 0);
        fs::remove_dir_all(&tmp).unwrap();
    }

    /// What a child-writable disk's header may name (needs qemu-img).
    #[test]
    fn disk_headers_of_child_vms() {
        let tmp = std::env::temp_dir().join(format!("ciao-hdr-{}", std::process::id()));
        fs::create_dir_all(&tmp).unwrap();
        let img = |args: &[&str]| {
            Command::new("qemu-img")
                .args(["create", "-q"])
                .args(args)
                .current_dir(&tmp)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !img(&["-f", "raw", "base.raw", "1M"]) {
            fs::remove_dir_all(&tmp).unwrap();
            return;
        }
        let base = fs::canonicalize(tmp.join("base.raw")).unwrap();
        let qemu_img = Path::new("qemu-img");
        let b = base.to_string_lossy().into_owned();
        assert!(img(&[
            "-f", "qcow2", "-F", "raw", "-b", &b, "ov.qcow2", "1M"
        ]));
        let ov = tmp.join("ov.qcow2");
        let info = image_info(qemu_img, &ov, None).unwrap();
        assert_eq!(info.backing.as_deref(), Some(b.as_str()));
        info.check_header(&ov, Some(&base)).unwrap();
        // Pointed elsewhere, or a volume with a backing file: refused.
        let e = info
            .check_header(&ov, Some(&tmp.join("other")))
            .unwrap_err();
        assert!(
            e.to_string().contains("backing file") && e.to_string().contains(&b),
            "{e}"
        );
        assert!(info.check_header(&ov, None).is_err());
        let raw = image_info(qemu_img, &base, None).unwrap();
        assert_eq!((raw.backing, raw.data_file), (None, None));
        // An external data file.
        let d = tmp.join("data.raw").to_string_lossy().into_owned();
        assert!(img(&[
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={d}"),
            "df.qcow2",
            "1M"
        ]));
        let df = image_info(qemu_img, &tmp.join("df.qcow2"), None).unwrap();
        assert_eq!(df.data_file.as_deref(), Some(d.as_str()));
        let e = df.check_header(&tmp.join("df.qcow2"), None).unwrap_err();
        assert!(e.to_string().contains("data file"), "{e}");
        fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn ovmf_configured() {
        let tmp = std::env::temp_dir().join(format!("ciao-ovmf-{}", std::process::id()));
        fs::create_dir_all(&tmp).unwrap();
        let e = find_ovmf(Some(&tmp.join("nope.fd"))).unwrap_err();
        assert!(
            e.to_string().contains("nope.fd") && e.to_string().contains("legacy"),
            "{e}"
        );
        fs::write(tmp.join("OVMF.fd"), "").unwrap();
        assert_eq!(
            find_ovmf(Some(&tmp.join("OVMF.fd"))).unwrap(),
            Ovmf::Combined(tmp.join("OVMF.fd"))
        );
        fs::write(tmp.join("OVMF_CODE_4M.fd"), "").unwrap();
        fs::write(tmp.join("OVMF_VARS_4M.fd"), "").unwrap();
        assert_eq!(
            find_ovmf(Some(&tmp.join("OVMF_CODE_4M.fd"))).unwrap(),
            Ovmf::Split {
                code: tmp.join("OVMF_CODE_4M.fd"),
                vars: tmp.join("OVMF_VARS_4M.fd")
            }
        );
        fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn socket_path_limit() {
        assert!(check_socket_path(Path::new("/var/lib/ciao/instances/x/qmp.sock")).is_ok());
        let long = format!("/{}/socket", "a".repeat(120));
        assert!(check_socket_path(Path::new(&long)).is_err());
    }
}

/// `Watch::run`'s stop escalation against a fake QMP peer, on a manual clock.
#[cfg(test)]
#[path = "qemu_stop_tests.rs"]
mod stop_tests;
