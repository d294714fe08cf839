//! The `healthCheck` key (design §12), at the top level and per target, read into a
//! [`HealthCheck`] for each target.
//!
//! A target's own `healthCheck` object is laid over the top-level one key by key (the keys it
//! gives win, the others come from the top level, then from the defaults), as a server line's
//! `inter`/`rise`/`fall` override a `default-server` line in HAProxy. Per target, `false` turns
//! checks off for that target and `null` (or no key) inherits the top level. `null` for `send`,
//! `expect` or `port` inside an object unsets a value the top level gave.

use std::time::Duration;

use serde_json::{json, Value};

use super::{check_keys, describe, ConfigError, Field};
use crate::config::HealthCheck;

/// The keys of a `healthCheck` object.
pub(super) const KEYS: &[&str] = &[
    "interval", "timeout", "rise", "fall", "send", "expect", "port",
];

/// The defaults of design §12.
const DEFAULT_INTERVAL: Duration = Duration::from_millis(2_000);
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(1_000);
const DEFAULT_RISE: u32 = 2;
const DEFAULT_FALL: u32 = 3;

/// Shortest `interval`: a target checked more often than this spends a core on checks.
const MIN_INTERVAL_MS: u64 = 10;
/// Largest `rise` and `fall`.
const MAX_COUNT: u64 = 1000;

const WHAT: &str = "an object such as {\"interval\": 2000, \"timeout\": 1000, \"rise\": 2, \
                    \"fall\": 3}, or false (no checks)";

/// A `healthCheck` object as written: each key given or not. For `send`, `expect` and `port`,
/// `Some(None)` is a key given as `null`.
#[derive(Debug, Default, Clone)]
pub(super) struct Patch {
    interval: Option<Duration>,
    timeout: Option<Duration>,
    rise: Option<u32>,
    fall: Option<u32>,
    send: Option<Option<String>>,
    expect: Option<Option<String>>,
    port: Option<Option<u16>>,
}

/// What one target's `healthCheck` says.
#[derive(Debug, Default)]
pub(super) enum TargetCheck {
    /// No key, or `null`: the top-level check, if any.
    #[default]
    Inherit,
    /// `false`: no checks for this target.
    Off,
    /// An object, laid over the top-level one.
    Own(Patch),
}

impl TargetCheck {
    /// The check this target runs, given the top-level `healthCheck`.
    pub(super) fn resolve(&self, top: Option<&Patch>) -> Option<HealthCheck> {
        match self {
            TargetCheck::Inherit => top.map(|p| p.resolve(None)),
            TargetCheck::Off => None,
            TargetCheck::Own(own) => Some(own.resolve(top)),
        }
    }
}

impl Patch {
    /// `self` over `base` (the keys given here win), then the defaults.
    pub(super) fn resolve(&self, base: Option<&Patch>) -> HealthCheck {
        let base = base.cloned().unwrap_or_default();
        HealthCheck {
            interval: self.interval.or(base.interval).unwrap_or(DEFAULT_INTERVAL),
            timeout: self.timeout.or(base.timeout).unwrap_or(DEFAULT_TIMEOUT),
            rise: self.rise.or(base.rise).unwrap_or(DEFAULT_RISE),
            fall: self.fall.or(base.fall).unwrap_or(DEFAULT_FALL),
            send: self.send.clone().or(base.send).flatten(),
            expect: self.expect.clone().or(base.expect).flatten(),
            port: self.port.or(base.port).flatten(),
        }
    }
}

/// The top-level `healthCheck`: an object, or `false`/`null` (off).
pub(super) fn read_top(f: &Field<'_>) -> Result<Option<Patch>, ConfigError> {
    match f.value {
        Value::Null | Value::Bool(false) => Ok(None),
        Value::Object(_) => read_object(f).map(Some),
        _ => Err(f.expected(WHAT)),
    }
}

/// `targets[i].healthCheck`: an object, `false` (off) or `null` (the top level's).
pub(super) fn read_target(f: &Field<'_>) -> Result<TargetCheck, ConfigError> {
    match f.value {
        Value::Null => Ok(TargetCheck::Inherit),
        Value::Bool(false) => Ok(TargetCheck::Off),
        Value::Object(_) => read_object(f).map(TargetCheck::Own),
        _ => Err(f.expected(&format!("{WHAT}, or null (the top-level healthCheck)"))),
    }
}

fn read_object(f: &Field<'_>) -> Result<Patch, ConfigError> {
    let Value::Object(map) = f.value else {
        return Err(f.expected(WHAT));
    };
    check_keys(f.file, &f.path, map, KEYS)?;
    let mut p = Patch::default();
    for (key, value) in map {
        let c = f.child(key, value);
        match key.as_str() {
            "interval" => p.interval = Some(c.millis(MIN_INTERVAL_MS)?),
            "timeout" => p.timeout = Some(c.millis(1)?),
            // Bounded by MAX_COUNT, so the conversions are exact.
            "rise" => p.rise = Some(c.integer(1, MAX_COUNT)? as u32),
            "fall" => p.fall = Some(c.integer(1, MAX_COUNT)? as u32),
            "send" => p.send = Some(optional(&c, |c| c.non_empty_string())?),
            "expect" => p.expect = Some(optional(&c, expect)?),
            "port" => p.port = Some(optional(&c, |c| c.port())?),
            _ => {} // check_keys let only KEYS through
        }
    }
    Ok(p)
}

/// `null`, or what `read` makes of the value.
fn optional<T>(
    f: &Field<'_>,
    read: impl Fn(&Field<'_>) -> Result<T, ConfigError>,
) -> Result<Option<T>, ConfigError> {
    match f.value {
        Value::Null => Ok(None),
        _ => read(f).map(Some),
    }
}

/// `expect`: a non-empty string that fits in the part of the reply that is searched.
fn expect(f: &Field<'_>) -> Result<String, ConfigError> {
    let what = format!(
        "a non-empty string of at most {} bytes (it is searched for in the first {} bytes of \
         the reply)",
        HealthCheck::EXPECT_WINDOW,
        HealthCheck::EXPECT_WINDOW
    );
    match f.value {
        Value::String(s) if !s.is_empty() && s.len() <= HealthCheck::EXPECT_WINDOW => Ok(s.clone()),
        Value::String(s) if s.len() > HealthCheck::EXPECT_WINDOW => Err(f.error(format!(
            "expected {what}, found a string of {} bytes",
            s.len()
        ))),
        _ => Err(f.error(format!("expected {what}, found {}", describe(f.value)))),
    }
}

/// A check as `stickylb check` prints it: every key, so that the output is a valid config.
pub(super) fn effective_json(h: &HealthCheck) -> Value {
    let ms = crate::clock::duration_ms;
    json!({
        "interval": ms(h.interval),
        "timeout": ms(h.timeout),
        "rise": h.rise,
        "fall": h.fall,
        "send": h.send,
        "expect": h.expect,
        "port": h.port,
    })
}
