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
//! every new connection.
//!
//! # Layout
//!
//! - [`config`]: the JSON file format (LoadBalancer.js compatible) → a validated, resolved
//!   [`config::Config`]; every error names the file, the JSON path and, for syntax errors, the
//!   line and column.
//! - [`balance`]: the choice of a target: the fixed client hash and weighted rendezvous table
//!   ([`balance::hash`]), the runtime state of each target ([`balance::target`]), the shared
//!   session table ([`balance::session`]) and the policy that combines them
//!   ([`balance::Balancer`]).
//! - [`proxy_protocol`]: the PROXY protocol header (v1 and v2), parsed from trusted upstreams
//!   and sent to targets; a leaf that knows bytes and addresses only.
//! - [`proxy`]: the listener and its accept loop ([`proxy::listener`]), connect with fail-over
//!   ([`proxy::connect`]), and the data path: zero-copy ([`proxy::splice`]) or userspace copy
//!   ([`proxy::copy`]), driven by [`proxy::relay`].
//! - [`reload`]: SIGHUP and config-file watching; validates completely, then swaps the store
//!   in one atomic step.
//! - [`server`]: assembles a running balancer from a config: runtime, listener, sweeper,
//!   graceful shutdown. Tests start one on `127.0.0.1:0` through [`server::Server`].
//! - [`stats`]: the counters the data path keeps with atomics, read by the metrics exporter.
//! - [`metrics`]: the Prometheus names of design §6 and `GET /metrics`; publishes the atomics
//!   at scrape time, so the data path pays for counters nothing beyond them.
//! - [`sys`]: what needs the OS directly: the fd limit, dropping privileges.
//! - [`demo`]: the built-in demo targets of `stickylb demo`.
//! - [`cli`]: the command line: `stickylb`, `stickylb check`, `stickylb demo`.

pub mod balance;
pub mod cli;
pub mod config;
pub mod demo;
pub mod metrics;
pub mod proxy;
pub mod proxy_protocol;
pub mod reload;
pub mod server;
pub mod stats;
pub mod sys;
