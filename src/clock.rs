//! Time as the balancer counts it: a millisecond clock for state kept in atomics, and the
//! conversion of a `Duration` to those milliseconds.
//!
//! A leaf: deactivation windows, session expiry and rate-limited logs all store "when" as a
//! `u64` of milliseconds in an atomic, so every layer needs the same clock and the same
//! conversion, and none of them owns it.

use std::time::Duration;

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
        duration_ms(elapsed).saturating_add(1)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// `d` in whole milliseconds, saturating (config durations are capped far below the limit).
pub fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
