//! What stickylb asks of the operating system directly: the file-descriptor limit and dropping
//! privileges after binding.
//!
//! Each proxied connection costs two descriptors (two more per direction that holds a splice
//! pipe), so the soft limit, often 1024, would cap a balancer at a few hundred connections.
//! It is raised to the hard limit at start-up; the hard limit itself is the operator's (or
//! systemd's `LimitNOFILE`).

use std::ffi::CString;
use std::io;

/// `downgradeToUser`: a user name or a numeric uid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserSpec {
    Name(String),
    Uid(u32),
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
            UserSpec::Name(name) => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no user named {name:?} in the password database"),
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

/// Ignores SIGUSR2 (whose default action ends the process) until the signal loop installs its
/// own handler, which replaces this.
pub fn ignore_upgrade_signal() {
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGUSR2, libc::SIG_IGN) };
}

fn with_context(call: &str, error: io::Error) -> io::Error {
    io::Error::new(error.kind(), format!("{call}: {error}"))
}
