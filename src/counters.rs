//! The counters the data path keeps: plain atomics, and histogram slots.
//!
//! A leaf: the connection path bumps these and the admin endpoint reads them, and neither
//! should need the other to do so. The data path never formats, allocates or locks to count:
//! [`Stats`] holds the process-wide counts, [`TargetCounters`] each target's, and
//! [`Histogram`] the latency histograms, all atomics. One [`Stats`] lives as long as the
//! process's balancer state, across reloads. The one thing kept under a lock is the last
//! reload's outcome ([`LastReload`]), written once per reload, far from any connection.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    /// A trusted upstream (`acceptProxyProtocol`) sent no valid PROXY header in time.
    ProxyHeader,
    /// The client is stickylb itself: the connection came from one of its own outgoing
    /// sockets, so a target leads back into the listener.
    Loop,
}

impl Reject {
    /// How many reasons there are (the size of per-reason arrays).
    pub const COUNT: usize = 6;

    /// Every reason, in the order of their counters.
    pub const ALL: [Reject; Reject::COUNT] = [
        Reject::Denied,
        Reject::Limit,
        Reject::ClientLimit,
        Reject::NoTarget,
        Reject::ProxyHeader,
        Reject::Loop,
    ];

    /// The `reason` label value.
    pub fn label(self) -> &'static str {
        match self {
            Reject::Denied => "denied",
            Reject::Limit => "limit",
            Reject::ClientLimit => "client_limit",
            Reject::NoTarget => "no_target",
            Reject::ProxyHeader => "proxy_header",
            Reject::Loop => "loop",
        }
    }
}

#[derive(Debug)]
pub struct Stats {
    /// Every accepted socket, including those then rejected.
    pub accepted: AtomicU64,
    /// Client connections open now (accepted and not yet closed).
    pub active: AtomicU64,
    rejected: [AtomicU64; Reject::COUNT],
    /// Connect attempts after the first for one client connection.
    pub retries: AtomicU64,
    /// New clients sent past their best-ranked usable target because it was at the
    /// `hashBalanceFactor` bound.
    pub hash_overflows: AtomicU64,
    /// accept(2) failed with EMFILE/ENFILE (out of file descriptors).
    pub accept_errors_fd_limit: AtomicU64,
    /// accept(2) failed otherwise.
    pub accept_errors_other: AtomicU64,
    pub reloads_success: AtomicU64,
    pub reloads_failure: AtomicU64,
    /// Upgrades (design §13) in which a new process took over (counted by the new process,
    /// which carries on the old one's counts).
    pub upgrades_success: AtomicU64,
    /// Upgrades that failed: the new process did not start, crashed, refused the config or
    /// the handover, or was not ready in time (counted by the old process, which goes on).
    pub upgrades_failure: AtomicU64,
    /// Whether the last reload attempt failed (false before any), so the gauge
    /// `config_last_reload_success` is its negation.
    pub last_reload_failed: AtomicBool,
    /// `connection_duration_seconds`: accept to close of proxied connections.
    pub connection_duration: Histogram,
    /// The last reload attempt's outcome (`None` before any), for the status page.
    last_reload: Mutex<Option<LastReload>>,
}

/// How the last reload attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastReload {
    /// When (clock ms).
    pub at_ms: u64,
    /// Why it was rejected (at most [`LastReload::MAX_ERROR`] bytes); `None`: applied.
    pub error: Option<Arc<str>>,
}

impl LastReload {
    /// The longest error text kept, in bytes: a config error quotes what the file holds
    /// (key names), and the file is the operator's, not to be echoed without bound.
    pub const MAX_ERROR: usize = 2048;
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            accepted: AtomicU64::new(0),
            active: AtomicU64::new(0),
            rejected: Default::default(),
            retries: AtomicU64::new(0),
            hash_overflows: AtomicU64::new(0),
            accept_errors_fd_limit: AtomicU64::new(0),
            accept_errors_other: AtomicU64::new(0),
            reloads_success: AtomicU64::new(0),
            reloads_failure: AtomicU64::new(0),
            upgrades_success: AtomicU64::new(0),
            upgrades_failure: AtomicU64::new(0),
            last_reload_failed: AtomicBool::new(false),
            connection_duration: Histogram::new(&CONNECTION_BUCKETS_US),
            last_reload: Mutex::new(None),
        }
    }
}

