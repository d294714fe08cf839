//! The rolling-restart scenario of issue 14, shared by `tests/rolling_restart.rs` (which asserts
//! what is not a timing) and `benches/rolling.rs` (which prints the figures with and without
//! health checks).
//!
//! A real Node.js cluster (`tests/fixtures/node_cluster.js`, built-in modules only) runs
//! [`WORKERS`] workers, each on its own port, each keeping a counter per client in memory. A
//! balancer started from a config file fronts them. Clients from [`Options::clients`] loopback
//! addresses make HTTP requests without pause: each client comes in *visits* (a few requests
//! [`THINK`] apart, all on one counter key, which must read 1, 2, 3, ...), separated by a pause
//! longer than `sessionExpiry`, so that every visit is a new client to the balancer (no live
//! session) and a returned worker gets new clients at a steady rate.
//!
//! Each worker is then rolled as an operator would:
//! - **drain**: `"drain": true` on its target (a config edit, then the reload SIGHUP does) →
//!   wait until it is empty (no open connection, and none opened for `sessionExpiry`, so no
//!   client has a live session on it; or, with [`Options::stop_at_first_zero`], only until
//!   its open connections read 0) → stop it (graceful) → with checks, wait until they see it
//!   down → start its replacement → with checks, wait until they see it up → undrain (remove
//!   the key, reload);
//! - **kill**: SIGKILL (a crash) → wait until the balancer has taken it out (its checks, or a
//!   client's failed connect) → start its replacement.
//!
//! Then every visit's record is read back: requests that failed, visits whose counter went
//! back to 1 (state lost: the visit reached a worker that did not have its state), anything
//! that is neither (two workers holding one client's state at once), and the time from a
//! worker listening again to its first client.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use stickylb::balance::hash;
use stickylb::reload::{Reloader, Trigger};
use stickylb::server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::{client_ip, connect_from, start_from_file, Rng, TempDir};

/// Workers in the cluster.
pub const WORKERS: usize = 4;
/// `sessionExpiry` of the balancer: far longer than [`THINK`] (a busy machine can stall the
/// clients for a few hundred milliseconds, and a visit must not lose its session to that),
/// shorter than a pause between visits.
pub const SESSION_EXPIRY: Duration = Duration::from_millis(2000);
/// The health check: `interval`, `timeout`, `rise`, `fall`.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(200);
pub const CHECK_TIMEOUT: Duration = Duration::from_millis(1000);
pub const RISE: u32 = 2;
pub const FALL: u32 = 2;
/// Time between two requests of one visit.
pub const THINK: Duration = Duration::from_millis(100);
/// Requests in a visit: from 3 to 7.
const VISIT_MIN: u64 = 3;
const VISIT_SPREAD: u64 = 5;
/// Pause between two visits of one client: 2,500 to 3,000 ms, past `sessionExpiry`.
const PAUSE_MIN: Duration = Duration::from_millis(2500);
const PAUSE_SPREAD_MS: u64 = 500;
/// Bound on any single wait of the scenario but the return of a killed worker without checks.
const SCENARIO_PATIENCE: Duration = Duration::from_secs(30);
/// Bound on one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the requests of one client.
const MAX_REQUESTS: usize = 100_000;

/// What the scenario does.
#[derive(Debug, Clone)]
pub struct Options {
    /// Health checks on (`healthCheck` at the top level) or off.
    pub checks: bool,
    /// Client addresses.
    pub clients: u32,
    /// Workers rolled with a drain, in this order.
    pub drains: Vec<usize>,
    /// Then this worker is killed and restarted.
    pub kill: Option<usize>,
    /// Drain: stop the worker as soon as its open connections read 0, without waiting for the
    /// sessions on it to end.
    pub stop_at_first_zero: bool,
    /// How long a restarted worker may take to get its first client (a killed worker without
    /// checks waits out `targetDeactivationDuration`, 60 s).
    pub return_patience: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Drain,
    Kill,
}

/// One worker's restart, as the driver saw it.
#[derive(Debug, Clone)]
pub struct Roll {
    pub kind: Kind,
    pub worker: usize,
    /// The generation stopped or killed, and its replacement.
    pub old_gen: u32,
    pub new_gen: u32,
    /// Drain written (drain), or SIGKILL sent (kill).
    pub began: Instant,
    /// Stop or kill sent.
    pub stopped: Instant,
    /// The replacement listening.
    pub listening: Instant,
    /// Undrain applied (drain only).
    pub undrained: Option<Instant>,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    Ok { worker: usize, gen: u32, count: u64 },
    Failed(String),
}

