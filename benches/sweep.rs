//! The session sweep at a large table (issue 18, item 5): with 1,000,000 live sessions, how long
//! a sweep takes, the longest it holds one shard lock, and what it does to the time a new
//! connection spends routing (the p99 of `Balancer::route` + drop), with and without a sweep
//! running once a second beside it, as the server's sweeper does.
//!
//! The table is filled by routing a million distinct client addresses (each a session whose
//! last connection closed just now, so none expires and every sweep is a full pass: the worst
//! case). The routing thread then routes new connections of those clients for the window (the
//! session look-up and open count under the shard lock every connection pays), while another
//! thread sweeps every second, or not.
//!
//! A lock hold is timed by the wall clock, which is what a connection waiting for the shard
//! sees; on a virtual machine it also counts the time the host took the vCPU away. So every
//! sweep also says how long its thread ran (its CPU clock, `CLOCK_THREAD_CPUTIME_ID`, which
//! leaves out steal where the kernel accounts for it, as KVM guests do), how long it waited for
//! a CPU (`/proc/thread-self/schedstat`), and the rest, which is time stolen by the host (or
//! spent asleep, in a page fault's wait for example); and the longest hold is given again over
//! only the sweeps that lost no time that way.
//!
//! Run: `cargo bench --bench sweep` (about 30 s).

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use stickylb::balance::{Balancer, Shared};
use stickylb::config::Config;

const SESSIONS: u32 = 1_000_000;
const WINDOW: Duration = Duration::from_secs(5);

fn ip(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
}

fn config() -> Config {
    let targets: Vec<String> = (0..8)
        .map(|i| format!(r#"{{"host": "127.0.0.1", "port": {}}}"#, 9000 + i))
        .collect();
    let text = format!(
        r#"{{"sourcePort": 8080, "sessionExpiry": 600000, "maxSessions": 4000000, "targets": [{}]}}"#,
        targets.join(",")
    );
    Config::parse(Path::new("bench.json"), &text).expect("config")
}

/// Routes connections of the table's clients (a stride through all million, so every shard
/// is met) for `WINDOW`, each route timed; returns the times sorted. The table stays the size
/// it is, so both windows are measured against the same one.
fn route_for_a_window(balancer: &Balancer, shared: &Shared) -> Vec<Duration> {
    let mut times = Vec::with_capacity(8_000_000);
    let started = Instant::now();
    let mut n: u32 = 0;
    while started.elapsed() < WINDOW {
        let t = Instant::now();
        drop(balancer.route(shared, ip(n)));
        times.push(t.elapsed());
        n = (n + 7919) % SESSIONS;
    }
    times.sort();
    times
}

/// The calling thread's time on a CPU (its CPU clock, exact to the call) and waiting for one
/// (the second field of `/proc/thread-self/schedstat`, updated as the thread is scheduled; its
/// first field lags by up to a tick for a running thread); zero for what cannot be read.
fn thread_times() -> (Duration, Duration) {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec for the call.
    let ran = match unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) } {
        0 => Duration::new(now.tv_sec as u64, now.tv_nsec as u32),
        _ => Duration::ZERO,
    };
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let waited = text
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .map_or(Duration::ZERO, Duration::from_nanos);
    (ran, waited)
}

/// One sweep, timed: wall clock, the sweeping thread's CPU time and wait for a CPU.
struct Timed {
    took: Duration,
    ran: Duration,
    waited: Duration,
    longest_hold: Duration,
    removed: usize,
}

impl Timed {
    fn of(shared: &Shared, expiry: Duration) -> Timed {
        let (ran, waited) = thread_times();
        let t = Instant::now();
        let swept = shared.sweep_sessions(expiry);
        let took = t.elapsed();
        let (ran_after, waited_after) = thread_times();
        Timed {
            took,
            ran: ran_after.saturating_sub(ran),
            waited: waited_after.saturating_sub(waited),
            longest_hold: swept.longest_hold,
            removed: swept.removed,
        }
    }

