//! Hot reload: config edits take effect atomically, and a bad edit is harmless.
//!
//! Triggers: SIGHUP ([`Reloader::reload`] with [`Trigger::Signal`]), and changes to the config
//! file seen by watching its *directory* ([`Reloader::watch`]). Watching the directory rather
//! than the file is what catches all three ways people change a file:
//! - an in-place write (the file's inode is modified);
//! - an editor's write-to-temp-then-rename (the watched inode would be replaced: a file watch
//!   goes deaf, a directory watch sees the rename);
//! - a Kubernetes ConfigMap update, where `config.json -> ..data/config.json` and the
//!   `..data` symlink is swapped to a new timestamped directory: the file itself is never
//!   written, only the directory changes.
//!
//! Bursts of events (an editor saving, a ConfigMap swap) are debounced into one reload: after
//! an event, the watcher waits until the directory has been quiet for [`QUIET`] (at most
//! [`MAX_DEBOUNCE`]), then reads the file. It reloads only if the text differs from the last
//! text it tried, so unrelated files in the same directory cost a read and nothing else.
//! A file caught half-written fails validation and is not applied; the rest of the write is
//! another event, and the complete text is then tried.
//!
//! A reload reads, parses, validates and resolves the new config completely before anything
//! changes (see [`crate::config`]); if the listen address changed, it binds the new listener
//! too. Only then is the config switched, with one `ArcSwap` store: each new connection sees all
//! of the old config or all of the new one. Open connections keep the generation they started
//! with, so a reload never cuts one, not even one to a target the reload removed: those drain.
//! Runtime state (deactivation windows, sessions, counters) is kept by target identity (see
//! [`crate::balance::target::Registry`]), and a session pinned to a removed target moves.
//!
//! Some keys cannot change while running (`metricsHost`, `metricsPort`, `balancerCount`,
//! `downgradeToUser`): a reload that changes them keeps their running values, names them in a
//! warning, and applies the rest.
//!
//! If anything fails, the running config keeps serving, the reason is logged at error level,
//! and the failure is counted (`config_reloads_total{result="failure"}`,
//! `config_last_reload_success` 0).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use notify::Watcher;
use tokio::sync::{mpsc, Mutex};

use crate::config::{Config, ConfigError};
use crate::server::Server;
use crate::sockets;

/// How long the directory must be quiet before a file event is acted on.
pub const QUIET: Duration = Duration::from_millis(100);

/// The longest a burst of events can delay a reload.
pub const MAX_DEBOUNCE: Duration = Duration::from_millis(500);

/// What asked for a reload (logged with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP: always reloads, even when the text did not change (so an operator can re-resolve
    /// host names).
    Signal,
    /// A change in the config file's directory: reloads when the text changed.
    File,
}

impl Trigger {
    fn name(self) -> &'static str {
        match self {
            Trigger::Signal => "SIGHUP",
            Trigger::File => "file change",
        }
    }
}

/// Why a reload was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} (sourceHost/sourcePort changed): {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// What a successful reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The new config is in force.
    Applied {
        /// Keys that changed but need a restart: their running values were kept.
        kept: Vec<&'static str>,
    },
    /// The file's text is what was last tried (a file event that changed nothing).
    Unchanged,
}

/// Reloads one server's config from its file. Reloads are serialized: a SIGHUP and a file
/// event at the same moment run one after the other.
#[derive(Debug)]
pub struct Reloader {
    server: Arc<Server>,
    path: PathBuf,
    /// The text last tried (applied or rejected), to skip events that changed nothing.
    last: Mutex<Option<String>>,
}

impl Reloader {
    /// A reloader for `server`, reading the file its config came from.
    pub fn new(server: Arc<Server>) -> Arc<Reloader> {
        let path = server.proxy().config().path.clone();
        let last = std::fs::read_to_string(&path).ok();
        Arc::new(Reloader {
            server,
            path,
            last: Mutex::new(last),
        })
    }

    /// Reads the file and, if it is valid, switches to it. Counts and logs the result.
    pub async fn reload(&self, trigger: Trigger) -> Result<Outcome, ReloadError> {
        match self.try_reload(trigger).await {
            Ok(Outcome::Applied { kept }) => {
                let stats = &self.server.proxy().shared.stats;
                stats.reloads_success.fetch_add(1, Ordering::Relaxed);
                stats.last_reload_failed.store(false, Ordering::Relaxed);
                self.server.proxy().shared.record_reload(None);
                let config = self.server.proxy().config();
                tracing::info!(
                    trigger = trigger.name(),
                    listen = %self.server.local_addr(),
                    targets = config.targets.len(),
                    "config reloaded"
                );
                if !kept.is_empty() {
                    tracing::warn!(
                        keys = %kept.join(", "),
                        "these keys only change with a restart; their running values are kept"
                    );
                }
                Ok(Outcome::Applied { kept })
            }
            Ok(Outcome::Unchanged) => Ok(Outcome::Unchanged),
            Err(error) => self.failed(trigger, error),
        }
    }

