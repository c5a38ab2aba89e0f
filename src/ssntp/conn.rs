//! One SSNTP connection, owned by one io thread, and the handle other threads
//! use to send on it.
//!
//! rustls cannot be read in one thread and written in another, so a single
//! thread owns the TCP socket, the TLS state and the gob codec and drives them
//! with `poll(2)` over two descriptors: the socket and the read end of a waker
//! socket pair.
//!
//! Protocol between the io thread and senders ([`Link`]):
//! 1. A sender locks the link state; if a connection is up it puts the frame
//!    on that connection's bounded queue and, if the io thread is parked in
//!    `poll`, writes one byte to the waker. Otherwise the frame is handed back
//!    in [`SendError`]: refused, never silently dropped.
//! 2. The io thread drains the queue into the TLS writer whenever the previous
//!    frames have been accepted by rustls, flushes TLS records while the socket
//!    is writable, and feeds decrypted bytes to the resumable gob decoder.
//! 3. When the connection dies the io thread marks the link down first, then
//!    takes whatever was still queued and reports it with the disconnect.
//!
//! A peer that stops in the middle of a gob message would otherwise hold the
//! session (and up to a message's worth of buffer) for ever: once part of a
//! message has arrived, the whole of it must follow within the frame timeout
//! ([`DEFAULT_FRAME_TIMEOUT`], 60 s, counted from when the io thread first
//! sees the message incomplete), or the connection ends with
//! [`ConnError::Timeout`]. An idle connection, with no message
//! begun, is not timed out: schedulers may be silent for long.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::frame::Frame;
use super::gob::{Decoder, Encoder, GobEncode, GobError, Value};

