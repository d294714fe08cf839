//! Shared helpers for the black-box tests: real backends on loopback, clients bound to many
//! 127.x.y.z addresses, balancers started in-process on `127.0.0.1:0`, and a deterministic
//! byte pattern for checking transfers byte for byte, and clients that trickle a request head
//! (slowloris) for the admin endpoint.
//!
//! Everything is real TCP over loopback; nothing is mocked.

#![allow(dead_code)]

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use stickylb::config::Config;
use stickylb::server;
use stickylb::server::Server;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// Upper bound for any single wait in a test: a liveness bound, not a performance assertion.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The `n`th distinct client address: 127.10.0.1, 127.10.0.2, ... (never .0 or .255).
pub fn client_ip(n: u32) -> Ipv4Addr {
    let n = n as usize;
    Ipv4Addr::new(
        127,
        10 + (n / 62_500) as u8,
        (n / 250 % 250) as u8,
        (n % 250 + 1) as u8,
    )
}

/// Connects to `addr` from `ip` (any address in 127.0.0.0/8 works on Linux loopback).
pub async fn connect_from(ip: Ipv4Addr, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(ip.into(), 0))?;
    socket.connect(addr).await
}

/// The JSON text of a config with `targets` and the given extra keys.
pub fn config_text(targets: &[SocketAddr], extra: serde_json::Value) -> String {
    let mut config = serde_json::json!({
        "sourceHost": "127.0.0.1",
        "sourcePort": 1,
        "metricsPort": null,
        "targets": targets
            .iter()
            .map(|a| serde_json::json!({"host": a.ip().to_string(), "port": a.port()}))
            .collect::<Vec<_>>(),
    });
    if let (Some(config), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            config.insert(k.clone(), v.clone());
        }
    }
    serde_json::to_string_pretty(&config).expect("json")
}

pub fn config(targets: &[SocketAddr], extra: serde_json::Value) -> Config {
    Config::parse(Path::new("test.json"), &config_text(targets, extra)).expect("valid test config")
}

/// Starts a balancer in this runtime on a fresh loopback port.
pub fn start(targets: &[SocketAddr], extra: serde_json::Value) -> Arc<Server> {
    let listener = server::bind("127.0.0.1:0".parse().unwrap()).expect("bind balancer");
    Arc::new(Server::start(config(targets, extra), listener).expect("start balancer"))
}

/// What a test backend does with each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Sends its name and a newline, then echoes everything back.
    Named,
    /// Echoes everything back.
    Echo,
}

/// A real TCP server on loopback that can be stopped (its port then refuses connects) and
/// started again on the same port.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    mode: Mode,
    accepted: Arc<AtomicUsize>,
    task: Option<JoinHandle<()>>,
}

impl Backend {
    pub async fn start(name: &str, mode: Mode) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().unwrap();
        let mut backend = Backend {
            name: name.to_string(),
            addr,
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
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(self.addr).expect("rebind backend port");
        let listener = socket.listen(1024).unwrap();
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

async fn serve_one(mut stream: TcpStream, name: &str, mode: Mode) -> io::Result<()> {
    if mode == Mode::Named {
        stream.write_all(format!("{name}\n").as_bytes()).await?;
    }
    let (mut r, mut w) = stream.split();
    tokio::io::copy(&mut r, &mut w).await?;
    w.shutdown().await
}

/// Connects from `ip` through the balancer at `lb` and returns the name of the backend that
/// answered (a [`Mode::Named`] backend), keeping the connection open in the second value.
pub async fn which(ip: Ipv4Addr, lb: SocketAddr) -> io::Result<(String, TcpStream)> {
    let stream = connect_from(ip, lb).await?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    tokio::time::timeout(PATIENCE, reader.read_line(&mut line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no name from backend"))??;
    if line.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed without a name",
        ));
    }
    Ok((line.trim_end().to_string(), reader.into_inner()))
}

/// A deterministic stream of bytes (xorshift64*), so a receiver can check a transfer without
/// keeping a copy of what was sent.
pub struct Pattern {
    state: u64,
    buf: [u8; 8],
    used: usize,
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern {
            state: seed | 1,
            buf: [0; 8],
            used: 8,
        }
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for byte in out.iter_mut() {
            if self.used == 8 {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                self.buf = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
                self.used = 0;
            }
            *byte = self.buf[self.used];
            self.used += 1;
        }
    }
}

