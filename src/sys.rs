//! What stickylb asks of the operating system directly: the file-descriptor limit, dropping
//! privileges after binding, the machine's own addresses, handing freed memory back, and a
//! SIGHUP caught before the runtime's signal handling is up.
//!
//! Each proxied connection costs two descriptors (two more per direction that holds a splice
//! pipe), so the soft limit, often 1024, would cap a balancer at a few hundred connections.
//! It is raised to the hard limit at start-up; the hard limit itself is the operator's (or
//! systemd's `LimitNOFILE`).

use std::ffi::CString;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};

/// `downgradeToUser`: a user name or a numeric uid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserSpec {
    Name(String),
    Uid(u32),
}

impl std::fmt::Display for UserSpec {
    /// As written in the config: the name, or `uid N`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UserSpec::Name(name) => f.write_str(name),
            UserSpec::Uid(uid) => write!(f, "uid {uid}"),
        }
    }
}

/// Set by [`hold_hangups`]'s handler: a SIGHUP arrived.
static HANGUP: AtomicBool = AtomicBool::new(false);

extern "C" fn note_hangup(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    HANGUP.store(true, Ordering::SeqCst);
}

/// Makes SIGHUP harmless from the first instruction: its default action ends the process,
/// and `systemctl reload` right after `start` can send one before the runtime's own signal
/// handling is installed. The handler only notes that a SIGHUP came ([`take_hangup`]); the
/// runtime's handler, installed later, chains to it and takes over.
pub fn hold_hangups() -> io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; the handler is an extern "C" fn that only stores an
    // atomic, and sigemptyset/sigaction get valid pointers.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = note_hangup as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGHUP, &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether a SIGHUP arrived since the last call (or since [`hold_hangups`]).
pub fn take_hangup() -> bool {
    HANGUP.swap(false, Ordering::SeqCst)
}

/// The current `RLIMIT_NOFILE`.
fn nofile() -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: limit is a valid rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit)
}

/// The soft and hard `RLIMIT_NOFILE` after raising the soft limit to the hard one.
// `rlim_t` is u64 on Linux but not on every platform.
#[allow(clippy::unnecessary_cast)]
pub fn raise_fd_limit() -> io::Result<(u64, u64)> {
    let mut limit = nofile()?;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: raised is a valid rlimit; raising soft to hard needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok((limit.rlim_cur as u64, limit.rlim_max as u64))
}

/// The current soft `RLIMIT_NOFILE` (1024, the usual default, if it cannot be read).
#[allow(clippy::unnecessary_cast)]
pub fn fd_limit() -> u64 {
    nofile().map_or(1024, |limit| limit.rlim_cur as u64)
}

/// The hard `RLIMIT_NOFILE`: the soft limit stickylb runs with, since start-up raises it to
/// this (1024 if it cannot be read).
#[allow(clippy::unnecessary_cast)]
pub fn fd_hard_limit() -> u64 {
    nofile().map_or(1024, |limit| limit.rlim_max as u64)
}

/// The addresses of this machine's network interfaces, IPv4 and IPv6 (getifaddrs(3)): what a
/// wildcard listener (`0.0.0.0`, `::`) also receives connections on.
pub fn local_addresses() -> io::Result<Vec<IpAddr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list that freeifaddrs releases below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut addrs = Vec::new();
    let mut next = list;
    while !next.is_null() {
        // SAFETY: `next` is a node of the list getifaddrs returned, not yet freed; ifa_addr,
        // when not null, points to a sockaddr whose family says which struct it is.
        unsafe {
            let ifa = &*next;
            if !ifa.ifa_addr.is_null() {
                match i32::from((*ifa.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        addrs.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        addrs.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            next = ifa.ifa_next;
        }
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(addrs)
}

/// A user looked up in the password database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Looks `spec` up in the password database (a bare uid need not have an entry: its group is
/// then the uid itself).
pub fn lookup_user(spec: &UserSpec) -> io::Result<User> {
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let rc = match spec {
        UserSpec::Name(name) => {
            let cname = CString::new(name.as_str()).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "user name contains a NUL byte")
            })?;
            // SAFETY: all pointers are valid for the call; buf outlives the use of pwd's
            // string fields below.
            unsafe {
                libc::getpwnam_r(
                    cname.as_ptr(),
                    &mut pwd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    &mut result,
                )
            }
        }
        // SAFETY: as above.
        UserSpec::Uid(uid) => unsafe {
            libc::getpwuid_r(
                *uid,
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        },
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    if result.is_null() {
        return match spec {
            UserSpec::Uid(uid) => Ok(User {
                name: uid.to_string(),
                uid: *uid,
                gid: *uid,
            }),
            UserSpec::Name(_) => Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no such user in the password database",
            )),
        };
    }
    // SAFETY: getpwnam_r succeeded, pw_name points into buf and is NUL-terminated.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) }
        .to_string_lossy()
        .into_owned();
    Ok(User {
        name,
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    })
}

/// Drops to `user`: supplementary groups cleared to its primary group, then setgid, then
/// setuid (in that order: after setuid we could no longer change groups). Verifies that the
/// switch cannot be undone. Fails loudly rather than run with privileges the operator asked to
/// give up.
pub fn drop_privileges(user: &User) -> io::Result<()> {
    let gid = user.gid as libc::gid_t;
    // SAFETY: one valid gid array of length 1.
    if unsafe { libc::setgroups(1, &gid) } != 0 {
        return Err(with_context("setgroups", io::Error::last_os_error()));
    }
    // SAFETY: plain syscalls with integer arguments.
    if unsafe { libc::setgid(gid) } != 0 {
        return Err(with_context("setgid", io::Error::last_os_error()));
    }
    // SAFETY: as above.
    if unsafe { libc::setuid(user.uid as libc::uid_t) } != 0 {
        return Err(with_context("setuid", io::Error::last_os_error()));
    }
    // SAFETY: plain syscall. Regaining root must now fail.
    if user.uid != 0 && unsafe { libc::setuid(0) } == 0 {
        return Err(io::Error::other(
            "setuid(0) still succeeds after dropping privileges",
        ));
    }
    Ok(())
}

/// Hands memory the allocator holds but no longer uses back to the OS (glibc's
/// `malloc_trim(0)`, which goes through every thread's arena and releases whole free pages
/// inside the heaps too, not only at their tops). Called after parsing a large config: without
/// it, the blocks of a big parsed document stay with the allocator after it is dropped, and
/// RSS stays at the peak of the parse. Elsewhere than glibc it does nothing.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it only walks the allocator's own lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Pins glibc's mmap threshold at its default, 128 KiB, which also keeps the trim threshold at
/// its default (glibc stops adapting both once either is set). By default glibc raises them
/// each time a large block is freed (up to 32 and 64 MiB): after a large config was parsed and
/// freed once, the next parse's large blocks come from the heap instead of mmap(2), and up to
/// 64 MiB of freed heap stays in the process, which [`release_free_memory`] cannot give back
/// from a worker thread's heap. Pinned, a block of 128 KiB or more is always its own mapping,
/// returned to the OS when freed. The data path allocates nothing that large per connection.
/// Elsewhere than glibc it does nothing.
pub fn pin_malloc_thresholds() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tuning; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Ignores SIGUSR2 (whose default action ends the process) until the signal loop installs its
/// own handler, which replaces this.
pub fn ignore_upgrade_signal() {
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGUSR2, libc::SIG_IGN) };
}

fn with_context(call: &str, error: io::Error) -> io::Error {
    io::Error::new(error.kind(), format!("{call}: {error}"))
}
