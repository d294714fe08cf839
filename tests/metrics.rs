//! The Prometheus endpoint as Prometheus sees it: real HTTP scrapes of `/metrics` after real
//! traffic, exact counter movements, the whole exposition checked by `promtool check metrics`,
//! and a real Prometheus server scraping a balancer. `promtool` and `prometheus` come from the
//! Debian package `prometheus`, which `scripts/test` installs and requires (without them those
//! checks fail there); a plain `cargo test` without them skips those checks and says so (see
//! `stickylb_testkit::tools`).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use stickylb::admin::{self, Admin};
use stickylb::reload::{Reloader, Trigger};
use stickylb::server::Server;
use stickylb_testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_stickylb");

/// Every metric of design §6 (§12's health and drain, §13's `upgrades_total`, §14's
/// `hash_overflows_total`) and its type.
const METRICS: [(&str, &str); 21] = [
    ("stickylb_connections_accepted_total", "counter"),
    ("stickylb_connections_active", "gauge"),
    ("stickylb_connections_rejected_total", "counter"),
    ("stickylb_target_connections_total", "counter"),
    ("stickylb_target_connections_active", "gauge"),
    ("stickylb_target_connect_failures_total", "counter"),
    ("stickylb_target_up", "gauge"),
    ("stickylb_target_deactivations_total", "counter"),
    ("stickylb_target_bytes_total", "counter"),
    ("stickylb_target_connect_duration_seconds", "histogram"),
    ("stickylb_connection_duration_seconds", "histogram"),
    ("stickylb_retries_total", "counter"),
    ("stickylb_hash_overflows_total", "counter"),
    ("stickylb_sessions", "gauge"),
    ("stickylb_config_reloads_total", "counter"),
    ("stickylb_config_last_reload_success", "gauge"),
    ("stickylb_build_info", "gauge"),
    ("stickylb_accept_errors_total", "counter"),
    ("stickylb_target_draining", "gauge"),
    ("stickylb_target_checks_total", "counter"),
    ("stickylb_upgrades_total", "counter"),
];

// ---------------------------------------------------------------------------------------------
// Helpers: HTTP, the exposition parsed, balancers with metrics.

/// `GET path` over a fresh connection; returns the status code and the body.
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, "GET", path).await
}

async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let response = http_request(addr, method, path).await;
    (response.status, response.body)
}

/// One sample line of the exposition.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// One scrape, parsed.
#[derive(Debug)]
struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

impl Scrape {
    fn parse(text: String) -> Scrape {
        let samples = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(parse_sample)
            .collect();
        Scrape { text, samples }
    }

    /// The value of the series `name` with exactly `labels`, if present.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// Like `get`, but the series must be there.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no series {name}{labels:?} in:\n{}", self.text))
    }

    /// The sum over every series of `name` (all label values).
    fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }

    /// The `# TYPE` of `name`.
    fn type_of(&self, name: &str) -> Option<&str> {
        self.text.lines().find_map(|l| {
            let rest = l.strip_prefix("# TYPE ")?;
            let (n, t) = rest.split_once(' ')?;
            (n == name).then_some(t)
        })
    }
}

fn parse_sample(line: &str) -> Sample {
    let (series, value) = line.rsplit_once(' ').expect("name and value");
    let value = match value {
        "+Inf" => f64::INFINITY,
        v => v
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}")),
    };
    let Some((name, rest)) = series.split_once('{') else {
        return Sample {
            name: series.to_string(),
            labels: BTreeMap::new(),
            value,
        };
    };
    let mut labels = BTreeMap::new();
    let mut chars = rest.trim_end_matches('}').chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        assert_eq!(chars.next(), Some('"'), "label value quoted in {line:?}");
        let mut val = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => val.push('\n'),
                    Some(other) => val.push(other),
                    None => break,
                },
                '"' => break,
                c => val.push(c),
            }
        }
        if chars.peek() == Some(&',') {
            chars.next();
        }
        labels.insert(key, val);
    }
    Sample {
        name: name.to_string(),
        labels,
        value,
    }
}

async fn scrape(exporter: &Admin) -> Scrape {
    let (status, body) = http_get(exporter.local_addr(), "/metrics").await;
    assert_eq!(status, 200, "{body}");
    Scrape::parse(body)
}

