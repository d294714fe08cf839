//! The runtime state of each target: up or deactivated, healthy or not, draining or not, open
//! connections, counters.
//!
//! A target's state is keyed by its identity (`id`, or `"host:port"` as written), not by its
//! position in the list or its address, so that it survives a reload that reorders the list or
//! re-resolves the host: a target deactivated a second ago stays deactivated after the reload,
//! and its counters keep counting. The [`Registry`] owns that mapping.
//!
//! Health is applied at pick time: a target that cannot take clients is skipped by the
//! rendezvous choice, which never rebuilds the mapping of the other targets (see
//! [`super::hash`]). Four things decide, and they combine with AND:
//! - **listed**: the current config has it (a removed target drains);
//! - **not drained**: `"drain": true` keeps new clients away, but not the clients that have a
//!   live session on it ([`TargetState::keeps_clients`] leaves drain out);
//! - **not down by its health check** ([`Health`], written by the checker tasks of
//!   `src/health.rs`; a target without checks is never down by them);
//! - **outside a deactivation window**: a failed client connect keeps it out for
//!   `targetDeactivationDuration` (design §3). With checks on, `rise` passed checks end the
//!   window early ([`TargetState::reactivate`]), so a restarted worker is back as soon as it
//!   answers instead of when the window ends.
//!
//! Everything on the connection path is an atomic: no lock is taken to read or update a
//! target's state.
//!
//! For the status page, each target also keeps when its [`TargetStatus`] last changed (`since`),
//! and the time and [`Fault`] of its last failed connect and of its last health check, each
//! packed into one atomic: recorded where the state changes (a deactivation, a health verdict,
//! a drain or removal by a reload), never per connection.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::duration_ms;
use crate::config::TargetSpec;
use crate::counters::{add_named, Histogram, TargetCounters, CONNECT_BUCKETS_US};
use crate::handover;
use crate::sockets::Fault;

/// What the active health check says of a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// No check runs for it (none configured, or not yet started): nothing to say.
    Unchecked = 0,
    /// Checked, and up: passed `rise` checks in a row, or has not failed `fall` yet.
    Up = 1,
    /// Checked, and down: failed `fall` checks in a row. Skipped by every pick.
    Down = 2,
}

impl Health {
    fn from_u8(v: u8) -> Health {
        match v {
            1 => Health::Up,
            2 => Health::Down,
            _ => Health::Unchecked,
        }
    }
}

/// What a target is doing, as the status page names it. The inputs of
/// [`TargetState::is_usable`] reduced to one word; the first that applies wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetStatus {
    /// A reload removed it; its open connections drain.
    Removed,
    /// Down by its health check, or inside a deactivation window after a failed connect.
    Down,
    /// `"drain": true`: no new clients; its sessions and connections go on.
    Draining,
    /// Takes new clients.
    Up,
}

impl TargetStatus {
    /// Its name in the status JSON.
    pub fn label(self) -> &'static str {
        match self {
            TargetStatus::Removed => "removed",
            TargetStatus::Down => "down",
            TargetStatus::Draining => "draining",
            TargetStatus::Up => "up",
        }
    }
}

/// A moment (clock ms, never 0) and a code in one `u64`, so the two are stored and read
/// together: the code in the low byte, the time above it. 0 means "never".
fn pack(at_ms: u64, code: u8) -> u64 {
    (at_ms.max(1) << 8) | u64::from(code)
}

fn unpack(packed: u64) -> Option<(u64, u8)> {
    (packed != 0).then_some((packed >> 8, packed as u8))
}

