//! Property tests of the config parser (issue 6: no panic from any config), and the fuzz
//! target's seed corpus run through the same checks, so CI covers it on the stable toolchain.
//!
//! Every input goes through `fuzz/config_check.rs`, the checks the fuzz target makes: no panic;
//! a rejection is one line that starts with the file name and names its key; an accepted
//! config reads back from its effective JSON to the same config. On top of that:
//! - any config built from valid values for every key is accepted, and its effective JSON
//!   shows each value given (the parser neither drops nor bends a valid value);
//! - one invalid value in an otherwise valid config is rejected, naming exactly that key;
//! - when a key is given twice, the last one wins (as with `JSON.parse`);
//! - random edits of valid configs (the typo, the half-saved file) never panic.
//!
//! Target hosts are IP literals or `localhost`, so no property sends a DNS query.

#[path = "../fuzz/config_check.rs"]
mod config_check;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use stickylb::config::{Cidr, Config};

/// 365 days in milliseconds: the longest duration the parser accepts.
const MAX_MILLIS: u64 = 365 * 24 * 3600 * 1000;

fn parse(text: &str) -> Result<Config, stickylb::config::ConfigError> {
    Config::parse(Path::new(config_check::FILE), text)
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|n| IpAddr::V4(Ipv4Addr::from(n))),
        any::<u128>().prop_map(|n| IpAddr::V6(Ipv6Addr::from(n))),
        Just(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        Just(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        Just(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        Just(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        any::<u32>().prop_map(|n| IpAddr::V6(Ipv4Addr::from(n).to_ipv6_mapped())),
    ]
}

/// A valid CIDR text: a network address (bits after the prefix cleared), with or without
/// the prefix length.
fn cidr() -> impl Strategy<Value = String> {
    (ip(), any::<u8>(), any::<bool>()).prop_map(|(ip, p, bare)| match ip {
        IpAddr::V4(a) if bare => a.to_string(),
        IpAddr::V6(a) if bare => a.to_string(),
        IpAddr::V4(a) => {
            let prefix = u32::from(p) % 33;
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix)
            };
            format!("{}/{prefix}", Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let prefix = u32::from(p) % 129;
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - prefix)
            };
            format!("{}/{prefix}", Ipv6Addr::from(u128::from(a) & mask))
        }
    })
}

fn millis(min: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        min..=MAX_MILLIS,
        Just(min),
        Just(MAX_MILLIS),
        min..=min + 100_000
    ]
}

/// A valid `targets` array for a listener on `source_port`: unique identities, no target on
/// the listener's own port.
fn targets(source_port: u16) -> impl Strategy<Value = Value> {
    let host = prop_oneof![
        ip().prop_map(|ip| ip.to_string()),
        Just("localhost".to_string())
    ];
    let weight = prop_oneof![
        Just(None),
        (1u64..=1_000_000).prop_map(Some),
        (1_000_001u64..=u64::MAX).prop_map(Some),
    ];
    let id = prop_oneof![Just(None), "[a-zA-Z0-9 _:.\\-é☃]{1,12}".prop_map(Some)];
    proptest::collection::vec((host, 1u16..=65535, weight, id), 1..8).prop_map(move |list| {
        let items: Vec<Value> = list
            .into_iter()
            .enumerate()
            .map(|(i, (host, port, weight, id))| {
                let port = if port == source_port {
                    port % 65535 + 1
                } else {
                    port
                };
                let mut t = json!({"host": host, "port": port});
                if let Some(w) = weight {
                    t["weight"] = w.into();
                }
                // The index makes every identity unique, given or default.
                t["id"] = match id {
                    Some(id) => format!("{id}#{i}").into(),
                    None => format!("{host}:{port}#{i}").into(),
                };
                t
            })
            .collect();
        Value::Array(items)
    })
}

