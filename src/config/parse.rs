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
//! - a host name that resolves to several addresses: the first one is used.
use super::{Cidr, Config, ConfigError, TargetSpec, UserSpec};
use crate::addr::canonical_ip;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Longest accepted duration: 365 days in milliseconds. Far beyond any sensible timeout, and
/// far enough from the limits of `Instant` arithmetic that no value read here can overflow it.
const MAX_MILLIS: u64 = 365 * 24 * 3600 * 1000;

/// Largest `weight`: enough for any ratio an operator writes by hand; larger values are
/// lowered to it with a warning.
const MAX_WEIGHT: u32 = 1_000_000;

/// Largest `balancerCount`: each is an OS thread; more than this is a typo, not a plan.
const MAX_BALANCERS: u64 = 1024;

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
];

/// The keys of one element of `targets`.
const TARGET_KEYS: &[&str] = &["host", "port", "weight", "id"];

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
    warnings: Vec<String>,
}

/// A target as read, before its host is resolved.
struct Target {
    id: String,
    host: String,
    port: u16,
    weight: u32,
}

impl Builder {
    /// The defaults of design §1.
    fn new() -> Builder {
        Builder {
            source_port: None, // required
            source_host: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            targets: None, // required
            stickiness: true,
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
            warnings: Vec::new(),
        }
    }

    /// Records a warning about the key read by `f`, as one line naming file and key.
    fn warn(&mut self, f: &Field<'_>, message: String) {
        self.warnings
            .push(format!("{}: {}: {message}", f.file.display(), f.path));
    }