/// The runtime state of one target identity.
///
/// `repr(C)`, hot fields first: a pick with `hashBalanceFactor` reads `deactivated_until`,
/// `present` and `assigned` of every target, so they share the first cache line (after the
/// `Arc`'s counts) instead of being spread over the struct by the compiler's field order.
#[derive(Debug)]
#[repr(C)]
pub struct TargetState {
    /// Until when (clock ms) the target is skipped; 0 = never deactivated.
    deactivated_until: AtomicU64,
    /// Connections routed to this target and not closed yet, whether still connecting or
    /// open: the load that `hashBalanceFactor` bounds. Kept by [`super::Route`] from the
    /// moment it chooses the target, so a burst of new clients sees each other's choices
    /// before any connect completes (as HAProxy counts a server's connections from the
    /// moment it is assigned).
    pub assigned: AtomicU64,
    /// Whether the current config lists this target. A session pinned to a target that a
    /// reload removed moves, exactly as if the target were deactivated.
    present: AtomicBool,
    /// `drain` in the current config: no new clients (see [`TargetState::is_usable`]).
    drain: AtomicBool,
    /// Whether "drained: 0 connections" was logged since the target started draining: once
    /// per drain, however often session clients open and close connections after it.
    drained_logged: AtomicBool,
    /// The health check's verdict, a [`Health`] as `u8`.
    health: AtomicU8,
    /// Connections open to this target now (power-of-two-choices compares these). Opened by
    /// the connection path with `fetch_add`, closed with [`TargetState::connection_closed`].
    pub active: AtomicU64,
    pub id: Arc<str>,
    /// `hash::target_seed(id)`, computed once.
    pub seed: u64,
    pub counters: TargetCounters,
    /// `target_connect_duration_seconds{target}`: successful connects.
    pub connect_duration: Histogram,
    /// When (clock ms) its [`TargetStatus`] last changed by an event; see [`TargetState::since_ms`].
    changed_ms: AtomicU64,
    /// The last failed connect of a client: its time and [`Fault`] code, [`pack`]ed.
    last_failure: AtomicU64,
    /// The last health check: its time and 0 (passed) or the [`Fault`] code, [`pack`]ed.
    last_check: AtomicU64,
}

impl TargetState {
    /// The state of a target first seen at `now_ms` (its `since`).
    pub fn new(id: Arc<str>, now_ms: u64) -> TargetState {
        let seed = super::hash::target_seed(&id);
        TargetState {
            id,
            seed,
            deactivated_until: AtomicU64::new(0),
            present: AtomicBool::new(true),
            drain: AtomicBool::new(false),
            drained_logged: AtomicBool::new(false),
            health: AtomicU8::new(Health::Unchecked as u8),
            active: AtomicU64::new(0),
            assigned: AtomicU64::new(0),
            counters: TargetCounters::default(),
            connect_duration: Histogram::new(&CONNECT_BUCKETS_US),
            changed_ms: AtomicU64::new(now_ms),
            last_failure: AtomicU64::new(0),
            last_check: AtomicU64::new(0),
        }
    }

    /// What it is doing now, in one word (see [`TargetStatus`]).
    pub fn status(&self, now_ms: u64) -> TargetStatus {
        if !self.is_present() {
            TargetStatus::Removed
        } else if self.health() == Health::Down || !self.is_up(now_ms) {
            TargetStatus::Down
        } else if self.drain.load(Ordering::Relaxed) {
            TargetStatus::Draining
        } else {
            TargetStatus::Up
        }
    }

    /// Since when (clock ms) it has been in its [`TargetStatus`] of `now_ms`. Every event that
    /// changes the state records its time; the one change without an event, the end of a
    /// deactivation window, is the window's end.
    pub fn since_ms(&self, now_ms: u64) -> u64 {
        let changed = self.changed_ms.load(Ordering::Relaxed);
        let until = self.deactivated_until.load(Ordering::Relaxed);
        let back_from_window = matches!(
            self.status(now_ms),
            TargetStatus::Up | TargetStatus::Draining
        );
        if back_from_window && changed < until && until <= now_ms {
            until
        } else {
            changed
        }
    }

    /// Runs `change` and, if the [`TargetStatus`] is not the same after it, records `now_ms` as the
    /// moment it changed. Only on events (failures, verdicts, reloads), never per connection.
    fn changing<R>(&self, now_ms: u64, change: impl FnOnce() -> R) -> R {
        let before = self.status(now_ms);
        let result = change();
        if self.status(now_ms) != before {
            self.changed_ms.store(now_ms, Ordering::Relaxed);
        }
        result
    }

    /// The time (clock ms) and reason of the last failed connect of a client, if any.
    pub fn last_failure(&self) -> Option<(u64, Fault)> {
        let (at, code) = unpack(self.last_failure.load(Ordering::Relaxed))?;
        Some((at, Fault::from_code(code)?))
    }

    /// Records a health check's result (`Err`: why it failed).
    pub fn checked(&self, now_ms: u64, result: Result<(), Fault>) {
        let code = result.err().map_or(0, Fault::code);
        self.last_check.store(pack(now_ms, code), Ordering::Relaxed);
    }

