//! The PROXY protocol against the real implementations (design §11), each run on loopback ports
//! of its own, by the test, and ended by its PID:
//!
//! | sender                          | receiver                               | versions |
//! |---------------------------------|----------------------------------------|----------|
//! | HAProxy `send-proxy`(`-v2`)     | stickylb `acceptProxyProtocol`         | v1, v2   |
//! | stickylb `proxyProtocol`        | HAProxy `accept-proxy` (reports `src`) | v1, v2   |
//! | stickylb `proxyProtocol`        | nginx stream `listen ... proxy_protocol` (`$proxy_protocol_addr`) | v1, v2 |
//! | stickylb `proxyProtocol: "v1"`  | a Node.js server parsing v1 by hand    | v1       |
//!
//! HAProxy and nginx come from Debian packages, Node.js with the machine (`scripts/test` installs
//! what is missing); without them these tests skip with a line, or fail under `scripts/test`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use stickylb_testkit::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Waits (bounded) until something accepts connections at `addr`.
async fn listening(addr: SocketAddr, what: &str, process: &mut Process) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return;
        }
        if let Ok(Some(status)) = process.0.try_wait() {
            panic!("{what} exited before listening on {addr}: {status}");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} never listened on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts `program args` with its output in `dir`, as a [`Process`] killed on drop.
fn spawn(dir: &TempDir, program: &str, args: &[&str]) -> Process {
    let log = std::fs::File::create(dir.path(&format!("{program}.log"))).unwrap();
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {program}: {e}"));
    Process(child)
}

