//! The status page (`GET /`) and its JSON (`GET /status`, design §15): the balancer at a
//! glance for an operator without a Prometheus server.
//!
//! Both read the same [`Snapshot`] as `/metrics`, so they cost the data path what a scrape
//! does: some atomic loads. The page is one static, self-contained HTML file
//! (`status.html`: inline CSS and JS, no external asset) that fetches `/status` every 2 s and
//! inserts every value as text, never as markup (target ids and reload errors are arbitrary
//! strings from the config file).
//!
//! The JSON's schema is versioned ([`SCHEMA`]) and documented field by field in
//! `docs/status.md`: a change that removes or redefines a field raises the version; adding a
//! field does not. It holds no client address.
//!
//! Connect time over the last minute: each target's connect histogram is cumulative (atomics
//! since start), so [`Status`] keeps a ring of its snapshots, one every [`SAMPLE_EVERY`], for
//! [`WINDOW`] ([`sample_every`] takes them on the admin thread), and `/status` reads the
//! quantiles from the difference between now and the oldest snapshot of the ring (or, in the
//! balancer's first minute, everything since its start), the way
//! Prometheus's `histogram_quantile` does over `rate(...[1m])`: linear interpolation inside the
//! bucket that holds the quantile, so the estimate is only as fine as the buckets
//! (`counters::CONNECT_BUCKETS_US`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL};
use hyper::Response;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::Source;
use crate::counters::{HistogramSnapshot, Reject};
use crate::proxy::{Snapshot, TargetSnapshot};
use crate::sockets::Fault;

/// The version of the JSON schema (its `schema` field).
pub const SCHEMA: u32 = 1;

/// The status page: one HTML file with its CSS and JS inline.
pub const PAGE: &str = include_str!("status.html");

/// How often the connect histograms are sampled for the last-minute quantiles.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// The span of the connect-time quantiles: the oldest sample kept is at most this old.
pub const WINDOW: Duration = Duration::from_secs(60);

/// The media type of `/status`.
pub const JSON_TYPE: &str = "application/json";

/// The page's Content-Security-Policy: its own inline style and script, `fetch` to its own
/// origin, nothing else (no external asset could load even if one were inserted).
const PAGE_POLICY: &str = "default-src 'none'; style-src 'unsafe-inline'; \
    script-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// What the status endpoint keeps between requests: recent samples of every target's connect
/// histogram.
#[derive(Debug, Default)]
pub struct Status {
    ring: Mutex<VecDeque<Sample>>,
}

/// The connect histograms of every target at one moment.
#[derive(Debug)]
struct Sample {
    at: Instant,
    histograms: HashMap<Arc<str>, HistogramSnapshot>,
}

impl Status {
    pub fn new() -> Status {
        Status::default()
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, VecDeque<Sample>> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the connect histograms of `snapshot`, taken at `at`, and forgets samples older
    /// than [`WINDOW`].
    pub fn sample(&self, at: Instant, snapshot: &Snapshot) {
        let histograms = snapshot
            .targets
            .iter()
            .map(|t| (t.id.clone(), t.connect_duration.clone()))
            .collect();
        let mut ring = self.ring();
        ring.push_back(Sample { at, histograms });
        while ring
            .front()
            .is_some_and(|s| at.saturating_duration_since(s.at) > WINDOW)
        {
            ring.pop_front();
        }
    }

    /// The JSON of `/status` for `snapshot`, taken at `now`.
    pub fn render(&self, snapshot: &Snapshot, now: Instant) -> Vec<u8> {
        let ring = self.ring();
        // The start of the quantiles' window: while the balancer is younger than WINDOW, its
        // start (every connect so far is in the last minute); then the oldest sample at most
        // WINDOW old (none if the endpoint started late: since start, and `window_s` says so).
        let young = Duration::from_millis(snapshot.uptime_ms) <= WINDOW;
        let base = ring
            .iter()
            .find(|s| !young && now.saturating_duration_since(s.at) <= WINDOW);
        let json = to_json(snapshot, |t| {
            let (window, before) = match base {
                Some(base) => (
                    now.saturating_duration_since(base.at),
                    base.histograms.get(&t.id),
                ),
                None => (Duration::from_millis(snapshot.uptime_ms), None),
            };
            connect_time(&t.connect_duration, before, window)
        });
        drop(ring);
        // Serializing a Value cannot fail (its keys are strings).
        serde_json::to_vec(&json).unwrap_or_default()
    }
}

/// Samples `source`'s connect histograms into `status` every [`SAMPLE_EVERY`], from now on;
/// never returns. Runs on the admin thread, off the data path.
pub async fn sample_every(source: &dyn Source, status: &Status) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        status.sample(Instant::now(), &source.snapshot());
    }
}

