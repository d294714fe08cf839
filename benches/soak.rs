//! Soak (issue 6): the release binary under mixed traffic for a long time while its targets are
//! killed and restarted and its config is rewritten every few seconds. Every byte is checked end
//! to end, and every failed connection is classified.
//!
//! ```sh
//! cargo bench --bench soak                          # 10 minutes
//! STICKYLB_SOAK_SECS=60 cargo bench --bench soak    # a short run
//! ```
//!
//! - Targets: 4 echo servers, each a separate process (this program run again in the target
//!   role), answering with their name and then echoing. Every 7 s one of them is killed with
//!   SIGKILL (its open connections die with it) and started again 3 s later on the same port.
//! - Config: rewritten every 3 s (the balancer watches the file), cycling through reordered,
//!   grown, shrunk and reweighted target lists, by in-place writes and by rename; every fifth
//!   write is first a broken file, which must be rejected while the old config keeps serving.
//! - Traffic, from thousands of client addresses: bulk transfers (1–8 MiB each way), short
//!   connections (1–4 KiB), and up to 200 idle connections held 5–60 s before a last exchange.
//!
//! A failed connection is *unavoidable* when a target was killed during its life (its bytes
//! were in that process); anything else is *unexplained*, and a byte that differs is *corrupt*.
//! The run exits non-zero unless both are 0. It reports connections made, failed (by class),
//! bytes verified, reloads, kills, and the balancer's RSS and descriptors at start and end.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader as StdBufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{
    check_pattern, client_ip, config_text, connect_from, dead_port, send_pattern, Rng, TempDir,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_stickylb");
const TARGETS: usize = 4;
const IDLE_MAX: u64 = 200;
const KILL_EVERY: Duration = Duration::from_secs(7);
const DOWN_FOR: Duration = Duration::from_secs(3);
const RELOAD_EVERY: Duration = Duration::from_secs(3);

fn main() {
    if std::env::var("STICKYLB_SOAK_ROLE").as_deref() == Ok("target") {
        return target_role();
    }
    let secs: u64 = std::env::var("STICKYLB_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let ok = runtime.block_on(soak(Duration::from_secs(secs)));
    std::process::exit(if ok { 0 } else { 1 });
}

/// The target role: an echo server on `STICKYLB_SOAK_PORT` that first sends its name and a
/// newline. Prints "ready" once listening; runs until killed.
fn target_role() {
    let port: u16 = std::env::var("STICKYLB_SOAK_PORT")
        .expect("port")
        .parse()
        .expect("port");
    let name = std::env::var("STICKYLB_SOAK_NAME").expect("name");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("reuseaddr");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], port)))
            .expect("bind target port");
        let listener = socket.listen(1024).expect("listen");
        println!("ready");
        let _ = std::io::stdout().flush();
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let name = name.clone();
            tokio::spawn(async move {
                if stream
                    .write_all(format!("{name}\n").as_bytes())
                    .await
                    .is_ok()
                {
                    let (mut r, mut w) = stream.split();
                    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                        let _ = w.shutdown().await;
                    }
                }
            });
        }
    });
}

/// One target process, and how often it has been killed (to classify failures).
struct Target {
    name: String,
    addr: SocketAddr,
    process: Mutex<Option<Child>>,
    kills: AtomicU64,
}

impl Target {
    fn start(&self) {
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .env("STICKYLB_SOAK_ROLE", "target")
            .env("STICKYLB_SOAK_PORT", self.addr.port().to_string())
            .env("STICKYLB_SOAK_NAME", &self.name)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn target");
        let mut line = String::new();
        StdBufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("target ready line");
        assert_eq!(line.trim(), "ready", "{} did not start", self.name);
        *self.process.lock().expect("process") = Some(child);
    }

    /// Kills the process. `kills` goes up by one before (odd: a kill is under way) and by one
    /// after, so a connection that read the name while the kill was under way, or that saw
    /// the count change, knows it may have died of it.
    fn kill(&self) {
        if let Some(mut child) = self.process.lock().expect("process").take() {
            self.kills.fetch_add(1, Relaxed);
            let _ = child.kill();
            let _ = child.wait();
            self.kills.fetch_add(1, Relaxed);
        }
    }
}

/// The balancer process, with its stderr lines.
struct Balancer {
    child: Child,
    addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Balancer {
    fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .expect("lines")
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    fn status_kib(&self, field: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with(field))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|n| n.parse().ok())
            })
            .unwrap_or(0)
    }

    fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Counters of the run.
