//! Never a silent truncation (design §10): every stream stickylb cuts reaches both peers as a
//! reset, read to its very end; a failed direction does not throw away what the other already
//! received; connect attempts are bounded; keepalive finds dead peers in minutes; a listener
//! moves on the same port; removed targets are forgotten once drained.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use stickylb::Reject;

const BIN: &str = env!("CARGO_BIN_EXE_stickylb");
use stickylb_testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// How a stream read to its very end ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// A clean EOF (FIN) after this many bytes.
    Fin(u64),
    /// A reset after this many bytes.
    Reset(u64),
}

/// Reads `stream` to its very end (bounded by [`PATIENCE`]), counting bytes.
async fn read_to_end(stream: &mut TcpStream) -> End {
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return End::Fin(got),
                Ok(n) => got += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return End::Reset(got)
                }
                Err(e) => panic!("read failed otherwise after {got} bytes: {e}"),
            }
        }
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("the stream ended in time")
}

/// A target that writes up to `limit` bytes to each client as fast as the client takes them,
/// then closes; it reports how far it got and whether its writes failed (a reset or a closed
/// peer) before the end.
struct Download {
    addr: SocketAddr,
    /// Per connection: (bytes written, whether a write failed).
    ended: tokio::sync::mpsc::UnboundedReceiver<(u64, bool)>,
}

async fn download(limit: u64) -> Download {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, ended) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let chunk = vec![5u8; 64 * 1024];
                let mut written = 0u64;
                let mut failed = false;
                while written < limit {
                    match stream.write(&chunk).await {
                        Ok(n) => written += n as u64,
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                }
                let _ = tx.send((written, failed));
            });
        }
    });
    Download { addr, ended }
}

impl Download {
    async fn next_end(&mut self) -> (u64, bool) {
        tokio::time::timeout(PATIENCE, self.ended.recv())
            .await
            .expect("the target's side ended in time")
            .expect("a report")
    }
}

/// A client socket with a small receive buffer, so that a download stalls in stickylb.
async fn small_window_client(n: u32, lb: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket
        .bind(SocketAddr::new(client_ip(n).into(), 0))
        .unwrap();
    socket.connect(lb).await.unwrap()
}

/// Waits (bounded) until the balancer has had its connection open, then until it has none.
async fn until_drained(server: &stickylb::server::Server) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while server.active() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never accepted");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::timeout(PATIENCE, server.drained())
        .await
        .expect("every connection closed");
}

const BIG: u64 = 1 << 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_open_at_the_shutdown_deadline_is_reset_on_both_sides() {
    let mut target = download(BIG).await;
    let server = start(&[target.addr], serde_json::json!({"shutdownTimeout": 300}));
    let mut client = connect_from(client_ip(1), server.local_addr())
        .await
        .unwrap();
    let mut first = vec![0u8; 100_000];
    client.read_exact(&mut first).await.unwrap();
    // The download is running (the client reads on below, slower than the target writes).
    let shutdown = {
        let server = server.clone();
        tokio::spawn(async move { server.shutdown().await })
    };
    let end = read_to_end(&mut client).await;
    assert!(
        matches!(end, End::Reset(n) if n < BIG),
        "the client took a cut download for a complete one: {end:?}"
    );
    let (written, failed) = target.next_end().await;
    assert!(
        failed && written < BIG,
        "the target was not reset: {written} bytes, failed {failed}"
    );
    assert!(
        !shutdown.await.unwrap(),
        "shutdown reports connections it had to cut"
    );
}

