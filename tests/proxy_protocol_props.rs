//! Property tests of the PROXY header codec (issue 13), and the fuzz target's seed corpus run
//! through the same checks, so CI covers it on the stable toolchain.
//!
//! Every input goes through `fuzz/proxy_protocol_check.rs`, the checks the fuzz target makes:
//! no panic; a complete header of exactly its length, within its cap; canonical addresses that
//! survive re-encoding; errors that more bytes do not change. On top of that:
//! - encoding any client and server, as v1 or v2, parses back to them (IPv4-mapped addresses
//!   as IPv4), with the length of what was written;
//! - every prefix of a valid header is incomplete, and any bytes after it change nothing;
//! - v1 lines written in the other valid address forms (uncompressed, uppercase, dotted tail)
//!   and v2 headers with any TLVs that fit the cap parse to the same addresses;
//! - the v1 text the encoder writes is what std prints for the addresses (RFC 5952);
//! - a v1 port is accepted exactly when it is plain decimal (no sign, no leading zero), an
//!   address exactly when std reads it as one of the line's family, and one of the other
//!   family is told apart as a family mismatch;
//! - random bytes, and random edits of valid headers, never panic;
//! - `parse` allocates nothing, and `encode` nothing beyond the `Vec` it is given.
//!
//! Addresses are only values here: no socket is opened.

#[path = "../fuzz/proxy_protocol_check.rs"]
mod proxy_protocol_check;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use proptest::prelude::*;
use proxy_protocol_check::{canonical, check};
use stickylb::proxy_protocol::{
    encode, parse, Header, Parse, ParseError, V1Field, Version, MAX_HEADER, V1_MAX, V2_MAX,
};

