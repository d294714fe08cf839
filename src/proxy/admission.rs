//! Admission: which accepted connections are proxied, and which are refused at once.
//!
//! A refused connection is accepted and then closed with a reset straight away: a fast,
//! deliberate failure the client sees at once, rather than a connection left in the backlog
//! until the client's own timeout. Refusals are counted by reason
//! (`connections_rejected_total{reason}`) and logged at most once a second per reason, with the
//! number suppressed meanwhile, so a flood cannot flood the log too.
//!
//! Before these checks, a connection from one of stickylb's own outgoing sockets (a target that
//! leads back to the listener) is refused as `loop` (see `own_sockets.rs`). The checks, in
//! order, all read from the connection's config snapshot (so a reload changes them for new
//! connections):
//! 1. `allow`/`deny` (deny wins; a non-empty allow admits only its ranges);
//! 2. `maxConnections`: open client connections, including this one. `0` (the default) derives
//!    it from the file-descriptor limit, see [`derived_max_connections`];
//! 3. `maxConnectionsPerClient`: open connections from this client: its address masked to
//!    `clientPrefix` (by default an IPv6 client's /64), the same client the hash and the
//!    sessions see, so a host cannot get round the limit by rotating its privacy addresses.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::counters::Reject;

/// File descriptors kept out of the connection budget (at least; see
/// [`derived_max_connections`]): listeners, the metrics endpoint, the config watcher, logs, and
/// the idle pooled pipes (at most `splice::MAX_POOLED` for all threads together, two
/// descriptors each, however many worker threads `balancerCount` asks for).
pub const RESERVED_FDS: u64 = 128;

/// The default `maxConnections`: what the fd limit allows. Each proxied connection holds two
/// sockets; splice pipes are taken only while bytes move (and a direction that finds no free
/// descriptor for a pipe copies in userspace instead), so they are not budgeted per
/// connection. The reserve is [`RESERVED_FDS`] or 5 % of the limit, whichever is larger: with
/// a limit of 20,000, (20,000 − 1,000) / 2 = 9,500 connections.
pub fn derived_max_connections(fd_limit: u64) -> u64 {
    let reserve = RESERVED_FDS.max(fd_limit / 20);
    (fd_limit.saturating_sub(reserve) / 2).max(1)
}

/// Open connections per client (the caller masks the address to `clientPrefix`), only kept
/// when `maxConnectionsPerClient` is set.
#[derive(Debug)]
pub struct ClientCounts {
    shards: Box<[Mutex<HashMap<IpAddr, u32, ahash::RandomState>>]>,
}

const SHARDS: usize = 32;

impl Default for ClientCounts {
    fn default() -> Self {
        ClientCounts {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl ClientCounts {
    fn shard(
        &self,
        ip: &IpAddr,
    ) -> std::sync::MutexGuard<'_, HashMap<IpAddr, u32, ahash::RandomState>> {
        let key = crate::balance::hash::client_key(*ip);
        self.shards[(key >> 59) as usize % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one more connection from `ip` unless it already has `max` open.
    pub fn try_open(&self, ip: IpAddr, max: u64) -> bool {
        let mut shard = self.shard(&ip);
        let open = shard.entry(ip).or_insert(0);
        if u64::from(*open) >= max {
            if *open == 0 {
                shard.remove(&ip);
            }
            return false;
        }
        *open += 1;
        true
    }

    /// Counts one more connection from `ip` whatever the limit: a connection handed over by an
    /// upgrade, which was admitted already.
    pub fn open(&self, ip: IpAddr) {
        *self.shard(&ip).entry(ip).or_insert(0) += 1;
    }

    pub fn close(&self, ip: IpAddr) {
        let mut shard = self.shard(&ip);
        if let Some(open) = shard.get_mut(&ip) {
            *open -= 1;
            if *open == 0 {
                shard.remove(&ip);
            }
        }
    }

    /// Client addresses with an open connection.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Logs refusals at most once a second per reason.
#[derive(Debug, Default)]
pub struct RefusalLog {
    /// Per reason: the second (since an arbitrary epoch) of the last line logged.
    last_second: [AtomicU64; Reject::COUNT],
    /// Per reason: refusals not logged since the last line.
    suppressed: [AtomicU64; Reject::COUNT],
}

impl RefusalLog {
    /// Logs a refusal (at most once a second per reason); `detail` says more where the
    /// reason alone does not (why a PROXY header was refused).
    pub fn refused(&self, reason: Reject, detail: &'static str, client: IpAddr, now_ms: u64) {
        let i = reason as usize;
        let second = now_ms / 1000 + 1;
        let last = self.last_second[i].load(Ordering::Relaxed);
        if last == second
            || self.last_second[i]
                .compare_exchange(last, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.suppressed[i].fetch_add(1, Ordering::Relaxed);
            return;
        }
        let suppressed = self.suppressed[i].swap(0, Ordering::Relaxed);
        tracing::warn!(
            reason = reason.label(),
            detail,
            %client,
            similar_in_the_last_second = suppressed,
            "connection refused"
        );
    }
}

/// A connection's hold on its client's per-address count (when `maxConnectionsPerClient` is
/// set); released on drop.
pub struct ClientSlot<'a>(Option<(&'a ClientCounts, IpAddr)>);

impl<'a> ClientSlot<'a> {
    /// No count is kept for this connection.
    pub fn none() -> ClientSlot<'a> {
        ClientSlot(None)
    }

    pub fn held(counts: &'a ClientCounts, ip: IpAddr) -> ClientSlot<'a> {
        ClientSlot(Some((counts, ip)))
    }
}

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        if let Some((counts, ip)) = self.0 {
            counts.close(ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_derived_limit_fits_the_fd_budget() {
        assert_eq!(derived_max_connections(20_000), 9_500);
        assert_eq!(derived_max_connections(256), 64);
        assert_eq!(derived_max_connections(10), 1);
    }

    #[test]
    fn per_client_counts_open_and_close() {
        let counts = ClientCounts::default();
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        assert!(counts.try_open(ip, 2));
        assert!(counts.try_open(ip, 2));
        assert!(!counts.try_open(ip, 2));
        counts.close(ip);
        assert!(counts.try_open(ip, 2));
        counts.close(ip);
        counts.close(ip);
        assert!(
            counts.is_empty(),
            "no entry is left for a client with nothing open"
        );
    }
}
