//! Balancers in the test's own runtime, each on a fresh `127.0.0.1:0` listener, as mini-redis
//! tests its server: the test reads the balancer's counters and target states directly
//! ([`Server::snapshot`]) besides what its clients see. And the JSON of a test config.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use stickylb::config::Config;
use stickylb::server::{self, Server};

use crate::PATIENCE;

/// The JSON text of a config with `targets` on loopback and the given extra keys: listening
/// on 127.0.0.1 (its `sourcePort` 1 is replaced by whoever binds it), metrics off.
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

/// The config of [`config_text`], parsed and validated.
pub fn config(targets: &[SocketAddr], extra: serde_json::Value) -> Config {
    Config::parse(Path::new("test.json"), &config_text(targets, extra)).expect("valid test config")
}

/// Starts a balancer in this runtime on a fresh loopback port.
pub fn start(targets: &[SocketAddr], extra: serde_json::Value) -> Arc<Server> {
    start_at("127.0.0.1:0".parse().unwrap(), targets, extra)
}

/// Starts a balancer in this runtime listening on `listen` (`[::1]:0`, say).
pub fn start_at(
    listen: SocketAddr,
    targets: &[SocketAddr],
    extra: serde_json::Value,
) -> Arc<Server> {
    let listener = server::bind(listen).expect("bind balancer");
    Arc::new(Server::start(config(targets, extra), listener).expect("start balancer"))
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

/// Waits (bounded) until the balancer has no open client connection: nothing leaked.
pub async fn wait_drained(server: &Server) {
    assert!(
        server.drain(PATIENCE).await,
        "{} connections still open after every peer went away",
        server.active()
    );
}
