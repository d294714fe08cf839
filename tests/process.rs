//! The binary as an operator runs it: start-up, the demo, signals and graceful shutdown, exit
//! codes. Real processes, real signals, real TCP.

use std::process::Command;
use std::time::Duration;

use stickylb_testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_stickylb");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_refuses_new_connections_and_lets_an_in_flight_transfer_finish() {
    let backend = Backend::start("echo", Mode::Echo).await;
    let mut lb =
        Balancer::spawn_with_args(BIN, "sigterm", &[], &[backend.addr], serde_json::json!({}));
    let len = 8 * 1024 * 1024;
    let stream = connect_from(client_ip(1), lb.addr).await.unwrap();
    let (mut r, mut w) = stream.into_split();
    // Half the request goes before the signal...
    let mut pattern = Pattern::new(5);
    let mut first = vec![0u8; len / 2];
    pattern.fill(&mut first);
    w.write_all(&first).await.unwrap();
    let reader = tokio::spawn(async move { check_pattern(&mut r, 5, len).await });

    lb.signal(libc::SIGTERM);
    lb.wait_for_line("draining");
    // The listener closes: a new connect is refused (bounded wait for the close to land).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tokio::net::TcpStream::connect(lb.addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "listener still accepting"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...and the rest after it: the open connection keeps flowing to the end.
    let mut second = vec![0u8; len - len / 2];
    pattern.fill(&mut second);
    w.write_all(&second).await.unwrap();
    w.shutdown().await.unwrap();
    let got = tokio::time::timeout(PATIENCE, reader)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got, len, "the in-flight transfer finished whole");
    assert_eq!(lb.exit_code(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let backend = Backend::start("echo", Mode::Echo).await;
    let mut lb = Balancer::spawn_with_args(
        BIN,
        "second-signal",
        &[],
        &[backend.addr],
        serde_json::json!({"shutdownTimeout": 600000}),
    );
    let mut held = connect_from(client_ip(2), lb.addr).await.unwrap();
    held.write_all(b"x").await.unwrap();
    let mut echo = [0u8; 1];
    held.read_exact(&mut echo).await.unwrap();
    lb.signal(libc::SIGTERM);
    lb.wait_for_line("draining");
    lb.signal(libc::SIGINT);
    assert_eq!(lb.exit_code(), 1, "cut connections: not a clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_targets_answer_with_their_names_over_http_and_raw_tcp() {
    let targets = [(); 3].map(|_| std::net::SocketAddr::from(([127, 0, 0, 1], free_port())));
    let lb = Balancer::spawn_with_args(BIN, "demo", &["demo"], &targets, serde_json::json!({}));
    let mut http = connect_from(client_ip(3), lb.addr).await.unwrap();
    http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(PATIENCE, http.read_to_string(&mut response))
        .await
        .unwrap()
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(
        response.contains("stickylb demo target 127.0.0.1:"),
        "{response}"
    );

    let mut raw = connect_from(client_ip(3), lb.addr).await.unwrap();
    let mut line = vec![0u8; 256];
    let n = tokio::time::timeout(PATIENCE, raw.read(&mut line))
        .await
        .unwrap()
        .unwrap();
    let greeting = String::from_utf8_lossy(&line[..n]).to_string();
    assert!(greeting.starts_with("stickylb demo target"), "{greeting}");
    // The same client address reaches the same target both times.
    let name = |s: &str| s.lines().last().unwrap_or_default().to_string();
    assert_eq!(name(&response), name(&greeting));
}

#[test]
fn version_help_and_usage_errors_have_the_documented_exit_codes() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("check"));
    let out = Command::new(BIN).arg("--no-such-flag").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_taken_port_is_a_startup_error_that_names_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let stderr = startup_error(&format!(
        r#"{{"sourceHost": "127.0.0.1", "sourcePort": {port}, "metricsPort": null, "targets": [{{"host": "127.0.0.1", "port": 9}}]}}"#
    ));
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
}

