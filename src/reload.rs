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
//! Only real changes count. A directory watch also reports every open, read and close of the
//! file, stickylb's own reads included, so events are filtered twice before anything is read:
//! by kind (a file created, written, renamed or removed; not opened, read, closed after
//! reading, or given new permissions) and by name (the config file's own name, or a name its
//! symlinks go through in the same directory, such as `..data`). Bursts of events (an editor
//! saving, a ConfigMap swap) are debounced into one reload: after an event, the watcher waits
//! until the directory has been quiet for [`QUIET`] (at most [`MAX_DEBOUNCE`]), then reads the
//! file. It reloads only if the text differs from the last text it tried, so a write of the
//! same bytes is neither applied nor counted. A file caught half-written fails validation and
//! is not applied; the rest of the write is another event, and the complete text is then tried.
//!
//! Reloads never hold anything else up. They run one at a time on a task of their own
//! ([`Reloader::request`]): a SIGHUP or a file event only asks for one, and requests that
//! arrive while one runs are merged into the next. The file is read and parsed on tokio's
//! blocking pool, never on a worker thread, and the read itself is bounded (see
//! [`crate::config::Config::read`]: a named pipe, a device or a huge file is refused, never
//! waited on). A shutdown never waits for a reload: [`Reloader::stop`] ends the reload task
//! and the file watch, and a reload still running then (say, in a slow name resolution) is
//! abandoned: it can no longer move the listener or switch the config.
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

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
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

    /// Its bit in [`Reloader::pending`].
    fn bit(self) -> u8 {
        match self {
            Trigger::Signal => 1,
            Trigger::File => 2,
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
    /// The balancer is shutting down: nothing is applied any more (not counted as a failure).
    #[error("shutting down: the reload is abandoned")]
    ShuttingDown,
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
    /// The fingerprint of the text last tried (applied or rejected), to skip events that
    /// changed nothing. Held for the whole of a reload, which is what serializes them.
    last: Mutex<Option<Fingerprint>>,
    /// Triggers asked for and not started yet ([`Trigger::bit`]s): requests that arrive while
    /// a reload runs merge here into one next reload.
    pending: AtomicU8,
    /// Wakes the reload task (capacity 1: a wake-up already queued is enough).
    wake: mpsc::Sender<()>,
    /// The reload task's end of `wake`, until the task is started (on the first request).
    woken: std::sync::Mutex<Option<mpsc::Receiver<()>>>,
    /// Set by [`Reloader::stop`]: no reload is started any more.
    stopped: AtomicBool,
}

impl Reloader {
    /// A reloader for `server`, reading the file its config came from.
    pub fn new(server: Arc<Server>) -> Arc<Reloader> {
        let path = server.proxy().config().path.clone();
        // Bounded like every read of the file (a regular file of at most MAX_BYTES).
        let last = Config::read(&path).ok().map(|text| Fingerprint::of(&text));
        let (wake, woken) = mpsc::channel(1);
        Arc::new(Reloader {
            server,
            path,
            last: Mutex::new(last),
            pending: AtomicU8::new(0),
            wake,
            woken: std::sync::Mutex::new(Some(woken)),
            stopped: AtomicBool::new(false),
        })
    }

    /// Asks for a reload and returns at once; the reload runs on the reloader's own task
    /// (started by the first request; must be called inside a tokio runtime). Requests made
    /// while a reload runs are merged into one more reload after it (a SIGHUP among them makes
    /// it a [`Trigger::Signal`] one). Returns false, and does nothing, once
    /// [`Reloader::stop`] was called.
    pub fn request(self: &Arc<Self>, trigger: Trigger) -> bool {
        if self.stopped.load(Ordering::Acquire) {
            return false;
        }
        self.pending.fetch_or(trigger.bit(), Ordering::AcqRel);
        self.start_task();
        // A full channel already holds a wake-up, which will see this request's bit.
        let _ = self.wake.try_send(());
        true
    }

    /// Stops reloading for good (at shutdown): no reload starts after this, and one still
    /// running can no longer change anything (see [`ReloadError::ShuttingDown`]). Returns at
    /// once: a reload stuck in a read or a name resolution is abandoned, not awaited.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        let _ = self.wake.try_send(());
    }

    /// Starts the reload task unless it runs already. It holds the reloader weakly and ends
    /// when the reloader is dropped or stopped.
    fn start_task(self: &Arc<Self>) {
        let taken = self.woken.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(mut woken) = taken else {
            return;
        };
        let reloader: Weak<Reloader> = Arc::downgrade(self);
        tokio::spawn(async move {
            while woken.recv().await.is_some() {
                let Some(reloader) = reloader.upgrade() else {
                    return;
                };
                if reloader.stopped.load(Ordering::Acquire) {
                    return;
                }
                let bits = reloader.pending.swap(0, Ordering::AcqRel);
                let trigger = if bits & Trigger::Signal.bit() != 0 {
                    Trigger::Signal
                } else if bits != 0 {
                    Trigger::File
                } else {
                    continue;
                };
                let _ = reloader.reload(trigger).await;
            }
        });
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
            Err(ReloadError::ShuttingDown) => {
                tracing::info!(
                    trigger = trigger.name(),
                    "shutting down: the config is not reloaded"
                );
                Err(ReloadError::ShuttingDown)
            }
            Err(error) => self.failed(trigger, error),
        }
    }

    /// The steps of a reload: read, skip an unchanged file (file events only), parse and
    /// resolve, apply. Reading and parsing (which resolves host names) block, so they run off
    /// the worker threads.
    async fn try_reload(&self, trigger: Trigger) -> Result<Outcome, ReloadError> {
        let mut last = self.last.lock().await;
        let path = self.path.clone();
        let text = self.blocking(move || Config::read(&path)).await??;
        let fingerprint = Fingerprint::of(&text);
        if trigger == Trigger::File && *last == Some(fingerprint) {
            return Ok(Outcome::Unchanged);
        }
        *last = Some(fingerprint);
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

    /// Watches the config file's directory and asks for a reload on changes (see the module
    /// doc for which events count), until the returned watcher is dropped. Must be called
    /// inside a tokio runtime.
    pub fn watch(self: &Arc<Self>) -> notify::Result<notify::RecommendedWatcher> {
        let (events, mut rx) = mpsc::channel::<()>(64);
        let mut chain = Chain::of(self.path.clone());
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // A full channel already holds a wake-up: drop this one.
                if event.is_ok_and(|event| chain.concerns(&event)) {
                    let _ = events.try_send(());
                }
            })?;
        let dir = watched_dir(&self.path);
        watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
        let reloader = Arc::clone(self);
        tokio::spawn(async move {
            while rx.recv().await.is_some() {
                debounce(&mut rx).await;
                if !reloader.request(Trigger::File) {
                    return;
                }
            }
        });
        Ok(watcher)
    }
}

