//! The old process's side of an upgrade: start the new process, hand it the listeners, the
//! connections and the state, and commit only once it says it is ready; undo everything
//! otherwise (see the module doc of `super` for the whole protocol).
//!
//! Nothing is stopped before the new process has started, read the hello, loaded its config
//! and taken the listeners (`prepared`). From then on what is stopped is recorded in a
//! [`Rollback`] guard, whose drop undoes it unless the attempt committed: the listener accepts
//! again, the metrics endpoint serves again, the connections relay on from where they stopped,
//! and the new process is killed. Dropping the attempt's future (a SIGTERM during an upgrade)
//! runs the same undo.

use std::os::fd::{AsRawFd, RawFd};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::admin::{self, Admin};
use crate::handover::{self, frame, Batch, Hello, Kind, Reply, Role};
use crate::proxy::handoff::{Handoff, Verdict};
use crate::server::Server;

use super::spawn;

/// How long the new process may take to start, load its config and take the listeners.
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the connections in the relay stage may take to stop and report; those that have
/// not by then (none should be slower than a poll) are handed over late.
pub const COLLECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long the new process may take to read and check the connections and the state.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a batch sent after the commit may take to be taken up.
const LATE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a failed send waits for the refusal the new process may have sent before it went.
const REFUSAL_WAIT: Duration = Duration::from_millis(500);

/// How often the collection looks whether every relaying connection has reported.
const COLLECT_TICK: Duration = Duration::from_millis(1);

/// The payload a batch is flushed at (besides [`frame::MAX_FDS`] descriptors).
const BATCH_BYTES: usize = 4 << 20;

/// What an attempt needs of the process.
pub(super) struct Parts<'a> {
    pub(super) server: &'a Arc<Server>,
    pub(super) admin: &'a Mutex<Option<Admin>>,
}

/// A committed upgrade: what the old process keeps to finish (see [`Handed::retire`]).
#[derive(Debug)]
pub(super) struct Handed {
    pub(super) pid: u32,
    pub(super) build: String,
    /// Connections handed over.
    pub(super) connections: usize,
    /// From the signal to the commit.
    pub(super) took: Duration,
    socket: UnixStream,
    reader: frame::Reader,
    handoffs: mpsc::UnboundedReceiver<Handoff>,
    /// The next batch's sequence number.
    seq: u32,
    /// Connections handed over after the commit.
    late_connections: usize,
}

