//! The status page (`GET /`, design §15) in a real browser: headless Chromium (the Debian
//! package, installed and required by `scripts/test`) loads it from a running balancer with
//! three targets (one up, one drained by a reload, one whose worker stopped), and the test
//! reads the DOM after the page's scripts ran: each target's state and connection counts, the
//! reload status. Then a worker stops and the page must show its target down within 5 s
//! without being reloaded; target ids and a reload error full of markup must show as text;
//! and when the balancer stops answering, the page must say so.
//!
//! `STICKYLB_STATUS_SCREENSHOT=1 scripts/test --test status_page` (or `cargo test`) also
//! writes the page as docs/status-page.png, the picture in the README.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stickylb::admin;
use stickylb::reload::{Reloader, Trigger};
use stickylb::TargetStatus;
use stickylb_testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The browser's viewport: a laptop screen.
const WIDTH: u32 = 1280;
const HEIGHT: u32 = 800;

/// Set (to anything) to write the screenshot to docs/status-page.png.
const SCREENSHOT: &str = "STICKYLB_STATUS_SCREENSHOT";

/// A target id made of markup: the page must show it as these characters.
const MARKUP_ID: &str = r#"<img src=x onerror="window.pwned=1">worker-3b"#;

/// The rows of the page's target table as the browser rendered them.
const ROWS: &str = r#"[...document.querySelectorAll('#targets tbody tr')].map(r => ({
    id: r.querySelector('th .tid').textContent,
    state: r.querySelector('td.state .badge').textContent,
    active: r.querySelector('td.active').textContent,
    total: r.querySelector('td.total').textContent,
}))"#;

/// The config of `targets` (id, address, extra keys), checked every 100 ms (one failure takes
/// a target out), with the `extra` top-level keys.
fn config(targets: &[(&str, SocketAddr, Value)], extra: Value) -> String {
    let targets = targets
        .iter()
        .map(|(id, addr, more)| target_json(*addr, id, more.clone()))
        .collect();
    let mut extra = extra;
    extra["healthCheck"] = json!({"interval": 100, "timeout": 500, "rise": 1, "fall": 1});
    config_json(targets, extra)
}

/// A client from `ip` through the balancer that read its worker's name and exchanged a
/// kilobyte with it: the worker's name and the open connection.
async fn client(ip: std::net::Ipv4Addr, lb: SocketAddr) -> (String, TcpStream) {
    let (name, mut stream) = which(ip, lb)
        .await
        .unwrap_or_else(|e| panic!("client {ip}: {e}"));
    let data = vec![b'x'; 1024];
    stream.write_all(&data).await.expect("send");
    let mut echo = vec![0u8; data.len()];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut echo))
        .await
        .expect("echo in time")
        .expect("echo");
    (name, stream)
}

/// The row of `id` among `rows` (the value of [`ROWS`]).
fn row<'a>(rows: &'a Value, id: &str) -> &'a Value {
    rows.as_array()
        .and_then(|rows| rows.iter().find(|r| r["id"] == id))
        .unwrap_or_else(|| panic!("no row {id:?} in {rows:#}"))
}

