//! systemd's readiness protocol (`sd_notify(3)`): one datagram of `KEY=VALUE` lines to the
//! socket named by `$NOTIFY_SOCKET`, sent when stickylb is ready (`READY=1`), when a new
//! process takes over in an upgrade (`MAINPID=<pid>` and `READY=1`, which the unit's
//! `NotifyAccess=all` lets a process other than the main one send), and when it starts to stop
//! (`STOPPING=1`).
//!
//! No library: std's `UnixDatagram` sends the datagram. A name starting with `@` is an abstract
//! socket (the `@` stands for the leading NUL byte), as systemd documents; any other name is a
//! path. Without `$NOTIFY_SOCKET` (not under systemd) nothing is sent.
//!
//! A leaf: the command line (first start, stop) and the upgrade coordinator (take-over) send.

use std::io;
use std::os::unix::net::UnixDatagram;

/// The variable systemd sets for a `Type=notify` service.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` (`READY=1`, `MAINPID=42\nREADY=1`, ...) to `$NOTIFY_SOCKET`. Returns false
/// when the variable is not set (nothing to tell), an error when the datagram cannot be sent.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os(NOTIFY_SOCKET) {
        Some(name) => send(name.as_encoded_bytes(), state).map(|()| true),
        None => Ok(false),
    }
}

/// Sends `state` to the socket `name` (`@abstract` or a path).
fn send(name: &[u8], state: &str) -> io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    let sent = match name.split_first() {
        Some((b'@', abstract_name)) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
            socket.send_to_addr(state.as_bytes(), &addr)?
        }
        Some(_) => {
            use std::os::unix::ffi::OsStrExt;
            socket.send_to(state.as_bytes(), std::ffi::OsStr::from_bytes(name))?
        }
        None => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "NOTIFY_SOCKET is empty",
            ))
        }
    };
    if sent != state.len() {
        return Err(io::Error::other("notification truncated"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_reaches_a_path_socket_and_an_abstract_one() {
        let dir = std::env::temp_dir().join(format!("stickylb-notify-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let receiver = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str().as_encoded_bytes(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let _ = std::fs::remove_dir_all(&dir);

        use std::os::linux::net::SocketAddrExt;
        let name = format!("stickylb-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&addr).unwrap();
        send(format!("@{name}").as_bytes(), "MAINPID=7\nREADY=1").unwrap();
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"MAINPID=7\nREADY=1");
    }

    #[test]
    fn an_empty_name_is_an_error() {
        assert!(send(b"", "READY=1").is_err());
    }
}
