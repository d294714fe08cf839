//! The PROXY protocol header (HAProxy's `proxy-protocol.txt`, versions 1 and 2): parsing what a
//! trusted upstream sends before the client's bytes, and building the header stickylb sends to
//! a target (design §11). A leaf: it knows bytes and socket addresses, nothing of the proxy.
//!
//! # Security: who may send a header
//!
//! A PROXY header is a claim about who the client is, and everything keyed on the client (the
//! hash, sessions, `allow`/`deny`, the per-client limit, the access log) believes it. So a
//! header is parsed only on connections from the `acceptProxyProtocol` CIDRs, the upstreams
//! trusted to make that claim; there it is required. From any other address nothing is parsed:
//! bytes that look like a header are the client's data and are proxied as such. The spec says
//! the same: a receiver must never guess whether a header is present, or anyone could spoof
//! their address.
//!
//! # Parsing: [`parse`]
//!
//! The caller peeks (`MSG_PEEK`) the start of the connection into a buffer of [`MAX_HEADER`]
//! bytes and calls [`parse`] on what it has so far, again on each new readiness, until the
//! answer is [`Parse::Complete`] or an error. `parse` keeps no state between calls and never
//! allocates. A complete answer carries the header's exact length, so the caller reads exactly
//! that many bytes and leaves what follows (the client's first bytes, often in the same
//! segment) in the kernel for the data path. Errors come as early as the bytes allow, so a bad
//! upstream is reset without waiting out the header timeout: a byte no header can have at its
//! place (in the signature, the protocol word, a port over 65535, a character no address has)
//! is an error at once; an address is judged whole, at the space after it. An error never turns
//! into success with more bytes, and bytes after a complete header never change the answer (the
//! property tests check both).
//!
//! Strict as the spec asks (HAProxy's own receiver is more lenient in places):
//! - v1: `PROXY`, exactly one space between fields, `TCP4`, `TCP6` or `UNKNOWN`, CRLF within
//!   [`V1_MAX`] bytes (a lone CR or LF is an error); IPv4 in `TCP4` lines and IPv6 in `TCP6`
//!   lines, dotted quads without leading zeros; ports 0–65535 in plain decimal (no `+`, no
//!   leading zero). After `UNKNOWN`, anything up to the CRLF is ignored, as the spec says.
//! - v2: the 12-byte signature, version 2, command LOCAL or PROXY, an assigned family and
//!   transport, a length that holds the family's addresses and fits [`V2_MAX`], and TLVs that
//!   tile the rest of the declared length exactly. TLVs are skipped, not interpreted (stickylb
//!   needs only the addresses; a CRC32C TLV is not verified, which the spec allows a receiver
//!   that does not support it).
//!
//! What a header means, as [`Header`]:
//! - [`Header::Proxied`]: the client and the address it connected to. Both addresses come in
//!   canonical form: an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) becomes IPv4, as the rest
//!   of stickylb expects (the hash, the CIDR lists).
//! - [`Header::Local`]: use the connection's own addresses. This is v1 `UNKNOWN` and v2 `LOCAL`
//!   (an upstream's health check), and also v2 PROXY with an address family stickylb cannot
//!   use as a client address: `AF_UNSPEC`, `AF_UNIX`, or an unspecified transport. The spec
//!   lets a receiver fall back to the real endpoints there; rejecting them would cut off an
//!   upstream that forwards a UNIX-socket client.
//! - v2 PROXY over `DGRAM` (UDP) is an error: a datagram's addresses are no description of a
//!   TCP connection.
//!
//! # The caps
//!
//! v1 lines are at most [`V1_MAX`] = 107 bytes with the CRLF: the spec's own bound. v2 headers
//! are at most [`V2_MAX`] = 1024 bytes in all, chosen because:
//! - the peek buffer must hold the whole header before any of it is consumed, so the cap is
//!   the caller's buffer size ([`MAX_HEADER`]); a cap of 64 KiB (what the length field allows)
//!   would make every trusted connection peek and hold that much;
//! - 1024 holds every TLV set real senders put on a TCP connection, with room to spare:
//!   cloud load balancers add well under 100 bytes (a VPC endpoint or link ID), and HAProxy
//!   with every `proxy-v2-options` TLV but the client certificate (ALPN, authority, CRC32C,
//!   unique ID, SSL version, CN, cipher and algorithms) comes to about 610 bytes at the longest
//!   (a 253-byte host name, a 128-byte unique ID). The spec's 536 bytes (the smallest TCP
//!   segment every host must accept) is the least the design allows, but that set does not
//!   fit in it. Custom TLVs an operator adds count against the cap too;
//! - it fits in one Ethernet segment (MSS 1460, or 1440 over IPv6), so a sender that writes
//!   its header at once, as the spec requires, delivers it in one read;
//! - a client certificate TLV (kilobytes, no bound) fits under no cap that keeps the buffer
//!   small, and stickylb would skip it anyway: such an upstream must not send it to stickylb.
//!
//! The buffer is small enough for the stack of the synchronous peek call; it should not live
//! in the connection's future, where every connection would pay for it for its whole life.
//!
//! # Building: [`encode`]
//!
//! [`encode`] appends the header for a client and the address it connected to, v1 text or v2
//! binary (command PROXY, transport STREAM), to a reused `Vec`: no other allocation and no
//! formatting machinery, since it runs once per connection. Both addresses of a header share
//! one family (v1 has one protocol word, v2 one family byte), so:
//! - both IPv4, or IPv4-mapped IPv6: written as IPv4 (`TCP4`, `AF_INET`);
//! - otherwise both as IPv6 (`TCP6`, `AF_INET6`), the IPv4 side mapped to `::ffff:a.b.c.d`,
//!   as HAProxy does for a mixed pair; IPv6 can carry an IPv4 address, not the other way.
//!
//! v1 IPv6 text is the RFC 5952 form (lowercase, the longest run of zero groups shortened to
//! `::`), hexadecimal groups only, as the spec describes the format.
//!
//! # Why hand-written, not the `ppp` crate
//!
//! `ppp` (2.3.0) parses both versions without allocating, tells "incomplete" from "invalid"
//! (`PartialResult`), gives the consumed length (the borrowed header slice) and did not panic on
//! millions of mutated headers. Used here, it would still need as much code around it as this
//! module has:
//! - `+80` is accepted as a v1 port (it parses ports with `u16::from_str`); TCP4 lines with an
//!   IPv6 address get the same error as a typo, so the log cannot say "family mismatch";
//! - v2 TLVs are not checked at parse time (a TLV running past the declared length parses as
//!   a valid header; the check is a separate walk), DGRAM is accepted, and there is no cap on
//!   the length field: a 64 KiB declared length is "incomplete", not an error;
//! - its combined entry point (`HeaderResult::parse`) reports a v2 header with a bad version
//!   byte as a v1 "invalid prefix", so the reason in the log would be wrong;
//! - its encoders build a new `Vec` or a `String` per header;
//! - it depends on `thiserror` 1 while stickylb uses 2 (a second proc-macro build), and its
//!   releases are sparse (2.3.0, February 2025, the first since 2022).
//!
//! The protocol is small and fully specified; a few hundred lines with golden vectors,
//! property tests and a fuzz target cost less than those wrappers and give exact errors.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The longest v1 line, CRLF included (the spec's worst case, `PROXY UNKNOWN` with two full
/// IPv6 addresses and ports).
pub const V1_MAX: usize = 107;