/// The config file's name and the names its symlinks go through (see [`chain_names`]), as they
/// were after the last event that concerned them: the chain can only change through an event
/// on one of its own names (the file replaced, a link on it renamed or re-pointed), so an
/// event on any other file of the directory is dismissed without reading a link.
struct Chain {
    path: PathBuf,
    names: Vec<OsString>,
}

impl Chain {
    fn of(path: PathBuf) -> Chain {
        let names = chain_names(&path);
        Chain { path, names }
    }

    /// Whether a directory event may have changed what the file reads: a change of the right
    /// kind (see [`is_change`]) to one of the chain's names, or a lost-events notice (the
    /// kernel's queue overflowed). Such an event reads the chain again.
    fn concerns(&mut self, event: &notify::Event) -> bool {
        let concerns = event.need_rescan()
            || (is_change(&event.kind)
                && event
                    .paths
                    .iter()
                    .filter_map(|p| p.file_name())
                    .any(|name| self.names.iter().any(|n| n == name)));
        if concerns {
            self.names = chain_names(&self.path);
        }
        concerns
    }
}

/// A file created, written (a write or the close after writing), renamed or removed. Not an
/// open, a read, a close after reading (stickylb's own reads of the file are exactly these) or
/// a change of permissions or times.
fn is_change(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Create(_)
            | EventKind::Remove(_)
            | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Name(_) | ModifyKind::Any)
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Any
    )
}

