//! The backends: as cheap as a TCP server can be, so that the balancer is the bottleneck.
//!
//! - `sink`: reads and discards until EOF, then answers the byte count (8 bytes, little
//!   endian) and closes, so a bulk client knows how much arrived.
//! - `echo`: writes back what it reads, until EOF.
//! - `fixed`: for every `request_size` bytes read, writes one `reply_size`-byte reply whose
//!   first 5 bytes are the serving port in ASCII (the client learns where it landed); closes at
//!   EOF. `fixed_proxy` ports first read the PROXY protocol header a balancer sends before the
//!   client's bytes (to measure what sending it costs), then do the same.
//!
//! Listeners have a 4096 backlog like the balancers', so a backend never refuses a burst a
//! balancer accepted.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Spec {
    pub sink: Vec<u16>,
    pub echo: Vec<u16>,
    pub fixed: Vec<u16>,
    pub fixed_proxy: Vec<u16>,
    pub request_size: usize,
    pub reply_size: usize,
}

#[derive(Clone, Copy)]
enum Mode {
    Sink,
    Echo,
    Fixed {
        request_size: usize,
        reply_size: usize,
        /// A PROXY protocol header comes first.
        proxy_header: bool,
    },
}

pub fn serve(spec: Spec, threads: usize, max: Duration) -> i32 {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let fixed = Mode::Fixed {
            request_size: spec.request_size.max(1),
            reply_size: spec.reply_size,
            proxy_header: false,
        };
        let fixed_proxy = Mode::Fixed {
            request_size: spec.request_size.max(1),
            reply_size: spec.reply_size,
            proxy_header: true,
        };
        let all = spec
            .sink
            .iter()
            .map(|&p| (p, Mode::Sink))
            .chain(spec.echo.iter().map(|&p| (p, Mode::Echo)))
            .chain(spec.fixed.iter().map(|&p| (p, fixed)))
            .chain(spec.fixed_proxy.iter().map(|&p| (p, fixed_proxy)));
        for (port, mode) in all {
            let listener = match listen(port) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("load backend: cannot listen on 127.0.0.1:{port}: {e}");
                    return 1;
                }
            };
            tokio::spawn(accept_loop(listener, mode, port));
        }
        tokio::time::sleep(max).await;
        0
    })
}

fn listen(port: u16) -> io::Result<TcpListener> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

async fn accept_loop(listener: TcpListener, mode: Mode, port: u16) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let _ = match mode {
                        Mode::Sink => sink(stream).await,
                        Mode::Echo => echo(stream).await,
                        Mode::Fixed {
                            request_size,
                            reply_size,
                            proxy_header,
                        } => fixed(stream, port, request_size, reply_size, proxy_header).await,
                    };
                });
            }
            // Out of fds or a client that gave up: wait a little rather than spin.
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

async fn sink(mut stream: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total: u64 = 0;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    stream.write_all(&total.to_le_bytes()).await?;
    stream.shutdown().await
}

async fn echo(mut stream: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return stream.shutdown().await;
        }
        stream.write_all(&buf[..n]).await?;
    }
}

/// Replies are written in batches when requests arrive pipelined, at most this many at once.
const MAX_BATCH: usize = 64;

/// Reads the PROXY header at the start of `stream`; returns how many bytes after it were read
/// with it.
async fn skip_proxy_header(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    use stickylb::proxy_protocol::{parse, Parse};
    let mut have = 0;
    loop {
        let n = stream.read(&mut buf[have..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        have += n;
        match parse(&buf[..have]) {
            Ok(Parse::Incomplete) => continue,
            Ok(Parse::Complete { len, .. }) => return Ok(have - len),
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }
}

async fn fixed(
    mut stream: TcpStream,
    port: u16,
    request_size: usize,
    reply_size: usize,
    proxy_header: bool,
) -> io::Result<()> {
    let mut reply = vec![b'.'; reply_size];
    let name = format!("{port:05}");
    reply[..5].copy_from_slice(name.as_bytes());
    reply[reply_size - 1] = b'\n';
    let batch: Vec<u8> = reply.repeat(MAX_BATCH);
    let mut buf = vec![0u8; 16 * 1024];
    let mut pending = if proxy_header {
        skip_proxy_header(&mut stream, &mut buf).await?
    } else {
        0
    };
    loop {
        // First what came with the PROXY header (a request often arrives in the same segment),
        // then each read.
        while pending >= request_size {
            let k = (pending / request_size).min(MAX_BATCH);
            stream.write_all(&batch[..k * reply_size]).await?;
            pending -= k * request_size;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return stream.shutdown().await;
        }
        pending += n;
    }
}