/// One request of one visit.
#[derive(Debug, Clone)]
pub struct Record {
    pub client: u32,
    pub visit: u32,
    /// 1 for the first request of the visit.
    pub seq: u32,
    pub started: Instant,
    pub ended: Instant,
    pub outcome: Outcome,
}

/// A visit whose counter went back to 1: its state was not where it went.
#[derive(Debug, Clone)]
pub struct Lost {
    pub client: u32,
    pub visit: u32,
    /// The worker and generation that had its state.
    pub from: (usize, u32),
    /// Where it went.
    pub to: (usize, u32),
    pub at: Instant,
    /// From the visit's previous answer to this request.
    pub gap: Duration,
}

/// A request that failed.
#[derive(Debug, Clone)]
pub struct Failure {
    pub client: u32,
    pub visit: u32,
    pub seq: u32,
    /// The worker and generation of the visit's last answer before it, if any.
    pub after: Option<(usize, u32)>,
    pub at: Instant,
    pub error: String,
}

/// What happened, read back from every record.
#[derive(Debug)]
pub struct Report {
    pub options: Options,
    pub requests: usize,
    pub rolls: Vec<Roll>,
    pub failures: Vec<Failure>,
    pub lost: Vec<Lost>,
    /// Answers that are neither the next count nor a lost state, and visits lost twice.
    pub violations: Vec<String>,
    /// Per roll: from the replacement listening to its first answer to a client.
    pub returns: Vec<Option<Duration>>,
    /// Per worker, at the end: health checks failed, and times it was taken out after a
    /// client's failed connect.
    pub checks_failed: Vec<u64>,
    pub deactivations: Vec<u64>,
    /// Each worker's target id, for hashing.
    ids: Vec<String>,
}

impl Report {
    /// The roll that stopped or killed `(worker, gen)`, if one did before `at`.
    fn roll_of(&self, (worker, gen): (usize, u32), at: Instant) -> Option<&Roll> {
        self.rolls
            .iter()
            .find(|r| r.worker == worker && r.old_gen == gen && r.stopped <= at)
    }

    /// Lost visits whose state was on a worker that a roll of `kind` had stopped.
    pub fn lost_in(&self, kind: Kind) -> Vec<&Lost> {
        self.lost
            .iter()
            .filter(|l| self.roll_of(l.from, l.at).is_some_and(|r| r.kind == kind))
            .collect()
    }

    /// Lost visits whose state was on a worker still running: a client of another worker lost
    /// its state.
    pub fn lost_unexplained(&self) -> Vec<&Lost> {
        self.lost
            .iter()
            .filter(|l| self.roll_of(l.from, l.at).is_none())
            .collect()
    }

    /// Failures while rolls of `kind` were under way (from a roll's start to the next one's).
    pub fn failures_during(&self, kind: Kind) -> Vec<&Failure> {
        self.failures
            .iter()
            .filter(|f| {
                let roll = self.rolls.iter().rev().find(|r| r.began <= f.at);
                roll.is_some_and(|r| r.kind == kind)
            })
            .collect()
    }

    /// Failures that were not in flight on a killed worker: after its kill, on a visit whose
    /// last answer came from it, or on the first request of a visit whose hash target it is.
    pub fn failures_unexplained(&self) -> Vec<&Failure> {
        self.failures
            .iter()
            .filter(|f| !self.in_flight_on_killed(f))
            .collect()
    }

    fn in_flight_on_killed(&self, f: &Failure) -> bool {
        self.rolls
            .iter()
            .filter(|r| r.kind == Kind::Kill && r.stopped <= f.at)
            .any(|r| match f.after {
                Some(after) => after == (r.worker, r.old_gen),
                None => f.seq == 1 && self.hash_target(f.client) == r.worker,
            })
    }

    /// The worker a new client at address number `client` is hashed to when all are up.
    fn hash_target(&self, client: u32) -> usize {
        let seeds: Vec<(u64, u32)> = self
            .ids
            .iter()
            .map(|id| (hash::target_seed(id), 1))
            .collect();
        let key = hash::client_key(IpAddr::V4(client_ip(client)));
        hash::Table::new(&seeds)
            .pick(key, |_| true)
            .expect("a target")
    }

