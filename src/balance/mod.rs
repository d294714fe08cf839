//! The choice of a target for a client: hash, health, sessions and fail-over, combined.
//!
//! - [`hash`]: the fixed client hash and the weighted rendezvous table (the pure mapping).
//! - [`target`]: each target's runtime state (deactivation window, open connections,
//!   counters), kept by identity across reloads.
//! - [`session`]: the shared table that pins a client to its target while it is active and for
//!   `sessionExpiry` after.
//!
//! A [`Balancer`] is one config generation: the config, its rendezvous table and the states of
//! its targets. It is what the `ArcSwap` store holds; a new connection takes one snapshot and
//! uses it to the end, so it sees all of one config. [`Shared`] is what outlives generations:
//! the registry of target states, the sessions, the clock and the counters.
//!
//! A client connection walks a [`Route`]: the first target (its session's, or the hash's
//! best usable one), then, after each failed connect, the next one. Each target is tried at
//! most once per connection.

pub mod hash;
pub(crate) mod session;
pub(crate) mod target;

use std::net::IpAddr;
use std::sync::Arc;

use crate::clock::{duration_ms, Clock};
use crate::config::{Config, TargetSpec};
use crate::counters::Stats;
use hash::Table;
use session::Sessions;
use target::{Registry, TargetState};

/// State that outlives config generations.
#[derive(Debug, Default)]
pub struct Shared {
    pub(crate) registry: Registry,
    pub(crate) sessions: Sessions,
    pub(crate) clock: Clock,
    pub(crate) stats: Stats,
}

impl Shared {
    pub fn new() -> Shared {
        Shared::default()
    }
}

/// One config generation: what a new connection reads from the store.
#[derive(Debug)]
pub struct Balancer {
    pub(crate) config: Arc<Config>,
    table: Table,
    /// The state of each target, aligned with `config.targets`.
    states: Vec<Arc<TargetState>>,
    /// Target seed → index in `states`.
    by_seed: std::collections::HashMap<u64, usize, ahash::RandomState>,
}

impl Balancer {
    /// Builds the generation for `config`, adopting the runtime state of every target identity
    /// the registry already knows.
    pub fn new(config: Config, shared: &Shared) -> Balancer {
        let states = shared.registry.adopt(&config.targets);
        let table = Table::new(
            &states
                .iter()
                .zip(&config.targets)
                .map(|(s, t)| (s.seed, t.weight))
                .collect::<Vec<_>>(),
        );
        let by_seed = states
            .iter()
            .enumerate()
            .map(|(i, s)| (s.seed, i))
            .collect();
        Balancer {
            config: Arc::new(config),
            table,
            states,
            by_seed,
        }
    }

    pub(crate) fn states(&self) -> &[Arc<TargetState>] {
        &self.states
    }

    /// Starts the route of a new connection from `client`: picks its first target and, when
    /// sticky, pins the client to it (or follows its live session).
    pub fn route<'a>(&'a self, shared: &'a Shared, client: IpAddr) -> Route<'a> {
        let ip = crate::addr::canonical_ip(client);
        let key = hash::client_key(ip);
        let mut route = Route {
            balancer: self,
            shared,
            ip,
            key,
            tried: Tried::default(),
            pinned: false,
            current: 0,
        };
        route.current = route.first();
        route
    }

    /// Where `state` sits in this generation's targets. A map by seed (unique per identity)
    /// rather than a scan, so routing a returning client costs the same at 1,024 targets as at 8.
    fn index_of(&self, state: &Arc<TargetState>) -> Option<usize> {
        self.by_seed
            .get(&state.seed)
            .copied()
            .filter(|&i| Arc::ptr_eq(&self.states[i], state))
    }
}

/// The targets tried so far by one connection: a bit set, inline up to 64 targets.
#[derive(Debug, Default)]
struct Tried {
    low: u64,
    high: Vec<u64>,
}

impl Tried {
    fn contains(&self, i: usize) -> bool {
        if i < 64 {
            self.low & (1 << i) != 0
        } else {
            let (word, bit) = ((i - 64) / 64, (i - 64) % 64);
            self.high.get(word).is_some_and(|w| w & (1 << bit) != 0)
        }
    }

    fn insert(&mut self, i: usize) {
        if i < 64 {
            self.low |= 1 << i;
        } else {
            let (word, bit) = ((i - 64) / 64, (i - 64) % 64);
            if self.high.len() <= word {
                self.high.resize(word + 1, 0);
            }
            self.high[word] |= 1 << bit;
        }
    }
}