#[derive(Default)]
struct Tally {
    made: [AtomicU64; 3],
    ok: [AtomicU64; 3],
    unavoidable: [AtomicU64; 3],
    unexplained: [AtomicU64; 3],
    corrupt: AtomicU64,
    bytes_verified: AtomicU64,
    samples: Mutex<Vec<String>>,
}

const KINDS: [&str; 3] = ["bulk", "short", "idle"];

/// Why one connection failed, if it did.
enum Outcome {
    Ok(u64),
    /// Failed; `killed` says whether a target was killed during its life.
    Failed {
        killed: bool,
        corrupt: bool,
        why: String,
    },
}

struct World {
    lb: SocketAddr,
    started: Instant,
    /// Kills, restarts and config writes, with their times, to set failures against.
    events: Mutex<Vec<(Instant, String)>>,
    targets: Vec<Target>,
    tally: Tally,
    stop: AtomicBool,
    next_ip: AtomicU64,
    idle_open: AtomicU64,
}

impl World {
    fn event(&self, what: String) {
        self.events
            .lock()
            .expect("events")
            .push((Instant::now(), what));
    }

    fn total_kills(&self) -> u64 {
        self.targets.iter().map(|t| t.kills.load(Relaxed)).sum()
    }

    fn kills_of(&self, name: &str) -> u64 {
        self.targets
            .iter()
            .find(|t| t.name == name)
            .map_or(0, |t| t.kills.load(Relaxed))
    }

    /// Every target's kill count now.
    fn all_kills(&self) -> Vec<u64> {
        self.targets.iter().map(|t| t.kills.load(Relaxed)).collect()
    }

    fn ip(&self) -> Ipv4Addr {
        client_ip((self.next_ip.fetch_add(1, Relaxed) % 40_000) as u32)
    }

    fn record(&self, kind: usize, outcome: Outcome) {
        let t = &self.tally;
        t.made[kind].fetch_add(1, Relaxed);
        match outcome {
            Outcome::Ok(bytes) => {
                t.ok[kind].fetch_add(1, Relaxed);
                t.bytes_verified.fetch_add(bytes, Relaxed);
            }
            Outcome::Failed {
                killed,
                corrupt,
                why,
            } => {
                if corrupt {
                    t.corrupt.fetch_add(1, Relaxed);
                }
                if killed && !corrupt {
                    t.unavoidable[kind].fetch_add(1, Relaxed);
                } else {
                    if !corrupt {
                        t.unexplained[kind].fetch_add(1, Relaxed);
                    }
                    let mut samples = t.samples.lock().expect("samples");
                    if samples.len() < 20 {
                        let at = self.started.elapsed().as_secs_f64();
                        samples.push(format!("{at:.3} s: {}: {why}", KINDS[kind]));
                    }
                }
            }
        }
    }
}

