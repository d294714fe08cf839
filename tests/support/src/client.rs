//! Clients on loopback, each from its own address: Linux routes all of 127.0.0.0/8 to `lo`, so
//! a test binds a socket to 127.x.y.z before connecting and the balancer sees thousands of
//! distinct clients (each hashed on its own) from one process.
//!
//! Every wait here is bounded by [`PATIENCE`]: a client that hangs fails the test instead of
//! hanging it.

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::PATIENCE;

/// The `n`th distinct client address: 127.10.0.1, 127.10.0.2, ... (250 per /24, never .0 or
/// .255).
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

/// Connects from `ip` through the balancer at `lb` and returns the name of the backend that
/// answered (a [`Mode::Named`](crate::Mode::Named) backend), keeping the connection open in the
/// second value.
pub async fn which(ip: Ipv4Addr, lb: SocketAddr) -> io::Result<(String, TcpStream)> {
    name_of(connect_from(ip, lb).await?).await
}

/// The backend (a [`Mode::Named`](crate::Mode::Named) one) that answers each of `clients`
/// addresses (`client_ip(0..clients)`) through the balancer at `lb`, `parallel` connections at
/// a time, each closed once the name is read.
pub async fn mapping(lb: SocketAddr, clients: u32, parallel: u32) -> Vec<String> {
    let mut names = vec![String::new(); clients as usize];
    let mut next = 0;
    while next < clients {
        let batch: Vec<_> = (next..(next + parallel).min(clients))
            .map(|i| tokio::spawn(async move { (i, which(client_ip(i), lb).await) }))
            .collect();
        for task in batch {
            let (i, answer) = task.await.expect("client task");
            let (name, _stream) =
                answer.unwrap_or_else(|e| panic!("client {} via {lb}: {e}", client_ip(i)));
            names[i as usize] = name;
        }
        next += parallel;
    }
    names
}

/// Asserts that `b` maps every client as `a` does (two results of [`mapping`]), naming the
/// first few that differ.
#[track_caller]
pub fn assert_same_mapping(a: &[String], b: &[String], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: mappings of different sizes");
    let differ: Vec<String> = (0..a.len())
        .filter(|&i| a[i] != b[i])
        .map(|i| format!("{} ({} vs {})", client_ip(i as u32), a[i], b[i]))
        .collect();
    assert!(
        differ.is_empty(),
        "{what}: {} of {} clients differ, e.g. {:?}",
        differ.len(),
        a.len(),
        &differ[..differ.len().min(5)]
    );
}

/// Reads the name a [`Mode::Named`](crate::Mode::Named) backend sends first on `stream`, a
/// client connection through a balancer; returns it with the connection, still open.
pub async fn name_of(stream: TcpStream) -> io::Result<(String, TcpStream)> {
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

/// Connects from `ip` through the balancer at `lb` to an echo backend, sends `ping\n` and
/// expects it back: the connection, open, when it was proxied end to end; `None` when it was
/// refused (a reset or a close instead of the echo).
pub async fn served(ip: Ipv4Addr, lb: SocketAddr) -> Option<TcpStream> {
    let mut s = tokio::time::timeout(PATIENCE, connect_from(ip, lb))
        .await
        .ok()?
        .ok()?;
    s.write_all(b"ping\n").await.ok()?;
    let mut buf = [0u8; 5];
    match tokio::time::timeout(PATIENCE, s.read_exact(&mut buf)).await {
        Ok(Ok(_)) if &buf == b"ping\n" => Some(s),
        _ => None,
    }
}

/// Connects from `ip` and reads once: what a client of a balancer that refuses or cannot serve
/// it sees. The reset can land before the client's connect completes, or on its first read;
/// either way it must come within [`PATIENCE`], never leave the client hanging (a connection
/// wrongly proxied to an echo backend hangs here, and fails the test).
pub async fn first_read(ip: Ipv4Addr, lb: SocketAddr) -> io::Result<usize> {
    tokio::time::timeout(PATIENCE, async {
        let mut stream = connect_from(ip, lb).await?;
        let mut buf = [0u8; 1];
        stream.read(&mut buf).await
    })
    .await
    .expect("client is closed, not left hanging")
}

/// Opens `n` connections through `lb` from addresses `first..first + n`, 64 at a time; with
/// `echo`, each is checked with [`served`] (an echo backend behind `lb`), else only connected.
pub async fn open_many(lb: SocketAddr, first: u32, n: u32, echo: bool) -> Vec<TcpStream> {
    let gate = Arc::new(Semaphore::new(64));
    let mut tasks = JoinSet::new();
    for i in first..first + n {
        let gate = gate.clone();
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("semaphore");
            let ip = client_ip(i);
            if echo {
                served(ip, lb)
                    .await
                    .unwrap_or_else(|| panic!("{ip}: no echo through {lb}"))
            } else {
                connect_from(ip, lb).await.expect("connect")
            }
        });
    }
    let mut streams = Vec::with_capacity(n as usize);
    while let Some(s) = tasks.join_next().await {
        streams.push(s.expect("connect task"));
    }
    streams
}

/// Writes up to `cap` bytes on each stream, all at once, each stopping early when its writes
/// stall (nothing accepted for `stall`: the bytes have backed up to it). Returns the bytes
/// offered in all. The stalls overlap, so this takes about one stall, not one per stream.
pub async fn offer(streams: &[TcpStream], cap: usize, stall: Duration) -> u64 {
    let offered = AtomicUsize::new(0);
    join_all(streams.iter().map(|s| offer_one(s, cap, stall, &offered))).await;
    offered.load(Ordering::Relaxed) as u64
}

async fn offer_one(s: &TcpStream, cap: usize, stall: Duration, offered: &AtomicUsize) {
    let chunk = [0x5au8; 16 * 1024];
    let mut sent = 0;
    while sent < cap {
        match tokio::time::timeout(stall, s.writable()).await {
            Ok(Ok(())) => {}
            Err(_) | Ok(Err(_)) => break, // stalled (or gone)
        }
        match s.try_write(&chunk[..chunk.len().min(cap - sent)]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => break,
        }
    }
    offered.fetch_add(sent, Ordering::Relaxed);
}

/// Polls the futures together to completion (a tiny `join_all`, to need no extra crate; the
/// futures borrow the streams, so they cannot be spawned).
async fn join_all<F: Future<Output = ()>>(futures: impl Iterator<Item = F>) {
    let mut futures: Vec<_> = futures.map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        futures.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if futures.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
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
