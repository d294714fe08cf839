//! The new process's side of an upgrade: read what the old process hands over, check all of
//! it, say ready, and take over only when the old process commits (see the module doc of
//! `super` for the whole protocol).
//!
//! Until the commit this process neither accepts nor relays: it holds descriptors of the
//! listeners and connections, which the old process goes on serving, so that refusing (or
//! dying) here costs the old process nothing. Any problem before `ready` is answered with a
//! refusal that names it, and this process exits 1.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixStream;

use crate::admin::{self, Admin};
use crate::balance::Shared;
use crate::config::Config;
use crate::handover::{self, frame, Batch, Hello, Kind, Reply, Role, State};
use crate::proxy::handoff::{Checked, Resumed};
use crate::proxy::Proxy;
use crate::server::Server;
use crate::sockets;

use super::spawn;

/// How long the old process may take to send the hello, and then everything up to the commit.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The handover socket of a process that an upgrade started.
#[derive(Debug)]
pub struct Incoming {
    socket: std::os::unix::net::UnixStream,
}

impl Incoming {
    /// The handover socket, when an upgrade started this process (`STICKYLB_UPGRADE_FD`).
    /// Call it before any other thread runs (it edits the environment).
    pub fn from_env() -> Option<Result<Incoming, String>> {
        spawn::take_socket().map(|taken| {
            taken
                .map(|socket| Incoming { socket })
                .map_err(|e| format!("cannot take the handover socket: {e}"))
        })
    }

    /// Tells the old process that this one cannot take over, and why (before a runtime runs:
    /// the config did not load, say). The old process keeps serving.
    pub fn refuse_now(self, reason: &str) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        if let Ok(runtime) = runtime {
            runtime.block_on(async move {
                if let Ok(socket) = self.into_stream() {
                    refuse(&socket, reason).await;
                }
            });
        }
    }

    fn into_stream(self) -> std::io::Result<UnixStream> {
        self.socket.set_nonblocking(true)?;
        UnixStream::from_std(self.socket)
    }
}

/// Takes over from the old process with `config` (loaded from the file, as at start-up).
/// Returns the server, serving, and its metrics endpoint; or the exit code, once the old
/// process was told why not (it keeps serving).
pub async fn take_over(
    incoming: Incoming,
    config: Config,
    demo: bool,
) -> Result<(Arc<Server>, Option<Admin>), i32> {
    let socket = match incoming.into_stream() {
        Ok(socket) => socket,
        Err(e) => {
            tracing::error!("upgrade: cannot use the handover socket: {e}");
            return Err(1);
        }
    };
    let mut reader = frame::Reader::new();
    let ready = match prepare(&socket, &mut reader, config, demo).await {
        Ok(ready) => ready,
        Err(reason) => {
            tracing::error!(
                "upgrade: this process cannot take over, the running one goes on: {reason}"
            );
            refuse(&socket, &reason).await;
            return Err(1);
        }
    };
    let pid = std::process::id();
    if let Err(e) = send(&socket, Reply::Ready { pid }).await {
        tracing::error!("upgrade: cannot tell the running process we are ready: {e}");
        return Err(1);
    }
    // Nothing has moved yet: wait for the old process to let go.
    match tokio::time::timeout(COMMIT_TIMEOUT, reader.next(&socket)).await {
        Ok(Ok(Some(f))) if f.kind == Kind::Commit as u8 => {}
        other => {
            tracing::error!("upgrade: no commit from the running process ({other:?}); it goes on");
            return Err(1);
        }
    }
    ready.start(socket, reader).await
}

/// Everything checked and held, waiting for the commit.
struct Ready {
    old_pid: u32,
    old_build: String,
    config: Config,
    listener: std::net::TcpListener,
    /// A listener of a new `sourceHost`/`sourcePort`, bound here.
    moved: Option<std::net::TcpListener>,
    metrics: Option<std::net::TcpListener>,
    shared: Shared,
    /// Every target state, held until the connections have taken theirs.
    held: Vec<Arc<crate::balance::target::TargetState>>,
    connections: Vec<Resumed>,
    state: State,
}