/// Scrapes until `ready` holds (a bounded wait), returning that scrape.
async fn scrape_until(exporter: &Admin, what: &str, ready: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let scrape = scrape(exporter).await;
        if ready(&scrape) {
            return scrape;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never saw {what}; last scrape:\n{}",
            scrape.text
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until no client connection is open, so every counter of the closed ones has landed.
async fn settled(exporter: &Admin) -> Scrape {
    scrape_until(exporter, "connections_active 0", |s| {
        s.value("stickylb_connections_active", &[]) == 0.0
    })
    .await
}

/// Starts the metrics endpoint of `server` on a free loopback port.
fn export(server: &Arc<Server>) -> Admin {
    admin::start("127.0.0.1:0".parse().unwrap(), server.clone()).expect("metrics endpoint")
}

fn id(addr: SocketAddr) -> String {
    addr.to_string()
}

/// Runs `promtool check metrics` on `text`; panics with its findings unless it is clean.
fn promtool_check(text: &str) {
    if !require_tool("promtool") {
        return;
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package `prometheus`, installed by scripts/test)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {} {said}\non:\n{text}",
        out.status
    );
}

/// One short connection from `ip` to an echo backend: sends `ping\n`, reads the echo, closes,
/// and waits for the balancer's close in turn.
async fn ping(ip: std::net::Ipv4Addr, lb: SocketAddr) {
    let mut stream = served(ip, lb).await.expect("ping echoed in time");
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest)).await;
}

