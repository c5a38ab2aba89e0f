//! Per-instance persistent state (docs/architecture.md, On-disk layout).
//!
//! # Layout
//!
//! ```text
//! <data-dir>/instances/                  0755, created by Store::ensure_dirs
//! <data-dir>/instances/<uuid>/           0755, one per instance (Store::create_instance_dir)
//! <data-dir>/instances/<uuid>/state      0600, YAML of StateFile
//! <data-dir>/instances/<uuid>/...        virtualizer files (overlay, seed.iso, qmp.sock, ...)
//! ```
//!
//! `<uuid>` is always the canonical (lower-case, hyphenated) instance UUID;
//! the directory name, not the UUID inside the file, identifies the instance
//! on recovery, as in the original. The state file is 0600 because it holds
//! the instance's cloud-init user data, which may contain secrets.
//!
//! # Why writes are atomic
//!
//! The launcher restarts (crash, upgrade, host reboot) and then recovers every
//! instance from its `state` file. A file rewritten in place can be left empty
//! or half-written by a crash, and the instance would be lost (or, with the
//! original's non-truncating gob rewrite, decoded from stale trailing bytes).
//! So [`write_atomic`] writes a temporary file in the same directory, fsyncs
//! it, renames it over the target and fsyncs the directory: after a crash the
//! `state` is either the old or the new complete version. A leftover
//! `.state.tmp-*` is ignored by [`Store::load`] and [`Store::scan`].
//!
//! [`Store::save`] uses it, and also syncs the instances directory the first
//! time an instance's state is written, so the new instance directory itself
//! survives a crash. Only the files concerned are synced: the instances
//! live on the same file system as the VMs' disks, and a whole-file-system
//! sync (`syncfs`, tried earlier for group commit) would flush every guest's
//! dirty data on each START (it made 20 parallel VM STARTs 50 % slower).
//! Concurrent fsyncs still share journal commits in the kernel.
//!
//! # The node journal
//!
//! The launcher's store is journaled ([`journal`]): a state write or a
//! deletion is made durable as a record in `<data-dir>/journal`, many
//! instances' records with one fdatasync, and is acknowledged then; the
//! `state` file is written afterwards by the journal thread (no fsync) and
//! made durable by compaction, after which the journal is truncated. So a
//! `state` file may be missing or stale after a power cut while its record
//! is in the journal: [`journal::Journal::open`] replays the journal into
//! the files before recovery scans them. A store from [`Store::new`] (tools,
//! tests) writes each file durably itself, as above.
//!
//! # Why state files are sealed
//!
//! A state file is its YAML between a header line and an end line that
//! carries the YAML's length and FNV-1a checksum (both lines are YAML
//! comments). YAML reads a prefix of a state as a valid state with defaults
//! (a stopped instance would come back running, its user data gone), so a
//! file that lost its end, or has a damaged byte, must be told from a whole
//! one: [`Store::load`] refuses it as `Corrupt`, and recovery leaves it in
//! place for inspection. Files without the seal (from earlier launchers) are
//! read as before, provided they name their instance.
//!
//! # Why ids are checked
//!
//! Instance ids arrive from the network. Every function that builds a path
//! from one first checks that it is a strict hyphenated UUID (so it cannot be
//! `..`, contain `/` or NUL, or be absolute) and refuses an instance directory
//! that is a symbolic link, so a path never leaves `instances/`.

use std::borrow::Cow;
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::payloads::config::InstanceConfig;

pub mod journal;

use journal::{Entry, JournalLink};

/// Name of the state file inside an instance directory.
pub const STATE_FILE: &str = "state";
/// Mode of the instances directory and of each instance directory.
const DIR_MODE: u32 = 0o755;
/// Mode of the state file (it holds user data).
const STATE_MODE: u32 = 0o600;
/// A state file is a few KiB (user data included); anything far bigger is
/// not ours and is refused instead of being read into memory.
const STATE_LIMIT: u64 = 16 << 20;

/// What is persisted for one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct StateFile {
    pub config: InstanceConfig,
    /// 2016 profile: the instance was stopped (kept, reported as `exited`).
    pub stopped: bool,
}

/// The sealed text of the state file of `config` with `stopped`.
pub fn encode(config: &InstanceConfig, stopped: bool) -> Result<Vec<u8>, String> {
    let yaml = serde_yaml::to_string(&StateView { config, stopped })
        .map_err(|e| format!("cannot serialise state: {e}"))?;
    Ok(seal(&yaml).into_bytes())
}

/// A [`StateFile`] borrowed for writing: the same fields, in the same order.
#[derive(Serialize)]
struct StateView<'a> {
    config: &'a InstanceConfig,
    stopped: bool,
}

/// Why a state operation failed.
#[derive(Debug)]
pub enum StateError {
    /// The instance id is not a hyphenated UUID; no path was built from it.
    BadId(String),
    /// A file-system operation on `path` failed.
    Io { path: PathBuf, source: io::Error },
    /// `path` exists but is not what it should be (unparsable state, a
    /// symbolic link, not a directory, ...).
    Corrupt { path: PathBuf, detail: String },
    /// The instance directory already exists (`create_instance_dir`).
    Exists(PathBuf),
    /// `scan`: an instance directory with no state file: the remains of a
    /// START that was interrupted before its state was written.
    NoState { id: String, path: PathBuf },
}