    /// Required keys, checks across keys, then stage 3: resolution.
    fn finish(self, file: &Path) -> Result<Config, ConfigError> {
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
            });
        }

        Ok(Config {
            path: file.to_path_buf(),
            listen,
            targets: resolved,
            stickiness: self.stickiness,
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

/// One element of `targets`: `{"host", "port", "weight"?, "id"?}`.
/// A required key that is absent; `what` says what it should hold.
fn missing_key(file: &Path, key: String, what: &str) -> ConfigError {
    ConfigError::Invalid {
        file: file.to_path_buf(),
        key,
        message: format!("required key is missing ({what})"),
    }
}

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
    Ok(Target {
        id,
        host,
        port,
        weight,
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
            })
        })
        .collect();
    let cidrs = |list: &[Cidr]| list.iter().map(|c| c.to_string()).collect::<Vec<_>>();
    json!({
        "sourceHost": c.listen.ip().to_string(),
        "sourcePort": c.listen.port(),
        "targets": targets,
        "stickiness": c.stickiness,
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn parse_text(text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("config.json"), text)
    }

    /// A minimal valid config with `extra` keys appended (a key repeated in `extra` wins,
    /// because the last occurrence of a key wins).
    fn with(extra: &str) -> Result<Config, ConfigError> {
        let sep = if extra.is_empty() { "" } else { "," };
        parse_text(&format!(
            r#"{{"sourcePort": 8080, "targets": [{{"host": "127.0.0.1", "port": 9000}}]{sep} {extra}}}"#
        ))
    }

    fn ok(extra: &str) -> Config {
        with(extra).unwrap_or_else(|e| panic!("{extra}: {e}"))
    }

    /// The message of the error `extra` causes, checked to contain each of `words`.
    fn rejects(extra: &str, words: &[&str]) -> ConfigError {
        let e = match with(extra) {
            Ok(_) => panic!("accepted: {extra}"),
            Err(e) => e,
        };
        let msg = e.to_string();
        assert!(msg.starts_with("config.json"), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
        for w in words {
            assert!(msg.contains(w), "{extra}\n  message: {msg}\n  missing: {w}");
        }
        e
    }

    fn targets(json: &str) -> String {
        format!(r#""targets": {json}"#)
    }

    #[test]
    fn loadbalancer_js_config_works_unchanged() {
        // A LoadBalancer.js config, used unchanged; tests/config_rules.rs checks the same file.
        let c = parse_text(include_str!("../../tests/fixtures/loadbalancer-js.json"))
            .expect("LoadBalancer.js config");
        assert_eq!(c.listen, "0.0.0.0:80".parse().expect("addr"));
        assert_eq!(c.balancer_count, 1);
        assert_eq!(c.target_deactivation, Duration::from_secs(60));
        assert_eq!(c.session_expiry, Duration::from_secs(30));
        assert_eq!(
            c.downgrade_to_user,
            Some(UserSpec::Name("someuser".to_string()))
        );
        assert!(c.stickiness);
        assert_eq!(c.max_buffer_size, Some(8192));
        let ids: Vec<&str> = c.targets.iter().map(|t| &*t.id).collect();
        assert_eq!(ids, ["localhost:8000", "localhost:8001"]);
        assert!(c.targets.iter().all(|t| t.addr.ip().is_loopback()));
        assert_eq!(c.targets[1].addr.port(), 8001);
        assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
        assert!(c
            .warnings
            .iter()
            .any(|w| w.contains("schedulingPolicy") && w.contains("ignored")));
        assert!(c.warnings.iter().any(|w| w.contains("maxBufferSize")
            && w.contains("no effect")
            && w.contains("kernel")));
    }

    #[test]
    fn minimal_config_gets_every_default() {
        let c = ok("");
        assert_eq!(c.path, Path::new("config.json"));
        assert_eq!(c.listen, "0.0.0.0:8080".parse().expect("addr"));
        assert_eq!(c.targets.len(), 1);
        let t = &c.targets[0];
        assert_eq!(
            (&*t.id, t.host.as_str(), t.port, t.weight),
            ("127.0.0.1:9000", "127.0.0.1", 9000, 1)
        );
        assert_eq!(t.addr, "127.0.0.1:9000".parse().expect("addr"));
        assert!(c.stickiness);
        assert_eq!(c.target_deactivation, Duration::from_millis(60_000));
        assert_eq!(c.session_expiry, Duration::from_millis(30_000));
        assert_eq!(c.session_expiry_interval, Duration::from_millis(1_000));
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(c.balancer_count, cpus);
        assert_eq!(c.max_buffer_size, None);
        assert_eq!(c.downgrade_to_user, None);
        assert_eq!(c.metrics, Some("127.0.0.1:9898".parse().expect("addr")));
        assert_eq!(c.connect_timeout, Duration::from_millis(5_000));
        assert_eq!(c.idle_timeout, None);
        assert_eq!(c.shutdown_timeout, Duration::from_millis(30_000));
        assert_eq!(c.max_connections, 0);
        assert_eq!(c.max_connections_per_client, 0);
        assert_eq!(c.max_sessions, 1_000_000);
        assert!(c.allow.is_empty() && c.deny.is_empty());
        assert!(c.zero_copy);
        assert!(!c.access_log);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn every_key_can_be_set() {
        let c = ok(r#"
            "sourceHost": "::", "stickiness": false, "targetDeactivationDuration": 0,
            "sessionExpiry": 5, "sessionExpiryInterval": 250, "balancerCount": 3,
            "downgradeToUser": 1000, "metricsHost": "0.0.0.0", "metricsPort": 9100,
            "connectTimeout": 1500, "idleTimeout": 600000, "shutdownTimeout": 0,
            "maxConnections": 50000, "maxConnectionsPerClient": 10, "maxSessions": 0,
            "allow": ["10.0.0.0/8", "::1"], "deny": ["10.6.6.6"], "zeroCopy": false,
            "accessLog": true
        "#);
        assert_eq!(
            c.listen,
            SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 8080)
        );
        assert!(!c.stickiness);
        assert_eq!(c.target_deactivation, Duration::ZERO);
        assert_eq!(c.session_expiry, Duration::from_millis(5));
        assert_eq!(c.session_expiry_interval, Duration::from_millis(250));
        assert_eq!(c.balancer_count, 3);
        assert_eq!(c.downgrade_to_user, Some(UserSpec::Uid(1000)));
        assert_eq!(c.metrics, Some("0.0.0.0:9100".parse().expect("addr")));
        assert_eq!(c.connect_timeout, Duration::from_millis(1500));
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(600)));
        assert_eq!(c.shutdown_timeout, Duration::ZERO);
        assert_eq!(c.max_connections, 50_000);
        assert_eq!(c.max_connections_per_client, 10);
        assert_eq!(c.max_sessions, 0);
        assert_eq!(c.allow.len(), 2);
        assert_eq!(c.deny[0].to_string(), "10.6.6.6/32");
        assert!(!c.zero_copy);
        assert!(c.access_log);
        assert!(c.admits("10.1.1.1".parse().expect("ip")));
        assert!(!c.admits("10.6.6.6".parse().expect("ip")));
        assert!(!c.admits("192.0.2.1".parse().expect("ip")));
        assert!(c.admits("::1".parse().expect("ip")));
        assert!(c.admits("::ffff:10.1.1.1".parse().expect("ip")));
    }

    #[test]
    fn syntax_error_names_file_line_and_column() {
        let e = parse_text("{\n  \"sourcePort\": 80,\n  \"targets\": [] \"x\"\n}")
            .expect_err("missing comma");
        match &e {
            ConfigError::Syntax { line, column, .. } => assert_eq!((*line, *column), (3, 17)),
            other => panic!("{other:?}"),
        }
        let msg = e.to_string();
        assert!(
            msg.starts_with("config.json:3:17: invalid JSON: expected"),
            "{msg}"
        );
        assert!(!msg.contains("at line"), "{msg}");
    }

    #[test]
    fn truncated_and_empty_files_are_syntax_errors() {
        let e = parse_text("{\"sourcePort\": 80,").expect_err("truncated");
        assert!(matches!(e, ConfigError::Syntax { line: 1, .. }), "{e:?}");
        for empty in ["", "  \n\n"] {
            let e = parse_text(empty).expect_err("empty");
            assert!(matches!(e, ConfigError::Syntax { .. }), "{e:?}");
            assert!(e.to_string().contains("the file is empty"), "{e}");
        }
    }

    #[test]
    fn byte_order_mark_is_skipped() {
        let text = "\u{feff}{\"sourcePort\": 80, \"targets\": [{\"host\": \"::1\", \"port\": 1}]}";
        assert!(parse_text(text).is_ok());
    }

    #[test]
    fn top_level_must_be_an_object() {
        for (text, found) in [("[]", "an empty array"), ("80", "80"), ("null", "null")] {
            let e = parse_text(text).expect_err(text);
            let msg = e.to_string();
            assert!(
                msg.starts_with("config.json: the top level must be a JSON object"),
                "{msg}"
            );
            assert!(msg.ends_with(&format!("found {found}")), "{msg}");
            assert_eq!(e.key(), None);
        }
    }

    #[test]
    fn required_keys_are_named_when_missing() {
        let e = parse_text(r#"{"targets": [{"host": "::1", "port": 1}]}"#).expect_err("no port");
        assert_eq!(e.key(), Some("sourcePort"));
        assert!(
            e.to_string()
                .contains("sourcePort: required key is missing"),
            "{e}"
        );
        let e = parse_text(r#"{"sourcePort": 80}"#).expect_err("no targets");
        assert!(
            e.to_string().contains("targets: required key is missing"),
            "{e}"
        );
    }

    #[test]
    fn source_port_must_be_a_port() {
        rejects(
            r#""sourcePort": 0"#,
            &["sourcePort", "from 1 to 65535", "found 0"],
        );
        rejects(r#""sourcePort": 65536"#, &["sourcePort", "found 65536"]);
        rejects(r#""sourcePort": -80"#, &["sourcePort", "found -80"]);
        rejects(r#""sourcePort": "80""#, &["sourcePort", "found \"80\""]);
        rejects(r#""sourcePort": 80.5"#, &["sourcePort", "found 80.5"]);
        assert_eq!(ok(r#""sourcePort": 65535"#).listen.port(), 65535);
    }

    #[test]
    fn whole_number_written_as_float_is_rejected_with_a_hint() {
        let e = rejects(
            r#""sourcePort": 80.0"#,
            &[
                "sourcePort",
                "found 80.0; write 80, without a decimal point",
            ],
        );
        assert_eq!(e.key(), Some("sourcePort"));
        rejects(
            r#""sessionExpiry": 3e4"#,
            &["sessionExpiry", "found 30000.0; write 30000,"],
        );
        rejects(
            r#""targets": [{"host": "::1", "port": 8000.0}]"#,
            &["targets[0].port", "found 8000.0"],
        );
    }

    #[test]
    fn source_host_must_be_an_ip_address() {
        rejects(
            r#""sourceHost": "localhost""#,
            &["sourceHost", "IP address", "found \"localhost\""],
        );
        rejects(r#""sourceHost": 0"#, &["sourceHost", "found 0"]);
        assert_eq!(
            ok(r#""sourceHost": "127.0.0.1""#).listen,
            "127.0.0.1:8080".parse().expect("addr")
        );
    }

    #[test]
    fn targets_must_be_a_non_empty_array_of_objects() {
        rejects(
            &targets("[]"),
            &["targets", "non-empty array", "found an empty array"],
        );
        rejects(&targets("{}"), &["targets", "found an object"]);
        rejects(&targets(r#""a:1""#), &["targets", "found \"a:1\""]);
        rejects(
            &targets(r#"[{"host": "::1", "port": 1}, "localhost:8000"]"#),
            &["targets[1]: expected an object", "found \"localhost:8000\""],
        );
    }

    #[test]
    fn target_keys_are_checked_with_their_path() {
        let e = rejects(
            &targets(r#"[{"port": 1}]"#),
            &["targets[0].host: required key is missing"],
        );
        assert_eq!(e.key(), Some("targets[0].host"));
        rejects(
            &targets(r#"[{"host": "::1"}]"#),
            &["targets[0].port: required key is missing"],
        );
        rejects(
            &targets(r#"[{"host": "", "port": 1}]"#),
            &["targets[0].host", "non-empty string", "found \"\""],
        );
        rejects(
            &targets(r#"[{"host": 5, "port": 1}]"#),
            &["targets[0].host", "found 5"],
        );
        let e = with(&targets(
            r#"[{"host": "::1", "port": 1}, {"host": "::1", "port": 2},
                {"host": "::1", "port": 70000}]"#,
        ))
        .expect_err("port out of range");
        assert_eq!(
            e.to_string(),
            "config.json: targets[2].port: expected an integer from 1 to 65535, found 70000"
        );
        rejects(
            &targets(r#"[{"host": "::1", "port": 1, "id": ""}]"#),
            &["targets[0].id", "non-empty string"],
        );
        rejects(
            &targets(r#"[{"host": "::1", "port": 1, "id": 7}]"#),
            &["targets[0].id", "found 7"],
        );
    }

    #[test]
    fn target_weight_is_at_least_one_and_capped() {
        rejects(
            &targets(r#"[{"host": "::1", "port": 1, "weight": 0}]"#),
            &["targets[0].weight", "at least 1", "found 0"],
        );
        rejects(
            &targets(r#"[{"host": "::1", "port": 1, "weight": 1.5}]"#),
            &["targets[0].weight", "found 1.5"],
        );
        let c = ok(&targets(
            r#"[{"host": "::1", "port": 1, "weight": 3}, {"host": "::1", "port": 2, "weight": 5000000}]"#,
        ));
        assert_eq!(c.targets[0].weight, 3);
        assert_eq!(c.targets[1].weight, MAX_WEIGHT);
        assert_eq!(c.warnings.len(), 1);
        let w = &c.warnings[0];
        assert!(
            w.starts_with("config.json: targets[1].weight: 5000000"),
            "{w}"
        );
        assert!(w.contains("using 1000000"), "{w}");
    }

    #[test]
    fn target_identity_is_id_or_host_port_as_written() {
        let c = ok(&targets(
            r#"[{"host": "localhost", "port": 9000}, {"host": "127.0.0.1", "port": 9000},
                {"host": "::1", "port": 9000, "id": "blue"}]"#,
        ));
        let ids: Vec<&str> = c.targets.iter().map(|t| &*t.id).collect();
        assert_eq!(ids, ["localhost:9000", "127.0.0.1:9000", "blue"]);
        assert_eq!(c.targets[2].addr, "[::1]:9000".parse().expect("addr"));
    }

    #[test]
    fn duplicate_identities_name_both_targets() {
        rejects(
            &targets(
                r#"[{"host": "::1", "port": 1}, {"host": "::1", "port": 2},
                    {"host": "::1", "port": 1}]"#,
            ),
            &["targets[2]", "targets[0]", "\"::1:1\"", "distinct \"id\""],
        );
        rejects(
            &targets(
                r#"[{"host": "::1", "port": 1, "id": "a"}, {"host": "::1", "port": 2, "id": "a"}]"#,
            ),
            &["targets[1]", "targets[0]", "\"a\""],
        );
        // An id may collide with another target's "host:port".
        rejects(
            &targets(r#"[{"host": "h", "port": 1, "id": "::1:2"}, {"host": "::1", "port": 2}]"#),
            &["targets[1]", "targets[0]", "\"::1:2\""],
        );
    }

    #[test]
    fn unknown_top_level_key_suggests_the_nearest() {
        let e = rejects(
            r#""sourcePrt": 80"#,
            &["sourcePrt: unknown key", "did you mean \"sourcePort\"?"],
        );
        match e {
            ConfigError::UnknownKey { suggestion, .. } => {
                assert_eq!(suggestion, Some("sourcePort"))
            }
            other => panic!("{other:?}"),
        }
        rejects(
            r#""SESSIONEXPIRY": 1"#,
            &["SESSIONEXPIRY", "did you mean \"sessionExpiry\"?"],
        );
        rejects(r#""zerocopy": true"#, &["did you mean \"zeroCopy\"?"]);
        rejects(r#""acessLog": true"#, &["did you mean \"accessLog\"?"]);
        let e = rejects(
            r#""banana": 1"#,
            &["banana: unknown key", "sourcePort", "accessLog"],
        );
        assert!(!e.to_string().contains("did you mean"), "{e}");
        rejects(r#""my key": 1"#, &["[\"my key\"]: unknown key"]);
    }

    #[test]
    fn unknown_target_key_suggests_the_nearest() {
        rejects(
            &targets(r#"[{"host": "::1", "port": 1}, {"hots": "::1", "port": 2}]"#),
            &["targets[1].hots: unknown key", "did you mean \"host\"?"],
        );
        rejects(
            &targets(r#"[{"host": "::1", "port": 1, "Weight": 2}]"#),
            &["targets[0].Weight", "did you mean \"weight\"?"],
        );
        rejects(
            &targets(r#"[{"host": "::1", "port": 1, "backup": true}]"#),
            &["targets[0].backup: unknown key", "host, port, weight, id"],
        );
    }

    #[test]
    fn booleans_must_be_true_or_false() {
        rejects(
            r#""stickiness": "yes""#,
            &["stickiness", "true or false", "found \"yes\""],
        );
        rejects(r#""zeroCopy": 0"#, &["zeroCopy", "found 0"]);
        rejects(r#""accessLog": null"#, &["accessLog", "found null"]);
    }

    #[test]
    fn durations_are_non_negative_milliseconds() {
        for key in [
            "targetDeactivationDuration",
            "sessionExpiry",
            "sessionExpiryInterval",
            "connectTimeout",
            "idleTimeout",
            "shutdownTimeout",
        ] {
            rejects(
                &format!(r#""{key}": -1"#),
                &[key, "milliseconds", "found -1"],
            );
            rejects(&format!(r#""{key}": "5s""#), &[key, "found \"5s\""]);
            rejects(
                &format!(r#""{key}": 31536000001"#),
                &[key, "365 days", "found 31536000001"],
            );
        }
        assert_eq!(ok(r#""sessionExpiry": 0"#).session_expiry, Duration::ZERO);
        assert_eq!(ok(r#""idleTimeout": 0"#).idle_timeout, None);
        assert_eq!(
            ok(r#""idleTimeout": 1"#).idle_timeout,
            Some(Duration::from_millis(1))
        );
    }

    #[test]
    fn sweep_interval_and_connect_timeout_must_be_positive() {
        rejects(
            r#""sessionExpiryInterval": 0"#,
            &["sessionExpiryInterval", "from 1", "found 0"],
        );
        rejects(
            r#""connectTimeout": 0"#,
            &["connectTimeout", "from 1", "found 0"],
        );
    }

    #[test]
    fn balancer_count_is_between_one_and_the_cap() {
        rejects(
            r#""balancerCount": 0"#,
            &["balancerCount", "from 1 to 1024", "found 0"],
        );
        rejects(
            r#""balancerCount": 100000"#,
            &["balancerCount", "found 100000"],
        );
        assert_eq!(ok(r#""balancerCount": 1024"#).balancer_count, 1024);
    }

    #[test]
    fn max_buffer_size_is_accepted_with_a_warning() {
        let c = ok(r#""maxBufferSize": 65536"#);
        assert_eq!(c.max_buffer_size, Some(65536));
        assert_eq!(c.warnings.len(), 1);
        let w = &c.warnings[0];
        assert!(
            w.starts_with("config.json: maxBufferSize: 65536 has no effect"),
            "{w}"
        );
        assert!(
            w.contains("no client byte before the target connects"),
            "{w}"
        );
        rejects(
            r#""maxBufferSize": -1"#,
            &["maxBufferSize", "non-negative integer", "found -1"],
        );
    }

    #[test]
    fn downgrade_to_user_is_a_name_or_uid() {
        assert_eq!(
            ok(r#""downgradeToUser": "nobody""#).downgrade_to_user,
            Some(UserSpec::Name("nobody".into()))
        );
        assert_eq!(
            ok(r#""downgradeToUser": 0"#).downgrade_to_user,
            Some(UserSpec::Uid(0))
        );
        assert_eq!(ok(r#""downgradeToUser": null"#).downgrade_to_user, None);
        rejects(
            r#""downgradeToUser": -1"#,
            &["downgradeToUser", "uid", "found -1"],
        );
        rejects(
            r#""downgradeToUser": 4294967296"#,
            &["downgradeToUser", "found 4294967296"],
        );
        rejects(
            r#""downgradeToUser": """#,
            &["downgradeToUser", "user name", "found \"\""],
        );
        rejects(
            r#""downgradeToUser": true"#,
            &["downgradeToUser", "found true"],
        );
    }

    #[test]
    fn downgrade_to_root_warns_and_an_unprivileged_user_does_not() {
        for spec in [r#""root""#, "0"] {
            let c = ok(&format!(r#""downgradeToUser": {spec}"#));
            assert_eq!(c.warnings.len(), 1, "{spec}: {:?}", c.warnings);
            let w = &c.warnings[0];
            assert!(
                w.starts_with("config.json: downgradeToUser: names root (uid 0)"),
                "{w}"
            );
            assert!(w.contains("keeps every privilege"), "{w}");
        }
        for spec in [r#""nobody""#, "65534", r#""rooter""#] {
            let c = ok(&format!(r#""downgradeToUser": {spec}"#));
            assert!(c.warnings.is_empty(), "{spec}: {:?}", c.warnings);
        }
    }

    #[test]
    fn scheduling_policy_of_any_type_is_ignored_with_a_warning() {
        for v in ["\"rr\"", "1", "null", "{\"a\": [1]}"] {
            let c = ok(&format!(r#""schedulingPolicy": {v}"#));
            assert_eq!(c.warnings.len(), 1, "{v}");
            assert!(
                c.warnings[0].contains("schedulingPolicy: is ignored"),
                "{:?}",
                c.warnings
            );
        }
    }

    #[test]
    fn balancer_controller_path_points_to_allow_and_deny() {
        let e = rejects(
            r#""balancerControllerPath": "./controller.js""#,
            &[
                "balancerControllerPath",
                "JavaScript",
                "cannot run",
                "\"allow\"",
                "\"deny\"",
            ],
        );
        assert!(matches!(e, ConfigError::Invalid { .. }), "{e:?}");
    }

    #[test]
    fn metrics_endpoint_can_move_or_be_turned_off() {
        assert_eq!(ok(r#""metricsPort": null"#).metrics, None);
        assert_eq!(
            ok(r#""metricsHost": "::1", "metricsPort": 9000"#).metrics,
            Some("[::1]:9000".parse().expect("addr"))
        );
        rejects(
            r#""metricsPort": 0"#,
            &["metricsPort", "from 1 to 65535, or null", "found 0"],
        );
        rejects(
            r#""metricsPort": "9898""#,
            &["metricsPort", "found \"9898\""],
        );
        rejects(
            r#""metricsHost": "localhost""#,
            &["metricsHost", "IP address", "found \"localhost\""],
        );
    }

    #[test]
    fn metrics_port_may_not_collide_with_the_listener() {
        rejects(
            r#""sourcePort": 9898"#,
            &["metricsPort", "9898 is also the sourcePort"],
        );
        rejects(
            r#""sourceHost": "::", "metricsHost": "127.0.0.1", "metricsPort": 8080"#,
            &["metricsPort", "8080"],
        );
        // Different addresses of the same port do not collide.
        ok(r#""sourceHost": "127.0.0.2", "metricsPort": 8080"#);
        ok(r#""sourceHost": "0.0.0.0", "metricsHost": "::1", "metricsPort": 8080"#);
        ok(r#""sourcePort": 9898, "metricsPort": null"#);
    }

    #[test]
    fn target_that_is_the_listener_itself_is_rejected() {
        rejects(
            &targets(r#"[{"host": "127.0.0.1", "port": 8080}]"#),
            &[
                "targets[0]: 127.0.0.1:8080 is stickylb's own listener (0.0.0.0:8080)",
                "loop",
            ],
        );
        rejects(
            r#""sourceHost": "::", "targets": [{"host": "localhost", "port": 8080}]"#,
            &[
                "targets[0]: localhost:8080 (resolved to ",
                "own listener ([::]:8080)",
            ],
        );
        // Same port on another machine is the usual case, not a loop.
        ok(r#""targets": [{"host": "192.0.2.10", "port": 8080}]"#);
        ok(r#""sourceHost": "192.0.2.1", "targets": [{"host": "127.0.0.1", "port": 8080}]"#);
    }

    #[test]
    fn the_listener_is_found_in_every_spelling() {
        let loops = [
            // (sourceHost, target host)
            ("0.0.0.0", "::ffff:127.0.0.1"),
            ("0.0.0.0", "0.0.0.0"),
            ("0.0.0.0", "127.0.0.5"),
            ("0.0.0.0", "127.1"),
            ("127.0.0.1", "0.0.0.0"),
            ("127.0.0.1", "::ffff:127.0.0.1"),
            ("127.0.0.1", "localhost"),
            ("::", "::"),
            ("::", "::1"),
            ("::", "127.0.0.1"),
            ("::", "::ffff:127.0.0.1"),
            ("::", "0.0.0.0"),
            ("::1", "::"),
        ];
        for (listen, host) in loops {
            rejects(
                &format!(
                    r#""sourceHost": "{listen}", "targets": [{{"host": "{host}", "port": 8080}}]"#
                ),
                &["targets[0]: ", "is stickylb's own listener", "loop back"],
            );
        }
        // Not the listener: another loopback address than a specific listener's, another
        // family than a v4-only wildcard's, or another port.
        for (listen, host, port) in [
            ("127.0.0.1", "127.0.0.2", 8080),
            ("127.0.0.2", "0.0.0.0", 8080),
            ("0.0.0.0", "::1", 8080),
            ("0.0.0.0", "::", 8080),
            ("::1", "0.0.0.0", 8080),
            ("0.0.0.0", "127.0.0.1", 8081),
        ] {
            ok(&format!(
                r#""sourceHost": "{listen}", "targets": [{{"host": "{host}", "port": {port}}}]"#
            ));
        }
    }

    #[test]
    fn a_wildcard_listener_is_reached_through_every_interface_address() {
        let listen: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let dual: SocketAddr = "[::]:8080".parse().unwrap();
        let eth: IpAddr = "192.0.2.7".parse().unwrap();
        let eth6: IpAddr = "2001:db8::7".parse().unwrap();
        let local = [eth, eth6];
        let at = |ip: IpAddr| SocketAddr::new(ip, 8080);
        assert!(is_own_listener(listen, at(eth), &local));
        assert!(is_own_listener(
            listen,
            at("::ffff:192.0.2.7".parse().unwrap()),
            &local
        ));
        assert!(
            !is_own_listener(listen, at(eth6), &local),
            "v4-only wildcard"
        );
        assert!(is_own_listener(dual, at(eth6), &local));
        assert!(is_own_listener(dual, at(eth), &local));
        assert!(!is_own_listener(
            listen,
            at("192.0.2.8".parse().unwrap()),
            &local
        ));
        // A specific listener receives only on its own address.
        let specific: SocketAddr = "192.0.2.8:8080".parse().unwrap();
        assert!(!is_own_listener(specific, at(eth), &local));
        // And through the config, with this machine's real addresses.
        for ip in crate::sys::local_addresses().expect("getifaddrs") {
            if let IpAddr::V6(v6) = ip {
                if v6.segments()[0] & 0xffc0 == 0xfe80 {
                    continue; // link-local: needs a scope id to be connected to
                }
            }
            rejects(
                &format!(r#""sourceHost": "::", "targets": [{{"host": "{ip}", "port": 8080}}]"#),
                &["is stickylb's own listener"],
            );
        }
    }

    #[test]
    fn connection_limits_are_non_negative_integers() {
        for key in ["maxConnections", "maxConnectionsPerClient", "maxSessions"] {
            rejects(
                &format!(r#""{key}": -1"#),
                &[key, "non-negative integer", "found -1"],
            );
            rejects(&format!(r#""{key}": 1.5"#), &[key, "found 1.5"]);
        }
        assert_eq!(ok(r#""maxSessions": 12"#).max_sessions, 12);
    }

    #[test]
    fn allow_and_deny_are_lists_of_cidr_ranges() {
        let c = ok(r#""allow": ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"], "deny": []"#);
        let allow: Vec<String> = c.allow.iter().map(|c| c.to_string()).collect();
        assert_eq!(allow, ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"]);
        rejects(
            r#""allow": ["10.0.0.0/8", "10.1.0.0/8"]"#,
            &[
                "allow[1]",
                "found \"10.1.0.0/8\"",
                "did you mean \"10.0.0.0/8\"",
            ],
        );
        rejects(
            r#""deny": ["10.0.0.0/33"]"#,
            &["deny[0]", "prefix length", "found \"10.0.0.0/33\""],
        );
        rejects(
            r#""deny": ["example.com"]"#,
            &["deny[0]", "not an IPv4 or IPv6 address"],
        );
        rejects(r#""deny": [10]"#, &["deny[0]", "CIDR range", "found 10"]);
        rejects(
            r#""allow": "10.0.0.0/8""#,
            &["allow", "array of CIDR ranges", "found \"10.0.0.0/8\""],
        );
    }

    #[test]
    fn duplicate_key_in_the_file_last_one_wins() {
        assert_eq!(ok(r#""sourcePort": 8081"#).listen.port(), 8081);
    }

    #[test]
    fn unresolvable_host_is_a_resolve_error_naming_the_target() {
        let e = with(&targets(
            r#"[{"host": "::1", "port": 1}, {"host": "no-such-host.invalid", "port": 80}]"#,
        ))
        .expect_err("unresolvable");
        match &e {
            ConfigError::Resolve {
                key, host, port, ..
            } => {
                assert_eq!(
                    (key.as_str(), host.as_str(), *port),
                    ("targets[1].host", "no-such-host.invalid", 80)
                );
            }
            other => panic!("{other:?}"),
        }
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                "config.json: targets[1].host: cannot resolve host \"no-such-host.invalid\""
            ),
            "{msg}"
        );
    }

    #[test]
    fn ip_literal_target_resolves_to_itself() {
        let c = ok(&targets(r#"[{"host": "192.0.2.55", "port": 443}]"#));
        assert_eq!(c.targets[0].addr, "192.0.2.55:443".parse().expect("addr"));
    }

    #[test]
    fn load_names_the_file_when_it_cannot_be_read() {
        let path = Path::new("/nonexistent-dir-of-stickylb/config.json");
        let e = load(path).expect_err("missing file");
        assert!(matches!(e, ConfigError::Io { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.starts_with("/nonexistent-dir-of-stickylb/config.json: cannot read"),
            "{msg}"
        );
        assert!(msg.contains("No such file"), "{msg}");
    }

    #[test]
    fn load_reads_and_parses_the_file() {
        let dir = std::env::temp_dir().join(format!("stickylb-config-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("lb.json");
        std::fs::write(
            &path,
            r#"{"sourcePort": 81, "targets": [{"host": "::1", "port": 1}]}"#,
        )
        .expect("write");
        let c = load(&path);
        let bad = std::fs::write(&path, "{\"sourcePort\": 0}").map(|_| load(&path));
        std::fs::remove_dir_all(&dir).expect("clean up");
        let c = c.expect("valid file");
        assert_eq!((c.listen.port(), c.path.clone()), (81, path.clone()));
        let e = bad.expect("write").expect_err("invalid file");
        assert!(
            e.to_string()
                .starts_with(&format!("{}: sourcePort:", path.display())),
            "{e}"
        );
    }

    #[test]
    fn effective_json_has_every_key_in_the_files_names() {
        let c = ok(
            r#""metricsPort": null, "idleTimeout": 0, "downgradeToUser": 7,
                      "allow": ["10.0.0.0/8"]"#,
        );
        let v = effective_json(&c);
        let Value::Object(map) = &v else {
            panic!("{v}")
        };
        for (key, _) in KEYS {
            let shown = map.contains_key(*key);
            let ignored = matches!(*key, "schedulingPolicy" | "balancerControllerPath");
            assert_eq!(shown, !ignored, "{key}");
        }
        assert_eq!(map.len(), KEYS.len() - 2);
        assert_eq!(v["sourcePort"], 8080);
        assert_eq!(v["sourceHost"], "0.0.0.0");
        assert_eq!(v["metricsPort"], Value::Null);
        assert_eq!(v["idleTimeout"], 0);
        assert_eq!(v["sessionExpiry"], 30000);
        assert_eq!(v["maxBufferSize"], 8192);
        assert_eq!(v["downgradeToUser"], 7);
        assert_eq!(v["allow"], json!(["10.0.0.0/8"]));
        assert_eq!(
            v["targets"],
            json!([{"id": "127.0.0.1:9000", "host": "127.0.0.1", "port": 9000, "weight": 1}])
        );
        let v = effective_json(&ok(r#""downgradeToUser": "www""#));
        assert_eq!(v["metricsHost"], "127.0.0.1");
        assert_eq!(v["metricsPort"], 9898);
        assert_eq!(v["downgradeToUser"], "www");
    }

    #[test]
    fn edit_distance_counts_single_character_edits() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("abc", ""), 3);
        assert_eq!(edit_distance("sourceprt", "sourceport"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("hots", "host"), 1);
        assert_eq!(edit_distance("ab", "ba"), 1);
        assert_eq!(nearest("hostname", TARGET_KEYS), None);
        assert_eq!(nearest("x", TARGET_KEYS), None);
        assert_eq!(nearest("ID", TARGET_KEYS), Some("id"));
        assert_eq!(nearest(&"h".repeat(100_000), TARGET_KEYS), None);
    }

    #[test]
    fn json_paths_quote_odd_keys() {
        assert_eq!(join("", "sourcePort"), "sourcePort");
        assert_eq!(join("targets[1]", "port"), "targets[1].port");
        assert_eq!(join("", "a.b"), "[\"a.b\"]");
        assert_eq!(join("targets[0]", ""), "targets[0][\"\"]");
    }
}
