//! A real browser for tests of the status page: headless Chromium (Debian's `chromium`, which
//! `scripts/test` installs), driven over the Chrome DevTools Protocol on a pipe.
//!
//! `--remote-debugging-pipe` makes Chromium read commands on its fd 3 and write replies and
//! events on its fd 4, each message a JSON text ended by a NUL byte: no WebSocket client, no
//! npm package, no port to find. [`Browser::launch`] makes the two pipes, puts their ends on
//! fds 3 and 4 of the child, and attaches to one page; then a test navigates, evaluates
//! JavaScript in the page (reading the DOM after its scripts ran) and takes screenshots.
//!
//! Every wait is bounded ([`PATIENCE`], or the caller's bound); the browser is closed, and
//! killed by its PID if it does not exit, when the [`Browser`] is dropped. Its profile is a
//! fresh temporary directory, so no state leaks between runs.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::child::Process;
use crate::temp::TempDir;
use crate::PATIENCE;

/// Chromium's flags for a test: headless, no sandbox (tests may run as root), no GPU, and
/// nothing that talks to the network or keeps state (QUIC, first-run UI, background
/// networking, component updates, sync), with a profile of its own.
pub const FLAGS: [&str; 9] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
];

/// A headless Chromium with one page open.
pub struct Browser {
    /// Our end of the command pipe (Chromium's fd 3).
    commands: File,
    /// Messages Chromium wrote on its fd 4, read by a thread of their own.
    messages: mpsc::Receiver<Value>,
    /// The id of the next command.
    next: u64,
    /// The CDP session of the page.
    session: String,
    process: Option<Process>,
    /// The profile directory; also holds Chromium's stderr (`stderr.log`).
    profile: TempDir,
}