impl StateError {
    fn io(path: &Path, source: io::Error) -> Self {
        StateError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn corrupt(path: &Path, detail: impl Into<String>) -> Self {
        StateError::Corrupt {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }

    /// True when the error is a missing file or directory (e.g. `load` of an
    /// instance that has no state yet).
    pub fn is_not_found(&self) -> bool {
        matches!(self, StateError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateError::BadId(id) => {
                // The id comes from a peer: show a bounded, escaped excerpt.
                let shown: String = id.chars().take(64).collect();
                let more = if id.chars().count() > 64 { "..." } else { "" };
                write!(
                    f,
                    "invalid instance id {shown:?}{more}: not a hyphenated UUID"
                )
            }
            StateError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            StateError::Corrupt { path, detail } => write!(f, "{}: {detail}", path.display()),
            StateError::Exists(path) => write!(f, "{}: already exists", path.display()),
            StateError::NoState { path, .. } => {
                write!(
                    f,
                    "{}: instance directory without a state file",
                    path.display()
                )
            }
        }
    }
}

impl std::error::Error for StateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StateError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The canonical form of `id`, or `BadId`; borrowed when `id` already is
/// canonical (an instance thread's own id always is), so that checking it
/// allocates nothing.
fn canonical(id: &str) -> Result<Cow<'_, str>, StateError> {
    if is_uuid_shape(id) {
        if id.bytes().any(|b| b.is_ascii_uppercase()) {
            return Ok(Cow::Owned(id.to_ascii_lowercase()));
        }
        return Ok(Cow::Borrowed(id));
    }
    Err(StateError::BadId(id.to_owned()))
}

/// Whether `id` is a strict hyphenated UUID, in any case.
fn is_uuid_shape(id: &str) -> bool {
    let bytes = id.as_bytes();
    bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, &b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// The canonical (lower-case) form of a strict hyphenated UUID
/// (`8-4-4-4-12` hex digits, 36 characters), or `None`. Braced, URN and
/// un-hyphenated forms are refused: only the canonical form is a path name.
pub fn valid_instance_id(id: &str) -> Option<String> {
    is_uuid_shape(id).then(|| id.to_ascii_lowercase())
}

/// The instances directory of one data directory; cheap to clone and share
/// between threads (each instance thread only touches its own directory).
/// A store made by [`journal::Journal::store`] writes and deletes states
/// through the node journal (group commit); one made by [`Store::new`]
/// writes each state file durably by itself (tools, tests).
#[derive(Debug, Clone)]
pub struct Store {
    instances: Arc<Path>,
    journal: Option<JournalLink>,
}

impl Store {
    /// The store of `data_dir`; its instances directory is `data_dir/instances`.
    pub fn new(data_dir: &Path) -> Self {
        Store {
            instances: Arc::from(data_dir.join("instances")),
            journal: None,
        }
    }

    pub fn instances_dir(&self) -> &Path {
        &self.instances
    }

    /// `instances/<canon>`, allocated once at its final size (a path that
    /// grows as it is joined leaves its smaller buffers freed on the
    /// calling thread, where glibc keeps them for the thread's life).
    fn dir_of(&self, canon: &str) -> PathBuf {
        let mut dir = PathBuf::with_capacity(self.instances.as_os_str().len() + 1 + canon.len());
        dir.push(&self.instances);
        dir.push(canon);
        dir
    }

    /// Creates the instances directory (and missing parents), mode 0755.
    pub fn ensure_dirs(&self) -> Result<(), StateError> {
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&self.instances)
            .map_err(|e| StateError::io(&self.instances, e))
    }

    /// `instances/<canonical id>`, after checking the id, and that the
    /// directory, if it exists, is a real directory (not a symbolic link).
    pub fn instance_dir(&self, id: &str) -> Result<PathBuf, StateError> {
        let dir = self.dir_of(&canonical(id)?);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_symlink() => Err(StateError::corrupt(
                &dir,
                "is a symbolic link; refusing to use it as an instance directory",
            )),
            Ok(m) if !m.is_dir() => Err(StateError::corrupt(&dir, "is not a directory")),
            Ok(_) => Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(dir),
            Err(e) => Err(StateError::io(&dir, e)),
        }
    }

    /// Creates the instance directory (the instances directory too if
    /// needed). The last component is created with a plain `mkdir`, so an
    /// existing one (directory, file or symbolic link) gives
    /// [`StateError::Exists`]: two STARTs of one id cannot share a directory.
    pub fn create_instance_dir(&self, id: &str) -> Result<PathBuf, StateError> {
        let canon = canonical(id)?;
        self.ensure_dirs()?;
        let dir = self.dir_of(&canon);
        match DirBuilder::new().mode(DIR_MODE).create(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(StateError::Exists(dir)),
            Err(e) => Err(StateError::io(&dir, e)),
        }
    }

    /// The instance directory of a new instance whose virtualizer keeps no
    /// files there ([`crate::virt::Virtualizer::keeps_files`]). With a
    /// journal it is only checked to be free (anything there, also a
    /// symbolic link, is [`StateError::Exists`]): the journal makes it with
    /// the state file, off the acknowledgement path. Without one it is made
    /// now, as [`Store::create_instance_dir`] does.
    pub fn claim_instance_dir(&self, id: &str) -> Result<PathBuf, StateError> {
        if self.journal.is_none() {
            return self.create_instance_dir(id);
        }
        let dir = self.dir_of(&canonical(id)?);
        match fs::symlink_metadata(&dir) {
            Ok(_) => Err(StateError::Exists(dir)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(dir),
            Err(e) => Err(StateError::io(&dir, e)),
        }
    }

    /// Writes the state of `id` atomically (see the module docs). The
    /// instance directory must exist, unless the store is journaled (the
    /// journal makes a missing one).
    pub fn save(&self, id: &str, state: &StateFile) -> Result<(), StateError> {
        self.save_config(id, &state.config, state.stopped)
    }

    /// [`Store::save`] of a [`StateFile`] made of `config` and `stopped`,
    /// without copying the configuration into one first.
    pub fn save_config(
        &self,
        id: &str,
        config: &InstanceConfig,
        stopped: bool,
    ) -> Result<(), StateError> {
        let canon = canonical(id)?;
        let text = encode(config, stopped)
            .map_err(|e| StateError::corrupt(&self.dir_of(&canon).join(STATE_FILE), e))?;
        self.save_encoded(&canon, text)
    }

    /// `instances/<id>/state`, after the checks of [`Store::instance_dir`].
    fn state_path(&self, id: &str) -> Result<PathBuf, StateError> {
        Ok(self.instance_dir(id)?.join(STATE_FILE))
    }

    /// Writes `text`, made by [`encode`], as the state of `id`: durable
    /// when this returns (in the journal, or in the file itself).
    ///
    /// The text is handed over, not copied: with a journal it is freed on
    /// the journal thread, and the caller (an instance thread) keeps no
    /// freed buffer of its size. The journal thread checks the directory.
    pub fn save_encoded(&self, id: &str, text: Vec<u8>) -> Result<(), StateError> {
        if let Some(j) = &self.journal {
            return j.write(&canonical(id)?, Entry::State(text));
        }
        let path = self.state_path(id)?;
        let first = fs::symlink_metadata(&path).is_err();
        write_atomic(&path, &text, STATE_MODE).map_err(|e| StateError::io(&path, e))?;
        if first {
            // The instance directory's own entry in instances/.
            sync_dir(&self.instances).map_err(|e| StateError::io(&self.instances, e))?;
        }
        Ok(())
    }

    /// Reads the state of `id`. A missing file is an `Io` error with
    /// [`StateError::is_not_found`]; an empty, unparsable, oversized or
    /// non-regular file, or one that names another instance, is `Corrupt`.
    pub fn load(&self, id: &str) -> Result<StateFile, StateError> {
        let dir = self.instance_dir(id)?;
        let path = dir.join(STATE_FILE);
        let text = read_state_file(&path)?;
        if text.trim().is_empty() {
            return Err(StateError::corrupt(&path, "state file is empty"));
        }
        let (yaml, sealed) = unseal(&text).map_err(|detail| StateError::corrupt(&path, detail))?;
        let state: StateFile = serde_yaml::from_str(yaml)
            .map_err(|e| StateError::corrupt(&path, format!("unparsable state: {e}")))?;
        // An unsealed file comes from a launcher before the seal: it cannot
        // show truncation, but it must at least name its instance.
        if !sealed && state.config.instance_uuid.is_empty() {
            return Err(StateError::corrupt(
                &path,
                "state names no instance: truncated, or not a state file",
            ));
        }
        // A state copied or moved from another instance's directory must not
        // be adopted under this id (an empty id is tolerated: the directory
        // name is authoritative).
        let stored = &state.config.instance_uuid;
        if !stored.is_empty()
            && valid_instance_id(stored).as_deref() != dir.file_name().and_then(|n| n.to_str())
        {
            return Err(StateError::corrupt(
                &path,
                format!("state belongs to instance {stored:?}, not to this directory"),
            ));
        }
        Ok(state)
    }

    /// Removes the state file of `id` and syncs its directory: once this
    /// returns, the instance is durably deleted (a directory left without a
    /// state is swept at the next start). A missing state is `Ok`.
    pub fn remove_state(&self, id: &str) -> Result<(), StateError> {
        let dir = self.instance_dir(id)?;
        if let Some(j) = &self.journal {
            // The deletion record; the journal thread removes the file.
            return j.write(&canonical(id)?, Entry::Deleted);
        }
        let path = dir.join(STATE_FILE);
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&dir).map_err(|e| StateError::io(&dir, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StateError::io(&path, e)),
        }
    }