/// Every optional top-level key with a valid value, each present or not.
fn optional_keys() -> impl Strategy<Value = Vec<(&'static str, Value)>> {
    let keys: Vec<BoxedStrategy<(&'static str, Value)>> = vec![
        any::<bool>().prop_map(|b| ("stickiness", json!(b))).boxed(),
        millis(0)
            .prop_map(|n| ("targetDeactivationDuration", json!(n)))
            .boxed(),
        millis(0).prop_map(|n| ("sessionExpiry", json!(n))).boxed(),
        millis(1)
            .prop_map(|n| ("sessionExpiryInterval", json!(n)))
            .boxed(),
        (1u64..=1024)
            .prop_map(|n| ("balancerCount", json!(n)))
            .boxed(),
        any::<u64>()
            .prop_map(|n| ("maxBufferSize", json!(n)))
            .boxed(),
        prop_oneof![
            Just(Value::Null),
            any::<u32>().prop_map(Value::from),
            "[a-z_][a-z0-9_-]{0,15}".prop_map(Value::from),
        ]
        .prop_map(|v| ("downgradeToUser", v))
        .boxed(),
        Just(("schedulingPolicy", json!("rr"))).boxed(),
        millis(1).prop_map(|n| ("connectTimeout", json!(n))).boxed(),
        millis(0).prop_map(|n| ("idleTimeout", json!(n))).boxed(),
        millis(0)
            .prop_map(|n| ("shutdownTimeout", json!(n)))
            .boxed(),
        any::<u64>()
            .prop_map(|n| ("maxConnections", json!(n)))
            .boxed(),
        any::<u64>()
            .prop_map(|n| ("maxConnectionsPerClient", json!(n)))
            .boxed(),
        any::<u64>().prop_map(|n| ("maxSessions", json!(n))).boxed(),
        proptest::collection::vec(cidr(), 0..5)
            .prop_map(|c| ("allow", json!(c)))
            .boxed(),
        proptest::collection::vec(cidr(), 0..5)
            .prop_map(|c| ("deny", json!(c)))
            .boxed(),
        any::<bool>().prop_map(|b| ("zeroCopy", json!(b))).boxed(),
        any::<bool>().prop_map(|b| ("accessLog", json!(b))).boxed(),
        (1u64..=1024)
            .prop_map(|n| ("maxConnectAttempts", json!(n)))
            .boxed(),
        prop_oneof![
            any::<bool>().prop_map(Value::from),
            (1u64..=32_767, 1u64..=32_767, 1u64..=127).prop_map(|(idle, interval, count)| {
                json!({"idle": idle * 1000, "interval": interval * 1000, "count": count})
            }),
        ]
        .prop_map(|v| ("tcpKeepalive", v))
        .boxed(),
        prop_oneof![Just(json!(false)), Just(json!("v1")), Just(json!("v2"))]
            .prop_map(|v| ("proxyProtocol", v))
            .boxed(),
        proptest::collection::vec(cidr(), 0..5)
            .prop_map(|c| ("acceptProxyProtocol", json!(c)))
            .boxed(),
        millis(1)
            .prop_map(|n| ("proxyHeaderTimeout", json!(n)))
            .boxed(),
        // Both families: the effective config always shows both.
        (0u8..=32, 0u8..=128)
            .prop_map(|(v4, v6)| ("clientPrefix", json!({"ipv4": v4, "ipv6": v6})))
            .boxed(),
        prop_oneof![Just(0u32), 100u32..=1_000_000]
            .prop_map(|f| ("hashBalanceFactor", json!(f)))
            .boxed(),
    ];
    keys.into_iter()
        .map(proptest::option::of)
        .collect::<Vec<_>>()
        .prop_map(|chosen| chosen.into_iter().flatten().collect())
}

/// The address a JSON string holds.
fn ip_of(value: &Value) -> IpAddr {
    value.as_str().expect("string").parse().expect("address")
}

/// A valid config document, built from valid values for every key it has.
fn valid_config() -> impl Strategy<Value = Map<String, Value>> {
    (
        1u16..=65535,
        proptest::option::of(ip()),
        proptest::option::of(prop_oneof![Just(None), (1u16..=65535, ip()).prop_map(Some)]),
    )
        // Metrics left at their default listen on 9898: a sourcePort there would collide.
        .prop_filter(
            "sourcePort on the default metrics port",
            |(port, _, metrics)| !(metrics.is_none() && *port == 9898),
        )
        .prop_flat_map(|(port, host, metrics)| {
            (
                Just(port),
                Just(host),
                Just(metrics),
                targets(port),
                optional_keys(),
            )
        })
        .prop_map(|(port, host, metrics, targets, optional)| {
            let mut map = Map::new();
            map.insert("sourcePort".into(), port.into());
            if let Some(host) = host {
                map.insert("sourceHost".into(), host.to_string().into());
            }
            match metrics {
                None => {}
                Some(None) => {
                    map.insert("metricsPort".into(), Value::Null);
                }
                Some(Some((mport, mhost))) => {
                    // Never on the listener's port: that is the one cross-key error here.
                    let mport = if mport == port {
                        port % 65535 + 1
                    } else {
                        mport
                    };
                    map.insert("metricsPort".into(), mport.into());
                    map.insert("metricsHost".into(), mhost.to_string().into());
                }
            }
            map.insert("targets".into(), targets);
            for (key, value) in optional {
                map.insert(key.into(), value);
            }
            map
        })
}

