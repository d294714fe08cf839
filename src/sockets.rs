//! Socket set-up shared by every part that opens one: listeners, the target side of a proxied
//! connection, and the classification of the OS errors they meet.
//!
//! A leaf: the proxy, the server, the reload path and the admin endpoint all bind listeners
//! and all must tell "the balancer is short of descriptors" from "a peer failed", so the rules
//! live here rather than in whichever of them came first.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};

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
/// (A new target socket gets them one at a time, when they start to matter: see
/// `proxy/relay.rs`.)
pub fn tune(stream: &impl AsFd, keepalive: Option<&Keepalive>) {
    nodelay(stream);
    let _ = set_keepalive(&SockRef::from(stream), keepalive);
}

/// TCP_NODELAY on `stream` (see [`tune`]). A failure (the peer is gone) leaves nothing to do.
pub fn nodelay(stream: &impl AsFd) {
    let _ = SockRef::from(stream).set_tcp_nodelay(true);
}

/// TCP keepalive with `keepalive`'s times on `stream` (see [`tune`]).
pub fn keepalive(stream: &impl AsFd, keepalive: &Keepalive) {
    let _ = set_keepalive(&SockRef::from(stream), Some(keepalive));
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
pub fn reset_on_close(stream: &impl AsFd) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Bytes written to `stream` that the kernel has not sent yet (`SIOCOUTQNSD`): a reset now
/// would discard them. (Bytes sent and not yet acknowledged are with the peer already.)
pub fn unsent(stream: &impl AsFd) -> usize {
    use std::os::fd::AsRawFd;
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQNSD on a TCP socket we own writes one int; on failure we report 0.
    let rc = unsafe {
        libc::ioctl(
            stream.as_fd().as_raw_fd(),
            libc::SIOCOUTQNSD as _,
            &mut queued,
        )
    };
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

/// What went wrong with a target: the reason of its last failed connect or health check, as
/// the status page shows it. A small enum, so the failure path stores it in an atomic
/// ([`Fault::code`]) instead of formatting a string per failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    /// Nothing listens there (`ECONNREFUSED`).
    Refused = 1,
    /// No answer in time (`connectTimeout`, the check's `timeout`, or the kernel's).
    Timeout = 2,
    /// The peer reset the connection (or it was aborted, or the pipe broke).
    Reset = 3,
    /// No route to the host or its network (`EHOSTUNREACH`, `ENETUNREACH`, ...).
    Unreachable = 4,
    /// A health check's target closed before the `expect`ed reply.
    Closed = 5,
    /// A health check's `expect` was not in the first bytes of the reply.
    Unexpected = 6,
    /// Any other error.
    Other = 7,
}

impl Fault {
    /// Every fault, in code order.
    pub const ALL: [Fault; 7] = [
        Fault::Refused,
        Fault::Timeout,
        Fault::Reset,
        Fault::Unreachable,
        Fault::Closed,
        Fault::Unexpected,
        Fault::Other,
    ];

    /// The class of a failed connect, send or receive.
    pub fn of(error: &io::Error) -> Fault {
        match error.kind() {
            io::ErrorKind::ConnectionRefused => return Fault::Refused,
            io::ErrorKind::TimedOut => return Fault::Timeout,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => return Fault::Reset,
            _ => {}
        }
        match error.raw_os_error() {
            Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN | libc::ENETDOWN) => {
                Fault::Unreachable
            }
            _ => Fault::Other,
        }
    }

    /// Its code in an atomic: never 0, which means "none".
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The fault whose [`Fault::code`] is `code`; `None` for 0 (or any unknown code).
    pub fn from_code(code: u8) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.code() == code)
    }

    /// Its name in the status JSON (`reason`).
    pub fn label(self) -> &'static str {
        match self {
            Fault::Refused => "refused",
            Fault::Timeout => "timeout",
            Fault::Reset => "reset",
            Fault::Unreachable => "unreachable",
            Fault::Closed => "closed",
            Fault::Unexpected => "unexpected_reply",
            Fault::Other => "error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_errors_are_classed_by_kind_and_errno() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(Fault::of(&os(libc::ECONNREFUSED)), Fault::Refused);
        assert_eq!(Fault::of(&os(libc::ETIMEDOUT)), Fault::Timeout);
        assert_eq!(
            Fault::of(&io::Error::new(io::ErrorKind::TimedOut, "no answer")),
            Fault::Timeout
        );
        assert_eq!(Fault::of(&os(libc::ECONNRESET)), Fault::Reset);
        assert_eq!(Fault::of(&os(libc::EPIPE)), Fault::Reset);
        assert_eq!(Fault::of(&os(libc::EHOSTUNREACH)), Fault::Unreachable);
        assert_eq!(Fault::of(&os(libc::ENETUNREACH)), Fault::Unreachable);
        assert_eq!(Fault::of(&os(libc::EACCES)), Fault::Other);
    }

    #[test]
    fn codes_round_trip_and_zero_is_none() {
        for fault in Fault::ALL {
            assert_ne!(fault.code(), 0);
            assert_eq!(Fault::from_code(fault.code()), Some(fault));
        }
        assert_eq!(Fault::from_code(0), None);
    }
}
