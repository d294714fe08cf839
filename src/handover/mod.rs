//! The handover format: what a running stickylb sends the new process of an upgrade (design
//! §13), and what the new process answers. The protocol that drives it is in the upgrade
//! coordinator (`src/upgrade/`); this leaf only says how each message looks on the wire, so
//! that the format has one definition, versioned, and its tests.
//!
//! # Messages
//!
//! Each message is a frame ([`frame`]: a 12-byte header, the payload, and any file
//! descriptors passed with SCM_RIGHTS). In order, old process → new process:
//!
//! | kind | message | payload | descriptors |
//! |---|---|---|---|
//! | 1 | [`Hello`] | format version, who sends, the binary's path, the config file's path and text, the listeners' roles | the listening sockets (balancer, metrics) |
//! | 2 | [`Batch`] | a sequence number, whether it comes after the commit, [`Connection`] records | both sockets of each connection, and each pipe that holds bytes |
//! | 3 | [`State`] | the clock, counters, histograms, targets (with the status page's history), sessions, the last reload | |
//! | 4 | commit | empty: the new process takes over now | |
//! | 6 | final [`State`] | the old process's counters when it exits (the new one adds what they grew by since kind 3) | |
//!
//! (Kind 5 is reserved. An old process that gives up kills the new one: it never has to be
//! told.)
//!
//! and new process → old process (the [`Reply`]s, whose layout never changes, so that every
//! old version understands every new one's answer):
//!
//! | kind | reply | payload |
//! |---|---|---|
//! | 64 | prepared | pid `u32`, version label |
//! | 65 | refused | the reason (UTF-8) |
//! | 66 | ready | pid `u32` |
//! | 67 | taken | the sequence number of a batch sent after the commit, `u32` |
//!
//! # Encoding
//!
//! Little-endian integers; a length or count is a `u32`; bytes and strings (UTF-8) are their
//! length then their bytes; an IP address is its family (`4` or `6`) then 4 or 16 bytes; a
//! socket address is an IP address then the port (`u16`); a descriptor is a `u16` index into
//! the frame's descriptors, each used once. Every record ([`Connection`], a direction, a
//! target, a session, a histogram) is preceded by its length, so a reader skips the fields a
//! later version appended to it. Counters travel by name (`"accepted"`, `"bytes_to_target"`,
//! ...): a counter a reader does not know is skipped, one the writer did not have starts at 0.
//!
//! # Versions
//!
//! [`Hello`] starts with two `u16`s that no version will ever move: the format version of the
//! sender ([`VERSION`]) and the oldest reader version that can read it ([`MIN_READER`]). A
//! reader accepts a handover when the sender's version is at least [`OLDEST_READABLE`] and
//! the sender's minimum reader is at most its own [`VERSION`]; then it reads every later
//! message as the sender's version wrote it. So version N+1 reads version N's handover (it
//! keeps the code to read N; N's records simply lack N+1's appended fields), and version N
//! reads N+1's as long as N+1 only appended fields (N+1 then keeps [`MIN_READER`] at N).
//! A change that an older reader would misread raises [`MIN_READER`]: the older version then
//! refuses the handover cleanly (reply 65, with the versions in the reason), and the old
//! process keeps running.
//!
//! Version 1 was the first. Version 2 appended the status page's history (design §15): to
//! each target record, when its state last changed, its last connect failure and health check
//! (time and fault code) and whether it was draining; to the state record, the last reload's
//! time and error. Version 1 readers skip them (so [`MIN_READER`] stays 1); read from a
//! version 1 sender they are absent ([`Target::history`], [`State::last_reload`] are `None`),
//! and that history starts again at the upgrade, as it did before.

pub mod frame;
pub mod wire;

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;

pub use wire::{DecodeError, Decoder, Encoder};

/// The format version this build writes.
pub const VERSION: u16 = 2;

/// The oldest reader that can read what this build writes.
pub const MIN_READER: u16 = 1;

/// The oldest format this build reads.
pub const OLDEST_READABLE: u16 = 1;

