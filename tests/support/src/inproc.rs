//! Balancers in the test's own runtime, each on a fresh `127.0.0.1:0` listener, as mini-redis
//! tests its server: the test reads the balancer's counters and target states directly
//! ([`Server::snapshot`]) besides what its clients see. And the JSON of a test config
//! ([`config_text`], [`config_json`] with [`target_json`]).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};
use stickylb::config::Config;
use stickylb::server::{self, Server};

use crate::PATIENCE;

/// The JSON text of a config with `targets` on loopback and the given extra keys: listening
/// on 127.0.0.1 (its `sourcePort` 1 is replaced by whoever binds it), metrics off.
pub fn config_text(targets: &[SocketAddr], extra: Value) -> String {
    let targets = targets
        .iter()
        .map(|a| json!({"host": a.ip().to_string(), "port": a.port()}))
        .collect();
    config_json(targets, extra)
}

/// As [`config_text`], with each target given whole as JSON (see [`target_json`]).
pub fn config_json(targets: Vec<Value>, extra: Value) -> String {
    let config = json!({
        "sourceHost": "127.0.0.1",
        "sourcePort": 1,
        "metricsPort": null,
        "targets": targets,
    });
    serde_json::to_string_pretty(&with(config, extra)).expect("json")
}

/// A target of a config: `addr` with the identity `id` and the extra keys `more`
/// (`{"drain": true}`, `{"healthCheck": false}`, ...).
pub fn target_json(addr: SocketAddr, id: &str, more: Value) -> Value {
    with(
        json!({"host": addr.ip().to_string(), "port": addr.port(), "id": id}),
        more,
    )
}

/// `object` with the keys of `extra` added (replacing those it has).
fn with(mut object: Value, extra: Value) -> Value {
    if let (Some(object), Some(extra)) = (object.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            object.insert(k.clone(), v.clone());
        }
    }
    object
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
