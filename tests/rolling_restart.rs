//! A rolling restart of a real Node.js cluster behind stickylb, with nothing lost (issue 14,
//! design §12): four workers, each keeping a counter per client in memory, clients from 200
//! addresses making requests the whole time. Every worker is drained (a config edit), emptied,
//! stopped, replaced, brought back by the health check and undrained; then one is killed
//! outright. The scenario is in `tests/rolling/mod.rs`; `cargo bench --bench rolling` runs it
//! with and without health checks and prints the timings.
//!
//! Asserted (no timings): with a drain, no request fails and no client of a worker still
//! running loses its state; with a kill, only requests in flight on the killed worker fail, and
//! only its clients lose their state, each once; every replacement gets clients again.

use stickylb_testkit::require_tool;
use stickylb_testkit::rolling::{self, Kind, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_with_drain_loses_nothing_and_a_kill_only_what_was_on_the_worker() {
    if !require_tool("node") {
        return;
    }
    let report = rolling::run(Options {
        checks: true,
        clients: 200,
        drains: vec![0, 1, 2, 3],
        kill: Some(2),
        stop_at_first_zero: false,
        return_patience: std::time::Duration::from_secs(30),
    })
    .await;
    for line in report.lines("checks on") {
        println!("{line}");
    }

    assert!(
        report.violations.is_empty(),
        "a client's state was on two workers at once, or lost twice: {:#?}",
        &report.violations[..report.violations.len().min(10)]
    );
    let during_drains = report.failures_during(Kind::Drain);
    assert!(
        during_drains.is_empty(),
        "{} requests failed while workers were drained and replaced: {:#?}",
        during_drains.len(),
        &during_drains[..during_drains.len().min(10)]
    );
    let unexplained = report.failures_unexplained();
    assert!(
        unexplained.is_empty(),
        "{} requests failed that were not in flight on the killed worker: {:#?}",
        unexplained.len(),
        &unexplained[..unexplained.len().min(10)]
    );
    let lost = report.lost_unexplained();
    assert!(
        lost.is_empty(),
        "{} visits lost their state on a worker that was still running: {:#?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    // Draining waited until no client had a session on the worker: nobody's state was on it.
    let drained = report.lost_in(Kind::Drain);
    assert!(drained.is_empty(), "lost on a drained worker: {drained:#?}");
    assert_eq!(report.rolls.len(), 5);
    assert!(
        report.returns.iter().all(Option::is_some),
        "a replacement never answered a client: {:?}",
        report.returns
    );
    assert!(report.requests > 2000, "{} requests", report.requests);
}
