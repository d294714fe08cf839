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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::config::TargetSpec;
use crate::metrics::LazyHistogram;

/// Milliseconds on a monotonic clock that starts when the process's balancer state is built.
///
/// It is tokio's clock, so tests can drive deactivation windows and session expiry with
/// `tokio::time::pause()` and `advance()` instead of sleeping.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: tokio::time::Instant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock {
            epoch: tokio::time::Instant::now(),
        }
    }

    /// Milliseconds since the epoch; never 0, so that 0 can mean "never" in atomics.
    pub fn now_ms(&self) -> u64 {
        let elapsed = tokio::time::Instant::now().saturating_duration_since(self.epoch);
        super::duration_ms(elapsed).saturating_add(1)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// Counters a target keeps for the metrics exporter. Monotonic; they survive reloads.
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
}

/// The runtime state of one target identity.
#[derive(Debug)]
pub struct TargetState {
    pub id: Arc<str>,
    /// `hash::target_seed(id)`, computed once.
    pub seed: u64,
    /// Until when (clock ms) the target is skipped; 0 = never deactivated.
    deactivated_until: AtomicU64,
    /// Whether the current config lists this target. A session pinned to a target that a
    /// reload removed moves, exactly as if the target were deactivated.
    present: AtomicBool,
    /// Connections open to this target now (power-of-two-choices compares these).
    pub active: AtomicU64,
    pub counters: TargetCounters,
    /// `target_connect_duration_seconds{target}`: its handle is set by the metrics exporter when
    /// this identity appears, so a connection records into it without formatting a label.
    pub connect_duration: LazyHistogram,
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
            counters: TargetCounters::default(),
            connect_duration: LazyHistogram::default(),
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
        let until = now_ms.saturating_add(super::duration_ms(window));
        let before = self.deactivated_until.swap(until, Ordering::Relaxed);
        let was_up = now_ms >= before;
        if was_up {
            self.counters.deactivations.fetch_add(1, Ordering::Relaxed);
        }
        was_up
    }
}

/// Told when a target identity gets a state and when that state is forgotten: how the metrics
/// exporter ([`crate::metrics`]) creates a target's series once, when it appears, rather than
/// per connection, and keeps them monotonic when an identity comes back. Called with the
/// registry locked, so it must not call back into the registry.
pub trait Observer: Send + Sync + std::fmt::Debug {
    fn added(&self, state: &TargetState);
    fn forgotten(&self, state: &TargetState);
}

/// Identity → state, shared by every config generation so state carries over reloads.
#[derive(Debug, Default)]
pub struct Registry {
    states: Mutex<HashMap<Arc<str>, Arc<TargetState>>>,
    observer: OnceLock<Arc<dyn Observer>>,
}

impl Registry {
    /// The states for `targets`, in the same order, reusing the state of every identity seen
    /// before. Identities not in `targets` are marked absent (their sessions move) and are
    /// forgotten once nothing else holds them. Called at start-up and on each reload, never on
    /// the connection path.
    pub fn adopt(&self, targets: &[TargetSpec]) -> Vec<Arc<TargetState>> {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let adopted: Vec<Arc<TargetState>> = targets
            .iter()
            .map(|t| {
                let state = states.entry(t.id.clone()).or_insert_with(|| {
                    let state = Arc::new(TargetState::new(t.id.clone()));
                    if let Some(observer) = self.observer.get() {
                        observer.added(&state);
                    }
                    state
                });
                state.present.store(true, Ordering::Relaxed);
                state.clone()
            })
            .collect();
        let listed_ids: std::collections::HashSet<&str> = targets.iter().map(|t| &*t.id).collect();
        states.retain(|id, state| {
            let listed = listed_ids.contains(&**id);
            if !listed {
                state.present.store(false, Ordering::Relaxed);
            }
            let keep = listed || Arc::strong_count(state) > 1;
            if let (false, Some(observer)) = (keep, self.observer.get()) {
                observer.forgotten(state);
            }
            keep
        });
        adopted
    }

    /// Sets the observer (once: returns false if one is set already) and tells it about every
    /// state known now.
    pub fn observe(&self, observer: Arc<dyn Observer>) -> bool {
        let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        if self.observer.set(observer).is_err() {
            return false;
        }
        if let Some(observer) = self.observer.get() {
            states.values().for_each(|state| observer.added(state));
        }
        true
    }

    /// Every state currently known (listed or still draining), for the metrics exporter.
    pub fn all(&self) -> Vec<Arc<TargetState>> {
        let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        states.values().cloned().collect()
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
        drop(first);
        drop(r.adopt(&[spec("b"), spec("c")]));
        assert_eq!(r.all().len(), 2, "a is forgotten once nothing holds it");
    }

    #[derive(Debug, Default)]
    struct Log(Mutex<Vec<String>>);

    impl Observer for Log {
        fn added(&self, state: &TargetState) {
            self.0.lock().unwrap().push(format!("+{}", state.id));
        }
        fn forgotten(&self, state: &TargetState) {
            self.0.lock().unwrap().push(format!("-{}", state.id));
        }
    }

    #[test]
    fn the_observer_hears_of_each_identity_once_when_it_appears_and_when_it_is_forgotten() {
        let r = Registry::default();
        drop(r.adopt(&[spec("a")]));
        let log = Arc::new(Log::default());
        assert!(r.observe(log.clone()), "told about what exists");
        assert!(!r.observe(log.clone()), "only one observer");
        drop(r.adopt(&[spec("a"), spec("b")]));
        drop(r.adopt(&[spec("b")]));
        drop(r.adopt(&[spec("a"), spec("b")]));
        assert_eq!(*log.0.lock().unwrap(), ["+a", "+b", "-a", "+a"]);
    }
}
