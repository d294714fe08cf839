//! The primitives of the handover format: little-endian integers, length-prefixed bytes and
//! strings, addresses, records whose length comes first, and file descriptors as indices into
//! the frame's descriptors.
//!
//! Reading never trusts a length: every length and count is checked against the bytes that
//! are left before anything is allocated, so a corrupt or hostile handover is an error that
//! says what was wrong, never a panic or an allocation of what a length claims.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{OwnedFd, RawFd};

/// Why a handover could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{what}: {needed} more bytes needed, {left} left")]
    Short {
        what: &'static str,
        needed: usize,
        left: usize,
    },
    #[error("{what}: {detail}")]
    Invalid { what: &'static str, detail: String },
}

impl DecodeError {
    pub(super) fn invalid(what: &'static str, detail: impl Into<String>) -> DecodeError {
        DecodeError::Invalid {
            what,
            detail: detail.into(),
        }
    }
}

/// Bytes being written, and the descriptors the frame will carry (borrowed: the writer keeps
/// them open until the frame is sent).
#[derive(Debug, Default)]
pub struct Encoder {
    pub(super) bytes: Vec<u8>,
    pub(super) fds: Vec<RawFd>,
}

impl Encoder {
    pub fn new() -> Encoder {
        Encoder::default()
    }

    pub fn u8(&mut self, v: u8) {
        self.bytes.push(v);
    }

    pub fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }

    pub fn u16(&mut self, v: u16) {
        self.bytes.extend_from_slice(&v.to_le_bytes());
    }

    pub fn u32(&mut self, v: u32) {
        self.bytes.extend_from_slice(&v.to_le_bytes());
    }

    pub fn u64(&mut self, v: u64) {
        self.bytes.extend_from_slice(&v.to_le_bytes());
    }

    /// A count or length: a `u32` (the writer never has more than that of anything).
    pub fn count(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }

    pub fn bytes(&mut self, v: &[u8]) {
        self.count(v.len());
        self.bytes.extend_from_slice(v);
    }

    pub fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }

    pub fn ip(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => {
                self.u8(4);
                self.bytes.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                self.u8(6);
                self.bytes.extend_from_slice(&v6.octets());
            }
        }
    }

    pub fn addr(&mut self, addr: SocketAddr) {
        self.ip(addr.ip());
        self.u16(addr.port());
    }

    /// A descriptor: its index among the frame's descriptors.
    pub fn fd(&mut self, fd: RawFd) {
        let index = self.fds.len();
        self.fds.push(fd);
        self.u16(u16::try_from(index).unwrap_or(u16::MAX));
    }

    /// A record: its length, then what `body` writes. A reader that knows fewer fields skips
    /// the rest of the record, so a later version may append fields without breaking it.
    pub fn record(&mut self, body: impl FnOnce(&mut Encoder)) {
        let at = self.bytes.len();
        self.u32(0);
        body(self);
        let len = u32::try_from(self.bytes.len() - at - 4).unwrap_or(u32::MAX);
        self.bytes[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// The bytes written so far.
    pub fn len_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// The descriptors added so far.
    pub fn fd_count(&self) -> usize {
        self.fds.len()
    }

    /// The bytes and the descriptors, for a frame.
    pub fn finish(self) -> (Vec<u8>, Vec<RawFd>) {
        (self.bytes, self.fds)
    }
}

/// Bytes being read, and the descriptors their frame carried (each taken at most once; those
/// never taken are closed with the decoder).
#[derive(Debug)]
pub struct Decoder<'a> {
    bytes: &'a [u8],
    fds: &'a mut [Option<OwnedFd>],
}

