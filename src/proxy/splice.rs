//! Zero-copy forwarding with splice(2): socket → pipe → socket, without the bytes ever
//! entering user space.
//!
//! splice(2) moves data between a file descriptor and a pipe inside the kernel, so each
//! direction of a connection goes socket → pipe → socket. Both calls use
//! `SPLICE_F_NONBLOCK` (never block the worker thread on the pipe) and `SPLICE_F_MOVE` (a hint
//! to move pages rather than copy them). The sockets are non-blocking already (tokio), and the
//! loop is driven by tokio's readiness, so what `EAGAIN` means depends on the side:
//! - socket → pipe: we only fill an *empty* pipe, so `EAGAIN` means the socket has no data;
//!   `try_io` then clears the socket's read readiness and we wait for the next edge.
//! - pipe → socket: the pipe holds data, so `EAGAIN` means the socket's send buffer is full
//!   (the peer reads slowly); we wait for write readiness. That is the backpressure: we read
//!   nothing more from the source until the pipe has drained, so a connection never holds
//!   more than one pipe's worth of bytes per direction.
//!
//! Pipes come from a per-thread pool and go back to it only when empty ("clean"), so a pipe
//! never carries one connection's bytes into another. A connection holds a pipe only while
//! bytes are moving: when its source has nothing to read, the pipe goes back to the pool, so
//! idle connections hold no pipe fds. A pipe left with data in it (the connection failed
//! mid-transfer) is closed, never pooled.
//!
//! Pipes are charged to the user's pipe budget (`fs.pipe-user-pages-soft`) for their full size,
//! idle or not. Past it the kernel gives 2-page pipes, which would splice 8 KiB at a time: such
//! a pipe is refused ([`is_shortage`]) and that direction copies in userspace instead, and the
//! pools together never hold more than a quarter of the budget.
//!
//! A direction that keeps filling its pipe (a sustained bulk transfer, [`GROW_AFTER`] full
//! pipes in a row) grows it to [`BIG_PIPE_SIZE`]: fewer splice calls and wake-ups per byte. Big
//! pipes are few ([`max_big`]: a quarter of the budget again, at most [`MAX_BIG`]), so short
//! transfers and the many connections of a busy balancer keep the budget they need, and a
//! direction that finds none left simply stays at [`PIPE_SIZE`].

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Pipes kept per worker thread among the big ones (they count in [`max_pooled`] too).
const BIG_POOL_PER_THREAD: usize = 2;

/// Pipes kept per worker thread. Beyond it (or beyond [`max_pooled`] for all threads), returned
/// pipes are closed. Small, because each pooled pipe holds two file descriptors out of the
/// connection budget and its pages out of the per-user pipe budget.
const POOL_PER_THREAD: usize = 16;

/// Bytes moved by splice in this process, all connections: lets tests (and an operator with a
/// debugger) confirm that the zero-copy path is really taken. One relaxed add per splice chunk.
static SPLICED_BYTES: AtomicU64 = AtomicU64::new(0);

/// Bytes moved by splice(2) in this process so far.
pub fn spliced_bytes() -> u64 {
    SPLICED_BYTES.load(Ordering::Relaxed)
}

/// A splice that moves less than this hands the direction back to the copy path.
pub const SMALL: usize = 4096;

/// Requested pipe capacity. Four times Linux's default (16 slots): a bulk transfer then makes a
/// quarter of the splice calls per byte, which lowers the balancer's CPU per GB
/// (`benches/profile.sh` counts the calls, `benches/compare.sh` the CPU; figures in
/// docs/benchmarks.md, row "256 KiB pipes"). Larger pipes help one stream a little more, but
/// they spend the per-user pipe budget (`fs.pipe-user-pages-soft`) faster: past it an
/// unprivileged process gets 2-page pipes. The pages are allocated only as the pipe fills.
pub(super) const PIPE_SIZE: usize = 256 * 1024;

/// The capacity a sustained bulk transfer's pipe grows to (Linux's default `fs.pipe-max-size`,
/// the most an unprivileged process may ask for): a quarter of the splice calls of a
/// [`PIPE_SIZE`] pipe again, and fewer wake-ups, for one busy stream (figures in
/// docs/benchmarks.md, "Big pipes for sustained bulk").
const BIG_PIPE_SIZE: usize = 1024 * 1024;

/// Consecutive splices of at least [`PIPE_SIZE`] from a socket after which its direction's
/// pipe grows: 1 MiB moved with a full pipe each time, which a request/reply exchange never
/// does.
pub(super) const GROW_AFTER: u8 = 4;

/// The most big pipes alive at once (in use or pooled), whatever the budget.
const MAX_BIG: usize = 16;

