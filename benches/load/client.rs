//! The scenarios: each drives one kind of load at one address and prints one JSON line.
//!
//! | scenario | what the client does | headline figures |
//! |---|---|---|
//! | `bulk1`, `bulk4` | 1 or 4 streams write as fast as they can to `sink` backends for the duration, then half-close and read the byte count the sink received | Gbit/s, balancer and machine CPU s per GB |
//! | `shortconn` | `--concurrency` loops of: connect, send one request, read one reply, close | conns/s, latency p50/p99/p999 (connect to last reply byte), balancer and machine CPU s per 10,000 conns |
//! | `keepalive` | `--concurrency` connections, each a loop of one request and one reply | req/s, latency p50/p99/p999, balancer and machine CPU s per 100,000 requests |
//! | `idle` | opens `--conns` connections to `echo` backends, one byte each way on each, holds them | balancer RSS and fds per held connection (before/after), pipe fds held, all still served after |
//! | `overflow` | offers `--conns` connections, more than the fd limit lets the balancer hold | served, refused at once, left hanging |
//! | `iperf<N>[-<len>]` | iperf3 with N streams (and `-l <len>`) through the balancer to the `iperf3 -s` of a target (iperf.rs) | Gbit/s, balancer and machine CPU s per GB |
//! | `failover` | `shortconn` while the target with port `--victim-port` (process `--victim-pid`) is killed | failed connections opened after the kill |
//!
//! Every client binds to one of `--ips` source addresses in 127.64.0.0/10 (IP_BIND_ADDRESS_NO_PORT,
//! so the port is chosen at connect time, per destination) before connecting: a sticky
//! balancer sees many clients. Shortconn and keepalive count what completes inside the
//! measured window, after `--warmup`; the balancer's CPU is read at the window's two ends.
//!
//! Besides the balancer's own CPU (its process tree), every cost is also given for the whole
//! machine (`machine_cpu_*`: user + nice + system + irq + softirq of all cores, from
//! `/proc/stat`, over the same window): the client and the backends are the same for every
//! balancer, so the difference between two balancers is each one's full cost, including kernel
//! work it caused in other contexts (softirq on another core, ksoftirqd) that its own CPU
//! figure does not show. It also includes whatever else runs on the machine: compare it within
//! one interleaved run, with the load average beside it.
//!
//! With `--backend-pids`, the backends' processes are measured the same way (`backend_cpu_*`)
//! and added to the balancer's (`lb_backend_cpu_*`): on loopback whether the balancer or its
//! backend runs the backend's TCP receive work depends on which process the scheduler has on
//! the core at that moment, so the balancer's own figure moves with the placement and the sum
//! does not (docs/benchmarks.md, "Which core the balancer shares").

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;

use crate::procfs;

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// bulk1, bulk4, shortconn, keepalive, idle, overflow, failover, or iperf<N>[-<len>]
    /// (iperf3 with N streams and, optionally, `-l <len>`: see iperf.rs).
    #[arg(long)]
    scenario: String,
    /// Address(es) to connect to: the balancer, or (direct) the backends, comma-separated; a
    /// client address always goes to the same one.
    #[arg(long)]
    target: String,
    /// What is measured (stickylb, haproxy, nginx, direct, ...): a label in the results.
    #[arg(long)]
    label: String,
    #[arg(long, default_value_t = 1)]
    rep: u32,
    /// Root PIDs of the balancer (comma-separated); its process tree is measured.
    #[arg(long, default_value = "")]
    pids: String,
    /// Root PIDs of the backends (comma-separated), measured the same way, as `backend_cpu_*`.
    /// On loopback a sender's transmit runs the receiver's TCP work in whichever process is on
    /// the core, so the balancer's own figure holds a share of its backends' work that moves
    /// with the scheduler; the balancer plus its backends does not (docs/benchmarks.md).
    #[arg(long, default_value = "")]
    backend_pids: String,
    /// Measured seconds (bulk, shortconn, keepalive; failover: total after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    pub(crate) duration: f64,
    /// Seconds before the measured window (shortconn, keepalive).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Requests or connections in flight (shortconn, keepalive, failover).
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Connections to open (idle, overflow).
    #[arg(long, default_value_t = 5000)]
    conns: usize,
    /// Distinct client source addresses.
    #[arg(long, default_value_t = 4096)]
    ips: usize,
    /// Must match the backend's `--request-size`.
    #[arg(long, default_value_t = 64)]
    request_size: usize,
    /// Must match the backend's `--reply-size`.
    #[arg(long, default_value_t = 64)]
    reply_size: usize,
    /// failover: the port of the target that is killed.
    #[arg(long, default_value_t = 0)]
    victim_port: u16,
    /// failover: the PID of the process serving `--victim-port`, killed with SIGKILL.
    #[arg(long)]
    victim_pid: Option<u32>,
    /// failover: seconds of load before the kill.
    #[arg(long, default_value_t = 2.0)]
    kill_after: f64,
    /// Client worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Append the JSON line to this file too.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Time limit for one connect, one request or one idle ping.
