//! From text to a validated, resolved [`Config`]: the syntax, shape and resolution stages.
//!
//! The JSON is parsed into a `serde_json::Value` and walked by hand rather than derived,
//! because the messages are the point: every error names the file, the JSON path of the key
//! (`targets[2].port`), what was expected and the value found. The top-level keys live in one
//! table, [`KEYS`], which both reads them and supplies the "did you mean" suggestion for an
//! unknown key. Defaults are set in [`Builder::new`], in the order of design §1.
//!
//! Choices made where the design is silent (worth repeating in the README):
//! - a key given twice in the file: the last one wins, as with `JSON.parse` in LoadBalancer.js;
//! - durations are capped at 365 days, `balancerCount` at [`MAX_BALANCERS`];
//! - a `weight` above [`MAX_WEIGHT`] is lowered to it, with a warning;
//! - `allow`/`deny` entries with bits set after the prefix are an error (see `cidr.rs`);
//! - `downgradeToUser: null` means no switch, like leaving the key out;
//! - `metricsPort` equal to `sourcePort` on an overlapping address is an error, and so is a
//!   target that is the listener itself (it would connect to itself, without end);
//! - a host name that resolves to several addresses: the first one is used;
//! - `clientPrefix` with one family only keeps the other family's default;
//! - `hashBalanceFactor` from 1 to 99 is an error (no target could take a client once all
//!   carry the mean), above [`MAX_HASH_BALANCE_FACTOR`] too; with `stickiness: false` it is
//!   accepted with a warning that it has no effect.
use super::{Cidr, ClientPrefix, Config, ConfigError, Keepalive, TargetSpec, UserSpec};
use crate::addr::canonical_ip;
use crate::proxy_protocol::Version as ProxyVersion;
use health_check::TargetCheck;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

mod health_check;

/// Longest accepted duration: 365 days in milliseconds. Far beyond any sensible timeout, and
/// far enough from the limits of `Instant` arithmetic that no value read here can overflow it.
const MAX_MILLIS: u64 = 365 * 24 * 3600 * 1000;

/// Largest `weight`: enough for any ratio an operator writes by hand; larger values are
/// lowered to it with a warning.
const MAX_WEIGHT: u32 = 1_000_000;

/// Largest `balancerCount`: each is an OS thread; more than this is a typo, not a plan.
const MAX_BALANCERS: u64 = 1024;

/// Largest `hashBalanceFactor`: 10,000 times the mean load; beyond that the bound never
/// binds, and `0` is the way to say "off".
const MAX_HASH_BALANCE_FACTOR: u64 = 1_000_000;

