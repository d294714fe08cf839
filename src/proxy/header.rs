//! The PROXY protocol on the wire (design §11): reading the header a trusted upstream sends
//! before the client's bytes, and writing one to a target before the client's bytes.
//!
//! Reading peeks (`MSG_PEEK`) at the start of the connection and asks
//! [`proxy_protocol::parse`] whether a whole header is there; only then does it read, and
//! exactly the header's length, so the client's first bytes (often in the same segment) stay in
//! the kernel for the data path, untouched. The peek buffer lives on the stack of one
//! synchronous call, never in the connection's future: a connection pays nothing for it once
//! the header is read. A peek that sees no new byte clears the socket's read readiness, so a
//! trickling upstream costs a wake-up per segment, not a spin; `proxyHeaderTimeout` bounds it.
//!
//! Writing encodes into a per-thread buffer and writes it at once on the fresh target socket
//! (its send buffer is empty, so the write completes), before the relay moves a client byte.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::proxy_protocol::{self, Header, Parse, ParseError, Version, MAX_HEADER};

/// Why no header could be read.
#[derive(Debug)]
pub(crate) enum HeaderError {
    /// The bytes are no valid header.
    Invalid(ParseError),
    /// The upstream closed before a whole header arrived.
    Eof,
    /// A socket error.
    Io(io::Error),
}

impl HeaderError {
    /// A short stable label, for the rate-limited log line.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            HeaderError::Invalid(e) => e.reason(),
            HeaderError::Eof => "closed_before_header",
            HeaderError::Io(e) if e.kind() == io::ErrorKind::TimedOut => "timeout",
            HeaderError::Io(_) => "socket_error",
        }
    }
}

/// What one look at the socket gave.
enum Step {
    /// A whole header, now consumed.
    Done(Header),
    /// A prefix of a header: wait for more bytes.
    More(usize),
}

/// Reads the PROXY header at the start of `stream` (v1 or v2, told apart by its first bytes)
/// and consumes exactly it.
pub(crate) async fn read(stream: &TcpStream) -> Result<Header, HeaderError> {
    let fd = stream.as_raw_fd();
    let mut seen = 0;
    loop {
        let ready = stream
            .ready(Interest::READABLE)
            .await
            .map_err(HeaderError::Io)?;
        // The upstream sent its FIN: every byte it will send is there to peek, and readiness
        // stays set, so an incomplete header now is a truncated one.
        let closed = ready.is_read_closed();
        let step = stream.try_io(Interest::READABLE, || {
            let mut buf = [0u8; MAX_HEADER];
            let n = recv(fd, &mut buf, libc::MSG_PEEK)?;
            if n == 0 || (n == seen && closed) {
                return Ok(Err(HeaderError::Eof));
            }
            if n == seen {
                // Nothing new since the last look: clear the readiness and wait for more.
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(match proxy_protocol::parse(&buf[..n]) {
                Ok(Parse::Incomplete) if n < MAX_HEADER => Ok(Step::More(n)),
                // Cannot happen with parse's caps, which are at most MAX_HEADER; refused
                // rather than trusted.
                Ok(Parse::Incomplete) => {
                    Err(HeaderError::Invalid(ParseError::V2TooLong { len: n }))
                }
                Ok(Parse::Complete { header, len }) => {
                    // The bytes were peeked, so this read returns them all.
                    let got = recv(fd, &mut buf[..len], 0)?;
                    if got == len {
                        Ok(Step::Done(header))
                    } else {
                        Err(HeaderError::Io(io::Error::other("the header shrank")))
                    }
                }
                Err(e) => Err(HeaderError::Invalid(e)),
            })
        });
        match step {
            Ok(Ok(Step::Done(header))) => return Ok(header),
            Ok(Ok(Step::More(n))) => seen = n,
            Ok(Err(e)) => return Err(e),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(HeaderError::Io(e)),
        }
    }
}

fn recv(fd: i32, buf: &mut [u8], flags: i32) -> io::Result<usize> {
    // SAFETY: fd is an open socket owned by the caller's stream; buf is valid for its length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

thread_local! {
    /// The header being written: reused, so a connection allocates nothing for it.
    static OUT: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(128));
}

/// Writes the PROXY header saying that `client` connected to `server` to the fresh target
/// connection `stream`. Its send buffer is empty, so the first write takes the whole header;
/// only if it does not is the rest copied out and waited for.
pub(crate) async fn write(
    stream: &TcpStream,
    version: Version,
    client: SocketAddr,
    server: SocketAddr,
) -> io::Result<()> {
    let rest = OUT.with(|out| {
        let mut out = out.borrow_mut();
        out.clear();
        proxy_protocol::encode(version, client, server, &mut out);
        match stream.try_write(&out) {
            Ok(n) if n == out.len() => Ok(None),
            Ok(n) => Ok(Some(out[n..].to_vec())),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Some(out.to_vec())),
            Err(e) => Err(e),
        }
    })?;
    let Some(rest) = rest else {
        return Ok(());
    };
    let mut written = 0;
    while written < rest.len() {
        stream.writable().await?;
        match stream.try_write(&rest[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