/// Writes `len` pattern bytes from `seed` to `w`, then shuts its write side.
pub async fn send_pattern<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    seed: u64,
    len: usize,
) -> io::Result<()> {
    let mut pattern = Pattern::new(seed);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        pattern.fill(&mut chunk[..n]);
        w.write_all(&chunk[..n]).await?;
        left -= n;
    }
    w.shutdown().await
}

/// Reads `r` to EOF and checks that it is exactly `len` pattern bytes from `seed`. Returns the
/// number of bytes that matched before the first difference (== len when all is well).
pub async fn check_pattern<R: AsyncReadExt + Unpin>(
    r: &mut R,
    seed: u64,
    len: usize,
) -> io::Result<usize> {
    let mut pattern = Pattern::new(seed);
    let mut got = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    loop {
        let n = r.read(&mut got).await?;
        if n == 0 {
            return Ok(total);
        }
        if total + n > len {
            return Err(io::Error::other(format!("more than {len} bytes received")));
        }
        pattern.fill(&mut want[..n]);
        if got[..n] != want[..n] {
            let at = got[..n]
                .iter()
                .zip(&want[..n])
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Err(io::Error::other(format!("byte {} differs", total + at)));
        }
        total += n;
    }
}

/// A port on loopback where nothing listens (bound, then closed).
pub fn dead_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A temporary directory, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("stickylb-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts a balancer in this runtime from the config file at `path` (on a fresh loopback port
/// unless the file's `sourcePort` is to be used, see `bind_config_port`).
pub fn start_from_file(path: &Path, bind_config_port: bool) -> Arc<Server> {
    let config = Config::load(path).expect("valid config file");
    let addr = if bind_config_port {
        config.listen
    } else {
        "127.0.0.1:0".parse().unwrap()
    };
    let listener = server::bind(addr).expect("bind balancer");
    Arc::new(Server::start(config, listener).expect("start balancer"))
}

/// What [`echo_once`] sends and expects back.
pub const ECHO_REQUEST: [u8; 32] = *b"GET /ping 0123456789abcdefghijk\n";

/// One short connection from `ip` through `lb` to an echo target: sends [`ECHO_REQUEST`],
/// reads it back, closes.
pub async fn echo_once(ip: Ipv4Addr, lb: SocketAddr) -> io::Result<()> {
    let mut stream = connect_from(ip, lb).await?;
    stream.write_all(&ECHO_REQUEST).await?;
    let mut reply = [0u8; ECHO_REQUEST.len()];
    stream.read_exact(&mut reply).await?;
    if reply != ECHO_REQUEST {
        return Err(io::Error::other("wrong echo"));
    }
    Ok(())
}

/// A number from the environment variable `name` (benches' settings), or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Keeps `count` connections to `addr` open, each sending a request head one byte every
/// `every` and never finishing it; a connection the server closes is replaced. Counts the
/// connections open now in `open`. Runs until `stop`.
pub fn slowloris(
    addr: SocketAddr,
    count: usize,
    every: Duration,
    open: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..count)
        .map(|_| {
            let (open, stop) = (open.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut stream) = TcpStream::connect(addr).await else {
                        tokio::time::sleep(every).await;
                        continue;
                    };
                    open.fetch_add(1, Ordering::Relaxed);
                    let mut head = b"GET /metrics HTTP/1.1\r\nX-Slow: ".iter().cycle();
                    let mut byte = [0u8; 1];
                    while !stop.load(Ordering::Relaxed) {
                        byte[0] = *head.next().unwrap_or(&b'a');
                        if stream.write_all(&byte).await.is_err() {
                            break;
                        }
                        // A read that ends (EOF, reset, an answer) means the server let go.
                        if let Ok(Ok(_)) =
                            tokio::time::timeout(every, stream.read(&mut [0u8; 256])).await
                        {
                            break;
                        }
                    }
                    open.fetch_sub(1, Ordering::Relaxed);
                }
            })
        })
        .collect()
}