/// Frames that may wait in one connection's outbound queue. A sender that
/// finds it full gets its frame back ([`SendError::QueueFull`]).
pub const OUTBOUND_QUEUE: usize = 4096;
/// Plaintext bytes rustls may hold before we stop feeding it.
const TLS_BUFFER_LIMIT: usize = 256 * 1024;
const READ_CHUNK: usize = 64 * 1024;
/// Plaintext encoded ahead before handing it to rustls in one go.
const WRITE_BATCH: usize = 64 * 1024;
/// The capacity of drained plaintext kept for the next frames: a batch and
/// a frame of ordinary size.
const PENDING_KEEP: usize = 2 * WRITE_BATCH;
/// How long a begun gob message may take to arrive in full (module doc).
/// SSNTP frames are kilobytes; even a 16 MiB one needs only ~280 KB/s.
pub const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a connection ended or could not be used.
#[derive(Debug)]
pub enum ConnError {
    Io(io::Error),
    Tls(rustls::Error),
    Gob(GobError),
    /// The peer closed the connection.
    Closed,
    /// A handshake step took longer than allowed.
    Timeout(&'static str),
    /// The local side is shutting down.
    Shutdown,
    /// The peer broke the SSNTP protocol.
    Protocol(String),
    /// The peer cannot be trusted (e.g. its certificate does not name it).
    Security(String),
    /// Every server of a dial pass failed; the text names the last one.
    Unreachable(String),
}

impl fmt::Display for ConnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnError::Io(e) => write!(f, "i/o error: {e}"),
            ConnError::Tls(e) => write!(f, "TLS error: {e}"),
            ConnError::Gob(e) => write!(f, "{e}"),
            ConnError::Closed => f.write_str("connection closed by peer"),
            ConnError::Timeout(what) => write!(f, "timed out waiting for {what}"),
            ConnError::Shutdown => f.write_str("shutting down"),
            ConnError::Protocol(s) => write!(f, "protocol error: {s}"),
            ConnError::Security(s) => write!(f, "security failure: {s}"),
            ConnError::Unreachable(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for ConnError {}

impl From<io::Error> for ConnError {
    fn from(e: io::Error) -> Self {
        ConnError::Io(e)
    }
}

impl From<rustls::Error> for ConnError {
    fn from(e: rustls::Error) -> Self {
        ConnError::Tls(e)
    }
}

impl From<GobError> for ConnError {
    fn from(e: GobError) -> Self {
        ConnError::Gob(e)
    }
}

impl From<nix::Error> for ConnError {
    fn from(e: nix::Error) -> Self {
        ConnError::Io(io::Error::from(e))
    }
}

// ---------------------------------------------------------------------------
// Link: the senders' side

/// A frame that could not be sent; the frame is handed back.
#[derive(Debug)]
pub enum SendError {
    /// No connection is up (the client is between connections).
    NotConnected(Frame),
    /// The connection's outbound queue is full (peer not reading).
    QueueFull(Frame),
    /// The client or session was closed for good.
    Closed(Frame),
}

impl SendError {
    pub fn into_frame(self) -> Frame {
        match self {
            SendError::NotConnected(f) | SendError::QueueFull(f) | SendError::Closed(f) => f,
        }
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::NotConnected(_) => f.write_str("SSNTP frame not sent: not connected"),
            SendError::QueueFull(_) => f.write_str("SSNTP frame not sent: outbound queue full"),
            SendError::Closed(_) => f.write_str("SSNTP frame not sent: connection closed"),
        }
    }
}

impl std::error::Error for SendError {}

#[derive(Debug)]
enum LinkState {
    Down,
    Up {
        tx: Sender<Frame>,
        waker: UnixStream,
    },
    Closed,
}

#[derive(Debug)]
struct LinkShared {
    state: Mutex<LinkState>,
    /// Set by the io thread right before it parks in poll.
    parked: AtomicBool,
}

/// A cloneable, thread-safe handle to send frames on a connection.
#[derive(Debug, Clone)]
pub struct Link {
    shared: Arc<LinkShared>,
}

impl Default for Link {
    fn default() -> Self {
        Link::new()
    }
}

impl Link {
    pub fn new() -> Link {
        Link {
            shared: Arc::new(LinkShared {
                state: Mutex::new(LinkState::Down),
                parked: AtomicBool::new(false),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LinkState> {
        // A panic while holding this lock cannot leave the state half-written
        // (every critical section is a single assignment or a try_send).
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a frame on the current connection.
    pub fn send(&self, frame: Frame) -> Result<(), SendError> {
        let st = self.lock();
        match &*st {
            LinkState::Down => Err(SendError::NotConnected(frame)),
            LinkState::Closed => Err(SendError::Closed(frame)),
            LinkState::Up { tx, waker } => match tx.try_send(frame) {
                Ok(()) => {
                    if self.shared.parked.swap(false, Ordering::SeqCst) {
                        wake(waker);
                    }
                    Ok(())
                }
                Err(TrySendError::Full(f)) => Err(SendError::QueueFull(f)),
                Err(TrySendError::Disconnected(f)) => Err(SendError::NotConnected(f)),
            },
        }
    }

    pub fn is_connected(&self) -> bool {
        matches!(*self.lock(), LinkState::Up { .. })
    }

    /// Closes for good: later sends fail with [`SendError::Closed`] and the io
    /// thread is woken so it can notice.
    pub fn close(&self) {
        let old = std::mem::replace(&mut *self.lock(), LinkState::Closed);
        if let LinkState::Up { waker, .. } = old {
            wake(&waker);
        }
    }

    pub fn is_closed(&self) -> bool {
        matches!(*self.lock(), LinkState::Closed)
    }

    /// Called by the io thread when a connection is established. Returns
    /// `None` if the link was closed meanwhile.
    pub(crate) fn up(&self) -> io::Result<Option<Outbound>> {
        let (waker_tx, waker_rx) = UnixStream::pair()?;
        waker_tx.set_nonblocking(true)?;
        waker_rx.set_nonblocking(true)?;
        let (tx, rx) = crossbeam_channel::bounded(OUTBOUND_QUEUE);
        let mut st = self.lock();
        if matches!(*st, LinkState::Closed) {
            return Ok(None);
        }
        *st = LinkState::Up {
            tx,
            waker: waker_tx,
        };
        Ok(Some(Outbound {
            rx,
            waker: waker_rx,
            shared: Arc::clone(&self.shared),
        }))
    }

    /// Called by the io thread when the connection is gone: later sends are
    /// refused; frames that were queued but not written are returned.
    pub(crate) fn down(&self, out: &Outbound) -> Vec<Frame> {
        {
            let mut st = self.lock();
            if !matches!(*st, LinkState::Closed) {
                *st = LinkState::Down;
            }
        }
        out.rx.try_iter().collect()
    }
}

/// Sends through `send` (a [`Link::send`] or a server's send), waiting while
/// the queue is full, up to `within`; any other refusal is returned at once.
/// For bulk senders that would rather wait than drop.
pub fn send_patiently(
    mut send: impl FnMut(Frame) -> Result<(), SendError>,
    frame: Frame,
    within: Duration,
) -> Result<(), SendError> {
    let deadline = Instant::now() + within;
    let mut frame = frame;
    loop {
        match send(frame) {
            Err(SendError::QueueFull(back)) if Instant::now() < deadline => {
                frame = back;
                std::thread::yield_now();
            }
            other => return other,
        }
    }
}

fn wake(waker: &UnixStream) {
    // WouldBlock means a wake-up byte is already pending: as good as sent.
    let _ = (&*waker).write(&[1]);
}

/// The io thread's end of a [`Link`] for one connection.
#[derive(Debug)]
pub(crate) struct Outbound {
    rx: Receiver<Frame>,
    waker: UnixStream,
    shared: Arc<LinkShared>,
}

impl Outbound {
    fn is_closed(&self) -> bool {
        matches!(
            *self.shared.state.lock().unwrap_or_else(|p| p.into_inner()),
            LinkState::Closed
        )
    }
}

// ---------------------------------------------------------------------------
// Transport: the io thread's side

/// The bound on a message that has begun to arrive ([`DEFAULT_FRAME_TIMEOUT`]).
#[derive(Debug)]
struct PartialFrame {
    timeout: Duration,
    /// When part of a message was first seen waiting for the rest.
    since: Option<Instant>,
}

impl PartialFrame {
    fn new(timeout: Duration) -> PartialFrame {
        PartialFrame {
            timeout,
            since: None,
        }
    }

    /// Called after the whole messages were taken out of the decoder, which
    /// still holds `buffered` bytes (`completed`: at least one was whole).
    /// `Some(time left)` while part of a message waits; an error once that
    /// time is over.
    fn check(
        &mut self,
        buffered: usize,
        completed: bool,
        now: Instant,
    ) -> Result<Option<Duration>, ConnError> {
        if completed || buffered == 0 {
            self.since = None;
        }
        if buffered == 0 {
            return Ok(None);
        }
        let since = *self.since.get_or_insert(now);
        let left = (since + self.timeout).saturating_duration_since(now);
        if left.is_zero() {
            return Err(ConnError::Timeout("the rest of a frame"));
        }
        Ok(Some(left))
    }
}

/// A non-blocking TLS connection with the gob codec of one SSNTP stream.
#[derive(Debug)]
pub(crate) struct Transport {
    sock: TcpStream,
    tls: rustls::Connection,
    dec: Decoder,
    enc: Encoder,
    /// Encoded plaintext not yet accepted by rustls.
    pending: Vec<u8>,
    pending_off: usize,
    /// Decrypted bytes on their way to the decoder.
    rbuf: Vec<u8>,
    eof: bool,
    /// See [`DEFAULT_FRAME_TIMEOUT`].
    partial: PartialFrame,
}

impl Transport {
    pub fn new(
        sock: TcpStream,
        mut tls: rustls::Connection,
        max_message: usize,
    ) -> io::Result<Transport> {
        sock.set_nonblocking(true)?;
        sock.set_nodelay(true)?;
        tls.set_buffer_limit(Some(TLS_BUFFER_LIMIT));
        Ok(Transport {
            sock,
            tls,
            dec: Decoder::new(max_message),
            enc: Encoder::new(),
            pending: Vec::new(),
            pending_off: 0,
            rbuf: Vec::new(),
            eof: false,
            partial: PartialFrame::new(DEFAULT_FRAME_TIMEOUT),
        })
    }

    /// How long the rest of a begun message may take (module doc).
    pub fn set_frame_timeout(&mut self, timeout: Duration) {
        self.partial = PartialFrame::new(timeout);
    }

    pub fn tls(&self) -> &rustls::Connection {
        &self.tls
    }

    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        self.sock.peer_addr().ok()
    }

    /// True while encoded frames wait for rustls or the socket.
    pub fn has_backlog(&self) -> bool {
        self.pending_off < self.pending.len() || self.tls.wants_write()
    }

    /// Encodes a value for sending (definitions first if new on this stream).
    pub fn queue<T: GobEncode>(&mut self, v: &T) {
        if self.pending_off == self.pending.len() {
            self.pending.clear();
            self.pending_off = 0;
            // A large frame (a STATS of thousands of instances) grew the
            // buffer: give that back rather than keep it for the
            // connection's life.
            if self.pending.capacity() > PENDING_KEEP {
                self.pending = Vec::new();
            }
        }
        self.enc.encode(v, &mut self.pending);
    }

    /// The next decoded value, if a whole one has arrived.
    pub fn next_value(&mut self) -> Result<Option<Value>, ConnError> {
        match self.dec.next_value()? {
            Some((_, v)) => Ok(Some(v)),
            None if self.eof => Err(ConnError::Closed),
            None => Ok(None),
        }
    }

    /// Moves pending plaintext into rustls and TLS records into the socket,
    /// as far as each will take them now.
    fn flush(&mut self) -> Result<(), ConnError> {
        loop {
            if !self.tls.is_handshaking() {
                while self.pending_off < self.pending.len() {
                    let n = self.tls.writer().write(&self.pending[self.pending_off..])?;
                    if n == 0 {
                        break;
                    }
                    self.pending_off += n;
                }
            }
            while self.tls.wants_write() {
                match self.tls.write_tls(&mut self.sock) {
                    Ok(0) => return Err(ConnError::Closed),
                    Ok(_) => {}
                    // The socket is full: poll for POLLOUT and come back.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
            // rustls drained into the socket: hand it the rest of the backlog,
            // or nothing would wake us to do so later.
            if self.pending_off == self.pending.len() || self.tls.is_handshaking() {
                return Ok(());
            }
        }
    }

    /// Reads whatever the socket has, decrypts it and feeds the decoder.
    fn read(&mut self) -> Result<(), ConnError> {
        loop {
            match self.tls.read_tls(&mut self.sock) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(_) => {
                    let state = match self.tls.process_new_packets() {
                        Ok(s) => s,
                        Err(e) => {
                            // Tell the peer why before giving up.
                            let _ = self.tls.write_tls(&mut self.sock);
                            return Err(e.into());
                        }
                    };
                    let len = state.plaintext_bytes_to_read();
                    if len > 0 {
                        // One buffer for the connection's life, not one per record batch.
                        self.rbuf.resize(len, 0);
                        let n = self.tls.reader().read(&mut self.rbuf)?;
                        self.dec.feed(&self.rbuf[..n]);
                    }
                    if state.peer_has_closed() {
                        self.eof = true;
                        break;
                    }
                    if self.dec.buffered() > READ_CHUNK {
                        // Let the caller take whole messages out first.
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    self.eof = true;
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// One round: flush, then [`wait`](Self::wait).
    pub fn pump(
        &mut self,
        waker: Option<&UnixStream>,
        timeout: Option<Duration>,
    ) -> Result<(), ConnError> {
        self.flush()?;
        self.wait(waker, timeout)
    }

    /// Waits until the socket or `waker` is ready (or `timeout`), then reads
    /// and flushes. The caller must have flushed and decided to wait *after*
    /// that flush: only what is buffered in rustls now asks for POLLOUT.
    fn wait(
        &mut self,
        waker: Option<&UnixStream>,
        timeout: Option<Duration>,
    ) -> Result<(), ConnError> {
        if self.eof {
            return Ok(());
        }
        let mut flags = PollFlags::POLLIN;
        if self.tls.wants_write() {
            flags |= PollFlags::POLLOUT;
        }
        let sock_fd = self.sock.as_fd();
        let mut fds = vec![PollFd::new(sock_fd, flags)];
        if let Some(w) = waker {
            fds.push(PollFd::new(w.as_fd(), PollFlags::POLLIN));
        }
        let t = match timeout {
            None => PollTimeout::NONE,
            Some(d) => PollTimeout::try_from(d).unwrap_or(PollTimeout::MAX),
        };
        match poll(&mut fds, t) {
            Ok(_) => {}
            Err(nix::Error::EINTR) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let sock_ready = fds[0].any().unwrap_or(true);
        let woken = fds.get(1).is_some_and(|f| f.any().unwrap_or(false));
        drop(fds);
        if woken && let Some(mut w) = waker {
            let mut sink = [0u8; 64];
            while matches!(w.read(&mut sink), Ok(n) if n > 0) {}
        }
        if sock_ready {
            self.read()?;
            self.flush()?;
        }
        Ok(())
    }

    /// Drives the TLS handshake to completion.
    pub fn handshake(
        &mut self,
        deadline: Instant,
        shutdown: &dyn Fn() -> bool,
    ) -> Result<(), ConnError> {
        while self.tls.is_handshaking() {
            if shutdown() {
                return Err(ConnError::Shutdown);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ConnError::Timeout("the TLS handshake"));
            }
            self.pump(None, Some(left.min(HANDSHAKE_POLL)))?;
            if self.eof && self.tls.is_handshaking() {
                return Err(ConnError::Closed);
            }
        }
        Ok(())
    }

    /// Waits for one whole value (handshake frames only).
    pub fn recv_value(
        &mut self,
        deadline: Instant,
        what: &'static str,
        shutdown: &dyn Fn() -> bool,
    ) -> Result<Value, ConnError> {
        loop {
            if let Some(v) = self.next_value()? {
                return Ok(v);
            }
            if shutdown() {
                return Err(ConnError::Shutdown);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ConnError::Timeout(what));
            }
            self.pump(None, Some(left.min(HANDSHAKE_POLL)))?;
        }
    }

    /// Flushes everything queued, up to `deadline` (handshake replies, goodbyes).
    pub fn flush_all(&mut self, deadline: Instant) -> Result<(), ConnError> {
        loop {
            self.flush()?;
            if !self.has_backlog() {
                return Ok(());
            }
            if self.eof {
                return Err(ConnError::Closed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ConnError::Timeout("the peer to read"));
            }
            self.wait(None, Some(left.min(HANDSHAKE_POLL)))?;
        }
    }

    /// Sends close_notify and whatever is still buffered, briefly.
    pub fn close(mut self) {
        self.tls.send_close_notify();
        let _ = self.flush_all(Instant::now() + Duration::from_millis(200));
    }

    /// The connected loop shared by client and server: forwards queued frames
    /// from `out`, hands every decoded value to `on_value`, until an error, EOF
    /// or the link is closed. `on_value` may queue replies on the transport.
    pub fn run(
        &mut self,
        out: &Outbound,
        mut on_value: impl FnMut(&mut Transport, Value) -> Result<(), ConnError>,
    ) -> Result<(), ConnError> {
        loop {
            // Move queued frames into rustls in batches. rustls is fed only
            // while it takes everything: a peer that stops reading stalls the
            // queue, which then refuses senders instead of growing unbounded.
            loop {
                while self.pending.len() - self.pending_off < WRITE_BATCH {
                    match out.rx.try_recv() {
                        Ok(frame) => self.queue(&frame),
                        Err(_) => break,
                    }
                }
                self.flush()?;
                if self.pending_off < self.pending.len() || out.rx.is_empty() {
                    break;
                }
            }
            if out.is_closed() {
                return Err(ConnError::Shutdown);
            }
            let mut completed = false;
            while let Some(v) = self.next_value()? {
                completed = true;
                on_value(self, v)?;
            }
            let partial = self
                .partial
                .check(self.dec.buffered(), completed, Instant::now())?;
            out.shared.parked.store(true, Ordering::SeqCst);
            // Decide to block only after the last flush, and re-check the
            // queue after arming: a frame queued before a sender could see
            // `parked` must not wait for the next socket event.
            self.flush()?;
            let ready = self.pending_off == self.pending.len() && !out.rx.is_empty();
            let timeout = if ready { Some(Duration::ZERO) } else { partial };
            self.wait(Some(&out.waker), timeout)?;
            out.shared.parked.store(false, Ordering::SeqCst);
        }
    }
}

/// How long a handshake step polls before re-checking for shutdown.
const HANDSHAKE_POLL: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ssntp::frame::FrameType;

    #[test]
    fn link_refuses_when_down_and_hands_frame_back() {
        let link = Link::new();
        let f = Frame::new(FrameType::Command, 2, [7; 16], b"x".to_vec());
        match link.send(f.clone()) {
            Err(SendError::NotConnected(back)) => assert_eq!(back, f),
            other => panic!("{other:?}"),
        }
        let out = link.up().expect("up").expect("not closed");
        link.send(f.clone()).expect("queued");
        assert_eq!(link.down(&out), vec![f.clone()]);
        assert!(matches!(
            link.send(f.clone()),
            Err(SendError::NotConnected(_))
        ));
        link.close();
        assert!(matches!(link.send(f), Err(SendError::Closed(_))));
        assert!(link.up().expect("pair").is_none());
    }

    #[test]
    fn a_begun_frame_must_be_completed_within_the_timeout() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut p = PartialFrame::new(s(60));
        // Idle: no bound at all, however long.
        assert!(matches!(p.check(0, false, t0), Ok(None)));
        assert!(matches!(p.check(0, false, t0 + s(3600)), Ok(None)));
        // Part of a message arrives: the clock starts.
        assert_eq!(p.check(10, false, t0 + s(100)).ok(), Some(Some(s(60))));
        // More bytes of the same message do not restart it...
        assert_eq!(p.check(500, false, t0 + s(130)).ok(), Some(Some(s(30))));
        // ...a message completed does (the next one has begun).
        assert_eq!(p.check(20, true, t0 + s(150)).ok(), Some(Some(s(60))));
        assert!(matches!(
            p.check(20, false, t0 + s(210)),
            Err(ConnError::Timeout("the rest of a frame"))
        ));
        // Everything taken: idle again.
        let mut p = PartialFrame::new(s(60));
        assert!(p.check(20, false, t0).is_ok());
        assert!(matches!(p.check(0, true, t0 + s(59)), Ok(None)));
        assert_eq!(p.check(5, false, t0 + s(1000)).ok(), Some(Some(s(60))));
    }

    #[test]
    fn full_queue_is_refused() {
        let link = Link::new();
        let _out = link.up().expect("up").expect("open");
        let f = Frame::new(FrameType::Command, 2, [0; 16], Vec::new());
        for _ in 0..OUTBOUND_QUEUE {
            link.send(f.clone()).expect("room");
        }
        assert!(matches!(link.send(f), Err(SendError::QueueFull(_))));
    }
}
