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
//!
//! Who is "one client" is decided here, once per connection: the address masked to
//! `clientPrefix` (`addr::ClientPrefix::client`), so that the hash key and the session belong
//! to the client's /64 (IPv6, by default) rather than to one of its rotating addresses.
//!
//! With `hashBalanceFactor`, a client that gets a *new* session (none live, or its target
//! unusable) is placed by [`hash::Table::pick_bounded`]: its best-ranked usable target unless
//! that one is at the bound, else its next-ranked one under the bound; the session then keeps
//! it there like any other. A client with a live session follows it whatever the loads, so the
//! bound never splits a client, and it never moves a client that is already placed.

pub mod hash;
pub(crate) mod session;
pub(crate) mod target;

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use std::collections::HashMap;

use crate::clock::{self, duration_ms, Clock};
use crate::config::{Config, TargetSpec};
use crate::counters::{add_named, Stats};
use crate::handover;
use crate::sockets::Fault;
use hash::Table;
use session::Sessions;
pub use session::Swept;
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

    /// Removes the sessions that expired `expiry` after their last connection closed, one
    /// shard lock at a time (what the server's sweeper runs every `sessionExpiryInterval`),
    /// and says how many and the longest a shard was held.
    pub fn sweep_sessions(&self, expiry: std::time::Duration) -> Swept {
        self.sessions
            .sweep_timed(self.clock.now_ms(), duration_ms(expiry))
    }

    /// Sessions in the table.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Records, for the status page, that a reload attempt ended now: applied (`rejected` is
    /// `None`), or rejected for the reason given. The reason is formatted here, once per
    /// reload.
    pub(crate) fn record_reload(&self, rejected: Option<&dyn std::fmt::Display>) {
        let error = rejected.map(|reason| reason.to_string());
        self.stats.reloaded(self.clock.now_ms(), error);
    }

    /// What an upgrade hands to the new process (design §13): the clock, the counters, every
    /// target identity's state, and the session table.
    pub fn export(&self) -> handover::State {
        let clock_ms = self.clock.now_ms();
        let states = self.registry.all();
        let mut targets: Vec<handover::Target> = states.iter().map(|s| s.export()).collect();
        let mut index: HashMap<*const TargetState, u32, ahash::RandomState> = states
            .iter()
            .enumerate()
            .map(|(i, s)| (Arc::as_ptr(s), i as u32))
            .collect();
        let mut sessions = Vec::with_capacity(self.sessions.len());
        for (client, target, open, last_close_ms) in self.sessions.export() {
            let target = *index.entry(Arc::as_ptr(&target)).or_insert_with(|| {
                // Not in the registry (it always is: a session holds its state there).
                targets.push(target.export());
                targets.len() as u32 - 1
            });
            sessions.push(handover::Session {
                client,
                target,
                open,
                last_close_ms,
            });
        }
        let stats = &self.stats;
        let h = stats.connection_duration.snapshot();
        handover::State {
            clock_ms,
            monotonic_ns: clock::monotonic_ns(),
            counters: stats
                .named()
                .iter()
                .map(|(name, c)| (name.to_string(), c.load(Ordering::Relaxed)))
                .collect(),
            last_reload_failed: stats.last_reload_failed.load(Ordering::Relaxed),
            histograms: vec![handover::Histogram {
                name: CONNECTION_DURATION.into(),
                bounds_us: h.bounds_us.to_vec(),
                counts: h.counts,
                sum_us: h.sum_us,
            }],
            targets,
            sessions,
            last_reload: stats.last_reload().map(|r| handover::Reload {
                at_ms: r.at_ms,
                error: r.error.map(|e| e.to_string()),
            }),
        }
    }

    /// The shared state of a new process from the state an older one handed over: its clock
    /// goes on from the old one's (plus the time the state took to arrive), counters and
    /// histograms start from the old counts, every target identity (with its history) and
    /// session is there, and so is the last reload's outcome (for the status page).
    /// Sessions have no open connection yet: each connection handed over opens its own again
    /// ([`Balancer::hold`]); a session whose connections stay in the old process counts as
    /// closed at the moment the state was taken.
    ///
    /// Also returns every target state, to be held until the connections handed over have
    /// taken theirs (a config generation forgets removed identities that nothing holds).
    pub fn restored(state: &handover::State) -> Result<(Shared, Vec<Arc<TargetState>>), String> {
        let transit_ms = clock::monotonic_ns().saturating_sub(state.monotonic_ns) / 1_000_000;
        let shared = Shared {
            clock: Clock::resumed(state.clock_ms.saturating_add(transit_ms)),
            ..Shared::default()
        };
        shared.add_stats(&state.counters, &state.histograms);
        shared
            .stats
            .last_reload_failed
            .store(state.last_reload_failed, Ordering::Relaxed);
        if let Some(reload) = &state.last_reload {
            shared.stats.reloaded(reload.at_ms, reload.error.clone());
        }
        let mut held: Vec<Arc<TargetState>> = Vec::with_capacity(state.targets.len());
        let mut seen = std::collections::HashSet::with_capacity(state.targets.len());
        for target in &state.targets {
            if !seen.insert(target.id.as_str()) {
                return Err(format!("target {:?} is in the state twice", target.id));
            }
            let restored = shared
                .registry
                .get_or_absent(&target.id, shared.clock.now_ms());
            restored.restore(target);
            held.push(restored);
        }
        for session in &state.sessions {
            let target = held.get(session.target as usize).ok_or_else(|| {
                format!("a session on target {} of {}", session.target, held.len())
            })?;
            let last_close_ms = if session.open > 0 {
                state.clock_ms
            } else {
                session.last_close_ms
            };
            let key = hash::client_key(session.client);
            shared
                .sessions
                .restore(key, session.client, target.clone(), last_close_ms);
        }
        Ok((shared, held))
    }

    /// Adds what the old process counted after it handed its state over (`to` less `from`:
    /// connections that were still connecting there): the counters then never go backwards and
    /// lose nothing.
    pub fn add_growth(&self, from: &handover::State, to: &handover::State) {
        let grown = |to: &[(String, u64)], from: &[(String, u64)]| -> Vec<(String, u64)> {
            to.iter()
                .map(|(name, v)| {
                    let before = from.iter().find(|(n, _)| n == name).map_or(0, |(_, b)| *b);
                    (name.clone(), v.saturating_sub(before))
                })
                .collect()
        };
        let histograms: Vec<handover::Histogram> = to
            .histograms
            .iter()
            .map(|h| histogram_growth(h, from.histograms.iter().find(|f| f.name == h.name)))
            .collect();
        self.add_stats(&grown(&to.counters, &from.counters), &histograms);
        for target in &to.targets {
            let before = from.targets.iter().find(|t| t.id == target.id);
            let growth = handover::Target {
                counters: grown(&target.counters, before.map_or(&[], |b| &b.counters)),
                connect_duration: histogram_growth(
                    &target.connect_duration,
                    before.map(|b| &b.connect_duration),
                ),
                ..handover::Target::default()
            };
            self.registry
                .get_or_absent(&target.id, self.clock.now_ms())
                .add_counts(&growth);
        }
    }

    /// A connection of client `ip` (hash key `key`) that held an open count in its session
    /// closed: the session's expiry starts with its last connection.
    fn close_session(&self, key: u64, ip: &IpAddr) {
        let mut shard = self.sessions.lock(key);
        if let Some(session) = shard.get_mut(ip) {
            session.open = session.open.saturating_sub(1);
            if session.open == 0 {
                session.last_close_ms = self.clock.now_ms();
            }
        }
    }

    fn add_stats(&self, counters: &[(String, u64)], histograms: &[handover::Histogram]) {
        let named = self.stats.named();
        for (name, value) in counters {
            if !add_named(&named, name, *value) {
                tracing::debug!(counter = %name, "unknown counter in the handover; skipped");
            }
        }
        for h in histograms {
            if h.name == CONNECTION_DURATION {
                self.stats
                    .connection_duration
                    .add(&h.bounds_us, &h.counts, h.sum_us);
            }
        }
    }
}

