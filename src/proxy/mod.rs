//! Proxying: the listener, one handler per client connection, and the data path.
//!
//! - [`listener`]: binds the listening socket and runs the accept loop.
//! - [`connect`]: connect to a target with a timeout; socket options for both sides.
//! - [`own_sockets`]: the local addresses of stickylb's own outgoing sockets, so that a target
//!   that loops back into the listener is refused at its first turn.
//! - [`relay`]: both directions of one connection, half-close and reset semantics.
//! - `splice` (Linux) and [`copy`]: the two ways one direction moves bytes.
//!
//! [`Proxy`] holds what every connection needs: the `ArcSwap` store of the current
//! [`Balancer`] (one load per connection, so a connection sees all of one config) and the
//! [`Shared`] state that outlives reloads.
//!
//! No client byte is read before a target has connected: until then the bytes wait in the
//! kernel's receive buffer. That is why a connect can be retried on another target without the
//! client noticing, and why there is no per-connection buffer to size (`maxBufferSize`).

pub mod admission;
pub mod connect;
pub mod copy;
pub mod listener;
pub mod own_sockets;
pub mod relay;
mod snapshot;
#[cfg(target_os = "linux")]
pub mod splice;

pub use snapshot::{Snapshot, TargetSnapshot};

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::balance::{Balancer, Shared};
use crate::config::Config;
use crate::counters::Reject;
use crate::sockets;
use admission::{derived_max_connections, ClientCounts, ClientSlot, RefusalLog};

/// Everything a connection handler reads.
#[derive(Debug)]
pub struct Proxy {
    /// The current config generation. Swapped whole by a reload.
    pub store: ArcSwap<Balancer>,
    /// State that outlives config generations.
    pub shared: Shared,
    /// Woken when the last open connection closes (graceful shutdown waits on it).
    drained: Notify,
    /// Open connections per client address, for `maxConnectionsPerClient`.
    pub clients: ClientCounts,
    /// Rate limit for the log lines of refused connections.
    refusals: RefusalLog,
    /// `maxConnections` when the config leaves it at 0: derived from the fd limit at start.
    derived_max_connections: u64,
    /// Local addresses of live connections to targets: a client connecting from one of them
    /// is stickylb itself (a target that loops back), refused as `loop`.
    own: own_sockets::OwnSockets,
}

impl Proxy {
    pub fn new(config: Config) -> Arc<Proxy> {
        let shared = Shared::new();
        let balancer = Balancer::new(config, &shared);
        Arc::new(Proxy {
            store: ArcSwap::from_pointee(balancer),
            shared,
            drained: Notify::new(),
            clients: ClientCounts::default(),
            refusals: RefusalLog::default(),
            derived_max_connections: derived_max_connections(crate::sys::fd_limit()),
            own: own_sockets::OwnSockets::new(crate::sys::fd_limit()),
        })
    }

    /// The config new connections use now.
    pub fn config(&self) -> Arc<Config> {
        self.store.load().config.clone()
    }

    /// Switches new connections to `config` in one atomic store. Open connections keep the
    /// generation they started with.
    pub fn swap(&self, config: Config) {
        let balancer = Balancer::new(config, &self.shared);
        self.store.store(Arc::new(balancer));
    }

    /// Client connections open now.
    pub fn active(&self) -> u64 {
        self.shared.stats.active.load(Ordering::Relaxed)
    }

    /// Waits until no client connection is open.
    pub async fn drained(&self) {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            // Register before checking, so a close between the check and the await is seen.
            notified.as_mut().enable();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// `maxConnections` in force for `config`.
    pub fn max_connections(&self, config: &Config) -> u64 {
        match config.max_connections {
            0 => self.derived_max_connections,
            max => max,
        }
    }

    /// Checks `allow`/`deny`, `maxConnections` and `maxConnectionsPerClient` (see
    /// [`admission`]). The open-connection count already includes this connection.
    fn admit(&self, config: &Config, ip: std::net::IpAddr) -> Result<ClientSlot<'_>, Reject> {
        if !config.admits(ip) {
            return Err(Reject::Denied);
        }
        if self.active() > self.max_connections(config) {
            return Err(Reject::Limit);
        }
        match config.max_connections_per_client {
            0 => Ok(ClientSlot::none()),
            max if self.clients.try_open(ip, max) => Ok(ClientSlot::held(&self.clients, ip)),
            _ => Err(Reject::ClientLimit),
        }
    }

