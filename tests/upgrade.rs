//! Upgrades of the running binary (design §13, issue 15), as an operator does them: the file at
//! the binary's path replaced, then `stickylb upgrade --pid-file` (or SIGUSR2). Real processes,
//! real signals, real TCP; the scenario under load is `stickylb_testkit::upgrade`, shared with
//! `benches/upgrade.rs`.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use stickylb_testkit::metrics::scrape;
use stickylb_testkit::upgrade::{self, gone, Binaries, Options};
use stickylb_testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_stickylb");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_under_load_refuse_cut_and_forget_nothing() {
    let options = Options {
        long_lived: 20,
        idle: 10,
        upgrades: 3,
        short_parallel: 4,
        chunk: 4096,
        tick: Duration::from_millis(20),
        interval: Duration::from_millis(300),
    };
    let report = upgrade::run(BIN, &options).await;
    let versions: Vec<&str> = report.upgrades.iter().map(|u| u.version.as_str()).collect();
    eprintln!(
        "{} upgrades ({versions:?}), signal to serving {:?} ms; {} short connections; {} bytes \
         checked on {} long-lived connections; {} scrapes",
        report.upgrades.len(),
        report.serving_ms(),
        report.short_ok,
        report.long_bytes,
        options.long_lived,
        report.scrapes
    );
    assert!(
        report.upgrade_failures.is_empty(),
        "{:?}",
        report.upgrade_failures
    );
    assert_eq!(report.upgrades.len(), 3);
    assert!(report.wrong.is_empty(), "{:?}", report.wrong);
    assert_eq!(
        report.short_failed, 0,
        "failed short connections: {:?}",
        report.short_failures
    );
    assert!(report.short_ok > 0, "short connections ran");
    assert!(report.long_cut.is_empty(), "cut: {:?}", report.long_cut);
    assert!(report.idle_cut.is_empty(), "cut: {:?}", report.idle_cut);
    assert!(report.long_bytes > 0);
    assert!(report.pinned_moved.is_empty(), "{:?}", report.pinned_moved);
    assert!(report.scrapes > 0);
    assert!(
        report.scrape_failures.is_empty(),
        "{:?}",
        report.scrape_failures
    );
    assert!(
        report.backwards.is_empty(),
        "counters went down: {:?}",
        report.backwards
    );
}

/// A streaming connection through the balancer: sends a chunk of its pattern and checks the
/// echo, on demand.
struct Stream {
    stream: tokio::net::TcpStream,
    out: Pattern,
    back: Pattern,
    bytes: usize,
}

impl Stream {
    async fn open(lb: std::net::SocketAddr, n: u32) -> Stream {
        let (_, stream) = which(client_ip(n), lb).await.expect("connect");
        Stream {
            stream,
            out: Pattern::new(u64::from(n)),
            back: Pattern::new(u64::from(n)),
            bytes: 0,
        }
    }

    /// One round trip of `len` bytes, checked.
    async fn round_trip(&mut self, len: usize) {
        let mut chunk = vec![0u8; len];
        self.out.fill(&mut chunk);
        self.stream.write_all(&chunk).await.expect("write");
        let mut got = vec![0u8; len];
        tokio::time::timeout(PATIENCE, self.stream.read_exact(&mut got))
            .await
            .expect("echo in time")
            .expect("echo: the connection was cut");
        let mut want = vec![0u8; len];
        self.back.fill(&mut want);
        assert!(got == want, "wrong bytes after {}", self.bytes);
        self.bytes += len;
    }

    /// Half-closes and reads the echo's end: a FIN, nothing more.
    async fn finish(mut self) {
        self.stream.shutdown().await.expect("half-close");
        let mut rest = Vec::new();
        tokio::time::timeout(PATIENCE, self.stream.read_to_end(&mut rest))
            .await
            .expect("EOF in time")
            .expect("a clean end, not a reset");
        assert!(rest.is_empty());
    }
}

