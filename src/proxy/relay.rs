//! The data path of one proxied connection: both directions at once, until both are done.
//!
//! - Each direction runs until its source sends FIN; the FIN is passed on as a half-close
//!   (`shutdown(SHUT_WR)` on the other socket) and the other direction keeps flowing, so
//!   protocols that half-close (a client that sends its request and shuts its write side, then
//!   waits for the whole reply) work.
//! - An error on one side (a reset, a write to a closed peer) ends the connection, and the
//!   caller resets both sockets, so neither peer mistakes a cut stream for a complete one: data
//!   is never silently truncated. Before that, the other direction delivers what it already
//!   received from its peer (what stickylb holds, what waits in the socket, and what its own
//!   send queue has not sent yet, which a reset would discard), for at most [`DRAIN_GRACE`]: a
//!   target's early answer followed by a close (an HTTP 413 during an upload) reaches the
//!   client.
//! - `idleTimeout` measures inactivity: every byte written either way counts as it is written,
//!   so a slow but live transfer is never cut. An idle connection with nothing in flight ends
//!   with a FIN (as servers close idle keep-alive connections); one whose bytes sit in
//!   stickylb's pipe or buffer because a peer stopped reading is cut (reset).
//! - Each direction copies small messages in userspace and splices bulk transfers on Linux
//!   (unless `zeroCopy` is false), switching per direction as the traffic changes; it keeps
//!   copying if the kernel refuses splice for these sockets, no fd is left for a pipe, or the
//!   pipe it gets is smaller than the copy buffer (the per-user pipe budget is spent).
//! - A splicing direction whose destination takes no more takes its source off the reactor's
//!   read interest until it finds the source empty (see `relay_socket.rs`): otherwise every
//!   segment arriving from a client faster than its target wakes a thread that cannot read it
//!   yet. The relay owns both sockets for that, and resets both if it is dropped before it
//!   ended cleanly.
//! - The target socket is tuned as late as it can be without changing what happens on the
//!   wire, so that a short connection does not pay for options it never needs (see [`Fresh`]):
//!   TCP_NODELAY before the second write to it (Nagle's algorithm holds back only a small
//!   segment sent while an earlier one is unacknowledged, so the first write leaves at once
//!   either way), and `tcpKeepalive` once the connection has lived [`KEEPALIVE_AFTER`]
//!   (keepalive probes only a connection idle for `idle`, at least a second). The client socket
//!   inherits both from the listener.

use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::copy;
use super::cut::{Cut, How, Side};
use super::relay_socket::{self, RelaySocket};
#[cfg(target_os = "linux")]
use super::splice;
use crate::handover;
use crate::sockets::{self, Keepalive};

/// How long a connection lives before its target socket gets `tcpKeepalive` (see the module
/// comment): the first probe then leaves at most this much later than `idle` says.
pub(crate) const KEEPALIVE_AFTER: Duration = Duration::from_secs(1);

/// After one direction failed, how long the other may take to deliver what it already
/// received before both sides are reset. Bounded, because its reader may never read.
pub(crate) const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// Counts the bytes one direction delivered, as they are written: into the target's counter
/// (read by the metrics exporter while the connection runs) and for this connection (its
/// access-log line and the idle timeout).
#[derive(Debug)]
pub(crate) struct Meter<'a> {
    total: &'a AtomicU64,
    this: AtomicU64,
}

impl<'a> Meter<'a> {
    pub(crate) fn new(total: &'a AtomicU64) -> Meter<'a> {
        Meter::resumed(total, 0)
    }

    /// A meter for a connection that already delivered `this` bytes (in an older process):
    /// they are in the total already.
    pub(crate) fn resumed(total: &'a AtomicU64, this: u64) -> Meter<'a> {
        Meter {
            total,
            this: AtomicU64::new(this),
        }
    }

    fn add(&self, n: usize) {
        self.total.fetch_add(n as u64, Ordering::Relaxed);
        self.this.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Bytes this connection delivered in this direction.
    pub(crate) fn bytes(&self) -> u64 {
        self.this.load(Ordering::Relaxed)
    }
}

/// How a relay that was not cut ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Both directions reached EOF and passed it on.
    Complete,
    /// No byte moved either way for `idleTimeout`, and nothing was in flight: both sides can
    /// be closed with a FIN.
    Idle,
}

/// A target socket fresh from connect(2), with neither TCP_NODELAY nor keepalive set: the relay
/// sets them when they start to matter (see the module comment).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fresh<'a> {
    /// `tcpKeepalive`, to set after [`KEEPALIVE_AFTER`] (`None`: off, as a new socket is).
    pub keepalive: Option<&'a Keepalive>,
    /// Bytes were written to the socket already (a PROXY header): the relay's first write is
    /// a second one.
    pub wrote: bool,
}

/// Relays `client` ⇄ `server` until both directions have ended cleanly, a cut, or (with
/// `idle` set) no byte moved either way for that long. `server` is [`Fresh`]. The relay owns
/// both sockets from here on (it changes their registration with the reactor, see
/// `relay_socket.rs`) and resets both when dropped unless it ended cleanly (or
/// [`Relay::handed_over`]).
pub(crate) fn relay<'a>(
    client: TcpStream,
    server: TcpStream,
    zero_copy: bool,
    idle: Option<Duration>,
    fresh: Fresh<'a>,
    to_server: &'a Meter<'a>,
    to_client: &'a Meter<'a>,
) -> Relay<'a> {
    let mut up = Direction::new(zero_copy);
    up.nodelay = NoDelay::Unset { wrote: fresh.wrote };
    let down = Direction::new(zero_copy);
    let mut relay = resume(client, server, [up, down], idle, None, to_server, to_client);
    relay.keepalive = fresh
        .keepalive
        .map(|keepalive| (Box::pin(tokio::time::sleep(KEEPALIVE_AFTER)), keepalive));
    relay
}

/// The relay of a connection that an older process had relayed (see [`Direction::resume`]):
/// its directions as they were, and the time since a byte last moved (`quiet`), so the idle
/// timeout goes on counting where it was. Its target socket is tuned already.
pub(crate) fn resume<'a>(
    client: TcpStream,
    server: TcpStream,
    [up, down]: [Direction; 2],
    idle: Option<Duration>,
    quiet: Option<Duration>,
    to_server: &'a Meter<'a>,
    to_client: &'a Meter<'a>,
) -> Relay<'a> {
    let moved = to_server.bytes() + to_client.bytes();
    Relay {
        client: RelaySocket::new(client),
        server: RelaySocket::new(server),
        reset_on_drop: true,
        up,
        down,
        to_server,
        to_client,
        idle: idle.map(|idle| IdleWatch::new(idle, moved, quiet.unwrap_or_default())),
        keepalive: None,
        failed: None,
    }
}

