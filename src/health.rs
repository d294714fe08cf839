//! Active health checks (design §12): stickylb notices a dead worker before a client does, and
//! brings a restarted one back as soon as it answers.
//!
//! Each checked target has one tokio task ([`Checks`] owns them, no thread per target). It
//! connects to the target (or to `healthCheck.port` on the target's address), writes `send` if
//! given, and waits for `expect` in the first [`HealthCheck::EXPECT_WINDOW`] bytes if given,
//! all within `timeout`. The verdict goes into the target's runtime state as one atomic
//! ([`Health`]), which the pick reads without a lock: nothing on the data path ever waits for a
//! check.
//!
//! - `fall` consecutive failures take the target out (every pick skips it).
//! - `rise` consecutive successes bring it back, and also end a passive deactivation window
//!   (a client's failed connect, design §3) early. A client's failed connect since the last
//!   check starts the count of successes again, so a window ends only after `rise` checks that
//!   passed after it began.
//! - As in HAProxy, a target whose checks start (at start-up, when a reload adds it or turns
//!   its checks on) counts as up, and its first failed check takes it out at once: one failure
//!   is all the evidence there is about a target never checked before.
//! - A check that could not be made for a reason of our own (out of file descriptors or local
//!   ports) is neither a success nor a failure.
//!
//! Checks are spread over the interval: the first check of a target comes at an offset fixed
//! by its identity (its hash seed modulo the interval), and each round then waits the interval
//! give or take a random sixteenth, so targets added together are not checked together, and
//! several stickylb instances checking the same workers do not fall into step. A check that
//! takes longer than the interval delays the next one: checks of one target never overlap.
//!
//! Checks follow reloads by target identity ([`Checks::follow`]): a target that stays, with the
//! same check and address, keeps its task and its counts; a target whose check or address
//! changed gets a new task with the new settings (its up/down verdict carries over); a target
//! that leaves the config, or whose checks are turned off, stops being checked at once and its
//! verdict is cleared (with checks off, §3 alone decides again).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::balance::target::{Health, TargetState};
use crate::balance::{hash, Balancer};
use crate::clock::{duration_ms, Clock};
use crate::config::HealthCheck;
use crate::sockets::{self, Fault};

/// The health-check tasks of one balancer, one per checked target, keyed by target identity.
/// Dropping it stops them all.
#[derive(Debug)]
pub struct Checks {
    running: Mutex<HashMap<Arc<str>, Checker>>,
    clock: Clock,
}

/// One target's checks: what it checks and the task doing it.
#[derive(Debug)]
struct Checker {
    check: Arc<HealthCheck>,
    addr: SocketAddr,
    state: Arc<TargetState>,
    task: JoinHandle<()>,
}

