//! The config file as a hostile user or a careless operator makes it (design §16, issue 11):
//! a named pipe with no writer, a symlink to `/dev/zero`, a directory, a file over the size
//! cap, nesting past the depth cap, and the worst file the caps admit. Each is refused with a
//! message that says why, at start-up (`stickylb`, `stickylb check`: exit 1) and on reload (the
//! running config serves on, SIGTERM still works); the memory of a refused parse goes back.
//! And the file watcher acts on real changes only: stickylb's own reads of the file, counted
//! with inotify, never make it read again.
//!
//! Real processes (the `stickylb` binary), real files, real signals, real TCP.

use std::ffi::CString;
use std::fmt::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stickylb_testkit::*;

const BIN: &str = env!("CARGO_BIN_EXE_stickylb");

/// The hostile kinds of path, how to make one, and what the refusal must say.
type Make = fn(&Path);

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

fn dev_zero(path: &Path) {
    std::os::unix::fs::symlink("/dev/zero", path).unwrap();
}

fn directory(path: &Path) {
    std::fs::create_dir(path).unwrap();
}

fn over_the_cap(path: &Path) {
    // Sparse: 16 MiB + 1 byte of nothing, costing no disk.
    let file = std::fs::File::create(path).unwrap();
    file.set_len(stickylb::config::MAX_BYTES + 1).unwrap();
}

fn too_deep(path: &Path) {
    // 40 levels, under 1 KiB: small, but past the depth cap.
    let text = format!(
        "{{\"sourcePort\": 8080, \"x\": {}0{}}}",
        "[".repeat(40),
        "]".repeat(40)
    );
    std::fs::write(path, text).unwrap();
}

const HOSTILE: [(&str, Make, &str); 5] = [
    (
        "a named pipe",
        mkfifo,
        "is a named pipe (FIFO), not a regular file",
    ),
    ("a symlink to /dev/zero", dev_zero, "is a character device"),
    (
        "a directory",
        directory,
        "is a directory, not a regular file",
    ),
    (
        "a file over 16 MiB",
        over_the_cap,
        "is more than a config file may hold (16 MiB)",
    ),
    ("nesting 40 deep", too_deep, "nested more than 32 deep"),
];

/// Removes whatever is at `path` (file, link, pipe or directory).
fn clear(path: &Path) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        std::fs::remove_dir_all(path).unwrap();
    } else {
        let _ = std::fs::remove_file(path);
    }
}

/// Runs `stickylb ARGS --config PATH`, expecting it to exit (bounded wait; killed otherwise),
/// and returns its exit code and stderr.
fn run_to_exit(args: &[&str], path: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    use std::io::Read;
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    (code, stderr)
}

