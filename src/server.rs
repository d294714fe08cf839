//! A running balancer: listener, accept loop, session sweeper and graceful shutdown.
//!
//! [`Server::start`] takes an already-bound listener, so tests start a real balancer on
//! `127.0.0.1:0` inside their own runtime (as mini-redis's `run` does), and the binary binds
//! first, then drops privileges, then starts serving.
//!
//! The listener can be replaced while running ([`Server::replace_listener`], used when a reload
//! changes `sourceHost`/`sourcePort`): the new one is bound and accepting before the old one
//! closes, and connections accepted by the old one go on.
//!
//! Active health checks ([`crate::health`]) run beside it, one task per checked target; a
//! config swap ([`Server::swap`]) brings them in line with the new targets.
//!
//! Shutdown has two steps, as an operator expects of SIGTERM: [`Server::stop_accepting`]
//! closes the listener (new connects are refused by the kernel from then on), then
//! [`Server::drain`] waits for open connections to finish, up to a deadline.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::balance::Shared;
use crate::config::{Config, Keepalive};
use crate::health::Checks;
use crate::proxy::listener::{self, Stop};
use crate::proxy::{Proxy, Snapshot};
use crate::sockets;

/// Binds `addr` for a balancer to listen on (see [`Server::start`]): SO_REUSEADDR,
/// dual-stack for `::`, non-blocking, with a deep backlog.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    sockets::bind(addr)
}

/// How long [`Server::cut_all`] waits for the handlers it cut to close their sockets.
const CUT_WAIT: Duration = Duration::from_secs(2);

/// A balancer serving on one listener at a time.
#[derive(Debug)]
pub struct Server {
    proxy: Arc<Proxy>,
    /// The accept loop of the current listener; `None` once stopped.
    accept: Mutex<Option<AcceptLoop>>,
    /// Turns true at shutdown: stops the session sweeper, and tells a reload still running
    /// that it may change nothing any more.
    stopped: watch::Sender<bool>,
    /// The health-check tasks of the targets that have checks.
    health: Checks,
}

/// One listener's accept loop and the means to stop it.
#[derive(Debug)]
struct AcceptLoop {
    addr: SocketAddr,
    /// The listening socket, owned by the task; open as long as this loop is (see
    /// [`AcceptLoop::stop`]).
    fd: RawFd,
    stop: watch::Sender<Stop>,
    task: JoinHandle<()>,
}

impl AcceptLoop {
    fn start(
        listener: std::net::TcpListener,
        proxy: Arc<Proxy>,
        keepalive: Option<&Keepalive>,
    ) -> io::Result<AcceptLoop> {
        listener.set_nonblocking(true)?;
        sockets::inherit_to_accepted(&listener, keepalive)?;
        let listener = TcpListener::from_std(listener)?;
        let addr = listener.local_addr()?;
        let fd = listener.as_raw_fd();
        // Before the first accept: a target on this port could loop back (see `own_sockets`).
        proxy.listening_on(addr.port());
        let (stop, stopped) = watch::channel(Stop::Run);
        let task = tokio::spawn(listener::accept_loop(listener, proxy, stopped));
        Ok(AcceptLoop {
            addr,
            fd,
            stop,
            task,
        })
    }

    /// Stops accepting (see [`Stop`]) and waits until this descriptor of the listener is
    /// closed.
    async fn stop(self, how: Stop) {
        let _ = self.stop.send(how);
        let _ = self.task.await;
    }
}

impl Server {
    /// Starts serving `config` on `listener` (bound and listening, e.g. by
    /// [`crate::sockets::bind`]). Must be called inside a tokio runtime.
    pub fn start(config: Config, listener: std::net::TcpListener) -> io::Result<Server> {
        Server::start_with(config, listener, Shared::new())
    }

    /// Starts serving `config` on `listener` over `shared` state: an older process's, taken up
    /// by an upgrade (see `Shared::restored`).
    pub(crate) fn start_with(
        config: Config,
        listener: std::net::TcpListener,
        shared: Shared,
    ) -> io::Result<Server> {
        let keepalive = config.tcp_keepalive;
        let proxy = Proxy::with_shared(config, shared);
        let accept = AcceptLoop::start(listener, proxy.clone(), keepalive.as_ref())?;
        let (stopped, stopped_rx) = watch::channel(false);
        tokio::spawn(sweep_sessions(proxy.clone(), stopped_rx));
        let health = Checks::new(proxy.shared.clock);
        health.follow(&proxy.store.load());
        Ok(Server {
            proxy,
            accept: Mutex::new(Some(accept)),
            stopped,
            health,
        })
    }

    /// Switches new connections to `config` (one atomic store), then starts, restarts or stops
    /// health checks to match its targets.
    pub(crate) fn swap(&self, config: Config) {
        self.proxy.swap(config);
        self.health.follow(&self.proxy.store.load());
    }

    /// The address the current listener is bound to (the last one, once stopped).
    pub fn local_addr(&self) -> SocketAddr {
        self.lock_accept()
            .as_ref()
            .map(|a| a.addr)
            .unwrap_or_else(|| self.proxy.config().listen)
    }

    pub(crate) fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// The config new connections use now.
    pub fn config(&self) -> Arc<Config> {
        self.proxy.config()
    }

    /// Client connections open now.
    pub fn active(&self) -> u64 {
        self.proxy.active()
    }

    /// Waits until no client connection is open.
    pub async fn drained(&self) {
        self.proxy.drained().await
    }

