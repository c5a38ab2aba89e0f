//! A small QMP (QEMU Machine Protocol) client: newline-delimited JSON over
//! the VM's unix socket.
//!
//! [`Qmp::connect`] reads the greeting, learns QEMU's pid from the socket's
//! peer credentials (`SO_PEERCRED`), negotiates capabilities and then hands
//! the read half to a reader thread (`qmp-<name>`) that turns each line into
//! a [`QmpMsg`] on a channel; the channel closes when QEMU closes the socket
//! (it exited). Commands are written by the owner, which reads their replies
//! from the same channel ([`Qmp::execute`]) — QMP answers in order, with
//! events interleaved. Dropping a `Qmp` shuts the socket down and joins the
//! reader; QEMU keeps running.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use serde_json::{Value, json};

/// A QMP line longer than this is a broken peer, not a message.
const MAX_LINE: usize = 1 << 20;

/// One message from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpMsg {
    /// The successful reply to the oldest outstanding command.
    Return(Value),
    /// The failed reply to the oldest outstanding command.
    Error(String),
    /// An asynchronous event (`SHUTDOWN`, `STOP`, `RESET`, …).
    Event(String, Value),
}

/// Why a QMP exchange failed.
#[derive(Debug)]
pub enum QmpError {
    Io(io::Error),
    /// QEMU said something that is not QMP.
    Protocol(String),
    /// QEMU answered the command with an error.
    Command(String),
    Timeout(&'static str),
    /// The socket closed: QEMU exited (or closed its monitor).
    Closed,
}

impl std::fmt::Display for QmpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QmpError::Io(e) => write!(f, "QMP: {e}"),
            QmpError::Protocol(m) => write!(f, "QMP protocol: {m}"),
            QmpError::Command(m) => write!(f, "QMP command failed: {m}"),
            QmpError::Timeout(what) => write!(f, "QMP: no answer to {what} in time"),
            QmpError::Closed => f.write_str("QMP: QEMU closed the connection"),
        }
    }
}

impl std::error::Error for QmpError {}

impl From<io::Error> for QmpError {
    fn from(e: io::Error) -> Self {
        QmpError::Io(e)
    }
}

/// An open, negotiated QMP connection.
#[derive(Debug)]
pub struct Qmp {
    stream: UnixStream,
    msgs: Receiver<QmpMsg>,
    reader: Option<JoinHandle<()>>,
    /// QEMU's pid, from the socket's peer credentials.
    pub pid: Option<i32>,
    /// QEMU's version (major, minor, micro) from the greeting.
    pub version: (u64, u64, u64),
}

impl Qmp {
    /// Connects to `path`, reads the greeting and negotiates capabilities,
    /// each step within `timeout`. `name` names the reader thread.
    pub fn connect(path: &Path, timeout: Duration, name: &str) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)?;
        let pid = peer_pid(&stream);
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let greeting = match read_line(&mut reader) {
            Ok(Some(l)) => l,
            Ok(None) => return Err(QmpError::Closed),
            Err(e) if is_timeout(&e) => return Err(QmpError::Timeout("the greeting")),
            Err(e) => return Err(e.into()),
        };
        let version = parse_greeting(&greeting)?;
        let (tx, msgs) = crossbeam_channel::unbounded();
        // Negotiated here, before the reader thread exists: on a loaded
        // host a new thread may wait a whole scheduling round before it
        // first runs, and "connected" should not wait for that.
        (&stream).write_all(b"{\"execute\": \"qmp_capabilities\"}\n")?;
        loop {
            let line = match read_line(&mut reader) {
                Ok(Some(l)) => l,
                Ok(None) => return Err(QmpError::Closed),
                Err(e) if is_timeout(&e) => return Err(QmpError::Timeout("qmp_capabilities")),
                Err(e) => return Err(e.into()),
            };
            if line.trim().is_empty() {
                continue;
            }
            match parse_msg(&line)? {
                QmpMsg::Return(_) => break,
                QmpMsg::Error(e) => return Err(QmpError::Command(e)),
                // Not expected before negotiation; kept for the reader's users.
                ev @ QmpMsg::Event(..) => {
                    let _ = tx.send(ev);
                }
            }
        }
        stream.set_read_timeout(None)?;
        let reader = thread::Builder::new()
            .name(format!("qmp-{name}"))
            .stack_size(128 * 1024)
            .spawn(move || {
                // Ends at EOF, on a read error (the socket was shut down) or
                // when nobody listens any more.
                while let Ok(Some(line)) = read_line(&mut reader) {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let msg = match parse_msg(&line) {
                        Ok(m) => m,
                        Err(e) => {
                            log::warn!("QMP: {e}");
                            continue;
                        }
                    };
                    if tx.send(msg).is_err() {
                        break;
                    }
                }
            })
            .map_err(QmpError::Io)?;
        Ok(Qmp {
            stream,
            msgs,
            reader: Some(reader),
            pid,
            version,
        })
    }

    /// The channel of QEMU's messages; disconnected once QEMU is gone.
    pub fn messages(&self) -> &Receiver<QmpMsg> {
        &self.msgs
    }

    /// Sends a command without waiting for its reply (which arrives on
    /// [`Qmp::messages`]).
    pub fn send(&mut self, command: &str, arguments: Option<Value>) -> Result<(), QmpError> {
        let mut req = json!({ "execute": command });
        if let Some(a) = arguments {
            req["arguments"] = a;
        }
        let mut line = req.to_string();
        line.push('\n');
        self.stream.write_all(line.as_bytes()).map_err(|e| {
            if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) {
                QmpError::Closed
            } else {
                QmpError::Io(e)
            }
        })
    }

    /// Sends a command and waits up to `timeout` for its reply; events that
    /// arrive meanwhile are handed to `on_event`.
    pub fn execute(
        &mut self,
        command: &'static str,
        arguments: Option<Value>,
        timeout: Duration,
        on_event: &mut dyn FnMut(&str, &Value),
    ) -> Result<Value, QmpError> {
        self.send(command, arguments)?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.msgs.recv_timeout(left) {
                Ok(QmpMsg::Return(v)) => return Ok(v),
                Ok(QmpMsg::Error(e)) => return Err(QmpError::Command(e)),
                Ok(QmpMsg::Event(name, data)) => on_event(&name, &data),
                Err(RecvTimeoutError::Timeout) => return Err(QmpError::Timeout(command)),
                Err(RecvTimeoutError::Disconnected) => return Err(QmpError::Closed),
            }
        }
    }
}

