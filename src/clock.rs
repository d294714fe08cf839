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
///
/// After an upgrade the new process's clock goes on from the old one's ([`Clock::resumed`]), so
/// that every "when" the old process stored (a deactivation window's end, a session's last
/// close) means the same moment in the new one.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: tokio::time::Instant,
    /// Milliseconds the clock read at `epoch`, less one.
    base_ms: u64,
}

impl Clock {
    pub fn new() -> Clock {
        Clock::resumed(1)
    }

    /// A clock that reads `now_ms` now.
    pub fn resumed(now_ms: u64) -> Clock {
        Clock {
            epoch: tokio::time::Instant::now(),
            base_ms: now_ms.saturating_sub(1),
        }
    }

    /// Milliseconds since the epoch; never 0, so that 0 can mean "never" in atomics.
    pub fn now_ms(&self) -> u64 {
        let elapsed = tokio::time::Instant::now().saturating_duration_since(self.epoch);
        duration_ms(elapsed)
            .saturating_add(self.base_ms)
            .saturating_add(1)
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the same clock in every process of the machine, which is
/// how a new process measures how long the old one's state took to reach it.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
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
