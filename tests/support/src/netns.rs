//! Tests that need many IPv6 client addresses, run in a network namespace of their own.
//!
//! IPv6 loopback is `::1/128` alone: unlike `127.0.0.0/8`, there is no range of loopback
//! addresses a client can bind. Linux can make a whole prefix local (AnyIP): with
//! `ip -6 route add local 2001:db8:16::/48 dev lo`, every address of the prefix is delivered
//! to the host, and with `net.ipv6.ip_nonlocal_bind = 1` a socket may bind any of them. Doing
//! that on the machine itself would change its routing table while the test runs (and leave it
//! changed if the test died), so a test does it in a new, empty network namespace instead:
//!
//! 1. the test, started by `cargo test` as usual, runs its own test binary again, filtered to
//!    itself (`--exact NAME`), under `unshare --net` (plus `--map-root-user` when not root,
//!    which works where unprivileged user namespaces are allowed) and a small `sh` script that
//!    brings `lo` up, adds the AnyIP route for `2001:db8:16::/48` (a documentation prefix,
//!    RFC 3849) and sets `ip_nonlocal_bind`, all inside the namespace;
//! 2. that second run sees `STICKYLB_NETNS_TEST=NAME`, runs the body (backends, balancer and
//!    clients all inside the namespace, over real TCP), and prints a line saying it passed;
//! 3. the first run waits for it (bounded), and passes only if that line is there and the exit
//!    status is 0; otherwise it fails with everything the second run printed.
//!
//! The namespace disappears with the process: nothing on the machine changes, and nothing is
//! left behind whatever happens. When no namespace can be made (no `unshare` or `ip`, no root
//! and no user namespaces), the test says so on one line and passes as skipped, unless
//! `STICKYLB_REQUIRE_TOOLS=1` is set (as `.ci/run` does), in which case it fails with the
//! reason.

use std::io::Read;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The prefix the namespace makes local: `2001:db8:16::/48`. Tests build client addresses in
/// it with [`addr`].
pub const PREFIX: &str = "2001:db8:16::/48";

/// The environment variable that tells the second run which test it is.
const INNER: &str = "STICKYLB_NETNS_TEST";
/// Printed by the second run after the body returned.
const PASSED: &str = "stickylb-netns-test-passed";
/// Printed by the namespace set-up script before it starts the second run.
const READY: &str = "stickylb-netns-ready";

/// `2001:db8:16:<subnet>::/64` plus `interface` in its low 64 bits.
pub fn addr(subnet: u16, interface: u64) -> Ipv6Addr {
    Ipv6Addr::from(
        (0x2001_0db8_0016u128 << 80) | (u128::from(subnet) << 64) | u128::from(interface),
    )
}

/// Connects to `to` from `from` (any address of [`PREFIX`], inside the namespace).
pub async fn connect_from_v6(
    from: Ipv6Addr,
    to: SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v6()?;
    socket.bind(SocketAddr::new(IpAddr::V6(from), 0))?;
    socket.connect(to).await
}

/// Runs `body` inside a new network namespace where [`PREFIX`] is local (see the module doc).
/// `name` must be the test function's name, as `--exact` matches it.
pub fn run(name: &str, body: impl FnOnce()) {
    if std::env::var(INNER).as_deref() == Ok(name) {
        body();
        println!("{PASSED} {name}");
        return;
    }
    match outer(name) {
        Outcome::Passed => {}
        Outcome::Failed(output) => panic!("{name} failed in its network namespace:\n{output}"),
        Outcome::NoNamespace(why) => {
            let required = std::env::var("STICKYLB_REQUIRE_TOOLS").as_deref() == Ok("1");
            assert!(
                !required,
                "{name}: cannot make a network namespace with {PREFIX} local (needs `unshare` \
                 and `ip`, and root or unprivileged user namespaces), and \
                 STICKYLB_REQUIRE_TOOLS=1 is set: {why}"
            );
            eprintln!(
                "SKIPPED {name}: cannot make a network namespace with {PREFIX} local (needs \
                 `unshare` and `ip`, and root or unprivileged user namespaces): {why}"
            );
        }
    }
}

/// Reads `pipe` to its end on a thread of its own (so neither pipe can fill up and stall the
/// child while the other is read).
fn read_all<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}

enum Outcome {
    Passed,
    Failed(String),
    NoNamespace(String),
}

fn outer(name: &str) -> Outcome {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return Outcome::NoNamespace(format!("no path to the test binary: {e}")),
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let script = format!(
        "set -e; ip link set lo up; ip -6 route add local {PREFIX} dev lo; \
         echo 1 > /proc/sys/net/ipv6/ip_nonlocal_bind; echo {READY}; exec \"$@\""
    );
    let mut command = Command::new("unshare");
    if !root {
        command.arg("--map-root-user");
    }
    command
        .args(["--net", "--", "sh", "-c", &script, "sh"])
        .arg(&exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(INNER, name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return Outcome::NoNamespace(format!("cannot run unshare: {e}")),
    };
    let stdout = read_all(child.stdout.take());
    let stderr = read_all(child.stderr.take());
    // Bounded: the body's own waits are bounded by PATIENCE each; this bounds the whole run.
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let output = format!(
        "--- stdout\n{}--- stderr\n{}",
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default()
    );
    if !output.contains(READY) {
        return Outcome::NoNamespace(output.trim().replace('\n', " | "));
    }
    match status {
        Some(status) if status.success() && output.contains(&format!("{PASSED} {name}")) => {
            Outcome::Passed
        }
        Some(status) => Outcome::Failed(format!("exit status {status}\n{output}")),
        None => Outcome::Failed(format!("still running after 120 s, killed\n{output}")),
    }
}
