//! Prometheus metrics: the names, types and labels of design §6, in one place, and the
//! `GET /metrics` endpoint on `metricsHost:metricsPort`.
//!
//! How it stays off the data path:
//! - Counters and gauges: the connection path already counts with atomics
//!   ([`crate::stats::Stats`], each target's [`TargetCounters`]). Those atomics stay the source
//!   of truth. When `/metrics` is scraped, their values are published into the recorder
//!   (counters with [`Counter::absolute`], gauges with [`Gauge::set`]) and then the exposition is
//!   rendered. A connection pays nothing extra for them, and a scrape sees the values of that
//!   instant, including the bytes of connections still open (they are counted as they move).
//! - Histograms cannot be rebuilt from a counter, so the data path records samples into
//!   [`metrics::Histogram`] handles held in [`LazyHistogram`] slots: one in [`Stats`], one in each
//!   [`TargetState`]. A target's handle is registered when its identity first appears (at start
//!   or by a reload, through the [`Observer`] hook of the target registry), so no label is
//!   formatted per connection. Recording appends to the exporter's lock-free bucket (atomics; one
//!   block of 64 samples is allocated per 64 samples and freed when drained), drained into the
//!   histogram's buckets every [`UPKEEP`] and at each scrape. With metrics off the slots stay
//!   empty and recording is one atomic load.
//!
//! The recorder is not installed as the process-wide `metrics` recorder: each balancer owns its
//! own (built with `PrometheusBuilder::build_recorder`) and [`serve`] answers HTTP itself (a small
//! HTTP/1.1 responder on the balancer's runtime), which is what lets values be published at
//! scrape time. So several balancers in one process (the tests) never share series.
//!
//! Series lifetime: every target has all its series from the moment its identity appears, so a
//! target that never got a connection still shows `target_up` and zero counters. A target
//! removed by a reload stays in the exposition with `target_up` 0 and its final counters, and
//! `target_connections_active` shows its connections while they drain. If the identity comes back
//! later, its counters go on from where they were: they never go backwards.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Key, KeyName, Label, Level, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::balance::target::{Observer, TargetCounters, TargetState};
use crate::proxy::{listener, Proxy};
use crate::stats::{Reject, Stats};

/// How often histogram samples are drained into their buckets when nobody scrapes: bounds the
/// memory that samples waiting for a scrape can hold.
pub const UPKEEP: Duration = Duration::from_secs(1);

/// Bucket bounds (seconds) of `target_connect_duration_seconds`: a loopback connect takes tens
/// of microseconds, a remote one milliseconds, a struggling one up to `connectTimeout`.
pub const CONNECT_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Bucket bounds (seconds) of `connection_duration_seconds`: from a one-request connection
/// (milliseconds) to a websocket or game session (hours).
pub const CONNECTION_BUCKETS: [f64; 18] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
    7200.0, 14400.0, 86400.0,
];

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
    pub const SESSIONS: &str = "stickylb_sessions";
    pub const CONFIG_RELOADS: &str = "stickylb_config_reloads_total";
    pub const CONFIG_LAST_RELOAD_SUCCESS: &str = "stickylb_config_last_reload_success";
    pub const BUILD_INFO: &str = "stickylb_build_info";
    pub const ACCEPT_ERRORS: &str = "stickylb_accept_errors_total";
}

/// A histogram handle that is set once, when the exporter starts, and records nothing before.
///
/// It lives in the data path's structures ([`Stats`], [`TargetState`]), so that recording is a
/// field access rather than a look-up by name and labels.
#[derive(Debug, Default)]
pub struct LazyHistogram(OnceLock<metrics::Histogram>);

impl LazyHistogram {
    /// Records `d` in seconds; does nothing while metrics are off.
    #[inline]
    pub fn record(&self, d: Duration) {
        if let Some(histogram) = self.0.get() {
            histogram.record(d.as_secs_f64());
        }
    }

    /// Whether a handle is set (metrics are on for this balancer).
    #[cfg(test)]
    fn is_set(&self) -> bool {
        self.0.get().is_some()
    }

    fn set(&self, histogram: metrics::Histogram) {
        let _ = self.0.set(histogram);
    }
}

/// Why the metrics endpoint could not start. A start-up error: the process exits 1.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot serve metrics on {addr} (metricsHost/metricsPort): {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("metrics are already exported for this balancer")]
    AlreadyStarted,
}