/// The response to `GET /`.
pub fn page() -> Response<Full<Bytes>> {
    let mut response = super::with_type(
        Response::new(Full::new(Bytes::from_static(PAGE.as_bytes()))),
        "text/html; charset=utf-8",
    );
    let headers = response.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        hyper::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(PAGE_POLICY),
    );
    headers.insert(
        hyper::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        hyper::header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// The response to `GET /status`.
pub fn json(body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = super::with_type(Response::new(Full::new(Bytes::from(body))), JSON_TYPE);
    let headers = response.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        hyper::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// The whole document; `connect_time` gives each target's `connect_time` object.
fn to_json(s: &Snapshot, connect_time: impl Fn(&TargetSnapshot) -> Value) -> Value {
    let at = |ms: u64| moment(s, ms);
    let refused: serde_json::Map<String, Value> = Reject::ALL
        .iter()
        .map(|&r| (r.label().to_string(), json!(s.rejected(r))))
        .collect();
    let last_reload = s.last_reload.as_ref().map(|r| {
        let mut m = at(r.at_ms);
        m["result"] = json!(if r.error.is_some() {
            "failure"
        } else {
            "success"
        });
        m["error"] = json!(r.error.as_deref());
        m
    });
    let targets: Vec<Value> = s
        .targets
        .iter()
        .map(|t| {
            json!({
                "id": &*t.id,
                "address": t.address.map(|a| a.to_string()),
                "weight": t.weight,
                "state": t.status.label(),
                "since": at(t.since_ms),
                "last_failure": t.last_failure.map(|(ms, fault)| {
                    let mut m = at(ms);
                    m["reason"] = json!(fault.label());
                    m
                }),
                "connect_failures": t.connect_failures,
                "deactivations": t.deactivations,
                "check": check(t, &at),
                "connections": {"active": t.active, "total": t.connections},
                "bytes": {"to_target": t.bytes_to_target, "to_client": t.bytes_to_client},
                "connect_time": connect_time(t),
            })
        })
        .collect();
    json!({
        "schema": SCHEMA,
        "version": env!("CARGO_PKG_VERSION"),
        "time": rfc3339(s.wall),
        "uptime_s": seconds(s.uptime_ms),
        "config": {
            "path": s.config_path.to_string_lossy(),
            "reloads": {"success": s.reloads_success, "failure": s.reloads_failure},
            "last_reload": last_reload,
        },
        "listeners": s.listeners.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "totals": {
            "accepted": s.accepted,
            "active": s.active,
            "refused": refused,
            "retries": s.retries,
            "sessions": s.sessions,
            "hash_overflows": s.hash_overflows,
            "accept_errors": {"fd_limit": s.accept_errors_fd_limit, "other": s.accept_errors_other},
        },
        "targets": targets,
    })
}

/// A target's health checks: `null` when it is not checked.
fn check(t: &TargetSnapshot, at: &impl Fn(u64) -> Value) -> Value {
    let Some(up) = t.check_up else {
        return Value::Null;
    };
    let last = t.last_check.map(|(ms, result)| {
        let mut m = at(ms);
        m["result"] = json!(if result.is_ok() { "passed" } else { "failed" });
        m["reason"] = json!(result.err().map(Fault::label));
        m
    });
    json!({
        "verdict": if up { "up" } else { "down" },
        "passed": t.checks_success,
        "failed": t.checks_failure,
        "last": last,
    })
}

/// `{"time", "ago_s"}` of the clock moment `ms`, against the snapshot's.
fn moment(s: &Snapshot, ms: u64) -> Value {
    let ago = s.at_ms.saturating_sub(ms);
    let wall = s
        .wall
        .checked_sub(Duration::from_millis(ago))
        .unwrap_or(UNIX_EPOCH);
    json!({"time": rfc3339(wall), "ago_s": seconds(ago)})
}

/// Milliseconds as seconds, to the millisecond.
fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// The connect times of the `window` between `before` (the histogram then; `None`: zero) and
/// `now`: how many, and p50 and p99 estimated from the buckets.
fn connect_time(
    now: &HistogramSnapshot,
    before: Option<&HistogramSnapshot>,
    window: Duration,
) -> Value {
    let counts = difference(now, before);
    let samples: u64 = counts.iter().sum();
    // In ms, to the microsecond.
    let q = |q: f64| quantile(now.bounds_us, &counts, q).map(|us| us.round() / 1000.0);
    json!({
        "window_s": window.as_secs(),
        "samples": samples,
        "p50_ms": q(0.5),
        "p99_ms": q(0.99),
    })
}

/// Per-bucket counts of `now` minus `before`. A histogram that went backwards (an identity
/// forgotten after its removal and then seen again starts from zero) counts from zero.
fn difference(now: &HistogramSnapshot, before: Option<&HistogramSnapshot>) -> Vec<u64> {
    match before {
        Some(b) if b.counts.len() == now.counts.len() && b.count() <= now.count() => now
            .counts
            .iter()
            .zip(&b.counts)
            .map(|(n, b)| n.saturating_sub(*b))
            .collect(),
        _ => now.counts.clone(),
    }
}

/// The `q` quantile (0..=1), in microseconds, of samples counted per bucket (`counts` has one
/// more entry than `bounds_us`: the `+Inf` bucket). As Prometheus's `histogram_quantile`:
/// linear interpolation inside the bucket holding the quantile, the first bucket starting at
/// 0, and a quantile in the `+Inf` bucket read as the highest finite bound. `None` without
/// samples.
fn quantile(bounds_us: &[u64], counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut below = 0u64;
    for (i, &count) in counts.iter().enumerate() {
        if count > 0 && (below + count) as f64 >= rank {
            let Some(&upper) = bounds_us.get(i) else {
                return bounds_us.last().map(|&b| b as f64);
            };
            let lower = if i == 0 { 0 } else { bounds_us[i - 1] };
            let into = (rank - below as f64) / count as f64;
            return Some(lower as f64 + (upper - lower) as f64 * into);
        }
        below += count;
    }
    bounds_us.last().map(|&b| b as f64)
}

/// `t` as an RFC 3339 date in UTC, to the millisecond: `2025-01-31T23:59:59.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        since.subsec_millis()
    )
}

