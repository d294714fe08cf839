//! Several instances converge (design §12): three balancers that check the same targets, each
//! on its own and without talking to each other, take a killed target out and bring it back,
//! and outside those two windows every one of 2,000 client addresses reaches the same target
//! through all three. Inside a window a client may reach its old target through one instance
//! and its new one through another, but never a third. Sessions are off (`"sessionExpiry": 0`)
//! so that only the hash and the checks decide.
//!
//! The time each instance took to take the target out and to bring it back is printed (goals:
//! `interval × fall` and `interval × rise` + 1 s); it is not asserted, since a loaded machine
//! can stretch it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use stickylb::server::Server;
use stickylb_testkit::*;

/// Client addresses mapped through every instance.
const CLIENTS: u32 = 2000;
/// Connections in flight at once while mapping.
const PARALLEL: u32 = 50;
const INTERVAL_MS: u64 = 100;
const RISE: u32 = 2;
const FALL: u32 = 2;

/// Starts one balancer in-process with `targets` (in this order), checks on, sessions off.
fn instance(targets: &[&Backend]) -> Arc<Server> {
    let list: Vec<serde_json::Value> = targets
        .iter()
        .map(|b| json!({"host": "127.0.0.1", "port": b.addr.port(), "id": b.name}))
        .collect();
    let text = json!({
        "sourceHost": "127.0.0.1",
        "sourcePort": 1,
        "metricsPort": null,
        "sessionExpiry": 0,
        "targets": list,
        "healthCheck": {"interval": INTERVAL_MS, "timeout": 500, "rise": RISE, "fall": FALL},
    })
    .to_string();
    let config =
        stickylb::config::Config::parse(std::path::Path::new("converge.json"), &text).unwrap();
    let listener = stickylb::server::bind("127.0.0.1:0".parse().unwrap()).expect("bind");
    Arc::new(Server::start(config, listener).expect("start"))
}

/// Maps every client through every instance and asserts that they agree; returns the mapping.
async fn agreed(instances: &[Arc<Server>], when: &str) -> Vec<String> {
    let first = mapping(instances[0].local_addr(), CLIENTS, PARALLEL).await;
    for (n, other) in instances.iter().enumerate().skip(1) {
        let names = mapping(other.local_addr(), CLIENTS, PARALLEL).await;
        assert_same_mapping(
            &first,
            &names,
            &format!("{when}: instance {n} and instance 0"),
        );
    }
    first
}

/// Waits (bounded) until every instance says `ready` of target `id`; returns how long each
/// took from `since`.
async fn each_sees(
    instances: &[Arc<Server>],
    id: &str,
    since: Instant,
    ready: impl Fn(&stickylb::TargetSnapshot) -> bool,
) -> Vec<Duration> {
    let mut seen: Vec<Option<Duration>> = vec![None; instances.len()];
    let deadline = Instant::now() + PATIENCE;
    while seen.iter().any(Option::is_none) {
        for (slot, server) in seen.iter_mut().zip(instances) {
            if slot.is_none() && server.snapshot().target(id).is_some_and(&ready) {
                *slot = Some(since.elapsed());
            }
        }
        assert!(
            Instant::now() < deadline,
            "not every instance in time: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    seen.into_iter().flatten().collect()
}

/// Connects clients through the instances in turn until `stop`, and records which target
/// each (client, instance) reached: traffic through the windows.
async fn traffic(
    instances: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(u32, String)>>>,
) {
    let mut n = 0u32;
    let mut rounds = 0;
    while !stop.load(Relaxed) && rounds < 100_000 {
        rounds += 1;
        let client = (n * 7919) % CLIENTS;
        let lb = instances[n as usize % instances.len()];
        if let Ok((name, _)) = which(client_ip(client), lb).await {
            seen.lock().unwrap().push((client, name));
        }
        n += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_take_a_dead_target_out_and_back_and_agree_outside_those_windows() {
    let a = Backend::start("a", Mode::Named).await;
    let mut b = Backend::start("b", Mode::Named).await;
    let c = Backend::start("c", Mode::Named).await;
    let d = Backend::start("d", Mode::Named).await;
    let instances = vec![
        instance(&[&a, &b, &c, &d]),
        instance(&[&d, &c, &b, &a]),
        instance(&[&b, &d, &a, &c]),
    ];
    for name in ["a", "b", "c", "d"] {
        each_sees(&instances, name, Instant::now(), |t| {
            t.check_up == Some(true) && t.checks_success >= 1
        })
        .await;
    }
    let before = agreed(&instances, "all up").await;
    assert!(before.iter().any(|n| n == "b"), "b has clients");
    let addrs: Vec<SocketAddr> = instances.iter().map(|s| s.local_addr()).collect();

    // b dies. Traffic goes on through all three while they notice.
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let during = tokio::spawn(traffic(addrs.clone(), stop.clone(), seen.clone()));
    let killed = Instant::now();
    b.stop().await;
    let out = each_sees(&instances, "b", killed, |t| t.check_up == Some(false)).await;
    stop.store(true, Relaxed);
    during.await.unwrap();
    let down = agreed(&instances, "b down everywhere").await;
    for i in 0..CLIENTS as usize {
        assert_ne!(down[i], "b", "client {i} still reaches b");
        if before[i] != "b" {
            assert_eq!(down[i], before[i], "client {i} of another target moved");
        }
    }
    let going: Vec<(u32, String)> = std::mem::take(&mut *seen.lock().unwrap());
    for (client, name) in &going {
        let i = *client as usize;
        assert!(
            *name == before[i] || *name == down[i],
            "client {i} reached {name} while b was going down (before: {}, after: {})",
            before[i],
            down[i]
        );
    }

    // b comes back.
    let stop = Arc::new(AtomicBool::new(false));
    let during = tokio::spawn(traffic(addrs, stop.clone(), seen.clone()));
    let restarted = Instant::now();
    b.restart().await;
    let back = each_sees(&instances, "b", restarted, |t| t.up).await;
    stop.store(true, Relaxed);
    during.await.unwrap();
    let after = agreed(&instances, "b up everywhere").await;
    assert_eq!(after, before, "every client is back on its hash target");
    let coming: Vec<(u32, String)> = std::mem::take(&mut *seen.lock().unwrap());
    for (client, name) in &coming {
        let i = *client as usize;
        assert!(
            *name == before[i] || *name == down[i],
            "client {i} reached {name} while b was coming back (before: {}, down: {})",
            before[i],
            down[i]
        );
    }

    let ms = |v: &[Duration]| {
        v.iter()
            .map(|d| d.as_millis().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "taken out by the three instances after {} ms (interval x fall = {} ms); back after {} \
         ms (interval x rise + 1 s = {} ms); {} and {} connections through the two windows",
        ms(&out),
        INTERVAL_MS * u64::from(FALL),
        ms(&back),
        INTERVAL_MS * u64::from(RISE) + 1000,
        going.len(),
        coming.len()
    );
}
