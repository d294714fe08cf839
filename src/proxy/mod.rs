//! Proxying: the listener, one handler per client connection, and the data path.
//!
//! - [`listener`]: binds the listening socket and runs the accept loop.
//! - [`admission`]: which accepted connections are served, and which are refused at once.
//! - [`connect`]: connect to a target with a timeout.
//! - [`own_sockets`]: the local addresses of stickylb's own outgoing sockets, so that a target
//!   that loops back into the listener is refused at its first turn.
//! - [`relay`]: both directions of one connection, half-close and reset semantics;
//!   `splice` (Linux) and [`copy`]: the two ways one direction moves bytes;
//!   `relay_socket`: the relay's hold on a socket, whose read interest it takes off the
//!   reactor while the direction reading it is blocked.
//! - [`cut`]: how a connection ended when it did not end cleanly (who failed, and how), and
//!   the shutdown deadline's signal.
//! - [`handoff`]: an upgrade's side of the data path: a connection leaves for a new process
//!   between two polls of its relay, or is taken up from an older one.
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
pub(crate) mod handoff;
mod header;
pub(crate) mod listener;
pub(crate) mod own_sockets;
pub(crate) mod relay;
mod relay_socket;
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
use handoff::{Handover, Proxied, Resumed, Verdict};
use own_sockets::{Held, OwnSockets};
use relay::{Ended, Meter, Relay};

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
    /// An upgrade collecting the connections of this process (see [`handoff`]).
    pub(crate) handover: Handover,
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
    /// A proxy for `config` over `shared` state (new, or an older process's after an upgrade).
    pub(crate) fn with_shared(config: Config, shared: Shared) -> Arc<Proxy> {
        let balancer = Balancer::new(config, &shared);
        Arc::new(Proxy {
            store: ArcSwap::from_pointee(balancer),
            shared,
            drained: Notify::new(),
            cut: CutSignal::default(),
            handover: Handover::default(),
            clients: ClientCounts::default(),
            refusals: RefusalLog::default(),
            derived_max_connections: derived_max_connections(crate::sys::fd_limit()),
            own: OwnSockets::new(crate::sys::fd_limit()),
        })
    }

    /// Notes that a listener accepts clients on `port`, for the loop backstop.
    pub(crate) fn listening_on(&self, port: u16) {
        self.own.listening_on(port);
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

    /// Connections in their relay stage now (each counts in its target's open connections).
    pub(crate) fn relaying(&self) -> u64 {
        let states = self.shared.registry.all();
        states
            .iter()
            .map(|s| s.active.load(Ordering::Relaxed))
            .sum()
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
        let client_guard = ResetOnDrop::new(&client);
        let accepted = Instant::now();
        let generation = self.store.load_full();
        let config = &generation.config;
        // A connection from one of our own outgoing sockets: a target leads back into the
        // listener (through DNS or NAT, beyond what the config check can see). Refused at its
        // first turn, so a loop costs one connection, not thousands.
        if self.own.catch_loop(peer, || client.local_addr().ok()) {
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
        let (server, own) = match connected {
            Ok(connected) => connected,
            Err(reason) => return self.refuse(reason, "", client_ip),
        };
        let server_guard = ResetOnDrop::new(&server);
        if let Some(version) = route.target().proxy_protocol {
            if let Err(error) = self.send_header(&client, &server, version, &who).await {
                tracing::debug!(client = %who.client, %error, "cannot send the PROXY header");
                self.after_a_loop(&own, route.state(), config);
                return;
            }
        }
        let target = route.state();
        let on_target = TargetOpen::new(target);
        let to_target = Meter::new(&target.counters.bytes_to_target);
        let to_client = Meter::new(&target.counters.bytes_to_client);
        // The access log's duration counts from here (the connection proxied); read the clock
        // only when that log is on.
        let proxied = Proxied {
            peer: who.client,
            target,
            pinned: route.pinned(),
            accepted,
            proxied: config.access_log.then(Instant::now),
        };
        let fresh = relay::Fresh {
            keepalive: config.tcp_keepalive.as_ref(),
            wrote: route.target().proxy_protocol.is_some(),
        };
        // The relay owns both sockets from here, and resets them unless they end cleanly.
        client_guard.hand_to_relay();
        server_guard.hand_to_relay();
        let mut relay = relay::relay(
            client,
            server,
            config.zero_copy,
            config.idle_timeout,
            fresh,
            &to_target,
            &to_client,
        );
        // Awaited here, not in a shared helper: each async layer a relay is moved through keeps
        // its own copy in the task, and the task is what an idle connection costs.
        let relayed = self.relay_stage(&mut relay, &proxied).await;
        let meters = [&to_target, &to_client];
        self.relayed(relayed, &mut relay, on_target, meters, &proxied, config);
        self.after_a_loop(&own, target, config);
    }

    /// After a connection to `target` ended: if our own listener refused it as a loop (the
    /// target leads back into stickylb through a name or a NAT rule the config check cannot
    /// see; `own_sockets.rs`), the target goes out of rotation for `targetDeactivationDuration`
    /// as one that refuses connects does, recorded as a reset (what the looped connection
    /// got), so that its clients move to the other targets instead of being reset one after
    /// another. The next pick after the window probes it again.
    fn after_a_loop(&self, own: &Held<'_>, target: &TargetState, config: &Config) {
        if !own.looped() {
            return;
        }
        let now = self.shared.clock.now_ms();
        if target.deactivate(now, config.target_deactivation, sockets::Fault::Reset) {
            tracing::warn!(
                target = %target.id,
                window = ?config.target_deactivation,
                "the target leads back into this listener (a loop through a name or a NAT \
                 rule): out of rotation for the deactivation window"
            );
        }
    }

    /// Serves a connection an older process handed over in an upgrade (see [`handoff`]) to
    /// the end, from where it stopped there: it counts as open, in its client's per-client
    /// count and session, and on its target, as it did there (without counting it again as a
    /// new connection to the target).
    pub(crate) async fn resume(self: Arc<Self>, resumed: Resumed) {
        let _open = OpenGuard::new(&self);
        let Resumed {
            client,
            server,
            peer,
            target,
            pinned,
            accepted,
            proxied,
            to_target,
            to_client,
            quiet,
            directions,
        } = resumed;
        // Registered with the reactor here, in the connection's own task (see `Resumed`).
        let (client, server) = match (TcpStream::from_std(client), TcpStream::from_std(server)) {
            (Ok(client), Ok(server)) => (client, server),
            (client, server) => {
                tracing::error!(
                    client = ?client.err(), target = ?server.err(),
                    "cannot register a handed-over connection; it is lost"
                );
                return;
            }
        };
        // Until the relay owns them: a reset if this handler is dropped before.
        let client_guard = ResetOnDrop::new(&client);
        let server_guard = ResetOnDrop::new(&server);
        let generation = self.store.load_full();
        let config = &generation.config;
        // The older process may have handed it over before its relay tuned the target socket
        // (see `relay::Fresh`); setting the options again is harmless.
        sockets::tune(&server, config.tcp_keepalive.as_ref());
        let _slot = match config.max_connections_per_client {
            0 => ClientSlot::none(),
            _ => {
                let ip = config.client_prefix.client(peer.ip());
                self.clients.open(ip);
                ClientSlot::held(&self.clients, ip)
            }
        };
        let hold = generation.hold(&self.shared, peer.ip(), target, pinned);
        let target = hold.target();
        let on_target = TargetOpen::resumed(target);
        let to_target = Meter::resumed(&target.counters.bytes_to_target, to_target);
        let to_client = Meter::resumed(&target.counters.bytes_to_client, to_client);
        let proxied = Proxied {
            peer,
            target,
            pinned,
            accepted,
            proxied,
        };
        // The relay owns both sockets from here, and resets them unless they end cleanly.
        client_guard.hand_to_relay();
        server_guard.hand_to_relay();
        let mut relay = relay::resume(
            client,
            server,
            directions,
            config.idle_timeout,
            quiet,
            &to_target,
            &to_client,
        );
        // Awaited here, not in a shared helper: each async layer a relay is moved through keeps
        // its own copy in the task, and the task is what an idle connection costs.
        let relayed = self.relay_stage(&mut relay, &proxied).await;
        let meters = [&to_target, &to_client];
        self.relayed(relayed, &mut relay, on_target, meters, &proxied, config);
    }

    /// Relays until the relay ends, the shutdown cut, or an upgrade takes the connection over
    /// (see [`handoff`]). An upgrade that fails hands the connection back, and it relays on
    /// from where it stopped.
    async fn relay_stage(&self, relay: &mut Relay<'_>, proxied: &Proxied<'_>) -> Relayed {
        let mut seen = 0;
        let mut staying = None;
        loop {
            tokio::select! {
                biased;
                _ = self.cut.wait() => {
                    return Relayed::Ended(Err(Cut::by_balancer(cut::How::Shutdown)));
                }
                () = self.handover.wait(&mut seen) => {
                    if relay.is_failing() {
                        staying.get_or_insert_with(|| self.handover.stay());
                        continue;
                    }
                    let (to_target, to_client) = relay.bytes();
                    let record = proxied.record(relay, to_target, to_client);
                    // Boxed: a hand-off is rare, and held inline its state would make every
                    // connection's task larger for its whole life (idle memory).
                    if Box::pin(self.handover.hand_off(record)).await == Verdict::Taken {
                        return Relayed::HandedOver;
                    }
                }
                result = &mut *relay => return Relayed::Ended(result),
            }
        }
    }

    /// The end of a relay stage: a connection that ended cleanly closes both sockets with a
    /// FIN; a cut one resets both, so neither peer mistakes it for a complete stream; one
    /// handed over closes this process's descriptors without touching the connection, which
    /// lives on in the new process. Then the accounting, except for a handed-over connection:
    /// it is not over. The sockets close when the relay is dropped, after this (it resets them
    /// unless it ended cleanly or was handed over).
    fn relayed(
        &self,
        relayed: Relayed,
        relay: &mut Relay<'_>,
        on_target: TargetOpen<'_>,
        [to_target, to_client]: [&Meter<'_>; 2],
        proxied: &Proxied<'_>,
        config: &Config,
    ) {
        let result = match relayed {
            Relayed::Ended(result) => result,
            Relayed::HandedOver => {
                relay.handed_over();
                tracing::trace!(client = %proxied.peer, "connection handed over");
                return;
            }
        };
        drop(on_target);
        self.account(Account {
            config,
            peer: proxied.peer,
            target: proxied.target,
            result: &result,
            to_target,
            to_client,
            accepted: proxied.accepted,
            proxied: proxied.proxied,
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
                    // listener; the target socket gets them from the relay (`relay::Fresh`).
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

/// How a relay stage ended.
enum Relayed {
    Ended(Result<Ended, Cut>),
    /// An upgrade took the connection over.
    HandedOver,
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

/// Makes the close of a socket a reset until the relay takes it over (the relay then does the
/// same for its whole life, see `Relay`): every cut, including one that drops the handler (a
/// panic, the runtime shutting down), reaches the peers as a reset.
struct ResetOnDrop<'a>(Option<&'a TcpStream>);

impl<'a> ResetOnDrop<'a> {
    fn new(stream: &'a TcpStream) -> Self {
        ResetOnDrop(Some(stream))
    }

    /// The relay takes the stream over, and resets it itself unless it ends cleanly.
    fn hand_to_relay(mut self) {
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
        TargetOpen::resumed(target)
    }

    /// A connection handed over by an older process: open, and counted in the total already.
    fn resumed(target: &'a TargetState) -> Self {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Each connection is one task holding this future for its whole life, so its size is
    /// most of the memory an idle connection costs (docs/benchmarks.md: RSS per held
    /// connection, goal ≤ 3 KiB). It was 1,080 bytes before the upgrade's hand-off joined the
    /// relay stage, then 2,152 (a relay moved through two more async layers, each keeping a
    /// copy), 1,312 since: a future that grows past the budget shows here first.
    #[tokio::test]
    async fn the_per_connection_future_stays_small() {
        let text = r#"{"sourcePort": 1, "targets": [{"host": "127.0.0.1", "port": 9}]}"#;
        let config = Config::parse(std::path::Path::new("t.json"), text).expect("valid");
        let proxy = Proxy::with_shared(config, Shared::new());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let peer = client.local_addr().unwrap();
        let handle = proxy.handle(client, peer);
        let size = std::mem::size_of_val(&handle);
        eprintln!("per-connection future: {size} bytes");
        assert!(
            size <= 1536,
            "the per-connection future is {size} bytes (budget 1,536)"
        );
    }
}