/// Runs the binary on a config with `text`, expects it to refuse to start (exit code 1), and
/// returns what it printed on stderr.
fn startup_error(text: &str) -> String {
    let dir = TempDir::new("startup");
    let path = dir.file("config.json", text);
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_shutdown_drains_an_open_connection() {
    let backend = Backend::start("echo", Mode::Echo).await;
    let server = start(&[backend.addr], serde_json::json!({}));
    let lb = server.local_addr();
    let mut open = connect_from(client_ip(4), lb).await.unwrap();
    open.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    open.read_exact(&mut buf).await.unwrap();
    server.stop_accepting().await;
    assert!(
        tokio::net::TcpStream::connect(lb).await.is_err(),
        "listener closed"
    );
    // Still flowing after the listener closed.
    open.write_all(b"pong").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    assert!(
        !server.drain(Duration::from_millis(50)).await,
        "one still open"
    );
    drop(open);
    assert!(server.drain(PATIENCE).await, "drained once it closed");
}

/// Started as root with `downgradeToUser`, the process binds first, then runs as that user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downgrade_to_user_drops_root_after_binding() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: cannot test dropping privileges here (CI runs as root)");
        return;
    }
    let backend = Backend::start("echo", Mode::Echo).await;
    let lb = Balancer::spawn_with_args(
        BIN,
        "downgrade",
        &[],
        &[backend.addr],
        serde_json::json!({"downgradeToUser": "nobody"}),
    );
    // `spawn` waited for the "listening" line, which comes after the switch.
    let status = std::fs::read_to_string(format!("/proc/{}/status", lb.pid())).unwrap();
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_string();
    let id = std::process::Command::new("id")
        .args(["-u", "nobody"])
        .output()
        .expect("id -u nobody");
    let nobody: u32 = String::from_utf8_lossy(&id.stdout)
        .trim()
        .parse()
        .expect("a uid");
    let uids: Vec<u32> = uid_line
        .split_whitespace()
        .skip(1)
        .map(|u| u.parse().unwrap())
        .collect();
    assert_eq!(
        uids,
        vec![nobody; 4],
        "real, effective, saved, fs uid: {uid_line}"
    );
    // Still serving after the switch.
    let mut s = connect_from(client_ip(6), lb.addr).await.unwrap();
    s.write_all(b"hi").await.unwrap();
    let mut buf = [0u8; 2];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hi");
}

#[test]
fn an_unknown_user_is_a_startup_error() {
    let port = free_port();
    let stderr = startup_error(&format!(
        r#"{{"sourceHost": "127.0.0.1", "sourcePort": {port}, "metricsPort": null, "downgradeToUser": "no-such-user-xyz", "targets": [{{"host": "127.0.0.1", "port": 9}}]}}"#
    ));
    assert!(
        stderr.contains("downgradeToUser: cannot switch to user no-such-user-xyz: no such user"),
        "the name as written: {stderr}"
    );
    assert!(!stderr.contains("Name("), "no Rust debug form: {stderr}");
}