/// Big pipes alive now (see [`Pipe::grow`]); a big pipe leaves the count when it is closed.
static BIG_LIVE: AtomicUsize = AtomicUsize::new(0);

/// A non-blocking pipe: `write` end filled from one socket, `read` end drained into the other.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    /// The end bytes are spliced out of.
    pub(super) fn read_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// The end bytes are spliced into.
    pub(super) fn write_fd(&self) -> RawFd {
        self.write.as_raw_fd()
    }

    /// Bytes the pipe holds at most.
    pub(super) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether the pipe grew past [`PIPE_SIZE`] (see [`Pipe::grow`]).
    pub(super) fn is_big(&self) -> bool {
        self.capacity > PIPE_SIZE
    }

    /// Grows the pipe to [`BIG_PIPE_SIZE`], keeping what it holds, if fewer than [`max_big`]
    /// big pipes are alive and the kernel allows it (not past the per-user budget). False
    /// otherwise: the pipe stays as it was.
    pub(super) fn grow(&mut self) -> bool {
        if self.is_big() {
            return false;
        }
        // The rule of [`ONE_AT_A_TIME`], checked where it matters: a test that grows a pipe
        // without holding the lock can make another's count of big pipes wrong. (Caught when
        // nobody holds it; a test that forgot it while another holds it goes unseen that run.
        // Only `WouldBlock` means held: a lock poisoned by an earlier failing test and free
        // now answers `Poisoned`.)
        #[cfg(test)]
        assert!(
            matches!(
                ONE_AT_A_TIME.try_lock(),
                Err(std::sync::TryLockError::WouldBlock)
            ),
            "a test grew a pipe without holding splice::one_at_a_time() (see ONE_AT_A_TIME)"
        );
        let max = max_big();
        let reserved = BIG_LIVE.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        });
        if reserved.is_err() {
            return false;
        }
        // SAFETY: F_SETPIPE_SZ on a pipe fd we own; on failure the pipe is unchanged.
        let size = unsafe {
            libc::fcntl(
                self.write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                BIG_PIPE_SIZE as i32,
            )
        };
        match usize::try_from(size) {
            Ok(size) if size > PIPE_SIZE => {
                self.capacity = size;
                true
            }
            _ => {
                BIG_LIVE.fetch_sub(1, Ordering::AcqRel);
                false
            }
        }
    }

    /// A pipe an older process filled and handed over (an upgrade): its two ends, checked to
    /// be the two ends of one pipe (the same inode), made non-blocking.
    pub(super) fn resume(read: OwnedFd, write: OwnedFd) -> Result<Pipe, String> {
        use std::os::unix::fs::MetadataExt;
        let inode = |fd: &OwnedFd| -> Result<(u64, u64, bool), String> {
            let file = std::fs::File::from(fd.try_clone().map_err(|e| e.to_string())?);
            let meta = file.metadata().map_err(|e| e.to_string())?;
            use std::os::unix::fs::FileTypeExt;
            Ok((meta.dev(), meta.ino(), meta.file_type().is_fifo()))
        };
        let (r, w) = (inode(&read)?, inode(&write)?);
        if !r.2 || r != w {
            return Err("the pipe's descriptors are not the two ends of one pipe".into());
        }
        for fd in [&read, &write] {
            // SAFETY: F_SETFL on a descriptor we own.
            let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
            if rc != 0 {
                return Err(format!("pipe: {}", io::Error::last_os_error()));
            }
        }
        // SAFETY: F_GETPIPE_SZ on a pipe we own.
        let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        let pipe = Pipe {
            read,
            write,
            capacity: usize::try_from(size).unwrap_or(0),
        };
        if pipe.is_big() {
            // Counted whatever the limit (its drop will uncount it): it exists already.
            BIG_LIVE.fetch_add(1, Ordering::AcqRel);
        }
        Ok(pipe)
    }

    /// Bytes in the pipe now (`FIONREAD`).
    pub(super) fn held(&self) -> Result<usize, String> {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD on a pipe we own writes one int.
        let rc = unsafe { libc::ioctl(self.read.as_raw_fd(), libc::FIONREAD as _, &mut n) };
        if rc != 0 {
            return Err(format!("pipe: {}", io::Error::last_os_error()));
        }
        Ok(usize::try_from(n).unwrap_or(0))
    }
}

