//! The admin endpoint under abuse, timed (issue 11, must-have 5). Two goals:
//!
//! 1. **Slowloris**: with 64 clients trickling request heads (one byte every 100 ms, each
//!    reconnecting when dropped), a normal scrape answers within 1 s. Reported: the latency of
//!    50 sequential scrapes, 300 ms apart (p50, p99, max), and how many were answered `200`.
//! 2. **Scrapes do not slow the data path**: with 1,000 targets (an exposition of about 2 MB)
//!    and 8 scrapers looping on `/metrics`, a proxied echo's p50 stays within 1.5 × of its p50
//!    without scraping. Rounds alternate off, on, on, off, ... so drift on a shared machine
//!    hits both alike; reported: p50 and p99 of each setting (all rounds pooled) and the ratio.
//!
//! The balancer is the release `stickylb` binary in a child process (its own runtime, its admin
//! thread at nice 10, as deployed); this process runs the echo target, the echo clients (each
//! echo a new connection from its own 127.x.y.z address: 32 bytes each way, then close; 4 in
//! flight) and the trickling clients. The looping scrapers run in a process of their own (this
//! binary with `--scrape`) at nice `BENCH_SCRAPER_NICE` (default 19), standing in for a
//! Prometheus on another host: on a 2-core machine, scrapers reading 2 MB each as fast as they
//! can at nice 0 would take a core from the echo clients and the balancer alike, which
//! measures the machine, not the balancer. Each round reports the CPU the balancer's admin
//! thread and worker threads used, and the scrapers' own.
//!
//! Run: `cargo bench --bench admin` (`BENCH_SECS` per round, default 5; `BENCH_ROUNDS` per
//! setting, default 2; `BENCH_TARGETS`, default 1000; `BENCH_SCRAPERS`, default 8;
//! `BENCH_SCRAPER_NICE`, default 19).

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_stickylb");

use stickylb_testkit::{
    client_ip, dead_port, echo_once, env_or, slowloris, Backend, Balancer, Mode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Echo clients in flight at once.
const ECHO_CONCURRENCY: usize = 4;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--scrape") {
        let addr = args[i + 1].parse().expect("metrics address");
        let count = args[i + 2].parse().expect("scrapers");
        return scraper_process(addr, count);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(bench());
}

