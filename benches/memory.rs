//! Memory bounds at full size (issue 6; the moderate version runs in CI as tests/memory.rs):
//! the release binary's RSS (VmRSS of /proc/PID/status) with 10,000 idle connections, over
//! time, and with connections whose bytes back up (clients that never read, a target that
//! never reads) in both data paths (splice and userspace copy).
//!
//! ```sh
//! cargo bench --bench memory
//! STICKYLB_MEMORY_HOLD_SECS=10 cargo bench --bench memory   # shorter idle hold (default 60)
//! ```
//!
//! Descriptors: the balancer holds 2 per proxied connection, so 10,000 connections need more
//! than the usual hard limit of 20,000; the balancer is started with RLIMIT_NOFILE 24,000
//! (raising a hard limit needs CAP_SYS_RESOURCE; without it the run uses 9,900). The echo
//! target runs in a separate process (this program in the target role), so that this process
//! holds only the client ends.

#[path = "../tests/child/mod.rs"]
mod child;
#[path = "../tests/support/mod.rs"]
mod support;

use std::future::Future;
use std::io::{BufRead, BufReader as StdBufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use child::Balancer;
use support::{client_ip, config_text, connect_from, dead_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

const KIB: u64 = 1024;

fn main() {
    if std::env::var("STICKYLB_MEMORY_ROLE").as_deref() == Ok("echo") {
        return echo_role();
    }
    let hold: u64 = std::env::var("STICKYLB_MEMORY_HOLD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(Duration::from_secs(hold)));
}

/// The target role: an echo server on `STICKYLB_MEMORY_PORT`; prints "ready" once listening.
fn echo_role() {
    let port: u16 = std::env::var("STICKYLB_MEMORY_PORT")
        .expect("port")
        .parse()
        .expect("port");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .expect("bind");
        println!("ready");
        let _ = std::io::stdout().flush();
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
}

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn echo_target() -> (Process, SocketAddr) {
    let addr = dead_port();
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .env("STICKYLB_MEMORY_ROLE", "echo")
        .env("STICKYLB_MEMORY_PORT", addr.port().to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn echo");
    let mut line = String::new();
    StdBufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready");
    (Process(child), addr)
}

/// Starts the balancer on `target` with `extra` config keys and RLIMIT_NOFILE `nofile`;
/// `None` when that limit cannot be set.
fn balancer(target: SocketAddr, extra: serde_json::Value, nofile: u64) -> Option<Balancer> {
    Balancer::try_launch(
        "memory-bench",
        &[],
        serde_json::from_str(&config_text(&[target], extra)).expect("json"),
        Some(nofile),
    )
    .ok()
}

/// RSS in KiB once it has stopped moving (readings 200 ms apart).
async fn settled_rss(lb: &Balancer) -> u64 {
    lb.settled_rss_kib(Duration::from_millis(200)).await
}

/// Fails the run if the balancer logged a panic.
fn no_panic(lb: &Balancer) {
    assert_eq!(lb.count_lines("panicked"), 0, "{}", lb.lines().join("\n"));
}

/// Opens connections from addresses `first..first + n`, 64 at a time, each checked with an
/// echoed line (`echo`) or not.
async fn open_many(lb: SocketAddr, first: u32, n: u32, echo: bool) -> Vec<TcpStream> {
    let gate = Arc::new(Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for i in first..first + n {
        let gate = gate.clone();
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("semaphore");
            let mut s = connect_from(client_ip(i), lb).await.expect("connect");
            if echo {
                s.write_all(b"ping\n").await.expect("write");
                let mut buf = [0u8; 5];
                tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut buf))
                    .await
                    .expect("echo in time")
                    .expect("echo");
            }
            s
        });
    }
    let mut streams = Vec::with_capacity(n as usize);
    while let Some(s) = tasks.join_next().await {
        streams.push(s.expect("task"));
    }
    streams
}

async fn offer_one(s: &TcpStream, cap: usize, offered: &AtomicUsize) {
    let chunk = [0x5au8; 16 * 1024];
    let mut sent = 0;
    while sent < cap {
        match tokio::time::timeout(Duration::from_millis(200), s.writable()).await {
            Ok(Ok(())) => {}
            _ => break,
        }
        match s.try_write(&chunk[..chunk.len().min(cap - sent)]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => break,
        }
    }
    offered.fetch_add(sent, Ordering::Relaxed);
}

async fn offer(streams: &[TcpStream], cap: usize) -> u64 {
    let offered = AtomicUsize::new(0);
    let mut futures: Vec<_> = streams
        .iter()
        .map(|s| Box::pin(offer_one(s, cap, &offered)))
        .collect();
    std::future::poll_fn(|cx| {
        futures.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if futures.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    offered.load(Ordering::Relaxed) as u64
}

/// A target that accepts and never reads; its connections close when the task is aborted.
async fn sink() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    // A backlog for a burst of 1,000 connects (past a full one the kernel falls back to SYN
    // cookies and may drop connections the balancer believes open).
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let listener = socket.listen(4096).expect("listen");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        for _ in 0..100_000 {
            if let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        }
    });
    (addr, task)
}

