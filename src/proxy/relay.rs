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
use std::time::Duration;

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

/// How a relay that did not fail ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Both directions reached EOF and passed it on.
    Complete,
    /// No byte moved either way for `idleTimeout`.
    Idle,
}

/// Relays `client` ⇄ `server` until both directions have ended cleanly, the first error, or
/// (with `idle` set) no byte moved either way for that long.
pub async fn relay(
    client: &TcpStream,
    server: &TcpStream,
    zero_copy: bool,
    idle: Option<Duration>,
    to_server: &Meter<'_>,
    to_client: &Meter<'_>,
) -> io::Result<Ended> {
    let up = forward(client, server, zero_copy, to_server);
    let down = forward(server, client, zero_copy, to_client);
    let both = async { tokio::try_join!(up, down).map(|_| Ended::Complete) };
    match idle {
        None => both.await,
        Some(idle) => tokio::select! {
            ended = both => ended,
            _ = idle_watch(idle, to_server, to_client) => Ok(Ended::Idle),
        },
    }
}

/// Returns once no byte has moved either way for `idle`. Checks the meters every eighth of
/// `idle` (at least every 10 ms) rather than reading a clock per chunk on the data path, so the
/// timeout fires between `idle` and `idle × 9/8` after the last byte.
async fn idle_watch(idle: Duration, up: &Meter<'_>, down: &Meter<'_>) {
    let step = (idle / 8).max(Duration::from_millis(10));
    let mut seen = up.bytes() + down.bytes();
    let mut quiet_since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(step).await;
        let now = up.bytes() + down.bytes();
        if now != seen {
            seen = now;
            quiet_since = tokio::time::Instant::now();
        } else if quiet_since.elapsed() >= idle {
            return;
        }
    }
}

/// One direction: `src` → `dst` until EOF, then half-close `dst`.
async fn forward(
    src: &TcpStream,
    dst: &TcpStream,
    zero_copy: bool,
    meter: &Meter<'_>,
) -> io::Result<()> {
    // A direction that cannot splice (the kernel refuses it for these sockets, or no file
    // descriptor is left for a pipe) goes on with a userspace copy: nothing is in flight in a
    // pipe when that happens, so the byte stream continues exactly where it was.
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
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
