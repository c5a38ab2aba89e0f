//! The node journal: group commit of instance states (docs/architecture.md,
//! "On-disk layout").
//!
//! # Why a journal
//! A START is acknowledged once its state survives a power cut. Made durable
//! one file at a time, that is three fsyncs per instance (the state file,
//! its directory, the instances directory) and half of what a burst of
//! STARTs costs. The journal makes many instances' states durable with one
//! write and ONE fdatasync of one append-only file, `<data-dir>/journal`
//! (0600), written by one thread, `state-journal`. The per-instance state
//! files stay the recovery format that recovery and tools read: they are
//! written by this thread once its requests pause (without fsyncs; at a
//! stop, the ones not written yet are left to the next start's replay),
//! and made durable later,
//! off the acknowledgement path (compaction), after which the journal is
//! truncated.
//!
//! # The `state-journal` thread
//! Inputs: [`JournalReq`]s from every thread that holds the journaled
//! [`Store`] (a state to write, a deletion, "compact now"), its stop channel
//! (closed by [`JournalThread::stop`]) and, while some instance's file is
//! not yet known durable, the quiet timer. Outputs: the journal, the state
//! files, one reply per request.
//!
//! A write, in steps:
//! 1. Block for the first request, then take every request already queued
//!    (at most [`BATCH_RECORDS`]).
//! 2. Check each (a canonical id, a state of sane size) and frame it as a
//!    record: magic, payload length, FNV-1a of the payload; the payload is
//!    the kind (state or deleted), a sequence number, the instance id and
//!    the sealed state text.
//! 3. Append all records with one write, then ONE fdatasync.
//! 4. Now each state is durable: queue its instance's file to be written
//!    (or removed, for a deletion), and answer its writer.
//!
//! The files, in steps:
//! 1. Once no request came for the settle period (or the queue passed its
//!    bound), the queued files are written one at a time (temporary file
//!    and rename, no fsync; the instance directory made if missing) or
//!    removed, from the state text at its record's place in the journal.
//!    A request that arrives meanwhile is served first.
//! 2. A stop leaves the ones still queued to the next start's replay
//!    (their records are durable), unless asked to write them
//!    ([`JournalThread::stop_writing_files`]).
//!
//! Compaction, in steps:
//! 1. It begins once no request came for the quiet period, once the journal
//!    is larger than `max_bytes`, or when asked ([`JournalThread::compact`]).
//! 2. One pending instance at a time: its state file and its directory are
//!    fsynced (a deleted one's directory, if still there). Requests that
//!    arrive meanwhile are served first; a write makes its instance pending
//!    again.
//! 3. When none is pending, the instances directory is fsynced (new and
//!    removed directories) and the journal truncated (fdatasync).
//!
//! # Why it stays durable
//! - An answer comes after the fdatasync that holds its record.
//! - A state file is written only after its record is durable, and every
//!   write goes through this one thread, in journal order: a file is never
//!   newer than the journal, and a file a power cut damaged (empty, old,
//!   missing, its directory gone) always has its record in the journal.
//! - The journal is truncated only when every file written since the last
//!   truncation has been fsynced after that write.
//!
//! # Replay ([`Journal::open`], before recovery scans the files)
//! 1. Read the records up to the first one that is cut short or fails its
//!    checksum: that is a torn tail of a batch whose fdatasync never
//!    returned, so none of it was acknowledged; it is cut off (so that new
//!    records follow whole ones) and ignored.
//! 2. Per instance the last record wins (journal order is write order): a
//!    state is written into its file where the file differs (its directory
//!    made again if a power cut lost it); a deletion removes the state file,
//!    so a DELETE never comes back.
//! 3. The journal is kept and every replayed instance is pending: the thread
//!    compacts them later, so a restart costs no fsync per instance.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TryRecvError, select};
use log::{info, warn};

use super::{
    DIR_MODE, STATE_FILE, STATE_LIMIT, STATE_MODE, StateError, Store, fnv1a64, is_uuid_shape,
    replace_file, sync_dir, valid_instance_id,
};

/// Name of the journal in the data directory.
pub const JOURNAL_FILE: &str = "journal";
const JOURNAL_MODE: u32 = 0o600;
/// First bytes of every record.
const MAGIC: [u8; 4] = *b"CLJ1";
/// Magic, payload length (u32 LE), FNV-1a of the payload (u64 LE).
const HEADER: usize = 16;
/// Kind, sequence number (u64 LE), instance id.
const PAYLOAD_HEAD: usize = 1 + 8 + ID_LEN;
const ID_LEN: usize = 36;
const KIND_STATE: u8 = 1;
const KIND_DELETED: u8 = 2;
/// Most requests in one batch (one write, one fdatasync).
pub const BATCH_RECORDS: usize = 1024;
/// State files are written once the journal had no request for this long.
pub const SETTLE: Duration = Duration::from_millis(20);
/// Compaction begins after this long without a request.
pub const QUIET: Duration = Duration::from_secs(1);
/// State files still to be written beyond which they are written whatever
/// the requests.
pub const MAX_UNWRITTEN: usize = 4096;
/// Compaction begins at once when the journal is larger than this.
pub const MAX_BYTES: u64 = 64 << 20;
/// The batch buffer is given back when a batch made it larger than this.
const KEEP_BUFFER: usize = 1 << 20;

