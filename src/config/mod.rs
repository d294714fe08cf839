//! The config file: LoadBalancer.js-compatible JSON → a validated, resolved [`Config`].
//!
//! Stages, each of which can fail with a [`ConfigError`] that names the file and the JSON path:
//! 0. the file: only a regular file of at most [`MAX_BYTES`] is read, and its JSON may nest at
//!    most [`MAX_DEPTH`] deep and hold at most [`MAX_VALUES`] values, so that no file can make
//!    a read block or a parse take unbounded memory (see `file.rs`);
//! 1. syntax: the text is parsed as JSON (errors carry line and column);
//! 2. shape: every key is checked against the table of §1 of the design (unknown keys are
//!    rejected with the nearest valid key as a suggestion, wrong types and out-of-range values
//!    name their path, such as `targets[2].port`);
//! 3. resolution: target host names are resolved, so that a config that is accepted can be
//!    used at once and a reload never swaps in a target that cannot be reached by name.
//!
//! Nothing here has side effects beyond reading the file and DNS look-ups; a config that fails
//! any stage is never seen by the rest of the program.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

mod cidr;
mod error;
mod file;
mod parse;

pub use crate::addr::ClientPrefix;
pub use crate::proxy_protocol::Version as ProxyVersion;
pub use crate::sockets::Keepalive;
pub use crate::sys::UserSpec;
pub use cidr::{Cidr, ParseCidrError};
pub use error::ConfigError;
pub use file::{MAX_BYTES, MAX_CONTAINERS, MAX_DEPTH, MAX_VALUES};

/// A target as configured and resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    /// Identity: the hash key, the metric label, and what carries runtime state across
    /// reloads. `id` from the file, or `"host:port"` exactly as written.
    pub id: Arc<str>,
    /// Host as written in the file.
    pub host: String,
    pub port: u16,
    /// Relative share of clients (≥ 1, default 1).
    pub weight: u32,
    /// The address connected to: the first address `host` resolved to.
    pub addr: SocketAddr,
    /// `proxyProtocol` of the target, or else the top level's: the PROXY header sent to it
    /// before the client's bytes (`None`: none).
    pub proxy_protocol: Option<ProxyVersion>,
    /// `drain` (default false): no new client goes to this target; clients with a live
    /// session keep it, and its open connections go on.
    pub drain: bool,
    /// The active health check of this target: its own `healthCheck` over the top-level one,
    /// `None` when checks are off for it (the default, or `"healthCheck": false`).
    pub health_check: Option<HealthCheck>,
}

/// `healthCheck` (design §12): how a target is checked. Defaults are those of the design:
/// `{"interval": 2000, "timeout": 1000, "rise": 2, "fall": 3}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    /// `interval` (default 2 000 ms, at least 10): time between two checks of one target.
    pub interval: Duration,
    /// `timeout` (default 1 000 ms, at least 1): the whole check (connect, `send`, `expect`)
    /// must succeed within this.
    pub timeout: Duration,
    /// `rise` (default 2): consecutive successes that bring a down target back.
    pub rise: u32,
    /// `fall` (default 3): consecutive failures that take a target out.
    pub fall: u32,
    /// `send` (default none): bytes written once connected.
    pub send: Option<String>,
    /// `expect` (default none): a substring that must appear in the first
    /// [`HealthCheck::EXPECT_WINDOW`] bytes received.
    pub expect: Option<String>,
    /// `port` (default: the target's port): where to connect, on the target's address.
    pub port: Option<u16>,
}

impl HealthCheck {
    /// How much of the reply `expect` is searched in.
    pub const EXPECT_WINDOW: usize = 4096;
}

