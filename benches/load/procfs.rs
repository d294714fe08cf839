//! What `/proc` says about a balancer's process tree, about the machine, and whether a port
//! is listening.
//!
//! A balancer is given as its root PIDs (stickylb's process, HAProxy's process, nginx's
//! master); its tree is those processes and all their descendants (nginx's workers), found
//! afresh at every sample. CPU is utime + stime of every process in the tree (all threads
//! included), in seconds.

use std::collections::HashMap;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Clock ticks per second of `/proc/PID/stat` times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Raises the soft fd limit to the hard one (20,000 on these machines): an idle scenario holds
/// thousands of sockets.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for getrlimit/setrlimit to read and write.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// `(ppid, utime + stime in ticks)` from one `/proc/PID/stat`.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) ... utime(14) stime(15), 1-based in proc(5).
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// The PIDs of `roots` and all their descendants.
pub fn tree(roots: &[u32]) -> Vec<u32> {
    if roots.is_empty() {
        return Vec::new();
    }
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some((ppid, _)) = stat(pid) {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out: Vec<u32> = Vec::new();
    let mut todo: Vec<u32> = roots.to_vec();
    // Bounded: a PID is visited once, and there are finitely many.
    while let Some(pid) = todo.pop() {
        if out.contains(&pid) {
            continue;
        }
        out.push(pid);
        if let Some(c) = children.get(&pid) {
            todo.extend(c);
        }
    }
    out
}

/// One sample of a process tree.
#[derive(Debug, Clone, Copy, Default)]
pub struct TreeSample {
    pub cpu_s: f64,
    pub rss_kib: u64,
    pub fds: u64,
    pub pipe_fds: u64,
    pub processes: u64,
}

pub fn sample(roots: &[u32], with_fds: bool) -> TreeSample {
    let tps = ticks_per_second();
    let mut s = TreeSample::default();
    for pid in tree(roots) {
        let Some((_, ticks)) = stat(pid) else {
            continue;
        };
        s.processes += 1;
        s.cpu_s += ticks as f64 / tps;
        if let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(line) = status.lines().find(|l| l.starts_with("VmRSS:")) {
                s.rss_kib += line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        if with_fds {
            if let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) {
                for entry in dir.flatten() {
                    s.fds += 1;
                    if fs::read_link(entry.path())
                        .map(|t| t.to_string_lossy().starts_with("pipe:"))
                        .unwrap_or(false)
                    {
                        s.pipe_fds += 1;
                    }
                }
            }
        }
    }
    s
}

/// Jiffies of the whole machine (all CPUs), from the first line of /proc/stat.
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineSample {
    /// Everything but idle and iowait (steal included): how much of the machine was taken.
    busy: u64,
    total: u64,
    /// user + system + irq + softirq: the CPU time spent on this machine's own work at normal
    /// priority (guest time is inside user; steal, taken by the hypervisor for others, is not).
    /// Nice time is left out: everything measured runs at nice 0, and a background job at a
    /// positive nice value (a build on a shared machine) is not the balancer's cost.
    work: u64,
}

pub fn machine() -> MachineSample {
    let text = fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = text.lines().next().unwrap_or("");
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal ...
    let total: u64 = v.iter().take(8).sum();
    let idle = at(3) + at(4);
    MachineSample {
        busy: total.saturating_sub(idle),
        total,
        work: at(0) + at(2) + at(5) + at(6),
    }
}

/// Fraction of the machine (all cores) that was busy between two samples.
pub fn busy_fraction(a: MachineSample, b: MachineSample) -> f64 {
    let total = b.total.saturating_sub(a.total);
    if total == 0 {
        return 0.0;
    }
    b.busy.saturating_sub(a.busy) as f64 / total as f64
}

/// CPU seconds the whole machine spent working (user + system + irq + softirq, all cores)
/// between two samples: the balancer, the client, the backends, the kernel's softirq work
/// wherever it ran, and anything else running on the machine at normal priority.
pub fn machine_cpu_s(a: MachineSample, b: MachineSample) -> f64 {
    // /proc/stat counts in USER_HZ, the same clock ticks as /proc/PID/stat.
    b.work.saturating_sub(a.work) as f64 / ticks_per_second()
}

/// The 1-minute load average.
pub fn load1() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// Whether a socket of this network namespace listens on `addr` (or on its port at the
/// wildcard address, or, for IPv4, on an IPv6 wildcard socket), from `/proc/net/tcp` and
/// `/proc/net/tcp6`. Asking the kernel instead of connecting matters in front of a balancer:
/// a probe connection is forwarded to a backend, and an iperf3 server takes it for a test and
/// is busy when the real client comes.
pub fn listening(addr: SocketAddr) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|file| {
        fs::read_to_string(file).is_ok_and(|text| {
            text.lines()
                .skip(1)
                .filter_map(listener_of_line)
                .any(|local| serves(local, addr))
        })
    })
}

/// The local address of one `/proc/net/tcp{,6}` line if its socket is listening (state `0A`).
pub fn listener_of_line(line: &str) -> Option<SocketAddr> {
    let mut fields = line.split_whitespace();
    let local = fields.nth(1)?;
    let state = fields.nth(1)?;
    if state != "0A" {
        return None;
    }
    let (ip, port) = local.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // Each 32-bit word of the address is printed as a number in the machine's byte order.
    let word = |i: usize| {
        ip.get(i * 8..i * 8 + 8)
            .and_then(|w| u32::from_str_radix(w, 16).ok())
            .map(u32::to_ne_bytes)
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Whether a socket listening on `local` takes connections to `wanted`.
pub fn serves(local: SocketAddr, wanted: SocketAddr) -> bool {
    if local.port() != wanted.port() {
        return false;
    }
    let ip = match local.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    // `::` stays IPv6 (it is not v4-mapped) and is unspecified as it is.
    ip == wanted.ip() || ip.is_unspecified()
}
