//! No self-loop in any spelling (design §16, issue 11): `stickylb check` refuses a target that is
//! the listener however it is written, and a loop the config cannot see (a name that resolves
//! differently later, a NAT rule) costs one connection, not thousands, because a connection
//! from stickylb's own outgoing socket is refused (`connections_rejected_total{reason="loop"}`),
//! and the target that led there goes out of rotation, so its clients move to the others.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use stickylb::server::{self, Server};
use stickylb::{Fault, Reject};
use stickylb_testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `stickylb check` on a config whose target is the listener spelled as `host`.
fn check(listen: &str, host: &str) -> (Option<i32>, String) {
    let dir = TempDir::new("self-loop-check");
    let path = dir.path("config.json");
    let port = free_port();
    let text = serde_json::json!({
        "sourceHost": listen,
        "sourcePort": port,
        "metricsPort": null,
        "targets": [{"host": host, "port": port}],
    });
    std::fs::write(&path, text.to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_stickylb"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_refuses_the_listener_spelled_ipv4_mapped_or_unspecified() {
    for (listen, host) in [
        ("0.0.0.0", "::ffff:127.0.0.1"),
        ("0.0.0.0", "0.0.0.0"),
        ("127.0.0.1", "0.0.0.0"),
        ("127.0.0.1", "::ffff:127.0.0.1"),
        ("::", "::"),
        ("::", "::ffff:127.0.0.1"),
    ] {
        let (code, stderr) = check(listen, host);
        assert_eq!(code, Some(1), "{listen} / {host}: {stderr}");
        assert!(
            stderr.contains("targets[0]") && stderr.contains("is stickylb's own listener"),
            "{listen} / {host}: {stderr}"
        );
    }
}

/// The target is pointed at the listener after the config was checked, as a changed name or a
/// NAT rule would do it. Each client then costs the one looped connection, refused at once,
/// and the client is reset (its stream cut, never a clean end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_the_config_cannot_see_costs_one_connection_per_client() {
    let listener = server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = config(&[dead_port()], serde_json::json!({"maxConnections": 300}));
    config.targets[0].addr = addr;
    let server = Arc::new(Server::start(config, listener).unwrap());
    let mut looped = Vec::new();
    for i in 0..20 {
        let accepted = server.snapshot().accepted;
        // The reset can beat the end of connect(2) on loopback: any step may see it.
        let attempt = async {
            let mut client = connect_from(client_ip(i), addr).await?;
            let _ = client.write_all(b"hello").await;
            let mut got = Vec::new();
            client.read_to_end(&mut got).await
        };
        let end = tokio::time::timeout(PATIENCE, attempt)
            .await
            .expect("the client is let go");
        match end {
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
            Ok(n) => panic!("client {i}: a clean end after {n} bytes, not a reset"),
        }
        settled(&server).await;
        looped.push(server.snapshot().accepted - accepted - 1);
    }
    eprintln!("looped connections per client: {looped:?}");
    // The one looped connection is refused at once. If it wins the microsecond race against
    // the record of its socket (see src/proxy/own_sockets.rs), the next turn is.
    assert!(looped.iter().all(|&n| n == 1 || n == 2), "{looped:?}");
    assert_eq!(
        server.snapshot().rejected(Reject::Loop),
        20,
        "one per client"
    );
    assert_eq!(server.snapshot().rejected(Reject::Limit), 0);
}

/// Until the balancer's handlers of the connections so far are gone (bounded).
async fn settled(server: &Server) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while server.active() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections left open"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A target that leads back into the listener goes out of rotation at its first refused loop,
/// like a target that refuses connects, so its clients move to the live target for the
/// deactivation window (before, every client of the looping target was reset at each
/// connection). The loop's first turn ends one of two ways, by a race on loopback: the refusal
/// (a reset) reaches stickylb's outgoing connection after its connect(2) completed, and that
/// client's stream is cut (a reset, never a clean end) and its target deactivated when the
/// connection ends; or it beats the end of connect(2), which then fails, and the client is
/// retried on the live target at once. Either way the loop costs one turn in all, and one client
/// at most is reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_loops_back_goes_out_of_rotation_and_its_clients_move() {
    let live = Backend::start("live", Mode::Echo).await;
    let listener = server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = config(
        &[live.addr, dead_port()],
        serde_json::json!({"targetDeactivationDuration": 600_000}),
    );
    config.targets[1].addr = addr;
    let server = Arc::new(Server::start(config, listener).unwrap());
    let out_of_rotation = || !server.snapshot().targets[1].up;
    // Clients until the looping target is out of rotation (about every other one hashes to
    // it; bounded).
    let mut reset = Vec::new();
    let mut clients = 0;
    while !out_of_rotation() {
        assert!(
            clients < 64,
            "the looping target is still in rotation after 64 clients"
        );
        let i = clients;
        clients += 1;
        let attempt = async {
            let mut client = connect_from(client_ip(i), addr).await?;
            let _ = client.write_all(&ECHO_REQUEST).await;
            let _ = client.shutdown().await;
            let mut got = Vec::new();
            client.read_to_end(&mut got).await
        };
        let end = tokio::time::timeout(PATIENCE, attempt)
            .await
            .expect("the client is let go");
        settled(&server).await;
        match end {
            // The live target echoes and, at the client's FIN, ends too.
            Ok(n) => assert_eq!(n, ECHO_REQUEST.len(), "client {i}: the live target's echo"),
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
                reset.push(i);
            }
        }
    }
    eprintln!("{clients} clients until the loop was out of rotation; reset: {reset:?}");
    assert!(
        reset.len() <= 1,
        "one client at most meets the loop: {reset:?}"
    );
    let snapshot = server.snapshot();
    assert_eq!(snapshot.rejected(Reject::Loop), 1, "the loop cost one turn");
    let target = &snapshot.targets[1];
    assert_eq!(target.address, Some(addr));
    assert_eq!(target.deactivations, 1);
    assert!(
        matches!(target.last_failure, Some((_, Fault::Reset))),
        "{:?}",
        target.last_failure
    );
    // Every client, the one that met the loop included, reaches the live target now.
    for i in 0..clients + 8 {
        tokio::time::timeout(PATIENCE, echo_once(client_ip(i), addr))
            .await
            .expect("served in time")
            .unwrap_or_else(|e| panic!("client {i} after the loop: {e}"));
    }
    settled(&server).await;
    assert_eq!(
        server.snapshot().rejected(Reject::Loop),
        1,
        "no more loops while the target is out of rotation"
    );
}