const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// The `i`-th client source address: 127.64.0.1, 127.64.0.2, ... (250 per /24, never .0 or .255).
pub fn client_ip(i: usize) -> Ipv4Addr {
    let i = i % (250 * 250 * 60);
    Ipv4Addr::new(
        127,
        64 + (i / 62_500) as u8,
        (i / 250 % 250) as u8,
        (i % 250 + 1) as u8,
    )
}

/// Connects from `ip` (port chosen by the kernel at connect time) to `to`.
pub async fn connect_from(ip: Ipv4Addr, to: SocketAddr) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a pointer to an int of the given size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    socket.bind(SocketAddr::new(ip.into(), 0))?;
    let stream = tokio::time::timeout(OP_TIMEOUT, socket.connect(to))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// What every scenario shares.
pub(crate) struct Ctx {
    pub(crate) args: RunArgs,
    targets: Vec<SocketAddr>,
    pids: Vec<u32>,
    backend_pids: Vec<u32>,
    request: Vec<u8>,
    /// The port each client address was last served by (0: none yet), for stickiness.
    seen: Vec<AtomicU16>,
    /// Client addresses seen on two different ports.
    moved: AtomicU64,
    next_ip: AtomicUsize,
}

impl Ctx {
    pub(crate) fn target_for(&self, i: usize) -> SocketAddr {
        self.targets[i % self.targets.len()]
    }

    /// Records that client `i` was served by `port`; returns the port it was served by before
    /// if that was another one.
    fn served_by(&self, i: usize, port: u16) -> Option<u16> {
        let slot = &self.seen[i % self.seen.len()];
        let prev = slot.swap(port, Ordering::Relaxed);
        if prev != 0 && prev != port {
            self.moved.fetch_add(1, Ordering::Relaxed);
            return Some(prev);
        }
        None
    }
}

fn new_hist() -> Histogram<u64> {
    // 1 µs .. 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

pub fn run(args: RunArgs) -> i32 {
    let targets: Vec<SocketAddr> = match args
        .target
        .split(',')
        .map(|t| t.trim().parse::<SocketAddr>())
        .collect()
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("load run: bad --target {:?}: {e}", args.target);
            return 2;
        }
    };
    let pid_list = |list: &str| -> Vec<u32> {
        list.split(',')
            .filter_map(|p| p.trim().parse().ok())
            .collect()
    };
    let pids = pid_list(&args.pids);
    let backend_pids = pid_list(&args.backend_pids);
    let ctx = Arc::new(Ctx {
        request: vec![b'r'; args.request_size.max(1)],
        seen: (0..args.ips.max(1)).map(|_| AtomicU16::new(0)).collect(),
        moved: AtomicU64::new(0),
        next_ip: AtomicUsize::new(0),
        targets,
        pids,
        backend_pids,
        args: args.clone(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    let load1 = procfs::load1();
    let result = runtime.block_on(async {
        match args.scenario.as_str() {
            "bulk1" => Ok(bulk(ctx.clone(), 1).await),
            "bulk4" => Ok(bulk(ctx.clone(), 4).await),
            "shortconn" => Ok(shortconn(ctx.clone()).await),
            "keepalive" => Ok(keepalive(ctx.clone()).await),
            "idle" => Ok(idle(ctx.clone()).await),
            "overflow" => Ok(overflow(ctx.clone()).await),
            "failover" => Ok(failover(ctx.clone()).await),
            // Runs iperf3 as a child process (no async work of ours meanwhile).
            other => match crate::iperf::parse(other) {
                Some((streams, len)) => crate::iperf::iperf(&ctx, streams, len),
                None => Err(format!("unknown scenario {other:?}")),
            },
        }
    });
    // Do not wait for tasks still blocked on a hung peer: everything measured is in `result`.
    runtime.shutdown_timeout(Duration::from_secs(1));
    let mut fields = match result {
        Ok(f) => f,
        Err(e) => {
            eprintln!("load run: {e}");
            return 2;
        }
    };
    let scenario = match args.scenario.as_str() {
        "idle" => format!("idle{}", args.conns),
        s => s.to_string(),
    };
    let mut line = Map::new();
    line.insert("scenario".into(), json!(scenario));
    line.insert("label".into(), json!(args.label));
    line.insert("rep".into(), json!(args.rep));
    line.insert("load1_before".into(), json!(load1));
    line.insert(
        "unix_time".into(),
        json!(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)),
    );
    line.append(&mut fields);
    let text = Value::Object(line).to_string();
    println!("{text}");
    if let Some(path) = &args.out {
        use std::io::Write;
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(mut f) => {
                let _ = writeln!(f, "{text}");
            }
            Err(e) => {
                eprintln!("load run: cannot append to {}: {e}", path.display());
                return 1;
            }
        }
    }
    0
}

