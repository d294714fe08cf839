//! A socket as the relay holds it, whose read interest can be taken off the reactor.
//!
//! tokio registers a `TcpStream` with its epoll set for reads and writes, edge-triggered, for
//! the stream's whole life, and offers no way to change that. Edge-triggered epoll signals every
//! segment that arrives, so while a splicing direction waits for a destination that takes no
//! more (a target slower than its client), each segment from the source wakes the reactor for
//! nothing: the direction cannot read until it has written. Under iperf3 with 16 KiB writes that
//! was nine wake-ups in ten (docs/benchmarks.md). HAProxy avoids them by taking the read
//! interest off its poller while a direction is blocked; this type does the same for the relay.
//!
//! It starts as the `TcpStream` the handler accepted or connected (no cost for the many
//! connections that never need it). The first time the relay takes the read interest off, the
//! socket leaves tokio's `TcpStream` for an `AsyncFd` registered for writes only; turning reads
//! back on registers it again for both. Each change is an `epoll_ctl` DEL and ADD (tokio cannot
//! modify a registration in place). ADD reports the socket's state at once, so no readiness is
//! lost across a change; a waker registered with the old registration is dropped with it, so
//! [`RelaySocket::set_reads`] wakes the task after a change, to poll again whatever waits on
//! the socket.
//!
//! While the read interest is off, the relay reads without waiting for readiness (an empty
//! socket answers EAGAIN), and turns it back on only when it finds the socket empty: under a
//! sustained transfer to a slower target the source always has bytes queued, so the interest
//! stays off and the changes are rare.

use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::task::{Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// One side of a relayed connection (see the module comment).
#[derive(Debug)]
pub(crate) struct RelaySocket(Registration);

#[derive(Debug)]
enum Registration {
    /// As the handler got it: registered for reads and writes.
    Stream(TcpStream),
    /// Registered again by the relay: for writes, and for reads when `reads`.
    Fd {
        fd: AsyncFd<std::net::TcpStream>,
        reads: bool,
    },
    /// Could not be registered again: kept only to be closed (or reset) with the connection.
    Lost(std::net::TcpStream),
    /// No socket: while [`RelaySocket::set_reads`] has taken it out to register it again, and
    /// for good if tokio could not give it back (its deregistration failed, and it closed the
    /// socket then: nothing is left to reset).
    Gone,
}

pub(super) fn lost() -> io::Error {
    io::Error::other("the socket could not be registered with the reactor again")
}

impl RelaySocket {
    pub(crate) fn new(stream: TcpStream) -> RelaySocket {
        RelaySocket(Registration::Stream(stream))
    }

    /// Whether arrivals wake the reactor (they do until [`RelaySocket::set_reads`] says not).
    pub(crate) fn reads(&self) -> bool {
        match &self.0 {
            Registration::Stream(_) => true,
            Registration::Fd { reads, .. } => *reads,
            Registration::Lost(_) | Registration::Gone => false,
        }
    }

    /// Turns the read interest on or off. `Ok(true)` if the registration changed: wakers
    /// registered with the old one are gone, so the task of `cx` is woken to poll again
    /// whatever waits on this socket. An error leaves the socket registered nowhere; every
    /// later poll of it fails.
    pub(crate) fn set_reads(&mut self, on: bool, cx: &Context<'_>) -> io::Result<bool> {
        if self.reads() == on {
            return Ok(false);
        }
        let stream = match std::mem::replace(&mut self.0, Registration::Gone) {
            // DEL. It cannot fail for a socket registered here, and if it did, tokio would
            // have closed the socket: nothing would be left to reset.
            Registration::Stream(stream) => stream.into_std()?,
            Registration::Fd { fd, .. } => fd.into_inner(),
            Registration::Lost(stream) => {
                self.0 = Registration::Lost(stream);
                return Err(lost());
            }
            Registration::Gone => return Err(lost()),
        };
        let interest = if on {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::WRITABLE
        };
        // ADD, which reports the socket's readiness as it is now.
        // SAFETY: a std TcpStream owns its descriptor, which stays open and the same socket
        // until the AsyncFd is dropped or gives it back (`into_inner`).
        match unsafe { AsyncFd::register_with_interest(stream, interest) } {
            Ok(fd) => {
                self.0 = Registration::Fd { fd, reads: on };
                cx.waker().wake_by_ref();
                Ok(true)
            }
            Err(error) => {
                let (stream, error) = error.into_parts();
                self.0 = Registration::Lost(stream);
                Err(error)
            }
        }
    }

    /// Ready to read (or at EOF, or failed). Never ready while the read interest is off: the
    /// relay reads without waiting then.
    pub(crate) fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &self.0 {
            Registration::Stream(stream) => stream.poll_read_ready(cx),
            Registration::Fd { fd, .. } => fd.poll_read_ready(cx).map_ok(|_| ()),
            Registration::Lost(_) | Registration::Gone => Poll::Ready(Err(lost())),
        }
    }

    pub(crate) fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &self.0 {
            Registration::Stream(stream) => stream.poll_write_ready(cx),
            Registration::Fd { fd, .. } => fd.poll_write_ready(cx).map_ok(|_| ()),
            Registration::Lost(_) | Registration::Gone => Poll::Ready(Err(lost())),
        }
    }

    /// Runs `op` if the socket is ready for `interest` (else `WouldBlock`); a `WouldBlock`
    /// from `op` clears that readiness, as tokio's `try_io` does.
    pub(crate) fn try_io<R>(
        &self,
        interest: Interest,
        op: impl FnOnce() -> io::Result<R>,
    ) -> io::Result<R> {
        match &self.0 {
            Registration::Stream(stream) => stream.try_io(interest, op),
            Registration::Fd { fd, .. } => fd.try_io(interest, |_| op()),
            Registration::Lost(_) | Registration::Gone => Err(lost()),
        }
    }

    /// Writes what the send buffer takes, if the socket is ready for it.
    pub(crate) fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match &self.0 {
            Registration::Stream(stream) => stream.try_write(buf),
            Registration::Fd { fd, .. } => fd.try_io(Interest::WRITABLE, |s| (&*s).write(buf)),
            Registration::Lost(_) | Registration::Gone => Err(lost()),
        }
    }

    /// The socket's descriptor; `None` once [`Registration::Gone`] for good. That happens
    /// only if tokio failed to deregister the socket, which `epoll_ctl(DEL)` cannot do for an
    /// open descriptor registered here; tokio has closed it then, and there is nothing to lend,
    /// shut down or reset: whoever asks gets an error (or, on drop, does nothing) rather than
    /// a panic, which in a relay's `Drop` during unwinding would abort the process.
    pub(crate) fn fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.0 {
            Registration::Stream(stream) => Some(stream.as_fd()),
            Registration::Fd { fd, .. } => Some(fd.get_ref().as_fd()),
            Registration::Lost(stream) => Some(stream.as_fd()),
            Registration::Gone => None,
        }
    }
}