/// One attempt, from the signal (`signalled`) to the commit.
pub(super) async fn attempt(parts: Parts<'_>, signalled: Instant) -> Result<Handed, String> {
    let server = parts.server;
    let mut rollback = Rollback::new(parts.server, parts.admin);
    let listener = server
        .clone_listener()
        .map_err(|e| format!("cannot hand over the listener: {e}"))?;
    let admin_listener = {
        let admin = parts.admin.lock().unwrap_or_else(|p| p.into_inner());
        admin.as_ref().map(Admin::clone_listener).transpose()
    }
    .map_err(|e| format!("cannot hand over the metrics listener: {e}"))?;

    // Start the new process.
    let exe = spawn::exe().map_err(|e| format!("cannot start a new process: {e}"))?;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| format!("cannot make the handover socket: {e}"))?;
    // A binary just written may still be open for writing in a process that forked meanwhile
    // (until its exec): that is ETXTBSY, and passes.
    let mut tries = 0;
    let child = loop {
        match spawn::spawn(&exe, &theirs) {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 20 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => break other.map_err(|e| format!("cannot start {}: {e}", exe.display()))?,
        }
    };
    drop(theirs);
    let child_pid = child.id();
    rollback.child = Some(child);
    tracing::info!(
        pid = child_pid, binary = %exe.display(),
        "upgrade: started the new process; handing over"
    );
    let socket = ours
        .set_nonblocking(true)
        .and_then(|()| UnixStream::from_std(ours))
        .map_err(|e| format!("handover socket: {e}"))?;
    let mut reader = frame::Reader::new();

    // The hello: listeners, config.
    let config = server.config();
    let mut listeners: Vec<(Role, RawFd)> = vec![(Role::Balancer, listener.as_raw_fd())];
    if let Some(admin) = &admin_listener {
        listeners.push((Role::Admin, admin.as_raw_fd()));
    }
    let hello = Hello {
        version: handover::VERSION,
        min_reader: handover::MIN_READER,
        pid: std::process::id(),
        build: crate::version::label().to_string(),
        exe: exe.clone(),
        config_path: config.path.clone(),
        config_text: serde_json::to_string(&config.effective_json()).unwrap_or_default(),
        listeners,
    };
    if let Err(e) = send(&socket, Kind::Hello, hello.encode()).await {
        return Err(rollback.send_failed(e, &socket, &mut reader).await);
    }
    let build = match within(
        PREPARE_TIMEOUT,
        "start",
        reply(&socket, &mut reader, &mut rollback),
    )
    .await?
    {
        Reply::Prepared { build, .. } => build,
        other => return Err(format!("the new process answered {other:?} to the hello")),
    };
    let prepared = signalled.elapsed();

    // The metrics endpoint stops (the scrapes it is answering finish; new ones wait in the
    // backlog for the new process): no scrape shows a count the state below does not hold.
    let admin = parts.admin.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(admin) = admin {
        rollback.admin_listener = admin_listener;
        // Dropping it joins its thread: off the worker threads.
        let _ = tokio::task::spawn_blocking(move || drop(admin)).await;
    }

    // The connections: every relay stops between two polls and reports.
    let proxy = server.proxy();
    let still_from = Instant::now();
    let mut handoffs = proxy.handover.begin();
    rollback.collecting = true;
    let mut collected = Collected::default();
    let collecting = collect(&socket, &mut reader, &mut handoffs, server, &mut collected).await;
    if let Err(e) = collecting {
        return Err(rollback.send_failed(e, &socket, &mut reader).await);
    }
    let collecting = signalled.elapsed() - prepared;

    // A quiet moment: no accept, no scrape, no byte moving in a collected connection; the
    // state read now is what the new process starts from.
    let paused_from = Instant::now();
    server.pause_accepting().await;
    rollback.paused = Some(listener);
    let state = proxy.shared.export();
    if let Err(e) = send(&socket, Kind::State, state.encode()).await {
        return Err(rollback.send_failed(e, &socket, &mut reader).await);
    }
    match within(
        READY_TIMEOUT,
        "get ready",
        reply(&socket, &mut reader, &mut rollback),
    )
    .await?
    {
        Reply::Ready { .. } => {}
        other => return Err(format!("the new process answered {other:?} to the state")),
    }

    // The commit: from here the new process relays and accepts; this one lets go.
    if let Err(e) = frame::send(&socket, Kind::Commit as u8, &[], &[]).await {
        return Err(rollback.send_failed(e, &socket, &mut reader).await);
    }
    rollback.commit();
    let connections = collected.verdicts.len();
    for verdict in collected.verdicts {
        let _ = verdict.send(Verdict::Taken);
    }
    let took = signalled.elapsed();
    tracing::info!(
        pid = child_pid,
        connections,
        prepare_ms = millis(prepared),
        collect_ms = millis(collecting),
        // The longest a handed-over connection stood still, and how long nobody accepted.
        still_ms = millis(still_from.elapsed()),
        no_accept_ms = millis(paused_from.elapsed()),
        total_ms = millis(took),
        "upgrade: process {child_pid} ({build}) took over {connections} connections, {} ms after \
         the signal",
        millis(took)
    );
    Ok(Handed {
        pid: child_pid,
        build,
        connections,
        took,
        socket,
        reader,
        handoffs,
        seq: collected.batches,
        late_connections: 0,
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What the collection gathered.
#[derive(Default)]
pub(super) struct Collected {
    pub(super) verdicts: Vec<oneshot::Sender<Verdict>>,
    batches: u32,
}

/// Receives handoffs and sends them in batches, until every connection in its relay stage has
/// reported (handed off, or staying because it is failing), or [`COLLECT_TIMEOUT`]. The new
/// process says nothing meanwhile unless it refuses: any message from it ends the collection
/// with an error (the caller reads it).
pub(super) async fn collect(
    socket: &UnixStream,
    reader: &mut frame::Reader,
    handoffs: &mut mpsc::UnboundedReceiver<Handoff>,
    server: &Server,
    collected: &mut Collected,
) -> std::io::Result<()> {
    let proxy = server.proxy();
    let deadline = Instant::now() + COLLECT_TIMEOUT;
    let mut pending = Pending::default();
    let mut next = None;
    loop {
        while let Some(handoff) = next.take().or_else(|| handoffs.try_recv().ok()) {
            if !pending.fits(&handoff) {
                flush(socket, &mut pending.take(), collected, false).await?;
            }
            pending.push(handoff);
        }
        if !pending.is_empty() {
            flush(socket, &mut pending.take(), collected, false).await?;
        }
        let reported = collected.verdicts.len() as u64 + proxy.handover.staying();
        if reported >= proxy.relaying() {
            return Ok(());
        }
        tokio::select! {
            handoff = handoffs.recv() => match handoff {
                Some(handoff) => next = Some(handoff),
                None => return Ok(()),
            },
            _ = tokio::time::sleep(COLLECT_TICK) => {}
            // Cancel-safe: what was read stays in the reader for the caller.
            read = reader.fill(socket) => {
                return Err(match read {
                    Ok(0) => std::io::ErrorKind::BrokenPipe.into(),
                    Ok(_) => std::io::Error::other("the new process spoke during the collection"),
                    Err(e) => e,
                });
            }
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(
                    reported, relaying = proxy.relaying(),
                    "upgrade: not every connection stopped within {} ms; the rest are handed over \
                     after the commit", COLLECT_TIMEOUT.as_millis()
                );
                return Ok(());
            }
        }
    }
}

/// Handoffs gathered for the next batch: at most [`frame::MAX_FDS`] descriptors and (roughly)
/// [`BATCH_BYTES`].
#[derive(Default)]
struct Pending {
    handoffs: Vec<Handoff>,
    fds: usize,
    bytes: usize,
}

impl Pending {
    /// Descriptors and (roughly) bytes `handoff` takes in a batch.
    fn size(handoff: &Handoff) -> (usize, usize) {
        let c = &handoff.connection;
        let held = |d: &handover::Direction<RawFd>| match &d.held {
            handover::Held::Bytes(b) => b.len(),
            _ => 0,
        };
        (c.fd_count(), 128 + held(&c.up) + held(&c.down))
    }

    /// Whether `handoff` still fits (one always fits an empty batch: a connection has at most
    /// six descriptors).
    fn fits(&self, handoff: &Handoff) -> bool {
        let (fds, bytes) = Pending::size(handoff);
        self.handoffs.is_empty()
            || (self.fds + fds <= frame::MAX_FDS && self.bytes + bytes <= BATCH_BYTES)
    }

    fn push(&mut self, handoff: Handoff) {
        let (fds, bytes) = Pending::size(&handoff);
        self.fds += fds;
        self.bytes += bytes;
        self.handoffs.push(handoff);
    }

    fn is_empty(&self) -> bool {
        self.handoffs.is_empty()
    }

    fn take(&mut self) -> Vec<Handoff> {
        self.fds = 0;
        self.bytes = 0;
        std::mem::take(&mut self.handoffs)
    }
}

/// Sends `batch` as one frame and keeps its verdicts.
async fn flush(
    socket: &UnixStream,
    batch: &mut Vec<Handoff>,
    collected: &mut Collected,
    late: bool,
) -> std::io::Result<()> {
    let mut connections = Vec::with_capacity(batch.len());
    for handoff in batch.drain(..) {
        connections.push(handoff.connection);
        collected.verdicts.push(handoff.verdict);
    }
    let encoded = Batch {
        seq: collected.batches,
        late,
        connections,
    }
    .encode();
    collected.batches += 1;
    send(socket, Kind::Batch, encoded).await
}

async fn send(socket: &UnixStream, kind: Kind, e: handover::Encoder) -> std::io::Result<()> {
    let (bytes, fds) = e.finish();
    frame::send(socket, kind as u8, &bytes, &fds).await
}

/// The new process's next reply. Its refusal, or its end, is the attempt's failure (with how
/// it ended, when it did).
async fn reply(
    socket: &UnixStream,
    reader: &mut frame::Reader,
    rollback: &mut Rollback<'_>,
) -> Result<Reply, String> {
    match reader.next(socket).await {
        Ok(Some(f)) => match Reply::decode(f.kind, &f.payload) {
            Ok(Reply::Refused(reason)) => Err(format!("the new process refused: {reason}")),
            Ok(reply) => Ok(reply),
            Err(e) => Err(format!("cannot read the new process's answer: {e}")),
        },
        Ok(None) => Err(format!(
            "the new process ended before it was ready ({})",
            rollback.child_status().await
        )),
        Err(e) => Err(rollback.ended(e).await),
    }
}

async fn within<T>(
    timeout: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::time::timeout(timeout, f).await.map_err(|_| {
        format!(
            "the new process did not {what} within {} s",
            timeout.as_secs()
        )
    })?
}

impl Handed {
    /// After the commit, until this process exits: connections that were still connecting at
    /// the commit reach their relay stage and are handed over now, one batch at a time, until
    /// none is left here (or `deadline`, then the rest are cut). Then the final counts go to
    /// the new process, which adds what they grew by since the state.
    pub(super) async fn retire(mut self, server: &Server, deadline: Instant) {
        let proxy = server.proxy();
        let mut working = true;
        let mut next = None;
        loop {
            tokio::select! {
                handoff = self.handoffs.recv(), if working => {
                    let Some(first) = handoff else { break };
                    let mut pending = Pending::default();
                    pending.push(first);
                    while let Ok(handoff) = self.handoffs.try_recv() {
                        if !pending.fits(&handoff) {
                            next = Some(handoff);
                            break;
                        }
                        pending.push(handoff);
                    }
                    let mut result = self.late(pending.take()).await;
                    if let (Ok(()), Some(handoff)) = (&result, next.take()) {
                        result = self.late(vec![handoff]).await;
                    }
                    if let Err(e) = result {
                        tracing::error!("upgrade: cannot hand over a late connection ({e}); the rest stay here");
                        proxy.handover.end();
                        working = false;
                    }
                }
                () = proxy.drained() => break,
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(open = proxy.active(), "upgrade: connections still open in the old process at shutdownTimeout are cut");
                    server.cut_all().await;
                    break;
                }
            }
        }
        if working {
            let state = proxy.shared.export();
            let _ = send(&self.socket, Kind::Final, state.encode()).await;
        }
        tracing::info!(
            late = self.late_connections,
            "upgrade: {} more connections handed over after the commit (they were connecting \
             then); the final counts sent",
            self.late_connections
        );
    }

    /// Hands over connections that reached their relay stage after the commit.
    async fn late(&mut self, batch: Vec<Handoff>) -> Result<(), String> {
        let mut collected = Collected {
            verdicts: Vec::new(),
            batches: self.seq,
        };
        let mut batch = batch;
        flush(&self.socket, &mut batch, &mut collected, true)
            .await
            .map_err(|e| e.to_string())?;
        let seq = self.seq;
        self.seq = collected.batches;
        let taken = tokio::time::timeout(LATE_TIMEOUT, self.reader.next(&self.socket))
            .await
            .map_err(|_| "no answer".to_string())?
            .map_err(|e| e.to_string())?
            .ok_or("the new process closed the handover socket")?;
        match Reply::decode(taken.kind, &taken.payload) {
            Ok(Reply::Taken { seq: s }) if s == seq => {
                self.late_connections += collected.verdicts.len();
                for verdict in collected.verdicts {
                    let _ = verdict.send(Verdict::Taken);
                }
                Ok(())
            }
            other => Err(format!("unexpected answer {other:?}")),
        }
    }
}

