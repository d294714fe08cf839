//! What is checked for one input, as the first bytes of a connection from a trusted upstream,
//! by the `proxy_protocol` fuzz target (`fuzz/fuzz_targets/proxy_protocol.rs`) and by the
//! property tests (`tests/proxy_protocol_props.rs`), so that both hold the parser to the same
//! properties:
//!
//! 1. `parse` returns (no panic), whatever the bytes;
//! 2. a complete header is at most the input, at most its version's cap, and exactly its
//!    length: the header alone, or followed by other bytes, gives the same answer, and one
//!    byte less is incomplete (the caller consumes exactly the header and nothing after it);
//! 3. a proxied header's addresses are canonical (no IPv4-mapped IPv6), and encoding them again
//!    as v1 or v2 parses back to the same header;
//! 4. an error is final: more bytes after the input give the same error;
//! 5. a buffer of `MAX_HEADER` bytes or more is never incomplete (the caller's peek buffer is
//!    always enough).

use std::net::{IpAddr, SocketAddr};

use stickylb::proxy_protocol::{encode, parse, Header, Parse, Version, MAX_HEADER, V1_MAX, V2_MAX};

/// Bytes appended to an input to check that they change nothing: a CRLF that could end a v1
/// line, the v2 signature, and a NUL.
const MORE: &[u8] = b"\r\n\r\n\r\n\0\r\nQUIT\n\0";

/// Checks the properties above for `data`; panics (with the input) when one does not hold.
pub fn check(data: &[u8]) {
    let answer = parse(data);
    match answer {
        Ok(Parse::Incomplete) => assert!(
            data.len() < MAX_HEADER,
            "a full buffer of {} bytes is incomplete: {data:?}",
            data.len()
        ),
        Ok(Parse::Complete { header, len }) => check_complete(data, header, len),
        Err(error) => {
            let mut more = data.to_vec();
            more.extend_from_slice(MORE);
            assert_eq!(
                parse(&more),
                Err(error),
                "more bytes changed the error: {data:?}"
            );
        }
    }
}

fn check_complete(data: &[u8], header: Header, len: usize) {
    let cap = if data.first() == Some(&b'P') {
        V1_MAX
    } else {
        V2_MAX
    };
    assert!(
        len > 0 && len <= data.len() && len <= cap && len <= MAX_HEADER,
        "length {len} of {} bytes: {data:?}",
        data.len()
    );
    let exact = Ok(Parse::Complete { header, len });
    let alone = data.get(..len).unwrap_or(data);
    assert_eq!(
        parse(alone),
        exact,
        "the header alone parses differently: {data:?}"
    );
    let mut more = alone.to_vec();
    more.extend_from_slice(MORE);
    assert_eq!(
        parse(&more),
        exact,
        "bytes after the header changed it: {data:?}"
    );
    let short = data.get(..len - 1).unwrap_or_default();
    assert_eq!(
        parse(short),
        Ok(Parse::Incomplete),
        "one byte less is not incomplete: {data:?}"
    );
    if let Header::Proxied { client, server } = header {
        for address in [client, server] {
            assert_eq!(
                address.ip(),
                address.ip().to_canonical(),
                "an IPv4-mapped address came back: {data:?}"
            );
        }
        check_reencoded(client, server);
    }
}

/// `client` and `server`, encoded as v1 and as v2, parse back to themselves.
pub fn check_reencoded(client: SocketAddr, server: SocketAddr) {
    let expected = Header::Proxied {
        client: canonical(client),
        server: canonical(server),
    };
    for version in [Version::V1, Version::V2] {
        let mut out = Vec::new();
        encode(version, client, server, &mut out);
        assert_eq!(
            parse(&out),
            Ok(Parse::Complete {
                header: expected,
                len: out.len()
            }),
            "{version:?} of {client} → {server} does not parse back: {out:?}"
        );
    }
}

/// `address` with an IPv4-mapped IPv6 address made IPv4, as `parse` returns addresses.
pub fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(IpAddr::to_canonical(&address.ip()), address.port())
}