impl Pipe {
    /// A new pipe of [`PIPE_SIZE`]. Past the per-user pipe budget (`fs.pipe-user-pages-soft`)
    /// the kernel refuses to grow a pipe and hands out 2-page ones; a pipe smaller than the
    /// copy buffer would splice more calls per byte than copying costs, so that is a
    /// [`is_shortage`] error and the caller copies instead.
    fn new() -> io::Result<Pipe> {
        let mut fds: [RawFd; 2] = [-1, -1];
        // SAFETY: fds is a valid array of two ints for pipe2 to fill.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ/F_GETPIPE_SZ on a pipe fd we own; failure leaves the default size,
        // which F_GETPIPE_SZ then reports.
        let mut size =
            unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as i32) };
        if size <= 0 {
            size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        }
        let capacity = usize::try_from(size).unwrap_or(0);
        if capacity < super::copy::BUF_SIZE {
            budget_spent(capacity);
            return Err(io::Error::new(io::ErrorKind::OutOfMemory, BUDGET_SPENT));
        }
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        if self.is_big() {
            BIG_LIVE.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Big pipes alive now, in use or pooled.
#[cfg(test)]
fn big_pipes() -> usize {
    BIG_LIVE.load(Ordering::Acquire)
}

/// The error text of a pipe refused for its size.
const BUDGET_SPENT: &str = "pipe smaller than the copy buffer (per-user pipe budget spent)";

/// Logs, once a minute at most, that pipes come out too small.
fn budget_spent(capacity: usize) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let minute = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 60 + 1);
    if LAST.swap(minute, Ordering::Relaxed) != minute {
        tracing::warn!(
            capacity,
            "the per-user pipe budget (fs.pipe-user-pages-soft) is spent: new bulk transfers \
             copy in userspace instead of splicing"
        );
    }
}

/// The kernel is short of what a pipe needs (file descriptors, or pipe pages for this user):
/// the direction copies instead.
pub(super) fn is_shortage(e: &io::Error) -> bool {
    crate::sockets::is_fd_exhaustion(e) || e.kind() == io::ErrorKind::OutOfMemory
}

/// Pipes kept idle in the pools of all threads together: a quarter of the per-user pipe budget
/// (`fs.pipe-user-pages-soft`, in pages), so that idle pooled pipes never hold back the bulk
/// transfers that need one, and at most [`MAX_POOLED`], so that their descriptors fit in the
/// reserve of [`super::admission::RESERVED_FDS`] whatever `balancerCount` is. The budget is read
/// once; without it (or with 0, no limit), Linux's default is assumed.
fn max_pooled() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| (budget_bytes() / PIPE_SIZE / 4).clamp(1, MAX_POOLED))
}

/// Big pipes alive at once: a quarter of the per-user pipe budget, at most [`MAX_BIG`] (and
/// none if the budget is that small).
fn max_big() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| (budget_bytes() / BIG_PIPE_SIZE / 4).min(MAX_BIG))
}

/// The per-user pipe budget in bytes (`fs.pipe-user-pages-soft`), read once; without it (or
/// with 0, no limit), Linux's default is assumed.
fn budget_bytes() -> usize {
    static BYTES: OnceLock<usize> = OnceLock::new();
    *BYTES.get_or_init(|| {
        let pages = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .filter(|&p| p > 0)
            .unwrap_or(16_384);
        pages.saturating_mul(4096)
    })
}

/// The most pipes kept idle by all threads together (two descriptors each).
pub(super) const MAX_POOLED: usize = 32;

/// Pipes in the pools of all threads now.
static POOLED: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    static BIG_POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// A pipe from this thread's pool, or a new one. `bulk`: for a sustained bulk transfer, which
/// takes a big pipe from the pool when there is one.
pub(super) fn take_pipe(bulk: bool) -> io::Result<Pipe> {
    let pooled = |pool: &'static std::thread::LocalKey<RefCell<Vec<Pipe>>>| {
        pool.with(|pool| pool.borrow_mut().pop())
    };
    let pipe = if bulk {
        pooled(&BIG_POOL).or_else(|| pooled(&POOL))
    } else {
        pooled(&POOL)
    };
    match pipe {
        Some(pipe) => {
            POOLED.fetch_sub(1, Ordering::Relaxed);
            Ok(pipe)
        }
        None => Pipe::new(),
    }
}

/// Returns an empty pipe to this thread's pool for its size (closes it when that pool, or the
/// pools of all threads together, are full).
pub(super) fn give_back(pipe: Pipe) {
    let (pool, per_thread) = if pipe.is_big() {
        (&BIG_POOL, BIG_POOL_PER_THREAD)
    } else {
        (&POOL, POOL_PER_THREAD)
    };
    pool.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < per_thread && POOLED.load(Ordering::Relaxed) < max_pooled() {
            POOLED.fetch_add(1, Ordering::Relaxed);
            pool.push(pipe);
        }
    });
}