    /// Wall time the thread neither ran nor waited for a CPU: stolen by the host (or asleep).
    fn lost(&self) -> Duration {
        self.took.saturating_sub(self.ran + self.waited)
    }

    /// Whether the sweep lost under 50 µs in all to waiting for a CPU and to [`Timed::lost`].
    fn uninterrupted(&self) -> bool {
        self.waited + self.lost() < Duration::from_micros(50)
    }

    fn line(&self) -> String {
        format!(
            "{:.1} ms (ran {:.1}, waited for a CPU {:.2}, stolen {:.2}), longest shard lock hold {:.1} µs, {} removed",
            self.took.as_secs_f64() * 1e3,
            self.ran.as_secs_f64() * 1e3,
            self.waited.as_secs_f64() * 1e3,
            self.lost().as_secs_f64() * 1e3,
            self.longest_hold.as_secs_f64() * 1e6,
            self.removed
        )
    }
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q) as usize]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let _guard = runtime.enter();
    let shared = Shared::new();
    let balancer = Balancer::new(config(), &shared);
    let filled = Instant::now();
    for n in 0..SESSIONS {
        drop(balancer.route(&shared, ip(n)));
    }
    println!(
        "sweep at {} sessions ({:.1} s to fill)",
        shared.sessions(),
        filled.elapsed().as_secs_f64()
    );

    let expiry = Duration::from_secs(600);
    let mut sweeps: Vec<Timed> = (0..5).map(|_| Timed::of(&shared, expiry)).collect();
    for sweep in &sweeps {
        println!("  one sweep: {}", sweep.line());
    }

    let quiet = route_for_a_window(&balancer, &shared);
    let sweeping = AtomicBool::new(true);
    let (with_sweep, holds) = std::thread::scope(|s| {
        let sweeper = s.spawn(|| {
            let mut holds = Vec::new();
            while sweeping.load(Ordering::Relaxed) {
                holds.push(Timed::of(&shared, expiry));
                let next = Instant::now() + Duration::from_secs(1);
                while sweeping.load(Ordering::Relaxed) && Instant::now() < next {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            holds
        });
        let times = route_for_a_window(&balancer, &shared);
        sweeping.store(false, Ordering::Relaxed);
        (times, sweeper.join().expect("sweeper"))
    });
    let longest = holds.iter().max_by_key(|t| t.longest_hold);
    println!(
        "  route + drop of a connection, {} s each, {} sessions:",
        WINDOW.as_secs(),
        shared.sessions()
    );
    for (name, times) in [("no sweep", &quiet), ("a sweep a second", &with_sweep)] {
        println!(
            "    {name:18} {} routes, p50 {:.2} µs, p99 {:.2} µs, p99.9 {:.2} µs, max {:.1} µs",
            times.len(),
            quantile(times, 0.5).as_secs_f64() * 1e6,
            quantile(times, 0.99).as_secs_f64() * 1e6,
            quantile(times, 0.999).as_secs_f64() * 1e6,
            times.last().map_or(0.0, |d| d.as_secs_f64() * 1e6)
        );
    }
    println!(
        "    p99 with sweeps / without: {:.3}; {} sweeps beside, the one with the longest hold: {}",
        quantile(&with_sweep, 0.99).as_secs_f64() / quantile(&quiet, 0.99).as_secs_f64(),
        holds.len(),
        longest.map_or_else(|| "none".to_string(), Timed::line)
    );
    sweeps.extend(holds);
    let clean: Vec<&Timed> = sweeps.iter().filter(|t| t.uninterrupted()).collect();
    println!(
        "  of all {} sweeps, {} lost under 50 µs to waiting or steal; their longest hold {:.1} µs",
        sweeps.len(),
        clean.len(),
        clean
            .iter()
            .map(|t| t.longest_hold)
            .max()
            .unwrap_or_default()
            .as_secs_f64()
            * 1e6
    );
}