#[test]
fn the_page_shows_every_target_live_and_keeps_up_without_a_reload() {
    if !require_tool("chromium") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (mut w1, w2, mut w3) = rt.block_on(async {
        (
            Backend::start("worker-1", Mode::Named).await,
            Backend::start("worker-2", Mode::Named).await,
            Backend::start("worker-3", Mode::Named).await,
        )
    });
    let (a1, a2, a3) = (w1.addr, w2.addr, w3.addr);
    let dir = TempDir::new("status-page");
    let targets = |w2_more: Value| {
        vec![
            ("worker-1", a1, json!({})),
            ("worker-2", a2, w2_more),
            ("worker-3", a3, json!({})),
        ]
    };
    let path = dir.file("config.json", &config(&targets(json!({})), json!({})));
    let server = rt.block_on(async { start_from_file(&path, false) });
    let reloader = Reloader::new(server.clone());
    let reload = |text: &str| {
        std::fs::write(&path, text).expect("write config");
        rt.block_on(reloader.reload(Trigger::Signal)).is_ok()
    };
    let admin = admin::start("127.0.0.1:0".parse().unwrap(), server.clone()).expect("admin");
    let lb = server.local_addr();

    // Clients until every worker has two of them, each connection left open.
    let mut open = Vec::new();
    let mut per_worker: HashMap<String, u64> = HashMap::new();
    rt.block_on(async {
        for n in 0..300 {
            if per_worker.len() == 3 && per_worker.values().all(|&k| k >= 2) {
                break;
            }
            let (name, stream) = client(client_ip(n), lb).await;
            *per_worker.entry(name).or_default() += 1;
            open.push(stream);
        }
    });
    assert!(per_worker.values().all(|&k| k >= 2), "{per_worker:?}");

    // worker-3 stops (its open connections go on); worker-2 is drained by a reload.
    rt.block_on(w3.stop());
    assert!(reload(&config(&targets(json!({"drain": true})), json!({}))));
    let deadline = Instant::now() + PATIENCE;
    loop {
        let s = server.snapshot();
        let state = |id: &str| s.target(id).map(|t| t.status);
        if state("worker-3") == Some(TargetStatus::Down)
            && state("worker-2") == Some(TargetStatus::Draining)
        {
            break;
        }
        assert!(Instant::now() < deadline, "{:?}", s.targets);
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut browser = Browser::launch(WIDTH, HEIGHT);
    browser.navigate(&format!("http://{}/", admin.local_addr()));
    let rows = browser.wait_for(
        &format!("(() => {{ const rows = {ROWS}; return rows.length === 3 && rows; }})()"),
        "three target rows",
        PATIENCE,
    );
    for (id, state) in [
        ("worker-1", "up"),
        ("worker-2", "draining"),
        ("worker-3", "down"),
    ] {
        let r = row(&rows, id);
        let n = per_worker[id].to_string();
        assert_eq!(r["state"], state, "{r}");
        assert_eq!((&r["active"], &r["total"]), (&json!(n), &json!(n)), "{r}");
    }
    let reloaded = browser.eval("document.querySelector('#reload .badge').textContent");
    assert_eq!(reloaded, "applied");
    let caption = browser.eval("document.getElementById('summary').textContent");
    assert_eq!(caption, "3 targets: 1 up, 1 down, 1 draining");
    // The page's own JavaScript variable: gone if the page is ever reloaded.
    browser.eval("window.sameDocument = 'yes'");
    let refreshed = browser.eval("document.getElementById('updated').title");
    assert!(
        refreshed.as_str().is_some_and(|t| t.ends_with('Z')),
        "{refreshed}"
    );

    let png = browser.screenshot_png(WIDTH);
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    if std::env::var_os(SCREENSHOT).is_some() {
        let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/status-page.png");
        std::fs::write(&out, &png).expect("write the screenshot");
        eprintln!("wrote {} ({} bytes)", out.display(), png.len());
    }

    // worker-1 stops: the page shows its target down within 5 s, in the same document, with a
    // newer refresh.
    rt.block_on(w1.stop());
    let stopped = Instant::now();
    browser.wait_for(
        &format!(
            "(() => {{ const r = {ROWS}.find(r => r.id === 'worker-1'); \
             return r && r.state === 'down' && window.sameDocument === 'yes'; }})()"
        ),
        "worker-1 down on the page, without a reload",
        Duration::from_secs(5),
    );
    eprintln!(
        "worker-1 shown down {:?} after it stopped",
        stopped.elapsed()
    );
    let later = browser.eval("document.getElementById('updated').title");
    assert_ne!(later, refreshed, "refreshed since");

    // A target id made of markup, and a reload error quoting markup, show as text.
    let renamed = config(
        &[
            ("worker-1", a1, json!({})),
            ("worker-2", a2, json!({"drain": true})),
            (MARKUP_ID, a3, json!({})),
        ],
        json!({}),
    );
    assert!(reload(&renamed));
    let shown = browser.wait_for(
        &format!("(() => {{ const rows = {ROWS}; return rows.length === 4 && rows; }})()"),
        "the renamed target's row and the removed one's",
        PATIENCE,
    );
    assert_eq!(row(&shown, MARKUP_ID)["id"], MARKUP_ID);
    assert_eq!(row(&shown, "worker-3")["state"], "removed", "{shown:#}");
    let bad = config(&targets(json!({})), json!({"<b id=bold>tragets</b>": []}));
    assert!(!reload(&bad));
    let error = browser.wait_for(
        "(() => { const e = document.querySelector('#reload .reload-error'); \
         return e && e.textContent; })()",
        "the reload error on the page",
        PATIENCE,
    );
    assert!(
        error
            .as_str()
            .is_some_and(|e| e.contains("<b id=bold>tragets</b>")),
        "{error}"
    );
    let badge = browser.eval("document.querySelector('#reload .badge').textContent");
    assert_eq!(badge, "rejected");
    let injected = browser.eval(
        "document.querySelectorAll('img').length + document.querySelectorAll('#bold').length \
         + (window.pwned ? 1 : 0)",
    );
    assert_eq!(injected, 0, "markup from the config was inserted as markup");

    // The balancer stops answering: the page says so.
    drop(admin);
    let warning = browser.wait_for(
        "(() => { const w = document.getElementById('warning'); \
         return !w.hidden && w.offsetHeight > 0 && w.textContent; })()",
        "the warning that the balancer is not answering",
        PATIENCE,
    );
    assert!(
        warning
            .as_str()
            .is_some_and(|w| w.contains("not answering")),
        "{warning}"
    );
    assert_eq!(browser.eval("window.sameDocument"), "yes", "never reloaded");
    drop(browser);
    drop(open);
    drop(w2);
}
