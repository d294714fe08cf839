//! A running balancer: listener, accept loop, session sweeper and graceful shutdown.
//!
//! [`Server::start`] takes an already-bound listener, so tests start a real balancer on
//! `127.0.0.1:0` inside their own runtime (as mini-redis's `run` does), and the binary binds
//! first, then drops privileges, then starts serving.
//!
//! Shutdown has two steps, as an operator expects of SIGTERM: [`Server::stop_accepting`]
//! closes the listener (new connects are refused by the kernel from then on), then
//! [`Server::drain`] waits for open connections to finish, up to a deadline.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::balance::duration_ms;
use crate::config::Config;
use crate::proxy::{listener, Proxy};

/// A balancer serving on one listener.
#[derive(Debug)]
pub struct Server {
    proxy: Arc<Proxy>,
    local_addr: SocketAddr,
    /// Turns true to stop the accept loop and the sweeper.
    stop: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl Server {
    /// Starts serving `config` on `listener` (bound and listening, e.g. by
    /// [`listener::bind`]). Must be called inside a tokio runtime.
    pub fn start(config: Config, listener: std::net::TcpListener) -> io::Result<Server> {
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let local_addr = listener.local_addr()?;
        let proxy = Proxy::new(config);
        let (stop, stopped) = watch::channel(false);
        let accept = tokio::spawn(listener::accept_loop(
            listener,
            proxy.clone(),
            stopped.clone(),
        ));
        tokio::spawn(sweep_sessions(proxy.clone(), stopped));
        Ok(Server {
            proxy,
            local_addr,
            stop,
            accept,
        })
    }

    /// Binds `config.listen` and starts serving it.
    pub fn bind(config: Config) -> io::Result<Server> {
        let listener = listener::bind(config.listen)?;
        Server::start(config, listener)
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// Closes the listener: from now on new connects are refused; open connections go on.
    /// Returns once the listener is closed.
    pub async fn stop_accepting(&mut self) {
        let _ = self.stop.send(true);
        let _ = (&mut self.accept).await;
    }

    /// Waits up to `timeout` for open connections to finish. Returns true if all did.
    pub async fn drain(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.proxy.drained())
            .await
            .is_ok()
    }

    /// Stops accepting, then drains for the config's `shutdownTimeout`.
    pub async fn shutdown(mut self) -> bool {
        self.stop_accepting().await;
        let timeout = self.proxy.config().shutdown_timeout;
        self.drain(timeout).await
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
        let shared = &proxy.shared;
        let now = shared.clock.now_ms();
        shared
            .sessions
            .sweep(now, duration_ms(config.session_expiry));
    }
}
