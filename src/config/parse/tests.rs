//! The unit tests of the config parser: every key, default, error message and choice of
//! `parse.rs`, one test per rule.

use super::*;
use crate::config::HealthCheck;
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
    let c = parse_text(include_str!("../../../tests/fixtures/loadbalancer-js.json"))
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
    assert!(c
        .warnings
        .iter()
        .any(|w| w.contains("maxBufferSize") && w.contains("no effect") && w.contains("kernel")));
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
    assert_eq!(c.max_connect_attempts, 3);
    assert_eq!(c.tcp_keepalive, Some(Keepalive::default()));
    let k = Keepalive::default();
    assert_eq!(
        (k.idle.as_secs(), k.interval.as_secs(), k.count),
        (60, 10, 6)
    );
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
        "accessLog": true, "maxConnectAttempts": 7,
        "tcpKeepalive": {"idle": 30000, "interval": 5000, "count": 3}
    "#);
    assert_eq!(c.max_connect_attempts, 7);
    assert_eq!(
        c.tcp_keepalive,
        Some(Keepalive {
            idle: Duration::from_secs(30),
            interval: Duration::from_secs(5),
            count: 3
        })
    );
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
fn max_connect_attempts_is_at_least_one() {
    rejects(
        r#""maxConnectAttempts": 0"#,
        &["maxConnectAttempts", "from 1 to 1024", "found 0"],
    );
    rejects(
        r#""maxConnectAttempts": "3""#,
        &["maxConnectAttempts", "found \"3\""],
    );
    assert_eq!(ok(r#""maxConnectAttempts": 1"#).max_connect_attempts, 1);
}

#[test]
fn proxy_protocol_is_v1_v2_or_false_and_a_target_overrides_the_top_level() {
    let text = r#""proxyProtocol": "v2", "targets": [
        {"host": "127.0.0.1", "port": 9000},
        {"host": "127.0.0.1", "port": 9001, "proxyProtocol": "v1"},
        {"host": "127.0.0.1", "port": 9002, "proxyProtocol": false}]"#;
    let c = ok(text);
    let sent: Vec<_> = c.targets.iter().map(|t| t.proxy_protocol).collect();
    assert_eq!(sent, [Some(ProxyVersion::V2), Some(ProxyVersion::V1), None]);
    assert_eq!(ok("").proxy_protocol, None);
    rejects(
        r#""proxyProtocol": true"#,
        &["proxyProtocol", "\"v1\", \"v2\" or false", "found true"],
    );
    rejects(
        r#""targets": [{"host": "127.0.0.1", "port": 1, "proxyProtocol": "v3"}]"#,
        &["targets[0].proxyProtocol", "found \"v3\""],
    );
}

#[test]
fn accepted_proxy_headers_come_from_listed_upstreams_within_a_timeout() {
    let c = ok(r#""acceptProxyProtocol": ["10.0.0.0/8", "::1"], "proxyHeaderTimeout": 500"#);
    assert!(c.trusts_proxy_header("10.1.2.3".parse().expect("ip")));
    assert!(c.trusts_proxy_header("::ffff:10.1.2.3".parse().expect("ip")));
    assert!(c.trusts_proxy_header("::1".parse().expect("ip")));
    assert!(!c.trusts_proxy_header("192.0.2.1".parse().expect("ip")));
    assert_eq!(c.proxy_header_timeout, Duration::from_millis(500));
    let default = ok("");
    assert!(!default.trusts_proxy_header("127.0.0.1".parse().expect("ip")));
    assert_eq!(default.proxy_header_timeout, Duration::from_secs(3));
    rejects(
        r#""acceptProxyProtocol": ["10.1.0.0/8"]"#,
        &["acceptProxyProtocol[0]", "10.0.0.0/8"],
    );
    rejects(
        r#""proxyHeaderTimeout": 0"#,
        &["proxyHeaderTimeout", "from 1"],
    );
}

#[test]
fn tcp_keepalive_is_false_true_or_whole_seconds() {
    assert_eq!(ok(r#""tcpKeepalive": false"#).tcp_keepalive, None);
    assert_eq!(
        ok(r#""tcpKeepalive": true"#).tcp_keepalive,
        Some(Keepalive::default())
    );
    let only_idle = ok(r#""tcpKeepalive": {"idle": 120000}"#).tcp_keepalive;
    assert_eq!(
        only_idle.map(|k| (k.idle.as_secs(), k.count)),
        Some((120, 6))
    );
    rejects(
        r#""tcpKeepalive": {"idle": 1500}"#,
        &["tcpKeepalive.idle", "whole seconds", "found 1500"],
    );
    rejects(
        r#""tcpKeepalive": {"interval": 999}"#,
        &["tcpKeepalive.interval", "from 1000 to 32767000"],
    );
    rejects(
        r#""tcpKeepalive": {"count": 0}"#,
        &["tcpKeepalive.count", "from 1 to 127"],
    );
    rejects(
        r#""tcpKeepalive": {"idel": 60000}"#,
        &["tcpKeepalive.idel", "idle"],
    );
    rejects(
        r#""tcpKeepalive": 60"#,
        &["tcpKeepalive", "false, true, or an object"],
    );
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
fn client_prefix_defaults_to_ipv4_32_and_ipv6_64() {
    let c = ok("");
    assert_eq!(c.client_prefix, ClientPrefix { ipv4: 32, ipv6: 64 });
    let c = ok(r#""clientPrefix": {"ipv4": 24, "ipv6": 48}"#);
    assert_eq!(c.client_prefix, ClientPrefix { ipv4: 24, ipv6: 48 });
    // One family alone keeps the other's default; the ends of the ranges are valid.
    let c = ok(r#""clientPrefix": {"ipv6": 128}"#);
    assert_eq!(
        c.client_prefix,
        ClientPrefix {
            ipv4: 32,
            ipv6: 128
        }
    );
    let c = ok(r#""clientPrefix": {"ipv4": 0, "ipv6": 0}"#);
    assert_eq!(c.client_prefix, ClientPrefix { ipv4: 0, ipv6: 0 });
    assert_eq!(
        ok(r#""clientPrefix": {}"#).client_prefix,
        ClientPrefix::DEFAULT
    );
}

#[test]
fn client_prefix_errors_name_the_family() {
    rejects(
        r#""clientPrefix": {"ipv6": 129}"#,
        &[
            "clientPrefix.ipv6",
            "prefix length from 0 to 128",
            "found 129",
        ],
    );
    rejects(
        r#""clientPrefix": {"ipv4": 33}"#,
        &["clientPrefix.ipv4", "from 0 to 32", "found 33"],
    );
    rejects(
        r#""clientPrefix": {"ipv4": -1}"#,
        &["clientPrefix.ipv4", "found -1"],
    );
    rejects(
        r#""clientPrefix": {"ipv6": "64"}"#,
        &["clientPrefix.ipv6", "found \"64\""],
    );
    rejects(
        r#""clientPrefix": {"ipv6": 64.0}"#,
        &["clientPrefix.ipv6", "write 64, without a decimal point"],
    );
    rejects(
        r#""clientPrefix": {"ipv7": 64}"#,
        &["clientPrefix.ipv7: unknown key", "did you mean \"ipv4\"?"],
    );
    rejects(
        r#""clientPrefix": {"v6": 64}"#,
        &["clientPrefix.v6: unknown key", "ipv4, ipv6"],
    );
    rejects(
        r#""clientPrefix": 64"#,
        &["clientPrefix", "{\"ipv4\": 32, \"ipv6\": 64}", "found 64"],
    );
    rejects(r#""clientprefix": {}"#, &["did you mean \"clientPrefix\"?"]);
}

#[test]
fn hash_balance_factor_is_off_or_at_least_100() {
    assert_eq!(ok("").hash_balance_factor, 0);
    assert_eq!(ok(r#""hashBalanceFactor": 0"#).hash_balance_factor, 0);
    assert_eq!(ok(r#""hashBalanceFactor": 100"#).hash_balance_factor, 100);
    assert_eq!(ok(r#""hashBalanceFactor": 125"#).hash_balance_factor, 125);
    assert_eq!(
        ok(r#""hashBalanceFactor": 1000000"#).hash_balance_factor,
        1_000_000
    );
    for bad in ["1", "99"] {
        rejects(
            &format!(r#""hashBalanceFactor": {bad}"#),
            &[
                "hashBalanceFactor",
                "0 (off) or a percent of the mean load from 100 to 1000000",
                &format!("found {bad}: below 100 %"),
            ],
        );
    }
    rejects(
        r#""hashBalanceFactor": 1000001"#,
        &["hashBalanceFactor", "found 1000001"],
    );
    rejects(
        r#""hashBalanceFactor": -125"#,
        &["hashBalanceFactor", "found -125"],
    );
    rejects(
        r#""hashBalanceFactor": 1.25"#,
        &["hashBalanceFactor", "found 1.25"],
    );
    rejects(
        r#""hashBalanceFactor": "125%""#,
        &["hashBalanceFactor", "found \"125%\""],
    );
    rejects(
        r#""hashBalanceFator": 125"#,
        &["did you mean \"hashBalanceFactor\"?"],
    );
}

#[test]
fn hash_balance_factor_without_stickiness_is_accepted_with_a_warning() {
    let c = ok(r#""stickiness": false, "hashBalanceFactor": 150"#);
    assert_eq!(c.hash_balance_factor, 150);
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(
        c.warnings[0].starts_with("config.json: hashBalanceFactor: 150 has no effect"),
        "{:?}",
        c.warnings
    );
    assert!(ok(r#""stickiness": false"#).warnings.is_empty());
    assert!(ok(r#""hashBalanceFactor": 150"#).warnings.is_empty());
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
    assert_eq!(v["clientPrefix"], json!({"ipv4": 32, "ipv6": 64}));
    assert_eq!(v["hashBalanceFactor"], 0);
    assert_eq!(
        v["targets"],
        json!([{"id": "127.0.0.1:9000", "host": "127.0.0.1", "port": 9000, "weight": 1,
                "proxyProtocol": false, "drain": false, "healthCheck": false}])
    );
    let v = effective_json(&ok(r#""downgradeToUser": "www""#));
    assert_eq!(v["metricsHost"], "127.0.0.1");
    assert_eq!(v["metricsPort"], 9898);
    assert_eq!(v["downgradeToUser"], "www");
}

#[test]
fn health_check_defaults_and_per_target_overrides_key_by_key() {
    let c = ok(
        r#""healthCheck": {"interval": 500, "send": "PING\r\n", "expect": "PONG"},
               "targets": [
                 {"host": "127.0.0.1", "port": 9000},
                 {"host": "127.0.0.1", "port": 9001, "healthCheck": {"rise": 5, "expect": null}},
                 {"host": "127.0.0.1", "port": 9002, "healthCheck": false},
                 {"host": "127.0.0.1", "port": 9003, "healthCheck": null, "drain": true}
               ]"#,
    );
    let top = c.health_check.clone().expect("top-level check");
    assert_eq!(
        top,
        HealthCheck {
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(1000),
            rise: 2,
            fall: 3,
            send: Some("PING\r\n".into()),
            expect: Some("PONG".into()),
            port: None,
        }
    );
    assert_eq!(c.targets[0].health_check.as_ref(), Some(&top));
    let own = c.targets[1].health_check.clone().expect("own check");
    assert_eq!((own.interval, own.rise, own.fall), (top.interval, 5, 3));
    assert_eq!((own.send, own.expect), (top.send.clone(), None));
    assert_eq!(c.targets[2].health_check, None);
    assert_eq!(c.targets[3].health_check.as_ref(), Some(&top));
    assert_eq!(
        c.targets.iter().map(|t| t.drain).collect::<Vec<_>>(),
        [false, false, false, true]
    );
    // No top level: a target's own object over the defaults; the others unchecked.
    let c = ok(
        r#""targets": [{"host": "127.0.0.1", "port": 9000, "healthCheck": {"port": 7}},
                             {"host": "127.0.0.1", "port": 9001}]"#,
    );
    let own = c.targets[0].health_check.clone().expect("own check");
    assert_eq!(
        (own.interval, own.timeout),
        (Duration::from_secs(2), Duration::from_secs(1))
    );
    assert_eq!((own.rise, own.fall, own.port), (2, 3, Some(7)));
    assert_eq!(
        (c.health_check.as_ref(), c.targets[1].health_check.as_ref()),
        (None, None)
    );
    assert_eq!(ok(r#""healthCheck": false"#).targets[0].health_check, None);
    assert_eq!(ok(r#""healthCheck": null"#).targets[0].health_check, None);
}

#[test]
fn health_check_and_drain_errors_name_their_path() {
    rejects(
        r#""healthCheck": true"#,
        &[
            "healthCheck: expected an object such as {\"interval\"",
            "false",
            "found true",
        ],
    );
    rejects(
        r#""healthCheck": {"intervall": 100}"#,
        &[
            "healthCheck.intervall: unknown key",
            "did you mean \"interval\"?",
        ],
    );
    rejects(
        r#""healthCheck": {"interval": 5}"#,
        &["healthCheck.interval", "from 10", "found 5"],
    );
    rejects(
        r#""healthCheck": {"timeout": 0}"#,
        &["healthCheck.timeout", "from 1", "found 0"],
    );
    for key in ["rise", "fall"] {
        rejects(
            &format!(r#""healthCheck": {{"{key}": 0}}"#),
            &[&format!("healthCheck.{key}"), "from 1 to 1000", "found 0"],
        );
    }
    rejects(
        r#""healthCheck": {"port": 70000}"#,
        &["healthCheck.port", "from 1 to 65535", "found 70000"],
    );
    rejects(
        r#""healthCheck": {"send": ""}"#,
        &["healthCheck.send", "non-empty string", "found \"\""],
    );
    rejects(
        &format!(r#""healthCheck": {{"expect": "{}"}}"#, "x".repeat(4097)),
        &[
            "healthCheck.expect",
            "at most 4096 bytes",
            "found a string of 4097 bytes",
        ],
    );
    rejects(
        &targets(
            r#"[{"host": "::1", "port": 1}, {"host": "::1", "port": 2, "healthCheck": {"fall": -1}}]"#,
        ),
        &["targets[1].healthCheck.fall", "found -1"],
    );
    rejects(
        &targets(r#"[{"host": "::1", "port": 1, "healthCheck": "tcp"}]"#),
        &[
            "targets[0].healthCheck",
            "or null (the top-level healthCheck)",
            "found \"tcp\"",
        ],
    );
    rejects(
        &targets(r#"[{"host": "::1", "port": 1, "drain": "yes"}]"#),
        &["targets[0].drain", "true or false", "found \"yes\""],
    );
    rejects(
        &targets(r#"[{"host": "::1", "port": 1, "drian": true}]"#),
        &["targets[0].drian: unknown key", "did you mean \"drain\"?"],
    );
}

#[test]
fn the_effective_config_with_checks_and_drain_reads_back_the_same() {
    let c = ok(r#""healthCheck": {"interval": 300, "expect": "+OK"},
               "targets": [
                 {"host": "127.0.0.1", "port": 9000, "drain": true},
                 {"host": "127.0.0.1", "port": 9001, "healthCheck": false}
               ]"#);
    let v = effective_json(&c);
    assert_eq!(v["healthCheck"]["interval"], 300);
    assert_eq!(v["healthCheck"]["send"], Value::Null);
    assert_eq!(v["targets"][0]["drain"], true);
    assert_eq!(v["targets"][0]["healthCheck"]["expect"], "+OK");
    assert_eq!(v["targets"][1]["healthCheck"], false);
    let again = parse_text(&v.to_string()).expect("the effective config is valid");
    assert_eq!(again.targets, c.targets);
    assert_eq!(again.health_check, c.health_check);
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
