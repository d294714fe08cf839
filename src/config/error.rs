//! What can go wrong while loading a config, as a type callers can act on.
//!
//! Each variant is one stage of loading (reading the file, JSON syntax, the meaning of a key,
//! name resolution), so a caller can tell "the file is half-written" from "a host does not
//! resolve" without parsing messages (the reloader only logs and counts them today). Every variant carries the file, and all but `Io` and
//! `Syntax` the JSON path of the key (such as `targets[2].port`), so that its one-line
//! `Display` is enough for an operator to find and fix the problem:
//!
//! ```text
//! config.json: targets[2].port: expected an integer from 1 to 65535, found 70000
//! ```
use std::path::PathBuf;

/// Why a config file was rejected. `Display` gives one line that starts with the file name.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, unreadable, not UTF-8, ...).
    #[error("{}: cannot read the config file: {source}", file.display())]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The path is not a file stickylb reads as a config: not a regular file (a directory, a
    /// named pipe, a device, ...), or larger than [`super::MAX_BYTES`].
    #[error("{}: {message}", file.display())]
    File { file: PathBuf, message: String },

    /// The text is not JSON, or nests deeper or holds more values than a config file may (see
    /// [`super::MAX_DEPTH`]). `line` and `column` are 1-based, as editors show them.
    #[error("{}:{line}:{column}: invalid JSON: {message}", file.display())]
    Syntax {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },

    /// A key has a value of the wrong type or out of range, a required key is missing, or
    /// keys contradict each other. `key` is the JSON path; it is empty when the problem is
    /// the document itself (for example a top level that is not an object).
    #[error("{}: {}{message}", file.display(), key_prefix(key))]
    Invalid {
        file: PathBuf,
        key: String,
        message: String,
    },

    /// A key that stickylb does not know, most often a typo. `suggestion` is the nearest
    /// valid key, if one is near enough; `valid` lists every key allowed at that place.
    #[error("{}: {key}: unknown key; {}", file.display(), unknown_hint(suggestion, valid))]
    UnknownKey {
        file: PathBuf,
        key: String,
        suggestion: Option<&'static str>,
        valid: Vec<&'static str>,
    },

    /// A target's host name did not resolve to any address. `key` is `targets[i].host`.
    #[error("{}: {key}: cannot resolve host {host:?} (port {port}): {reason}", file.display())]
    Resolve {
        file: PathBuf,
        key: String,
        host: String,
        port: u16,
        reason: String,
    },
}

impl ConfigError {
    /// The JSON path of the key at fault, when the error is about one key.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } if !key.is_empty() => Some(key),
            ConfigError::UnknownKey { key, .. } | ConfigError::Resolve { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// `"key: "`, or nothing for an error about the whole document.
fn key_prefix(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!("{key}: ")
    }
}

fn unknown_hint(suggestion: &Option<&'static str>, valid: &[&str]) -> String {
    match suggestion {
        Some(s) => format!("did you mean {s:?}?"),
        None => format!("the keys allowed here are {}", valid.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_one_line_starting_with_the_file() {
        let e = ConfigError::Invalid {
            file: "config.json".into(),
            key: "targets[2].port".into(),
            message: "expected an integer from 1 to 65535, found 70000".into(),
        };
        assert_eq!(
            e.to_string(),
            "config.json: targets[2].port: expected an integer from 1 to 65535, found 70000"
        );
        assert_eq!(e.key(), Some("targets[2].port"));
    }

    #[test]
    fn display_of_a_document_error_has_no_empty_key() {
        let e = ConfigError::Invalid {
            file: "c.json".into(),
            key: String::new(),
            message: "the top level must be a JSON object".into(),
        };
        assert_eq!(e.to_string(), "c.json: the top level must be a JSON object");
        assert_eq!(e.key(), None);
    }

    #[test]
    fn display_of_syntax_error_gives_line_and_column() {
        let e = ConfigError::Syntax {
            file: "config.json".into(),
            line: 3,
            column: 14,
            message: "expected `,` or `}`".into(),
        };
        assert_eq!(
            e.to_string(),
            "config.json:3:14: invalid JSON: expected `,` or `}`"
        );
    }

    #[test]
    fn display_of_unknown_key_suggests_or_lists() {
        let e = ConfigError::UnknownKey {
            file: "config.json".into(),
            key: "sourcePrt".into(),
            suggestion: Some("sourcePort"),
            valid: vec!["sourcePort", "targets"],
        };
        assert_eq!(
            e.to_string(),
            "config.json: sourcePrt: unknown key; did you mean \"sourcePort\"?"
        );
        let e = ConfigError::UnknownKey {
            file: "config.json".into(),
            key: "targets[0].zzz".into(),
            suggestion: None,
            valid: vec!["host", "port"],
        };
        assert_eq!(
            e.to_string(),
            "config.json: targets[0].zzz: unknown key; the keys allowed here are host, port"
        );
    }

    #[test]
    fn display_of_io_error_names_file_and_os_error() {
        let e = ConfigError::Io {
            file: "/nope/config.json".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let s = e.to_string();
        assert!(
            s.starts_with("/nope/config.json: cannot read the config file: "),
            "{s}"
        );
    }
}