async fn bench() {
    let secs = env_or("BENCH_SECS", 5);
    let rounds = env_or("BENCH_ROUNDS", 2);
    let targets = env_or("BENCH_TARGETS", 1000);
    let scrapers = env_or("BENCH_SCRAPERS", 8) as usize;
    let backend = Backend::start("echo", Mode::Echo).await;
    let metrics_port = dead_port().port();
    let config = serde_json::json!({
        "sourceHost": "127.0.0.1",
        "sourcePort": 1,
        "metricsHost": "127.0.0.1",
        "metricsPort": metrics_port,
        "targets": (0..targets)
            .map(|i| serde_json::json!({
                "host": "127.0.0.1",
                "port": backend.addr.port(),
                "id": format!("target-{i:04}"),
            }))
            .collect::<Vec<_>>(),
    });
    let lb = Balancer::launch(BIN, "bench-admin", &["--no-watch"], config, None);
    let metrics = SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let exposition = scrape(metrics).await.expect("a first scrape");
    println!(
        "stickylb {} ({targets} targets, exposition {} bytes), this process: echo target, \
         clients, scrapers",
        BIN, exposition.1
    );

    slowloris_round(metrics).await;

    println!(
        "\nproxied echo (a new connection each, {ECHO_CONCURRENCY} in flight), {secs} s per round, \
         rounds off/on alternating, {scrapers} looping scrapers when on:"
    );
    let mut off = Vec::new();
    let mut on = Vec::new();
    let next_ip = Arc::new(AtomicU32::new(0));
    for i in 0..rounds * 2 {
        // off, on, on, off, off, on, ...: each setting goes first as often as second.
        let scraping = i % 4 == 1 || i % 4 == 2;
        let cpu = ThreadCpu::of(lb.pid());
        let started = Instant::now();
        let (latencies, scraped) = echo_round(
            lb.addr,
            metrics,
            if scraping { scrapers } else { 0 },
            Duration::from_secs(secs),
            &next_ip,
        )
        .await;
        let used = ThreadCpu::of(lb.pid()).since(&cpu, started.elapsed());
        println!(
            "  round {:>2}  scraping {:<3}  {:>6} echoes  p50 {:>7.3} ms  p99 {:>7.3} ms  \
             stickylb CPU: admin {:>4.0} %, workers {:>4.0} %{}",
            i + 1,
            if scraping { "on" } else { "off" },
            latencies.len(),
            ms(percentile(&latencies, 0.50)),
            ms(percentile(&latencies, 0.99)),
            used.admin * 100.0,
            used.workers * 100.0,
            match scraped {
                Some((scrapes, cpu)) => format!(
                    "; {scrapes} scrapes, scrapers' CPU {:.0} %",
                    cpu / started.elapsed().as_secs_f64() * 100.0
                ),
                None => String::new(),
            }
        );
        if scraping {
            on.extend(latencies);
        } else {
            off.extend(latencies);
        }
    }
    let (p50_off, p50_on) = (percentile(&off, 0.50), percentile(&on, 0.50));
    println!("all rounds pooled:");
    println!(
        "  scraping off: p50 {:.3} ms, p99 {:.3} ms ({} echoes)",
        ms(p50_off),
        ms(percentile(&off, 0.99)),
        off.len()
    );
    println!(
        "  scraping on : p50 {:.3} ms, p99 {:.3} ms ({} echoes)",
        ms(p50_on),
        ms(percentile(&on, 0.99)),
        on.len()
    );
    println!(
        "  on/off p50: {:.2}x (goal: at most 1.5x)",
        p50_on.as_secs_f64() / p50_off.as_secs_f64()
    );
    drop(lb);
}

