//! One HTTP/1.1 request over a fresh connection, read to the end: how the tests talk to the
//! admin endpoint (`/metrics`, `/status`, `/`), which answers one request per connection and
//! closes. Written by hand on purpose: the tests see the bytes the endpoint sends.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::PATIENCE;

/// An HTTP answer: its status code, its head (status line and headers, lower-cased so a test
/// can look for `content-type: ...` whatever the server's case) and its body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// Sends `METHOD path HTTP/1.1` to `addr` and reads the answer to its end (bounded by
/// [`PATIENCE`]). Panics if none comes, or if it is not UTF-8 HTTP.
pub async fn http_request(addr: SocketAddr, method: &str, path: &str) -> HttpResponse {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        std::io::Result::Ok(String::from_utf8(response).expect("UTF-8 response"))
    };
    let response = tokio::time::timeout(PATIENCE, exchange)
        .await
        .expect("HTTP answer in time")
        .expect("HTTP exchange");
    let (head, body) = response.split_once("\r\n\r\n").expect("a response head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    HttpResponse {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_string(),
    }
}
