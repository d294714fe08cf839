//! The cost of choosing a target: `Table::pick` over 2, 8, 16, 64 and 1,024 equal-weight targets and
//! 8, 64 and 1,024 weighted ones (the design's bound: ≤ 100 ns at 64 targets), `Table::pick_bounded`
//! (`hashBalanceFactor` 125) over 64 targets, the pick at 64 targets when the hash's first choice
//! is down (`*_first_down`), plus the client hash and the non-sticky two-choices pick for
//! context.
//!
//! The bounded picks read loads around a mean of 100: in `bounded_125_even/64` no target is at
//! the bound (the pick plus one pass summing the usable targets' loads); in
//! `bounded_125_hot/64` every eighth target carries twice the mean, so about one pick in eight
//! finds its first choice at the bound and picks again with the bound applied.
//!
//! Each iteration hashes for a different client (a ring of 4,096 precomputed keys read through
//! `black_box`), so nothing is constant-folded, and `usable` reads a per-target flag as the real
//! caller does. Run with `cargo bench --bench pick`.
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use stickylb::balance::hash::{client_key, random_u64, target_seed, Table};
use stickylb_testkit::Rng;

const KEYS: usize = 4096;

/// Client keys of `KEYS` pseudo-random IPv4 addresses (fixed seed, reproducible).
fn keys() -> Vec<u64> {
    let mut rng = Rng::new(0x2545_f491_4f6c_dd1d);
    (0..KEYS)
        .map(|_| client_key(IpAddr::V4(Ipv4Addr::from(rng.next_u64() as u32))))
        .collect()
}

fn table(n: usize, weight: impl Fn(usize) -> u32) -> Table {
    let targets: Vec<(u64, u32)> = (0..n)
        .map(|i| {
            (
                target_seed(&format!("10.0.{}.{}:8080", i / 256, i % 256)),
                weight(i),
            )
        })
        .collect();
    Table::new(&targets)
}

fn bench_pick(c: &mut Criterion) {
    let keys = keys();
    let mut group = c.benchmark_group("pick");
    let cases: Vec<(String, Table)> = vec![
        ("equal/2".into(), table(2, |_| 1)),
        ("equal/8".into(), table(8, |_| 1)),
        ("equal/16".into(), table(16, |_| 1)),
        ("equal/64".into(), table(64, |_| 1)),
        ("equal/1024".into(), table(1024, |_| 1)),
        ("weighted_1_to_8/8".into(), table(8, |i| 1 + i as u32)),
        (
            "weighted_1_to_8/64".into(),
            table(64, |i| 1 + (i % 8) as u32),
        ),
        (
            "weighted_1_to_8/1024".into(),
            table(1024, |i| 1 + (i % 8) as u32),
        ),
    ];
    for (name, table) in &cases {
        let up = vec![true; table.len()];
        group.bench_with_input(BenchmarkId::from_parameter(name), table, |b, table| {
            let up = black_box(&up);
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % KEYS;
                table.pick(black_box(keys[i]), |t| up[t])
            })
        });
    }
    // The hash's first choice down (as while a worker restarts): `usable` says no to it, for
    // every key, and yes to every other target.
    for (name, table) in [
        ("equal/64_first_down", table(64, |_| 1)),
        (
            "weighted_1_to_8/64_first_down",
            table(64, |i| 1 + (i % 8) as u32),
        ),
    ] {
        let first: Vec<usize> = keys
            .iter()
            .map(|&key| table.pick(key, |_| true).unwrap())
            .collect();
        group.bench_function(name, |b| {
            let first = black_box(&first);
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % KEYS;
                let down = first[i];
                table.pick(black_box(keys[i]), |t| t != down)
            })
        });
    }
    let t64 = table(64, |_| 1);
    let up = vec![true; 64];
    let even: Vec<u64> = (0..64).map(|i| 90 + (i * 7919) % 21).collect();
    let hot: Vec<u64> = (0..64)
        .map(|i| {
            if i % 8 == 0 {
                200
            } else {
                90 + (i * 7919) % 21
            }
        })
        .collect();
    for (name, loads) in [("bounded_125_even/64", &even), ("bounded_125_hot/64", &hot)] {
        group.bench_function(name, |b| {
            let (up, loads) = (black_box(&up), black_box(loads));
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % KEYS;
                t64.pick_bounded(black_box(keys[i]), 125, |t| up[t], |t| loads[t])
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("other");
    group.bench_function("client_key/ipv4", |b| {
        let mut x = 0u32;
        b.iter(|| {
            x = x.wrapping_add(0x9e37_79b9);
            client_key(black_box(IpAddr::V4(Ipv4Addr::from(x))))
        })
    });
    let loads: Vec<u64> = (0..64).map(|i| (i * 7919) % 101).collect();
    group.bench_function("two_choices/64", |b| {
        let loads = black_box(&loads);
        b.iter(|| t64.pick_two_choices(random_u64(), |_| true, |t| loads[t]))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    // Shorter than criterion's defaults: the machine is shared, and these are stable.
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3));
    targets = bench_pick
}
criterion_main!(benches);
