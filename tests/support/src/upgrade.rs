//! Upgrades under load (issue 15): the scenario that `tests/upgrade.rs` asserts on at a small
//! scale and `benches/upgrade.rs` measures at full scale.
//!
//! [`run`]: a balancer started from a copy of the binary at a path of its own, two named echo
//! targets, and, all the while:
//! - long-lived connections that stream both ways (a chunk of a byte pattern, its echo checked
//!   byte for byte, every tick) and idle ones that say nothing until the end;
//! - short connections (connect, name, one echoed byte, close) from rotating addresses;
//! - a scraper that reads `/metrics` every 50 ms and notes every counter that went down and
//!   every scrape that failed;
//! - a client pinned away from its hash target: its target failed once, it moved, the target
//!   came back, and its session keeps it on the other one.
//!
//! Meanwhile the binary's path is replaced, alternately, by a wrapper that sets
//! `STICKYLB_BUILD_TAG=b` or `=a` and execs the real binary (so two builds differ in
//! `build_info`, and each upgrade proves the path is read again), and `stickylb upgrade
//! --pid-file` is run. After each upgrade: the pid file names the new process, `build_info`
//! its version, the pinned client is still where its session put it, and the old process is
//! gone. At the end every long-lived and idle connection must still be whole.
//!
//! [`timing`]: many idle connections through a balancer, and the time from the signal to the
//! new process serving at that scale.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::backend::{Backend, Mode};
use crate::child::Balancer;
use crate::client::{client_ip, connect_from, name_of, open_many, which};
use crate::inproc::config_text;
use crate::metrics::{scrape, Scrape};
use crate::pattern::Pattern;
use crate::temp::TempDir;
use crate::PATIENCE;

/// The size of one run.
#[derive(Debug, Clone)]
pub struct Options {
    pub long_lived: u32,
    pub idle: u32,
    pub upgrades: u32,
    /// Short connections in flight at once.
    pub short_parallel: u32,
    /// What each long-lived connection sends (and gets back) per tick.
    pub chunk: usize,
    pub tick: Duration,
    /// How long the load runs before the first upgrade, between two, and after the last.
    pub interval: Duration,
}

/// One upgrade as measured.
#[derive(Debug, Clone)]
pub struct Upgrade {
    /// The version `build_info` showed after it.
    pub version: String,
    pub old_pid: u32,
    pub new_pid: u32,
    /// From the signal to the commit (the new process accepting and relaying), as the old
    /// process measured it and `stickylb upgrade` printed it.
    pub signal_to_serving_ms: u64,
    /// The `stickylb upgrade` command's own run time (start, connect, signal, outcome).
    pub command_ms: u64,
    /// From the old process's log line: from the signal to the new process's `prepared`
    /// (started, config loaded, listeners taken), the collection of the connections, the
    /// longest a handed-over connection stood still, and how long no process accepted.
    pub prepare_ms: Option<u64>,
    pub collect_ms: Option<u64>,
    pub still_ms: Option<u64>,
    pub no_accept_ms: Option<u64>,
}