pub(super) fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both fds are open for the duration of the call (owned by the caller's streams
    // and pipe); null offsets mean "use and advance the file position", required for sockets
    // and pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Counts bytes moved by splice (see [`spliced_bytes`]).
pub(super) fn count(n: usize) {
    SPLICED_BYTES.fetch_add(n as u64, Ordering::Relaxed);
}

/// splice(2) refused for these descriptors: the direction copies instead.
pub(super) fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
    )
}

/// The tests that grow pipes or count the big ones run one at a time: those here and in
/// `relay.rs`, and every library test that moves a MiB or more through a splicing relay (only
/// such a transfer grows a pipe: [`GROW_AFTER`] full 256 KiB fills in a row), in `relay.rs` and
/// `upgrade/tests.rs`. So while one holds it, nobody else grows a pipe: big pipes of other
/// tests can only be closed. [`Pipe::grow`] checks, in tests, that somebody holds it.
#[cfg(test)]
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Takes [`ONE_AT_A_TIME`] (a test that failed holding it does not stop the others).
#[cfg(test)]
pub(crate) fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pipe's identity: its inode (a closed and re-created pipe can reuse the fd number,
    /// never the inode while the old one is open).
    fn inode(fd: RawFd) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .expect("fd metadata")
            .ino()
    }

    #[test]
    fn pooled_pipes_are_reused_on_the_same_thread() {
        let p = take_pipe(false).unwrap();
        let pipe = inode(p.read_fd());
        give_back(p);
        assert_eq!(POOL.with(|pool| pool.borrow().len()), 1, "kept, not closed");
        let q = take_pipe(false).unwrap();
        assert_eq!(inode(q.read_fd()), pipe, "the same pipe came back");
        // SAFETY: F_GETPIPE_SZ on a pipe fd we own.
        let size = unsafe { libc::fcntl(q.write_fd(), libc::F_GETPIPE_SZ) };
        assert_eq!(
            q.capacity(),
            size as usize,
            "capacity is what the kernel gave"
        );
    }

    /// A pipe grows with its bytes in it, counts as big until it is closed, and goes back to
    /// the big pool, where only a bulk transfer takes it.
    #[test]
    fn a_grown_pipe_keeps_its_bytes_and_is_pooled_apart() {
        let _one = one_at_a_time();
        let mut p = take_pipe(false).unwrap();
        assert!(!p.is_big());
        // SAFETY: writes 5 bytes from a valid buffer into a pipe we own.
        let wrote = unsafe { libc::write(p.write_fd(), b"hello".as_ptr().cast(), 5) };
        assert_eq!(wrote, 5);
        let before = big_pipes();
        assert!(
            p.grow(),
            "a big pipe is allowed (budget {})",
            budget_bytes()
        );
        assert!(p.is_big());
        assert_eq!(p.capacity(), BIG_PIPE_SIZE);
        assert_eq!(big_pipes(), before + 1);
        assert!(!p.grow(), "grows once");
        assert_eq!(p.held().unwrap(), 5, "its bytes stayed");
        let mut buf = [0u8; 5];
        // SAFETY: reads into a valid 5-byte buffer from a pipe we own.
        let read = unsafe { libc::read(p.read_fd(), buf.as_mut_ptr().cast(), 5) };
        assert_eq!((read, &buf), (5, b"hello"));
        let big = inode(p.read_fd());
        give_back(p);
        assert_eq!(big_pipes(), before + 1, "pooled, still alive");
        let small = take_pipe(false).unwrap();
        assert_ne!(
            inode(small.read_fd()),
            big,
            "a short transfer gets no big pipe"
        );
        let q = take_pipe(true).unwrap();
        assert_eq!(inode(q.read_fd()), big, "a bulk transfer gets it back");
        drop(q);
        assert_eq!(big_pipes(), before, "closed, uncounted");
    }

    /// No more big pipes than the limit, and a pipe refused a size stays as it was.
    #[test]
    fn big_pipes_are_limited() {
        let _one = one_at_a_time();
        // Big pipes other tests left (pooled on their threads) count; while the lock is held
        // they can only be closed, never grown, so every one the limit leaves is granted.
        let before = big_pipes();
        let mut pipes: Vec<Pipe> = (0..max_big() + 1).map(|_| Pipe::new().unwrap()).collect();
        let grown = pipes.iter_mut().map(|p| p.grow()).filter(|&g| g).count();
        assert!(
            grown >= max_big() - before && grown <= max_big(),
            "{grown} grown, limit {}, {before} big before",
            max_big()
        );
        assert!(big_pipes() <= max_big());
        let refused = pipes.iter().filter(|p| !p.is_big()).count();
        assert!(refused >= 1, "the one past the limit stays small");
        assert!(pipes
            .iter()
            .filter(|p| !p.is_big())
            .all(|p| p.capacity() == PIPE_SIZE));
    }
}