impl Drop for Qmp {
    /// Detaches: the reader sees the shut-down socket and ends; QEMU runs on.
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// The pid of the process at the other end of a unix socket.
pub fn peer_pid(stream: &UnixStream) -> Option<i32> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    getsockopt(stream, PeerCredentials)
        .ok()
        .map(|c| c.pid())
        .filter(|p| *p > 0)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// One line (without its end), at most [`MAX_LINE`] bytes; `None` at EOF.
fn read_line(r: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = r.take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        if buf.len() > MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "QMP line longer than 1 MiB",
            ));
        }
        // EOF in the middle of a line: QEMU died while writing.
        return Ok(None);
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "QMP line is not UTF-8"))
}

/// The version from `{"QMP": {"version": {"qemu": {...}}, "capabilities": [...]}}`.
pub fn parse_greeting(line: &str) -> Result<(u64, u64, u64), QmpError> {
    let v: Value = serde_json::from_str(line)
        .map_err(|e| QmpError::Protocol(format!("greeting is not JSON: {e}")))?;
    let q = v
        .get("QMP")
        .and_then(|q| q.get("version"))
        .and_then(|v| v.get("qemu"))
        .ok_or_else(|| QmpError::Protocol("greeting without a QEMU version".into()))?;
    let n = |k: &str| q.get(k).and_then(Value::as_u64);
    match (n("major"), n("minor"), n("micro")) {
        (Some(a), Some(b), Some(c)) => Ok((a, b, c)),
        _ => Err(QmpError::Protocol(
            "greeting with a malformed version".into(),
        )),
    }
}

/// Classifies one QMP line.
pub fn parse_msg(line: &str) -> Result<QmpMsg, QmpError> {
    let v: Value = serde_json::from_str(line)
        .map_err(|e| QmpError::Protocol(format!("not JSON ({e}): {:.80}", line)))?;
    if let Some(r) = v.get("return") {
        return Ok(QmpMsg::Return(r.clone()));
    }
    if let Some(e) = v.get("error") {
        let class = e.get("class").and_then(Value::as_str).unwrap_or("Error");
        let desc = e.get("desc").and_then(Value::as_str).unwrap_or("");
        return Ok(QmpMsg::Error(format!("{class}: {desc}")));
    }
    if let Some(ev) = v.get("event").and_then(Value::as_str) {
        let data = v.get("data").cloned().unwrap_or(Value::Null);
        return Ok(QmpMsg::Event(ev.to_string(), data));
    }
    Err(QmpError::Protocol(format!(
        "neither a reply nor an event: {:.80}",
        line
    )))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn greeting_and_messages() {
        let g = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}"#;
        assert_eq!(parse_greeting(g).unwrap(), (7, 2, 22));
        assert!(parse_greeting(r#"{"QMP": {}}"#).is_err());
        assert!(parse_greeting("nonsense").is_err());
        assert_eq!(
            parse_msg(r#"{"return": {}}"#).unwrap(),
            QmpMsg::Return(json!({}))
        );
        assert_eq!(
            parse_msg(r#"{"error": {"class": "GenericError", "desc": "no such device"}}"#).unwrap(),
            QmpMsg::Error("GenericError: no such device".into())
        );
        assert_eq!(
            parse_msg(r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {"guest": true}}"#).unwrap(),
            QmpMsg::Event("SHUTDOWN".into(), json!({"guest": true}))
        );
        assert!(parse_msg(r#"{"x": 1}"#).is_err());
    }

    #[test]
    fn lines_are_bounded() {
        let mut r = io::Cursor::new(b"{\"a\":1}\n{\"b\"".to_vec());
        assert_eq!(read_line(&mut r).unwrap().as_deref(), Some("{\"a\":1}\n"));
        // A torn last line is EOF, not a message.
        assert_eq!(read_line(&mut r).unwrap(), None);
        let mut big = vec![b'x'; MAX_LINE + 10];
        big.push(b'\n');
        let mut r = io::Cursor::new(big);
        assert!(read_line(&mut r).is_err());
    }
}