    /// Removes the instance directory and everything in it. Symbolic links
    /// inside are removed, never followed; a missing directory is `Ok`. An
    /// instance directory that is itself a symbolic link, or that has a file
    /// system mounted inside (e.g. a volume), is refused.
    /// With a journal, a deletion record is made durable first, so a state
    /// the journal holds cannot come back.
    pub fn remove(&self, id: &str) -> Result<(), StateError> {
        let dir = self.instance_dir(id)?;
        if self.journal.is_some() {
            self.remove_state(id)?;
        }
        remove_tree(&dir)
    }

    /// [`Store::remove`] without the deletion record: only where the journal
    /// cannot hold a state of `id` (after [`Store::remove_state`], or a
    /// directory recovery found without a state).
    pub fn remove_dir(&self, id: &str) -> Result<(), StateError> {
        let dir = self.instance_dir(id)?;
        remove_tree(&dir)
    }

    /// Every entry of the instances directory, sorted by name: an instance
    /// directory with a loadable state gives `Ok((id, state))`; anything else
    /// (a name that is not a canonical UUID, a file, a symbolic link, a
    /// missing, empty or corrupt state) gives an `Err` describing it. A
    /// missing instances directory gives an empty list. Never fails as a
    /// whole: recovery goes on with what is usable.
    pub fn scan(&self) -> Vec<Result<(String, StateFile), StateError>> {
        let entries = match fs::read_dir(&self.instances) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => return vec![Err(StateError::io(&self.instances, e))],
        };
        let mut found: Vec<(OsString, Result<fs::FileType, io::Error>)> = Vec::new();
        let mut out = Vec::new();
        for entry in entries {
            match entry {
                Ok(entry) => found.push((entry.file_name(), entry.file_type())),
                Err(e) => out.push(Err(StateError::io(&self.instances, e))),
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, file_type) in found {
            let path = self.instances.join(&name);
            out.push(self.scan_entry(&path, &name, file_type));
        }
        out
    }

    fn scan_entry(
        &self,
        path: &Path,
        name: &OsString,
        file_type: io::Result<fs::FileType>,
    ) -> Result<(String, StateFile), StateError> {
        // DirEntry::file_type does not follow symbolic links.
        let file_type = file_type.map_err(|e| StateError::io(path, e))?;
        if file_type.is_symlink() {
            return Err(StateError::corrupt(
                path,
                "is a symbolic link, not an instance directory",
            ));
        }
        if !file_type.is_dir() {
            return Err(StateError::corrupt(path, "is not an instance directory"));
        }
        let id = name
            .to_str()
            .filter(|n| valid_instance_id(n).as_deref() == Some(*n))
            .ok_or_else(|| {
                StateError::corrupt(path, "directory name is not a canonical instance UUID")
            })?;
        match self.load(id) {
            Ok(state) => {
                remove_leftover_temps(path);
                Ok((id.to_owned(), state))
            }
            Err(e) if e.is_not_found() => Err(StateError::NoState {
                id: id.to_owned(),
                path: path.to_path_buf(),
            }),
            Err(e) => Err(e),
        }
    }

    /// Removes every entry of the instances directory (instance directories,
    /// and stray files or symbolic links, which are unlinked, not followed);
    /// keeps the instances directory itself, after removing the node
    /// journal beside it (which would bring states back). Returns how many
    /// directories were removed. Goes on after a failure and returns the
    /// first one.
    pub fn hard_reset(&self) -> Result<usize, StateError> {
        if let Some(data_dir) = self.instances.parent() {
            let journal = data_dir.join(journal::JOURNAL_FILE);
            match fs::remove_file(&journal) {
                Ok(()) => sync_dir(data_dir).map_err(|e| StateError::io(data_dir, e))?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StateError::io(&journal, e)),
            }
        }
        let entries = match fs::read_dir(&self.instances) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(StateError::io(&self.instances, e)),
        };
        let mut removed = 0;
        let mut first_error = None;
        for entry in entries {
            let result = entry
                .map_err(|e| StateError::io(&self.instances, e))
                .and_then(|entry| {
                    let path = entry.path();
                    let ft = entry.file_type().map_err(|e| StateError::io(&path, e))?;
                    if ft.is_dir() {
                        remove_tree(&path).map(|()| 1)
                    } else {
                        match fs::remove_file(&path) {
                            Ok(()) => Ok(0),
                            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
                            Err(e) => Err(StateError::io(&path, e)),
                        }
                    }
                });
            match result {
                Ok(n) => removed += n,
                Err(e) => {
                    log::warn!("hard reset: {e}");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(removed),
        }
    }
}