/// A validated, resolved config. Field docs give the JSON key and the default.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this config was read from (used in messages and by reload).
    pub path: PathBuf,
    /// `sourceHost` (default `0.0.0.0`) and `sourcePort` (required).
    pub listen: SocketAddr,
    /// `targets`: at least one, identities unique.
    pub targets: Vec<TargetSpec>,
    /// `stickiness` (default true).
    pub stickiness: bool,
    /// `clientPrefix` (default `{"ipv4": 32, "ipv6": 64}`): how many leading bits of an
    /// address make one client for the hash, the sessions and `maxConnectionsPerClient`.
    /// `allow`/`deny` and the logs use the full address.
    pub client_prefix: ClientPrefix,
    /// `hashBalanceFactor` (default 0 = off; else a percent, at least 100): a new client is
    /// not sent to a target at or above this percent of the weighted mean load; it goes to its
    /// next-ranked target under that bound (see `balance::hash::Table::pick_bounded`). Only
    /// with `stickiness: true`.
    pub hash_balance_factor: u32,
    /// `targetDeactivationDuration` (default 60 000 ms).
    pub target_deactivation: Duration,
    /// `sessionExpiry` (default 30 000 ms).
    pub session_expiry: Duration,
    /// `sessionExpiryInterval` (default 1 000 ms, must be > 0).
    pub session_expiry_interval: Duration,
    /// `balancerCount` (default: the number of CPUs).
    pub balancer_count: usize,
    /// `maxBufferSize`, if given: accepted for compatibility, has no effect.
    pub max_buffer_size: Option<u64>,
    /// `downgradeToUser`.
    pub downgrade_to_user: Option<UserSpec>,
    /// `metricsHost` (default 127.0.0.1) and `metricsPort` (default 9898; `null` = `None`).
    pub metrics: Option<SocketAddr>,
    /// `connectTimeout` (default 5 000 ms, must be > 0).
    pub connect_timeout: Duration,
    /// `idleTimeout` (default 0 = off = `None`).
    pub idle_timeout: Option<Duration>,
    /// `shutdownTimeout` (default 30 000 ms).
    pub shutdown_timeout: Duration,
    /// `maxConnections` (default 0 = derived from the fd limit).
    pub max_connections: u64,
    /// `maxConnectionsPerClient` (default 0 = unlimited).
    pub max_connections_per_client: u64,
    /// `maxSessions` (default 1 000 000).
    pub max_sessions: usize,
    /// `allow` (default empty = everyone).
    pub allow: Vec<Cidr>,
    /// `deny` (default empty).
    pub deny: Vec<Cidr>,
    /// `zeroCopy` (default true).
    pub zero_copy: bool,
    /// `accessLog` (default false).
    pub access_log: bool,
    /// `maxConnectAttempts` (default 3): targets tried for one client connection at most,
    /// which also bounds its connect time to that many `connectTimeout`s.
    pub max_connect_attempts: u32,
    /// `tcpKeepalive` (default idle 60 s, interval 10 s, 6 probes; `false` = `None`: off).
    pub tcp_keepalive: Option<Keepalive>,
    /// `proxyProtocol` at the top level (default `false` = `None`): the default of every
    /// target's.
    pub proxy_protocol: Option<ProxyVersion>,
    /// `acceptProxyProtocol` (default empty): the upstreams trusted to send a PROXY header.
    /// From them a header is required; from anyone else none is parsed.
    pub accept_proxy_protocol: Vec<Cidr>,
    /// `proxyHeaderTimeout` (default 3 000 ms, > 0): a trusted upstream's header must be
    /// complete within it.
    pub proxy_header_timeout: Duration,
    /// `healthCheck` at the top level (default `null`: off), with its defaults filled in.
    /// What each target uses is in [`TargetSpec::health_check`].
    pub health_check: Option<HealthCheck>,
    /// Things worth telling the operator at start-up or reload that are not errors
    /// (`schedulingPolicy` ignored, `maxBufferSize` has no effect, ...).
    pub warnings: Vec<String>,
}

impl Config {
    /// Reads, parses, validates and resolves the config file at `path`. Blocking (file read,
    /// DNS): call it from a blocking context.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        parse::load(path)
    }

    /// Reads the config file at `path` as text: a regular file of at most [`MAX_BYTES`] (see
    /// stage 0 above). Blocking, but never waits for a writer or reads without bound.
    pub fn read(path: &Path) -> Result<String, ConfigError> {
        file::read(path)
    }

    /// Parses, validates and resolves `text`, naming `path` in any error.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        parse::parse(path, text)
    }

    /// The effective config, every key with its value after defaults, as JSON in the file's
    /// own key names (what `stickylb check` prints).
    pub fn effective_json(&self) -> serde_json::Value {
        parse::effective_json(self)
    }

    /// True when the PROXY protocol header is required from (and parsed on) connections from
    /// `ip`: it is in `acceptProxyProtocol`.
    pub fn trusts_proxy_header(&self, ip: IpAddr) -> bool {
        let ip = crate::addr::canonical_ip(ip);
        self.accept_proxy_protocol.iter().any(|c| c.contains(ip))
    }

    /// True when `ip` may connect: not in `deny`, and in `allow` if `allow` is not empty.
    pub fn admits(&self, ip: IpAddr) -> bool {
        let ip = crate::addr::canonical_ip(ip);
        if self.deny.iter().any(|c| c.contains(ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|c| c.contains(ip))
    }
}
