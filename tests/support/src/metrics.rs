//! Scrapes of a balancer's `/metrics` as a test reads them: the value of one series, the
//! version `stickylb_build_info` names, and which counters went down between two scrapes.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::PATIENCE;

/// One scrape: every sample line as (series, value), the series written as the exposition
/// writes it (`name{label="value",...}`).
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub samples: Vec<(String, f64)>,
}

impl Scrape {
    /// The value of `name` with exactly `labels`, in the exposition's label order.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let series = if labels.is_empty() {
            name.to_string()
        } else {
            let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            format!("{name}{{{}}}", inner.join(","))
        };
        self.samples
            .iter()
            .find(|(s, _)| *s == series)
            .map(|(_, v)| *v)
    }

    /// The `version` label of `stickylb_build_info`.
    pub fn version(&self) -> Option<String> {
        self.samples.iter().find_map(|(s, _)| {
            s.strip_prefix("stickylb_build_info{version=\"")
                .and_then(|rest| rest.strip_suffix("\"}"))
                .map(str::to_string)
        })
    }

    /// Series that only ever grow: counters (`_total`) and histograms' `_bucket`, `_sum` and
    /// `_count`.
    pub fn monotonic(&self) -> impl Iterator<Item = &(String, f64)> {
        self.samples.iter().filter(|(s, _)| {
            let name = s.split('{').next().unwrap_or(s);
            ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .any(|suffix| name.ends_with(suffix))
        })
    }

    /// The series that are lower here than in `earlier`, as `series: before -> now`.
    pub fn backwards_since(&self, earlier: &Scrape) -> Vec<String> {
        self.monotonic()
            .filter_map(|(series, now)| {
                let before = earlier.value_of(series)?;
                (*now < before).then(|| format!("{series}: {before} -> {now}"))
            })
            .collect()
    }

    fn value_of(&self, series: &str) -> Option<f64> {
        self.samples
            .iter()
            .find(|(s, _)| s == series)
            .map(|(_, v)| *v)
    }
}

/// `GET /metrics` from `addr`, parsed.
pub async fn scrape(addr: SocketAddr) -> io::Result<Scrape> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: stickylb\r\n\r\n")
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, io::Error>(response)
    };
    let response = tokio::time::timeout(PATIENCE, exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer from /metrics"))??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other("no response head"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(io::Error::other(format!(
            "/metrics answered {}",
            head.lines().next().unwrap_or("")
        )));
    }
    let samples = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect();
    Ok(Scrape { samples })
}
