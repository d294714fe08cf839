//! Summarizes a results file (one JSON line per run) as Markdown: for each scenario and figure,
//! every label's median over the repetitions, the min–max range, and the ratio of its median to
//! the baseline's (stickylb); then the goals, checked against the medians.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

/// A figure of a scenario: the JSON key, how it is shown, and whether higher is better.
struct Figure {
    key: &'static str,
    name: &'static str,
}

const fn f(key: &'static str, name: &'static str) -> Figure {
    Figure { key, name }
}

fn figures(scenario: &str) -> &'static [Figure] {
    const BULK: &[Figure] = &[
        f("gbit_s", "Gbit/s"),
        f("lb_cpu_per_gb", "balancer CPU s per GB"),
        f("backend_cpu_per_gb", "backends' CPU s per GB"),
        f("lb_backend_cpu_per_gb", "balancer + backends CPU s per GB"),
        f("machine_cpu_per_gb", "machine CPU s per GB"),
        f("machine_busy", "machine busy (of 2 cores)"),
    ];
    const SHORT: &[Figure] = &[
        f("conns_per_s", "conns/s"),
        f("p50_us", "p50 µs"),
        f("p99_us", "p99 µs"),
        f("p999_us", "p99.9 µs"),
        f("lb_cpu_per_10k", "balancer CPU s per 10k conns"),
        f("machine_cpu_per_10k", "machine CPU s per 10k conns"),
        f("errors", "errors"),
        f("moved", "clients seen on 2 targets"),
        f("machine_busy", "machine busy"),
    ];
    const KEEP: &[Figure] = &[
        f("req_per_s", "req/s"),
        f("p50_us", "p50 µs"),
        f("p99_us", "p99 µs"),
        f("p999_us", "p99.9 µs"),
        f("lb_cpu_per_100k", "balancer CPU s per 100k req"),
        f("machine_cpu_per_100k", "machine CPU s per 100k req"),
        f("errors", "errors"),
        f("machine_busy", "machine busy"),
    ];
    const IDLE: &[Figure] = &[
        f("rss_per_conn_kib", "RSS KiB per held conn"),
        f("fds_per_conn", "fds per held conn"),
        f("pipe_fds_before", "pipe fds before"),
        f("pipe_fds_after", "pipe fds while held"),
        f("served_after_hold", "served after the hold"),
        f("rss_after_kib", "RSS KiB while held"),
        f("open_s", "seconds to open all"),
    ];
    const OVERFLOW: &[Figure] = &[
        f("offered", "offered"),
        f("served", "served"),
        f("refused", "refused at once"),
        f("refused_max_ms", "slowest refusal ms"),
        f("hanging", "left hanging (no answer in 3 s)"),
        f("recovered_of_20", "new clients served after (of 20)"),
        f("fds_at_limit", "balancer fds at the limit"),
    ];
    const FAILOVER: &[Figure] = &[
        f("failed_after_kill", "failed conns opened after the kill"),
        f("conns_after_kill", "conns opened after the kill"),
        f("failed_in_flight", "failed in flight at the kill"),
        f("after_kill_p99_ms", "after-kill p99 ms"),
        f("after_kill_max_ms", "after-kill max ms"),
        f("moved_from_victim", "clients moved off the killed target"),
        f("moved_collateral", "clients moved between live targets"),
    ];
    const IPERF: &[Figure] = &[
        f("gbit_s", "Gbit/s (iperf3's)"),
        f("lb_cpu_per_gb", "balancer CPU s per GB"),
        f("backend_cpu_per_gb", "backends' CPU s per GB"),
        f("lb_backend_cpu_per_gb", "balancer + backends CPU s per GB"),
        f("machine_cpu_per_gb", "machine CPU s per GB"),
        f("retransmits", "retransmits"),
        f("errors", "errors"),
        f("machine_busy", "machine busy (of 2 cores)"),
    ];
    match scenario {
        "bulk1" | "bulk4" => BULK,
        s if s.starts_with("iperf") => IPERF,
        "shortconn" => SHORT,
        "keepalive" => KEEP,
        "overflow" => OVERFLOW,
        "failover" => FAILOVER,
        s if s.starts_with("idle") => IDLE,
        _ => &[],
    }
}