/// The relay of one connection, as a hand-written future rather than an `async fn`: each
/// direction is a small state machine driven by the sockets' `poll_*_ready`, so an idle
/// connection's task holds a couple of hundred bytes of state instead of the nested readiness
/// futures an `async` version keeps alive (which made up most of an idle connection's memory).
/// Each socket has one reader and one writer: the up direction reads the client and writes the
/// server, the down direction the reverse, which is exactly what `poll_read_ready` and
/// `poll_write_ready` (one waker each) allow.
#[derive(Debug)]
pub(crate) struct Relay<'a> {
    client: RelaySocket,
    server: RelaySocket,
    /// Whether dropping the relay resets both sockets: until it ends cleanly (or
    /// [`Relay::handed_over`]), so that every cut, including one that drops the handler (a
    /// panic, the runtime shutting down), reaches the peers as a reset, never as a FIN they
    /// would take for the end of the stream.
    reset_on_drop: bool,
    up: Direction,
    down: Direction,
    to_server: &'a Meter<'a>,
    to_client: &'a Meter<'a>,
    idle: Option<IdleWatch>,
    /// `tcpKeepalive` for the target socket and when to set it, until it is set (see
    /// [`Fresh`]). The timer is boxed so that `Relay` stays `Unpin` and small, and freed once
    /// it fired.
    keepalive: Option<(Pin<Box<tokio::time::Sleep>>, &'a Keepalive)>,
    /// Set once a direction failed: the cut to report once the other one has delivered what
    /// it holds.
    failed: Option<Failed>,
}

/// A failed direction, and the other one's last chance to deliver.
#[derive(Debug)]
struct Failed {
    cut: Cut,
    /// The direction that still delivers (`None`: it had ended already, or has delivered).
    survivor: Option<Which>,
    /// Where the surviving direction delivers: the reset waits until its send queue is sent.
    flush: Which,
    /// Boxed so that `Relay` stays `Unpin`; allocated only when a connection fails.
    grace: Pin<Box<tokio::time::Sleep>>,
    /// The next look at the send queue (the kernel signals no readiness for "all sent").
    tick: Pin<Box<tokio::time::Sleep>>,
}

/// How often a failing connection looks whether its last bytes have left.
const FLUSH_TICK: Duration = Duration::from_millis(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Up,
    Down,
}

impl Relay<'_> {
    /// Direction `which` failed with `fault`: its source failed on a read, its destination on
    /// a write. The other direction, unless ended, now delivers what it already has.
    fn fail(&mut self, which: Which, fault: Fault) {
        let (source, destination, other) = match which {
            Which::Up => (Side::Client, Side::Target, &self.down),
            Which::Down => (Side::Target, Side::Client, &self.up),
        };
        let side = if fault.on_write { destination } else { source };
        let survivor = match which {
            Which::Up => Which::Down,
            Which::Down => Which::Up,
        };
        self.failed = Some(Failed {
            cut: Cut::io(side, fault.error),
            survivor: (!other.ended).then_some(survivor),
            flush: survivor,
            grace: Box::pin(tokio::time::sleep(DRAIN_GRACE)),
            tick: Box::pin(tokio::time::sleep(Duration::ZERO)),
        });
    }

    /// Whether any byte read from one peer is held by stickylb, not yet written to the other.
    fn holding(&self) -> bool {
        self.up.holding() || self.down.holding()
    }
}

impl Future for Relay<'_> {
    type Output = Result<Ended, Cut>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Ended, Cut>> {
        // Every field is Unpin (the timers are boxed).
        let this = self.get_mut();
        if let Some((timer, keepalive)) = &mut this.keepalive {
            if timer.as_mut().poll(cx).is_ready() {
                if let Some(fd) = this.server.fd() {
                    sockets::keepalive(&fd, keepalive);
                }
                this.keepalive = None;
            }
        }
        if this.failed.is_none() {
            let down_ended = this.down.ended;
            if !this.up.ended {
                let up = this.up.poll(
                    cx,
                    &mut this.client,
                    &this.server,
                    this.to_server,
                    down_ended,
                );
                if let Poll::Ready(Err(fault)) = up {
                    this.fail(Which::Up, fault);
                }
            }
            let up_ended = this.up.ended;
            if this.failed.is_none() && !this.down.ended {
                let down =
                    this.down
                        .poll(cx, &mut this.server, &this.client, this.to_client, up_ended);
                if let Poll::Ready(Err(fault)) = down {
                    this.fail(Which::Down, fault);
                }
            }
        }
        let Some(failed) = &mut this.failed else {
            if this.up.ended && this.down.ended {
                this.reset_on_drop = false;
                return Poll::Ready(Ok(Ended::Complete));
            }
            if let Some(idle) = &mut this.idle {
                let moved = this.to_server.bytes() + this.to_client.bytes();
                if idle.poll_expired(cx, moved) {
                    if this.holding() {
                        return Poll::Ready(Err(Cut::by_balancer(How::Idle)));
                    }
                    this.reset_on_drop = false;
                    return Poll::Ready(Ok(Ended::Idle));
                }
            }
            return Poll::Pending;
        };
        if failed.grace.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(failed.take_cut()));
        }
        let delivered = match failed.survivor {
            Some(Which::Up) => this
                .up
                .poll_drain(cx, &this.client, &this.server, this.to_server),
            Some(Which::Down) => {
                this.down
                    .poll_drain(cx, &this.server, &this.client, this.to_client)
            }
            None => Poll::Ready(()),
        };
        if delivered.is_pending() {
            return Poll::Pending;
        }
        failed.survivor = None;
        // What stickylb wrote must also have left its send queue: the reset would discard it.
        let flush = match failed.flush {
            Which::Up => &this.server,
            Which::Down => &this.client,
        };
        loop {
            // A socket tokio closed (no descriptor) holds nothing that could still leave.
            if flush.fd().is_none_or(|fd| crate::sockets::unsent(&fd) == 0) {
                return Poll::Ready(Err(failed.take_cut()));
            }
            ready!(failed.tick.as_mut().poll(cx));
            let next = tokio::time::Instant::now() + FLUSH_TICK;
            failed.tick.as_mut().reset(next);
        }
    }
}

impl Drop for Relay<'_> {
    fn drop(&mut self) {
        if self.reset_on_drop {
            // A socket tokio closed (`RelaySocket::fd` is `None`) has nothing left to reset.
            for fd in [self.client.fd(), self.server.fd()].into_iter().flatten() {
                sockets::reset_on_close(&fd);
            }
        }
    }
}

impl Failed {
    fn take_cut(&mut self) -> Cut {
        std::mem::replace(&mut self.cut, Cut::by_balancer(How::Shutdown))
    }
}