#[cfg(test)]
impl RelaySocket {
    /// A socket tokio could not give back (see [`Registration::Gone`]), for the tests of what
    /// the relay does with one.
    pub(crate) fn gone() -> RelaySocket {
        RelaySocket(Registration::Gone)
    }
}

impl AsRawFd for RelaySocket {
    /// The descriptor, or -1 once [`Registration::Gone`] (see [`RelaySocket::fd`]): never a
    /// valid descriptor, so a syscall on it fails with `EBADF` and cannot touch another file.
    fn as_raw_fd(&self) -> RawFd {
        self.fd().map_or(-1, |fd| fd.as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::copy;
    use crate::proxy::relay::tests::pair;
    use std::future::poll_fn;
    use std::task::ready;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bytes now readable on `fd`, as poll(2) sees them (outside any epoll registration):
    /// waits up to 10 s for them.
    async fn readable_outside_epoll(fd: RawFd) -> bool {
        tokio::task::spawn_blocking(move || {
            let mut pollfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; fd stays open (the caller holds the socket).
            unsafe { libc::poll(&mut pollfd, 1, 10_000) == 1 }
        })
        .await
        .unwrap()
    }

    /// Waits for read readiness and reads, `try_io`-gated as the relay reads (a `WouldBlock`
    /// clears the readiness, and the next poll waits for more).
    async fn read_when_ready(socket: &RelaySocket, buf: &mut [u8]) -> usize {
        let read = poll_fn(|cx| loop {
            if let Err(e) = ready!(socket.poll_read_ready(cx)) {
                panic!("{e}");
            }
            let read = socket.try_io(Interest::READABLE, || {
                match copy::read(socket.as_raw_fd(), buf)? {
                    copy::Read::Full(n) | copy::Read::Short(n) => Ok(n),
                }
            });
            match read {
                Ok(n) => return Poll::Ready(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("{e}"),
            }
        });
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("readable")
    }

    /// With the read interest off, arrivals wake nobody (a waiting read stays pending although
    /// bytes are queued) and writes still go out; turning it back on reports the bytes that
    /// arrived meanwhile at once (ADD reports the state as it is), so none is missed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_off_wake_nobody_and_reads_on_finds_what_arrived() {
        let (near, mut far) = pair(None).await;
        let mut socket = RelaySocket::new(near);
        assert!(socket.reads());
        let changed = poll_fn(|cx| Poll::Ready(socket.set_reads(false, cx).unwrap())).await;
        assert!(changed, "a change");
        let changed = poll_fn(|cx| Poll::Ready(socket.set_reads(false, cx).unwrap())).await;
        assert!(!changed, "no change");
        assert!(!socket.reads());
        far.write_all(b"while off").await.unwrap();
        // The bytes are there (poll(2) sees them)...
        assert!(
            readable_outside_epoll(socket.as_raw_fd()).await,
            "the bytes arrived"
        );
        // ...and yet the socket reports no read readiness: nobody was woken for them.
        let ready = poll_fn(|cx| Poll::Ready(socket.poll_read_ready(cx).is_ready())).await;
        assert!(!ready, "read readiness while the read interest is off");
        // Writes still work, through the write readiness.
        let wrote = tokio::time::timeout(
            Duration::from_secs(10),
            poll_fn(|cx| match socket.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => Poll::Ready(socket.try_write(b"out").unwrap()),
                Poll::Ready(Err(e)) => panic!("{e}"),
                Poll::Pending => Poll::Pending,
            }),
        )
        .await
        .expect("writable");
        assert_eq!(wrote, 3);
        let mut out = [0u8; 3];
        far.read_exact(&mut out).await.unwrap();
        assert_eq!(&out, b"out");
        // Back on: the queued bytes are reported without any new arrival.
        let changed = poll_fn(|cx| Poll::Ready(socket.set_reads(true, cx).unwrap())).await;
        assert!(changed);
        let mut buf = [0u8; 64];
        let n = read_when_ready(&socket, &mut buf).await;
        assert_eq!(&buf[..n], b"while off");
        // And a FIN after that, through the new registration.
        far.shutdown().await.unwrap();
        assert_eq!(read_when_ready(&socket, &mut buf).await, 0, "EOF");
    }
}