/// CPU of the balancer, of its backends and of the machine over a window: start with `begin`,
/// end with `end`.
pub(crate) struct Window {
    tree: procfs::TreeSample,
    backends: procfs::TreeSample,
    machine: procfs::MachineSample,
    at: Instant,
}

impl Window {
    pub(crate) fn begin(ctx: &Ctx) -> Window {
        Window {
            tree: procfs::sample(&ctx.pids, false),
            backends: procfs::sample(&ctx.backend_pids, false),
            machine: procfs::machine(),
            at: Instant::now(),
        }
    }

    pub(crate) fn end(self, ctx: &Ctx) -> Measured {
        let tree = procfs::sample(&ctx.pids, false);
        let backends = procfs::sample(&ctx.backend_pids, false);
        let machine = procfs::machine();
        Measured {
            secs: self.at.elapsed().as_secs_f64(),
            cpu: (!ctx.pids.is_empty()).then_some(tree.cpu_s - self.tree.cpu_s),
            backend_cpu: (!ctx.backend_pids.is_empty())
                .then_some(backends.cpu_s - self.backends.cpu_s),
            busy: procfs::busy_fraction(self.machine, machine),
            machine_cpu: procfs::machine_cpu_s(self.machine, machine),
        }
    }
}

/// What a window measured.
pub(crate) struct Measured {
    pub(crate) secs: f64,
    /// Balancer CPU seconds (None for direct).
    cpu: Option<f64>,
    /// The backends' CPU seconds (None unless `--backend-pids`).
    backend_cpu: Option<f64>,
    /// Fraction of the machine busy.
    busy: f64,
    /// CPU seconds the whole machine worked (user + nice + system + irq + softirq).
    machine_cpu: f64,
}

impl Measured {
    /// The cost figures, per `units / scale` units of work: `lb_cpu_<per>` and
    /// `machine_cpu_<per>` (e.g. `per_gb`), `backend_cpu_<per>` when the backends are measured,
    /// the raw CPU seconds, and the busy fraction.
    pub(crate) fn insert_costs(
        &self,
        m: &mut Map<String, Value>,
        per_key: &str,
        units: f64,
        scale: f64,
    ) {
        m.insert("lb_cpu_s".into(), json!(self.cpu.map(|c| round(c, 3))));
        m.insert(format!("lb_cpu_{per_key}"), per(self.cpu, units, scale));
        if self.backend_cpu.is_some() {
            m.insert(
                "backend_cpu_s".into(),
                json!(self.backend_cpu.map(|c| round(c, 3))),
            );
            m.insert(
                format!("backend_cpu_{per_key}"),
                per(self.backend_cpu, units, scale),
            );
            let both = self.cpu.zip(self.backend_cpu).map(|(a, b)| a + b);
            m.insert(format!("lb_backend_cpu_{per_key}"), per(both, units, scale));
        }
        m.insert("machine_cpu_s".into(), json!(round(self.machine_cpu, 3)));
        m.insert(
            format!("machine_cpu_{per_key}"),
            per(Some(self.machine_cpu), units, scale),
        );
        m.insert("machine_busy".into(), json!(round(self.busy, 3)));
    }
}

/// The timing of a request loop: a warm-up, then the measured window, whose CPU and machine
/// samples are taken when it begins (by a task that waits for it) and when it ends.
struct Timed {
    measure_from: Instant,
    end: Instant,
    window: tokio::task::JoinHandle<Window>,
}