/// What an attempt stopped, undone on drop unless it committed.
struct Rollback<'a> {
    server: &'a Arc<Server>,
    admin: &'a Mutex<Option<Admin>>,
    child: Option<Child>,
    collecting: bool,
    /// The listener, kept to accept on again.
    paused: Option<std::net::TcpListener>,
    /// The metrics listener, kept to serve on again.
    admin_listener: Option<std::net::TcpListener>,
    committed: bool,
}

impl<'a> Rollback<'a> {
    fn new(server: &'a Arc<Server>, admin: &'a Mutex<Option<Admin>>) -> Rollback<'a> {
        Rollback {
            server,
            admin,
            child: None,
            collecting: false,
            paused: None,
            admin_listener: None,
            committed: false,
        }
    }

    fn commit(&mut self) {
        self.committed = true;
    }

    /// Why a send to the new process failed: the refusal it sent before it went (read now),
    /// or how it ended, or the error.
    async fn send_failed(
        &mut self,
        error: std::io::Error,
        socket: &UnixStream,
        reader: &mut frame::Reader,
    ) -> String {
        let pending = tokio::time::timeout(REFUSAL_WAIT, reader.next(socket)).await;
        if let Ok(Ok(Some(f))) = pending {
            if let Ok(Reply::Refused(reason)) = Reply::decode(f.kind, &f.payload) {
                return format!("the new process refused: {reason}");
            }
        }
        self.ended(error).await
    }

    /// Why a read from (or send to) the new process failed: it ended (and how), or the error.
    async fn ended(&mut self, error: std::io::Error) -> String {
        use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
        if matches!(error.kind(), BrokenPipe | ConnectionReset) {
            format!(
                "the new process ended before it was ready ({})",
                self.child_status().await
            )
        } else {
            format!("handover socket: {error}")
        }
    }

    /// How the new process ended (waiting a moment for it to be reaped), for a log line.
    async fn child_status(&mut self) -> String {
        let Some(child) = &mut self.child else {
            return "not started".into();
        };
        for _ in 0..50 {
            match child.try_wait() {
                Ok(Some(status)) => return status.to_string(),
                Ok(None) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(e) => return e.to_string(),
            }
        }
        "it closed the handover socket".into()
    }
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        if let Some(mut child) = self.child.take() {
            // Ours, by its pid: it must not go on with what it was handed.
            let _ = child.kill();
            std::thread::spawn(move || child.wait());
        }
        if self.collecting {
            // Handlers whose handoff was not taken keep their connection: their verdict
            // senders are dropped with the attempt.
            self.server.proxy().handover.end();
        }
        if let Some(listener) = self.paused.take() {
            if let Err(e) = self.server.resume_accepting(listener) {
                tracing::error!("upgrade undone, but the listener cannot accept again: {e}");
            }
        }
        if let Some(listener) = self.admin_listener.take() {
            match admin::start_on(listener, self.server.clone()) {
                Ok(admin) => {
                    *self.admin.lock().unwrap_or_else(|p| p.into_inner()) = Some(admin);
                }
                Err(e) => tracing::error!(
                    "upgrade undone, but the metrics endpoint cannot serve again: {e}"
                ),
            }
        }
    }
}