/// Frame kinds (see the tables above).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Batch = 2,
    State = 3,
    Commit = 4,
    Final = 6,
    Prepared = 64,
    Refused = 65,
    Ready = 66,
    Taken = 67,
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Batch,
            3 => Kind::State,
            4 => Kind::Commit,
            6 => Kind::Final,
            64 => Kind::Prepared,
            65 => Kind::Refused,
            66 => Kind::Ready,
            67 => Kind::Taken,
            _ => return None,
        })
    }
}

/// What a listening socket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// The balancer's listener (`sourceHost:sourcePort`).
    Balancer = 1,
    /// The admin endpoint's (`metricsHost:metricsPort`).
    Admin = 2,
}

/// The first message: who hands over what. Its fds are the listeners, in `listeners` order.
#[derive(Debug)]
pub struct Hello<F> {
    /// The sender's format version ([`VERSION`] when this build sends it).
    pub version: u16,
    /// The oldest reader that can read the sender's messages.
    pub min_reader: u16,
    /// The old process.
    pub pid: u32,
    /// Its version label (`0.1.0+tag`).
    pub build: String,
    /// The path the old process was started from: the new one upgrades from it in turn.
    pub exe: PathBuf,
    /// The config file the old process runs, and the text it last applied.
    pub config_path: PathBuf,
    pub config_text: String,
    pub listeners: Vec<(Role, F)>,
}

impl Hello<RawFd> {
    pub fn encode(&self) -> Encoder {
        use std::os::unix::ffi::OsStrExt;
        let mut e = Encoder::new();
        e.u16(self.version);
        e.u16(self.min_reader);
        e.record(|e| {
            e.u32(self.pid);
            e.str(&self.build);
            e.bytes(self.exe.as_os_str().as_bytes());
            e.bytes(self.config_path.as_os_str().as_bytes());
            e.str(&self.config_text);
            e.count(self.listeners.len());
            for (role, fd) in &self.listeners {
                e.u8(*role as u8);
                e.fd(*fd);
            }
        });
        e
    }
}

impl Hello<OwnedFd> {
    /// Reads a hello, refusing a format this build cannot read.
    pub fn decode(payload: &[u8], fds: Vec<OwnedFd>) -> Result<Hello<OwnedFd>, DecodeError> {
        use std::os::unix::ffi::OsStrExt;
        let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
        let mut d = Decoder::new(payload, &mut fds);
        let version = d.u16("hello: format version")?;
        let min_reader = d.u16("hello: oldest reader")?;
        readable(version, min_reader)?;
        d.record("hello", |d| {
            let pid = d.u32("hello: pid")?;
            let build = d.str("hello: version label")?.to_string();
            let exe = PathBuf::from(std::ffi::OsStr::from_bytes(d.bytes("hello: binary")?));
            let config_path =
                PathBuf::from(std::ffi::OsStr::from_bytes(d.bytes("hello: config path")?));
            let config_text = d.str("hello: config text")?.to_string();
            let n = d.count(3, "hello: listeners")?;
            let mut listeners = Vec::with_capacity(n);
            for _ in 0..n {
                let role = match d.u8("hello: listener role")? {
                    1 => Role::Balancer,
                    2 => Role::Admin,
                    other => {
                        return Err(DecodeError::invalid(
                            "hello: listener role",
                            format!("unknown role {other}"),
                        ))
                    }
                };
                listeners.push((role, d.fd("hello: listener")?));
            }
            Ok(Hello {
                version,
                min_reader,
                pid,
                build,
                exe,
                config_path,
                config_text,
                listeners,
            })
        })
    }
}

/// Whether this build reads a handover of format `version` whose oldest reader is
/// `min_reader`.
pub fn readable(version: u16, min_reader: u16) -> Result<(), DecodeError> {
    if version < OLDEST_READABLE || min_reader > VERSION {
        return Err(DecodeError::invalid(
            "hello",
            format!(
                "the running process hands over in format version {version} (readable by \
                 version {min_reader} and later); this build reads versions {OLDEST_READABLE} \
                 to {VERSION}"
            ),
        ));
    }
    Ok(())
}