/// The name `connection_duration_seconds` travels under in a handover.
const CONNECTION_DURATION: &str = "connection_duration";

/// `to` less `from` (the same histogram read earlier), bucket by bucket.
fn histogram_growth(
    to: &handover::Histogram,
    from: Option<&handover::Histogram>,
) -> handover::Histogram {
    let same = from.filter(|f| f.bounds_us == to.bounds_us);
    handover::Histogram {
        name: to.name.clone(),
        bounds_us: to.bounds_us.clone(),
        counts: match same {
            Some(f) => to
                .counts
                .iter()
                .zip(&f.counts)
                .map(|(t, f)| t.saturating_sub(*f))
                .collect(),
            None => to.counts.clone(),
        },
        sum_us: to.sum_us.saturating_sub(same.map_or(0, |f| f.sum_us)),
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
    by_seed: HashMap<u64, usize, ahash::RandomState>,
}

impl Balancer {
    /// Builds the generation for `config`, adopting the runtime state of every target identity
    /// the registry already knows.
    pub fn new(config: Config, shared: &Shared) -> Balancer {
        let states = shared
            .registry
            .adopt(&config.targets, shared.clock.now_ms());
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

    /// Starts the route of a new connection from `client` (its full address, as accepted):
    /// picks its first target and, when sticky, pins the client to it (or follows its live
    /// session). The client is `client` masked to this generation's `clientPrefix`.
    pub fn route<'a>(&'a self, shared: &'a Shared, client: IpAddr) -> Route<'a> {
        let ip = self.config.client_prefix.client(client);
        let key = hash::client_key(ip);
        let mut route = Route {
            balancer: self,
            shared,
            ip,
            key,
            tried: Tried::default(),
            attempts: 1,
            pinned: false,
            current: 0,
            assigned: false,
        };
        route.current = route.first();
        route.assign();
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

impl Balancer {
    /// The hold of a connection that an upgrade handed over from an older process, on
    /// `target`: as its [`Route`] did there, it counts in the target's `assigned` load and,
    /// when it held an open count in its client's session there (`pinned`), in that session
    /// (made again, on `target`, if the table does not have it). `client` is the connection's
    /// full address, masked here with this generation's `clientPrefix`.
    pub fn hold<'a>(
        &self,
        shared: &'a Shared,
        client: IpAddr,
        target: Arc<TargetState>,
        pinned: bool,
    ) -> Hold<'a> {
        let ip = self.config.client_prefix.client(client);
        let key = hash::client_key(ip);
        let pinned = pinned && self.config.stickiness && {
            let mut shard = shared.sessions.lock(key);
            match shard.get_mut(&ip) {
                Some(session) => {
                    session.open += 1;
                    true
                }
                None => shard.insert(ip, target.clone(), self.config.max_sessions),
            }
        };
        target.assigned.fetch_add(1, Ordering::Relaxed);
        Hold {
            shared,
            ip,
            key,
            pinned,
            target,
        }
    }
}

/// What [`Balancer::hold`] holds for a handed-over connection; released on drop, as a
/// [`Route`] is.
#[derive(Debug)]
pub struct Hold<'a> {
    shared: &'a Shared,
    ip: IpAddr,
    key: u64,
    pinned: bool,
    target: Arc<TargetState>,
}

impl Hold<'_> {
    /// The target the connection is on.
    pub fn target(&self) -> &Arc<TargetState> {
        &self.target
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.target.assigned.fetch_sub(1, Ordering::Relaxed);
        if self.pinned {
            self.shared.close_session(self.key, &self.ip);
        }
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
/// it as open (so the session cannot expire under it), and its current target counts it in
/// `assigned` (the load `hashBalanceFactor` bounds); dropping it closes both counts. So it
/// must live as long as the connection.
#[derive(Debug)]
pub struct Route<'a> {
    balancer: &'a Balancer,
    shared: &'a Shared,
    /// The client: its address masked to `clientPrefix`.
    ip: IpAddr,
    key: u64,
    tried: Tried,
    /// Connect attempts made so far (the current one included), for `maxConnectAttempts`.
    attempts: u32,
    /// Whether this connection holds an open count in the client's session.
    pinned: bool,
    current: usize,
    /// Whether this connection counts in `assigned` of the current target.
    assigned: bool,
}

impl<'a> Route<'a> {
    /// Index (into the config's targets) of the target to connect to now.
    pub fn current(&self) -> usize {
        self.current
    }

    /// Whether this connection holds an open count in its client's session.
    pub fn pinned(&self) -> bool {
        self.pinned
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
            return self.choose_first(now, false);
        }
        let expiry_ms = duration_ms(self.config().session_expiry);
        let max_sessions = self.config().max_sessions;
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
        // The load bound applies only to a client that will be pinned: a placement that no
        // session remembers would scatter the client's connections as the loads change, so a
        // client past `maxSessions` follows the hash alone.
        let bounded = shard.can_pin(&self.ip, max_sessions);
        let i = self.choose_first(now, bounded);
        self.pinned = shard.insert(self.ip, self.balancer.states[i].clone(), max_sessions);
        i
    }

    /// Counts this connection in `assigned` of the current target.
    fn assign(&mut self) {
        let state = &self.balancer.states[self.current];
        state.assigned.fetch_add(1, Ordering::Relaxed);
        self.assigned = true;
    }

    /// Takes this connection out of `assigned` of the current target.
    fn unassign(&mut self) {
        if std::mem::take(&mut self.assigned) {
            let state = &self.balancer.states[self.current];
            state.assigned.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The connect to the current target failed (why: `fault`, which the status page shows):
    /// deactivates it for `targetDeactivationDuration` and moves to the next target, or
    /// returns `None` when every target has been tried once or `maxConnectAttempts` attempts
    /// were made.
    pub fn failed(&mut self, fault: Fault) -> Option<usize> {
        let now = self.shared.clock.now_ms();
        // Off the failed target's load first, so the next choice counts this connection once.
        self.unassign();
        let failed = &self.balancer.states[self.current];
        failed.deactivate(now, self.config().target_deactivation, fault);
        self.tried.insert(self.current);
        if self.attempts >= self.config().max_connect_attempts {
            // `maxConnectAttempts`: the client is not held for more connect timeouts.
            return None;
        }
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
                .or_else(|| self.choose_untried(now, true));
            if let Some(j) = next {
                session.target = self.balancer.states[j].clone();
            }
            next
        } else {
            self.choose_untried(now, false)
        };
        if let Some(j) = next {
            self.current = j;
            self.attempts += 1;
            self.assign();
            self.shared.stats.retries.fetch_add(1, Ordering::Relaxed);
        }
        next
    }

    /// The first target of a connection (nothing tried yet, and a config has at least one
    /// target, so there always is one).
    fn choose_first(&self, now: u64, bounded: bool) -> usize {
        self.choose_untried(now, bounded)
            .expect("a config has at least one target")
    }

    /// The best untried target: by the hash (or two random choices when not sticky) among
    /// usable ones, under the `hashBalanceFactor` bound when `bounded` (the choice will be
    /// pinned) and the factor is on; if none is usable, the first untried in hash order, so
    /// that stale deactivation windows never black-hole a fleet that has recovered. `None`
    /// once every target has been tried. Runs under the client's session lock: a few passes
    /// over the targets, no allocation.
    fn choose_untried(&self, now: u64, bounded: bool) -> Option<usize> {
        let states = &self.balancer.states;
        let table = &self.balancer.table;
        let usable = |i: usize| !self.tried.contains(i) && states[i].is_usable(now);
        let factor = self.config().hash_balance_factor;
        let picked = if !self.config().stickiness {
            table.pick_two_choices(hash::random_u64(), usable, |i| {
                states[i].active.load(Ordering::Relaxed)
            })
        } else if bounded && factor > 0 {
            let load = |i: usize| states[i].assigned.load(Ordering::Relaxed);
            table.pick_bounded(self.key, factor, usable, load).map(|p| {
                if p.overflowed {
                    self.shared
                        .stats
                        .hash_overflows
                        .fetch_add(1, Ordering::Relaxed);
                }
                p.index
            })
        } else {
            table.pick(self.key, usable)
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
        self.unassign();
        if self.pinned {
            self.shared.close_session(self.key, &self.ip);
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
        let moved = a.failed(Fault::Refused).expect("another target");
        assert_ne!(moved, first);
        // b's connect to the same target fails too: it follows where a moved the session,
        // rather than choosing for itself.
        assert_eq!(b.failed(Fault::Refused), Some(moved));
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
        let moved = route.failed(Fault::Refused).unwrap();
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
        old.states()[0].deactivate(
            shared.clock.now_ms(),
            Duration::from_secs(60),
            Fault::Refused,
        );
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

    /// The target the hash ranks first for `client`, health and load ignored.
    fn first_ranked(balancer: &Balancer, client: IpAddr) -> usize {
        let key = hash::client_key(balancer.config.client_prefix.client(client));
        balancer.table.pick(key, |_| true).expect("a target")
    }

    /// The first of `ip(1..=255)`, other than `not`, whose first-ranked target is `target`.
    fn client_ranking_first(balancer: &Balancer, target: usize, not: IpAddr) -> IpAddr {
        (1..=255)
            .map(ip)
            .find(|&c| c != not && first_ranked(balancer, c) == target)
            .expect("some client ranks the target first")
    }

    fn overflows(shared: &Shared) -> u64 {
        shared.stats.hash_overflows.load(Ordering::Relaxed)
    }

    fn v6(s: &str) -> IpAddr {
        s.parse().expect("IPv6 address")
    }

    #[test]
    fn addresses_of_one_ipv6_64_are_one_client() {
        let shared = Shared::new();
        let balancer = Balancer::new(config(16, ""), &shared);
        let a = balancer.route(&shared, v6("2001:db8:1:2::1"));
        let b = balancer.route(&shared, v6("2001:db8:1:2:ffff:eeee:dddd:cccc"));
        assert_eq!(a.current(), b.current());
        assert_eq!(shared.sessions.len(), 1, "one session for the /64");
        assert_eq!(a.ip, v6("2001:db8:1:2::"));
        // With the full address as the client, the two are two clients.
        let shared = Shared::new();
        let config = config(16, r#", "clientPrefix": {"ipv6": 128}"#);
        let balancer = Balancer::new(config, &shared);
        let _a = balancer.route(&shared, v6("2001:db8:1:2::1"));
        let _b = balancer.route(&shared, v6("2001:db8:1:2:ffff:eeee:dddd:cccc"));
        assert_eq!(shared.sessions.len(), 2);
    }

    #[test]
    fn an_ipv4_prefix_makes_a_network_one_client_and_mapped_addresses_are_ipv4() {
        let shared = Shared::new();
        let balancer = Balancer::new(config(16, r#", "clientPrefix": {"ipv4": 24}"#), &shared);
        let a = balancer.route(&shared, ip(1));
        let b = balancer.route(&shared, ip(200));
        let c = balancer.route(&shared, v6("::ffff:127.20.0.77"));
        assert_eq!((a.current(), b.current()), (c.current(), c.current()));
        assert_eq!(shared.sessions.len(), 1);
        assert_eq!(c.ip, "127.20.0.0".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn a_new_client_goes_past_a_target_at_the_bound_and_its_session_keeps_it_there() {
        let shared = Shared::new();
        let balancer = Balancer::new(config(4, r#", "hashBalanceFactor": 125"#), &shared);
        // A hot client with 20 connections: all on its target (a live session is followed
        // whatever the load), which is then far above 125 % of the mean.
        let hot = ip(1);
        let hot_routes: Vec<Route> = (0..20).map(|_| balancer.route(&shared, hot)).collect();
        let h = hot_routes[0].current();
        assert!(hot_routes.iter().all(|r| r.current() == h));
        assert_eq!(overflows(&shared), 0);
        assert_eq!(balancer.states()[h].assigned.load(Ordering::Relaxed), 20);
        // A new client that ranks h first goes to another target, and that is counted.
        let x = client_ranking_first(&balancer, h, hot);
        let placed = balancer.route(&shared, x);
        let moved_to = placed.current();
        assert_ne!(moved_to, h);
        assert_eq!(overflows(&shared), 1);
        // Its session keeps it there: with h idle again, with its first connection still
        // open, and after it closed (within sessionExpiry).
        drop(hot_routes);
        assert_eq!(balancer.states()[h].assigned.load(Ordering::Relaxed), 0);
        assert_eq!(balancer.route(&shared, x).current(), moved_to);
        drop(placed);
        assert_eq!(balancer.route(&shared, x).current(), moved_to);
        // A client that ranks h first and comes now gets h: the bound no longer binds.
        let y = (1..=255)
            .map(ip)
            .find(|&c| c != hot && c != x && first_ranked(&balancer, c) == h)
            .expect("another client of h");
        assert_eq!(balancer.route(&shared, y).current(), h);
        assert_eq!(overflows(&shared), 1);
    }

    #[test]
    fn the_factor_is_ignored_without_stickiness_and_past_max_sessions() {
        for extra in [
            r#", "hashBalanceFactor": 100, "stickiness": false"#,
            r#", "hashBalanceFactor": 100, "maxSessions": 0"#,
        ] {
            let shared = Shared::new();
            let balancer = Balancer::new(config(4, extra), &shared);
            let hot: Vec<Route> = (0..40).map(|_| balancer.route(&shared, ip(1))).collect();
            let busiest = (0..4)
                .max_by_key(|&i| balancer.states()[i].assigned.load(Ordering::Relaxed))
                .unwrap();
            let x = client_ranking_first(&balancer, busiest, ip(1));
            let route = balancer.route(&shared, x);
            if balancer.config.stickiness {
                // Not pinnable: the hash alone, even onto the busiest target.
                assert_eq!(route.current(), busiest, "{extra}");
            }
            assert_eq!(overflows(&shared), 0, "{extra}");
            drop(hot);
        }
    }

    #[test]
    fn a_deactivated_target_takes_no_new_client_and_is_left_out_of_the_mean() {
        let shared = Shared::new();
        let balancer = Balancer::new(config(4, r#", "hashBalanceFactor": 100"#), &shared);
        let down = 2;
        balancer.states()[down].deactivate(
            shared.clock.now_ms(),
            Duration::from_secs(60),
            Fault::Refused,
        );
        let routes: Vec<Route> = (1..=200).map(|n| balancer.route(&shared, ip(n))).collect();
        assert!(routes.iter().all(|r| r.current() != down), "idle but down");
        // Factor 100 keeps the three usable targets within one connection of each other's
        // share, and the down one (load 0) does not drag the mean below them.
        let loads: Vec<u64> = (0..4)
            .map(|i| balancer.states()[i].assigned.load(Ordering::Relaxed))
            .collect();
        assert_eq!(loads[down], 0);
        let (min, max) = (0..4)
            .filter(|&i| i != down)
            .map(|i| loads[i])
            .fold((u64::MAX, 0), |(lo, hi), l| (lo.min(l), hi.max(l)));
        assert!(max - min <= 1, "{loads:?}");
        assert_eq!(loads.iter().sum::<u64>(), 200);
    }

    #[tokio::test(start_paused = true)]
    async fn fail_over_goes_to_the_next_target_under_the_bound() {
        let shared = Shared::new();
        let balancer = Balancer::new(config(4, r#", "hashBalanceFactor": 100"#), &shared);
        // A client x whose first target a fails, and whose second-ranked b carries a hot
        // client: x skips b.
        let x = ip(7);
        let key = hash::client_key(x);
        let a = balancer.table.pick(key, |_| true).unwrap();
        let b = balancer.table.pick(key, |i| i != a).unwrap();
        let hot = client_ranking_first(&balancer, b, x);
        let hot_routes: Vec<Route> = (0..10).map(|_| balancer.route(&shared, hot)).collect();
        assert!(hot_routes.iter().all(|r| r.current() == b));
        let mut route = balancer.route(&shared, x);
        assert_eq!(route.current(), a);
        let next = route.failed(Fault::Refused).expect("another target");
        assert!(next != a && next != b, "{next}");
        assert_eq!(overflows(&shared), 1);
        assert_eq!(balancer.states()[a].assigned.load(Ordering::Relaxed), 0);
        assert_eq!(balancer.states()[next].assigned.load(Ordering::Relaxed), 1);
        drop(route);
        assert_eq!(balancer.states()[next].assigned.load(Ordering::Relaxed), 0);
        drop(hot_routes);
    }

    #[test]
    fn assigned_counts_routes_from_pick_to_drop_without_the_factor_too() {
        let shared = Shared::new();
        let balancer = Balancer::new(config(3, ""), &shared);
        let total = |b: &Balancer| -> u64 {
            b.states()
                .iter()
                .map(|s| s.assigned.load(Ordering::Relaxed))
                .sum()
        };
        let routes: Vec<Route> = (1..=30).map(|n| balancer.route(&shared, ip(n))).collect();
        assert_eq!(total(&balancer), 30);
        drop(routes);
        assert_eq!(total(&balancer), 0);
    }

    #[test]
    fn without_stickiness_nothing_is_pinned() {
        let shared = Shared::new();
        let balancer = Balancer::new(config(3, r#", "stickiness": false"#), &shared);
        let _r = balancer.route(&shared, ip(7));
        assert_eq!(shared.sessions.len(), 0);
    }
}