/// A running `/metrics` endpoint. Dropping it stops serving.
#[derive(Debug)]
pub struct Exporter {
    local_addr: SocketAddr,
    metrics: Arc<Metrics>,
    proxy: Arc<Proxy>,
    tasks: Vec<JoinHandle<()>>,
}

impl Exporter {
    /// The address `/metrics` is served on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The exposition as a scrape would return it now.
    pub fn render(&self) -> String {
        self.metrics.render(&self.proxy)
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts the endpoint the balancer's config asks for (`metricsHost:metricsPort`), or nothing
/// when `metricsPort` is `null`. Logs the URL. Must be called inside a tokio runtime.
pub fn install(proxy: &Arc<Proxy>) -> Result<Option<Exporter>, Error> {
    let Some(addr) = proxy.config().metrics else {
        tracing::info!("metrics off (metricsPort is null)");
        return Ok(None);
    };
    let exporter = serve(addr, proxy)?;
    tracing::info!(
        url = %format!("http://{}/metrics", exporter.local_addr()),
        "serving Prometheus metrics"
    );
    Ok(Some(exporter))
}

/// Binds `addr` (port 0 picks a free one: see [`Exporter::local_addr`]) and serves `/metrics`
/// for `proxy`'s balancer. Must be called inside a tokio runtime.
pub fn serve(addr: SocketAddr, proxy: &Arc<Proxy>) -> Result<Exporter, Error> {
    let bind_error = |source| Error::Bind { addr, source };
    let listener = listener::bind(addr).map_err(bind_error)?;
    let listener = TcpListener::from_std(listener).map_err(bind_error)?;
    let local_addr = listener.local_addr().map_err(bind_error)?;
    let metrics = Metrics::new(&proxy.shared.stats);
    if !proxy.shared.registry.observe(metrics.clone()) {
        return Err(Error::AlreadyStarted);
    }
    let upkeep = tokio::spawn(upkeep(metrics.handle.clone()));
    let http = tokio::spawn(serve_http(listener, metrics.clone(), proxy.clone()));
    Ok(Exporter {
        local_addr,
        metrics,
        proxy: proxy.clone(),
        tasks: vec![upkeep, http],
    })
}

/// Drains histogram samples into their buckets, so memory stays bounded between scrapes.
async fn upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(UPKEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

/// The values of a target's counters, to keep its series monotonic when its state is replaced
/// (an identity removed, forgotten, then added back starts a new state from zero).
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    connections: u64,
    connect_failures: u64,
    deactivations: u64,
    bytes_to_target: u64,
    bytes_to_client: u64,
}

impl Totals {
    fn of(counters: &TargetCounters) -> Totals {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Totals {
            connections: load(&counters.connections),
            connect_failures: load(&counters.connect_failures),
            deactivations: load(&counters.deactivations),
            bytes_to_target: load(&counters.bytes_to_target),
            bytes_to_client: load(&counters.bytes_to_client),
        }
    }

    fn plus(self, other: Totals) -> Totals {
        Totals {
            connections: self.connections + other.connections,
            connect_failures: self.connect_failures + other.connect_failures,
            deactivations: self.deactivations + other.deactivations,
            bytes_to_target: self.bytes_to_target + other.bytes_to_target,
            bytes_to_client: self.bytes_to_client + other.bytes_to_client,
        }
    }
}

/// The series of one target identity.
#[derive(Debug)]
struct TargetSeries {
    connections: Counter,
    active: Gauge,
    connect_failures: Counter,
    up: Gauge,
    deactivations: Counter,
    bytes_to_target: Counter,
    bytes_to_client: Counter,
    /// What earlier states of this identity counted (zero unless it was forgotten and came
    /// back).
    base: Totals,
}

impl TargetSeries {
    fn publish(&self, totals: Totals, active: u64, up: bool) {
        let t = self.base.plus(totals);
        self.connections.absolute(t.connections);
        self.connect_failures.absolute(t.connect_failures);
        self.deactivations.absolute(t.deactivations);
        self.bytes_to_target.absolute(t.bytes_to_target);
        self.bytes_to_client.absolute(t.bytes_to_client);
        self.active.set(active as f64);
        self.up.set(if up { 1.0 } else { 0.0 });
    }
}

/// The balancer-wide series.
#[derive(Debug)]
struct GlobalSeries {
    accepted: Counter,
    active: Gauge,
    rejected: [Counter; Reject::COUNT],
    retries: Counter,
    sessions: Gauge,
    reloads_success: Counter,
    reloads_failure: Counter,
    last_reload_success: Gauge,
    accept_errors_fd_limit: Counter,
    accept_errors_other: Counter,
}

/// One balancer's recorder and series.
#[derive(Debug)]
struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    global: GlobalSeries,
    /// Identity → series. Locked at scrape and when a target identity appears or is forgotten,
    /// never by a connection.
    targets: Mutex<HashMap<Arc<str>, TargetSeries>>,
}

const METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, None);