impl Checks {
    /// No checks yet; [`Checks::follow`] starts them. `clock` is the balancer's.
    pub fn new(clock: Clock) -> Checks {
        Checks {
            running: Mutex::new(HashMap::new()),
            clock,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Checker>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the running checks those of `balancer`'s targets (see the module doc). Called at
    /// start and after each config swap, inside the runtime; never on the connection path.
    pub fn follow(&self, balancer: &Balancer) {
        let mut running = self.lock();
        let mut next = HashMap::with_capacity(running.len());
        for (spec, state) in balancer.config.targets.iter().zip(balancer.states()) {
            let old = running.remove(&spec.id);
            let Some(check) = &spec.health_check else {
                if let Some(old) = old {
                    old.task.abort();
                }
                if state.set_health(Health::Unchecked, self.clock.now_ms()) == Health::Down {
                    tracing::info!(
                        target_id = %spec.id,
                        "health checks of target {} turned off: it takes clients again", spec.id
                    );
                }
                continue;
            };
            let addr = SocketAddr::new(spec.addr.ip(), check.port.unwrap_or(spec.addr.port()));
            let same = |old: &Checker| {
                *old.check == *check && old.addr == addr && Arc::ptr_eq(&old.state, state)
            };
            let checker = match old {
                Some(old) if same(&old) => old,
                old => {
                    if let Some(old) = old {
                        old.task.abort();
                    }
                    self.start(check, addr, state)
                }
            };
            next.insert(spec.id.clone(), checker);
        }
        // What is left is no longer in the config: stop checking it now, and forget the
        // verdict (if it comes back, it is checked afresh).
        for (_, gone) in running.drain() {
            gone.task.abort();
            gone.state
                .set_health(Health::Unchecked, self.clock.now_ms());
        }
        *running = next;
    }

    fn start(&self, check: &HealthCheck, addr: SocketAddr, state: &Arc<TargetState>) -> Checker {
        let check = Arc::new(check.clone());
        let fresh = state.health() == Health::Unchecked;
        if fresh {
            state.set_health(Health::Up, self.clock.now_ms());
        }
        let task = tokio::spawn(run(state.clone(), check.clone(), addr, self.clock, fresh));
        Checker {
            check,
            addr,
            state: state.clone(),
            task,
        }
    }

    /// Stops every check (at shutdown).
    pub fn stop(&self) {
        for (_, checker) in self.lock().drain() {
            checker.task.abort();
        }
    }

    /// Identities of the targets being checked now.
    #[cfg(test)]
    fn checked(&self) -> Vec<Arc<str>> {
        let mut ids: Vec<_> = self.lock().keys().cloned().collect();
        ids.sort();
        ids
    }
}

impl Drop for Checks {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The life of one target's checker: check, record, wait, until aborted.
async fn run(
    state: Arc<TargetState>,
    check: Arc<HealthCheck>,
    addr: SocketAddr,
    clock: Clock,
    fresh: bool,
) {
    let interval_ms = duration_ms(check.interval).max(1);
    tokio::time::sleep(Duration::from_millis(state.seed % interval_ms)).await;
    let mut verdict = Verdict::new(&check, &state, fresh);
    let mut buf = Vec::new();
    loop {
        let started = Instant::now();
        match probe(addr, &check, &mut buf).await {
            Ok(()) => verdict.passed(&state, clock.now_ms()),
            Err(Failure::Local(error)) => {
                tracing::debug!(target_id = %state.id, %error, "health check not made");
            }
            Err(failure) => verdict.failed(&state, &failure, clock.now_ms()),
        }
        tokio::time::sleep_until(started + jittered(check.interval)).await;
    }
}

/// `interval` give or take a random sixteenth of it, so checkers do not fall into step.
fn jittered(interval: Duration) -> Duration {
    let spread = duration_ms(interval) / 8;
    if spread == 0 {
        return interval;
    }
    let offset = hash::random_u64() % (spread + 1);
    (interval + Duration::from_millis(offset)).saturating_sub(Duration::from_millis(spread / 2))
}

/// The counts behind a target's up/down verdict.
#[derive(Debug)]
struct Verdict {
    rise: u32,
    fall: u32,
    successes: u32,
    failures: u32,
    /// The target's `connect_failures` when last looked at: a change is a client's failed
    /// connect, which starts the count of successes again.
    passive_failures: u64,
}

impl Verdict {
    fn new(check: &HealthCheck, state: &TargetState, fresh: bool) -> Verdict {
        Verdict {
            rise: check.rise,
            fall: check.fall,
            successes: 0,
            // A target never checked before is taken out by its first failed check.
            failures: if fresh {
                check.fall.saturating_sub(1)
            } else {
                0
            },
            passive_failures: state.counters.connect_failures.load(Relaxed),
        }
    }

    fn passed(&mut self, state: &TargetState, now_ms: u64) {
        state.counters.checks_success.fetch_add(1, Relaxed);
        state.checked(now_ms, Ok(()));
        self.failures = 0;
        let passive = state.counters.connect_failures.load(Relaxed);
        if passive != self.passive_failures {
            self.passive_failures = passive;
            self.successes = 0;
        }
        self.successes = self.successes.saturating_add(1);
        if self.successes < self.rise {
            return;
        }
        let was_down = state.set_health(Health::Up, now_ms) == Health::Down;
        let was_deactivated = state.reactivate(now_ms);
        if was_down {
            tracing::info!(
                target_id = %state.id,
                "target {} is up: passed {} health checks in a row", state.id, self.successes
            );
        } else if was_deactivated {
            tracing::info!(
                target_id = %state.id,
                "target {} passed {} health checks since a failed connect: its deactivation \
                 window ends now", state.id, self.successes
            );
        }
    }

    fn failed(&mut self, state: &TargetState, failure: &Failure, now_ms: u64) {
        state.counters.checks_failure.fetch_add(1, Relaxed);
        state.checked(now_ms, Err(failure.fault()));
        self.successes = 0;
        self.failures = self.failures.saturating_add(1);
        tracing::debug!(target_id = %state.id, %failure, "health check failed");
        if self.failures >= self.fall && state.set_health(Health::Down, now_ms) != Health::Down {
            tracing::warn!(
                target_id = %state.id, reason = %failure,
                "target {} is down: failed {} health checks in a row ({failure}); no client \
                 goes to it until it passes {}", state.id, self.failures, self.rise
            );
        }
    }
}

/// Why a check failed.
#[derive(Debug)]
enum Failure {
    /// Our own shortage (no fd, no local port): not the target's fault, no verdict.
    Local(io::Error),
    Connect(io::Error),
    Send(io::Error),
    Receive(io::Error),
    /// The target closed before `expect` was seen.
    Closed,
    /// `expect` is not in the first [`HealthCheck::EXPECT_WINDOW`] bytes.
    NotFound,
    Timeout(Duration),
}

impl Failure {
    /// Its class, as the status page shows the last check's result.
    fn fault(&self) -> Fault {
        match self {
            Failure::Local(e) | Failure::Connect(e) | Failure::Send(e) | Failure::Receive(e) => {
                Fault::of(e)
            }
            Failure::Closed => Fault::Closed,
            Failure::NotFound => Fault::Unexpected,
            Failure::Timeout(_) => Fault::Timeout,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Local(e) => write!(f, "no local resources for a check: {e}"),
            Failure::Connect(e) => write!(f, "connect: {e}"),
            Failure::Send(e) => write!(f, "send: {e}"),
            Failure::Receive(e) => write!(f, "receive: {e}"),
            Failure::Closed => write!(f, "closed before the expected reply"),
            Failure::NotFound => write!(
                f,
                "expected reply not in the first {} bytes",
                HealthCheck::EXPECT_WINDOW
            ),
            Failure::Timeout(t) => write!(f, "no answer within {} ms", t.as_millis()),
        }
    }
}

/// One check of the target at `addr`. `buf` is the checker's receive buffer, reused.
async fn probe(addr: SocketAddr, check: &HealthCheck, buf: &mut Vec<u8>) -> Result<(), Failure> {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| {
            if sockets::is_local_shortage(&e) {
                Failure::Local(e)
            } else {
                Failure::Connect(e)
            }
        })?;
        if let Some(send) = &check.send {
            stream
                .write_all(send.as_bytes())
                .await
                .map_err(Failure::Send)?;
        }
        if let Some(expect) = &check.expect {
            receive(&mut stream, expect.as_bytes(), buf).await?;
        }
        Ok(())
    };
    match tokio::time::timeout(check.timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(Failure::Timeout(check.timeout)),
    }
}

/// Reads until `expect` appears, the window is full, or the target closes.
async fn receive(stream: &mut TcpStream, expect: &[u8], buf: &mut Vec<u8>) -> Result<(), Failure> {
    buf.clear();
    buf.resize(HealthCheck::EXPECT_WINDOW, 0);
    let mut len = 0;
    while len < buf.len() {
        let n = stream
            .read(&mut buf[len..])
            .await
            .map_err(Failure::Receive)?;
        if n == 0 {
            return Err(Failure::Closed);
        }
        // Search only where a match could not have been seen before: the new bytes and the
        // `expect.len() - 1` bytes before them.
        let from = len.saturating_sub(expect.len().saturating_sub(1));
        len += n;
        if buf[from..len].windows(expect.len()).any(|w| w == expect) {
            return Ok(());
        }
    }
    Err(Failure::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Shared;
    use crate::config::Config;
    use std::path::Path;
    use tokio::net::TcpListener;

    fn check(extra: &str) -> HealthCheck {
        let text = format!(
            r#"{{"sourcePort": 1, "targets": [{{"host": "127.0.0.1", "port": 2}}],
                "healthCheck": {{"timeout": 500 {extra}}}}}"#
        );
        Config::parse(Path::new("t.json"), &text)
            .expect("valid")
            .health_check
            .expect("a check")
    }

