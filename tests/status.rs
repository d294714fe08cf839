//! `GET /status` (design §15) over real HTTP after real traffic: every field of schema 1
//! (docs/status.md) with exact values, the state of a target and since when, the reason of a
//! failed connect and of a failed check, the last reload's result and error, no client
//! address anywhere, read-only methods, and `stickylb demo` naming the page's URL. The page
//! itself, in a real browser, is tests/status_page.rs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use stickylb::admin::{self, Admin};
use stickylb::reload::{Reloader, Trigger};
use stickylb::server::Server;
use stickylb_testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_stickylb");

/// One request to the admin endpoint: status, head (lower-cased) and body.
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let r = http_request(addr, method, path).await;
    (r.status, r.head, r.body)
}

/// `GET /status`, parsed.
async fn status(admin: &Admin) -> Value {
    let (code, head, body) = http(admin.local_addr(), "GET", "/status").await;
    assert_eq!(code, 200, "{head}\n{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {body}"))
}

/// Polls `/status` (bounded) until `ready` holds; returns that status.
async fn status_until(admin: &Admin, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let s = status(admin).await;
        if ready(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not in time: {what}; last status: {s:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The target `id` of a status.
fn of<'a>(s: &'a Value, id: &str) -> &'a Value {
    s["targets"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["id"] == id))
        .unwrap_or_else(|| panic!("no target {id} in {s:#}"))
}

/// The ids of a status's targets, in its order.
fn ids(s: &Value) -> Vec<&Value> {
    s["targets"]
        .as_array()
        .map(|ts| ts.iter().map(|t| &t["id"]).collect())
        .unwrap_or_default()
}

/// A balancer started from a config file (so a test can edit it and reload), with its admin
/// endpoint on a fresh port.
struct Running {
    _dir: TempDir,
    path: PathBuf,
    server: Arc<Server>,
    admin: Admin,
    reloader: Arc<Reloader>,
}

impl Running {
    fn start(tag: &str, text: &str) -> Running {
        let dir = TempDir::new(tag);
        let path = dir.file("config.json", text);
        let server = start_from_file(&path, false);
        let admin = admin::start("127.0.0.1:0".parse().unwrap(), server.clone()).expect("admin");
        let reloader = Reloader::new(server.clone());
        Running {
            _dir: dir,
            path,
            server,
            admin,
            reloader,
        }
    }

    /// Writes `text` as the config and reloads (SIGHUP's way); returns whether it applied.
    async fn reload(&self, text: &str) -> bool {
        std::fs::write(&self.path, text).expect("write config");
        self.reloader.reload(Trigger::Signal).await.is_ok()
    }
}

/// A client from `ip` that has sent `hello\n` through the balancer and read its echo: returns
/// the name of its backend and the open connection.
async fn client(ip: std::net::Ipv4Addr, lb: SocketAddr) -> (String, TcpStream) {
    let (name, mut stream) = which(ip, lb)
        .await
        .unwrap_or_else(|e| panic!("client {ip}: {e}"));
    stream.write_all(b"hello\n").await.expect("send");
    let mut echo = [0u8; 6];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut echo))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&echo, b"hello\n");
    (name, stream)
}

fn is_rfc3339_utc(text: &Value) -> bool {
    let Some(t) = text.as_str() else {
        return false;
    };
    let b = t.as_bytes();
    t.len() == 24
        && t.ends_with('Z')
        && [4, 7].iter().all(|&i| b[i] == b'-')
        && b[10] == b'T'
        && [13, 16].iter().all(|&i| b[i] == b':')
        && b[19] == b'.'
}

