//! The data path over real loopback TCP: byte-exact forwarding on both the splice and the copy
//! path, half-close, reset propagation, many concurrent connections.

use std::time::Duration;

use stickylb_testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: usize = 1024 * 1024;

/// Sends `len` bytes through the balancer to an echo backend while reading the echo, and
/// checks every byte of both directions.
async fn echo_transfer(zero_copy: bool, len: usize) {
    let backend = Backend::start("echo", Mode::Echo).await;
    let server = start(&[backend.addr], serde_json::json!({"zeroCopy": zero_copy}));
    let stream = connect_from(client_ip(1), server.local_addr())
        .await
        .unwrap();
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move { send_pattern(&mut w, 42, len).await });
    let got = tokio::time::timeout(Duration::from_secs(120), check_pattern(&mut r, 42, len))
        .await
        .expect("transfer finished")
        .expect("echo matches");
    writer.await.unwrap().unwrap();
    assert_eq!(got, len, "every byte came back");
    let target = &server.snapshot().targets[0];
    assert_eq!(target.bytes_to_target, len as u64);
    assert_eq!(target.bytes_to_client, len as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_64_mib_both_ways_byte_exact_with_splice() {
    let before = stickylb::spliced_bytes();
    echo_transfer(true, 64 * MIB).await;
    // Bulk moves through the kernel: nearly all of the 2 × 64 MiB went through splice (other
    // tests running at the same time can only add to the count).
    let spliced = stickylb::spliced_bytes() - before;
    assert!(
        spliced >= (2 * 64 * MIB as u64) * 9 / 10,
        "only {spliced} bytes spliced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_64_mib_both_ways_byte_exact_with_copy() {
    echo_transfer(false, 64 * MIB).await;
}

/// A target that reads the whole request until EOF, then sends a large reply and closes.
async fn reply_after_eof_backend(reply_len: usize) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let mut request = Vec::new();
        stream.read_to_end(&mut request).await.unwrap();
        assert_eq!(request, b"the whole request");
        send_pattern(&mut stream, 7, reply_len).await.unwrap();
    });
    addr
}

async fn half_close(zero_copy: bool) {
    let reply_len = 3 * MIB + 17;
    let target = reply_after_eof_backend(reply_len).await;
    let server = start(&[target], serde_json::json!({"zeroCopy": zero_copy}));
    let mut stream = connect_from(client_ip(2), server.local_addr())
        .await
        .unwrap();
    stream.write_all(b"the whole request").await.unwrap();
    // The client is done sending; the reply comes only after the target saw our EOF.
    stream.shutdown().await.unwrap();
    let got = tokio::time::timeout(PATIENCE, check_pattern(&mut stream, 7, reply_len))
        .await
        .expect("reply arrives")
        .expect("reply intact");
    assert_eq!(got, reply_len, "the reply after EOF arrived whole");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_passes_fin_and_the_reply_after_it_arrives_whole_with_splice() {
    half_close(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_passes_fin_and_the_reply_after_it_arrives_whole_with_copy() {
    half_close(false).await;
}

async fn target_reset(zero_copy: bool) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    let (sent_tx, sent_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        stream.write_all(&[1u8; 1000]).await.unwrap();
        // Wait until the client has read what we sent, then cut the stream abortively.
        let _ = sent_rx.await;
        socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(stream);
    });
    let server = start(&[target], serde_json::json!({"zeroCopy": zero_copy}));
    let mut stream = connect_from(client_ip(3), server.local_addr())
        .await
        .unwrap();
    let mut first = [0u8; 1000];
    stream.read_exact(&mut first).await.unwrap();
    sent_tx.send(()).unwrap();
    let mut rest = [0u8; 100];
    let outcome = tokio::time::timeout(PATIENCE, stream.read(&mut rest))
        .await
        .expect("the cut reaches the client");
    match outcome {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        Ok(n) => panic!("client saw a clean read of {n} bytes instead of a reset"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_reset_mid_stream_reaches_client_as_reset_with_splice() {
    target_reset(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_reset_mid_stream_reaches_client_as_reset_with_copy() {
    target_reset(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_reaches_target_as_reset() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    let server = start(&[target], serde_json::json!({}));
    let client = connect_from(client_ip(4), server.local_addr())
        .await
        .unwrap();
    let (mut upstream, _) = tokio::time::timeout(PATIENCE, listener.accept())
        .await
        .unwrap()
        .unwrap();
    socket2::SockRef::from(&client)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(client);
    let mut buf = [0u8; 16];
    let outcome = tokio::time::timeout(PATIENCE, upstream.read(&mut buf))
        .await
        .unwrap();
    assert_eq!(
        outcome.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "the target must not see a clean EOF"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_1000_concurrent_connections_from_1000_addresses() {
    const N: u32 = 1000;
    let backend = Backend::start("echo", Mode::Echo).await;
    let server = start(&[backend.addr], serde_json::json!({}));
    let lb = server.local_addr();
    // Open all connections first, so that all 1,000 are proxied at the same time.
    let mut streams = Vec::new();
    for i in 0..N {
        let mut s = connect_from(client_ip(100 + i), lb).await.unwrap();
        s.write_all(format!("hello {i}\n").as_bytes())
            .await
            .unwrap();
        streams.push(s);
    }
    let mut tasks = Vec::new();
    for (i, mut s) in streams.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let want = format!("hello {i}\n");
            let mut got = vec![0u8; want.len()];
            tokio::time::timeout(PATIENCE, s.read_exact(&mut got))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(got, want.as_bytes());
            s
        }));
    }
    let mut open = Vec::new();
    for t in tasks {
        open.push(t.await.unwrap());
    }
    assert_eq!(server.active(), u64::from(N), "all are open at once");
    drop(open);
    wait_drained(&server).await;
}

/// A target that accepts and never reads: the client's writes must stall once the kernel
/// buffers and one pipe (or buffer) are full, rather than the balancer buffering without end.
async fn backpressure(zero_copy: bool) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    let (accepted_tx, accepted_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        // Hold the connection without reading until the test ends.
        let _ = accepted_tx.send(stream);
        std::future::pending::<()>().await;
    });
    let server = start(&[target], serde_json::json!({"zeroCopy": zero_copy}));
    let mut client = connect_from(client_ip(5), server.local_addr())
        .await
        .unwrap();
    let _held = accepted_rx.await.unwrap();
    let chunk = vec![7u8; 64 * 1024];
    let mut written = 0usize;
    // Write until a write makes no progress for a second (bounded by 256 MiB).
    while written < 256 * MIB {
        match tokio::time::timeout(Duration::from_secs(1), client.write_all(&chunk)).await {
            Ok(result) => {
                result.unwrap();
                written += chunk.len();
            }
            Err(_) => break,
        }
    }
    assert!(
        written < 64 * MIB,
        "{written} bytes accepted from a client whose target reads nothing"
    );
    let forwarded = server.snapshot().targets[0].bytes_to_target;
    // What the balancer itself holds is what it read but has not delivered: at most one pipe
    // (256 KiB) or one copy buffer (16 KiB) per direction. The rest sits in the kernel's socket
    // buffers. (The bound on the balancer's own memory is asserted in tests/memory.rs.)
    eprintln!(
        "client wrote {written} bytes before stalling; {forwarded} reached the target's socket"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_does_not_read_stalls_the_client_with_splice() {
    backpressure(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_does_not_read_stalls_the_client_with_copy() {
    backpressure(false).await;
}
