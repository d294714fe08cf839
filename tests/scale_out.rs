//! Scale-out: stickylb instances side by side (behind DNS round-robin, ECMP or a Kubernetes
//! Service) send every client IP to the same target without talking to each other. The
//! mapping is a fixed hash of the client IP and the targets' (id, weight), so the same targets
//! in any order give the same mapping in any process; fail-over follows the same ranking, so
//! instances that each saw a target fail agree on where its clients went.
//!
//! Two real `stickylb` processes and one in-process balancer, each with the targets listed in
//! a different order, are asked for 2,000 client addresses. Sessions are off
//! (`"sessionExpiry": 0`) so that only the hash decides.

use std::collections::HashMap;

use stickylb_testkit::*;

const BIN: &str = env!("CARGO_BIN_EXE_stickylb");

/// Client addresses asked of every instance.
const CLIENTS: u32 = 2000;

/// Connections in flight at once while mapping the clients.
const PARALLEL: u32 = 50;

/// Starts a `stickylb` process (see [`Balancer`]) with `targets`, sessions off.
fn instance(tag: &str, targets: serde_json::Value) -> Balancer {
    let config = serde_json::json!({
        "sourceHost": "127.0.0.1",
        "sourcePort": 1,
        "metricsPort": null,
        "sessionExpiry": 0,
        "targets": targets,
    });
    Balancer::launch(BIN, &format!("scale-{tag}"), &[], config, None)
}

/// SIGTERM, then the exit code once it has drained (nothing is open by then).
fn stop(mut balancer: Balancer) -> i32 {
    balancer.signal(libc::SIGTERM);
    balancer.exit_code()
}

/// How many clients each backend got.
fn shares(names: &[String]) -> HashMap<&str, usize> {
    let mut shares = HashMap::new();
    for name in names {
        *shares.entry(name.as_str()).or_default() += 1;
    }
    shares
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_with_the_same_targets_in_any_order_send_2000_clients_to_the_same_targets() {
    let mut backends = vec![
        Backend::start("a", Mode::Named).await,
        Backend::start("b", Mode::Named).await,
        Backend::start("c", Mode::Named).await,
        Backend::start("d", Mode::Named).await,
    ];
    // Explicit ids, a weight, and one default id ("host:port" as written): what the hash
    // keys on must be the same everywhere, and the list order must not matter.
    let target = |i: usize| {
        let addr = backends[i].addr;
        let mut t = serde_json::json!({"host": addr.ip().to_string(), "port": addr.port()});
        match i {
            0 => t["id"] = "worker-a".into(),
            1 => {
                t["id"] = "worker-b".into();
                t["weight"] = 2.into();
            }
            3 => t["id"] = "worker-d".into(),
            _ => {}
        }
        t
    };
    let one = instance(
        "one",
        serde_json::json!([target(0), target(1), target(2), target(3)]),
    );
    let two = instance(
        "two",
        serde_json::json!([target(3), target(2), target(0), target(1)]),
    );
    let three = start(
        &[],
        serde_json::json!({
            "sessionExpiry": 0,
            "targets": [target(1), target(3), target(0), target(2)],
        }),
    );

    let first = mapping(one.addr, CLIENTS, PARALLEL).await;
    let by_share = shares(&first);
    for backend in &backends {
        // Weights 1, 2, 1, 1: shares near 20 %, 40 %, 20 %, 20 %. A mapping that sent
        // everyone to one target would agree everywhere for the wrong reason.
        let got = by_share.get(backend.name.as_str()).copied().unwrap_or(0);
        assert!(
            got > CLIENTS as usize / 10,
            "backend {} got {got} of {CLIENTS} clients: {by_share:?}",
            backend.name
        );
    }
    assert!(
        by_share["b"] > by_share["a"],
        "weight 2 draws more: {by_share:?}"
    );
    assert_same_mapping(
        &first,
        &mapping(two.addr, CLIENTS, PARALLEL).await,
        "second process",
    );
    assert_same_mapping(
        &first,
        &mapping(three.local_addr(), CLIENTS, PARALLEL).await,
        "in-process balancer",
    );

    // Each instance finds out for itself that b is gone (its first connect there fails) and
    // moves b's clients to their next-ranked target: the same one on every instance.
    backends[1].stop().await;
    let after = mapping(one.addr, CLIENTS, PARALLEL).await;
    for i in 0..CLIENTS as usize {
        if first[i] == "b" {
            assert_ne!(after[i], "b", "client {} still on b", client_ip(i as u32));
        } else {
            assert_eq!(
                after[i],
                first[i],
                "client {} moved though its target is up",
                client_ip(i as u32)
            );
        }
    }
    assert_same_mapping(
        &after,
        &mapping(two.addr, CLIENTS, PARALLEL).await,
        "second process, b down",
    );
    assert_same_mapping(
        &after,
        &mapping(three.local_addr(), CLIENTS, PARALLEL).await,
        "in-process balancer, b down",
    );

    assert_eq!(stop(one), 0, "clean exit after SIGTERM");
    assert_eq!(stop(two), 0, "clean exit after SIGTERM");
}