/// `maxBufferSize` as LoadBalancer.js defaults it; shown by `check`, used for nothing.
const DEFAULT_MAX_BUFFER_SIZE: u64 = 8192;
/// `metricsHost` when the file does not set it.
const DEFAULT_METRICS_HOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// What reading one top-level key does to the config being built.
type Apply = fn(&mut Builder, &Field<'_>) -> Result<(), ConfigError>;

/// Every top-level key of design §1 and how it is read. The unknown-key suggestion and the
/// list of valid keys come from this table.
const KEYS: &[(&str, Apply)] = &[
    ("sourcePort", |b, f| {
        b.source_port = Some(f.port()?);
        Ok(())
    }),
    ("sourceHost", |b, f| {
        b.source_host = f.ip("\"0.0.0.0\" or \"::\"")?;
        Ok(())
    }),
    ("targets", read_targets),
    ("stickiness", |b, f| {
        b.stickiness = f.boolean()?;
        Ok(())
    }),
    ("clientPrefix", read_client_prefix),
    ("hashBalanceFactor", |b, f| {
        let what = format!(
            "0 (off) or a percent of the mean load from 100 to {MAX_HASH_BALANCE_FACTOR}, \
             such as 125"
        );
        let factor = f.integer_as(0, MAX_HASH_BALANCE_FACTOR, &what)?;
        if (1..100).contains(&factor) {
            return Err(f.error(format!(
                "expected {what}, found {factor}: below 100 % of the mean, no target could \
                 take a new client once all carry the mean"
            )));
        }
        // Range checked: the conversion is exact.
        b.hash_balance_factor = factor as u32;
        Ok(())
    }),
    ("targetDeactivationDuration", |b, f| {
        b.target_deactivation = f.millis(0)?;
        Ok(())
    }),
    ("sessionExpiry", |b, f| {
        b.session_expiry = f.millis(0)?;
        Ok(())
    }),
    ("sessionExpiryInterval", |b, f| {
        b.session_expiry_interval = f.millis(1)?;
        Ok(())
    }),
    ("balancerCount", |b, f| {
        // Bounded by MAX_BALANCERS, so the conversion cannot fail on any platform we build.
        b.balancer_count = usize::try_from(f.integer(1, MAX_BALANCERS)?).unwrap_or(1);
        Ok(())
    }),
    ("maxBufferSize", |b, f| {
        let bytes = f.integer(0, u64::MAX)?;
        b.max_buffer_size = Some(bytes);
        b.warn(
            f,
            format!(
                "{bytes} has no effect: stickylb reads no client byte before the target \
                 connects, so the kernel holds them; the key is accepted only so that \
                 LoadBalancer.js configs work unchanged"
            ),
        );
        Ok(())
    }),
    ("downgradeToUser", |b, f| {
        b.downgrade_to_user = match f.value {
            Value::Null => None,
            Value::String(name) if !name.is_empty() => Some(UserSpec::Name(name.clone())),
            Value::Number(_) => {
                let uid = f.integer_as(0, u64::from(u32::MAX), "a uid from 0 to 4294967295")?;
                Some(UserSpec::Uid(uid as u32)) // exact: range checked
            }
            _ => return Err(f.expected("a user name such as \"nobody\", or a numeric uid")),
        };
        if matches!(&b.downgrade_to_user, Some(UserSpec::Uid(0)))
            || matches!(&b.downgrade_to_user, Some(UserSpec::Name(n)) if n == "root")
        {
            b.warn(
                f,
                "names root (uid 0): dropping to it keeps every privilege; name an \
                 unprivileged user such as \"nobody\""
                    .to_string(),
            );
        }
        Ok(())
    }),
    ("schedulingPolicy", |b, f| {
        b.warn(
            f,
            "is ignored: it chooses how Node.js cluster hands connections to its workers, and \
             stickylb has no Node.js cluster"
                .to_string(),
        );
        Ok(())
    }),
    ("balancerControllerPath", |_, f| {
        Err(f.error(
            "is not supported: a JavaScript balancer controller (middleware) cannot run in \
             stickylb; to admit or refuse clients by address, use the \"allow\" and \"deny\" \
             keys (lists of CIDR ranges such as \"10.0.0.0/8\")",
        ))
    }),
    ("metricsHost", |b, f| {
        b.metrics_host = f.ip("\"127.0.0.1\" or \"::1\"")?;
        Ok(())
    }),
    ("metricsPort", |b, f| {
        b.metrics_port = match f.value {
            Value::Null => None,
            // The range check makes the conversion exact.
            _ => Some(f.integer_as(1, 65535, "an integer from 1 to 65535, or null (off)")? as u16),
        };
        Ok(())
    }),
    ("connectTimeout", |b, f| {
        b.connect_timeout = f.millis(1)?;
        Ok(())
    }),
    ("idleTimeout", |b, f| {
        let d = f.millis(0)?;
        b.idle_timeout = (!d.is_zero()).then_some(d);
        Ok(())
    }),
    ("shutdownTimeout", |b, f| {
        b.shutdown_timeout = f.millis(0)?;
        Ok(())
    }),
    ("maxConnections", |b, f| {
        b.max_connections = f.integer(0, u64::MAX)?;
        Ok(())
    }),
    ("maxConnectionsPerClient", |b, f| {
        b.max_connections_per_client = f.integer(0, u64::MAX)?;
        Ok(())
    }),
    ("maxSessions", |b, f| {
        let max = u64::try_from(usize::MAX).unwrap_or(u64::MAX);
        b.max_sessions = usize::try_from(f.integer(0, max)?).unwrap_or(usize::MAX);
        Ok(())
    }),
    ("allow", |b, f| {
        b.allow = f.cidrs()?;
        Ok(())
    }),
    ("deny", |b, f| {
        b.deny = f.cidrs()?;
        Ok(())
    }),
    ("zeroCopy", |b, f| {
        b.zero_copy = f.boolean()?;
        Ok(())
    }),
    ("accessLog", |b, f| {
        b.access_log = f.boolean()?;
        Ok(())
    }),
    ("maxConnectAttempts", |b, f| {
        // At most MAX_CONNECT_ATTEMPTS, so the conversion is exact.
        b.max_connect_attempts = f.integer(1, MAX_CONNECT_ATTEMPTS)? as u32;
        Ok(())
    }),
    ("tcpKeepalive", read_keepalive),
    ("proxyProtocol", |b, f| {
        b.proxy_protocol = f.proxy_version()?;
        Ok(())
    }),
    ("acceptProxyProtocol", |b, f| {
        b.accept_proxy_protocol = f.cidrs()?;
        Ok(())
    }),
    ("proxyHeaderTimeout", |b, f| {
        b.proxy_header_timeout = f.millis(1)?;
        Ok(())
    }),
    ("healthCheck", |b, f| {
        b.health_check = health_check::read_top(f)?;
        Ok(())
    }),
];

/// The keys of `tcpKeepalive`.
const KEEPALIVE_KEYS: &[&str] = &["idle", "interval", "count"];

/// Largest `maxConnectAttempts`: more attempts than targets are never made anyway.
const MAX_CONNECT_ATTEMPTS: u64 = 1024;

/// `tcpKeepalive`: `false` (off), `true` (the defaults), or an object of `idle` and `interval`
/// (ms, whole seconds from 1 s: the kernel counts in seconds; it caps them at 32,767 s) and
/// `count` (1 to 127 probes).
fn read_keepalive(b: &mut Builder, f: &Field<'_>) -> Result<(), ConfigError> {
    let map = match f.value {
        Value::Bool(false) => {
            b.tcp_keepalive = None;
            return Ok(());
        }
        Value::Bool(true) => {
            b.tcp_keepalive = Some(Keepalive::default());
            return Ok(());
        }
        Value::Object(map) => map,
        _ => {
            return Err(f.expected(
                "false, true, or an object such as {\"idle\": 60000, \"interval\": 10000, \
                 \"count\": 6}",
            ))
        }
    };
    check_keys(f.file, &f.path, map, KEEPALIVE_KEYS)?;
    let mut keepalive = Keepalive::default();
    let seconds = |key: &str, v: &Value| -> Result<Duration, ConfigError> {
        let field = f.child(key, v);
        let what = "a duration in milliseconds from 1000 to 32767000, in whole seconds";
        let ms = field.integer_as(1000, 32_767_000, what)?;
        if ms % 1000 != 0 {
            return Err(field.error(format!(
                "expected {what}, found {ms}: the kernel counts keepalive times in seconds"
            )));
        }
        Ok(Duration::from_millis(ms))
    };
    if let Some(v) = map.get("idle") {
        keepalive.idle = seconds("idle", v)?;
    }
    if let Some(v) = map.get("interval") {
        keepalive.interval = seconds("interval", v)?;
    }
    if let Some(v) = map.get("count") {
        // At most 127, so the conversion is exact.
        keepalive.count = f.child("count", v).integer(1, 127)? as u32;
    }
    b.tcp_keepalive = Some(keepalive);
    Ok(())
}

/// The keys of one element of `targets`.
const TARGET_KEYS: &[&str] = &[
    "host",
    "port",
    "weight",
    "id",
    "proxyProtocol",
    "drain",
    "healthCheck",
];

/// The keys of `clientPrefix`.
const CLIENT_PREFIX_KEYS: &[&str] = &["ipv4", "ipv6"];

/// Reads the file at `path` (see `file.rs` for what it refuses) and parses it.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    parse(path, &super::file::read(path)?)
}

