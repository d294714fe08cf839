//! The Prometheus text exposition (format 0.0.4) of a [`Snapshot`]: the metric names, types,
//! help texts and labels of design §6, in one place.
//!
//! Written straight from the snapshot's numbers, one pass, into one buffer: no registry of
//! series, no per-series allocation, no sorting. That keeps a scrape of a balancer with
//! thousands of targets cheap (`benches/metrics.rs` measures it), and because every value comes
//! from the balancer's own atomics, histograms included, nothing here holds state: what a
//! scrape shows can be carried across a reload or an upgrade exactly.
//!
//! Series lifetime: every listed target has all its series from the moment it appears, so a
//! target that never got a connection still shows `target_up` and zero counters. A target
//! removed by a reload stays with `target_up` 0 and `target_draining` 1 while its connections
//! and sessions drain (`target_connections_active` shows them), then its series go (see
//! [`crate::balance::target::Registry`]).

use std::fmt::Write;

use crate::counters::{HistogramSnapshot, Reject};
use crate::proxy::{Snapshot, TargetSnapshot};

/// Every metric name, all with the `stickylb_` prefix of design §6.
pub mod names {
    pub const CONNECTIONS_ACCEPTED: &str = "stickylb_connections_accepted_total";
    pub const CONNECTIONS_ACTIVE: &str = "stickylb_connections_active";
    pub const CONNECTIONS_REJECTED: &str = "stickylb_connections_rejected_total";
    pub const TARGET_CONNECTIONS: &str = "stickylb_target_connections_total";
    pub const TARGET_CONNECTIONS_ACTIVE: &str = "stickylb_target_connections_active";
    pub const TARGET_CONNECT_FAILURES: &str = "stickylb_target_connect_failures_total";
    pub const TARGET_UP: &str = "stickylb_target_up";
    pub const TARGET_DEACTIVATIONS: &str = "stickylb_target_deactivations_total";
    pub const TARGET_BYTES: &str = "stickylb_target_bytes_total";
    pub const TARGET_CONNECT_DURATION: &str = "stickylb_target_connect_duration_seconds";
    pub const CONNECTION_DURATION: &str = "stickylb_connection_duration_seconds";
    pub const RETRIES: &str = "stickylb_retries_total";
    pub const HASH_OVERFLOWS: &str = "stickylb_hash_overflows_total";
    pub const SESSIONS: &str = "stickylb_sessions";
    pub const CONFIG_RELOADS: &str = "stickylb_config_reloads_total";
    pub const CONFIG_LAST_RELOAD_SUCCESS: &str = "stickylb_config_last_reload_success";
    pub const BUILD_INFO: &str = "stickylb_build_info";
    pub const ACCEPT_ERRORS: &str = "stickylb_accept_errors_total";
    pub const TARGET_DRAINING: &str = "stickylb_target_draining";
    pub const TARGET_CHECKS: &str = "stickylb_target_checks_total";
    pub const UPGRADES: &str = "stickylb_upgrades_total";
}