/// A direction's failure: its source failed on a read, or its destination on a write.
#[derive(Debug)]
struct Fault {
    on_write: bool,
    error: io::Error,
}

impl Fault {
    fn read(error: io::Error) -> Fault {
        Fault {
            on_write: false,
            error,
        }
    }

    fn write(error: io::Error) -> Fault {
        Fault {
            on_write: true,
            error,
        }
    }
}

/// How a direction moves bytes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Copy,
    #[cfg(target_os = "linux")]
    Splice,
}

/// One direction's state: what it holds in flight, and how it moves bytes.
///
/// It starts with the userspace copy and switches to splice (when allowed) once a read fills
/// the copy buffer, then back to copy when a splice moves less than [`splice::SMALL`] bytes:
/// small request/reply traffic costs one read and one write per message that way, instead of
/// two splices plus the one that finds the socket empty, while bulk traffic moves through the
/// kernel without being copied. The switch happens only with nothing in flight, so the byte
/// stream goes on exactly where it was. A buffer or pipe is held only while bytes are in flight:
/// an idle direction holds neither.
#[derive(Debug)]
pub(crate) struct Direction {
    mode: Mode,
    /// Splice is allowed: `zeroCopy`, on Linux, and not refused by the kernel so far.
    may_splice: bool,
    buf: Option<Box<[u8]>>,
    #[cfg(target_os = "linux")]
    pipe: Option<splice::Pipe>,
    /// Bytes read in the current chunk.
    chunk: usize,
    /// Of those, bytes already written.
    written: usize,
    /// The source sent FIN and it was passed on (or did not need to be).
    ended: bool,
    /// Whether the destination has TCP_NODELAY yet.
    nodelay: NoDelay,
    /// Splices in a row that moved a whole [`splice::PIPE_SIZE`] from the source (saturating).
    /// From [`splice::GROW_AFTER`] on, this is a sustained bulk transfer until the direction
    /// goes back to copying: a short fill (the last one before each wait) no longer resets it,
    /// it takes big pipes from the pool, and grows a small one at its first full fill. (Were it
    /// reset before each wait, the direction would take a small pipe every time, grow it
    /// again, and the grown ones would pile up in the big pool and be closed while new small
    /// ones were made: a pipe2, two fcntl and two close every few MiB.)
    #[cfg(target_os = "linux")]
    full_fills: u8,
}

/// TCP_NODELAY on a direction's destination (see the module comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoDelay {
    Set,
    /// Not yet; `wrote`: a write went out already, so the next one needs it.
    Unset {
        wrote: bool,
    },
}

impl Direction {
    fn new(zero_copy: bool) -> Direction {
        Direction {
            mode: Mode::Copy,
            may_splice: zero_copy && cfg!(target_os = "linux"),
            buf: None,
            #[cfg(target_os = "linux")]
            pipe: None,
            chunk: 0,
            written: 0,
            ended: false,
            nodelay: NoDelay::Set,
            #[cfg(target_os = "linux")]
            full_fills: 0,
        }
    }

    /// Bytes read and not yet written.
    fn holding(&self) -> bool {
        self.written < self.chunk
    }