/// Reads the hello, takes the listeners, answers `prepared`; then reads the connections and
/// the state, and checks them.
async fn prepare(
    socket: &UnixStream,
    reader: &mut frame::Reader,
    config: Config,
    demo: bool,
) -> Result<Ready, String> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, reader.next(socket))
        .await
        .map_err(|_| "no hello from the running process".to_string())?
        .map_err(|e| format!("handover socket: {e}"))?
        .ok_or("the running process closed the handover socket")?;
    if first.kind != Kind::Hello as u8 {
        return Err(format!(
            "the first message is of kind {}, not a hello",
            first.kind
        ));
    }
    let hello = Hello::decode(&first.payload, first.fds).map_err(|e| e.to_string())?;
    spawn::use_path(hello.exe.clone());
    if demo {
        return Err("`stickylb demo` cannot hand over its demo targets; restart it instead".into());
    }
    if hello.config_path != config.path {
        tracing::warn!(
            running = %hello.config_path.display(), loaded = %config.path.display(),
            "upgrade: the running process's config file is not the one this process loaded"
        );
    }
    log_changes(&hello.config_text, &config);

    let mut listener = None;
    let mut metrics_handed = None;
    for (role, fd) in hello.listeners {
        let taken = tcp_listener(fd).map_err(|e| format!("a listener handed over: {e}"))?;
        match role {
            Role::Balancer if listener.is_none() => listener = Some(taken),
            Role::Admin if metrics_handed.is_none() => metrics_handed = Some(taken),
            _ => return Err(format!("two listeners of role {role:?}")),
        }
    }
    let listener = listener.ok_or("no balancer listener handed over")?;
    let handed = listener.local_addr().map_err(|e| e.to_string())?;
    let moved = if same_address(handed, config.listen) {
        None
    } else {
        Some(bind_moved(config.listen, handed)?)
    };
    let metrics = match (config.metrics, metrics_handed) {
        (None, _) => None,
        (Some(addr), Some(handed)) if handed.local_addr().is_ok_and(|h| same_address(h, addr)) => {
            Some(handed)
        }
        (Some(addr), _) => Some(sockets::bind(addr).map_err(|e| {
            format!("cannot serve metrics on {addr} (metricsHost/metricsPort): {e}")
        })?),
    };
    check_user(&config)?;
    send(
        socket,
        Reply::Prepared {
            pid: std::process::id(),
            build: crate::version::label().to_string(),
        },
    )
    .await
    .map_err(|e| format!("cannot answer the hello: {e}"))?;

    // The connections, then the state.
    let mut checking = Vec::new();
    let mut received = 0;
    let state = loop {
        let f = reader
            .next(socket)
            .await
            .map_err(|e| format!("handover socket: {e}"))?
            .ok_or("the running process closed the handover socket")?;
        match Kind::from_u8(f.kind) {
            Some(Kind::Batch) => {
                // Checked as they come, on the blocking pool (in parallel with reading the next
                // batches), while the old process collects the rest.
                let batch = Batch::decode(&f.payload, f.fds).map_err(|e| e.to_string())?;
                let (first, zero_copy) = (received, config.zero_copy);
                received += batch.connections.len();
                checking.push(tokio::task::spawn_blocking(move || {
                    let records = batch.connections.into_iter().enumerate();
                    records
                        .map(|(i, record)| {
                            Checked::new(record, zero_copy)
                                .map_err(|e| format!("connection {}: {e}", first + i))
                        })
                        .collect::<Result<Vec<_>, String>>()
                }));
            }
            Some(Kind::State) => break State::decode(&f.payload).map_err(|e| e.to_string())?,
            _ => return Err(format!("unexpected message of kind {}", f.kind)),
        }
    };
    let (shared, held) = Shared::restored(&state).map_err(|e| format!("state: {e}"))?;
    let mut connections = Vec::with_capacity(received);
    for batch in checking {
        let checked = batch
            .await
            .map_err(|e| format!("checking connections: {e}"))??;
        connections.extend(checked.into_iter().map(|c| c.on(&shared)));
    }
    Ok(Ready {
        old_pid: hello.pid,
        old_build: hello.build,
        config,
        listener,
        moved,
        metrics,
        shared,
        held,
        connections,
        state,
    })
}

/// Checks every record and registers its sockets here, on their targets in `shared`.
pub(super) fn resume_all(
    records: Vec<handover::Connection<OwnedFd>>,
    shared: &Shared,
    config: &Config,
) -> Result<Vec<Resumed>, String> {
    records
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            Checked::new(r, config.zero_copy)
                .map(|c| c.on(shared))
                .map_err(|e| format!("connection {i}: {e}"))
        })
        .collect()
}

impl Ready {
    /// The commit came: accept, relay, serve metrics; follow the old process to its end.
    async fn start(
        self,
        socket: UnixStream,
        reader: frame::Reader,
    ) -> Result<(Arc<Server>, Option<Admin>), i32> {
        let keepalive = self.config.tcp_keepalive;
        let server = match Server::start_with(self.config, self.listener, self.shared) {
            Ok(server) => Arc::new(server),
            Err(e) => {
                tracing::error!("upgrade: committed, but cannot serve: {e}");
                return Err(1);
            }
        };
        let proxy = server.proxy().clone();
        let connections = self.connections.len();
        for connection in self.connections {
            tokio::spawn(proxy.clone().resume(connection));
        }
        drop(self.held);
        proxy
            .shared
            .stats
            .upgrades_success
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(moved) = self.moved {
            match server.replace_listener(moved, keepalive.as_ref()).await {
                Ok(addr) => {
                    tracing::info!(%addr, "upgrade: listener moved (sourceHost/sourcePort)")
                }
                Err(e) => tracing::error!("upgrade: cannot listen on the new address: {e}"),
            }
        }
        let admin = match self.metrics {
            Some(listener) => match admin::start_on(listener, server.clone()) {
                Ok(admin) => Some(admin),
                Err(e) => {
                    tracing::error!("upgrade: cannot serve metrics: {e}");
                    None
                }
            },
            None => None,
        };
        tracing::info!(
            old = self.old_pid, old_version = %self.old_build, connections,
            listen = %server.local_addr(),
            "stickylb {} took over from process {} ({}): {connections} connections, the \
             sessions, deactivation windows and counters", crate::version::label(),
            self.old_pid, self.old_build
        );
        tokio::spawn(follow(socket, reader, proxy, self.state));
        Ok((server, admin))
    }
}