#[test]
fn check_and_start_up_refuse_each_hostile_file_with_exit_1() {
    let dir = TempDir::new("hostile-start");
    for (what, make, why) in HOSTILE {
        let path = dir.path("config.json");
        clear(&path);
        make(&path);
        for args in [&["check"][..], &[][..]] {
            let (code, stderr) = run_to_exit(args, &path);
            assert_eq!(code, Some(1), "{what}, {args:?}: {stderr}");
            assert!(stderr.contains(why), "{what}, {args:?}: {stderr}");
            assert!(
                stderr.contains(&path.display().to_string()),
                "{what}: names the file: {stderr}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_hostile_file_is_a_rejected_reload_and_the_running_config_serves() {
    let a = Backend::start("a", Mode::Named).await;
    let b = Backend::start("b", Mode::Named).await;
    let mut lb = Balancer::spawn_with_args(
        BIN,
        "hostile-reload",
        &["--no-watch"],
        &[a.addr],
        serde_json::json!({}),
    );
    let path = lb.config_path();
    for (i, (what, make, why)) in HOSTILE.iter().enumerate() {
        clear(&path);
        make(&path);
        lb.signal(libc::SIGHUP);
        let line = lb.wait_for_count("reload rejected", i + 1);
        assert!(line.contains(why), "{what}: {line}");
        assert!(line.contains("config.json"), "{what}: {line}");
        let (name, _) = which(client_ip(i as u32), lb.addr).await.expect("serves");
        assert_eq!(name, "a", "{what}: the running config serves on");
    }
    // A good file after all that is applied.
    clear(&path);
    let mut good: serde_json::Value =
        serde_json::from_str(&config_text(&[b.addr], serde_json::json!({}))).unwrap();
    good["sourcePort"] = lb.addr.port().into();
    std::fs::write(&path, good.to_string()).unwrap();
    lb.signal(libc::SIGHUP);
    lb.wait_for_line("config reloaded");
    assert_eq!(which(client_ip(100), lb.addr).await.unwrap().0, "b");
    // And SIGTERM works right after a hostile reload.
    clear(&path);
    mkfifo(&path);
    lb.signal(libc::SIGHUP);
    lb.signal(libc::SIGTERM);
    assert_eq!(
        lb.exit_within(PATIENCE),
        Some(0),
        "{}",
        lb.lines().join("\n")
    );
}

/// Watches one file with inotify (on the file itself): every open(2) of it by any process
/// (`IN_OPEN`), and how each was closed: after reading only (`IN_CLOSE_NOWRITE`: stickylb's
/// reads) or after writing (`IN_CLOSE_WRITE`: this test's writes). The kernel queues every
/// event; it merges an event only into an identical one just before it, and each open is
/// followed by its close, so sequential opens are each counted (a queue overflow fails the
/// test).
struct FileEvents {
    fd: i32,
}

/// Events on the file since the last look.
#[derive(Debug, Default, PartialEq, Eq)]
struct Seen {
    opens: usize,
    reads: usize,
    writes: usize,
}

impl FileEvents {
    fn watch(path: &Path) -> FileEvents {
        // SAFETY: plain syscalls with a valid NUL-terminated path.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0, "inotify_init1");
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        let mask = libc::IN_OPEN | libc::IN_CLOSE_NOWRITE | libc::IN_CLOSE_WRITE;
        // SAFETY: as above.
        let wd = unsafe { libc::inotify_add_watch(fd, c.as_ptr(), mask) };
        assert!(wd >= 0, "inotify_add_watch");
        FileEvents { fd }
    }

    /// What happened since the last call.
    fn take(&self) -> Seen {
        let mut seen = Seen::default();
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reading into a buffer of the given length.
            let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return seen;
            }
            let mut at = 0;
            while at + 16 <= n as usize {
                let mask = u32::from_ne_bytes(buf[at + 4..at + 8].try_into().unwrap());
                let len = u32::from_ne_bytes(buf[at + 12..at + 16].try_into().unwrap());
                assert_eq!(mask & libc::IN_Q_OVERFLOW, 0, "inotify queue overflowed");
                seen.opens += usize::from(mask & libc::IN_OPEN != 0);
                seen.reads += usize::from(mask & libc::IN_CLOSE_NOWRITE != 0);
                seen.writes += usize::from(mask & libc::IN_CLOSE_WRITE != 0);
                at += 16 + len as usize;
            }
        }
    }
}

impl Drop for FileEvents {
    fn drop(&mut self) {
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(self.fd) };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_never_reads_the_file_again_unless_it_changed() {
    let a = Backend::start("a", Mode::Named).await;
    let b = Backend::start("b", Mode::Named).await;
    let lb = Balancer::spawn_with_args(BIN, "own-reads", &[], &[a.addr], serde_json::json!({}));
    let path = lb.config_path();
    let events = FileEvents::watch(&path);
    let text_for = |target: std::net::SocketAddr| {
        let mut c: serde_json::Value =
            serde_json::from_str(&config_text(&[target], serde_json::json!({}))).unwrap();
        c["sourcePort"] = lb.addr.port().into();
        c.to_string()
    };

    // One edit, in place: read and applied.
    std::fs::write(&path, text_for(b.addr)).unwrap();
    lb.wait_for_count("config reloaded", 1);
    assert_eq!(which(client_ip(1), lb.addr).await.unwrap().0, "b");
    events.take();
    // Five idle seconds: the observation window (nothing to wait for but time).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle = events.take();
    eprintln!(
        "opens of the config file over 5 idle seconds after an edit: {}",
        idle.opens
    );
    assert_eq!(
        idle,
        Seen::default(),
        "stickylb opened the file with nothing changed"
    );

    // The same bytes written again: read once (the write is a change), neither applied nor
    // counted.
    std::fs::write(&path, text_for(b.addr)).unwrap();
    let deadline = Instant::now() + PATIENCE;
    let mut reads = 0;
    while reads == 0 {
        assert!(Instant::now() < deadline, "stickylb never read the rewrite");
        reads += events.take().reads;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A real edit next: its reload runs after the unchanged one was decided (one reload at a
    // time), so a second "config reloaded" line means the rewrite added none.
    std::fs::write(&path, text_for(a.addr)).unwrap();
    lb.wait_for_count("config reloaded", 2);
    assert_eq!(
        lb.count_lines("config reloaded"),
        2,
        "{}",
        lb.lines().join("\n")
    );
    reads += events.take().reads;
    assert_eq!(reads, 2, "one read of the rewrite, one of the edit");

    // A burst of 20 writes in a row (the last one a change): stickylb reads once.
    for i in 0..20 {
        let target = if i == 19 { b.addr } else { a.addr };
        std::fs::write(&path, text_for(target)).unwrap();
    }
    lb.wait_for_count("config reloaded", 3);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let burst = events.take();
    eprintln!("a burst of 20 writes: {burst:?}");
    assert_eq!(burst.writes, 20);
    assert_eq!(burst.reads, 1, "one read by stickylb for the whole burst");
    assert_eq!(lb.count_lines("config reloaded"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_in_place_of_the_file_is_rejected_once_not_again_and_again() {
    let a = Backend::start("a", Mode::Named).await;
    let lb = Balancer::spawn_with_args(BIN, "dir-watch", &[], &[a.addr], serde_json::json!({}));
    let path = lb.config_path();
    clear(&path);
    directory(&path);
    lb.wait_for_line("reload rejected");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rejected = lb.count_lines("reload rejected");
    eprintln!("rejections in 3 s with a directory in place of the file: {rejected}");
    assert_eq!(rejected, 1, "{}", lb.lines().join("\n"));
    assert_eq!(which(client_ip(1), lb.addr).await.unwrap().0, "a");
}

/// The worst file for memory that every cap admits: the most objects with one key each (a
/// parsed object is a map, hundreds of bytes), then the most short strings, within the value
/// count; rejected only after it is parsed whole (an unknown key).
fn worst_admitted(port: u16, target: std::net::SocketAddr) -> String {
    use stickylb::config::{MAX_CONTAINERS, MAX_VALUES};
    let mut text = format!(
        "{{\"sourceHost\":\"127.0.0.1\",\"sourcePort\":{port},\"metricsPort\":null,\
         \"targets\":[{{\"host\":\"127.0.0.1\",\"port\":{}}}],\"x\":[",
        target.port()
    );
    // So far: 1 object, 5 keys, 3 values, the targets array, its object, 2 keys, 2 values, and
    // the array of "x": 16 values, 4 of them objects or arrays. Then 1 final value.
    let objects = MAX_CONTAINERS - 4;
    for i in 0..objects {
        let _ = write!(text, "{{\"{:x}\":0}},", i % 16);
    }
    let strings = MAX_VALUES - 16 - 3 * objects - 1;
    for _ in 0..strings {
        text.push_str("\"\",");
    }
    text.push_str("0]}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_of_a_rejected_worst_case_file_goes_back() {
    let a = Backend::start("a", Mode::Named).await;
    let lb = Balancer::spawn_with_args(
        BIN,
        "memory",
        &["--no-watch"],
        &[a.addr],
        serde_json::json!({}),
    );
    assert_eq!(which(client_ip(1), lb.addr).await.unwrap().0, "a");
    let before = lb.settled_rss_kib(Duration::from_millis(200)).await;
    let text = worst_admitted(lb.addr.port(), a.addr);
    let path = lb.config_path();
    std::fs::write(&path, &text).unwrap();
    // `check` admits its shape: the refusal is the unknown key, found after the whole parse.
    let (code, stderr) = run_to_exit(&["check"], &path);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("x: unknown key"), "{stderr}");
    let mut after = 0;
    for round in 1..=4 {
        lb.signal(libc::SIGHUP);
        let line = lb.wait_for_count("reload rejected", round);
        assert!(line.contains("x: unknown key"), "{line}");
        after = lb.settled_rss_kib(Duration::from_millis(200)).await;
        eprintln!(
            "round {round}: RSS {before} KiB before, {after} KiB after a rejected {} KiB file \
             (peak {} KiB)",
            text.len() / 1024,
            status_kib(lb.pid(), "VmHWM:")
        );
    }
    assert!(
        after <= 2 * before,
        "RSS {before} KiB before, {after} KiB after the rejected file"
    );
    assert_eq!(which(client_ip(2), lb.addr).await.unwrap().0, "a");
}