    /// Distinct clients among `lost`.
    pub fn clients_of(lost: &[&Lost]) -> usize {
        let mut clients: Vec<u32> = lost.iter().map(|l| l.client).collect();
        clients.sort_unstable();
        clients.dedup();
        clients.len()
    }

    /// The return times of rolls of `kind`, in seconds, as printed.
    pub fn returns_of(&self, kind: Kind) -> Vec<String> {
        self.rolls
            .iter()
            .zip(&self.returns)
            .filter(|(r, _)| r.kind == kind)
            .map(|(_, t)| t.map_or("never".to_string(), |t| format!("{:.2}", t.as_secs_f64())))
            .collect()
    }

    /// One line of figures for each kind of roll in the run.
    pub fn lines(&self, label: &str) -> Vec<String> {
        let mut out = Vec::new();
        for kind in [Kind::Drain, Kind::Kill] {
            if !self.rolls.iter().any(|r| r.kind == kind) {
                continue;
            }
            let failed = self.failures_during(kind).len();
            let lost = self.lost_in(kind);
            out.push(format!(
                "{label:<32} {:<5} requests {:>6}  failed {:>3}  state lost: {:>3} visits, {:>3} clients  \
                 seconds to first client: {}",
                match kind {
                    Kind::Drain => "drain",
                    Kind::Kill => "kill",
                },
                self.requests,
                failed,
                lost.len(),
                Report::clients_of(&lost),
                self.returns_of(kind).join(" "),
            ));
        }
        out.push(format!(
            "{label:<32} other: failed {}, state lost {}, violations {}; per worker: checks \
             failed {:?}, deactivations {:?}",
            self.failures_unexplained().len(),
            self.lost_unexplained().len(),
            self.violations.len(),
            self.checks_failed,
            self.deactivations,
        ));
        out
    }
}

/// A line the cluster's primary wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Listening { worker: usize, gen: u32 },
    Exit { worker: usize, gen: u32 },
}

/// The Node.js cluster, driven through its primary's stdin and stdout. Killed (by the primary's
/// PID; its workers exit with it) when dropped.
pub struct Cluster {
    child: Child,
    stdin: ChildStdin,
    events: mpsc::UnboundedReceiver<(Instant, Event)>,
    /// Events read but not waited for yet (workers start in any order).
    pending: Vec<(Instant, Event)>,
}

