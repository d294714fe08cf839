//! The backstop against a target that leads back into stickylb: the local addresses of its own
//! live outgoing connections, so that a client connection arriving *from* one of them is
//! recognised and refused.
//!
//! The config already refuses a target that is the listener in any spelling (see
//! `config/parse.rs`), but a loop can also go through something the config cannot see: a
//! name that resolves to the listener later. Each turn of such a loop is a new client
//! connection whose peer address is the local address of the outgoing socket stickylb just
//! opened, and whose local address is where that socket connected. Both are matched: the
//! source alone would also match real clients on this host, because Linux lets two connections
//! from one address share a local port when their destinations differ. So a loop through
//! destination NAT (where the socket connected to another address) is not recognised here and
//! is bounded only by `maxConnections`. Without this set, every turn
//! connects again, until `maxConnections` (thousands of connections from one client); with
//! it, the first looped connection is refused (`connections_rejected_total{reason="loop"}`)
//! and the loop costs one connection.
//!
//! Only a connection to a port stickylb listens on can loop back into it this way (the looped
//! connection arrives at the address the socket connected to), so only those are recorded:
//! the listeners register their ports ([`OwnSockets::listening_on`]), and a connection to any
//! other port (every target, normally) skips the getsockname(2) that reads its local address.
//!
//! A socket's local address is known as soon as connect(2) has started (the kernel picks the
//! source address and port before it sends the SYN), so it is recorded before the handshake can
//! complete, and a looped connection cannot be accepted and checked before its address is in
//! the set (but for the microseconds between connect(2) returning and the insert: a loop that
//! wins that race once is caught at its next turn).
//!
//! A refused loop is also remembered for the socket it came from (a mark under the socket's
//! key, in a small table of its own): the handler that opened that socket reads it
//! ([`Held::looped`]) when its connection ends, and takes its target out of rotation, so that
//! the target's clients move to the others instead of being reset one after another.
//!
//! Cost on the data path: no lock and no allocation. The set is a fixed table of atomic slots
//! (sized once from the fd limit, which bounds the number of live sockets); an address is
//! stored in the first free slot of a window of [`WINDOW`] slots from its hash, and a lookup
//! reads that window (two cache lines). A full window (not expected below a half-full table)
//! leaves that one socket untracked: the loop would then be caught one turn later.

use std::alloc::{alloc_zeroed, handle_alloc_error, Layout};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};

use socket2::Socket;

/// Slots searched from an address's hash.
const WINDOW: usize = 16;

/// Listening ports remembered; past that many, every connection is recorded.
const PORTS: usize = 8;

/// Slots of the table of refused loops: a loop is refused at its first turn and the mark
/// lives only until its socket closes, so a few are ever there at once. A full window drops
/// the mark (the target is then not taken out of rotation by that turn).
const LOOP_MARKS: usize = 256;

/// The local addresses of live outgoing connections to targets (a multiset: two sockets to
/// two different targets may share a local address and port).
#[derive(Debug)]
pub struct OwnSockets {
    slots: Table,
    /// The ports this process listens on or has listened on (0: a free slot). A reload that
    /// moves the listener adds its new port; the old one stays (its last accepted clients may
    /// still be served), which costs only a getsockname per connection to that port.
    ports: [AtomicU16; PORTS],
    /// More listening ports than [`PORTS`]: every connection is recorded.
    all_ports: AtomicBool,
    /// The keys of outgoing connections our listener refused as loops, until their sockets
    /// close (see [`Held::looped`]).
    loops: Table,
}

/// A fixed, lock-free table of non-zero keys (0: a free slot): a key goes in the first free
/// slot of a window of [`WINDOW`] slots from its hash. Its length is a power of two.
#[derive(Debug)]
struct Table(Box<[AtomicU64]>);