/// One established connection, stopped between two polls of its relay.
#[derive(Debug)]
pub struct Connection<F> {
    /// The client's socket and the target's.
    pub client: F,
    pub server: F,
    /// The client: the peer, or the one a trusted upstream's PROXY header named.
    pub peer: SocketAddr,
    /// The target's identity.
    pub target: String,
    /// Whether the connection holds an open count in its client's sticky session.
    pub pinned: bool,
    /// Microseconds since the connection was accepted.
    pub age_us: u64,
    /// Microseconds since it was proxied (the access log's duration), when that is measured.
    pub proxied_us: Option<u64>,
    /// Bytes delivered so far, each way.
    pub to_target: u64,
    pub to_client: u64,
    /// Milliseconds since a byte last moved either way (`idleTimeout`), when measured.
    pub quiet_ms: Option<u64>,
    /// Client → target, and target → client.
    pub up: Direction<F>,
    pub down: Direction<F>,
}

/// One direction of a connection.
#[derive(Debug)]
pub struct Direction<F> {
    /// It moves bytes by splice(2) now (else by a userspace copy).
    pub splice: bool,
    /// It may splice.
    pub may_splice: bool,
    /// Its source sent FIN, and the FIN was passed on.
    pub ended: bool,
    /// What it read and has not written yet.
    pub held: Held<F>,
}

/// Bytes a direction holds in flight.
#[derive(Debug)]
pub enum Held<F> {
    Nothing,
    /// Bytes of the copy buffer not yet written.
    Bytes(Vec<u8>),
    /// A splice pipe (both ends) holding `len` bytes, passed as it is.
    Pipe {
        read: F,
        write: F,
        len: u32,
    },
}

impl<F> Connection<F> {
    /// Descriptors this connection takes in a frame.
    pub fn fd_count(&self) -> usize {
        2 + self.up.held.fd_count() + self.down.held.fd_count()
    }
}

impl<F> Held<F> {
    fn fd_count(&self) -> usize {
        match self {
            Held::Pipe { .. } => 2,
            _ => 0,
        }
    }
}

const NONE: u64 = u64::MAX;

impl Connection<RawFd> {
    pub fn encode(&self, e: &mut Encoder) {
        e.record(|e| {
            e.fd(self.client);
            e.fd(self.server);
            e.addr(self.peer);
            e.str(&self.target);
            e.bool(self.pinned);
            e.u64(self.age_us);
            e.u64(self.proxied_us.unwrap_or(NONE));
            e.u64(self.to_target);
            e.u64(self.to_client);
            e.u64(self.quiet_ms.unwrap_or(NONE));
            self.up.encode(e);
            self.down.encode(e);
        });
    }
}

impl Direction<RawFd> {
    fn encode(&self, e: &mut Encoder) {
        e.record(|e| {
            e.bool(self.splice);
            e.bool(self.may_splice);
            e.bool(self.ended);
            match &self.held {
                Held::Nothing => e.u8(0),
                Held::Bytes(bytes) => {
                    e.u8(1);
                    e.bytes(bytes);
                }
                Held::Pipe { read, write, len } => {
                    e.u8(2);
                    e.fd(*read);
                    e.fd(*write);
                    e.u32(*len);
                }
            }
        });
    }
}

impl Connection<OwnedFd> {
    fn decode(d: &mut Decoder<'_>) -> Result<Connection<OwnedFd>, DecodeError> {
        d.record("connection", |d| {
            let optional = |v: u64| (v != NONE).then_some(v);
            Ok(Connection {
                client: d.fd("connection: client socket")?,
                server: d.fd("connection: target socket")?,
                peer: d.addr("connection: client address")?,
                target: d.str("connection: target")?.to_string(),
                pinned: d.bool("connection: pinned")?,
                age_us: d.u64("connection: age")?,
                proxied_us: optional(d.u64("connection: proxied for")?),
                to_target: d.u64("connection: bytes to target")?,
                to_client: d.u64("connection: bytes to client")?,
                quiet_ms: optional(d.u64("connection: quiet for")?),
                up: Direction::decode(d)?,
                down: Direction::decode(d)?,
            })
        })
    }
}

