//! Connecting to a target.
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
