//! Signals against start-up, slow reloads and the drain (design §10 and §16, issue 10 item 6):
//! a SIGHUP as early as a process can get one is never fatal; SIGTERM is obeyed while a reload
//! hangs in a name resolution; a reload asked for during the drain opens no listener. Real
//! processes, real signals.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use stickylb_testkit::*;

const BIN: &str = env!("CARGO_BIN_EXE_stickylb");
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The signals a process catches, from /proc/PID/status (`SigCgt`), if it still runs.
fn caught_signals(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mask = status.lines().find(|l| l.starts_with("SigCgt:"))?;
    u64::from_str_radix(mask.split_whitespace().nth(1)?, 16).ok()
}

fn bit(signal: i32) -> u64 {
    1 << (signal - 1)
}

fn config(targets: &[std::net::SocketAddr], extra: serde_json::Value) -> serde_json::Value {
    serde_json::from_str(&config_text(targets, extra)).expect("json")
}

/// SIGHUP sent the moment Rust's runtime is set up in the new process (it catches SIGSEGV for
/// its stack-overflow guard, before `main`): before the config is read, before any runtime or
/// handler of stickylb's own. Its default action would end the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_at_the_very_start_is_never_fatal() {
    let backend = Backend::start("a", Mode::Named).await;
    let mut survived = 0;
    for i in 0..20 {
        let mut lb = Balancer::start_with_env(
            BIN,
            "early-hup",
            &["--no-watch"],
            config(&[backend.addr], serde_json::json!({})),
            None,
            &[],
        )
        .expect("spawn");
        let deadline = Instant::now() + PATIENCE;
        loop {
            match caught_signals(lb.pid()) {
                Some(mask) if mask & bit(libc::SIGSEGV) != 0 => break,
                Some(_) => {}
                None => panic!("try {i}: the process ended before its runtime was up"),
            }
            assert!(Instant::now() < deadline, "try {i}: no runtime");
            std::thread::yield_now();
        }
        lb.signal(libc::SIGHUP);
        // Bounded wait for the process to listen, or to die.
        let deadline = Instant::now() + PATIENCE;
        while lb.count_lines("listening") == 0 {
            assert!(lb.alive(), "try {i}: killed by an early SIGHUP");
            assert!(Instant::now() < deadline, "try {i}: never listened");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (name, _) = which(client_ip(i), lb.addr).await.expect("serves");
        assert_eq!(name, "a");
        lb.signal(libc::SIGTERM);
        assert_eq!(lb.exit_code(), 0, "try {i}");
        survived += 1;
    }
    assert_eq!(survived, 20);
}

/// A getaddrinfo(3) that hangs for an hour on one name, loaded with LD_PRELOAD: a name server
/// that never answers, on loopback. It creates the file named by `SLOW_DNS_MARKER` when the
/// slow look-up begins.
const SLOW_RESOLVER: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <netdb.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int (*gai_fn)(const char *, const char *, const struct addrinfo *, struct addrinfo **);

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                struct addrinfo **res) {
    gai_fn real = (gai_fn)dlsym(RTLD_NEXT, "getaddrinfo");
    if (node != NULL && strcmp(node, "slow.stickylb.test") == 0) {
        const char *marker = getenv("SLOW_DNS_MARKER");
        if (marker != NULL) {
            int fd = open(marker, O_CREAT | O_WRONLY, 0600);
            if (fd >= 0) close(fd);
        }
        sleep(3600);
        node = "127.0.0.1";
    }
    return real(node, service, hints, res);
}
"#;

/// Builds the slow resolver as a shared library in `dir` (with the system's C compiler).
fn slow_resolver(dir: &Path) -> std::path::PathBuf {
    let source = dir.join("slowdns.c");
    let library = dir.join("libslowdns.so");
    std::fs::write(&source, SLOW_RESOLVER).unwrap();
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&library)
        .arg(&source)
        .arg("-ldl")
        .output()
        .expect("a C compiler (cc)");
    assert!(
        out.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    library
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_reload_stuck_in_name_resolution_exits_at_once() {
    let backend = Backend::start("a", Mode::Named).await;
    let build = TempDir::new("slowdns");
    let library = slow_resolver(&build.path(""));
    let marker = build.path("resolving");
    let mut lb = Balancer::start_with_env(
        BIN,
        "slow-reload",
        &["--no-watch"],
        config(&[backend.addr], serde_json::json!({})),
        None,
        &[
            ("LD_PRELOAD", library.to_str().unwrap()),
            ("SLOW_DNS_MARKER", marker.to_str().unwrap()),
        ],
    )
    .expect("spawn");
    lb.wait_for_line("listening");
    let mut slow = config(&[backend.addr], serde_json::json!({}));
    slow["sourcePort"] = lb.addr.port().into();
    slow["targets"] = serde_json::json!([{"host": "slow.stickylb.test", "port": 9}]);
    std::fs::write(lb.config_path(), slow.to_string()).unwrap();
    lb.signal(libc::SIGHUP);
    // Bounded wait until the reload hangs in the look-up.
    let deadline = Instant::now() + PATIENCE;
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "the reload never resolved the name"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The process still serves, with its running config.
    assert_eq!(which(client_ip(1), lb.addr).await.unwrap().0, "a");
    let stopped = Instant::now();
    lb.signal(libc::SIGTERM);
    // The look-up sleeps for an hour: an exit within PATIENCE means SIGTERM did not wait.
    let code = lb.exit_within(PATIENCE);
    eprintln!(
        "SIGTERM during a stuck reload: exit {code:?} after {:?}",
        stopped.elapsed()
    );
    assert_eq!(code, Some(0), "{}", lb.lines().join("\n"));
}

/// After SIGTERM, neither a file change nor SIGHUP reloads: a reload that moves the listener
/// would start accepting again on the new port during the drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_asked_for_during_the_drain_opens_no_listener() {
    let backend = Backend::start("echo", Mode::Echo).await;
    let mut lb = Balancer::spawn_with_args(
        BIN,
        "drain-reload",
        &[],
        &[backend.addr],
        serde_json::json!({"shutdownTimeout": 600000}),
    );
    // One open connection keeps the drain going.
    let mut held = connect_from(client_ip(1), lb.addr).await.unwrap();
    held.write_all(b"x").await.unwrap();
    let mut echo = [0u8; 1];
    held.read_exact(&mut echo).await.unwrap();
    lb.signal(libc::SIGTERM);
    lb.wait_for_line("draining");

    let moved = dead_port();
    let mut next = config(&[backend.addr], serde_json::json!({}));
    next["sourcePort"] = moved.port().into();
    std::fs::write(lb.config_path(), next.to_string()).unwrap();
    lb.signal(libc::SIGHUP);
    let line = lb.wait_for_any(&["SIGHUP ignored", "listener moved"]);
    assert!(line.contains("SIGHUP ignored"), "{line}");
    assert!(
        tokio::net::TcpStream::connect(moved).await.is_err(),
        "nothing listens on the new port during the drain"
    );
    assert_eq!(
        lb.count_lines("listener moved"),
        0,
        "{}",
        lb.lines().join("\n")
    );
    // The held connection still flows.
    held.write_all(b"y").await.unwrap();
    held.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"y");
    lb.signal(libc::SIGINT);
    assert_eq!(lb.exit_code(), 1, "second signal: exit at once");
}
