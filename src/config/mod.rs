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

    /// True when `ip` may connect: not in `deny`, and in `allow` if `allow` is not empty.
    pub fn admits(&self, ip: IpAddr) -> bool {
        let ip = crate::addr::canonical_ip(ip);
        if self.deny.iter().any(|c| c.contains(ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|c| c.contains(ip))
    }
}