impl Timed {
    fn start(ctx: &Arc<Ctx>) -> Timed {
        let measure_from = Instant::now() + Duration::from_secs_f64(ctx.args.warmup);
        let end = measure_from + Duration::from_secs_f64(ctx.args.duration);
        let ctx = ctx.clone();
        let window = tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            Window::begin(&ctx)
        });
        Timed {
            measure_from,
            end,
            window,
        }
    }

    /// What the window measured; its seconds at most the requested duration.
    async fn finish(self, ctx: &Ctx) -> Measured {
        let window = self.window.await.expect("window task");
        let mut measured = window.end(ctx);
        measured.secs = measured.secs.min(ctx.args.duration).max(1e-9);
        measured
    }
}

fn per(cpu: Option<f64>, units: f64, scale: f64) -> Value {
    match cpu {
        Some(c) if units > 0.0 => json!(round(c / units * scale, 4)),
        _ => Value::Null,
    }
}

pub(crate) fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

fn latency_fields(map: &mut Map<String, Value>, hist: &Histogram<u64>) {
    for (name, q) in [("p50_us", 0.5), ("p99_us", 0.99), ("p999_us", 0.999)] {
        map.insert(name.into(), json!(hist.value_at_quantile(q)));
    }
    map.insert("max_us".into(), json!(hist.max()));
}

// ---------------------------------------------------------------------------------------------
// bulk

async fn bulk(ctx: Arc<Ctx>, streams: usize) -> Map<String, Value> {
    let duration = Duration::from_secs_f64(ctx.args.duration);
    let mut connected = Vec::new();
    let mut errors = 0u64;
    for s in 0..streams {
        let i = s * 997 + 11;
        match connect_from(client_ip(i), ctx.target_for(i)).await {
            Ok(c) => connected.push(c),
            Err(e) => {
                eprintln!("load bulk: connect: {e}");
                errors += 1;
            }
        }
    }
    let window = Window::begin(&ctx);
    let end = Instant::now() + duration;
    let tasks: Vec<_> = connected
        .into_iter()
        .map(|mut stream| {
            tokio::spawn(async move {
                let buf = vec![0x5a_u8; 256 * 1024];
                let mut sent: u64 = 0;
                while Instant::now() < end {
                    match tokio::time::timeout_at(end.into(), stream.write(&buf)).await {
                        Ok(Ok(n)) => sent += n as u64,
                        Ok(Err(_)) => return Err(sent),
                        Err(_) => break,
                    }
                }
                if stream.shutdown().await.is_err() {
                    return Err(sent);
                }
                let mut count = [0u8; 8];
                match tokio::time::timeout(Duration::from_secs(30), stream.read_exact(&mut count))
                    .await
                {
                    Ok(Ok(_)) => Ok((u64::from_le_bytes(count), sent)),
                    _ => Err(sent),
                }
            })
        })
        .collect();
    let mut received = 0u64;
    let mut sent_total = 0u64;
    for t in tasks {
        match t.await {
            Ok(Ok((got, sent))) => {
                received += got;
                sent_total += sent;
            }
            Ok(Err(sent)) => {
                errors += 1;
                sent_total += sent;
            }
            Err(_) => errors += 1,
        }
    }
    let measured = window.end(&ctx);
    let secs = measured.secs;
    let gb = received as f64 / 1e9;
    let mut m = Map::new();
    m.insert("streams".into(), json!(streams));
    m.insert("window_s".into(), json!(round(secs, 3)));
    m.insert("bytes".into(), json!(received));
    m.insert("bytes_sent".into(), json!(sent_total));
    m.insert("gbit_s".into(), json!(round(gb * 8.0 / secs, 3)));
    m.insert("errors".into(), json!(errors));
    measured.insert_costs(&mut m, "per_gb", gb, 1.0);
    m
}

// ---------------------------------------------------------------------------------------------
// shortconn (and the request loop failover shares)

/// One short connection: connect from client `i`, one request, one reply, close. Returns the
/// serving port.
async fn one_short(ctx: &Ctx, i: usize, reply: &mut [u8]) -> io::Result<u16> {
    let mut stream = connect_from(client_ip(i), ctx.target_for(i)).await?;
    stream.write_all(&ctx.request).await?;
    stream.read_exact(reply).await?;
    Ok(port_of(reply))
}