/// What a record says of an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// Its sealed state text (as [`super::encode`] makes it).
    State(Vec<u8>),
    /// It was deleted: its state file goes, and stays gone.
    Deleted,
}

/// A request to the journal thread.
#[derive(Debug)]
pub enum JournalReq {
    /// Make `entry` durable for instance `id` (canonical), then apply it to
    /// the state file.
    Write {
        id: Key,
        entry: Entry,
        reply: Sender<Result<(), StateError>>,
    },
    /// Compact everything now; answers how many instances were compacted.
    Compact {
        reply: Sender<Result<usize, StateError>>,
    },
}

/// The writers' side of the journal, held by a journaled [`Store`].
#[derive(Debug, Clone)]
pub(crate) struct JournalLink {
    tx: Sender<JournalReq>,
    path: Arc<Path>,
}

impl JournalLink {
    /// Queues `entry` for `id`; the answer comes on the receiver.
    fn submit(&self, id: Key, entry: Entry) -> Receiver<Result<(), StateError>> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        // A stopped journal drops the request with its reply sender: the
        // receiver then says so.
        let _ = self.tx.send(JournalReq::Write { id, entry, reply });
        rx
    }

    /// Makes `entry` durable for `id` (canonical) and applies it to its
    /// state file.
    pub(crate) fn write(&self, id: &str, entry: Entry) -> Result<(), StateError> {
        let key = Key::of(id).ok_or_else(|| StateError::BadId(id.to_owned()))?;
        self.submit(key, entry)
            .recv()
            .unwrap_or_else(|_| Err(self.stopped()))
    }

    fn stopped(&self) -> StateError {
        StateError::io(
            &self.path,
            io::Error::new(io::ErrorKind::BrokenPipe, "the state journal has stopped"),
        )
    }
}

/// When state files are written and compacted (module docs). `None`: not
/// after a quiet period, only past the bounds or when asked
/// (deterministic tests).
#[derive(Debug, Clone, Copy)]
pub struct JournalSettings {
    /// State files are written after this long without a request.
    pub settle: Option<Duration>,
    /// Compaction begins after this long without a request.
    pub quiet: Option<Duration>,
    /// State files are written whatever the requests past this many.
    pub max_unwritten: usize,
    /// Both are done whatever the requests past this journal size.
    pub max_bytes: u64,
}

impl Default for JournalSettings {
    fn default() -> Self {
        JournalSettings {
            settle: Some(SETTLE),
            quiet: Some(QUIET),
            max_unwritten: MAX_UNWRITTEN,
            max_bytes: MAX_BYTES,
        }
    }
}

/// What [`Journal::open`] found in the journal.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// Whole records read.
    pub records: usize,
    /// State files written again (they differed from the journal's).
    pub restored: usize,
    /// State files removed by a deletion record.
    pub deleted: usize,
    /// Bytes of a torn tail cut off (0: none).
    pub torn: u64,
}

/// An opened, replayed journal whose thread is not running yet.
#[derive(Debug)]
pub struct Journal {
    writer: Writer,
    link: JournalLink,
    requests: Receiver<JournalReq>,
}

impl Journal {
    /// Opens `<data_dir>/journal` (creating it), replays it into the state
    /// files (module docs, "Replay") and readies its thread.
    pub fn open(
        data_dir: &Path,
        settings: JournalSettings,
    ) -> Result<(Journal, Replayed), StateError> {
        let plain = Store::new(data_dir);
        plain.ensure_dirs()?;
        let path = data_dir.join(JOURNAL_FILE);
        let existed = fs::symlink_metadata(&path).is_ok();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(JOURNAL_MODE)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&path)
            .map_err(|e| StateError::io(&path, e))?;
        let meta = file.metadata().map_err(|e| StateError::io(&path, e))?;
        if !meta.is_file() {
            return Err(StateError::corrupt(&path, "is not a regular file"));
        }
        if !existed {
            file.set_permissions(Permissions::from_mode(JOURNAL_MODE))
                .and_then(|()| sync_dir(data_dir))
                .map_err(|e| StateError::io(&path, e))?;
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| StateError::io(&path, e))?;
        let (records, whole) = parse(&bytes);
        let mut replayed = Replayed {
            records: records.len(),
            torn: (bytes.len() - whole) as u64,
            ..Replayed::default()
        };
        if replayed.torn > 0 {
            warn!(
                "{}: ignoring a torn tail of {} bytes after {} whole record(s)",
                path.display(),
                replayed.torn,
                records.len()
            );
            // New records must follow whole ones to be read back.
            file.set_len(whole as u64)
                .and_then(|()| file.sync_data())
                .map_err(|e| StateError::io(&path, e))?;
        }
        drop(bytes);
        let next_seq = records.last().map_or(0, |r| r.seq + 1);
        let mut last: BTreeMap<String, Entry> = BTreeMap::new();
        for r in records {
            last.insert(r.id, r.entry);
        }
        let mut pending = HashMap::new();
        for (id, entry) in last {
            // Every id `parse` reads back is canonical.
            let Some(key) = Key::of(&id) else { continue };
            match replay_one(&plain, &id, &entry) {
                Ok((p, changed)) => {
                    match (&entry, changed) {
                        (Entry::State(_), true) => replayed.restored += 1,
                        (Entry::Deleted, true) => replayed.deleted += 1,
                        _ => {}
                    }
                    pending.insert(key, p);
                }
                // Kept in the journal until the next compaction drops it.
                Err(e) => warn!("journal replay of {id}: {e}"),
            }
        }
        let (tx, requests) = crossbeam_channel::unbounded();
        let link = JournalLink {
            tx,
            path: Arc::from(path.as_path()),
        };
        let writer = Writer {
            plain,
            file,
            path,
            bytes: whole as u64,
            seq: next_seq,
            pending,
            queue: VecDeque::new(),
            round: Vec::new(),
            syncs: Arc::default(),
            settings,
            buf: Vec::new(),
            answered: Default::default(),
        };
        Ok((
            Journal {
                writer,
                link,
                requests,
            },
            replayed,
        ))
    }

    /// The store that writes through this journal.
    pub fn store(&self) -> Store {
        Store {
            journal: Some(self.link.clone()),
            ..self.writer.plain.clone()
        }
    }

    /// Starts the `state-journal` thread.
    pub fn spawn(self) -> io::Result<JournalThread> {
        let (stop_tx, stop) = crossbeam_channel::bounded::<()>(1);
        let syncs = self.writer.syncs.clone();
        let link = self.link.clone();
        let requests = self.requests;
        let writer = self.writer;
        let thread = std::thread::Builder::new()
            .name("state-journal".into())
            .spawn(move || writer.run(&requests, &stop))?;
        Ok(JournalThread {
            thread: Some(thread),
            stop: Some(stop_tx),
            syncs,
            link,
        })
    }
}