impl<'a> Decoder<'a> {
    pub fn new(bytes: &'a [u8], fds: &'a mut [Option<OwnedFd>]) -> Decoder<'a> {
        Decoder { bytes, fds }
    }

    /// Whether nothing is left to read: inside a record, that the writer's version had no
    /// more fields than those read so far (fields are only ever appended).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError::Short {
                what,
                needed: n,
                left: self.bytes.len(),
            });
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub fn bool(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(DecodeError::invalid(what, format!("{other} is no boolean"))),
        }
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items each at least `min_size` bytes long: checked against what is left, so
    /// that a corrupt count cannot make the reader allocate for it.
    pub fn count(&mut self, min_size: usize, what: &'static str) -> Result<usize, DecodeError> {
        let n = self.u32(what)? as usize;
        let needed = n.saturating_mul(min_size.max(1));
        if needed > self.bytes.len() {
            return Err(DecodeError::Short {
                what,
                needed,
                left: self.bytes.len(),
            });
        }
        Ok(n)
    }

    pub fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }

    pub fn str(&mut self, what: &'static str) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes(what)?)
            .map_err(|e| DecodeError::invalid(what, format!("not UTF-8: {e}")))
    }

    pub fn ip(&mut self, what: &'static str) -> Result<IpAddr, DecodeError> {
        match self.u8(what)? {
            4 => Ok(IpAddr::V4(Ipv4Addr::from(self.array::<4>(what)?))),
            6 => Ok(IpAddr::V6(Ipv6Addr::from(self.array::<16>(what)?))),
            other => Err(DecodeError::invalid(
                what,
                format!("address family {other} is neither 4 nor 6"),
            )),
        }
    }

    pub fn addr(&mut self, what: &'static str) -> Result<SocketAddr, DecodeError> {
        let ip = self.ip(what)?;
        Ok(SocketAddr::new(ip, self.u16(what)?))
    }

    /// A descriptor by its index among the frame's; each may be taken once.
    pub fn fd(&mut self, what: &'static str) -> Result<OwnedFd, DecodeError> {
        let index = self.u16(what)? as usize;
        let count = self.fds.len();
        match self.fds.get_mut(index) {
            Some(slot) => slot.take().ok_or_else(|| {
                DecodeError::invalid(what, format!("descriptor {index} is used twice"))
            }),
            None => Err(DecodeError::invalid(
                what,
                format!("descriptor {index} of {count} attached"),
            )),
        }
    }

    /// A record (see [`Encoder::record`]): `body` reads the fields it knows from the record's
    /// bytes; what it leaves (fields of a later version) is skipped.
    pub fn record<T>(
        &mut self,
        what: &'static str,
        body: impl FnOnce(&mut Decoder<'_>) -> Result<T, DecodeError>,
    ) -> Result<T, DecodeError> {
        let len = self.u32(what)? as usize;
        let bytes = self.take(len, what)?;
        let mut inner = Decoder {
            bytes,
            fds: &mut *self.fds,
        };
        body(&mut inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_back_and_records_skip_fields_they_do_not_know() {
        let mut e = Encoder::new();
        e.u64(7);
        e.str("é");
        e.addr("[::1]:80".parse().unwrap());
        e.record(|e| {
            e.u16(1);
            e.u64(99); // a field the reader below does not know
        });
        e.u8(5);
        let (bytes, _) = e.finish();
        let mut fds = [];
        let mut d = Decoder::new(&bytes, &mut fds);
        assert_eq!(d.u64("a").unwrap(), 7);
        assert_eq!(d.str("b").unwrap(), "é");
        assert_eq!(d.addr("c").unwrap(), "[::1]:80".parse().unwrap());
        assert_eq!(d.record("r", |d| d.u16("f")).unwrap(), 1);
        assert_eq!(d.u8("after").unwrap(), 5);
        assert!(d.is_empty());
    }

    #[test]
    fn lengths_and_counts_are_checked_before_anything_is_taken() {
        let mut e = Encoder::new();
        e.u32(u32::MAX); // a count no input can back
        let (bytes, _) = e.finish();
        let mut fds = [];
        let err = Decoder::new(&bytes, &mut fds).count(8, "sessions");
        assert!(matches!(err, Err(DecodeError::Short { .. })), "{err:?}");
        let err = Decoder::new(&bytes, &mut fds).bytes("buffer");
        assert!(matches!(err, Err(DecodeError::Short { .. })), "{err:?}");
        let mut fds = [];
        let err = Decoder::new(&[1, 0], &mut fds).fd("client socket");
        assert!(err.unwrap_err().to_string().contains("descriptor 1 of 0"));
        let err = Decoder::new(&[9], &mut []).ip("client").unwrap_err();
        assert!(err.to_string().contains("family 9"), "{err}");
    }
}