/// The same through the binary and SIGTERM: the process exits only after resetting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_resets_a_download_still_open_at_the_shutdown_deadline() {
    let mut target = download(BIG).await;
    let lb = Balancer::spawn(
        BIN,
        "cut-at-deadline",
        &[target.addr],
        serde_json::json!({"shutdownTimeout": 300}),
        None,
    );
    let mut client = connect_from(client_ip(2), lb.addr).await.unwrap();
    let mut first = vec![0u8; 100_000];
    client.read_exact(&mut first).await.unwrap();
    lb.signal(libc::SIGTERM);
    let end = read_to_end(&mut client).await;
    assert!(
        matches!(end, End::Reset(_)),
        "after SIGTERM's deadline the client saw {end:?}"
    );
    let (_, failed) = target.next_end().await;
    assert!(failed, "the target saw a clean end");
    lb.wait_for_line("remaining connections were reset");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_download_cut_by_the_idle_timeout_is_reset_on_both_sides() {
    let mut target = download(BIG).await;
    let server = start(&[target.addr], serde_json::json!({"idleTimeout": 300}));
    // The client never reads: its window fills, stickylb's pipe fills, nothing moves.
    let mut client = small_window_client(3, server.local_addr()).await;
    until_drained(&server).await;
    let end = read_to_end(&mut client).await;
    assert!(
        matches!(end, End::Reset(_)),
        "a download stalled with bytes in stickylb ended as {end:?}"
    );
    let (_, failed) = target.next_end().await;
    assert!(failed, "the target saw a clean end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_with_nothing_in_flight_closes_with_a_fin() {
    let echo = Backend::start("echo", Mode::Echo).await;
    let server = start(&[echo.addr], serde_json::json!({"idleTimeout": 200}));
    let mut client = connect_from(client_ip(4), server.local_addr())
        .await
        .unwrap();
    client.write_all(b"hello").await.unwrap();
    let mut echoed = [0u8; 5];
    client.read_exact(&mut echoed).await.unwrap();
    // Nothing more is sent: after the idle timeout, a clean close (as servers close idle
    // keep-alive connections): nothing was held.
    assert_eq!(read_to_end(&mut client).await, End::Fin(0));
}

/// A target that reads `take` bytes of an upload, answers with `answer` bytes and closes with
/// unread data waiting (so its kernel resets the connection), as an HTTP server answering 413
/// to an upload that is too large.
async fn early_answer(take: usize, answer: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut upload = vec![0u8; take];
                if stream.read_exact(&mut upload).await.is_err() {
                    return;
                }
                let mut body = b"HTTP/1.1 413 Payload Too Large\r\n\r\n".to_vec();
                body.resize(answer, b'x');
                if stream.write_all(&body).await.is_err() {
                    return;
                }
                // Like a server's lingering close: the answer must have left (acknowledged by
                // stickylb's kernel) before the close, which, with the upload unread, is a
                // reset that would discard what is still queued here.
                let _ = stream.shutdown().await;
                let sent = async {
                    while unacknowledged(&stream) > 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                };
                let _ = tokio::time::timeout(PATIENCE, sent).await;
                drop(stream);
            });
        }
    });
    addr
}

/// Bytes in the socket's send queue not yet acknowledged by the peer (SIOCOUTQ).
fn unacknowledged(stream: &TcpStream) -> i32 {
    use std::os::fd::AsRawFd;
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ on a TCP socket we own writes one int.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    if rc == 0 {
        queued
    } else {
        0
    }
}

