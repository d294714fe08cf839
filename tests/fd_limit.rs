//! Out of file descriptors (design §8, issue 6): the binary runs with `RLIMIT_NOFILE` 256:256
//! (what `prlimit --nofile=256:256 stickylb` does) and 400 clients from 400 addresses flood
//! it, beyond what the limit allows. Two variants:
//! - `maxConnections` left at 0: derived from the limit ((256 − 128) / 2 = 64), so the
//!   balancer refuses the excess itself and never runs out;
//! - `maxConnections` 10,000: nothing stops it before the kernel does, so accept(2), socket(2)
//!   and pipe2(2) really fail with EMFILE.
//!
//! Either way the process stays up, does not spin a core while the flood holds its sockets
//! (CPU time from /proc/PID/stat over a quiet 2 s: a liveness bound, far from any performance
//! figure), the connections opened before the flood keep flowing byte for byte, and new
//! connections are served again once the flood lets go.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use stickylb_testkit::child::ticks_per_second;
use stickylb_testkit::*;
use tokio::task::JoinSet;

const BIN: &str = env!("CARGO_BIN_EXE_stickylb");

const NOFILE: u64 = 256;
const HELD: u32 = 8;
const FLOOD: u32 = 400;
const QUIET: Duration = Duration::from_secs(2);

/// What one flood run measured.
struct Flood {
    /// Flood connects that returned success; the others were refused with a reset so fast that
    /// connect(2) itself reported it.
    connected: usize,
    /// CPU time the balancer used over [`QUIET`] while the flood held its sockets, as a
    /// fraction of one core.
    cpu_share: f64,
    /// The balancer's open descriptors while the flood held its sockets.
    fds_during: usize,
    /// Connections the backend had accepted while the flood held its sockets (the held ones
    /// included): what the balancer proxied.
    proxied_during: usize,
}

impl Flood {
    /// One line for the test log: what the flood did to a balancer run with `setting`.
    fn report(&self, setting: &str, lb: &Balancer) {
        eprintln!(
            "{setting}, nofile {NOFILE}: {} of {FLOOD} flood connects completed, \
             the rest reset at once; {} proxied; CPU over the quiet {QUIET:?}: {:.1}% of a core; \
             {} fds open; EMFILE log lines: accept {}, connect {}",
            self.connected,
            self.proxied_during,
            self.cpu_share * 100.0,
            self.fds_during,
            lb.count_lines("out of file descriptors"),
            lb.count_lines("Too many open files")
        );
    }
}