/// The running journal thread. Dropping it lets the thread end (after what
/// is queued); [`JournalThread::stop`] also waits for that.
#[derive(Debug)]
pub struct JournalThread {
    thread: Option<JoinHandle<()>>,
    stop: Option<Sender<()>>,
    syncs: Arc<AtomicU64>,
    link: JournalLink,
}

impl JournalThread {
    /// How many times the journal was fdatasync'ed (batches, truncations).
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::SeqCst)
    }

    /// Compacts every pending instance now and truncates the journal; the
    /// number of instances compacted.
    pub fn compact(&self) -> Result<usize, StateError> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.link
            .tx
            .send(JournalReq::Compact { reply })
            .map_err(|_| self.link.stopped())?;
        rx.recv().unwrap_or_else(|_| Err(self.link.stopped()))
    }

    /// Ends the thread once what is queued is served, and waits for it.
    /// Nothing is lost: what it did not compact is in the journal, and
    /// state files not written yet are left to the next start's replay.
    pub fn stop(mut self) {
        self.stop.take();
        self.join();
    }

    /// As [`JournalThread::stop`], but every state file not written yet is
    /// written first (no fsync; tools and tests that read the files at once).
    pub fn stop_writing_files(mut self) {
        if let Some(tx) = self.stop.take() {
            // Capacity 1 and the only sender: this never blocks.
            let _ = tx.try_send(());
        }
        self.join();
    }

    fn join(&mut self) {
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            log::error!("the state-journal thread panicked");
        }
    }
}

impl Drop for JournalThread {
    fn drop(&mut self) {
        self.stop.take();
    }
}

/// What is still to be done for an instance whose record is in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// Its state file is still to be written, from the state text at
    /// `at` (`len` bytes) in the journal.
    ToWrite { at: u64, len: usize },
    /// Deleted: its state file is still to be removed.
    ToRemove,
    /// Its state file was written; compaction fsyncs it and its directory.
    Written,
    /// Its state file was removed; compaction fsyncs its directory.
    Removed,
}

/// One record read back.
#[derive(Debug)]
struct Record {
    seq: u64,
    id: String,
    entry: Entry,
}

/// The records of a journal's bytes, up to the first torn or damaged one,
/// and the length of the whole records.
fn parse(bytes: &[u8]) -> (Vec<Record>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some((r, len)) = parse_one(&bytes[at..]) {
        out.push(r);
        at += len;
    }
    (out, at)
}

fn parse_one(b: &[u8]) -> Option<(Record, usize)> {
    let header = b.get(..HEADER)?;
    if header[..4] != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(header[4..8].try_into().ok()?) as usize;
    let sum = u64::from_le_bytes(header[8..16].try_into().ok()?);
    if len < PAYLOAD_HEAD || len as u64 > STATE_LIMIT + PAYLOAD_HEAD as u64 {
        return None;
    }
    let payload = b.get(HEADER..HEADER + len)?;
    if fnv1a64(payload) != sum {
        return None;
    }
    let seq = u64::from_le_bytes(payload[1..9].try_into().ok()?);
    let id = std::str::from_utf8(&payload[9..PAYLOAD_HEAD]).ok()?;
    if valid_instance_id(id).as_deref() != Some(id) {
        return None;
    }
    let entry = match payload[0] {
        KIND_STATE => Entry::State(payload[PAYLOAD_HEAD..].to_vec()),
        KIND_DELETED if payload.len() == PAYLOAD_HEAD => Entry::Deleted,
        _ => return None,
    };
    let id = id.to_owned();
    Some((Record { seq, id, entry }, HEADER + len))
}

