//! Proxying: the listener, one handler per client connection, and the data path.
//!
//! - [`listener`]: binds the listening socket and runs the accept loop.
//! - [`admission`]: which accepted connections are served, and which are refused at once.
//! - [`connect`]: connect to a target with a timeout.
//! - [`own_sockets`]: the local addresses of stickylb's own outgoing sockets, so that a target
//!   that loops back into the listener is refused at its first turn.
//! - [`relay`]: both directions of one connection, half-close and reset semantics;
//!   `splice` (Linux) and [`copy`]: the two ways one direction moves bytes.
//! - [`cut`]: how a connection ended when it did not end cleanly (who failed, and how), and
//!   the shutdown deadline's signal.
//!
//! [`Proxy`] holds what every connection needs: the `ArcSwap` store of the current
//! [`Balancer`] (one load per connection, so a connection sees all of one config) and the
//! [`Shared`] state that outlives reloads.
//!
//! A connection's life is a pipeline, one step per function of [`Proxy`]: admit → identify the
//! client → route → connect with retry → relay → account and log.
//!
//! No client byte is read before a target has connected: until then the bytes wait in the
//! kernel's receive buffer. That is why a connect can be retried on another target without the
//! client noticing, and why there is no per-connection buffer to size (`maxBufferSize`).

pub(crate) mod admission;
pub(crate) mod connect;
pub(crate) mod copy;
pub(crate) mod cut;
mod header;
pub(crate) mod listener;
pub(crate) mod own_sockets;
pub(crate) mod relay;
mod snapshot;
#[cfg(target_os = "linux")]
pub(crate) mod splice;

pub use snapshot::{Snapshot, TargetSnapshot};

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::balance::target::TargetState;
use crate::balance::{Balancer, Route, Shared};
use crate::config::Config;
use crate::counters::Reject;
use crate::proxy_protocol::Header;
use crate::sockets;
use admission::{derived_max_connections, ClientCounts, ClientSlot, RefusalLog};
use cut::{Cut, CutSignal};
use own_sockets::{Held, OwnSockets};
use relay::{Ended, Meter};

/// Everything a connection handler reads.
#[derive(Debug)]
pub(crate) struct Proxy {
    /// The current config generation. Swapped whole by a reload.
    pub(crate) store: ArcSwap<Balancer>,
    /// State that outlives config generations.
    pub(crate) shared: Shared,
    /// Woken when the last open connection closes (graceful shutdown waits on it).
    drained: Notify,
    /// The shutdown deadline: every open connection is reset when it fires.
    cut: CutSignal,
    /// Open connections per client (address masked to `clientPrefix`), for
    /// `maxConnectionsPerClient`.
    clients: ClientCounts,
    /// Rate limit for the log lines of refused connections.
    refusals: RefusalLog,
    /// `maxConnections` when the config leaves it at 0: derived from the fd limit at start.
    derived_max_connections: u64,
    /// Local addresses of live connections to targets: a client connecting from one of them
    /// is stickylb itself (a target that loops back), refused as `loop`.
    own: OwnSockets,
}