/// The longest v2 header accepted, the 16 fixed bytes included. See the module comment for
/// why 1024.
pub const V2_MAX: usize = 1024;

/// The peek buffer a caller needs: the larger of the two caps. A buffer this long always
/// holds a whole acceptable header, so [`parse`] never answers [`Parse::Incomplete`] to a
/// full buffer.
pub const MAX_HEADER: usize = if V1_MAX > V2_MAX { V1_MAX } else { V2_MAX };

/// How every v1 header starts.
const V1_PREFIX: &[u8] = b"PROXY ";

/// How every v2 header starts (it contains a NUL byte, and a CRLF that no v1 line starts with).
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// The fixed part of a v2 header: signature, version and command, family and transport, length.
const V2_FIXED: usize = 16;

/// The longest IPv6 text the v1 parser can meet, `ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255`;
/// a longer address field is an error before its end arrives.
const V1_ADDRESS_MAX: usize = 45;

const V2_CMD_LOCAL: u8 = 0x0;
const V2_CMD_PROXY: u8 = 0x1;
const V2_FAM_INET: u8 = 0x1;
const V2_FAM_INET6: u8 = 0x2;
const V2_FAM_UNIX: u8 = 0x3;
const V2_TRANS_STREAM: u8 = 0x1;
const V2_TRANS_DGRAM: u8 = 0x2;

/// What a complete header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The connection was relayed for `client`, which connected to `server`. Addresses are in
    /// canonical form (no IPv4-mapped IPv6).
    Proxied {
        client: SocketAddr,
        server: SocketAddr,
    },
    /// Use the connection's own addresses: v1 `UNKNOWN`, v2 `LOCAL`, or v2 PROXY for a family
    /// that carries no IP client (`AF_UNSPEC`, `AF_UNIX`, unspecified transport).
    Local,
}

/// The answer of [`parse`] for the bytes seen so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parse {
    /// Every byte so far can start a valid header: peek again when more have arrived.
    Incomplete,
    /// A whole header: the first `len` bytes of the buffer. What follows is the client's.
    Complete { header: Header, len: usize },
}

/// A field of a v1 line, named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V1Field {
    Protocol,
    SourceAddress,
    DestinationAddress,
    SourcePort,
    DestinationPort,
    /// The CRLF that ends the line.
    LineEnd,
}

impl std::fmt::Display for V1Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            V1Field::Protocol => "protocol",
            V1Field::SourceAddress => "source address",
            V1Field::DestinationAddress => "destination address",
            V1Field::SourcePort => "source port",
            V1Field::DestinationPort => "destination port",
            V1Field::LineEnd => "line end",
        })
    }
}

/// Why bytes are not a valid PROXY header. The connection is reset; [`ParseError::reason`]
/// is the short label for the rate-limited log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not a PROXY protocol header (neither \"PROXY \" nor the v2 signature)")]
    BadSignature,
    /// A field is missing, empty, or not one of the allowed words, or the separators are
    /// not single spaces, or the line does not end in CRLF right after the last field.
    #[error("PROXY v1: bad syntax at the {0}")]
    V1Syntax(V1Field),
    #[error("PROXY v1: no CRLF within {V1_MAX} bytes")]
    V1TooLong,
    #[error("PROXY v1: invalid {0}")]
    V1BadAddress(V1Field),
    #[error("PROXY v1: invalid {0} (0-65535, decimal, no sign or leading zero)")]
    V1BadPort(V1Field),
    /// An IPv6 address in a `TCP4` line, or IPv4 in a `TCP6` line.
    #[error("PROXY v1: the {0} is not of the line's protocol family")]
    V1FamilyMismatch(V1Field),
    #[error("PROXY v2: version {0} (only 2 is defined)")]
    V2BadVersion(u8),
    #[error("PROXY v2: command {0} (only LOCAL 0 and PROXY 1 are defined)")]
    V2BadCommand(u8),
    /// An unassigned address family (over 3) or transport (over 2) in the family byte.
    #[error("PROXY v2: family and transport byte {0:#04x} is not assigned")]
    V2BadFamily(u8),
    #[error("PROXY v2: a DGRAM (UDP) connection cannot be the client of a TCP connection")]
    V2UnsupportedTransport,
    #[error("PROXY v2: length {len} cannot hold the addresses of family byte {family:#04x}")]
    V2TooShort { family: u8, len: u16 },
    #[error("PROXY v2: header of {len} bytes is over the {V2_MAX}-byte cap")]
    V2TooLong { len: usize },
    /// The TLVs after the addresses do not end exactly at the declared length.
    #[error("PROXY v2: a TLV runs past the declared length")]
    V2BadTlv,
}

impl ParseError {
    /// A short label that never changes, for logs and counters (one per variant).
    pub fn reason(&self) -> &'static str {
        match self {
            ParseError::BadSignature => "bad_signature",
            ParseError::V1Syntax(_) => "v1_syntax",
            ParseError::V1TooLong => "v1_too_long",
            ParseError::V1BadAddress(_) => "v1_bad_address",
            ParseError::V1BadPort(_) => "v1_bad_port",
            ParseError::V1FamilyMismatch(_) => "v1_family_mismatch",
            ParseError::V2BadVersion(_) => "v2_bad_version",
            ParseError::V2BadCommand(_) => "v2_bad_command",
            ParseError::V2BadFamily(_) => "v2_bad_family",
            ParseError::V2UnsupportedTransport => "v2_unsupported_transport",
            ParseError::V2TooShort { .. } => "v2_too_short",
            ParseError::V2TooLong { .. } => "v2_too_long",
            ParseError::V2BadTlv => "v2_bad_tlv",
        }
    }
}

