//! What metrics cost a connection: the same short-connection load through a balancer with
//! metrics on (the `/metrics` endpoint started, scraped every second as Prometheus would) and off
//! (`metricsPort: null`), alternated on, off, off, on, ... so drift on a shared machine hits both
//! alike. Goal (issue 4): at most 3% apart in throughput and in CPU per connection.
//!
//! The balancer runs in this process (a tokio runtime with `BENCH_WORKERS` worker threads,
//! default 1); the clients and the echo backend run in a child process (this same binary with
//! `--load-generator`), so this process's CPU time (getrusage) is the balancer's alone, scrapes
//! included. Each connection comes from its own 127.x.y.z address, sends 32 bytes, reads the 32
//! echoed back, and closes. Each round starts a fresh balancer, so every round does the same work.
//!
//! Run: `cargo bench --bench metrics` (`BENCH_CONNS`, default 20000 per round; `BENCH_ROUNDS`,
//! default 4 per setting).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stickylb_testkit::{client_ip, dead_port, echo_once, env_or, start, Backend, Mode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Connections in flight at once.
const CONCURRENCY: u32 = 32;

fn main() {
    if std::env::args().any(|a| a == "--load-generator") {
        load_generator();
    } else {
        balancer();
    }
}

// ---------------------------------------------------------------------------------------------
// The balancer side (this process).

/// User + system CPU seconds of this process so far (all threads).
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

struct Round {
    metrics: bool,
    conns_per_s: f64,
    cpu_per_10k: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn balancer() {
    let conns: u32 = env_or("BENCH_CONNS", 20_000);
    let rounds: u32 = env_or("BENCH_ROUNDS", 4);
    let workers: usize = env_or("BENCH_WORKERS", 1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime");
    let _enter = runtime.enter();

    let exe = std::env::current_exe().expect("own path");
    let mut child = Command::new(exe)
        .arg("--load-generator")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("load generator");
    let mut to_child = child.stdin.take().unwrap();
    let mut from_child = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut read_line = move || {
        from_child
            .next()
            .expect("child line")
            .expect("child output")
    };
    let backend: SocketAddr = read_line()
        .strip_prefix("backend ")
        .and_then(|a| a.parse().ok())
        .expect("backend address");

    println!(
        "metrics on/off: {conns} connections per round, {rounds} rounds each, {CONCURRENCY} in \
         flight, balancer on {workers} worker thread(s)"
    );
    let mut run = |metrics: bool, count: u32| -> Round {
        let metrics_port = if metrics {
            serde_json::json!(dead_port().port())
        } else {
            serde_json::Value::Null
        };
        let server = start(
            &[backend],
            serde_json::json!({"metricsHost": "127.0.0.1", "metricsPort": metrics_port}),
        );
        let exporter =
            stickylb::admin::install(server.config().metrics, server.clone()).expect("metrics");
        let scrape = exporter
            .as_ref()
            .map(|e| e.local_addr().to_string())
            .unwrap_or_else(|| "-".into());

        let cpu = cpu_seconds();
        writeln!(to_child, "run {} {scrape} {count}", server.local_addr()).unwrap();
        to_child.flush().unwrap();
        let done = read_line();
        // The last handlers finish just after their clients: count them in.
        runtime.block_on(server.drain(Duration::from_secs(30)));
        let cpu = cpu_seconds() - cpu;
        let mut words = done.split(' ').skip(1);
        let secs: f64 = words.next().and_then(|w| w.parse().ok()).expect("secs");
        let failed: u64 = words.next().and_then(|w| w.parse().ok()).expect("failed");
        assert_eq!(failed, 0, "connections failed");
        runtime.block_on(server.shutdown());
        drop(exporter);
        Round {
            metrics,
            conns_per_s: f64::from(count) / secs,
            cpu_per_10k: cpu / f64::from(count) * 10_000.0,
        }
    };

    run(true, conns / 4); // warm-up: page cache, allocator, connection tables
    let mut results = Vec::new();
    for i in 0..rounds * 2 {
        // on, off, off, on, on, off, ...: each setting goes first as often as second.
        let metrics = (i % 4 == 0) || (i % 4 == 3);
        let r = run(metrics, conns);
        println!(
            "round {:>2}  metrics {:<3}  {:>8.0} conns/s  {:.3} CPU s per 10k conns",
            i + 1,
            if metrics { "on" } else { "off" },
            r.conns_per_s,
            r.cpu_per_10k
        );
        results.push(r);
    }
    let _ = writeln!(to_child, "quit");
    let _ = child.wait();

    let pick = |on: bool, f: fn(&Round) -> f64| {
        median(results.iter().filter(|r| r.metrics == on).map(f).collect())
    };
    let (on_rate, off_rate) = (
        pick(true, |r| r.conns_per_s),
        pick(false, |r| r.conns_per_s),
    );
    let (on_cpu, off_cpu) = (
        pick(true, |r| r.cpu_per_10k),
        pick(false, |r| r.cpu_per_10k),
    );
    println!("median of {rounds} rounds each:");
    println!("  metrics on : {on_rate:>8.0} conns/s  {on_cpu:.3} CPU s per 10k conns");
    println!("  metrics off: {off_rate:>8.0} conns/s  {off_cpu:.3} CPU s per 10k conns");
    println!(
        "  on/off: throughput {:.3}x, CPU per connection {:.3}x (goal: within 3%)",
        on_rate / off_rate,
        on_cpu / off_cpu
    );
}

// ---------------------------------------------------------------------------------------------
// The load generator (child process): echo backend, clients, scraper.

fn load_generator() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    // Kept to the end: dropping it closes its listener.
    let backend = runtime.block_on(Backend::start("echo", Mode::Echo));
    println!("backend {}", backend.addr);
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line.expect("command");
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            ["run", lb, scrape, count] => {
                let lb: SocketAddr = lb.parse().expect("lb address");
                let scrape: Option<SocketAddr> = scrape.parse().ok();
                let count: u32 = count.parse().expect("count");
                let (secs, failed) = runtime.block_on(drive(lb, scrape, count));
                println!("done {secs} {failed}");
            }
            _ => return,
        }
    }
}

/// Makes `count` short connections through `lb`, `CONCURRENCY` at a time, scraping `scrape`
/// every second meanwhile. Returns the seconds taken and the connections that failed.
async fn drive(lb: SocketAddr, scrape: Option<SocketAddr>, count: u32) -> (f64, u64) {
    let next = Arc::new(AtomicU32::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let scraper = scrape.map(|addr| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let _ = get_metrics(addr).await;
            }
        })
    });
    let started = Instant::now();
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (next, failed) = (next.clone(), failed.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= count {
                        return;
                    }
                    if echo_once(client_ip(n), lb).await.is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.await;
    }
    let secs = started.elapsed().as_secs_f64();
    if let Some(scraper) = scraper {
        scraper.abort();
    }
    (secs, failed.load(Ordering::Relaxed))
}

async fn get_metrics(addr: SocketAddr) -> std::io::Result<usize> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await?;
    let mut body = Vec::new();
    stream.read_to_end(&mut body).await
}
