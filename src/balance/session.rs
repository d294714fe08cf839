//! The session table: which target each client is pinned to (a client is its address masked
//! to `clientPrefix`, see `addr.rs`), shared by all worker threads.
//!
//! LoadBalancer.js semantics: a client with an open connection, or whose last connection
//! closed less than `sessionExpiry` ago, stays on the target it is on even if the hash now says
//! otherwise (say a failed target came back and the hash points there again). It moves only
//! when its target is deactivated or removed.
//!
//! The table is sharded: a client's shard is chosen by its hash key, and every decision about
//! one client (look up, pick, pin, move) is made under that shard's lock, so two connections
//! from one client that race can never be pinned to two different targets. Shards keep the
//! lock short and uncontended: the critical section is a hash-map probe and at most one
//! rendezvous pick.
//!
//! The table is bounded by `maxSessions`: past it, clients are still hashed to a target, just
//! not pinned. Expired sessions are swept every `sessionExpiryInterval`; a lookup also ignores
//! a session that has expired but not been swept yet.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::target::TargetState;

/// Number of shards: a power of two, well above the number of worker threads, and large enough
/// that the sweep's pass over one shard is short even with a million sessions (about a
/// thousand entries each): a connection that needs a shard the sweep holds waits for that
/// long at most (`benches/sweep.rs` measures the longest hold).
const SHARDS: usize = 1024;
const _: () = assert!(SHARDS.is_power_of_two() && SHARDS > 1);

/// One client's pin.
#[derive(Debug)]
pub struct Session {
    /// The target this client is pinned to.
    pub target: Arc<TargetState>,
    /// Connections from this client that are open (or still connecting).
    pub open: u32,
    /// When the last connection closed (clock ms); meaningful when `open == 0`.
    pub last_close_ms: u64,
}

impl Session {
    /// Still pins its client: a connection is open, or the last closed less than
    /// `expiry_ms` ago.
    pub fn is_live(&self, now_ms: u64, expiry_ms: u64) -> bool {
        self.open > 0 || now_ms.saturating_sub(self.last_close_ms) < expiry_ms
    }
}

type Shard = HashMap<IpAddr, Session, ahash::RandomState>;

/// The shared session table.
#[derive(Debug)]
pub struct Sessions {
    shards: Box<[Mutex<Shard>]>,
    /// Sessions in the table (all shards), for `maxSessions` and the `sessions` gauge.
    len: AtomicUsize,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions::new()
    }
}

impl Sessions {
    pub fn new() -> Sessions {
        let shards = (0..SHARDS)
            .map(|_| Mutex::new(Shard::with_hasher(ahash::RandomState::new())))
            .collect();
        Sessions {
            shards,
            len: AtomicUsize::new(0),
        }
    }

    /// Locks the shard of the client whose hash key is `key` (from `hash::client_key`).
    pub fn lock(&self, key: u64) -> ShardGuard<'_> {
        // The key is already a well-mixed hash; its top bits pick the shard.
        let index = (key >> (64 - SHARDS.trailing_zeros())) as usize;
        let guard = self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        ShardGuard {
            guard,
            len: &self.len,
        }
    }

    /// Number of sessions in the table.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// [`Sessions::sweep_timed`], returning how many were removed.
    #[cfg(test)]
    pub fn sweep(&self, now_ms: u64, expiry_ms: u64) -> usize {
        self.sweep_timed(now_ms, expiry_ms).removed
    }

    /// Removes sessions that have expired: no open connection and the last one closed at
    /// least `expiry_ms` ago. Locks one shard at a time, and measures the longest time one
    /// shard was held.
    pub fn sweep_timed(&self, now_ms: u64, expiry_ms: u64) -> Swept {
        let mut removed = 0;
        let mut longest_hold = std::time::Duration::ZERO;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            let locked = std::time::Instant::now();
            let before = shard.len();
            shard.retain(|_, s| s.is_live(now_ms, expiry_ms));
            removed += before - shard.len();
            drop(shard);
            longest_hold = longest_hold.max(locked.elapsed());
        }
        self.len.fetch_sub(removed, Ordering::Relaxed);
        Swept {
            removed,
            longest_hold,
        }
    }
}

/// What a sweep did.
#[derive(Debug, Clone, Copy)]
pub struct Swept {
    /// Sessions removed.
    pub removed: usize,
    /// The longest time one shard was locked (measured from after the lock was taken).
    pub longest_hold: std::time::Duration,
}

/// An upgrade (design §13) hands the table over whole.
impl Sessions {
    /// Every session: client, target, open connections, last close. Locks one shard at a time.
    pub fn export(&self) -> Vec<(IpAddr, Arc<TargetState>, u32, u64)> {
        let mut all = Vec::with_capacity(self.len());
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            all.extend(
                shard
                    .iter()
                    .map(|(ip, s)| (*ip, s.target.clone(), s.open, s.last_close_ms)),
            );
        }
        all
    }

    /// Puts a session handed over by an older process, with no open connection (the
    /// connections handed over open theirs again, see `super::Hold`) and its last close at
    /// `last_close_ms`. `key`: `hash::client_key(client)`.
    pub fn restore(&self, key: u64, client: IpAddr, target: Arc<TargetState>, last_close_ms: u64) {
        let mut shard = self.lock(key);
        let session = Session {
            target,
            open: 0,
            last_close_ms,
        };
        if shard.guard.insert(client, session).is_none() {
            self.len.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A locked shard: the place where one client's decisions are made atomically.
pub struct ShardGuard<'a> {
    guard: MutexGuard<'a, Shard>,
    len: &'a AtomicUsize,
}

impl ShardGuard<'_> {
    pub fn get_mut(&mut self, ip: &IpAddr) -> Option<&mut Session> {
        self.guard.get_mut(ip)
    }

    /// Whether [`ShardGuard::insert`] of `ip` would pin it now: it has an entry, or the table
    /// has room for one more (other shards may fill it meanwhile; then `insert` says no).
    pub fn can_pin(&self, ip: &IpAddr, max: usize) -> bool {
        self.guard.contains_key(ip) || self.len.load(Ordering::Relaxed) < max
    }

    /// Pins `ip` to `target` with one more open connection. A session already there (expired,
    /// or live on a target this connection cannot use) is re-pinned to `target`. Returns false (and pins nothing) when the table already holds `max` sessions.
    pub fn insert(&mut self, ip: IpAddr, target: Arc<TargetState>, max: usize) -> bool {
        if let Some(session) = self.guard.get_mut(&ip) {
            session.target = target;
            session.open += 1;
            return true;
        }
        if self.len.load(Ordering::Relaxed) >= max {
            return false;
        }
        self.len.fetch_add(1, Ordering::Relaxed);
        self.guard.insert(
            ip,
            Session {
                target,
                open: 1,
                last_close_ms: 0,
            },
        );
        true
    }
}
