//! The benchmark tools' own checks, where a mistake would skew every comparison without failing
//! it: `load wait-port` must see a listener without connecting to it (`benches/load/procfs.rs`),
//! because a probe connection through a balancer reaches a backend, and an iperf3 server takes
//! it for a test and may still be winding down from it when the measured client comes (the
//! likely cause of two iperf3 runs of a comparison that failed with "Connection reset by peer":
//! docs/benchmarks.md, "Twelfth session").

#[path = "../benches/load/procfs.rs"]
#[allow(dead_code)]
mod procfs;

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener};

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("address")
}

#[test]
fn a_listening_line_of_proc_net_tcp_gives_its_address() {
    let v4 = "   0: 0100007F:6978 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0";
    assert_eq!(procfs::listener_of_line(v4), Some(addr("127.0.0.1:27000")));
    let established = v4.replace(" 0A ", " 01 ");
    assert_eq!(procfs::listener_of_line(&established), None);
    let any6 = "   1: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0";
    assert_eq!(procfs::listener_of_line(any6), Some(addr("[::]:8080")));
}

#[test]
fn a_listener_serves_its_own_address_and_the_wildcards_only() {
    let wanted = addr("127.0.0.1:8080");
    assert!(procfs::serves(addr("127.0.0.1:8080"), wanted));
    assert!(procfs::serves(addr("0.0.0.0:8080"), wanted));
    assert!(procfs::serves(addr("[::]:8080"), wanted));
    assert!(procfs::serves(addr("[::ffff:127.0.0.1]:8080"), wanted));
    assert!(!procfs::serves(addr("127.0.0.2:8080"), wanted));
    assert!(!procfs::serves(addr("127.0.0.1:8081"), wanted));
}

#[test]
fn a_real_listener_is_seen_without_a_connection_and_a_closed_one_is_not() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let local = listener.local_addr().expect("local address");
    assert!(procfs::listening(local));
    // Nothing connected to find that out: the accept queue is empty.
    listener.set_nonblocking(true).expect("nonblocking");
    let accepted = listener.accept().map(|_| ()).map_err(|e| e.kind());
    assert_eq!(accepted, Err(ErrorKind::WouldBlock));
    drop(listener);
    assert!(!procfs::listening(local));
}