// ---------------------------------------------------------------------------------------------
// The exposition.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_is_there_from_start_up_and_promtool_accepts_the_exposition() {
    let a = Backend::start("a", Mode::Echo).await;
    let b = Backend::start("b", Mode::Echo).await;
    let server = start(&[a.addr, b.addr], serde_json::json!({}));
    let exporter = export(&server);
    let s = scrape(&exporter).await;

    for (name, kind) in METRICS {
        assert_eq!(s.type_of(name), Some(kind), "{name} in:\n{}", s.text);
    }
    for target in [id(a.addr), id(b.addr)] {
        let t = target.as_str();
        assert_eq!(s.value("stickylb_target_up", &[("target", t)]), 1.0);
        assert_eq!(s.value("stickylb_target_draining", &[("target", t)]), 0.0);
        for result in ["success", "failure"] {
            let labels = [("target", t), ("result", result)];
            assert_eq!(s.value("stickylb_target_checks_total", &labels), 0.0);
        }
        for name in [
            "stickylb_target_connections_total",
            "stickylb_target_connections_active",
            "stickylb_target_connect_failures_total",
            "stickylb_target_deactivations_total",
            "stickylb_target_connect_duration_seconds_count",
        ] {
            assert_eq!(s.value(name, &[("target", t)]), 0.0, "{name}");
        }
        for direction in ["to_target", "to_client"] {
            let labels = [("target", t), ("direction", direction)];
            assert_eq!(s.value("stickylb_target_bytes_total", &labels), 0.0);
        }
        // Real buckets (a histogram, not the exporter's default summary).
        let le = [("target", t), ("le", "0.001")];
        assert_eq!(
            s.value("stickylb_target_connect_duration_seconds_bucket", &le),
            0.0
        );
    }
    for reason in ["denied", "limit", "client_limit", "no_target"] {
        let labels = [("reason", reason)];
        assert_eq!(s.value("stickylb_connections_rejected_total", &labels), 0.0);
    }
    for kind in ["fd_limit", "other"] {
        assert_eq!(
            s.value("stickylb_accept_errors_total", &[("kind", kind)]),
            0.0
        );
    }
    for result in ["success", "failure"] {
        let labels = [("result", result)];
        assert_eq!(s.value("stickylb_config_reloads_total", &labels), 0.0);
        assert_eq!(s.value("stickylb_upgrades_total", &labels), 0.0);
    }
    assert_eq!(s.value("stickylb_config_last_reload_success", &[]), 1.0);
    let version = [("version", env!("CARGO_PKG_VERSION"))];
    assert_eq!(s.value("stickylb_build_info", &version), 1.0);
    assert_eq!(
        s.value("stickylb_connection_duration_seconds_count", &[]),
        0.0
    );
    assert_eq!(
        s.value(
            "stickylb_connection_duration_seconds_bucket",
            &[("le", "3600")]
        ),
        0.0
    );
    promtool_check(&s.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_get_and_head_of_the_endpoint_paths_are_served() {
    let backend = Backend::start("a", Mode::Echo).await;
    let server = start(&[backend.addr], serde_json::json!({}));
    let exporter = export(&server);
    let addr = exporter.local_addr();
    assert_eq!(http_get(addr, "/metrics?x=1").await.0, 200);
    // `/` and `/status` are the status page (tests/status.rs); nothing else is served.
    assert_eq!(http_get(addr, "/metrics/x").await.0, 404);
    assert_eq!(http(addr, "POST", "/metrics").await.0, 405);
    let (status, body) = http(addr, "HEAD", "/metrics").await;
    assert_eq!((status, body.as_str()), (200, ""));
    assert!(admin::prometheus::render(&server.snapshot()).contains("stickylb_build_info"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_metrics_port_is_an_error_naming_the_address() {
    let backend = Backend::start("a", Mode::Echo).await;
    let server = start(&[backend.addr], serde_json::json!({}));
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    let error = admin::start(addr, server.clone()).expect_err("port in use");
    assert!(error.to_string().contains(&addr.to_string()), "{error}");
}

// ---------------------------------------------------------------------------------------------
// Exact movements after real traffic.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_connections_move_every_counter_by_exactly_n() {
    const N: u32 = 40;
    const DENIED: u32 = 3;
    let a = Backend::start("a", Mode::Echo).await;
    let b = Backend::start("b", Mode::Echo).await;
    let server = start(
        &[a.addr, b.addr],
        serde_json::json!({"deny": ["127.99.0.0/16"]}),
    );
    let exporter = export(&server);
    let lb = server.local_addr();
    let before = scrape(&exporter).await;

    for n in 0..N {
        ping(client_ip(n), lb).await;
    }
    for n in 0..DENIED {
        let _ = first_read([127, 99, 0, 1 + n as u8].into(), lb).await;
    }
    let after = settled(&exporter).await;

    let delta = |name: &str, labels: &[(&str, &str)]| {
        after.value(name, labels) - before.get(name, labels).unwrap_or(0.0)
    };
    let sum_delta = |name: &str| after.sum(name) - before.sum(name);
    let (n, denied) = (f64::from(N), f64::from(DENIED));
    assert_eq!(
        delta("stickylb_connections_accepted_total", &[]),
        n + denied
    );
    let denied_labels = [("reason", "denied")];
    assert_eq!(
        delta("stickylb_connections_rejected_total", &denied_labels),
        denied
    );
    assert_eq!(sum_delta("stickylb_connections_rejected_total"), denied);
    assert_eq!(sum_delta("stickylb_target_connections_total"), n);
    assert_eq!(
        sum_delta("stickylb_target_connect_duration_seconds_count"),
        n
    );
    assert_eq!(delta("stickylb_connection_duration_seconds_count", &[]), n);
    assert_eq!(sum_delta("stickylb_target_bytes_total"), 2.0 * 5.0 * n);
    assert_eq!(sum_delta("stickylb_retries_total"), 0.0);
    assert_eq!(sum_delta("stickylb_target_connect_failures_total"), 0.0);
    assert_eq!(after.value("stickylb_sessions", &[]), n);
    assert_eq!(after.sum("stickylb_target_connections_active"), 0.0);
    // Both targets got some of the 40 clients, and each backend saw what its series says.
    for backend in [&a, &b] {
        let t = id(backend.addr);
        let got = after.value("stickylb_target_connections_total", &[("target", &t)]);
        assert_eq!(got, backend.accepted() as f64, "{t}");
        assert!(got > 0.0, "{t} got no client");
    }
    // The histograms' +Inf buckets agree with their counts.
    assert_eq!(
        after.value(
            "stickylb_connection_duration_seconds_bucket",
            &[("le", "+Inf")]
        ),
        n
    );
    // No label holds a client address.
    for sample in &after.samples {
        for value in sample.labels.values() {
            assert!(
                !value.starts_with("127.10.") && !value.starts_with("127.99."),
                "client address in {sample:?}"
            );
        }
    }
    promtool_check(&after.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_transfer_moves_the_byte_counters_by_its_size_each_way() {
    const UP: usize = 123_457;
    const DOWN: usize = 54_321;
    // A backend that reads the whole request, then answers with DOWN bytes: different sizes
    // each way, so a direction mix-up shows.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let served = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let received = check_pattern(&mut stream, 1, UP).await.unwrap();
        send_pattern(&mut stream, 2, DOWN).await.unwrap();
        received
    });
    let server = start(&[backend], serde_json::json!({}));
    let exporter = export(&server);
    let t = id(backend);

    let stream = connect_from(client_ip(1), server.local_addr())
        .await
        .unwrap();
    let (mut r, mut w) = stream.into_split();
    send_pattern(&mut w, 1, UP).await.unwrap();
    let got = tokio::time::timeout(PATIENCE, check_pattern(&mut r, 2, DOWN))
        .await
        .expect("reply in time")
        .unwrap();
    assert_eq!((served.await.unwrap(), got), (UP, DOWN));
    let s = settled(&exporter).await;
    let bytes = |direction| {
        s.value(
            "stickylb_target_bytes_total",
            &[("target", &t), ("direction", direction)],
        )
    };
    assert_eq!(bytes("to_target"), UP as f64);
    assert_eq!(bytes("to_client"), DOWN as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_of_an_open_connection_are_counted_before_it_closes() {
    const LEN: usize = 10_000;
    let backend = Backend::start("a", Mode::Echo).await;
    let server = start(&[backend.addr], serde_json::json!({}));
    let exporter = export(&server);
    let t = id(backend.addr);
    let mut stream = connect_from(client_ip(2), server.local_addr())
        .await
        .unwrap();
    let mut data = vec![0u8; LEN];
    Pattern::new(3).fill(&mut data);
    stream.write_all(&data).await.unwrap();
    let mut echo = vec![0u8; LEN];
    stream.read_exact(&mut echo).await.unwrap();
    assert_eq!(echo, data);

    // Still open: the scrape sees its bytes now (counted as they move, not at close).
    let s = scrape(&exporter).await;
    let bytes = |direction| {
        s.value(
            "stickylb_target_bytes_total",
            &[("target", &t), ("direction", direction)],
        )
    };
    assert_eq!(
        (bytes("to_target"), bytes("to_client")),
        (LEN as f64, LEN as f64)
    );
    assert_eq!(s.value("stickylb_connections_active", &[]), 1.0);
    let target = [("target", t.as_str())];
    assert_eq!(s.value("stickylb_target_connections_active", &target), 1.0);
    assert_eq!(
        s.value("stickylb_connection_duration_seconds_count", &[]),
        0.0
    );
    drop(stream);
    let s = settled(&exporter).await;
    assert_eq!(s.value("stickylb_target_connections_active", &target), 0.0);
    assert_eq!(
        s.value("stickylb_connection_duration_seconds_count", &[]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_target_fails_deactivates_and_is_up_again_after_the_window() {
    const WINDOW_MS: u64 = 1500;
    let mut a = Backend::start("a", Mode::Named).await;
    let b = Backend::start("b", Mode::Named).await;
    let server = start(
        &[a.addr, b.addr],
        // No sessions: after the window, a client goes where the hash says at once.
        serde_json::json!({"targetDeactivationDuration": WINDOW_MS, "sessionExpiry": 0}),
    );
    let exporter = export(&server);
    let lb = server.local_addr();
    let (ta, tb) = (id(a.addr), id(b.addr));
    let (up_a, up_b) = ([("target", ta.as_str())], [("target", tb.as_str())]);

    // A client the hash sends to `a`.
    let mut client = None;
    for n in 100..200 {
        if which(client_ip(n), lb).await.unwrap().0 == "a" {
            client = Some(client_ip(n));
            break;
        }
    }
    let client = client.expect("a client on a");
    let before = settled(&exporter).await;

    // Taken before the failed connect, so the window surely ends after stopped_at + WINDOW_MS.
    let stopped_at = tokio::time::Instant::now();
    a.stop().await;
    assert_eq!(which(client, lb).await.unwrap().0, "b", "failed over");
    let s = settled(&exporter).await;
    let delta =
        |name: &str, labels: &[(&str, &str)]| s.value(name, labels) - before.value(name, labels);
    assert_eq!(delta("stickylb_target_connect_failures_total", &up_a), 1.0);
    assert_eq!(delta("stickylb_target_deactivations_total", &up_a), 1.0);
    assert_eq!(delta("stickylb_target_connect_failures_total", &up_b), 0.0);
    assert_eq!(delta("stickylb_retries_total", &[]), 1.0);
    assert_eq!(delta("stickylb_target_connections_total", &up_b), 1.0);
    assert_eq!(s.value("stickylb_target_up", &up_a), 0.0);
    assert_eq!(s.value("stickylb_target_up", &up_b), 1.0);
    let no_target = [("reason", "no_target")];
    assert_eq!(
        s.value("stickylb_connections_rejected_total", &no_target),
        0.0
    );

    // Back on its port: still down until the window ends, then up again by itself.
    a.restart().await;
    let s = scrape(&exporter).await;
    if stopped_at.elapsed() < Duration::from_millis(WINDOW_MS - 200) {
        assert_eq!(
            s.value("stickylb_target_up", &up_a),
            0.0,
            "inside the window"
        );
    }
    scrape_until(&exporter, "target_up 1 for a", |s| {
        s.value("stickylb_target_up", &up_a) == 1.0
    })
    .await;
    assert!(stopped_at.elapsed() >= Duration::from_millis(WINDOW_MS));
    assert_eq!(
        which(client, lb).await.unwrap().0,
        "a",
        "back to its target"
    );
    let s = settled(&exporter).await;
    assert_eq!(
        s.value("stickylb_target_connections_total", &up_a)
            - before.value("stickylb_target_connections_total", &up_a),
        1.0
    );
    assert_eq!(
        s.value("stickylb_target_deactivations_total", &up_a)
            - before.value("stickylb_target_deactivations_total", &up_a),
        1.0,
        "one deactivation, not one per failed connect"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reachable_target_counts_a_no_target_reject() {
    let dead = dead_port();
    let server = start(&[dead], serde_json::json!({}));
    let exporter = export(&server);
    let _ = first_read(client_ip(3), server.local_addr()).await;
    let s = settled(&exporter).await;
    let no_target = [("reason", "no_target")];
    assert_eq!(
        s.value("stickylb_connections_rejected_total", &no_target),
        1.0
    );
    let t = id(dead);
    let target = [("target", t.as_str())];
    assert_eq!(
        s.value("stickylb_target_connect_failures_total", &target),
        1.0
    );
    assert_eq!(s.value("stickylb_target_up", &target), 0.0);
    assert_eq!(s.value("stickylb_connections_accepted_total", &[]), 1.0);
    assert_eq!(
        s.value("stickylb_connection_duration_seconds_count", &[]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_count_their_reasons() {
    let backend = Backend::start("a", Mode::Echo).await;
    let per_client = start(
        &[backend.addr],
        serde_json::json!({"maxConnectionsPerClient": 1}),
    );
    let total = start(&[backend.addr], serde_json::json!({"maxConnections": 1}));
    let (per_client_metrics, total_metrics) = (export(&per_client), export(&total));

    let mut held = connect_from(client_ip(5), per_client.local_addr())
        .await
        .unwrap();
    held.write_all(b"x").await.unwrap();
    held.read_exact(&mut [0u8; 1]).await.unwrap();
    let _ = first_read(client_ip(5), per_client.local_addr()).await;
    let s = scrape(&per_client_metrics).await;
    let client_limit = [("reason", "client_limit")];
    assert_eq!(
        s.value("stickylb_connections_rejected_total", &client_limit),
        1.0
    );
    assert_eq!(s.sum("stickylb_connections_rejected_total"), 1.0);

    let mut held = connect_from(client_ip(6), total.local_addr())
        .await
        .unwrap();
    held.write_all(b"x").await.unwrap();
    held.read_exact(&mut [0u8; 1]).await.unwrap();
    let _ = first_read(client_ip(7), total.local_addr()).await;
    let s = scrape(&total_metrics).await;
    let limit = [("reason", "limit")];
    assert_eq!(s.value("stickylb_connections_rejected_total", &limit), 1.0);
    assert_eq!(s.sum("stickylb_connections_rejected_total"), 1.0);
    assert_eq!(s.value("stickylb_connections_accepted_total", &[]), 2.0);
}

// ---------------------------------------------------------------------------------------------
// Reloads.

/// A balancer started from a config file, with its reloader and metrics.
struct FromFile {
    dir: TempDir,
    server: Arc<Server>,
    reloader: Arc<Reloader>,
    exporter: Admin,
}

impl FromFile {
    fn start(tag: &str, targets: &[SocketAddr]) -> FromFile {
        let dir = TempDir::new(tag);
        std::fs::write(
            dir.path("config.json"),
            config_text(targets, serde_json::json!({})),
        )
        .unwrap();
        let server = start_from_file(&dir.path("config.json"), false);
        let reloader = Reloader::new(server.clone());
        let exporter = export(&server);
        FromFile {
            dir,
            server,
            reloader,
            exporter,
        }
    }

    fn write(&self, text: &str) {
        std::fs::write(self.dir.path("config.json"), text).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_overflows_count_each_new_client_sent_past_a_target_at_the_bound() {
    use stickylb::balance::hash::{client_key, target_seed, Table};
    let a = Backend::start("a", Mode::Echo).await;
    let b = Backend::start("b", Mode::Echo).await;
    let addrs = [a.addr, b.addr];
    let server = start(&addrs, serde_json::json!({"hashBalanceFactor": 100}));
    let exporter = export(&server);
    let lb = server.local_addr();
    let table = Table::new(&addrs.map(|t| (target_seed(&id(t)), 1)));
    let first_ranked = |n: u32| table.pick(client_key(client_ip(n).into()), |_| true);
    // A hot client holds 4 connections open on its target: at 100 % of the mean (counting
    // the next connection, at most (4 + 1 + 1) / 2 = 3), every new client that ranks that
    // target first is sent to the other one, and counted.
    let mut hot = Vec::new();
    for _ in 0..4 {
        let mut stream = connect_from(client_ip(0), lb).await.expect("connect");
        stream.write_all(b"ping\n").await.unwrap();
        let mut echo = [0u8; 5];
        stream.read_exact(&mut echo).await.expect("echo");
        hot.push(stream);
    }
    for n in 1..=20 {
        ping(client_ip(n), lb).await;
    }
    let expected = (1..=20)
        .filter(|&n| first_ranked(n) == first_ranked(0))
        .count();
    assert!(expected > 0, "some new client ranks the hot target first");
    let s = scrape(&exporter).await;
    assert_eq!(
        s.value("stickylb_hash_overflows_total", &[]),
        expected as f64,
        "{}",
        s.text
    );
    drop(hot);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_reload_counts_a_failure_and_a_good_one_a_success() {
    let backend = Backend::start("a", Mode::Echo).await;
    let lb = FromFile::start("metrics-reload", &[backend.addr]);
    let failure = [("result", "failure")];
    let success = [("result", "success")];

    lb.write("{\"sourcePort\": 1, \"targets\": [");
    lb.reloader
        .reload(Trigger::Signal)
        .await
        .expect_err("half a file is rejected");
    let s = scrape(&lb.exporter).await;
    assert_eq!(s.value("stickylb_config_reloads_total", &failure), 1.0);
    assert_eq!(s.value("stickylb_config_reloads_total", &success), 0.0);
    assert_eq!(s.value("stickylb_config_last_reload_success", &[]), 0.0);

    lb.write(&config_text(&[backend.addr], serde_json::json!({})));
    lb.reloader.reload(Trigger::Signal).await.expect("valid");
    let s = scrape(&lb.exporter).await;
    assert_eq!(s.value("stickylb_config_reloads_total", &failure), 1.0);
    assert_eq!(s.value("stickylb_config_reloads_total", &success), 1.0);
    assert_eq!(s.value("stickylb_config_last_reload_success", &[]), 1.0);
    promtool_check(&s.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_target_is_not_up_and_its_counters_go_on_if_it_comes_back() {
    let a = Backend::start("a", Mode::Named).await;
    let b = Backend::start("b", Mode::Named).await;
    let lb = FromFile::start("metrics-removed", &[a.addr, b.addr]);
    let addr = lb.server.local_addr();
    let (ta, tb) = (id(a.addr), id(b.addr));
    let (on_a, on_b) = ([("target", ta.as_str())], [("target", tb.as_str())]);

    let mut on_a_clients = Vec::new();
    for n in 200..230 {
        let (name, stream) = which(client_ip(n), addr).await.unwrap();
        drop(stream);
        if name == "a" {
            on_a_clients.push(client_ip(n));
        }
    }
    let s = settled(&lb.exporter).await;
    let served_by_a = s.value("stickylb_target_connections_total", &on_a);
    assert_eq!(served_by_a, on_a_clients.len() as f64);
    assert!(served_by_a > 0.0);

    // Removed: reported, but not up.
    lb.write(&config_text(&[b.addr], serde_json::json!({})));
    lb.reloader.reload(Trigger::Signal).await.expect("valid");
    let s = scrape(&lb.exporter).await;
    assert_eq!(s.value("stickylb_target_up", &on_a), 0.0);
    assert_eq!(s.value("stickylb_target_up", &on_b), 1.0);
    assert_eq!(
        s.value("stickylb_target_connections_total", &on_a),
        served_by_a
    );

    // Reloaded again, the removed target's state is forgotten (nothing uses it); added back, it
    // starts a fresh state, and its series go on from where they were rather than restarting.
    lb.reloader.reload(Trigger::Signal).await.expect("valid");
    lb.write(&config_text(&[a.addr, b.addr], serde_json::json!({})));
    lb.reloader.reload(Trigger::Signal).await.expect("valid");
    let s = scrape(&lb.exporter).await;
    assert_eq!(s.value("stickylb_target_up", &on_a), 1.0);
    assert_eq!(
        s.value("stickylb_target_connections_total", &on_a),
        served_by_a
    );
    let client = on_a_clients[0];
    let (name, stream) = which(client, addr).await.unwrap();
    assert_eq!(name, "a");
    drop(stream);
    let s = settled(&lb.exporter).await;
    assert_eq!(
        s.value("stickylb_target_connections_total", &on_a),
        served_by_a + 1.0
    );
    promtool_check(&s.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_are_counted_by_result_and_a_drained_target_reads_draining_and_not_up() {
    let a = Backend::start("a", Mode::Echo).await;
    let mut b = Backend::start("b", Mode::Echo).await;
    let lb = FromFile::start("metrics-health", &[a.addr, b.addr]);
    let (ta, tb) = (id(a.addr), id(b.addr));
    let addrs = [a.addr, b.addr];
    let config = |drain_a: bool| {
        let checks = serde_json::json!({
            "healthCheck": {"interval": 50, "timeout": 200, "rise": 1, "fall": 1},
        });
        let mut c: serde_json::Value = serde_json::from_str(&config_text(&addrs, checks)).unwrap();
        if drain_a {
            c["targets"][0]["drain"] = true.into();
        }
        c.to_string()
    };
    let checks =
        |t: &str, result: &str| [("target", t.to_string()), ("result", result.to_string())];
    let value = |s: &Scrape, name: &str, labels: &[(&str, String)]| {
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        s.value(name, &labels)
    };
    lb.write(&config(false));
    lb.reloader.reload(Trigger::Signal).await.expect("valid");
    scrape_until(&lb.exporter, "two passed checks of each target", |s| {
        [&ta, &tb]
            .iter()
            .all(|t| value(s, "stickylb_target_checks_total", &checks(t, "success")) >= 2.0)
    })
    .await;

    b.stop().await;
    let s = scrape_until(&lb.exporter, "b down by its checks", |s| {
        s.value("stickylb_target_up", &[("target", &tb)]) == 0.0
    })
    .await;
    assert!(value(&s, "stickylb_target_checks_total", &checks(&tb, "failure")) >= 1.0);
    assert_eq!(
        value(&s, "stickylb_target_checks_total", &checks(&ta, "failure")),
        0.0
    );
    assert_eq!(s.value("stickylb_target_draining", &[("target", &tb)]), 0.0);

    lb.write(&config(true));
    lb.reloader.reload(Trigger::Signal).await.expect("valid");
    let s = scrape(&lb.exporter).await;
    assert_eq!(s.value("stickylb_target_draining", &[("target", &ta)]), 1.0);
    assert_eq!(s.value("stickylb_target_up", &[("target", &ta)]), 0.0);
    assert_eq!(s.value("stickylb_target_draining", &[("target", &tb)]), 0.0);
    promtool_check(&s.text);

    lb.write(&config(false));
    lb.reloader.reload(Trigger::Signal).await.expect("valid");
    let s = scrape(&lb.exporter).await;
    assert_eq!(s.value("stickylb_target_draining", &[("target", &ta)]), 0.0);
    assert_eq!(s.value("stickylb_target_up", &[("target", &ta)]), 1.0);
}

// ---------------------------------------------------------------------------------------------
// The binary, and a real Prometheus.

/// The config keys that turn metrics on, on 127.0.0.1:`port`.
fn metrics_on(port: u16) -> serde_json::Value {
    serde_json::json!({"metricsHost": "127.0.0.1", "metricsPort": port})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_metrics_on_metrics_port_and_logs_the_url() {
    let backend = Backend::start("a", Mode::Echo).await;
    let metrics_port = free_port();
    let mut lb = Balancer::spawn(
        BIN,
        "metrics-binary",
        &[backend.addr],
        metrics_on(metrics_port),
        None,
    );
    let url = format!("http://127.0.0.1:{metrics_port}/metrics");
    lb.wait_for_line(&url);
    lb.wait_for_line("listening");
    ping(client_ip(4), lb.addr).await;
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (status, body) = http_get(metrics_addr, "/metrics").await;
        assert_eq!(status, 200);
        let s = Scrape::parse(body);
        if s.value("stickylb_connection_duration_seconds_count", &[]) == 1.0 {
            assert_eq!(s.value("stickylb_connections_accepted_total", &[]), 1.0);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{}", s.text);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lb.signal(libc::SIGTERM);
    assert_eq!(lb.exit_code(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_metrics_port_stops_the_binary_with_exit_1() {
    let backend = Backend::start("a", Mode::Echo).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics_port = taken.local_addr().unwrap().port();
    let config = config_text(&[backend.addr], metrics_on(metrics_port));
    let config = serde_json::from_str(&config).unwrap();
    // Not `launch`: this process never listens.
    let mut lb = Balancer::start(BIN, "metrics-taken", &[], config, None).unwrap();
    let line = lb.wait_for_line("cannot serve metrics");
    assert!(
        line.contains(&format!("127.0.0.1:{metrics_port}")),
        "{line}"
    );
    assert_eq!(lb.exit_code(), 1);
}

/// Percent-encodes a PromQL query for a URL.
fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of the first result of an instant `query`, if Prometheus has one.
async fn prometheus_query(prometheus: SocketAddr, query: &str) -> Option<String> {
    let path = format!("/api/v1/query?query={}", encode(query));
    let exchange = async {
        let mut stream = TcpStream::connect(prometheus).await?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {prometheus}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        std::io::Result::Ok(String::from_utf8_lossy(&response).to_string())
    };
    let response = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()?
        .ok()?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    // A chunked body would put sizes around the JSON; take the JSON object itself.
    let json = &body[body.find('{')?..=body.rfind('}')?];
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v["data"]["result"][0]["value"][1]
        .as_str()
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_stickylb() {
    const N: u32 = 7;
    if !require_tool("prometheus") {
        return;
    }
    let backend = Backend::start("a", Mode::Echo).await;
    let server = start(&[backend.addr], serde_json::json!({}));
    let exporter = export(&server);
    for n in 0..N {
        ping(client_ip(300 + n), server.local_addr()).await;
    }
    settled(&exporter).await;

    let dir = TempDir::new("prometheus");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         scrape_configs:\n  - job_name: stickylb\n    scrape_interval: 1s\n    \
         static_configs:\n      - targets: ['{}']\n",
        exporter.local_addr()
    );
    std::fs::write(dir.path("prometheus.yml"), config).unwrap();
    let web = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let log = std::fs::File::create(dir.path("prometheus.log")).unwrap();
    let prometheus = Process(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian package `prometheus`, installed by scripts/test)"),
    );

    // Prometheus starts, scrapes every second: a bounded wait for the first scrape to land.
    let up = r#"up{job="stickylb"}"#;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while prometheus_query(web, up).await.as_deref() != Some("1") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Prometheus never scraped stickylb; its log:\n{}",
            std::fs::read_to_string(dir.path("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let accepted = prometheus_query(web, "stickylb_connections_accepted_total").await;
    assert_eq!(accepted.as_deref(), Some(N.to_string().as_str()));
    let up_targets = prometheus_query(web, "sum(stickylb_target_up)").await;
    assert_eq!(up_targets.as_deref(), Some("1"));
    drop(prometheus);
}
