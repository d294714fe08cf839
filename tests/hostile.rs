//! Hostile peers (design §8, issue 6): random bytes, immediate resets, resets in the middle of
//! a transfer, half-open and silent connections, from many client addresses, while normal
//! traffic from other addresses checks every byte it gets back; and targets that reset, close
//! at once or answer with garbage, next to one that works.
//!
//! "No panic from any peer" is checked, not assumed: a panic in a spawned connection task does
//! not fail a test by itself (tokio catches it), so a panic hook counts every panic raised
//! outside this file's own code, and each test asserts that none happened.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use stickylb_testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Panics raised anywhere but in this test file (the library, or a dependency it misused).
static FOREIGN_PANICS: AtomicUsize = AtomicUsize::new(0);
static FOREIGN_PANIC_TEXT: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn count_foreign_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let file = info.location().map(|l| l.file()).unwrap_or("");
            if !file.starts_with("tests/") {
                FOREIGN_PANICS.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut text) = FOREIGN_PANIC_TEXT.lock() {
                    text.push(info.to_string());
                }
            }
            default(info);
        }));
    });
}

fn assert_no_foreign_panic() {
    let text = FOREIGN_PANIC_TEXT
        .lock()
        .map(|t| t.clone())
        .unwrap_or_default();
    assert_eq!(
        FOREIGN_PANICS.load(Ordering::Relaxed),
        0,
        "panics outside the tests: {text:?}"
    );
}

/// Makes the close of `stream` a reset (SO_LINGER 0), as a crashing peer's would be.
fn abort_on_drop(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// What one hostile client does.
#[derive(Debug, Clone, Copy)]
enum Hostile {
    /// Random bytes of a random length, then a close without reading the echo (the unread
    /// echo makes the close a reset on the client side).
    RandomThenClose,
    /// Connect, then reset at once (SO_LINGER 0).
    ResetAtOnce,
    /// A large write, reset in the middle of it: bytes are in flight in a pipe or buffer.
    ResetMidTransfer,
    /// Connect, shut the write side, hold the connection until the end.
    HalfClosed,
    /// Connect and never send anything; hold the connection until the end.
    Silent,
}

const KINDS: [Hostile; 5] = [
    Hostile::RandomThenClose,
    Hostile::ResetAtOnce,
    Hostile::ResetMidTransfer,
    Hostile::HalfClosed,
    Hostile::Silent,
];

/// Runs one hostile client; returns the connection if it is to be held until the end.
async fn hostile(
    kind: Hostile,
    ip: std::net::Ipv4Addr,
    lb: SocketAddr,
    seed: u64,
) -> Option<TcpStream> {
    let mut rng = Rng::new(seed);
    let mut stream = connect_from(ip, lb).await.ok()?;
    match kind {
        Hostile::RandomThenClose => {
            let mut bytes = vec![0u8; rng.below(32 * 1024) as usize + 1];
            Pattern::new(rng.next_u64()).fill(&mut bytes);
            let _ = stream.write_all(&bytes).await;
            // Read a little of the echo, or nothing, then go.
            if rng.below(2) == 0 {
                let mut buf = [0u8; 512];
                let _ =
                    tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await;
            }
            None
        }
        Hostile::ResetAtOnce => {
            abort_on_drop(&stream);
            None
        }
        Hostile::ResetMidTransfer => {
            let mut chunk = vec![0u8; 64 * 1024];
            Pattern::new(rng.next_u64()).fill(&mut chunk);
            for _ in 0..rng.below(16) + 1 {
                if stream.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            abort_on_drop(&stream);
            None
        }
        Hostile::HalfClosed => {
            let _ = stream.shutdown().await;
            Some(stream)
        }
        Hostile::Silent => Some(stream),
    }
}

/// 2,000 hostile connections (random bytes, resets, resets mid-transfer, half-closed, silent)
/// from 2,000 addresses, 64 at a time, while 64 normal clients from other addresses each send
/// 256 KiB and check every byte of the echo. Afterwards nothing is left open and no panic
/// happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_do_not_disturb_byte_exact_traffic_from_others() {
    hostile_clients_next_to_normal_ones(true).await;
}

/// The same over the userspace copy path (`zeroCopy: false`, also the fallback when no
/// descriptor is left for a pipe).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_do_not_disturb_byte_exact_traffic_from_others_over_copy() {
    hostile_clients_next_to_normal_ones(false).await;
}

