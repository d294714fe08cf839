//! Outside tools some tests run (`promtool`, `prometheus`, and the interop tests' HAProxy,
//! nginx and Chromium): one rule for all of them.
//!
//! The README's test command, `scripts/test`, installs every tool first and sets
//! [`REQUIRE_TOOLS`]`=1`: there a missing tool fails its test, so that command never passes
//! with a check left out. A plain `cargo test` (no variable) runs everything that needs no
//! outside tool; a check whose tool is missing is skipped with a line that says so.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The variable `scripts/test` sets to `1`: every outside tool is required.
pub const REQUIRE_TOOLS: &str = "STICKYLB_REQUIRE_TOOLS";

/// Whether `tool` is an executable on `PATH`. When it is not: with `STICKYLB_REQUIRE_TOOLS=1`
/// this panics (the test fails); otherwise it prints `skipped: <tool> not installed; run
/// scripts/test` and returns false, and the caller returns without its check.
///
/// The line goes straight to the process's stderr, not through `eprintln!`, which the test
/// harness captures and shows only for a failed test: a skip must show in a passing run.
#[track_caller]
pub fn require_tool(tool: &str) -> bool {
    if on_path(tool) {
        return true;
    }
    if std::env::var(REQUIRE_TOOLS).as_deref() == Ok("1") {
        panic!("{tool} is not installed ({REQUIRE_TOOLS}=1): scripts/test installs it");
    }
    let _ = writeln!(
        std::io::stderr(),
        "skipped: {tool} not installed; run scripts/test"
    );
    false
}

fn on_path(tool: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| executable(&dir.join(tool)))
}

fn executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether this process runs as root, which some checks need (running stickylb as another
/// user, the per-user pipe budget). When it does not: with `STICKYLB_REQUIRE_TOOLS=1` this
/// panics; otherwise it prints `skipped: <what> needs root` and returns false.
#[track_caller]
pub fn require_root(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var(REQUIRE_TOOLS).as_deref() == Ok("1") {
        panic!("{what} needs root ({REQUIRE_TOOLS}=1)");
    }
    let _ = writeln!(std::io::stderr(), "skipped: {what} needs root");
    false
}