impl Stats {
    pub fn reject(&self, reason: Reject) {
        self.rejected[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn rejected(&self, reason: Reject) -> u64 {
        self.rejected[reason as usize].load(Ordering::Relaxed)
    }

    /// Records a reload attempt that ended at `at_ms`: applied (`error` is `None`) or rejected
    /// for `error`, which is cut to [`LastReload::MAX_ERROR`] bytes (on a character boundary,
    /// with `…`).
    pub fn reloaded(&self, at_ms: u64, error: Option<String>) {
        let error = error.map(|mut text| {
            if text.len() > LastReload::MAX_ERROR {
                let mut end = LastReload::MAX_ERROR - '…'.len_utf8();
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text.truncate(end);
                text.push('…');
            }
            Arc::from(text)
        });
        *self.lock_last_reload() = Some(LastReload { at_ms, error });
    }

    /// The last reload attempt's outcome; `None` before any.
    pub fn last_reload(&self) -> Option<LastReload> {
        self.lock_last_reload().clone()
    }

    fn lock_last_reload(&self) -> std::sync::MutexGuard<'_, Option<LastReload>> {
        self.last_reload.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every monotonic counter with a stable name: what an upgrade hands to the next process,
    /// by name, so that a version that adds a counter still reads an older one's (and skips a
    /// name it does not know).
    pub fn named(&self) -> [(&'static str, &AtomicU64); 14] {
        [
            ("accepted", &self.accepted),
            ("rejected_denied", &self.rejected[Reject::Denied as usize]),
            ("rejected_limit", &self.rejected[Reject::Limit as usize]),
            (
                "rejected_client_limit",
                &self.rejected[Reject::ClientLimit as usize],
            ),
            (
                "rejected_no_target",
                &self.rejected[Reject::NoTarget as usize],
            ),
            (
                "rejected_proxy_header",
                &self.rejected[Reject::ProxyHeader as usize],
            ),
            ("retries", &self.retries),
            ("hash_overflows", &self.hash_overflows),
            ("accept_errors_fd_limit", &self.accept_errors_fd_limit),
            ("accept_errors_other", &self.accept_errors_other),
            ("reloads_success", &self.reloads_success),
            ("reloads_failure", &self.reloads_failure),
            ("upgrades_success", &self.upgrades_success),
            ("upgrades_failure", &self.upgrades_failure),
        ]
    }
}

/// Counters a target keeps for the metrics exporter. Monotonic; they survive reloads (and
/// upgrades: see [`TargetCounters::named`]).
#[derive(Debug, Default)]
pub struct TargetCounters {
    /// Connections established to this target.
    pub connections: AtomicU64,
    /// Connect attempts that failed (refused, unreachable, reset, timeout).
    pub connect_failures: AtomicU64,
    /// Times the target went from up to deactivated.
    pub deactivations: AtomicU64,
    /// Bytes copied from clients to this target.
    pub bytes_to_target: AtomicU64,
    /// Bytes copied from this target to clients.
    pub bytes_to_client: AtomicU64,
    /// Active health checks of this target that passed.
    pub checks_success: AtomicU64,
    /// Active health checks of this target that failed (refused, timed out, no `expect`).
    pub checks_failure: AtomicU64,
}

impl TargetCounters {
    /// Every counter with a stable name, as [`Stats::named`].
    pub fn named(&self) -> [(&'static str, &AtomicU64); 7] {
        [
            ("connections", &self.connections),
            ("connect_failures", &self.connect_failures),
            ("deactivations", &self.deactivations),
            ("bytes_to_target", &self.bytes_to_target),
            ("bytes_to_client", &self.bytes_to_client),
            ("checks_success", &self.checks_success),
            ("checks_failure", &self.checks_failure),
        ]
    }
}

/// Adds `value` to the counter called `name` among `named`; false when no counter has that name
/// (a counter of another version, skipped).
pub fn add_named(named: &[(&'static str, &AtomicU64)], name: &str, value: u64) -> bool {
    match named.iter().find(|(n, _)| *n == name) {
        Some((_, counter)) => {
            counter.fetch_add(value, Ordering::Relaxed);
            true
        }
        None => false,
    }
}

/// A Prometheus histogram kept with atomics: fixed bucket bounds, a count per bucket and the
/// sum, all in whole microseconds.
///
/// The data path records into it directly (a short scan of the bounds and two relaxed adds, no
/// allocation, no lock); the admin endpoint reads a [`HistogramSnapshot`]. Because the state is
/// plain counts, it can be read back exactly, which is what carries it across a reload and, on
/// an upgrade, into the next process: a counter never goes backwards.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds of the buckets, in microseconds, increasing; the last bucket (`+Inf`) has
    /// none.
    bounds_us: &'static [u64],
    /// Samples per bucket (not cumulative); one more than `bounds_us`.
    buckets: Box<[AtomicU64]>,
    /// Sum of all samples, in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn new(bounds_us: &'static [u64]) -> Histogram {
        Histogram {
            bounds_us,
            buckets: (0..=bounds_us.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    /// Records one sample of `d`.
    #[inline]
    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = self.bounds_us.partition_point(|&bound| bound < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Adds the counts of another histogram (an older process's, on an upgrade): each of its
    /// buckets, whose upper bounds are `bounds_us` (`counts` has one more, `+Inf`), goes into
    /// the bucket of this one that holds its upper bound, so equal bounds map one to one and
    /// other bounds never make a count smaller. Counts beyond `bounds_us.len() + 1` are ignored.
    pub fn add(&self, bounds_us: &[u64], counts: &[u64], sum_us: u64) {
        for (i, &count) in counts.iter().enumerate().take(bounds_us.len() + 1) {
            let slot = match bounds_us.get(i) {
                Some(&bound) => self.bounds_us.partition_point(|&b| b < bound),
                None => self.bounds_us.len(),
            };
            self.buckets[slot].fetch_add(count, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(sum_us, Ordering::Relaxed);
    }

    /// The counts now. Buckets and sum are read one after the other, so a sample recorded
    /// meanwhile may be in one and not yet in the other; every value is still monotonic.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds_us: self.bounds_us,
            counts: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

/// A histogram's counts at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Upper bounds of the buckets in microseconds; `counts` has one more entry (`+Inf`).
    pub bounds_us: &'static [u64],
    /// Samples per bucket, not cumulative.
    pub counts: Vec<u64>,
    /// Sum of the samples in microseconds.
    pub sum_us: u64,
}

impl HistogramSnapshot {
    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Bucket bounds of `target_connect_duration_seconds`, in microseconds: a loopback connect
/// takes tens of microseconds, a remote one milliseconds, a struggling one up to
/// `connectTimeout`.
pub const CONNECT_BUCKETS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Bucket bounds of `connection_duration_seconds`, in microseconds: from a one-request
/// connection (milliseconds) to a websocket or game session (hours).
pub const CONNECTION_BUCKETS_US: [u64; 18] = [
    1_000,
    5_000,
    10_000,
    50_000,
    100_000,
    500_000,
    1_000_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    300_000_000,
    900_000_000,
    1_800_000_000,
    3_600_000_000,
    7_200_000_000,
    14_400_000_000,
    86_400_000_000,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_bounds_increase() {
        assert!(CONNECT_BUCKETS_US.windows(2).all(|w| w[0] < w[1]));
        assert!(CONNECTION_BUCKETS_US.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn a_sample_lands_in_the_first_bucket_whose_bound_it_does_not_exceed() {
        let h = Histogram::new(&CONNECT_BUCKETS_US);
        h.record(Duration::from_micros(100)); // on the bound: that bucket (le is inclusive)
        h.record(Duration::from_micros(101));
        h.record(Duration::from_secs(60)); // past every bound: +Inf
        let s = h.snapshot();
        assert_eq!(s.counts.len(), CONNECT_BUCKETS_US.len() + 1);
        assert_eq!((s.counts[0], s.counts[1]), (1, 1));
        assert_eq!(s.counts[CONNECT_BUCKETS_US.len()], 1);
        assert_eq!(s.count(), 3);
        assert_eq!(s.sum_us, 100 + 101 + 60_000_000);
    }

    #[test]
    fn the_last_reload_is_kept_and_a_long_error_is_cut_on_a_character_boundary() {
        let stats = Stats::default();
        assert_eq!(stats.last_reload(), None);
        stats.reloaded(5, Some("config.json: targets[0].port: bad".into()));
        let last = stats.last_reload().expect("recorded");
        assert_eq!(last.at_ms, 5);
        assert_eq!(
            last.error.as_deref(),
            Some("config.json: targets[0].port: bad")
        );
        stats.reloaded(9, Some("é".repeat(LastReload::MAX_ERROR)));
        let cut = stats.last_reload().and_then(|l| l.error).expect("an error");
        assert!(
            cut.len() <= LastReload::MAX_ERROR && cut.ends_with('…'),
            "{}",
            cut.len()
        );
        stats.reloaded(12, None);
        assert_eq!(
            stats.last_reload(),
            Some(LastReload {
                at_ms: 12,
                error: None
            })
        );
    }

    #[test]
    fn adding_another_histogram_keeps_equal_buckets_and_moves_others_up() {
        let h = Histogram::new(&CONNECT_BUCKETS_US);
        h.record(Duration::from_micros(50));
        let other = Histogram::new(&CONNECT_BUCKETS_US);
        other.record(Duration::from_micros(300));
        other.record(Duration::from_secs(100));
        let o = other.snapshot();
        h.add(o.bounds_us, &o.counts, o.sum_us);
        let s = h.snapshot();
        assert_eq!(s.count(), 3);
        assert_eq!((s.counts[0], s.counts[2]), (1, 1));
        assert_eq!(s.counts[CONNECT_BUCKETS_US.len()], 1);
        assert_eq!(s.sum_us, 50 + 300 + 100_000_000);
        // Bounds this histogram does not have: a bucket up to 200 µs lands in the 250 µs one.
        h.add(&[200], &[4, 1], 10);
        let s = h.snapshot();
        assert_eq!(s.counts[1], 4);
        assert_eq!(s.counts[CONNECT_BUCKETS_US.len()], 2);
    }

    #[test]
    fn counters_are_added_by_name_and_unknown_names_skipped() {
        let stats = Stats::default();
        assert!(add_named(&stats.named(), "accepted", 5));
        assert!(add_named(&stats.named(), "rejected_no_target", 2));
        assert!(!add_named(&stats.named(), "from_the_future", 1));
        assert_eq!(stats.accepted.load(Ordering::Relaxed), 5);
        assert_eq!(stats.rejected(Reject::NoTarget), 2);
        let names: std::collections::HashSet<_> = stats.named().map(|(n, _)| n).into();
        assert_eq!(names.len(), stats.named().len(), "names are unique");
    }
}