impl Proxy {
    pub(crate) fn new(config: Config) -> Arc<Proxy> {
        let shared = Shared::new();
        let balancer = Balancer::new(config, &shared);
        Arc::new(Proxy {
            store: ArcSwap::from_pointee(balancer),
            shared,
            drained: Notify::new(),
            cut: CutSignal::default(),
            clients: ClientCounts::default(),
            refusals: RefusalLog::default(),
            derived_max_connections: derived_max_connections(crate::sys::fd_limit()),
            own: OwnSockets::new(crate::sys::fd_limit()),
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

    /// Resets every open connection now (the shutdown deadline): each handler runs the same
    /// reset path as for any other cut.
    pub(crate) fn cut_all(&self) {
        self.cut.cut();
    }

    /// Serves one accepted client connection to the end: limit → identify → admit → route →
    /// connect → relay → account. Each step that can refuse the client resets it at once and
    /// counts the reason.
    pub(crate) async fn handle(self: Arc<Self>, client: TcpStream, peer: SocketAddr) {
        let _open = OpenGuard::new(&self);
        // Until the connection ends cleanly, dropping the handler (a panic, the runtime shutting
        // down) resets the client rather than closing it with a FIN.
        let mut client_guard = ResetOnDrop::new(&client);
        let accepted = Instant::now();
        let generation = self.store.load_full();
        let config = &generation.config;
        // A connection from one of our own outgoing sockets: a target leads back into the
        // listener (through DNS or NAT, beyond what the config check can see). Refused at its
        // first turn, so a loop costs one connection, not thousands.
        if self.own.contains(peer) {
            return self.refuse(Reject::Loop, "", peer.ip());
        }
        if self.active() > self.max_connections(config) {
            return self.refuse(Reject::Limit, "", peer.ip());
        }
        let identified = tokio::select! {
            biased;
            _ = self.cut.wait() => return,
            identified = self.identify(config, &client, peer) => identified,
        };
        let who = match identified {
            Ok(who) => who,
            Err(error) => return self.refuse(Reject::ProxyHeader, error.reason(), peer.ip()),
        };
        let client_ip = who.client.ip();
        let _slot = match self.admit(config, client_ip) {
            Ok(slot) => slot,
            Err(reason) => return self.refuse(reason, "", client_ip),
        };
        let mut route = generation.route(&self.shared, client_ip);
        let connected = tokio::select! {
            biased;
            _ = self.cut.wait() => return,
            connected = self.connect(&mut route, config) => connected,
        };
        let (server, _own) = match connected {
            Ok(connected) => connected,
            Err(reason) => return self.refuse(reason, "", client_ip),
        };
        let mut server_guard = ResetOnDrop::new(&server);
        if let Some(version) = route.target().proxy_protocol {
            if let Err(error) = self.send_header(&client, &server, version, &who).await {
                tracing::debug!(client = %who.client, %error, "cannot send the PROXY header");
                return;
            }
        }
        let target = route.state();
        let _on_target = TargetOpen::new(target);
        let to_target = Meter::new(&target.counters.bytes_to_target);
        let to_client = Meter::new(&target.counters.bytes_to_client);
        // The access log's duration counts from here (the connection proxied); read the clock
        // only when that log is on.
        let proxied = config.access_log.then(Instant::now);
        let result = tokio::select! {
            biased;
            _ = self.cut.wait() => Err(Cut::by_balancer(cut::How::Shutdown)),
            result = relay::relay(
                &client,
                &server,
                config.zero_copy,
                config.idle_timeout,
                &to_target,
                &to_client,
            ) => result,
        };
        if result.is_ok() {
            client_guard.disarm();
            server_guard.disarm();
        }
        // Otherwise, cut: both are reset when the guards drop, so neither peer mistakes it for a
        // complete stream.
        drop((client_guard, server_guard));
        drop(_on_target);
        self.account(Account {
            config,
            peer: who.client,
            target,
            result: &result,
            to_target: &to_target,
            to_client: &to_client,
            accepted,
            proxied,
        });
    }

    /// Who the client is: the peer, or, on a connection from a trusted upstream
    /// (`acceptProxyProtocol`), the client its PROXY header names (the header is required
    /// there, within `proxyHeaderTimeout`, and consumed; nothing after it is read). That client
    /// is the one for the hash, sessions, `allow`/`deny`, the per-client limit, the access log
    /// and the header sent on.
    async fn identify(
        &self,
        config: &Config,
        client: &TcpStream,
        peer: SocketAddr,
    ) -> Result<Identity, header::HeaderError> {
        let canonical = SocketAddr::new(crate::addr::canonical_ip(peer.ip()), peer.port());
        let own = Identity {
            client: canonical,
            destination: None,
        };
        if !config.trusts_proxy_header(peer.ip()) {
            return Ok(own);
        }
        let timeout = config.proxy_header_timeout;
        match tokio::time::timeout(timeout, header::read(client)).await {
            Ok(Ok(Header::Proxied { client, server })) => Ok(Identity {
                client,
                destination: Some(server),
            }),
            // The upstream's own connection (its health check): its own address.
            Ok(Ok(Header::Local)) => Ok(own),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(header::HeaderError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no complete PROXY header within proxyHeaderTimeout",
            ))),
        }
    }

    /// Writes the PROXY header to a fresh target connection: the client, and the address it
    /// connected to (the one an accepted header named, else this connection's own).
    async fn send_header(
        &self,
        client: &TcpStream,
        server: &TcpStream,
        version: crate::proxy_protocol::Version,
        who: &Identity,
    ) -> std::io::Result<()> {
        let destination = match who.destination {
            Some(destination) => destination,
            None => client.local_addr()?,
        };
        header::write(server, version, who.client, destination).await
    }

    /// Checks `allow`/`deny` (on the full address `ip`) and `maxConnectionsPerClient` (per
    /// client: `ip` masked to `clientPrefix`, as the hash and the sessions count clients) for
    /// the identified client (see [`admission`]).
    fn admit(&self, config: &Config, ip: IpAddr) -> Result<ClientSlot<'_>, Reject> {
        if !config.admits(ip) {
            return Err(Reject::Denied);
        }
        match config.max_connections_per_client {
            0 => Ok(ClientSlot::none()),
            max => {
                let client = config.client_prefix.client(ip);
                if self.clients.try_open(client, max) {
                    Ok(ClientSlot::held(&self.clients, client))
                } else {
                    Err(Reject::ClientLimit)
                }
            }
        }
    }

