//! Reload under load: 100 config-file edits while clients connect continuously.
//!
//! Reports the connections made and failed during the run (goal: 0 failed) and the delay from
//! each file write to the first connection that reached a target of the new config (median,
//! p99, max). The delay includes the watcher's debounce (`reload::QUIET`, 100 ms): the file is
//! read once the directory has been quiet that long.
//!
//! Run: `cargo bench --bench reload`

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stickylb::reload::Reloader;
use stickylb_testkit::{client_ip, config_text, connect_from, start_from_file, TempDir};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const RELOADS: usize = 100;
const CLIENTS: u32 = 4;

/// A backend that answers each connection with its set number (0 or 1) and closes.
async fn backend(set: u8) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            if let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = s.write_all(&[b'0' + set, b'\n']).await;
                });
            }
        }
    });
    addr
}

/// The bench's config: `targets`, with sessions off so that each connection follows the hash
/// of the config in force.
fn config_for(targets: &[SocketAddr]) -> String {
    config_text(targets, serde_json::json!({"sessionExpiry": 0}))
}

async fn one_connection(ip: Ipv4Addr, lb: SocketAddr) -> std::io::Result<u8> {
    let stream = connect_from(ip, lb).await?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).await?;
    match line.as_bytes().first() {
        Some(b'0') => Ok(0),
        Some(b'1') => Ok(1),
        _ => Err(std::io::Error::other("no answer")),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let sets = [
        vec![backend(0).await, backend(0).await],
        vec![backend(1).await, backend(1).await],
    ];
    let dir = TempDir::new("reload-bench");
    let path = dir.file("config.json", &config_for(&sets[0]));
    let server = start_from_file(&path, false);
    let lb = server.local_addr();
    let _watcher = Reloader::new(server.clone()).watch().unwrap();

    let done = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(Instant, u8)>();
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (done, made, failed, seen) =
            (done.clone(), made.clone(), failed.clone(), seen_tx.clone());
        clients.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !done.load(Ordering::Relaxed) {
                let ip = client_ip(c * 200_000 + n % 200_000);
                n += 1;
                match one_connection(ip, lb).await {
                    Ok(set) => {
                        made.fetch_add(1, Ordering::Relaxed);
                        let _ = seen.send((Instant::now(), set));
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    let mut delays = Vec::with_capacity(RELOADS);
    let started = Instant::now();
    for i in 0..RELOADS {
        let new_set = ((i + 1) % 2) as u8;
        let written = Instant::now();
        std::fs::write(&path, config_for(&sets[new_set as usize])).unwrap();
        // The first connection at or after the write that reached the new set.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, seen_rx.recv()).await {
                Ok(Some((at, set))) if at >= written && set == new_set => {
                    delays.push(at - written);
                    break;
                }
                Ok(Some(_)) => continue,
                _ => panic!("reload {i} not seen within 10 s"),
            }
        }
        // Let the load run on the new config for a moment before the next edit.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    let elapsed = started.elapsed();

    delays.sort();
    let stats = server.snapshot();
    println!("reload under load: {RELOADS} file edits, {CLIENTS} clients connecting continuously");
    println!(
        "  connections made     {} ({:.0}/s)",
        made.load(Ordering::Relaxed),
        made.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64()
    );
    println!("  connections failed   {}", failed.load(Ordering::Relaxed));
    println!(
        "  reloads applied      {} ok, {} failed",
        stats.reloads_success, stats.reloads_failure
    );
    println!(
        "  write -> first new-config connection: median {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&delays, 0.5).as_secs_f64() * 1e3,
        percentile(&delays, 0.99).as_secs_f64() * 1e3,
        delays.last().unwrap().as_secs_f64() * 1e3
    );
}