/// Above this many bytes of text, the memory a parse freed is handed back to the OS at its end.
const TRIM_ABOVE: usize = 64 * 1024;

/// Parses, validates and resolves `text`; `path` is only named in errors and kept in the
/// result.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let result = parse_document(path, text);
    // The JSON tree is gone by now. Its many small blocks would stay with the allocator
    // (glibc keeps freed memory for reuse), so a large file, rejected or not, would leave the
    // process as big as its parse was; trimming gives them back (`sys::release_free_memory`).
    if text.len() > TRIM_ABOVE {
        crate::sys::release_free_memory();
    }
    result
}

fn parse_document(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let doc = syntax(path, text)?;
    let Value::Object(map) = &doc else {
        return Err(ConfigError::Invalid {
            file: path.to_path_buf(),
            key: String::new(),
            message: format!(
                "the top level must be a JSON object such as {{\"sourcePort\": 80, \
                 \"targets\": [...]}}, found {}",
                describe(&doc)
            ),
        });
    };
    let names: Vec<&'static str> = KEYS.iter().map(|(name, _)| *name).collect();
    check_keys(path, "", map, &names)?;
    let mut b = Builder::new();
    for (key, value) in map {
        if let Some((_, apply)) = KEYS.iter().find(|(k, _)| k == key) {
            apply(&mut b, &Field::new(path, join("", key), value))?;
        }
    }
    b.finish(path)
}

/// Stage 1: the text as JSON, with line and column on failure.
fn syntax(path: &Path, text: &str) -> Result<Value, ConfigError> {
    // Editors on Windows may start the file with a byte-order mark; it is not JSON.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim().is_empty() {
        return Err(ConfigError::Syntax {
            file: path.to_path_buf(),
            line: 1,
            column: 1,
            message: "the file is empty (expected a JSON object)".to_string(),
        });
    }
    super::file::check_shape(path, text)?;
    serde_json::from_str(text).map_err(|e| {
        let full = e.to_string();
        // serde_json appends " at line L column C"; the position goes in front instead.
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        let message = full.strip_suffix(&suffix).unwrap_or(&full).to_string();
        ConfigError::Syntax {
            file: path.to_path_buf(),
            line: e.line(),
            column: e.column(),
            message,
        }
    })
}