    /// The time (clock ms) and result of the last health check, if any.
    pub fn last_check(&self) -> Option<(u64, Result<(), Fault>)> {
        let (at, code) = unpack(self.last_check.load(Ordering::Relaxed))?;
        match Fault::from_code(code) {
            Some(fault) => Some((at, Err(fault))),
            None => Some((at, Ok(()))),
        }
    }

    /// Takes new clients: keeps its own ([`TargetState::keeps_clients`]) and is not drained.
    /// What the pick asks of a target for a client without a live session.
    pub fn is_usable(&self, now_ms: u64) -> bool {
        self.keeps_clients(now_ms) && !self.drain.load(Ordering::Relaxed)
    }

    /// Keeps the clients whose live session is on it: listed, not down by its health check,
    /// and not inside a deactivation window. Drain does not matter here: a drained target
    /// keeps its sessions.
    pub fn keeps_clients(&self, now_ms: u64) -> bool {
        self.is_present() && self.health() != Health::Down && self.is_up(now_ms)
    }

    /// Drained by the config, or removed from it: no new client goes to it while its open
    /// connections (and, when drained, its sessions) go on.
    pub fn is_draining(&self) -> bool {
        self.drain.load(Ordering::Relaxed) || !self.is_present()
    }

    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Relaxed))
    }

    /// Records the health check's verdict at `now_ms`; returns the previous one.
    pub fn set_health(&self, health: Health, now_ms: u64) -> Health {
        self.changing(now_ms, || {
            Health::from_u8(self.health.swap(health as u8, Ordering::Relaxed))
        })
    }

    /// Ends a deactivation window early (the health check saw the target answer). Returns
    /// true if the target was inside one.
    pub fn reactivate(&self, now_ms: u64) -> bool {
        self.changing(now_ms, || {
            let before = self.deactivated_until.swap(0, Ordering::Relaxed);
            now_ms < before
        })
    }

    /// A connection to this target closed. When it was the last one of a draining target, says
    /// so in the log (once per drain): the moment an operator waits for.
    pub fn connection_closed(&self) {
        if self.active.fetch_sub(1, Ordering::Relaxed) == 1 && self.is_draining() {
            self.log_drained();
        }
    }

    fn log_drained(&self) {
        if !self.drained_logged.swap(true, Ordering::Relaxed) {
            tracing::info!(target_id = %self.id, "target {} drained: 0 connections", self.id);
        }
    }

    /// Starts a drain (by `drain` or by removal): the "drained" line may be logged again.
    fn drain_started(&self) {
        self.drained_logged.store(false, Ordering::Relaxed);
        if self.active.load(Ordering::Relaxed) == 0 {
            self.log_drained();
        }
    }

    /// Not inside a deactivation window. After the window the target is eligible again; the
    /// next pick that lands on it is the probe.
    pub fn is_up(&self, now_ms: u64) -> bool {
        now_ms >= self.deactivated_until.load(Ordering::Relaxed)
    }

    pub fn is_present(&self) -> bool {
        self.present.load(Ordering::Relaxed)
    }

    /// Records a failed connect (and why: `fault`) and skips the target for `window`. Returns
    /// true when this call took the target down (it was up before), which is what
    /// `deactivations` counts.
    pub fn deactivate(&self, now_ms: u64, window: Duration, fault: Fault) -> bool {
        self.counters
            .connect_failures
            .fetch_add(1, Ordering::Relaxed);
        self.last_failure
            .store(pack(now_ms, fault.code()), Ordering::Relaxed);
        let until = now_ms.saturating_add(duration_ms(window));
        let was_up = self.changing(now_ms, || {
            let before = self.deactivated_until.swap(until, Ordering::Relaxed);
            now_ms >= before
        });
        if was_up {
            self.counters.deactivations.fetch_add(1, Ordering::Relaxed);
        }
        was_up
    }
}

