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
///
/// The bind itself is exclusive, so a port that another listener holds is an error naming it
/// (`EADDRINUSE`). Once listening, the socket gets SO_REUSEPORT, so that stickylb can later
/// bind a new listener beside it ([`bind_beside`]) when a reload moves `sourceHost` on the
/// same port (`0.0.0.0` → `127.0.0.1`): the new one accepts before the old one closes.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = listening(addr, false)?;
    socket.set_reuse_port(true)?;
    Ok(socket.into())
}

/// Binds `addr` beside a listener of ours on the same port that [`bind`] made (SO_REUSEPORT set
/// before the bind). Only for moving our own listener: another process's listener that also set
/// SO_REUSEPORT (same user) would be joined rather than reported.
pub fn bind_beside(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    Ok(listening(addr, true)?.into())
}

fn listening(addr: SocketAddr, reuse_port: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket)
}

/// `tcpKeepalive`: TCP keepalive on both sides of every proxied connection, so that a peer
/// that vanished without a FIN or RST (a crashed host, a dropped NAT entry) is found in
/// minutes: after `idle` without traffic, `count` probes `interval` apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub count: u32,
}

impl Default for Keepalive {
    /// Idle 60 s, interval 10 s, 6 probes: a dead peer is found within two minutes (design
    /// §10), instead of the kernel's 2 h 11 min.
    fn default() -> Self {
        Keepalive {
            idle: Duration::from_secs(60),
            interval: Duration::from_secs(10),
            count: 6,
        }
    }
}

/// TCP_NODELAY and the keepalive settings on a listener: Linux copies them to every accepted
/// socket (`tests/cuts.rs` checks it), which saves setsockopt(2) calls per client connection
/// (see [`tune`] for why they are set). Called again when a reload changes `tcpKeepalive`.
pub fn inherit_to_accepted<S: std::os::fd::AsFd>(
    listener: &S,
    keepalive: Option<&Keepalive>,
) -> io::Result<()> {
    let options = SockRef::from(listener);
    options.set_tcp_nodelay(true)?;
    set_keepalive(&options, keepalive)
}

/// TCP_NODELAY, because a proxy must not add Nagle's delay to small writes its peers already
/// decided to send; TCP keepalive with explicit times (see [`Keepalive`]), so that a peer that
/// vanished is noticed and its connection freed in minutes rather than the kernel's hours.
pub fn tune(stream: &TcpStream, keepalive: Option<&Keepalive>) {
    let _ = stream.set_nodelay(true);
    let _ = set_keepalive(&SockRef::from(stream), keepalive);
}

fn set_keepalive(socket: &SockRef<'_>, keepalive: Option<&Keepalive>) -> io::Result<()> {
    match keepalive {
        None => socket.set_keepalive(false),
        Some(k) => {
            let params = socket2::TcpKeepalive::new()
                .with_time(k.idle)
                .with_interval(k.interval)
                .with_retries(k.count);
            socket.set_tcp_keepalive(&params)
        }
    }
}

/// Makes the coming close of `stream` abortive: SO_LINGER with a zero timeout turns close(2)
/// into a RST, which is how a peer learns that the stream was cut rather than complete.
pub fn reset_on_close(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Bytes written to `stream` that the kernel has not sent yet (`SIOCOUTQNSD`): a reset now
/// would discard them. (Bytes sent and not yet acknowledged are with the peer already.)
pub fn unsent(stream: &TcpStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQNSD on a TCP socket we own writes one int; on failure we report 0.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::SIOCOUTQNSD as _, &mut queued) };
    if rc == 0 {
        usize::try_from(queued).unwrap_or(0)
    } else {
        0
    }
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