impl Metrics {
    fn new(stats: &Stats) -> Arc<Metrics> {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(names::TARGET_CONNECT_DURATION.into()),
                &CONNECT_BUCKETS,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(names::CONNECTION_DURATION.into()),
                    &CONNECTION_BUCKETS,
                )
            })
            // Only fails on an empty bucket list; ours are constants.
            .expect("bucket lists are not empty")
            .build_recorder();
        describe(&recorder);
        let counter = |name: &'static str, label: Option<(&'static str, &'static str)>| {
            let labels: Vec<Label> = label.map(|(k, v)| Label::new(k, v)).into_iter().collect();
            recorder.register_counter(&Key::from_parts(name, labels), &METADATA)
        };
        let gauge =
            |name: &'static str| recorder.register_gauge(&Key::from_static_name(name), &METADATA);
        let rejected =
            Reject::ALL.map(|r| counter(names::CONNECTIONS_REJECTED, Some(("reason", r.label()))));
        let global = GlobalSeries {
            accepted: counter(names::CONNECTIONS_ACCEPTED, None),
            active: gauge(names::CONNECTIONS_ACTIVE),
            rejected,
            retries: counter(names::RETRIES, None),
            sessions: gauge(names::SESSIONS),
            reloads_success: counter(names::CONFIG_RELOADS, Some(("result", "success"))),
            reloads_failure: counter(names::CONFIG_RELOADS, Some(("result", "failure"))),
            last_reload_success: gauge(names::CONFIG_LAST_RELOAD_SUCCESS),
            accept_errors_fd_limit: counter(names::ACCEPT_ERRORS, Some(("kind", "fd_limit"))),
            accept_errors_other: counter(names::ACCEPT_ERRORS, Some(("kind", "other"))),
        };
        recorder
            .register_gauge(
                &Key::from_parts(
                    names::BUILD_INFO,
                    vec![Label::new("version", env!("CARGO_PKG_VERSION"))],
                ),
                &METADATA,
            )
            .set(1.0);
        global.last_reload_success.set(1.0);
        stats.connection_duration.set(recorder.register_histogram(
            &Key::from_static_name(names::CONNECTION_DURATION),
            &METADATA,
        ));
        let handle = recorder.handle();
        Arc::new(Metrics {
            recorder,
            handle,
            global,
            targets: Mutex::new(HashMap::new()),
        })
    }

    fn lock_targets(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, TargetSeries>> {
        self.targets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Copies the data path's atomics into the recorder.
    fn publish(&self, proxy: &Proxy) {
        let shared = &proxy.shared;
        let stats = &shared.stats;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let g = &self.global;
        g.accepted.absolute(load(&stats.accepted));
        g.active.set(load(&stats.active) as f64);
        for reason in Reject::ALL {
            g.rejected[reason as usize].absolute(stats.rejected(reason));
        }
        g.retries.absolute(load(&stats.retries));
        g.sessions.set(shared.sessions.len() as f64);
        g.reloads_success.absolute(load(&stats.reloads_success));
        g.reloads_failure.absolute(load(&stats.reloads_failure));
        let failed = stats.last_reload_failed.load(Ordering::Relaxed);
        g.last_reload_success.set(if failed { 0.0 } else { 1.0 });
        g.accept_errors_fd_limit
            .absolute(load(&stats.accept_errors_fd_limit));
        g.accept_errors_other
            .absolute(load(&stats.accept_errors_other));

        // Take the states first and the series lock second: the registry calls `added` and
        // `forgotten` with its own lock held, so the two are never held the other way round.
        let states = shared.registry.all();
        let now = shared.clock.now_ms();
        let targets = self.lock_targets();
        for state in states {
            if let Some(series) = targets.get(&state.id) {
                series.publish(
                    Totals::of(&state.counters),
                    load(&state.active),
                    state.is_usable(now),
                );
            }
        }
    }

    fn render(&self, proxy: &Proxy) -> String {
        self.publish(proxy);
        self.handle.render()
    }

    fn target_series(&self, id: &Arc<str>) -> TargetSeries {
        let counter = |name: &'static str, extra: Option<(&'static str, &'static str)>| {
            let mut labels = vec![target_label(id)];
            labels.extend(extra.map(|(k, v)| Label::new(k, v)));
            self.recorder
                .register_counter(&Key::from_parts(name, labels), &METADATA)
        };
        let gauge = |name: &'static str| {
            let labels = vec![target_label(id)];
            self.recorder
                .register_gauge(&Key::from_parts(name, labels), &METADATA)
        };
        TargetSeries {
            connections: counter(names::TARGET_CONNECTIONS, None),
            active: gauge(names::TARGET_CONNECTIONS_ACTIVE),
            connect_failures: counter(names::TARGET_CONNECT_FAILURES, None),
            up: gauge(names::TARGET_UP),
            deactivations: counter(names::TARGET_DEACTIVATIONS, None),
            bytes_to_target: counter(names::TARGET_BYTES, Some(("direction", "to_target"))),
            bytes_to_client: counter(names::TARGET_BYTES, Some(("direction", "to_client"))),
            base: Totals::default(),
        }
    }
}