/// For each top-level key, values that must be rejected.
fn invalid_value(key: &str) -> Vec<Value> {
    match key {
        "sourcePort" | "metricsPort" => {
            vec![json!(0), json!(65536), json!(80.0), json!("80"), json!(-1)]
        }
        "sourceHost" | "metricsHost" => {
            vec![json!("localhost"), json!(""), json!(1), json!("1.2.3.4.5")]
        }
        "targets" => vec![json!([]), json!({}), json!(null), json!("127.0.0.1:80")],
        "stickiness" | "zeroCopy" | "accessLog" => vec![json!("true"), json!(1), json!(null)],
        "balancerCount" => vec![json!(0), json!(1025), json!(2.5), json!(true)],
        "sessionExpiryInterval" | "connectTimeout" => {
            vec![json!(0), json!(MAX_MILLIS + 1), json!(-5)]
        }
        "targetDeactivationDuration" | "sessionExpiry" | "idleTimeout" | "shutdownTimeout" => {
            vec![json!(MAX_MILLIS + 1), json!(-1), json!(1e3), json!("5s")]
        }
        "maxBufferSize" | "maxConnections" | "maxConnectionsPerClient" | "maxSessions" => {
            vec![json!(-1), json!(1.5), json!("10"), json!(null)]
        }
        "downgradeToUser" => vec![json!(""), json!(-1), json!(4_294_967_296u64), json!([])],
        "maxConnectAttempts" => vec![json!(0), json!(1025), json!(2.5), json!(null)],
        "tcpKeepalive" => vec![
            json!(60),
            json!({"idle": 1500}),
            json!({"count": 128}),
            json!({"period": 1000}),
        ],
        "proxyProtocol" => vec![json!(true), json!("v3"), json!(1), json!(null)],
        "proxyHeaderTimeout" => vec![json!(0), json!(-1), json!("3s")],
        "allow" | "deny" | "acceptProxyProtocol" => vec![
            json!("10.0.0.0/8"),
            json!(["10.1.0.0/8"]),
            json!(["x"]),
            json!([1]),
        ],
        "clientPrefix" => vec![
            json!(64),
            json!({"ipv4": 33}),
            json!({"ipv6": 129}),
            json!({"ipv6": -1}),
            json!({"ipv6": "64"}),
            json!({"ipv5": 24}),
            json!(null),
        ],
        "hashBalanceFactor" => vec![
            json!(1),
            json!(99),
            json!(1_000_001),
            json!(-125),
            json!(1.25),
            json!("125"),
        ],
        _ => vec![],
    }
}