    /// A server that answers each connection with `reply` (after reading `wait_for` bytes).
    async fn server(reply: &[u8], wait_for: usize) -> SocketAddr {
        let reply: Arc<[u8]> = reply.into();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let reply = reply.clone();
                tokio::spawn(async move {
                    let mut got = vec![0; wait_for];
                    if s.read_exact(&mut got).await.is_ok() {
                        let _ = s.write_all(&reply).await;
                        // Keep the connection open a while, as a slow server would.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_check_passes_on_connect_and_on_the_expected_reply_only() {
        let mut buf = Vec::new();
        let addr = server(b"+PONG\r\n", 6).await;
        assert!(probe(addr, &check(""), &mut buf).await.is_ok());
        let ping = check(r#", "send": "PING\r\n", "expect": "PONG""#);
        assert!(probe(addr, &ping, &mut buf).await.is_ok());
        let wrong = check(r#", "send": "PING\r\n", "expect": "HELLO""#);
        let failure = probe(addr, &wrong, &mut buf).await.expect_err("no HELLO");
        assert!(
            matches!(failure, Failure::Closed | Failure::Timeout(_)),
            "{failure}"
        );
        // Nothing sent: the server waits for 6 bytes, so `expect` never comes.
        let silent = check(r#", "expect": "PONG""#);
        assert!(matches!(
            probe(addr, &silent, &mut buf).await,
            Err(Failure::Timeout(_))
        ));
        let dead = crate::sockets::bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind")
            .local_addr()
            .expect("addr"); // closed at the end of the statement
        assert!(matches!(
            probe(dead, &check(""), &mut buf).await,
            Err(Failure::Connect(_))
        ));
    }

    #[tokio::test]
    async fn expect_is_found_across_reads_but_not_past_the_window() {
        let mut buf = Vec::new();
        let mut long = vec![b'.'; HealthCheck::EXPECT_WINDOW - 2];
        long.extend_from_slice(b"OK");
        let addr = server(&long, 1).await;
        let ok = check(r#", "send": "x", "expect": "OK""#);
        assert!(probe(addr, &ok, &mut buf).await.is_ok());
        let mut past = vec![b'.'; HealthCheck::EXPECT_WINDOW - 1];
        past.extend_from_slice(b"OK");
        let addr = server(&past, 1).await;
        assert!(matches!(
            probe(addr, &ok, &mut buf).await,
            Err(Failure::NotFound)
        ));
    }

    #[test]
    fn fall_failures_take_a_target_out_and_rise_successes_bring_it_back() {
        let hc = check(r#", "rise": 2, "fall": 3"#);
        let state = TargetState::new("t".into(), 1);
        state.set_health(Health::Up, 1);
        let mut v = Verdict::new(&hc, &state, false);
        for _ in 0..2 {
            v.failed(&state, &Failure::Closed, 1);
        }
        assert_eq!(state.health(), Health::Up, "two failures of three");
        v.passed(&state, 1);
        v.failed(&state, &Failure::Closed, 1);
        v.failed(&state, &Failure::Closed, 1);
        assert_eq!(state.health(), Health::Up, "a success reset the count");
        v.failed(&state, &Failure::Closed, 1);
        assert_eq!(state.health(), Health::Down);
        v.passed(&state, 1);
        assert_eq!(state.health(), Health::Down, "one success of two");
        v.passed(&state, 1);
        assert_eq!(state.health(), Health::Up);
        assert_eq!(state.counters.checks_success.load(Relaxed), 3);
        assert_eq!(state.counters.checks_failure.load(Relaxed), 5);
    }

    #[test]
    fn a_fresh_target_is_taken_out_by_its_first_failure() {
        let hc = check(r#", "fall": 3"#);
        let state = TargetState::new("t".into(), 1);
        state.set_health(Health::Up, 1);
        let mut v = Verdict::new(&hc, &state, true);
        v.failed(&state, &Failure::Closed, 7);
        assert_eq!(state.health(), Health::Down);
        assert_eq!(state.last_check(), Some((7, Err(Fault::Closed))));
        assert_eq!(state.since_ms(8), 7, "down since the failed check");
    }

    #[test]
    fn rise_successes_after_a_failed_connect_end_its_window() {
        let hc = check(r#", "rise": 2"#);
        let state = TargetState::new("t".into(), 1);
        state.set_health(Health::Up, 1);
        let mut v = Verdict::new(&hc, &state, false);
        v.passed(&state, 1);
        v.passed(&state, 1);
        state.deactivate(10, Duration::from_secs(60), Fault::Refused);
        v.passed(&state, 20);
        assert!(
            !state.is_usable(20),
            "one check since the failure is not enough"
        );
        v.passed(&state, 30);
        assert!(
            state.is_usable(30),
            "rise checks since the failure end the window"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn checks_follow_reloads_by_identity() {
        let config = |targets: &str| {
            Config::parse(
                Path::new("t.json"),
                &format!(r#"{{"sourcePort": 1, "targets": {targets}}}"#),
            )
            .expect("valid")
        };
        let shared = Shared::new();
        let checks = Checks::new(shared.clock);
        let first = Balancer::new(
            config(
                r#"[{"host": "127.0.0.1", "port": 2, "id": "a", "healthCheck": {}},
                    {"host": "127.0.0.1", "port": 3, "id": "b", "healthCheck": {}},
                    {"host": "127.0.0.1", "port": 4, "id": "c"}]"#,
            ),
            &shared,
        );
        checks.follow(&first);
        assert_eq!(checks.checked(), ["a".into(), "b".into()] as [Arc<str>; 2]);
        let task_of = |id: &str| checks.lock()[id].task.id();
        let a_task = task_of("a");
        first.states()[1].set_health(Health::Down, 1);
        // a stays as it was; b changes its check; c gets one.
        let second = Balancer::new(
            config(
                r#"[{"host": "127.0.0.1", "port": 2, "id": "a", "healthCheck": {}},
                    {"host": "127.0.0.1", "port": 3, "id": "b", "healthCheck": {"rise": 5}},
                    {"host": "127.0.0.1", "port": 4, "id": "c", "healthCheck": {}}]"#,
            ),
            &shared,
        );
        let b_task = task_of("b");
        checks.follow(&second);
        assert_eq!(task_of("a"), a_task, "a keeps its checker");
        assert_ne!(
            task_of("b"),
            b_task,
            "b's checker restarts with the new settings"
        );
        assert_eq!(
            second.states()[1].health(),
            Health::Down,
            "b's verdict carries over"
        );
        assert_eq!(second.states()[2].health(), Health::Up, "c starts up");
        // a leaves, b's checks are turned off.
        let third = Balancer::new(
            config(
                r#"[{"host": "127.0.0.1", "port": 3, "id": "b"},
                    {"host": "127.0.0.1", "port": 4, "id": "c", "healthCheck": {}}]"#,
            ),
            &shared,
        );
        checks.follow(&third);
        assert_eq!(checks.checked(), ["c".into()] as [Arc<str>; 1]);
        assert_eq!(second.states()[0].health(), Health::Unchecked, "a left");
        assert_eq!(third.states()[0].health(), Health::Unchecked);
        assert!(third.states()[0].is_usable(shared.clock.now_ms()));
    }
}
