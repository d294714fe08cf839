//! CIDR ranges for `allow` and `deny`.
use std::net::IpAddr;

/// An address range such as `10.0.0.0/8` or `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, _ip: IpAddr) -> bool {
        todo!()
    }
}