fn port_of(reply: &[u8]) -> u16 {
    std::str::from_utf8(&reply[..5.min(reply.len())])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[derive(Default)]
struct Counts {
    ok: u64,
    errors: u64,
    timeouts: u64,
}

async fn shortconn(ctx: Arc<Ctx>) -> Map<String, Value> {
    let timed = Timed::start(&ctx);
    let (measure_from, end) = (timed.measure_from, timed.end);
    let tasks: Vec<_> = (0..ctx.args.concurrency)
        .map(|_| {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let mut hist = new_hist();
                let mut counts = Counts::default();
                let mut reply = vec![0u8; ctx.args.reply_size];
                // Bounded by the deadline; each iteration by OP_TIMEOUT.
                while Instant::now() < end {
                    let i = ctx.next_ip.fetch_add(1, Ordering::Relaxed) % ctx.args.ips;
                    let t0 = Instant::now();
                    let r = tokio::time::timeout(OP_TIMEOUT, one_short(&ctx, i, &mut reply)).await;
                    let t1 = Instant::now();
                    let counted = t1 >= measure_from && t1 <= end;
                    match r {
                        Ok(Ok(port)) => {
                            let _ = ctx.served_by(i, port);
                            if counted {
                                counts.ok += 1;
                                let _ = hist.record((t1 - t0).as_micros().max(1) as u64);
                            }
                        }
                        Ok(Err(_)) | Err(_) => {
                            if counted {
                                counts.errors += 1;
                                if r.is_err() {
                                    counts.timeouts += 1;
                                }
                            }
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
                (hist, counts)
            })
        })
        .collect();
    let (hist, counts) = join_counts(tasks).await;
    let measured = timed.finish(&ctx).await;
    let secs = measured.secs;
    let mut m = Map::new();
    m.insert("concurrency".into(), json!(ctx.args.concurrency));
    m.insert("window_s".into(), json!(round(secs, 3)));
    m.insert("conns".into(), json!(counts.ok));
    m.insert(
        "conns_per_s".into(),
        json!(round(counts.ok as f64 / secs, 1)),
    );
    latency_fields(&mut m, &hist);
    m.insert("errors".into(), json!(counts.errors));
    m.insert("timeouts".into(), json!(counts.timeouts));
    m.insert("moved".into(), json!(ctx.moved.load(Ordering::Relaxed)));
    measured.insert_costs(&mut m, "per_10k", counts.ok as f64, 10_000.0);
    m
}

async fn join_counts(
    tasks: Vec<tokio::task::JoinHandle<(Histogram<u64>, Counts)>>,
) -> (Histogram<u64>, Counts) {
    let mut hist = new_hist();
    let mut total = Counts::default();
    for t in tasks {
        if let Ok((h, c)) = t.await {
            let _ = hist.add(&h);
            total.ok += c.ok;
            total.errors += c.errors;
            total.timeouts += c.timeouts;
        }
    }
    (hist, total)
}

// ---------------------------------------------------------------------------------------------
// keepalive

async fn keepalive(ctx: Arc<Ctx>) -> Map<String, Value> {
    let timed = Timed::start(&ctx);
    let (measure_from, end) = (timed.measure_from, timed.end);
    let n = ctx.args.concurrency;
    let tasks: Vec<_> = (0..n)
        .map(|k| {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let i = k * (ctx.args.ips / n.max(1)).max(1);
                let mut hist = new_hist();
                let mut counts = Counts::default();
                let mut reply = vec![0u8; ctx.args.reply_size];
                let mut stream: Option<TcpStream> = None;
                while Instant::now() < end {
                    let s = match stream.as_mut() {
                        Some(s) => s,
                        None => match connect_from(client_ip(i), ctx.target_for(i)).await {
                            Ok(s) => stream.insert(s),
                            Err(_) => {
                                counts.errors += 1;
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            }
                        },
                    };
                    let t0 = Instant::now();
                    let r = tokio::time::timeout(OP_TIMEOUT, async {
                        s.write_all(&ctx.request).await?;
                        s.read_exact(&mut reply).await?;
                        io::Result::Ok(())
                    })
                    .await;
                    let t1 = Instant::now();
                    let counted = t1 >= measure_from && t1 <= end;
                    match r {
                        Ok(Ok(())) => {
                            if counted {
                                counts.ok += 1;
                                let _ = hist.record((t1 - t0).as_micros().max(1) as u64);
                            }
                        }
                        _ => {
                            if counted {
                                counts.errors += 1;
                            }
                            stream = None;
                        }
                    }
                }
                (hist, counts)
            })
        })
        .collect();
    let (hist, counts) = join_counts(tasks).await;
    let measured = timed.finish(&ctx).await;
    let secs = measured.secs;
    let mut m = Map::new();
    m.insert("concurrency".into(), json!(n));
    m.insert("window_s".into(), json!(round(secs, 3)));
    m.insert("requests".into(), json!(counts.ok));
    m.insert("req_per_s".into(), json!(round(counts.ok as f64 / secs, 1)));
    latency_fields(&mut m, &hist);
    m.insert("errors".into(), json!(counts.errors));
    measured.insert_costs(&mut m, "per_100k", counts.ok as f64, 100_000.0);
    m
}