/// First line of a sealed state file.
const SEAL_HEADER: &str = "# ciao-launcher instance state, sealed\n";
/// Last line of a sealed state file: `# end: <bytes> bytes, fnv1a64 <hex>`,
/// over the YAML between the two lines.
const SEAL_END: &str = "# end: ";

/// The state file's text: the YAML between a header line and an end line
/// that carries its length and checksum, so that a truncated or damaged
/// file is told from a short one (YAML would read a prefix of a state as a
/// state with defaults). Both lines are YAML comments.
fn seal(yaml: &str) -> String {
    let mut text = String::with_capacity(SEAL_HEADER.len() + yaml.len() + 48);
    text.push_str(SEAL_HEADER);
    text.push_str(yaml);
    if !yaml.is_empty() && !yaml.ends_with('\n') {
        text.push('\n');
    }
    let body = &text[SEAL_HEADER.len()..];
    let end = format!(
        "{SEAL_END}{} bytes, fnv1a64 {:016x}\n",
        body.len(),
        fnv1a64(body.as_bytes())
    );
    text.push_str(&end);
    text
}

/// The YAML of a state file's text and whether it was sealed; an error
/// says why a sealed (or seemingly sealed) text is not whole.
fn unseal(text: &str) -> Result<(&str, bool), String> {
    let Some(rest) = text.strip_prefix(SEAL_HEADER) else {
        if SEAL_HEADER.starts_with(text) || text.starts_with(&SEAL_HEADER[..10]) {
            return Err("truncated state file (its header is cut)".into());
        }
        return Ok((text, false));
    };
    let damaged = |what: &str| format!("truncated or damaged state file ({what})");
    let Some(last) = rest.strip_suffix('\n') else {
        return Err(damaged("no end line"));
    };
    let end_at = last.rfind('\n').map_or(0, |i| i + 1);
    let (body, end) = rest.split_at(end_at);
    let figures = end
        .strip_prefix(SEAL_END)
        .and_then(|e| e.trim_end().split_once(" bytes, fnv1a64 "))
        .ok_or_else(|| damaged("no end line"))?;
    let len: usize = figures.0.parse().map_err(|_| damaged("bad end line"))?;
    let sum = u64::from_str_radix(figures.1, 16).map_err(|_| damaged("bad end line"))?;
    if len != body.len() {
        return Err(damaged(&format!("{} bytes of {len}", body.len())));
    }
    if sum != fnv1a64(body.as_bytes()) {
        return Err(damaged("checksum mismatch"));
    }
    Ok((body, true))
}

/// 64-bit FNV-1a: enough to tell a damaged file, and no dependency.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Removes the `.state.tmp-*` files a crash left in an instance directory
/// (recovery; nobody writes there then).
fn remove_leftover_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if name
            .to_string_lossy()
            .starts_with(&format!(".{STATE_FILE}.tmp-"))
        {
            match fs::remove_file(e.path()) {
                Ok(()) => log::info!("removed {}, left by a crash", e.path().display()),
                Err(err) => log::warn!("{}: {err}", e.path().display()),
            }
        }
    }
}

/// Reads a state file without following a symbolic link, without blocking
/// on a FIFO, and without reading more than [`STATE_LIMIT`].
fn read_state_file(path: &Path) -> Result<String, StateError> {
    let flags = nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits())
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32) {
                StateError::corrupt(path, "is a symbolic link; refusing to follow it")
            } else {
                StateError::io(path, e)
            }
        })?;
    let meta = file.metadata().map_err(|e| StateError::io(path, e))?;
    if !meta.is_file() {
        return Err(StateError::corrupt(path, "is not a regular file"));
    }
    if meta.len() > STATE_LIMIT {
        return Err(StateError::corrupt(
            path,
            format!("is too large ({} bytes)", meta.len()),
        ));
    }
    let mut buf = Vec::new();
    file.take(STATE_LIMIT)
        .read_to_end(&mut buf)
        .map_err(|e| StateError::io(path, e))?;
    String::from_utf8(buf).map_err(|_| StateError::corrupt(path, "is not UTF-8"))
}

/// Removes `dir` recursively, refusing when a file system is mounted at or
/// under it: `rm -rf` would otherwise wipe a volume's contents.
/// `fs::remove_dir_all` does not follow symbolic links (it unlinks them, and
/// it is safe against a directory being swapped for a link mid-walk).
fn remove_tree(dir: &Path) -> Result<(), StateError> {
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StateError::io(dir, e)),
        Ok(_) => {}
    }
    if let Some(mount) = mount_inside(dir) {
        return Err(StateError::Io {
            path: dir.to_path_buf(),
            source: io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!("{} is mounted inside; unmount it first", mount.display()),
            ),
        });
    }
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StateError::io(dir, e)),
    }
}

/// The first mount point at or below `dir`, per `/proc/self/mountinfo`;
/// `None` also when that cannot be read (nothing more can be checked then).
fn mount_inside(dir: &Path) -> Option<PathBuf> {
    let canon = fs::canonicalize(dir).ok()?;
    let text = fs::read("/proc/self/mountinfo").ok()?;
    mount_points(&text)
        .into_iter()
        .find(|m| m.starts_with(&canon))
}

/// Mount points (field 5) of a mountinfo text, with the kernel's octal
/// escapes (`\040` for a space, ...) decoded.
fn mount_points(mountinfo: &[u8]) -> Vec<PathBuf> {
    mountinfo
        .split(|&b| b == b'\n')
        .filter_map(|line| line.split(|&b| b == b' ').nth(4))
        .filter(|field| !field.is_empty())
        .map(|field| PathBuf::from(OsString::from_vec(unescape_octal(field))))
        .collect()
}

