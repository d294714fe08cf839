//! Userspace forwarding: read into a buffer, write it out. Used for small messages (where two
//! splice calls cost more than a read and a write), where splice(2) is not available, when the
//! kernel refuses it, and with `zeroCopy: false`.
//!
//! Same contract as the splice path: no more than one buffer per direction in flight (the
//! source is not read again until the buffer has been written, which is the backpressure),
//! buffers are pooled per thread and held only while bytes move, so an idle connection holds
//! no buffer.

use std::cell::RefCell;
use std::io;

use std::os::fd::RawFd;

/// Bytes per buffer: HAProxy's default `tune.bufsize`. It bounds what a connection whose peer
/// stopped reading holds in user space (one buffer per direction), at the price of more
/// syscalls on bulk transfers than a larger buffer; bulk goes through splice by default.
pub(super) const BUF_SIZE: usize = 16 * 1024;

/// Buffers kept per worker thread.
const POOL_PER_THREAD: usize = 64;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

pub(super) fn take_buf() -> Box<[u8]> {
    POOL.with(|pool| pool.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice())
}

pub(super) fn give_back(buf: Box<[u8]>) {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL_PER_THREAD {
            pool.push(buf);
        }
    });
}

/// Reads from the socket `fd` into `buf`. A read that returns less than `buf` holds has
/// drained the socket's receive queue: it is reported as `Short(n)` so that the caller can
/// return `WouldBlock` from tokio's `try_io` and have the read readiness cleared right there,
/// without the extra read(2) that would only come back with `EAGAIN`. That is safe because tokio
/// clears readiness only if no new readiness event arrived since the read began (it compares
/// the event's tick), and it never clears the closed states (a FIN or RST that came with the
/// data is still seen).
pub(super) fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<Read> {
    // SAFETY: fd is an open socket owned by the caller's stream; buf is valid for its length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    Ok(if n > 0 && n < buf.len() {
        Read::Short(n)
    } else {
        Read::Full(n)
    })
}

/// What one read gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Read {
    /// `n` bytes, as many as asked (or 0: EOF): the socket may hold more.
    Full(usize),
    /// Fewer bytes than asked: the receive queue is empty now.
    Short(usize),
}
