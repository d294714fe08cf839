//! The admin endpoint at `metricsHost:metricsPort`: `GET /metrics` (the Prometheus
//! exposition, [`prometheus`]), and the status page `GET /` with its JSON `GET /status`
//! ([`status`]).
//!
//! It is read-only, and built so that neither a slow or hostile client nor a large exposition
//! can reach the data path or starve a normal scrape:
//! - **Its own thread.** The endpoint runs on a single-threaded runtime on a thread of its own,
//!   at a lower scheduling priority (nice [`NICE`]), never on the proxy's worker threads:
//!   rendering the exposition of thousands of targets takes a core for a while, and the
//!   proxied connections come first.
//! - **HTTP by hyper**: request parsing, the head size cap (431 past [`MAX_HEAD`] bytes or 100
//!   header lines) and the head read timeout are hyper's, not ours.
//! - **Timeouts per connection**: a request head within [`HEAD_TIMEOUT`], and the whole
//!   exchange within [`HEAD_TIMEOUT`] + [`WRITE_TIMEOUT`] (a client that stops reading the
//!   response is dropped then). One request per connection (`Connection: close`).
//! - **Slots after accept**: at most [`MAX_CONNECTIONS`] connections are served at once. A slot
//!   is taken once a connection is accepted, never before, so a new scrape is never queued
//!   behind trickling clients. When every slot is taken, the connection that has waited longest
//!   for its request head is closed to make room (a trickling client holds a slot only until
//!   enough newer connections arrive, and never longer than [`HEAD_TIMEOUT`]); only when every
//!   slot is answering a request is a new connection answered `503` at once.
//! - **One render for concurrent scrapes, at most one per [`RENDER_INTERVAL`]**: scrapes that
//!   arrive while the exposition is being rendered, or less than the interval after a render
//!   began, wait for the next render rather than each starting their own, and share its bytes
//!   (a client that never reads holds a reference, not a copy). A scrape never sees numbers
//!   older than its request.
//!
//! What it serves comes through one narrow interface, [`Source`]: a [`Snapshot`] of the
//! balancer's counters and target states.

pub mod prometheus;
pub mod status;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::proxy::Snapshot;
use crate::sockets;

/// Connections served at once. Past it, the oldest connection still waiting for its request
/// head makes room; if none is waiting, the new connection is answered `503` and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// A request head (request line and headers) larger than this is answered `431`.
pub const MAX_HEAD: usize = 16 * 1024;
/// A request body larger than this (by its `Content-Length`) is answered `413`; none of the
/// endpoint's requests has one.
pub const MAX_BODY: u64 = 1024;
/// The request head must arrive within this.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// The response must be written within this (after the head arrived).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Permits of the connections' tasks (see `accept_loop`).
const TRACKED: usize = 2 * MAX_CONNECTIONS;
/// When the endpoint stops, how long the requests being answered may take to finish.
pub const STOP_GRACE: Duration = Duration::from_secs(1);
/// The endpoint thread's nice value: under load the proxy's workers win the CPU.
pub const NICE: i32 = 10;
/// The shortest time between two renders of the exposition. Scrapers looping on `/metrics`
/// get at most one render per interval between them (each render shared by all that wait
/// for it), which bounds what they cost: renders, and bytes written. A Prometheus scraping
/// every few seconds never waits.
pub const RENDER_INTERVAL: Duration = Duration::from_millis(250);

/// What the admin endpoint reads.
pub trait Source: Send + Sync + 'static {
    /// The balancer's counters and target states now.
    fn snapshot(&self) -> Snapshot;
}

impl Source for crate::server::Server {
    fn snapshot(&self) -> Snapshot {
        crate::server::Server::snapshot(self)
    }
}

/// Why the endpoint could not start. A start-up error: the process exits 1.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot serve metrics on {addr} (metricsHost/metricsPort): {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the metrics endpoint's thread: {0}")]
    Thread(#[source] io::Error),
}

