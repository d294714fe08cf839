//! The data path of one proxied connection: both directions at once, until both are done.
//!
//! - Each direction runs until its source sends FIN; the FIN is passed on as a half-close
//!   (`shutdown(SHUT_WR)` on the other socket) and the other direction keeps flowing, so
//!   protocols that half-close (a client that sends its request and shuts its write side, then
//!   waits for the whole reply) work.
//! - An error on either side (a reset, a write to a closed peer) ends both directions at once
//!   and the caller resets both sockets, so neither peer mistakes a cut stream for a complete
//!   one: data is never silently truncated.
//! - Each direction takes the zero-copy path on Linux unless `zeroCopy` is false, and falls back
//!   to a userspace copy if the kernel refuses splice for these sockets.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::TcpStream;

use super::copy;

/// Counts the bytes one direction delivered: into the target's counter (read by the metrics
/// exporter while the connection runs) and for this connection (its access-log line).
#[derive(Debug)]
pub struct Meter<'a> {
    total: &'a AtomicU64,
    this: AtomicU64,
}

impl<'a> Meter<'a> {
    pub fn new(total: &'a AtomicU64) -> Meter<'a> {
        Meter {
            total,
            this: AtomicU64::new(0),
        }
    }

    pub fn add(&self, n: usize) {
        self.total.fetch_add(n as u64, Ordering::Relaxed);
        self.this.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Bytes this connection delivered in this direction.
    pub fn bytes(&self) -> u64 {
        self.this.load(Ordering::Relaxed)
    }
}

/// Relays `client` ⇄ `server` until both directions have ended cleanly, or the first error.
pub async fn relay(
    client: &TcpStream,
    server: &TcpStream,
    zero_copy: bool,
    to_server: &Meter<'_>,
    to_client: &Meter<'_>,
) -> io::Result<()> {
    let up = forward(client, server, zero_copy, to_server);
    let down = forward(server, client, zero_copy, to_client);
    tokio::try_join!(up, down).map(|_| ())
}

/// One direction: `src` → `dst` until EOF, then half-close `dst`.
async fn forward(
    src: &TcpStream,
    dst: &TcpStream,
    zero_copy: bool,
    meter: &Meter<'_>,
) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    let spliced = zero_copy
        && matches!(
            super::splice::forward(src, dst, meter).await?,
            super::splice::Outcome::Eof
        );
    #[cfg(not(target_os = "linux"))]
    let spliced = {
        let _ = zero_copy;
        false
    };
    if !spliced {
        copy::forward(src, dst, meter).await?;
    }
    half_close(dst)
}

/// Passes a FIN on. A peer that is already gone (`ENOTCONN`) has nothing left to tell.
fn half_close(stream: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(stream).shutdown(Shutdown::Write) {
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}

/// Makes the coming close of `stream` abortive: SO_LINGER with a zero timeout turns close(2)
/// into a RST, which is how a peer learns that the stream was cut rather than complete.
pub fn reset_on_close(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
}
