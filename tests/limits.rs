//! Admission limits and timeouts over real loopback TCP: `maxConnections`,
//! `maxConnectionsPerClient`, `idleTimeout`, and `connectTimeout` against a target whose accept
//! queue is full.

use std::time::Duration;

use stickylb::Reject;
use stickylb_testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_new_clients_are_refused_at_once_and_counted() {
    let echo = Backend::start("echo", Mode::Echo).await;
    let server = start(&[echo.addr], serde_json::json!({"maxConnections": 5}));
    let lb = server.local_addr();
    let mut held = Vec::new();
    for i in 0..5 {
        held.push(served(client_ip(i), lb).await.expect("within the limit"));
    }
    for i in 5..8 {
        assert!(served(client_ip(i), lb).await.is_none(), "over the limit");
    }
    let s = server.snapshot();
    assert_eq!(s.rejected(Reject::Limit), 3);
    assert_eq!(s.accepted, 8, "refused ones are accepted, then closed");
    // Closing one frees a place.
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while server.active() > 4 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(served(client_ip(9), lb).await.is_some(), "served again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_per_client_limits_one_address_not_the_others() {
    let echo = Backend::start("echo", Mode::Echo).await;
    let server = start(
        &[echo.addr],
        serde_json::json!({"maxConnectionsPerClient": 2}),
    );
    let lb = server.local_addr();
    let a = served(client_ip(1), lb).await.expect("first");
    let _b = served(client_ip(1), lb).await.expect("second");
    assert!(
        served(client_ip(1), lb).await.is_none(),
        "third from the same address"
    );
    let _other = served(client_ip(2), lb).await.expect("another address");
    assert_eq!(server.snapshot().rejected(Reject::ClientLimit), 1);
    drop(a);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if served(client_ip(1), lb).await.is_some() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never served again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_idle_timeout_and_busy_ones_are_not() {
    let echo = Backend::start("echo", Mode::Echo).await;
    let server = start(&[echo.addr], serde_json::json!({"idleTimeout": 300}));
    let lb = server.local_addr();
    let mut idle = served(client_ip(1), lb).await.unwrap();
    let mut busy = served(client_ip(2), lb).await.unwrap();
    // The busy one exchanges a byte every 100 ms for 1.2 s: never idle for 300 ms.
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        busy.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        busy.read_exact(&mut b).await.unwrap();
    }
    // The idle one has been closed by now (EOF, not a reset: nothing was in flight).
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(PATIENCE, idle.read(&mut buf))
        .await
        .expect("closed, not hanging")
        .expect("a clean close");
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_holds_when_a_targets_accept_queue_is_full() {
    // A target that never accepts, with a backlog of 1, filled: further SYNs get no answer.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let stuck = socket.listen(1).unwrap();
    let stuck_addr = stuck.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(stuck_addr),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let good = Backend::start("good", Mode::Named).await;
    let server = start(
        &[stuck_addr, good.addr],
        serde_json::json!({"connectTimeout": 300, "sessionExpiry": 0}),
    );
    let lb = server.local_addr();
    // Find clients the hash sends to the stuck target first: they must still be served, by
    // the good one, once the connect timed out.
    for i in 0..20 {
        let (name, _) = tokio::time::timeout(PATIENCE, which(client_ip(i), lb))
            .await
            .expect("not hanging")
            .expect("served");
        assert_eq!(name, "good");
    }
    let stuck_state = &server.snapshot().targets[0];
    assert!(stuck_state.connect_failures >= 1);
    assert_eq!(stuck_state.connections, 0);
    drop(stuck);
}
