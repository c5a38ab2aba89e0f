//! systemd's readiness protocol (`sd_notify(3)`) in a few lines, without
//! libsystemd: one datagram to the unix socket named by `$NOTIFY_SOCKET`
//! (a path, or `@name` in the abstract namespace). Without the variable
//! (not started by systemd with `Type=notify`) nothing is sent.
//!
//! `ciao-launcher` sends `READY=1` once its threads serve (instances
//! recovered, the scheduler being dialled: a node whose scheduler is away
//! is still up) and `STOPPING=1` on the first signal.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;

/// The variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` (newline-separated `KEY=value` assignments) to
/// `$NOTIFY_SOCKET`. `Ok(false)`: the variable is not set.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os(NOTIFY_SOCKET) {
        None => Ok(false),
        Some(s) if s.is_empty() => Ok(false),
        Some(s) => send(&s, state).map(|()| true),
    }
}

/// Sends `state` to the notification socket `socket` (as `$NOTIFY_SOCKET`
/// spells it).
pub fn send(socket: &OsStr, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let bytes = socket.as_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?
    } else if bytes.starts_with(b"/") {
        sock.send_to(state.as_bytes(), Path::new(socket))?
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{NOTIFY_SOCKET}={} is neither an absolute path nor @abstract",
                socket.to_string_lossy()
            ),
        ));
    };
    if sent != state.len() {
        return Err(io::Error::other("notification truncated"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn path_and_abstract_sockets_receive_the_state() {
        let dir = std::env::temp_dir().join(format!("notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).expect("bind");
        rx.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        send(path.as_os_str(), "READY=1\nSTATUS=x").expect("send");
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=x");
        let _ = std::fs::remove_dir_all(&dir);

        use std::os::linux::net::SocketAddrExt;
        let name = format!("ciao-notify-test-{}", std::process::id());
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract");
        let rx = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        rx.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        send(OsStr::new(&format!("@{name}")), "STOPPING=1").expect("send");
        let n = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn relative_socket_is_refused() {
        let e = send(OsStr::new("notify.sock"), "READY=1").expect_err("relative");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