/// `stickylb check --config` on `config` (with `nofile` as the soft and hard fd limit, if
/// given): exit code and stderr.
fn check_with(config: serde_json::Value, nofile: Option<u64>) -> (Option<i32>, String) {
    let dir = TempDir::new("check");
    let path = dir.path("config.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let mut command = Command::new(BIN);
    command.args(["check", "--config"]).arg(&path);
    if let Some(n) = nofile {
        child::limit_nofile(&mut command, n);
    }
    let out = command.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn with(extra: serde_json::Value) -> serde_json::Value {
    let mut config: serde_json::Value =
        serde_json::from_str(&config_text(&[dead_port()], extra)).unwrap();
    config["sourcePort"] = free_port().into();
    config
}

#[test]
fn downgrade_to_root_is_legal_but_warned_about() {
    for user in [serde_json::json!("root"), serde_json::json!(0)] {
        let (code, stderr) = check_with(with(serde_json::json!({"downgradeToUser": user})), None);
        assert_eq!(code, Some(0), "{stderr}");
        assert!(
            stderr.contains("warning: ") && stderr.contains("downgradeToUser: names root (uid 0)"),
            "{user}: {stderr}"
        );
    }
    let (_, stderr) = check_with(with(serde_json::json!({"downgradeToUser": "nobody"})), None);
    assert!(!stderr.contains("names root"), "{stderr}");
}

/// One client address can hold at most 65,535 connections to one listener (one per source
/// port): a `maxConnections` within that, with no per-client limit, lets one address take every
/// slot. Legal (clients behind one NAT need it), but warned about.
#[test]
fn one_address_able_to_take_every_slot_is_warned_about() {
    let warning = "maxConnectionsPerClient: 0 (unlimited) while maxConnections is";
    let (code, stderr) = check_with(with(serde_json::json!({"maxConnections": 1000})), None);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains(warning), "{stderr}");
    assert!(stderr.contains("1000 (set)"), "{stderr}");
    assert!(stderr.contains("set maxConnectionsPerClient"), "{stderr}");
    // Derived from the fd limit: (1024 - 128) / 2 = 448.
    let (_, stderr) = check_with(with(serde_json::json!({})), Some(1024));
    assert!(
        stderr.contains(&format!(
            "{warning} 448 (derived from the file descriptor limit)"
        )),
        "{stderr}"
    );
    // No warning with a per-client limit, or a limit one address cannot fill.
    for extra in [
        serde_json::json!({"maxConnections": 1000, "maxConnectionsPerClient": 50}),
        serde_json::json!({"maxConnections": 100000}),
    ] {
        let (code, stderr) = check_with(with(extra.clone()), None);
        assert_eq!(code, Some(0), "{stderr}");
        assert!(!stderr.contains(warning), "{extra}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_up_log_warns_when_one_address_can_take_every_slot() {
    let backend = Backend::start("echo", Mode::Echo).await;
    let lb = Balancer::spawn_with_args(
        BIN,
        "slots",
        &[],
        &[backend.addr],
        serde_json::json!({"maxConnections": 500}),
    );
    let line = lb.wait_for_line("maxConnectionsPerClient: 0 (unlimited)");
    assert!(
        line.contains("WARN") && line.contains("500 (set)"),
        "{line}"
    );
}

/// SIGHUP reloads (here with `--no-watch`, so the signal is the only trigger): a bad file is
/// rejected with its reason while the process keeps serving, a good one is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_a_bad_file_changes_nothing() {
    let a = Backend::start("a", Mode::Named).await;
    let b = Backend::start("b", Mode::Named).await;
    let lb = Balancer::spawn_with_args(
        BIN,
        "sighup",
        &["--no-watch"],
        &[a.addr],
        serde_json::json!({}),
    );
    assert_eq!(which(client_ip(1), lb.addr).await.unwrap().0, "a");
    let path = lb.dir.path("config.json");

    std::fs::write(&path, "{ \"sourcePort\": ").unwrap();
    lb.signal(libc::SIGHUP);
    let line = lb.wait_for_line("reload rejected");
    assert!(
        line.contains("SIGHUP") && line.contains("config.json"),
        "{line}"
    );
    assert_eq!(
        which(client_ip(2), lb.addr).await.unwrap().0,
        "a",
        "still serving"
    );

    let mut good: serde_json::Value =
        serde_json::from_str(&config_text(&[b.addr], serde_json::json!({}))).unwrap();
    good["sourcePort"] = lb.addr.port().into();
    std::fs::write(&path, good.to_string()).unwrap();
    lb.signal(libc::SIGHUP);
    let line = lb.wait_for_line("config reloaded");
    assert!(line.contains("SIGHUP"), "{line}");
    assert_eq!(which(client_ip(3), lb.addr).await.unwrap().0, "b");
}