/// The fail-over walk of one client connection. While it lives, the client's session counts
/// it as open (so the session cannot expire under it); dropping it closes that count.
#[derive(Debug)]
pub struct Route<'a> {
    balancer: &'a Balancer,
    shared: &'a Shared,
    ip: IpAddr,
    key: u64,
    tried: Tried,
    /// Whether this connection holds an open count in the client's session.
    pinned: bool,
    current: usize,
}

impl<'a> Route<'a> {
    /// Index (into the config's targets) of the target to connect to now.
    pub fn current(&self) -> usize {
        self.current
    }

    pub(crate) fn target(&self) -> &'a TargetSpec {
        &self.balancer.config.targets[self.current]
    }

    pub(crate) fn state(&self) -> &'a Arc<TargetState> {
        &self.balancer.states[self.current]
    }

    fn config(&self) -> &Config {
        &self.balancer.config
    }

    fn first(&mut self) -> usize {
        let now = self.shared.clock.now_ms();
        if !self.config().stickiness {
            return self.choose_first(now);
        }
        let expiry_ms = duration_ms(self.config().session_expiry);
        let mut shard = self.shared.sessions.lock(self.key);
        if let Some(session) = shard.get_mut(&self.ip) {
            // `keeps_clients`, not `is_usable`: a drained target keeps its live sessions.
            if session.is_live(now, expiry_ms) && session.target.keeps_clients(now) {
                if let Some(i) = self.balancer.index_of(&session.target) {
                    session.open += 1;
                    self.pinned = true;
                    return i;
                }
            }
        }
        let i = self.choose_first(now);
        self.pinned = shard.insert(
            self.ip,
            self.balancer.states[i].clone(),
            self.config().max_sessions,
        );
        i
    }

    /// The connect to the current target failed: deactivates it for
    /// `targetDeactivationDuration` and moves to the next target, or returns `None` when every
    /// target has been tried once.
    pub fn failed(&mut self) -> Option<usize> {
        let now = self.shared.clock.now_ms();
        let failed = &self.balancer.states[self.current];
        failed.deactivate(now, self.config().target_deactivation);
        self.tried.insert(self.current);
        let next = if self.pinned {
            let mut shard = self.shared.sessions.lock(self.key);
            // An open connection keeps its session in the table, so it is there.
            let session = shard.get_mut(&self.ip)?;
            // Another connection of this client may already have moved the session: follow
            // it, so that the client's connections converge on one target. (A session still on
            // the failed target is not followed: that target was just tried and deactivated.)
            let next = self
                .balancer
                .index_of(&session.target)
                .filter(|&j| !self.tried.contains(j) && session.target.keeps_clients(now))
                .or_else(|| self.choose_untried(now));
            if let Some(j) = next {
                session.target = self.balancer.states[j].clone();
            }
            next
        } else {
            self.choose_untried(now)
        };
        if let Some(j) = next {
            self.current = j;
            self.shared
                .stats
                .retries
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        next
    }

    /// The first target of a connection (nothing tried yet, and a config has at least one
    /// target, so there always is one).
    fn choose_first(&self, now: u64) -> usize {
        self.choose_untried(now)
            .expect("a config has at least one target")
    }

    /// The best untried target: by the hash (or two random choices when not sticky) among
    /// usable ones; if none is usable, the first untried in hash order, so that stale
    /// deactivation windows never black-hole a fleet that has recovered. `None` once every
    /// target has been tried. Runs under the client's session lock: one or two passes over
    /// the targets, no allocation.
    fn choose_untried(&self, now: u64) -> Option<usize> {
        let states = &self.balancer.states;
        let table = &self.balancer.table;
        let usable = |i: usize| !self.tried.contains(i) && states[i].is_usable(now);
        let picked = if self.config().stickiness {
            table.pick(self.key, usable)
        } else {
            table.pick_two_choices(hash::random_u64(), usable, |i| {
                states[i].active.load(std::sync::atomic::Ordering::Relaxed)
            })
        };
        picked.or_else(|| {
            let key = if self.config().stickiness {
                self.key
            } else {
                hash::random_u64()
            };
            table.pick(key, |i| !self.tried.contains(i))
        })
    }
}

