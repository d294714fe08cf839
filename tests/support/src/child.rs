//! Processes a test starts, each ended by its own PID when dropped ([`Process`]):
//! - the `stickylb` binary ([`Balancer`]), for tests that measure the process itself: its CPU
//!   time and resident memory from `/proc/PID/stat` and `/proc/PID/status`, its open file
//!   descriptors, its stderr lines, its signals and exit code. A file-descriptor limit can be
//!   set for the child alone (setrlimit between fork and exec), which is what
//!   `prlimit --nofile=N:N` does;
//! - a [`Backend`] in a process of its own ([`backend_process`]), for benches that keep the
//!   targets' sockets and CPU out of their own process, or kill a target with SIGKILL.
//!
//! # Which binary
//! The caller passes the binary's path, as `env!("CARGO_BIN_EXE_stickylb")`. Cargo sets that
//! variable only when it compiles the root package's integration tests and benches (not this
//! crate), and it names the very binary cargo built for them: the release one under
//! `cargo bench`, the debug one under `cargo test`, wherever `--target-dir`, `CARGO_TARGET_DIR`
//! or `--target` put it. Deriving it from `std::env::current_exe()` (`target/debug/deps/x-HASH`
//! → `target/debug/stickylb`) would rely on cargo's directory layout, which is no stable
//! interface, and breaks where test binaries run from elsewhere (test archives, coverage
//! tools' own target directories).