impl Table {
    /// `len` free slots (a power of two), from a zeroed allocation: pages never touched stay
    /// unbacked (calloc → mmap for a large table).
    fn new(len: usize) -> Table {
        debug_assert!(len.is_power_of_two());
        let layout = Layout::array::<AtomicU64>(len).unwrap_or_else(|_| Layout::new::<u64>());
        // SAFETY: a zeroed AtomicU64 is a valid 0; the allocation has the layout of
        // `[AtomicU64; len]`, which is what the Box frees it with.
        let slots = unsafe {
            let ptr = alloc_zeroed(layout).cast::<AtomicU64>();
            if ptr.is_null() {
                handle_alloc_error(layout);
            }
            Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, len))
        };
        Table(slots)
    }

    fn window(&self, key: u64) -> impl Iterator<Item = &AtomicU64> {
        let start = mix(key) as usize;
        let mask = self.0.len() - 1;
        (0..WINDOW).map(move |i| &self.0[start.wrapping_add(i) & mask])
    }

    /// Stores `key`. False if its window was full.
    fn insert(&self, key: u64) -> bool {
        self.window(key).any(|slot| {
            slot.compare_exchange(0, key, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })
    }

    /// Takes one copy of `key` out. False if there was none.
    fn remove(&self, key: u64) -> bool {
        self.window(key).any(|slot| {
            slot.compare_exchange(key, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })
    }

    fn contains(&self, key: u64) -> bool {
        self.window(key)
            .any(|slot| slot.load(Ordering::Acquire) == key)
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.0.iter().all(|s| s.load(Ordering::Relaxed) == 0)
    }
}

impl OwnSockets {
    /// A set for up to `sockets` live sockets (the fd limit): twice that many slots, a power of
    /// two from 1,024 to 2^21 (16 MiB of address space, touched only as slots are used).
    pub fn new(sockets: u64) -> OwnSockets {
        let want = usize::try_from(sockets.saturating_mul(2)).unwrap_or(usize::MAX);
        let len = want.clamp(1024, 1 << 21).next_power_of_two();
        OwnSockets {
            slots: Table::new(len),
            ports: Default::default(),
            all_ports: AtomicBool::new(false),
            loops: Table::new(LOOP_MARKS),
        }
    }

    /// Notes that a listener accepts clients on `port`: connections to that port may be loops.
    pub fn listening_on(&self, port: u16) {
        if port == 0 {
            return;
        }
        // Slots fill in order and are never freed, so the port is in a slot before the first
        // free one, or goes there.
        let stored = self.ports.iter().any(|p| {
            // Stored here, or found here (stored before, maybe by another thread).
            match p.compare_exchange(0, port, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => true,
                Err(there) => there == port,
            }
        });
        if !stored {
            self.all_ports.store(true, Ordering::Release);
        }
    }

    /// Whether a connection to `remote` could lead back into a listener of ours, so that its
    /// local address must be recorded (see the module comment).
    fn may_loop(&self, remote: SocketAddr) -> bool {
        let port = remote.port();
        self.all_ports.load(Ordering::Acquire)
            || self.ports.iter().any(|p| p.load(Ordering::Acquire) == port)
    }

    /// Whether `addr` is the local address of a live outgoing socket: a client connecting from
    /// it is stickylb itself.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.slots.contains(key(addr))
    }

    /// Catches a loop: whether a connection from `peer` to our `local` address is one of our
    /// own outgoing connections, and if so marks it for the outgoing socket's handler to find
    /// ([`Held::looped`]); the caller refuses the connection. Ours means its source is one of
    /// ours *and* that socket connected to `local`. `local` is read only when `peer` matches
    /// (rare): the source alone is not enough, since Linux gives a new connection a local port
    /// that another connection from the same address already uses when their destinations
    /// differ, so a client on this host may connect from the very port of one of our
    /// connections to a target.
    pub fn catch_loop(&self, peer: SocketAddr, local: impl FnOnce() -> Option<SocketAddr>) -> bool {
        if !self.contains(peer) {
            return false;
        }
        let Some(pair) = local().map(|local| pair_key(peer, local)) else {
            return false;
        };
        if !self.slots.contains(pair) {
            return false;
        }
        // A full window drops the mark (see LOOP_MARKS).
        self.loops.insert(pair);
        true
    }

    /// For `socket`, which has just started connecting to `remote`: records its local address
    /// (one getsockname(2)) until the returned guard is dropped, if `remote` is on a port we
    /// listen on; holds nothing otherwise, nor for a socket without an IP address.
    pub fn hold_connecting(&self, socket: &Socket, remote: SocketAddr) -> io::Result<Held<'_>> {
        if !self.may_loop(remote) {
            return Ok(Held(None));
        }
        Ok(match socket.local_addr()?.as_socket() {
            Some(local) => self.hold(local, remote),
            None => Held(None),
        })
    }

    /// Records `local`, the local address of a new outgoing socket connecting to `remote`,
    /// until the returned guard is dropped.
    fn hold(&self, local: SocketAddr, remote: SocketAddr) -> Held<'_> {
        let keys = [key(local), pair_key(local, remote)];
        // A full window leaves the socket untracked (see the module comment).
        let taken = keys.map(|k| self.slots.insert(k));
        Held(Some((self, keys, taken)))
    }
}