    /// Closes a refused client at once with a reset, counts it, and logs it (rate-limited).
    fn refuse(&self, client: &TcpStream, reason: Reject, ip: std::net::IpAddr) {
        self.shared.stats.reject(reason);
        self.refusals
            .refused(reason, ip, self.shared.clock.now_ms());
        sockets::reset_on_close(client);
    }

    /// Serves one accepted client connection to the end.
    pub async fn handle(self: Arc<Self>, client: TcpStream, peer: SocketAddr) {
        let _open = OpenGuard::new(&self);
        let accepted = tokio::time::Instant::now();
        let balancer = self.store.load_full();
        let config = &balancer.config;
        let stats = &self.shared.stats;
        let client_ip = crate::addr::canonical_ip(peer.ip());
        if self.own.contains(peer) {
            self.refuse(&client, Reject::Loop, client_ip);
            return;
        }
        let _slot = match self.admit(config, client_ip) {
            Ok(slot) => slot,
            Err(reason) => {
                self.refuse(&client, reason, client_ip);
                return;
            }
        };
        let mut route = balancer.route(&self.shared, client_ip);
        let (server, _own) = loop {
            let target = route.target();
            let attempt = tokio::time::Instant::now();
            match connect::connect(target.addr, config.connect_timeout, &self.own).await {
                Ok(connected) => {
                    route.state().connect_duration.record(attempt.elapsed());
                    break connected;
                }
                // Our own shortage (no fd for the socket, no local port): the target is not to
                // blame, so it is not deactivated; the client is refused like any over-limit one.
                Err(error) if sockets::is_local_shortage(&error) => {
                    self.refuse(&client, Reject::Limit, client_ip);
                    return;
                }
                Err(error) => {
                    tracing::warn!(
                        target_id = %target.id, address = %target.addr, %error,
                        deactivated_ms = config.target_deactivation.as_millis() as u64,
                        "connect to target failed; deactivating it and retrying elsewhere"
                    );
                    if route.failed().is_none() {
                        self.refuse(&client, Reject::NoTarget, client_ip);
                        return;
                    }
                }
            }
        };
        // The client socket inherited TCP_NODELAY and SO_KEEPALIVE from the listener.
        sockets::tune(&server);
        let state = route.state();
        state.counters.connections.fetch_add(1, Ordering::Relaxed);
        state.active.fetch_add(1, Ordering::Relaxed);
        // The access log's duration counts from here (the connection proxied); read the clock
        // only when that log is on.
        let started = config.access_log.then(tokio::time::Instant::now);
        let to_target = relay::Meter::new(&state.counters.bytes_to_target);
        let to_client = relay::Meter::new(&state.counters.bytes_to_client);
        let result = relay::relay(
            &client,
            &server,
            config.zero_copy,
            config.idle_timeout,
            &to_target,
            &to_client,
        )
        .await;
        state.active.fetch_sub(1, Ordering::Relaxed);
        stats.connection_duration.record(accepted.elapsed());
        if let Err(error) = &result {
            // One side failed: reset both, so neither mistakes the cut for a clean end.
            sockets::reset_on_close(&client);
            sockets::reset_on_close(&server);
            tracing::debug!(client = %peer, target_id = %state.id, %error, "connection cut");
        }
        if config.access_log {
            tracing::info!(
                target: "stickylb::access",
                client = %peer,
                target_id = %state.id,
                bytes_to_target = to_target.bytes(),
                bytes_to_client = to_client.bytes(),
                duration_ms = started.map_or(0, |s| s.elapsed().as_millis() as u64),
                outcome = match result {
                    Ok(relay::Ended::Complete) => "closed",
                    Ok(relay::Ended::Idle) => "idle_timeout",
                    Err(_) => "reset",
                },
                "connection closed"
            );
        }
    }
}

/// Counts a client connection as open for as long as it lives.
struct OpenGuard<'a>(&'a Proxy);

impl<'a> OpenGuard<'a> {
    fn new(proxy: &'a Proxy) -> Self {
        proxy.shared.stats.active.fetch_add(1, Ordering::Relaxed);
        OpenGuard(proxy)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        if self.0.shared.stats.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.drained.notify_waiters();
        }
    }
}
