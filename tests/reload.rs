//! Hot reload with real files, real signals and real TCP: the three ways people change a file,
//! SIGHUP, bad edits that change nothing, connections that are never cut, a moving listener,
//! and a stress run alternating between two target sets.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use stickylb::reload::{Outcome, Reloader, Trigger};
use stickylb::server::Server;
use stickylb_testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Polls (bounded) until a fresh client reaches a target named in `names`. Fresh client
/// addresses each time, so that no session pins the probe.
async fn wait_for_target(server: &Server, names: &[&str], first_ip: u32) -> String {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut n = first_ip;
    loop {
        if let Ok((name, _)) = which(client_ip(n), server.local_addr()).await {
            if names.contains(&name.as_str()) {
                return name;
            }
        }
        n += 1;
        assert!(
            tokio::time::Instant::now() < deadline,
            "no client reached {names:?} in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (bounded) until the reload counters reach `success` and `failure`.
async fn wait_for_reloads(server: &Server, success: u64, failure: u64) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let s = server.snapshot();
        if s.reloads_success >= success && s.reloads_failure >= failure {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "reloads: {} ok, {} failed; wanted {success}, {failure}",
            s.reloads_success,
            s.reloads_failure
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct Fixture {
    a: Backend,
    b: Backend,
    c: Backend,
    dir: TempDir,
}

async fn fixture(tag: &str) -> Fixture {
    Fixture {
        a: Backend::start("a", Mode::Named).await,
        b: Backend::start("b", Mode::Named).await,
        c: Backend::start("c", Mode::Named).await,
        dir: TempDir::new(tag),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_place_write_is_applied() {
    let f = fixture("inplace").await;
    let path = f.dir.path("config.json");
    std::fs::write(
        &path,
        config_text(&[f.a.addr, f.b.addr], serde_json::json!({})),
    )
    .unwrap();
    let server = start_from_file(&path, false);
    let _watcher = Reloader::new(server.clone()).watch().unwrap();
    wait_for_target(&server, &["a", "b"], 0).await;

    std::fs::write(&path, config_text(&[f.c.addr], serde_json::json!({}))).unwrap();
    wait_for_target(&server, &["c"], 1000).await;
    wait_for_reloads(&server, 1, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_editors_write_to_temp_then_rename_is_applied() {
    let f = fixture("rename").await;
    let path = f.dir.path("config.json");
    std::fs::write(&path, config_text(&[f.a.addr], serde_json::json!({}))).unwrap();
    let server = start_from_file(&path, false);
    let _watcher = Reloader::new(server.clone()).watch().unwrap();
    wait_for_target(&server, &["a"], 0).await;

    let temp = f.dir.path(".config.json.swp");
    std::fs::write(&temp, config_text(&[f.b.addr], serde_json::json!({}))).unwrap();
    std::fs::rename(&temp, &path).unwrap();
    wait_for_target(&server, &["b"], 1000).await;
    // A second save the same way: the watch survives the first rename.
    std::fs::write(&temp, config_text(&[f.c.addr], serde_json::json!({}))).unwrap();
    std::fs::rename(&temp, &path).unwrap();
    wait_for_target(&server, &["c"], 2000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_configmap_symlink_swap_is_applied() {
    use std::os::unix::fs::symlink;
    let f = fixture("configmap").await;
    // The layout kubelet makes: config.json -> ..data/config.json, ..data -> ..<timestamp>.
    let first = f.dir.path("..2026_11_22_00_00_00.1");
    std::fs::create_dir(&first).unwrap();
    std::fs::write(
        first.join("config.json"),
        config_text(&[f.a.addr], serde_json::json!({})),
    )
    .unwrap();
    symlink("..2026_11_22_00_00_00.1", f.dir.path("..data")).unwrap();
    symlink("..data/config.json", f.dir.path("config.json")).unwrap();
    let path = f.dir.path("config.json");
    let server = start_from_file(&path, false);
    let _watcher = Reloader::new(server.clone()).watch().unwrap();
    wait_for_target(&server, &["a"], 0).await;

    // An update: a new timestamped directory, a temporary symlink to it renamed over ..data
    // (atomic), then the old directory removed. config.json itself is never touched.
    let second = f.dir.path("..2026_11_22_00_01_00.2");
    std::fs::create_dir(&second).unwrap();
    std::fs::write(
        second.join("config.json"),
        config_text(&[f.b.addr, f.c.addr], serde_json::json!({})),
    )
    .unwrap();
    symlink("..2026_11_22_00_01_00.2", f.dir.path("..data_tmp")).unwrap();
    std::fs::rename(f.dir.path("..data_tmp"), f.dir.path("..data")).unwrap();
    std::fs::remove_dir_all(&first).unwrap();
    wait_for_target(&server, &["b", "c"], 1000).await;
    wait_for_reloads(&server, 1, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_edits_leave_the_running_config_serving() {
    let f = fixture("bad").await;
    let path = f.dir.path("config.json");
    let good = config_text(&[f.a.addr], serde_json::json!({}));
    std::fs::write(&path, &good).unwrap();
    let server = start_from_file(&path, false);
    let reloader = Reloader::new(server.clone());
    let _watcher = reloader.watch().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bad_edits = [
        ("invalid JSON", "{\"sourcePort\": 1,, }".to_string()),
        (
            "invalid value",
            config_text(&[f.b.addr], serde_json::json!({"sessionExpiry": -5})),
        ),
        ("truncated file", good[..good.len() / 2].to_string()),
        (
            "unresolvable host",
            good.replace("127.0.0.1", "no-such-host.invalid"),
        ),
        (
            "port already taken",
            config_text(
                &[f.b.addr],
                serde_json::json!({"sourcePort": taken.local_addr().unwrap().port()}),
            ),
        ),
    ];
    for (i, (what, bad)) in bad_edits.iter().enumerate() {
        std::fs::write(&path, bad).unwrap();
        wait_for_reloads(&server, 0, i as u64 + 1).await;
        assert!(server.snapshot().last_reload_failed, "{what}");
        let (name, _) = which(client_ip(i as u32), server.local_addr())
            .await
            .unwrap_or_else(|e| panic!("not serving after {what}: {e}"));
        assert_eq!(name, "a", "after {what} the old config serves");
    }
    // The same bad text again changes nothing (not even a count); SIGHUP re-reads regardless.
    assert!(reloader.reload(Trigger::Signal).await.is_err());
    // A good edit after all that is applied.
    std::fs::write(&path, config_text(&[f.c.addr], serde_json::json!({}))).unwrap();
    wait_for_target(&server, &["c"], 1000).await;
    assert!(!server.snapshot().last_reload_failed);
}

/// A path that is not a regular file (a named pipe with no writer here) is a counted, logged
/// failure at once, never a read that waits, and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_pipe_in_place_of_the_file_is_a_counted_failure_not_a_hang() {
    let f = fixture("fifo").await;
    let path = f.dir.path("config.json");
    std::fs::write(&path, config_text(&[f.a.addr], serde_json::json!({}))).unwrap();
    let server = start_from_file(&path, false);
    let reloader = Reloader::new(server.clone());
    std::fs::remove_file(&path).unwrap();
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for trigger in [Trigger::Signal, Trigger::File] {
        let result = tokio::time::timeout(PATIENCE, reloader.reload(trigger))
            .await
            .expect("the reload ends instead of waiting for a writer");
        let error = result.expect_err("rejected").to_string();
        assert!(error.contains("is a named pipe (FIFO)"), "{error}");
    }
    let s = server.snapshot();
    assert_eq!((s.reloads_success, s.reloads_failure), (0, 2));
    assert!(s.last_reload_failed);
    assert_eq!(
        which(client_ip(1), server.local_addr()).await.unwrap().0,
        "a"
    );
}

/// Once shutdown has begun, a reload changes nothing: above all, it does not listen again
/// on a new port during the drain. It is not counted as a failure either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_after_shutdown_began_changes_nothing() {
    let f = fixture("stopping").await;
    let path = f.dir.path("config.json");
    std::fs::write(&path, config_text(&[f.a.addr], serde_json::json!({}))).unwrap();
    let server = start_from_file(&path, false);
    let reloader = Reloader::new(server.clone());
    server.stop_accepting().await;
    let new_port = dead_port();
    std::fs::write(
        &path,
        config_text(
            &[f.b.addr],
            serde_json::json!({"sourcePort": new_port.port()}),
        ),
    )
    .unwrap();
    let result = reloader.reload(Trigger::Signal).await;
    assert!(
        matches!(result, Err(stickylb::reload::ReloadError::ShuttingDown)),
        "{result:?}"
    );
    assert!(
        tokio::net::TcpStream::connect(new_port).await.is_err(),
        "no listener on the new port"
    );
    assert_eq!(
        server.config().targets[0].addr,
        f.a.addr,
        "config unchanged"
    );
    let s = server.snapshot();
    assert_eq!((s.reloads_success, s.reloads_failure), (0, 0));
    // And no reload is even started by a request after `stop`.
    reloader.stop();
    assert!(!reloader.request(Trigger::Signal));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_written_file_is_never_applied_and_the_complete_one_is() {
    let f = fixture("half").await;
    let path = f.dir.path("config.json");
    std::fs::write(&path, config_text(&[f.a.addr], serde_json::json!({}))).unwrap();
    let server = start_from_file(&path, false);
    let reloader = Reloader::new(server.clone());
    let full = config_text(&[f.b.addr], serde_json::json!({}));
    let (head, tail) = full.split_at(full.len() / 2);
    // Written in two steps, with a reload in between: the half is rejected...
    std::fs::write(&path, head).unwrap();
    assert!(reloader.reload(Trigger::File).await.is_err());
    assert_eq!(
        which(client_ip(1), server.local_addr()).await.unwrap().0,
        "a"
    );
    // ...and the next event sees the whole file.
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(&mut file, tail.as_bytes()).unwrap();
    drop(file);
    assert!(matches!(
        reloader.reload(Trigger::File).await,
        Ok(Outcome::Applied { .. })
    ));
    assert_eq!(
        which(client_ip(2), server.local_addr()).await.unwrap().0,
        "b"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_connection_keeps_flowing_across_20_reloads() {
    let echo = Backend::start("echo", Mode::Echo).await;
    let other = Backend::start("other", Mode::Named).await;
    let dir = TempDir::new("flowing");
    let path = dir.path("config.json");
    std::fs::write(&path, config_text(&[echo.addr], serde_json::json!({}))).unwrap();
    let server = start_from_file(&path, false);
    let reloader = Reloader::new(server.clone());
    let mut open = connect_from(client_ip(1), server.local_addr())
        .await
        .unwrap();
    for i in 0..20u32 {
        // Alternate between dropping the echo target and bringing it back.
        let targets = if i % 2 == 0 {
            vec![other.addr]
        } else {
            vec![echo.addr, other.addr]
        };
        std::fs::write(&path, config_text(&targets, serde_json::json!({}))).unwrap();
        assert!(matches!(
            reloader.reload(Trigger::Signal).await,
            Ok(Outcome::Applied { .. })
        ));
        let message = format!("message {i}\n");
        open.write_all(message.as_bytes()).await.unwrap();
        let mut back = vec![0u8; message.len()];
        tokio::time::timeout(PATIENCE, open.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, message.as_bytes());
    }
    assert_eq!(server.snapshot().reloads_success, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_targets_open_connection_finishes_while_new_clients_go_elsewhere() {
    let f = fixture("removed").await;
    let path = f.dir.path("config.json");
    std::fs::write(&path, config_text(&[f.a.addr], serde_json::json!({}))).unwrap();
    let server = start_from_file(&path, false);
    let reloader = Reloader::new(server.clone());
    let (name, mut open) = which(client_ip(1), server.local_addr()).await.unwrap();
    assert_eq!(name, "a");

    std::fs::write(&path, config_text(&[f.b.addr], serde_json::json!({}))).unwrap();
    reloader.reload(Trigger::Signal).await.unwrap();
    // The same client, and others, now reach b: its session on the removed a moved.
    assert_eq!(
        which(client_ip(1), server.local_addr()).await.unwrap().0,
        "b"
    );
    assert_eq!(
        which(client_ip(2), server.local_addr()).await.unwrap().0,
        "b"
    );
    // The connection to a goes on to its natural end.
    let payload = vec![9u8; 256 * 1024];
    open.write_all(&payload).await.unwrap();
    open.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(PATIENCE, open.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, payload, "the drained connection finished whole");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_change_moves_the_listener_and_old_connections_go_on() {
    let f = fixture("port").await;
    let path = f.dir.path("config.json");
    let old_port = free_port();
    std::fs::write(
        &path,
        config_text(&[f.a.addr], serde_json::json!({"sourcePort": old_port})),
    )
    .unwrap();
    let server = start_from_file(&path, true);
    let old = server.local_addr();
    assert_eq!(old.port(), old_port);
    let reloader = Reloader::new(server.clone());
    let (_, mut open) = which(client_ip(1), old).await.unwrap();

    let new_port = free_port();
    std::fs::write(
        &path,
        config_text(&[f.a.addr], serde_json::json!({"sourcePort": new_port})),
    )
    .unwrap();
    reloader.reload(Trigger::Signal).await.unwrap();
    assert_eq!(server.local_addr().port(), new_port);
    assert_eq!(
        which(client_ip(2), server.local_addr()).await.unwrap().0,
        "a"
    );
    assert!(
        tokio::net::TcpStream::connect(old).await.is_err(),
        "the old listener is closed"
    );
    open.write_all(b"still here\n").await.unwrap();
    let mut back = [0u8; 11];
    open.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_only_keys_are_kept_and_named_while_the_rest_applies() {
    let f = fixture("kept").await;
    let path = f.dir.path("config.json");
    std::fs::write(
        &path,
        config_text(&[f.a.addr], serde_json::json!({"balancerCount": 2})),
    )
    .unwrap();
    let server = start_from_file(&path, false);
    let reloader = Reloader::new(server.clone());
    std::fs::write(
        &path,
        config_text(
            &[f.b.addr],
            serde_json::json!({"balancerCount": 3, "metricsPort": 19999}),
        ),
    )
    .unwrap();
    match reloader.reload(Trigger::Signal).await.unwrap() {
        Outcome::Applied { kept } => {
            assert_eq!(kept, vec!["metricsHost/metricsPort", "balancerCount"])
        }
        other => panic!("{other:?}"),
    }
    let config = server.config();
    assert_eq!(config.balancer_count, 2);
    assert_eq!(config.metrics, None);
    assert_eq!(
        which(client_ip(1), server.local_addr()).await.unwrap().0,
        "b"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_50_alternating_reloads_under_continuous_connections() {
    let backends = [
        Backend::start("a1", Mode::Named).await,
        Backend::start("a2", Mode::Named).await,
        Backend::start("b1", Mode::Named).await,
        Backend::start("b2", Mode::Named).await,
    ];
    let set_a = [backends[0].addr, backends[1].addr];
    let set_b = [backends[2].addr, backends[3].addr];
    let dir = TempDir::new("stress");
    let path = dir.path("config.json");
    std::fs::write(&path, config_text(&set_a, serde_json::json!({}))).unwrap();
    let server = start_from_file(&path, false);
    let reloader = Reloader::new(server.clone());
    let lb = server.local_addr();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));

    // Four clients connect continuously, each from its own range of addresses.
    let mut clients = Vec::new();
    for c in 0..4u32 {
        let done = done.clone();
        clients.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let mut n = 0u32;
            // Bounded: stops when the reloads are done, and after at most 20,000 connections.
            while !done.load(Relaxed) && n < 20_000 {
                let ip = client_ip(c * 20_000 + n);
                n += 1;
                match which(ip, lb).await {
                    Ok((name, _)) if ["a1", "a2", "b1", "b2"].contains(&name.as_str()) => ok += 1,
                    Ok((name, _)) => failed.push(format!("{ip}: unknown target {name}")),
                    Err(e) => failed.push(format!("{ip}: {e}")),
                }
            }
            (ok, failed)
        }));
    }
    for i in 0..50 {
        let set = if i % 2 == 0 { &set_b } else { &set_a };
        std::fs::write(&path, config_text(set, serde_json::json!({}))).unwrap();
        reloader.reload(Trigger::Signal).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    done.store(true, Relaxed);
    let mut total = 0;
    for client in clients {
        let (ok, failed) = client.await.unwrap();
        assert!(failed.is_empty(), "failed connections: {failed:?}");
        total += ok;
    }
    assert!(
        total > 50,
        "only {total} connections made during the reloads"
    );
    assert_eq!(server.snapshot().reloads_success, 50);
}