    /// Moves bytes from `src` to `dst` until `src` has nothing more now (Pending), or EOF was
    /// passed on (Ready(Ok)), or a fault. `other_ended`: the other direction has already
    /// ended, so the half-close is skipped: both sockets are closed right after, and close(2)
    /// sends the FIN anyway.
    ///
    /// A splicing direction whose destination takes no more takes its source's read interest
    /// off the reactor (its arrivals would wake a thread that cannot read them yet), reads
    /// without waiting for readiness from then on, and turns the interest back on when it
    /// finds the source empty (see `relay_socket.rs`; a change wakes the task, so that both
    /// directions poll again on the new registration).
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut RelaySocket,
        dst: &RelaySocket,
        meter: &Meter<'_>,
        other_ended: bool,
    ) -> Poll<Result<(), Fault>> {
        loop {
            if self.holding() {
                if self.poll_write(cx, dst, meter)?.is_pending() {
                    #[cfg(target_os = "linux")]
                    if self.mode == Mode::Splice {
                        src.set_reads(false, cx).map_err(Fault::read)?;
                    }
                    return Poll::Pending;
                }
                if self.holding() {
                    continue;
                }
                self.chunk_delivered();
                continue;
            }
            let read = if src.reads() {
                ready!(src.poll_read_ready(cx)).map_err(Fault::read)?;
                self.try_read(src, true).map_err(Fault::read)?
            } else {
                let read = self.try_read(src, false).map_err(Fault::read)?;
                // Found empty: its arrivals must wake the reactor again before it waits.
                if read.is_none() {
                    src.set_reads(true, cx).map_err(Fault::read)?;
                }
                read
            };
            match read {
                Some(0) => {
                    self.release();
                    self.ended = true;
                    if !other_ended {
                        half_close(dst).map_err(Fault::write)?;
                    }
                    return Poll::Ready(Ok(()));
                }
                Some(n) => {
                    self.chunk = n;
                    self.written = 0;
                }
                // Nothing to read now: readiness was cleared (or the read interest just came
                // back on, with none yet), so the next poll_read_ready registers the waker and
                // returns Pending. Nothing is in flight, so the buffer or pipe goes back to its
                // pool.
                None => self.release(),
            }
        }
    }

    /// The other direction failed: delivers what this one holds and what its source already
    /// has (read without waiting for readiness, which may not have been reported yet), then
    /// completes. A failure here ends the delivery too: the connection is being cut either way.
    fn poll_drain(
        &mut self,
        cx: &mut Context<'_>,
        src: &RelaySocket,
        dst: &RelaySocket,
        meter: &Meter<'_>,
    ) -> Poll<()> {
        loop {
            if self.holding() {
                match ready!(self.poll_write(cx, dst, meter)) {
                    Ok(()) if self.holding() => continue,
                    Ok(()) => self.chunk_delivered(),
                    Err(_) => return Poll::Ready(()),
                }
                continue;
            }
            match self.try_read(src, false) {
                Ok(Some(n)) if n > 0 => {
                    self.chunk = n;
                    self.written = 0;
                }
                // EOF, nothing more for now, or an error: all that had arrived was delivered.
                _ => return Poll::Ready(()),
            }
        }
    }

    /// One read (or splice into the pipe) from `src`: `Some(n)` bytes (0 = EOF), or `None`
    /// when the socket had nothing. `gated`: go through tokio's readiness (which then clears
    /// the read readiness on `None`); otherwise read straight away.
    fn try_read(&mut self, src: &RelaySocket, gated: bool) -> io::Result<Option<usize>> {
        let fd = src.as_raw_fd();
        let io = |op: &mut dyn FnMut() -> io::Result<usize>| {
            if gated {
                src.try_io(Interest::READABLE, op)
            } else {
                op()
            }
        };
        #[cfg(target_os = "linux")]
        if self.mode == Mode::Splice {
            if self.pipe.is_none() {
                match splice::take_pipe(self.is_bulk()) {
                    Ok(pipe) => self.pipe = Some(pipe),
                    // Out of file descriptors, or past the per-user pipe budget (the kernel
                    // gives a pipe smaller than the copy buffer): this direction copies in
                    // userspace instead.
                    Err(e) if splice::is_shortage(&e) => {
                        self.may_splice = false;
                        self.mode = Mode::Copy;
                        return self.try_read(src, gated);
                    }
                    Err(e) => return Err(e),
                }
            }
            let pipe = self.pipe.as_ref().map(|p| (p.write_fd(), p.capacity()));
            let (pipe_fd, capacity) = pipe.unwrap_or((-1, 0));
            // The pipe is empty (we only fill an empty pipe), so EAGAIN here means the socket
            // has no data: try_io clears the read readiness.
            return match io(&mut || splice::splice(fd, pipe_fd, capacity)) {
                Ok(n) => {
                    self.filled(n);
                    Ok(Some(n))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(e) if splice::is_unsupported(&e) => {
                    self.release();
                    self.may_splice = false;
                    self.mode = Mode::Copy;
                    self.try_read(src, gated)
                }
                Err(e) => Err(e),
            };
        }
        let buf = self.buf.get_or_insert_with(copy::take_buf);
        let mut short = 0;
        let read = io(&mut || match copy::read(fd, buf)? {
            copy::Read::Full(n) => Ok(n),
            copy::Read::Short(n) => {
                short = n;
                Err(io::ErrorKind::WouldBlock.into())
            }
        });
        match read {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && short > 0 => Ok(Some(short)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// In a sustained bulk transfer (see [`Direction::full_fills`]).
    #[cfg(target_os = "linux")]
    fn is_bulk(&self) -> bool {
        self.full_fills >= splice::GROW_AFTER
    }

    /// A splice from the source moved `n` bytes into the pipe: counts the full ones in a row,
    /// and grows the pipe of a sustained bulk transfer (see `splice.rs` and
    /// [`Direction::full_fills`]).
    #[cfg(target_os = "linux")]
    fn filled(&mut self, n: usize) {
        if n < splice::PIPE_SIZE {
            if !self.is_bulk() {
                self.full_fills = 0;
            }
            return;
        }
        self.full_fills = self.full_fills.saturating_add(1);
        if self.is_bulk() {
            if let Some(pipe) = self.pipe.as_mut().filter(|p| !p.is_big()) {
                if !pipe.grow() {
                    // None to be had now: asked again after the next GROW_AFTER full ones.
                    self.full_fills = 0;
                }
            }
        }
    }

    /// Writes what is in flight to `dst`, as far as its send buffer takes it, and counts what
    /// was written.
    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        dst: &RelaySocket,
        meter: &Meter<'_>,
    ) -> Poll<Result<(), Fault>> {
        ready!(dst.poll_write_ready(cx)).map_err(Fault::write)?;
        match self.nodelay {
            NoDelay::Set => {}
            NoDelay::Unset { wrote: false } => self.nodelay = NoDelay::Unset { wrote: true },
            NoDelay::Unset { wrote: true } => {
                if let Some(fd) = dst.fd() {
                    sockets::nodelay(&fd);
                }
                self.nodelay = NoDelay::Set;
            }
        }
        let left = self.chunk - self.written;
        #[cfg(target_os = "linux")]
        if self.mode == Mode::Splice {
            let pipe_fd = self.pipe.as_ref().map_or(-1, |p| p.read_fd());
            let dst_fd = dst.as_raw_fd();
            // The pipe holds data, so EAGAIN here means dst's send buffer is full: wait for
            // write readiness. A pipe left with data after an error is dropped (closed), never
            // pooled.
            return match dst.try_io(Interest::WRITABLE, || splice::splice(pipe_fd, dst_fd, left)) {
                Ok(m) => {
                    self.written += m;
                    meter.add(m);
                    splice::count(m);
                    Poll::Ready(Ok(()))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Ready(Ok(())),
                Err(e) => Poll::Ready(Err(Fault::write(e))),
            };
        }
        let buf = match &self.buf {
            Some(buf) => buf,
            None => {
                let missing = io::Error::other("no buffer in flight");
                return Poll::Ready(Err(Fault::write(missing)));
            }
        };
        match dst.try_write(&buf[self.written..self.chunk]) {
            Ok(m) => {
                self.written += m;
                meter.add(m);
                Poll::Ready(Ok(()))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(Fault::write(e))),
        }
    }

    /// A whole chunk was delivered: decide how the next one moves.
    fn chunk_delivered(&mut self) {
        if self.mode == Mode::Copy && self.chunk < copy::BUF_SIZE {
            // A short read drained the socket: nothing more is coming right now, so the buffer
            // goes back to the pool and a quiet connection holds none.
            self.release();
        }
        #[cfg(target_os = "linux")]
        match self.mode {
            Mode::Copy if self.may_splice && self.chunk == copy::BUF_SIZE => {
                // A read filled the buffer: bulk traffic, which splice moves more cheaply.
                self.release();
                self.mode = Mode::Splice;
            }
            Mode::Splice if self.chunk < splice::SMALL || !self.may_splice => {
                // Small messages again: a read and a write move them more cheaply.
                self.release();
                self.mode = Mode::Copy;
                self.full_fills = 0;
            }
            _ => {}
        }
        self.chunk = 0;
        self.written = 0;
    }

    /// Returns the (empty) buffer and pipe to their pools.
    fn release(&mut self) {
        if let Some(buf) = self.buf.take() {
            copy::give_back(buf);
        }
        #[cfg(target_os = "linux")]
        if let Some(pipe) = self.pipe.take() {
            splice::give_back(pipe);
        }
    }
}

/// A relay stopped between two polls, as an upgrade hands it to the next process (see
/// `super::handoff`): each direction's mode and flags, and what it holds in flight, borrowed
/// (the copy buffer's unwritten bytes are copied out; a pipe's descriptors are lent, the pipe
/// itself stays here until the next process has its own descriptors of it).
impl Relay<'_> {
    /// The connection lives on in a new process: dropping the relay closes this process's
    /// descriptors without touching it. (A relay that ended cleanly closes normally too.)
    pub(crate) fn handed_over(&mut self) {
        self.reset_on_drop = false;
    }

    /// The sockets' descriptors: client, target. (-1 for a socket tokio closed; a relay that
    /// lost one has failed by then, and a failing relay is never handed over.)
    pub(crate) fn fds(&self) -> (RawFd, RawFd) {
        (self.client.as_raw_fd(), self.server.as_raw_fd())
    }

    /// One direction failed, and the other is delivering its last bytes: the connection is
    /// ending, within [`DRAIN_GRACE`]. Such a relay is never handed over.
    pub(crate) fn is_failing(&self) -> bool {
        self.failed.is_some()
    }

    /// Bytes delivered so far: to the target, to the client.
    pub(crate) fn bytes(&self) -> (u64, u64) {
        (self.to_server.bytes(), self.to_client.bytes())
    }

    /// Both directions as records, and how long no byte has moved (when `idleTimeout` is on).
    pub(crate) fn record(&self) -> ([handover::Direction<RawFd>; 2], Option<Duration>) {
        let moved = self.to_server.bytes() + self.to_client.bytes();
        let quiet = self.idle.as_ref().map(|idle| idle.quiet(moved));
        ([self.up.record(), self.down.record()], quiet)
    }
}

impl Direction {
    fn record(&self) -> handover::Direction<RawFd> {
        let held = if !self.holding() {
            handover::Held::Nothing
        } else {
            match (self.mode, &self.buf) {
                #[cfg(target_os = "linux")]
                (Mode::Splice, _) => match &self.pipe {
                    Some(pipe) => handover::Held::Pipe {
                        read: pipe.read_fd(),
                        write: pipe.write_fd(),
                        len: u32::try_from(self.chunk - self.written).unwrap_or(u32::MAX),
                    },
                    None => handover::Held::Nothing,
                },
                (Mode::Copy, Some(buf)) => {
                    handover::Held::Bytes(buf[self.written..self.chunk].to_vec())
                }
                (Mode::Copy, None) => handover::Held::Nothing,
            }
        };
        handover::Direction {
            splice: self.mode != Mode::Copy,
            may_splice: self.may_splice,
            ended: self.ended,
            held,
        }
    }

    /// A direction as an older process left it: the same mode and flags, holding the same
    /// bytes (copied into a buffer of this process's pool, or in the very pipe the older
    /// process filled). Checks that the record is one a relay can be in: an ended direction
    /// holds nothing, a pipe holds exactly the bytes the record says, a buffer fits.
    /// `zero_copy`: this process's `zeroCopy`; when off, the direction copies from now on
    /// (once a pipe it was given has drained).
    pub(crate) fn resume(
        record: handover::Direction<OwnedFd>,
        zero_copy: bool,
    ) -> Result<Direction, String> {
        let mut direction = Direction::new(zero_copy);
        direction.may_splice = direction.may_splice && record.may_splice;
        direction.ended = record.ended;
        if record.ended && !matches!(record.held, handover::Held::Nothing) {
            return Err("an ended direction holds bytes".into());
        }
        match record.held {
            handover::Held::Nothing =>
            {
                #[cfg(target_os = "linux")]
                if record.splice && direction.may_splice {
                    direction.mode = Mode::Splice;
                }
            }
            handover::Held::Bytes(bytes) => {
                if record.splice {
                    return Err("a splicing direction holds a copy buffer".into());
                }
                if bytes.is_empty() || bytes.len() > copy::BUF_SIZE {
                    return Err(format!(
                        "a copy buffer of {} bytes (1 to {})",
                        bytes.len(),
                        copy::BUF_SIZE
                    ));
                }
                let mut buf = copy::take_buf();
                buf[..bytes.len()].copy_from_slice(&bytes);
                direction.buf = Some(buf);
                direction.chunk = bytes.len();
            }
            #[cfg(target_os = "linux")]
            handover::Held::Pipe { read, write, len } => {
                if !record.splice {
                    return Err("a copying direction holds a pipe".into());
                }
                let pipe = splice::Pipe::resume(read, write)?;
                let holds = pipe.held()?;
                if holds != len as usize || holds == 0 {
                    return Err(format!(
                        "its pipe holds {holds} bytes, the handover says {len}"
                    ));
                }
                direction.mode = Mode::Splice;
                direction.pipe = Some(pipe);
                direction.chunk = holds;
            }
            #[cfg(not(target_os = "linux"))]
            handover::Held::Pipe { .. } => return Err("a pipe, and no splice here".into()),
        }
        Ok(direction)
    }
}

/// `idleTimeout`: fires once no byte has moved either way for the timeout. Checks the byte
/// counts every eighth of it (at least every 10 ms) rather than reading a clock per chunk on the
/// data path, so it fires after the last byte no sooner than the timeout and no later than two
/// checks past it (a check every max(timeout / 8, 10 ms)).
#[derive(Debug)]
struct IdleWatch {
    idle: Duration,
    step: Duration,
    /// Boxed so that `Relay` stays `Unpin`; allocated only when `idleTimeout` is set.
    timer: Pin<Box<tokio::time::Sleep>>,
    seen: u64,
    quiet_since: tokio::time::Instant,
}

impl IdleWatch {
    /// A watch that has seen `moved` bytes, the last of them `quiet` ago.
    fn new(idle: Duration, moved: u64, quiet: Duration) -> IdleWatch {
        let step = (idle / 8).max(Duration::from_millis(10));
        let now = tokio::time::Instant::now();
        IdleWatch {
            idle,
            step,
            timer: Box::pin(tokio::time::sleep_until(now + step)),
            seen: moved,
            quiet_since: now.checked_sub(quiet).unwrap_or(now),
        }
    }

    /// How long no byte has moved, as far as the last check knows (0 if bytes moved since).
    fn quiet(&self, moved: u64) -> Duration {
        if moved == self.seen {
            self.quiet_since.elapsed()
        } else {
            Duration::ZERO
        }
    }

    fn poll_expired(&mut self, cx: &mut Context<'_>, moved: u64) -> bool {
        while self.timer.as_mut().poll(cx).is_ready() {
            let now = tokio::time::Instant::now();
            if moved != self.seen {
                self.seen = moved;
                self.quiet_since = now;
            } else if now.duration_since(self.quiet_since) >= self.idle {
                return true;
            }
            self.timer.as_mut().reset(now + self.step);
        }
        false
    }
}

/// Passes a FIN on. A peer that is already gone (`ENOTCONN`) has nothing left to tell.
fn half_close(stream: &RelaySocket) -> io::Result<()> {
    let fd = stream.fd().ok_or_else(relay_socket::lost)?;
    match socket2::SockRef::from(&fd).shutdown(Shutdown::Write) {
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpSocket};

    /// A fresh target socket with nothing to set later (no keepalive, no header sent).
    const UNTUNED: Fresh<'static> = Fresh {
        keepalive: None,
        wrote: false,
    };

    /// A connected pair on loopback: (the side the relay owns, the far side), with `rcvbuf`
    /// set on the far side before it connects (which caps the window it advertises).
    pub(in crate::proxy) async fn pair(far_rcvbuf: Option<u32>) -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let socket = TcpSocket::new_v4().unwrap();
        if let Some(size) = far_rcvbuf {
            socket.set_recv_buffer_size(size).unwrap();
        }
        let far = socket
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (near, _) = listener.accept().await.unwrap();
        (near, far)
    }

    /// The idle timeout counts progress, not completed chunks: a download whose reader takes
    /// far longer than `idleTimeout` to drain one pipe's worth (256 KiB) but keeps reading is
    /// never cut, and the byte counter is never behind what the reader has received. The
    /// buffers the relay writes into are small (its SO_SNDBUF, the reader's SO_RCVBUF), so a
    /// chunk can only leave as the reader reads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_reader_that_keeps_reading_is_never_idle_and_is_counted_as_it_reads() {
        const LEN: usize = 768 * 1024;
        const IDLE: Duration = Duration::from_millis(500);
        let (client, mut reader) = pair(Some(4096)).await;
        let (server, mut writer) = pair(None).await;
        socket2::SockRef::from(&client)
            .set_send_buffer_size(4096)
            .unwrap();
        // The download: LEN bytes, then FIN. The reader sends nothing: it half-closes at once.
        let source = tokio::spawn(async move {
            writer.write_all(&vec![7u8; LEN]).await.unwrap();
            writer.shutdown().await.unwrap();
            let mut rest = Vec::new();
            writer.read_to_end(&mut rest).await.unwrap();
        });
        reader.shutdown().await.unwrap();
        let total_to_client = AtomicU64::new(0);
        let total_to_server = AtomicU64::new(0);
        let to_client = Meter::new(&total_to_client);
        let to_server = Meter::new(&total_to_server);
        // The relay owns both sockets: they close when it ends, as in the handler (the last
        // FIN comes with the close when the other direction had already ended).
        let relay = relay(
            client,
            server,
            true,
            Some(IDLE),
            UNTUNED,
            &to_server,
            &to_client,
        );
        // Reads 4 KiB every 40 ms (about 100 KB/s): one 256 KiB chunk takes ~2.5 s, five
        // times the idle timeout. After each read, the counter must already hold what arrived.
        let read = async {
            let mut got = 0;
            let mut buf = [0u8; 4096];
            let mut behind = Vec::new();
            loop {
                tokio::time::sleep(Duration::from_millis(40)).await;
                let n = reader.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got += n;
                let counted = to_client.bytes() as usize;
                if counted < got {
                    behind.push((got, counted));
                }
            }
            (got, behind)
        };
        let (ended, (got, behind)) =
            tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(relay, read) })
                .await
                .expect("the download finishes");
        assert!(
            matches!(ended, Ok(Ended::Complete)),
            "a live transfer was ended: {ended:?}"
        );
        assert_eq!(got, LEN, "every byte arrived");
        assert!(
            behind.is_empty(),
            "the counter was behind what the reader had ({} times; first: {:?})",
            behind.len(),
            behind.first()
        );
        assert_eq!(to_client.bytes() as usize, LEN);
        source.await.unwrap();
    }

    /// Another descriptor of a socket the relay is about to own, to look at its options.
    fn view(stream: &TcpStream) -> OwnedFd {
        use std::os::fd::AsFd;
        stream.as_fd().try_clone_to_owned().unwrap()
    }

    fn nodelay_of(stream: &impl std::os::fd::AsFd) -> bool {
        socket2::SockRef::from(stream).tcp_nodelay().unwrap()
    }

    /// A small message through the relay, up (client to target), read on the far side.
    async fn up(client_far: &mut TcpStream, target_far: &mut TcpStream, message: &[u8]) {
        client_far.write_all(message).await.unwrap();
        let mut got = vec![0u8; message.len()];
        target_far.read_exact(&mut got).await.unwrap();
        assert_eq!(got, message);
    }

    /// The target socket gets TCP_NODELAY before its second write, not at connect: the first
    /// write leaves at once without it (Nagle holds back only a segment sent while another is
    /// unacknowledged), so a one-request connection saves the setsockopt(2). After a PROXY
    /// header, the relay's first write is the second.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_target_socket_gets_nodelay_before_its_second_write() {
        for header_sent in [false, true] {
            let (client, mut client_far) = pair(None).await;
            let (server, mut target_far) = pair(None).await;
            assert!(!nodelay_of(&server), "a fresh socket has Nagle on");
            let server_view = view(&server);
            let (total_up, total_down) = (AtomicU64::new(0), AtomicU64::new(0));
            let (to_server, to_client) = (Meter::new(&total_up), Meter::new(&total_down));
            let fresh = Fresh {
                keepalive: None,
                wrote: header_sent,
            };
            let relay = relay(client, server, true, None, fresh, &to_server, &to_client);
            let checks = async {
                up(&mut client_far, &mut target_far, b"first").await;
                let after_first = nodelay_of(&server_view);
                up(&mut client_far, &mut target_far, b"second").await;
                let after_second = nodelay_of(&server_view);
                drop((client_far, target_far));
                (after_first, after_second)
            };
            let (_, (after_first, after_second)) =
                tokio::time::timeout(Duration::from_secs(20), async {
                    tokio::join!(relay, checks)
                })
                .await
                .expect("two messages go through");
            assert_eq!(
                after_first, header_sent,
                "after the first write (header sent: {header_sent})"
            );
            assert!(after_second, "the second write found TCP_NODELAY set");
        }
    }

    /// `tcpKeepalive` reaches the target socket once the connection has lived
    /// [`KEEPALIVE_AFTER`], not before (a short connection never needs it), with its times.
    #[tokio::test(start_paused = true)]
    async fn the_target_socket_gets_keepalive_once_the_connection_lived_a_second() {
        let (client, _client_far) = pair(None).await;
        let (server, _target_far) = pair(None).await;
        let keepalive = Keepalive {
            idle: Duration::from_secs(30),
            interval: Duration::from_secs(5),
            count: 3,
        };
        let (total_up, total_down) = (AtomicU64::new(0), AtomicU64::new(0));
        let (to_server, to_client) = (Meter::new(&total_up), Meter::new(&total_down));
        let fresh = Fresh {
            keepalive: Some(&keepalive),
            wrote: false,
        };
        let (client_view, server_view) = (view(&client), view(&server));
        let mut relay = relay(client, server, true, None, fresh, &to_server, &to_client);
        async fn poll_once(relay: &mut Relay<'_>) {
            std::future::poll_fn(|cx| {
                assert!(
                    Pin::new(&mut *relay).poll(cx).is_pending(),
                    "the relay runs on"
                );
                Poll::Ready(())
            })
            .await
        }
        let keepalive_of = |stream: &OwnedFd| {
            let socket = socket2::SockRef::from(stream);
            let on = socket.keepalive().unwrap();
            let times = (
                socket.tcp_keepalive_time().unwrap(),
                socket.tcp_keepalive_interval().unwrap(),
                socket.tcp_keepalive_retries().unwrap(),
            );
            (on, times)
        };
        poll_once(&mut relay).await;
        assert!(!keepalive_of(&server_view).0, "not at once");
        tokio::time::advance(KEEPALIVE_AFTER - Duration::from_millis(1)).await;
        poll_once(&mut relay).await;
        assert!(
            !keepalive_of(&server_view).0,
            "not before {KEEPALIVE_AFTER:?}"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        poll_once(&mut relay).await;
        let times = (keepalive.idle, keepalive.interval, keepalive.count);
        assert_eq!(keepalive_of(&server_view), (true, times));
        assert!(relay.keepalive.is_none(), "its timer is freed");
        assert!(
            !keepalive_of(&client_view).0,
            "the client socket is not the relay's to tune"
        );
    }

    /// A direction that splices, holding a small pipe from the pool (the caller holds
    /// `splice::one_at_a_time`: the pools are shared).
    #[cfg(target_os = "linux")]
    fn splicing_with_a_small_pipe() -> Direction {
        let mut direction = Direction::new(true);
        direction.mode = Mode::Splice;
        direction.pipe = Some(splice::take_pipe(false).unwrap());
        direction
    }

    /// Whether the direction's pipe grew.
    #[cfg(target_os = "linux")]
    fn big(direction: &Direction) -> bool {
        direction.pipe.as_ref().is_some_and(|p| p.is_big())
    }

    /// Once a direction's pipe grew, the short fill before each wait does not end the bulk
    /// transfer: it takes the big pipe back from the pool, and grows a small one at its first
    /// full fill. Going back to copying ends it.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_bulk_transfer_keeps_big_pipes_across_waits() {
        let _one = splice::one_at_a_time();
        let mut direction = splicing_with_a_small_pipe();
        for _ in 0..splice::GROW_AFTER {
            direction.filled(splice::PIPE_SIZE);
        }
        assert!(big(&direction), "grown");
        let inode = |d: &Direction| {
            use std::os::unix::fs::MetadataExt;
            let fd = d.pipe.as_ref().map(|p| p.read_fd()).unwrap();
            std::fs::metadata(format!("/proc/self/fd/{fd}"))
                .unwrap()
                .ino()
        };
        let grown = inode(&direction);
        // The last fill before a wait is short; the wait gives the pipe back to the pool.
        direction.filled(splice::PIPE_SIZE - 1);
        direction.release();
        direction.pipe = Some(splice::take_pipe(direction.is_bulk()).unwrap());
        assert_eq!(inode(&direction), grown, "the same big pipe, from the pool");
        // No big one in the pool: a small one grows at its first full fill.
        direction.pipe = Some(splice::take_pipe(false).unwrap());
        direction.filled(splice::PIPE_SIZE);
        assert!(big(&direction), "grown at its first full fill");
        direction.chunk = splice::SMALL - 1;
        direction.chunk_delivered();
        assert_eq!((direction.mode, direction.full_fills), (Mode::Copy, 0));
    }

    /// A direction whose splices keep filling a whole pipe grows it after GROW_AFTER of them
    /// in a row; one short splice in between starts the count again.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_sustained_bulk_transfer_grows_its_pipe() {
        let _one = splice::one_at_a_time();
        let mut direction = splicing_with_a_small_pipe();
        for _ in 1..splice::GROW_AFTER {
            direction.filled(splice::PIPE_SIZE);
        }
        direction.filled(splice::PIPE_SIZE - 1);
        direction.filled(splice::PIPE_SIZE);
        assert!(!big(&direction), "not after a short one");
        for _ in 1..splice::GROW_AFTER {
            direction.filled(splice::PIPE_SIZE);
        }
        assert!(
            big(&direction),
            "grown after {} full ones",
            splice::GROW_AFTER
        );
        direction.release();
    }
    /// The events `fd` is registered for in this process's epoll sets (from
    /// /proc/self/fdinfo), if it is registered: what the reactor will be woken for.
    fn epoll_events(fd: RawFd) -> Option<u32> {
        for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
            let is_epoll = std::fs::read_link(entry.path())
                .is_ok_and(|link| link.to_str() == Some("anon_inode:[eventpoll]"));
            if !is_epoll {
                continue;
            }
            let name = entry.file_name();
            let info = std::fs::read_to_string(format!(
                "/proc/self/fdinfo/{}",
                name.to_str().unwrap_or_default()
            ))
            .unwrap_or_default();
            for line in info.lines() {
                let mut words = line.split_whitespace();
                if words.next() != Some("tfd:") {
                    continue;
                }
                if words.next().and_then(|w| w.parse::<RawFd>().ok()) != Some(fd) {
                    continue;
                }
                let _ = words.next(); // "events:"
                return words.next().and_then(|w| u32::from_str_radix(w, 16).ok());
            }
        }
        None
    }

    /// Whether arrivals on `fd` wake the reactor now; looks until `wanted` (1,000 looks, 10 ms
    /// apart: the kernel signals nothing for a registration's change) and returns the last.
    async fn reads_until(fd: RawFd, wanted: bool) -> bool {
        let reads = || epoll_events(fd).is_some_and(|e| e & libc::EPOLLIN as u32 != 0);
        for _ in 0..1000 {
            if reads() == wanted {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        reads()
    }

    /// The upload of the tests below: 4 MiB, far more than the target's small buffers take, so
    /// that the relay blocks on the target while the target reads nothing.
    const UPLOAD: usize = 4 * 1024 * 1024;

    fn upload_data() -> Vec<u8> {
        (0..UPLOAD).map(|i| (i % 251) as u8).collect()
    }

    /// (client, far client, target, far target) for an upload that blocks soon: the target
    /// socket's send buffer and the far target's receive buffer are 4 KiB.
    async fn pairs_for_a_blocked_upload() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
        let (client, client_far) = pair(None).await;
        let (server, target_far) = pair(Some(4096)).await;
        socket2::SockRef::from(&server)
            .set_send_buffer_size(4096)
            .unwrap();
        (client, client_far, server, target_far)
    }

    /// While a splicing direction waits for a destination that takes no more, its source's
    /// arrivals wake nobody (its registration loses EPOLLIN); once it has delivered everything
    /// and finds the source empty, EPOLLIN is back, so a short message after that still goes
    /// through at once. Every byte arrives in order, then the FIN.
    #[cfg(target_os = "linux")]
    // The guard only keeps other tests out (each runs on its own runtime and thread);
    // nothing on this test's runtime takes it.
    #[allow(clippy::await_holding_lock)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blocked_splice_takes_its_source_off_the_reactor_until_it_finds_it_empty() {
        // An upload of 4 MiB can grow a pipe.
        let _one = splice::one_at_a_time();
        let (client, mut client_far, server, mut target_far) = pairs_for_a_blocked_upload().await;
        let client_fd = client.as_raw_fd();
        let data = upload_data();
        let sent = data.clone();
        let (go_on, tail_may_go) = tokio::sync::oneshot::channel::<()>();
        let writer = tokio::spawn(async move {
            client_far.write_all(&sent).await.unwrap();
            tail_may_go.await.unwrap();
            client_far.write_all(b"tail").await.unwrap();
            client_far.shutdown().await.unwrap();
            let mut rest = Vec::new();
            client_far.read_to_end(&mut rest).await.unwrap();
        });
        let (total_up, total_down) = (AtomicU64::new(0), AtomicU64::new(0));
        let (to_server, to_client) = (Meter::new(&total_up), Meter::new(&total_down));
        assert!(reads_until(client_fd, true).await, "registered for reads");
        let relay = relay(client, server, true, None, UNTUNED, &to_server, &to_client);
        let far = async {
            // The first MiB at once (a read that fills the copy buffer turns the direction to
            // splicing); then nothing until the relay has taken the client off the reactor.
            let mut got = vec![0u8; UPLOAD];
            target_far.read_exact(&mut got[..1 << 20]).await.unwrap();
            let off = !reads_until(client_fd, false).await;
            target_far.read_exact(&mut got[1 << 20..]).await.unwrap();
            let on = reads_until(client_fd, true).await;
            go_on.send(()).unwrap();
            let mut tail = Vec::new();
            target_far.read_to_end(&mut tail).await.unwrap();
            target_far.shutdown().await.unwrap();
            (off, got, on, tail)
        };
        let (ended, (off, got, on, tail)) =
            tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(relay, far) })
                .await
                .expect("the upload finishes");
        assert!(
            off,
            "the client's arrivals kept waking the reactor while blocked"
        );
        assert!(got == data, "every byte, in order");
        assert!(on, "EPOLLIN back once the client was found empty");
        assert_eq!(tail, b"tail", "the short message, then the FIN");
        assert!(matches!(ended, Ok(Ended::Complete)), "{ended:?}");
        assert_eq!(total_up.load(Ordering::Relaxed), UPLOAD as u64 + 4);
        writer.await.unwrap();
    }

    /// A socket tokio closed under the relay (its deregistration failed: `epoll_ctl(DEL)`
    /// cannot fail for an open registered descriptor, but the relay must not turn it into a
    /// panic, least of all in its `Drop`, where a panic while unwinding aborts the process):
    /// calls on it fail, the relay ends in a cut, and dropping it still resets the other peer,
    /// whose stream ends in a reset after exactly the bytes it was sent (none).
    #[tokio::test]
    async fn a_socket_tokio_closed_fails_the_relay_and_resets_the_other_peer() {
        let (client, mut client_far) = pair(None).await;
        let (server, _target_far) = pair(None).await;
        let (total_up, total_down) = (AtomicU64::new(0), AtomicU64::new(0));
        let (to_server, to_client) = (Meter::new(&total_up), Meter::new(&total_down));
        let mut relay = relay(client, server, true, None, UNTUNED, &to_server, &to_client);
        // The target socket closes here; the relay is left with none.
        relay.server = RelaySocket::gone();
        assert_eq!(relay.server.as_raw_fd(), -1);
        assert!(half_close(&relay.server).is_err());
        client_far.write_all(b"hello").await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(10), &mut relay)
            .await
            .expect("the relay ends");
        assert!(ended.is_err(), "{ended:?}");
        drop(relay);
        let mut got = 0;
        let mut buf = [0u8; 64];
        let ending = loop {
            match client_far.read(&mut buf).await {
                Ok(0) => break Ok(()),
                Ok(n) => got += n,
                Err(e) => break Err(e.kind()),
            }
        };
        assert_eq!(
            ending,
            Err(io::ErrorKind::ConnectionReset),
            "after {got} bytes"
        );
        assert_eq!(got, 0);
        assert_eq!(total_up.load(Ordering::Relaxed), 0);
    }

    /// A client that resets while its direction waits for the target (off the reactor, as
    /// long as the target reads nothing) is still heard once the target takes more: the
    /// target's stream ends in a reset, never in a clean FIN it would take for the whole upload.
    #[cfg(target_os = "linux")]
    // The guard only keeps other tests out (each runs on its own runtime and thread);
    // nothing on this test's runtime takes it.
    #[allow(clippy::await_holding_lock)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_reset_while_its_direction_waits_reaches_the_target_as_a_reset() {
        // An upload of 4 MiB can grow a pipe.
        let _one = splice::one_at_a_time();
        let (client, mut client_far, server, mut target_far) = pairs_for_a_blocked_upload().await;
        let client_fd = client.as_raw_fd();
        let data = upload_data();
        // Resets when told, whether the whole upload was written by then or not (the rest is
        // dropped), so that the reset comes while the relay waits for a target that reads
        // nothing, not before.
        let (reset_now, mut told) = tokio::sync::oneshot::channel::<()>();
        let writer = tokio::spawn(async move {
            tokio::select! {
                written = client_far.write_all(&data) => {
                    written.unwrap();
                    told.await.unwrap();
                }
                _ = &mut told => {}
            }
            socket2::SockRef::from(&client_far)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(client_far);
        });
        let (total_up, total_down) = (AtomicU64::new(0), AtomicU64::new(0));
        let (to_server, to_client) = (Meter::new(&total_up), Meter::new(&total_down));
        let relay = relay(client, server, true, None, UNTUNED, &to_server, &to_client);
        let far = async {
            let mut first = vec![0u8; 1 << 20];
            target_far.read_exact(&mut first).await.unwrap();
            let off = !reads_until(client_fd, false).await;
            reset_now.send(()).unwrap();
            // The target's stream, to its very end.
            let mut got = first.len();
            let mut buf = vec![0u8; 1 << 16];
            let ending = loop {
                match target_far.read(&mut buf).await {
                    Ok(0) => break Ok(()),
                    Ok(n) => got += n,
                    Err(e) => break Err(e.kind()),
                }
            };
            (off, got, ending)
        };
        let (ended, (off, got, ending)) =
            tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(relay, far) })
                .await
                .expect("the upload ends");
        assert!(off, "never off the reactor");
        assert_eq!(
            ending,
            Err(io::ErrorKind::ConnectionReset),
            "the target's stream after {got} bytes"
        );
        assert!(got <= UPLOAD, "{got} bytes");
        assert!(ended.is_err(), "{ended:?}");
        writer.await.unwrap();
    }
}
