//! CIDR ranges for `allow` and `deny`: parsing, display and membership.
//!
//! Written by hand because it is small and the admission check runs once per accepted
//! connection: [`Cidr::contains`] is a mask and a compare, with no allocation.
//!
//! Parsing rules (what an operator who knows nginx's `allow`/`deny` would expect, but stricter
//! where nginx only warns):
//! - `10.0.0.0/8`, `2001:db8::/32`: an address and a prefix length (0–32 or 0–128);
//! - `10.1.2.3` alone means `/32`, `::1` alone means `/128`;
//! - bits set after the prefix (`10.1.0.0/8`) are an error that suggests the network address,
//!   because such a typo most often meant a narrower range, and silently widening an `allow`
//!   list would admit clients nobody meant to admit;
//! - an IPv4-mapped range (`::ffff:10.0.0.0/104`) is stored as the IPv4 range it denotes
//!   (`10.0.0.0/8`), because callers pass client addresses in canonical form (a mapped
//!   address already converted to IPv4), so a mapped range would otherwise never match.
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::addr::{mask_v4, mask_v6};

/// An address range such as `10.0.0.0/8` or `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

/// Why a string is not a CIDR range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseCidrError {
    #[error("{0:?} is not an IPv4 or IPv6 address")]
    Address(String),
    #[error("the prefix length {prefix:?} is not a number from 0 to {max}")]
    Prefix { prefix: String, max: u8 },
    #[error("address bits are set after the first {prefix}; did you mean \"{network}\"?")]
    HostBits { prefix: u8, network: Cidr },
}

impl Cidr {
    /// True when `ip` is inside the range. An IPv4 range never contains an IPv6 address and
    /// the other way round: callers convert `::ffff:a.b.c.d` to `a.b.c.d` first. Bits of
    /// `addr` after the prefix are ignored, so a hand-built `Cidr` behaves like its network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = mask_v4(self.prefix);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = mask_v6(self.prefix);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }

    /// The same range with the bits after the prefix cleared.
    fn network(&self) -> Cidr {
        let addr = match self.addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask_v4(self.prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask_v6(self.prefix))),
        };
        Cidr {
            addr,
            prefix: self.prefix,
        }
    }
}

impl FromStr for Cidr {
    type Err = ParseCidrError;

    fn from_str(s: &str) -> Result<Cidr, ParseCidrError> {
        let (addr_text, prefix_text) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| ParseCidrError::Address(addr_text.to_string()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix_text {
            None => max,
            Some(p) => parse_prefix(p, max).ok_or_else(|| ParseCidrError::Prefix {
                prefix: p.to_string(),
                max,
            })?,
        };
        let cidr = Cidr { addr, prefix };
        let network = cidr.network();
        if network != cidr {
            return Err(ParseCidrError::HostBits { prefix, network });
        }
        Ok(unmap(cidr))
    }
}

/// Digits only (no sign, no spaces), at most `max`.
fn parse_prefix(text: &str, max: u8) -> Option<u8> {
    if text.is_empty() || text.len() > 3 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u8>().ok().filter(|p| *p <= max)
}

/// `::ffff:a.b.c.d/n` with n ≥ 96 → `a.b.c.d/(n-96)`; anything else unchanged.
fn unmap(cidr: Cidr) -> Cidr {
    if let IpAddr::V6(v6) = cidr.addr {
        if let (Some(v4), true) = (v6.to_ipv4_mapped(), cidr.prefix >= 96) {
            return Cidr {
                addr: IpAddr::V4(v4),
                prefix: cidr.prefix - 96,
            };
        }
    }
    cidr
}

impl fmt::Display for Cidr {
    /// Always with the prefix length: `10.0.0.1/32`, `2001:db8::/32`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().expect("valid CIDR in test")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("valid IP in test")
    }

    #[test]
    fn v4_range_contains_its_addresses_only() {
        let c = cidr("10.0.0.0/8");
        assert!(c.contains(ip("10.0.0.0")));
        assert!(c.contains(ip("10.255.255.255")));
        assert!(c.contains(ip("10.1.2.3")));
        assert!(!c.contains(ip("11.0.0.0")));
        assert!(!c.contains(ip("9.255.255.255")));
    }

    #[test]
    fn v4_prefix_not_on_a_byte_boundary() {
        let c = cidr("192.168.4.0/22");
        assert!(c.contains(ip("192.168.4.0")));
        assert!(c.contains(ip("192.168.7.255")));
        assert!(!c.contains(ip("192.168.8.0")));
        assert!(!c.contains(ip("192.168.3.255")));
    }

