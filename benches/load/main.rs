//! The load tool: drives TCP load through a balancer (or straight at the backends) and measures
//! what each scenario is about, the same way for stickylb, HAProxy and nginx.
//!
//! It has four modes, each a separate process in a comparison so that client, balancer and
//! backends never share a runtime:
//! - `backend`: the fast backends every balancer forwards to. Per port, one behaviour: `sink`
//!   (reads and discards, answers the byte count at EOF), `echo`, or `fixed` (a fixed reply per
//!   fixed-size request, which names the port that served it, so the client can tell where it
//!   landed).
//! - `run`: one scenario against one address, printing one JSON line of results (and appending
//!   it to `--out`). Clients bind to many 127.x.y.z source addresses before connecting, so a
//!   sticky balancer sees many clients, not one.
//! - `report`: medians, min–max and ratios of a results file, as Markdown.
//! - `wait-port`: waits until something listens on an address, without connecting to it (used
//!   by `benches/compare.sh`).
//! - `pipe-hog`: becomes another user (root only) and spends that user's pipe budget
//!   (`fs.pipe-user-pages-soft`) with full-size pipes, holding them until it is ended: a balancer
//!   run as that user then gets only 2-page pipes (the `stickylb-nobudget` label of compare.sh).
//!
//! The balancer's cost is read from `/proc` for its whole process tree (`--pids`): CPU seconds
//! (utime + stime) over the measured window, RSS, open fds and pipe fds; the backends' CPU the
//! same way (`--backend-pids`). On a 2-core machine shared by client, balancer and backends, CPU
//! per unit of work is the stable figure; throughput depends on how the cores are divided.
//!
//! Every loop here is bounded in count or time: scenarios end at their deadline, connects and
//! reads have timeouts, and the backend exits after `--max-seconds`.
//!
//! Run the whole comparison with `benches/compare.sh`; `cargo bench --bench load` alone only
//! prints this usage.

mod backend;
mod client;
mod iperf;
mod procfs;
mod report;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "load", about = "stickylb's load tool (see benches/compare.sh)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the backends: each port list is comma-separated ports or ranges (`27011-27014`).
    Backend {
        #[arg(long, default_value = "")]
        sink: String,
        #[arg(long, default_value = "")]
        echo: String,
        #[arg(long, default_value = "")]
        fixed: String,
        /// `fixed` backends that first read the PROXY protocol header a balancer sends
        /// (stickylb with `proxyProtocol`), then behave as `fixed`.
        #[arg(long, default_value = "")]
        fixed_proxy: String,
        /// Request size of `fixed` backends (bytes).
        #[arg(long, default_value_t = 64)]
        request_size: usize,
        /// Reply size of `fixed` backends (bytes, ≥ 8).
        #[arg(long, default_value_t = 64)]
        reply_size: usize,
        /// Worker threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Exit after this long, whatever happens.
        #[arg(long, default_value_t = 3600)]
        max_seconds: u64,
    },
    /// Run one scenario and print its results as one JSON line.
    Run(client::RunArgs),
    /// Summarize a results file (JSON lines) as Markdown tables.
    Report {
        file: PathBuf,
        /// The label the ratios are relative to.
        #[arg(long, default_value = "stickylb")]
        baseline: String,
    },
    /// Become user `--uid` and spend its pipe budget with 256 KiB pipes; print one line when it
    /// is spent, then hold the pipes until ended (or `--max-seconds`).
    PipeHog {
        #[arg(long, default_value_t = 65534)]
        uid: u32,
        #[arg(long, default_value_t = 3600)]
        max_seconds: u64,
    },
    /// Wait until a socket listens on `addr` (exit 1 after `--timeout` seconds). It asks the
    /// kernel (`/proc/net/tcp`) instead of connecting: through a balancer, a probe connection
    /// would reach a backend (see `procfs::listening`).
    WaitPort {
        addr: SocketAddr,
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
}

fn main() {
    // `cargo bench` runs every bench target with `--bench`: this one needs arguments, so alone
    // it only explains itself.
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    if args.len() <= 1 {
        println!(
            "load: stickylb's load tool. It is driven by benches/compare.sh; see docs/benchmarks.md.\n\
             Run it by hand: `$(path of this binary) --help`."
        );
        return;
    }
    let cli = Cli::parse_from(args);
    procfs::raise_fd_limit();
    let code = match cli.command {
        Command::Backend {
            sink,
            echo,
            fixed,
            fixed_proxy,
            request_size,
            reply_size,
            threads,
            max_seconds,
        } => {
            let spec = backend::Spec {
                sink: parse_ports(&sink),
                echo: parse_ports(&echo),
                fixed: parse_ports(&fixed),
                fixed_proxy: parse_ports(&fixed_proxy),
                request_size,
                reply_size: reply_size.max(8),
            };
            backend::serve(spec, threads, Duration::from_secs(max_seconds))
        }
        Command::Run(args) => client::run(args),
        Command::Report { file, baseline } => report::report(&file, &baseline),
        Command::WaitPort { addr, timeout } => wait_port(addr, Duration::from_secs_f64(timeout)),
        Command::PipeHog { uid, max_seconds } => pipe_hog(uid, Duration::from_secs(max_seconds)),
    };
    std::process::exit(code);
}

/// `"27011-27014,27020"` → `[27011, 27012, 27013, 27014, 27020]`. Exits on a malformed list.
pub fn parse_ports(list: &str) -> Vec<u16> {
    let mut ports = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let parsed = match part.split_once('-') {
            Some((a, b)) => a.parse::<u16>().ok().zip(b.parse::<u16>().ok()),
            None => part.parse::<u16>().ok().map(|p| (p, p)),
        };
        match parsed {
            Some((a, b)) if a <= b => ports.extend(a..=b),
            _ => {
                eprintln!("load: bad port list {list:?}");
                std::process::exit(2);
            }
        }
    }
    ports
}

fn wait_port(addr: SocketAddr, timeout: Duration) -> i32 {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if procfs::listening(addr) {
            return 0;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("load: nothing listened on {addr} within {timeout:?}");
    1
}

/// See `Command::PipeHog`. The budget is per user: once it is spent, `F_SETPIPE_SZ` fails for
/// every process of that user (root and CAP_SYS_RESOURCE are exempt).
fn pipe_hog(uid: u32, hold: Duration) -> i32 {
    // SAFETY: setresuid changes this process's credentials; it never goes back.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        eprintln!(
            "load pipe-hog: setresuid({uid}): {}",
            std::io::Error::last_os_error()
        );
        return 1;
    }
    let mut pipes: Vec<std::os::fd::OwnedFd> = Vec::new();
    for n in 0..4096 {
        let mut fds = [-1; 2];
        // SAFETY: pipe2 fills two fds, owned from here on; F_SETPIPE_SZ on our write end.
        let spent = unsafe {
            if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
                eprintln!("load pipe-hog: pipe2: {}", std::io::Error::last_os_error());
                return 1;
            }
            use std::os::fd::FromRawFd;
            pipes.push(std::os::fd::OwnedFd::from_raw_fd(fds[0]));
            pipes.push(std::os::fd::OwnedFd::from_raw_fd(fds[1]));
            libc::fcntl(fds[1], libc::F_SETPIPE_SZ, 256 * 1024) < 0
        };
        if spent {
            println!("pipe budget of uid {uid} spent after {n} pipes of 256 KiB");
            std::thread::sleep(hold);
            return 0;
        }
    }
    eprintln!("load pipe-hog: 4096 pipes of 256 KiB and the budget of uid {uid} is not spent");
    1
}