/// Appends the record of `entry` for `id` (canonical) to `buf`; where in
/// `buf` its state text begins.
fn frame(buf: &mut Vec<u8>, seq: u64, id: &str, entry: &Entry) -> usize {
    let (kind, data): (u8, &[u8]) = match entry {
        Entry::State(text) => (KIND_STATE, text),
        Entry::Deleted => (KIND_DELETED, &[]),
    };
    let start = buf.len();
    buf.extend_from_slice(&MAGIC);
    buf.extend_from_slice(&[0; 12]);
    buf.push(kind);
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(id.as_bytes());
    buf.extend_from_slice(data);
    let payload = start + HEADER;
    let len = (buf.len() - payload) as u32;
    let sum = fnv1a64(&buf[payload..]);
    buf[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
    buf[start + 8..start + 16].copy_from_slice(&sum.to_le_bytes());
    payload + PAYLOAD_HEAD
}

/// Applies the last record of `id` to its state file at replay; whether the
/// file changed.
fn replay_one(plain: &Store, id: &str, entry: &Entry) -> Result<(Pending, bool), StateError> {
    let dir = plain.instance_dir(id)?;
    let path = dir.join(STATE_FILE);
    match entry {
        Entry::State(text) => {
            if fs::read(&path).is_ok_and(|on_disk| on_disk == *text) {
                return Ok((Pending::Written, false));
            }
            // Its directory too may be what a power cut lost.
            match DirBuilder::new().mode(DIR_MODE).create(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(StateError::io(&dir, e)),
            }
            replace_file(&path, text, STATE_MODE, false).map_err(|e| StateError::io(&path, e))?;
            Ok((Pending::Written, true))
        }
        Entry::Deleted => match fs::remove_file(&path) {
            Ok(()) => Ok((Pending::Removed, true)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((Pending::Removed, false)),
            Err(e) => Err(StateError::io(&path, e)),
        },
    }
}

/// Everything the journal thread owns.
#[derive(Debug)]
struct Writer {
    /// The store without a journal: paths, checks, durable writes.
    plain: Store,
    file: File,
    path: PathBuf,
    /// Length of the journal (whole records).
    bytes: u64,
    seq: u64,
    /// Instances with a record in the journal whose state file is not known
    /// durable.
    pending: HashMap<Key, Pending>,
    /// The instances whose state file is still to be written or removed,
    /// oldest first (each once).
    queue: VecDeque<Key>,
    /// The instances the current compaction round has still to visit.
    round: Vec<Key>,
    syncs: Arc<AtomicU64>,
    settings: JournalSettings,
    buf: Vec<u8>,
    /// The reply senders of the last two batches (older, newer). A writer
    /// drops its receiver as soon as it has the answer; dropping the sender
    /// a batch later frees the reply channel here rather than on the
    /// writer's thread, where glibc would keep the freed chunks in that
    /// thread's cache for as long as it lives (an idle instance thread).
    answered: [Vec<Sender<Result<(), StateError>>>; 2],
}

/// A write accepted into the current batch, and where its text begins in
/// the batch.
type Accepted = (Key, Entry, usize, Sender<Result<(), StateError>>);

/// An instance id as the journal keeps it: the UUID of its canonical text
/// (the only ids it accepts). Sixteen bytes in place, where a String is 24
/// and a heap copy, in each of the pending map, the queue and a compaction
/// round, for every instance not compacted yet; and a writer allocates
/// nothing to name its instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key(uuid::Uuid);

impl Key {
    /// The key of `id` if it is canonical (lower-case hyphenated UUID).
    pub fn of(id: &str) -> Option<Key> {
        if !is_uuid_shape(id) || id.bytes().any(|b| b.is_ascii_uppercase()) {
            return None;
        }
        uuid::Uuid::try_parse(id).ok().map(Key)
    }

    /// The canonical text again.
    pub fn text(self) -> KeyText {
        let mut text = [0; uuid::fmt::Hyphenated::LENGTH];
        self.0.hyphenated().encode_lower(&mut text);
        KeyText(text)
    }
}

/// The text of a [`Key`], on the stack.
#[derive(Debug)]
pub struct KeyText([u8; uuid::fmt::Hyphenated::LENGTH]);

impl KeyText {
    pub fn as_str(&self) -> &str {
        // Hex digits and hyphens only: always UTF-8.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// What the thread does when no request is waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chore {
    Nothing,
    Files,
    Compaction,
}

impl Writer {
    /// The chore at hand, and whether it is due whatever the requests (its
    /// backlog is past its bound).
    fn chore(&self) -> (Chore, bool) {
        if !self.queue.is_empty() {
            (
                Chore::Files,
                self.queue.len() > self.settings.max_unwritten
                    || self.bytes > self.settings.max_bytes,
            )
        } else if !self.pending.is_empty() {
            (Chore::Compaction, self.bytes > self.settings.max_bytes)
        } else {
            (Chore::Nothing, false)
        }
    }

    fn run(mut self, requests: &Receiver<JournalReq>, stop: &Receiver<()>) {
        // The chore begun once its quiet period passed; a request ends it
        // unless it is due.
        let mut begun = Chore::Nothing;
        // Asked by `stop_writing_files`.
        let mut write_files = false;
        loop {
            let (chore, due) = self.chore();
            let req = if chore != Chore::Nothing && (due || begun == chore) {
                match requests.try_recv() {
                    Ok(r) => Some(r),
                    Err(TryRecvError::Disconnected) => None,
                    Err(TryRecvError::Empty) => {
                        match stop.try_recv() {
                            Err(TryRecvError::Disconnected) => break,
                            Ok(()) => {
                                write_files = true;
                                break;
                            }
                            Err(TryRecvError::Empty) => {}
                        }
                        let done = match chore {
                            Chore::Files => {
                                self.write_step();
                                Ok(())
                            }
                            _ => self.compact_step(),
                        };
                        if let Err(e) = done {
                            warn!("journal compaction stopped: {e}");
                            begun = Chore::Nothing;
                        }
                        continue;
                    }
                }
            } else {
                let wait = match chore {
                    Chore::Files => self.settings.settle,
                    Chore::Compaction => self.settings.quiet,
                    Chore::Nothing => None,
                };
                let timer = wait.map_or_else(crossbeam_channel::never, crossbeam_channel::after);
                select! {
                    recv(requests) -> r => r.ok(),
                    recv(stop) -> m => {
                        write_files = m.is_ok();
                        None
                    }
                    recv(timer) -> _ => {
                        self.answered = Default::default();
                        begun = chore;
                        continue;
                    }
                }
            };
            let Some(req) = req else { break };
            begun = Chore::Nothing;
            self.serve(req, requests);
        }
        // Stopping: writers still waiting are served. State files not
        // written yet are left to the next start's replay: their records
        // are durable, and writing thousands of new files here would hold
        // the shutdown for longer than the exit itself takes.
        while let Ok(r) = requests.try_recv() {
            self.serve(r, requests);
        }
        while write_files && !self.queue.is_empty() {
            self.write_step();
        }
        if !self.queue.is_empty() {
            log::info!(
                "{} state files are left to the next start (their journal records are durable)",
                self.queue.len()
            );
        }
    }

    /// Serves `first` and every request queued behind it (module docs, "A
    /// write", steps 1–4).
    fn serve(&mut self, first: JournalReq, requests: &Receiver<JournalReq>) {
        let mut accepted: Vec<Accepted> = Vec::new();
        let mut compacts = Vec::new();
        self.buf.clear();
        let [older, newer] = &mut self.answered;
        *older = std::mem::take(newer);
        let mut next = Some(first);
        while let Some(req) = next.take() {
            match req {
                JournalReq::Write { id, entry, reply } => match self.check(id, &entry) {
                    Ok(()) => {
                        let at = frame(&mut self.buf, self.seq, id.text().as_str(), &entry);
                        self.seq += 1;
                        accepted.push((id, entry, at, reply));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                },
                JournalReq::Compact { reply } => compacts.push(reply),
            }
            if accepted.len() < BATCH_RECORDS {
                next = requests.try_recv().ok();
            }
        }
        if !accepted.is_empty() {
            let base = self.bytes;
            match self.append() {
                Ok(()) => {
                    for (id, entry, at, reply) in accepted {
                        let p = match entry {
                            Entry::State(text) => Pending::ToWrite {
                                at: base + at as u64,
                                len: text.len(),
                            },
                            Entry::Deleted => Pending::ToRemove,
                        };
                        self.note(id, p);
                        let _ = reply.send(Ok(()));
                        self.answered[1].push(reply);
                    }
                }
                Err(e) => {
                    warn!("{}: {e}", self.path.display());
                    // Not acknowledged; later records must follow whole ones.
                    if let Err(e) = self.file.set_len(self.bytes) {
                        warn!("{}: {e}", self.path.display());
                    }
                    for (.., reply) in accepted {
                        let copy = io::Error::new(e.kind(), e.to_string());
                        let _ = reply.send(Err(StateError::io(&self.path, copy)));
                    }
                }
            }
        }
        if self.buf.capacity() > KEEP_BUFFER {
            self.buf = Vec::new();
        }
        for reply in compacts {
            let _ = reply.send(self.compact_all());
        }
    }

    /// A write is accepted only if it can be applied: its id is canonical
    /// (a [`Key`] is), its text not too large, and its instance directory
    /// not a symbolic link (a missing one is made when its file is written).
    fn check(&self, id: Key, entry: &Entry) -> Result<(), StateError> {
        let dir = self.plain.instance_dir(id.text().as_str())?;
        if let Entry::State(text) = entry
            && text.len() as u64 > STATE_LIMIT
        {
            return Err(StateError::corrupt(&dir, "state too large"));
        }
        Ok(())
    }

    /// Appends the batch and makes it durable (one fdatasync).
    fn append(&mut self) -> io::Result<()> {
        self.file.write_all(&self.buf)?;
        self.file.sync_data()?;
        self.syncs.fetch_add(1, Ordering::SeqCst);
        self.bytes += self.buf.len() as u64;
        Ok(())
    }

    /// A durable record: its file is queued to be written or removed.
    fn note(&mut self, id: Key, p: Pending) {
        let queued = matches!(
            self.pending.get(&id),
            Some(Pending::ToWrite { .. } | Pending::ToRemove)
        );
        if !queued {
            self.queue.push_back(id);
        }
        self.pending.insert(id, p);
    }

    /// The state text of a record, read back from the journal.
    fn text_at(&self, at: u64, len: usize) -> Result<Vec<u8>, StateError> {
        let mut text = vec![0; len];
        self.file
            .read_exact_at(&mut text, at)
            .map_err(|e| StateError::io(&self.path, e))?;
        Ok(text)
    }

    /// Writes (no fsync) or removes the state file of the oldest queued
    /// instance. A failure is logged; compaction tries again, durably.
    fn write_step(&mut self) {
        let Some(id) = self.queue.pop_front() else {
            return;
        };
        let next = match self.pending.get(&id).copied() {
            Some(Pending::ToWrite { at, len }) => self
                .text_at(at, len)
                .and_then(|text| self.write_file(id.text().as_str(), &text, false))
                .map(|()| Pending::Written),
            Some(Pending::ToRemove) => self
                .remove_file(id.text().as_str())
                .map(|()| Pending::Removed),
            _ => return,
        };
        match next {
            Ok(p) => {
                self.pending.insert(id, p);
            }
            Err(e) => warn!("{e} (the journal holds it; done again at compaction)"),
        }
    }

    /// The state file of `id`, its directory made if missing. A new file is
    /// written in place: its record is durable, so replay mends a torn one.
    /// An existing one is replaced (temporary file and rename), so readers
    /// always see a whole state.
    fn write_file(&self, id: &str, text: &[u8], durable: bool) -> Result<(), StateError> {
        let dir = self.plain.instance_dir(id)?;
        match DirBuilder::new().mode(DIR_MODE).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(StateError::io(&dir, e)),
        }
        let path = dir.join(STATE_FILE);
        if !durable {
            let created = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(STATE_MODE)
                .open(&path);
            match created {
                Ok(mut f) => return f.write_all(text).map_err(|e| StateError::io(&path, e)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(StateError::io(&path, e)),
            }
        }
        replace_file(&path, text, STATE_MODE, durable).map_err(|e| StateError::io(&path, e))
    }

    fn remove_file(&self, id: &str) -> Result<(), StateError> {
        let path = self.plain.instance_dir(id)?.join(STATE_FILE);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StateError::io(&path, e)),
        }
    }

    /// Compaction step 2 for one instance, or step 3 when none is left.
    fn compact_step(&mut self) -> Result<(), StateError> {
        if self.round.is_empty() {
            self.round = self.pending.keys().copied().collect();
        }
        if let Some(id) = self.round.pop()
            && let Some(p) = self.pending.get(&id).copied()
        {
            self.compact_one(id.text().as_str(), p)?;
            self.pending.remove(&id);
        }
        if self.pending.is_empty() {
            self.truncate()?;
        }
        Ok(())
    }

    fn compact_all(&mut self) -> Result<usize, StateError> {
        while !self.queue.is_empty() {
            self.write_step();
        }
        let n = self.pending.len();
        while !self.pending.is_empty() {
            self.compact_step()?;
        }
        if n == 0 && self.bytes > 0 {
            self.truncate()?;
        }
        Ok(n)
    }

    /// Makes what the journal says of `id` durable in its own files.
    fn compact_one(&self, id: &str, p: Pending) -> Result<(), StateError> {
        let dir = self.plain.instance_dir(id)?;
        let path = dir.join(STATE_FILE);
        match p {
            Pending::Written => {
                let file = OpenOptions::new()
                    .read(true)
                    .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
                    .open(&path);
                match file {
                    Ok(f) => f.sync_data().map_err(|e| StateError::io(&path, e))?,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        // Removed behind the launcher's back: nothing to keep.
                        warn!("{}: gone before it was compacted", path.display());
                        return Ok(());
                    }
                    Err(e) => return Err(StateError::io(&path, e)),
                }
                sync_dir(&dir).map_err(|e| StateError::io(&dir, e))
            }
            // Its file could not be written earlier: now, durably.
            Pending::ToWrite { at, len } => self.write_file(id, &self.text_at(at, len)?, true),
            Pending::ToRemove | Pending::Removed => {
                self.remove_file(id)?;
                match sync_dir(&dir) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => Err(StateError::io(&dir, e)),
                    _ => Ok(()),
                }
            }
        }
    }

    /// Compaction step 3: every file is durable, the journal can go.
    fn truncate(&mut self) -> Result<(), StateError> {
        let instances = self.plain.instances_dir();
        sync_dir(instances).map_err(|e| StateError::io(instances, e))?;
        self.file
            .set_len(0)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| StateError::io(&self.path, e))?;
        self.syncs.fetch_add(1, Ordering::SeqCst);
        info!(
            "{}: compacted into the state files ({} bytes)",
            self.path.display(),
            self.bytes
        );
        self.bytes = 0;
        self.round.clear();
        Ok(())
    }
}