async fn hostile_clients_next_to_normal_ones(zero_copy: bool) {
    count_foreign_panics();
    let a = Backend::start("a", Mode::Echo).await;
    let b = Backend::start("b", Mode::Echo).await;
    let server = start(
        &[a.addr, b.addr],
        serde_json::json!({"zeroCopy": zero_copy}),
    );
    let lb = server.local_addr();

    const HOSTILE: u32 = 2_000;
    const NORMAL: u32 = 64;
    const NORMAL_LEN: usize = 256 * 1024;
    let held = Arc::new(Mutex::new(Vec::new()));
    let gate = Arc::new(Semaphore::new(64));
    let mut hostile_tasks = JoinSet::new();
    for i in 0..HOSTILE {
        let (held, gate) = (held.clone(), gate.clone());
        hostile_tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("semaphore");
            let kind = KINDS[i as usize % KINDS.len()];
            let seed = 0x9e37_79b9_7f4a_7c15_u64.wrapping_mul(u64::from(i) + 1);
            if let Some(stream) = hostile(kind, client_ip(10_000 + i), lb, seed).await {
                held.lock().expect("held").push((kind, stream));
            }
        });
    }
    let mut normal_tasks = JoinSet::new();
    for i in 0..NORMAL {
        normal_tasks.spawn(async move {
            let stream = connect_from(client_ip(i), lb).await.expect("connect");
            echo_exact(stream, 1000 + u64::from(i), NORMAL_LEN).await
        });
    }
    let mut verified = 0usize;
    while let Some(got) = normal_tasks.join_next().await {
        verified += got.expect("normal client");
    }
    assert_eq!(
        verified,
        NORMAL as usize * NORMAL_LEN,
        "every byte came back"
    );
    tokio::time::timeout(PATIENCE, async {
        while let Some(done) = hostile_tasks.join_next().await {
            done.expect("hostile client task");
        }
    })
    .await
    .expect("hostile clients finish");

    let mut held = std::mem::take(&mut *held.lock().expect("held"));
    assert_eq!(
        held.len(),
        2 * HOSTILE as usize / KINDS.len(),
        "half-closed and silent are held"
    );
    // The half-closed ones got their FIN passed on: the echo target saw it, closed its side,
    // and that EOF came back.
    for (kind, stream) in &mut held {
        if let Hostile::HalfClosed = kind {
            let mut buf = [0u8; 16];
            let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
                .await
                .expect("the EOF came back")
                .expect("a clean EOF");
            assert_eq!(n, 0);
        }
    }
    // Still serving, with the silent ones open.
    let stream = connect_from(client_ip(NORMAL), lb).await.expect("connect");
    assert_eq!(echo_exact(stream, 7, 4096).await, 4096);
    for (_, stream) in &mut held {
        let _ = stream.shutdown().await;
    }
    drop(held);
    wait_drained(&server).await;
    assert!(
        server.snapshot().accepted >= u64::from(HOSTILE + NORMAL),
        "every connection was accepted"
    );
    assert_no_foreign_panic();
}

/// What one hostile target does with each connection it accepts.
#[derive(Debug, Clone, Copy)]
enum BadTarget {
    /// Accepts and resets at once.
    Reset,
    /// Accepts and closes at once (a clean FIN, no byte).
    Close,
    /// Answers with random bytes, then resets.
    Garbage,
}

async fn bad_target(kind: BadTarget) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            n += 1;
            match kind {
                BadTarget::Reset => abort_on_drop(&stream),
                BadTarget::Close => {}
                BadTarget::Garbage => {
                    let mut bytes = vec![0u8; 4096];
                    Pattern::new(n).fill(&mut bytes);
                    let _ = stream.write_all(&bytes).await;
                    abort_on_drop(&stream);
                }
            }
        }
    });
    addr
}

/// Targets that reset, close or answer garbage as soon as they accept: clients that land on
/// them are cut (a reset or an EOF, never a hang), clients on the working target get every
/// byte, and nothing panics or leaks. (These targets complete the connect, so they are not
/// deactivated: a reset in the middle of a stream is the target's business, design §3.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_that_reset_close_or_send_garbage_cut_only_their_own_clients() {
    count_foreign_panics();
    let echo = Backend::start("echo", Mode::Echo).await;
    let reset = bad_target(BadTarget::Reset).await;
    let close = bad_target(BadTarget::Close).await;
    let garbage = bad_target(BadTarget::Garbage).await;
    let server = start(&[echo.addr, reset, close, garbage], serde_json::json!({}));
    let lb = server.local_addr();

    let mut tasks = JoinSet::new();
    for i in 0..200u32 {
        tasks.spawn(async move {
            let ip = client_ip(20_000 + i);
            let stream = match connect_from(ip, lb).await {
                Ok(stream) => stream,
                // The balancer completed the handshake, then passed on a bad target's reset
                // before this task looked at its socket: the kernel reports that as the
                // connect's error. That client was cut, like the others on bad targets.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (0, 1),
                Err(e) => panic!("connect to the balancer from {ip}: {e}"),
            };
            let (mut r, mut w) = stream.into_split();
            let len = 64 * 1024;
            let seed = u64::from(i) + 1;
            let writer = tokio::spawn(async move { send_pattern(&mut w, seed, len).await });
            let got = tokio::time::timeout(PATIENCE, check_pattern(&mut r, seed, len))
                .await
                .expect("an answer, an EOF or a reset: never a hang");
            let _ = writer.await;
            match got {
                Ok(n) if n == len => (1, 0),
                // Cut by a bad target: an EOF before the end, a reset, or its garbage.
                _ => (0, 1),
            }
        });
    }
    let (mut whole, mut cut) = (0, 0);
    while let Some(result) = tasks.join_next().await {
        let (w, c) = result.expect("client task");
        whole += w;
        cut += c;
    }
    assert_eq!(whole + cut, 200);
    assert_eq!(
        whole,
        echo.accepted(),
        "every client the echo target accepted got every byte back"
    );
    assert!(
        whole > 0 && cut > 0,
        "both kinds were exercised: {whole} whole, {cut} cut"
    );
    wait_drained(&server).await;
    assert_no_foreign_panic();
}
