//! The admin endpoint at `metricsHost:metricsPort`: `GET /metrics` (the Prometheus
//! exposition, [`prometheus`]).
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
//!   is taken once a connection is accepted, and a connection that finds none is answered
//!   `503` at once; so trickling clients cannot queue a new scrape behind them, and each of
//!   them is gone after [`HEAD_TIMEOUT`].
//! - **One render for concurrent scrapes**: scrapes that arrive while the exposition is being
//!   rendered wait for the next render rather than each starting their own, and share its
//!   bytes (a client that never reads holds a reference, not a copy).
//!
//! What it serves comes through one narrow interface, [`Source`]: a [`Snapshot`] of the
//! balancer's counters and target states.

pub mod prometheus;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
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
use tokio::time::Instant;

use crate::proxy::Snapshot;
use crate::sockets;

/// Connections served at once; a connection past it is answered `503` and closed.
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
/// When the endpoint stops, how long the requests being answered may take to finish.
pub const STOP_GRACE: Duration = Duration::from_secs(1);
/// The endpoint thread's nice value: under load the proxy's workers win the CPU.
pub const NICE: i32 = 10;

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
        "serving Prometheus metrics"
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
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        tokio::select! {
            _ = stopped => {}
            _ = accept_loop(listener, Arc::new(Pages::new(source)), slots.clone()) => {}
        }
        // No more accepts (connects wait in the backlog, for the next process of an upgrade);
        // the scrapes being answered finish first, within STOP_GRACE.
        let all = MAX_CONNECTIONS as u32;
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

/// Accepts connections and serves each in its own task, with a slot taken after `accept`. Like
/// the balancer's, it never ends on an accept error.
async fn accept_loop(listener: TcpListener, pages: Arc<Pages>, slots: Arc<Semaphore>) {
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
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let pages = pages.clone();
                tokio::spawn(async move {
                    serve(stream, pages).await;
                    drop(slot);
                });
            }
            Err(_) => busy(stream),
        }
    }
}

/// Every slot is taken: answers `503` with what fits in the socket buffer now, and closes.
fn busy(stream: TcpStream) {
    let _ = stream.try_write(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\n\
          Connection: close\r\n\r\n",
    );
}

/// Serves one connection: one request, within the timeouts.
async fn serve(stream: TcpStream, pages: Arc<Pages>) {
    let service = hyper::service::service_fn(move |request| {
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
}

impl Pages {
    fn new(source: Arc<dyn Source>) -> Pages {
        Pages {
            source,
            exposition: tokio::sync::Mutex::new(None),
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
            _ => text(
                StatusCode::NOT_FOUND,
                "stickylb serves Prometheus metrics at /metrics\n",
            ),
        }
    }

    /// The exposition, rendered after this call began: a scrape never sees numbers older than
    /// its request. Scrapes that queue behind one render share the next.
    async fn exposition(&self) -> Bytes {
        let arrived = Instant::now();
        let mut last = self.exposition.lock().await;
        if let Some((started, body)) = &*last {
            if *started >= arrived {
                return body.clone();
            }
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
