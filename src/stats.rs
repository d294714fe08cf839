//! Process-wide counters kept by the connection path with atomics.
//!
//! The data path never formats, allocates or locks to count: it bumps these atomics (and the
//! per-target ones in [`crate::balance::target::TargetCounters`]). The metrics exporter reads
//! them when scraped. One [`Stats`] lives as long as the process's balancer state, across
//! reloads.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::metrics::LazyHistogram;

/// Why a client connection was accepted and then closed without being proxied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// `allow`/`deny` refused the client address.
    Denied,
    /// `maxConnections` reached.
    Limit,
    /// `maxConnectionsPerClient` reached.
    ClientLimit,
    /// No target could be connected.
    NoTarget,
}

impl Reject {
    /// How many reasons there are (the size of per-reason arrays).
    pub const COUNT: usize = 4;

    /// Every reason, in the order of their counters.
    pub const ALL: [Reject; Reject::COUNT] = [
        Reject::Denied,
        Reject::Limit,
        Reject::ClientLimit,
        Reject::NoTarget,
    ];

    /// The `reason` label value.
    pub fn label(self) -> &'static str {
        match self {
            Reject::Denied => "denied",
            Reject::Limit => "limit",
            Reject::ClientLimit => "client_limit",
            Reject::NoTarget => "no_target",
        }
    }
}

#[derive(Debug, Default)]
pub struct Stats {
    /// Every accepted socket, including those then rejected.
    pub accepted: AtomicU64,
    /// Client connections open now (accepted and not yet closed).
    pub active: AtomicU64,
    rejected: [AtomicU64; Reject::COUNT],
    /// Connect attempts after the first for one client connection.
    pub retries: AtomicU64,
    /// accept(2) failed with EMFILE/ENFILE (out of file descriptors).
    pub accept_errors_fd_limit: AtomicU64,
    /// accept(2) failed otherwise.
    pub accept_errors_other: AtomicU64,
    pub reloads_success: AtomicU64,
    pub reloads_failure: AtomicU64,
    /// Whether the last reload attempt failed (false before any), so the gauge
    /// `config_last_reload_success` is its negation.
    pub last_reload_failed: AtomicBool,
    /// `connection_duration_seconds`: set when the metrics exporter starts, a no-op until then.
    pub connection_duration: LazyHistogram,
}

impl Stats {
    pub fn reject(&self, reason: Reject) {
        self.rejected[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn rejected(&self, reason: Reject) -> u64 {
        self.rejected[reason as usize].load(Ordering::Relaxed)
    }
}
