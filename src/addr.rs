//! Client addresses as the balancer sees them.
//!
//! A leaf: the config (`allow`/`deny`), the hash, the session table and the per-client limits
//! must all agree on what "one client" is, so the rule lives in one place below all of them.

use std::net::IpAddr;

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
