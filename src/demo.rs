//! Built-in demo targets for `stickylb demo`: one tiny server on each target's address, each
//! answering with its own name, so that a newcomer sees stickiness work with `curl` or `nc` on
//! a fresh machine, with nothing else installed.
//!
//! A demo target answers an HTTP request (anything starting with a method such as `GET `) with
//! a one-line `200 OK` page and closes; any other client (say `nc`) gets the same line at once
//! and then an echo of what it types, prefixed with the target's name.
//!
//! The demo's start-up line says what to try ([`hint`]): `curl` on the listener, and the
//! status page's URL.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::config::Config;

/// How long a demo target waits for a client's first bytes to tell HTTP from a raw client.
const FIRST_BYTES_WAIT: Duration = Duration::from_millis(300);

/// Binds every target address of `config` and serves the demo on each. Fails, naming the
/// address, if one cannot be bound (a real server already there, or not a local address).
pub async fn spawn_targets(config: &Config) -> io::Result<Vec<SocketAddr>> {
    let mut bound = Vec::new();
    for target in &config.targets {
        let listener = TcpListener::bind(target.addr).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "demo target {} cannot listen on {}: {e}",
                    target.id, target.addr
                ),
            )
        })?;
        bound.push(listener.local_addr()?);
        let name = format!("{} ({})", target.id, target.addr);
        tokio::spawn(serve(listener, name));
    }
    Ok(bound)
}

/// What to try once the demo runs: `curl` on the listener, and the status page in a browser
/// (or that it is off, with `metricsPort: null`). A wildcard address reads as `localhost`.
pub fn hint(config: &Config) -> String {
    let curl = format!("try `curl {}`", local(config.listen));
    match config.metrics {
        Some(admin) => format!("{curl}; status page: http://{}/", local(admin)),
        None => format!("{curl}; status page off (metricsPort is null)"),
    }
}

/// `addr` as a client on this machine would write it: `localhost:port` for a wildcard.
fn local(addr: SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => format!("localhost:{}", addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => format!("localhost:{}", addr.port()),
        _ => addr.to_string(),
    }
}

async fn serve(listener: TcpListener, name: String) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let name = name.clone();
                tokio::spawn(async move {
                    let _ = answer(stream, &name).await;
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn answer(mut stream: TcpStream, name: &str) -> io::Result<()> {
    let line = format!("stickylb demo target {name}\n");
    let mut first = [0u8; 1024];
    let n = match tokio::time::timeout(FIRST_BYTES_WAIT, stream.read(&mut first)).await {
        Ok(read) => read?,
        Err(_) => 0,
    };
    if is_http(&first[..n]) {
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{line}",
            line.len()
        );
        stream.write_all(response.as_bytes()).await?;
        return stream.shutdown().await;
    }
    stream.write_all(line.as_bytes()).await?;
    let (reader, mut writer) = stream.split();
    let mut lines = BufReader::new(first[..n].chain(reader)).lines();
    while let Some(text) = lines.next_line().await? {
        writer
            .write_all(format!("{name}: {text}\n").as_bytes())
            .await?;
    }
    writer.shutdown().await
}

fn is_http(bytes: &[u8]) -> bool {
    const METHODS: [&[u8]; 7] = [
        b"GET ",
        b"HEAD ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"OPTIONS ",
        b"PATCH ",
    ];
    METHODS.iter().any(|m| bytes.starts_with(m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(extra: &str) -> Config {
        let text = format!(
            r#"{{"sourcePort": 8080, "targets": [{{"host": "127.0.0.1", "port": 9001}}] {extra}}}"#
        );
        Config::parse(Path::new("demo.json"), &text).expect("valid")
    }

    #[test]
    fn the_hint_names_the_curl_command_and_the_status_page() {
        assert_eq!(
            hint(&config("")),
            "try `curl localhost:8080`; status page: http://127.0.0.1:9898/"
        );
        assert_eq!(
            hint(&config(
                r#", "sourceHost": "127.0.0.2", "metricsHost": "::", "metricsPort": 9000"#
            )),
            "try `curl 127.0.0.2:8080`; status page: http://localhost:9000/"
        );
        assert!(hint(&config(r#", "metricsPort": null"#))
            .ends_with("status page off (metricsPort is null)"));
    }
}