/// Parses the header at the start of `buf`, the bytes peeked so far from the start of the
/// connection (any amount, including none). The version is told by the first byte: `P` for
/// v1, CR for v2; anything else is [`ParseError::BadSignature`] at once.
pub fn parse(buf: &[u8]) -> Result<Parse, ParseError> {
    match buf.first() {
        None => Ok(Parse::Incomplete),
        Some(b'P') => parse_v1(buf),
        Some(b'\r') => parse_v2(buf),
        Some(_) => Err(ParseError::BadSignature),
    }
}

/// True when `buf` and `expected` agree on their common length.
fn agrees(buf: &[u8], expected: &[u8]) -> bool {
    let n = buf.len().min(expected.len());
    buf.get(..n) == expected.get(..n)
}

fn parse_v1(buf: &[u8]) -> Result<Parse, ParseError> {
    if !agrees(buf, V1_PREFIX) {
        return Err(ParseError::BadSignature);
    }
    // Only the first V1_MAX bytes can belong to the line: a line still incomplete there
    // never ends in time.
    let line = buf.get(..V1_MAX).unwrap_or(buf);
    match parse_v1_line(line)? {
        Parse::Incomplete if buf.len() >= V1_MAX => Err(ParseError::V1TooLong),
        answer => Ok(answer),
    }
}

/// How a v1 field ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Delimiter {
    Space,
    /// A CR: the line must end with the LF after it.
    Cr,
    /// A LF without its CR: always an error.
    Lf,
    /// The bytes seen so far ended inside the field.
    End,
}

/// A reader of the fields of a v1 line; `pos` is just after the last delimiter taken.
struct V1Line<'a> {
    line: &'a [u8],
    pos: usize,
}

impl<'a> V1Line<'a> {
    /// The next field and what ended it.
    fn field(&mut self) -> (&'a [u8], Delimiter) {
        let rest = self.line.get(self.pos..).unwrap_or_default();
        match rest
            .iter()
            .position(|&b| b == b' ' || b == b'\r' || b == b'\n')
        {
            None => {
                self.pos = self.line.len();
                (rest, Delimiter::End)
            }
            Some(i) => {
                self.pos += i + 1;
                let delimiter = match rest.get(i) {
                    Some(b' ') => Delimiter::Space,
                    Some(b'\r') => Delimiter::Cr,
                    _ => Delimiter::Lf,
                };
                (rest.get(..i).unwrap_or_default(), delimiter)
            }
        }
    }
}

/// What the line's protocol word says about the addresses that follow.
#[derive(Clone, Copy, PartialEq, Eq)]
enum V1Family {
    Tcp4,
    Tcp6,
}

fn parse_v1_line(line: &[u8]) -> Result<Parse, ParseError> {
    let mut reader = V1Line {
        line,
        pos: V1_PREFIX.len(),
    };
    let (word, delimiter) = reader.field();
    if delimiter == Delimiter::End {
        let known = [&b"TCP4"[..], b"TCP6", b"UNKNOWN"];
        return if known.iter().any(|w| w.starts_with(word)) {
            Ok(Parse::Incomplete)
        } else {
            Err(ParseError::V1Syntax(V1Field::Protocol))
        };
    }
    let family = match word {
        b"TCP4" => V1Family::Tcp4,
        b"TCP6" => V1Family::Tcp6,
        b"UNKNOWN" => return v1_unknown(&reader, delimiter),
        _ => return Err(ParseError::V1Syntax(V1Field::Protocol)),
    };
    separator(delimiter, V1Field::SourceAddress)?;

    // Each field is checked as soon as its delimiter arrives, and its delimiter after it.
    let Some((text, delimiter)) = v1_field(&mut reader, V1Field::SourceAddress)? else {
        return Ok(Parse::Incomplete);
    };
    let client_ip = v1_address(text, family, V1Field::SourceAddress)?;
    separator(delimiter, V1Field::DestinationAddress)?;
    let Some((text, delimiter)) = v1_field(&mut reader, V1Field::DestinationAddress)? else {
        return Ok(Parse::Incomplete);
    };
    let server_ip = v1_address(text, family, V1Field::DestinationAddress)?;
    separator(delimiter, V1Field::SourcePort)?;
    let Some((text, delimiter)) = v1_field(&mut reader, V1Field::SourcePort)? else {
        return Ok(Parse::Incomplete);
    };
    let client_port = v1_port(text, V1Field::SourcePort)?;
    separator(delimiter, V1Field::DestinationPort)?;
    let Some((text, delimiter)) = v1_field(&mut reader, V1Field::DestinationPort)? else {
        return Ok(Parse::Incomplete);
    };
    let server_port = v1_port(text, V1Field::DestinationPort)?;
    if delimiter != Delimiter::Cr {
        // A space (a seventh field) or a lone LF.
        return Err(ParseError::V1Syntax(V1Field::LineEnd));
    }
    match reader.line.get(reader.pos) {
        None => Ok(Parse::Incomplete),
        Some(b'\n') => Ok(Parse::Complete {
            header: Header::Proxied {
                client: SocketAddr::new(client_ip, client_port),
                server: SocketAddr::new(server_ip, server_port),
            },
            len: reader.pos + 1,
        }),
        Some(_) => Err(ParseError::V1Syntax(V1Field::LineEnd)),
    }
}

/// The next address or port field: `None` when the bytes so far end inside it and it can
/// still become valid; an error when it cannot, or when it is empty (two separators in a row).
fn v1_field<'a>(
    reader: &mut V1Line<'a>,
    field: V1Field,
) -> Result<Option<(&'a [u8], Delimiter)>, ParseError> {
    let is_address = matches!(field, V1Field::SourceAddress | V1Field::DestinationAddress);
    let (text, delimiter) = reader.field();
    if delimiter == Delimiter::End {
        return match (is_address, address_prefix_ok(text), port_prefix_ok(text)) {
            (true, true, _) | (false, _, true) => Ok(None),
            (true, false, _) => Err(ParseError::V1BadAddress(field)),
            (false, _, false) => Err(ParseError::V1BadPort(field)),
        };
    }
    if text.is_empty() {
        return Err(ParseError::V1Syntax(field));
    }
    Ok(Some((text, delimiter)))
}

/// The delimiter after a field that another field (`next`) must follow: one space. (A field
/// cut short by the end of the bytes never gets here.)
fn separator(delimiter: Delimiter, next: V1Field) -> Result<(), ParseError> {
    match delimiter {
        Delimiter::Space | Delimiter::End => Ok(()),
        // The line ends early: `next` is missing.
        Delimiter::Cr => Err(ParseError::V1Syntax(next)),
        Delimiter::Lf => Err(ParseError::V1Syntax(V1Field::LineEnd)),
    }
}

