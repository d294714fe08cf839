//! The command line: `stickylb [--config PATH] [--pid-file PATH]`, `stickylb check`,
//! `stickylb demo`, `stickylb upgrade [--pid PID | --pid-file PATH]`.
//!
//! Exit codes: 0 after a clean shutdown (or a valid `check`, or an upgrade that took over); 1
//! for any start-up failure (config, bind, user switch) or a failed upgrade; 2 for wrong
//! command-line usage (clap's convention).
//!
//! Signals while running: SIGTERM or SIGINT closes the listener and lets open connections
//! finish for `shutdownTimeout`, then exits 0; a second one exits at once (code 1, since
//! connections were cut). SIGHUP reloads the config; so does a change to the config file (unless
//! `--no-watch`). SIGUSR2 upgrades: a new process of the binary at the same path takes over
//! everything (see [`crate::upgrade`]), and this one exits 0 once it has handed over.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};

use crate::admin::Admin;
use crate::config::Config;
use crate::reload::{Reloader, Trigger};
use crate::server::Server;
use crate::sockets;
use crate::sys;
use crate::upgrade::{self, Incoming, Upgrader};

#[derive(Debug, Parser)]
#[command(
    name = "stickylb",
    version,
    about = "A TCP layer-4 sticky load balancer: each client IP keeps reaching the same target"
)]
struct Cli {
    /// Path of the JSON config file (LoadBalancer.js compatible).
    #[arg(long, short, global = true, default_value = "config.json")]
    config: PathBuf,

    /// Do not watch the config file's directory; reload only on SIGHUP.
    #[arg(long, global = true)]
    no_watch: bool,

    /// Write the process id here once serving (rewritten by the new process of an upgrade);
    /// with `upgrade`, the running process's pid file.
    #[arg(long, global = true, value_name = "PATH")]
    pid_file: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the config, print the effective config (defaults filled in), exit 0 or 1.
    Check,
    /// Run the config together with built-in demo targets on the target addresses, each
    /// answering with its own name (try `curl localhost:8080` or `nc localhost 8080`).
    Demo,
    /// Upgrade a running stickylb (SIGUSR2) and wait for the outcome: exit 0 once a new
    /// process of the binary at its path took over, 1 (with the reason) if it kept running.
    /// Name the process with --pid or --pid-file.
    Upgrade {
        /// The running process.
        #[arg(long, value_name = "PID")]
        pid: Option<u32>,
        /// How long to wait for the outcome, in seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        timeout: u64,
    },
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    // Before anything could replace the binary: the path and arguments an upgrade starts.
    upgrade::remember();
    // SIGUSR2's default action ends the process: until the signal loop listens for it, a
    // SIGUSR2 is ignored (upgrade commands only find a process once it is serving).
    sys::ignore_upgrade_signal();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    let pid_file = cli.pid_file.as_deref();
    match cli.command {
        Some(Command::Check) => check(&cli.config),
        Some(Command::Upgrade { pid, timeout }) => request_upgrade(pid, pid_file, timeout),
        Some(Command::Demo) => run(&cli.config, true, !cli.no_watch, pid_file),
        None => run(&cli.config, false, !cli.no_watch, pid_file),
    }
}

/// `stickylb upgrade`: 0 when a new process took over, 1 when not, 2 for a usage error.
fn request_upgrade(pid: Option<u32>, pid_file: Option<&Path>, timeout: u64) -> i32 {
    let pid = match (pid, pid_file) {
        (Some(pid), None) => pid,
        (None, Some(path)) => match upgrade::read_pid_file(path) {
            Ok(pid) => pid,
            Err(e) => {
                eprintln!("error: {e}");
                return 1;
            }
        },
        _ => {
            eprintln!("error: stickylb upgrade needs exactly one of --pid PID and --pid-file PATH");
            return 2;
        }
    };
    match upgrade::request(pid, std::time::Duration::from_secs(timeout)) {
        Ok(line) => {
            println!("{line}");
            0
        }
        Err(reason) => {
            eprintln!("error: {reason}");
            1
        }
    }
}

fn check(path: &Path) -> i32 {
    match Config::load(path) {
        Ok(config) => {
            for warning in &config.warnings {
                eprintln!("warning: {warning}");
            }
            // The resolved addresses go to stderr, so that stdout is itself a valid config.
            for (i, target) in config.targets.iter().enumerate() {
                eprintln!("targets[{i}] ({}) resolves to {}", target.id, target.addr);
            }
            match serde_json::to_string_pretty(&config.effective_json()) {
                Ok(text) => {
                    println!("{text}");
                    0
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    1
                }
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn run(path: &Path, demo: bool, watch: bool, pid_file: Option<&Path>) -> i32 {
    init_logging();
    // Started by an upgrade: the running process waits on this socket.
    let incoming = match Incoming::from_env() {
        Some(Ok(incoming)) => Some(incoming),
        Some(Err(e)) => {
            tracing::error!("{e}");
            return 1;
        }
        None => None,
    };
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!("{e}");
            if let Some(incoming) = incoming {
                incoming.refuse_now(&format!("config: {e}"));
            }
            return 1;
        }
    };
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    match sys::raise_fd_limit() {
        Ok((soft, hard)) => tracing::debug!(soft, hard, "file descriptor limit"),
        Err(e) => tracing::warn!("cannot raise the file descriptor limit: {e}"),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.balancer_count)
        .thread_name("stickylb-worker")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return 1;
        }
    };
    let code = runtime.block_on(serve(config, demo, watch, pid_file, incoming));
    // Every connection was closed or reset by now; a handler the runtime still drops resets its
    // sockets (see `proxy::Proxy::handle`).
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    code
}