/// The Gregorian (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::{Histogram, CONNECT_BUCKETS_US};

    fn at(secs: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
    }

    #[test]
    fn dates_are_rfc3339_utc_to_the_millisecond() {
        assert_eq!(rfc3339(at(0, 0)), "1970-01-01T00:00:00.000Z");
        // `date -u -d @951827696` (a leap day) and `date -u -d @1735689599`.
        assert_eq!(rfc3339(at(951_827_696, 7)), "2000-02-29T12:34:56.007Z");
        assert_eq!(rfc3339(at(1_735_689_599, 999)), "2024-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(at(4_107_542_400, 0)), "2100-03-01T00:00:00.000Z");
    }

    fn histogram(samples_us: &[u64]) -> HistogramSnapshot {
        let h = Histogram::new(&CONNECT_BUCKETS_US);
        for &us in samples_us {
            h.record(Duration::from_micros(us));
        }
        h.snapshot()
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket_that_holds_them() {
        let h = histogram(&[]);
        assert_eq!(quantile(h.bounds_us, &h.counts, 0.5), None);
        // 100 samples in (100, 250] µs: the median is halfway through that bucket.
        let h = histogram(&[200; 100]);
        assert_eq!(quantile(h.bounds_us, &h.counts, 0.5), Some(175.0));
        // 98 fast samples and 2 slow ones in (25, 50] ms: p99 is inside the slow bucket.
        let mut samples = vec![50; 98];
        samples.extend([30_000, 40_000]);
        let h = histogram(&samples);
        let p50 = quantile(h.bounds_us, &h.counts, 0.5).expect("samples");
        assert!((p50 - 100.0 * 50.0 / 98.0).abs() < 1e-9, "{p50}");
        assert_eq!(quantile(h.bounds_us, &h.counts, 0.99), Some(37_500.0));
        // Past the last bound: the last bound.
        let h = histogram(&[60_000_000]);
        assert_eq!(quantile(h.bounds_us, &h.counts, 0.5), Some(10_000_000.0));
    }

    #[test]
    fn the_window_counts_only_what_came_after_its_start() {
        let before = histogram(&[200; 10]);
        let now = histogram(&[&[200; 10][..], &[3_000; 4]].concat());
        let json = connect_time(&now, Some(&before), Duration::from_secs(60));
        assert_eq!(json["samples"], 4);
        assert_eq!(json["window_s"], 60);
        // Four samples in (2.5, 5] ms: p50 at the bucket's middle.
        assert_eq!(json["p50_ms"], 3.75);
        // Without a start, everything since start-up; a histogram that went backwards (an
        // identity seen again after it was forgotten) counts from zero.
        assert_eq!(connect_time(&now, None, Duration::ZERO)["samples"], 14);
        assert_eq!(
            connect_time(&before, Some(&now), Duration::ZERO)["samples"],
            10
        );
        let empty = connect_time(&before, Some(&before), Duration::ZERO);
        assert_eq!(
            (&empty["samples"], &empty["p50_ms"]),
            (&json!(0), &Value::Null)
        );
    }

    #[test]
    fn the_page_is_small_self_contained_and_inserts_no_markup() {
        assert!(PAGE.len() < 30 * 1024, "{} bytes", PAGE.len());
        // No way to insert data as markup, and no asset from elsewhere.
        for forbidden in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "http://",
            "https://",
            "<link",
            "src=",
            "@import",
            "url(",
        ] {
            assert!(!PAGE.contains(forbidden), "the page contains {forbidden:?}");
        }
    }
}
