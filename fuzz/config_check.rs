//! What is checked for one config text, by the `config` fuzz target
//! (`fuzz/fuzz_targets/config.rs`) and by the property tests (`tests/config_props.rs`), so that
//! both hold the parser to the same properties:
//!
//! 1. `Config::parse` returns (no panic, whatever the text);
//! 2. a rejection's message is one line that starts with the file name (the operator's grep
//!    and the reload log line rely on it), and names a key whenever it is about one;
//! 3. an accepted config is a fixed point of its effective form: the effective JSON that
//!    `stickylb check` prints, read back as a config, is accepted and yields the same config
//!    (same effective JSON, same fields), so `check`'s output can be saved and used.
//!
//! The effective JSON differs from an input file in two output-only ways, which are undone
//! before reading it back: each target's `address` (the resolved address, not a key a file may
//! set) and `metricsHost: null` when metrics are off (a file says that with `metricsPort:
//! null` alone). See docs/reliability.md.
//!
//! Host names: `Config::parse` resolves target hosts through the system resolver. A fuzzer
//! that invents host names would send a DNS query per input to whatever resolver the machine
//! has, which is neither what is being tested nor traffic to send. [`without_dns`] rewrites a
//! target host that is not an IP literal nor `localhost` (answered from /etc/hosts) to
//! `localhost`, for texts that are valid JSON; texts that are not never reach resolution.

use std::borrow::Cow;
use std::net::IpAddr;
use std::path::Path;

use serde_json::Value;
use stickylb::config::{Config, ConfigError};

/// The file name every message must start with.
pub const FILE: &str = "fuzz.json";

/// Checks the properties above for `text`; panics (with the text) when one does not hold.
pub fn check(text: &str) {
    let text = without_dns(text);
    match Config::parse(Path::new(FILE), &text) {
        Err(error) => check_rejection(&text, &error),
        Ok(config) => check_fixed_point(&text, &config),
    }
}

/// `text`, with every target host that would need DNS replaced by `localhost`.
pub fn without_dns(text: &str) -> Cow<'_, str> {
    let text_without_bom = text.strip_prefix('\u{feff}').unwrap_or(text);
    let Ok(mut doc) = serde_json::from_str::<Value>(text_without_bom) else {
        return Cow::Borrowed(text);
    };
    let mut changed = false;
    if let Some(Value::Array(targets)) = doc.get_mut("targets") {
        for target in targets {
            if let Some(host) = target.get_mut("host") {
                if let Value::String(name) = host {
                    if name.parse::<IpAddr>().is_err() && name != "localhost" && !name.is_empty() {
                        *host = Value::from("localhost");
                        changed = true;
                    }
                }
            }
        }
    }
    if changed {
        Cow::Owned(doc.to_string())
    } else {
        Cow::Borrowed(text)
    }
}

fn check_rejection(text: &str, error: &ConfigError) {
    let message = error.to_string();
    assert!(
        message.starts_with(FILE),
        "the message does not start with the file name: {message:?}\ninput: {text:?}"
    );
    assert!(
        !message.contains('\n') && !message.contains('\r'),
        "the message is not one line: {message:?}\ninput: {text:?}"
    );
    if let Some(key) = error.key() {
        assert!(
            message.contains(key),
            "the message does not name its key {key:?}: {message:?}\ninput: {text:?}"
        );
    }
}

/// The effective JSON of `config`, made back into a config file's text.
pub fn effective_as_file(config: &Config) -> Value {
    let mut doc = config.effective_json();
    if let Some(Value::Array(targets)) = doc.get_mut("targets") {
        for target in targets {
            if let Some(target) = target.as_object_mut() {
                target.remove("address");
            }
        }
    }
    if let Some(map) = doc.as_object_mut() {
        if map.get("metricsHost") == Some(&Value::Null) {
            map.remove("metricsHost");
        }
    }
    doc
}

fn check_fixed_point(text: &str, config: &Config) {
    let effective = effective_as_file(config);
    let again_text = serde_json::to_string_pretty(&effective).expect("JSON prints");
    let again = match Config::parse(Path::new(FILE), &again_text) {
        Ok(again) => again,
        Err(e) => panic!(
            "the effective config is rejected: {e}\ninput: {text:?}\neffective: {again_text}"
        ),
    };
    assert_eq!(
        again.effective_json(),
        config.effective_json(),
        "reading the effective config back changed it\ninput: {text:?}"
    );
    // Field by field, but for what only the text can tell: the warnings it caused, and
    // whether `maxBufferSize` was written (the effective JSON always writes it).
    let mut expected = config.clone();
    expected.warnings.clone_from(&again.warnings);
    expected.max_buffer_size = again.max_buffer_size;
    assert_eq!(
        again, expected,
        "reading the effective config back changed a field\ninput: {text:?}"
    );
}