impl Direction<OwnedFd> {
    fn decode(d: &mut Decoder<'_>) -> Result<Direction<OwnedFd>, DecodeError> {
        d.record("direction", |d| {
            let splice = d.bool("direction: splice")?;
            let may_splice = d.bool("direction: may splice")?;
            let ended = d.bool("direction: ended")?;
            let held = match d.u8("direction: held")? {
                0 => Held::Nothing,
                1 => Held::Bytes(d.bytes("direction: buffer")?.to_vec()),
                2 => Held::Pipe {
                    read: d.fd("direction: pipe")?,
                    write: d.fd("direction: pipe")?,
                    len: d.u32("direction: pipe length")?,
                },
                other => {
                    return Err(DecodeError::invalid(
                        "direction: held",
                        format!("unknown kind {other}"),
                    ))
                }
            };
            Ok(Direction {
                splice,
                may_splice,
                ended,
                held,
            })
        })
    }
}

/// A batch of connections (one frame, at most [`frame::MAX_FDS`] descriptors).
#[derive(Debug)]
pub struct Batch<F> {
    /// Numbers the batches of one handover, from 0.
    pub seq: u32,
    /// Sent after the commit: the new process resumes it at once and answers `taken`.
    pub late: bool,
    pub connections: Vec<Connection<F>>,
}

impl Batch<RawFd> {
    /// Encodes the batch; the encoder's descriptors go with the frame.
    pub fn encode(&self) -> Encoder {
        let mut e = Encoder::new();
        e.record(|e| {
            e.u32(self.seq);
            e.bool(self.late);
            e.count(self.connections.len());
            for c in &self.connections {
                c.encode(e);
            }
        });
        e
    }
}

impl Batch<OwnedFd> {
    pub fn decode(payload: &[u8], fds: Vec<OwnedFd>) -> Result<Batch<OwnedFd>, DecodeError> {
        let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
        let mut d = Decoder::new(payload, &mut fds);
        d.record("batch", |d| {
            let seq = d.u32("batch: sequence")?;
            let late = d.bool("batch: late")?;
            let n = d.count(4, "batch: connections")?;
            let mut connections = Vec::with_capacity(n);
            for _ in 0..n {
                connections.push(Connection::decode(d)?);
            }
            Ok(Batch {
                seq,
                late,
                connections,
            })
        })
    }
}

/// The runtime state that outlives connections: sent once every connection that could be
/// stopped was (so the counts are those of a quiet moment), and again as the final counts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct State {
    /// The old process's clock (milliseconds, see `clock.rs`) when the state was taken, and
    /// `CLOCK_MONOTONIC` then (nanoseconds): the new process's clock goes on from there, so
    /// deactivation windows and session times carry over unchanged.
    pub clock_ms: u64,
    pub monotonic_ns: u64,
    /// Process-wide counters by name.
    pub counters: Vec<(String, u64)>,
    pub last_reload_failed: bool,
    /// Process-wide histograms by name.
    pub histograms: Vec<Histogram>,
    /// Every target identity known (listed, or removed and still draining).
    pub targets: Vec<Target>,
    pub sessions: Vec<Session>,
    /// The last reload attempt (version 2; `None` before any, or from a version 1 sender).
    pub last_reload: Option<Reload>,
}

/// How the last reload attempt ended: when (old clock, ms) and, if it was rejected, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reload {
    pub at_ms: u64,
    pub error: Option<String>,
}

/// A histogram's counts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Histogram {
    pub name: String,
    /// Upper bounds of the buckets in microseconds; `counts` has one more (`+Inf`).
    pub bounds_us: Vec<u64>,
    pub counts: Vec<u64>,
    pub sum_us: u64,
}

/// One target identity's runtime state.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Target {
    pub id: String,
    /// Listed in the old process's config (false: removed, still draining).
    pub present: bool,
    /// Until when (old clock, ms) it is deactivated; 0: never.
    pub deactivated_until_ms: u64,
    /// The health check's verdict: 0 unchecked, 1 up, 2 down.
    pub health: u8,
    /// Its counters by name.
    pub counters: Vec<(String, u64)>,
    pub connect_duration: Histogram,
    /// What the status page shows of its past (version 2; `None` from a version 1 sender).
    pub history: Option<History>,
}