async fn flood_then_recover(lb: &mut Balancer, backend: &Backend) -> Flood {
    let addr = lb.addr;
    // Connections opened before the flood.
    let mut held = Vec::new();
    for i in 0..HELD {
        held.push(
            served(client_ip(i), addr)
                .await
                .expect("served before the flood"),
        );
    }

    // The flood: 400 clients from 400 addresses connect and hold their sockets without
    // sending. Those beyond the limit are refused (reset) or wait in the backlog.
    let mut connects = JoinSet::new();
    for i in 0..FLOOD {
        connects.spawn(async move {
            tokio::time::timeout(PATIENCE, connect_from(client_ip(1_000 + i), addr))
                .await
                .ok()
                .and_then(Result::ok)
        });
    }
    let mut flood = Vec::new();
    while let Some(done) = connects.join_next().await {
        if let Some(stream) = done.expect("connect task") {
            flood.push(stream);
        }
    }
    // Let the balancer get through what it can of the backlog: until its accepted count stops
    // moving, seen from outside as the backend's accept count and the balancer's descriptors
    // staying put for a while (bounded).
    let deadline = Instant::now() + PATIENCE;
    let mut last = (backend.accepted(), lb.fds());
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = (backend.accepted(), lb.fds());
        if now == last || Instant::now() > deadline {
            break;
        }
        last = now;
    }

    // Quiet period: the flood holds its sockets, nobody sends. The process must idle.
    let fds_during = lb.fds();
    let proxied_during = backend.accepted();
    let before = lb.cpu_ticks();
    let start = Instant::now();
    tokio::time::sleep(QUIET).await;
    let ticks = lb.cpu_ticks() - before;
    let cpu_share = ticks as f64 / ticks_per_second() as f64 / start.elapsed().as_secs_f64();
    assert!(lb.alive(), "the balancer survived the flood");
    assert!(
        cpu_share < 0.5,
        "the balancer used {:.0}% of a core while the flood waited: spinning",
        cpu_share * 100.0
    );

    // The connections opened before the flood still flow, byte for byte, while it holds on.
    let mut transfers = JoinSet::new();
    for (i, stream) in held.drain(..).enumerate() {
        transfers.spawn(echo_exact(stream, 77 + i as u64, 256 * 1024));
    }
    while let Some(done) = transfers.join_next().await {
        assert_eq!(done.expect("transfer"), 256 * 1024);
    }

    // The flood lets go; new clients are served again (bounded retries while the balancer
    // notices the closes and, past EMFILE, its accept backoff ends).
    let connected = flood.len();
    drop(flood);
    let deadline = Instant::now() + PATIENCE;
    let mut n = 0;
    loop {
        if served(client_ip(5_000 + n), addr).await.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never served again after the flood"
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And many at once, as many as were held before.
    let mut again = Vec::new();
    for i in 0..HELD {
        again.push(
            served(client_ip(6_000 + i), addr)
                .await
                .expect("served again"),
        );
    }
    assert!(lb.alive());
    assert_eq!(lb.count_lines("panicked"), 0, "no panic: {:?}", lb.lines());
    Flood {
        connected,
        cpu_share,
        fds_during,
        proxied_during,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_derived_limit_a_flood_is_refused_and_the_process_keeps_serving() {
    let backend = Backend::start("echo", Mode::Echo).await;
    let mut lb = Balancer::spawn(
        BIN,
        "fd-derived",
        &[backend.addr],
        serde_json::json!({}),
        Some(NOFILE),
    );
    let flood = flood_then_recover(&mut lb, &backend).await;
    flood.report("derived maxConnections", &lb);
    // The balancer refused the excess itself (rate-limited log lines say so) and never ran out.
    assert!(
        lb.count_lines("connection refused") >= 1,
        "refusals are logged: {:?}",
        lb.lines()
    );
    assert!(lb
        .lines()
        .iter()
        .any(|l| l.contains("connection refused") && l.contains("limit")));
    // (256 − 128) / 2 = 64 connections at most, the held ones included. (A burst can still
    // meet EMFILE in accept for a moment: sockets accepted only to be refused hold a descriptor
    // until their handler closes them. The accept backoff covers that.)
    let derived = stickylb::derived_max_connections(NOFILE) as usize;
    assert_eq!(derived, 64);
    assert!(
        flood.proxied_during <= derived,
        "{} proxied, over the derived limit of {derived}",
        flood.proxied_during
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_fd_limit_the_process_neither_dies_nor_spins_and_recovers() {
    let backend = Backend::start("echo", Mode::Echo).await;
    let mut lb = Balancer::spawn(
        BIN,
        "fd-emfile",
        &[backend.addr],
        serde_json::json!({"maxConnections": 10000}),
        Some(NOFILE),
    );
    let flood = flood_then_recover(&mut lb, &backend).await;
    flood.report("maxConnections 10000", &lb);
    // The process really ran out: (nearly) every descriptor it may have was in use.
    assert!(
        flood.fds_during >= NOFILE as usize - 8,
        "the flood took the process to its limit: {} of {NOFILE} descriptors open",
        flood.fds_during
    );
}

/// The target a fresh client address hashes to, of `targets` with default identities.
fn hashed(ip: std::net::Ipv4Addr, targets: &[SocketAddr]) -> usize {
    use stickylb::balance::hash::{client_key, target_seed, Table};
    let table = Table::new(
        &targets
            .iter()
            .map(|a| (target_seed(&a.to_string()), 1))
            .collect::<Vec<_>>(),
    );
    table
        .pick(client_key(ip.into()), |_| true)
        .expect("a target")
}

/// A socket(2) that fails with EMFILE is the balancer's own shortage, not a failure of the
/// target: no target may be deactivated (nor logged as failed) for it. Here the flood comes only
/// from addresses that hash to target `a`; its connects fail with EMFILE on both targets.
///
/// Such a connect is the balancer's own shortage: the client is refused (`limit`), no target is
/// deactivated, and nothing is logged per connection as a target failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_is_not_blamed_on_a_target() {
    let a = Backend::start("a", Mode::Named).await;
    let b = Backend::start("b", Mode::Named).await;
    let targets = [a.addr, b.addr];
    let lb = Balancer::spawn(
        BIN,
        "fd-blame",
        &targets,
        serde_json::json!({"maxConnections": 10000}),
        Some(NOFILE),
    );
    let mut ips = (0..20_000)
        .map(client_ip)
        .filter(|ip| hashed(*ip, &targets) == 0);
    let flood_ips: Vec<_> = ips.by_ref().take(FLOOD as usize).collect();
    let fresh: Vec<_> = ips.take(8).collect();
    let addr = lb.addr;
    let mut connects = JoinSet::new();
    for ip in flood_ips {
        connects.spawn(async move {
            tokio::time::timeout(PATIENCE, connect_from(ip, addr))
                .await
                .ok()
                .and_then(Result::ok)
        });
    }
    let mut flood = Vec::new();
    while let Some(done) = connects.join_next().await {
        flood.extend(done.expect("connect task"));
    }
    // The flood got the process to its limit: every descriptor in use, or socket(2) or
    // accept(2) failed for lack of one.
    let deadline = Instant::now() + PATIENCE;
    let at_limit = |lb: &Balancer| {
        lb.fds() >= NOFILE as usize - 8
            || lb
                .lines()
                .iter()
                .any(|l| l.contains("Too many open files") || l.contains("out of file descriptors"))
    };
    while !at_limit(&lb) {
        assert!(Instant::now() < deadline, "the flood never reached EMFILE");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(flood);
    let deadline = Instant::now() + PATIENCE;
    while which(fresh[0], addr).await.is_err() {
        assert!(Instant::now() < deadline, "never served again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for ip in &fresh {
        let (name, _) = which(*ip, addr).await.expect("served");
        assert_eq!(name, "a", "{ip} hashes to a, which never failed");
    }
    let blamed: Vec<String> = lb
        .lines()
        .into_iter()
        .filter(|l| l.contains("deactivating") && l.contains("Too many open files"))
        .collect();
    assert!(
        blamed.is_empty(),
        "{} connects that failed for lack of a descriptor deactivated their target, e.g. {}",
        blamed.len(),
        blamed[0]
    );
}
