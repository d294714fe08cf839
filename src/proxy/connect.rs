//! Connecting to a target.
//!
//! A connect that is refused, unreachable, reset or slower than `connectTimeout` is a failed
//! connect: the caller deactivates the target and tries the next one, so the client never sees
//! the failed attempt. The timeout also covers a target whose accept queue is full, where the
//! kernel would otherwise retry the SYN for minutes.
//!
//! The socket's local address is recorded in [`OwnSockets`] as soon as connect(2) has started,
//! before the handshake can complete: the backstop against a target that loops back into
//! stickylb (see `own_sockets.rs`).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
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
    let held = match socket.local_addr()?.as_socket() {
        Some(local) => own.hold(local, addr),
        None => own.hold_nothing(),
    };
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    let established = async {
        // Writable once the handshake ended, either way; SO_ERROR says which.
        stream.writable().await?;
        match stream.take_error()? {
            Some(error) => Err(error),
            None => Ok(()),
        }
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