async fn serve(
    config: Config,
    demo: bool,
    watch: bool,
    pid_file: Option<&Path>,
    incoming: Option<Incoming>,
) -> i32 {
    let mut signals = match Signals::new() {
        Ok(signals) => signals,
        Err(e) => {
            tracing::error!("cannot install signal handlers: {e}");
            return 1;
        }
    };
    let taking_over = incoming.is_some();
    let started = match incoming {
        Some(incoming) => upgrade::take_over(incoming, config, demo).await,
        None => start(config, demo).await,
    };
    let (server, admin) = match started {
        Ok(started) => started,
        Err(code) => return code,
    };
    let upgrader = Upgrader::new(server.clone(), admin);
    upgrade::write_pid_file(pid_file);
    // Listening, and the metrics endpoint up: ready for systemd (`Type=notify`); after an
    // upgrade, this process is the service's main process from now on.
    let ready = if taking_over {
        format!("MAINPID={}\nREADY=1", std::process::id())
    } else {
        "READY=1".to_string()
    };
    if let Err(e) = crate::systemd::notify(&ready) {
        tracing::warn!("cannot notify systemd (NOTIFY_SOCKET): {e}");
    }

    let reloader = Reloader::new(server.clone());
    // Dropping the watcher stops it; it lives until shutdown.
    let _watcher = if watch {
        match reloader.watch() {
            Ok(watcher) => Some(watcher),
            Err(e) => {
                tracing::warn!(
                    "cannot watch the config file's directory ({e}); reload with SIGHUP"
                );
                None
            }
        }
    } else {
        None
    };
    loop {
        let signal = tokio::select! {
            signal = signals.next() => signal,
            () = upgrader.handed_over() => {
                // A new process serves now: finish what is left here, then exit.
                drop(_watcher);
                return tokio::select! {
                    () = upgrader.retire() => 0,
                    signal = signals.next_stop() => {
                        tracing::warn!(signal, "signal while handing over: resetting what is left and exiting");
                        server.cut_all().await;
                        1
                    }
                };
            }
        };
        match signal {
            Signal::Hangup => {
                let _ = reloader.reload(Trigger::Signal).await;
            }
            Signal::Upgrade => upgrader.start(),
            Signal::Stop(name) => {
                let _ = crate::systemd::notify("STOPPING=1");
                tracing::info!(
                    signal = name,
                    open = server.proxy().active(),
                    "closing the listener and draining open connections"
                );
                break;
            }
        }
    }
    // An upgrade still running is called off (the new process is killed) before the drain.
    upgrader.abort().await;
    let code = tokio::select! {
        drained = server.shutdown() => {
            if drained {
                tracing::info!("all connections finished; exiting");
            } else {
                tracing::warn!("shutdownTimeout reached; the remaining connections were reset");
            }
            0
        }
        signal = signals.next_stop() => {
            tracing::warn!(signal, open = server.active(), "second signal: resetting every connection and exiting");
            server.cut_all().await;
            1
        }
    };
    upgrade::remove_if_ours(pid_file);
    code
}

/// A first start (no upgrade): binds, serves, starts the metrics endpoint, drops privileges.
async fn start(config: Config, demo: bool) -> Result<(Arc<Server>, Option<Admin>), i32> {
    let bound = match sockets::bind(config.listen) {
        Ok(bound) => bound,
        Err(e) => {
            tracing::error!("cannot listen on {}: {e}", config.listen);
            return Err(1);
        }
    };
    if demo {
        match crate::demo::spawn_targets(&config).await {
            Ok(addrs) => {
                tracing::info!(targets = ?addrs, "demo targets answering with their names")
            }
            Err(e) => {
                tracing::error!("{e}");
                return Err(1);
            }
        }
    }
    let downgrade = config.downgrade_to_user.clone();
    let path = config.path.clone();
    let targets: Vec<String> = config
        .targets
        .iter()
        .map(|t| format!("{}={}", t.id, t.addr))
        .collect();
    let listen = config.listen;
    let server = match Server::start(config, bound) {
        Ok(server) => Arc::new(server),
        Err(e) => {
            tracing::error!("cannot serve on {listen}: {e}");
            return Err(1);
        }
    };
    // Serves `/metrics` until shutdown (dropping it stops the endpoint); `None` when off.
    let admin = match crate::admin::install(server.config().metrics, server.clone()) {
        Ok(exporter) => exporter,
        Err(e) => {
            tracing::error!("{e}");
            return Err(1);
        }
    };
    // Every socket is bound (listener, metrics endpoint): only now drop privileges, so a port
    // below 1024 works for both.
    if let Some(spec) = &downgrade {
        let dropped = sys::lookup_user(spec).and_then(|user| {
            sys::drop_privileges(&user)?;
            Ok(user)
        });
        match dropped {
            Ok(user) => {
                tracing::info!(user = %user.name, uid = user.uid, gid = user.gid, "dropped privileges")
            }
            Err(e) => {
                tracing::error!("cannot switch to user {spec:?} (downgradeToUser): {e}");
                return Err(1);
            }
        }
    }
    tracing::info!(
        listen = %server.local_addr(),
        targets = %targets.join(", "),
        config = %path.display(),
        fd_limit = sys::fd_limit(),
        max_connections = server.proxy().max_connections(&server.proxy().config()),
        "stickylb {} listening", crate::version::label()
    );
    Ok((server, admin))
}

enum Signal {
    Hangup,
    Upgrade,
    Stop(&'static str),
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop("SIGTERM"),
            _ = self.int.recv() => Signal::Stop("SIGINT"),
            _ = self.hup.recv() => Signal::Hangup,
            _ = self.usr2.recv() => Signal::Upgrade,
        }
    }

    async fn next_stop(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
