//! stickylb: a TCP layer-4 sticky load balancer.
//!
//! Every client IP address is hashed to one target (host:port) of a configured list, so that a
//! client keeps reaching the same worker process, the one that holds its session. Bytes are
//! spliced both ways in the kernel where it allows (splice(2) on Linux).
//!
//! # How the parts fit
//!
//! Data flows one way: accept → admit → pick → connect (retry) → proxy (splice or copy) → close.
//! Config flows the other way: file → parse → validate → resolve → one `ArcSwap` store, read by
//! every new connection. Numbers flow up: the data path counts with atomics, and the admin
//! endpoint reads them as a [`Snapshot`].
//!
//! # Layers
//!
//! A module imports only modules on layers below its own (`tests/layers.rs` reads this list
//! and checks every `crate::` path in `src/` against it):
//!
//! 7. [`cli`]: the command line: `stickylb`, `stickylb check`, `stickylb demo`,
//!    `stickylb upgrade`.
//! 6. [`upgrade`]: hands a running balancer over to a new process of itself (SIGUSR2): the
//!    listeners, the state and the established connections; undoes it all if the new process
//!    fails.
//! 5. [`reload`], [`admin`]: SIGHUP and config-file watching, which validate completely and
//!    then swap the store in one atomic step; the HTTP endpoint at `metricsHost:metricsPort`
//!    (`/metrics`, rendered by [`admin::prometheus`] from a [`Snapshot`]; the status page `/`
//!    and its JSON `/status`, by [`admin::status`] from the same snapshot).
//! 4. [`server`], `demo`: a running balancer assembled from a config (listener, accept loop,
//!    session sweeper, graceful shutdown; tests start one on `127.0.0.1:0`); the built-in demo
//!    targets of `stickylb demo`.
//! 3. `proxy`, `health`: one handler per client connection: the accept loop, admission,
//!    connect with fail-over, and the data path (splice or userspace copy, driven by the
//!    relay); the active health checks, one task per checked target, whose verdicts the pick
//!    reads from each target's state (they never wait on each other).
//! 2. [`balance`]: the choice of a target: the fixed client hash and weighted rendezvous
//!    table ([`balance::hash`]), each target's runtime state, the shared session table, and
//!    the policy that combines them ([`balance::Balancer`]).
//! 1. [`config`]: the JSON file (LoadBalancer.js compatible) → a validated, resolved
//!    [`config::Config`]; every error names the file, the JSON path and, for syntax errors,
//!    the line and column.
//! 0. `addr`, `clock`, `counters`, `handover`, [`proxy_protocol`], `sockets`, `sys`, `systemd`,
//!    `version`: leaves: what a client address is and which addresses make one client
//!    (`clientPrefix`), the millisecond clock, the atomic counters and histograms, the
//!    upgrade's handover format (versioned messages, descriptors passed by SCM_RIGHTS), the
//!    PROXY protocol header (v1 and v2, bytes and addresses only), socket set-up and OS error
//!    classes, the OS calls for the fd limit and dropping privileges, systemd's readiness
//!    notification, and the version label (`STICKYLB_BUILD_TAG`).
//!
//! The public surface is what the binary, the tests and the benches use: the modules linked
//! above and the re-exports below. Everything else is private to the crate.

// These docs are for the crate's own developers (`cargo doc --document-private-items`): a public
// item's comment may point at the private code behind it.
#![allow(rustdoc::private_intra_doc_links)]

pub mod admin;
pub mod balance;
pub mod cli;
pub mod config;
pub mod proxy_protocol;
pub mod reload;
pub mod server;
pub mod upgrade;

mod addr;
mod clock;
mod counters;
mod demo;
mod handover;
mod health;
mod proxy;
mod sockets;
mod sys;
mod systemd;
mod version;

pub use balance::target::TargetStatus;
pub use counters::{HistogramSnapshot, LastReload, Reject};
pub use proxy::admission::derived_max_connections;
#[cfg(target_os = "linux")]
pub use proxy::splice::spliced_bytes;
pub use proxy::{Snapshot, TargetSnapshot};
pub use sockets::Fault;