const SCENARIO_ORDER: &[&str] = &[
    "bulk1",
    "bulk4",
    "iperf1",
    "iperf4",
    "iperf1-16k",
    "iperf4-16k",
    "shortconn",
    "keepalive",
    "idle5000",
    "idle9000",
    "overflow",
    "failover",
];

/// scenario → label → key → values over repetitions.
type Data = BTreeMap<String, BTreeMap<String, BTreeMap<String, Vec<f64>>>>;

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn fmt(x: f64) -> String {
    if x.is_nan() {
        return "–".into();
    }
    let a = x.abs();
    let s = if a >= 100.0 || x.fract() == 0.0 {
        format!("{:.0}", x)
    } else if a >= 10.0 {
        format!("{:.1}", x)
    } else if a >= 1.0 {
        format!("{:.2}", x)
    } else {
        format!("{:.3}", x)
    };
    // Thousands separators for large integers.
    if a >= 10_000.0 {
        let neg = s.starts_with('-');
        let digits: Vec<char> = s.trim_start_matches('-').chars().collect();
        let mut out = String::new();
        for (i, c) in digits.iter().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(*c);
        }
        return if neg { format!("-{out}") } else { out };
    }
    s
}

pub fn report(file: &Path, baseline: &str) -> i32 {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("load report: {}: {e}", file.display());
            return 1;
        }
    };
    let mut data: Data = BTreeMap::new();
    let mut labels: Vec<String> = Vec::new();
    let mut load1: Vec<f64> = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let (Some(scenario), Some(label)) = (
            obj.get("scenario").and_then(Value::as_str),
            obj.get("label").and_then(Value::as_str),
        ) else {
            continue;
        };
        if !labels.iter().any(|l| l == label) {
            labels.push(label.to_string());
        }
        if let Some(l) = obj.get("load1_before").and_then(Value::as_f64) {
            load1.push(l);
        }
        let per_key = data
            .entry(scenario.to_string())
            .or_default()
            .entry(label.to_string())
            .or_default();
        for (k, v) in &obj {
            let x = match v {
                Value::Number(n) => n.as_f64(),
                Value::Bool(b) => Some(*b as u8 as f64),
                _ => None,
            };
            if let Some(x) = x {
                per_key.entry(k.clone()).or_default().push(x);
            }
        }
    }
    let med = |scenario: &str, label: &str, key: &str| -> Option<f64> {
        data.get(scenario)?
            .get(label)?
            .get(key)
            .map(|v| median(v))
            .filter(|m| !m.is_nan())
    };

    println!(
        "Cells: median over the repetitions [min–max] and, for the others, ×(median ÷ {baseline}'s median)."
    );
    if !load1.is_empty() {
        println!(
            "1-minute load average before each run: median {:.2}, min {:.2}, max {:.2} ({} runs).",
            median(&load1),
            load1.iter().cloned().fold(f64::INFINITY, f64::min),
            load1.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
            load1.len()
        );
    }
    let mut scenarios: Vec<&String> = data.keys().collect();
    scenarios.sort_by_key(|s| {
        SCENARIO_ORDER
            .iter()
            .position(|o| o == s)
            .unwrap_or(usize::MAX)
    });
    for scenario in scenarios {
        let by_label = &data[scenario];
        let present: Vec<&String> = labels
            .iter()
            .filter(|l| by_label.contains_key(*l))
            .collect();
        let reps = by_label
            .values()
            .filter_map(|k| k.get("rep").map(Vec::len))
            .max()
            .unwrap_or(0);
        let plural = if reps == 1 { "" } else { "s" };
        println!("\n### {scenario} ({reps} repetition{plural})\n");
        let mut header = String::from("| figure |");
        let mut rule = String::from("|---|");
        for l in &present {
            header.push_str(&format!(" {l} |"));
            rule.push_str("---|");
        }
        println!("{header}\n{rule}");
        for fig in figures(scenario) {
            if !present.iter().any(|l| by_label[*l].contains_key(fig.key)) {
                continue;
            }
            let base = med(scenario, baseline, fig.key);
            let mut row = format!("| {} |", fig.name);
            for l in &present {
                match by_label[*l].get(fig.key) {
                    Some(v) if !v.is_empty() => {
                        let m = median(v);
                        let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
                        let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let mut cell = fmt(m);
                        if v.len() > 1 && lo != hi {
                            cell.push_str(&format!(" [{}–{}]", fmt(lo), fmt(hi)));
                        }
                        if l.as_str() != baseline {
                            if let Some(b) = base.filter(|b| *b != 0.0) {
                                cell.push_str(&format!(" ×{:.2}", m / b));
                            }
                        }
                        row.push_str(&format!(" {cell} |"));
                    }
                    _ => row.push_str(" – |"),
                }
            }
            println!("{row}");
        }
    }
    let worst = |scenario: &str, label: &str, key: &str| -> Option<f64> {
        data.get(scenario)?
            .get(label)?
            .get(key)?
            .iter()
            .cloned()
            .reduce(f64::max)
    };
    goals(&med, &worst, baseline);
    0
}

