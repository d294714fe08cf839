//! Connecting to a target, and the socket options both sides of a proxied connection get.
//!
//! A connect that is refused, unreachable, reset or slower than `connectTimeout` is a failed
//! connect: the caller deactivates the target and tries the next one, so the client never sees
//! the failed attempt. The timeout also covers a target whose accept queue is full, where the
//! kernel would otherwise retry the SYN for minutes.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

/// Connects to `addr`, failing after `timeout`.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {} ms", timeout.as_millis()),
        )),
    }
}

/// TCP_NODELAY, because a proxy must not add Nagle's delay to small writes its peers already
/// decided to send; SO_KEEPALIVE, so that a peer that vanished without a FIN or RST (a crashed
/// host, a dropped NAT entry) is eventually noticed and its connection freed (the kernel's
/// keepalive timers apply: `net.ipv4.tcp_keepalive_*`).
pub fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(stream).set_keepalive(true);
}
