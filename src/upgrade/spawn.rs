//! Starting the new process of an upgrade: the binary at the path this service was started
//! from, read again from disk, with the same arguments, and one end of the handover socket.
//!
//! The path is remembered at start-up ([`remember`]): once the file has been replaced,
//! `/proc/self/exe` names the old, deleted inode (`... (deleted)`), and starting that would
//! start the old version again. A process started by an upgrade takes the path its
//! predecessor used ([`use_path`]), not its own: when the path holds a wrapper that execs the
//! real binary from elsewhere, each upgrade still starts whatever the path holds now.
//!
//! The handover socket reaches the child as an inherited descriptor named by
//! `STICKYLB_UPGRADE_FD` (every other descriptor of ours is close-on-exec); the child takes it
//! and removes the variable ([`take_socket`]).

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::{Mutex, OnceLock};

/// The variable that names the handover socket's descriptor in the new process.
pub const SOCKET_VARIABLE: &str = "STICKYLB_UPGRADE_FD";

struct Start {
    /// The path to start (remembered at start-up, or the predecessor's).
    exe: Mutex<Option<PathBuf>>,
    arg0: OsString,
    args: Vec<OsString>,
}

fn start() -> &'static Start {
    static START: OnceLock<Start> = OnceLock::new();
    START.get_or_init(|| {
        let mut args = std::env::args_os();
        let arg0 = args.next().unwrap_or_else(|| "stickylb".into());
        Start {
            exe: Mutex::new(std::env::current_exe().ok()),
            arg0,
            args: args.collect(),
        }
    })
}

/// Remembers this process's binary path and arguments. Called first thing at start-up, before
/// anyone could replace the file.
pub fn remember() {
    start();
}

/// Upgrades from this process start `path` (the path the first process was started from).
pub fn use_path(path: PathBuf) {
    *start().exe.lock().unwrap_or_else(|p| p.into_inner()) = Some(path);
}

/// The path an upgrade starts.
pub fn exe() -> io::Result<PathBuf> {
    start()
        .exe
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .ok_or_else(|| io::Error::other("the binary's path could not be read at start-up"))
}

/// Starts `exe` with this process's arguments and environment, plus `socket` as its handover
/// socket. Stdin, stdout and stderr are shared (its log lines go where ours go).
///
/// `socket` is made inheritable for the moment of the spawn only, rather than in a `pre_exec`
/// hook: with a hook, std must `fork()` this process (tens of milliseconds with thousands of
/// descriptors and a large address space), without one it uses `posix_spawn` (a vfork). No
/// other process is started by stickylb meanwhile (one upgrade at a time, nothing else spawns),
/// so the descriptor leaks nowhere else.
pub fn spawn(exe: &std::path::Path, socket: &std::os::unix::net::UnixStream) -> io::Result<Child> {
    let fd: RawFd = socket.as_raw_fd();
    let start = start();
    let mut command = Command::new(exe);
    command
        .arg0(&start.arg0)
        .args(&start.args)
        .env(SOCKET_VARIABLE, fd.to_string());
    set_cloexec(fd, false)?;
    let spawned = command.spawn();
    set_cloexec(fd, true)?;
    spawned
}

fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD on a descriptor the caller owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        let flags = if on {
            flags | libc::FD_CLOEXEC
        } else {
            flags & !libc::FD_CLOEXEC
        };
        if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The handover socket this process was started with, if an upgrade started it: takes it from
/// `STICKYLB_UPGRADE_FD` (and removes the variable, so that nothing this process starts sees
/// it), checks that it is a Unix stream socket, and makes it close-on-exec. Call it before any
/// other thread runs.
pub fn take_socket() -> Option<io::Result<std::os::unix::net::UnixStream>> {
    let value = std::env::var_os(SOCKET_VARIABLE)?;
    std::env::remove_var(SOCKET_VARIABLE);
    let fd: RawFd = match value.to_str().and_then(|v| v.parse().ok()) {
        Some(fd) if fd > 2 => fd,
        _ => {
            return Some(Err(io::Error::other(format!(
                "{SOCKET_VARIABLE}={value:?} is no descriptor"
            ))))
        }
    };
    // SAFETY: fstat and fcntl on a descriptor number; failures are reported, not trusted.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut stat) } != 0 || stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Some(Err(io::Error::other(format!(
            "{SOCKET_VARIABLE}={fd} is no socket"
        ))));
    }
    // SAFETY: the descriptor is open (fstat succeeded) and, by the protocol, ours alone: the
    // old process passed it for this.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let socket = socket2::Socket::from(owned);
    let checked = (|| {
        if socket.domain()? != socket2::Domain::UNIX || socket.r#type()? != socket2::Type::STREAM {
            return Err(io::Error::other(format!(
                "{SOCKET_VARIABLE}={fd} is no Unix stream socket"
            )));
        }
        socket.set_cloexec(true)?;
        Ok(())
    })();
    Some(checked.map(|()| std::os::unix::net::UnixStream::from(OwnedFd::from(socket))))
}