impl Cluster {
    /// Starts the cluster on `ports` and waits until every worker listens.
    pub async fn start(ports: &[u16]) -> Cluster {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/node_cluster.js");
        let ports_env: Vec<String> = ports.iter().map(u16::to_string).collect();
        let mut child = Command::new("node")
            .arg(script)
            .env("PORTS", ports_env.join(","))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start node");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, events) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in io::BufReader::new(stdout).lines().map_while(Result::ok) {
                let at = Instant::now();
                let words: Vec<&str> = line.split_whitespace().collect();
                let number = |i: usize| words.get(i).and_then(|w| w.parse::<u32>().ok());
                let event = match (words.first(), number(1), number(2)) {
                    (Some(&"listening"), Some(w), Some(gen)) => Event::Listening {
                        worker: w as usize,
                        gen,
                    },
                    (Some(&"exit"), Some(w), Some(gen)) => Event::Exit {
                        worker: w as usize,
                        gen,
                    },
                    _ => continue,
                };
                if tx.send((at, event)).is_err() {
                    return;
                }
            }
        });
        let mut cluster = Cluster {
            child,
            stdin,
            events,
            pending: Vec::new(),
        };
        for worker in 0..ports.len() {
            cluster
                .wait(&Event::Listening { worker, gen: 1 }, SCENARIO_PATIENCE)
                .await;
        }
        cluster
    }

    fn send(&mut self, command: &str) {
        use std::io::Write;
        writeln!(self.stdin, "{command}").expect("write to the cluster");
        self.stdin.flush().expect("flush");
    }

    /// `stop` or `kill` worker `worker`, then waits (bounded) until generation `gen` exited.
    async fn end(&mut self, command: &str, worker: usize, gen: u32) {
        self.send(&format!("{command} {worker}"));
        self.wait(&Event::Exit { worker, gen }, SCENARIO_PATIENCE)
            .await;
    }

    /// Waits (bounded) for `event`, keeping the others for later. Returns when it was read.
    async fn wait(&mut self, event: &Event, patience: Duration) -> Instant {
        if let Some(i) = self.pending.iter().position(|(_, e)| e == event) {
            return self.pending.remove(i).0;
        }
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some((at, seen))) if seen == *event => return at,
                Ok(Some(other)) => self.pending.push(other),
                Ok(None) => panic!("the cluster exited while waiting for {event:?}"),
                Err(_) => panic!("no {event:?} within {patience:?}"),
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` free loopback ports below the ephemeral range (so that no outgoing connection holds one
/// while its worker restarts): [`crate::free_port`].
pub fn free_ports(n: usize) -> Vec<u16> {
    (0..n).map(|_| crate::free_port()).collect()
}

/// The balancer's config: one target per worker (`worker-K`), `drained` drained.
fn config(ports: &[u16], checks: bool, drained: Option<usize>) -> String {
    let targets: Vec<serde_json::Value> = ports
        .iter()
        .enumerate()
        .map(|(k, port)| {
            let mut t = json!({"host": "127.0.0.1", "port": port, "id": format!("worker-{k}")});
            if drained == Some(k) {
                t["drain"] = true.into();
            }
            t
        })
        .collect();
    let mut c = json!({
        "sourceHost": "127.0.0.1",
        "sourcePort": 1,
        "metricsPort": null,
        "sessionExpiry": SESSION_EXPIRY.as_millis() as u64,
        "sessionExpiryInterval": 100,
        "targets": targets,
    });
    if checks {
        c["healthCheck"] = json!({
            "interval": CHECK_INTERVAL.as_millis() as u64,
            "timeout": CHECK_TIMEOUT.as_millis() as u64,
            "rise": RISE,
            "fall": FALL,
            "send": "GET /health HTTP/1.0\r\n\r\n",
            "expect": "200 OK",
        });
    }
    serde_json::to_string_pretty(&c).expect("json")
}

/// One HTTP request on a new connection from `ip`.
async fn request(ip: Ipv4Addr, lb: SocketAddr, key: &str) -> Outcome {
    let attempt = async {
        let mut stream = connect_from(ip, lb).await?;
        let head = format!("GET /c/{key} HTTP/1.1\r\nHost: stickylb\r\nConnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await?;
        Ok::<_, io::Error>(reply)
    };
    let reply = match tokio::time::timeout(REQUEST_TIMEOUT, attempt).await {
        Err(_) => return Outcome::Failed("timeout".into()),
        Ok(Err(e)) => return Outcome::Failed(e.to_string()),
        Ok(Ok(reply)) => reply,
    };
    let text = String::from_utf8_lossy(&reply);
    let body = text
        .strip_prefix("HTTP/1.1 200 OK\r\n")
        .and_then(|rest| rest.split_once("\r\n\r\n"))
        .map(|(_, body)| body);
    let fields: Option<Vec<u64>> = body.and_then(|b| {
        b.trim_end()
            .split(' ')
            .map(|kv| kv.split_once('=').and_then(|(_, v)| v.parse().ok()))
            .collect()
    });
    match fields.as_deref() {
        Some(&[worker, gen, count]) => Outcome::Ok {
            worker: worker as usize,
            gen: gen as u32,
            count,
        },
        _ => Outcome::Failed(format!("bad reply {text:?}")),
    }
}

/// One client: visits until `stop`, each on its own counter key.
async fn client(
    n: u32,
    lb: SocketAddr,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> Vec<Record> {
    let ip = client_ip(n);
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15 ^ (u64::from(n) + 1).wrapping_mul(0xff51_afd7));
    let mut records = Vec::new();
    // Start anywhere in a visit cycle, so that clients are not in step.
    tokio::time::sleep(Duration::from_millis(rng.below(3000))).await;
    let mut visit = 0u32;
    'visits: while records.len() < MAX_REQUESTS {
        let len = VISIT_MIN + rng.below(VISIT_SPREAD);
        for seq in 1..=len as u32 {
            if stop.load(Relaxed) {
                break 'visits;
            }
            let started = Instant::now();
            let outcome = request(ip, lb, &format!("{n}-{visit}")).await;
            records.push(Record {
                client: n,
                visit,
                seq,
                started,
                ended: Instant::now(),
                outcome,
            });
            done.fetch_add(1, Relaxed);
            if u64::from(seq) < len {
                tokio::time::sleep(THINK).await;
            }
        }
        visit += 1;
        tokio::time::sleep(PAUSE_MIN + Duration::from_millis(rng.below(PAUSE_SPREAD_MS))).await;
    }
    records
}

/// Polls the balancer's snapshot (bounded) until `ready` holds for target `worker`.
async fn wait_target(
    server: &Server,
    worker: usize,
    what: &str,
    patience: Duration,
    ready: impl Fn(&stickylb::TargetSnapshot) -> bool,
) {
    let id = format!("worker-{worker}");
    let deadline = Instant::now() + patience;
    loop {
        let s = server.snapshot();
        let t = s.target(&id).expect("the worker's target");
        if ready(t) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id}: not {what} in {patience:?}: {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (bounded) until `worker`'s target is empty: no open connection, and no connection
/// opened for `sessionExpiry` (plus a margin), so no client has a live session on it.
/// With `first_zero`, only until its open connections read 0.
async fn wait_empty(server: &Server, worker: usize, first_zero: bool) {
    let id = format!("worker-{worker}");
    let deadline = Instant::now() + SCENARIO_PATIENCE;
    let quiet = SESSION_EXPIRY + Duration::from_millis(200);
    let mut since: Option<(Instant, u64)> = None;
    loop {
        let s = server.snapshot();
        let t = s.target(&id).expect("the worker's target");
        if t.active == 0 && first_zero {
            return;
        }
        since = match since {
            Some((at, total)) if t.active == 0 && t.connections == total => {
                if at.elapsed() >= quiet {
                    return;
                }
                Some((at, total))
            }
            _ if t.active == 0 => Some((Instant::now(), t.connections)),
            _ => None,
        };
        assert!(Instant::now() < deadline, "{id} never emptied: {t:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs the scenario and reads the records back.
pub async fn run(options: Options) -> Report {
    let ports = free_ports(WORKERS);
    let mut cluster = Cluster::start(&ports).await;
    let dir = TempDir::new("rolling");
    let path = dir.path("config.json");
    let write = |drained: Option<usize>| {
        std::fs::write(&path, config(&ports, options.checks, drained)).expect("write config");
    };
    write(None);
    let server = start_from_file(&path, false);
    let reloader = Reloader::new(server.clone());
    let reload = || async {
        reloader
            .reload(Trigger::Signal)
            .await
            .expect("reload applied");
    };
    if options.checks {
        for k in 0..WORKERS {
            wait_target(&server, k, "checked up", SCENARIO_PATIENCE, |t| {
                t.check_up == Some(true)
            })
            .await;
        }
    }

    let lb = server.local_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..options.clients)
        .map(|n| tokio::spawn(client(n, lb, stop.clone(), done.clone())))
        .collect();
    // Let every client get going before the first roll.
    let warm = u64::from(options.clients) * 3;
    let deadline = Instant::now() + SCENARIO_PATIENCE;
    while done.load(Relaxed) < warm && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut generations = [1u32; WORKERS];
    let mut rolls = Vec::new();
    let plan: Vec<(Kind, usize)> = options
        .drains
        .iter()
        .map(|&k| (Kind::Drain, k))
        .chain(options.kill.map(|k| (Kind::Kill, k)))
        .collect();
    for (kind, k) in plan {
        let old_gen = generations[k];
        let began = Instant::now();
        let stopped;
        match kind {
            Kind::Drain => {
                write(Some(k));
                reload().await;
                wait_empty(&server, k, options.stop_at_first_zero).await;
                stopped = Instant::now();
                cluster.end("stop", k, old_gen).await;
                if options.checks {
                    wait_target(&server, k, "down by its checks", SCENARIO_PATIENCE, |t| {
                        t.check_up == Some(false)
                    })
                    .await;
                }
            }
            Kind::Kill => {
                stopped = Instant::now();
                cluster.end("kill", k, old_gen).await;
                wait_target(&server, k, "taken out", SCENARIO_PATIENCE, |t| !t.up).await;
            }
        }
        let connections_before = server
            .snapshot()
            .target(&format!("worker-{k}"))
            .map_or(0, |t| t.connections);
        cluster.send(&format!("start {k}"));
        generations[k] += 1;
        let new_gen = generations[k];
        let listening = cluster
            .wait(
                &Event::Listening {
                    worker: k,
                    gen: new_gen,
                },
                SCENARIO_PATIENCE,
            )
            .await;
        let mut undrained = None;
        if kind == Kind::Drain {
            if options.checks {
                wait_target(&server, k, "up by its checks", SCENARIO_PATIENCE, |t| {
                    t.check_up == Some(true)
                })
                .await;
            }
            write(None);
            reload().await;
            undrained = Some(Instant::now());
        }
        // Back: the replacement has had a client (bounded; long without checks after a kill).
        wait_target(&server, k, "given a client", options.return_patience, |t| {
            t.connections > connections_before
        })
        .await;
        rolls.push(Roll {
            kind,
            worker: k,
            old_gen,
            new_gen,
            began,
            stopped,
            listening,
            undrained,
        });
    }

    // A little more traffic after the last roll, then stop the clients and read back.
    let more = done.load(Relaxed) + u64::from(options.clients);
    let deadline = Instant::now() + SCENARIO_PATIENCE;
    while done.load(Relaxed) < more && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Relaxed);
    let mut records = Vec::new();
    for c in clients {
        records.push(c.await.expect("client task"));
    }
    let mut report = analyse(options, rolls, records);
    let end = server.snapshot();
    let target = |k: usize| end.target(&format!("worker-{k}")).cloned();
    report.checks_failed = (0..WORKERS)
        .filter_map(|k| target(k).map(|t| t.checks_failure))
        .collect();
    report.deactivations = (0..WORKERS)
        .filter_map(|k| target(k).map(|t| t.deactivations))
        .collect();
    report
}

fn analyse(options: Options, rolls: Vec<Roll>, per_client: Vec<Vec<Record>>) -> Report {
    let mut report = Report {
        options,
        requests: per_client.iter().map(Vec::len).sum(),
        rolls,
        failures: Vec::new(),
        lost: Vec::new(),
        violations: Vec::new(),
        returns: Vec::new(),
        checks_failed: Vec::new(),
        deactivations: Vec::new(),
        ids: (0..WORKERS).map(|k| format!("worker-{k}")).collect(),
    };
    // First answer of each worker generation.
    let mut first: HashMap<(usize, u32), Instant> = HashMap::new();
    for records in &per_client {
        // The visit's last answer, and whether it was already lost once.
        let mut last: Option<(u32, usize, u32, u64, Instant)> = None;
        let mut lost_visit: Option<u32> = None;
        for r in records {
            let previous = last.filter(|(visit, ..)| *visit == r.visit);
            match &r.outcome {
                Outcome::Failed(error) => report.failures.push(Failure {
                    client: r.client,
                    visit: r.visit,
                    seq: r.seq,
                    after: previous.map(|(_, w, g, ..)| (w, g)),
                    at: r.ended,
                    error: error.clone(),
                }),
                &Outcome::Ok { worker, gen, count } => {
                    let seen = first.entry((worker, gen)).or_insert(r.ended);
                    *seen = (*seen).min(r.ended);
                    match previous {
                        None if count == 1 => {}
                        Some((_, w, g, c, _)) if (w, g) == (worker, gen) && count == c + 1 => {}
                        Some((_, w, g, _, ended)) if count == 1 => {
                            if lost_visit == Some(r.visit) {
                                report.violations.push(format!(
                                    "client {} visit {}: state lost a second time",
                                    r.client, r.visit
                                ));
                            }
                            lost_visit = Some(r.visit);
                            report.lost.push(Lost {
                                client: r.client,
                                visit: r.visit,
                                from: (w, g),
                                to: (worker, gen),
                                at: r.ended,
                                gap: r.started.saturating_duration_since(ended),
                            });
                        }
                        _ => report.violations.push(format!(
                            "client {} visit {} request {}: worker {worker} gen {gen} count \
                             {count} after {previous:?}",
                            r.client, r.visit, r.seq
                        )),
                    }
                    last = Some((r.visit, worker, gen, count, r.ended));
                }
            }
        }
    }
    report.returns = report
        .rolls
        .iter()
        .map(|r| {
            first
                .get(&(r.worker, r.new_gen))
                .map(|&at| at.saturating_duration_since(r.listening))
        })
        .collect();
    report
}
