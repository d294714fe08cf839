//! How `stickylb upgrade` learns the outcome of the upgrade it asked for: a Unix stream socket
//! in the abstract namespace, `@stickylb-upgrade-<pid>`, that every running process listens on
//! (no file to create or clean up, nothing in the way of `ProtectSystem=strict`).
//!
//! The protocol is lines of text. On connecting, the process says where it stands:
//! `stickylb-upgrade 1 idle`, `... busy` (an upgrade is running), or `... handed <pid>` (it has
//! handed over to process `<pid>` and is finishing). The command then sends SIGUSR2 (the one
//! trigger of an upgrade) and waits for one line: `ok <pid> <version> <ms>` (process `<pid>`
//! took over, `<ms>` after the signal) or `failed <reason>` (this process keeps serving). The
//! command checks with `SO_PEERCRED` that the socket belongs to the process it signals, so no
//! other local process can answer in its place.
//!
//! Connecting changes nothing; at most [`MAX_WAITING`] commands wait at once.

use std::io::{self, BufRead, BufReader, Read};
use std::os::linux::net::SocketAddrExt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UnixListener;

/// Commands waiting for an outcome at once; one more is told `busy` and closed.
pub const MAX_WAITING: usize = 16;

/// The first word of the greeting, and the protocol version after it.
const GREETING: &str = "stickylb-upgrade 1";

/// The socket's name in the abstract namespace for process `pid`.
pub fn socket_name(pid: u32) -> String {
    format!("stickylb-upgrade-{pid}")
}

/// Where this process stands, as the greeting says it.
#[derive(Debug, Default)]
pub(super) struct Standing {
    /// 0: idle; 1: an upgrade runs; otherwise the pid this process handed over to.
    state: AtomicU32,
}

const IDLE: u32 = 0;
const BUSY: u32 = 1;

impl Standing {
    /// Marks an upgrade as running; false if one already was (or this process handed over).
    pub(super) fn begin(&self) -> bool {
        self.state
            .compare_exchange(IDLE, BUSY, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    pub(super) fn failed(&self) {
        self.state.store(IDLE, Ordering::SeqCst);
    }

    pub(super) fn handed(&self, pid: u32) {
        self.state.store(pid.max(2), Ordering::SeqCst);
    }

    fn greeting(&self) -> String {
        match self.state.load(Ordering::SeqCst) {
            IDLE => format!("{GREETING} idle\n"),
            BUSY => format!("{GREETING} busy\n"),
            pid => format!("{GREETING} handed {pid}\n"),
        }
    }
}

/// The commands waiting for the outcome.
#[derive(Debug, Default)]
pub(super) struct Waiting {
    streams: Mutex<Vec<tokio::net::UnixStream>>,
}

impl Waiting {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<tokio::net::UnixStream>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells every waiting command `line` (one line, no newline) and closes their sockets.
    pub(super) fn announce(&self, line: &str) {
        let line = format!("{}\n", line.replace('\n', " "));
        for stream in self.lock().drain(..) {
            // A line fits the socket's buffer; a command that went away misses it.
            let _ = stream.try_write(line.as_bytes());
        }
    }
}

/// Listens on this process's socket and greets each command; returns the task, or `None`
/// (logged) when the name is taken.
pub(super) fn listen(
    standing: Arc<Standing>,
    waiting: Arc<Waiting>,
) -> Option<tokio::task::JoinHandle<()>> {
    let name = socket_name(std::process::id());
    let bound = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .and_then(|addr| std::os::unix::net::UnixListener::bind_addr(&addr))
        .and_then(|l| {
            l.set_nonblocking(true)?;
            UnixListener::from_std(l)
        });
    let listener = match bound {
        Ok(listener) => listener,
        Err(e) => {
            tracing::warn!("cannot listen on @{name}: {e}; `stickylb upgrade` cannot wait for an upgrade's outcome (SIGUSR2 still upgrades)");
            return None;
        }
    };
    Some(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let _ = stream.try_write(standing.greeting().as_bytes());
            let mut streams = waiting.lock();
            if streams.len() < MAX_WAITING {
                streams.push(stream);
            }
        }
    }))
}

