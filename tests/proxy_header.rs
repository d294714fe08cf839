//! The PROXY protocol through a running balancer (design §11), over real loopback TCP: the
//! header sent to targets, the header required from trusted upstreams and consumed exactly,
//! its client used for everything, hostile headers refused without harm to others, and two
//! balancers in a chain keeping stickiness. (The codec itself is tested in
//! `src/proxy_protocol.rs` and `tests/proxy_protocol_props.rs`; real HAProxy, nginx and
//! Node.js peers in `tests/interop.rs`.)

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use stickylb::proxy_protocol::{self, Header, Parse, Version};
use stickylb::Reject;
use stickylb_testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_stickylb");

/// A target that reads the PROXY header at the start of each connection (with the codec),
/// reports it with the bytes that followed it, and echoes those bytes.
async fn header_reader() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(Header, Vec<u8>)>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    match proxy_protocol::parse(&buf) {
                        Ok(Parse::Incomplete) => continue,
                        Ok(Parse::Complete { header, len }) => {
                            let rest = buf[len..].to_vec();
                            let _ = stream.write_all(&rest).await;
                            let _ = tx.send((header, rest));
                            let mut more = [0u8; 4096];
                            while let Ok(n) = stream.read(&mut more).await {
                                if n == 0 || stream.write_all(&more[..n]).await.is_err() {
                                    return;
                                }
                            }
                            return;
                        }
                        Err(e) => panic!("the target got no valid header: {e}: {buf:?}"),
                    }
                }
            });
        }
    });
    (addr, rx)
}

async fn next<T>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .expect("in time")
        .expect("a report")
}

/// Sends `hello` from `client`, reads the echo: the bytes after the header arrived untouched.
async fn hello(client: &mut TcpStream) {
    client.write_all(b"hello").await.unwrap();
    let mut echo = [0u8; 5];
    tokio::time::timeout(PATIENCE, client.read_exact(&mut echo))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&echo, b"hello");
}