fn unescape_octal(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\'
            && let Some(&[a, b, c]) = field.get(i + 1..i + 4)
            && [a, b, c].iter().all(|d| (b'0'..=b'7').contains(d))
        {
            let v = u32::from(a - b'0') * 64 + u32::from(b - b'0') * 8 + u32::from(c - b'0');
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

/// Replaces `path` with `data` atomically: writes `.<name>.tmp-<random>` in
/// the same directory (so the rename cannot cross file systems) with `mode`,
/// fsyncs it, renames it over `path`, then fsyncs the directory so the rename
/// itself survives a crash. On failure the temporary file is removed and
/// `path` is untouched.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    replace_file(path, data, mode, true)
}

/// [`write_atomic`], or with `durable` false the same without its fsyncs:
/// readers still see the old or the new whole file, but a power cut may
/// lose it (the journal's copy covers that, see [`journal`]).
fn replace_file(path: &Path, data: &[u8], mode: u32, durable: bool) -> io::Result<()> {
    let (dir, tmp) = temp_path(path)?;

    // create_new (O_EXCL) never follows or reuses an existing file.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    let written = (|| {
        // Exact mode whatever the umask.
        file.set_permissions(Permissions::from_mode(mode))?;
        file.write_all(data)?;
        if durable {
            file.sync_all()?;
        }
        drop(file);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if durable { sync_dir(&dir) } else { Ok(()) }
}

/// The directory of `path` and a fresh temporary name beside it.
fn temp_path(path: &Path) -> io::Result<(PathBuf, PathBuf)> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp_name = OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
    let tmp = dir.join(tmp_name);
    Ok((dir, tmp))
}

/// fsync of a directory; file systems that cannot do it (EINVAL) are not an
/// error, there is nothing more to be done there.
fn sync_dir(dir: &Path) -> io::Result<()> {
    match File::open(dir)?.sync_all() {
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => Ok(()),
        other => other,
    }
}