/// The config being built, every field at its default until a key sets it.
struct Builder {
    source_port: Option<u16>,
    source_host: IpAddr,
    targets: Option<Vec<Target>>,
    stickiness: bool,
    client_prefix: ClientPrefix,
    hash_balance_factor: u32,
    target_deactivation: Duration,
    session_expiry: Duration,
    session_expiry_interval: Duration,
    balancer_count: usize,
    max_buffer_size: Option<u64>,
    downgrade_to_user: Option<UserSpec>,
    metrics_host: IpAddr,
    metrics_port: Option<u16>,
    connect_timeout: Duration,
    idle_timeout: Option<Duration>,
    shutdown_timeout: Duration,
    max_connections: u64,
    max_connections_per_client: u64,
    max_sessions: usize,
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
    zero_copy: bool,
    access_log: bool,
    max_connect_attempts: u32,
    tcp_keepalive: Option<Keepalive>,
    proxy_protocol: Option<ProxyVersion>,
    accept_proxy_protocol: Vec<Cidr>,
    proxy_header_timeout: Duration,
    /// The top-level `healthCheck` as written; `None`: off.
    health_check: Option<health_check::Patch>,
    warnings: Vec<String>,
}

/// A target as read, before its host is resolved.
struct Target {
    id: String,
    host: String,
    port: u16,
    weight: u32,
    /// `proxyProtocol` of this target, if given (else the top-level one applies).
    proxy_protocol: Option<Option<ProxyVersion>>,
    drain: bool,
    check: TargetCheck,
}

impl Builder {
    /// The defaults of design §1.
    fn new() -> Builder {
        Builder {
            source_port: None, // required
            source_host: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            targets: None, // required
            stickiness: true,
            client_prefix: ClientPrefix::DEFAULT, // IPv4 /32, IPv6 /64
            hash_balance_factor: 0,               // off
            target_deactivation: Duration::from_millis(60_000),
            session_expiry: Duration::from_millis(30_000),
            session_expiry_interval: Duration::from_millis(1_000),
            balancer_count: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_buffer_size: None, // accepted for compatibility, no effect
            downgrade_to_user: None,
            metrics_host: DEFAULT_METRICS_HOST,
            metrics_port: Some(9898),
            connect_timeout: Duration::from_millis(5_000),
            idle_timeout: None, // 0 in the file: off
            shutdown_timeout: Duration::from_millis(30_000),
            max_connections: 0,            // derived from the fd limit
            max_connections_per_client: 0, // unlimited
            max_sessions: 1_000_000,
            allow: Vec::new(), // everyone
            deny: Vec::new(),
            zero_copy: true,
            access_log: false,
            max_connect_attempts: 3, // as HAProxy's `retries`
            tcp_keepalive: Some(Keepalive::default()),
            proxy_protocol: None,              // send no PROXY header
            accept_proxy_protocol: Vec::new(), // parse no PROXY header
            proxy_header_timeout: Duration::from_millis(3_000),
            health_check: None, // no active checks
            warnings: Vec::new(),
        }
    }

    /// Records a warning about the key read by `f`, as one line naming file and key.
    fn warn(&mut self, f: &Field<'_>, message: String) {
        self.warnings
            .push(format!("{}: {}: {message}", f.file.display(), f.path));
    }