impl Drop for Route<'_> {
    fn drop(&mut self) {
        if !self.pinned {
            return;
        }
        let mut shard = self.shared.sessions.lock(self.key);
        if let Some(session) = shard.get_mut(&self.ip) {
            session.open = session.open.saturating_sub(1);
            if session.open == 0 {
                session.last_close_ms = self.shared.clock.now_ms();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::path::Path;
    use std::time::Duration;

    fn config(targets: usize, extra: &str) -> Config {
        let list: Vec<String> = (0..targets)
            .map(|i| format!(r#"{{"host": "127.0.0.1", "port": {}}}"#, 10_000 + i))
            .collect();
        let text = format!(
            r#"{{"sourcePort": 8080, "targets": [{}] {extra}}}"#,
            list.join(",")
        );
        Config::parse(Path::new("test.json"), &text).expect("valid")
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 20, 0, n))
    }

    #[tokio::test(start_paused = true)]
    async fn racing_connections_that_fail_over_converge_on_one_target() {
        let shared = Shared::new();
        let balancer = Balancer::new(config(5, ""), &shared);
        let mut a = balancer.route(&shared, ip(1));
        let mut b = balancer.route(&shared, ip(1));
        assert_eq!(a.current(), b.current(), "the second follows the session");
        let first = a.current();
        let moved = a.failed().expect("another target");
        assert_ne!(moved, first);
        // b's connect to the same target fails too: it follows where a moved the session,
        // rather than choosing for itself.
        assert_eq!(b.failed(), Some(moved));
    }

    #[test]
    fn threads_racing_for_a_new_client_get_one_target() {
        let shared = Shared::new();
        let balancer = Balancer::new(config(16, ""), &shared);
        for n in 0..50u8 {
            let barrier = std::sync::Barrier::new(4);
            let picks: Vec<usize> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..4)
                    .map(|_| {
                        s.spawn(|| {
                            barrier.wait();
                            let route = balancer.route(&shared, ip(n));
                            let picked = route.current();
                            std::mem::forget(route);
                            picked
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert!(picks.iter().all(|&p| p == picks[0]), "{picks:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_moved_client_stays_while_its_session_lives_then_follows_the_hash() {
        let shared = Shared::new();
        let balancer = Balancer::new(
            config(
                4,
                r#", "targetDeactivationDuration": 1000, "sessionExpiry": 5000"#,
            ),
            &shared,
        );
        let mut route = balancer.route(&shared, ip(2));
        let home = route.current();
        let moved = route.failed().unwrap();
        drop(route);
        // The window of `home` ends after 1 s, but the session (5 s after the last close)
        // keeps the client where it moved.
        tokio::time::advance(Duration::from_millis(4000)).await;
        assert!(balancer.states()[home].is_up(shared.clock.now_ms()));
        let again = balancer.route(&shared, ip(2));
        assert_eq!(again.current(), moved, "a live session outranks the hash");
        drop(again);
        // 5 s after the last close, the session has expired: the hash decides again.
        tokio::time::advance(Duration::from_millis(5000)).await;
        let back = balancer.route(&shared, ip(2));
        assert_eq!(back.current(), home);
    }

    #[tokio::test(start_paused = true)]
    async fn sweep_removes_only_expired_sessions() {
        let shared = Shared::new();
        let balancer = Balancer::new(config(3, r#", "sessionExpiry": 1000"#), &shared);
        let open = balancer.route(&shared, ip(3));
        drop(balancer.route(&shared, ip(4)));
        assert_eq!(shared.sessions.len(), 2);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(shared.sessions.sweep(shared.clock.now_ms(), 1000), 0);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(shared.sessions.sweep(shared.clock.now_ms(), 1000), 1);
        assert_eq!(shared.sessions.len(), 1, "the open one stays");
        drop(open);
    }

    #[test]
    fn past_max_sessions_clients_are_hashed_but_not_pinned() {
        let shared = Shared::new();
        let balancer = Balancer::new(config(3, r#", "maxSessions": 1"#), &shared);
        let a = balancer.route(&shared, ip(5));
        let b = balancer.route(&shared, ip(6));
        assert_eq!(shared.sessions.len(), 1);
        assert!(a.pinned && !b.pinned);
    }

    #[test]
    fn a_session_on_a_removed_target_moves_and_state_carries_over() {
        let shared = Shared::new();
        let old = Balancer::new(config(3, ""), &shared);
        // Find a client on the last target, whose removal is easy to express.
        let client = (1..=255)
            .map(ip)
            .find(|&c| {
                let r = old.route(&shared, c);
                r.current() == 2
            })
            .expect("some client on target 2");
        let on_removed = old.route(&shared, client);
        old.states()[0].deactivate(shared.clock.now_ms(), Duration::from_secs(60));
        let new = Balancer::new(config(2, ""), &shared);
        assert!(
            Arc::ptr_eq(&old.states()[0], &new.states()[0]),
            "state kept by identity"
        );
        assert!(!new.states()[0].is_up(shared.clock.now_ms()));
        let moved = new.route(&shared, client);
        assert_eq!(moved.current(), 1, "target 2 is gone, target 0 is down");
        drop(on_removed);
    }

    #[test]
    fn without_stickiness_nothing_is_pinned() {
        let shared = Shared::new();
        let balancer = Balancer::new(config(3, r#", "stickiness": false"#), &shared);
        let _r = balancer.route(&shared, ip(7));
        assert_eq!(shared.sessions.len(), 0);
    }
}
