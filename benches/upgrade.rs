//! Upgrades under load at full scale (issue 15): the figures of docs/operations.md, "Upgrades".
//! The scenario is `stickylb_testkit::upgrade`, the same that `tests/upgrade.rs` asserts on at
//! a small scale.
//!
//! 1. Under load: 200 long-lived connections streaming both ways (4 KiB each way every 20 ms,
//!    every byte checked), 50 idle ones, 8 loops of short connections from rotating addresses,
//!    a scraper every 50 ms, a client pinned away from its hash target; 20 upgrades alternating
//!    two builds (`STICKYLB_BUILD_TAG` b and a), 3 s of load before, between and after them. Prints each upgrade, and what failed, was cut,
//!    went backwards or moved (all of which should be nothing).
//! 2. At scale: `STICKYLB_UPGRADE_CONNECTIONS` idle connections (default 9,000) through one
//!    balancer to an echo target in a process of its own, 5 upgrades, each connection pinged
//!    afterwards, and a probe opening new connections one after another meanwhile. Prints the
//!    time from the signal to the new process serving (as the old process measured it: signal
//!    to commit), its phases, and the slowest new connection the probe saw.
//!
//! Why 9,000 and not 10,000: this machine's hard limit is 20,000 descriptors per process, and a
//! proxied connection holds two in the balancer (client and target sockets), so 10,000 need
//! 20,000 plus the listeners, the metrics socket and the runtime's own; `maxConnections`
//! derived from a 20,000 limit is 9,500. Both processes of an upgrade hold a descriptor of each
//! socket for the moment of the handover, each within its own limit.
//!
//! Run: `cargo bench --bench upgrade` (a few minutes; the release binary). Settings:
//! `STICKYLB_UPGRADE_CONNECTIONS`, `STICKYLB_UPGRADE_ROUNDS` (upgrades under load, 20),
//! `STICKYLB_UPGRADE_LONG` (200), `STICKYLB_UPGRADE_IDLE` (50), `STICKYLB_UPGRADE_INTERVAL_SECS`
//! (3).

use std::time::{Duration, Instant};

use stickylb_testkit::upgrade::{self, Options, Upgrade};
use stickylb_testkit::{backend_process, dead_port, env_or, serve_backend_process_if_asked, Mode};

const BIN: &str = env!("CARGO_BIN_EXE_stickylb");

fn main() {
    serve_backend_process_if_asked();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        under_load().await;
        at_scale().await;
    });
}

async fn under_load() {
    let options = Options {
        long_lived: env_or("STICKYLB_UPGRADE_LONG", 200),
        idle: env_or("STICKYLB_UPGRADE_IDLE", 50),
        upgrades: env_or("STICKYLB_UPGRADE_ROUNDS", 20),
        short_parallel: 8,
        chunk: 4096,
        tick: Duration::from_millis(20),
        interval: Duration::from_secs(env_or("STICKYLB_UPGRADE_INTERVAL_SECS", 3)),
    };
    println!(
        "== under load: {} long-lived (4 KiB each way every 20 ms), {} idle, {} short-connection \
         loops, a scraper every 50 ms; {} upgrades, {} s apart",
        options.long_lived,
        options.idle,
        options.short_parallel,
        options.upgrades,
        options.interval.as_secs()
    );
    let started = Instant::now();
    let report = upgrade::run(BIN, &options).await;
    print_upgrades(&report.upgrades);
    println!(
        "{} s; short connections: {} ok, {} failed {:?}",
        started.elapsed().as_secs(),
        report.short_ok,
        report.short_failed,
        report.short_failures
    );
    println!(
        "long-lived: {} bytes checked, {} cut {:?}; idle: {} cut {:?}",
        report.long_bytes,
        report.long_cut.len(),
        report.long_cut,
        report.idle_cut.len(),
        report.idle_cut
    );
    println!(
        "pinned client moved after {} upgrades {:?}; {} scrapes, {} failed {:?}, counters down: \
         {:?}; wrong after an upgrade: {:?}; upgrades failed: {:?}",
        report.pinned_moved.len(),
        report.pinned_moved,
        report.scrapes,
        report.scrape_failures.len(),
        report.scrape_failures,
        report.backwards,
        report.wrong,
        report.upgrade_failures
    );
}

async fn at_scale() {
    let connections: u32 = env_or("STICKYLB_UPGRADE_CONNECTIONS", 9_000);
    let target = dead_port();
    let _backend = backend_process("echo", Mode::Echo, target);
    println!("== at scale: {connections} idle connections, 5 upgrades");
    let timing = upgrade::timing(BIN, target, connections, 5).await;
    print_upgrades(&timing.upgrades);
    println!(
        "new connections during the upgrades: {}, the slowest {:.1} ms (connect to echo), {} \
         failed {:?}",
        timing.probes,
        timing.probe_max_ms,
        timing.probe_failures.len(),
        timing.probe_failures.iter().take(5).collect::<Vec<_>>()
    );
    println!(
        "connections lost or failed upgrades: {} {:?}",
        timing.failures.len(),
        timing.failures.iter().take(5).collect::<Vec<_>>()
    );
}

fn print_upgrades(upgrades: &[Upgrade]) {
    println!(
        "upgrade  version      old pid  new pid  signal->serving ms  (prepare  collect)  \
         stood still ms  no accept ms  command ms"
    );
    let ms = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
    for (i, u) in upgrades.iter().enumerate() {
        println!(
            "{:>7}  {:<11}  {:>7}  {:>7}  {:>18}  ({:>7}  {:>7})  {:>14}  {:>12}  {:>10}",
            i + 1,
            u.version,
            u.old_pid,
            u.new_pid,
            u.signal_to_serving_ms,
            ms(u.prepare_ms),
            ms(u.collect_ms),
            ms(u.still_ms),
            ms(u.no_accept_ms),
            u.command_ms
        );
    }
    let mut ms: Vec<u64> = upgrades.iter().map(|u| u.signal_to_serving_ms).collect();
    ms.sort_unstable();
    if let (Some(min), Some(max)) = (ms.first(), ms.last()) {
        println!(
            "signal->serving: min {min} ms, median {} ms, max {max} ms",
            ms[ms.len() / 2]
        );
    }
}