    /// Required keys, checks across keys, then stage 3: resolution.
    fn finish(mut self, file: &Path) -> Result<Config, ConfigError> {
        let missing = |key: &str, what: &str| missing_key(file, key.to_string(), what);
        let source_port = self
            .source_port
            .ok_or_else(|| missing("sourcePort", "the port to listen on, 1 to 65535"))?;
        let targets = self.targets.ok_or_else(|| {
            missing(
                "targets",
                "a list of targets such as [{\"host\": \"127.0.0.1\", \"port\": 8000}]",
            )
        })?;
        if !self.stickiness && self.hash_balance_factor > 0 {
            self.warnings.push(format!(
                "{}: hashBalanceFactor: {} has no effect with \"stickiness\": false (each \
                 connection already goes to the less loaded of two targets)",
                file.display(),
                self.hash_balance_factor
            ));
        }
        let listen = SocketAddr::new(self.source_host, source_port);
        let metrics = self
            .metrics_port
            .map(|port| SocketAddr::new(self.metrics_host, port));
        if let Some(m) = metrics {
            if m.port() == listen.port()
                && (binds_over(listen.ip(), m.ip()) || binds_over(m.ip(), listen.ip()))
            {
                return Err(ConfigError::Invalid {
                    file: file.to_path_buf(),
                    key: "metricsPort".to_string(),
                    message: format!(
                        "{} is also the sourcePort, on an overlapping address (sourceHost \
                         \"{}\", metricsHost \"{}\"); choose another metricsPort, or null to \
                         turn metrics off",
                        m.port(),
                        listen.ip(),
                        m.ip()
                    ),
                });
            }
        }

        // Only a wildcard listener receives on the interfaces' addresses; ask the OS once. If it
        // cannot say, loopback and the listener's own address are still checked.
        let local = if listen.ip().is_unspecified() {
            crate::sys::local_addresses().unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut resolved = Vec::with_capacity(targets.len());
        for (i, t) in targets.into_iter().enumerate() {
            let addr = resolve(file, i, &t.host, t.port)?;
            if is_own_listener(listen, addr, &local) {
                let target = match t.host.parse::<IpAddr>() {
                    Ok(_) => addr.to_string(),
                    Err(_) => format!("{}:{} (resolved to {addr})", t.host, t.port),
                };
                return Err(ConfigError::Invalid {
                    file: file.to_path_buf(),
                    key: format!("targets[{i}]"),
                    message: format!(
                        "{target} is stickylb's own listener ({listen}): connections to it \
                         would loop back into stickylb"
                    ),
                });
            }
            resolved.push(TargetSpec {
                id: Arc::from(t.id),
                host: t.host,
                port: t.port,
                weight: t.weight,
                addr,
                proxy_protocol: t.proxy_protocol.unwrap_or(self.proxy_protocol),
                drain: t.drain,
                health_check: t.check.resolve(self.health_check.as_ref()),
            });
        }

        Ok(Config {
            path: file.to_path_buf(),
            listen,
            targets: resolved,
            stickiness: self.stickiness,
            client_prefix: self.client_prefix,
            hash_balance_factor: self.hash_balance_factor,
            target_deactivation: self.target_deactivation,
            session_expiry: self.session_expiry,
            session_expiry_interval: self.session_expiry_interval,
            balancer_count: self.balancer_count,
            max_buffer_size: self.max_buffer_size,
            downgrade_to_user: self.downgrade_to_user,
            metrics,
            connect_timeout: self.connect_timeout,
            idle_timeout: self.idle_timeout,
            shutdown_timeout: self.shutdown_timeout,
            max_connections: self.max_connections,
            max_connections_per_client: self.max_connections_per_client,
            max_sessions: self.max_sessions,
            allow: self.allow,
            deny: self.deny,
            zero_copy: self.zero_copy,
            access_log: self.access_log,
            max_connect_attempts: self.max_connect_attempts,
            tcp_keepalive: self.tcp_keepalive,
            proxy_protocol: self.proxy_protocol,
            accept_proxy_protocol: self.accept_proxy_protocol,
            proxy_header_timeout: self.proxy_header_timeout,
            health_check: self.health_check.as_ref().map(|p| p.resolve(None)),
            warnings: self.warnings,
        })
    }
}

/// Whether connecting to `target` reaches the listener itself, in any spelling: the same port,
/// and an address the listener receives on. `::ffff:a.b.c.d` is `a.b.c.d`; a connect to the
/// unspecified address (`0.0.0.0`, `::`) goes to the loopback address of its family; a
/// wildcard listener (`0.0.0.0`, or `::`, which is dual-stack) receives on every loopback
/// address and every address of the machine's interfaces (`local`, from getifaddrs). (A
/// target on the same port of another machine is the common case and is fine.)
fn is_own_listener(listen: SocketAddr, target: SocketAddr, local: &[IpAddr]) -> bool {
    if target.port() != listen.port() {
        return false;
    }
    let to = match canonical_ip(target.ip()) {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let on_this_machine = || to.is_loopback() || local.contains(&to);
    match canonical_ip(listen.ip()) {
        IpAddr::V4(ip) if ip.is_unspecified() => to.is_ipv4() && on_this_machine(),
        IpAddr::V6(ip) if ip.is_unspecified() => on_this_machine(),
        ip => to == ip,
    }
}

/// Whether a socket bound to `bound` also receives connections addressed to `ip` on the same
/// port: the same address, or a wildcard of its family (`::` is dual-stack, so it covers both).
fn binds_over(bound: IpAddr, ip: IpAddr) -> bool {
    bound == ip
        || match bound {
            IpAddr::V4(b) => b.is_unspecified() && ip.is_ipv4(),
            IpAddr::V6(b) => b.is_unspecified(),
        }
}

/// `targets`: a non-empty array of targets with unique identities.
fn read_targets(b: &mut Builder, f: &Field<'_>) -> Result<(), ConfigError> {
    let example =
        "a non-empty array of targets such as [{\"host\": \"127.0.0.1\", \"port\": 8000}]";
    let items = match f.value {
        Value::Array(items) if !items.is_empty() => items,
        _ => return Err(f.expected(example)),
    };
    let mut targets: Vec<Target> = Vec::with_capacity(items.len());
    // Identity → index of the target that has it.
    let mut seen: HashMap<String, usize> = HashMap::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let t = read_target(b, &f.index(i, item))?;
        if let Some(first) = seen.insert(t.id.clone(), i) {
            return Err(f.index(i, item).error(format!(
                "has the identity {:?}, which {}[{first}] already has; every target needs \
                 its own identity (its \"id\", or \"host:port\" as written): give one of \
                 them a distinct \"id\"",
                t.id, f.path
            )));
        }
        targets.push(t);
    }
    b.targets = Some(targets);
    Ok(())
}

/// `clientPrefix`: `{"ipv4"?: 0–32, "ipv6"?: 0–128}`; a family left out keeps its default.
fn read_client_prefix(b: &mut Builder, f: &Field<'_>) -> Result<(), ConfigError> {
    let Value::Object(map) = f.value else {
        return Err(f.expected("an object of prefix lengths such as {\"ipv4\": 32, \"ipv6\": 64}"));
    };
    check_keys(f.file, &f.path, map, CLIENT_PREFIX_KEYS)?;
    let read = |family: &str, max: u64| -> Result<Option<u8>, ConfigError> {
        let Some(v) = map.get(family) else {
            return Ok(None);
        };
        let what = format!("a prefix length from 0 to {max}");
        // Range checked: the conversion is exact.
        Ok(Some(f.child(family, v).integer_as(0, max, &what)? as u8))
    };
    if let Some(prefix) = read("ipv4", 32)? {
        b.client_prefix.ipv4 = prefix;
    }
    if let Some(prefix) = read("ipv6", 128)? {
        b.client_prefix.ipv6 = prefix;
    }
    Ok(())
}

/// A required key that is absent; `what` says what it should hold.
fn missing_key(file: &Path, key: String, what: &str) -> ConfigError {
    ConfigError::Invalid {
        file: file.to_path_buf(),
        key,
        message: format!("required key is missing ({what})"),
    }
}

/// One element of `targets`: `{"host", "port", "weight"?, "id"?, "proxyProtocol"?, "drain"?,
/// "healthCheck"?}`.
fn read_target(b: &mut Builder, f: &Field<'_>) -> Result<Target, ConfigError> {
    let Value::Object(map) = f.value else {
        return Err(f.expected("an object such as {\"host\": \"127.0.0.1\", \"port\": 8000}"));
    };
    check_keys(f.file, &f.path, map, TARGET_KEYS)?;
    let required = |key: &str, what: &str| {
        map.get(key)
            .map(|v| f.child(key, v))
            .ok_or_else(|| missing_key(f.file, join(&f.path, key), what))
    };
    let host = required("host", "a host name or IP address")?.non_empty_string()?;
    let port = required("port", "an integer from 1 to 65535")?.port()?;
    let weight = match map.get("weight") {
        None => 1,
        Some(v) => {
            let field = f.child("weight", v);
            let weight = field.integer(1, u64::MAX)?;
            if weight > u64::from(MAX_WEIGHT) {
                b.warn(
                    &field,
                    format!("{weight} is more than the largest weight, {MAX_WEIGHT}; using {MAX_WEIGHT}"),
                );
            }
            u32::try_from(weight.min(u64::from(MAX_WEIGHT))).unwrap_or(MAX_WEIGHT)
        }
    };
    let id = match map.get("id") {
        None => format!("{host}:{port}"),
        Some(v) => f.child("id", v).non_empty_string()?,
    };
    let proxy_protocol = match map.get("proxyProtocol") {
        None => None,
        Some(v) => Some(f.child("proxyProtocol", v).proxy_version()?),
    };
    let drain = match map.get("drain") {
        None => false,
        Some(v) => f.child("drain", v).boolean()?,
    };
    let check = match map.get("healthCheck") {
        None => TargetCheck::Inherit,
        Some(v) => health_check::read_target(&f.child("healthCheck", v))?,
    };
    Ok(Target {
        id,
        host,
        port,
        weight,
        proxy_protocol,
        drain,
        check,
    })
}

/// Stage 3 for one target: the first address `host:port` resolves to. An IP literal resolves
/// without DNS.
fn resolve(file: &Path, i: usize, host: &str, port: u16) -> Result<SocketAddr, ConfigError> {
    let error = |reason: String| ConfigError::Resolve {
        file: file.to_path_buf(),
        key: format!("targets[{i}].host"),
        host: host.to_string(),
        port,
        reason,
    };
    match (host, port).to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| error("it resolved to no address".to_string())),
        Err(e) => Err(error(e.to_string())),
    }
}

