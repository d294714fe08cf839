//! Zero-copy forwarding with splice(2): socket → pipe → socket, without the bytes ever
//! entering user space.
//!
//! splice(2) moves data between a file descriptor and a pipe inside the kernel, so each
//! direction of a connection goes socket → pipe → socket. Both calls use
//! `SPLICE_F_NONBLOCK` (never block the worker thread on the pipe) and `SPLICE_F_MOVE` (a hint
//! to move pages rather than copy them). The sockets are non-blocking already (tokio), and the
//! loop is driven by tokio's readiness, so what `EAGAIN` means depends on the side:
//! - socket → pipe: we only fill an *empty* pipe, so `EAGAIN` means the socket has no data;
//!   `try_io` then clears the socket's read readiness and we wait for the next edge.
//! - pipe → socket: the pipe holds data, so `EAGAIN` means the socket's send buffer is full
//!   (the peer reads slowly); we wait for write readiness. That is the backpressure: we read
//!   nothing more from the source until the pipe has drained, so a connection never holds
//!   more than one pipe's worth of bytes per direction.
//!
//! Pipes come from a per-thread pool and go back to it only when empty ("clean"), so a pipe
//! never carries one connection's bytes into another. A connection holds a pipe only while
//! bytes are moving: when its source has nothing to read, the pipe goes back to the pool, so
//! idle connections hold no pipe fds. A pipe left with data in it (the connection failed
//! mid-transfer) is closed, never pooled.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::relay::Meter;

/// Pipes kept per worker thread. Beyond it, returned pipes are closed. Small, because each
/// pooled pipe holds two file descriptors out of the connection budget.
const POOL_PER_THREAD: usize = 16;

/// Requested pipe capacity. 64 KiB is Linux's default pipe size (16 pages); asking for it
/// explicitly keeps the per-connection bound the same whatever the system's default.
const PIPE_SIZE: usize = 64 * 1024;

/// A non-blocking pipe: `write` end filled from one socket, `read` end drained into the other.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds: [RawFd; 2] = [-1, -1];
        // SAFETY: fds is a valid array of two ints for pipe2 to fill.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ on a pipe fd we own; failure leaves the default size.
        let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as i32) };
        let capacity = if size > 0 { size as usize } else { PIPE_SIZE };
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }
}

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// A pipe from this thread's pool, or a new one.
fn take_pipe() -> io::Result<Pipe> {
    match POOL.with(|pool| pool.borrow_mut().pop()) {
        Some(pipe) => Ok(pipe),
        None => Pipe::new(),
    }
}

/// Returns an empty pipe to this thread's pool (closes it when the pool is full).
fn give_back(pipe: Pipe) {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL_PER_THREAD {
            pool.push(pipe);
        }
    });
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both fds are open for the duration of the call (owned by the caller's streams
    // and pipe); null offsets mean "use and advance the file position", required for sockets
    // and pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// What a splice direction ended with.
pub enum Outcome {
    /// The source sent FIN and everything before it was delivered.
    Eof,
    /// Splice cannot go on, with no byte in flight in a pipe: the kernel refused splice for
    /// these sockets, or no file descriptor is left for a pipe. The caller copies instead.
    Unsupported,
}

/// Moves bytes from `src` to `dst` until `src` reaches EOF. Counts delivered bytes in
/// `meter` as they are delivered (so long transfers are visible while they run).
pub async fn forward(src: &TcpStream, dst: &TcpStream, meter: &Meter<'_>) -> io::Result<Outcome> {
    let (src_fd, dst_fd) = (src.as_raw_fd(), dst.as_raw_fd());
    let mut pipe: Option<Pipe> = None;
    let mut moved_any = false;
    loop {
        src.readable().await?;
        let p = match pipe.take() {
            Some(p) => p,
            None => match take_pipe() {
                Ok(p) => p,
                // Out of file descriptors: this direction copies in userspace instead.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {
                    return Ok(Outcome::Unsupported)
                }
                Err(e) => return Err(e),
            },
        };
        let n = match src.try_io(Interest::READABLE, || {
            splice(src_fd, p.write.as_raw_fd(), p.capacity)
        }) {
            Ok(0) => {
                give_back(p);
                return Ok(Outcome::Eof);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Nothing to read now: the pipe is empty, so it goes back to the pool and this
                // connection holds no pipe while idle.
                give_back(p);
                continue;
            }
            Err(e) if !moved_any && is_unsupported(&e) => {
                give_back(p);
                return Ok(Outcome::Unsupported);
            }
            Err(e) => return Err(e),
        };
        moved_any = true;
        let mut left = n;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(p.read.as_raw_fd(), dst_fd, left)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                // The pipe still holds bytes: dropping `p` closes it rather than pooling it.
                Err(e) => return Err(e),
            }
        }
        meter.add(n);
        pipe = Some(p);
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_pipes_are_reused_on_the_same_thread() {
        let p = take_pipe().unwrap();
        let fd = p.read.as_raw_fd();
        give_back(p);
        let q = take_pipe().unwrap();
        assert_eq!(q.read.as_raw_fd(), fd);
        assert!(q.capacity >= 4096);
    }
}