/// An upgrade (design §13): a target's state as the old process hands it over, and taken up by
/// the new one. The window's end, the verdict and the status page's history (since when its
/// state holds, the last failure and check, draining) carry over as they are (the clocks of
/// the two processes agree, see `clock.rs`); counters and the connect histogram are added, so
/// they never go backwards. The health check's counts in a row (`rise`/`fall` progress) start
/// again.
impl TargetState {
    pub fn export(&self) -> handover::Target {
        let h = self.connect_duration.snapshot();
        handover::Target {
            id: self.id.to_string(),
            present: self.is_present(),
            deactivated_until_ms: self.deactivated_until.load(Ordering::Relaxed),
            health: self.health.load(Ordering::Relaxed),
            counters: self
                .counters
                .named()
                .iter()
                .map(|(name, c)| (name.to_string(), c.load(Ordering::Relaxed)))
                .collect(),
            connect_duration: handover::Histogram {
                name: "connect_duration".into(),
                bounds_us: h.bounds_us.to_vec(),
                counts: h.counts,
                sum_us: h.sum_us,
            },
            history: Some(handover::History {
                changed_ms: self.changed_ms.load(Ordering::Relaxed),
                last_failure: unpack(self.last_failure.load(Ordering::Relaxed)),
                last_check: unpack(self.last_check.load(Ordering::Relaxed)),
                drain: self.drain.load(Ordering::Relaxed),
            }),
        }
    }

    /// Takes up what `old` says (an old process's state of the same identity).
    pub fn restore(&self, old: &handover::Target) {
        self.deactivated_until
            .fetch_max(old.deactivated_until_ms, Ordering::Relaxed);
        self.present.store(old.present, Ordering::Relaxed);
        self.health
            .store(Health::from_u8(old.health) as u8, Ordering::Relaxed);
        if let Some(h) = &old.history {
            // The status page's history goes on (the clocks agree). The new config's `drain`
            // is applied after this, as a reload's: a change only where it differs.
            self.changed_ms.store(h.changed_ms, Ordering::Relaxed);
            let packed = |m: Option<(u64, u8)>| m.map_or(0, |(at, code)| pack(at, code));
            self.last_failure
                .store(packed(h.last_failure), Ordering::Relaxed);
            self.last_check
                .store(packed(h.last_check), Ordering::Relaxed);
            self.drain.store(h.drain, Ordering::Relaxed);
        }
        self.add_counts(old);
    }

    /// Adds `old`'s counters and histogram to this state's.
    pub fn add_counts(&self, old: &handover::Target) {
        let named = self.counters.named();
        for (name, value) in &old.counters {
            if !add_named(&named, name, *value) {
                tracing::debug!(target_id = %self.id, counter = %name, "unknown counter in the handover; skipped");
            }
        }
        let h = &old.connect_duration;
        self.connect_duration.add(&h.bounds_us, &h.counts, h.sum_us);
    }
}

impl TargetState {
    /// Applies the config's `drain` (at `now_ms`) and logs a change.
    fn set_drain(&self, drain: bool, now_ms: u64) {
        if self.changing(now_ms, || self.drain.swap(drain, Ordering::Relaxed)) == drain {
            return;
        }
        let open = self.active.load(Ordering::Relaxed);
        if drain {
            tracing::info!(
                target_id = %self.id, connections = open,
                "target {} draining: no new clients; {open} open connections and live \
                 sessions go on", self.id
            );
            self.drain_started();
        } else {
            tracing::info!(target_id = %self.id, "target {} no longer draining: takes new clients", self.id);
        }
    }
}