/// One connection: connect, read the target's name, send `len` pattern bytes (after holding
/// the connection `hold` if given) and check the echo byte for byte.
async fn exchange(world: &World, len: usize, hold: Option<Duration>) -> Outcome {
    // Taken before connecting: the target the connection reaches can only die after this, so
    // a kill between now and a failure explains it (reading its count once the name has
    // arrived would miss a kill that happened between the name's arrival and that read).
    let kills_before = world.total_kills();
    let counts_before = world.all_kills();
    let failed = |why: String, name: Option<&str>, since: u64| {
        let killed = match name {
            Some(name) => since % 2 == 1 || world.kills_of(name) != since,
            None => kills_before % 2 == 1 || world.total_kills() != kills_before,
        };
        let corrupt = why.contains("differs") || why.contains("more than");
        Outcome::Failed {
            killed,
            corrupt,
            why,
        }
    };
    let ip = world.ip();
    let stream = match connect_from(ip, world.lb).await {
        Ok(s) => s,
        Err(e) => return failed(format!("{ip}: connect: {e}"), None, 0),
    };
    // The client's address as the balancer's access log names it.
    let ip = stream
        .local_addr()
        .map_or_else(|_| ip.to_string(), |a| a.to_string());
    let mut reader = BufReader::new(stream);
    let mut name = String::new();
    match tokio::time::timeout(Duration::from_secs(20), reader.read_line(&mut name)).await {
        Ok(Ok(n)) if n > 0 => {}
        Ok(Ok(_)) => return failed(format!("{ip}: EOF before the name"), None, 0),
        Ok(Err(e)) => return failed(format!("{ip}: before the name: {e}"), None, 0),
        Err(_) => return failed(format!("{ip}: no name within 20 s"), None, 0),
    }
    let name = name.trim_end().to_string();
    let since = world
        .targets
        .iter()
        .position(|t| t.name == name)
        .map_or(0, |i| counts_before[i]);
    if let Some(hold) = hold {
        tokio::time::sleep(hold).await;
    }
    let (mut r, mut w) = reader.into_inner().into_split();
    let seed = world.next_ip.load(Relaxed) ^ (len as u64) << 20;
    let writer = tokio::spawn(async move { send_pattern(&mut w, seed, len).await });
    let checked =
        tokio::time::timeout(Duration::from_secs(120), check_pattern(&mut r, seed, len)).await;
    let written = writer.await;
    match checked {
        Err(_) => failed(
            format!("{ip} via {name}: no echo within 120 s"),
            Some(&name),
            since,
        ),
        Ok(Err(e)) => failed(format!("{ip} via {name}: {e}"), Some(&name), since),
        Ok(Ok(n)) if n != len => failed(
            format!("{ip} via {name}: EOF after {n} of {len} bytes"),
            Some(&name),
            since,
        ),
        Ok(Ok(_)) => match written {
            Ok(Ok(())) => {
                // Read to the end: the target's FIN came through too.
                let mut rest = [0u8; 1];
                match r.read(&mut rest).await {
                    Ok(0) | Err(_) => Outcome::Ok(len as u64 * 2),
                    Ok(_) => failed(format!("{ip}: bytes after the end"), Some(&name), since),
                }
            }
            _ => failed(format!("{ip} via {name}: write failed"), Some(&name), since),
        },
    }
}

/// `STICKYLB_SOAK_ACCESS_LOG=1`: the balancer logs each connection, and a failure's sample
/// shows the balancer's line for it (bytes each way, outcome).
fn access_log() -> bool {
    std::env::var("STICKYLB_SOAK_ACCESS_LOG").as_deref() == Ok("1")
}

fn config_variant(world: &World, port: u16, n: u64) -> String {
    let t: Vec<SocketAddr> = world.targets.iter().map(|t| t.addr).collect();
    let (list, weights): (Vec<SocketAddr>, Vec<u32>) = match n % 5 {
        0 => (vec![t[0], t[1], t[2]], vec![1, 1, 1]),
        1 => (vec![t[2], t[0], t[1]], vec![1, 1, 1]),
        2 => (vec![t[0], t[1], t[2], t[3]], vec![1, 1, 1, 1]),
        3 => (vec![t[3], t[2], t[1], t[0]], vec![1, 3, 1, 2]),
        _ => (vec![t[1], t[2], t[3]], vec![1, 1, 1]),
    };
    let mut doc: serde_json::Value = serde_json::from_str(&config_text(
        &list,
        serde_json::json!({
            "targetDeactivationDuration": 2000,
            "connectTimeout": 1000 + n % 3 * 500,
            "shutdownTimeout": 5000,
            "accessLog": access_log(),
        }),
    ))
    .expect("json");
    doc["sourcePort"] = port.into();
    for (target, weight) in doc["targets"]
        .as_array_mut()
        .expect("targets")
        .iter_mut()
        .zip(weights)
    {
        target["weight"] = weight.into();
    }
    serde_json::to_string_pretty(&doc).expect("json")
}