    /// The balancer's counters and target states now (what the admin endpoint serves), with
    /// the address it accepts clients on.
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = self.proxy.snapshot();
        snapshot.listeners = self.lock_accept().iter().map(|a| a.addr).collect();
        snapshot
    }

    fn lock_accept(&self) -> std::sync::MutexGuard<'_, Option<AcceptLoop>> {
        self.accept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts accepting on `listener`, then closes the previous listener. Connections the old
    /// one accepted go on. Returns the new address. Once the server is stopping, refuses (and
    /// closes `listener`): a reload that finishes during the drain must not listen again.
    pub(crate) async fn replace_listener(
        &self,
        listener: std::net::TcpListener,
        keepalive: Option<&Keepalive>,
    ) -> io::Result<SocketAddr> {
        let new = AcceptLoop::start(listener, self.proxy.clone(), keepalive)?;
        let addr = new.addr;
        let (old, refused) = {
            let mut accept = self.lock_accept();
            // Checked under the lock `stop_accepting` takes after setting the flag, so either
            // it sees this listener and stops it, or this sees the flag.
            if self.is_stopping() {
                (None, Some(new))
            } else {
                (accept.replace(new), None)
            }
        };
        if let Some(refused) = refused {
            refused.stop(Stop::Close).await;
            return Err(io::Error::other("shutting down"));
        }
        if let Some(old) = old {
            old.stop(Stop::Close).await;
        }
        Ok(addr)
    }

    /// Another descriptor of the current listening socket (for an upgrade to hand over).
    pub(crate) fn clone_listener(&self) -> io::Result<std::net::TcpListener> {
        let accept = self.lock_accept();
        let current = accept
            .as_ref()
            .ok_or_else(|| io::Error::other("the balancer does not listen"))?;
        // SAFETY: as in `retune_listener`: the fd stays open while the lock is held.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(current.fd) };
        Ok(std::net::TcpListener::from(fd.try_clone_to_owned()?))
    }

    /// Stops accepting without closing the listening socket for others: connects wait in the
    /// backlog for the next process (an upgrade), or for [`Server::resume_accepting`]. Returns
    /// once this loop has stopped.
    pub(crate) async fn pause_accepting(&self) {
        let current = self.lock_accept().take();
        if let Some(current) = current {
            current.stop(Stop::Pause).await;
        }
    }

    /// Accepts on `listener` again after [`Server::pause_accepting`] (an upgrade that failed).
    pub(crate) fn resume_accepting(&self, listener: std::net::TcpListener) -> io::Result<()> {
        let keepalive = self.proxy.config().tcp_keepalive;
        let accept = AcceptLoop::start(listener, self.proxy.clone(), keepalive.as_ref())?;
        if let Some(old) = self.lock_accept().replace(accept) {
            // Not expected (the loop was paused); stopping it closes only its descriptor.
            tokio::spawn(old.stop(Stop::Close));
        }
        Ok(())
    }

    /// Sets the options accepted sockets inherit (`tcpKeepalive`) on the current listener, for
    /// a reload that changed them.
    pub(crate) fn retune_listener(&self, keepalive: Option<&Keepalive>) -> io::Result<()> {
        let accept = self.lock_accept();
        match &*accept {
            Some(current) => {
                // SAFETY: the fd is the listener of the accept loop held in `accept`, which
                // stays open while the lock is held (stopping takes the loop out of it first).
                let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(current.fd) };
                sockets::inherit_to_accepted(&fd, keepalive)
            }
            None => Ok(()),
        }
    }

    /// True once [`Server::stop_accepting`] (or [`Server::shutdown`]) has begun.
    pub fn is_stopping(&self) -> bool {
        *self.stopped.borrow()
    }

    /// Closes the listener: from now on new connects are refused; open connections go on.
    /// Returns once the listener is closed.
    pub async fn stop_accepting(&self) {
        self.stopped.send_replace(true);
        self.health.stop();
        let current = self.lock_accept().take();
        if let Some(current) = current {
            current.stop(Stop::Close).await;
        }
    }

    /// Waits up to `timeout` for open connections to finish. Returns true if all did.
    pub async fn drain(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.proxy.drained())
            .await
            .is_ok()
    }

    /// Stops accepting, then drains for the config's `shutdownTimeout`. Connections still
    /// open then are cut: reset on both sides, so no peer takes the cut for a complete stream.
    /// Returns true if all connections finished by themselves.
    pub async fn shutdown(&self) -> bool {
        self.stop_accepting().await;
        let timeout = self.proxy.config().shutdown_timeout;
        if self.drain(timeout).await {
            return true;
        }
        self.cut_all().await;
        false
    }

    /// Resets every open connection (both sides) and waits, briefly, until their handlers
    /// have closed them.
    pub async fn cut_all(&self) {
        self.proxy.cut_all();
        // Each handler resets and returns at its next poll; the bound is only a safeguard.
        let _ = tokio::time::timeout(CUT_WAIT, self.proxy.drained()).await;
    }
}

/// Removes expired sessions every `sessionExpiryInterval` (read from the current config at each
/// round, so a reload changes it).
async fn sweep_sessions(proxy: Arc<Proxy>, mut stopped: watch::Receiver<bool>) {
    loop {
        let config = proxy.config();
        tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => return,
            _ = tokio::time::sleep(config.session_expiry_interval) => {}
        }
        // A pass over every session (a million, at the cap) is CPU work that must not hold up
        // the worker threads' connections: it runs on the blocking pool, one shard lock at a
        // time.
        let expiry = config.session_expiry;
        let sweeper = proxy.clone();
        let swept = tokio::task::spawn_blocking(move || {
            let shared = &sweeper.shared;
            shared.sweep_sessions(expiry);
            // Removed targets whose last connection and session are gone: forget them.
            shared.registry.prune();
        });
        let _ = swept.await;
    }
}