#[cfg(test)]
// In tests a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::payloads::config::InstanceConfig;
    use crate::state::encode;
    use std::time::Instant;

    const WAIT: Duration = Duration::from_secs(10);

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "ciao-journal-{tag}-{}",
                uuid::Uuid::new_v4().simple()
            ));
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn id_n(n: usize) -> String {
        format!("{n:08x}-0000-4000-8000-000000000000")
    }

    fn state_of(id: &str, stopped: bool) -> Vec<u8> {
        let cfg = InstanceConfig {
            instance_uuid: id.to_owned(),
            vcpus: 1,
            mem_mb: 64,
            ..InstanceConfig::default()
        };
        encode(&cfg, stopped).unwrap()
    }

    fn manual() -> JournalSettings {
        JournalSettings {
            settle: None,
            quiet: None,
            max_unwritten: MAX_UNWRITTEN,
            max_bytes: MAX_BYTES,
        }
    }

    fn recv<T>(rx: &Receiver<T>) -> T {
        rx.recv_timeout(WAIT)
            .expect("an answer within the deadline")
    }

    /// The ids `scan` finds, with their `stopped` flags.
    fn scanned(store: &Store) -> Vec<(String, bool)> {
        store
            .scan()
            .into_iter()
            .filter_map(Result::ok)
            .map(|(id, s)| (id, s.stopped))
            .collect()
    }

    /// Many writes queued together are made durable by one fdatasync.
    #[test]
    fn many_writes_one_sync() {
        let tmp = TempDir::new("batch");
        let (journal, replayed) = Journal::open(&tmp.0, manual()).unwrap();
        assert_eq!(replayed, Replayed::default());
        let store = journal.store();
        let link = store.journal.clone().unwrap();
        let ids: Vec<String> = (0..200).map(id_n).collect();
        for id in &ids {
            store.create_instance_dir(id).unwrap();
        }
        // Queued before the thread runs: it finds them all waiting.
        let replies: Vec<_> = ids
            .iter()
            .map(|id| link.submit(Key::of(id).unwrap(), Entry::State(state_of(id, false))))
            .collect();
        let thread = journal.spawn().unwrap();
        for r in &replies {
            recv(r).unwrap();
        }
        assert_eq!(thread.syncs(), 1, "200 queued writes, one fdatasync");
        // The answers did not wait for the state files (no quiet period
        // here: they are written when asked).
        assert!(scanned(&store).is_empty());
        // A write after that is a batch of its own.
        store
            .save_encoded(&ids[0], state_of(&ids[0], true))
            .unwrap();
        assert_eq!(thread.syncs(), 2);
        // Compaction writes the files, fsyncs them, truncates the journal.
        assert_eq!(thread.compact().unwrap(), 200);
        assert_eq!(scanned(&store).len(), 200);
        assert!(store.load(&ids[0]).unwrap().stopped);
        assert_eq!(thread.syncs(), 3);
        assert_eq!(fs::metadata(tmp.0.join(JOURNAL_FILE)).unwrap().len(), 0);
        assert_eq!(
            fs::metadata(tmp.0.join(JOURNAL_FILE))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        thread.stop();
    }

    /// What a power cut between the journal's fdatasync and compaction can
    /// do to the files (lose them, empty them, lose their directories),
    /// and how replay mends it: every acknowledged state back, the newest
    /// of each, a deleted instance still deleted, none twice.
    #[test]
    fn replay_restores_every_acked_state_after_a_power_cut() {
        let tmp = TempDir::new("replay");
        let (journal, _) = Journal::open(&tmp.0, manual()).unwrap();
        let store = journal.store();
        let thread = journal.spawn().unwrap();
        let ids: Vec<String> = (0..6).map(id_n).collect();
        for id in &ids {
            store.create_instance_dir(id).unwrap();
            store.save_encoded(id, state_of(id, false)).unwrap();
        }
        store
            .save_encoded(&ids[1], state_of(&ids[1], true))
            .unwrap();
        // ids[2] is deleted (state, then the directory).
        store.remove_state(&ids[2]).unwrap();
        store.remove_dir(&ids[2]).unwrap();
        // ids[3] is deleted and started again.
        store.remove(&ids[3]).unwrap();
        store.create_instance_dir(&ids[3]).unwrap();
        store
            .save_encoded(&ids[3], state_of(&ids[3], true))
            .unwrap();
        // Stopped before compaction, writing the state files (no fsync).
        thread.stop_writing_files();
        assert_eq!(scanned(&store).len(), 5);
        assert!(fs::metadata(tmp.0.join(JOURNAL_FILE)).unwrap().len() > 0);

        let inst = store.instances_dir().to_path_buf();
        // The power cut: a file lost, one empty, one directory gone, one
        // file back to its older version.
        fs::remove_file(inst.join(&ids[0]).join(STATE_FILE)).unwrap();
        fs::write(inst.join(&ids[4]).join(STATE_FILE), "").unwrap();
        fs::remove_dir_all(inst.join(&ids[5])).unwrap();
        fs::write(
            inst.join(&ids[1]).join(STATE_FILE),
            state_of(&ids[1], false),
        )
        .unwrap();
        // The deleted one's state reappears as the old file would have.
        fs::create_dir(inst.join(&ids[2])).unwrap();
        fs::write(
            inst.join(&ids[2]).join(STATE_FILE),
            state_of(&ids[2], false),
        )
        .unwrap();

        let (journal, replayed) = Journal::open(&tmp.0, manual()).unwrap();
        assert_eq!(replayed.records, 6 + 1 + 2 + 1);
        assert_eq!(replayed.torn, 0);
        assert_eq!(replayed.restored, 4);
        assert_eq!(replayed.deleted, 1);
        let store = journal.store();
        let mut want: Vec<(String, bool)> = vec![
            (ids[0].clone(), false),
            (ids[1].clone(), true),
            (ids[3].clone(), true),
            (ids[4].clone(), false),
            (ids[5].clone(), false),
        ];
        want.sort();
        assert_eq!(scanned(&store), want);
        // Compacted, then replayed again: nothing left to do.
        let thread = journal.spawn().unwrap();
        assert_eq!(thread.compact().unwrap(), 6);
        thread.stop();
        let (_, replayed) = Journal::open(&tmp.0, manual()).unwrap();
        assert_eq!(replayed, Replayed::default());
        assert_eq!(scanned(&store), want);
    }

    /// A batch whose fdatasync never returned leaves a torn tail: replay
    /// ignores it at every cut and after any damaged byte, keeps what came
    /// before, and cuts it off so that new records can be read back.
    #[test]
    fn torn_tail_is_ignored() {
        let tmp = TempDir::new("torn");
        let (journal, _) = Journal::open(&tmp.0, manual()).unwrap();
        let store = journal.store();
        let thread = journal.spawn().unwrap();
        let (a, b) = (id_n(1), id_n(2));
        store.create_instance_dir(&a).unwrap();
        store.save_encoded(&a, state_of(&a, false)).unwrap();
        let path = tmp.0.join(JOURNAL_FILE);
        let first = fs::metadata(&path).unwrap().len() as usize;
        store.create_instance_dir(&b).unwrap();
        store.save_encoded(&b, state_of(&b, true)).unwrap();
        thread.stop();
        let whole = fs::read(&path).unwrap();
        let inst = store.instances_dir().to_path_buf();

        let mut cuts: Vec<usize> = (first + 1..whole.len()).step_by(7).collect();
        cuts.push(whole.len() - 1);
        for cut in cuts {
            fs::write(&path, &whole[..cut]).unwrap();
            fs::remove_dir_all(inst.join(&b)).unwrap();
            fs::create_dir(inst.join(&b)).unwrap();
            let (j, replayed) = Journal::open(&tmp.0, manual()).unwrap();
            assert_eq!(replayed.records, 1, "cut at {cut}");
            assert_eq!(replayed.torn, (cut - first) as u64, "cut at {cut}");
            assert_eq!(fs::metadata(&path).unwrap().len() as usize, first);
            assert!(j.store().load(&b).unwrap_err().is_not_found());
            assert!(!j.store().load(&a).unwrap().stopped);
        }
        for at in [first + 3, first + 12, first + HEADER + 20, whole.len() - 2] {
            let mut damaged = whole.clone();
            damaged[at] ^= 0x20;
            fs::write(&path, &damaged).unwrap();
            let (_, replayed) = Journal::open(&tmp.0, manual()).unwrap();
            assert_eq!(replayed.records, 1, "flip at {at}");
        }
        // After a cut, new records follow the whole ones and are read back.
        fs::write(&path, &whole[..whole.len() - 3]).unwrap();
        let (j, _) = Journal::open(&tmp.0, manual()).unwrap();
        let store = j.store();
        let thread = j.spawn().unwrap();
        store.save_encoded(&b, state_of(&b, true)).unwrap();
        thread.stop();
        fs::remove_dir_all(inst.join(&b)).unwrap();
        let (j, replayed) = Journal::open(&tmp.0, manual()).unwrap();
        assert_eq!((replayed.records, replayed.torn), (2, 0));
        assert!(j.store().load(&b).unwrap().stopped);
    }

    /// A key is the canonical text's 128 bits and gives the same text back;
    /// any other form of an id has no key.
    #[test]
    fn keys_are_canonical_ids() {
        for id in [
            "00000000-0000-0000-0000-000000000000",
            "d7d86208-b46c-4465-9018-fe14087d415f",
            "ffffffff-ffff-ffff-ffff-ffffffffffff",
        ] {
            let key = Key::of(id).unwrap();
            assert_eq!(key.text().as_str(), id);
        }
        let a = Key::of("d7d86208-b46c-4465-9018-fe14087d415f").unwrap();
        assert_eq!(a.0.as_u128(), 0xd7d86208_b46c_4465_9018_fe14087d415f);
        for bad in [
            "D7D86208-B46C-4465-9018-FE14087D415F",
            "d7d86208b46c44659018fe14087d415f",
            "{d7d86208-b46c-4465-9018-fe14087d415f}",
            "d7d86208-b46c-4465-9018-fe14087d415g",
            "../x",
            "",
        ] {
            assert!(Key::of(bad).is_none(), "{bad}");
        }
    }

    /// Bad writes are refused one by one and cost the batch nothing; a
    /// stopped journal says so instead of hanging.
    #[test]
    fn refused_writes_and_a_stopped_journal() {
        let tmp = TempDir::new("refuse");
        let (journal, _) = Journal::open(&tmp.0, manual()).unwrap();
        let store = journal.store();
        let link = store.journal.clone().unwrap();
        let thread = journal.spawn().unwrap();
        let a = id_n(7);
        let e = link.write("../x", Entry::Deleted).unwrap_err();
        assert!(matches!(e, StateError::BadId(_)), "{e}");
        let e = link
            .write("D7D86208-B46C-4465-9018-FE14087D415F", Entry::Deleted)
            .unwrap_err();
        assert!(matches!(e, StateError::BadId(_)), "{e}");
        assert_eq!(thread.syncs(), 0);
        assert_eq!(fs::metadata(tmp.0.join(JOURNAL_FILE)).unwrap().len(), 0);
        // An instance directory that is a symbolic link is refused.
        let outside = tmp.0.join("outside");
        fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, store.instances_dir().join(&a)).unwrap();
        let e = store.save_encoded(&a, state_of(&a, false)).unwrap_err();
        assert!(matches!(e, StateError::Corrupt { .. }), "{e}");
        fs::remove_file(store.instances_dir().join(&a)).unwrap();
        // A missing one is made with the state file.
        store.save_encoded(&a, state_of(&a, false)).unwrap();
        thread.stop_writing_files();
        assert!(!store.load(&a).unwrap().stopped);
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        let t = Instant::now();
        let e = store.save_encoded(&a, state_of(&a, false)).unwrap_err();
        assert!(e.to_string().contains("stopped"), "{e}");
        assert!(t.elapsed() < WAIT);
    }
}