/// A record in [`OwnSockets`] (the source, and the source with the destination), removed on
/// drop.
#[derive(Debug)]
pub struct Held<'a>(Option<(&'a OwnSockets, [u64; 2], [bool; 2])>);

impl Held<'_> {
    /// Whether our own listener refused this socket's connection as a loop: its target leads
    /// back into stickylb. Takes the mark (true once). False for a socket not recorded.
    pub fn looped(&self) -> bool {
        self.0
            .is_some_and(|(set, [_, pair], _)| set.loops.remove(pair))
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some((set, keys, taken)) = self.0 {
            for (key, taken) in keys.into_iter().zip(taken) {
                if taken {
                    set.slots.remove(key);
                }
            }
            // A mark nobody read goes with its socket: a later socket with the same pair of
            // addresses must not find it.
            set.loops.remove(keys[1]);
        }
    }
}

/// The key of a connection from `local` to `remote`: a 63-bit hash of both (tagged apart from
/// the IPv4 keys of [`key`]). The unspecified address as a destination is this host's
/// loopback address, where the kernel connects it.
fn pair_key(local: SocketAddr, remote: SocketAddr) -> u64 {
    let ip = match crate::addr::canonical_ip(remote.ip()) {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let remote = key(SocketAddr::new(ip, remote.port()));
    1 << 63 | mix(mix(key(local)) ^ remote) >> 1
}

/// A non-zero key for `addr`: exact for IPv4 (address and port side by side), a 63-bit hash
/// for IPv6 (a false match needs a collision of 63 bits between two live sockets). An
/// IPv4-mapped address is its IPv4 address, so a dual-stack listener's view of a peer and
/// the outgoing socket's own view of its address agree.
fn key(addr: SocketAddr) -> u64 {
    let port = u64::from(addr.port());
    match crate::addr::canonical_ip(addr.ip()) {
        IpAddr::V4(ip) => 1 << 62 | u64::from(u32::from(ip)) << 16 | port,
        IpAddr::V6(ip) => {
            let bits = u128::from(ip);
            let hash = mix(mix((bits >> 64) as u64) ^ bits as u64 ^ port);
            1 << 63 | hash >> 1
        }
    }
}

/// splitmix64's finalizer: spreads keys over the table.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ x >> 31
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_address_is_held_until_its_guard_drops() {
        let set = OwnSockets::new(100);
        let a = at("127.0.0.1:40000");
        assert!(!set.contains(a));
        let held = set.hold(a, at("127.0.0.1:9"));
        assert!(set.contains(a));
        assert!(
            set.contains(at("[::ffff:127.0.0.1]:40000")),
            "as a dual-stack listener reports it"
        );
        assert!(!set.contains(at("127.0.0.1:40001")));
        assert!(!set.contains(at("127.0.0.2:40000")));
        drop(held);
        assert!(!set.contains(a));
    }

    #[test]
    fn the_same_address_twice_stays_until_both_close() {
        let set = OwnSockets::new(100);
        let a = at("[2001:db8::1]:5000");
        let first = set.hold(a, at("[2001:db8::2]:80"));
        let second = set.hold(a, at("[2001:db8::3]:80"));
        drop(first);
        assert!(set.contains(a));
        drop(second);
        assert!(!set.contains(a));
    }

    /// A client on this host may connect from the port one of our target connections uses
    /// (Linux shares a local port between connections to different destinations): only a
    /// connection to the listener from one of ours is our own.
    #[test]
    fn only_our_own_connection_to_the_listener_is_ours() {
        let set = OwnSockets::new(100);
        let listener = at("127.0.0.1:8080");
        let port = at("127.0.0.1:40000");
        let _to_target = set.hold(port, at("127.0.0.1:9000"));
        assert!(set.contains(port));
        assert!(
            !set.catch_loop(port, || Some(listener)),
            "a client that shares the port of a target connection is a client"
        );
        let _looped = set.hold(port, listener);
        assert!(set.catch_loop(port, || Some(listener)));
        assert!(set.catch_loop(at("[::ffff:127.0.0.1]:40000"), || Some(at(
            "[::ffff:127.0.0.1]:8080"
        ))));
        let unspecified = at("127.0.0.1:40001");
        let _spelled = set.hold(unspecified, at("0.0.0.0:8080"));
        assert!(
            set.catch_loop(unspecified, || Some(listener)),
            "0.0.0.0 as a destination is loopback"
        );
    }

    #[test]
    fn a_refused_loop_is_found_once_by_its_socket_and_goes_with_it() {
        let set = OwnSockets::new(100);
        let listener = at("127.0.0.1:8080");
        let (a, b) = (at("127.0.0.1:40000"), at("127.0.0.1:40001"));
        let looped = set.hold(a, listener);
        let other = set.hold(b, listener);
        assert!(!looped.looped(), "nothing refused yet");
        assert!(set.catch_loop(a, || Some(listener)));
        assert!(
            !other.looped(),
            "only the socket whose connection was refused"
        );
        assert!(looped.looped());
        assert!(!looped.looped(), "the mark is taken once");
        assert!(set.catch_loop(b, || Some(listener)));
        drop(other);
        assert!(set.loops.is_empty(), "an unread mark goes with its socket");
        assert!(!Held(None).looped());
    }

    #[test]
    fn only_connections_to_a_listening_port_may_loop() {
        let set = OwnSockets::new(100);
        assert!(!set.may_loop(at("127.0.0.1:8080")), "nothing listens yet");
        set.listening_on(8080);
        set.listening_on(8080);
        assert!(set.may_loop(at("127.0.0.1:8080")));
        assert!(set.may_loop(at("[::1]:8080")));
        assert!(
            !set.may_loop(at("127.0.0.1:9000")),
            "a target on another port"
        );
        for port in 1..=PORTS as u16 {
            set.listening_on(9000 + port);
        }
        assert!(
            set.may_loop(at("127.0.0.1:1")),
            "past {PORTS} listening ports, every connection is recorded"
        );
    }

    #[test]
    fn a_full_table_keeps_every_address_it_took() {
        let set = OwnSockets::new(0); // the smallest table: 1,024 slots
        let addrs: Vec<SocketAddr> = (0..1024u32)
            .map(|i| SocketAddr::new(IpAddr::V4((0x7f00_0001 + (i >> 8)).into()), 1 + i as u16))
            .collect();
        let taken: Vec<bool> = addrs.iter().map(|&a| set.slots.insert(key(a))).collect();
        let kept = taken.iter().filter(|&&t| t).count();
        assert!(kept > 900, "a full table still takes most: {kept}");
        for (a, t) in addrs.iter().zip(&taken) {
            assert_eq!(set.contains(*a), *t, "{a}");
        }
        for (a, t) in addrs.iter().zip(&taken) {
            if *t {
                set.slots.remove(key(*a));
            }
        }
        assert!(set.slots.is_empty());
    }
}
