//! How a proxied connection ended when it did not end cleanly: who failed, and how.
//!
//! A stream that stickylb does not pass on whole is always reset on both sides (SO_LINGER 0),
//! so that no peer mistakes a cut for a complete stream. [`Cut`] says why, for the access log's
//! `outcome` and the debug log: the client or the target failed (reset, timeout, a write to a
//! peer that had closed), or stickylb itself cut (the idle timeout with bytes still in flight,
//! the shutdown deadline).
//!
//! [`CutSignal`] is the shutdown deadline's signal: every handler waits on it beside its
//! connect and its relay, so the deadline runs the same reset path as any other cut.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// Which end of a proxied connection failed, or stickylb itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Target,
    /// stickylb cut the connection (idle timeout with bytes in flight, shutdown deadline).
    Balancer,
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum How {
    /// The peer reset the connection.
    Reset,
    /// A write to a peer that had already closed (EPIPE).
    Closed,
    /// The peer stopped answering (a keepalive or retransmission timeout).
    Timeout,
    /// No byte moved either way for `idleTimeout`, with bytes still held by stickylb.
    Idle,
    /// `shutdownTimeout` passed with the connection still open.
    Shutdown,
    /// Any other error of the socket.
    Error,
}

/// A connection that did not end cleanly.
#[derive(Debug)]
pub(crate) struct Cut {
    pub(crate) side: Side,
    pub(crate) how: How,
    /// The OS error behind it, when there is one.
    pub(crate) error: Option<io::Error>,
}

impl Cut {
    /// `error` on the socket of `side`.
    pub(crate) fn io(side: Side, error: io::Error) -> Cut {
        let how = match error.kind() {
            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => How::Reset,
            io::ErrorKind::BrokenPipe | io::ErrorKind::NotConnected => How::Closed,
            io::ErrorKind::TimedOut => How::Timeout,
            _ => How::Error,
        };
        Cut {
            side,
            how,
            error: Some(error),
        }
    }

    /// stickylb's own cut.
    pub(crate) fn by_balancer(how: How) -> Cut {
        Cut {
            side: Side::Balancer,
            how,
            error: None,
        }
    }

    /// The access log's `outcome`: `client_reset`, `target_closed`, `idle_reset`, ...
    pub(crate) fn outcome(&self) -> &'static str {
        match (self.side, self.how) {
            (Side::Balancer, How::Idle) => "idle_reset",
            (Side::Balancer, How::Shutdown) => "shutdown_reset",
            (Side::Balancer, _) => "balancer_error",
            (Side::Client, How::Reset) => "client_reset",
            (Side::Client, How::Closed) => "client_closed",
            (Side::Client, How::Timeout) => "client_timeout",
            (Side::Client, _) => "client_error",
            (Side::Target, How::Reset) => "target_reset",
            (Side::Target, How::Closed) => "target_closed",
            (Side::Target, How::Timeout) => "target_timeout",
            (Side::Target, _) => "target_error",
        }
    }
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.outcome())?;
        if let Some(error) = &self.error {
            write!(f, ": {error}")?;
        }
        Ok(())
    }
}

/// The shutdown deadline, as every handler sees it: once [`CutSignal::cut`] is called, every
/// [`CutSignal::wait`] (running or future) completes.
#[derive(Debug, Default)]
pub(crate) struct CutSignal {
    cut: AtomicBool,
    notify: Notify,
}

impl CutSignal {
    /// Cuts every connection: their handlers reset both sides and end.
    pub(crate) fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Completes once [`CutSignal::cut`] has been called.
    pub(crate) async fn wait(&self) {
        // The future is made before the flag is read, so a cut between the two is not missed
        // (`notify_waiters` wakes every `Notified` made before it, polled or not).
        let notified = self.notify.notified();
        if self.cut.load(Ordering::SeqCst) {
            return;
        }
        notified.await;
    }
}