/// A running admin endpoint. Dropping it stops serving and closes its listener.
#[derive(Debug)]
pub struct Admin {
    local_addr: SocketAddr,
    /// The listening socket, owned by the endpoint's thread: open as long as this is.
    fd: std::os::fd::RawFd,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Admin {
    /// The address the endpoint is served on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Another descriptor of the listening socket (an upgrade hands it to the new process, so
    /// that a scrape is never refused).
    pub fn clone_listener(&self) -> io::Result<std::net::TcpListener> {
        // SAFETY: the endpoint's thread holds the listener open while `self` exists.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.fd) };
        Ok(std::net::TcpListener::from(fd.try_clone_to_owned()?))
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts the endpoint the config asks for (`metricsHost:metricsPort`), or nothing when
/// `metricsPort` is `null`. Logs the URL.
pub fn install(addr: Option<SocketAddr>, source: Arc<dyn Source>) -> Result<Option<Admin>, Error> {
    let Some(addr) = addr else {
        tracing::info!("metrics off (metricsPort is null)");
        return Ok(None);
    };
    let admin = start(addr, source)?;
    tracing::info!(
        url = %format!("http://{}/metrics", admin.local_addr()),
        status = %format!("http://{}/", admin.local_addr()),
        "serving Prometheus metrics and the status page"
    );
    Ok(Some(admin))
}

/// Binds `addr` (port 0 picks a free one: see [`Admin::local_addr`]) and serves the endpoint
/// for `source` on a thread of its own.
pub fn start(addr: SocketAddr, source: Arc<dyn Source>) -> Result<Admin, Error> {
    let listener = sockets::bind(addr).map_err(|source| Error::Bind { addr, source })?;
    start_on(listener, source)
}

/// Serves the endpoint for `source` on `listener` (bound and listening: an older process's,
/// handed over by an upgrade) on a thread of its own.
pub fn start_on(listener: std::net::TcpListener, source: Arc<dyn Source>) -> Result<Admin, Error> {
    use std::os::fd::AsRawFd;
    let local_addr = listener.local_addr().map_err(|source| Error::Bind {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| Error::Bind {
            addr: local_addr,
            source,
        })?;
    let fd = listener.as_raw_fd();
    let (stop, stopped) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("stickylb-admin".into())
        .spawn(move || run(listener, source, stopped))
        .map_err(Error::Thread)?;
    Ok(Admin {
        local_addr,
        fd,
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// The endpoint thread: lowers its own priority, then serves until `stopped`.
fn run(listener: std::net::TcpListener, source: Arc<dyn Source>, stopped: oneshot::Receiver<()>) {
    lower_priority();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the metrics endpoint's runtime");
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!(%error, "cannot serve metrics");
                return;
            }
        };
        let pages = Arc::new(Pages::new(source));
        let slots = Arc::new(Semaphore::new(TRACKED));
        tokio::select! {
            _ = stopped => {}
            _ = accept_loop(listener, pages.clone(), slots.clone()) => {}
            _ = status::sample_every(&*pages.source, &pages.status) => {}
        }
        // No more accepts (connects wait in the backlog, for the next process of an upgrade);
        // the scrapes being answered finish first, within STOP_GRACE.
        let all = TRACKED as u32;
        let _ = tokio::time::timeout(STOP_GRACE, slots.acquire_many(all)).await;
    });
    // Dropping the runtime here ends every connection still open.
}

/// Sets this thread's nice value to [`NICE`] (Linux schedules threads, so this concerns only
/// the endpoint's thread). Failing to do so is harmless.
fn lower_priority() {
    // SAFETY: plain syscalls; gettid has no failure, setpriority on our own thread id only
    // changes this thread's nice value.
    let rc = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, NICE)
    };
    if rc != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "cannot lower the admin thread's priority");
    }
}

/// Accepts connections and serves each in its own task, at most [`MAX_CONNECTIONS`] at once.
/// Like the balancer's, it never ends on an accept error.
///
/// When every slot is taken, the connection that has waited longest for its request head is
/// closed to make room: a client that trickles its request (or sends nothing) holds a slot only
/// until [`MAX_CONNECTIONS`] newer connections arrive, so trickling clients cannot keep a
/// normal scrape out, however many there are. Only when every slot is answering a request (a
/// response being written, to a client that may be slow to read it) is a new connection
/// answered `503`.
///
/// Each connection's task holds a permit of `slots` (more permits than connections, since an
/// evicted task gives its permit back only once it has been dropped): when the endpoint stops,
/// the answers being written are awaited through them.
async fn accept_loop(listener: TcpListener, pages: Arc<Pages>, slots: Arc<Semaphore>) {
    let mut served: VecDeque<Served> = VecDeque::with_capacity(MAX_CONNECTIONS);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::debug!(%error, "metrics accept failed");
                if sockets::is_fd_exhaustion(&error) {
                    // The listener stays readable: do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            }
        };
        served.retain(|s| !s.task.is_finished());
        if served.len() >= MAX_CONNECTIONS {
            // Oldest first: `served` is in accept order.
            match served
                .iter()
                .position(|s| !s.answering.load(Ordering::Relaxed))
            {
                Some(i) => {
                    if let Some(evicted) = served.remove(i) {
                        tracing::debug!(
                            "metrics connection without a request head closed to make room"
                        );
                        evicted.task.abort();
                    }
                }
                None => {
                    busy(stream);
                    continue;
                }
            }
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Evicted tasks not dropped yet hold the spare permits: rare, and brief.
            busy(stream);
            continue;
        };
        let answering = Arc::new(AtomicBool::new(false));
        let served_by = serve(stream, pages.clone(), answering.clone());
        let task = tokio::spawn(async move {
            served_by.await;
            drop(permit);
        });
        served.push_back(Served {
            task: task.abort_handle(),
            answering,
        });
    }
}

