//! Targets on loopback for a balancer to forward to: [`Backend`]s that say their name or echo,
//! and can be stopped (their port then refuses connects) and started again on the same port; a
//! [`Sink`] that accepts and never reads; [`dead_port`]s where nothing listens.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// What a test backend does with each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Sends its name and a newline, then echoes everything back.
    Named,
    /// Echoes everything back.
    Echo,
}

/// A real TCP server on loopback that can be stopped (its port then refuses connects) and
/// started again on the same port. Its connections end with the runtime; its listener when it
/// is dropped or stopped.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    mode: Mode,
    accepted: Arc<AtomicUsize>,
    task: Option<JoinHandle<()>>,
}

impl Backend {
    /// Starts a backend on a fresh loopback port.
    pub async fn start(name: &str, mode: Mode) -> Backend {
        Backend::start_on(name, mode, SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Starts a backend on `addr` (a port of 0 picks a free one), with SO_REUSEADDR so that a
    /// port whose previous backend was just stopped or killed can be taken again at once.
    pub fn start_on(name: &str, mode: Mode, addr: SocketAddr) -> Backend {
        let listener = listen(addr).expect("bind backend port");
        let mut backend = Backend {
            name: name.to_string(),
            addr: listener.local_addr().expect("backend address"),
            mode,
            accepted: Arc::new(AtomicUsize::new(0)),
            task: None,
        };
        backend.serve(listener);
        backend
    }

    fn serve(&mut self, listener: TcpListener) {
        let (name, mode, accepted) = (self.name.clone(), self.mode, self.accepted.clone());
        self.task = Some(tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of descriptors, say: back off instead of spinning on the error.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                accepted.fetch_add(1, Ordering::Relaxed);
                let name = name.clone();
                tokio::spawn(async move {
                    let _ = serve_one(stream, &name, mode).await;
                });
            }
        }));
    }

    /// Closes the listening socket: new connects to this port are refused. Connections
    /// already accepted go on.
    pub async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Listens again on the same port.
    pub async fn restart(&mut self) {
        let listener = listen(self.addr).expect("rebind backend port");
        self.serve(listener);
    }

    /// Connections this backend accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A listener on `addr` with SO_REUSEADDR and a backlog of 1024.
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn serve_one(mut stream: TcpStream, name: &str, mode: Mode) -> io::Result<()> {
    if mode == Mode::Named {
        stream.write_all(format!("{name}\n").as_bytes()).await?;
    }
    let (mut r, mut w) = stream.split();
    tokio::io::copy(&mut r, &mut w).await?;
    w.shutdown().await
}

/// A target that accepts and never reads (nor writes, nor closes): its receive buffers fill, and
/// the bytes back up towards the balancer. Its connections close when it is dropped.
pub struct Sink {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Sink {
    /// Starts a sink on a fresh loopback port.
    pub fn start() -> Sink {
        // A backlog for a burst of a thousand connects: past a full backlog the kernel answers
        // with SYN cookies and may drop the final ACK, leaving connections the balancer thinks
        // open and the sink never sees.
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind sink");
        let listener = socket.listen(4096).expect("listen");
        let addr = listener.local_addr().expect("sink address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            // Bounded: one accept per connection a test makes, and an error (a connection
            // aborted before it was accepted) ends nothing.
            for _ in 0..100_000 {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        count.fetch_add(1, Ordering::Relaxed);
                        held.push(stream);
                    }
                    Err(e) => eprintln!("sink: accept: {e}"),
                }
            }
        });
        Sink {
            addr,
            accepted,
            task,
        }
    }

    /// Connections the sink accepted (and holds) so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        // The held connections are the task's: aborting it closes them.
        self.task.abort();
    }
}

/// A free loopback port for a process under test to listen on: below the ephemeral range, so
/// that no `bind(0)` or outgoing connection of another test takes it between this call and
/// the bind (as it can take a [`dead_port`]); each call of a process gets another one, from a
/// base that differs by process. Checked free by binding it once.
pub fn free_port() -> u16 {
    use std::sync::atomic::AtomicU16;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 1000) as u16 * 8;
    for _ in 0..12_000 {
        let port = 20_000 + (base - 20_000 + NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in 20000-31999");
}

/// A port on loopback where nothing listens (bound, then closed).
pub fn dead_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}
