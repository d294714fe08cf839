//! A snapshot of the balancer's counters and target states: what the admin endpoint renders
//! (`/metrics`, `/status` and the status page), read through this one narrow interface rather
//! than the proxy's insides.
//!
//! Taking one reads the atomics the data path keeps and locks nothing the data path takes but
//! the target registry (never touched per connection), so a scrape costs a connection nothing.
//!
//! Moments are in the balancer's clock (milliseconds since it started, see `clock`), all
//! measured against [`Snapshot::at_ms`]; [`Snapshot::wall`] is the wall clock at that same
//! moment, which turns any of them into a date.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use super::Proxy;
use crate::balance::target::{Health, TargetStatus};
use crate::counters::{HistogramSnapshot, LastReload, Reject};
use crate::sockets::Fault;

/// The balancer at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The moment of the snapshot on the balancer's clock (ms; the clock starts at 1).
    pub at_ms: u64,
    /// The wall clock at [`Snapshot::at_ms`].
    pub wall: SystemTime,
    /// How long the balancer has been running, in ms.
    pub uptime_ms: u64,
    /// The config file it runs (and reloads).
    pub config_path: PathBuf,
    /// The addresses it accepts clients on now (none once it stopped accepting). Filled in by
    /// the server, which owns the listener; empty in a snapshot of the proxy alone.
    pub listeners: Vec<SocketAddr>,
    /// How the last reload attempt ended; `None` before any.
    pub last_reload: Option<LastReload>,
    /// Every accepted socket, including those then refused.
    pub accepted: u64,
    /// Client connections open now.
    pub active: u64,
    /// Refused connections, indexed by `Reject as usize` (see [`Snapshot::rejected`]).
    pub rejected: [u64; Reject::COUNT],
    /// Connect attempts after the first of a client connection.
    pub retries: u64,
    /// New clients sent past their best-ranked usable target by `hashBalanceFactor`.
    pub hash_overflows: u64,
    /// Sticky sessions in the table.
    pub sessions: u64,
    pub reloads_success: u64,
    pub reloads_failure: u64,
    /// Upgrades in which a new process took over, and upgrades that failed (design §13).
    pub upgrades_success: u64,
    pub upgrades_failure: u64,
    /// Whether the last reload attempt failed (false before any).
    pub last_reload_failed: bool,
    pub accept_errors_fd_limit: u64,
    pub accept_errors_other: u64,
    /// `connection_duration_seconds`.
    pub connection_duration: HistogramSnapshot,
    /// The configured targets in config order, then removed ones still draining.
    pub targets: Vec<TargetSnapshot>,
}

impl Snapshot {
    /// Connections refused for `reason`.
    pub fn rejected(&self, reason: Reject) -> u64 {
        self.rejected[reason as usize]
    }

    /// The target whose identity is `id`.
    pub fn target(&self, id: &str) -> Option<&TargetSnapshot> {
        self.targets.iter().find(|t| &*t.id == id)
    }
}

/// One target identity at one moment.
#[derive(Debug, Clone)]
pub struct TargetSnapshot {
    pub id: Arc<str>,
    /// The address it is connected to (resolved), and its weight; `None` once removed from
    /// the config.
    pub address: Option<SocketAddr>,
    pub weight: Option<u32>,
    /// What it is doing, in one word, and since when (clock ms).
    pub status: TargetStatus,
    pub since_ms: u64,
    /// The time (clock ms) and reason of the last failed connect of a client.
    pub last_failure: Option<(u64, Fault)>,
    /// The time (clock ms) and result of the last health check.
    pub last_check: Option<(u64, Result<(), Fault>)>,
    /// Listed in the current config (false: removed, its connections draining).
    pub listed: bool,
    /// Takes new clients: listed, not draining, not down by its health check, and not in a
    /// deactivation window.
    pub up: bool,
    /// No new client goes to it, its connections go on: drained by the config (`drain`), or
    /// removed from it.
    pub draining: bool,
    /// The active health check's verdict: `None` when the target is not checked, `Some(true)`
    /// up, `Some(false)` down.
    pub check_up: Option<bool>,
    /// Health checks passed and failed so far.
    pub checks_success: u64,
    pub checks_failure: u64,
    /// Connections open to it now.
    pub active: u64,
    pub connections: u64,
    pub connect_failures: u64,
    pub deactivations: u64,
    pub bytes_to_target: u64,
    pub bytes_to_client: u64,
    /// `target_connect_duration_seconds`.
    pub connect_duration: HistogramSnapshot,
}

impl Proxy {
    /// The counters and target states now.
    pub fn snapshot(&self) -> Snapshot {
        let shared = &self.shared;
        let stats = &shared.stats;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let now = shared.clock.now_ms();
        let wall = SystemTime::now();
        let generation = self.store.load();
        let mut targets: Vec<TargetSnapshot> = generation
            .states()
            .iter()
            .zip(&generation.config.targets)
            .map(|(s, spec)| {
                let mut t = target(s, now);
                t.address = Some(spec.addr);
                t.weight = Some(spec.weight);
                t
            })
            .collect();
        // Removed targets that still drain, after the listed ones (sorted: a stable order).
        let mut draining: Vec<TargetSnapshot> = shared
            .registry
            .all()
            .iter()
            .filter(|s| !s.is_present())
            .map(|s| target(s, now))
            .collect();
        draining.sort_by(|a, b| a.id.cmp(&b.id));
        targets.extend(draining);
        Snapshot {
            at_ms: now,
            wall,
            uptime_ms: now.saturating_sub(1),
            config_path: generation.config.path.clone(),
            listeners: Vec::new(),
            last_reload: stats.last_reload(),
            accepted: load(&stats.accepted),
            active: load(&stats.active),
            rejected: Reject::ALL.map(|r| stats.rejected(r)),
            retries: load(&stats.retries),
            hash_overflows: load(&stats.hash_overflows),
            sessions: shared.sessions.len() as u64,
            reloads_success: load(&stats.reloads_success),
            reloads_failure: load(&stats.reloads_failure),
            upgrades_success: load(&stats.upgrades_success),
            upgrades_failure: load(&stats.upgrades_failure),
            last_reload_failed: stats.last_reload_failed.load(Ordering::Relaxed),
            accept_errors_fd_limit: load(&stats.accept_errors_fd_limit),
            accept_errors_other: load(&stats.accept_errors_other),
            connection_duration: stats.connection_duration.snapshot(),
            targets,
        }
    }
}

fn target(state: &crate::balance::target::TargetState, now: u64) -> TargetSnapshot {
    let c = &state.counters;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    TargetSnapshot {
        id: state.id.clone(),
        address: None,
        weight: None,
        status: state.status(now),
        since_ms: state.since_ms(now),
        last_failure: state.last_failure(),
        last_check: state.last_check(),
        listed: state.is_present(),
        up: state.is_usable(now),
        draining: state.is_draining(),
        check_up: match state.health() {
            Health::Unchecked => None,
            Health::Up => Some(true),
            Health::Down => Some(false),
        },
        checks_success: load(&c.checks_success),
        checks_failure: load(&c.checks_failure),
        active: load(&state.active),
        connections: load(&c.connections),
        connect_failures: load(&c.connect_failures),
        deactivations: load(&c.deactivations),
        bytes_to_target: load(&c.bytes_to_target),
        bytes_to_client: load(&c.bytes_to_client),
        connect_duration: state.connect_duration.snapshot(),
    }
}
