//! A skewed client population, as real ones are (issue 16): one address behind which many
//! users sit (a carrier-grade NAT, a corporate proxy) opens a large share of all connections,
//! a few more are busy, and the rest form a long tail.
//!
//! Draws come from the kit's [`Rng`] with fixed seeds: every run draws the same clients in the
//! same order.
//!
//! Shared by the bench that measures `hashBalanceFactor` at full scale
//! (`benches/populations.rs`, in-process) and the test that checks it at small scale over real
//! sockets (`tests/populations.rs`), so that both draw clients and compute their figures the
//! same way.
//!
//! The model: client 0 opens `hot` of all connections; the top 1 % of clients (client 0
//! included) open `top` together; client `r ≥ 1` opens a share proportional to `1 / r^s`
//! (Zipf-like), with `s` found by bisection so that those shares add up as stated. Connections
//! churn: a fixed number is open at once, and each new one replaces one drawn uniformly from
//! those open (so lifetimes are geometric).

use std::collections::HashMap;

use crate::Rng;
use std::ops::Range;

/// How often each client opens a connection.
pub struct Population {
    /// Cumulative shares, ending at 1.
    cumulative: Vec<f64>,
    /// The Zipf exponent of the tail.
    pub exponent: f64,
}

impl Population {
    /// `clients` (at least 200, so that the top 1 % is two or more) of which client 0 opens
    /// `hot` and the top 1 % open `top` of all connections (0 < hot < top < 1).
    pub fn skewed(clients: usize, hot: f64, top: f64) -> Population {
        assert!(clients >= 200 && 0.0 < hot && hot < top && top < 1.0);
        let top_n = clients / 100;
        // Of what client 0 leaves, ranks 1..top_n must hold this much.
        let wanted = (top - hot) / (1.0 - hot);
        let ratio = |s: f64| {
            let w = |r: usize| (r as f64).powf(-s);
            let head: f64 = (1..top_n).map(w).sum();
            let all: f64 = (1..clients).map(w).sum();
            head / all
        };
        // The head's share grows with s: bisect.
        let (mut lo, mut hi) = (0.0f64, 4.0f64);
        for _ in 0..60 {
            let mid = (lo + hi) / 2.0;
            if ratio(mid) < wanted {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let s = (lo + hi) / 2.0;
        let tail: f64 = (1..clients).map(|r| (r as f64).powf(-s)).sum();
        let mut cumulative = Vec::with_capacity(clients);
        let mut sum = 0.0;
        for r in 0..clients {
            sum += if r == 0 {
                hot
            } else {
                (1.0 - hot) * (r as f64).powf(-s) / tail
            };
            cumulative.push(sum);
        }
        Population {
            cumulative,
            exponent: s,
        }
    }

    /// Number of clients.
    pub fn len(&self) -> usize {
        self.cumulative.len()
    }

    /// Whether there is no client (never, for a population made by `new`).
    pub fn is_empty(&self) -> bool {
        self.cumulative.is_empty()
    }

    /// The share of connections that `clients` open together.
    pub fn share(&self, clients: Range<usize>) -> f64 {
        let upto = |i: usize| if i == 0 { 0.0 } else { self.cumulative[i - 1] };
        upto(clients.end) - upto(clients.start)
    }

    /// A client, drawn by its share.
    pub fn draw(&self, rng: &mut Rng) -> usize {
        let u = rng.unit() * self.cumulative[self.len() - 1];
        self.cumulative
            .partition_point(|&c| c <= u)
            .min(self.len() - 1)
    }
}

/// The churn of connections: `at_once` open, each new one replacing one drawn at random.
pub struct Churn {
    pub population: Population,
    pub rng: Rng,
    pub at_once: usize,
}

impl Churn {
    /// Which of the `open` connections (an index into the caller's list) to close before the
    /// next one opens: none until `at_once` are open.
    pub fn close(&mut self, open: usize) -> Option<usize> {
        (open >= self.at_once).then(|| self.rng.below(open as u64) as usize)
    }

    /// The client that opens the next connection.
    pub fn open(&mut self) -> usize {
        self.population.draw(&mut self.rng)
    }
}

/// The figures of issue 16 for the connections open at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Figures {
    /// Open connections.
    pub connections: usize,
    /// The busiest target's open connections over the mean per target.
    pub busiest_over_mean: f64,
    /// Client 0's own open connections over the mean per target: the floor of
    /// `busiest_over_mean` for any policy that keeps one client on one target.
    pub hot_over_mean: f64,
    /// The busiest of the targets that hold none of client 0's connections, over the mean.
    pub others_over_mean: f64,
    /// Clients with an open connection.
    pub clients: usize,
    /// Of those, the share not on their first-ranked target.
    pub off_first: f64,
    /// Clients whose open connections are on two or more targets.
    pub split: usize,
}

impl Figures {
    /// From `open`, the (client, target) of every open connection, over `targets` targets;
    /// `first_ranked(client)` is the target the hash ranks first for a client.
    pub fn of(
        open: impl IntoIterator<Item = (usize, usize)>,
        targets: usize,
        first_ranked: impl Fn(usize) -> usize,
    ) -> Figures {
        let mut load = vec![0usize; targets];
        // Client → (its first connection's target, whether another is elsewhere).
        let mut clients: HashMap<usize, (usize, bool)> = HashMap::new();
        let mut hot = 0;
        let mut holds_hot = vec![false; targets];
        for (client, target) in open {
            load[target] += 1;
            hot += usize::from(client == 0);
            holds_hot[target] |= client == 0;
            let entry = clients.entry(client).or_insert((target, false));
            entry.1 |= entry.0 != target;
        }
        let connections: usize = load.iter().sum();
        let mean = connections as f64 / targets as f64;
        let off = clients
            .iter()
            .filter(|(&c, &(t, _))| t != first_ranked(c))
            .count();
        Figures {
            connections,
            busiest_over_mean: load.iter().copied().max().unwrap_or(0) as f64 / mean,
            hot_over_mean: hot as f64 / mean,
            others_over_mean: (0..targets)
                .filter(|&t| !holds_hot[t])
                .map(|t| load[t])
                .max()
                .unwrap_or(0) as f64
                / mean,
            clients: clients.len(),
            off_first: off as f64 / clients.len().max(1) as f64,
            split: clients.values().filter(|(_, split)| *split).count(),
        }
    }
}