/// The bulk scenarios the bulk goals apply to.
const BULK_CLIENTS: [&str; 6] = [
    "bulk1",
    "bulk4",
    "iperf1",
    "iperf4",
    "iperf1-16k",
    "iperf4-16k",
];

/// The goals of issue 5 §4 (and issue 18: the bulk goals under every bulk client), against the
/// medians.
/// `worst` is the largest value over the repetitions (for counts that must be 0 in every run).
fn goals(
    med: &dyn Fn(&str, &str, &str) -> Option<f64>,
    worst: &dyn Fn(&str, &str, &str) -> Option<f64>,
    me: &str,
) {
    println!("\n### Goals (issue 5 §4), from the medians\n");
    println!("| goal | {me} | reference | verdict |\n|---|---|---|---|");
    let verdict = |ok: Option<bool>| match ok {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "not measured",
    };
    let peers = ["haproxy", "haproxy-splice", "nginx"];
    let best_peer = |scenario: &str, key: &str, higher: bool| -> Option<(f64, &'static str)> {
        peers
            .iter()
            .filter_map(|p| med(scenario, p, key).map(|v| (v, *p)))
            .reduce(|a, b| if (b.0 > a.0) == higher { b } else { a })
    };
    let row = |goal: String, mine: Option<f64>, reference: String, ok: Option<bool>| {
        println!(
            "| {goal} | {} | {reference} | {} |",
            mine.map(fmt).unwrap_or("–".into()),
            verdict(ok)
        );
    };
    // Every bulk client: the load tool's and iperf3's (issue 18).
    for s in BULK_CLIENTS {
        let mine = med(s, me, "gbit_s");
        let theirs = med(s, "haproxy-splice", "gbit_s");
        row(
            format!("{s}: Gbit/s ≥ HAProxy forced splice"),
            mine,
            theirs.map(fmt).unwrap_or("–".into()),
            mine.zip(theirs).map(|(a, b)| a >= b),
        );
        let mine = med(s, me, "lb_cpu_per_gb");
        let theirs = med(s, "haproxy-splice", "lb_cpu_per_gb");
        row(
            format!("{s}: CPU s per GB ≤ 0.8 × HAProxy forced splice"),
            mine,
            theirs
                .map(|t| format!("0.8 × {} = {}", fmt(t), fmt(0.8 * t)))
                .unwrap_or("–".into()),
            mine.zip(theirs).map(|(a, b)| a <= 0.8 * b),
        );
    }
    let mine = med("shortconn", me, "conns_per_s");
    let best = best_peer("shortconn", "conns_per_s", true);
    row(
        "shortconn: conns/s ≥ 1.15 × the better peer".into(),
        mine,
        best.map(|(v, p)| format!("1.15 × {} ({p}) = {}", fmt(v), fmt(1.15 * v)))
            .unwrap_or("–".into()),
        mine.zip(best).map(|(a, (b, _))| a >= 1.15 * b),
    );
    let mine = med("shortconn", me, "lb_cpu_per_10k");
    let theirs = med("shortconn", "haproxy", "lb_cpu_per_10k");
    row(
        "shortconn: CPU s per 10k conns ≤ 0.7 × HAProxy".into(),
        mine,
        theirs
            .map(|t| format!("0.7 × {} = {}", fmt(t), fmt(0.7 * t)))
            .unwrap_or("–".into()),
        mine.zip(theirs).map(|(a, b)| a <= 0.7 * b),
    );
    let mine = med("keepalive", me, "req_per_s");
    let best = best_peer("keepalive", "req_per_s", true);
    row(
        "keepalive: req/s ≥ 1.15 × the better peer".into(),
        mine,
        best.map(|(v, p)| format!("1.15 × {} ({p}) = {}", fmt(v), fmt(1.15 * v)))
            .unwrap_or("–".into()),
        mine.zip(best).map(|(a, (b, _))| a >= 1.15 * b),
    );
    let mine = med("keepalive", me, "p99_us");
    let best = best_peer("keepalive", "p99_us", false);
    row(
        "keepalive: p99 µs ≤ the better peer's".into(),
        mine,
        best.map(|(v, p)| format!("{} ({p})", fmt(v)))
            .unwrap_or("–".into()),
        mine.zip(best).map(|(a, (b, _))| a <= b),
    );
    let mine = med("keepalive", me, "lb_cpu_per_100k");
    let theirs = med("keepalive", "haproxy", "lb_cpu_per_100k");
    row(
        "keepalive: CPU s per 100k req ≤ 0.75 × HAProxy".into(),
        mine,
        theirs
            .map(|t| format!("0.75 × {} = {}", fmt(t), fmt(0.75 * t)))
            .unwrap_or("–".into()),
        mine.zip(theirs).map(|(a, b)| a <= 0.75 * b),
    );
    for s in ["idle5000", "idle9000"] {
        let mine = med(s, me, "rss_per_conn_kib");
        row(
            format!("{s}: RSS per held conn ≤ 3 KiB"),
            mine,
            format!(
                "HAProxy {}, nginx {}",
                med(s, "haproxy", "rss_per_conn_kib")
                    .map(fmt)
                    .unwrap_or("–".into()),
                med(s, "nginx", "rss_per_conn_kib")
                    .map(fmt)
                    .unwrap_or("–".into())
            ),
            mine.map(|a| a <= 3.0),
        );
        // Pooled pipes stay open, so the count is compared with the connections held: a pipe
        // per idle connection would add 2 fds per connection.
        let before = med(s, me, "pipe_fds_before");
        let after = med(s, me, "pipe_fds_after");
        let held = med(s, me, "served_at_open");
        row(
            format!("{s}: idle connections hold no pipe fds (pipe fds added < 1 % of held conns)"),
            after.zip(before).map(|(a, b)| a - b),
            format!(
                "pipe fds before {}, while holding {} conns {}",
                before.map(fmt).unwrap_or("–".into()),
                held.map(fmt).unwrap_or("–".into()),
                after.map(fmt).unwrap_or("–".into())
            ),
            before
                .zip(after)
                .zip(held)
                .map(|((b, a), h)| a - b < 0.01 * h),
        );
    }
    let served = med("idle9000", me, "served_after_hold");
    row(
        "9,000 held connections all served".into(),
        served,
        "9,000".into(),
        served.map(|s| s >= 9000.0),
    );
    let hanging = worst("overflow", me, "hanging");
    let offered = med("overflow", me, "offered");
    let refused = med("overflow", me, "refused");
    let served = med("overflow", me, "served");
    let slowest = worst("overflow", me, "refused_max_ms");
    row(
        "overflow: beyond the limit refused at once, none left hanging (worst run)".into(),
        hanging,
        format!(
            "offered {}, served {}, refused {} (slowest refusal {} ms)",
            offered.map(fmt).unwrap_or("–".into()),
            served.map(fmt).unwrap_or("–".into()),
            refused.map(fmt).unwrap_or("–".into()),
            slowest.map(fmt).unwrap_or("–".into())
        ),
        hanging.map(|h| h == 0.0),
    );
    let failed = worst("failover", me, "failed_after_kill");
    row(
        "failover: 0 failed connections opened after the kill (worst run)".into(),
        failed,
        format!(
            "worst run: HAProxy {}, HAProxy forced splice {}, nginx {}",
            worst("failover", "haproxy", "failed_after_kill")
                .map(fmt)
                .unwrap_or("–".into()),
            worst("failover", "haproxy-splice", "failed_after_kill")
                .map(fmt)
                .unwrap_or("–".into()),
            worst("failover", "nginx", "failed_after_kill")
                .map(fmt)
                .unwrap_or("–".into())
        ),
        failed.map(|f| f == 0.0),
    );
}
