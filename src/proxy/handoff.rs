//! An upgrade's side of the data path (design §13): a running connection leaves this process
//! for a new one without its peers noticing, and a connection an older process left is taken
//! up here.
//!
//! **Leaving.** Every connection in its relay stage waits on the [`Handover`] signal beside
//! its relay and the shutdown cut (one more `Notify` arm: nothing else is paid per connection
//! while no upgrade runs). When an upgrade starts, each handler stops its relay between two
//! polls, which is a consistent state: every byte is either still in a socket, or held by one
//! direction (its copy buffer's `[written..chunk]`, or its pipe), or delivered and counted. The
//! handler then sends a [`Handoff`] to the upgrade coordinator: a record of its relay (the
//! copy buffers' bytes copied, the sockets' and pipes' descriptors lent, its client, target,
//! start time and byte counts) and a channel for the [`Verdict`]. It keeps everything it
//! holds until the verdict: on [`Verdict::Taken`] (the new process has its own descriptors of
//! the sockets and the pipes, and took over) it closes its descriptors *without* resetting
//! anything (the sockets live on in the new process; a reset here would set `SO_LINGER` on the
//! shared socket), and ends without counting the connection as closed; on [`Verdict::Keep`]
//! (the upgrade failed) it goes on relaying where it stopped, as if nothing had happened.
//!
//! A relay whose one direction already failed (it is delivering its last bytes for at most
//! `relay::DRAIN_GRACE`) is not handed over: it ends here, and counts as staying
//! ([`Handover::staying`]). Connections still connecting or reading a PROXY header when the
//! upgrade starts go on here; they hand themselves over when they reach the relay stage (the
//! coordinator sends them late, after the commit), or end here.
//!
//! **Taking up.** [`Checked::new`] checks a record an older process sent (its descriptors are
//! TCP sockets, its directions are states a relay can be in, a pipe holds exactly the bytes
//! the record says) and registers the sockets with this runtime, as the records arrive;
//! [`Checked::on`] then puts it on its target's state once the state has come, and
//! `Proxy::resume` runs the same relay stage as a fresh connection, on the directions as they
//! were.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;

use super::relay::{Direction, Relay};
use crate::balance::target::TargetState;
use crate::balance::Shared;
use crate::handover;

/// The signal of an upgrade collecting connections, as every handler sees it, and where the
/// handlers send them.
#[derive(Debug, Default)]
pub(crate) struct Handover {
    /// Odd while an upgrade collects connections; each upgrade moves it on by two.
    epoch: AtomicU64,
    notify: Notify,
    /// Where handoffs go while an upgrade collects.
    sink: Mutex<Option<mpsc::UnboundedSender<Handoff>>>,
    /// Relays that saw an upgrade while failing (they end here within `DRAIN_GRACE`).
    staying: AtomicU64,
}

/// One connection offered to the coordinator.
#[derive(Debug)]
pub(crate) struct Handoff {
    /// Its record. The descriptors in it are lent: they stay open until `verdict` is answered
    /// or dropped, and the coordinator uses them only before that.
    pub(crate) connection: handover::Connection<RawFd>,
    pub(crate) verdict: oneshot::Sender<Verdict>,
}

/// What becomes of a connection offered to the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The new process took it over: close quietly and end.
    Taken,
    /// The upgrade failed or is over: go on relaying here.
    Keep,
}

impl Handover {
    /// Starts collecting: every handler in its relay stage (and every one that reaches it
    /// until [`Handover::end`]) sends its [`Handoff`] to the returned receiver.
    pub(crate) fn begin(&self) -> mpsc::UnboundedReceiver<Handoff> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.lock() = Some(tx);
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_waiters();
        rx
    }

    /// Stops collecting: handlers relay on (and a handoff sent meanwhile gets no taker: its
    /// handler keeps it).
    pub(crate) fn end(&self) {
        *self.lock() = None;
        if self.epoch.load(Ordering::SeqCst) % 2 == 1 {
            self.epoch.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Failing relays that saw this upgrade and end here.
    pub(crate) fn staying(&self) -> u64 {
        self.staying.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<mpsc::UnboundedSender<Handoff>>> {
        self.sink.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Completes when an upgrade other than `seen` collects, and records it in `seen`.
    pub(super) async fn wait(&self, seen: &mut u64) {
        loop {
            // Made before the epoch is read, so a `begin` between the two is not missed.
            let notified = self.notify.notified();
            let epoch = self.epoch.load(Ordering::SeqCst);
            if epoch % 2 == 1 && epoch != *seen {
                *seen = epoch;
                return;
            }
            notified.await;
        }
    }

    /// Offers a connection and waits for the verdict: [`Verdict::Keep`] when no upgrade
    /// collects any more, or the coordinator went away without answering.
    pub(super) async fn hand_off(&self, connection: handover::Connection<RawFd>) -> Verdict {
        let (verdict, answer) = oneshot::channel();
        let sent = match &*self.lock() {
            Some(sink) => sink
                .send(Handoff {
                    connection,
                    verdict,
                })
                .is_ok(),
            None => false,
        };
        if !sent {
            return Verdict::Keep;
        }
        answer.await.unwrap_or(Verdict::Keep)
    }

    /// Counts a failing relay as staying here until the returned guard drops.
    pub(super) fn stay(&self) -> Staying<'_> {
        self.staying.fetch_add(1, Ordering::SeqCst);
        Staying(self)
    }
}

/// A failing relay that stays in this process (see [`Handover::stay`]).
pub(super) struct Staying<'a>(&'a Handover);

impl Drop for Staying<'_> {
    fn drop(&mut self) {
        self.0.staying.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the relay stage of a connection knows besides its sockets: for its access-log line and
/// for the record of a handoff.
pub(super) struct Proxied<'a> {
    /// The client (the peer, or the one a PROXY header named).
    pub(super) peer: SocketAddr,
    pub(super) target: &'a TargetState,
    /// Holds an open count in its client's session.
    pub(super) pinned: bool,
    pub(super) accepted: Instant,
    /// When it was proxied; measured only with the access log on.
    pub(super) proxied: Option<Instant>,
}

impl Proxied<'_> {
    /// The record of this connection, its relay stopped between two polls.
    pub(super) fn record(
        &self,
        relay: &Relay<'_>,
        to_target: u64,
        to_client: u64,
    ) -> handover::Connection<RawFd> {
        let ([up, down], quiet) = relay.record();
        let (client, server) = relay.fds();
        let micros = |since: Instant| u64::try_from(since.elapsed().as_micros()).unwrap_or(0);
        handover::Connection {
            client,
            server,
            peer: self.peer,
            target: self.target.id.to_string(),
            pinned: self.pinned,
            age_us: micros(self.accepted),
            proxied_us: self.proxied.map(micros),
            to_target,
            to_client,
            quiet_ms: quiet.map(|q| u64::try_from(q.as_millis()).unwrap_or(u64::MAX)),
            up,
            down,
        }
    }
}