async fn failures(metrics: std::net::SocketAddr) -> f64 {
    let s = scrape(metrics).await.expect("scrape");
    s.value("stickylb_upgrades_total", &[("result", "failure")])
        .expect("upgrades_total")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_binary_that_fails_in_any_way_leaves_the_old_one_serving_everything() {
    let backend = Backend::start("echo", Mode::Named).await;
    let bins = Binaries::new(BIN, "upgrade-fail");
    let metrics_port = free_port();
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let extra = serde_json::json!({"metricsPort": metrics_port});
    let config = serde_json::from_str(&config_text(&[backend.addr], extra)).unwrap();
    let lb = bins.launch_env("upgrade-fail", &[], config);
    let first = bins.pid().expect("pid file");
    // Ten connections, enough descriptors to overflow a new process with a tiny fd limit.
    let mut streams = Vec::new();
    for n in 0..10 {
        let mut s = Stream::open(lb.addr, n).await;
        s.round_trip(64 * 1024).await;
        streams.push(s);
    }
    let config_path = lb.dir.path("config.json");
    let good_config = std::fs::read_to_string(&config_path).unwrap();

    let cases: [(&str, &dyn Fn(), &str); 5] = [
        (
            "not executable",
            &|| bins.replace("not a binary", 0o644),
            "cannot start",
        ),
        (
            "exits at once",
            &|| bins.replace("#!/bin/sh\nexit 3\n", 0o755),
            "exit status: 3",
        ),
        (
            "killed before it is ready",
            &|| bins.replace("#!/bin/sh\nkill -KILL $$\n", 0o755),
            "signal: 9",
        ),
        (
            "rejects the config",
            &|| {
                bins.replace_with_build("b", "");
                std::fs::write(&config_path, "{\"sourcePort\": \"nope\"}").unwrap();
            },
            "sourcePort",
        ),
        (
            // Its fd limit (24) holds its runtime and the listeners, not the 20 descriptors of
            // the connections: it cannot read the handover.
            "cannot take the descriptors",
            &|| bins.replace_with_build("b", "ulimit -n 24"),
            "file-descriptor limit",
        ),
    ];
    for (i, (case, prepare, reason)) in cases.iter().enumerate() {
        prepare();
        let output = bins.upgrade_command().await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{case}: {stderr}");
        assert!(
            stderr.contains("keeps serving") && stderr.contains(reason),
            "{case}: the reason is told: {stderr}\n{}",
            lb.lines().join("\n")
        );
        std::fs::write(&config_path, &good_config).unwrap();
        // Nothing moved: the same process, its connections, its listener and its metrics.
        assert_eq!(bins.pid(), Some(first), "{case}");
        for s in &mut streams {
            s.round_trip(16 * 1024).await;
        }
        let (name, _) = which(client_ip(100 + i as u32), lb.addr).await.expect(case);
        assert_eq!(name, "echo");
        assert_eq!(failures(metrics).await, (i + 1) as f64, "{case}: counted");
    }
    assert!(lb.count_lines("upgrade failed; this process keeps serving everything") >= 5);

    // After all that, an upgrade that works takes the same connections over.
    let done = bins
        .upgrade("a")
        .await
        .expect("the upgrade after the failures");
    assert_eq!(done.old_pid, first);
    for s in &mut streams {
        s.round_trip(16 * 1024).await;
    }
    for s in streams {
        s.finish().await;
    }
    let after = scrape(metrics).await.expect("scrape");
    assert_eq!(
        after.value("stickylb_upgrades_total", &[("result", "failure")]),
        Some(5.0),
        "the old process's failures carry over"
    );
    assert_eq!(
        after.value("stickylb_upgrades_total", &[("result", "success")]),
        Some(1.0)
    );
    assert!(gone(first).await);
    bins.stop_current().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_upgrade_while_one_runs_is_refused_and_the_first_completes() {
    let backend = Backend::start("echo", Mode::Named).await;
    let bins = Binaries::new(BIN, "upgrade-twice");
    let config =
        serde_json::from_str(&config_text(&[backend.addr], serde_json::json!({}))).unwrap();
    let lb = bins.launch_env("upgrade-twice", &[], config);
    let first = bins.pid().expect("pid file");
    // A new binary that takes a while to start: the first upgrade is still running when the
    // second signal and the second command come.
    bins.replace_with_build("b", "sleep 1");
    lb.signal(libc::SIGUSR2);
    lb.wait_for_line("SIGUSR2: upgrading");
    lb.signal(libc::SIGUSR2);
    lb.wait_for_line("SIGUSR2 refused: an upgrade is already running");
    let output = bins.upgrade_command().await;
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("already upgrading"));
    lb.wait_for_line("took over from process");
    assert!(gone(first).await, "the first upgrade completed");
    let (name, _) = which(client_ip(1), lb.addr).await.expect("served");
    assert_eq!(name, "echo");
    bins.stop_current().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_at_start_and_mainpid_and_ready_from_the_new_process() {
    let backend = Backend::start("echo", Mode::Named).await;
    let bins = Binaries::new(BIN, "upgrade-notify");
    let dir = TempDir::new("upgrade-notify-socket");
    let socket_path = dir.path("notify.sock");
    let notify = UnixDatagram::bind(&socket_path).unwrap();
    notify.set_read_timeout(Some(PATIENCE)).unwrap();
    let receive = || {
        let mut buf = [0u8; 256];
        let n = notify.recv(&mut buf).expect("a notification in time");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    let config =
        serde_json::from_str(&config_text(&[backend.addr], serde_json::json!({}))).unwrap();
    let env = [("NOTIFY_SOCKET", socket_path.to_str().unwrap())];
    let _lb = bins.launch_env("upgrade-notify", &env, config);
    assert_eq!(receive(), "READY=1");
    let done = bins.upgrade("b").await.expect("upgrade");
    assert_eq!(receive(), format!("MAINPID={}\nREADY=1", done.new_pid));
    assert_eq!(bins.pid(), Some(done.new_pid));
    bins.stop_current().await;
    assert_eq!(receive(), "STOPPING=1");
}

/// `GET /status` of the process serving `admin`, parsed, and the moments between which it was
/// taken (the request sent, the answer read).
async fn status(admin: std::net::SocketAddr) -> (serde_json::Value, [std::time::Instant; 2]) {
    let sent = std::time::Instant::now();
    let response = http_request(admin, "GET", "/status").await;
    let read = std::time::Instant::now();
    assert_eq!(response.status, 200, "{}", response.body);
    let status = serde_json::from_str(&response.body).expect("/status is JSON");
    (status, [sent, read])
}

/// The status page's history goes through an upgrade (handover format 2): a target down since
/// a refused connect stays down since that moment with its last failure, a drained target
/// stays draining since start-up, and the last reload is still shown. Each moment is compared
/// by its age: the same moment read later is older by the time between the two reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_pages_history_goes_through_an_upgrade() {
    let live = Backend::start("live", Mode::Named).await;
    let other = Backend::start("other", Mode::Named).await;
    let bins = Binaries::new(BIN, "upgrade-history");
    let admin = dead_port();
    let targets = vec![
        target_json(dead_port(), "gone", serde_json::json!({})),
        target_json(live.addr, "live", serde_json::json!({})),
        target_json(other.addr, "drained", serde_json::json!({"drain": true})),
    ];
    let extra = serde_json::json!({
        "metricsPort": admin.port(),
        "targetDeactivationDuration": 600_000,
    });
    let config = serde_json::from_str(&config_json(targets, extra)).unwrap();
    let lb = bins.launch_env("upgrade-history", &[], config);
    // 64 clients: each is sent to the dead target first with probability 1/2 until one is
    // (and retried on the live one); all 64 missing it has probability 2^-64.
    for n in 0..64 {
        let (name, _) = which(client_ip(n), lb.addr).await.expect("served");
        assert_eq!(name, "live");
    }
    // A reload (another idle timeout), so that there is a last reload to show.
    let path = lb.dir.path("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut changed: serde_json::Value = serde_json::from_str(&text).unwrap();
    changed["idleTimeout"] = serde_json::json!(123_000);
    std::fs::write(&path, changed.to_string()).unwrap();
    lb.wait_for_line("config reloaded");

    let (before, read_before) = status(admin).await;
    let of = |s: &serde_json::Value, id: &str| {
        s["targets"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["id"] == id).cloned())
            .unwrap_or_else(|| panic!("no target {id} in {s:#}"))
    };
    assert_eq!(of(&before, "gone")["state"], "down");
    assert_eq!(of(&before, "gone")["last_failure"]["reason"], "refused");
    assert_eq!(of(&before, "drained")["state"], "draining");
    assert_eq!(before["config"]["last_reload"]["result"], "success");

    let done = bins.upgrade("a").await.expect("upgrade");
    assert!(gone(done.old_pid).await, "only the new process answers");
    let (after, read_after) = status(admin).await;
    // The second snapshot was taken between these many seconds after the first, at least and
    // at most; an age is to the millisecond in each, and the new clock goes on from the old
    // one to the millisecond.
    let least = (read_after[0] - read_before[1]).as_secs_f64() - 0.005;
    let most = (read_after[1] - read_before[0]).as_secs_f64() + 0.005;
    let same_moment = |what: &str, a: &serde_json::Value, b: &serde_json::Value| {
        let (a, b) = (a["ago_s"].as_f64(), b["ago_s"].as_f64());
        let (a, b) = (a.expect(what), b.expect(what));
        assert!(
            (least..=most).contains(&(b - a)),
            "{what}: {a} s ago, then {b} s ago, {least:.3}–{most:.3} s later"
        );
    };
    for (id, state) in [("gone", "down"), ("drained", "draining"), ("live", "up")] {
        let (a, b) = (of(&before, id), of(&after, id));
        assert_eq!(b["state"], state, "{id}");
        same_moment(&format!("{id}: since"), &a["since"], &b["since"]);
    }
    let (a, b) = (of(&before, "gone"), of(&after, "gone"));
    assert_eq!(b["last_failure"]["reason"], "refused");
    same_moment("gone: last failure", &a["last_failure"], &b["last_failure"]);
    assert_eq!(after["config"]["last_reload"]["result"], "success");
    same_moment(
        "last reload",
        &before["config"]["last_reload"],
        &after["config"]["last_reload"],
    );
    bins.stop_current().await;
}

#[test]
fn the_upgrade_command_names_exactly_one_running_process() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(BIN)
            .arg("upgrade")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    assert_eq!(run(&[]).0, Some(2), "neither --pid nor --pid-file");
    assert_eq!(run(&["--pid", "1", "--pid-file", "/x"]).0, Some(2));
    let (code, stderr) = run(&["--pid-file", "/nonexistent/stickylb.pid"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("cannot read the pid file"), "{stderr}");
    // This test's own process is no stickylb: no upgrade socket answers for it.
    let own = std::process::id().to_string();
    let (code, stderr) = run(&["--pid", &own, "--timeout", "1"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("is it a running stickylb"), "{stderr}");
}