#[cfg(test)]
// In tests a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::payloads::config::{Firmware, Networking, VmType, Volume};
    use std::os::unix::fs::symlink;

    const ID1: &str = "d7d86208-b46c-4465-9018-fe14087d415f";

    /// Many concurrent saves all land intact.
    #[test]
    fn concurrent_saves() {
        let dir = std::env::temp_dir().join(format!("ciao-saves-{}", uuid::Uuid::new_v4()));
        let store = Store::new(&dir);
        store.ensure_dirs().unwrap();
        let ids: Vec<String> = (0..200)
            .map(|i| format!("{i:08x}-0000-4000-8000-000000000000"))
            .collect();
        std::thread::scope(|s| {
            for id in &ids {
                let store = store.clone();
                s.spawn(move || {
                    store.create_instance_dir(id).unwrap();
                    let mut st = StateFile::default();
                    st.config.instance_uuid = id.clone();
                    store.save(id, &st).unwrap();
                });
            }
        });
        for id in &ids {
            assert_eq!(store.load(id).unwrap().config.instance_uuid, *id);
        }
        fs::remove_dir_all(&dir).unwrap();
    }
    const ID2: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
    const ID3: &str = "ffffffff-0000-4000-8000-000000000003";

    /// A temporary data directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("ciao-state-{tag}-{}", uuid::Uuid::new_v4()));
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn full_config(id: &str) -> InstanceConfig {
        InstanceConfig {
            instance_uuid: id.to_owned(),
            tenant_uuid: "67d86208-b46c-4465-9018-fe14087d415f".into(),
            image_uuid: "b286cd45-7d0c-4525-a140-4db6c95e41fa".into(),
            docker_image: "ubuntu:latest".into(),
            vm_type: VmType::Docker,
            firmware: Firmware::Legacy,
            vcpus: 4,
            mem_mb: 370,
            disk_mb: 8000,
            network_node: true,
            privileged: true,
            networking: Networking {
                vnic_mac: "02:00:e6:f5:af:f9".into(),
                vnic_uuid: "67d86208-0000-4465-9018-fe14087d415f".into(),
                concentrator_uuid: "67d86208-1111-4465-9018-fe14087d415f".into(),
                concentrator_ip: "192.168.42.21".into(),
                subnet: "192.168.8.0/21".into(),
                private_ip: "192.168.8.2".into(),
            },
            ssh_port: 35050,
            ssh_forward: Some("127.0.0.1:40022".parse().unwrap()),
            volumes: vec![
                Volume {
                    uuid: "69e84267-ed01-4738-b15f-b47de06b62e7".into(),
                    bootable: true,
                },
                Volume {
                    uuid: "11e84267-ed01-4738-b15f-b47de06b62e7".into(),
                    bootable: false,
                },
            ],
            restart: true,
            user_data: "#cloud-config\nusers:\n  - name: demo\n    passwd: \"x: y # z\"\n\
                        ---\n...\nunicode: ✓ \t tab\n"
                .into(),
            meta_data: "{\"uuid\":\"x\",\"hostname\":\"h\"}".into(),
        }
    }

    fn hostile_ids() -> Vec<String> {
        vec![
            "../x".into(),
            "/etc".into(),
            "a/b".into(),
            "".into(),
            "..".into(),
            ".".into(),
            format!("{ID1}0"),                              // 37 chars
            ID1[..35].to_owned(),                           // 35 chars
            "00000000-0000-0000-0000-00000000000g".into(),  // non-hex
            "00000000-0000-0000-0000-00000000000\0".into(), // NUL
            "../../../../../../../../../../../etc".into(),  // 36 chars
            "00000000-0000-0000-0000/00000000000".into(),
            "000000000-000-0000-0000-000000000000".into(), // dashes misplaced
            "d7d86208b46c44659018fe14087d415f".into(),     // simple form
            format!("{{{ID1}}}"),                          // braced
            format!("urn:uuid:{ID1}"),
            format!(" {ID1}"),
            "d7d86208-b46c-4465-9018-fe14087d415\u{e9}".into(), // non-ASCII, 37 bytes
            "d7d86208-b46c-4465-9018-fe14087d41\u{e9}".into(),  // non-ASCII, 36 bytes
        ]
    }

    #[test]
    fn id_validation() {
        assert_eq!(valid_instance_id(ID1).as_deref(), Some(ID1));
        assert_eq!(
            valid_instance_id("D7D86208-B46C-4465-9018-FE14087D415F").as_deref(),
            Some(ID1)
        );
        for id in hostile_ids() {
            assert_eq!(valid_instance_id(&id), None, "{id:?}");
        }
    }

    #[test]
    fn round_trip_full_config() {
        let tmp = TempDir::new("rt");
        let store = Store::new(&tmp.0);
        let dir = store.create_instance_dir(ID1).unwrap();
        assert_eq!(dir, tmp.0.join("instances").join(ID1));
        let state = StateFile {
            config: full_config(ID1),
            stopped: true,
        };
        store.save(ID1, &state).unwrap();
        assert_eq!(store.load(ID1).unwrap(), state);

        let path = dir.join(STATE_FILE);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(dmode & !0o022, 0o755 & !0o022); // up to the umask

        // Overwrite with something shorter: no stale trailing bytes.
        let small = StateFile {
            config: InstanceConfig {
                instance_uuid: ID1.into(),
                ..Default::default()
            },
            stopped: false,
        };
        store.save(ID1, &small).unwrap();
        assert_eq!(store.load(ID1).unwrap(), small);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from(STATE_FILE)]);
    }

    #[test]
    fn defaults_fill_missing_fields() {
        let tmp = TempDir::new("defaults");
        let store = Store::new(&tmp.0);
        let dir = store.create_instance_dir(ID1).unwrap();
        fs::write(
            dir.join(STATE_FILE),
            format!("config:\n  instance_uuid: {ID1}\n  vcpus: 2\nfuture_field: 1\n"),
        )
        .unwrap();
        // An unsealed file (from a launcher before the seal) is read.
        let s = store.load(ID1).unwrap();
        assert_eq!(s.config.vcpus, 2);
        assert!(!s.stopped);
    }

    #[test]
    fn upper_case_id_is_canonicalised() {
        let tmp = TempDir::new("upper");
        let store = Store::new(&tmp.0);
        let upper = ID1.to_ascii_uppercase();
        let dir = store.create_instance_dir(&upper).unwrap();
        assert_eq!(dir, store.instances_dir().join(ID1));
        assert_eq!(store.instance_dir(&upper).unwrap(), dir);
        let state = StateFile {
            config: full_config(ID1),
            stopped: false,
        };
        store.save(&upper, &state).unwrap();
        assert_eq!(store.load(ID1).unwrap(), state);
        assert!(matches!(
            store.create_instance_dir(ID1),
            Err(StateError::Exists(_))
        ));
        store.remove(&upper).unwrap();
        assert!(!dir.exists());
    }

    #[test]
    fn hostile_ids_refused_everywhere() {
        let tmp = TempDir::new("hostile");
        let store = Store::new(&tmp.0);
        store.ensure_dirs().unwrap();
        let state = StateFile {
            config: full_config(ID1),
            stopped: false,
        };
        for id in hostile_ids() {
            let bad = |r: Result<(), StateError>| {
                assert!(
                    matches!(r, Err(StateError::BadId(ref b)) if *b == id),
                    "{id:?}: {r:?}"
                )
            };
            bad(store.instance_dir(&id).map(drop));
            bad(store.create_instance_dir(&id).map(drop));
            bad(store.save(&id, &state));
            bad(store.load(&id).map(drop));
            bad(store.remove(&id));
        }
        // Nothing was created anywhere.
        assert_eq!(fs::read_dir(store.instances_dir()).unwrap().count(), 0);
        assert_eq!(fs::read_dir(&tmp.0).unwrap().count(), 1);
        // The message is bounded and escaped.
        let msg = StateError::BadId(format!("{}\0\n", "x".repeat(500))).to_string();
        assert!(
            msg.len() < 200 && !msg.contains('\n') && !msg.contains('\0'),
            "{msg}"
        );
    }

    #[test]
    fn create_twice_is_exists() {
        let tmp = TempDir::new("twice");
        let store = Store::new(&tmp.0);
        // The instances directory is created on demand.
        store.create_instance_dir(ID1).unwrap();
        match store.create_instance_dir(ID1) {
            Err(StateError::Exists(p)) => assert_eq!(p, store.instances_dir().join(ID1)),
            other => panic!("{other:?}"),
        }
        // A symbolic link in the way is "exists" too, and is not followed.
        let outside = tmp.0.join("outside");
        fs::create_dir(&outside).unwrap();
        symlink(&outside, store.instances_dir().join(ID2)).unwrap();
        assert!(matches!(
            store.create_instance_dir(ID2),
            Err(StateError::Exists(_))
        ));
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn symlinked_instance_dir_is_refused() {
        let tmp = TempDir::new("link");
        let store = Store::new(&tmp.0);
        store.ensure_dirs().unwrap();
        let outside = tmp.0.join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join(STATE_FILE), "config:\n  vcpus: 1\n").unwrap();
        fs::write(outside.join("precious"), "keep").unwrap();
        symlink(&outside, store.instances_dir().join(ID1)).unwrap();

        let state = StateFile::default();
        assert!(matches!(
            store.instance_dir(ID1),
            Err(StateError::Corrupt { .. })
        ));
        assert!(matches!(
            store.save(ID1, &state),
            Err(StateError::Corrupt { .. })
        ));
        assert!(matches!(store.load(ID1), Err(StateError::Corrupt { .. })));
        assert!(matches!(store.remove(ID1), Err(StateError::Corrupt { .. })));
        assert_eq!(
            fs::read_to_string(outside.join(STATE_FILE)).unwrap(),
            "config:\n  vcpus: 1\n"
        );
        assert_eq!(
            fs::read_to_string(outside.join("precious")).unwrap(),
            "keep"
        );

        // A regular file in place of the directory.
        fs::write(store.instances_dir().join(ID2), "x").unwrap();
        assert!(matches!(
            store.instance_dir(ID2),
            Err(StateError::Corrupt { .. })
        ));
    }

    #[test]
    fn state_that_is_a_symlink_or_fifo_is_refused() {
        let tmp = TempDir::new("special");
        let store = Store::new(&tmp.0);
        let d1 = store.create_instance_dir(ID1).unwrap();
        let target = tmp.0.join("target");
        fs::write(&target, "config:\n  vcpus: 1\n").unwrap();
        symlink(&target, d1.join(STATE_FILE)).unwrap();
        let e = store.load(ID1).unwrap_err();
        assert!(matches!(e, StateError::Corrupt { .. }), "{e}");

        // save replaces the link itself (rename), never writes through it.
        store.save(ID1, &StateFile::default()).unwrap();
        assert_eq!(
            fs::read_to_string(&target).unwrap(),
            "config:\n  vcpus: 1\n"
        );
        assert!(
            !fs::symlink_metadata(d1.join(STATE_FILE))
                .unwrap()
                .file_type()
                .is_symlink()
        );

        // A FIFO must not block the loader.
        let d2 = store.create_instance_dir(ID2).unwrap();
        nix::unistd::mkfifo(
            &d2.join(STATE_FILE),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let e = store.load(ID2).unwrap_err();
        assert!(matches!(e, StateError::Corrupt { .. }), "{e}");

        // A directory named state.
        let d3 = store.create_instance_dir(ID3).unwrap();
        fs::create_dir(d3.join(STATE_FILE)).unwrap();
        assert!(store.load(ID3).is_err());
    }

    #[test]
    fn load_errors() {
        let tmp = TempDir::new("loaderr");
        let store = Store::new(&tmp.0);
        // Missing directory / missing file: not-found Io errors.
        assert!(store.load(ID1).unwrap_err().is_not_found());
        let dir = store.create_instance_dir(ID1).unwrap();
        let e = store.load(ID1).unwrap_err();
        assert!(e.is_not_found(), "{e}");
        assert!(
            e.to_string()
                .contains(&*dir.join(STATE_FILE).to_string_lossy()),
            "{e}"
        );

        for (text, what) in [
            ("", "empty"),
            ("  \n\n", "blank"),
            ("config: [1, 2\n", "bad YAML"),
            ("42\n", "not a mapping"),
            ("config:\n  vcpus: -3\n", "wrong type"),
            ("\u{0}\u{1}\u{2}", "binary"),
        ] {
            fs::write(dir.join(STATE_FILE), text).unwrap();
            let e = store.load(ID1).unwrap_err();
            assert!(matches!(e, StateError::Corrupt { .. }), "{what}: {e:?}");
            assert!(
                e.to_string().contains(&*dir.to_string_lossy()),
                "{what}: {e}"
            );
        }
        fs::write(dir.join(STATE_FILE), [0xff, 0xfe, b'\n']).unwrap();
        assert!(matches!(store.load(ID1), Err(StateError::Corrupt { .. })));

        // A state naming another instance is not adopted.
        fs::write(
            dir.join(STATE_FILE),
            format!("config:\n  instance_uuid: {ID2}\n"),
        )
        .unwrap();
        let e = store.load(ID1).unwrap_err();
        assert!(
            matches!(e, StateError::Corrupt { .. }) && e.to_string().contains(ID2),
            "{e}"
        );
        // ...but the upper-case spelling of its own id is.
        fs::write(
            dir.join(STATE_FILE),
            format!("config:\n  instance_uuid: {}\n", ID1.to_ascii_uppercase()),
        )
        .unwrap();
        assert!(store.load(ID1).is_ok());

        // save into a missing instance directory fails cleanly.
        let e = store.save(ID2, &StateFile::default()).unwrap_err();
        assert!(e.is_not_found(), "{e}");
        assert!(!store.instances_dir().join(ID2).exists());
    }

    /// Defect: a truncated state file was read as a state with defaults (a
    /// stopped instance came back running, its user data gone). Every cut
    /// of a sealed file, and every flipped byte, is now refused.
    #[test]
    fn truncated_or_damaged_state_is_refused() {
        let tmp = TempDir::new("truncate");
        let store = Store::new(&tmp.0);
        store.create_instance_dir(ID1).unwrap();
        let state = StateFile {
            config: full_config(ID1),
            stopped: true,
        };
        store.save(ID1, &state).unwrap();
        let path = store.instance_dir(ID1).unwrap().join(STATE_FILE);
        let whole = fs::read(&path).unwrap();
        assert!(whole.starts_with(SEAL_HEADER.as_bytes()));
        assert_eq!(store.load(ID1).unwrap(), state);
        for cut in 1..whole.len() {
            fs::write(&path, &whole[..cut]).unwrap();
            let e = store.load(ID1).expect_err(&format!("cut at {cut}"));
            assert!(matches!(e, StateError::Corrupt { .. }), "cut at {cut}: {e}");
        }
        for at in [SEAL_HEADER.len() + 3, whole.len() / 2, whole.len() - 5] {
            let mut damaged = whole.clone();
            damaged[at] ^= 0x01;
            fs::write(&path, &damaged).unwrap();
            assert!(
                matches!(store.load(ID1), Err(StateError::Corrupt { .. })),
                "flip at {at}"
            );
        }
        // An unsealed state that names no instance is refused too.
        fs::write(&path, "config:\n  vcpus: 2\n").unwrap();
        assert!(matches!(store.load(ID1), Err(StateError::Corrupt { .. })));
    }

    #[test]
    fn leftover_tmp_does_not_matter() {
        let tmp = TempDir::new("crash");
        let store = Store::new(&tmp.0);
        let dir = store.create_instance_dir(ID1).unwrap();
        let state = StateFile {
            config: full_config(ID1),
            stopped: false,
        };
        store.save(ID1, &state).unwrap();
        // What a crash between write and rename leaves behind.
        fs::write(dir.join(".state.tmp-x"), b"\0garbage: [\xff").unwrap();
        fs::write(dir.join(".state.tmp-0123456789abcdef"), "").unwrap();
        assert_eq!(store.load(ID1).unwrap(), state);
        let scanned = store.scan();
        assert_eq!(scanned.len(), 1);
        assert_eq!(
            scanned[0].as_ref().unwrap(),
            &(ID1.to_owned(), state.clone())
        );
        // A later save still works and the old leftovers stay harmless.
        let state2 = StateFile {
            stopped: true,
            ..state
        };
        store.save(ID1, &state2).unwrap();
        assert_eq!(store.load(ID1).unwrap(), state2);
    }

    #[test]
    fn scan_mixed_entries() {
        let tmp = TempDir::new("scan");
        let store = Store::new(&tmp.0);
        assert!(store.scan().is_empty()); // no instances directory yet

        let good1 = StateFile {
            config: full_config(ID1),
            stopped: false,
        };
        let good2 = StateFile {
            config: full_config(ID2),
            stopped: true,
        };
        store.create_instance_dir(ID1).unwrap();
        store.save(ID1, &good1).unwrap();
        store.create_instance_dir(ID2).unwrap();
        store.save(ID2, &good2).unwrap();

        let inst = store.instances_dir().to_path_buf();
        let mk = |id: &str, state: Option<&[u8]>| {
            fs::create_dir(inst.join(id)).unwrap();
            if let Some(s) = state {
                fs::write(inst.join(id).join(STATE_FILE), s).unwrap();
            }
        };
        mk(
            "10000000-0000-4000-8000-000000000001",
            Some(b"config: [unterminated\n"),
        ); // corrupt
        mk("10000000-0000-4000-8000-000000000002", Some(b"")); // empty
        mk("10000000-0000-4000-8000-000000000003", None); // missing state
        mk("not-a-uuid", Some(b"config:\n  vcpus: 1\n")); // bad name
        mk(
            "10000000-0000-4000-8000-00000000000A",
            Some(b"config:\n  vcpus: 1\n"),
        ); // not canonical
        fs::write(inst.join("10000000-0000-4000-8000-000000000004"), "x").unwrap(); // regular file
        let other = tmp.0.join("elsewhere");
        fs::create_dir(&other).unwrap();
        fs::write(other.join(STATE_FILE), "config:\n  vcpus: 1\n").unwrap();
        symlink(&other, inst.join("10000000-0000-4000-8000-000000000005")).unwrap(); // symlink
        symlink(
            tmp.0.join("dangling"),
            inst.join("10000000-0000-4000-8000-000000000006"),
        )
        .unwrap();
        fs::write(inst.join(".state.tmp-abc"), "junk").unwrap();

        let results = store.scan();
        assert_eq!(results.len(), 11);
        let oks: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        // Sorted by name: ID2 ("0a1b...") before ID1 ("d7d8...").
        assert_eq!(
            oks,
            vec![&(ID2.to_owned(), good2), &(ID1.to_owned(), good1)]
        );
        for e in results.iter().filter_map(|r| r.as_ref().err()) {
            let msg = e.to_string();
            assert!(msg.contains(&*inst.to_string_lossy()), "{msg}");
        }
        let no_state = results
            .iter()
            .filter(|r| matches!(r, Err(StateError::NoState { .. })))
            .count();
        assert_eq!(no_state, 1); // the missing state
    }

    #[test]
    fn remove_does_not_follow_symlinks() {
        let tmp = TempDir::new("rm");
        let store = Store::new(&tmp.0);
        let outside = tmp.0.join("outside");
        fs::create_dir_all(outside.join("sub")).unwrap();
        fs::write(outside.join("precious"), "keep").unwrap();
        fs::write(outside.join("sub/also"), "keep").unwrap();

        let dir = store.create_instance_dir(ID1).unwrap();
        store.save(ID1, &StateFile::default()).unwrap();
        fs::create_dir_all(dir.join("volumes/v1")).unwrap();
        symlink(&outside, dir.join("link-to-outside")).unwrap();
        symlink(&outside, dir.join("volumes/v1/deeper-link")).unwrap();
        symlink(outside.join("precious"), dir.join("file-link")).unwrap();

        store.remove(ID1).unwrap();
        assert!(!dir.exists());
        assert_eq!(
            fs::read_to_string(outside.join("precious")).unwrap(),
            "keep"
        );
        assert_eq!(
            fs::read_to_string(outside.join("sub/also")).unwrap(),
            "keep"
        );
        // Removing again, or something never created, is fine.
        store.remove(ID1).unwrap();
        store.remove(ID2).unwrap();
    }

    #[test]
    fn hard_reset_removes_everything() {
        let tmp = TempDir::new("reset");
        let store = Store::new(&tmp.0);
        assert_eq!(store.hard_reset().unwrap(), 0); // no instances directory
        for id in [ID1, ID2, ID3] {
            store.create_instance_dir(id).unwrap();
            store.save(id, &StateFile::default()).unwrap();
        }
        let inst = store.instances_dir().to_path_buf();
        fs::create_dir(inst.join("junk-dir")).unwrap();
        fs::write(inst.join("stray-file"), "x").unwrap();
        let outside = tmp.0.join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("precious"), "keep").unwrap();
        symlink(&outside, inst.join(ID1.replace('d', "e"))).unwrap();

        assert_eq!(store.hard_reset().unwrap(), 4);
        assert_eq!(fs::read_dir(&inst).unwrap().count(), 0);
        assert_eq!(
            fs::read_to_string(outside.join("precious")).unwrap(),
            "keep"
        );
        assert_eq!(store.hard_reset().unwrap(), 0);
    }

    #[test]
    fn write_atomic_helper() {
        let tmp = TempDir::new("atomic");
        let p = tmp.0.join("file");
        write_atomic(&p, b"one", 0o640).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"one");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o640
        );
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read_dir(&tmp.0).unwrap().count(), 1);

        // Missing directory: an error, nothing created.
        let missing = tmp.0.join("nope/file");
        assert_eq!(
            write_atomic(&missing, b"x", 0o600).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        // Target is a directory: rename fails, the temporary file is cleaned up.
        fs::create_dir(tmp.0.join("adir")).unwrap();
        fs::write(tmp.0.join("adir/inner"), "x").unwrap();
        assert!(write_atomic(&tmp.0.join("adir"), b"x", 0o600).is_err());
        assert_eq!(fs::read_dir(&tmp.0).unwrap().count(), 2);
        assert!(write_atomic(Path::new("/"), b"x", 0o600).is_err());
    }

    #[test]
    fn mountinfo_parsing() {
        let text = b"22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
            40 22 0:35 / /var/lib/ciao/instances/x/volumes/my\\040vol rw - ext4 /dev/rbd0 rw\n\
            41 22 0:36 / /tmp/a\\134b rw - tmpfs tmpfs rw\n\
            garbage\n\n";
        assert_eq!(
            mount_points(text),
            vec![
                PathBuf::from("/"),
                PathBuf::from("/var/lib/ciao/instances/x/volumes/my vol"),
                PathBuf::from("/tmp/a\\b"),
            ]
        );
        assert_eq!(unescape_octal(b"\\04"), b"\\04");
        assert_eq!(unescape_octal(b"\\777x"), b"\\777x");
        assert_eq!(unescape_octal(b"a\\011b"), b"a\tb");
        // A temporary directory has no mount inside it.
        let tmp = TempDir::new("mnt");
        assert_eq!(mount_inside(&tmp.0), None);
        // "/" has at least itself.
        assert!(mount_inside(Path::new("/")).is_some());
    }

    #[test]
    fn error_display_and_source() {
        let e = StateError::io(Path::new("/a/b"), io::Error::from(io::ErrorKind::NotFound));
        assert!(e.to_string().starts_with("/a/b: "));
        assert!(std::error::Error::source(&e).is_some());
        let e = StateError::corrupt(Path::new("/a/state"), "bad");
        assert_eq!(e.to_string(), "/a/state: bad");
        assert_eq!(
            StateError::Exists(PathBuf::from("/x")).to_string(),
            "/x: already exists"
        );
    }
}