    /// The steps of a reload: read, skip an unchanged file (file events only), parse and
    /// resolve, apply. Reading and parsing (which resolves host names) block, so they run off
    /// the worker threads.
    async fn try_reload(&self, trigger: Trigger) -> Result<Outcome, ReloadError> {
        let mut last = self.last.lock().await;
        let path = self.path.clone();
        let text = self
            .blocking(move || std::fs::read_to_string(&path))
            .await?
            .map_err(|source| self.read_error(source))?;
        if trigger == Trigger::File && last.as_deref() == Some(text.as_str()) {
            return Ok(Outcome::Unchanged);
        }
        *last = Some(text.clone());
        let path = self.path.clone();
        let config = self.blocking(move || Config::parse(&path, &text)).await??;
        let kept = apply(&self.server, config).await?;
        Ok(Outcome::Applied { kept })
    }

    /// Runs `f` on tokio's blocking pool. A panic in it rejects the reload instead of
    /// escaping.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ReloadError> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|join| self.read_error(std::io::Error::other(join)))
    }

    fn read_error(&self, source: std::io::Error) -> ReloadError {
        ReloadError::Read {
            path: self.path.clone(),
            source,
        }
    }

    fn failed(&self, trigger: Trigger, error: ReloadError) -> Result<Outcome, ReloadError> {
        let stats = &self.server.proxy().shared.stats;
        stats.reloads_failure.fetch_add(1, Ordering::Relaxed);
        stats.last_reload_failed.store(true, Ordering::Relaxed);
        self.server.proxy().shared.record_reload(Some(&error));
        tracing::error!(
            trigger = trigger.name(),
            "reload rejected, the running config keeps serving: {error}"
        );
        Err(error)
    }

    /// Watches the config file's directory and reloads on changes, until the returned watcher
    /// is dropped. Must be called inside a tokio runtime.
    pub fn watch(self: &Arc<Self>) -> notify::Result<notify::RecommendedWatcher> {
        let (events, mut rx) = mpsc::channel::<()>(64);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // Any event in the directory may concern the file (renames, symlink swaps); the
                // text comparison decides. A full channel already holds a wake-up: drop this one.
                if event.is_ok() {
                    let _ = events.try_send(());
                }
            })?;
        let dir = watched_dir(&self.path);
        watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
        let reloader = Arc::clone(self);
        tokio::spawn(async move {
            while rx.recv().await.is_some() {
                debounce(&mut rx).await;
                let _ = reloader.reload(Trigger::File).await;
            }
        });
        Ok(watcher)
    }
}

/// Waits until no event has arrived for [`QUIET`], or [`MAX_DEBOUNCE`] has passed.
async fn debounce(rx: &mut mpsc::Receiver<()>) {
    let deadline = tokio::time::Instant::now() + MAX_DEBOUNCE;
    loop {
        let quiet = (tokio::time::Instant::now() + QUIET).min(deadline);
        match tokio::time::timeout_at(quiet, rx.recv()).await {
            Ok(Some(())) if tokio::time::Instant::now() < deadline => continue,
            _ => return,
        }
    }
}

/// The directory holding the config file (`.` for a bare file name).
fn watched_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Switches `server` to `config`: keeps the running values of keys that need a restart; if the
/// listen address changed, binds and starts the new listener and retires the old one (failure
/// rejects the whole reload, with nothing changed); then stores the config. Returns the keys
/// whose change was not applied.
pub(crate) async fn apply(
    server: &Server,
    mut config: Config,
) -> Result<Vec<&'static str>, ReloadError> {
    let running = server.proxy().config();
    let mut kept = Vec::new();
    if config.metrics != running.metrics {
        kept.push("metricsHost/metricsPort");
        config.metrics = running.metrics;
    }
    if config.balancer_count != running.balancer_count {
        kept.push("balancerCount");
        config.balancer_count = running.balancer_count;
    }
    if config.downgrade_to_user != running.downgrade_to_user {
        kept.push("downgradeToUser");
        config.downgrade_to_user = running.downgrade_to_user.clone();
    }
    if config.listen != running.listen {
        let bound = match sockets::bind(config.listen) {
            // The port is taken, maybe by our own listener (`0.0.0.0:p` → `127.0.0.1:p`): bind
            // beside it, and it closes once the new one accepts.
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && config.listen.port() == running.listen.port() =>
            {
                sockets::bind_beside(config.listen)
            }
            other => other,
        }
        .map_err(|source| ReloadError::Bind {
            addr: config.listen,
            source,
        })?;
        // Moved before the config is stored, so that a listener that cannot start leaves the
        // whole reload undone. Connections accepted meanwhile on either port use the running
        // config (each loads the config it uses once, at its start).
        let addr = server
            .replace_listener(bound, config.tcp_keepalive.as_ref())
            .await
            .map_err(|source| ReloadError::Bind {
                addr: config.listen,
                source,
            })?;
        tracing::info!(%addr, old = %running.listen, "listener moved");
    } else if config.tcp_keepalive != running.tcp_keepalive {
        if let Err(error) = server.retune_listener(config.tcp_keepalive.as_ref()) {
            // The new settings still apply to target sockets; client sockets keep the old ones.
            tracing::warn!(%error, "cannot apply tcpKeepalive to the listener");
        }
    }
    server.swap(config);
    Ok(kept)
}
