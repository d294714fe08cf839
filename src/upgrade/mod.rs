//! Upgrades without refusing, cutting or forgetting anything (design §13): on SIGUSR2 (or
//! `stickylb upgrade`, which sends it and waits for the outcome), the running process starts
//! the binary at its own path again and hands it everything: the listening sockets, the
//! metrics socket, the runtime state, and the established connections themselves.
//!
//! # The protocol
//!
//! The two processes talk over a Unix socket pair; the messages and their format are in
//! the `handover` module, versioned. In order:
//!
//! 1. **Start.** The old process starts the binary at the path it was started from (read from
//!    disk again, see [`spawn`]) with the same arguments and one end of the socket. The new
//!    process loads the config file as at start-up (so an upgrade also applies restart-only
//!    keys: `metricsHost`, `metricsPort`, `balancerCount`, `downgradeToUser`).
//! 2. **Hello.** The old process sends its format version, the binary's path, the config's
//!    path and the running config, and descriptors of the balancer's and the metrics endpoint's
//!    listening sockets. The new process checks that it reads this format version, takes the
//!    listeners (binding new ones only where the config moved them), and answers `prepared`.
//!    Until here the old process has stopped nothing.
//! 3. **Connections.** The old process stops its metrics endpoint (the scrapes it is answering
//!    finish; new ones wait in the backlog of the shared listening socket, for whichever process
//!    serves next). Every connection in its relay stage stops between two polls and offers
//!    itself (`proxy::handoff`); the old process sends them in batches of at most 253
//!    descriptors: both sockets, and each splice pipe that holds bytes, as it is; a copy
//!    buffer's bytes; the half-closed flags; client, target, start time, byte counts. It waits
//!    until every relaying connection has reported (or one second).
//! 4. **State.** The old process stops accepting (connects wait in the backlog of the shared
//!    listening socket: none is refused), then sends the state of that quiet moment: the clock,
//!    counters and histograms, every target's deactivation window, health verdict and counters,
//!    and the session table. No scrape of the old process showed a count above it.
//! 5. **Ready.** The new process restores the state, checks every connection (TCP sockets,
//!    directions a relay can be in, pipes that hold exactly what the record says) and
//!    registers them, and answers `ready`. It has still neither accepted nor relayed.
//! 6. **Commit.** The old process sends `commit`; from that moment the new process accepts,
//!    relays and serves metrics, tells systemd `MAINPID=` and `READY=1`, and writes the pid
//!    file; the old one closes its descriptors of the handed-over connections without touching
//!    them, and tells `stickylb upgrade` the outcome.
//! 7. **Retire.** Connections that were still connecting (or reading a PROXY header) in the
//!    old process hand themselves over when they reach their relay stage, in late batches;
//!    once none is left (or after `shutdownTimeout`, when the rest are cut) the old process
//!    sends its final counts, which the new one adds (so no count is lost and none goes
//!    backwards), and exits 0.
//!
//! # Failure
//!
//! A new process that cannot be started, exits or crashes, refuses (its config, its format
//! version, a bind, a user switch, a connection it cannot check) or is not ready in time makes
//! the attempt fail before the commit: the old process undoes what it stopped (it accepts
//! again, serves metrics again, and every connection relays on from where it stopped), kills
//! the new process, logs why, counts `upgrades_total{result="failure"}` and tells
//! `stickylb upgrade`. A SIGUSR2 while an attempt runs is refused with a log line.
//!
//! # What does not move
//!
//! A connection whose one direction already failed (it ends within a second anyway) ends in
//! the old process. The health checks' counts in a row (`rise`/`fall` progress) start again
//! (the verdicts move). The idle timeout goes on counting from where it was.

mod control;
mod give;
mod pidfile;
mod spawn;
mod take;

pub use control::request;
pub use pidfile::{announce as write_pid_file, read as read_pid_file, remove_if_ours};
pub use spawn::remember;
pub use take::{take_over, Incoming};

use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::admin::Admin;
use crate::server::Server;

