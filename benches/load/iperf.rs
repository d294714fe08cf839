//! The iperf3 scenarios: bulk upload measured with the tool users measure with (issue 18).
//!
//! `iperf<N>` runs `iperf3 -c` with N parallel streams (`-P N`) through the balancer for the
//! duration, with iperf3's default 128 KiB writes; `iperf<N>-<len>` passes `-l <len>` (e.g.
//! `iperf1-16k`: 16 KiB writes). The client binds one client address in 127.64.0.0/10 (`-B`),
//! so a sticky balancer sends the control connection and every data connection of the test to
//! the same target, where an `iperf3 -s` listens (benches/compare.sh starts one per target
//! port). The figures are iperf3's own (`-J`): bytes the server received and its Gbit/s, plus,
//! as for the other bulk scenarios, the balancer's and the whole machine's CPU over the window
//! from just before iperf3 starts to just after it exits, per GB received.
//!
//! Bounded: iperf3 runs for the duration and is killed (by its PID) if it has not exited 30 s
//! after that.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::client::{client_ip, round, Ctx, Window};

/// Streams and write length of an `iperf<N>[-<len>]` scenario name.
pub fn parse(scenario: &str) -> Option<(usize, Option<&str>)> {
    let rest = scenario.strip_prefix("iperf")?;
    let (streams, len) = match rest.split_once('-') {
        Some((n, len)) if !len.is_empty() => (n, Some(len)),
        Some(_) => return None,
        None => (rest, None),
    };
    let streams: usize = streams.parse().ok().filter(|&n| (1..=128).contains(&n))?;
    Some((streams, len))
}

pub fn iperf(ctx: &Ctx, streams: usize, len: Option<&str>) -> Result<Map<String, Value>, String> {
    let i = 11;
    let target = ctx.target_for(i);
    let secs = ctx.args.duration.max(1.0);
    let mut cmd = Command::new("iperf3");
    cmd.arg("-c")
        .arg(target.ip().to_string())
        .arg("-p")
        .arg(target.port().to_string())
        .arg("-B")
        .arg(client_ip(i).to_string())
        .arg("-t")
        .arg(format!("{secs}"))
        .arg("-P")
        .arg(streams.to_string())
        .arg("-J");
    if let Some(len) = len {
        cmd.arg("-l").arg(len);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let window = Window::begin(ctx);
    let mut child = cmd.spawn().map_err(|e| format!("cannot run iperf3: {e}"))?;
    // Read stdout on a thread, so a large JSON document never blocks iperf3 on a full pipe.
    let mut stdout = child.stdout.take().ok_or("no stdout from iperf3")?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + Duration::from_secs_f64(secs + 30.0);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                // SAFETY: kill(2) of the child we spawned (not yet reaped, so its PID is ours).
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
                let _ = child.wait();
                break None;
            }
        }
    };
    let measured = window.end(ctx);
    let text = reader.join().unwrap_or_default();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let Some(status) = status else {
        return Err(format!("iperf3 did not finish within {} s", secs + 30.0));
    };
    let doc: Value = serde_json::from_str(&text).map_err(|e| {
        format!("iperf3 -J output is not JSON ({e}); exit {status}; stderr: {stderr}")
    })?;
    if let Some(error) = doc.get("error").and_then(Value::as_str) {
        return Err(format!("iperf3: {error}"));
    }
    let end = doc.get("end").ok_or("iperf3 -J output has no \"end\"")?;
    let get = |path: &[&str]| -> Option<f64> {
        let mut v = end;
        for p in path {
            v = v.get(p)?;
        }
        v.as_f64()
    };
    let bytes = get(&["sum_received", "bytes"]).ok_or("no end.sum_received.bytes")?;
    let gbit = get(&["sum_received", "bits_per_second"]).unwrap_or(0.0) / 1e9;
    let gb = bytes / 1e9;
    let mut m = Map::new();
    m.insert("streams".into(), json!(streams));
    m.insert("write_len".into(), json!(len.unwrap_or("128K")));
    m.insert("window_s".into(), json!(round(measured.secs, 3)));
    m.insert(
        "iperf_seconds".into(),
        json!(get(&["sum_received", "seconds"]).map(|s| round(s, 3))),
    );
    m.insert("bytes".into(), json!(bytes as u64));
    m.insert(
        "bytes_sent".into(),
        json!(get(&["sum_sent", "bytes"]).map(|b| b as u64)),
    );
    m.insert("gbit_s".into(), json!(round(gbit, 3)));
    m.insert(
        "retransmits".into(),
        json!(get(&["sum_sent", "retransmits"]).map(|r| r as u64)),
    );
    m.insert("errors".into(), json!(u64::from(!status.success())));
    measured.insert_costs(&mut m, "per_gb", gb, 1.0);
    Ok(m)
}