impl Upgrade {
    /// Fills in the figures the old process logged (its line names the new pid).
    async fn read_log(&mut self, lb: &Balancer) {
        let pid = format!("pid={}", self.new_pid);
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            let line = lb
                .lines()
                .into_iter()
                .find(|l| l.contains(&pid) && l.contains("still_ms="));
            if let Some(line) = line {
                let field = |name: &str| {
                    line.split_whitespace()
                        .find_map(|w| w.strip_prefix(name)?.parse().ok())
                };
                self.prepare_ms = field("prepare_ms=");
                self.collect_ms = field("collect_ms=");
                self.still_ms = field("still_ms=");
                self.no_accept_ms = field("no_accept_ms=");
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// What a run saw.
#[derive(Debug, Default)]
pub struct Report {
    pub upgrades: Vec<Upgrade>,
    /// Upgrades that did not take over, with the command's output.
    pub upgrade_failures: Vec<String>,
    pub short_ok: u64,
    pub short_failed: u64,
    /// The first few short-connection failures.
    pub short_failures: Vec<String>,
    /// Long-lived connections that ended early or saw a wrong byte, and why.
    pub long_cut: Vec<String>,
    /// Bytes the long-lived connections got back, each checked.
    pub long_bytes: u64,
    pub idle_cut: Vec<String>,
    /// Upgrades after which the pinned client was not on its session's target.
    pub pinned_moved: Vec<String>,
    /// Counters that went down from one scrape to the next.
    pub backwards: Vec<String>,
    pub scrapes: u64,
    /// Scrapes that failed (refused, no answer).
    pub scrape_failures: Vec<String>,
    /// Upgrades after which `build_info`, the pid file or the old process were not as they
    /// should be.
    pub wrong: Vec<String>,
}

/// A run of the whole scenario with `bin` (the stickylb binary).
pub async fn run(bin: &str, options: &Options) -> Report {
    let bins = Binaries::new(bin, "upgrade-bins");
    let mut a = Backend::start("A", Mode::Named).await;
    let b = Backend::start("B", Mode::Named).await;
    let metrics_port = crate::free_port();
    let metrics = SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let config = serde_json::from_str(&config_text(
        &[a.addr, b.addr],
        serde_json::json!({
            "metricsPort": metrics_port,
            // A failed target comes back after a second; the session keeps its moved clients.
            "targetDeactivationDuration": 1000,
            "sessionExpiry": 3_600_000,
        }),
    ))
    .expect("json");
    let lb = bins.launch("upgrade", config);
    let lb_addr = lb.addr;
    let mut report = Report::default();

    // A client whose hash target is A, moved to B by A's failure, kept there by its session;
    // and a witness that A takes clients again.
    let mut on_a = Vec::new();
    for n in 0..400 {
        let ip = client_ip(60_000 + n);
        if which(ip, lb_addr).await.expect("mapping").0 == "A" {
            on_a.push(ip);
            if on_a.len() == 2 {
                break;
            }
        }
    }
    let [pinned, witness] = on_a[..] else {
        panic!("no two clients hashed to A among 400");
    };
    a.stop().await;
    assert_eq!(which(pinned, lb_addr).await.expect("fail-over").0, "B");
    a.restart().await;
    let a_id = format!("127.0.0.1:{}", a.addr.port());
    wait_for_metric(metrics, "stickylb_target_up", &[("target", &a_id)], 1.0).await;
    assert_eq!(which(witness, lb_addr).await.expect("witness").0, "A");
    assert_eq!(which(pinned, lb_addr).await.expect("pinned").0, "B");

    // The load.
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    for i in 0..options.long_lived {
        tasks.spawn(long_lived(lb_addr, i, options.clone(), stopped.clone()));
    }
    for i in 0..options.idle {
        tasks.spawn(idle(lb_addr, options.long_lived + i, stopped.clone()));
    }
    let short = Arc::new(Short::default());
    for task in 0..options.short_parallel {
        tasks.spawn(short_loop(lb_addr, task, short.clone(), stopped.clone()));
    }
    let scraper = Arc::new(Scraper::default());
    tasks.spawn(scrape_loop(metrics, scraper.clone(), stopped.clone()));

    // The upgrades, alternating two builds, with the load running before, between and after.
    for i in 0..options.upgrades {
        tokio::time::sleep(options.interval).await;
        let tag = if i % 2 == 0 { "b" } else { "a" };
        match bins.upgrade(tag).await {
            Ok(mut upgrade) => {
                upgrade.read_log(&lb).await;
                report
                    .wrong
                    .extend(check_after(&upgrade, metrics, &bins).await);
                match which(pinned, lb_addr).await {
                    Ok((name, _)) if name == "B" => {}
                    other => report
                        .pinned_moved
                        .push(format!("after upgrade {}: {other:?}", i + 1)),
                }
                report.upgrades.push(upgrade);
            }
            Err(e) => report.upgrade_failures.push(e),
        }
    }

    tokio::time::sleep(options.interval).await;
    // The end: every connection says how it ended.
    let _ = stop.send(true);
    while let Some(outcome) = tasks.join_next().await {
        match outcome.expect("task") {
            Outcome::Long(Ok(bytes)) => report.long_bytes += bytes,
            Outcome::Long(Err(e)) => report.long_cut.push(e),
            Outcome::Idle(Err(e)) => report.idle_cut.push(e),
            Outcome::Idle(Ok(())) | Outcome::Done => {}
        }
    }
    report.short_ok = short.ok.load(Ordering::Relaxed);
    report.short_failed = short.failed.load(Ordering::Relaxed);
    report.short_failures = short.failures.lock().expect("failures").clone();
    report.scrapes = scraper.scrapes.load(Ordering::Relaxed);
    report.backwards = scraper.backwards.lock().expect("backwards").clone();
    report.scrape_failures = scraper.failures.lock().expect("failures").clone();
    bins.stop_current().await;
    drop(lb);
    report
}

/// What [`timing`] measured.
#[derive(Debug, Default)]
pub struct Timing {
    pub upgrades: Vec<Upgrade>,
    /// Connections that did not survive the upgrades, and upgrades that failed.
    pub failures: Vec<String>,
    /// New connections opened one after another during the upgrades (connect, a byte, its
    /// echo), and the longest any of them took: what a new client saw of the handovers.
    pub probes: u64,
    pub probe_max_ms: f64,
    pub probe_failures: Vec<String>,
}

/// The time from the signal to the new process serving, `upgrades` times, with `connections`
/// idle connections through the balancer to the echo target at `target`, while a probe opens
/// new connections one after another. Each connection is pinged at the end.
pub async fn timing(bin: &str, target: SocketAddr, connections: u32, upgrades: u32) -> Timing {
    let bins = Binaries::new(bin, "upgrade-timing");
    let config =
        serde_json::from_str(&config_text(&[target], serde_json::json!({}))).expect("json");
    let lb = bins.launch("upgrade-timing", config);
    let streams = open_many(lb.addr, 0, connections, true).await;
    let mut timing = Timing::default();
    let (stop, stopped) = watch::channel(false);
    let probe = tokio::spawn(probe_loop(lb.addr, connections, stopped));
    for i in 0..upgrades {
        match bins.upgrade(if i % 2 == 0 { "b" } else { "a" }).await {
            Ok(mut upgrade) => {
                upgrade.read_log(&lb).await;
                timing.upgrades.push(upgrade);
            }
            Err(e) => timing.failures.push(e),
        }
    }
    let _ = stop.send(true);
    (timing.probes, timing.probe_max_ms, timing.probe_failures) = probe.await.expect("probe task");
    for mut s in streams {
        let ping = async {
            s.write_all(b"ping\n").await?;
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await?;
            Ok::<_, std::io::Error>(buf)
        };
        match tokio::time::timeout(PATIENCE, ping).await {
            Ok(Ok(buf)) if &buf == b"ping\n" => {}
            other => timing
                .failures
                .push(format!("{:?}: {other:?}", s.local_addr())),
        }
    }
    bins.stop_current().await;
    drop(lb);
    timing
}

/// New connections one after another (from addresses after the first `skip`) until told to
/// stop: how many, the slowest in milliseconds, and the failures.
async fn probe_loop(
    lb: SocketAddr,
    skip: u32,
    stop: watch::Receiver<bool>,
) -> (u64, f64, Vec<String>) {
    let (mut n, mut max, mut failures) = (0u64, 0f64, Vec::new());
    while !*stop.borrow() {
        let ip = client_ip(skip + (n % 1000) as u32);
        n += 1;
        let started = Instant::now();
        let one = async {
            let mut s = connect_from(ip, lb).await?;
            s.write_all(b"p").await?;
            let mut buf = [0u8; 1];
            s.read_exact(&mut buf).await?;
            Ok::<_, std::io::Error>(())
        };
        match tokio::time::timeout(PATIENCE, one).await {
            Ok(Ok(())) => max = max.max(started.elapsed().as_secs_f64() * 1000.0),
            other => failures.push(format!("{ip}: {other:?}")),
        }
    }
    (n, max, failures)
}

/// The binaries of a run: the real one (a copy), the path the balancer runs from (at first
/// another copy, then whatever a test puts there), and its pid file. When dropped, the process
/// its pid file names is killed if it still runs from this run's directory: after an upgrade
/// the serving process is no child of the test, and a test that fails before
/// [`Binaries::stop_current`] would leave it running.
pub struct Binaries {
    dir: TempDir,
    bin: String,
    real: PathBuf,
    pub path: PathBuf,
    pub pid_file: PathBuf,
}

impl Drop for Binaries {
    fn drop(&mut self) {
        let Some(pid) = self.pid() else { return };
        // Only a process started from this run's directory: the pid file may be stale, and
        // its PID reused by another process since.
        let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|cmdline| {
                let dir = self.dir.path("");
                let dir = dir.to_string_lossy();
                String::from_utf8_lossy(&cmdline).contains(dir.trim_end_matches('/'))
            })
            .unwrap_or(false);
        if ours {
            // SAFETY: kill(2) of the balancer this run started (through its upgrades).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

impl Binaries {
    pub fn new(bin: &str, tag: &str) -> Binaries {
        let dir = TempDir::new(tag);
        let real = dir.path("stickylb-real");
        let path = dir.path("stickylb");
        std::fs::copy(bin, &real).expect("copy the binary");
        // The first process is the binary itself, untagged.
        std::fs::copy(bin, &path).expect("copy the binary");
        let pid_file = dir.path("stickylb.pid");
        Binaries {
            dir,
            bin: bin.to_string(),
            real,
            path,
            pid_file,
        }
    }

    /// Starts the balancer from the path, with a pid file and `env`, and waits until it
    /// listens and its pid file names it.
    pub fn launch_env(
        &self,
        tag: &str,
        env: &[(&str, &str)],
        config: serde_json::Value,
    ) -> Balancer {
        let path = self.path.to_str().expect("UTF-8 path");
        let pid_file = self.pid_file.to_str().expect("UTF-8 path");
        // A copy just written may still be open for writing in a child another test forked
        // meanwhile (it closes at that child's exec): executing it fails with ETXTBSY until
        // then.
        let mut tries = 0;
        let lb = loop {
            match Balancer::start_with_env(
                path,
                tag,
                &["--pid-file", pid_file],
                config.clone(),
                None,
                env,
            ) {
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => break other.expect("spawn stickylb"),
            }
        };
        lb.wait_for_line("listening");
        // The pid file is written just after the listeners are up (`cli.rs`), with no log line
        // of its own: a test that reads it right after "listening" could find none. Bounded.
        let deadline = Instant::now() + PATIENCE;
        while self.pid() != Some(lb.pid()) {
            assert!(
                Instant::now() < deadline,
                "the pid file {} never named process {}",
                self.pid_file.display(),
                lb.pid()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        lb
    }

    fn launch(&self, tag: &str, config: serde_json::Value) -> Balancer {
        self.launch_env(tag, &[], config)
    }

    /// Puts `text` at the path, with `mode` (atomically: written beside it, then renamed over
    /// it, as a package manager replaces a binary).
    pub fn replace(&self, text: &str, mode: u32) {
        let tmp = self.dir.file("stickylb.next", text);
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).expect("chmod");
        std::fs::rename(&tmp, &self.path).expect("replace the binary");
    }

    /// Puts at the path a wrapper that runs `before` (shell commands), then the real binary
    /// as build `tag` (`STICKYLB_BUILD_TAG`).
    pub fn replace_with_build(&self, tag: &str, before: &str) {
        self.replace(
            &format!(
                "#!/bin/sh\n{before}\nSTICKYLB_BUILD_TAG={tag} exec {} \"$@\"\n",
                self.real.display()
            ),
            0o755,
        );
    }

    /// Runs `stickylb upgrade --pid-file` (the real binary) to the end.
    pub async fn upgrade_command(&self) -> std::process::Output {
        let (bin, pid_file) = (self.bin.clone(), self.pid_file.clone());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(bin)
                .arg("upgrade")
                .arg("--pid-file")
                .arg(pid_file)
                .output()
        })
        .await
        .expect("upgrade command")
        .expect("run stickylb upgrade")
    }

    /// Upgrades to build `tag` of the real binary: replaces the path, runs the command, and
    /// reads the outcome it printed.
    pub async fn upgrade(&self, tag: &str) -> Result<Upgrade, String> {
        self.replace_with_build(tag, "");
        let old_pid = self.pid().ok_or("no pid file")?;
        let started = Instant::now();
        let output = self.upgrade_command().await;
        let command_ms = started.elapsed().as_millis() as u64;
        let stdout = String::from_utf8_lossy(&output.stdout).to_string();
        if !output.status.success() {
            return Err(format!(
                "stickylb upgrade: {}: {}{}",
                output.status,
                stdout,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        // "upgraded: process N (VERSION) took over from process M, T ms after the signal"
        let words: Vec<&str> = stdout.split_whitespace().collect();
        let new_pid = words
            .iter()
            .position(|w| *w == "process")
            .and_then(|i| words.get(i + 1)?.parse().ok())
            .ok_or_else(|| format!("unexpected output {stdout:?}"))?;
        let ms = words
            .iter()
            .position(|w| *w == "ms")
            .and_then(|i| words.get(i.checked_sub(1)?)?.parse().ok())
            .ok_or_else(|| format!("unexpected output {stdout:?}"))?;
        // The new process writes the pid file once it serves: the next upgrade reads it.
        let deadline = Instant::now() + PATIENCE;
        while self.pid() != Some(new_pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(Upgrade {
            version: format!("{}+{tag}", env_version(&self.bin)),
            old_pid,
            new_pid,
            signal_to_serving_ms: ms,
            command_ms,
            prepare_ms: None,
            collect_ms: None,
            still_ms: None,
            no_accept_ms: None,
        })
    }

    /// The pid in the pid file.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Stops the process serving now (SIGTERM, by the pid in the pid file) and waits until it
    /// is gone.
    pub async fn stop_current(&self) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) of the balancer this run started (through its upgrades).
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            gone(pid).await;
        }
    }
}

/// The crate version of `bin` (`stickylb --version`: "stickylb 0.1.0").
fn env_version(bin: &str) -> String {
    let out = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .expect("stickylb --version");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

/// After an upgrade: the pid file names the new process, `build_info` its version, and the
/// old process is gone.
async fn check_after(upgrade: &Upgrade, metrics: SocketAddr, bins: &Binaries) -> Vec<String> {
    let mut wrong = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while bins.pid() != Some(upgrade.new_pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if bins.pid() != Some(upgrade.new_pid) {
        wrong.push(format!(
            "pid file {:?}, not {}",
            bins.pid(),
            upgrade.new_pid
        ));
    }
    match scrape(metrics).await {
        Ok(s) if s.version().as_deref() == Some(upgrade.version.as_str()) => {}
        Ok(s) => wrong.push(format!(
            "build_info {:?} after the upgrade to {}",
            s.version(),
            upgrade.version
        )),
        Err(e) => wrong.push(format!("scrape after the upgrade: {e}")),
    }
    if !gone(upgrade.old_pid).await {
        wrong.push(format!("old process {} still running", upgrade.old_pid));
    }
    wrong
}

/// Waits (bounded) until process `pid` has exited; true if it has. A zombie (exited, not yet
/// reaped by whoever adopted it) counts as gone.
pub async fn gone(pid: u32) -> bool {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.chars().next()));
        if matches!(state, None | Some(Some('Z')) | Some(Some('X'))) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (bounded) until the series `name{labels}` reads `want`.
async fn wait_for_metric(metrics: SocketAddr, name: &str, labels: &[(&str, &str)], want: f64) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(s) = scrape(metrics).await {
            if s.value(name, labels) == Some(want) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} never read {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

enum Outcome {
    /// Bytes checked, or how it was cut.
    Long(Result<u64, String>),
    Idle(Result<(), String>),
    Done,
}

/// A connection that streams both ways until told to stop: a chunk of its pattern each tick,
/// the echo checked byte for byte; then a half-close and the rest of the echo to EOF.
async fn long_lived(
    lb: SocketAddr,
    i: u32,
    options: Options,
    mut stop: watch::Receiver<bool>,
) -> Outcome {
    let ip = client_ip(i);
    let result = async {
        let stream = connect_from(ip, lb)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (_, stream) = name_of(stream).await.map_err(|e| format!("name: {e}"))?;
        let (mut r, mut w) = stream.into_split();
        let (mut out, mut back) = (Pattern::new(u64::from(i)), Pattern::new(u64::from(i)));
        let mut chunk = vec![0u8; options.chunk];
        let mut got = vec![0u8; options.chunk];
        let mut want = vec![0u8; options.chunk];
        let mut bytes = 0u64;
        while !*stop.borrow() {
            out.fill(&mut chunk);
            w.write_all(&chunk)
                .await
                .map_err(|e| format!("write after {bytes}: {e}"))?;
            tokio::time::timeout(PATIENCE, r.read_exact(&mut got))
                .await
                .map_err(|_| format!("no echo after {bytes}"))?
                .map_err(|e| format!("read after {bytes}: {e}"))?;
            back.fill(&mut want);
            if got != want {
                return Err(format!("wrong bytes after {bytes}"));
            }
            bytes += chunk.len() as u64;
            tokio::select! {
                _ = tokio::time::sleep(options.tick) => {}
                _ = stop.changed() => {}
            }
        }
        w.shutdown().await.map_err(|e| format!("half-close: {e}"))?;
        let mut rest = Vec::new();
        tokio::time::timeout(PATIENCE, r.read_to_end(&mut rest))
            .await
            .map_err(|_| "no EOF".to_string())?
            .map_err(|e| format!("end: {e}"))?;
        if !rest.is_empty() {
            return Err(format!("{} bytes after the last echo", rest.len()));
        }
        Ok(bytes)
    };
    Outcome::Long(result.await.map_err(|e| format!("{ip}: {e}")))
}

/// A connection that says nothing until told to stop, then is checked to be alive (an echo)
/// and closed cleanly.
async fn idle(lb: SocketAddr, i: u32, mut stop: watch::Receiver<bool>) -> Outcome {
    let ip = client_ip(i);
    let result = async {
        let stream = connect_from(ip, lb)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (_, mut stream) = name_of(stream).await.map_err(|e| format!("name: {e}"))?;
        let _ = stop.wait_for(|s| *s).await;
        stream
            .write_all(b"ping\n")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = [0u8; 5];
        tokio::time::timeout(PATIENCE, stream.read_exact(&mut buf))
            .await
            .map_err(|_| "no echo".to_string())?
            .map_err(|e| format!("read: {e}"))?;
        if &buf != b"ping\n" {
            return Err(format!("echo {buf:?}"));
        }
        stream
            .shutdown()
            .await
            .map_err(|e| format!("half-close: {e}"))?;
        let mut rest = Vec::new();
        tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest))
            .await
            .map_err(|_| "no EOF".to_string())?
            .map_err(|e| format!("end: {e}"))?;
        Ok(())
    };
    Outcome::Idle(result.await.map_err(|e: String| format!("{ip}: {e}")))
}

/// Short-connection counts.
#[derive(Default)]
struct Short {
    ok: AtomicU64,
    failed: AtomicU64,
    failures: Mutex<Vec<String>>,
}

/// Short connections one after the other from rotating addresses until told to stop.
async fn short_loop(
    lb: SocketAddr,
    task: u32,
    short: Arc<Short>,
    stop: watch::Receiver<bool>,
) -> Outcome {
    let mut n = 0u32;
    while !*stop.borrow() {
        let ip: Ipv4Addr = client_ip(100_000 + task * 10_000 + n % 10_000);
        n += 1;
        let one = async {
            let stream = connect_from(ip, lb)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let (_, mut stream) = name_of(stream).await.map_err(|e| format!("name: {e}"))?;
            stream
                .write_all(b"x")
                .await
                .map_err(|e| format!("write: {e}"))?;
            let mut buf = [0u8; 1];
            stream
                .read_exact(&mut buf)
                .await
                .map_err(|e| format!("read: {e}"))?;
            Ok::<_, String>(())
        };
        match tokio::time::timeout(PATIENCE, one).await {
            Ok(Ok(())) => {
                short.ok.fetch_add(1, Ordering::Relaxed);
            }
            other => {
                short.failed.fetch_add(1, Ordering::Relaxed);
                let mut failures = short.failures.lock().expect("failures");
                if failures.len() < 10 {
                    failures.push(format!("{ip}: {other:?}"));
                }
            }
        }
    }
    Outcome::Done
}

/// Scrape results.
#[derive(Default)]
struct Scraper {
    scrapes: AtomicU64,
    backwards: Mutex<Vec<String>>,
    failures: Mutex<Vec<String>>,
}

/// Scrapes every 50 ms until told to stop, comparing each scrape with the one before.
async fn scrape_loop(
    metrics: SocketAddr,
    scraper: Arc<Scraper>,
    mut stop: watch::Receiver<bool>,
) -> Outcome {
    let mut last: Option<Scrape> = None;
    while !*stop.borrow() {
        match scrape(metrics).await {
            Ok(now) => {
                scraper.scrapes.fetch_add(1, Ordering::Relaxed);
                if let Some(before) = &last {
                    scraper
                        .backwards
                        .lock()
                        .expect("backwards")
                        .extend(now.backwards_since(before));
                }
                last = Some(now);
            }
            Err(e) => scraper
                .failures
                .lock()
                .expect("failures")
                .push(e.to_string()),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = stop.changed() => {}
        }
    }
    Outcome::Done
}

impl Report {
    /// The upgrades' signal-to-serving times, sorted.
    pub fn serving_ms(&self) -> Vec<u64> {
        let mut ms: Vec<u64> = self
            .upgrades
            .iter()
            .map(|u| u.signal_to_serving_ms)
            .collect();
        ms.sort_unstable();
        ms
    }
}
