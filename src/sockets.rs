//! Socket set-up shared by every part that opens one: listeners, the target side of a proxied
//! connection, and the classification of the OS errors they meet.
//!
//! A leaf: the proxy, the server, the reload path and the admin endpoint all bind listeners
//! and all must tell "the balancer is short of descriptors" from "a peer failed", so the rules
//! live here rather than in whichever of them came first.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::TcpStream;

/// Pending connections the kernel queues before we accept them. The kernel caps it at
/// `net.core.somaxconn`.
pub const BACKLOG: i32 = 4096;

/// Binds `addr` for listening: SO_REUSEADDR (restart while old connections sit in TIME_WAIT),
/// dual-stack when the address is `::`, non-blocking, with [`BACKLOG`]. The options accepted
/// sockets inherit are set by [`inherit_to_accepted`] when the listener starts serving,
/// whoever bound it.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// TCP_NODELAY and SO_KEEPALIVE on a listener: Linux copies both to every accepted socket,
/// which saves two setsockopt(2) per client connection (see [`tune`] for why they are set).
pub fn inherit_to_accepted(listener: &std::net::TcpListener) -> io::Result<()> {
    let options = SockRef::from(listener);
    options.set_tcp_nodelay(true)?;
    options.set_keepalive(true)
}

/// TCP_NODELAY, because a proxy must not add Nagle's delay to small writes its peers already
/// decided to send; SO_KEEPALIVE, so that a peer that vanished without a FIN or RST (a crashed
/// host, a dropped NAT entry) is eventually noticed and its connection freed (the kernel's
/// keepalive timers apply: `net.ipv4.tcp_keepalive_*`).
pub fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = SockRef::from(stream).set_keepalive(true);
}

/// Makes the coming close of `stream` abortive: SO_LINGER with a zero timeout turns close(2)
/// into a RST, which is how a peer learns that the stream was cut rather than complete.
pub fn reset_on_close(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// The balancer's own shortage, not a peer's fault: out of file descriptors or buffers, or out
/// of local ports for an outgoing connect.
pub fn is_local_shortage(error: &io::Error) -> bool {
    is_fd_exhaustion(error) || error.raw_os_error() == Some(libc::EADDRNOTAVAIL)
}

/// Out of file descriptors (`EMFILE`, `ENFILE`) or kernel memory for one (`ENOBUFS`, `ENOMEM`).
pub fn is_fd_exhaustion(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}
