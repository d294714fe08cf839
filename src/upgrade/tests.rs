//! The handover of established connections, both sides in one process: a balancer whose
//! connections stop mid-transfer and are sent over a real socket pair (descriptors by
//! SCM_RIGHTS) to a second balancer, which relays them on. What the process-level tests
//! (`tests/upgrade.rs`) cannot arrange at will is arranged here: bytes held in a splice pipe or
//! in a copy buffer at the moment of the handover, and a half-closed direction.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};

use super::give::{collect, Collected};
use super::take::resume_all;
use crate::balance::Shared;
use crate::config::Config;
use crate::handover::{frame, Batch, Connection, Held};
use crate::proxy::handoff::{Handoff, Verdict};
use crate::server::{self, Server};

const PATIENCE: Duration = Duration::from_secs(20);

/// Bytes each way: far more than the socket buffers and a pipe hold, so both directions stall
/// with bytes in the relay while nobody reads.
const LEN: usize = 8 << 20;

fn config(target: SocketAddr, zero_copy: bool) -> Config {
    let text = format!(
        r#"{{"sourceHost": "127.0.0.1", "sourcePort": 1, "metricsPort": null, "zeroCopy": {zero_copy},
            "targets": [{{"host": "127.0.0.1", "port": {}}}]}}"#,
        target.port()
    );
    Config::parse(Path::new("test.json"), &text).expect("valid config")
}

fn start(config: &Config, shared: Shared) -> Arc<Server> {
    let listener = server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    Arc::new(Server::start_with(config.clone(), listener, shared).unwrap())
}

/// The byte at `offset` of stream `seed`.
fn byte(seed: u8, offset: usize) -> u8 {
    (offset as u64)
        .wrapping_mul(2_654_435_761)
        .wrapping_add(u64::from(seed) * 97)
        .rotate_right(13) as u8
}

/// Writes `len` bytes of stream `seed`, counting progress, then half-closes.
async fn write_stream(
    mut w: tokio::net::tcp::OwnedWriteHalf,
    seed: u8,
    len: usize,
    progress: Arc<AtomicUsize>,
) {
    let mut sent = 0;
    let mut chunk = vec![0u8; 64 * 1024];
    while sent < len {
        let n = chunk.len().min(len - sent);
        for (i, b) in chunk[..n].iter_mut().enumerate() {
            *b = byte(seed, sent + i);
        }
        w.write_all(&chunk[..n]).await.expect("write");
        sent += n;
        progress.store(sent, Ordering::Relaxed);
    }
    w.shutdown().await.expect("half-close");
}

/// Reads to EOF and checks every byte against stream `seed`; returns the count.
async fn read_stream(mut r: tokio::net::tcp::OwnedReadHalf, seed: u8) -> usize {
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf).await.expect("read (a reset is a cut)");
        if n == 0 {
            return got;
        }
        for (i, b) in buf[..n].iter().enumerate() {
            assert_eq!(*b, byte(seed, got + i), "byte {} of stream {seed}", got + i);
        }
        got += n;
    }
}

/// Reads both far ends to EOF (the target gets stream 1, the client stream 2): the bytes each.
async fn read_both(
    target: tokio::net::tcp::OwnedReadHalf,
    client: tokio::net::tcp::OwnedReadHalf,
) -> (usize, usize) {
    let both = async { tokio::join!(read_stream(target, 1), read_stream(client, 2)) };
    tokio::time::timeout(PATIENCE, both)
        .await
        .expect("streams end")
}

/// Waits until `progress` has not moved for a while: the writer is stuck on full buffers.
async fn stalled(progress: &AtomicUsize) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut last = usize::MAX;
    let mut still = 0;
    while still < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the writer never stalled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = progress.load(Ordering::Relaxed);
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
}

/// A balancer with one connection through it, both directions stalled mid-transfer (nobody
/// reads), the far ends ready to read.
struct Stalled {
    /// `LEN` each way can grow the relay's pipes: held for the test (see
    /// `splice::one_at_a_time`).
    _one: std::sync::MutexGuard<'static, ()>,
    old: Arc<Server>,
    config: Config,
    client_reader: tokio::net::tcp::OwnedReadHalf,
    target_reader: tokio::net::tcp::OwnedReadHalf,
}

// The guard only keeps other tests out (each runs on its own runtime and thread); nothing on
// the test's runtime takes it.
#[allow(clippy::await_holding_lock)]
async fn stall(zero_copy: bool) -> Stalled {
    let one = crate::proxy::splice::one_at_a_time();
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = config(target.local_addr().unwrap(), zero_copy);
    let old = start(&config, Shared::new());
    let client = TcpStream::connect(old.local_addr()).await.unwrap();
    let (far, _) = target.accept().await.unwrap();
    let (client_reader, client_writer) = client.into_split();
    let (target_reader, target_writer) = far.into_split();
    let up = Arc::new(AtomicUsize::new(0));
    let down = Arc::new(AtomicUsize::new(0));
    tokio::spawn(write_stream(client_writer, 1, LEN, up.clone()));
    tokio::spawn(write_stream(target_writer, 2, LEN, down.clone()));
    stalled(&up).await;
    stalled(&down).await;
    Stalled {
        _one: one,
        old,
        config,
        client_reader,
        target_reader,
    }
}

