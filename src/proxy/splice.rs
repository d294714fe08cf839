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
use std::sync::atomic::{AtomicU64, Ordering};

/// Pipes kept per worker thread. Beyond it, returned pipes are closed. Small, because each
/// pooled pipe holds two file descriptors out of the connection budget.
const POOL_PER_THREAD: usize = 16;

/// Bytes moved by splice in this process, all connections: lets tests (and an operator with a
/// debugger) confirm that the zero-copy path is really taken. One relaxed add per splice chunk.
static SPLICED_BYTES: AtomicU64 = AtomicU64::new(0);

/// Bytes moved by splice(2) in this process so far.
pub fn spliced_bytes() -> u64 {
    SPLICED_BYTES.load(Ordering::Relaxed)
}

/// A splice that moves less than this hands the direction back to the copy path.
pub const SMALL: usize = 4096;

/// Requested pipe capacity. Four times Linux's default (16 slots): a bulk transfer then makes a
/// quarter of the splice calls per byte, which lowers the balancer's CPU per GB
/// (`benches/profile.sh` counts the calls, `benches/compare.sh` the CPU; figures in
/// docs/benchmarks.md, row "256 KiB pipes"). Larger pipes help one stream a little more, but
/// they spend the per-user pipe budget (`fs.pipe-user-pages-soft`) faster: past it an
/// unprivileged process gets 2-page pipes. The pages are allocated only as the pipe fills.
const PIPE_SIZE: usize = 256 * 1024;

/// A non-blocking pipe: `write` end filled from one socket, `read` end drained into the other.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    /// The end bytes are spliced out of.
    pub(super) fn read_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// The end bytes are spliced into.
    pub(super) fn write_fd(&self) -> RawFd {
        self.write.as_raw_fd()
    }

    /// Bytes the pipe holds at most.
    pub(super) fn capacity(&self) -> usize {
        self.capacity
    }
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
        // SAFETY: F_SETPIPE_SZ/F_GETPIPE_SZ on a pipe fd we own; failure leaves the default size,
        // which F_GETPIPE_SZ then reports.
        let mut size =
            unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as i32) };
        if size <= 0 {
            size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        }
        let capacity = if size > 0 { size as usize } else { 4096 };
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
pub(super) fn take_pipe() -> io::Result<Pipe> {
    match POOL.with(|pool| pool.borrow_mut().pop()) {
        Some(pipe) => Ok(pipe),
        None => Pipe::new(),
    }
}

/// Returns an empty pipe to this thread's pool (closes it when the pool is full).
pub(super) fn give_back(pipe: Pipe) {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL_PER_THREAD {
            pool.push(pipe);
        }
    });
}

pub(super) fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
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

/// Counts bytes moved by splice (see [`spliced_bytes`]).
pub(super) fn count(n: usize) {
    SPLICED_BYTES.fetch_add(n as u64, Ordering::Relaxed);
}

/// splice(2) refused for these descriptors: the direction copies instead.
pub(super) fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pipe's identity: its inode (a closed and re-created pipe can reuse the fd number,
    /// never the inode while the old one is open).
    fn inode(fd: RawFd) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .expect("fd metadata")
            .ino()
    }

    #[test]
    fn pooled_pipes_are_reused_on_the_same_thread() {
        let p = take_pipe().unwrap();
        let pipe = inode(p.read_fd());
        give_back(p);
        assert_eq!(POOL.with(|pool| pool.borrow().len()), 1, "kept, not closed");
        let q = take_pipe().unwrap();
        assert_eq!(inode(q.read_fd()), pipe, "the same pipe came back");
        // SAFETY: F_GETPIPE_SZ on a pipe fd we own.
        let size = unsafe { libc::fcntl(q.write_fd(), libc::F_GETPIPE_SZ) };
        assert_eq!(
            q.capacity(),
            size as usize,
            "capacity is what the kernel gave"
        );
    }
}
