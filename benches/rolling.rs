//! A rolling restart of a Node.js cluster behind stickylb, with and without health checks: the
//! figures of issue 14 (requests failed, clients whose in-memory state was lost, seconds from a
//! worker listening again to its first client). The scenario is `tests/rolling/mod.rs`, the
//! same that `tests/rolling_restart.rs` asserts on.
//!
//! Runs, each on a fresh cluster and balancer, 200 client addresses:
//! 1. checks on: the four workers drained, emptied, stopped, replaced and undrained one at a
//!    time, then worker 2 killed (SIGKILL) and restarted;
//! 2. checks on, stopping each drained worker as soon as its open connections read 0 (its
//!    clients' sessions still live);
//! 3. checks off: the same as 1 (a killed worker waits out `targetDeactivationDuration`,
//!    60 s, before it gets a client again).
//!
//! Run: `cargo bench --bench rolling` (about three minutes; needs `node`).

use std::time::Duration;

use stickylb_testkit::require_tool;
use stickylb_testkit::rolling::{self, Options};

fn main() {
    if !require_tool("node") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "health check: interval {} ms, timeout {} ms, rise {}, fall {} (goal: first client within \
         interval x rise + 1 s = {:.1} s); sessionExpiry {} ms; targetDeactivationDuration 60000 ms",
        rolling::CHECK_INTERVAL.as_millis(),
        rolling::CHECK_TIMEOUT.as_millis(),
        rolling::RISE,
        rolling::FALL,
        (rolling::CHECK_INTERVAL * rolling::RISE).as_secs_f64() + 1.0,
        rolling::SESSION_EXPIRY.as_millis(),
    );
    let runs = [
        (
            "checks on",
            Options {
                checks: true,
                clients: 200,
                drains: vec![0, 1, 2, 3],
                kill: Some(2),
                stop_at_first_zero: false,
                return_patience: Duration::from_secs(30),
            },
        ),
        (
            "checks on, stop at 0 connections",
            Options {
                checks: true,
                clients: 200,
                drains: vec![0, 1, 2, 3],
                kill: None,
                stop_at_first_zero: true,
                return_patience: Duration::from_secs(30),
            },
        ),
        (
            "checks off",
            Options {
                checks: false,
                clients: 200,
                drains: vec![0, 1, 2, 3],
                kill: Some(2),
                stop_at_first_zero: false,
                return_patience: Duration::from_secs(120),
            },
        ),
    ];
    for (label, options) in runs {
        let report = runtime.block_on(rolling::run(options));
        for line in report.lines(label) {
            println!("{line}");
        }
    }
}
