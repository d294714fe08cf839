//! Black-box tests of `stickylb check --config PATH`: the contract an operator (or a CI job)
//! relies on to validate a config before deploying it.
//!
//! A valid file prints the effective config as JSON on stdout and exits 0; an invalid or
//! missing file prints `error: ...` naming the file (and the JSON path) on stderr and exits 1;
//! wrong usage exits 2. Each test writes its files to its own directory under the system temp
//! directory and removes it afterwards.
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};
use stickylb_testkit::TempDir;

fn stickylb(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stickylb"))
        .args(args)
        .output()
        .expect("run stickylb")
}

fn check(config: &Path) -> Output {
    let path = config.to_str().expect("temp paths are UTF-8");
    stickylb(&["check", "--config", path])
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts the run failed with `code` and returns its stderr.
fn failed(out: &Output, code: i32) -> String {
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {stderr}",
        text(&out.stdout)
    );
    stderr
}

#[test]
fn valid_config_prints_effective_json_and_exits_0() {
    let dir = TempDir::new("valid");
    let path = dir.file(
        "config.json",
        r#"{"sourcePort": 8080, "idleTimeout": 250,
            "targets": [{"host": "127.0.0.1", "port": 9001, "weight": 2},
                        {"host": "::1", "port": 9002, "id": "b"}]}"#,
    );
    let out = check(&path);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let v: Value = serde_json::from_str(&stdout).expect("stdout is the effective JSON");
    assert_eq!(v["sourcePort"], 8080);
    assert_eq!(v["sourceHost"], "0.0.0.0");
    assert_eq!(v["idleTimeout"], 250);
    // Defaults are filled in.
    assert_eq!(v["sessionExpiry"], 30000);
    assert_eq!(v["metricsPort"], 9898);
    assert_eq!(v["zeroCopy"], true);
    assert_eq!(v["targets"][0]["id"], "127.0.0.1:9001");
    assert_eq!(v["targets"][0]["weight"], 2);
    assert_eq!(v["targets"][1]["id"], "b");
    // Resolved addresses go to stderr, so stdout is itself a valid config.
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("targets[0] (127.0.0.1:9001) resolves to 127.0.0.1:9001"),
        "{stderr}"
    );
    assert!(
        stderr.contains("targets[1] (b) resolves to [::1]:9002"),
        "{stderr}"
    );
    let again = dir.file("again.json", &stdout);
    let out = check(&again);
    assert_eq!(
        out.status.code(),
        Some(0),
        "check's output is a valid config: {}",
        text(&out.stderr)
    );
}

#[test]
fn loadbalancer_js_config_checks_unchanged_with_warnings() {
    let dir = TempDir::new("lbjs");
    let path = dir.file("config.json", include_str!("fixtures/loadbalancer-js.json"));
    let out = check(&path);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let v: Value = serde_json::from_str(&text(&out.stdout)).expect("effective JSON");
    assert_eq!(v["downgradeToUser"], "someuser");
    assert_eq!(v["targets"][1]["id"], "localhost:8001");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("schedulingPolicy"), "{stderr}");
    assert!(stderr.contains("maxBufferSize"), "{stderr}");
}

#[test]
fn invalid_value_exits_1_naming_file_and_path() {
    let dir = TempDir::new("invalid");
    let path = dir.file(
        "lb.json",
        r#"{"sourcePort": 8080, "targets": [{"host": "::1", "port": 1},
            {"host": "::1", "port": 2}, {"host": "::1", "port": 70000}]}"#,
    );
    let out = check(&path);
    let stderr = failed(&out, 1);
    let want = format!(
        "error: {}: targets[2].port: expected an integer from 1 to 65535, found 70000",
        path.display()
    );
    assert!(stderr.contains(&want), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout: {}",
        text(&out.stdout)
    );
}

#[test]
fn unknown_key_exits_1_with_a_suggestion() {
    let dir = TempDir::new("unknown");
    let path = dir.file(
        "config.json",
        r#"{"sourcePrt": 8080, "targets": [{"host": "::1", "port": 1}]}"#,
    );
    let stderr = failed(&check(&path), 1);
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    assert!(stderr.contains("sourcePrt"), "{stderr}");
    assert!(stderr.contains("did you mean \"sourcePort\""), "{stderr}");
}

#[test]
fn syntax_error_exits_1_with_line_and_column() {
    let dir = TempDir::new("syntax");
    let path = dir.file(
        "config.json",
        "{\n  \"sourcePort\": 8080\n  \"targets\": []\n}\n",
    );
    let stderr = failed(&check(&path), 1);
    let want = format!("error: {}:3:3: invalid JSON", path.display());
    assert!(stderr.contains(&want), "{stderr}");
}

#[test]
fn unresolvable_host_exits_1_naming_the_target() {
    let dir = TempDir::new("resolve");
    let path = dir.file(
        "config.json",
        r#"{"sourcePort": 8080, "targets": [{"host": "no-such-host.invalid", "port": 1}]}"#,
    );
    let stderr = failed(&check(&path), 1);
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    assert!(stderr.contains("targets[0].host"), "{stderr}");
    assert!(stderr.contains("no-such-host.invalid"), "{stderr}");
}

#[test]
fn balancer_controller_path_exits_1_pointing_to_allow_and_deny() {
    let dir = TempDir::new("controller");
    let path = dir.file(
        "config.json",
        r#"{"sourcePort": 8080, "balancerControllerPath": "./ctl.js",
            "targets": [{"host": "::1", "port": 1}]}"#,
    );
    let stderr = failed(&check(&path), 1);
    assert!(stderr.contains("balancerControllerPath"), "{stderr}");
    assert!(stderr.contains("\"allow\""), "{stderr}");
    assert!(stderr.contains("\"deny\""), "{stderr}");
}

#[test]
fn missing_file_exits_1_naming_it() {
    let dir = TempDir::new("missing");
    let path = dir.path("absent.json");
    let stderr = failed(&check(&path), 1);
    assert!(stderr.contains("error: "), "{stderr}");
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
}

#[test]
fn unknown_flag_exits_2() {
    let out = stickylb(&["check", "--no-such-flag"]);
    failed(&out, 2);
}
