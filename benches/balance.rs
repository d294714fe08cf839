//! The per-connection cost of sessions, and the per-reload cost of a config, in isolation.
//!
//! - `sessions/*`: `Balancer::route` (hash the client, look its session up under the shard
//!   lock, pick and pin when it has none) followed by dropping the route (which closes the
//!   session's open count under the lock again): the two lock round trips every connection
//!   pays. `existing` routes 4,096 clients that already have a session; `new` routes clients
//!   never seen (a hash-map insert each). `2_threads` runs the same loop on two threads at
//!   once over the same clients and shards and reports the time per route on each thread, so
//!   contention on the shard locks and on the targets' shared reference counts shows.
//!   `route_existing/1024_targets` shows the cost of finding a session's target among many.
//!   `route_new/64_targets/factor_{0,125}` shows what `hashBalanceFactor` adds to placing a new
//!   client: one pass over the 64 targets' health and load under the shard lock.
//! - `config/*`: parsing and validating a 1,024-target config, and building the generation a
//!   reload swaps in (`Balancer::new`: adopt target states by identity, build the table).
//!
//! Run with `cargo bench --bench balance`.
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use stickylb::balance::hash::{target_seed, Table};
use stickylb::balance::{Balancer, Shared};
use stickylb::config::Config;
use stickylb_testkit::Rng;

const CLIENTS: usize = 4096;

fn config_text(targets: usize) -> String {
    config_text_with(targets, "")
}

/// The config text of `targets` targets with `extra` top-level keys (`, "key": value`).
fn config_text_with(targets: usize, extra: &str) -> String {
    let list: Vec<String> = (0..targets)
        .map(|i| {
            format!(
                r#"{{"host": "10.{}.{}.{}", "port": 8080}}"#,
                i / 65_536,
                i / 256 % 256,
                i % 256
            )
        })
        .collect();
    format!(
        r#"{{"sourcePort": 8080, "metricsPort": null, "targets": [{}] {extra}}}"#,
        list.join(", ")
    )
}

fn config(targets: usize) -> Config {
    Config::parse(Path::new("bench.json"), &config_text(targets)).expect("valid config")
}

/// Fixed pseudo-random client addresses.
fn clients() -> Vec<IpAddr> {
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    (0..CLIENTS)
        .map(|_| IpAddr::V4(Ipv4Addr::from(rng.next_u64() as u32)))
        .collect()
}

/// Runs `work(thread, iters)` on `threads` threads started together; returns the slowest
/// thread's time (each thread does `iters` operations).
fn timed_on_threads(threads: usize, iters: u64, work: &(dyn Fn(usize, u64) + Sync)) -> Duration {
    let barrier = Barrier::new(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    work(t, iters);
                    start.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .max()
            .unwrap_or_default()
    })
}

fn bench_sessions(c: &mut Criterion) {
    let mut group = c.benchmark_group("sessions");
    let clients = clients();
    for threads in [1usize, 2] {
        // Clients that already have a live session (the common case of a returning client).
        let shared = Shared::new();
        let balancer = Balancer::new(config(8), &shared);
        for ip in &clients {
            drop(balancer.route(&shared, *ip));
        }
        group.bench_function(format!("route_existing/8_targets/{threads}_threads"), |b| {
            b.iter_custom(|iters| {
                timed_on_threads(threads, iters, &|t, iters| {
                    // Each thread walks the same clients from a different offset.
                    let mut k = t * CLIENTS / 2;
                    for _ in 0..iters {
                        k = (k + 1) % CLIENTS;
                        let route = balancer.route(&shared, black_box(clients[k]));
                        black_box(route.current());
                    }
                })
            })
        });
        // Clients never seen: every route inserts a session. A fresh table per sample keeps
        // the table size comparable between samples.
        group.bench_function(format!("route_new/8_targets/{threads}_threads"), |b| {
            b.iter_custom(|iters| {
                let shared = Shared::new();
                let balancer = Balancer::new(config(8), &shared);
                let d = timed_on_threads(threads, iters, &|t, iters| {
                    for k in 0..iters {
                        let n = (k as u32).wrapping_mul(threads as u32) + t as u32;
                        let ip = IpAddr::V4(Ipv4Addr::from(n.wrapping_mul(0x9e37_79b1)));
                        let route = balancer.route(&shared, black_box(ip));
                        black_box(route.current());
                    }
                });
                drop(balancer);
                drop(shared);
                d
            })
        });
    }
    // New clients among 64 targets, without and with bounded loads: what the factor adds.
    for factor in [0, 125] {
        let extra = format!(r#", "hashBalanceFactor": {factor}"#);
        let text = config_text_with(64, &extra);
        let config = Config::parse(Path::new("bench.json"), &text).expect("valid config");
        group.bench_function(format!("route_new/64_targets/factor_{factor}"), |b| {
            b.iter_custom(|iters| {
                let shared = Shared::new();
                let balancer = Balancer::new(config.clone(), &shared);
                let start = Instant::now();
                for k in 0..iters {
                    let ip = IpAddr::V4(Ipv4Addr::from((k as u32).wrapping_mul(0x9e37_79b1)));
                    let route = balancer.route(&shared, black_box(ip));
                    black_box(route.current());
                }
                start.elapsed()
            })
        });
    }
    // A returning client among 1,024 targets: the session's target is found in the
    // generation by a scan of the target list, so this grows with the target count.
    let shared = Shared::new();
    let balancer = Balancer::new(config(1024), &shared);
    for ip in &clients {
        drop(balancer.route(&shared, *ip));
    }
    group.bench_function("route_existing/1024_targets/1_threads", |b| {
        let mut k = 0;
        b.iter(|| {
            k = (k + 1) % CLIENTS;
            let route = balancer.route(&shared, black_box(clients[k]));
            black_box(route.current())
        })
    });
    group.finish();
}

fn bench_config(c: &mut Criterion) {
    let mut group = c.benchmark_group("config");
    let text = config_text(1024);
    group.bench_function("parse/1024_targets", |b| {
        b.iter(|| Config::parse(Path::new("bench.json"), black_box(&text)).expect("valid"))
    });
    let parsed = config(1024);
    // A reload: the registry already knows every identity, states are adopted.
    let shared = Shared::new();
    drop(Balancer::new(parsed.clone(), &shared));
    group.bench_function("balancer_new/1024_targets/reload", |b| {
        b.iter(|| Balancer::new(black_box(parsed.clone()), &shared))
    });
    // First start: every target state is new.
    group.bench_function("balancer_new/1024_targets/fresh", |b| {
        b.iter_with_large_drop(|| {
            let shared = Shared::new();
            let balancer = Balancer::new(black_box(parsed.clone()), &shared);
            (balancer, shared)
        })
    });
    let seeds: Vec<(u64, u32)> = (0..1024)
        .map(|i| {
            (
                target_seed(&format!("10.0.{}.{}:8080", i / 256, i % 256)),
                1,
            )
        })
        .collect();
    group.bench_function("table_new/1024_targets", |b| {
        b.iter(|| Table::new(black_box(&seeds)))
    });
    group.bench_function("clone_config/1024_targets", |b| {
        b.iter(|| black_box(&parsed).clone())
    });
    group.finish();
}

criterion_group! {
    name = benches;
    // Shorter than criterion's defaults: the machine is shared.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench_sessions, bench_config
}
criterion_main!(benches);