// ---------------------------------------------------------------------------------------------
// idle and overflow

/// How opening one connection and exchanging one byte ended.
enum Opened {
    Served(TcpStream),
    /// Connect refused, or reset/closed before the echo.
    Refused(Duration),
    /// No answer within the time limit.
    Hanging,
}

async fn open_and_ping(ctx: &Ctx, i: usize, limit: Duration) -> Opened {
    let t0 = Instant::now();
    let attempt = async {
        let mut s = connect_from(client_ip(i), ctx.target_for(i)).await?;
        s.write_all(b"p").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        io::Result::Ok(s)
    };
    match tokio::time::timeout(limit, attempt).await {
        Ok(Ok(s)) => Opened::Served(s),
        Ok(Err(e)) if e.kind() == io::ErrorKind::TimedOut => Opened::Hanging,
        Ok(Err(_)) => Opened::Refused(t0.elapsed()),
        Err(_) => Opened::Hanging,
    }
}

/// Opens `n` connections, at most `parallel` at a time; each from its own client address.
async fn open_many(ctx: &Arc<Ctx>, n: usize, limit: Duration) -> Vec<Opened> {
    let gate = Arc::new(Semaphore::new(256));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let ctx = ctx.clone();
            let gate = gate.clone();
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await;
                open_and_ping(&ctx, i, limit).await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.unwrap_or(Opened::Hanging));
    }
    out
}

/// One byte each way on every held stream; returns how many answered.
async fn ping_all(streams: Vec<TcpStream>) -> (usize, Vec<TcpStream>) {
    let gate = Arc::new(Semaphore::new(512));
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            let gate = gate.clone();
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await;
                let ok = tokio::time::timeout(OP_TIMEOUT, async {
                    s.write_all(b"q").await?;
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).await?;
                    io::Result::Ok(())
                })
                .await
                .is_ok_and(|r| r.is_ok());
                (ok, s)
            })
        })
        .collect();
    let mut served = 0;
    let mut kept = Vec::new();
    for t in tasks {
        if let Ok((ok, s)) = t.await {
            served += ok as usize;
            kept.push(s);
        }
    }
    (served, kept)
}

async fn idle(ctx: Arc<Ctx>) -> Map<String, Value> {
    let n = ctx.args.conns;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = procfs::sample(&ctx.pids, true);
    let t0 = Instant::now();
    let opened = open_many(&ctx, n, OP_TIMEOUT).await;
    let open_s = t0.elapsed().as_secs_f64();
    let mut held = Vec::new();
    let (mut refused, mut hanging) = (0, 0);
    for o in opened {
        match o {
            Opened::Served(s) => held.push(s),
            Opened::Refused(_) => refused += 1,
            Opened::Hanging => hanging += 1,
        }
    }
    let served_at_open = held.len();
    // Let the balancer settle (pipes back to their pools, allocator quiet), then measure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = procfs::sample(&ctx.pids, true);
    let (served_after, held) = ping_all(held).await;
    drop(held);
    // Give the balancer a moment to close its sides before it is stopped.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let k = served_at_open.max(1) as f64;
    let direct = ctx.pids.is_empty();
    let mut m = Map::new();
    m.insert("conns".into(), json!(n));
    m.insert("served_at_open".into(), json!(served_at_open));
    m.insert("served_after_hold".into(), json!(served_after));
    m.insert("refused".into(), json!(refused));
    m.insert("hanging".into(), json!(hanging));
    m.insert("open_s".into(), json!(round(open_s, 3)));
    if !direct {
        m.insert("rss_before_kib".into(), json!(before.rss_kib));
        m.insert("rss_after_kib".into(), json!(after.rss_kib));
        m.insert(
            "rss_per_conn_kib".into(),
            json!(round((after.rss_kib as f64 - before.rss_kib as f64) / k, 3)),
        );
        m.insert("fds_before".into(), json!(before.fds));
        m.insert("fds_after".into(), json!(after.fds));
        m.insert(
            "fds_per_conn".into(),
            json!(round((after.fds as f64 - before.fds as f64) / k, 3)),
        );
        m.insert("pipe_fds_before".into(), json!(before.pipe_fds));
        m.insert("pipe_fds_after".into(), json!(after.pipe_fds));
        m.insert("processes".into(), json!(after.processes));
    }
    m
}