async fn soak(length: Duration) -> bool {
    let dir = TempDir::new("soak");
    let targets: Vec<Target> = (0..TARGETS)
        .map(|i| Target {
            name: format!("t{i}"),
            addr: dead_port(),
            process: Mutex::new(None),
            kills: AtomicU64::new(0),
        })
        .collect();
    for t in &targets {
        t.start();
    }
    let port = dead_port().port();
    let path = dir.path("config.json");
    let world = Arc::new(World {
        lb: SocketAddr::from(([127, 0, 0, 1], port)),
        started: Instant::now(),
        events: Mutex::new(Vec::new()),
        targets,
        tally: Tally::default(),
        stop: AtomicBool::new(false),
        next_ip: AtomicU64::new(0),
        idle_open: AtomicU64::new(0),
    });
    std::fs::write(&path, config_variant(&world, port, 0)).expect("config");

    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn stickylb (release)");
    let stderr = child.stderr.take().expect("stderr");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in StdBufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening") {
                    let _ = ready_tx.send(());
                }
                // Keep what is counted, not every per-connection warning.
                if line.contains("reload")
                    || line.contains("stickylb::access")
                    || line.contains("panicked")
                    || line.contains("listening")
                    || line.contains("ERROR")
                {
                    lines.lock().expect("lines").push(line);
                }
            }
        });
    }
    let lb = Balancer {
        child,
        addr: world.lb,
        lines,
    };
    ready_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the balancer is listening");
    let rss_start = lb.rss_kib();
    let fds_start = lb.fds();
    println!(
        "soak: {} s, balancer pid {} on {}, RSS {rss_start} KiB, {fds_start} fds",
        length.as_secs(),
        lb.child.id(),
        lb.addr
    );
    let started = Instant::now();

    let mut tasks = tokio::task::JoinSet::new();
    // Bulk: two at a time.
    for k in 0..2u64 {
        let world = world.clone();
        tasks.spawn(async move {
            let mut rng = Rng(0x1234_5678 + k);
            while !world.stop.load(Relaxed) {
                let len = (1 + rng.below(8) as usize) << 20;
                let outcome = exchange(&world, len, None).await;
                world.record(0, outcome);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    // Short: four at a time.
    for k in 0..4u64 {
        let world = world.clone();
        tasks.spawn(async move {
            let mut rng = Rng(0x9abc_def0 + k);
            while !world.stop.load(Relaxed) {
                let len = 1024 + rng.below(3 * 1024) as usize;
                let outcome = exchange(&world, len, None).await;
                world.record(1, outcome);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }
    // Idle: up to IDLE_MAX held 5–60 s each (none started in the last minute of the run, so
    // they end with it).
    {
        let world = world.clone();
        let deadline = started + length;
        tasks.spawn(async move {
            let mut rng = Rng(0x0bad_cafe);
            let mut idle = tokio::task::JoinSet::new();
            while !world.stop.load(Relaxed) {
                let left = deadline.saturating_duration_since(Instant::now());
                if world.idle_open.load(Relaxed) < IDLE_MAX && left > Duration::from_secs(6) {
                    let max_hold = left.as_secs().saturating_sub(1).clamp(5, 60);
                    let hold = Duration::from_secs(5 + rng.below(max_hold - 4));
                    let world = world.clone();
                    world.idle_open.fetch_add(1, Relaxed);
                    idle.spawn(async move {
                        let outcome = exchange(&world, 64, Some(hold)).await;
                        world.record(2, outcome);
                        world.idle_open.fetch_sub(1, Relaxed);
                    });
                }
                while idle.try_join_next().is_some() {}
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            while idle.join_next().await.is_some() {}
        });
    }
    // Chaos: kill one target every KILL_EVERY, start it again DOWN_FOR later.
    let chaos = {
        let world = world.clone();
        tokio::spawn(async move {
            let mut n = 0usize;
            let mut kills = 0u64;
            while !world.stop.load(Relaxed) {
                tokio::time::sleep(KILL_EVERY - DOWN_FOR).await;
                if world.stop.load(Relaxed) {
                    break;
                }
                let victim = n % TARGETS;
                n += 1;
                let w = world.clone();
                world.event(format!("kill t{victim}"));
                tokio::task::spawn_blocking(move || w.targets[victim].kill())
                    .await
                    .expect("kill");
                world.event(format!("killed t{victim}"));
                kills += 1;
                tokio::time::sleep(DOWN_FOR).await;
                let w = world.clone();
                world.event(format!("restart t{victim}"));
                tokio::task::spawn_blocking(move || w.targets[victim].start())
                    .await
                    .expect("restart");
                world.event(format!("restarted t{victim}"));
            }
            kills
        })
    };
    // Reloads: a new config every RELOAD_EVERY; every fifth write is broken first.
    let reload = {
        let world = world.clone();
        let path = path.clone();
        tokio::spawn(async move {
            let (mut good, mut broken) = (0u64, 0u64);
            let mut n = 1u64;
            while !world.stop.load(Relaxed) {
                tokio::time::sleep(RELOAD_EVERY).await;
                if world.stop.load(Relaxed) {
                    break;
                }
                let text = config_variant(&world, port, n);
                world.event(format!("config write {n} (variant {})", n % 5));
                if n % 5 == 0 {
                    std::fs::write(&path, &text[..text.len() / 2]).expect("write broken");
                    broken += 1;
                    tokio::time::sleep(Duration::from_millis(400)).await;
                }
                if n % 2 == 0 {
                    std::fs::write(&path, &text).expect("write");
                } else {
                    let tmp = path.with_extension("tmp");
                    std::fs::write(&tmp, &text).expect("write tmp");
                    std::fs::rename(&tmp, &path).expect("rename");
                }
                good += 1;
                n += 1;
            }
            (good, broken)
        })
    };

    // Progress, and the end.
    let mut rss_max = rss_start;
    while started.elapsed() < length {
        tokio::time::sleep(Duration::from_secs(10).min(length)).await;
        rss_max = rss_max.max(lb.rss_kib());
        let t = &world.tally;
        println!(
            "  {:>4} s: {} connections, {} failed (unavoidable), {} unexplained, {} corrupt, \
             {} MiB verified, RSS {} KiB, {} fds, {} idle open",
            started.elapsed().as_secs(),
            t.made.iter().map(|a| a.load(Relaxed)).sum::<u64>(),
            t.unavoidable.iter().map(|a| a.load(Relaxed)).sum::<u64>(),
            t.unexplained.iter().map(|a| a.load(Relaxed)).sum::<u64>(),
            t.corrupt.load(Relaxed),
            t.bytes_verified.load(Relaxed) >> 20,
            lb.rss_kib(),
            lb.fds(),
            world.idle_open.load(Relaxed),
        );
    }
    world.stop.store(true, Relaxed);
    let rss_loaded = lb.rss_kib();
    let bounded = tokio::time::timeout(Duration::from_secs(180), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let kills = chaos.await.unwrap_or(0);
    let (reloads_written, broken_written) = reload.await.unwrap_or((0, 0));
    // Give the balancer a moment to see the last closes, then read its figures.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_end = lb.rss_kib();
    let fds_end = lb.fds();
    for t in &world.targets {
        t.kill();
    }

    let t = &world.tally;
    let sum = |a: &[AtomicU64; 3]| a.iter().map(|x| x.load(Relaxed)).sum::<u64>();
    let unexplained = sum(&t.unexplained);
    let corrupt = t.corrupt.load(Relaxed);
    println!("soak: {} s", started.elapsed().as_secs());
    for (k, kind) in KINDS.iter().enumerate() {
        println!(
            "  {kind:>5}: {} made, {} whole, {} cut by a target kill, {} unexplained",
            t.made[k].load(Relaxed),
            t.ok[k].load(Relaxed),
            t.unavoidable[k].load(Relaxed),
            t.unexplained[k].load(Relaxed),
        );
    }
    println!(
        "  connections made {}, failed {} (unavoidable {}, unexplained {unexplained}), corrupt \
         {corrupt}",
        sum(&t.made),
        sum(&t.unavoidable) + unexplained,
        sum(&t.unavoidable)
    );
    println!(
        "  bytes verified {} ({} MiB, both ways)",
        t.bytes_verified.load(Relaxed),
        t.bytes_verified.load(Relaxed) >> 20
    );
    println!(
        "  targets killed {kills} (and restarted); config writes {reloads_written} good + \
         {broken_written} broken; balancer log: {} reloads applied, {} rejected",
        lb.count("config reloaded"),
        lb.count("reload rejected")
    );
    println!(
        "  balancer RSS: {rss_start} KiB at start, {rss_max} KiB max under load, {rss_loaded} \
         KiB at the end of the load, {rss_end} KiB after it closed; fds {fds_start} at start, \
         {fds_end} at the end"
    );
    let panics = lb.count("panicked");
    if panics > 0 {
        println!("  PANICS in the balancer log: {panics}");
    }
    let events = world.events.lock().expect("events");
    for s in t.samples.lock().expect("samples").iter() {
        println!("  sample failure: {s}");
        // Events within a second of it, and the balancer's access line for this client.
        let at: f64 = s
            .split(' ')
            .next()
            .and_then(|x| x.parse().ok())
            .unwrap_or(0.0);
        for (when, what) in events.iter() {
            let t = when.duration_since(world.started).as_secs_f64();
            if (t - at).abs() < 1.0 {
                println!("      {t:.3} s: {what}");
            }
        }
        if let Some(client) = s.split_whitespace().find(|w| w.starts_with("127.")) {
            let client = client.trim_end_matches(':');
            for line in lb.lines.lock().expect("lines").iter() {
                if line.contains(&format!("client={client} ")) {
                    println!("      balancer: {line}");
                }
            }
        }
    }
    if bounded.is_err() {
        println!("  clients did not finish within 180 s of the end");
    }
    unexplained == 0 && corrupt == 0 && panics == 0 && bounded.is_ok()
}
