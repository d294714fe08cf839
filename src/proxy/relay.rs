//! The data path of one proxied connection: both directions at once, until both are done.
//!
//! - Each direction runs until its source sends FIN; the FIN is passed on as a half-close
//!   (`shutdown(SHUT_WR)` on the other socket) and the other direction keeps flowing, so
//!   protocols that half-close (a client that sends its request and shuts its write side, then
//!   waits for the whole reply) work.
//! - An error on either side (a reset, a write to a closed peer) ends both directions at once
//!   and the caller resets both sockets, so neither peer mistakes a cut stream for a complete
//!   one: data is never silently truncated.
//! - Each direction copies small messages in userspace and splices bulk transfers on Linux
//!   (unless `zeroCopy` is false), switching per direction as the traffic changes; it keeps
//!   copying if the kernel refuses splice for these sockets or no fd is left for a pipe.

use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::copy;
#[cfg(target_os = "linux")]
use super::splice;

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
pub fn relay<'a>(
    client: &'a TcpStream,
    server: &'a TcpStream,
    zero_copy: bool,
    idle: Option<Duration>,
    to_server: &'a Meter<'a>,
    to_client: &'a Meter<'a>,
) -> Relay<'a> {
    Relay {
        client,
        server,
        up: Direction::new(zero_copy),
        down: Direction::new(zero_copy),
        to_server,
        to_client,
        idle: idle.map(IdleWatch::new),
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
pub struct Relay<'a> {
    client: &'a TcpStream,
    server: &'a TcpStream,
    up: Direction,
    down: Direction,
    to_server: &'a Meter<'a>,
    to_client: &'a Meter<'a>,
    idle: Option<IdleWatch>,
}

impl Future for Relay<'_> {
    type Output = io::Result<Ended>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<Ended>> {
        // Every field is Unpin (the idle timer is boxed).
        let this = self.get_mut();
        let down_ended = this.down.ended;
        if !this.up.ended {
            if let Poll::Ready(result) =
                this.up
                    .poll(cx, this.client, this.server, this.to_server, down_ended)
            {
                result?;
            }
        }
        let up_ended = this.up.ended;
        if !this.down.ended {
            if let Poll::Ready(result) =
                this.down
                    .poll(cx, this.server, this.client, this.to_client, up_ended)
            {
                result?;
            }
        }
        if this.up.ended && this.down.ended {
            return Poll::Ready(Ok(Ended::Complete));
        }
        if let Some(idle) = &mut this.idle {
            let moved = this.to_server.bytes() + this.to_client.bytes();
            if idle.poll_expired(cx, moved) {
                return Poll::Ready(Ok(Ended::Idle));
            }
        }
        Poll::Pending
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
struct Direction {
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
        }
    }

    /// Moves bytes from `src` to `dst` until `src` has nothing more now (Pending), or EOF was
    /// passed on (Ready(Ok)), or an error. `other_ended`: the other direction has already
    /// ended, so the half-close is skipped: both sockets are closed right after, and close(2)
    /// sends the FIN anyway.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        meter: &Meter<'_>,
        other_ended: bool,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.written < self.chunk {
                ready!(self.poll_write(cx, dst))?;
                if self.written < self.chunk {
                    continue;
                }
                meter.add(self.chunk);
                self.chunk_delivered();
                continue;
            }
            ready!(src.poll_read_ready(cx))?;
            match self.try_read(src)? {
                Some(0) => {
                    self.release();
                    self.ended = true;
                    if !other_ended {
                        half_close(dst)?;
                    }
                    return Poll::Ready(Ok(()));
                }
                Some(n) => {
                    self.chunk = n;
                    self.written = 0;
                }
                // Nothing to read now: readiness was cleared, so the next poll_read_ready
                // registers the waker and returns Pending. Nothing is in flight, so the
                // buffer or pipe goes back to its pool.
                None => self.release(),
            }
        }
    }

    /// One read (or splice into the pipe) from `src`: `Some(n)` bytes (0 = EOF), or `None`
    /// when the socket had nothing (its readiness is cleared).
    fn try_read(&mut self, src: &TcpStream) -> io::Result<Option<usize>> {
        let fd = src.as_raw_fd();
        #[cfg(target_os = "linux")]
        if self.mode == Mode::Splice {
            if self.pipe.is_none() {
                match splice::take_pipe() {
                    Ok(pipe) => self.pipe = Some(pipe),
                    // Out of file descriptors: this direction copies in userspace instead.
                    Err(e) if crate::sockets::is_fd_exhaustion(&e) => {
                        self.mode = Mode::Copy;
                        return self.try_read(src);
                    }
                    Err(e) => return Err(e),
                }
            }
            let pipe = self.pipe.as_ref().map(|p| (p.write_fd(), p.capacity()));
            let (pipe_fd, capacity) = pipe.unwrap_or((-1, 0));
            // The pipe is empty (we only fill an empty pipe), so EAGAIN here means the socket
            // has no data: try_io clears the read readiness.
            return match src.try_io(Interest::READABLE, || splice::splice(fd, pipe_fd, capacity)) {
                Ok(n) => Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(e) if splice::is_unsupported(&e) => {
                    self.release();
                    self.may_splice = false;
                    self.mode = Mode::Copy;
                    self.try_read(src)
                }
                Err(e) => Err(e),
            };
        }
        let buf = self.buf.get_or_insert_with(copy::take_buf);
        let mut short = 0;
        let read = src.try_io(Interest::READABLE, || match copy::read(fd, buf)? {
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

    /// Writes what is in flight to `dst`, as far as its send buffer takes it.
    fn poll_write(&mut self, cx: &mut Context<'_>, dst: &TcpStream) -> Poll<io::Result<()>> {
        ready!(dst.poll_write_ready(cx))?;
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
                    Poll::Ready(Ok(()))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Ready(Ok(())),
                Err(e) => Poll::Ready(Err(e)),
            };
        }
        let buf = match &self.buf {
            Some(buf) => buf,
            None => return Poll::Ready(Err(io::Error::other("no buffer in flight"))),
        };
        match dst.try_write(&buf[self.written..self.chunk]) {
            Ok(m) => {
                self.written += m;
                Poll::Ready(Ok(()))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(e)),
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
            Mode::Splice => {
                splice::count(self.chunk);
                if self.chunk < splice::SMALL {
                    // Small messages again: a read and a write move them more cheaply.
                    self.release();
                    self.mode = Mode::Copy;
                }
            }
            Mode::Copy => {}
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
    fn new(idle: Duration) -> IdleWatch {
        let step = (idle / 8).max(Duration::from_millis(10));
        let now = tokio::time::Instant::now();
        IdleWatch {
            idle,
            step,
            timer: Box::pin(tokio::time::sleep_until(now + step)),
            seen: 0,
            quiet_since: now,
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
fn half_close(stream: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(stream).shutdown(Shutdown::Write) {
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}
