//! Userspace forwarding: read into a buffer, write it out. Used where splice(2) is not
//! available, when the kernel refuses it, or with `zeroCopy: false`.
//!
//! Same contract as the splice path: no more than one buffer per direction in flight (the
//! source is not read again until the buffer has been written, which is the backpressure),
//! buffers are pooled per thread and held only while bytes move, so an idle connection holds
//! no buffer.

use std::cell::RefCell;
use std::io;

use tokio::net::TcpStream;

use super::relay::Meter;

/// Bytes per buffer: HAProxy's default `tune.bufsize`. It bounds what a connection whose peer
/// stopped reading holds in user space (one buffer per direction), at the price of more
/// syscalls on bulk transfers than a larger buffer; bulk goes through splice by default.
const BUF_SIZE: usize = 16 * 1024;

/// Buffers kept per worker thread.
const POOL_PER_THREAD: usize = 64;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take_buf() -> Box<[u8]> {
    POOL.with(|pool| pool.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice())
}

fn give_back(buf: Box<[u8]>) {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL_PER_THREAD {
            pool.push(buf);
        }
    });
}

/// Moves bytes from `src` to `dst` until `src` reaches EOF, counting delivered bytes.
pub async fn forward(src: &TcpStream, dst: &TcpStream, meter: &Meter<'_>) -> io::Result<()> {
    let mut held: Option<Box<[u8]>> = None;
    loop {
        src.readable().await?;
        let mut buf = held.take().unwrap_or_else(take_buf);
        let n = match src.try_read(&mut buf) {
            Ok(0) => {
                give_back(buf);
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                give_back(buf);
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut written = 0;
        while written < n {
            dst.writable().await?;
            match dst.try_write(&buf[written..n]) {
                Ok(m) => written += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        meter.add(n);
        held = Some(buf);
    }
}
