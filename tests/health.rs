//! Active health checks and drain (design §12), black-box over real TCP: a stopped target is
//! taken out by its checks before any client reaches it, a restarted one is back as soon as it
//! passes `rise` checks (even inside a deactivation window), `send`/`expect` decide, checks
//! follow reloads by identity, and a drained target takes no new client while its sessions and
//! connections go on. The log lines of a drain are read from the real binary's stderr.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use stickylb::reload::{Reloader, Trigger};
use stickylb::server::Server;
use stickylb::{Snapshot, TargetSnapshot};
use stickylb_testkit::*;

const BIN: &str = env!("CARGO_BIN_EXE_stickylb");
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Checks every 50 ms: two passes bring a target back, two failures take it out.
fn fast_checks() -> Value {
    json!({"interval": 50, "timeout": 200, "rise": 2, "fall": 2})
}

fn of<'a>(s: &'a Snapshot, id: &str) -> &'a TargetSnapshot {
    s.target(id)
        .unwrap_or_else(|| panic!("target {id} in {s:?}"))
}

/// Waits (bounded) until the snapshot satisfies `ready`; returns that snapshot.
async fn wait_until(server: &Server, what: &str, ready: impl Fn(&Snapshot) -> bool) -> Snapshot {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let s = server.snapshot();
        if ready(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not in time: {what}; last snapshot: {:?}",
            s.targets
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The backends answering `clients` fresh client addresses (numbered from `first`), one
/// connection each, closed at once.
async fn names(lb: SocketAddr, first: u32, clients: u32) -> Vec<String> {
    let mut out = Vec::with_capacity(clients as usize);
    for n in first..first + clients {
        let (name, _) = which(client_ip(n), lb)
            .await
            .unwrap_or_else(|e| panic!("client {}: {e}", client_ip(n)));
        out.push(name);
    }
    out
}

struct Three {
    a: Backend,
    b: Backend,
    c: Backend,
}

async fn three() -> Three {
    Three {
        a: Backend::start("a", Mode::Named).await,
        b: Backend::start("b", Mode::Named).await,
        c: Backend::start("c", Mode::Named).await,
    }
}

fn checked_config(t: &Three, extra: Value) -> stickylb::config::Config {
    let text = config_json(
        vec![
            target_json(t.a.addr, "a", json!({})),
            target_json(t.b.addr, "b", json!({})),
            target_json(t.c.addr, "c", json!({})),
        ],
        extra,
    );
    stickylb::config::Config::parse(std::path::Path::new("health.json"), &text).expect("config")
}

fn start_with(config: stickylb::config::Config) -> Arc<Server> {
    let listener = stickylb::server::bind("127.0.0.1:0".parse().unwrap()).expect("bind");
    Arc::new(Server::start(config, listener).expect("start"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_checks_take_a_target_out_before_any_client_reaches_it_and_passing_ones_bring_it_back(
) {
    let mut t = three().await;
    let server = start_with(checked_config(&t, json!({"healthCheck": fast_checks()})));
    let lb = server.local_addr();
    wait_until(&server, "every target checked and up", |s| {
        ["a", "b", "c"]
            .iter()
            .all(|id| of(s, id).check_up == Some(true) && of(s, id).checks_success >= 2)
    })
    .await;
    let before = names(lb, 0, 300).await;
    assert!(before.iter().any(|n| n == "b"), "b has clients");

    t.b.stop().await;
    wait_until(&server, "b down by its checks", |s| {
        of(s, "b").check_up == Some(false)
    })
    .await;
    let s = server.snapshot();
    assert!(!of(&s, "b").up);
    assert!(of(&s, "b").checks_failure >= 2);
    // Every client of b reaches another target, and not one connect went to b: the checks
    // took it out before any client did.
    let during = names(lb, 0, 300).await;
    for (i, (was, now)) in before.iter().zip(&during).enumerate() {
        assert_ne!(now, "b", "client {i}");
        if was != "b" {
            assert_eq!(was, now, "client {i} of another target moved");
        }
    }
    let s = server.snapshot();
    assert_eq!(of(&s, "b").connect_failures, 0, "a client reached b");
    assert_eq!(s.retries, 0);

    t.b.restart().await;
    wait_until(&server, "b back by its checks", |s| of(s, "b").up).await;
    // Fresh clients (no session) whose hash says b reach it again.
    let after = names(lb, 1000, 300).await;
    assert!(after.iter().any(|n| n == "b"), "b takes new clients again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passing_checks_end_a_deactivation_window_long_before_it_would_end() {
    let mut t = three().await;
    // fall 1000: only a client's failed connect takes b out here, for a 10-minute window.
    let config = checked_config(
        &t,
        json!({
            "targetDeactivationDuration": 600_000,
            "healthCheck": {"interval": 50, "timeout": 200, "rise": 2, "fall": 1000},
        }),
    );
    let server = start_with(config);
    let lb = server.local_addr();
    wait_until(&server, "b passed a check", |s| {
        of(s, "b").checks_success >= 1
    })
    .await;
    let before = names(lb, 0, 100).await;
    let on_b = before.iter().position(|n| n == "b").expect("a client of b") as u32;

    t.b.stop().await;
    let (moved, _) = which(client_ip(on_b), lb).await.expect("fail-over");
    assert_ne!(moved, "b");
    let s = server.snapshot();
    assert_eq!(of(&s, "b").deactivations, 1);
    assert!(!of(&s, "b").up, "inside its window");
    assert_eq!(
        of(&s, "b").check_up,
        Some(true),
        "the checks alone keep it up"
    );

    t.b.restart().await;
    wait_until(&server, "b's window ended by its checks", |s| of(s, "b").up).await;
    let again = names(lb, 5000, 100).await;
    assert!(again.iter().any(|n| n == "b"), "fresh clients reach b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_and_expect_decide_and_false_turns_checks_off_for_one_target() {
    let good = Backend::start("good", Mode::Named).await;
    let bad = Backend::start("bad", Mode::Named).await;
    // Named backends greet with their name, then echo: `send` comes back too.
    let text = config_json(
        vec![
            target_json(good.addr, "good", json!({})),
            target_json(bad.addr, "bad", json!({})),
            target_json(bad.addr, "bad-unchecked", json!({"healthCheck": false})),
            target_json(
                good.addr,
                "echo",
                json!({"healthCheck": {"expect": "ping-1234"}}),
            ),
        ],
        json!({"healthCheck": {"interval": 50, "timeout": 300, "rise": 1, "fall": 1,
                               "send": "ping-1234\n", "expect": "good"}}),
    );
    let config =
        stickylb::config::Config::parse(std::path::Path::new("expect.json"), &text).unwrap();
    let server = start_with(config);
    let s = wait_until(&server, "each verdict in", |s| {
        ["good", "bad", "echo"]
            .iter()
            .all(|id| of(s, id).checks_success + of(s, id).checks_failure >= 3)
    })
    .await;
    assert_eq!(of(&s, "good").check_up, Some(true));
    assert_eq!(of(&s, "bad").check_up, Some(false), "greets with \"bad\"");
    assert_eq!(of(&s, "bad").checks_success, 0);
    assert_eq!(of(&s, "echo").check_up, Some(true), "its send came back");
    let unchecked = of(&s, "bad-unchecked");
    assert_eq!(unchecked.check_up, None);
    assert!(unchecked.up);
    assert_eq!(unchecked.checks_success + unchecked.checks_failure, 0);
}

/// A config file and a balancer started from it, reloaded on demand.
struct FromFile {
    _dir: TempDir,
    path: std::path::PathBuf,
    server: Arc<Server>,
    reloader: Arc<Reloader>,
}

impl FromFile {
    fn start(tag: &str, text: &str) -> FromFile {
        let dir = TempDir::new(tag);
        let path = dir.path("config.json");
        std::fs::write(&path, text).unwrap();
        let server = start_from_file(&path, false);
        let reloader = Reloader::new(server.clone());
        FromFile {
            _dir: dir,
            path,
            server,
            reloader,
        }
    }

    async fn reload(&self, text: &str) {
        std::fs::write(&self.path, text).unwrap();
        self.reloader
            .reload(Trigger::Signal)
            .await
            .expect("reload applied");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_follow_reloads_by_target_identity() {
    let mut t = three().await;
    let targets = |t: &Three, with_c: bool| {
        let mut list = vec![
            target_json(t.a.addr, "a", json!({})),
            target_json(t.b.addr, "b", json!({})),
        ];
        if with_c {
            list.push(target_json(t.c.addr, "c", json!({})));
        }
        list
    };
    let checks = json!({"healthCheck": fast_checks()});
    let f = FromFile::start("follow", &config_json(targets(&t, true), checks.clone()));
    t.b.stop().await;
    wait_until(&f.server, "b down", |s| of(s, "b").check_up == Some(false)).await;
    let failures = of(&f.server.snapshot(), "b").checks_failure;

    // A reload that changes something else: b stays down, its counts go on from where they
    // were (it kept its checker), and c, removed, is no longer checked at all.
    let mut other = checks.clone();
    other["sessionExpiry"] = json!(12_345);
    f.reload(&config_json(targets(&t, false), other)).await;
    let s = f.server.snapshot();
    assert!(!of(&s, "b").up, "b is still down right after the reload");
    assert_eq!(of(&s, "b").check_up, Some(false));
    assert!(of(&s, "b").checks_failure >= failures);
    assert!(s.target("c").is_none_or(|c| !c.listed));
    let c_checks = t.c.accepted();
    let a_checks = t.a.accepted();
    wait_until(&f.server, "five more checks of a", |_| {
        t.a.accepted() >= a_checks + 5
    })
    .await;
    assert_eq!(
        t.c.accepted(),
        c_checks,
        "the removed target was checked again"
    );

    // Checks turned off for b: the verdict goes with them, and §3 alone decides again.
    let mut off = targets(&t, false);
    off[1]["healthCheck"] = json!(false);
    f.reload(&config_json(off, checks.clone())).await;
    let s = f.server.snapshot();
    assert_eq!(of(&s, "b").check_up, None);
    assert!(of(&s, "b").up, "unchecked, and no client has failed on it");
}

/// A client that connected through the balancer and still holds its connection.
struct Held {
    name: String,
    stream: tokio::net::TcpStream,
}

impl Held {
    /// Sends a line and reads the echo back: the connection still works.
    async fn echo(&mut self, line: &[u8]) {
        self.stream.write_all(line).await.expect("write");
        let mut got = vec![0; line.len()];
        tokio::time::timeout(PATIENCE, self.stream.read_exact(&mut got))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(got, line, "through {}", self.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_target_takes_no_new_client_but_keeps_its_sessions_and_connections() {
    let t = three().await;
    let targets = |drain_a: bool| {
        vec![
            target_json(t.a.addr, "a", json!({"drain": drain_a})),
            target_json(t.b.addr, "b", json!({})),
            target_json(t.c.addr, "c", json!({})),
        ]
    };
    let extra = json!({"sessionExpiry": 600_000});
    let f = FromFile::start("drain", &config_json(targets(false), extra.clone()));
    let lb = f.server.local_addr();
    // Clients 0..200: those on a either keep a connection open or close it (a live session).
    let mut held = Vec::new();
    let mut with_session = Vec::new();
    for n in 0..200 {
        let (name, stream) = which(client_ip(n), lb).await.expect("connect");
        if name == "a" {
            if held.len() < 5 {
                held.push(Held { name, stream });
            } else {
                with_session.push(n);
            }
        }
    }
    assert!(held.len() == 5 && with_session.len() >= 5, "a has clients");

    f.reload(&config_json(targets(true), extra.clone())).await;
    let s = wait_until(&f.server, "only the held connections open", |s| {
        of(s, "a").active == 5
    })
    .await;
    let a = of(&s, "a");
    assert!(a.draining && !a.up && a.listed);
    for h in &mut held {
        h.echo(b"still here\n").await;
    }
    for &n in &with_session {
        let (name, _) = which(client_ip(n), lb).await.expect("connect");
        assert_eq!(name, "a", "client {n} has a live session on a");
    }
    let fresh = names(lb, 1000, 300).await;
    assert!(
        fresh.iter().all(|n| n != "a"),
        "a new client reached the drained target"
    );
    drop(held);
    wait_until(&f.server, "a empty", |s| of(s, "a").active == 0).await;

    // Undrain by removing the key: new clients reach it again, as the hash says.
    let undrained: Vec<Value> = targets(false)
        .into_iter()
        .map(|mut t| {
            if let Some(t) = t.as_object_mut() {
                t.remove("drain");
            }
            t
        })
        .collect();
    f.reload(&config_json(undrained, extra)).await;
    let s = f.server.snapshot();
    assert!(!of(&s, "a").draining && of(&s, "a").up);
    let back = names(lb, 2000, 300).await;
    assert!(back.iter().any(|n| n == "a"), "a takes new clients again");
}

#[test]
fn a_drain_is_logged_when_it_starts_when_the_last_connection_closes_and_when_it_ends() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let a = Backend::start("a", Mode::Named).await;
        let config = |drain: bool| {
            json!({
                "sourceHost": "127.0.0.1",
                "sourcePort": 1,
                "metricsPort": null,
                "targets": [target_json(a.addr, "worker-a", json!({"drain": drain}))],
            })
        };
        let lb = tokio::task::spawn_blocking({
            let config = config(false);
            move || Balancer::launch(BIN, "drain-log", &["--no-watch"], config, None)
        })
        .await
        .unwrap();
        let (_, mut open) = which(client_ip(1), lb.addr).await.expect("connect");
        let write = |drain: bool| {
            let mut c = config(drain);
            c["sourcePort"] = lb.addr.port().into();
            std::fs::write(lb.dir.path("config.json"), c.to_string()).unwrap();
            lb.signal(libc::SIGHUP);
        };
        write(true);
        let line = wait_line(&lb, "target worker-a draining").await;
        assert!(line.contains("1 open connections"), "{line}");
        assert_eq!(lb.count_lines("drained: 0 connections"), 0);
        open.shutdown().await.unwrap();
        let mut rest = Vec::new();
        open.read_to_end(&mut rest).await.unwrap();
        drop(open);
        wait_line(&lb, "target worker-a drained: 0 connections").await;
        write(false);
        wait_line(&lb, "target worker-a no longer draining").await;
        assert_eq!(lb.count_lines("drained: 0 connections"), 1);
    });
}

async fn wait_line(lb: &Balancer, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(line) = lb.lines().into_iter().find(|l| l.contains(needle)) {
            return line;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no line with {needle:?}:\n{}",
            lb.lines().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