/// The media type of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders `s` as the exposition a scrape returns.
pub fn render(s: &Snapshot) -> String {
    use names::*;
    // Room for each target's series and histogram buckets, so the buffer rarely grows.
    let mut out = Out(String::with_capacity(4096 + 1700 * s.targets.len()));
    let o = &mut out;

    o.head(
        CONNECTIONS_ACCEPTED,
        "counter",
        "Client connections accepted, including those then rejected.",
    );
    o.sample(CONNECTIONS_ACCEPTED, &[], s.accepted);
    o.head(CONNECTIONS_ACTIVE, "gauge", "Client connections open now.");
    o.sample(CONNECTIONS_ACTIVE, &[], s.active);
    o.head(
        CONNECTIONS_REJECTED,
        "counter",
        "Client connections closed without being proxied, by reason.",
    );
    for reason in Reject::ALL {
        o.sample(
            CONNECTIONS_REJECTED,
            &[("reason", reason.label())],
            s.rejected(reason),
        );
    }
    o.head(
        RETRIES,
        "counter",
        "Connect attempts after the first one of a client connection.",
    );
    o.sample(RETRIES, &[], s.retries);
    o.head(
        HASH_OVERFLOWS,
        "counter",
        "New clients sent past their first-ranked target because it was at the \
         hashBalanceFactor bound.",
    );
    o.sample(HASH_OVERFLOWS, &[], s.hash_overflows);
    o.head(SESSIONS, "gauge", "Sticky sessions in the session table.");
    o.sample(SESSIONS, &[], s.sessions);
    o.head(CONFIG_RELOADS, "counter", "Config reloads, by result.");
    o.sample(CONFIG_RELOADS, &[("result", "success")], s.reloads_success);
    o.sample(CONFIG_RELOADS, &[("result", "failure")], s.reloads_failure);
    o.head(
        CONFIG_LAST_RELOAD_SUCCESS,
        "gauge",
        "0 if the last config reload failed, else 1.",
    );
    o.sample(
        CONFIG_LAST_RELOAD_SUCCESS,
        &[],
        u64::from(!s.last_reload_failed),
    );
    o.head(
        UPGRADES,
        "counter",
        "Upgrades (SIGUSR2, stickylb upgrade), by result: success when a new process took \
         over, failure when the old one kept serving.",
    );
    o.sample(UPGRADES, &[("result", "success")], s.upgrades_success);
    o.sample(UPGRADES, &[("result", "failure")], s.upgrades_failure);
    o.head(
        BUILD_INFO,
        "gauge",
        "Always 1; the version label says which stickylb runs.",
    );
    o.sample(BUILD_INFO, &[("version", crate::version::label())], 1);
    o.head(
        ACCEPT_ERRORS,
        "counter",
        "accept(2) failures: out of file descriptors (fd_limit) or other.",
    );
    o.sample(
        ACCEPT_ERRORS,
        &[("kind", "fd_limit")],
        s.accept_errors_fd_limit,
    );
    o.sample(ACCEPT_ERRORS, &[("kind", "other")], s.accept_errors_other);
    o.head(
        CONNECTION_DURATION,
        "histogram",
        "Lifetime of proxied client connections, from accept to close.",
    );
    o.histogram(CONNECTION_DURATION, None, &s.connection_duration);

    type Value = fn(&TargetSnapshot) -> u64;
    let per_target: [(&str, &str, &str, Value); 6] = [
        (
            TARGET_CONNECTIONS,
            "counter",
            "Connections established to the target.",
            |t| t.connections,
        ),
        (
            TARGET_CONNECTIONS_ACTIVE,
            "gauge",
            "Connections open to the target now.",
            |t| t.active,
        ),
        (
            TARGET_CONNECT_FAILURES,
            "counter",
            "Connects to the target that failed (refused, unreachable, reset, timeout).",
            |t| t.connect_failures,
        ),
        (
            TARGET_UP,
            "gauge",
            "1 if the target takes new clients (configured, not draining, not down by its \
             health check, not in a deactivation window), else 0.",
            |t| u64::from(t.up),
        ),
        (
            TARGET_DRAINING,
            "gauge",
            "1 while the target drains (drain in the config, or removed from it): no new \
             clients, its connections and sessions go on.",
            |t| u64::from(t.draining),
        ),
        (
            TARGET_DEACTIVATIONS,
            "counter",
            "Times the target went from up to deactivated.",
            |t| t.deactivations,
        ),
    ];
    for (name, kind, help, value) in per_target {
        o.head(name, kind, help);
        for t in &s.targets {
            o.sample(name, &[("target", &t.id)], value(t));
        }
    }
    o.head(
        TARGET_CHECKS,
        "counter",
        "Active health checks of the target, by result.",
    );
    for t in &s.targets {
        o.sample(
            TARGET_CHECKS,
            &[("target", &t.id), ("result", "success")],
            t.checks_success,
        );
        o.sample(
            TARGET_CHECKS,
            &[("target", &t.id), ("result", "failure")],
            t.checks_failure,
        );
    }
    o.head(
        TARGET_BYTES,
        "counter",
        "Bytes relayed to the target and from it to clients.",
    );
    for t in &s.targets {
        o.sample(
            TARGET_BYTES,
            &[("target", &t.id), ("direction", "to_target")],
            t.bytes_to_target,
        );
        o.sample(
            TARGET_BYTES,
            &[("target", &t.id), ("direction", "to_client")],
            t.bytes_to_client,
        );
    }
    o.head(
        TARGET_CONNECT_DURATION,
        "histogram",
        "Time to connect to the target (successful connects).",
    );
    for t in &s.targets {
        o.histogram(TARGET_CONNECT_DURATION, Some(&t.id), &t.connect_duration);
    }
    out.0
}

