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
//! target runs in a separate process (this program again, see
//! `stickylb_testkit::backend_process`), so that this process holds only the client ends.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use stickylb_testkit::{
    backend_process, config_text, dead_port, env_or, offer, open_many,
    serve_backend_process_if_asked, Balancer, Mode, Sink,
};

const BIN: &str = env!("CARGO_BIN_EXE_stickylb");
const KIB: u64 = 1024;
/// A stream whose writes are not accepted for this long has stalled (see [`offer`]).
const STALLED: Duration = Duration::from_millis(200);

fn main() {
    serve_backend_process_if_asked();
    let hold: u64 = env_or("STICKYLB_MEMORY_HOLD_SECS", 60);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(Duration::from_secs(hold)));
}

/// Starts the balancer on `target` with `extra` config keys and RLIMIT_NOFILE `nofile`;
/// `None` when that limit cannot be set.
fn balancer(target: SocketAddr, extra: serde_json::Value, nofile: u64) -> Option<Balancer> {
    Balancer::try_launch(
        BIN,
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

async fn run(hold: Duration) {
    let echo_addr = dead_port();
    let _echo = backend_process("echo", Mode::Echo, echo_addr);

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
            let sink = Sink::start();
            let (target, what) = if target_reads {
                (echo_addr, "clients never read")
            } else {
                (sink.addr, "target never reads")
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
                let o1 = offer(&streams, caps[0], STALLED).await;
                let rss1 = settled_rss(&lb).await;
                let o2 = offer(&streams, caps[1], STALLED).await;
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
            drop(sink);
        }
    }
}