/// The system allocator, counting the allocations of each thread, so that a test can show
/// that `parse` and `encode` allocate nothing (they run once per connection).
struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is passed on to the system allocator unchanged; counting touches only a
// const-initialized thread-local, which needs no allocation.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's contract for `alloc` is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// How many allocations `f` made on this thread.
fn allocations_in(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|n| IpAddr::V4(Ipv4Addr::from(n))),
        any::<u128>().prop_map(|n| IpAddr::V6(Ipv6Addr::from(n))),
        any::<u32>().prop_map(|n| IpAddr::V6(Ipv4Addr::from(n).to_ipv6_mapped())),
        // Zero runs of every length, for the `::` of the v1 text.
        (any::<[u16; 8]>(), any::<u8>()).prop_map(|(mut groups, zeros)| {
            for (i, g) in groups.iter_mut().enumerate() {
                if zeros & (1 << i) != 0 {
                    *g = 0;
                }
            }
            IpAddr::V6(Ipv6Addr::from(groups))
        }),
        Just(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        Just(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        Just(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ]
}

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    (ip(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

fn version() -> impl Strategy<Value = Version> {
    prop_oneof![Just(Version::V1), Just(Version::V2)]
}

/// A v2 TLV: a type and a value of up to 300 bytes.
fn tlv() -> impl Strategy<Value = Vec<u8>> {
    (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..300)).prop_map(|(kind, value)| {
        let mut tlv = vec![kind];
        tlv.extend_from_slice(&(value.len() as u16).to_be_bytes());
        tlv.extend_from_slice(&value);
        tlv
    })
}

/// `header` (a v2 header) with `tlvs` after its addresses, its length field updated.
fn with_tlvs(header: &[u8], tlvs: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = header.to_vec();
    for tlv in tlvs {
        bytes.extend_from_slice(tlv);
    }
    let declared = (bytes.len() - 16) as u16;
    bytes[14..16].copy_from_slice(&declared.to_be_bytes());
    bytes
}

/// IPv6 text other than the compressed form the encoder writes: all eight groups with
/// leading zeros, uppercase, or with the last 32 bits as a dotted quad.
fn ipv6_variant(ip: Ipv6Addr, form: u8) -> String {
    let g = ip.segments();
    match form % 3 {
        0 => g.map(|g| format!("{g:04x}")).join(":"),
        1 => ip.to_string().to_uppercase(),
        _ => {
            let [.., a, b, c, d] = ip.octets();
            let head: Vec<String> = g[..6].iter().map(|g| format!("{g:x}")).collect();
            let head = head.join(":");
            format!("{head}:{a}.{b}.{c}.{d}")
        }
    }
}

/// A valid header and what it means: encoded addresses, v1 `UNKNOWN` with any rest, v2
/// `LOCAL` with any block, v2 with TLVs.
fn valid_header() -> impl Strategy<Value = (Vec<u8>, Header)> {
    prop_oneof![
        (version(), socket_addr(), socket_addr()).prop_map(|(version, client, server)| {
            let mut bytes = Vec::new();
            encode(version, client, server, &mut bytes);
            let header = Header::Proxied {
                client: canonical(client),
                server: canonical(server),
            };
            (bytes, header)
        }),
        "[ -~]{0,91}".prop_map(|rest| {
            let line = if rest.is_empty() {
                "PROXY UNKNOWN\r\n".to_string()
            } else {
                format!("PROXY UNKNOWN {rest}\r\n")
            };
            (line.into_bytes(), Header::Local)
        }),
        (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..200)).prop_map(
            |(family, block)| {
                // LOCAL skips its block whatever the family byte says, if it is assigned.
                let family = ((family % 4) << 4) | ((family >> 4) % 3);
                let mut bytes = b"\r\n\r\n\0\r\nQUIT\n\x20".to_vec();
                bytes.push(family);
                bytes.extend_from_slice(&(block.len() as u16).to_be_bytes());
                bytes.extend_from_slice(&block);
                (bytes, Header::Local)
            }
        ),
        (
            socket_addr(),
            socket_addr(),
            proptest::collection::vec(tlv(), 0..3)
        )
            .prop_filter_map("over the cap", |(client, server, tlvs)| {
                let mut bytes = Vec::new();
                encode(Version::V2, client, server, &mut bytes);
                let bytes = with_tlvs(&bytes, &tlvs);
                let header = Header::Proxied {
                    client: canonical(client),
                    server: canonical(server),
                };
                (bytes.len() <= V2_MAX).then_some((bytes, header))
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn encoded_addresses_parse_back_canonical(
        version in version(),
        client in socket_addr(),
        server in socket_addr(),
    ) {
        let mut out = Vec::new();
        encode(version, client, server, &mut out);
        let expected = Header::Proxied { client: canonical(client), server: canonical(server) };
        prop_assert_eq!(parse(&out), Ok(Parse::Complete { header: expected, len: out.len() }));
        // One family for both: IPv4 exactly when both are IPv4 or mapped.
        let both_v4 = canonical(client).is_ipv4() && canonical(server).is_ipv4();
        match version {
            Version::V1 => {
                let word = if both_v4 { &b"PROXY TCP4 "[..] } else { b"PROXY TCP6 " };
                prop_assert!(out.starts_with(word));
                prop_assert!(out.len() <= 104);
            }
            Version::V2 => prop_assert_eq!(out[13], if both_v4 { 0x11 } else { 0x21 }),
        }
        check(&out);
    }

    #[test]
    fn encoding_appends_without_touching_what_is_there(
        version in version(),
        client in socket_addr(),
        server in socket_addr(),
        before in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut alone = Vec::new();
        encode(version, client, server, &mut alone);
        let mut out = before.clone();
        encode(version, client, server, &mut out);
        prop_assert_eq!(&out[..before.len()], &before[..]);
        prop_assert_eq!(&out[before.len()..], &alone[..]);
    }

    #[test]
    fn every_prefix_of_a_valid_header_is_incomplete((bytes, header) in valid_header()) {
        prop_assert!(bytes.len() <= MAX_HEADER);
        for cut in 0..bytes.len() {
            prop_assert_eq!(parse(&bytes[..cut]), Ok(Parse::Incomplete), "cut at {}", cut);
        }
        prop_assert_eq!(parse(&bytes), Ok(Parse::Complete { header, len: bytes.len() }));
        check(&bytes);
    }

    #[test]
    fn bytes_after_a_valid_header_change_nothing(
        (bytes, header) in valid_header(),
        junk in proptest::collection::vec(any::<u8>(), 1..600),
    ) {
        let len = bytes.len();
        let mut buf = bytes;
        buf.extend_from_slice(&junk);
        prop_assert_eq!(parse(&buf), Ok(Parse::Complete { header, len }));
        check(&buf);
    }

    #[test]
    fn v1_accepts_every_valid_ipv6_text(
        client in any::<u128>().prop_map(Ipv6Addr::from),
        server in any::<u128>().prop_map(Ipv6Addr::from),
        forms in any::<(u8, u8)>(),
        ports in any::<(u16, u16)>(),
    ) {
        let line = format!(
            "PROXY TCP6 {} {} {} {}\r\n",
            ipv6_variant(client, forms.0),
            ipv6_variant(server, forms.1),
            ports.0,
            ports.1
        );
        let expected = Header::Proxied {
            client: canonical(SocketAddr::new(client.into(), ports.0)),
            server: canonical(SocketAddr::new(server.into(), ports.1)),
        };
        let answer = parse(line.as_bytes());
        if line.len() <= V1_MAX {
            prop_assert_eq!(answer, Ok(Parse::Complete { header: expected, len: line.len() }), "{}", line);
        } else {
            // Only the dotted form of two long addresses goes over the spec's 107 bytes.
            prop_assert_eq!(answer, Err(ParseError::V1TooLong), "{}", line);
        }
        check(line.as_bytes());
    }

    #[test]
    fn v1_text_is_what_std_prints_for_one_family_pairs(
        client in socket_addr(),
        server in socket_addr(),
    ) {
        let (c, s) = (canonical(client), canonical(server));
        let word = match (c.ip(), s.ip()) {
            (IpAddr::V4(_), IpAddr::V4(_)) => "TCP4",
            // std prints a mapped address with a dotted tail; the encoder writes hex groups.
            (IpAddr::V6(_), IpAddr::V6(_)) => "TCP6",
            _ => return Ok(()),
        };
        let mut out = Vec::new();
        encode(Version::V1, client, server, &mut out);
        let expected = format!("PROXY {word} {} {} {} {}\r\n", c.ip(), s.ip(), c.port(), s.port());
        prop_assert_eq!(String::from_utf8_lossy(&out), expected);
    }

    #[test]
    fn v1_ports_are_accepted_only_in_plain_decimal(text in "[+-]?[0-9]{1,6}") {
        let line = format!("PROXY TCP4 10.0.0.1 10.0.0.2 {text} 443\r\n");
        let plain = text.parse::<u16>().ok().filter(|port| port.to_string() == text);
        let answer = parse(line.as_bytes());
        match plain {
            Some(port) => prop_assert_eq!(
                answer,
                Ok(Parse::Complete {
                    header: Header::Proxied {
                        client: SocketAddr::new(Ipv4Addr::new(10, 0, 0, 1).into(), port),
                        server: SocketAddr::new(Ipv4Addr::new(10, 0, 0, 2).into(), 443),
                    },
                    len: line.len(),
                })
            ),
            None => prop_assert_eq!(answer, Err(ParseError::V1BadPort(V1Field::SourcePort))),
        }
        check(line.as_bytes());
    }

    #[test]
    fn v1_addresses_are_accepted_exactly_when_they_are_of_the_line_family(
        tcp6 in any::<bool>(),
        text in "[0-9a-fA-F:.]{1,46}",
    ) {
        let word = if tcp6 { "TCP6" } else { "TCP4" };
        let line = format!("PROXY {word} {text} ::1 1 2\r\n");
        let (v4, v6) = (text.parse::<Ipv4Addr>().ok(), text.parse::<Ipv6Addr>().ok());
        let field = V1Field::SourceAddress;
        let expected = match (tcp6, v4, v6) {
            (false, Some(_), _) => Err(ParseError::V1FamilyMismatch(V1Field::DestinationAddress)),
            (true, _, Some(ip)) => Ok(Parse::Complete {
                header: Header::Proxied {
                    client: canonical(SocketAddr::new(ip.into(), 1)),
                    server: SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 2),
                },
                len: line.len(),
            }),
            (false, None, Some(_)) | (true, Some(_), None) => Err(ParseError::V1FamilyMismatch(field)),
            _ => Err(ParseError::V1BadAddress(field)),
        };
        prop_assert_eq!(parse(line.as_bytes()), expected, "{}", line);
        check(line.as_bytes());
    }

    #[test]
    fn v2_tlvs_over_the_cap_are_refused_from_the_fixed_bytes(
        client in socket_addr(),
        server in socket_addr(),
        tlvs in proptest::collection::vec(tlv(), 4..8),
    ) {
        let mut bytes = Vec::new();
        encode(Version::V2, client, server, &mut bytes);
        let bytes = with_tlvs(&bytes, &tlvs);
        let expected = if bytes.len() > V2_MAX {
            Err(ParseError::V2TooLong { len: bytes.len() })
        } else {
            Ok(Parse::Incomplete)
        };
        prop_assert_eq!(parse(&bytes[..16]), expected);
        check(&bytes);
    }

    #[test]
    fn parse_and_encode_allocate_nothing(
        (bytes, _) in valid_header(),
        noise in proptest::collection::vec(any::<u8>(), 0..200),
        version in version(),
        client in socket_addr(),
        server in socket_addr(),
    ) {
        let mut noisy = bytes.clone();
        noisy.truncate(noise.len() % (bytes.len() + 1));
        noisy.extend_from_slice(&noise);
        prop_assert_eq!(allocations_in(|| {
            let _ = std::hint::black_box(parse(std::hint::black_box(&bytes)));
            let _ = std::hint::black_box(parse(std::hint::black_box(&noisy)));
        }), 0);
        // Into a reused buffer, as the connection path does.
        let mut out = Vec::with_capacity(256);
        prop_assert_eq!(allocations_in(|| encode(version, client, server, &mut out)), 0);
    }

    #[test]
    fn any_bytes_are_parsed_or_refused_without_panic(
        data in proptest::collection::vec(any::<u8>(), 0..MAX_HEADER + 100),
    ) {
        check(&data);
    }

    #[test]
    fn header_shaped_noise_is_parsed_or_refused_without_panic(
        start in prop_oneof![Just(&b"PROXY "[..]), Just(&b"\r\n\r\n\0\r\nQUIT\n"[..])],
        rest in proptest::collection::vec(
            prop_oneof![
                Just(b' '), Just(b'\r'), Just(b'\n'), Just(b':'), Just(b'.'), Just(b'0'),
                b'0'..=b'9', b'a'..=b'f', any::<u8>(),
            ],
            0..200,
        ),
    ) {
        let mut data = start.to_vec();
        data.extend_from_slice(&rest);
        check(&data);
    }

    #[test]
    fn edited_valid_headers_never_panic(
        (bytes, _) in valid_header(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..4, any::<u8>()), 1..4),
    ) {
        let mut bytes = bytes;
        for (at, kind, byte) in edits {
            let at = at.index(bytes.len() + 1);
            match kind {
                // Truncate: the header cut by a segment boundary.
                0 => bytes.truncate(at),
                // Replace a byte.
                1 if at < bytes.len() => bytes[at] = byte,
                // Delete a byte.
                2 if at < bytes.len() => {
                    bytes.remove(at);
                }
                // Insert a byte.
                _ => bytes.insert(at, byte),
            }
        }
        check(&bytes);
    }
}

/// The fuzz target's seed corpus (valid v1 and v2 headers, truncated and broken ones, other
/// protocols), through the fuzz target's checks: what CI runs of the fuzz target on the
/// stable toolchain.
#[test]
fn every_file_of_the_fuzz_seed_corpus_passes_the_fuzz_checks() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/proxy_protocol");
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .expect("fuzz/corpus/proxy_protocol")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    let (mut complete, mut incomplete, mut refused) = (0, 0, 0);
    for path in &entries {
        let bytes = std::fs::read(path).expect("read");
        let result = std::panic::catch_unwind(|| check(&bytes));
        assert!(result.is_ok(), "{} fails the fuzz checks", path.display());
        match parse(&bytes) {
            Ok(Parse::Complete { .. }) => complete += 1,
            Ok(Parse::Incomplete) => incomplete += 1,
            Err(_) => refused += 1,
        }
    }
    assert!(
        complete >= 8 && incomplete >= 2 && refused >= 6,
        "the corpus has valid, truncated and broken headers: {complete} complete, \
         {incomplete} incomplete, {refused} refused"
    );
}
