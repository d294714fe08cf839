//! Which stickylb this is: the version label of `stickylb_build_info`, of the start-up line and
//! of an upgrade's log lines.
//!
//! The label is the crate version, plus, when the environment sets `STICKYLB_BUILD_TAG`, a `+`
//! and that tag (semver's build metadata: `0.1.0+canary`). The tag lets an operator (and the
//! upgrade tests) tell two builds of one version apart in the metrics without compiling twice:
//! an upgrade starts the binary at the same path, and a wrapper there may set a different tag.
//! A tag that is empty, longer than [`MAX_TAG`] or holds anything but ASCII letters, digits,
//! `.` and `-` is ignored (a label value must stay a plain token).
//!
//! A leaf: the admin endpoint, the command line and the upgrade coordinator all print it.

use std::sync::OnceLock;

/// The variable read once, at the first call of [`label`].
pub const TAG_VARIABLE: &str = "STICKYLB_BUILD_TAG";

/// The longest tag taken.
pub const MAX_TAG: usize = 64;

/// `0.1.0`, or `0.1.0+TAG` with `STICKYLB_BUILD_TAG=TAG`.
pub fn label() -> &'static str {
    static LABEL: OnceLock<String> = OnceLock::new();
    LABEL.get_or_init(|| with_tag(std::env::var(TAG_VARIABLE).ok().as_deref()))
}

fn with_tag(tag: Option<&str>) -> String {
    let version = env!("CARGO_PKG_VERSION");
    match tag {
        Some(tag) if valid_tag(tag) => format!("{version}+{tag}"),
        _ => version.to_string(),
    }
}

fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= MAX_TAG
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_tag_is_appended_and_anything_else_is_ignored() {
        let v = env!("CARGO_PKG_VERSION");
        assert_eq!(with_tag(None), v);
        assert_eq!(with_tag(Some("b")), format!("{v}+b"));
        assert_eq!(with_tag(Some("rc.1-x")), format!("{v}+rc.1-x"));
        for bad in ["", "a b", "a\"b", "ä", &"x".repeat(MAX_TAG + 1)] {
            assert_eq!(with_tag(Some(bad)), v, "{bad:?}");
        }
    }
}
