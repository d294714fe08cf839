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
//!
//! Signals are safe from the first instruction: SIGHUP is caught before anything else (a
//! SIGHUP during start-up is noted and reloads once the reloader runs, rather than ending the
//! process), and a reload never delays SIGTERM or SIGINT: it runs on its own task, which the
//! shutdown stops without waiting for it (see [`crate::reload`]). Once the drain has begun,
//! neither SIGHUP nor a file change reloads any more, and no upgrade starts.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
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

/// Makes SIGHUP harmless from here on (see [`sys::hold_hangups`]). The binary calls it before
/// `main`, from a constructor (src/main.rs); it is safe there, before Rust's runtime is set up:
/// it makes one system call and stores the outcome in an atomic.
pub fn hold_hangups() {
    HANGUPS_HELD.store(sys::hold_hangups().is_ok(), Ordering::SeqCst);
}

/// Whether [`hold_hangups`] succeeded.
static HANGUPS_HELD: AtomicBool = AtomicBool::new(false);

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    // Done already before `main` by the binary; here for any other caller, and to say so if
    // it cannot be done.
    if !HANGUPS_HELD.load(Ordering::SeqCst) {
        hold_hangups();
        if !HANGUPS_HELD.load(Ordering::SeqCst) {
            eprintln!("warning: cannot catch SIGHUP; a SIGHUP during start-up ends the process");
        }
    }
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
            // The limit the process will run with: start-up raises the soft fd limit to the
            // hard one, so a derived maxConnections comes from the hard limit.
            let max = match config.max_connections {
                0 => crate::proxy::admission::derived_max_connections(sys::fd_hard_limit()),
                max => max,
            };
            if let Some(warning) = one_address_can_take_every_slot(&config, max) {
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
    // Large blocks (a large config's parse) go back to the OS when freed.
    sys::pin_malloc_thresholds();
    // A SIGHUP before this point asked to re-read a file not read yet: nothing to do.
    sys::take_hangup();
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
    // Dropping the watcher stops it; it lives until shutdown begins.
    let mut watcher = if watch {
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
    if sys::take_hangup() {
        tracing::info!("SIGHUP during start-up: reloading");
        reloader.request(Trigger::Signal);
    }
    // A reload only asks: it runs on the reloader's own task, so that this loop is always
    // ready for the next signal, SIGTERM included.
    loop {
        let signal = tokio::select! {
            signal = signals.next() => signal,
            () = upgrader.handed_over() => {
                // A new process serves now: finish what is left here, then exit.
                reloader.stop();
                watcher.take();
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
                reloader.request(Trigger::Signal);
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
    // No reload from now on: the drain must not reopen a listener or switch the config. A
    // reload still running is abandoned, not awaited. An upgrade still running is called off
    // (the new process is killed) before the drain.
    reloader.stop();
    watcher.take();
    upgrader.abort().await;
    let shutdown = server.shutdown();
    tokio::pin!(shutdown);
    let code = loop {
        tokio::select! {
            drained = &mut shutdown => {
                if drained {
                    tracing::info!("all connections finished; exiting");
                } else {
                    tracing::warn!("shutdownTimeout reached; the remaining connections were reset");
                }
                break 0;
            }
            signal = signals.next() => match signal {
                Signal::Hangup => tracing::info!("SIGHUP ignored: shutting down"),
                Signal::Upgrade => tracing::info!("SIGUSR2 ignored: shutting down"),
                Signal::Stop(name) => {
                    tracing::warn!(signal = name, open = server.active(), "second signal: resetting every connection and exiting");
                    server.cut_all().await;
                    break 1;
                }
            },
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
            Ok(addrs) => tracing::info!(
                targets = ?addrs,
                "demo targets answering with their names; {}",
                crate::demo::hint(&config)
            ),
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
                if user.uid == 0 {
                    tracing::warn!(
                        user = %user.name,
                        "downgradeToUser names root (uid 0): stickylb keeps every privilege; \
                         name an unprivileged user such as \"nobody\""
                    );
                }
                tracing::info!(user = %user.name, uid = user.uid, gid = user.gid, "dropped privileges")
            }
            Err(e) => {
                tracing::error!(
                    "{}: downgradeToUser: cannot switch to user {spec}: {e}",
                    path.display()
                );
                return Err(1);
            }
        }
    }
    let max_connections = server.proxy().max_connections(&server.proxy().config());
    if let Some(warning) = one_address_can_take_every_slot(&server.config(), max_connections) {
        tracing::warn!("{warning}");
    }
    tracing::info!(
        listen = %server.local_addr(),
        targets = %targets.join(", "),
        config = %path.display(),
        fd_limit = sys::fd_limit(),
        max_connections,
        "stickylb {} listening", crate::version::label()
    );
    Ok((server, admin))
}

/// The warning for a config where one client address can hold every connection slot (see the
/// README's "Limits"): `maxConnectionsPerClient` is 0 (unlimited) and `max_connections`, the
/// limit in force (set, or derived from the fd limit), is within what one address can open.
/// One address can hold at most one connection per source port to the listener, so a limit
/// above 65,535 cannot be filled from one address, and no warning is given then.
fn one_address_can_take_every_slot(config: &Config, max_connections: u64) -> Option<String> {
    const ONE_ADDRESS: u64 = 65_535;
    if config.max_connections_per_client != 0 || max_connections > ONE_ADDRESS {
        return None;
    }
    let how = match config.max_connections {
        0 => "derived from the file descriptor limit",
        _ => "set",
    };
    Some(format!(
        "{}: maxConnectionsPerClient: 0 (unlimited) while maxConnections is {max_connections} \
         ({how}): one client address can take every connection slot and lock everyone else \
         out; set maxConnectionsPerClient (for example {}) unless many clients share one \
         address (NAT)",
        config.path.display(),
        (max_connections / 10).max(1)
    ))
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

    /// The next SIGTERM or SIGINT (while handing over, when nothing else is done any more).
    async fn next_stop(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