async fn early_answer_reaches_the_client(zero_copy: bool) {
    const ANSWER: usize = 200 * 1024;
    let target = early_answer(16 * 1024, ANSWER).await;
    let server = start(&[target], serde_json::json!({"zeroCopy": zero_copy}));
    for i in 0..20 {
        // A small window: most of the answer waits in stickylb when the upload breaks.
        let mut client = small_window_client(10 + i, server.local_addr()).await;
        // An upload larger than the target will read, written in one burst without waiting
        // (a writer blocked on the socket would be the one to see the reset, and the reader
        // would then see a plain EOF).
        let chunk = vec![1u8; 64 * 1024];
        let mut uploaded = 0;
        while uploaded < 4 << 20 {
            match client.try_write(&chunk) {
                Ok(n) => uploaded += n,
                Err(_) => break,
            }
        }
        assert!(
            uploaded > 16 * 1024,
            "the upload outgrew what the target reads"
        );
        // The target's answer arrives whole; the stream then ends (the target's FIN passed on,
        // or the reset of the cut upload if it comes first).
        let end = read_to_end(&mut client).await;
        assert!(
            matches!(end, End::Fin(n) | End::Reset(n) if n == ANSWER as u64),
            "connection {i}: got {end:?} of a {ANSWER}-byte answer"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_targets_early_answer_reaches_the_client_before_the_reset_with_splice() {
    early_answer_reaches_the_client(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_targets_early_answer_reaches_the_client_before_the_reset_with_copy() {
    early_answer_reaches_the_client(false).await;
}

/// A target whose SYNs go unanswered: a listener with a backlog of 1, filled, never accepting.
async fn syn_dropping_target() -> (TcpListener, Vec<TcpStream>) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
        {
            fillers.push(s);
        }
    }
    (listener, fillers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_is_held_for_at_most_max_connect_attempts_connects() {
    let mut stuck = Vec::new();
    for _ in 0..10 {
        stuck.push(syn_dropping_target().await);
    }
    let addrs: Vec<SocketAddr> = stuck.iter().map(|(l, _)| l.local_addr().unwrap()).collect();
    let server = start(&addrs, serde_json::json!({"connectTimeout": 200}));
    let mut client = connect_from(client_ip(40), server.local_addr())
        .await
        .unwrap();
    assert!(matches!(read_to_end(&mut client).await, End::Reset(0)));
    let s = server.snapshot();
    let attempts: u64 = s.targets.iter().map(|t| t.connect_failures).sum();
    assert_eq!(
        attempts, 3,
        "maxConnectAttempts defaults to 3, as HAProxy's retries"
    );
    assert_eq!(s.rejected(Reject::NoTarget), 1);
    // And the key sets it.
    let server = start(
        &addrs,
        serde_json::json!({"connectTimeout": 100, "maxConnectAttempts": 5}),
    );
    let mut client = connect_from(client_ip(41), server.local_addr())
        .await
        .unwrap();
    assert!(matches!(read_to_end(&mut client).await, End::Reset(0)));
    let attempts: u64 = server
        .snapshot()
        .targets
        .iter()
        .map(|t| t.connect_failures)
        .sum();
    assert_eq!(attempts, 5);
}

/// The keepalive settings of a socket: (SO_KEEPALIVE, idle, interval, count, TCP_NODELAY).
fn keepalive_of(socket: &socket2::SockRef<'_>) -> (bool, u64, u64, u32, bool) {
    (
        socket.keepalive().unwrap(),
        socket.tcp_keepalive_time().unwrap().as_secs(),
        socket.tcp_keepalive_interval().unwrap().as_secs(),
        socket.tcp_keepalive_retries().unwrap(),
        socket.tcp_nodelay().unwrap(),
    )
}

/// The balancer's own socket (in this process) whose peer is `peer`.
fn balancer_socket_with_peer(peer: SocketAddr) -> std::os::fd::OwnedFd {
    for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
        let Ok(fd) = entry.unwrap().file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: a descriptor listed for this process; dup gives one we own (or fails).
        let dup = unsafe { libc::dup(fd) };
        if dup < 0 {
            continue;
        }
        // SAFETY: dup returned a new descriptor nobody else owns.
        let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dup) };
        let matches = socket2::SockRef::from(&owned)
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket())
            == Some(peer);
        if matches {
            return owned;
        }
    }
    panic!("no socket with peer {peer}");
}

/// The keepalive and TCP_NODELAY settings of stickylb's two sockets of one connection: the
/// client side at once (inherited from the listener), the target side after two messages
/// went through (TCP_NODELAY comes before the second write to it) and, when `tcpKeepalive` is
/// on, once the connection has lived a second (polled every 50 ms, for at most 10 s).
async fn keepalive_on_both_sides(extra: serde_json::Value) -> [(bool, u64, u64, u32, bool); 2] {
    let keepalive_on = extra.get("tcpKeepalive") != Some(&serde_json::json!(false));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = start(&[listener.local_addr().unwrap()], extra);
    let mut client = connect_from(client_ip(50), server.local_addr())
        .await
        .unwrap();
    let (mut upstream, seen_as) = listener.accept().await.unwrap();
    let mut x = [0u8; 1];
    for message in [b"x", b"y"] {
        client.write_all(message).await.unwrap();
        upstream.read_exact(&mut x).await.unwrap();
        assert_eq!(&x, message);
    }
    // The balancer's client-side socket has the client as its peer; its target-side socket has
    // the target's accepted socket's peer address as its own address, and the target as peer.
    let client_side = balancer_socket_with_peer(client.local_addr().unwrap());
    let target_side = balancer_socket_with_peer(listener.local_addr().unwrap());
    assert_eq!(
        socket2::SockRef::from(&target_side)
            .local_addr()
            .unwrap()
            .as_socket(),
        Some(seen_as)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while keepalive_on && !socket2::SockRef::from(&target_side).keepalive().unwrap() {
        assert!(
            std::time::Instant::now() < deadline,
            "the target socket got no keepalive within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let both = [
        keepalive_of(&socket2::SockRef::from(&client_side)),
        keepalive_of(&socket2::SockRef::from(&target_side)),
    ];
    drop((client, upstream));
    both
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sides_get_tcp_keepalive_with_explicit_times_and_nodelay() {
    let defaults = keepalive_on_both_sides(serde_json::json!({})).await;
    // The client side inherits all of it from the listener; the target side gets it from the
    // relay.
    assert_eq!(defaults, [(true, 60, 10, 6, true); 2]);
    let set = keepalive_on_both_sides(
        serde_json::json!({"tcpKeepalive": {"idle": 30000, "interval": 5000, "count": 3}}),
    )
    .await;
    assert_eq!(set, [(true, 30, 5, 3, true); 2]);
    let off = keepalive_on_both_sides(serde_json::json!({"tcpKeepalive": false})).await;
    assert!(off.iter().all(|s| !s.0 && s.4), "{off:?}");
}

/// A port free on every address of both families, chosen below Linux's ephemeral range
/// (32768–60999 by default), where client sockets bound by other tests would otherwise keep a
/// wildcard listener from binding.
fn wildcard_port() -> u16 {
    let seed = std::process::id() as u64
        ^ u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos(),
        );
    for i in 0..200u64 {
        let port = 20_000 + ((seed + i * 7919) % 10_000) as u16;
        if std::net::TcpListener::bind(("::", port)).is_ok()
            && std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port in 20000-29999");
}

/// A reload that moves `sourceHost` on the same port binds the new listener beside the old one
/// before closing it: no refused connect, and the old listener's connection goes on.
async fn moves_on_the_same_port(from: &str, to: &str) {
    let echo = Backend::start("echo", Mode::Echo).await;
    let port = wildcard_port();
    let dir = TempDir::new("same-port");
    let path = dir.path("config.json");
    let text = |host: &str| {
        let mut config: serde_json::Value =
            serde_json::from_str(&config_text(&[echo.addr], serde_json::json!({}))).unwrap();
        config["sourceHost"] = host.into();
        config["sourcePort"] = port.into();
        config.to_string()
    };
    std::fs::write(&path, text(from)).unwrap();
    let server = start_from_file(&path, true);
    let lb = SocketAddr::from(([127, 0, 0, 1], port));
    let mut open = connect_from(client_ip(60), lb).await.unwrap();
    open.write_all(b"one").await.unwrap();
    std::fs::write(&path, text(to)).unwrap();
    let reloader = stickylb::reload::Reloader::new(server.clone());
    let outcome = reloader.reload(stickylb::reload::Trigger::Signal).await;
    assert!(
        outcome.is_ok(),
        "{from} -> {to} on port {port}: {outcome:?}"
    );
    assert_eq!(server.local_addr().ip().to_string(), to);
    // New clients are served by the new listener, and the old connection goes on.
    let mut fresh = connect_from(client_ip(61), lb).await.unwrap();
    fresh.write_all(b"two").await.unwrap();
    let mut buf = [0u8; 3];
    fresh.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"two");
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_host_moves_from_the_wildcard_to_loopback_on_the_same_port() {
    moves_on_the_same_port("0.0.0.0", "127.0.0.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_host_moves_from_dual_stack_to_ipv4_on_the_same_port() {
    moves_on_the_same_port("::", "0.0.0.0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_held_by_another_listener_is_still_an_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let error = stickylb::server::bind(taken.local_addr().unwrap()).expect_err("taken");
    assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);
}

/// Configs whose target ids change at every reload (service discovery) do not grow the
/// balancer's state or its metrics: a removed target is forgotten once its connections and
/// sessions are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_targets_are_forgotten_once_drained() {
    let echo = Backend::start("echo", Mode::Echo).await;
    let dir = TempDir::new("churn");
    let path = dir.path("config.json");
    let text = |generation: u32| {
        let mut config: serde_json::Value = serde_json::from_str(&config_text(
            &[echo.addr],
            serde_json::json!({"sessionExpiry": 50, "sessionExpiryInterval": 20}),
        ))
        .unwrap();
        config["targets"][0]["id"] = format!("gen-{generation}").into();
        config.to_string()
    };
    std::fs::write(&path, text(0)).unwrap();
    let server = start_from_file(&path, false);
    let reloader = stickylb::reload::Reloader::new(server.clone());
    let seen = Arc::new(AtomicU64::new(0));
    for generation in 1..=30 {
        // One connection per generation, so every removed target had a session.
        let mut c = connect_from(client_ip(70 + generation), server.local_addr())
            .await
            .unwrap();
        c.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await.unwrap();
        drop(c);
        std::fs::write(&path, text(generation)).unwrap();
        reloader
            .reload(stickylb::reload::Trigger::Signal)
            .await
            .unwrap();
        seen.fetch_max(server.snapshot().targets.len() as u64, Ordering::Relaxed);
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while server.snapshot().targets.len() > 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "removed targets still known: {:?}",
            server
                .snapshot()
                .targets
                .iter()
                .map(|t| t.id.to_string())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = stickylb::admin::prometheus::render(&server.snapshot());
    assert!(
        !text.contains("gen-0"),
        "a forgotten target is still exported"
    );
    assert!(text.contains("target=\"gen-30\""));
}

/// Spends user `nobody`'s pipe budget (`fs.pipe-user-pages-soft`) from a thread that runs as
/// `nobody` (the raw setresuid syscall changes only the calling thread's credentials), holding
/// full-size pipes until the returned guard is dropped. Needs root.
fn spend_nobodys_pipe_budget() -> Vec<std::os::fd::OwnedFd> {
    std::thread::spawn(|| {
        // SAFETY: raw syscalls on this thread only; it never goes back to root, and it ends
        // right after creating the pipes.
        let rc = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
        assert_eq!(
            rc,
            0,
            "setresuid(nobody): {}",
            std::io::Error::last_os_error()
        );
        let mut pipes = Vec::new();
        for _ in 0..4096 {
            let mut fds = [-1; 2];
            // SAFETY: pipe2 fills two fds; F_SETPIPE_SZ on the write end we own.
            unsafe {
                assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0);
                pipes.push(<std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[0]));
                pipes.push(<std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[1]));
                if libc::fcntl(fds[1], libc::F_SETPIPE_SZ, 256 * 1024) < 0 {
                    // The budget is spent: pipes of this user now stay at 2 pages.
                    return pipes;
                }
            }
        }
        panic!("4096 pipes of 256 KiB and the budget is not spent");
    })
    .join()
    .expect("the pipe hog")
}

/// Past the per-user pipe budget the kernel hands out 2-page pipes, which would splice 8 KiB
/// at a time: stickylb refuses them and copies instead, says so once, and every byte still
/// arrives. (Root is exempt from the budget, so stickylb runs as `nobody` here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_pipe_budget_bulk_transfers_copy_and_stay_byte_exact() {
    if !require_root("the pipe budget test (it runs stickylb as nobody)") {
        return;
    }
    let _spent = spend_nobodys_pipe_budget();
    let echo = Backend::start("echo", Mode::Echo).await;
    let lb = Balancer::spawn(
        BIN,
        "pipe-budget",
        &[echo.addr],
        serde_json::json!({"downgradeToUser": "nobody"}),
        None,
    );
    let mut transfers = Vec::new();
    for i in 0..4u32 {
        let addr = lb.addr;
        transfers.push(tokio::spawn(async move {
            let stream = connect_from(client_ip(200 + i), addr).await.unwrap();
            let (mut r, mut w) = stream.into_split();
            let len = 8 << 20;
            let writer = tokio::spawn(async move { send_pattern(&mut w, u64::from(i), len).await });
            let got = check_pattern(&mut r, u64::from(i), len)
                .await
                .expect("echo matches");
            writer.await.unwrap().unwrap();
            got
        }));
    }
    for t in transfers {
        assert_eq!(t.await.unwrap(), 8 << 20, "every byte came back");
    }
    lb.wait_for_line("pipe budget");
}