/// After `UNKNOWN`: the rest of the line, whatever it holds, up to the CRLF.
fn v1_unknown(reader: &V1Line<'_>, delimiter: Delimiter) -> Result<Parse, ParseError> {
    let cr = match delimiter {
        Delimiter::Cr => reader.pos,
        Delimiter::Lf => return Err(ParseError::V1Syntax(V1Field::LineEnd)),
        Delimiter::End => return Ok(Parse::Incomplete),
        Delimiter::Space => {
            let rest = reader.line.get(reader.pos..).unwrap_or_default();
            match rest.iter().position(|&b| b == b'\r' || b == b'\n') {
                None => return Ok(Parse::Incomplete),
                Some(i) if rest.get(i) == Some(&b'\n') => {
                    return Err(ParseError::V1Syntax(V1Field::LineEnd))
                }
                Some(i) => reader.pos + i + 1,
            }
        }
    };
    match reader.line.get(cr) {
        None => Ok(Parse::Incomplete),
        Some(b'\n') => Ok(Parse::Complete {
            header: Header::Local,
            len: cr + 1,
        }),
        Some(_) => Err(ParseError::V1Syntax(V1Field::LineEnd)),
    }
}

/// Whether an address field cut short can still become a valid address of either family
/// (either, so that a complete field can tell a family mismatch from a typo).
fn address_prefix_ok(text: &[u8]) -> bool {
    text.len() <= V1_ADDRESS_MAX
        && text
            .iter()
            .all(|b| b.is_ascii_hexdigit() || *b == b':' || *b == b'.')
}

/// A complete address field of a line of `family`.
fn v1_address(text: &[u8], family: V1Family, field: V1Field) -> Result<IpAddr, ParseError> {
    let text = std::str::from_utf8(text).map_err(|_| ParseError::V1BadAddress(field))?;
    let v4 = text.parse::<Ipv4Addr>();
    let v6 = text.parse::<Ipv6Addr>();
    match (family, v4, v6) {
        (V1Family::Tcp4, Ok(a), _) => Ok(IpAddr::V4(a)),
        (V1Family::Tcp6, _, Ok(a)) => Ok(IpAddr::V6(a).to_canonical()),
        (V1Family::Tcp4, Err(_), Ok(_)) | (V1Family::Tcp6, Ok(_), Err(_)) => {
            Err(ParseError::V1FamilyMismatch(field))
        }
        _ => Err(ParseError::V1BadAddress(field)),
    }
}

/// Whether a port field cut short can still become a valid port.
fn port_prefix_ok(text: &[u8]) -> bool {
    text.is_empty() || v1_port(text, V1Field::SourcePort).is_ok()
}

/// A port: 1 to 5 decimal digits, no leading zero unless it is `0`, at most 65535.
fn v1_port(text: &[u8], field: V1Field) -> Result<u16, ParseError> {
    let bad = ParseError::V1BadPort(field);
    if text.is_empty() || text.len() > 5 || (text.len() > 1 && text.first() == Some(&b'0')) {
        return Err(bad);
    }
    let mut value: u32 = 0;
    for &b in text {
        if !b.is_ascii_digit() {
            return Err(bad);
        }
        value = value * 10 + u32::from(b - b'0');
    }
    u16::try_from(value).map_err(|_| bad)
}

fn parse_v2(buf: &[u8]) -> Result<Parse, ParseError> {
    if !agrees(buf, V2_SIGNATURE) {
        return Err(ParseError::BadSignature);
    }
    // Each fixed byte is checked as soon as it is there.
    let Some(&version_command) = buf.get(12) else {
        return Ok(Parse::Incomplete);
    };
    let (version, command) = (version_command >> 4, version_command & 0x0f);
    if version != 2 {
        return Err(ParseError::V2BadVersion(version));
    }
    if command != V2_CMD_LOCAL && command != V2_CMD_PROXY {
        return Err(ParseError::V2BadCommand(command));
    }
    let Some(&family_transport) = buf.get(13) else {
        return Ok(Parse::Incomplete);
    };
    let (family, transport) = (family_transport >> 4, family_transport & 0x0f);
    if family > V2_FAM_UNIX || transport > V2_TRANS_DGRAM {
        return Err(ParseError::V2BadFamily(family_transport));
    }
    if command == V2_CMD_PROXY && transport == V2_TRANS_DGRAM {
        return Err(ParseError::V2UnsupportedTransport);
    }
    let (Some(&high), Some(&low)) = (buf.get(14), buf.get(15)) else {
        return Ok(Parse::Incomplete);
    };
    let declared = u16::from_be_bytes([high, low]);
    let len = V2_FIXED + usize::from(declared);
    if len > V2_MAX {
        return Err(ParseError::V2TooLong { len });
    }
    // The addresses this header must hold. 0 where the block is skipped unread and the header
    // means Local: LOCAL ("discard the protocol block including the family"), and AF_UNSPEC
    // or an unspecified transport (no layout is defined for their addresses).
    let addresses_len = match (command, family, transport) {
        (V2_CMD_PROXY, V2_FAM_INET, V2_TRANS_STREAM) => 12,
        (V2_CMD_PROXY, V2_FAM_INET6, V2_TRANS_STREAM) => 36,
        (V2_CMD_PROXY, V2_FAM_UNIX, V2_TRANS_STREAM) => 216,
        _ => 0,
    };
    if usize::from(declared) < addresses_len {
        return Err(ParseError::V2TooShort {
            family: family_transport,
            len: declared,
        });
    }
    let Some(block) = buf.get(V2_FIXED..len) else {
        return Ok(Parse::Incomplete);
    };
    let header = if addresses_len == 0 {
        Header::Local
    } else {
        check_tlvs(block.get(addresses_len..).unwrap_or_default())?;
        match v2_addresses(family, block) {
            Some((client, server)) => Header::Proxied { client, server },
            None => Header::Local,
        }
    };
    Ok(Parse::Complete { header, len })
}

/// TLVs (type, 16-bit length, value) that end exactly where the header ends.
fn check_tlvs(mut tlvs: &[u8]) -> Result<(), ParseError> {
    while let Some((&[_kind, high, low], rest)) = tlvs.split_first_chunk::<3>() {
        let value_len = usize::from(u16::from_be_bytes([high, low]));
        tlvs = rest.get(value_len..).ok_or(ParseError::V2BadTlv)?;
    }
    if tlvs.is_empty() {
        Ok(())
    } else {
        // One or two bytes left: too short for a TLV.
        Err(ParseError::V2BadTlv)
    }
}