/// The running process's side of upgrades: started on SIGUSR2, at most one at a time.
#[derive(Debug)]
pub struct Upgrader {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    server: Arc<Server>,
    /// The metrics endpoint: stopped (its socket handed over) during an attempt, restarted if
    /// the attempt fails.
    admin: Mutex<Option<Admin>>,
    standing: Arc<control::Standing>,
    waiting: Arc<control::Waiting>,
    /// Set at the commit.
    handed: Mutex<Option<give::Handed>>,
    committed: watch::Sender<bool>,
    /// Turns true to call off a running attempt (the process is stopping).
    abort: watch::Sender<bool>,
    attempt: Mutex<Option<JoinHandle<()>>>,
    /// The `stickylb upgrade` socket's task.
    control: Option<JoinHandle<()>>,
    started: Mutex<Option<Instant>>,
}

impl Upgrader {
    /// The upgrader of `server`, owning its metrics endpoint `admin`. Listens on the
    /// `stickylb upgrade` socket. Must be called inside the runtime.
    pub fn new(server: Arc<Server>, admin: Option<Admin>) -> Upgrader {
        let standing = Arc::new(control::Standing::default());
        let waiting = Arc::new(control::Waiting::default());
        let control = control::listen(standing.clone(), waiting.clone());
        Upgrader {
            inner: Arc::new(Inner {
                server,
                admin: Mutex::new(admin),
                standing,
                waiting,
                handed: Mutex::new(None),
                committed: watch::channel(false).0,
                abort: watch::channel(false).0,
                attempt: Mutex::new(None),
                control,
                started: Mutex::new(None),
            }),
        }
    }

    /// SIGUSR2: starts an upgrade, unless one is running (then only a log line says so).
    pub fn start(&self) {
        let inner = &self.inner;
        if !inner.standing.begin() {
            let since = lock(&inner.started).map(|s| s.elapsed().as_millis());
            tracing::warn!(
                since_ms = ?since,
                "SIGUSR2 refused: an upgrade is already running (or this process has handed over)"
            );
            return;
        }
        let signalled = Instant::now();
        *lock(&inner.started) = Some(signalled);
        tracing::info!("SIGUSR2: upgrading");
        let task_inner = inner.clone();
        let task = tokio::spawn(async move {
            let inner = task_inner;
            let mut abort = inner.abort.subscribe();
            let parts = give::Parts {
                server: &inner.server,
                admin: &inner.admin,
            };
            let result = tokio::select! {
                result = give::attempt(parts, signalled) => result,
                _ = abort.wait_for(|a| *a) => Err("the process is stopping".to_string()),
            };
            inner.finish(result);
        });
        *lock(&inner.attempt) = Some(task);
    }

    /// Completes once an upgrade has committed: the new process serves, this one retires.
    pub async fn handed_over(&self) {
        let mut committed = self.inner.committed.subscribe();
        let _ = committed.wait_for(|c| *c).await;
    }

    /// After [`Upgrader::handed_over`]: hands over the connections that were still
    /// connecting, waits (up to `shutdownTimeout`) until none is left here, and sends the final
    /// counts.
    pub async fn retire(&self) {
        let handed = lock(&self.inner.handed).take();
        let server = &self.inner.server;
        server.stop_accepting().await;
        if let Some(handed) = handed {
            let deadline = Instant::now() + server.config().shutdown_timeout;
            handed.retire(server, deadline).await;
        }
        tracing::info!("handed over; exiting");
    }

    /// Calls off a running attempt (undoing it) and waits until it is undone: before a
    /// shutdown.
    pub async fn abort(&self) {
        let _ = self.inner.abort.send(true);
        let task = lock(&self.inner.attempt).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for Upgrader {
    fn drop(&mut self) {
        if let Some(control) = &self.inner.control {
            control.abort();
        }
    }
}

impl Inner {
    /// The end of an attempt: success or failure, logged, counted and told.
    fn finish(&self, result: Result<give::Handed, String>) {
        match result {
            Ok(handed) => {
                self.standing.handed(handed.pid);
                self.waiting.announce(&format!(
                    "ok {} {} {}",
                    handed.pid,
                    handed.build,
                    handed.took.as_millis()
                ));
                tracing::debug!(connections = handed.connections, "upgrade committed");
                *lock(&self.handed) = Some(handed);
                let _ = self.committed.send(true);
            }
            Err(reason) => {
                self.server
                    .proxy()
                    .shared
                    .stats
                    .upgrades_failure
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!("upgrade failed; this process keeps serving everything: {reason}");
                self.waiting.announce(&format!("failed {reason}"));
                self.standing.failed();
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests;