impl Browser {
    /// Starts `chromium` with [`FLAGS`] and a viewport of `width` × `height` CSS pixels, and
    /// opens a blank page.
    pub fn launch(width: u32, height: u32) -> Browser {
        let profile = TempDir::new("chromium");
        let (their_commands, commands) = pipe();
        let (messages_out, their_messages) = pipe();
        let stderr = File::create(profile.path("stderr.log")).expect("chromium stderr file");
        let mut command = Command::new("chromium");
        command
            .args(FLAGS)
            .arg(format!(
                "--user-data-dir={}",
                profile.path("profile").display()
            ))
            .arg(format!("--window-size={width},{height}"))
            .arg("--remote-debugging-pipe")
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let (read_fd, write_fd) = (their_commands.as_raw_fd(), their_messages.as_raw_fd());
        // SAFETY: between fork and exec only async-signal-safe calls: dup2 puts the pipe ends
        // on fds 3 and 4 (clearing close-on-exec there; the sources are well above 4, see
        // `pipe`).
        unsafe {
            command.pre_exec(move || {
                for (from, to) in [(read_fd, 3), (write_fd, 4)] {
                    if libc::dup2(from, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("start chromium");
        // Chromium holds its ends now; ours close, so that its exit ends our reads.
        drop((their_commands, their_messages));
        let (tx, messages) = mpsc::channel();
        std::thread::spawn(move || read_messages(messages_out, tx));
        let mut browser = Browser {
            commands: File::from(commands),
            messages,
            next: 1,
            session: String::new(),
            process: Some(Process(child)),
            profile,
        };
        let target = browser.call("Target.createTarget", json!({"url": "about:blank"}));
        let target_id = target["targetId"]
            .as_str()
            .expect("a target id")
            .to_string();
        let attached = browser.call(
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        );
        browser.session = attached["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string();
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        );
        browser
    }

    /// Sends `method` with `params` (to the page's session once attached) and returns its
    /// `result`. Panics on an error reply, or when no reply comes within [`PATIENCE`].
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next;
        self.next += 1;
        let mut message = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&message).expect("json");
        bytes.push(0);
        if let Err(e) = self.commands.write_all(&bytes) {
            panic!(
                "cannot send {method} to chromium: {e}{}",
                self.stderr_tail()
            );
        }
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let reply = match self.messages.recv_timeout(left) {
                Ok(reply) => reply,
                Err(e) => panic!(
                    "no reply to {method} from chromium ({e}){}",
                    self.stderr_tail()
                ),
            };
            // Events (no id) and replies to nothing we wait for are skipped.
            if reply["id"].as_u64() != Some(id) {
                continue;
            }
            if let Some(error) = reply.get("error") {
                panic!("chromium refused {method}: {error}");
            }
            return reply["result"].clone();
        }
    }

    /// Loads `url` in the page and waits (bounded) until it has loaded.
    pub fn navigate(&mut self, url: &str) {
        let result = self.call("Page.navigate", json!({"url": url}));
        if let Some(error) = result.get("errorText") {
            panic!("chromium cannot load {url}: {error}");
        }
        self.wait_for(
            "document.readyState === 'complete'",
            &format!("{url} loaded"),
            PATIENCE,
        );
    }

    /// The value of the JavaScript `expression` evaluated in the page (a promise is awaited).
    /// Panics if it throws.
    pub fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression} threw: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Evaluates `expression` every 50 ms until its value is truthy (neither `false`, `null`,
    /// `0`, `""` nor undefined) and returns that value; panics after `bound`, naming `what`
    /// and the last value.
    pub fn wait_for(&mut self, expression: &str, what: &str, bound: Duration) -> Value {
        let deadline = Instant::now() + bound;
        loop {
            let value = self.eval(expression);
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "not within {bound:?}: {what} (last value: {value})"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A PNG of the whole page: the viewport is made as tall as the document first.
    pub fn screenshot_png(&mut self, width: u32) -> Vec<u8> {
        let height = self
            .eval("Math.ceil(document.documentElement.scrollHeight)")
            .as_u64()
            .unwrap_or(800);
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        );
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let data = shot["data"].as_str().expect("screenshot data");
        base64_decode(data).expect("valid base64 from chromium")
    }

    /// The last lines Chromium wrote to its stderr, for a failure message.
    fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(self.profile.path("stderr.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        format!("\nchromium's stderr (last lines):\n{tail}")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ask it to close (it then ends its own helper processes), wait a little, and kill it
        // by its PID if it is still there (`Process`'s drop).
        let mut bytes =
            serde_json::to_vec(&json!({"id": 0, "method": "Browser.close"})).unwrap_or_default();
        bytes.push(0);
        let _ = self.commands.write_all(&bytes);
        if let Some(mut process) = self.process.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if !matches!(process.0.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            drop(process);
        }
    }
}

/// A pipe whose two ends are on fds above 4 (so that `dup2` onto 3 and 4 in the child always
/// moves them and clears close-on-exec), both close-on-exec: (read end, write end).
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds: [RawFd; 2] = [-1; 2];
    // SAFETY: pipe2 writes two fds into the array.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    let high = |fd: RawFd| {
        // SAFETY: fcntl F_DUPFD_CLOEXEC on an fd we own returns a new fd ≥ 10; the old one is
        // closed right after.
        let moved = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
        assert!(moved >= 10, "fcntl: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` came from pipe2 and is closed once.
        unsafe { libc::close(fd) };
        // SAFETY: `moved` is a fresh fd that nothing else owns.
        unsafe { OwnedFd::from_raw_fd(moved) }
    };
    (high(fds[0]), high(fds[1]))
}

/// Reads NUL-terminated JSON messages from `from` until it closes, passing each on.
fn read_messages(from: OwnedFd, to: mpsc::Sender<Value>) {
    let mut reader = BufReader::new(File::from(from));
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(0, &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if buf.last() == Some(&0) {
            buf.pop();
        }
        if let Ok(message) = serde_json::from_slice(&buf) {
            if to.send(message).is_err() {
                return;
            }
        }
    }
}

/// Standard base64 (with `=` padding) to bytes; `None` on a character outside the alphabet.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let digits = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in digits {
        acc = (acc << 6) | value(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}