/// The client and server at the start of an `AF_INET` or `AF_INET6` block; `None` for
/// `AF_UNIX` (or a block too short, which the length check has already refused).
fn v2_addresses(family: u8, block: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    let (client, server, ports) = match family {
        V2_FAM_INET => {
            let (client, rest) = block.split_first_chunk::<4>()?;
            let (server, ports) = rest.split_first_chunk::<4>()?;
            (
                IpAddr::V4(Ipv4Addr::from(*client)),
                IpAddr::V4(Ipv4Addr::from(*server)),
                ports,
            )
        }
        V2_FAM_INET6 => {
            let (client, rest) = block.split_first_chunk::<16>()?;
            let (server, ports) = rest.split_first_chunk::<16>()?;
            (
                IpAddr::V6(Ipv6Addr::from(*client)).to_canonical(),
                IpAddr::V6(Ipv6Addr::from(*server)).to_canonical(),
                ports,
            )
        }
        _ => return None,
    };
    let &[c1, c2, s1, s2] = ports.first_chunk::<4>()?;
    Some((
        SocketAddr::new(client, u16::from_be_bytes([c1, c2])),
        SocketAddr::new(server, u16::from_be_bytes([s1, s2])),
    ))
}

/// Which header [`encode`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// The text line, `PROXY TCP4 …\r\n`.
    V1,
    /// The binary header.
    V2,
}

/// Appends the header saying that `client` connected to `server` to `out`, in `version`.
/// See the module comment for the family written.
pub fn encode(version: Version, client: SocketAddr, server: SocketAddr, out: &mut Vec<u8>) {
    match version {
        Version::V1 => encode_v1(client, server, out),
        Version::V2 => encode_v2(client, server, out),
    }
}

/// The pair as one family: both IPv4 when both are IPv4 or IPv4-mapped, else both IPv6.
enum Pair {
    V4([Ipv4Addr; 2]),
    V6([Ipv6Addr; 2]),
}

fn pair(client: IpAddr, server: IpAddr) -> Pair {
    match (client.to_canonical(), server.to_canonical()) {
        (IpAddr::V4(c), IpAddr::V4(s)) => Pair::V4([c, s]),
        (c, s) => Pair::V6([as_v6(c), as_v6(s)]),
    }
}

fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

/// Appends `PROXY TCP4|TCP6 <client> <server> <client port> <server port>\r\n` to `out`.
pub fn encode_v1(client: SocketAddr, server: SocketAddr, out: &mut Vec<u8>) {
    // The longest line this writes: TCP6 with two 39-character addresses, 104 bytes.
    out.reserve(V1_MAX);
    match pair(client.ip(), server.ip()) {
        Pair::V4(ips) => {
            out.extend_from_slice(b"PROXY TCP4 ");
            for ip in ips {
                write_ipv4(ip, out);
                out.push(b' ');
            }
        }
        Pair::V6(ips) => {
            out.extend_from_slice(b"PROXY TCP6 ");
            for ip in ips {
                write_ipv6(ip, out);
                out.push(b' ');
            }
        }
    }
    write_decimal(client.port(), out);
    out.push(b' ');
    write_decimal(server.port(), out);
    out.extend_from_slice(b"\r\n");
}

/// Appends the v2 header (PROXY command, STREAM transport, no TLVs) to `out`.
pub fn encode_v2(client: SocketAddr, server: SocketAddr, out: &mut Vec<u8>) {
    let mut header = [0u8; V2_FIXED + 36];
    let (fixed, block) = header.split_at_mut(V2_FIXED);
    fixed[..12].copy_from_slice(V2_SIGNATURE);
    fixed[12] = 0x20 | V2_CMD_PROXY;
    let addresses_len = match pair(client.ip(), server.ip()) {
        Pair::V4([c, s]) => {
            fixed[13] = (V2_FAM_INET << 4) | V2_TRANS_STREAM;
            block[0..4].copy_from_slice(&c.octets());
            block[4..8].copy_from_slice(&s.octets());
            8
        }
        Pair::V6([c, s]) => {
            fixed[13] = (V2_FAM_INET6 << 4) | V2_TRANS_STREAM;
            block[0..16].copy_from_slice(&c.octets());
            block[16..32].copy_from_slice(&s.octets());
            32
        }
    };
    block[addresses_len..addresses_len + 2].copy_from_slice(&client.port().to_be_bytes());
    block[addresses_len + 2..addresses_len + 4].copy_from_slice(&server.port().to_be_bytes());
    let block_len = addresses_len + 4;
    // 12 or 36: always fits the 16-bit length.
    fixed[14..16].copy_from_slice(&(block_len as u16).to_be_bytes());
    out.extend_from_slice(&header[..V2_FIXED + block_len]);
}

/// `n` in decimal, without leading zeros.
fn write_decimal(n: u16, out: &mut Vec<u8>) {
    let mut digits = [0u8; 5];
    let mut start = digits.len();
    let mut n = n;
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

/// The dotted quad, as the v1 spec wants it (no leading zeros).
fn write_ipv4(ip: Ipv4Addr, out: &mut Vec<u8>) {
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        write_decimal(u16::from(octet), out);
    }
}

/// RFC 5952 text: lowercase hexadecimal groups without leading zeros, the first longest run
/// of two or more zero groups written `::`. Only hex groups, never a dotted tail.
fn write_ipv6(ip: Ipv6Addr, out: &mut Vec<u8>) {
    let groups = ip.segments();
    // The first longest run of zero groups.
    let (mut best_start, mut best_len) = (0, 0);
    let (mut start, mut len) = (0, 0);
    for (i, &g) in groups.iter().enumerate() {
        if g == 0 {
            if len == 0 {
                start = i;
            }
            len += 1;
            if len > best_len {
                (best_start, best_len) = (start, len);
            }
        } else {
            len = 0;
        }
    }
    let write_groups = |groups: &[u16], out: &mut Vec<u8>| {
        for (i, &g) in groups.iter().enumerate() {
            if i > 0 {
                out.push(b':');
            }
            write_hex(g, out);
        }
    };
    if best_len >= 2 {
        write_groups(&groups[..best_start], out);
        out.extend_from_slice(b"::");
        write_groups(&groups[best_start + best_len..], out);
    } else {
        write_groups(&groups, out);
    }
}