/// A target's history as the status page shows it (design §15). Times are the old clock's
/// (ms); a fault is its code (`sockets::Fault::code`, stable across versions: a code a reader
/// does not know reads as no failure).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct History {
    /// When its state (up, down, draining, removed) last changed by an event.
    pub changed_ms: u64,
    /// The last failed connect of a client: when, and the fault.
    pub last_failure: Option<(u64, u8)>,
    /// The last health check: when, and 0 (passed) or the fault.
    pub last_check: Option<(u64, u8)>,
    /// Draining in the old process's config: the new config's `drain` then counts as a change
    /// only where it differs.
    pub drain: bool,
}

impl History {
    fn encode(&self, e: &mut Encoder) {
        let moment = |e: &mut Encoder, m: Option<(u64, u8)>| {
            let (at, code) = m.unwrap_or((0, 0));
            e.u64(at);
            e.u8(code);
        };
        e.u64(self.changed_ms);
        moment(e, self.last_failure);
        moment(e, self.last_check);
        e.bool(self.drain);
    }

    fn decode(d: &mut Decoder<'_>) -> Result<History, DecodeError> {
        // A time of 0 is "never": the clock never records an event at 0 (see `target.rs`).
        let moment = |d: &mut Decoder<'_>, what| -> Result<Option<(u64, u8)>, DecodeError> {
            let at = d.u64(what)?;
            let code = d.u8(what)?;
            Ok((at != 0).then_some((at, code)))
        };
        Ok(History {
            changed_ms: d.u64("target: changed")?,
            last_failure: moment(d, "target: last failure")?,
            last_check: moment(d, "target: last check")?,
            drain: d.bool("target: draining")?,
        })
    }
}

/// One client's sticky session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The client (its address masked to `clientPrefix`).
    pub client: IpAddr,
    /// Index into [`State::targets`].
    pub target: u32,
    /// Connections of this client that were open in the old process.
    pub open: u32,
    /// When its last connection closed (old clock, ms).
    pub last_close_ms: u64,
}

impl State {
    pub fn encode(&self) -> Encoder {
        let mut e = Encoder::new();
        e.record(|e| {
            e.u64(self.clock_ms);
            e.u64(self.monotonic_ns);
            encode_counters(e, &self.counters);
            e.bool(self.last_reload_failed);
            e.count(self.histograms.len());
            for h in &self.histograms {
                h.encode(e);
            }
            e.count(self.targets.len());
            for t in &self.targets {
                e.record(|e| {
                    e.str(&t.id);
                    e.bool(t.present);
                    e.u64(t.deactivated_until_ms);
                    e.u8(t.health);
                    encode_counters(e, &t.counters);
                    t.connect_duration.encode(e);
                    if let Some(history) = &t.history {
                        history.encode(e);
                    }
                });
            }
            e.count(self.sessions.len());
            for s in &self.sessions {
                e.record(|e| {
                    e.ip(s.client);
                    e.u32(s.target);
                    e.u32(s.open);
                    e.u64(s.last_close_ms);
                });
            }
            e.bool(self.last_reload.is_some());
            if let Some(r) = &self.last_reload {
                e.u64(r.at_ms);
                e.bool(r.error.is_some());
                e.str(r.error.as_deref().unwrap_or(""));
            }
        });
        e
    }