/// `stickylb upgrade`: asks process `pid` to upgrade and waits up to `timeout` for the outcome.
/// Returns the line to print: `Ok` when a new process took over, `Err` with the reason when
/// not. A process that has already handed over sends the command on to its successor.
pub fn request(mut pid: u32, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    for _ in 0..8 {
        let (stream, greeting) = connect(pid, deadline)?;
        let standing = greeting
            .strip_prefix(GREETING)
            .map(str::trim)
            .ok_or_else(|| {
                format!("process {pid} answered {greeting:?}: not stickylb's upgrade socket")
            })?;
        match standing.split_once(' ') {
            Some(("handed", next)) => {
                pid = next
                    .parse()
                    .map_err(|_| format!("process {pid} answered {greeting:?}"))?;
                continue;
            }
            None if standing == "busy" => {
                return Err(format!(
                    "process {pid} is already upgrading; wait for it to finish, then try again"
                ))
            }
            None if standing == "idle" => {}
            _ => return Err(format!("process {pid} answered {greeting:?}")),
        }
        // SAFETY: kill(2) with a pid and a signal number.
        if unsafe { libc::kill(pid as libc::pid_t, libc::SIGUSR2) } != 0 {
            return Err(format!(
                "cannot signal process {pid}: {}",
                io::Error::last_os_error()
            ));
        }
        return outcome(stream, pid, deadline);
    }
    Err("too many processes handed over in a row".into())
}

/// Connects to `pid`'s socket (waiting, until `deadline`, for a process that has just taken
/// over to open it) and reads its greeting.
fn connect(
    pid: u32,
    deadline: Instant,
) -> Result<(BufReader<std::os::unix::net::UnixStream>, String), String> {
    let name = socket_name(pid);
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .map_err(|e| e.to_string())?;
    let stream = loop {
        match std::os::unix::net::UnixStream::connect_addr(&addr) {
            Ok(stream) => break stream,
            Err(e) if Instant::now() >= deadline => {
                return Err(format!(
                    "cannot reach process {pid} at @{name} ({e}): is it a running stickylb?"
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let peer = peer_pid(&stream).map_err(|e| format!("@{name}: {e}"))?;
    if peer != pid {
        return Err(format!(
            "@{name} belongs to process {peer}, not {pid}: not asking it"
        ));
    }
    let mut reader = BufReader::new(stream);
    let greeting = read_line(&mut reader, deadline)
        .map_err(|e| format!("process {pid} did not greet: {e}"))?;
    Ok((reader, greeting))
}

/// The outcome line from `pid`, as the command's result.
fn outcome(
    mut reader: BufReader<std::os::unix::net::UnixStream>,
    pid: u32,
    deadline: Instant,
) -> Result<String, String> {
    let line = match read_line(&mut reader, deadline) {
        Ok(line) => line,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(format!(
                "process {pid} closed the socket without an outcome (did it exit?)"
            ))
        }
        Err(e) => return Err(format!("no outcome from process {pid}: {e}")),
    };
    let words: Vec<&str> = line.splitn(4, ' ').collect();
    match words.as_slice() {
        ["ok", new, version, ms] => Ok(format!(
            "upgraded: process {new} ({version}) took over from process {pid}, {ms} ms after the signal"
        )),
        ["failed", ..] => Err(format!(
            "upgrade failed; process {pid} keeps serving: {}",
            line.trim_start_matches("failed").trim()
        )),
        _ => Err(format!("process {pid} answered {line:?}")),
    }
}

/// One line (without its newline) by `deadline`.
fn read_line(
    reader: &mut BufReader<std::os::unix::net::UnixStream>,
    deadline: Instant,
) -> io::Result<String> {
    let left = deadline.saturating_duration_since(Instant::now());
    reader
        .get_ref()
        .set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
    let mut line = String::new();
    // A line is short; a peer that sends an endless one is cut off.
    let n = reader.by_ref().take(4096).read_line(&mut line)?;
    if n == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(line.trim_end().to_string())
}

/// The pid of the process at the other end of `stream` (`SO_PEERCRED`).
fn peer_pid(stream: &std::os::unix::net::UnixStream) -> io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.pid as u32)
}