async fn sends(version: &str) {
    let (target, mut headers) = header_reader().await;
    let server = start(&[target], serde_json::json!({"proxyProtocol": version}));
    let mut client = connect_from(client_ip(1), server.local_addr())
        .await
        .unwrap();
    hello(&mut client).await;
    let (header, rest) = next(&mut headers).await;
    assert_eq!(
        header,
        Header::Proxied {
            client: client.local_addr().unwrap(),
            server: server.local_addr(),
        },
        "the client's address and port, and the address it connected to"
    );
    // The header came first: what followed it in the same read is the start of the client's
    // bytes (the rest of them may come in later segments; the echo showed them whole).
    assert!(b"hello".starts_with(&rest), "{rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_header_with_the_client_goes_first_to_the_target() {
    sends("v1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v2_header_with_the_client_goes_first_to_the_target() {
    sends("v2").await;
}

/// On a dual-stack `::` listener an IPv4 client arrives as `::ffff:a.b.c.d`: the header says
/// TCP4 with the plain IPv4 addresses, as the spec wants; an IPv6 client gets TCP6.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mapped_clients_are_sent_as_ipv4_and_ipv6_clients_as_ipv6() {
    for version in ["v1", "v2"] {
        let (target, mut headers) = header_reader().await;
        let text = config_text(&[target], serde_json::json!({"proxyProtocol": version}));
        let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
        config["sourceHost"] = "::".into();
        let config =
            stickylb::config::Config::parse(std::path::Path::new("t.json"), &config.to_string())
                .unwrap();
        let listener = stickylb::server::bind("[::]:0".parse().unwrap()).unwrap();
        let server = stickylb::server::Server::start(config, listener).unwrap();
        let port = server.local_addr().port();
        let mut v4 = connect_from(client_ip(2), SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .unwrap();
        hello(&mut v4).await;
        let (header, _) = next(&mut headers).await;
        assert_eq!(
            header,
            Header::Proxied {
                client: v4.local_addr().unwrap(),
                server: SocketAddr::from(([127, 0, 0, 1], port)),
            },
            "{version}: IPv4 on both sides"
        );
        let mut v6 = TcpStream::connect(("::1", port)).await.unwrap();
        hello(&mut v6).await;
        let (header, _) = next(&mut headers).await;
        let Header::Proxied { client, server } = header else {
            panic!("{header:?}");
        };
        assert_eq!(client, v6.local_addr().unwrap(), "{version}");
        assert_eq!(server.ip(), "::1".parse::<IpAddr>().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_target_setting_overrides_the_top_level_one() {
    let (sent_to, mut headers) = header_reader().await;
    let plain = Backend::start("plain", Mode::Echo).await;
    let text = serde_json::json!({
        "sourceHost": "127.0.0.1", "sourcePort": 1, "metricsPort": null, "proxyProtocol": "v2",
        "targets": [
            {"host": "127.0.0.1", "port": sent_to.port()},
            {"host": "127.0.0.1", "port": plain.addr.port(), "proxyProtocol": false}
        ]
    });
    let config =
        stickylb::config::Config::parse(std::path::Path::new("t.json"), &text.to_string()).unwrap();
    let server = stickylb::server::Server::start(
        config,
        stickylb::server::bind("127.0.0.1:0".parse().unwrap()).unwrap(),
    )
    .unwrap();
    // Clients spread over both targets: the plain one echoes exactly what the client sent (no
    // header), the other reads a header first.
    for i in 0..40 {
        let mut client = connect_from(client_ip(100 + i), server.local_addr())
            .await
            .unwrap();
        hello(&mut client).await;
    }
    assert!(
        plain.accepted() > 0,
        "some clients reached the plain target"
    );
    let mut with_header = 0;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), headers.recv()).await {
        with_header += 1;
    }
    assert_eq!(with_header + plain.accepted(), 40);
}

/// A balancer whose only trusted upstream is 127.0.0.1, over `targets` of its own.
async fn trusting(
    targets: &[SocketAddr],
    extra: serde_json::Value,
) -> std::sync::Arc<stickylb::server::Server> {
    let mut keys =
        serde_json::json!({"acceptProxyProtocol": ["127.0.0.1/32"], "proxyHeaderTimeout": 500});
    if let (Some(keys), Some(extra)) = (keys.as_object_mut(), extra.as_object()) {
        keys.extend(extra.clone());
    }
    start(targets, keys)
}

/// Connects as the trusted upstream (127.0.0.1) and sends `header` followed by `hello` in the
/// same write.
async fn upstream(lb: SocketAddr, header: &[u8]) -> TcpStream {
    let mut stream = connect_from(Ipv4Addr::LOCALHOST, lb).await.unwrap();
    let mut first = header.to_vec();
    first.extend_from_slice(b"hello");
    stream.write_all(&first).await.unwrap();
    stream
}

fn v2(client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    let mut out = Vec::new();
    proxy_protocol::encode(Version::V2, client, server, &mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_upstreams_header_is_consumed_exactly_and_names_the_client() {
    let echo = Backend::start("echo", Mode::Echo).await;
    let server = trusting(&[echo.addr], serde_json::json!({"accessLog": true})).await;
    let lb = server.local_addr();
    // v1, with the client's first bytes in the same segment.
    let mut s = upstream(lb, b"PROXY TCP4 192.0.2.7 198.51.100.1 40001 443\r\n").await;
    let mut echo5 = [0u8; 5];
    s.read_exact(&mut echo5).await.unwrap();
    assert_eq!(&echo5, b"hello", "exactly the header was consumed");
    // v2, likewise.
    let header = v2(
        "192.0.2.8:40002".parse().unwrap(),
        "198.51.100.1:443".parse().unwrap(),
    );
    let mut s2 = upstream(lb, &header).await;
    s2.read_exact(&mut echo5).await.unwrap();
    assert_eq!(&echo5, b"hello");
    // v1 UNKNOWN and v2 LOCAL (an upstream's own check): the connection's own address.
    let mut s3 = upstream(lb, b"PROXY UNKNOWN\r\n").await;
    s3.read_exact(&mut echo5).await.unwrap();
    let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    let mut s4 = upstream(lb, &local).await;
    s4.read_exact(&mut echo5).await.unwrap();
    assert_eq!(&echo5, b"hello");
    assert_eq!(server.snapshot().rejected(Reject::ProxyHeader), 0);
}

/// Everything keyed on the client uses the header's: `allow`/`deny`, the per-client limit, and
/// the hash (the target a header's client reaches is the one that client reaches directly).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_headers_client_is_the_client_for_deny_limits_and_the_hash() {
    let mut backends = Vec::new();
    for name in ["a", "b", "c", "d"] {
        backends.push(Backend::start(name, Mode::Named).await);
    }
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let direct = start(&addrs, serde_json::json!({}));
    let behind = trusting(
        &addrs,
        serde_json::json!({"deny": ["127.99.0.0/16"], "maxConnectionsPerClient": 1}),
    )
    .await;
    // The hash: 50 client addresses, each through a header and directly.
    for i in 0..50 {
        let ip = client_ip(300 + i);
        let (home, _held) = which(ip, direct.local_addr()).await.unwrap();
        let header = format!("PROXY TCP4 {ip} 127.0.0.1 40000 80\r\n");
        let stream = connect_from(Ipv4Addr::LOCALHOST, behind.local_addr())
            .await
            .unwrap();
        let mut stream = tokio::io::BufReader::new(stream);
        stream.get_mut().write_all(header.as_bytes()).await.unwrap();
        let mut name = String::new();
        tokio::io::AsyncBufReadExt::read_line(&mut stream, &mut name)
            .await
            .unwrap();
        assert_eq!(name.trim_end(), home, "client {ip} through a header");
    }
    // deny: the header's address is denied, though the upstream (127.0.0.1) is not.
    let mut denied = upstream(
        behind.local_addr(),
        b"PROXY TCP4 127.99.1.1 127.0.0.1 1 80\r\n",
    )
    .await;
    let mut buf = [0u8; 64];
    let outcome = tokio::time::timeout(PATIENCE, denied.read(&mut buf))
        .await
        .unwrap();
    assert!(
        outcome.is_err() || outcome.unwrap() == 0,
        "a denied client is refused"
    );
    assert_eq!(behind.snapshot().rejected(Reject::Denied), 1);
    // maxConnectionsPerClient counts the header's client: a second connection "from" it is
    // refused while the first is open, whatever the upstream's address.
    let mut first = upstream(
        behind.local_addr(),
        b"PROXY TCP4 127.98.0.1 127.0.0.1 1 80\r\n",
    )
    .await;
    // Served (its target's name arrived) before the second one is made, so the first holds
    // the client's one slot.
    let mut name = [0u8; 1];
    tokio::time::timeout(PATIENCE, first.read_exact(&mut name))
        .await
        .expect("the first is served in time")
        .expect("the first is served");
    let mut second = upstream(
        behind.local_addr(),
        b"PROXY TCP4 127.98.0.1 127.0.0.1 2 80\r\n",
    )
    .await;
    let outcome = tokio::time::timeout(PATIENCE, second.read(&mut buf))
        .await
        .unwrap();
    assert!(outcome.is_err() || outcome.unwrap() == 0);
    assert_eq!(behind.snapshot().rejected(Reject::ClientLimit), 1);
    drop(first);
}

/// From an address not in `acceptProxyProtocol`, nothing is parsed: bytes that look like a
/// header are the client's data (or anyone could claim any address).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_an_untrusted_address_a_header_is_just_data() {
    let echo = Backend::start("echo", Mode::Echo).await;
    let server = trusting(&[echo.addr], serde_json::json!({})).await;
    let mut client = connect_from(client_ip(5), server.local_addr())
        .await
        .unwrap();
    let line = b"PROXY TCP4 192.0.2.7 198.51.100.1 40001 443\r\n";
    client.write_all(line).await.unwrap();
    let mut echo = vec![0u8; line.len()];
    client.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, line);
}

/// How a connection from the trusted upstream ended: reset (or closed) before any byte.
async fn refused(stream: &mut TcpStream) {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
        Ok(Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        Ok(Ok(n)) => panic!("{n} bytes instead of a reset"),
        Err(_) => panic!("not refused in time"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_missing_truncated_oversized_and_late_headers_are_reset_and_counted() {
    let echo = Backend::start("echo", Mode::Echo).await;
    let server = trusting(&[echo.addr], serde_json::json!({})).await;
    let lb = server.local_addr();
    let mut oversized = b"PROXY TCP4 192.0.2.7 198.51.100.1 40001 443".to_vec();
    oversized.resize(120, b' ');
    let mut v2_too_long = b"\r\n\r\n\0\r\nQUIT\n\x21\x11".to_vec();
    v2_too_long.extend_from_slice(&[0x10, 0x00]); // 4096 bytes declared
    let cases: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\n\r\n".to_vec(), // no header at all
        b"PROXY TCP4 192.0.2.7 198.51.100.1 40001 99999\r\n".to_vec(), // port out of range
        b"PROXY TCP6 192.0.2.7 198.51.100.1 1 2\r\n".to_vec(), // family mismatch
        oversized,                          // v1 over 107 bytes
        v2_too_long,                        // v2 over the cap
    ];
    let n = cases.len() as u64;
    for case in &cases {
        let mut s = connect_from(Ipv4Addr::LOCALHOST, lb).await.unwrap();
        s.write_all(case).await.unwrap();
        refused(&mut s).await;
    }
    // Truncated, then closed; and truncated, then silent past proxyHeaderTimeout.
    let mut s = connect_from(Ipv4Addr::LOCALHOST, lb).await.unwrap();
    s.write_all(b"PROXY TCP4 192.0.2").await.unwrap();
    s.shutdown().await.unwrap();
    refused(&mut s).await;
    let mut s = connect_from(Ipv4Addr::LOCALHOST, lb).await.unwrap();
    s.write_all(b"PROXY TCP4 192.0.2").await.unwrap();
    refused(&mut s).await;
    assert_eq!(server.snapshot().rejected(Reject::ProxyHeader), n + 2);
    // Meanwhile a good upstream is served.
    let mut good = upstream(lb, b"PROXY TCP4 192.0.2.9 198.51.100.1 1 443\r\n").await;
    let mut echo5 = [0u8; 5];
    good.read_exact(&mut echo5).await.unwrap();
}

/// A trusted upstream that sends its header a byte at a time, slower than
/// `proxyHeaderTimeout`, is cut at the timeout; clients beside it are served all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_trickled_a_byte_at_a_time_is_cut_at_the_timeout() {
    let echo = Backend::start("echo", Mode::Echo).await;
    let server = trusting(&[echo.addr], serde_json::json!({})).await;
    let lb = server.local_addr();
    let mut slow = Vec::new();
    for _ in 0..20 {
        slow.push(connect_from(Ipv4Addr::LOCALHOST, lb).await.unwrap());
    }
    // A byte every 50 ms to each: the header would take 2.3 s, past the 500 ms timeout.
    let line = b"PROXY TCP4 192.0.2.7 198.51.100.1 40001 443\r\n";
    let mut cut = vec![false; slow.len()];
    for byte in line.iter().cycle().take(200) {
        for (s, cut) in slow.iter_mut().zip(&mut cut) {
            // A write to a reset connection fails (at the latest the second write after the
            // reset arrived): that is how the trickler learns it was cut.
            if !*cut && s.write_all(&[*byte]).await.is_err() {
                *cut = true;
            }
        }
        if cut.iter().all(|c| *c) {
            break;
        }
        // A client beside them is served while they trickle.
        let mut good = upstream(lb, b"PROXY TCP4 192.0.2.9 198.51.100.1 1 443\r\n").await;
        let mut echo5 = [0u8; 5];
        good.read_exact(&mut echo5).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(cut.iter().all(|c| *c), "every trickler was cut: {cut:?}");
    assert_eq!(server.snapshot().rejected(Reject::ProxyHeader), 20);
}

/// 10,000 bad headers in a row cost the process no memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_bad_headers_cost_no_memory() {
    let echo = Backend::start("echo", Mode::Echo).await;
    let lb = Balancer::spawn(
        BIN,
        "bad-headers",
        &[echo.addr],
        serde_json::json!({"acceptProxyProtocol": ["127.0.0.1/32"]}),
        None,
    );
    let bad = |i: u32| {
        format!(
            "PROXY TCP4 192.0.2.{} 198.51.100.1 1 99999\r\n",
            i % 250 + 1
        )
    };
    let send = |n: u32, first: u32| async move {
        let mut tasks = tokio::task::JoinSet::new();
        for i in first..first + n {
            let addr = lb.addr;
            let line = bad(i);
            tasks.spawn(async move {
                if let Ok(mut s) = connect_from(Ipv4Addr::LOCALHOST, addr).await {
                    let _ = s.write_all(line.as_bytes()).await;
                    let mut buf = [0u8; 8];
                    let _ = tokio::time::timeout(PATIENCE, s.read(&mut buf)).await;
                }
            });
            if tasks.len() >= 64 {
                tasks.join_next().await;
            }
        }
        while tasks.join_next().await.is_some() {}
    };
    send(1_000, 0).await; // warm up: pools, allocator arenas
    let before = lb.settled_rss_kib(Duration::from_millis(200)).await;
    send(10_000, 1_000).await;
    let after = lb.settled_rss_kib(Duration::from_millis(200)).await;
    eprintln!("RSS before {before} KiB, after 10,000 bad headers {after} KiB");
    assert!(
        after <= before + 1024,
        "RSS grew from {before} to {after} KiB over 10,000 bad headers"
    );
}

/// Two balancers in a row, the first sending v2 and the second accepting it, put every client
/// on the target a single balancer would: stickiness survives the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_balancers_in_a_chain_keep_every_client_on_its_target() {
    let mut backends = Vec::new();
    for name in ["a", "b", "c", "d", "e"] {
        backends.push(Backend::start(name, Mode::Named).await);
    }
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let single = start(&addrs, serde_json::json!({}));
    let second = trusting(&addrs, serde_json::json!({})).await;
    // The first balancer hashes too, but over one target: the second balancer.
    let first = start(
        &[second.local_addr()],
        serde_json::json!({"proxyProtocol": "v2"}),
    );
    for i in 0..200 {
        let ip = client_ip(1000 + i);
        let (alone, _a) = which(ip, single.local_addr()).await.unwrap();
        let (chained, _c) = which(ip, first.local_addr()).await.unwrap();
        assert_eq!(chained, alone, "client {ip}");
    }
}