async fn run(hold: Duration) {
    let (_echo, echo_addr) = echo_target();

    // 1. 10,000 idle connections: 20,000 descriptors and a few more, so the balancer needs a
    // hard limit above 20,000. Raising it takes CAP_SYS_RESOURCE; without it, 9,900
    // connections fit under 20,000 (with the pipe pool's 64 and the ~15 of the process itself).
    let (mut n, nofile) = (10_000u32, 24_000u64);
    let extra = serde_json::json!({"maxConnections": 10_000});
    let lb = match balancer(echo_addr, extra.clone(), nofile) {
        Some(b) => b,
        None => {
            n = 9_900;
            println!(
                "cannot raise RLIMIT_NOFILE to {nofile} (no CAP_SYS_RESOURCE): {n} connections \
                 under the hard limit of 20,000"
            );
            balancer(echo_addr, extra, 20_000).expect("balancer")
        }
    };
    let addr = lb.addr;
    drop(open_many(addr, 60_000, 256, true).await);
    let rss0 = settled_rss(&lb).await;
    println!("idle: RSS {rss0} KiB after warm-up (256 connections opened and closed)");
    let mut streams = Vec::new();
    let steps = 4;
    let started = Instant::now();
    for step in 0..steps {
        let first = step * n / steps;
        streams.extend(open_many(addr, first, n / steps, true).await);
        let rss = settled_rss(&lb).await;
        println!(
            "idle: {:>6} connections: RSS {rss} KiB, {} bytes per connection",
            streams.len(),
            (rss - rss0) * KIB / streams.len() as u64
        );
    }
    let opened = started.elapsed();
    let rss_full = settled_rss(&lb).await;
    let mut rss_max = rss_full;
    let held_since = Instant::now();
    while held_since.elapsed() < hold {
        tokio::time::sleep(Duration::from_secs(10).min(hold)).await;
        let rss = lb.rss_kib();
        rss_max = rss_max.max(rss);
        println!(
            "idle: {} connections held {:>3} s: RSS {rss} KiB",
            streams.len(),
            held_since.elapsed().as_secs()
        );
    }
    // Still serving with all of them open.
    let probe = open_many(addr, 70_000, 16, true).await;
    drop(probe);
    let count = streams.len();
    drop(streams);
    let rss_closed = settled_rss(&lb).await;
    println!(
        "idle: {count} connections opened in {:.1} s; RSS {rss0} KiB before, {rss_full} KiB \
         with them ({} bytes each), max {rss_max} KiB over {} s held, {rss_closed} KiB after \
         they closed",
        opened.as_secs_f64(),
        (rss_full - rss0) * KIB / count as u64,
        hold.as_secs()
    );
    no_panic(&lb);
    drop(lb);

    // 2. Backed-up connections, both data paths.
    for zero_copy in [true, false] {
        let mode = if zero_copy { "splice" } else { "copy" };
        for target_reads in [true, false] {
            let (sink_addr, sink_task) = sink().await;
            let (target, what) = if target_reads {
                (echo_addr, "clients never read")
            } else {
                (sink_addr, "target never reads")
            };
            for (clients, caps) in [
                (1_000u32, [256 * 1024usize, 256 * 1024]),
                (32, [256 * 1024, 64 * 1024 * 1024]),
            ] {
                let lb = balancer(target, serde_json::json!({"zeroCopy": zero_copy}), 20_000)
                    .expect("balancer");
                let addr = lb.addr;
                let streams = open_many(addr, 80_000, clients, target_reads).await;
                if !target_reads {
                    // Let the balancer connect them all to the sink.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                for s in &streams {
                    let _ = socket2::SockRef::from(s).set_recv_buffer_size(16 * 1024);
                }
                let rss0 = settled_rss(&lb).await;
                let o1 = offer(&streams, caps[0]).await;
                let rss1 = settled_rss(&lb).await;
                let o2 = offer(&streams, caps[1]).await;
                let rss2 = settled_rss(&lb).await;
                println!(
                    "{what}, {mode}: {clients} connections: RSS {rss0} KiB, {rss1} KiB after \
                     {} MiB offered, {rss2} KiB after {} MiB more: {} bytes per connection",
                    o1 >> 20,
                    o2 >> 20,
                    rss2.saturating_sub(rss0) * KIB / u64::from(clients)
                );
                drop(streams);
                no_panic(&lb);
                drop(lb);
            }
            sink_task.abort();
        }
    }
}
