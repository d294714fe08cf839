//! The admin endpoint under abuse (design §16, issue 11): clients that trickle their request
//! head, request lines and header blocks far past the cap, bodies on a read-only endpoint, and
//! clients that never read a large exposition. Each next to normal scrapes, which must keep
//! being answered. Real HTTP over loopback to a real balancer's endpoint.
//!
//! Timing goals (a scrape answered within 1 s beside 64 trickling clients, the data path not
//! slowed by scrapes) are a bench's business: `cargo bench --bench admin`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stickylb::admin::{self, Admin};
use stickylb::server::Server;
use stickylb_testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn export(server: &Arc<Server>) -> Admin {
    admin::start("127.0.0.1:0".parse().unwrap(), server.clone()).expect("metrics endpoint")
}

/// `GET /metrics` over a fresh connection, read to the end: the status code and the body.
async fn scrape(addr: SocketAddr) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    Ok(split(&response))
}

/// The status code and body of an HTTP/1.1 response (0 and everything if it is not one).
fn split(response: &[u8]) -> (u16, Vec<u8>) {
    let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (0, response.to_vec());
    };
    let head = String::from_utf8_lossy(&response[..end]);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, response[end + 4..].to_vec())
}

/// Sends `head` (in the background, ignoring a refused write) and reads the answer to its end:
/// how the connection ended (`Ok` with the bytes, or the error such as a reset).
async fn send_oversized(addr: SocketAddr, head: Vec<u8>) -> std::io::Result<Vec<u8>> {
    let stream = TcpStream::connect(addr).await?;
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        // The server stops reading past its cap; this write may then never finish, or fail.
        let _ = w.write_all(&head).await;
        w
    });
    let mut response = Vec::new();
    let read = tokio::time::timeout(PATIENCE, r.read_to_end(&mut response))
        .await
        .expect("an answer in time");
    writer.abort();
    read.map(|_| response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_mebibyte_request_line_gets_431_or_414_not_a_reset() {
    let backend = Backend::start("a", Mode::Echo).await;
    let server = start(&[backend.addr], serde_json::json!({}));
    let admin = export(&server);
    let mut head = b"GET /".to_vec();
    head.extend(std::iter::repeat_n(b'a', 1 << 20));
    head.extend_from_slice(b" HTTP/1.1\r\nHost: test\r\n\r\n");
    for _ in 0..5 {
        let response = send_oversized(admin.local_addr(), head.clone())
            .await
            .expect("an answer, not a reset");
        let status = split(&response).0;
        assert!(
            status == 431 || status == 414,
            "{status}: {}",
            String::from_utf8_lossy(&response)
        );
    }
    // And the endpoint still serves.
    assert_eq!(scrape(admin.local_addr()).await.unwrap().0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_headers_get_431_not_a_reset() {
    let backend = Backend::start("a", Mode::Echo).await;
    let server = start(&[backend.addr], serde_json::json!({}));
    let admin = export(&server);
    let mut head = b"GET /metrics HTTP/1.1\r\nHost: test\r\n".to_vec();
    for i in 0..10_000 {
        head.extend_from_slice(format!("X-Header-{i}: v\r\n").as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    for _ in 0..5 {
        let response = send_oversized(admin.local_addr(), head.clone())
            .await
            .expect("an answer, not a reset");
        assert_eq!(
            split(&response).0,
            431,
            "{}",
            String::from_utf8_lossy(&response)
        );
    }
    // A hundred headers, past hyper's count but within the size cap: 431 as well.
    let mut head = b"GET /metrics HTTP/1.1\r\nHost: test\r\n".to_vec();
    for i in 0..150 {
        head.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    let response = send_oversized(admin.local_addr(), head).await.unwrap();
    assert_eq!(split(&response).0, 431);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_is_refused_with_413_and_a_write_with_405() {
    let backend = Backend::start("a", Mode::Echo).await;
    let server = start(&[backend.addr], serde_json::json!({}));
    let admin = export(&server);
    let mut request =
        b"GET /metrics HTTP/1.1\r\nHost: test\r\nContent-Length: 2097152\r\n\r\n".to_vec();
    request.extend(std::iter::repeat_n(b'x', 2 << 20));
    let response = send_oversized(admin.local_addr(), request)
        .await
        .expect("an answer, not a reset");
    assert_eq!(split(&response).0, 413);
    let response = send_oversized(
        admin.local_addr(),
        b"DELETE /metrics HTTP/1.1\r\nHost: test\r\n\r\n".to_vec(),
    )
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&response).to_string();
    assert_eq!(split(&response).0, 405, "{text}");
    assert!(
        text.to_ascii_lowercase().contains("allow: get, head"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_clients_do_not_starve_a_normal_scrape() {
    let backend = Backend::start("a", Mode::Echo).await;
    let server = start(&[backend.addr], serde_json::json!({}));
    let admin = export(&server);
    let open = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = slowloris(
        admin.local_addr(),
        admin::MAX_CONNECTIONS,
        Duration::from_millis(100),
        open.clone(),
        stop.clone(),
    );
    // Bounded wait until every trickling client holds a connection.
    let deadline = Instant::now() + PATIENCE;
    while open.load(Ordering::Relaxed) < admin::MAX_CONNECTIONS {
        assert!(
            Instant::now() < deadline,
            "slowloris clients never connected"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let started = Instant::now();
        let (status, body) = scrape(admin.local_addr()).await.expect("a scrape");
        slowest = slowest.max(started.elapsed());
        assert_eq!(
            status,
            200,
            "scrape {i} beside {} trickling clients: {}",
            open.load(Ordering::Relaxed),
            String::from_utf8_lossy(&body)
        );
        assert!(String::from_utf8_lossy(&body).contains("stickylb_build_info"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "20 scrapes beside {} trickling clients: slowest {slowest:?}",
        admin::MAX_CONNECTIONS
    );
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_a_large_exposition_do_not_block_other_scrapes() {
    let backend = Backend::start("a", Mode::Echo).await;
    // 1,000 targets (one backend under 1,000 ids): an exposition of about 2 MB.
    let targets: Vec<serde_json::Value> = (0..1000)
        .map(|i| serde_json::json!({"host": "127.0.0.1", "port": backend.addr.port(), "id": format!("target-{i:04}")}))
        .collect();
    let server = start(&[backend.addr], serde_json::json!({"targets": targets}));
    let admin = export(&server);
    let (status, full) = scrape(admin.local_addr()).await.unwrap();
    assert_eq!(status, 200);
    assert!(full.len() > 1_500_000, "{} bytes", full.len());

    // 17 clients ask and never read, with small receive buffers so the server's writes stall.
    let mut stalled = Vec::new();
    for _ in 0..17 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(admin.local_addr()).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        stalled.push(stream);
    }
    for _ in 0..10 {
        let (status, body) = scrape(admin.local_addr()).await.expect("a scrape");
        assert_eq!(status, 200);
        assert!(body.len() > 1_500_000, "the whole exposition");
        assert_eq!(body.last(), Some(&b'\n'));
    }
    drop(stalled);
}