/// A connection being served, as the accept loop keeps track of it.
struct Served {
    task: AbortHandle,
    /// Set once its request head has arrived: it is answering, not waiting.
    answering: Arc<AtomicBool>,
}

/// Every slot is answering a request: answers `503` with what fits in the socket buffer now,
/// and closes. What the client sent already is read first (without waiting), so that the
/// close is a FIN and the client can read the answer, not a reset.
fn busy(stream: TcpStream) {
    let mut discard = [0u8; 4096];
    for _ in 0..16 {
        if !matches!(stream.try_read(&mut discard), Ok(n) if n > 0) {
            break;
        }
    }
    let _ = stream.try_write(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\n\
          Connection: close\r\n\r\n",
    );
}

/// Serves one connection: one request, within the timeouts. Sets `answering` once the request
/// head has arrived.
async fn serve(stream: TcpStream, pages: Arc<Pages>, answering: Arc<AtomicBool>) {
    let service = hyper::service::service_fn(move |request| {
        answering.store(true, Ordering::Relaxed);
        let pages = pages.clone();
        async move { Ok::<_, Infallible>(pages.respond(request).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_header_size(MAX_HEAD)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(HEAD_TIMEOUT + WRITE_TIMEOUT, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::debug!(%error, "metrics request failed"),
        Err(_) => tracing::debug!("metrics client too slow; dropped"),
    }
}

/// The pages, and the last render of the exposition.
struct Pages {
    source: Arc<dyn Source>,
    /// When the last render started, and its bytes.
    exposition: tokio::sync::Mutex<Option<(Instant, Bytes)>>,
    /// Recent connect histograms, for the status page's last-minute connect times.
    status: status::Status,
}

impl Pages {
    fn new(source: Arc<dyn Source>) -> Pages {
        Pages {
            source,
            exposition: tokio::sync::Mutex::new(None),
            status: status::Status::new(),
        }
    }

    async fn respond(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let body_len = request
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if body_len.is_some_and(|n| n > MAX_BODY) {
            return text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
        }
        if request.method() != Method::GET && request.method() != Method::HEAD {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "read-only: GET or HEAD\n");
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        // For HEAD, hyper sends the head with the body's Content-Length and no body.
        match request.uri().path() {
            "/metrics" => {
                let body = self.exposition().await;
                with_type(Response::new(Full::new(body)), prometheus::CONTENT_TYPE)
            }
            "/" => status::page(),
            "/status" => status::json(self.status.render(&self.source.snapshot(), Instant::now())),
            _ => text(
                StatusCode::NOT_FOUND,
                "stickylb serves /metrics (Prometheus), / (status page) and /status (JSON)\n",
            ),
        }
    }

    /// The exposition, rendered after this call began: a scrape never sees numbers older than
    /// its request. Scrapes that queue behind one render share the next, and renders start at
    /// least [`RENDER_INTERVAL`] apart: a scrape that comes sooner waits for the next one
    /// (holding the lock, so that every scrape arriving meanwhile shares it too).
    async fn exposition(&self) -> Bytes {
        let arrived = Instant::now();
        let mut last = self.exposition.lock().await;
        if let Some((started, body)) = &*last {
            if *started >= arrived {
                return body.clone();
            }
            tokio::time::sleep_until(*started + RENDER_INTERVAL).await;
        }
        let started = Instant::now();
        let body = Bytes::from(prometheus::render(&self.source.snapshot()));
        *last = Some((started, body.clone()));
        body
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    with_type(response, "text/plain; charset=utf-8")
}

fn with_type(
    mut response: Response<Full<Bytes>>,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    response
}