/// Identity → state, shared by every config generation so state carries over reloads.
///
/// A target that a reload removed stays here while anything still holds its state (open
/// connections, the sessions pinned to it): its metrics show it draining. Once nothing does,
/// [`Registry::prune`] forgets it, so that configs whose target ids keep changing (service
/// discovery) do not grow memory or metric cardinality without bound. An identity that comes
/// back after that starts from zero.
#[derive(Debug, Default)]
pub struct Registry {
    states: Mutex<HashMap<Arc<str>, Arc<TargetState>>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<TargetState>>> {
        self.states.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The states for `targets`, in the same order, reusing the state of every identity seen
    /// before. Identities not in `targets` are marked absent (their sessions move) and are
    /// forgotten once nothing else holds them. Called at start-up and on each reload (at
    /// `now_ms`), never on the connection path.
    pub fn adopt(&self, targets: &[TargetSpec], now_ms: u64) -> Vec<Arc<TargetState>> {
        let mut states = self.lock();
        let adopted: Vec<Arc<TargetState>> = targets
            .iter()
            .map(|t| {
                let state = states
                    .entry(t.id.clone())
                    .or_insert_with(|| Arc::new(TargetState::new(t.id.clone(), now_ms)));
                state.changing(now_ms, || state.present.store(true, Ordering::Relaxed));
                state.set_drain(t.drain, now_ms);
                state.clone()
            })
            .collect();
        let listed: HashSet<&str> = targets.iter().map(|t| &*t.id).collect();
        for (id, state) in states.iter() {
            let removed = !listed.contains(&**id)
                && state.changing(now_ms, || state.present.swap(false, Ordering::Relaxed));
            if removed {
                let open = state.active.load(Ordering::Relaxed);
                tracing::info!(
                    target_id = %id, connections = open,
                    "target {id} removed from the config: no new clients; its {open} open \
                     connections go on"
                );
                state.drain_started();
            }
        }
        Self::forget_unheld(&mut states);
        adopted
    }

    /// Forgets removed targets that nothing holds any more (no connection, no session, no
    /// config generation). Returns how many were forgotten. Called with the session sweep.
    pub fn prune(&self) -> usize {
        Self::forget_unheld(&mut self.lock())
    }

    fn forget_unheld(states: &mut HashMap<Arc<str>, Arc<TargetState>>) -> usize {
        let before = states.len();
        states.retain(|_, state| state.is_present() || Arc::strong_count(state) > 1);
        before - states.len()
    }

    /// Every state currently known (listed or still draining).
    pub fn all(&self) -> Vec<Arc<TargetState>> {
        self.lock().values().cloned().collect()
    }

    /// The state of identity `id`, made (not listed: draining) if it is not known: where a
    /// connection handed over by an upgrade goes on counting. `now_ms`: its `since` if made.
    pub fn get_or_absent(&self, id: &str, now_ms: u64) -> Arc<TargetState> {
        self.lock()
            .entry(id.into())
            .or_insert_with(|| {
                let state = TargetState::new(id.into(), now_ms);
                state.present.store(false, Ordering::Relaxed);
                Arc::new(state)
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str) -> TargetSpec {
        TargetSpec {
            id: id.into(),
            host: "127.0.0.1".into(),
            port: 1,
            weight: 1,
            addr: "127.0.0.1:1".parse().unwrap(),
            proxy_protocol: None,
            drain: false,
            health_check: None,
        }
    }

    #[test]
    fn deactivation_window_ends_and_counts_once() {
        let t = TargetState::new("a".into(), 1);
        assert!(t.is_up(10));
        assert!(t.deactivate(10, Duration::from_millis(100), Fault::Refused));
        assert!(!t.is_up(50));
        // A second failure inside the window extends it but is not a new deactivation.
        assert!(!t.deactivate(50, Duration::from_millis(100), Fault::Timeout));
        assert!(!t.is_up(149));
        assert!(t.is_up(150));
        assert_eq!(t.counters.deactivations.load(Ordering::Relaxed), 1);
        assert_eq!(t.counters.connect_failures.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn drain_keeps_sessions_health_down_and_windows_do_not() {
        let t = TargetState::new("a".into(), 1);
        assert!(t.is_usable(1) && t.keeps_clients(1) && !t.is_draining());
        t.set_drain(true, 1);
        assert!(!t.is_usable(1) && t.keeps_clients(1) && t.is_draining());
        t.set_drain(false, 1);
        assert_eq!(t.set_health(Health::Down, 1), Health::Unchecked);
        assert!(!t.is_usable(1) && !t.keeps_clients(1));
        t.set_health(Health::Up, 1);
        assert!(t.is_usable(1));
        t.deactivate(1, Duration::from_secs(60), Fault::Refused);
        assert!(!t.is_usable(2) && !t.keeps_clients(2));
        assert!(t.reactivate(2), "was inside a window");
        assert!(t.is_usable(2));
        assert!(!t.reactivate(3), "no window left to end");
    }

    #[test]
    fn registry_applies_drain_and_a_removed_target_drains() {
        let r = Registry::default();
        let mut drained = spec("a");
        drained.drain = true;
        let first = r.adopt(&[drained, spec("b")], 1);
        assert!(first[0].is_draining() && !first[0].is_usable(1));
        assert!(!first[1].is_draining());
        let second = r.adopt(&[spec("a")], 1);
        assert!(!second[0].is_draining(), "undrained by removing the key");
        assert!(first[1].is_draining(), "b was removed");
    }

    #[test]
    fn registry_keeps_state_by_identity_across_adoptions() {
        let r = Registry::default();
        let first = r.adopt(&[spec("a"), spec("b")], 1);
        first[1].deactivate(1, Duration::from_secs(60), Fault::Refused);
        let second = r.adopt(&[spec("b"), spec("c")], 1);
        assert!(Arc::ptr_eq(&first[1], &second[0]), "b keeps its state");
        assert!(!second[0].is_up(2), "b stays deactivated");
        assert!(!first[0].is_present(), "a was removed");
        assert!(second[1].is_present());
        assert_eq!(r.prune(), 0, "a is still held");
        drop(first);
        assert_eq!(r.prune(), 1, "a is forgotten once nothing holds it");
        assert_eq!(r.all().len(), 2);
    }

    #[test]
    fn the_state_names_the_first_reason_and_since_is_when_it_last_changed() {
        let t = TargetState::new("a".into(), 5);
        assert_eq!((t.status(10), t.since_ms(10)), (TargetStatus::Up, 5));
        // A failed connect: down from then, for the window; a second one inside the window
        // changes nothing but the last failure.
        t.deactivate(20, Duration::from_millis(100), Fault::Refused);
        assert_eq!((t.status(30), t.since_ms(30)), (TargetStatus::Down, 20));
        t.deactivate(40, Duration::from_millis(100), Fault::Timeout);
        assert_eq!((t.status(50), t.since_ms(50)), (TargetStatus::Down, 20));
        assert_eq!(t.last_failure(), Some((40, Fault::Timeout)));
        // The window ends at 140 with no event: up since then.
        assert_eq!((t.status(200), t.since_ms(200)), (TargetStatus::Up, 140));
        // Drained by a reload; a health verdict of down wins over the drain.
        t.set_drain(true, 300);
        assert_eq!(
            (t.status(310), t.since_ms(310)),
            (TargetStatus::Draining, 300)
        );
        t.set_health(Health::Down, 400);
        assert_eq!((t.status(410), t.since_ms(410)), (TargetStatus::Down, 400));
        // A verdict that repeats itself is no change.
        t.set_health(Health::Down, 450);
        assert_eq!(t.since_ms(460), 400);
        t.set_health(Health::Up, 500);
        assert_eq!(
            (t.status(510), t.since_ms(510)),
            (TargetStatus::Draining, 500)
        );
        // Up by its check while a window still runs: still down, and since the window began.
        t.set_drain(false, 600);
        t.deactivate(700, Duration::from_millis(100), Fault::Reset);
        t.set_health(Health::Down, 750);
        t.set_health(Health::Up, 760);
        assert_eq!((t.status(770), t.since_ms(770)), (TargetStatus::Down, 700));
        assert_eq!((t.status(900), t.since_ms(900)), (TargetStatus::Up, 800));
    }

    #[test]
    fn a_removed_target_reads_removed_since_the_reload_that_removed_it() {
        let r = Registry::default();
        let first = r.adopt(&[spec("a"), spec("b")], 10);
        first[1].deactivate(20, Duration::from_millis(100), Fault::Refused);
        r.adopt(&[spec("a")], 50);
        assert_eq!(
            (first[1].status(500), first[1].since_ms(500)),
            (TargetStatus::Removed, 50)
        );
        assert_eq!(
            (first[0].status(500), first[0].since_ms(500)),
            (TargetStatus::Up, 10)
        );
        r.adopt(&[spec("a"), spec("b")], 600);
        assert_eq!(
            (first[1].status(610), first[1].since_ms(610)),
            (TargetStatus::Up, 600)
        );
    }

    #[test]
    fn the_last_check_keeps_its_time_and_result() {
        let t = TargetState::new("a".into(), 1);
        assert_eq!(t.last_check(), None);
        assert_eq!(t.last_failure(), None);
        t.checked(10, Err(Fault::Unexpected));
        assert_eq!(t.last_check(), Some((10, Err(Fault::Unexpected))));
        t.checked(20, Ok(()));
        assert_eq!(t.last_check(), Some((20, Ok(()))));
    }
}