    #[test]
    fn bare_address_is_a_single_host() {
        let c = cidr("10.1.2.3");
        assert_eq!(c.prefix, 32);
        assert!(c.contains(ip("10.1.2.3")));
        assert!(!c.contains(ip("10.1.2.4")));
        let c = cidr("::1");
        assert_eq!(c.prefix, 128);
        assert!(c.contains(ip("::1")));
        assert!(!c.contains(ip("::2")));
    }

    #[test]
    fn zero_prefix_contains_every_address_of_its_family() {
        let c = cidr("0.0.0.0/0");
        assert!(c.contains(ip("1.2.3.4")));
        assert!(c.contains(ip("255.255.255.255")));
        assert!(!c.contains(ip("::1")));
        let c = cidr("::/0");
        assert!(c.contains(ip("2001:db8::1")));
        assert!(!c.contains(ip("1.2.3.4")));
    }

    #[test]
    fn v6_range_contains_its_addresses_only() {
        let c = cidr("2001:db8::/32");
        assert!(c.contains(ip("2001:db8::1")));
        assert!(c.contains(ip("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff")));
        assert!(!c.contains(ip("2001:db9::")));
        let c = cidr("fe80::/10");
        assert!(c.contains(ip("febf::1")));
        assert!(!c.contains(ip("fec0::1")));
    }

    #[test]
    fn v4_range_never_matches_v6_address() {
        assert!(!cidr("0.0.0.0/0").contains(ip("::ffff:10.0.0.1")));
        assert!(!cidr("10.0.0.0/8").contains(ip("::a00:1")));
    }

    #[test]
    fn mapped_v6_range_becomes_the_v4_range() {
        let c = cidr("::ffff:10.0.0.0/104");
        assert_eq!(c, cidr("10.0.0.0/8"));
        assert!(c.contains(ip("10.9.9.9")));
        assert_eq!(cidr("::ffff:0.0.0.0/96"), cidr("0.0.0.0/0"));
        assert_eq!(cidr("::ffff:192.0.2.7"), cidr("192.0.2.7/32"));
    }

    #[test]
    fn host_bits_after_the_prefix_are_an_error_suggesting_the_network() {
        let err = "10.1.0.0/8".parse::<Cidr>().expect_err("host bits set");
        assert_eq!(
            err,
            ParseCidrError::HostBits {
                prefix: 8,
                network: cidr("10.0.0.0/8")
            }
        );
        assert!(
            err.to_string().contains("did you mean \"10.0.0.0/8\""),
            "{err}"
        );
        let err = "2001:db8::1/32".parse::<Cidr>().expect_err("host bits set");
        assert!(err.to_string().contains("\"2001:db8::/32\""), "{err}");
    }

    #[test]
    fn bad_address_or_prefix_is_a_clear_error() {
        for (s, want) in [
            ("10.0.0/8", "\"10.0.0\" is not an IPv4 or IPv6 address"),
            ("", "\"\" is not an IPv4 or IPv6 address"),
            ("localhost", "\"localhost\" is not an IPv4 or IPv6 address"),
            (" 10.0.0.0/8", "is not an IPv4 or IPv6 address"),
            (
                "10.0.0.0/33",
                "prefix length \"33\" is not a number from 0 to 32",
            ),
            (
                "10.0.0.0/",
                "prefix length \"\" is not a number from 0 to 32",
            ),
            ("10.0.0.0/+8", "prefix length \"+8\""),
            ("10.0.0.0/8/8", "prefix length \"8/8\""),
            ("::/129", "not a number from 0 to 128"),
            ("::/1000", "not a number from 0 to 128"),
        ] {
            let err = s.parse::<Cidr>().expect_err(s);
            assert!(err.to_string().contains(want), "{s}: {err}");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "10.0.0.0/8",
            "10.1.2.3/32",
            "::/0",
            "2001:db8::/32",
            "::1/128",
        ] {
            assert_eq!(cidr(s).to_string(), s);
        }
        assert_eq!(cidr("10.1.2.3").to_string(), "10.1.2.3/32");
    }

    #[test]
    fn hand_built_cidr_with_host_bits_or_long_prefix_does_not_panic() {
        let c = Cidr {
            addr: ip("10.1.2.3"),
            prefix: 8,
        };
        assert!(c.contains(ip("10.200.0.1")));
        let c = Cidr {
            addr: ip("10.1.2.3"),
            prefix: 200,
        };
        assert!(c.contains(ip("10.1.2.3")));
        assert!(!c.contains(ip("10.1.2.4")));
    }
}
