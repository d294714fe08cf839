//! `hashBalanceFactor` on a skewed client population (issue 16, design §14): how busy the
//! busiest target gets, how many clients leave their first-ranked target, and whether any
//! client ends up on two targets at once, without the factor and with 125, 150 and 200.
//!
//! The population (`tests/support/population.rs`): 8 equal targets, 10,000 client addresses
//! of which one opens 20 % of all connections (a carrier-grade NAT) and the top 1 % open 30 %
//! (a Zipf-like tail after that); 2,000 connections open at once, each new one replacing one
//! drawn at random from those open. 2,000 connections fill the balancer, then 100,000 more
//! churn through it; every 1,000 the open connections are measured.
//!
//! It runs in-process on the `Balancer`/`Route` API, the calls a connection handler makes
//! (route at accept, drop at close), on tokio's paused clock advanced 10 ms per connection (so
//! `sessionExpiry`, 30 s by default, spans 3,000 connections, and a connection lives 20 s on
//! average). Why not real sockets: the figures depend only on the order in which connections
//! open and close, which this fixes exactly (every run prints the same table, and the three
//! factors see the same sequence), while 2,000 proxied connections over loopback would hold
//! 8,000 descriptors and take minutes of a shared 2-core machine for 102,000 connections, and
//! add nothing but timing noise. `tests/populations.rs` runs the same population at small scale
//! over real sockets and checks that the balancer behaves as this API says.
//!
//! Run with `cargo bench --bench populations`; it prints a Markdown table (figures in
//! docs/benchmarks.md).

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use stickylb::balance::hash::{client_key, target_seed, Table};
use stickylb::balance::{Balancer, Route, Shared};
use stickylb::config::Config;
use stickylb_testkit::population::{Churn, Figures, Population};
use stickylb_testkit::Rng;

const TARGETS: usize = 8;
const CLIENTS: usize = 10_000;
const AT_ONCE: usize = 2_000;
const CHURN: usize = 100_000;
const SAMPLE_EVERY: usize = 1_000;
const STEP: Duration = Duration::from_millis(10);

fn config(factor: u32) -> Config {
    let targets: Vec<String> = (0..TARGETS)
        .map(|i| format!(r#"{{"host": "10.1.0.{}", "port": 8080}}"#, i + 1))
        .collect();
    let text = format!(
        r#"{{"sourcePort": 8080, "metricsPort": null, "hashBalanceFactor": {factor},
            "targets": [{}]}}"#,
        targets.join(", ")
    );
    Config::parse(Path::new("bench.json"), &text).expect("valid config")
}

/// Client `c`'s address: 10.0.0.0 + c.
fn address(c: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + c as u32))
}

/// What one factor gives over the run.
struct Summary {
    samples: Vec<Figures>,
}

impl Summary {
    fn mean(&self, f: impl Fn(&Figures) -> f64) -> f64 {
        self.samples.iter().map(f).sum::<f64>() / self.samples.len() as f64
    }

    fn max(&self, f: impl Fn(&Figures) -> f64) -> f64 {
        self.samples.iter().map(f).fold(0.0, f64::max)
    }
}

fn run(factor: u32) -> Summary {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let shared = Shared::new();
        let config = config(factor);
        let table = Table::new(
            &config
                .targets
                .iter()
                .map(|t| (target_seed(&t.id), t.weight))
                .collect::<Vec<_>>(),
        );
        let first: Vec<usize> = (0..CLIENTS)
            .map(|c| {
                table
                    .pick(client_key(address(c)), |_| true)
                    .expect("a target")
            })
            .collect();
        let balancer = Balancer::new(config, &shared);
        let mut churn = Churn {
            population: Population::skewed(CLIENTS, 0.20, 0.30),
            rng: Rng::new(16),
            at_once: AT_ONCE,
        };
        let mut open: Vec<(usize, Route)> = Vec::with_capacity(AT_ONCE);
        let mut samples = Vec::new();
        for step in 0..AT_ONCE + CHURN {
            if let Some(i) = churn.close(open.len()) {
                drop(open.swap_remove(i));
            }
            let client = churn.open();
            open.push((client, balancer.route(&shared, address(client))));
            tokio::time::advance(STEP).await;
            if step >= AT_ONCE && (step + 1 - AT_ONCE) % SAMPLE_EVERY == 0 {
                let now = open.iter().map(|(c, route)| (*c, route.current()));
                samples.push(Figures::of(now, TARGETS, |c| first[c]));
            }
        }
        drop(open);
        Summary { samples }
    })
}

fn main() {
    // `cargo bench` passes `--bench`; anything else is a usage error.
    if std::env::args().skip(1).any(|a| a != "--bench") {
        eprintln!("usage: cargo bench --bench populations");
        std::process::exit(2);
    }
    let population = Population::skewed(CLIENTS, 0.20, 0.30);
    println!(
        "{TARGETS} targets, {CLIENTS} clients (client 0: {:.1} % of connections, top 1 %: \
         {:.1} %, tail exponent {:.3}), {AT_ONCE} open at once, {CHURN} connections measured \
         every {SAMPLE_EVERY}, {} ms per connection, sessionExpiry 30 s\n",
        100.0 * population.share(0..1),
        100.0 * population.share(0..CLIENTS / 100),
        population.exponent,
        STEP.as_millis(),
    );
    println!(
        "| hashBalanceFactor | busiest / mean (mean of samples) | busiest / mean (worst) | \
         client 0 alone / mean | busiest other target / mean (worst) | clients not on their \
         first-ranked target | clients on two targets at once (worst) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut clients = Vec::new();
    for factor in [0, 125, 150, 200] {
        let s = run(factor);
        clients.push(s.mean(|f| f.clients as f64));
        println!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1} % | {} |",
            if factor == 0 {
                "0 (off)".to_string()
            } else {
                factor.to_string()
            },
            s.mean(|f| f.busiest_over_mean),
            s.max(|f| f.busiest_over_mean),
            s.mean(|f| f.hot_over_mean),
            s.max(|f| f.others_over_mean),
            100.0 * s.mean(|f| f.off_first),
            s.max(|f| f.split as f64),
        );
    }
    let shown: Vec<String> = clients.iter().map(|c| format!("{c:.0}")).collect();
    println!(
        "\nclients with a connection open, mean of samples (by factor, as above): {}",
        shown.join(", ")
    );
}