/// Goal 1: scrapes beside 64 trickling clients.
async fn slowloris_round(metrics: SocketAddr) {
    const TRICKLERS: usize = 64;
    let open = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = slowloris(
        metrics,
        TRICKLERS,
        Duration::from_millis(100),
        open.clone(),
        stop.clone(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while open.load(Ordering::Relaxed) < TRICKLERS && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let them trickle for a while, so some are old and some are new.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut latencies = Vec::new();
    let mut answered = 0;
    // Spaced by more than RENDER_INTERVAL, so that no scrape waits for the next render: the
    // latency is the endpoint's answer beside the trickling clients, nothing else.
    let count = 50;
    for _ in 0..count {
        let started = Instant::now();
        if let Ok(Ok((200, _))) =
            tokio::time::timeout(Duration::from_secs(30), scrape(metrics)).await
        {
            answered += 1;
        }
        latencies.push(started.elapsed());
        tokio::time::sleep(stickylb::admin::RENDER_INTERVAL + Duration::from_millis(50)).await;
    }
    let trickling = open.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    println!(
        "\n{count} scrapes beside {TRICKLERS} trickling clients ({trickling} connected at the \
         end): {answered} answered 200; p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms (goal: within \
         1 s)",
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
        ms(latencies.iter().copied().max().unwrap_or_default())
    );
}

/// Goal 2, one round: echoes for `length`, with `scrapers` looping on `/metrics` meanwhile (in
/// a process of their own). Returns the echo latencies and, when scraping, the number of
/// scrapes done and the scrapers' CPU seconds.
async fn echo_round(
    lb: SocketAddr,
    metrics: SocketAddr,
    scrapers: usize,
    length: Duration,
    next_ip: &Arc<AtomicU32>,
) -> (Vec<Duration>, Option<(u64, f64)>) {
    let scraping = (scrapers > 0).then(|| {
        Command::new(std::env::current_exe().expect("own path"))
            .args(["--scrape", &metrics.to_string(), &scrapers.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("scraper process")
    });
    // Let the scrapers get going before measuring.
    if scraping.is_some() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let until = Instant::now() + length;
    let clients: Vec<_> = (0..ECHO_CONCURRENCY)
        .map(|_| {
            let (latencies, next_ip) = (latencies.clone(), next_ip.clone());
            tokio::spawn(async move {
                let mut mine = Vec::new();
                while Instant::now() < until {
                    let ip = client_ip(next_ip.fetch_add(1, Ordering::Relaxed) % 1_000_000);
                    let started = Instant::now();
                    if echo_once(ip, lb).await.is_ok() {
                        mine.push(started.elapsed());
                    }
                }
                latencies.lock().expect("latencies").extend(mine);
            })
        })
        .collect();
    for client in clients {
        let _ = client.await;
    }
    // Closing its stdin stops the scraper process, which then prints what it did.
    let scraped = scraping.map(|mut child| {
        drop(child.stdin.take());
        let out = child.wait_with_output().expect("scraper output");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        let scrapes = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
        let cpu = words.next().and_then(|w| w.parse().ok()).unwrap_or(0.0);
        (scrapes, cpu)
    });
    let latencies = std::mem::take(&mut *latencies.lock().expect("latencies"));
    (latencies, scraped)
}

/// The scrapers' process: `count` tasks loop on `GET /metrics` until stdin closes, then it
/// prints the scrapes done and its CPU seconds.
fn scraper_process(metrics: SocketAddr, count: usize) {
    let nice = env_or("BENCH_SCRAPER_NICE", 19) as i32;
    // SAFETY: setpriority on this (the main) thread, before any other thread exists: the
    // runtime's threads inherit the value.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let stop = Arc::new(AtomicBool::new(false));
    let scrapes = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..count)
        .map(|_| {
            let (stop, scrapes) = (stop.clone(), scrapes.clone());
            runtime.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if scrape(metrics).await.is_ok() {
                        scrapes.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
    stop.store(true, Ordering::Relaxed);
    runtime.block_on(async {
        for task in tasks {
            let _ = task.await;
        }
    });
    // SAFETY: getrusage writes into the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    println!(
        "{} {}",
        scrapes.load(Ordering::Relaxed),
        tv(usage.ru_utime) + tv(usage.ru_stime)
    );
}

/// CPU time of the balancer's threads, by kind: its admin thread and its worker threads (from
/// /proc/PID/task/*/stat and comm).
struct ThreadCpu {
    admin: f64,
    workers: f64,
}

impl ThreadCpu {
    /// Seconds used so far.
    fn of(pid: u32) -> ThreadCpu {
        let mut cpu = ThreadCpu {
            admin: 0.0,
            workers: 0.0,
        };
        let hz = stickylb_testkit::child::ticks_per_second() as f64;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return cpu;
        };
        for task in tasks.flatten() {
            let path = task.path();
            let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
                continue;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let ticks: u64 = fields
                .get(11..13)
                .map(|f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
                .unwrap_or(0);
            let seconds = ticks as f64 / hz;
            if comm.starts_with("stickylb-admin") {
                cpu.admin += seconds;
            } else if comm.starts_with("stickylb-worke") {
                cpu.workers += seconds;
            }
        }
        cpu
    }

    /// The share of one core used since `before`, over `elapsed`.
    fn since(&self, before: &ThreadCpu, elapsed: Duration) -> ThreadCpu {
        let secs = elapsed.as_secs_f64();
        ThreadCpu {
            admin: (self.admin - before.admin) / secs,
            workers: (self.workers - before.workers) / secs,
        }
    }
}

/// `GET /metrics`, read to the end: the status code and the size of the response.
async fn scrape(addr: SocketAddr) -> std::io::Result<(u16, usize)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let status = response
        .get(9..12)
        .and_then(|s| std::str::from_utf8(s).ok()?.parse().ok())
        .unwrap_or(0);
    Ok((status, response.len()))
}

fn percentile(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
