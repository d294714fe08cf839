//! The listening socket and the accept loop.
//!
//! The accept loop must outlive every error a busy server meets. Out of file descriptors
//! (`EMFILE`/`ENFILE`, or `ENOBUFS`/`ENOMEM`: see [`is_fd_exhaustion`]), accept(2) fails while the pending connection stays in the backlog, so
//! the listener stays readable: retrying at once would spin a core doing nothing. The loop
//! backs off instead (1 ms, doubling to 1 s, reset by the next success), counts it, and logs at
//! most once a second. Every other accept error (a client that reset before we accepted, ...)
//! concerns one connection only: it is counted and the loop goes on.
//!
//! Unlike tokio's `examples/proxy.rs` (`while let Ok(..) = listener.accept().await`), nothing
//! here ends the loop but the shutdown signal.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use super::Proxy;
use crate::sockets::{is_fd_exhaustion, BACKLOG};

/// How an accept loop is told to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Keep accepting.
    Run,
    /// Accept what waits in the backlog, then close the listener (reload, shutdown).
    Close,
    /// Stop accepting and leave the backlog as it is: another holder of the same listening
    /// socket (the new process of an upgrade, or this one again) accepts it.
    Pause,
}

/// Accepts connections on `listener` and spawns a handler for each, until `shutdown` says
/// stop. Returning closes this descriptor of the listener: unless another process or
/// descriptor holds it, new connects are refused from then on.
///
/// On [`Stop::Close`], the connections already waiting in the backlog (their handshake done,
/// not yet accepted) are accepted and served first: closing a listener resets them otherwise,
/// which is the reload and shutdown edge case that resets clients of other balancers. On
/// [`Stop::Pause`] they are left for whoever accepts next.
pub async fn accept_loop(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    mut shutdown: watch::Receiver<Stop>,
) {
    const MIN_BACKOFF: Duration = Duration::from_millis(1);
    const MAX_BACKOFF: Duration = Duration::from_secs(1);
    let stats = &proxy.shared.stats;
    let mut backoff = MIN_BACKOFF;
    let mut last_log: Option<tokio::time::Instant> = None;
    // One wait for the stop signal for the whole loop, rather than a new one (a lock and a
    // waiter registration) per accept.
    let stop = shutdown.wait_for(|stop| *stop != Stop::Run);
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            biased;
            stop = &mut stop => return end(stop.map(|s| *s).ok(), listener, &proxy),
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, peer)) => {
                backoff = MIN_BACKOFF;
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(proxy.clone().handle(client, peer));
            }
            Err(error) if is_fd_exhaustion(&error) => {
                stats.accept_errors_fd_limit.fetch_add(1, Ordering::Relaxed);
                let now = tokio::time::Instant::now();
                if last_log.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
                    last_log = Some(now);
                    tracing::error!(
                        %error, backoff_ms = backoff.as_millis() as u64,
                        "out of file descriptors; pausing accept"
                    );
                }
                tokio::select! {
                    stop = &mut stop => return end(stop.map(|s| *s).ok(), listener, &proxy),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(error) => {
                stats.accept_errors_other.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%error, "accept failed");
            }
        }
    }
}

/// The end of an accept loop: paused (the backlog stays for another holder of the socket), or
/// closed (a dropped sender counts as closed).
fn end(stop: Option<Stop>, listener: TcpListener, proxy: &Arc<Proxy>) {
    match stop {
        Some(Stop::Pause) => drop(listener),
        _ => drain_backlog(listener, proxy),
    }
}

/// Accepts what is waiting in the backlog without waiting for more, then closes the listener.
fn drain_backlog(listener: TcpListener, proxy: &Arc<Proxy>) {
    let Ok(listener) = listener.into_std() else {
        return;
    };
    // Bounded: at most one backlog's worth, even if clients keep arriving meanwhile.
    for _ in 0..BACKLOG {
        let Ok((client, peer)) = listener.accept() else {
            break;
        };
        proxy.shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let _ = client.set_nonblocking(true);
        if let Ok(client) = tokio::net::TcpStream::from_std(client) {
            tokio::spawn(proxy.clone().handle(client, peer));
        }
    }
}