/// The exposition being written. `fmt::Write` into a `String` cannot fail.
struct Out(String);

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = write!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
    }

    fn series(&mut self, name: &str, labels: &[(&str, &str)]) {
        self.0.push_str(name);
        if labels.is_empty() {
            return;
        }
        self.0.push('{');
        for (i, (key, value)) in labels.iter().enumerate() {
            if i > 0 {
                self.0.push(',');
            }
            self.0.push_str(key);
            self.0.push_str("=\"");
            escape_label_value(&mut self.0, value);
            self.0.push('"');
        }
        self.0.push('}');
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.series(name, labels);
        let _ = writeln!(self.0, " {value}");
    }

    /// `name_bucket` (cumulative, one per bound and `+Inf`), `name_sum` in seconds and
    /// `name_count`, with the `target` label when given.
    fn histogram(&mut self, name: &str, target: Option<&str>, h: &HistogramSnapshot) {
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0;
        let mut le = String::new();
        for (i, count) in h.counts.iter().enumerate() {
            cumulative += count;
            le.clear();
            match h.bounds_us.get(i) {
                Some(&us) => {
                    let _ = write!(le, "{}", us as f64 / 1e6);
                }
                None => le.push_str("+Inf"),
            }
            match target {
                Some(t) => self.sample(&bucket, &[("target", t), ("le", &le)], cumulative),
                None => self.sample(&bucket, &[("le", &le)], cumulative),
            }
        }
        let labels: &[(&str, &str)] = match &target {
            Some(t) => &[("target", t)],
            None => &[],
        };
        self.series(&format!("{name}_sum"), labels);
        let _ = writeln!(self.0, " {}", h.sum_us as f64 / 1e6);
        self.sample(&format!("{name}_count"), labels, cumulative);
    }
}

/// A label value as the exposition format wants it: `\` → `\\`, `"` → `\"`, line feed → `\n`.
/// A target `id` is any non-empty string from the config, so this is what makes the scraped
/// value the id, byte for byte.
fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exposition format's label value escapes: `\\`, `\"` and `\n`.
    fn unescape(escaped: &str) -> String {
        let mut out = String::new();
        let mut chars = escaped.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('n') => out.push('\n'),
                Some(c @ ('\\' | '"')) => out.push(c),
                other => panic!("bad escape {other:?} in {escaped}"),
            }
        }
        out
    }

    #[test]
    fn target_ids_with_backslashes_quotes_and_line_feeds_read_back_unchanged() {
        for id in [r#"a\"b"#, r"c\", r"d\\e", "f\ng\"h", "plain:80"] {
            let mut escaped = String::new();
            escape_label_value(&mut escaped, id);
            assert!(!escaped.contains('\n'), "{escaped:?}");
            assert_eq!(unescape(&escaped), id);
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_the_count() {
        let h = crate::counters::Histogram::new(&crate::counters::CONNECT_BUCKETS_US);
        for us in [50, 300, 300, 20_000_000] {
            h.record(std::time::Duration::from_micros(us));
        }
        let mut out = Out(String::new());
        out.histogram("h", Some("t"), &h.snapshot());
        let text = out.0;
        assert!(
            text.contains("h_bucket{target=\"t\",le=\"0.0001\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("h_bucket{target=\"t\",le=\"0.0005\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("h_bucket{target=\"t\",le=\"10\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("h_bucket{target=\"t\",le=\"+Inf\"} 4\n"),
            "{text}"
        );
        assert!(text.contains("h_sum{target=\"t\"} 20.00065\n"), "{text}");
        assert!(text.contains("h_count{target=\"t\"} 4\n"), "{text}");
    }
}