/// Rejects any key of `map` not in `known`, suggesting the nearest known one.
fn check_keys(
    file: &Path,
    parent: &str,
    map: &Map<String, Value>,
    known: &[&'static str],
) -> Result<(), ConfigError> {
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        None => Ok(()),
        Some(key) => Err(ConfigError::UnknownKey {
            file: file.to_path_buf(),
            key: join(parent, key),
            suggestion: nearest(key, known),
            valid: known.to_vec(),
        }),
    }
}

/// The known key closest to `key` by edit distance, ignoring case, if it is close enough to
/// be a typo of it: at most a third of the key's length (and at least 1) edits away.
fn nearest(key: &str, known: &[&'static str]) -> Option<&'static str> {
    let len = key.chars().count();
    if len > 64 {
        return None; // not a typo of a key, and not worth a large distance table
    }
    let key_lower = key.to_lowercase();
    let limit = (len / 3).max(1);
    known
        .iter()
        .map(|k| (edit_distance(&key_lower, &k.to_lowercase()), *k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Edit distance counted in characters, where an insertion, a deletion, a substitution or a
/// swap of two neighbours (`hots` → `host`, the commonest typo) each count as one.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // d[i][j]: distance between the first i characters of a and the first j of b.
    let mut d: Vec<Vec<usize>> = (0..=a.len())
        .map(|i| (0..=b.len()).map(|j| if i == 0 { j } else { i }).collect())
        .collect();
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let substitution = d[i - 1][j - 1] + usize::from(a[i - 1] != b[j - 1]);
            let mut best = substitution.min(d[i - 1][j] + 1).min(d[i][j - 1] + 1);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// `parent.key`, or `parent["odd key"]` when the key is not a plain identifier.
fn join(parent: &str, key: &str) -> String {
    let plain = key
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    match (plain, parent.is_empty()) {
        (true, true) => key.to_string(),
        (true, false) => format!("{parent}.{key}"),
        (false, _) => format!("{parent}[{}]", Value::from(key)),
    }
}

/// A value as an error message shows it: scalars as written, strings quoted (and shortened),
/// arrays and objects by kind.
fn describe(v: &Value) -> String {
    match v {
        Value::String(s) if s.chars().count() > 60 => {
            let short: String = s.chars().take(60).collect();
            format!("{}...", Value::from(short))
        }
        Value::Array(a) if a.is_empty() => "an empty array".to_string(),
        Value::Array(_) => "an array".to_string(),
        Value::Object(_) => "an object".to_string(),
        other => other.to_string(),
    }
}

/// One value being read, with what is needed to name it in an error.
struct Field<'a> {
    file: &'a Path,
    /// JSON path, such as `targets[2].port`.
    path: String,
    value: &'a Value,
}

impl<'a> Field<'a> {
    fn new(file: &'a Path, path: String, value: &'a Value) -> Field<'a> {
        Field { file, path, value }
    }

    fn child(&self, key: &str, value: &'a Value) -> Field<'a> {
        Field::new(self.file, join(&self.path, key), value)
    }

    fn index(&self, i: usize, value: &'a Value) -> Field<'a> {
        Field::new(self.file, format!("{}[{i}]", self.path), value)
    }

    fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            key: self.path.clone(),
            message: message.into(),
        }
    }

    /// "expected {what}, found {the value}".
    fn expected(&self, what: &str) -> ConfigError {
        self.error(format!("expected {what}, found {}", describe(self.value)))
    }

    /// An integer in `min..=max`.
    fn integer(&self, min: u64, max: u64) -> Result<u64, ConfigError> {
        let what = match (min, max) {
            (0, u64::MAX) => "a non-negative integer".to_string(),
            (min, u64::MAX) => format!("an integer of at least {min}"),
            (min, max) => format!("an integer from {min} to {max}"),
        };
        self.integer_as(min, max, &what)
    }

    /// An integer in `min..=max`, described as `what` in the error. A whole number written as
    /// a float (`80.0`, `8e1`) is rejected too, with a hint, because JavaScript would take it
    /// and the operator deserves to know why stickylb does not.
    fn integer_as(&self, min: u64, max: u64, what: &str) -> Result<u64, ConfigError> {
        if let Some(n) = self.value.as_u64().filter(|n| (min..=max).contains(n)) {
            return Ok(n);
        }
        if let (true, Some(x)) = (self.value.is_f64(), self.value.as_f64()) {
            if x.fract() == 0.0 && x >= min as f64 && x <= max as f64 {
                return Err(self.error(format!(
                    "expected {what}, found {x:?}; write {}, without a decimal point or \
                     exponent",
                    x as u64
                )));
            }
        }
        Err(self.expected(what))
    }

    fn port(&self) -> Result<u16, ConfigError> {
        // The range check makes the conversion exact.
        Ok(self.integer(1, 65535)? as u16)
    }

    /// A duration in milliseconds, at least `min`.
    fn millis(&self, min: u64) -> Result<Duration, ConfigError> {
        let what = format!("a duration in milliseconds from {min} to {MAX_MILLIS} (365 days)");
        self.integer_as(min, MAX_MILLIS, &what)
            .map(Duration::from_millis)
    }

    fn boolean(&self) -> Result<bool, ConfigError> {
        self.value
            .as_bool()
            .ok_or_else(|| self.expected("true or false"))
    }

    fn non_empty_string(&self) -> Result<String, ConfigError> {
        match self.value {
            Value::String(s) if !s.is_empty() => Ok(s.clone()),
            _ => Err(self.expected("a non-empty string")),
        }
    }

    /// An IP address literal (no host name: a listener binds to an address).
    fn ip(&self, example: &str) -> Result<IpAddr, ConfigError> {
        self.value
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| self.expected(&format!("an IP address such as {example}")))
    }

    /// `proxyProtocol`: `"v1"`, `"v2"` or `false` (none).
    fn proxy_version(&self) -> Result<Option<ProxyVersion>, ConfigError> {
        match self.value {
            Value::Bool(false) => Ok(None),
            Value::String(s) if s == "v1" => Ok(Some(ProxyVersion::V1)),
            Value::String(s) if s == "v2" => Ok(Some(ProxyVersion::V2)),
            _ => Err(self.expected("\"v1\", \"v2\" or false")),
        }
    }

    /// An array of CIDR strings, such as `["10.0.0.0/8", "::1"]`.
    fn cidrs(&self) -> Result<Vec<Cidr>, ConfigError> {
        let Value::Array(items) = self.value else {
            return Err(self
                .expected("an array of CIDR ranges such as [\"10.0.0.0/8\", \"2001:db8::/32\"]"));
        };
        let what = "a CIDR range such as \"10.0.0.0/8\", \"2001:db8::/32\" or \"192.0.2.7\"";
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let f = self.index(i, item);
                let text = item.as_str().ok_or_else(|| f.expected(what))?;
                text.parse::<Cidr>()
                    .map_err(|e| f.error(format!("expected {what}, found {}: {e}", describe(item))))
            })
            .collect()
    }
}