async fn overflow(ctx: Arc<Ctx>) -> Map<String, Value> {
    let n = ctx.args.conns;
    let before = procfs::sample(&ctx.pids, true);
    let t0 = Instant::now();
    // A refused connection is told at once; "hanging" means no answer within 3 s.
    let opened = open_many(&ctx, n, Duration::from_secs(3)).await;
    let open_s = t0.elapsed().as_secs_f64();
    let at_limit = procfs::sample(&ctx.pids, true);
    let mut held = Vec::new();
    let mut refused_hist = new_hist();
    let (mut refused, mut hanging) = (0u64, 0u64);
    for o in opened {
        match o {
            Opened::Served(s) => held.push(s),
            Opened::Refused(d) => {
                refused += 1;
                let _ = refused_hist.record(d.as_micros().max(1) as u64);
            }
            Opened::Hanging => hanging += 1,
        }
    }
    let served = held.len();
    let (served_after, held) = ping_all(held).await;
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // After the flood: does the balancer serve new clients again?
    let mut recovered = 0;
    for i in 0..20 {
        if let Opened::Served(_) = open_and_ping(&ctx, n + i, Duration::from_secs(3)).await {
            recovered += 1;
        }
    }
    let mut m = Map::new();
    m.insert("offered".into(), json!(n));
    m.insert("served".into(), json!(served));
    m.insert("served_after_hold".into(), json!(served_after));
    m.insert("refused".into(), json!(refused));
    m.insert(
        "refused_p50_ms".into(),
        json!(round(
            refused_hist.value_at_quantile(0.5) as f64 / 1000.0,
            2
        )),
    );
    m.insert(
        "refused_max_ms".into(),
        json!(round(refused_hist.max() as f64 / 1000.0, 2)),
    );
    m.insert("hanging".into(), json!(hanging));
    m.insert("recovered_of_20".into(), json!(recovered));
    m.insert("open_s".into(), json!(round(open_s, 3)));
    m.insert("fds_before".into(), json!(before.fds));
    m.insert("fds_at_limit".into(), json!(at_limit.fds));
    m
}

// ---------------------------------------------------------------------------------------------
// failover

