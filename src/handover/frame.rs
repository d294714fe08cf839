//! Frames on the handover socket (a Unix stream socket pair), with file descriptors passed by
//! SCM_RIGHTS.
//!
//! A frame is a 12-byte header, then its payload:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `SLBH` |
//! | 4 | kind (see [`super::Kind`]) |
//! | 5 | reserved, 0 |
//! | 6..8 | descriptors attached, `u16` LE, at most [`MAX_FDS`] |
//! | 8..12 | payload length, `u32` LE, at most [`MAX_PAYLOAD`] |
//!
//! The descriptors ride on the `sendmsg(2)` that carries the header's first byte. A Unix
//! stream socket never merges the data of two messages that carry descriptors into one read,
//! so the reader receives each frame's descriptors with (or before) the frame's bytes, in
//! order, and keeps them in a queue until the frame is complete. The kernel passes at most 253
//! descriptors in one message (`SCM_MAX_FD`): a sender batches connections so that no frame
//! carries more. Received descriptors are close-on-exec (`MSG_CMSG_CLOEXEC`), so they never
//! leak into a process started later.
//!
//! Every wait is on tokio's readiness of the socket: sending and receiving never block a
//! worker thread.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::UnixStream;

/// The first bytes of every frame.
pub const MAGIC: [u8; 4] = *b"SLBH";

/// Bytes of a frame header.
pub const HEADER: usize = 12;

/// Descriptors one frame may carry: the kernel's `SCM_MAX_FD`.
pub const MAX_FDS: usize = 253;

/// The largest payload a reader accepts (a state with a million sessions is about 40 MiB).
pub const MAX_PAYLOAD: usize = 256 << 20;

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 256 * 1024;

/// One frame as received.
#[derive(Debug)]
pub struct Frame {
    pub kind: u8,
    pub payload: Vec<u8>,
    /// The descriptors it carried, in the order they were attached.
    pub fds: Vec<OwnedFd>,
}

/// Sends one frame: `kind`, `payload`, and `fds` (at most [`MAX_FDS`]; the caller keeps them
/// open until this returns: the kernel duplicates them into the message).
pub async fn send(stream: &UnixStream, kind: u8, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} descriptors in one frame (at most {MAX_FDS})", fds.len()),
        ));
    }
    if payload.len() > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a frame of {} bytes (at most {MAX_PAYLOAD})", payload.len()),
        ));
    }
    let mut header = [0u8; HEADER];
    header[..4].copy_from_slice(&MAGIC);
    header[4] = kind;
    header[6..8].copy_from_slice(&(fds.len() as u16).to_le_bytes());
    header[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let total = HEADER + payload.len();
    let mut sent = 0;
    while sent < total {
        let attach = if sent == 0 { fds } else { &[][..] };
        let n = stream
            .async_io(Interest::WRITABLE, || {
                send_some(stream.as_raw_fd(), &header, payload, sent, attach)
            })
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        sent += n;
    }
    Ok(())
}