/// `{"time", "ago_s"}` with a date and a non-negative age.
fn is_moment(m: &Value) -> bool {
    is_rfc3339_utc(&m["time"]) && m["ago_s"].as_f64().is_some_and(|s| s >= 0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_has_schema_1_with_every_field_and_exact_counts_after_real_traffic() {
    let a = Backend::start("a", Mode::Named).await;
    let b = Backend::start("b", Mode::Named).await;
    let c = Backend::start("c", Mode::Named).await;
    let text = config_json(
        vec![
            target_json(a.addr, "a", json!({"weight": 2})),
            target_json(b.addr, "b", json!({})),
            target_json(c.addr, "c", json!({"healthCheck": false})),
        ],
        json!({"healthCheck": {"interval": 50, "timeout": 500, "rise": 1, "fall": 1}}),
    );
    let run = Running::start("status-fields", &text);
    let lb = run.server.local_addr();
    let mut open = Vec::new();
    let mut per_target: HashMap<String, u64> = HashMap::new();
    for n in 0..12 {
        let (name, stream) = client(client_ip(n), lb).await;
        *per_target.entry(name).or_default() += 1;
        open.push(stream);
    }
    let s = status_until(&run.admin, "bytes counted and checks made", |s| {
        ["a", "b", "c"].iter().all(|id| {
            let t = of(s, id);
            let n = per_target.get(*id).copied().unwrap_or(0);
            t["bytes"]["to_target"] == 6 * n
        }) && ["a", "b"]
            .iter()
            .all(|id| !of(s, id)["check"]["last"].is_null())
    })
    .await;

    assert_eq!(s["schema"], 1);
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert!(is_rfc3339_utc(&s["time"]), "{}", s["time"]);
    assert!(s["uptime_s"].as_f64().is_some_and(|u| u >= 0.0));
    assert_eq!(s["config"]["path"], run.path.to_string_lossy().as_ref());
    assert_eq!(s["config"]["last_reload"], Value::Null);
    assert_eq!(s["config"]["reloads"], json!({"success": 0, "failure": 0}));
    assert_eq!(s["listeners"], json!([lb.to_string()]));
    let totals = &s["totals"];
    assert_eq!(totals["accepted"], 12);
    assert_eq!(totals["active"], 12);
    assert_eq!(
        totals["refused"],
        json!({"denied": 0, "limit": 0, "client_limit": 0, "no_target": 0, "proxy_header": 0,
               "loop": 0})
    );
    assert_eq!(totals["retries"], 0);
    assert_eq!(totals["sessions"], 12);
    assert_eq!(totals["hash_overflows"], 0);
    assert_eq!(totals["accept_errors"], json!({"fd_limit": 0, "other": 0}));

    assert_eq!(ids(&s), ["a", "b", "c"], "config order");
    for (backend, weight) in [(&a, 2), (&b, 1), (&c, 1)] {
        let t = of(&s, &backend.name);
        let n = per_target.get(&backend.name).copied().unwrap_or(0);
        assert_eq!(t["address"], backend.addr.to_string());
        assert_eq!(t["weight"], weight);
        assert_eq!(t["state"], "up");
        assert!(is_moment(&t["since"]), "{t:#}");
        assert_eq!(t["last_failure"], Value::Null);
        assert_eq!(
            (&t["connect_failures"], &t["deactivations"]),
            (&json!(0), &json!(0))
        );
        assert_eq!(t["connections"], json!({"active": n, "total": n}));
        // To the target: "hello\n"; to the client: the backend's name line and the echo.
        let to_client = n * (backend.name.len() as u64 + 1 + 6);
        assert_eq!(
            t["bytes"],
            json!({"to_target": 6 * n, "to_client": to_client})
        );
        // The balancer is younger than a minute: every connect so far is in the window.
        let ct = &t["connect_time"];
        assert_eq!(ct["samples"], n, "{t:#}");
        assert!(ct["window_s"].as_u64().is_some_and(|w| w <= 60), "{ct}");
        if n > 0 {
            let (p50, p99) = (
                ct["p50_ms"].as_f64().unwrap(),
                ct["p99_ms"].as_f64().unwrap(),
            );
            assert!(0.0 < p50 && p50 <= p99 && p99 <= 10_000.0, "{ct}");
        } else {
            assert_eq!((&ct["p50_ms"], &ct["p99_ms"]), (&Value::Null, &Value::Null));
        }
    }
    for id in ["a", "b"] {
        let check = &of(&s, id)["check"];
        assert_eq!(check["verdict"], "up", "{check}");
        assert!(check["passed"].as_u64().is_some_and(|p| p >= 1));
        assert_eq!(check["failed"], 0);
        assert_eq!(check["last"]["result"], "passed");
        assert_eq!(check["last"]["reason"], Value::Null);
        assert!(is_moment(&check["last"]), "{check}");
    }
    assert_eq!(of(&s, "c")["check"], Value::Null, "c is not checked");
    drop(open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_and_a_failed_check_are_shown_with_their_reason_and_since_when() {
    let live = Backend::start("live", Mode::Named).await;
    let text = config_json(
        vec![
            target_json(dead_port(), "gone", json!({})),
            target_json(live.addr, "live", json!({})),
        ],
        json!({"targetDeactivationDuration": 600000}),
    );
    let run = Running::start("status-failure", &text);
    let lb = run.server.local_addr();
    // Clients until one of them was sent to the dead target first (and retried elsewhere).
    let mut n = 0;
    while run.server.snapshot().retries == 0 {
        assert!(n < 200, "no client hashed to the dead target");
        let (name, _) = client(client_ip(n), lb).await;
        assert_eq!(name, "live", "the client never sees the failed attempt");
        n += 1;
    }
    let s = status(&run.admin).await;
    let gone = of(&s, "gone");
    assert_eq!(gone["state"], "down");
    assert_eq!(gone["last_failure"]["reason"], "refused");
    assert!(is_moment(&gone["last_failure"]), "{gone:#}");
    assert_eq!(
        (&gone["connect_failures"], &gone["deactivations"]),
        (&json!(1), &json!(1))
    );
    // Down since that failure, not since start-up.
    assert_eq!(gone["since"]["time"], gone["last_failure"]["time"]);
    assert_eq!(gone["check"], Value::Null);
    assert_eq!(s["totals"]["retries"], 1);
    assert_eq!(of(&s, "live")["state"], "up");

    // With checks on, the dead target's check fails for the same reason.
    let checked = config_json(
        vec![
            target_json(dead_port(), "gone", json!({})),
            target_json(live.addr, "live", json!({})),
        ],
        json!({"healthCheck": {"interval": 50, "timeout": 500, "rise": 1, "fall": 1}}),
    );
    assert!(run.reload(&checked).await);
    let s = status_until(&run.admin, "a failed check of gone", |s| {
        of(s, "gone")["check"]["last"]["result"] == "failed"
    })
    .await;
    let check = &of(&s, "gone")["check"];
    assert_eq!(check["verdict"], "down", "{check}");
    assert_eq!(check["last"]["reason"], "refused", "{check}");
    assert!(check["failed"].as_u64().is_some_and(|f| f >= 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_show_their_result_and_error_and_drain_and_removal_show_as_states() {
    let a = Backend::start("a", Mode::Named).await;
    let b = Backend::start("b", Mode::Named).await;
    let two = |b_more: Value| {
        config_json(
            vec![
                target_json(a.addr, "a", json!({})),
                target_json(b.addr, "b", b_more),
            ],
            json!({}),
        )
    };
    let run = Running::start("status-reload", &two(json!({})));
    let lb = run.server.local_addr();
    // A connection to b that stays open through the reloads.
    let mut held = None;
    for n in 0..200 {
        let (name, stream) = client(client_ip(n), lb).await;
        if name == "b" {
            held = Some(stream);
            break;
        }
    }
    let held = held.expect("some client on b");
    // Time enough on the balancer's clock to tell start-up from the reload below.
    status_until(&run.admin, "uptime past 50 ms", |s| {
        s["uptime_s"].as_f64().is_some_and(|u| u >= 0.05)
    })
    .await;

    assert!(run.reload(&two(json!({"drain": true}))).await);
    let s = status(&run.admin).await;
    let r = &s["config"]["last_reload"];
    assert_eq!(r["result"], "success", "{r}");
    assert_eq!(r["error"], Value::Null);
    assert!(is_moment(r), "{r}");
    assert_eq!(s["config"]["reloads"], json!({"success": 1, "failure": 0}));
    let drained = of(&s, "b");
    assert_eq!(drained["state"], "draining");
    assert_eq!(drained["connections"]["active"], 1);
    // Draining since that reload (which recorded its outcome just after applying the
    // drain), while a is up since start-up.
    let since = drained["since"]["ago_s"].as_f64().unwrap();
    let reloaded = r["ago_s"].as_f64().unwrap();
    assert!(
        since >= reloaded && since - reloaded < 1.0,
        "{drained:#} {r}"
    );
    let a_since = of(&s, "a")["since"]["ago_s"].as_f64().unwrap();
    assert!(since < a_since, "{drained:#} {:#}", of(&s, "a"));

    // A bad edit: rejected, its reason kept, the running config serving on.
    let bad = r#"{"sourcePort": 1, "targets": [{"host": "127.0.0.1", "port": 2}], "tragets": []}"#;
    assert!(!run.reload(bad).await);
    let s = status(&run.admin).await;
    let r = &s["config"]["last_reload"];
    assert_eq!(r["result"], "failure", "{r}");
    let error = r["error"].as_str().expect("an error text");
    assert!(
        error.contains("config.json") && error.contains("tragets"),
        "{error}"
    );
    assert_eq!(s["config"]["reloads"], json!({"success": 1, "failure": 1}));
    assert_eq!(of(&s, "b")["state"], "draining", "still the running config");

    // b removed while its connection is open: `removed`, no address, its connection counted.
    let only_a = config_json(vec![target_json(a.addr, "a", json!({}))], json!({}));
    assert!(run.reload(&only_a).await);
    let s = status(&run.admin).await;
    let removed = of(&s, "b");
    assert_eq!(removed["state"], "removed");
    assert_eq!(
        (&removed["address"], &removed["weight"]),
        (&Value::Null, &Value::Null)
    );
    assert_eq!(removed["connections"]["active"], 1);
    assert_eq!(ids(&s), ["a", "b"], "listed targets, then removed ones");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_address_appears_in_the_status() {
    let a = Backend::start("a", Mode::Named).await;
    let b = Backend::start("b", Mode::Named).await;
    let text = config_json(
        vec![
            target_json(a.addr, "a", json!({})),
            target_json(b.addr, "b", json!({})),
            target_json(dead_port(), "gone", json!({})),
        ],
        json!({"accessLog": true, "healthCheck": {"interval": 50}}),
    );
    let run = Running::start("status-private", &text);
    let lb = run.server.local_addr();
    let clients: Vec<std::net::Ipv4Addr> = (100..140).map(client_ip).collect();
    let mut open = Vec::new();
    for &ip in &clients {
        open.push(client(ip, lb).await.1);
    }
    let (_, _, body) = http(run.admin.local_addr(), "GET", "/status").await;
    let s: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(s["totals"]["active"], 40, "the clients are there: {body}");
    for ip in &clients {
        // Each client address is 127.10.0.x: no target, listener or admin address is.
        assert!(
            !body.contains(&ip.to_string()),
            "client {ip} in /status: {body}"
        );
    }
    drop(open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_the_json_are_read_only_and_other_paths_are_404() {
    let a = Backend::start("a", Mode::Named).await;
    let run = Running::start(
        "status-methods",
        &config_json(vec![target_json(a.addr, "a", json!({}))], json!({})),
    );
    let addr = run.admin.local_addr();
    let (code, head, body) = http(addr, "GET", "/").await;
    assert_eq!(code, 200);
    assert!(
        head.contains("content-type: text/html; charset=utf-8"),
        "{head}"
    );
    assert!(
        head.contains("content-security-policy: default-src 'none'"),
        "{head}"
    );
    assert_eq!(body, admin::status::PAGE);
    let (code, head, _) = http(addr, "GET", "/status").await;
    assert_eq!(code, 200);
    assert!(head.contains("content-type: application/json"), "{head}");
    assert!(head.contains("cache-control: no-store"), "{head}");
    let (code, head, body) = http(addr, "HEAD", "/status").await;
    assert_eq!((code, body.as_str()), (200, ""), "{head}");
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        for path in ["/", "/status"] {
            let (code, head, _) = http(addr, method, path).await;
            assert_eq!(code, 405, "{method} {path}");
            assert!(head.contains("allow: get, head"), "{head}");
        }
    }
    for path in ["/index.html", "/status/", "/status.json", "/targets"] {
        assert_eq!(http(addr, "GET", path).await.0, 404, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_prints_the_status_page_url_beside_the_curl_hint_and_serves_it() {
    let targets = [(); 3].map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())));
    let port = free_port();
    let lb = Balancer::spawn_with_args(
        BIN,
        "status-demo",
        &["demo"],
        &targets,
        json!({"metricsHost": "127.0.0.1", "metricsPort": port}),
    );
    let line = lb.wait_for_line("demo targets answering");
    assert!(line.contains(&format!("curl {}", lb.addr)), "{line}");
    assert!(
        line.contains(&format!("status page: http://127.0.0.1:{port}/")),
        "{line}"
    );
    let admin = SocketAddr::from(([127, 0, 0, 1], port));
    let (code, _, body) = http(admin, "GET", "/").await;
    assert_eq!((code, body.as_str()), (200, admin::status::PAGE));
    let (code, _, body) = http(admin, "GET", "/status").await;
    assert_eq!(code, 200);
    let s: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(s["listeners"], json!([lb.addr.to_string()]));
    assert_eq!(s["targets"].as_array().map(Vec::len), Some(3));
}
