//! The fixed client hash and the weighted rendezvous choice.
use std::net::IpAddr;

/// `::ffff:a.b.c.d` → `a.b.c.d`; every other address unchanged.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}
