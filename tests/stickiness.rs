//! Stickiness and fail-over over real loopback TCP: every client address keeps its target,
//! a stopped target costs clients nothing and moves no one else, its window ends, sessions
//! hold moved clients, and a fleet that is all down closes clients promptly.

use std::collections::HashMap;
use std::time::Duration;

use stickylb::Reject;
use stickylb_testkit::*;

async fn three_backends() -> Vec<Backend> {
    vec![
        Backend::start("a", Mode::Named).await,
        Backend::start("b", Mode::Named).await,
        Backend::start("c", Mode::Named).await,
    ]
}

fn addrs(backends: &[Backend]) -> Vec<std::net::SocketAddr> {
    backends.iter().map(|b| b.addr).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_of_2000_client_addresses_always_reaches_one_target() {
    let backends = three_backends().await;
    // No sessions, so the hash alone has to be stable.
    let server = start(&addrs(&backends), serde_json::json!({"sessionExpiry": 0}));
    let lb = server.local_addr();
    let mut seen: HashMap<u32, String> = HashMap::new();
    let mut per_target: HashMap<String, usize> = HashMap::new();
    for round in 0..3 {
        for i in 0..2000 {
            let (name, _) = which(client_ip(i), lb).await.unwrap();
            if round == 0 {
                *per_target.entry(name.clone()).or_default() += 1;
                seen.insert(i, name);
            } else {
                assert_eq!(
                    seen[&i],
                    name,
                    "client {} moved in round {round}",
                    client_ip(i)
                );
            }
        }
    }
    assert_eq!(
        per_target.len(),
        3,
        "all targets get clients: {per_target:?}"
    );
    for (name, n) in &per_target {
        assert!(
            *n > 2000 / 3 / 2,
            "target {name} got only {n} of 2000 clients"
        );
    }
}

/// Maps `n` clients to the name of the target they reach now.
async fn map_clients(lb: std::net::SocketAddr, n: u32) -> Vec<String> {
    let mut names = Vec::new();
    for i in 0..n {
        names.push(which(client_ip(i), lb).await.expect("client served").0);
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_target_costs_clients_nothing_and_moves_no_one_else() {
    let mut backends = three_backends().await;
    let server = start(
        &addrs(&backends),
        serde_json::json!({"targetDeactivationDuration": 60000, "sessionExpiry": 60000}),
    );
    let lb = server.local_addr();
    let before = map_clients(lb, 300).await;
    backends[1].stop().await;
    // Every client connects again: none may fail, none but b's may move.
    let after = map_clients(lb, 300).await;
    let mut moved_from_b = 0;
    for (i, (was, now)) in before.iter().zip(&after).enumerate() {
        if was == "b" {
            assert_ne!(now, "b");
            moved_from_b += 1;
        } else {
            assert_eq!(was, now, "client {i} of {was} moved to {now}");
        }
    }
    assert!(moved_from_b > 0);
    let s = server.snapshot();
    assert_eq!(s.rejected(Reject::NoTarget), 0);
    assert_eq!(s.retries, 1, "one failed connect, then the window holds");
    assert_eq!(s.targets[1].deactivations, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_is_used_again_after_its_window_and_sessions_hold_moved_clients() {
    let mut backends = three_backends().await;
    let server = start(
        &addrs(&backends),
        serde_json::json!({"targetDeactivationDuration": 300, "sessionExpiry": 200, "sessionExpiryInterval": 50}),
    );
    let lb = server.local_addr();
    let before = map_clients(lb, 100).await;
    let i = before
        .iter()
        .position(|n| n == "b")
        .expect("some client on b") as u32;
    let ip = client_ip(i);

    backends[1].stop().await;
    let (moved_to, held) = which(ip, lb).await.unwrap();
    assert_ne!(moved_to, "b");
    backends[1].restart().await;

    // While the moved client has a connection open, it stays where it moved, even after b's
    // window has ended (its session pins it).
    let window_end = tokio::time::Instant::now() + Duration::from_millis(400);
    tokio::time::sleep_until(window_end).await;
    for _ in 0..5 {
        let (name, _) = which(ip, lb).await.unwrap();
        assert_eq!(name, moved_to, "an active client must not move back");
    }
    drop(held);

    // Once its connections are closed and the session has expired, the hash brings it back to
    // b: the window ended, so b is used again. Each probe is itself a connection that renews
    // the session, so probes are spaced by more than `sessionExpiry` (bounded poll).
    let served_before = backends[1].accepted();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (name, _) = which(ip, lb).await.unwrap();
        if name == "b" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "client never returned to b"
        );
    }
    assert!(
        backends[1].accepted() > served_before,
        "b served again after its window"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_targets_down_closes_the_client_promptly_and_counts_it() {
    let server = start(
        &[dead_port(), dead_port(), dead_port()],
        serde_json::json!({"connectTimeout": 2000}),
    );
    let outcome = first_read(client_ip(9), server.local_addr()).await;
    assert!(
        matches!(&outcome, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "expected a reset, got {outcome:?}"
    );
    let s = server.snapshot();
    assert_eq!(s.rejected(Reject::NoTarget), 1);
    assert!(
        s.targets.iter().all(|t| t.connect_failures == 1),
        "each tried once"
    );
    // All are deactivated now, and a new client still gets every target tried rather than an
    // immediate failure.
    let _ = first_read(client_ip(10), server.local_addr()).await;
    assert!(server
        .snapshot()
        .targets
        .iter()
        .all(|t| t.connect_failures == 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_deactivated_targets_are_still_tried_so_a_recovered_fleet_is_served() {
    let mut backends = three_backends().await;
    let server = start(
        &addrs(&backends),
        serde_json::json!({"targetDeactivationDuration": 600000}),
    );
    let lb = server.local_addr();
    for b in backends.iter_mut() {
        b.stop().await;
    }
    let _ = first_read(client_ip(11), lb).await;
    for b in backends.iter_mut() {
        b.restart().await;
    }
    // Every window is still open for ten minutes, yet the client is served.
    let (name, _) = which(client_ip(11), lb)
        .await
        .expect("served by a recovered target");
    assert!(["a", "b", "c"].contains(&name.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_stickiness_one_client_is_spread_by_open_connections() {
    let backends = three_backends().await;
    let server = start(&addrs(&backends), serde_json::json!({"stickiness": false}));
    let lb = server.local_addr();
    // Hold connections open: two choices by open-connection count spreads them evenly.
    let mut held = Vec::new();
    let mut count: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        let (name, s) = which(client_ip(12), lb).await.unwrap();
        *count.entry(name).or_default() += 1;
        held.push(s);
    }
    assert_eq!(count.len(), 3, "{count:?}");
    for n in count.values() {
        assert!((5..=15).contains(n), "uneven spread {count:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_clients_are_closed_at_once_and_counted() {
    let backends = three_backends().await;
    let server = start(
        &addrs(&backends),
        serde_json::json!({"deny": ["127.10.0.0/24"], "allow": ["127.0.0.0/8"]}),
    );
    let lb = server.local_addr();
    // client_ip(0..250) is 127.10.0.x: denied; 127.10.1.x is allowed.
    let outcome = first_read(client_ip(3), lb).await;
    assert!(
        outcome.is_err() || outcome.as_ref().ok() == Some(&0),
        "{outcome:?}"
    );
    assert!(which(client_ip(300), lb).await.is_ok());
    assert_eq!(server.snapshot().rejected(Reject::Denied), 1);
    let served: usize = backends.iter().map(|b| b.accepted()).sum();
    assert_eq!(served, 1, "the denied client never reached a target");
}
