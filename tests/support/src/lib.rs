//! The test kit: the helpers stickylb's black-box tests (`tests/*.rs`) and benches
//! (`benches/*.rs`) share, one helper per job. Everything is real TCP over loopback; nothing is
//! mocked.
//!
//! # Layout
//! - [`client`]: clients, each from its own 127.x.y.z address, and what they see: which target
//!   answered, an echoed line, a refusal; many connections at once, and bytes offered on them.
//! - [`backend`]: targets on loopback: named or echoing [`Backend`]s that stop and restart on
//!   the same port, a [`Sink`] that never reads, [`dead_port`]s.
//! - [`pattern`]: a deterministic generator ([`Rng`]) and the byte [`Pattern`] made from it, so
//!   a transfer is checked byte for byte without keeping a copy of what was sent.
//! - [`http`]: one HTTP/1.1 request to the admin endpoint, and its raw answer.
//! - [`inproc`]: balancers started in the test's own runtime on `127.0.0.1:0`, and the JSON of
//!   their configs.
//! - [`metrics`]: scrapes of `/metrics`: one series' value, `build_info`'s version, and the
//!   counters that went down between two scrapes.
//! - [`child`]: processes a test starts and ends by their PID: the `stickylb` binary
//!   ([`Balancer`], with its stderr lines, CPU time, memory and descriptors), and a
//!   [`Backend`] in a process of its own.
//! - [`population`]: a skewed client population (a hot NAT address, a Zipf-like tail) and the
//!   figures of how it spreads, shared by `tests/populations.rs` and `benches/populations.rs`.
//! - [`netns`]: tests that need many IPv6 client addresses, run again in a network namespace
//!   of their own where a whole documentation prefix is local.
//! - [`rolling`]: a rolling restart of a Node.js cluster behind stickylb, the scenario that
//!   `tests/rolling_restart.rs` asserts on and `benches/rolling.rs` measures.
//! - [`browser`]: a headless Chromium driven over the DevTools protocol on a pipe, for the
//!   status page: load a page, read its DOM after its scripts ran, take a screenshot.
//! - [`upgrade`]: upgrades of stickylb itself under load (long-lived, idle and short
//!   connections, a pinned client, a scraper), the scenario that `tests/upgrade.rs` asserts on
//!   and `benches/upgrade.rs` measures.
//! - [`temp`]: temporary directories, removed on drop.
//! - [`tools`]: outside tools a test runs (promtool, prometheus, ...): required under
//!   `scripts/test`, skipped with a line that says so under a plain `cargo test`.
//! - here: [`PATIENCE`], the bound of every wait, and [`env_or`], a bench's settings.
//!
//! # Why a crate
//! Each test file is its own binary and uses only part of the kit. As a module compiled into
//! every test (`mod support;`), the unused part was dead code in each of them and had to be
//! allowed as such; as a library its items are public, so nothing is dead and no allowance
//! hides what really is. Tests and benches `use stickylb_testkit::*` (or name what they use).

use std::str::FromStr;
use std::time::Duration;

pub mod backend;
pub mod browser;
pub mod child;
pub mod client;
pub mod http;
pub mod inproc;
pub mod metrics;
pub mod netns;
pub mod pattern;
pub mod population;
pub mod rolling;
pub mod temp;
pub mod tools;
pub mod upgrade;

pub use backend::{dead_port, free_port, Backend, Mode, Sink};
pub use browser::Browser;
pub use child::{
    backend_process, limit_nofile, serve_backend_process_if_asked, status_kib, Balancer, Process,
};
pub use client::{
    assert_same_mapping, client_ip, connect_from, echo_once, first_read, mapping, name_of, offer,
    open_many, served, slowloris, which, ECHO_REQUEST,
};
pub use http::{http_request, HttpResponse};
pub use inproc::{
    config, config_json, config_text, start, start_at, start_from_file, target_json, wait_drained,
};
pub use pattern::{check_pattern, echo_exact, send_pattern, Pattern, Rng};
pub use temp::TempDir;
pub use tools::{require_root, require_tool};

/// Upper bound for any single wait in a test: a liveness bound, not a performance assertion.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A setting from the environment (a bench's `STICKYLB_SOAK_SECS`, `BENCH_ROUNDS`, ...): its
/// value parsed, or `default` when it is unset or does not parse.
pub fn env_or<T: FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