/// One `sendmsg(2)` of the frame's bytes from `from` on, with `fds` attached.
fn send_some(
    socket: RawFd,
    header: &[u8; HEADER],
    payload: &[u8],
    from: usize,
    fds: &[RawFd],
) -> io::Result<usize> {
    let mut iov = [
        libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        },
        libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        },
    ];
    let mut iovs = 0;
    if from < HEADER {
        iov[iovs] = libc::iovec {
            iov_base: header[from..].as_ptr() as *mut libc::c_void,
            iov_len: HEADER - from,
        };
        iovs += 1;
    }
    let body_from = from.saturating_sub(HEADER);
    if body_from < payload.len() {
        iov[iovs] = libc::iovec {
            iov_base: payload[body_from..].as_ptr() as *mut libc::c_void,
            iov_len: payload.len() - body_from,
        };
        iovs += 1;
    }
    let mut control = ControlBuf::new();
    // SAFETY: msghdr is plain data; every pointer set below stays valid for the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iovs as _;
    if !fds.is_empty() {
        let data_len = std::mem::size_of_val(fds);
        // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic.
        let space = unsafe { libc::CMSG_SPACE(data_len as u32) } as usize;
        msg.msg_control = control.as_mut_ptr();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds CMSG_SPACE(MAX_FDS ints) >= space bytes, aligned
        // for cmsghdr; CMSG_FIRSTHDR is non-null because msg_controllen >= one header.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(data_len as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                data_len,
            );
        }
    }
    // SAFETY: msg describes valid buffers; the descriptors are open (the caller's contract).
    let n = unsafe { libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// A control-message buffer for up to [`MAX_FDS`] descriptors, aligned for `cmsghdr`.
struct ControlBuf([u64; CONTROL_WORDS]);

/// `CMSG_SPACE(MAX_FDS * 4)` in 8-byte words, with room to spare (CMSG_SPACE is not `const`).
const CONTROL_WORDS: usize = (MAX_FDS * 4 + 64) / 8;

impl ControlBuf {
    fn new() -> ControlBuf {
        ControlBuf([0; CONTROL_WORDS])
    }

    fn as_mut_ptr(&mut self) -> *mut libc::c_void {
        self.0.as_mut_ptr().cast()
    }

    fn len(&self) -> usize {
        CONTROL_WORDS * 8
    }
}

/// Reads frames from one socket: the bytes and descriptors received so far.
#[derive(Debug, Default)]
pub struct Reader {
    buf: Vec<u8>,
    /// Where the unread bytes of `buf` start.
    start: usize,
    /// Descriptors received and not yet given to a frame.
    fds: VecDeque<OwnedFd>,
}

impl Reader {
    pub fn new() -> Reader {
        Reader::default()
    }

    /// The next frame; `None` when the peer closed the socket between two frames.
    pub async fn next(&mut self, stream: &UnixStream) -> io::Result<Option<Frame>> {
        loop {
            if let Some(frame) = self.complete()? {
                return Ok(Some(frame));
            }
            if self.start > 0 && self.start * 2 >= self.buf.len() {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let n = stream
                .async_io(Interest::READABLE, || self.receive(stream.as_raw_fd()))
                .await?;
            if n == 0 {
                return if self.start == self.buf.len() {
                    Ok(None)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the handover socket closed in the middle of a frame",
                    ))
                };
            }
        }
    }

    /// Waits until something arrives (bytes, or the end of the stream) and keeps it for
    /// [`Reader::next`]. Cancel-safe: dropping it loses nothing.
    pub async fn fill(&mut self, stream: &UnixStream) -> io::Result<usize> {
        stream
            .async_io(Interest::READABLE, || self.receive(stream.as_raw_fd()))
            .await
    }

    /// The first buffered frame, once all its bytes and descriptors are here.
    fn complete(&mut self) -> io::Result<Option<Frame>> {
        let unread = &self.buf[self.start..];
        if unread.len() < HEADER {
            return Ok(None);
        }
        if unread[..4] != MAGIC {
            return Err(invalid("a frame does not start with the handover magic"));
        }
        let kind = unread[4];
        let nfds = u16::from_le_bytes([unread[6], unread[7]]) as usize;
        let len = u32::from_le_bytes([unread[8], unread[9], unread[10], unread[11]]) as usize;
        if nfds > MAX_FDS || len > MAX_PAYLOAD {
            return Err(invalid(format!(
                "a frame claims {nfds} descriptors and {len} bytes (at most {MAX_FDS} and \
                 {MAX_PAYLOAD})"
            )));
        }
        if unread.len() < HEADER + len {
            return Ok(None);
        }
        if self.fds.len() < nfds {
            return Err(invalid(format!(
                "a frame carries {nfds} descriptors but {} arrived",
                self.fds.len()
            )));
        }
        let payload = unread[HEADER..HEADER + len].to_vec();
        self.start += HEADER + len;
        let fds = self.fds.drain(..nfds).collect();
        Ok(Some(Frame { kind, payload, fds }))
    }

    /// One `recvmsg(2)` into the buffer; returns the bytes read (0: end of stream).
    fn receive(&mut self, socket: RawFd) -> io::Result<usize> {
        self.buf.reserve(READ_CHUNK);
        let spare = self.buf.spare_capacity_mut();
        let mut iov = libc::iovec {
            iov_base: spare.as_mut_ptr().cast(),
            iov_len: spare.len(),
        };
        let mut control = ControlBuf::new();
        // SAFETY: msghdr is plain data; its pointers are valid for the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr();
        msg.msg_controllen = control.len() as _;
        // SAFETY: as above; the kernel writes at most iov_len bytes and msg_controllen bytes.
        let n = unsafe { libc::recvmsg(socket, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // Take ownership of every descriptor received before anything else can fail, so that
        // none leaks.
        // SAFETY: the kernel filled msg_control with msg_controllen bytes of control messages.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg);
                    let bytes = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                    for i in 0..bytes / std::mem::size_of::<RawFd>() {
                        let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                        self.fds.push_back(OwnedFd::from_raw_fd(fd));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::other(
                "descriptors of the handover were dropped by the kernel (MSG_CTRUNC): is this \
                 process at its file-descriptor limit?",
            ));
        }
        let n = n as usize;
        // SAFETY: recvmsg initialised the first n bytes of the spare capacity.
        unsafe { self.buf.set_len(self.buf.len() + n) };
        Ok(n)
    }
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[tokio::test]
    async fn frames_carry_bytes_and_descriptors_in_order_across_batches() {
        let (a, b) = UnixStream::pair().unwrap();
        // Three frames: one with the most descriptors a message may carry, a large one with
        // none (several reads), one with two pipe ends whose pipe holds bytes.
        let files: Vec<std::fs::File> = (0..MAX_FDS)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        let big = vec![7u8; 3 * READ_CHUNK + 5];
        let mut ends = [0; 2];
        // SAFETY: a valid array for pipe2 to fill.
        assert_eq!(
            unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) },
            0
        );
        // SAFETY: both ends are fresh descriptors owned by nobody else.
        let (mut r, mut w) = unsafe {
            (
                std::fs::File::from_raw_fd(ends[0]),
                std::fs::File::from_raw_fd(ends[1]),
            )
        };
        w.write_all(b"in flight").unwrap();
        let sender = async {
            send(&a, 1, b"first", &raw).await.unwrap();
            send(&a, 2, &big, &[]).await.unwrap();
            let pipe = [r.as_raw_fd(), w.as_raw_fd()];
            send(&a, 3, b"", &pipe).await.unwrap();
        };
        let mut reader = Reader::new();
        let receiver = async {
            let mut frames = Vec::new();
            for _ in 0..3 {
                frames.push(reader.next(&b).await.unwrap().unwrap());
            }
            frames
        };
        let ((), frames) = tokio::join!(sender, receiver);
        assert_eq!((frames[0].kind, &frames[0].payload[..]), (1, &b"first"[..]));
        assert_eq!(frames[0].fds.len(), MAX_FDS);
        assert_eq!((frames[1].kind, frames[1].payload.len()), (2, big.len()));
        assert!(frames[1].fds.is_empty());
        // The pipe came across with its bytes in it.
        drop(w);
        let mut received = std::fs::File::from(frames[2].fds[0].try_clone().unwrap());
        drop(frames);
        let mut got = String::new();
        received.read_to_string(&mut got).unwrap();
        assert_eq!(got, "in flight");
        // Our own read end still sees the same pipe (now drained by the receiver).
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        drop(a);
        assert!(
            reader.next(&b).await.unwrap().is_none(),
            "EOF between frames"
        );
    }

    #[tokio::test]
    async fn a_frame_too_many_descriptors_or_without_magic_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let too_many = vec![0; MAX_FDS + 1];
        assert!(send(&a, 1, b"", &too_many).await.is_err());
        a.try_write(b"NOPE\x01\x00\x00\x00\x00\x00\x00\x00")
            .unwrap();
        let err = Reader::new().next(&b).await.unwrap_err();
        assert!(err.to_string().contains("magic"), "{err}");
    }
}