async fn failover(ctx: Arc<Ctx>) -> Map<String, Value> {
    let victim = ctx.args.victim_port;
    let victim_seen = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    // The kill time, as micros since `origin`; u64::MAX until it happened.
    let origin = Instant::now();
    let killed_at = Arc::new(AtomicU64::new(u64::MAX));
    let hard_end = origin + Duration::from_secs(60);
    let tasks: Vec<_> = (0..ctx.args.concurrency)
        .map(|_| {
            let ctx = ctx.clone();
            let (seen, stop, killed_at) = (victim_seen.clone(), stop.clone(), killed_at.clone());
            tokio::spawn(async move {
                let mut r = FailoverCounts::new();
                let mut reply = vec![0u8; ctx.args.reply_size];
                while !stop.load(Ordering::Relaxed) && Instant::now() < hard_end {
                    let i = ctx.next_ip.fetch_add(1, Ordering::Relaxed) % ctx.args.ips;
                    let t0 = Instant::now();
                    let started_after_kill =
                        (t0 - origin).as_micros() as u64 > killed_at.load(Ordering::SeqCst);
                    let res =
                        tokio::time::timeout(OP_TIMEOUT, one_short(&ctx, i, &mut reply)).await;
                    let us = t0.elapsed().as_micros().max(1) as u64;
                    match res {
                        Ok(Ok(port)) => {
                            match ctx.served_by(i, port) {
                                Some(prev) if prev == victim => r.moved_from_victim += 1,
                                Some(_) => r.moved_collateral += 1,
                                None => {}
                            }
                            if port == victim {
                                seen.store(true, Ordering::Relaxed);
                                if started_after_kill {
                                    r.reached_victim_after_kill += 1;
                                }
                            }
                            if started_after_kill {
                                r.ok_after += 1;
                                let _ = r.hist.record(us);
                            } else {
                                r.ok_before += 1;
                            }
                        }
                        _ => {
                            if started_after_kill {
                                r.failed_after += 1;
                            } else if killed_at.load(Ordering::SeqCst) != u64::MAX {
                                r.failed_in_flight += 1;
                            } else {
                                r.failed_before += 1;
                            }
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
                r
            })
        })
        .collect();
    // Warm up until the victim has served someone through the balancer (a balancer with
    // health checks may start it as down), at least 1 s and at most 15 s.
    let warm_deadline = Instant::now() + Duration::from_secs(15);
    tokio::time::sleep(Duration::from_secs(1)).await;
    while !victim_seen.load(Ordering::Relaxed) && Instant::now() < warm_deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let victim_reached = victim_seen.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(ctx.args.kill_after)).await;
    let killed = match ctx.args.victim_pid {
        Some(pid) => {
            // SAFETY: kill(2) with a PID given on our command line and a valid signal.
            let sent = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) == 0 };
            wait_dead(pid).await;
            sent
        }
        None => false,
    };
    killed_at.store(origin.elapsed().as_micros() as u64, Ordering::SeqCst);
    let after = (ctx.args.duration - ctx.args.kill_after).max(1.0);
    tokio::time::sleep(Duration::from_secs_f64(after)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = FailoverCounts::new();
    for t in tasks {
        if let Ok(r) = t.await {
            total.ok_before += r.ok_before;
            total.ok_after += r.ok_after;
            total.failed_before += r.failed_before;
            total.failed_in_flight += r.failed_in_flight;
            total.failed_after += r.failed_after;
            total.reached_victim_after_kill += r.reached_victim_after_kill;
            total.moved_from_victim += r.moved_from_victim;
            total.moved_collateral += r.moved_collateral;
            let _ = total.hist.add(&r.hist);
        }
    }
    let mut m = Map::new();
    m.insert("victim_reached_before_kill".into(), json!(victim_reached));
    m.insert("killed".into(), json!(killed));
    m.insert("ok_before_kill".into(), json!(total.ok_before));
    m.insert("failed_before_kill".into(), json!(total.failed_before));
    m.insert("failed_in_flight".into(), json!(total.failed_in_flight));
    m.insert(
        "conns_after_kill".into(),
        json!(total.ok_after + total.failed_after),
    );
    m.insert("failed_after_kill".into(), json!(total.failed_after));
    m.insert(
        "after_kill_p99_ms".into(),
        json!(round(total.hist.value_at_quantile(0.99) as f64 / 1000.0, 2)),
    );
    m.insert(
        "after_kill_max_ms".into(),
        json!(round(total.hist.max() as f64 / 1000.0, 2)),
    );
    m.insert(
        "reached_victim_after_kill".into(),
        json!(total.reached_victim_after_kill),
    );
    m.insert("moved_from_victim".into(), json!(total.moved_from_victim));
    m.insert("moved_collateral".into(), json!(total.moved_collateral));
    m
}

struct FailoverCounts {
    hist: Histogram<u64>,
    ok_before: u64,
    ok_after: u64,
    failed_before: u64,
    failed_in_flight: u64,
    failed_after: u64,
    reached_victim_after_kill: u64,
    /// Client addresses that moved off the killed target (expected: about 1/3 of them).
    moved_from_victim: u64,
    /// Client addresses that moved between two live targets (expected: 0).
    moved_collateral: u64,
}

impl FailoverCounts {
    fn new() -> FailoverCounts {
        FailoverCounts {
            hist: new_hist(),
            ok_before: 0,
            ok_after: 0,
            failed_before: 0,
            failed_in_flight: 0,
            failed_after: 0,
            reached_victim_after_kill: 0,
            moved_from_victim: 0,
            moved_collateral: 0,
        }
    }
}

/// Waits (at most 2 s) until `pid` has exited: gone, or a zombie (its sockets are closed by
/// then). SIGKILL is delivered asynchronously, so `kill` returning is not the death.
async fn wait_dead(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return,
            Ok(text) => {
                let state = text
                    .rfind(')')
                    .and_then(|i| text[i + 1..].split_whitespace().next().map(str::to_owned));
                if matches!(state.as_deref(), Some("Z") | Some("X")) {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