/// `n` in lowercase hexadecimal, without leading zeros.
fn write_hex(n: u16, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut started = false;
    for shift in [12, 8, 4, 0] {
        let nibble = usize::from((n >> shift) & 0xf);
        if nibble != 0 || started || shift == 0 {
            out.push(HEX[nibble]);
            started = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("test address")
    }

    fn complete(header: Header, len: usize) -> Result<Parse, ParseError> {
        Ok(Parse::Complete { header, len })
    }

    fn proxied(client: &str, server: &str) -> Header {
        Header::Proxied {
            client: addr(client),
            server: addr(server),
        }
    }

    fn encoded(version: Version, client: &str, server: &str) -> Vec<u8> {
        let mut out = Vec::new();
        encode(version, addr(client), addr(server), &mut out);
        out
    }

    /// `bytes` is a whole header: every shorter prefix is incomplete, the whole gives
    /// `header` with its exact length, and bytes after it change nothing.
    fn assert_header(bytes: &[u8], header: Header) {
        for cut in 0..bytes.len() {
            assert_eq!(
                parse(&bytes[..cut]),
                Ok(Parse::Incomplete),
                "prefix of {cut} bytes of {bytes:?}"
            );
        }
        assert_eq!(parse(bytes), complete(header, bytes.len()), "{bytes:?}");
        for junk in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"\r\n",
            b"\0",
            b"PROXY ",
            V2_SIGNATURE,
        ] {
            let mut more = bytes.to_vec();
            more.extend_from_slice(junk);
            assert_eq!(parse(&more), complete(header, bytes.len()), "{more:?}");
        }
    }

    fn v2(version_command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut bytes = V2_SIGNATURE.to_vec();
        bytes.push(version_command);
        bytes.push(family);
        bytes.extend_from_slice(&(block.len() as u16).to_be_bytes());
        bytes.extend_from_slice(block);
        bytes
    }

    // The spec's example line (section 2.1).
    const V1_TCP4: &[u8] = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
    const V1_TCP6: &[u8] = b"PROXY TCP6 2001:db8::1 2001:db8:0:1::2 56324 443\r\n";

    /// The spec's v2 layout (section 2.2) for TCP over IPv4: 0x21 (version 2, PROXY),
    /// 0x11 (AF_INET, STREAM), length 12, addresses, ports, all in network order.
    const V2_TCP4: &[u8] = &[
        0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, // signature
        0x21, 0x11, 0x00, 0x0c, // PROXY, TCP over IPv4, 12 bytes
        192, 168, 0, 1, // source address
        192, 168, 0, 11, // destination address
        0xdc, 0x04, // source port 56324
        0x01, 0xbb, // destination port 443
    ];

    /// TCP over IPv6: 0x21, 0x21, length 36.
    const V2_TCP6: &[u8] = &[
        0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, // signature
        0x21, 0x21, 0x00, 0x24, // PROXY, TCP over IPv6, 36 bytes
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, // 2001:db8::1
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0x02, // 2001:db8:0:1::2
        0xdc, 0x04, // source port 56324
        0x01, 0xbb, // destination port 443
    ];

    /// LOCAL as HAProxy sends it for health checks: 0x20, AF_UNSPEC, length 0.
    const V2_LOCAL: &[u8] = &[
        0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, 0x20, 0x00, 0x00,
        0x00,
    ];

    #[test]
    fn v1_tcp4_golden_line_parses_and_encodes_byte_for_byte() {
        let header = proxied("192.168.0.1:56324", "192.168.0.11:443");
        assert_header(V1_TCP4, header);
        assert_eq!(
            encoded(Version::V1, "192.168.0.1:56324", "192.168.0.11:443"),
            V1_TCP4
        );
    }

    #[test]
    fn v1_tcp6_golden_line_parses_and_encodes_byte_for_byte() {
        let header = proxied("[2001:db8::1]:56324", "[2001:db8:0:1::2]:443");
        assert_header(V1_TCP6, header);
        assert_eq!(
            encoded(Version::V1, "[2001:db8::1]:56324", "[2001:db8:0:1::2]:443"),
            V1_TCP6
        );
    }

    #[test]
    fn v1_spec_longest_lines_are_accepted() {
        // Section 2.1: 56, 104, 15 and 107 characters.
        let tcp4 = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n";
        assert_eq!(tcp4.len(), 56);
        assert_header(
            tcp4,
            proxied("255.255.255.255:65535", "255.255.255.255:65535"),
        );
        let full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let tcp6 = format!("PROXY TCP6 {full} {full} 65535 65535\r\n");
        assert_eq!(tcp6.len(), 104);
        let ffff = format!("[{full}]:65535");
        assert_header(tcp6.as_bytes(), proxied(&ffff, &ffff));
        assert_eq!(encoded(Version::V1, &ffff, &ffff), tcp6.as_bytes());
        let unknown = format!("PROXY UNKNOWN {full} {full} 65535 65535\r\n");
        assert_eq!(unknown.len(), V1_MAX);
        assert_header(unknown.as_bytes(), Header::Local);
    }

    #[test]
    fn v1_unknown_is_local_with_or_without_the_ignored_rest() {
        assert_header(b"PROXY UNKNOWN\r\n", Header::Local);
        assert_header(b"PROXY UNKNOWN 10.0.0.1 10.0.0.2 1 2\r\n", Header::Local);
        assert_header(b"PROXY UNKNOWN anything at all\0\x7f\r\n", Header::Local);
    }

    #[test]
    fn v2_tcp4_golden_header_parses_and_encodes_byte_for_byte() {
        let header = proxied("192.168.0.1:56324", "192.168.0.11:443");
        assert_header(V2_TCP4, header);
        assert_eq!(
            encoded(Version::V2, "192.168.0.1:56324", "192.168.0.11:443"),
            V2_TCP4
        );
    }

    #[test]
    fn v2_tcp6_golden_header_parses_and_encodes_byte_for_byte() {
        let header = proxied("[2001:db8::1]:56324", "[2001:db8:0:1::2]:443");
        assert_header(V2_TCP6, header);
        assert_eq!(
            encoded(Version::V2, "[2001:db8::1]:56324", "[2001:db8:0:1::2]:443"),
            V2_TCP6
        );
    }

    #[test]
    fn v2_local_is_local_whatever_its_block_holds() {
        assert_header(V2_LOCAL, Header::Local);
        // "Receivers MUST always consider this field to skip the appropriate number of bytes
        // and must not assume zero is presented for LOCAL connections."
        assert_header(&v2(0x20, 0x11, &V2_TCP4[16..]), Header::Local);
        assert_header(&v2(0x20, 0x00, &[1, 2]), Header::Local);
        // LOCAL over DGRAM: the family is ignored, so the transport is too.
        assert_header(&v2(0x20, 0x12, &[]), Header::Local);
    }

    #[test]
    fn v2_proxy_without_an_ip_client_is_local() {
        // AF_UNSPEC, with or without a block.
        assert_header(&v2(0x21, 0x00, &[]), Header::Local);
        assert_header(&v2(0x21, 0x01, &[9; 5]), Header::Local);
        // AF_INET with an unspecified transport: address layout undefined, block skipped.
        assert_header(&v2(0x21, 0x10, &[9; 3]), Header::Local);
        // AF_UNIX stream: two 108-byte paths, then TLVs.
        assert_header(&v2(0x21, 0x31, &[b'/'; 216]), Header::Local);
        let mut unix = vec![b'/'; 216];
        unix.extend_from_slice(&[0x04, 0x00, 0x01, 0xff]);
        assert_header(&v2(0x21, 0x31, &unix), Header::Local);
    }

    #[test]
    fn v2_tlvs_are_skipped_when_they_tile_the_declared_length() {
        let mut block = V2_TCP4[16..].to_vec();
        // CRC32C (not verified), a cloud load balancer's ID, NOOP with an empty value.
        block.extend_from_slice(&[0x03, 0x00, 0x04, 1, 2, 3, 4]);
        block.extend_from_slice(&[0xea, 0x00, 0x05, 0x01, b'v', b'p', b'c', b'e']);
        block.extend_from_slice(&[0x04, 0x00, 0x00]);
        let header = proxied("192.168.0.1:56324", "192.168.0.11:443");
        assert_header(&v2(0x21, 0x11, &block), header);
    }

    #[test]
    fn v2_mapped_addresses_come_back_as_ipv4() {
        let mut block = Vec::new();
        block.extend_from_slice(&Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped().octets());
        block.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        block.extend_from_slice(&[0, 1, 0, 2]);
        assert_header(&v2(0x21, 0x21, &block), proxied("10.0.0.1:1", "[::1]:2"));
        assert_header(
            b"PROXY TCP6 ::ffff:10.0.0.1 ::ffff:a00:2 1 2\r\n",
            proxied("10.0.0.1:1", "10.0.0.2:2"),
        );
    }

    #[test]
    fn v2_header_of_exactly_the_cap_is_accepted() {
        let mut block = V2_TCP4[16..].to_vec();
        let noop = V2_MAX - V2_FIXED - block.len() - 3;
        block.extend_from_slice(&[0x04]);
        block.extend_from_slice(&(noop as u16).to_be_bytes());
        block.resize(V2_MAX - V2_FIXED, 0);
        let bytes = v2(0x21, 0x11, &block);
        assert_eq!(bytes.len(), V2_MAX);
        assert_eq!(
            parse(&bytes),
            complete(proxied("192.168.0.1:56324", "192.168.0.11:443"), V2_MAX)
        );
        assert_eq!(MAX_HEADER, V2_MAX);
    }

    #[test]
    fn exact_length_leaves_the_bytes_after_the_header() {
        for header in [V1_TCP4, V1_TCP6, V2_TCP4, V2_TCP6, V2_LOCAL] {
            let mut buf = header.to_vec();
            buf.extend_from_slice(b"SSH-2.0-client\r\n");
            let Ok(Parse::Complete { len, .. }) = parse(&buf) else {
                panic!("{buf:?} is not complete");
            };
            assert_eq!(&buf[len..], b"SSH-2.0-client\r\n");
        }
    }

    #[test]
    fn encoding_writes_one_family_canonical_ipv4_when_it_can() {
        // Both IPv4 or mapped: TCP4 / AF_INET.
        assert_eq!(
            encoded(Version::V1, "[::ffff:10.0.0.1]:1", "10.0.0.2:2"),
            b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n"
        );
        assert_eq!(
            encoded(
                Version::V2,
                "[::ffff:192.168.0.1]:56324",
                "[::ffff:192.168.0.11]:443"
            ),
            V2_TCP4
        );
        // A real IPv6 side: both as IPv6, the IPv4 side mapped (hex groups, RFC 5952).
        assert_eq!(
            encoded(Version::V1, "10.0.0.1:1", "[2001:db8::2]:2"),
            b"PROXY TCP6 ::ffff:a00:1 2001:db8::2 1 2\r\n"
        );
        let v2_mixed = encoded(Version::V2, "[2001:db8::1]:1", "10.0.0.2:2");
        assert_eq!(v2_mixed[13], 0x21);
        assert_eq!(
            parse(&v2_mixed),
            complete(proxied("[2001:db8::1]:1", "10.0.0.2:2"), 52)
        );
    }

    #[test]
    fn encoding_appends_to_what_out_holds() {
        let mut out = b"x".to_vec();
        encode_v1(addr("1.2.3.4:5"), addr("6.7.8.9:10"), &mut out);
        encode_v2(addr("1.2.3.4:5"), addr("6.7.8.9:10"), &mut out);
        assert_eq!(&out[..1], b"x");
        assert_eq!(&out[1..34], b"PROXY TCP4 1.2.3.4 6.7.8.9 5 10\r\n");
        assert_eq!(out.len(), 1 + 33 + 28);
    }

    #[test]
    fn ipv6_text_is_rfc5952_as_std_prints_it() {
        for text in [
            "::",
            "::1",
            "1::",
            "2001:db8::1",
            "1:0:0:1:0:0:0:1",
            "1:0:0:1:0:0:1:1",
            "1:0:1:1:1:1:1:1",
            "0:1:0:1:0:1:0:1",
            "fe80::abcd:ef01:0:0",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "1:2:3:4:5:6:7:0",
        ] {
            let ip: Ipv6Addr = text.parse().expect("test address");
            let mut out = Vec::new();
            write_ipv6(ip, &mut out);
            assert_eq!(out, ip.to_string().as_bytes(), "{text}");
        }
    }

    fn error(bytes: &[u8]) -> ParseError {
        match parse(bytes) {
            Err(e) => e,
            other => panic!("{bytes:?} gave {other:?}"),
        }
    }

    #[test]
    fn every_error_is_named_and_has_a_stable_reason() {
        use V1Field::*;
        let mut too_long = b"PROXY UNKNOWN ".to_vec();
        too_long.resize(V1_MAX, b'x');
        let cases: [(&[u8], ParseError, &str); 13] = [
            (
                b"GET / HTTP/1.1\r\n",
                ParseError::BadSignature,
                "bad_signature",
            ),
            (b"PROXY TCP5 ", ParseError::V1Syntax(Protocol), "v1_syntax"),
            (&too_long, ParseError::V1TooLong, "v1_too_long"),
            (
                b"PROXY TCP4 1.2.3.256 ",
                ParseError::V1BadAddress(SourceAddress),
                "v1_bad_address",
            ),
            (
                b"PROXY TCP4 1.2.3.4 1.2.3.5 +1 ",
                ParseError::V1BadPort(SourcePort),
                "v1_bad_port",
            ),
            (
                b"PROXY TCP4 ::1 ",
                ParseError::V1FamilyMismatch(SourceAddress),
                "v1_family_mismatch",
            ),
            (
                &v2(0x11, 0x11, &[]),
                ParseError::V2BadVersion(1),
                "v2_bad_version",
            ),
            (
                &v2(0x22, 0x11, &[]),
                ParseError::V2BadCommand(2),
                "v2_bad_command",
            ),
            (
                &v2(0x21, 0x41, &[]),
                ParseError::V2BadFamily(0x41),
                "v2_bad_family",
            ),
            (
                &v2(0x21, 0x12, &[0; 12]),
                ParseError::V2UnsupportedTransport,
                "v2_unsupported_transport",
            ),
            (
                &v2(0x21, 0x21, &[0; 12]),
                ParseError::V2TooShort {
                    family: 0x21,
                    len: 12,
                },
                "v2_too_short",
            ),
            (
                &v2(0x21, 0x11, &[0; V2_MAX]),
                ParseError::V2TooLong { len: V2_MAX + 16 },
                "v2_too_long",
            ),
            (
                &v2(0x21, 0x11, &[0; 13]),
                ParseError::V2BadTlv,
                "v2_bad_tlv",
            ),
        ];
        let mut reasons = Vec::new();
        for (bytes, expected, reason) in cases {
            let e = error(bytes);
            assert_eq!(e, expected, "{bytes:?}");
            assert_eq!(e.reason(), reason);
            assert!(!e.to_string().contains('\n'), "one line: {e}");
            reasons.push(reason);
        }
        reasons.sort_unstable();
        reasons.dedup();
        assert_eq!(reasons.len(), 13, "one reason per variant");
    }

    #[test]
    fn v1_syntax_errors_name_the_field() {
        use V1Field::*;
        let cases: [(&[u8], ParseError); 14] = [
            (b"PROXYX", ParseError::BadSignature),
            (b"PROXY  TCP4", ParseError::V1Syntax(Protocol)),
            (b"PROXY tcp4 ", ParseError::V1Syntax(Protocol)),
            (b"PROXY TCP4\r\n", ParseError::V1Syntax(SourceAddress)),
            (b"PROXY TCP4  1.2.3.4", ParseError::V1Syntax(SourceAddress)),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
                ParseError::V1Syntax(DestinationPort),
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
                ParseError::V1Syntax(LineEnd),
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
                ParseError::V1Syntax(LineEnd),
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
                ParseError::V1Syntax(LineEnd),
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
                ParseError::V1Syntax(LineEnd),
            ),
            (b"PROXY TCP4 1.2.3.4\n", ParseError::V1Syntax(LineEnd)),
            (b"PROXY UNKNOWN\n", ParseError::V1Syntax(LineEnd)),
            (b"PROXY UNKNOWN x\n\r\n", ParseError::V1Syntax(LineEnd)),
            (b"PROXY UNKNOWNX\r\n", ParseError::V1Syntax(Protocol)),
        ];
        for (bytes, expected) in cases {
            assert_eq!(
                error(bytes),
                expected,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn v1_addresses_and_ports_are_strict() {
        use V1Field::*;
        let cases: [(&[u8], ParseError); 10] = [
            (
                b"PROXY TCP4 01.2.3.4 ",
                ParseError::V1BadAddress(SourceAddress),
            ),
            (
                b"PROXY TCP4 1.2.3 ",
                ParseError::V1BadAddress(SourceAddress),
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8.9 ",
                ParseError::V1BadAddress(DestinationAddress),
            ),
            (
                b"PROXY TCP6 fe80::1%eth0 ",
                ParseError::V1BadAddress(SourceAddress),
            ),
            (
                b"PROXY TCP6 ::1 1.2.3.4 ",
                ParseError::V1FamilyMismatch(DestinationAddress),
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 080 ",
                ParseError::V1BadPort(SourcePort),
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 00 ",
                ParseError::V1BadPort(SourcePort),
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
                ParseError::V1BadPort(DestinationPort),
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -1\r\n",
                ParseError::V1BadPort(DestinationPort),
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\t\r\n",
                ParseError::V1BadPort(DestinationPort),
            ),
        ];
        for (bytes, expected) in cases {
            assert_eq!(
                error(bytes),
                expected,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        assert_header(
            b"PROXY TCP4 0.0.0.0 10.0.0.1 0 65535\r\n",
            proxied("0.0.0.0:0", "10.0.0.1:65535"),
        );
    }

    #[test]
    fn errors_come_before_the_line_ends() {
        use V1Field::*;
        // Each is known at its last byte; no CRLF is waited for.
        let cases: [(&[u8], ParseError); 8] = [
            (b"G", ParseError::BadSignature),
            (b"PROXZ", ParseError::BadSignature),
            (b"PROXY X", ParseError::V1Syntax(Protocol)),
            (b"PROXY TCP4 1.2.x", ParseError::V1BadAddress(SourceAddress)),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 +",
                ParseError::V1BadPort(SourcePort),
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 06",
                ParseError::V1BadPort(DestinationPort),
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536",
                ParseError::V1BadPort(DestinationPort),
            ),
            (b"\r\n\r\n\0\r\nQUIT\n\x31", ParseError::V2BadVersion(3)),
        ];
        for (bytes, expected) in cases {
            assert_eq!(
                error(bytes),
                expected,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        // The fixed 16 bytes are enough to refuse a v2 header over the cap or too short.
        assert_eq!(
            error(&v2(0x21, 0x11, &[0; 2000])[..16]),
            ParseError::V2TooLong { len: 2016 }
        );
        assert_eq!(
            error(&v2(0x21, 0x11, &[0; 11])[..16]),
            ParseError::V2TooShort {
                family: 0x11,
                len: 11
            }
        );
    }

    #[test]
    fn v1_line_must_end_within_107_bytes() {
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(V1_MAX - 2, b'x');
        line.extend_from_slice(b"\r\n");
        assert_header(&line, Header::Local);
        // One byte more: the CR is the 107th byte, its LF the 108th.
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX - 1, b'x');
        long.extend_from_slice(b"\r\n");
        assert_eq!(parse(&long[..V1_MAX - 1]), Ok(Parse::Incomplete));
        assert_eq!(error(&long[..V1_MAX]), ParseError::V1TooLong);
        assert_eq!(error(&long), ParseError::V1TooLong);
    }
}