/// The `target` label of a target id, prepared for the exporter.
///
/// A target `id` is any non-empty string from the config. The exporter escapes `"` and line
/// feeds, but reads a backslash as possibly escaping the next character: `a\"b` would come
/// out as `a"b` and `d\\e` as `d\e`. Doubling every backslash first
/// makes it escape each one exactly once, so the scraped value is the id, byte for byte.
fn target_label(id: &str) -> Label {
    Label::new("target", id.replace('\\', "\\\\"))
}

impl Observer for Metrics {
    /// A target identity got a state (at start, or added by a reload, or back after it was
    /// forgotten): gives it its histogram handle and, the first time, all its series.
    fn added(&self, state: &TargetState) {
        let labels = vec![target_label(&state.id)];
        state.connect_duration.set(self.recorder.register_histogram(
            &Key::from_parts(names::TARGET_CONNECT_DURATION, labels),
            &METADATA,
        ));
        // Its values are published with every state's at each scrape; a fresh state counts
        // from zero, and the series' `base` carries what earlier states of the identity counted.
        self.lock_targets()
            .entry(state.id.clone())
            .or_insert_with(|| self.target_series(&state.id));
    }

    /// The registry dropped a removed target's state (nothing used it any more): its counts are
    /// final, and kept as the base of the identity's series.
    fn forgotten(&self, state: &TargetState) {
        let mut targets = self.lock_targets();
        if let Some(series) = targets.get_mut(&state.id) {
            series.base = series.base.plus(Totals::of(&state.counters));
            series.publish(Totals::default(), 0, false);
        }
    }
}

/// The `# HELP` line of each metric: what it tells an operator.
fn describe(recorder: &PrometheusRecorder) {
    use names::*;
    let help: [(&str, &str, Kind); 17] = [
        (
            CONNECTIONS_ACCEPTED,
            "Client connections accepted, including those then rejected.",
            Kind::Counter,
        ),
        (
            CONNECTIONS_ACTIVE,
            "Client connections open now.",
            Kind::Gauge,
        ),
        (
            CONNECTIONS_REJECTED,
            "Client connections closed without being proxied, by reason.",
            Kind::Counter,
        ),
        (
            TARGET_CONNECTIONS,
            "Connections established to the target.",
            Kind::Counter,
        ),
        (
            TARGET_CONNECTIONS_ACTIVE,
            "Connections open to the target now.",
            Kind::Gauge,
        ),
        (
            TARGET_CONNECT_FAILURES,
            "Connects to the target that failed (refused, unreachable, reset, timeout).",
            Kind::Counter,
        ),
        (
            TARGET_UP,
            "1 if the target is configured and not in a deactivation window, else 0.",
            Kind::Gauge,
        ),
        (
            TARGET_DEACTIVATIONS,
            "Times the target went from up to deactivated.",
            Kind::Counter,
        ),
        (
            TARGET_BYTES,
            "Bytes relayed to the target and from it to clients.",
            Kind::Counter,
        ),
        (
            TARGET_CONNECT_DURATION,
            "Time to connect to the target (successful connects).",
            Kind::Histogram,
        ),
        (
            CONNECTION_DURATION,
            "Lifetime of proxied client connections, from accept to close.",
            Kind::Histogram,
        ),
        (
            RETRIES,
            "Connect attempts after the first one of a client connection.",
            Kind::Counter,
        ),
        (
            SESSIONS,
            "Sticky sessions in the session table.",
            Kind::Gauge,
        ),
        (CONFIG_RELOADS, "Config reloads, by result.", Kind::Counter),
        (
            CONFIG_LAST_RELOAD_SUCCESS,
            "0 if the last config reload failed, else 1.",
            Kind::Gauge,
        ),
        (
            BUILD_INFO,
            "Always 1; the version label says which stickylb runs.",
            Kind::Gauge,
        ),
        (
            ACCEPT_ERRORS,
            "accept(2) failures: out of file descriptors (fd_limit) or other.",
            Kind::Counter,
        ),
    ];
    for (name, text, kind) in help {
        let (name, text) = (KeyName::from_const_str(name), SharedString::const_str(text));
        match kind {
            Kind::Counter => recorder.describe_counter(name, None, text),
            Kind::Gauge => recorder.describe_gauge(name, None, text),
            Kind::Histogram => recorder.describe_histogram(name, None, text),
        }
    }
}

enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Scrapes served at once; more wait for a slot (Prometheus scrapes one at a time per target).
const MAX_SCRAPES: usize = 16;
/// A request head longer than this is refused.
const MAX_HEAD: usize = 8 * 1024;
/// A client that sends no complete request head within this is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The accept loop of the endpoint. Like the balancer's, it never ends on an accept error.
async fn serve_http(listener: TcpListener, metrics: Arc<Metrics>, proxy: Arc<Proxy>) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::debug!(%error, "metrics accept failed");
                // Out of descriptors: the listener stays readable; do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (metrics, proxy) = (metrics.clone(), proxy.clone());
        tokio::spawn(async move {
            if let Err(error) = respond(stream, &metrics, &proxy).await {
                tracing::debug!(%error, "metrics request failed");
            }
            drop(permit);
        });
    }
}

/// Answers one HTTP/1.x request, then closes the connection.
async fn respond(mut stream: TcpStream, metrics: &Metrics, proxy: &Proxy) -> io::Result<()> {
    let head = tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request head"))??;
    let mut parts = head.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, body, head_only) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", metrics.render(proxy), method == "HEAD"),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "stickylb serves Prometheus metrics at /metrics\n".to_string(),
            method == "HEAD",
        ),
        _ => (
            "405 Method Not Allowed",
            "only GET /metrics\n".to_string(),
            false,
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\n\
         Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    if !head_only {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

/// Reads up to the end of the request head; returns its first line.
async fn read_head(stream: &mut TcpStream) -> io::Result<String> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&chunk[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break;
        }
        if head.len() > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too long",
            ));
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    Ok(String::from_utf8_lossy(line).trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_bounds_increase() {
        assert!(CONNECT_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        assert!(CONNECTION_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        assert!(CONNECT_BUCKETS[0] < 0.001 && CONNECTION_BUCKETS.last() >= Some(&3600.0));
    }

    /// Ids with backslashes, quotes and a line feed come out of the exporter escaped as the
    /// exposition format wants, so a parser reads back the id itself.
    #[test]
    fn target_ids_with_backslashes_and_quotes_are_escaped_once() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let ids = [r#"a\"b"#, r"c\", r"d\\e", "f\ng\"h"];
        for id in ids {
            recorder
                .register_counter(&Key::from_parts("c", vec![target_label(id)]), &METADATA)
                .increment(1);
        }
        let text = recorder.handle().render();
        let mut found: Vec<String> = text
            .lines()
            .filter_map(|line| line.strip_prefix("c{target=\""))
            .map(|rest| unescape_label_value(rest.strip_suffix("\"} 1").expect(rest)))
            .collect();
        found.sort();
        let mut want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(found, want, "{text}");
    }

    /// The exposition format's label value escapes: `\\`, `\"` and `\n`.
    fn unescape_label_value(escaped: &str) -> String {
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
    fn an_empty_slot_records_nothing_and_a_set_one_records() {
        let slot = LazyHistogram::default();
        slot.record(Duration::from_millis(1));
        assert!(!slot.is_set());
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[1.0])
            .unwrap()
            .build_recorder();
        slot.set(recorder.register_histogram(&Key::from_static_name("h"), &METADATA));
        slot.record(Duration::from_millis(1));
        let text = recorder.handle().render();
        assert!(text.contains("h_count 1"), "{text}");
    }
}