/// The names in the config file's directory whose change can change what `path` reads: its
/// own name, and when it is a symlink with a relative target, the first component of that
/// target (a Kubernetes ConfigMap mount: `config.json -> ..data/config.json`, and the
/// directory swap renames `..data`), following links that stay in the directory (at most 8).
fn chain_names(path: &Path) -> Vec<OsString> {
    let mut names: Vec<OsString> = path.file_name().map(OsString::from).into_iter().collect();
    let mut link = path.to_path_buf();
    for _ in 0..8 {
        let Ok(target) = std::fs::read_link(&link) else {
            break;
        };
        if target.is_absolute() {
            break;
        }
        let mut components = target.components();
        let Some(Component::Normal(first)) = components.next() else {
            break;
        };
        names.push(first.to_os_string());
        if components.next().is_some() {
            break;
        }
        link.set_file_name(first);
    }
    names
}

/// What is kept of the text last tried: its length and two 64-bit hashes, rather than the
/// text itself (up to [`crate::config::MAX_BYTES`], held for as long as the process runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    len: usize,
    hashes: [u64; 2],
}

impl Fingerprint {
    fn of(text: &str) -> Fingerprint {
        use std::hash::{Hash, Hasher};
        let hash = |salt: u64| {
            // SipHash with fixed keys: the same text gives the same fingerprint every time.
            let mut hasher = std::hash::DefaultHasher::new();
            salt.hash(&mut hasher);
            text.hash(&mut hasher);
            hasher.finish()
        };
        Fingerprint {
            len: text.len(),
            hashes: [hash(1), hash(2)],
        }
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
/// whose change was not applied. Once the server is shutting down, nothing is changed.
pub(crate) async fn apply(
    server: &Server,
    mut config: Config,
) -> Result<Vec<&'static str>, ReloadError> {
    if server.is_stopping() {
        return Err(ReloadError::ShuttingDown);
    }
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
            .map_err(|source| {
                if server.is_stopping() {
                    ReloadError::ShuttingDown
                } else {
                    ReloadError::Bind {
                        addr: config.listen,
                        source,
                    }
                }
            })?;
        tracing::info!(%addr, old = %running.listen, "listener moved");
    } else if config.tcp_keepalive != running.tcp_keepalive {
        if let Err(error) = server.retune_listener(config.tcp_keepalive.as_ref()) {
            // The new settings still apply to target sockets; client sockets keep the old ones.
            tracing::warn!(%error, "cannot apply tcpKeepalive to the listener");
        }
    }
    if server.is_stopping() {
        return Err(ReloadError::ShuttingDown);
    }
    server.swap(config);
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, RenameMode};
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_events_wakes_the_reload_once_after_the_quiet() {
        let (events, mut rx) = mpsc::channel(64);
        let burst = tokio::spawn(async move {
            for _ in 0..20 {
                events.send(()).await.expect("open");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            events
        });
        rx.recv().await.expect("the first event");
        let first = Instant::now();
        debounce(&mut rx).await;
        // The last event came 190 ms after the first; then QUIET of nothing.
        assert_eq!(first.elapsed(), Duration::from_millis(190) + QUIET);
        assert!(rx.try_recv().is_err(), "the whole burst was taken");
        drop(burst.await);
    }

    #[tokio::test(start_paused = true)]
    async fn endless_events_delay_a_reload_by_at_most_max_debounce() {
        let (events, mut rx) = mpsc::channel(64);
        let stream = tokio::spawn(async move {
            for _ in 0..200 {
                if events.send(()).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        rx.recv().await.expect("the first event");
        let first = Instant::now();
        debounce(&mut rx).await;
        assert_eq!(first.elapsed(), MAX_DEBOUNCE);
        stream.abort();
    }

    fn event(kind: EventKind, path: &Path) -> notify::Event {
        notify::Event::new(kind).add_path(path.to_path_buf())
    }

    #[test]
    fn stickylbs_own_reads_are_not_changes_and_writes_are() {
        let dir = std::env::temp_dir().join(format!("stickylb-reload-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let config = dir.join("config.json");
        let own = [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Modify(ModifyKind::Metadata(notify::event::MetadataKind::Any)),
        ];
        let mut chain = Chain::of(config.clone());
        for kind in own {
            assert!(!chain.concerns(&event(kind, &config)), "{kind:?}");
        }
        let writes = [
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Remove(notify::event::RemoveKind::File),
        ];
        for kind in writes {
            assert!(chain.concerns(&event(kind, &config)), "{kind:?}");
            // The same change to another file of the directory is not the config's.
            assert!(
                !chain.concerns(&event(kind, &dir.join("other.json"))),
                "{kind:?}"
            );
        }
        // Events were lost: read, to be sure.
        let overflow = notify::Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert!(chain.concerns(&overflow));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_configmap_symlink_swap_concerns_the_config() {
        let dir = std::env::temp_dir().join(format!("stickylb-reload-cm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("..2024_01_01")).expect("dir");
        std::fs::write(dir.join("..2024_01_01/config.json"), "{}").expect("file");
        std::os::unix::fs::symlink("..2024_01_01", dir.join("..data")).expect("link");
        std::os::unix::fs::symlink("..data/config.json", dir.join("config.json")).expect("link");
        let config = dir.join("config.json");
        assert_eq!(
            chain_names(&config),
            vec![OsString::from("config.json"), OsString::from("..data")]
        );
        let swap = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        let mut chain = Chain::of(config.clone());
        assert!(chain.concerns(&event(swap, &dir.join("..data"))));
        assert!(!chain.concerns(&event(swap, &dir.join("..data_tmp"))));
        // A chain of links in the directory: every name on it.
        std::os::unix::fs::symlink("b.json", dir.join("a.json")).expect("link");
        std::os::unix::fs::symlink("c.json", dir.join("b.json")).expect("link");
        let names = chain_names(&dir.join("a.json"));
        assert_eq!(names, ["a.json", "b.json", "c.json"].map(OsString::from));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The chain is read again after an event on it, so a plain file replaced by a ConfigMap
    /// link is followed from then on; events on other names leave it as it was.
    #[test]
    fn the_chain_follows_a_file_that_becomes_a_link() {
        let dir = std::env::temp_dir().join(format!("stickylb-reload-ch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("..2024_01_01")).expect("dir");
        let config = dir.join("config.json");
        std::fs::write(&config, "{}").expect("file");
        let mut chain = Chain::of(config.clone());
        assert_eq!(chain.names, [OsString::from("config.json")]);
        let write = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        assert!(!chain.concerns(&event(write, &dir.join("app.log"))));
        // The file becomes a link through `..data`.
        std::fs::write(dir.join("..2024_01_01/config.json"), "{}").expect("file");
        std::os::unix::fs::symlink("..2024_01_01", dir.join("..data")).expect("link");
        let rename = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        assert!(
            !chain.concerns(&event(rename, &dir.join("..data"))),
            "not on the chain yet"
        );
        std::fs::remove_file(&config).expect("remove");
        std::os::unix::fs::symlink("..data/config.json", &config).expect("link");
        assert!(chain.concerns(&event(EventKind::Create(CreateKind::File), &config)));
        assert_eq!(chain.names, ["config.json", "..data"].map(OsString::from));
        assert!(chain.concerns(&event(rename, &dir.join("..data"))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