fn proxy_version_json(version: Option<ProxyVersion>) -> Value {
    match version {
        None => Value::Bool(false),
        Some(ProxyVersion::V1) => Value::from("v1"),
        Some(ProxyVersion::V2) => Value::from("v2"),
    }
}

/// The effective config in the file's own key names, as `stickylb check` prints it.
pub fn effective_json(c: &Config) -> Value {
    let ms = crate::clock::duration_ms;
    let targets: Vec<Value> = c
        .targets
        .iter()
        .map(|t| {
            json!({
                "id": &*t.id,
                "host": t.host,
                "port": t.port,
                "weight": t.weight,
                "proxyProtocol": proxy_version_json(t.proxy_protocol),
                "drain": t.drain,
                "healthCheck": t
                    .health_check
                    .as_ref()
                    .map_or(Value::Bool(false), health_check::effective_json),
            })
        })
        .collect();
    let cidrs = |list: &[Cidr]| list.iter().map(|c| c.to_string()).collect::<Vec<_>>();
    json!({
        "sourceHost": c.listen.ip().to_string(),
        "sourcePort": c.listen.port(),
        "targets": targets,
        "stickiness": c.stickiness,
        "clientPrefix": {"ipv4": c.client_prefix.ipv4, "ipv6": c.client_prefix.ipv6},
        "hashBalanceFactor": c.hash_balance_factor,
        "targetDeactivationDuration": ms(c.target_deactivation),
        "sessionExpiry": ms(c.session_expiry),
        "sessionExpiryInterval": ms(c.session_expiry_interval),
        "balancerCount": c.balancer_count,
        "maxBufferSize": c.max_buffer_size.unwrap_or(DEFAULT_MAX_BUFFER_SIZE),
        "downgradeToUser": match &c.downgrade_to_user {
            None => Value::Null,
            Some(UserSpec::Name(name)) => Value::from(name.as_str()),
            Some(UserSpec::Uid(uid)) => Value::from(*uid),
        },
        // With metrics off the host is shown at its default, so that this output is itself a
        // valid config (`metricsPort: null` is what turns metrics off).
        "metricsHost": c.metrics.map_or(DEFAULT_METRICS_HOST.to_string(), |m| m.ip().to_string()),
        "metricsPort": c.metrics.map(|m| m.port()),
        "connectTimeout": ms(c.connect_timeout),
        "idleTimeout": c.idle_timeout.map_or(0, ms),
        "shutdownTimeout": ms(c.shutdown_timeout),
        "maxConnections": c.max_connections,
        "maxConnectionsPerClient": c.max_connections_per_client,
        "maxSessions": c.max_sessions,
        "allow": cidrs(&c.allow),
        "deny": cidrs(&c.deny),
        "zeroCopy": c.zero_copy,
        "accessLog": c.access_log,
        "maxConnectAttempts": c.max_connect_attempts,
        "proxyProtocol": proxy_version_json(c.proxy_protocol),
        "acceptProxyProtocol": cidrs(&c.accept_proxy_protocol),
        "proxyHeaderTimeout": ms(c.proxy_header_timeout),
        "tcpKeepalive": match c.tcp_keepalive {
            None => Value::Bool(false),
            Some(k) => json!({
                "idle": ms(k.idle),
                "interval": ms(k.interval),
                "count": k.count,
            }),
        },
        "healthCheck": c
            .health_check
            .as_ref()
            .map_or(Value::Null, health_check::effective_json),
    })
}

#[cfg(test)]
mod tests;