    /// Connects to the route's target, and on failure deactivates it and tries the next one,
    /// until one connects or the route gives up. The connection's local address stays in the
    /// own-sockets table while the returned [`Held`] lives.
    async fn connect(
        &self,
        route: &mut Route<'_>,
        config: &Config,
    ) -> Result<(TcpStream, Held<'_>), Reject> {
        loop {
            let target = route.target();
            let attempt = Instant::now();
            match connect::connect(target.addr, config.connect_timeout, &self.own).await {
                Ok((server, held)) => {
                    route.state().connect_duration.record(attempt.elapsed());
                    // The client socket inherited TCP_NODELAY and SO_KEEPALIVE from the
                    // listener; the target socket gets them here.
                    sockets::tune(&server, config.tcp_keepalive.as_ref());
                    return Ok((server, held));
                }
                // Our own shortage (no fd for the socket, no local port): the target is not to
                // blame, so it is not deactivated; the client is refused like any over-limit one.
                Err(error) if sockets::is_local_shortage(&error) => return Err(Reject::Limit),
                Err(error) => {
                    tracing::warn!(
                        target_id = %target.id, address = %target.addr, %error,
                        deactivated_ms = config.target_deactivation.as_millis() as u64,
                        "connect to target failed; deactivating it and retrying elsewhere"
                    );
                    // The reason, as a small enum (the status page shows the last one).
                    if route.failed(sockets::Fault::of(&error)).is_none() {
                        return Err(Reject::NoTarget);
                    }
                }
            }
        }
    }

    /// Counts a refused client and logs it (rate-limited), with `detail` where the reason
    /// alone does not say enough. The handler then returns, and its guard closes the client
    /// with a reset at once.
    fn refuse(&self, reason: Reject, detail: &'static str, ip: IpAddr) {
        self.shared.stats.reject(reason);
        self.refusals
            .refused(reason, detail, ip, self.shared.clock.now_ms());
    }

    /// The end of a proxied connection: its duration, a debug line for a cut, and the access
    /// log line.
    fn account(&self, a: Account<'_>) {
        self.shared
            .stats
            .connection_duration
            .record(a.accepted.elapsed());
        if let Err(cut) = a.result {
            tracing::debug!(client = %a.peer, target_id = %a.target.id, %cut, "connection cut");
        }
        if a.config.access_log {
            tracing::info!(
                target: "stickylb::access",
                client = %a.peer,
                target_id = %a.target.id,
                bytes_to_target = a.to_target.bytes(),
                bytes_to_client = a.to_client.bytes(),
                duration_ms = a.proxied.map_or(0, |s| s.elapsed().as_millis() as u64),
                outcome = match a.result {
                    Ok(Ended::Complete) => "closed",
                    Ok(Ended::Idle) => "idle_timeout",
                    Err(cut) => cut.outcome(),
                },
                "connection closed"
            );
        }
    }
}

/// Who a connection is for.
struct Identity {
    /// The client: the peer, or the one a trusted upstream's PROXY header named.
    client: SocketAddr,
    /// The address the client connected to, when a PROXY header said so.
    destination: Option<SocketAddr>,
}

/// What [`Proxy::account`] reports of one connection.
struct Account<'a> {
    config: &'a Config,
    peer: SocketAddr,
    target: &'a TargetState,
    result: &'a Result<Ended, Cut>,
    to_target: &'a Meter<'a>,
    to_client: &'a Meter<'a>,
    accepted: Instant,
    proxied: Option<Instant>,
}

/// Makes the close of a socket a reset unless the connection ended cleanly: every cut,
/// including one that drops the handler, reaches the peers as a reset.
struct ResetOnDrop<'a>(Option<&'a TcpStream>);

impl<'a> ResetOnDrop<'a> {
    fn new(stream: &'a TcpStream) -> Self {
        ResetOnDrop(Some(stream))
    }

    /// The stream ended cleanly: close it normally.
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for ResetOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(stream) = self.0 {
            sockets::reset_on_close(stream);
        }
    }
}

/// Counts a connection to a target (total and open) for as long as it lives.
struct TargetOpen<'a>(&'a TargetState);

impl<'a> TargetOpen<'a> {
    fn new(target: &'a TargetState) -> Self {
        target.counters.connections.fetch_add(1, Ordering::Relaxed);
        target.active.fetch_add(1, Ordering::Relaxed);
        TargetOpen(target)
    }
}

impl Drop for TargetOpen<'_> {
    fn drop(&mut self) {
        self.0.connection_closed();
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
