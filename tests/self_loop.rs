//! No self-loop in any spelling (design §16, issue 11): `stickylb check` refuses a target that is
//! the listener however it is written, and a loop the config cannot see (a name that resolves
//! differently later, a NAT rule) costs one connection, not thousands, because a connection
//! from stickylb's own outgoing socket is refused (`connections_rejected_total{reason="loop"}`).

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use stickylb::server::{self, Server};
use stickylb::Reject;
use stickylb_testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `stickylb check` on a config whose target is the listener spelled as `host`.
fn check(listen: &str, host: &str) -> (Option<i32>, String) {
    let dir = TempDir::new("self-loop-check");
    let path = dir.path("config.json");
    let port = dead_port().port();
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
        // Bounded wait until the handlers of this client are gone.
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while server.active() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "connections left open"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
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
