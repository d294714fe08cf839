//! The runtime state of each target: up or deactivated, open connections, counters.
//!
//! A target's state is keyed by its identity (`id`, or `"host:port"` as written), not by its
//! position in the list or its address, so that it survives a reload that reorders the list or
//! re-resolves the host: a target deactivated a second ago stays deactivated after the reload,
//! and its counters keep counting. The [`Registry`] owns that mapping.
//!
//! Health is applied at pick time: a deactivated target is skipped by the rendezvous choice,
//! which never rebuilds the mapping of the other targets (see [`super::hash`]).
//!
//! Everything on the connection path is an atomic: no lock is taken to read or update a
//! target's state.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::duration_ms;
use crate::config::TargetSpec;
use crate::counters::{Histogram, TargetCounters, CONNECT_BUCKETS_US};

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
    /// Connections open to this target now (power-of-two-choices compares these).
    pub active: AtomicU64,
    pub id: Arc<str>,
    /// `hash::target_seed(id)`, computed once.
    pub seed: u64,
    pub counters: TargetCounters,
    /// `target_connect_duration_seconds{target}`: successful connects.
    pub connect_duration: Histogram,
}

impl TargetState {
    pub fn new(id: Arc<str>) -> TargetState {
        let seed = super::hash::target_seed(&id);
        TargetState {
            id,
            seed,
            deactivated_until: AtomicU64::new(0),
            present: AtomicBool::new(true),
            active: AtomicU64::new(0),
            assigned: AtomicU64::new(0),
            counters: TargetCounters::default(),
            connect_duration: Histogram::new(&CONNECT_BUCKETS_US),
        }
    }

    /// Listed in the current config and not inside a deactivation window.
    pub fn is_usable(&self, now_ms: u64) -> bool {
        self.is_present() && self.is_up(now_ms)
    }

    /// Not inside a deactivation window. After the window the target is eligible again; the
    /// next pick that lands on it is the probe.
    pub fn is_up(&self, now_ms: u64) -> bool {
        now_ms >= self.deactivated_until.load(Ordering::Relaxed)
    }

    pub fn is_present(&self) -> bool {
        self.present.load(Ordering::Relaxed)
    }

    /// Records a failed connect and skips the target for `window`. Returns true when this call
    /// took the target down (it was up before), which is what `deactivations` counts.
    pub fn deactivate(&self, now_ms: u64, window: Duration) -> bool {
        self.counters
            .connect_failures
            .fetch_add(1, Ordering::Relaxed);
        let until = now_ms.saturating_add(duration_ms(window));
        let before = self.deactivated_until.swap(until, Ordering::Relaxed);
        let was_up = now_ms >= before;
        if was_up {
            self.counters.deactivations.fetch_add(1, Ordering::Relaxed);
        }
        was_up
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
    /// forgotten once nothing else holds them. Called at start-up and on each reload, never on
    /// the connection path.
    pub fn adopt(&self, targets: &[TargetSpec]) -> Vec<Arc<TargetState>> {
        let mut states = self.lock();
        let adopted: Vec<Arc<TargetState>> = targets
            .iter()
            .map(|t| {
                let state = states
                    .entry(t.id.clone())
                    .or_insert_with(|| Arc::new(TargetState::new(t.id.clone())));
                state.present.store(true, Ordering::Relaxed);
                state.clone()
            })
            .collect();
        let listed: HashSet<&str> = targets.iter().map(|t| &*t.id).collect();
        for (id, state) in states.iter() {
            if !listed.contains(&**id) {
                state.present.store(false, Ordering::Relaxed);
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
        }
    }

    #[test]
    fn deactivation_window_ends_and_counts_once() {
        let t = TargetState::new("a".into());
        assert!(t.is_up(10));
        assert!(t.deactivate(10, Duration::from_millis(100)));
        assert!(!t.is_up(50));
        // A second failure inside the window extends it but is not a new deactivation.
        assert!(!t.deactivate(50, Duration::from_millis(100)));
        assert!(!t.is_up(149));
        assert!(t.is_up(150));
        assert_eq!(t.counters.deactivations.load(Ordering::Relaxed), 1);
        assert_eq!(t.counters.connect_failures.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn registry_keeps_state_by_identity_across_adoptions() {
        let r = Registry::default();
        let first = r.adopt(&[spec("a"), spec("b")]);
        first[1].deactivate(1, Duration::from_secs(60));
        let second = r.adopt(&[spec("b"), spec("c")]);
        assert!(Arc::ptr_eq(&first[1], &second[0]), "b keeps its state");
        assert!(!second[0].is_up(2), "b stays deactivated");
        assert!(!first[0].is_present(), "a was removed");
        assert!(second[1].is_present());
        assert_eq!(r.prune(), 0, "a is still held");
        drop(first);
        assert_eq!(r.prune(), 1, "a is forgotten once nothing holds it");
        assert_eq!(r.all().len(), 2);
    }
}