    pub fn decode(payload: &[u8]) -> Result<State, DecodeError> {
        let mut d = Decoder::new(payload, &mut []);
        d.record("state", |d| {
            let clock_ms = d.u64("state: clock")?;
            let monotonic_ns = d.u64("state: monotonic clock")?;
            let counters = decode_counters(d, "state: counters")?;
            let last_reload_failed = d.bool("state: last reload failed")?;
            let n = d.count(4, "state: histograms")?;
            let mut histograms = Vec::with_capacity(n);
            for _ in 0..n {
                histograms.push(Histogram::decode(d)?);
            }
            let n = d.count(4, "state: targets")?;
            let mut targets = Vec::with_capacity(n);
            for _ in 0..n {
                targets.push(d.record("target", |d| {
                    Ok(Target {
                        id: d.str("target: id")?.to_string(),
                        present: d.bool("target: listed")?,
                        deactivated_until_ms: d.u64("target: deactivated until")?,
                        health: d.u8("target: health")?,
                        counters: decode_counters(d, "target: counters")?,
                        connect_duration: Histogram::decode(d)?,
                        // Version 2 on: what is left of the record (a version 1 sender: none).
                        history: match d.is_empty() {
                            true => None,
                            false => Some(History::decode(d)?),
                        },
                    })
                })?);
            }
            let n = d.count(4, "state: sessions")?;
            let mut sessions = Vec::with_capacity(n);
            for _ in 0..n {
                let session = d.record("session", |d| {
                    Ok(Session {
                        client: d.ip("session: client")?,
                        target: d.u32("session: target")?,
                        open: d.u32("session: open")?,
                        last_close_ms: d.u64("session: last close")?,
                    })
                })?;
                if session.target as usize >= targets.len() {
                    return Err(DecodeError::invalid(
                        "session: target",
                        format!("target {} of {}", session.target, targets.len()),
                    ));
                }
                sessions.push(session);
            }
            // Version 2 on (a version 1 sender's record ends here).
            let last_reload = match d.is_empty() || !d.bool("state: reloaded")? {
                true => None,
                false => {
                    let at_ms = d.u64("state: last reload")?;
                    let failed = d.bool("state: last reload failed")?;
                    let error = d.str("state: last reload's error")?;
                    Some(Reload {
                        at_ms,
                        error: failed.then(|| error.to_string()),
                    })
                }
            };
            Ok(State {
                clock_ms,
                monotonic_ns,
                counters,
                last_reload_failed,
                histograms,
                targets,
                sessions,
                last_reload,
            })
        })
    }
}

impl Histogram {
    fn encode(&self, e: &mut Encoder) {
        e.record(|e| {
            e.str(&self.name);
            e.count(self.bounds_us.len());
            for b in &self.bounds_us {
                e.u64(*b);
            }
            e.count(self.counts.len());
            for c in &self.counts {
                e.u64(*c);
            }
            e.u64(self.sum_us);
        });
    }

    fn decode(d: &mut Decoder<'_>) -> Result<Histogram, DecodeError> {
        d.record("histogram", |d| {
            let name = d.str("histogram: name")?.to_string();
            let n = d.count(8, "histogram: bounds")?;
            let bounds_us = (0..n)
                .map(|_| d.u64("histogram: bound"))
                .collect::<Result<Vec<_>, _>>()?;
            let n = d.count(8, "histogram: counts")?;
            let counts = (0..n)
                .map(|_| d.u64("histogram: count"))
                .collect::<Result<Vec<_>, _>>()?;
            if counts.len() != bounds_us.len() + 1 {
                return Err(DecodeError::invalid(
                    "histogram",
                    format!(
                        "{name}: {} counts for {} bounds",
                        counts.len(),
                        bounds_us.len()
                    ),
                ));
            }
            Ok(Histogram {
                name,
                bounds_us,
                counts,
                sum_us: d.u64("histogram: sum")?,
            })
        })
    }
}

fn encode_counters(e: &mut Encoder, counters: &[(String, u64)]) {
    e.count(counters.len());
    for (name, value) in counters {
        e.str(name);
        e.u64(*value);
    }
}

fn decode_counters(
    d: &mut Decoder<'_>,
    what: &'static str,
) -> Result<Vec<(String, u64)>, DecodeError> {
    let n = d.count(12, what)?;
    (0..n)
        .map(|_| Ok((d.str(what)?.to_string(), d.u64(what)?)))
        .collect()
}

/// An answer of the new process. Its layout is frozen (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The hello was read, the config loaded and the listeners taken: send the connections.
    Prepared { pid: u32, build: String },
    /// The new process cannot take over, and exits.
    Refused(String),
    /// Every connection and the state were read and checked: commit or abort.
    Ready { pid: u32 },
    /// A batch sent after the commit was resumed.
    Taken { seq: u32 },
}

impl Reply {
    /// The frame kind and payload.
    pub fn encode(&self) -> (Kind, Vec<u8>) {
        let mut e = Encoder::new();
        let kind = match self {
            Reply::Prepared { pid, build } => {
                e.u32(*pid);
                e.str(build);
                Kind::Prepared
            }
            Reply::Refused(reason) => {
                e.str(reason);
                Kind::Refused
            }
            Reply::Ready { pid } => {
                e.u32(*pid);
                Kind::Ready
            }
            Reply::Taken { seq } => {
                e.u32(*seq);
                Kind::Taken
            }
        };
        (kind, e.finish().0)
    }