use std::io::{self, BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backend::{Backend, Mode};
use crate::inproc::config_text;
use crate::temp::TempDir;
use crate::PATIENCE;

/// A child process, killed (by its own PID) and reaped when dropped.
pub struct Process(pub Child);

impl Process {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running `stickylb` process, with every stderr line it wrote. Killed (by its own PID) when
/// dropped.
pub struct Balancer {
    process: Process,
    /// Where it listens: a free loopback port put in its config as `sourcePort`.
    pub addr: SocketAddr,
    /// Holds its `config.json`, which a test may rewrite to reload it.
    pub dir: TempDir,
    /// Every stderr line so far.
    lines: Arc<Mutex<Vec<String>>>,
}

impl Balancer {
    /// Starts the binary `bin` on a free loopback port with a config for `targets` plus `extra`
    /// keys, and waits for its "listening" line. `nofile`: the soft and hard RLIMIT_NOFILE of
    /// the child.
    pub fn spawn(
        bin: &str,
        tag: &str,
        targets: &[SocketAddr],
        extra: serde_json::Value,
        nofile: Option<u64>,
    ) -> Balancer {
        let config = serde_json::from_str(&config_text(targets, extra)).expect("json");
        Balancer::launch(bin, tag, &[], config, nofile)
    }

    /// As [`Balancer::spawn`], with extra command-line arguments (`demo`, `--no-watch`, ...).
    pub fn spawn_with_args(
        bin: &str,
        tag: &str,
        args: &[&str],
        targets: &[SocketAddr],
        extra: serde_json::Value,
    ) -> Balancer {
        let config = serde_json::from_str(&config_text(targets, extra)).expect("json");
        Balancer::launch(bin, tag, args, config, None)
    }

    /// Starts `bin ARGS --config DIR/config.json` with `config` (its `sourcePort` replaced by a
    /// free loopback port) and waits for its "listening" line.
    pub fn launch(
        bin: &str,
        tag: &str,
        args: &[&str],
        config: serde_json::Value,
        nofile: Option<u64>,
    ) -> Balancer {
        Balancer::try_launch(bin, tag, args, config, nofile).expect("spawn stickylb")
    }

    /// As [`Balancer::launch`], but a process that cannot be started (for example because
    /// `nofile` is above the hard limit and raising it is not permitted) is an error rather than
    /// a panic.
    pub fn try_launch(
        bin: &str,
        tag: &str,
        args: &[&str],
        config: serde_json::Value,
        nofile: Option<u64>,
    ) -> io::Result<Balancer> {
        let balancer = Balancer::start(bin, tag, args, config, nofile)?;
        balancer.wait_for_line("listening");
        Ok(balancer)
    }

    /// As [`Balancer::try_launch`], but returns as soon as the process runs, without waiting
    /// for it to listen: for a start that is meant to fail.
    pub fn start(
        bin: &str,
        tag: &str,
        args: &[&str],
        config: serde_json::Value,
        nofile: Option<u64>,
    ) -> io::Result<Balancer> {
        Balancer::start_with_env(bin, tag, args, config, nofile, &[])
    }

    /// As [`Balancer::start`], with extra environment variables (for tests that signal the
    /// process during start-up, or change what it resolves).
    pub fn start_with_env(
        bin: &str,
        tag: &str,
        args: &[&str],
        mut config: serde_json::Value,
        nofile: Option<u64>,
        env: &[(&str, &str)],
    ) -> io::Result<Balancer> {
        let dir = TempDir::new(tag);
        let port = crate::free_port();
        config["sourcePort"] = port.into();
        let path = dir.file("config.json", &config.to_string());
        let mut command = Command::new(bin);
        command
            .args(args)
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(n) = nofile {
            limit_nofile(&mut command, n);
        }
        let mut child = command.spawn()?;
        let stderr = child.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().expect("lines").push(line);
            }
        });
        Ok(Balancer {
            process: Process(child),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
            lines,
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The config file the process was started with.
    pub fn config_path(&self) -> std::path::PathBuf {
        self.dir.path("config.json")
    }

    /// Waits (bounded) for a stderr line containing `needle`.
    pub fn wait_for_line(&self, needle: &str) -> String {
        self.wait_for_any(&[needle])
    }

    /// Waits (bounded) for a stderr line containing any of `needles`; returns it.
    pub fn wait_for_any(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let found = self
                .lines()
                .into_iter()
                .find(|l| needles.iter().any(|n| l.contains(n)));
            if let Some(line) = found {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no stderr line with any of {needles:?}; saw:\n{}",
                self.lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (bounded) until `n` stderr lines contain `needle`; returns the `n`th.
    pub fn wait_for_count(&self, needle: &str, n: usize) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let found: Vec<String> = self
                .lines()
                .into_iter()
                .filter(|l| l.contains(needle))
                .collect();
            if found.len() >= n {
                return found[n - 1].clone();
            }
            assert!(
                Instant::now() < deadline,
                "fewer than {n} stderr lines with {needle:?}; saw:\n{}",
                self.lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to `limit` for the process to exit: its exit code (-1 for a signal), or `None`
    /// if it still runs.
    pub fn exit_within(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.process.0.try_wait().expect("wait") {
                return Some(status.code().unwrap_or(-1));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every stderr line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    /// Stderr lines containing `needle`.
    pub fn count_lines(&self, needle: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(needle)).count()
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child process, not yet waited for.
        assert_eq!(unsafe { libc::kill(self.pid() as i32, sig) }, 0);
    }

    /// Waits (bounded) for the process to exit and returns its exit code.
    pub fn exit_code(&mut self) -> i32 {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.process.0.try_wait().expect("wait") {
                return status.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "stickylb did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True while the process has not exited.
    pub fn alive(&mut self) -> bool {
        matches!(self.process.0.try_wait(), Ok(None))
    }

    /// User + system CPU time so far, in clock ticks (fields 14 and 15 of /proc/PID/stat).
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("stat");
        // The command name (field 2) is in parentheses and may hold spaces: count from its end.
        let rest = &stat[stat.rfind(')').expect("comm") + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // rest starts at field 3 (state): utime is field 14, stime field 15.
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
    }

    /// Resident set size in KiB (VmRSS of /proc/PID/status).
    pub fn rss_kib(&self) -> u64 {
        status_kib(self.pid(), "VmRSS:")
    }

    /// RSS in KiB once it has stopped moving: two readings `step` apart within 64 KiB (at most
    /// 50 steps).
    pub async fn settled_rss_kib(&self, step: Duration) -> u64 {
        let mut last = self.rss_kib();
        for _ in 0..50 {
            tokio::time::sleep(step).await;
            let now = self.rss_kib();
            if now.abs_diff(last) <= 64 {
                return now;
            }
            last = now;
        }
        last
    }

    /// Open file descriptors.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// A `kB` field of /proc/PID/status.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .expect("field in /proc/PID/status")
}

/// Clock ticks per second (USER_HZ) for /proc/PID/stat times.
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if n > 0 {
        n as u64
    } else {
        100
    }
}

/// The variable that makes a process started by [`backend_process`] serve its backend:
/// `NAME MODE ADDRESS`.
const BACKEND_PROCESS: &str = "STICKYLB_TESTKIT_BACKEND";

/// Runs a [`Backend`] on `addr` in a process of its own: this same executable started again,
/// whose `main` calls [`serve_backend_process_if_asked`] first. Returns once it listens.
pub fn backend_process(name: &str, mode: Mode, addr: SocketAddr) -> Process {
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .env(BACKEND_PROCESS, format!("{name} {mode:?} {addr}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn backend process");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready line");
    assert_eq!(
        line.trim(),
        "ready",
        "backend {name} on {addr} did not start"
    );
    Process(child)
}

/// The first call in the `main` of a program that uses [`backend_process`]: in a process it
/// started, serves the backend until killed (and never returns); anywhere else, returns at once.
pub fn serve_backend_process_if_asked() {
    let Ok(spec) = std::env::var(BACKEND_PROCESS) else {
        return;
    };
    let words: Vec<&str> = spec.split(' ').collect();
    let [name, mode, addr] = words[..] else {
        panic!("{BACKEND_PROCESS}={spec:?}: expected NAME MODE ADDRESS");
    };
    let mode = match mode {
        "Named" => Mode::Named,
        "Echo" => Mode::Echo,
        other => panic!("{BACKEND_PROCESS}: unknown mode {other:?}"),
    };
    let addr: SocketAddr = addr.parse().expect("backend address");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let _backend = Backend::start_on(name, mode, addr);
        println!("ready");
        let _ = std::io::stdout().flush();
        std::future::pending::<()>().await
    });
}

/// Makes `command`'s process start with `n` as its soft and hard RLIMIT_NOFILE (setrlimit
/// between fork and exec, as `prlimit --nofile=N:N` does).
pub fn limit_nofile(command: &mut Command, n: u64) {
    // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing else between
    // fork and exec.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: n as libc::rlim_t,
                rlim_max: n as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