/// HAProxy in front: every client, through HAProxy's `send-proxy` (`v1`) or `send-proxy-v2`,
/// reaches the target it reaches directly, because stickylb hashes the address in the header,
/// not HAProxy's.
async fn haproxy_in_front(option: &str) {
    if !require_tool("haproxy") {
        return;
    }
    let mut backends = Vec::new();
    for name in ["a", "b", "c", "d"] {
        backends.push(Backend::start(name, Mode::Named).await);
    }
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let direct = start(&addrs, serde_json::json!({}));
    let behind = start(
        &addrs,
        serde_json::json!({"acceptProxyProtocol": ["127.0.0.1/32"]}),
    );
    let front = dead_port();
    let dir = TempDir::new("haproxy-front");
    let config = format!(
        "global\n  maxconn 1000\n\
         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend fe\n  bind {front}\n  default_backend be\n\
         backend be\n  server lb {lb} {option}\n",
        lb = behind.local_addr()
    );
    let path = dir.path("haproxy.cfg");
    std::fs::write(&path, config).unwrap();
    let mut haproxy = spawn(&dir, "haproxy", &["-db", "-f", path.to_str().unwrap()]);
    listening(front, "haproxy", &mut haproxy).await;
    for i in 0..100 {
        let ip = client_ip(500 + i);
        let (home, _held) = which(ip, direct.local_addr()).await.unwrap();
        let (through, _c) = which(ip, front).await.unwrap();
        assert_eq!(through, home, "client {ip} through HAProxy {option}");
    }
    assert_eq!(behind.snapshot().rejected(stickylb::Reject::ProxyHeader), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_send_proxy_in_front_keeps_every_clients_own_stickiness() {
    haproxy_in_front("send-proxy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_send_proxy_v2_in_front_keeps_every_clients_own_stickiness() {
    haproxy_in_front("send-proxy-v2").await;
}

/// Sends one line (or request) from `ip` through the balancer at `lb` and reads the answer to
/// its end: what the server behind saw.
async fn ask(ip: Ipv4Addr, lb: SocketAddr, request: &[u8]) -> (String, SocketAddr) {
    let mut stream = connect_from(ip, lb).await.unwrap();
    let me = stream.local_addr().unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut answer))
        .await
        .expect("an answer in time")
        .expect("an answer");
    (answer, me)
}

/// The body of an HTTP response.
fn body(response: &str) -> &str {
    response
        .split_once("\r\n\r\n")
        .map_or(response, |(_, body)| body)
        .trim()
}

/// stickylb in front of HAProxy `accept-proxy`: HAProxy's `src` is the client.
async fn haproxy_behind(version: &str) {
    if !require_tool("haproxy") {
        return;
    }
    let port = dead_port();
    let dir = TempDir::new("haproxy-behind");
    let config = format!(
        "global\n  maxconn 1000\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend fe\n  bind {port} accept-proxy\n\
         \x20 http-request return status 200 content-type text/plain lf-string \"%[src]:%[src_port]\"\n"
    );
    let path = dir.path("haproxy.cfg");
    std::fs::write(&path, config).unwrap();
    let mut haproxy = spawn(&dir, "haproxy", &["-db", "-f", path.to_str().unwrap()]);
    // HAProxy with accept-proxy would refuse a bare connect's missing header: probe with one.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while TcpStream::connect(port).await.is_err() {
        if let Ok(Some(status)) = haproxy.0.try_wait() {
            panic!("haproxy exited: {status}");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "haproxy never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lb = start(&[port], serde_json::json!({"proxyProtocol": version}));
    for i in 0..20 {
        let (answer, me) = ask(
            client_ip(600 + i),
            lb.local_addr(),
            b"GET / HTTP/1.0\r\n\r\n",
        )
        .await;
        assert_eq!(body(&answer), me.to_string(), "HAProxy saw {answer:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_accept_proxy_behind_sees_the_client_with_v1() {
    haproxy_behind("v1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_accept_proxy_behind_sees_the_client_with_v2() {
    haproxy_behind("v2").await;
}

/// Where Debian's nginx keeps its dynamic modules.
const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// stickylb in front of nginx's stream module with `proxy_protocol`: nginx's
/// `$proxy_protocol_addr:$proxy_protocol_port` is the client.
async fn nginx_behind(version: &str) {
    if !require_tool("nginx") {
        return;
    }
    let port = dead_port();
    let dir = TempDir::new("nginx-behind");
    // Built in (`--with-stream`) or a dynamic module to load.
    let built = Command::new("nginx").arg("-V").output().unwrap();
    let load = if String::from_utf8_lossy(&built.stderr).contains("--with-stream ") {
        String::new()
    } else {
        assert!(
            Path::new(NGINX_STREAM_MODULE).exists(),
            "nginx has no stream module (Debian: libnginx-mod-stream)"
        );
        format!("load_module {NGINX_STREAM_MODULE};\n")
    };
    let prefix = dir.path("");
    let config = format!(
        "{load}daemon off;\nmaster_process off;\nworker_processes 1;\n\
         pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log info;\n\
         events {{ worker_connections 256; }}\n\
         stream {{\n  server {{\n    listen {port} proxy_protocol;\n\
         \x20   return \"$proxy_protocol_addr:$proxy_protocol_port\";\n  }}\n}}\n",
        prefix = prefix.display()
    );
    let path = dir.path("nginx.conf");
    std::fs::write(&path, config).unwrap();
    let mut nginx = spawn(
        &dir,
        "nginx",
        &["-p", prefix.to_str().unwrap(), "-c", path.to_str().unwrap()],
    );
    listening(port, "nginx", &mut nginx).await;
    let lb = start(&[port], serde_json::json!({"proxyProtocol": version}));
    for i in 0..20 {
        let (answer, me) = ask(client_ip(700 + i), lb.local_addr(), b"").await;
        assert_eq!(answer.trim(), me.to_string(), "nginx saw {answer:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_proxy_protocol_behind_sees_the_client_with_v1() {
    nginx_behind("v1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_proxy_protocol_behind_sees_the_client_with_v2() {
    nginx_behind("v2").await;
}

/// A Node.js server (built-in `net` only) that reads a v1 header by hand, as a worker of a
/// cluster behind stickylb would, and answers with the client it names.
const NODE_V1_READER: &str = r#"
const net = require('net');
const server = net.createServer((socket) => {
  let head = Buffer.alloc(0);
  const onData = (chunk) => {
    head = Buffer.concat([head, chunk]);
    const end = head.indexOf('\r\n');
    if (end < 0) { if (head.length > 107) socket.destroy(); return; }
    socket.removeListener('data', onData);
    const [proxy, family, src, dst, sport, dport] = head.slice(0, end).toString('latin1').split(' ');
    if (proxy !== 'PROXY' || (family !== 'TCP4' && family !== 'TCP6')) { socket.destroy(); return; }
    const rest = head.slice(end + 2).toString('latin1');
    socket.end(`${src}:${sport} after-header=${JSON.stringify(rest)}\n`);
  };
  socket.on('data', onData);
});
server.listen(Number(process.argv[2]), '127.0.0.1', () => console.log('listening'));
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodejs_server_reads_the_v1_header_by_hand_and_sees_the_client() {
    if !require_tool("node") {
        return;
    }
    let port = dead_port();
    let dir = TempDir::new("node-v1");
    let script = dir.path("reader.js");
    std::fs::write(&script, NODE_V1_READER).unwrap();
    let mut node = spawn(
        &dir,
        "node",
        &[script.to_str().unwrap(), &port.port().to_string()],
    );
    listening(port, "node", &mut node).await;
    let lb = start(&[port], serde_json::json!({"proxyProtocol": "v1"}));
    for i in 0..20 {
        let mut stream = connect_from(client_ip(800 + i), lb.local_addr())
            .await
            .unwrap();
        let me = stream.local_addr().unwrap();
        stream.write_all(b"hi").await.unwrap();
        let mut line = String::new();
        let mut reader = BufReader::new(&mut stream);
        tokio::time::timeout(PATIENCE, reader.read_line(&mut line))
            .await
            .expect("an answer in time")
            .unwrap();
        // The client's bytes may arrive with the header or after it: the header came first,
        // and what followed it in the same read is a prefix of them.
        let (who, after) = line.trim_end().split_once(' ').expect("two fields");
        assert_eq!(who, me.to_string());
        assert!(
            after == r#"after-header="hi""#
                || after == r#"after-header="h""#
                || after == r#"after-header="""#,
            "{after}"
        );
    }
}