    pub fn decode(kind: u8, payload: &[u8]) -> Result<Reply, DecodeError> {
        let mut d = Decoder::new(payload, &mut []);
        match Kind::from_u8(kind) {
            Some(Kind::Prepared) => Ok(Reply::Prepared {
                pid: d.u32("prepared: pid")?,
                build: d.str("prepared: version label")?.to_string(),
            }),
            Some(Kind::Refused) => Ok(Reply::Refused(d.str("refused: reason")?.to_string())),
            Some(Kind::Ready) => Ok(Reply::Ready {
                pid: d.u32("ready: pid")?,
            }),
            Some(Kind::Taken) => Ok(Reply::Taken {
                seq: d.u32("taken: batch")?,
            }),
            _ => Err(DecodeError::invalid(
                "reply",
                format!("frame kind {kind} is no reply"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn devnull() -> std::fs::File {
        std::fs::File::open("/dev/null").unwrap()
    }

    fn fds(files: &[std::fs::File]) -> Vec<OwnedFd> {
        files
            .iter()
            .map(|f| OwnedFd::from(f.try_clone().unwrap()))
            .collect()
    }

    #[test]
    fn a_hello_reads_back_and_a_format_this_build_cannot_read_is_refused() {
        let files = [devnull(), devnull()];
        let hello = Hello {
            version: VERSION,
            min_reader: MIN_READER,
            pid: 42,
            build: "0.1.0+a".into(),
            exe: "/usr/local/bin/stickylb".into(),
            config_path: "/etc/stickylb/config.json".into(),
            config_text: "{}".into(),
            listeners: vec![
                (Role::Balancer, files[0].as_raw_fd()),
                (Role::Admin, files[1].as_raw_fd()),
            ],
        };
        let (bytes, raw) = hello.encode().finish();
        assert_eq!(raw.len(), 2);
        let back = Hello::decode(&bytes, fds(&files)).unwrap();
        assert_eq!((back.pid, &back.build[..]), (42, "0.1.0+a"));
        assert_eq!(back.config_path, hello.config_path);
        assert_eq!(back.listeners[1].0, Role::Admin);

        // A later version that needs a newer reader, and one older than this build reads.
        for (version, min_reader) in [(VERSION + 1, VERSION + 1), (0, 0)] {
            let mut e = Encoder::new();
            e.u16(version);
            e.u16(min_reader);
            let (bytes, _) = e.finish();
            let err = Hello::decode(&bytes, Vec::new()).unwrap_err().to_string();
            assert!(err.contains("this build reads versions"), "{err}");
        }
        // A later version that only appended fields: still read.
        assert!(readable(VERSION + 1, VERSION).is_ok());
    }

    #[test]
    fn connections_read_back_with_their_bytes_pipes_and_flags() {
        let files = [devnull(), devnull(), devnull(), devnull()];
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        let batch = Batch {
            seq: 3,
            late: true,
            connections: vec![Connection {
                client: raw[0],
                server: raw[1],
                peer: "[2001:db8::1]:5000".parse().unwrap(),
                target: "worker-1".into(),
                pinned: true,
                age_us: 1_500_000,
                proxied_us: None,
                to_target: 10,
                to_client: 20,
                quiet_ms: Some(5),
                up: Direction {
                    splice: false,
                    may_splice: true,
                    ended: false,
                    held: Held::Bytes(b"half a request".to_vec()),
                },
                down: Direction {
                    splice: true,
                    may_splice: true,
                    ended: true,
                    held: Held::Pipe {
                        read: raw[2],
                        write: raw[3],
                        len: 4096,
                    },
                },
            }],
        };
        assert_eq!(batch.connections[0].fd_count(), 4);
        let (bytes, sent) = batch.encode().finish();
        assert_eq!(sent, raw);
        let back = Batch::decode(&bytes, fds(&files)).unwrap();
        assert_eq!((back.seq, back.late), (3, true));
        let c = &back.connections[0];
        assert_eq!(c.peer, batch.connections[0].peer);
        assert_eq!((c.target.as_str(), c.pinned), ("worker-1", true));
        assert_eq!((c.proxied_us, c.quiet_ms), (None, Some(5)));
        assert!(matches!(&c.up.held, Held::Bytes(b) if b == b"half a request"));
        assert!(matches!(c.down.held, Held::Pipe { len: 4096, .. }));
        assert!(c.down.ended && c.down.splice && !c.up.ended);

        // Missing descriptors are an error, not a panic.
        let err = Batch::decode(&bytes, fds(&files[..1])).unwrap_err();
        assert!(err.to_string().contains("descriptor 1 of 1"), "{err}");
    }

    #[test]
    fn state_reads_back_and_rejects_a_session_on_no_target() {
        let state = State {
            clock_ms: 1234,
            monotonic_ns: 99,
            counters: vec![("accepted".into(), 7)],
            last_reload_failed: true,
            histograms: vec![Histogram {
                name: "connection_duration".into(),
                bounds_us: vec![1, 2],
                counts: vec![1, 2, 3],
                sum_us: 10,
            }],
            targets: vec![Target {
                id: "a".into(),
                present: true,
                deactivated_until_ms: 60_000,
                health: 2,
                counters: vec![("bytes_to_target".into(), 5)],
                connect_duration: Histogram::default_for("connect_duration"),
                history: Some(History {
                    changed_ms: 700,
                    last_failure: Some((650, 3)),
                    last_check: None,
                    drain: true,
                }),
            }],
            sessions: vec![Session {
                client: "10.0.0.1".parse().unwrap(),
                target: 0,
                open: 1,
                last_close_ms: 0,
            }],
            last_reload: Some(Reload {
                at_ms: 900,
                error: Some("config.json: targets[0].port: bad".into()),
            }),
        };
        let (bytes, _) = state.encode().finish();
        assert_eq!(State::decode(&bytes).unwrap(), state);
        let mut bad = state.clone();
        bad.sessions[0].target = 1;
        let (bytes, _) = bad.encode().finish();
        assert!(State::decode(&bytes).is_err());
        // Truncated anywhere: an error, never a panic.
        let (bytes, _) = state.encode().finish();
        for len in 0..bytes.len() {
            assert!(State::decode(&bytes[..len]).is_err(), "{len}");
        }
        // A successful reload, and none.
        for last_reload in [
            Some(Reload {
                at_ms: 5,
                error: None,
            }),
            None,
        ] {
            let state = State {
                last_reload,
                ..state.clone()
            };
            let (bytes, _) = state.encode().finish();
            assert_eq!(State::decode(&bytes).unwrap(), state);
        }
    }

    #[test]
    fn a_version_1_state_reads_without_history() {
        // What version 1 wrote: the same records without the fields version 2 appended (a
        // target without history, and the state record one byte shorter: no reload flag).
        let state = State {
            clock_ms: 1,
            targets: vec![Target {
                id: "a".into(),
                present: true,
                connect_duration: Histogram::default_for("connect_duration"),
                ..Target::default()
            }],
            ..State::default()
        };
        let (mut bytes, _) = state.encode().finish();
        assert_eq!(bytes.pop(), Some(0), "the reload flag, false");
        let len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) - 1;
        bytes[..4].copy_from_slice(&len.to_le_bytes());
        let back = State::decode(&bytes).unwrap();
        assert_eq!(back, state);
        assert_eq!(
            (back.targets[0].history.as_ref(), back.last_reload),
            (None, None)
        );
    }

    #[test]
    fn replies_read_back() {
        for reply in [
            Reply::Prepared {
                pid: 1,
                build: "x".into(),
            },
            Reply::Refused("config: bad".into()),
            Reply::Ready { pid: 2 },
            Reply::Taken { seq: 9 },
        ] {
            let (kind, bytes) = reply.encode();
            assert_eq!(Reply::decode(kind as u8, &bytes).unwrap(), reply);
        }
        assert!(Reply::decode(Kind::Hello as u8, &[]).is_err());
    }

    impl Histogram {
        fn default_for(name: &str) -> Histogram {
            Histogram {
                name: name.into(),
                bounds_us: vec![],
                counts: vec![0],
                sum_us: 0,
            }
        }
    }
}