fn text_of(map: &Map<String, Value>) -> String {
    serde_json::to_string_pretty(&Value::Object(map.clone())).expect("JSON prints")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_text_is_parsed_or_rejected_in_one_line_without_panic(text in any::<String>()) {
        config_check::check(&text);
    }

    #[test]
    fn json_shaped_noise_is_parsed_or_rejected_in_one_line_without_panic(
        text in "[ {}\\[\\],:\"0-9a-zA-Z.eE+\\-/\\\\]{0,200}"
    ) {
        config_check::check(&text);
    }

    #[test]
    fn a_config_of_valid_values_is_accepted_and_shows_each_value(map in valid_config()) {
        let text = text_of(&map);
        let config = match parse(&text) {
            Ok(config) => config,
            Err(e) => return Err(TestCaseError::fail(format!("{e}\n{text}"))),
        };
        let effective = config.effective_json();
        for (key, value) in &map {
            let shown = &effective[key.as_str()];
            match key.as_str() {
                // Shown resolved and with identities; checked by the fixed point below.
                "targets" | "schedulingPolicy" => {}
                // Shown in canonical form (checked by reading them back, the fixed point
                // below); here the parsed values are checked against what was given.
                "sourceHost" => prop_assert_eq!(config.listen.ip(), ip_of(value)),
                "metricsHost" => {
                    if let Some(metrics) = config.metrics {
                        prop_assert_eq!(metrics.ip(), ip_of(value));
                    }
                }
                "allow" | "deny" | "acceptProxyProtocol" => {
                    let given: Vec<Cidr> = value
                        .as_array()
                        .expect("array")
                        .iter()
                        .map(|c| c.as_str().expect("string").parse().expect("valid CIDR"))
                        .collect();
                    let parsed = match key.as_str() {
                        "allow" => &config.allow,
                        "deny" => &config.deny,
                        _ => &config.accept_proxy_protocol,
                    };
                    prop_assert_eq!(parsed, &given, "key {}", key);
                }
                "metricsPort" if value.is_null() => prop_assert!(shown.is_null()),
                // `true` means the defaults, shown as the object they are.
                "tcpKeepalive" if value == &json!(true) => prop_assert_eq!(
                    shown,
                    &json!({"idle": 60000, "interval": 10000, "count": 6})
                ),
                _ => prop_assert_eq!(shown, value, "key {}", key),
            }
        }
        let targets = map["targets"].as_array().expect("array");
        prop_assert_eq!(config.targets.len(), targets.len());
        for (t, given) in config.targets.iter().zip(targets) {
            prop_assert_eq!(&*t.id, given["id"].as_str().expect("id"));
            prop_assert_eq!(t.host.as_str(), given["host"].as_str().expect("host"));
            prop_assert_eq!(u64::from(t.port), given["port"].as_u64().expect("port"));
            let weight = given.get("weight").and_then(Value::as_u64).unwrap_or(1);
            prop_assert_eq!(u64::from(t.weight), weight.min(1_000_000));
        }
        config_check::check(&text);
    }

    #[test]
    fn one_invalid_value_is_rejected_naming_its_key(
        map in valid_config(),
        key in prop::sample::select(vec![
            "sourcePort", "sourceHost", "targets", "stickiness", "targetDeactivationDuration",
            "sessionExpiry", "sessionExpiryInterval", "balancerCount", "maxBufferSize",
            "downgradeToUser", "metricsHost", "metricsPort", "connectTimeout", "idleTimeout",
            "shutdownTimeout", "maxConnections", "maxConnectionsPerClient", "maxSessions",
            "allow", "deny", "zeroCopy", "accessLog", "maxConnectAttempts", "tcpKeepalive",
            "proxyProtocol", "acceptProxyProtocol", "proxyHeaderTimeout", "clientPrefix",
            "hashBalanceFactor",
        ]),
        pick in any::<prop::sample::Index>(),
    ) {
        let bad = invalid_value(key);
        let value = pick.get(&bad).clone();
        let mut map = map;
        map.insert(key.to_string(), value.clone());
        if key == "metricsHost" {
            // metricsHost is read whether or not metrics are on.
            map.remove("metricsPort");
        }
        let text = text_of(&map);
        match parse(&text) {
            Ok(_) => return Err(TestCaseError::fail(format!("accepted {key}: {value}\n{text}"))),
            Err(e) => {
                let named = e.key().unwrap_or_default();
                prop_assert!(
                    named == key || named.starts_with(&format!("{key}[")) || named.starts_with(&format!("{key}.")),
                    "{} names {:?}, not {}", e, named, key
                );
            }
        }
        config_check::check(&text);
    }

    #[test]
    fn a_key_given_twice_takes_the_last_value(first in 1u16..=65535, last in 1u16..=65535) {
        let text = format!(
            r#"{{"sourcePort": {first}, "metricsPort": null, "targets": [{{"host": "192.0.2.1", "port": 80}}], "sourcePort": {last}}}"#
        );
        let config = parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(config.listen.port(), last);
    }

    #[test]
    fn edited_valid_configs_never_panic(
        map in valid_config(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..4, any::<char>(), 0usize..40), 1..6),
    ) {
        let mut bytes = text_of(&map).into_bytes();
        for (at, kind, c, len) in edits {
            let at = at.index(bytes.len() + 1);
            match kind {
                // Truncate: the half-written file.
                0 => bytes.truncate(at),
                // Delete a few bytes.
                1 => {
                    let end = (at + len).min(bytes.len());
                    bytes.drain(at..end);
                }
                // Insert a character.
                2 => {
                    let mut buf = [0u8; 4];
                    let s = c.encode_utf8(&mut buf);
                    bytes.splice(at..at, s.bytes());
                }
                // Duplicate a slice after itself.
                _ => {
                    let end = (at + len).min(bytes.len());
                    let slice: Vec<u8> = bytes[at..end].to_vec();
                    bytes.splice(end..end, slice);
                }
            }
        }
        // Edits can cut a UTF-8 sequence; the file reader rejects such a file before parsing.
        let text = String::from_utf8_lossy(&bytes);
        config_check::check(&text);
    }
}

/// The fuzz target's seed corpus (valid configs, LoadBalancer.js configs, broken ones), through
/// the fuzz target's checks: what CI runs of the fuzz target on the stable toolchain.
#[test]
fn every_file_of_the_fuzz_seed_corpus_passes_the_fuzz_checks() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/config");
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .expect("fuzz/corpus/config")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    let (mut accepted, mut rejected) = (0, 0);
    for path in &entries {
        let bytes = std::fs::read(path).expect("read");
        let Ok(text) = std::str::from_utf8(&bytes) else {
            continue;
        };
        let result = std::panic::catch_unwind(|| config_check::check(text));
        assert!(result.is_ok(), "{} fails the fuzz checks", path.display());
        match parse(&config_check::without_dns(text)) {
            Ok(_) => accepted += 1,
            Err(_) => rejected += 1,
        }
    }
    assert!(
        accepted >= 5 && rejected >= 10,
        "the corpus has valid and broken configs: {accepted} accepted, {rejected} rejected"
    );
}