/// A connection an older process handed over, checked and registered with this runtime,
/// ready for `Proxy::resume` once it is on its target's state (`T`: the target's identity
/// until then, see [`Checked`]).
///
/// The sockets are checked but not yet registered with the runtime's reactor: each connection's
/// own task registers its two when it starts (after the commit), so that the registrations of
/// thousands of connections are spread over the worker threads instead of delaying the commit.
#[derive(Debug)]
pub(crate) struct Resumed<T = Arc<TargetState>> {
    pub(super) client: std::net::TcpStream,
    pub(super) server: std::net::TcpStream,
    pub(super) peer: SocketAddr,
    pub(super) target: T,
    pub(super) pinned: bool,
    pub(super) accepted: Instant,
    pub(super) proxied: Option<Instant>,
    pub(super) to_target: u64,
    pub(super) to_client: u64,
    pub(super) quiet: Option<Duration>,
    pub(super) directions: [Direction; 2],
}

/// A connection record checked and registered with this runtime as it arrived, its target
/// known by identity only: the target states come with the runtime state, after the
/// connections (see [`Checked::on`]).
pub(crate) type Checked = Resumed<String>;

impl Checked {
    /// Checks `record` and takes its descriptors: both sockets must be non-blocking TCP
    /// sockets, both directions states a relay can be in. `zero_copy`: this process's
    /// `zeroCopy`.
    pub(crate) fn new(
        record: handover::Connection<OwnedFd>,
        zero_copy: bool,
    ) -> Result<Checked, String> {
        let client = stream(record.client).map_err(|e| format!("client socket: {e}"))?;
        let server = stream(record.server).map_err(|e| format!("target socket: {e}"))?;
        let up = Direction::resume(record.up, zero_copy).map_err(|e| format!("upload: {e}"))?;
        let down =
            Direction::resume(record.down, zero_copy).map_err(|e| format!("download: {e}"))?;
        let now = Instant::now();
        let ago = |us: u64| now.checked_sub(Duration::from_micros(us)).unwrap_or(now);
        Ok(Resumed {
            client,
            server,
            peer: record.peer,
            target: record.target,
            pinned: record.pinned,
            accepted: ago(record.age_us),
            proxied: record.proxied_us.map(ago),
            to_target: record.to_target,
            to_client: record.to_client,
            quiet: record.quiet_ms.map(Duration::from_millis),
            directions: [up, down],
        })
    }

    /// The connection on its target identity's state, found (or made, draining) in
    /// `shared`'s registry.
    pub(crate) fn on(self, shared: &Shared) -> Resumed {
        Resumed {
            target: shared
                .registry
                .get_or_absent(&self.target, shared.clock.now_ms()),
            client: self.client,
            server: self.server,
            peer: self.peer,
            pinned: self.pinned,
            accepted: self.accepted,
            proxied: self.proxied,
            to_target: self.to_target,
            to_client: self.to_client,
            quiet: self.quiet,
            directions: self.directions,
        }
    }
}

/// A handed-over socket: it must be a TCP socket (IPv4 or IPv6), non-blocking (as every socket
/// of ours is: the flag belongs to the socket's open file, shared with the old process). Two
/// system calls: thousands of these stand between the old process's collection and the commit.
fn stream(fd: OwnedFd) -> std::io::Result<std::net::TcpStream> {
    let socket = socket2::Socket::from(fd);
    if socket.protocol()? != Some(socket2::Protocol::TCP) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a TCP socket",
        ));
    }
    // SAFETY: F_GETFL on a descriptor we own.
    let flags = unsafe { libc::fcntl(socket.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK == 0 {
        socket.set_nonblocking(true)?;
    }
    Ok(std::net::TcpStream::from(socket))
}
