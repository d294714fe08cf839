//! Client addresses as the balancer sees them.
//!
//! A leaf: the config (`allow`/`deny`), the hash, the session table and the per-client limits
//! must all agree on what "one client" is, so the rule lives in one place below all of them.
//!
//! Two notions, on purpose:
//! - the client's **address** ([`canonical_ip`]): what `allow`/`deny` match and the logs show;
//! - the **client** ([`ClientPrefix::client`]): the address masked to `clientPrefix`, what the
//!   hash, the session table and `maxConnectionsPerClient` count as one client. By default an
//!   IPv4 client is its whole address and an IPv6 client its /64, because IPv6 hosts rotate
//!   privacy addresses inside their /64 (every few hours, some per connection): hashing the
//!   full address would send one browser to another worker each time its address changes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The address a client is known by: an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a
/// dual-stack `::` listener reports for an IPv4 client) is the IPv4 address `a.b.c.d`, so a
/// client hashes, matches CIDRs and is counted the same whichever listener it came through.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

/// `clientPrefix`: how many leading bits of an address make one client, per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientPrefix {
    /// 0–32 (default 32: every IPv4 address is its own client).
    pub ipv4: u8,
    /// 0–128 (default 64: an IPv6 client is its /64, the unit a host's addresses rotate in).
    pub ipv6: u8,
}

impl Default for ClientPrefix {
    fn default() -> Self {
        ClientPrefix::DEFAULT
    }
}

impl ClientPrefix {
    /// `{"ipv4": 32, "ipv6": 64}`, design §14.
    pub const DEFAULT: ClientPrefix = ClientPrefix { ipv4: 32, ipv6: 64 };

    /// The client `ip` belongs to: its canonical form ([`canonical_ip`]; an IPv4-mapped
    /// address is IPv4 and takes the IPv4 prefix) with every bit after its family's prefix
    /// cleared. A prefix above the family's width counts as the full width.
    #[inline]
    pub fn client(self, ip: IpAddr) -> IpAddr {
        match canonical_ip(ip) {
            IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask_v4(self.ipv4))),
            IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask_v6(self.ipv6))),
        }
    }
}

/// The first `prefix` bits set (a prefix over 32 counts as 32).
#[inline]
pub fn mask_v4(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

/// The first `prefix` bits set (a prefix over 128 counts as 128).
#[inline]
pub fn mask_v6(prefix: u8) -> u128 {
    match prefix {
        0 => 0,
        p => u128::MAX << (128 - u32::from(p.min(128))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("valid IP in test")
    }

    fn client(ipv4: u8, ipv6: u8, s: &str) -> IpAddr {
        ClientPrefix { ipv4, ipv6 }.client(ip(s))
    }

    #[test]
    fn by_default_an_ipv4_client_is_its_address_and_an_ipv6_client_its_64() {
        let d = ClientPrefix::default();
        assert_eq!(d, ClientPrefix { ipv4: 32, ipv6: 64 });
        assert_eq!(d.client(ip("10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(
            d.client(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            ip("2001:db8:1:2::")
        );
        assert_eq!(d.client(ip("2001:db8:1:2::1")), ip("2001:db8:1:2::"));
        assert_ne!(d.client(ip("2001:db8:1:3::1")), ip("2001:db8:1:2::"));
    }

    #[test]
    fn ipv4_mapped_addresses_stay_ipv4_and_take_the_ipv4_prefix() {
        assert_eq!(client(32, 64, "::ffff:10.1.2.3"), ip("10.1.2.3"));
        assert_eq!(client(24, 64, "::ffff:10.1.2.3"), ip("10.1.2.0"));
        // Never masked as IPv6 (/64 of ::ffff:a.b.c.d would be ::).
        assert_eq!(client(32, 0, "::ffff:10.1.2.3"), ip("10.1.2.3"));
        // IPv4-compatible (::a.b.c.d, deprecated) is an IPv6 address.
        assert_eq!(client(32, 64, "::10.1.2.3"), ip("::"));
    }

    #[test]
    fn prefixes_off_byte_boundaries_and_at_the_ends() {
        assert_eq!(client(22, 64, "192.168.7.255"), ip("192.168.4.0"));
        assert_eq!(client(0, 64, "192.168.7.255"), ip("0.0.0.0"));
        assert_eq!(
            client(32, 56, "2001:db8:0:12ff::1"),
            ip("2001:db8:0:1200::")
        );
        assert_eq!(client(32, 128, "2001:db8::42"), ip("2001:db8::42"));
        assert_eq!(client(32, 0, "2001:db8::42"), ip("::"));
        assert_eq!(client(32, 1, "ffff::"), ip("8000::"));
        // Out-of-range prefixes (the config rejects them) clamp to the full width.
        assert_eq!(client(200, 200, "10.1.2.3"), ip("10.1.2.3"));
        assert_eq!(client(200, 200, "2001:db8::42"), ip("2001:db8::42"));
    }

    #[test]
    fn masks_have_the_first_bits_set() {
        assert_eq!(mask_v4(0), 0);
        assert_eq!(mask_v4(1), 0x8000_0000);
        assert_eq!(mask_v4(24), 0xffff_ff00);
        assert_eq!(mask_v4(32), u32::MAX);
        assert_eq!(mask_v6(0), 0);
        assert_eq!(mask_v6(64), u128::MAX << 64);
        assert_eq!(mask_v6(128), u128::MAX);
    }
}
