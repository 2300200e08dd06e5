//! Readings from /proc: CPU time, RSS, syscall I/O counters, TCP counters,
//! and the proxy process the bench starts and stops.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// USER_HZ: /proc reports utime/stime in these ticks. It is 100 on every
/// Linux ABI the bench runs on (sysconf(_SC_CLK_TCK) would need libc).
pub const TICKS_PER_SECOND: f64 = 100.0;

/// utime + stime of a process (`"self"` or a pid), or of the calling thread
/// (`"thread-self"`), in seconds.
pub fn cpu_seconds(who: &str) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{who}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which is in parentheses and may
    // contain spaces: state is field 3, utime 14, stime 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / TICKS_PER_SECOND
}

/// CPU time of every live thread of a process from schedstat, in
/// nanoseconds rather than 10 ms ticks; `None` without schedstat. Threads
/// that exited are not counted, so this is for long-lived threads (the
/// proxy's event loop and workers).
pub fn threads_cpu_seconds(pid: u32) -> Option<f64> {
    let mut ns = 0u64;
    for task in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let s = fs::read_to_string(task.path().join("schedstat")).ok()?;
        ns += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 / 1e9)
}

/// VmRSS in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_field(pid, "VmRSS:")
}

fn status_field(pid: u32, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// System calls of a process, counted by `perf stat` on the kernel's
/// syscall tracepoints (the proxy's socket I/O is recvfrom/sendto, which
/// /proc/PID/io does not count). `None` when perf cannot do it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Syscalls {
    pub total: u64,
    pub recvfrom: u64,
    pub sendto: u64,
    pub epoll_wait: u64,
    pub futex: u64,
}

const SYSCALL_EVENTS: &str = "raw_syscalls:sys_enter,syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_pwait,syscalls:sys_enter_futex";

pub struct SyscallCounter {
    child: Child,
}

impl SyscallCounter {
    /// Starts counting (until [`SyscallCounter::stop`]).
    pub fn start(pid: u32) -> Option<SyscallCounter> {
        let child = Command::new("perf")
            .args(["stat", "-x,", "-e", SYSCALL_EVENTS, "-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ok()?;
        Some(SyscallCounter { child })
    }

    pub fn stop(self) -> Option<Syscalls> {
        // perf stat prints its counts on SIGINT; std can only send SIGKILL.
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let out = self.child.wait_with_output().ok()?;
        let text = String::from_utf8_lossy(&out.stderr);
        let mut s = Syscalls::default();
        let mut seen = false;
        for line in text.lines() {
            let f: Vec<&str> = line.split(',').collect();
            let (Some(count), Some(event)) = (f.first(), f.get(2)) else {
                continue;
            };
            let Ok(n) = count.parse::<u64>() else {
                continue;
            };
            seen = true;
            match *event {
                "raw_syscalls:sys_enter" => s.total = n,
                "syscalls:sys_enter_recvfrom" => s.recvfrom = n,
                "syscalls:sys_enter_sendto" => s.sendto = n,
                "syscalls:sys_enter_epoll_wait" | "syscalls:sys_enter_epoll_pwait" => {
                    s.epoll_wait += n
                }
                "syscalls:sys_enter_futex" => s.futex = n,
                _ => {}
            }
        }
        seen.then_some(s)
    }
}

/// TcpExt counters from /proc/net/netstat (the same numbers `nstat -az
/// TcpExtListenDrops ...` prints), for the network namespace of the bench.
pub fn tcp_ext() -> BTreeMap<String, u64> {
    let mut map = BTreeMap::new();
    let Ok(s) = fs::read_to_string("/proc/net/netstat") else {
        return map;
    };
    let lines: Vec<&str> = s.lines().collect();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        let (Some(("TcpExt", names)), Some(("TcpExt", values))) =
            (names.split_once(':'), values.split_once(':'))
        else {
            continue;
        };
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
            map.insert(format!("TcpExt{n}"), v.parse().unwrap_or(0));
        }
    }
    map
}

/// The pid of RabbitMQ's Erlang VM on this machine, for its CPU time.
pub fn find_broker_pid() -> Option<u32> {
    let mut found = None;
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let comm = fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim() == "beam.smp" {
            let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("rabbit") {
                return Some(pid);
            }
            found = Some(pid);
        }
    }
    found
}

/// The soft RLIMIT_NOFILE of this process.
pub fn open_files_limit() -> Option<u64> {
    fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

pub fn kernel() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// A free TCP port on 127.0.0.1 (bound and released; fine for a bench).
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

// ---- the proxy under test -------------------------------------------------------

pub struct ProxyOptions {
    pub bin: PathBuf,
    pub channel_reuse: bool,
    pub workers: Option<usize>,
    pub log_level: String,
    pub extra_args: Vec<String>,
    pub log_file: PathBuf,
}

pub struct Proxy {
    child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
    /// `amqproxy 127.0.0.1:PORT pool `: how its upstream connections are named.
    pub connection_name_prefix: String,
}

impl Proxy {
    /// Starts the proxy in front of `upstream`, a URL (amqp:// or amqps://).
    pub fn start(options: &ProxyOptions, upstream: &str) -> io::Result<Proxy> {
        let port = free_port()?;
        let http_port = free_port()?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&options.log_file)?;
        let mut cmd = Command::new(&options.bin);
        // The proxy reads its settings from the environment too; start it
        // from a clean one so nothing set for the bench leaks in.
        cmd.env_clear();
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        cmd.args(["--listen", "127.0.0.1", "--port", &port.to_string()])
            .args(["--http-port", &http_port.to_string()])
            .args(["--log-level", &options.log_level]);
        if !options.channel_reuse {
            cmd.arg("--no-channel-reuse");
        }
        if let Some(w) = options.workers {
            cmd.args(["--workers", &w.to_string()]);
        }
        cmd.args(&options.extra_args)
            .arg(upstream)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let mut child = cmd.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot start {}: {e}", options.bin.display()),
            )
        })?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                return Err(io::Error::other(format!(
                    "amqproxy exited with {status} at start (log: {})",
                    options.log_file.display()
                )));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(io::Error::other("amqproxy did not listen within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Proxy {
            pid: child.id(),
            child,
            addr,
            connection_name_prefix: format!("amqproxy 127.0.0.1:{port} pool "),
        })
    }

    /// The proxy's CPU time: schedstat (ns) where the kernel has it, else
    /// utime + stime from /proc/PID/stat.
    pub fn cpu_seconds(&self) -> f64 {
        threads_cpu_seconds(self.pid).unwrap_or_else(|| cpu_seconds(&self.pid.to_string()))
    }

    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid)
    }

    pub fn threads(&self) -> u64 {
        status_field(self.pid, "Threads:")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            eprintln!(
                "amqproxy (pid {}) had exited on its own: {status}",
                self.pid
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The proxy binary: `AMQPROXY_BIN`, else the one Cargo built alongside this
/// bench (`cargo bench` builds the release profile), else
/// target/release/amqproxy (built with `cargo build --release` if missing).
pub fn proxy_binary() -> io::Result<PathBuf> {
    if let Some(p) = std::env::var_os("AMQPROXY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let built = PathBuf::from(env!("CARGO_BIN_EXE_amqproxy"));
    if built.exists() {
        return Ok(built);
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let release = manifest.join("target/release/amqproxy");
    if !release.exists() {
        eprintln!("building the proxy: cargo build --release");
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "--bin", "amqproxy"])
            .current_dir(manifest)
            .status()?;
        if !status.success() {
            return Err(io::Error::other("cargo build --release failed"));
        }
    }
    Ok(release)
}