/// After the commit: takes up the connections the old process hands over late, and adds its
/// final counts, until it closes the socket (it exits).
async fn follow(socket: UnixStream, mut reader: frame::Reader, proxy: Arc<Proxy>, state: State) {
    while let Ok(Some(f)) = reader.next(&socket).await {
        match Kind::from_u8(f.kind) {
            Some(Kind::Batch) => {
                let taken = Batch::decode(&f.payload, f.fds)
                    .map_err(|e| e.to_string())
                    .and_then(|batch| {
                        let seq = batch.seq;
                        let config = proxy.config();
                        resume_all(batch.connections, &proxy.shared, &config).map(|c| (seq, c))
                    });
                let reply = match taken {
                    Ok((seq, connections)) => {
                        for connection in connections {
                            tokio::spawn(proxy.clone().resume(connection));
                        }
                        Reply::Taken { seq }
                    }
                    // The old process keeps them.
                    Err(e) => Reply::Refused(e),
                };
                if send(&socket, reply).await.is_err() {
                    break;
                }
            }
            Some(Kind::Final) => match State::decode(&f.payload) {
                Ok(last) => proxy.shared.add_growth(&state, &last),
                Err(e) => tracing::warn!("upgrade: the old process's final counts: {e}"),
            },
            _ => tracing::warn!(
                kind = f.kind,
                "upgrade: unexpected message after the commit"
            ),
        }
    }
    tracing::debug!("upgrade: the old process is gone");
}

/// A listening TCP socket handed over.
fn tcp_listener(fd: OwnedFd) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::from(fd);
    let ok = socket.r#type()? == socket2::Type::STREAM
        && socket.protocol()? == Some(socket2::Protocol::TCP)
        && socket.is_listener()?;
    if !ok {
        return Err(std::io::Error::other("not a listening TCP socket"));
    }
    Ok(socket.into())
}

/// Whether a bound address is the configured one (a configured port 0 takes any).
fn same_address(bound: SocketAddr, configured: SocketAddr) -> bool {
    bound.ip() == configured.ip() && (bound.port() == configured.port() || configured.port() == 0)
}

/// Binds a changed `sourceHost`/`sourcePort` beside the handed-over listener (as a reload
/// does: on the same port, beside ours).
fn bind_moved(addr: SocketAddr, handed: SocketAddr) -> Result<std::net::TcpListener, String> {
    match sockets::bind(addr) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && addr.port() == handed.port() => {
            sockets::bind_beside(addr)
        }
        other => other,
    }
    .map_err(|e| format!("cannot listen on {addr} (sourceHost/sourcePort changed): {e}"))
}

/// `downgradeToUser`: the running process switched already, and this one runs as its user;
/// anything else needs privileges it no longer has.
fn check_user(config: &Config) -> Result<(), String> {
    let Some(spec) = &config.downgrade_to_user else {
        return Ok(());
    };
    let user = crate::sys::lookup_user(spec).map_err(|e| format!("downgradeToUser: {e}"))?;
    // SAFETY: geteuid has no failure.
    if unsafe { libc::geteuid() } == user.uid {
        return Ok(());
    }
    crate::sys::drop_privileges(&user)
        .map_err(|e| format!("cannot switch to user {spec:?} (downgradeToUser): {e}"))
}

/// Logs which keys this process's config changes against the running one's.
fn log_changes(running: &str, config: &Config) {
    let running: serde_json::Value = serde_json::from_str(running).unwrap_or_default();
    let loaded = config.effective_json();
    let (Some(running), Some(loaded)) = (running.as_object(), loaded.as_object()) else {
        return;
    };
    let mut changed: Vec<&str> = loaded
        .iter()
        .filter(|(k, v)| running.get(*k) != Some(v))
        .map(|(k, _)| k.as_str())
        .collect();
    changed.extend(
        running
            .keys()
            .filter(|k| !loaded.contains_key(*k))
            .map(String::as_str),
    );
    if changed.is_empty() {
        tracing::info!("upgrade: the config file is the running config");
    } else {
        tracing::info!(
            keys = %changed.join(", "),
            "upgrade: the config file differs from the running config; the new process applies it"
        );
    }
}

async fn send(socket: &UnixStream, reply: Reply) -> std::io::Result<()> {
    let (kind, bytes) = reply.encode();
    frame::send(socket, kind as u8, &bytes, &[]).await
}

async fn refuse(socket: &UnixStream, reason: &str) {
    let _ = send(socket, Reply::Refused(reason.to_string())).await;
}
