//! Connecting to a target.
//!
//! A connect that is refused, unreachable, reset or slower than `connectTimeout` is a failed
//! connect: the caller deactivates the target and tries the next one, so the client never sees
//! the failed attempt. The timeout also covers a target whose accept queue is full, where the
//! kernel would otherwise retry the SYN for minutes.
//!
//! When the target's port is one stickylb listens on, the socket's local address is recorded in
//! [`OwnSockets`] as soon as connect(2) has started, before the handshake can complete: the
//! backstop against a target that loops back into stickylb (see `own_sockets.rs`).
//!
//! The end of the handshake is read from the readiness event, not asked with
//! getsockopt(SO_ERROR): a failed connect leaves the socket closed with an error, which epoll
//! reports as EPOLLHUP|EPOLLERR (tokio's "write closed"), while one that succeeded is just
//! writable. SO_ERROR is read only on failure, for the reason. That is one syscall less per
//! connection, as nginx and HAProxy do with their own event loops.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::own_sockets::{Held, OwnSockets};

/// Connects to `addr`, failing after `timeout`. The connection's local address stays in `own`
/// for as long as the returned [`Held`] lives.
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    own: &OwnSockets,
) -> io::Result<(TcpStream, Held<'_>)> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    // The kernel chose the source address and port inside connect(2).
    let held = own.hold_connecting(&socket, addr)?;
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    let established = async {
        // Writable once the handshake ended, either way: closed (with an error) if it failed.
        let ready = stream.ready(Interest::WRITABLE).await?;
        if !ready.is_write_closed() {
            return Ok(());
        }
        Err(stream.take_error()?.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::ConnectionReset,
                "closed during the handshake",
            )
        }))
    };
    match tokio::time::timeout(timeout, established).await {
        Ok(Ok(())) => Ok((stream, held)),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {} ms", timeout.as_millis()),
        )),
    }
}