/// Collects the old balancer's connections and sends them over a socket pair; returns what
/// the other end received, and the verdicts to give.
async fn hand_over(
    old: &Server,
) -> (
    Batch<std::os::fd::OwnedFd>,
    Collected,
    crate::handover::State,
) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut handoffs = old.proxy().handover.begin();
    let mut collected = Collected::default();
    let mut reader = frame::Reader::new();
    collect(&ours, &mut reader, &mut handoffs, old, &mut collected)
        .await
        .unwrap();
    let state = old.proxy().shared.export();
    let f = frame::Reader::new().next(&theirs).await.unwrap().unwrap();
    (Batch::decode(&f.payload, f.fds).unwrap(), collected, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_handed_over_mid_transfer_keeps_every_byte_and_its_counts() {
    for zero_copy in [true, false] {
        let s = stall(zero_copy).await;
        let (batch, collected, state) = hand_over(&s.old).await;
        assert_eq!(batch.connections.len(), 1);
        let c = &batch.connections[0];
        let held = |h: &Held<_>| match h {
            Held::Nothing => "nothing",
            Held::Bytes(_) => "bytes",
            Held::Pipe { .. } => "pipe",
        };
        // Both directions stalled with bytes in the relay: a pipe as it is, or the copy
        // buffer's bytes.
        let want = if zero_copy { "pipe" } else { "bytes" };
        assert_eq!(
            (held(&c.up.held), held(&c.down.held)),
            (want, want),
            "zeroCopy {zero_copy}"
        );

        // The new balancer takes it up from the state and the record.
        let (shared, _held) = Shared::restored(&state).unwrap();
        let resumed = resume_all(batch.connections, &shared, &s.config).unwrap();
        let new = start(&s.config, shared);
        for r in resumed {
            tokio::spawn(new.proxy().clone().resume(r));
        }
        for verdict in collected.verdicts {
            verdict.send(Verdict::Taken).unwrap();
        }
        s.old.proxy().handover.end();
        // The old one lets go without a reset; the new one relays the rest.
        assert!(s.old.drain(PATIENCE).await, "the old handler ends");
        let both = read_both(s.target_reader, s.client_reader).await;
        assert_eq!(both, (LEN, LEN), "every byte, then a FIN, each way");
        assert!(new.drain(PATIENCE).await);
        let t = &new.snapshot().targets[0];
        assert_eq!(
            (t.bytes_to_target, t.bytes_to_client),
            (LEN as u64, LEN as u64),
            "the old process's counts plus the new one's"
        );
        assert_eq!(
            t.connections, 1,
            "a handed-over connection is not counted again"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_handover_is_called_off_relays_on_in_the_old_process() {
    let s = stall(true).await;
    let (batch, collected, _state) = hand_over(&s.old).await;
    // The new process would drop its descriptors: nothing happens to the connection.
    drop(batch);
    drop(collected);
    s.old.proxy().handover.end();
    assert_eq!(
        read_both(s.target_reader, s.client_reader).await,
        (LEN, LEN)
    );
    let t = &s.old.snapshot().targets[0];
    assert_eq!(
        (t.bytes_to_target, t.bytes_to_client),
        (LEN as u64, LEN as u64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_direction_stays_closed_and_the_other_flows_on() {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = config(target.local_addr().unwrap(), true);
    let old = start(&config, Shared::new());
    let mut client = TcpStream::connect(old.local_addr()).await.unwrap();
    let (mut far, _) = target.accept().await.unwrap();
    // The client sends its request and half-closes; the target reads it to EOF.
    client.write_all(b"request").await.unwrap();
    client.shutdown().await.unwrap();
    let mut request = Vec::new();
    tokio::time::timeout(PATIENCE, far.read_to_end(&mut request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(request, b"request");

    let (batch, collected, state) = hand_over(&old).await;
    assert!(
        batch.connections[0].up.ended,
        "the client's FIN was passed on"
    );
    assert!(!batch.connections[0].down.ended);
    let (shared, _held) = Shared::restored(&state).unwrap();
    let resumed = resume_all(batch.connections, &shared, &config).unwrap();
    let new = start(&config, shared);
    for r in resumed {
        tokio::spawn(new.proxy().clone().resume(r));
    }
    for verdict in collected.verdicts {
        verdict.send(Verdict::Taken).unwrap();
    }
    old.proxy().handover.end();
    // The reply, after the handover, then the target's close.
    far.write_all(b"reply").await.unwrap();
    far.shutdown().await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(PATIENCE, client.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, b"reply");
    assert!(new.drain(PATIENCE).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_carries_sessions_windows_and_the_clock() {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = config(target.local_addr().unwrap(), true);
    let old = start(&config, Shared::new());
    let shared = &old.proxy().shared;
    let balancer = old.proxy().store.load();
    let state = &balancer.states()[0];
    state.deactivate(
        shared.clock.now_ms(),
        Duration::from_secs(600),
        crate::sockets::Fault::Refused,
    );
    shared
        .stats
        .reloaded(shared.clock.now_ms(), Some("config.json: bad".into()));
    {
        // A session with an open connection, as a connection's route leaves it.
        let _route = balancer.route(shared, "10.1.2.3".parse().unwrap());
        let exported = shared.export();
        assert_eq!(exported.sessions.len(), 1);
        assert_eq!(exported.sessions[0].open, 1);
        let (restored, _held) = Shared::restored(&exported).unwrap();
        assert!(
            restored.clock.now_ms() >= exported.clock_ms,
            "the clock goes on"
        );
        let target = &restored.registry.all()[0];
        assert!(
            !target.is_up(restored.clock.now_ms()),
            "the deactivation window carries over"
        );
        assert_eq!(target.counters.deactivations.load(Ordering::Relaxed), 1);
        let now = restored.clock.now_ms();
        assert_eq!(target.since_ms(now), state.since_ms(now), "its history too");
        assert_eq!(target.last_failure(), state.last_failure());
        assert_eq!(
            restored.stats.last_reload(),
            shared.stats.last_reload(),
            "the last reload, its error included"
        );
        assert_eq!(restored.sessions.len(), 1, "the session carries over");
        let again = restored.export();
        assert_eq!(again.sessions[0].open, 0, "its connections open it again");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_go_in_batches_of_at_most_253_descriptors() {
    // 300 connections relaying, so the collection waits for 300 handoffs; they come in two
    // waves, the second while it waits (the way connections reaching their relay stage during
    // an upgrade come), each with its two descriptors.
    const N: usize = 300;
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = config(target.local_addr().unwrap(), true);
    let old = start(&config, Shared::new());
    let mut held = Vec::new();
    for _ in 0..N {
        held.push(TcpStream::connect(old.local_addr()).await.unwrap());
        held.push(target.accept().await.unwrap().0);
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while old.proxy().relaying() < N as u64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections relaying"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let devnull = std::fs::File::open("/dev/null").unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&devnull);
    let (tx, mut handoffs) = tokio::sync::mpsc::unbounded_channel();
    let mut answers = Vec::new();
    let mut offer = |n: usize| {
        for _ in 0..n {
            let (verdict, answer) = tokio::sync::oneshot::channel();
            answers.push(answer);
            let connection = Connection {
                client: fd,
                server: fd,
                peer: "127.0.0.1:1".parse().unwrap(),
                target: "t".into(),
                pinned: false,
                age_us: 0,
                proxied_us: None,
                to_target: 0,
                to_client: 0,
                quiet_ms: None,
                up: idle_direction(),
                down: idle_direction(),
            };
            tx.send(Handoff {
                connection,
                verdict,
            })
            .unwrap();
        }
    };
    offer(N / 2);
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut collected = Collected::default();
    let mut reader = frame::Reader::new();
    let receiving = async {
        let mut reader = frame::Reader::new();
        let mut frames = Vec::new();
        let mut connections = 0;
        while connections < N {
            let f = reader.next(&theirs).await.unwrap().unwrap();
            let fds = f.fds.len();
            connections += Batch::decode(&f.payload, f.fds).unwrap().connections.len();
            frames.push(fds);
        }
        frames
    };
    let second_wave = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        offer(N / 2);
    };
    let sending = collect(&ours, &mut reader, &mut handoffs, &old, &mut collected);
    let receiving = tokio::time::timeout(PATIENCE, receiving);
    let (sent, frames, ()) = tokio::join!(sending, receiving, second_wave);
    sent.expect("every batch sent");
    let frames = frames.expect("every batch received");
    assert_eq!(collected.verdicts.len(), N);
    assert!(frames.iter().all(|&f| f <= frame::MAX_FDS), "{frames:?}");
    assert_eq!(frames.iter().sum::<usize>(), 2 * N);
    assert!(frames.len() >= 3, "{frames:?}");
}

fn idle_direction() -> crate::handover::Direction<std::os::fd::RawFd> {
    crate::handover::Direction {
        splice: false,
        may_splice: true,
        ended: false,
        held: Held::Nothing,
    }
}
