//! Scenario 3, storm: N clients connect and open a channel through the
//! proxy as fast as possible (non-blocking sockets driven by mio, every
//! client a small state machine that answers each handshake step as soon as
//! it arrives), then stay connected, idle, while the proxy's memory and the
//! broker's connection count are read.

use crate::amqp::{self, FrameRef};
use crate::procfs;
use crate::profile::PerfRecord;
use crate::report::{f, opt, Json, Stats, Table};
use crate::{Ctx, TargetCheck};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Start,
    Tune,
    OpenOk,
    ChannelOpenOk,
    Done,
    Failed,
}

struct Client {
    stream: TcpStream,
    state: State,
    input: Vec<u8>,
    output: Vec<u8>,
    started: Instant,
    /// When the TCP connect completed, Connection.Start arrived, and
    /// Connection.OpenOk arrived.
    marks: [Option<Instant>; 3],
}

struct Frames {
    start_ok: Vec<u8>,
    open: Vec<u8>,
    channel_open: Vec<u8>,
}

struct Outcome {
    latencies_ms: Vec<f64>,
    /// ms from connect() to: TCP connected, Connection.Start, OpenOk.
    phases_ms: [Vec<f64>; 3],
    failures: Vec<String>,
    last_done: Option<Instant>,
    /// Kept open (idle) until the caller drops them.
    streams: Vec<TcpStream>,
}

/// Drives `n` clients in one thread.
fn drive(addr: SocketAddr, n: usize, fr: &Frames, deadline: Instant) -> io::Result<Outcome> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(4096);
    let mut clients: Vec<Client> = Vec::with_capacity(n);
    let mut out = Outcome {
        latencies_ms: Vec::with_capacity(n),
        phases_ms: Default::default(),
        failures: Vec::new(),
        last_done: None,
        streams: Vec::new(),
    };
    let mut scratch = vec![0u8; 16 * 1024];
    let mut finished = 0;
    while finished < n && Instant::now() < deadline {
        // Open new connections in chunks, answering what arrived in between.
        let chunk_end = (clients.len() + 256).min(n);
        while clients.len() < chunk_end {
            let i = clients.len();
            let started = Instant::now();
            let mut stream = TcpStream::connect(addr)?;
            poll.registry().register(
                &mut stream,
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            clients.push(Client {
                stream,
                state: State::Connecting,
                input: Vec::new(),
                output: Vec::new(),
                started,
                marks: [None; 3],
            });
        }
        let timeout = if clients.len() < n {
            Duration::ZERO
        } else {
            Duration::from_millis(50)
        };
        poll.poll(&mut events, Some(timeout))?;
        for ev in events.iter() {
            let c = &mut clients[ev.token().0];
            let before = c.state;
            if let Err(e) = step(c, fr, &mut scratch) {
                c.state = State::Failed;
                out.failures.push(e.to_string());
            }
            if c.state != before && matches!(c.state, State::Done | State::Failed) {
                finished += 1;
                if c.state == State::Done {
                    out.latencies_ms
                        .push(c.started.elapsed().as_secs_f64() * 1e3);
                    out.last_done = Some(Instant::now());
                    for (i, mark) in c.marks.iter().enumerate() {
                        if let Some(t) = mark {
                            out.phases_ms[i].push(t.duration_since(c.started).as_secs_f64() * 1e3);
                        }
                    }
                }
            }
        }
    }
    let unfinished = clients
        .iter()
        .filter(|c| !matches!(c.state, State::Done | State::Failed))
        .count();
    if unfinished > 0 {
        out.failures
            .push(format!("{unfinished} clients not open by the deadline"));
    }
    out.streams = clients.into_iter().map(|c| c.stream).collect();
    Ok(out)
}

fn step(c: &mut Client, fr: &Frames, scratch: &mut [u8]) -> io::Result<()> {
    if matches!(c.state, State::Done | State::Failed) {
        return Ok(());
    }
    if c.state == State::Connecting {
        if let Some(e) = c.stream.take_error()? {
            return Err(e);
        }
        match c.stream.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
            Err(e) => return Err(e),
        }
        c.state = State::Start;
        c.marks[0] = Some(Instant::now());
        c.output.extend_from_slice(amqp::PROTOCOL_HEADER);
    }
    loop {
        match c.stream.read(scratch) {
            Ok(0) => return Err(io::Error::other("closed by the proxy")),
            Ok(n) => c.input.extend_from_slice(&scratch[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let mut used = 0;
    while let Some((frame, n)) = amqp::parse(&c.input[used..])? {
        used += n;
        let before = c.state;
        advance(&mut c.state, &mut c.output, frame, fr)?;
        match (before, c.state) {
            (State::Start, State::Tune) => c.marks[1] = Some(Instant::now()),
            (State::OpenOk, State::ChannelOpenOk) => c.marks[2] = Some(Instant::now()),
            _ => {}
        }
    }
    c.input.drain(..used);
    while !c.output.is_empty() {
        match c.stream.write(&c.output) {
            Ok(n) => {
                c.output.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if c.state == State::Done {
        c.input = Vec::new();
        c.output = Vec::new();
    }
    Ok(())
}

fn advance(
    state: &mut State,
    out: &mut Vec<u8>,
    frame: FrameRef<'_>,
    fr: &Frames,
) -> io::Result<()> {
    if frame.frame_type == amqp::FRAME_HEARTBEAT {
        return Ok(());
    }
    let id = frame.method_id();
    match (*state, id) {
        (State::Start, Some(amqp::CONNECTION_START)) => {
            out.extend_from_slice(&fr.start_ok);
            *state = State::Tune;
        }
        (State::Tune, Some(amqp::CONNECTION_TUNE)) if frame.payload.len() >= 12 => {
            let p = frame.payload;
            let channel_max = u16::from_be_bytes([p[4], p[5]]);
            let frame_max = u32::from_be_bytes([p[6], p[7], p[8], p[9]]);
            out.extend_from_slice(&amqp::tune_ok(channel_max, frame_max, 0));
            out.extend_from_slice(&fr.open);
            *state = State::OpenOk;
        }
        (State::OpenOk, Some(amqp::CONNECTION_OPEN_OK)) => {
            out.extend_from_slice(&fr.channel_open);
            *state = State::ChannelOpenOk;
        }
        (State::ChannelOpenOk, Some(amqp::CHANNEL_OPEN_OK)) => *state = State::Done,
        (_, Some(amqp::CONNECTION_CLOSE)) | (_, Some(amqp::CHANNEL_CLOSE)) => {
            return Err(io::Error::other(format!(
                "closed by the proxy: {}",
                amqp::close_text(frame.payload)
            )))
        }
        (s, id) => {
            return Err(io::Error::other(format!(
                "unexpected {id:?} in state {s:?}"
            )))
        }
    }
    Ok(())
}

/// Upstream connections of this proxy on the broker, by connection name:
/// `rabbitmqctl list_connections client_properties`, else the management API.
fn broker_connections(prefix: &str) -> Option<usize> {
    let needle = format!("\"connection_name\",\"{prefix}");
    if let Ok(out) = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_connections",
            "--no-table-headers",
            "client_properties",
        ])
        .output()
    {
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            return Some(text.lines().filter(|l| l.contains(&needle)).count());
        }
    }
    // Management API, plain HTTP/1.0 with basic auth (guest:guest).
    let mut s = std::net::TcpStream::connect("127.0.0.1:15672").ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET /api/connections?columns=user_provided_name HTTP/1.0\r\nHost: localhost\r\nAuthorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let needle = format!("\"user_provided_name\":\"{prefix}");
    Some(body.matches(&needle).count())
}

const TCP_COUNTERS: [&str; 5] = [
    "TcpExtListenOverflows",
    "TcpExtListenDrops",
    "TcpExtTCPReqQFullDrop",
    "TcpExtTCPReqQFullDoCookies",
    "TcpExtSyncookiesSent",
];

/// One storm against a fresh proxy.
struct StormRun {
    backlog: Option<u32>,
    opened: usize,
    failures: Vec<String>,
    all_open: Option<f64>,
    stats: Stats,
    phases: [Stats; 3],
    /// Clients that waited ≥ 1 s for Connection.Start: a SYN or the
    /// handshake's last ACK was dropped and retransmitted.
    retried: usize,
    upstream: Option<usize>,
    rss_before: u64,
    rss_after: u64,
    per_client_kib: f64,
    proxy_cpu: f64,
    bench_cpu: f64,
    broker_cpu: Option<f64>,
    tcp: Vec<(String, u64)>,
    drops: u64,
}

fn storm_run(ctx: &Ctx, backlog: Option<u32>, perf: Option<&Path>) -> io::Result<StormRun> {
    let o = &ctx.opts;
    let n = o.storm_clients;
    let extra: Vec<String> = backlog
        .map(|b| vec!["--listen-backlog".to_string(), b.to_string()])
        .unwrap_or_default();
    let proxy = ctx.start_proxy_with(true, ctx.broker, &extra)?;
    thread_sleep_ms(300);
    let rss_before = proxy.rss_kib();
    let tcp_before = procfs::tcp_ext();
    let broker_cpu = || ctx.broker_pid.map(|p| procfs::cpu_seconds(&p.to_string()));
    let cpu_before = (
        proxy.cpu_seconds(),
        procfs::cpu_seconds("self"),
        broker_cpu(),
    );
    let fr = std::sync::Arc::new(Frames {
        start_ok: amqp::start_ok(&o.user, &o.password, "amqproxy-bench storm"),
        open: amqp::connection_open(&o.vhost),
        channel_open: amqp::channel_open(1),
    });
    eprintln!(
        "storm: {n} clients through the proxy, listen backlog {}",
        backlog.map_or("default".into(), |b| b.to_string())
    );
    let recorder = perf.and_then(|data| PerfRecord::start(proxy.pid, data));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(60);
    let threads = o.storm_threads.max(1);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let share = n / threads + usize::from(t < n % threads);
            let (fr, addr) = (fr.clone(), proxy.addr);
            std::thread::spawn(move || drive(addr, share, &fr, deadline))
        })
        .collect();
    let mut latencies = Vec::new();
    let mut phases: [Vec<f64>; 3] = Default::default();
    let mut failures = Vec::new();
    let mut last_done = None;
    let mut streams = Vec::new();
    for h in handles {
        let r = h
            .join()
            .map_err(|_| io::Error::other("storm thread panicked"))??;
        latencies.extend(r.latencies_ms);
        for (all, part) in phases.iter_mut().zip(r.phases_ms) {
            all.extend(part);
        }
        failures.extend(r.failures);
        last_done = last_done.max(r.last_done);
        streams.extend(r.streams);
    }
    let opened = latencies.len();
    let all_open = last_done
        .filter(|_| opened == n)
        .map(|t| t.duration_since(start).as_secs_f64());
    let cpu_after = (
        proxy.cpu_seconds(),
        procfs::cpu_seconds("self"),
        broker_cpu(),
    );
    if let Some(r) = recorder {
        r.stop();
    }
    // Idle a moment so the proxy's memory settles, then read it.
    thread_sleep_ms(1000);
    let rss_after = proxy.rss_kib();
    let tcp_after = procfs::tcp_ext();
    let upstream = broker_connections(&proxy.connection_name_prefix);
    drop(streams);
    drop(proxy);
    let tcp: Vec<(String, u64)> = TCP_COUNTERS
        .iter()
        .map(|k| {
            let d = tcp_after
                .get(*k)
                .unwrap_or(&0)
                .saturating_sub(*tcp_before.get(*k).unwrap_or(&0));
            (k.to_string(), d)
        })
        .collect();
    // ListenDrops already includes ListenOverflows.
    let count = |name: &str| tcp.iter().find(|(k, _)| k == name).map_or(0, |(_, v)| *v);
    let drops = count("TcpExtListenDrops") + count("TcpExtTCPReqQFullDrop");
    Ok(StormRun {
        backlog,
        opened,
        failures,
        all_open,
        stats: Stats::of(&latencies),
        retried: phases[1].iter().filter(|ms| **ms >= 1000.0).count(),
        phases: [
            Stats::of(&phases[0]),
            Stats::of(&phases[1]),
            Stats::of(&phases[2]),
        ],
        upstream,
        rss_before,
        rss_after,
        per_client_kib: (rss_after as f64 - rss_before as f64) / opened.max(1) as f64,
        proxy_cpu: cpu_after.0 - cpu_before.0,
        bench_cpu: cpu_after.1 - cpu_before.1,
        broker_cpu: cpu_after.2.zip(cpu_before.2).map(|(a, b)| a - b),
        tcp,
        drops,
    })
}

pub fn scenario(ctx: &mut Ctx) -> io::Result<()> {
    let o = ctx.opts.clone();
    let n = o.storm_clients;
    if let Some(limit) = procfs::open_files_limit() {
        let need = n as u64 + 200;
        if limit < need {
            return Err(io::Error::other(format!(
                "storm of {n} clients needs {need} open files, RLIMIT_NOFILE is {limit}: run `ulimit -n {}` first or set BENCH_STORM_CLIENTS",
                need.max(30000)
            )));
        }
    }
    let mut runs = Vec::new();
    for (i, backlog) in o.storm_backlogs.iter().enumerate() {
        if i > 0 {
            // Let the broker finish closing the last proxy's channels.
            thread_sleep_ms(3000);
        }
        runs.push(storm_run(ctx, *backlog, None)?);
    }
    let workers = ctx.workers;
    let channel_limit = ctx.broker_channel_max.max(1) as usize;
    let bound = workers * n.div_ceil(channel_limit);
    let label = |r: &StormRun| {
        r.backlog
            .map_or("listen backlog 1024 (default)".to_string(), |b| {
                format!("listen backlog {b}")
            })
    };
    let mut headers = vec!["measure".to_string()];
    headers.extend(runs.iter().map(label));
    let header_refs: Vec<&str> = headers.iter().map(String::as_str).collect();
    let mut table = Table::new(
        format!("storm: {n} clients connect + open a channel through the proxy"),
        &header_refs,
    );
    let mut kv = |k: &str, v: &dyn Fn(&StormRun) -> String| {
        let mut row = vec![k.to_string()];
        row.extend(runs.iter().map(v));
        table.row(row);
    };
    kv("clients open", &|r| format!("{} of {n}", r.opened));
    kv("time until all open", &|r| {
        r.all_open
            .map_or("- (not all opened)".into(), |s| format!("{} s", f(s, 3)))
    });
    let pct = |s: &Stats| format!("{} / {} / {} ms", f(s.p50, 1), f(s.p99, 1), f(s.max, 1));
    kv("connect() → TCP connected, p50 / p99 / max", &|r| {
        pct(&r.phases[0])
    });
    kv("connect() → Connection.Start", &|r| pct(&r.phases[1]));
    kv("connect() → Connection.OpenOk", &|r| pct(&r.phases[2]));
    kv("connect() → Channel.OpenOk (open)", &|r| pct(&r.stats));
    kv("clients that waited ≥ 1 s for Connection.Start", &|r| {
        r.retried.to_string()
    });
    kv("upstream connections on the broker", &|r| {
        r.upstream.map_or("- (broker not queryable)".into(), |u| {
            format!("{u} (bound {workers} × ⌈{n} / {channel_limit}⌉ = {bound})")
        })
    });
    kv("proxy RSS before / after", &|r| {
        format!("{} / {} KiB", r.rss_before, r.rss_after)
    });
    kv("proxy RSS per idle client", &|r| {
        format!("{} KiB", f(r.per_client_kib, 2))
    });
    kv("proxy CPU during the storm", &|r| {
        format!("{} s", f(r.proxy_cpu, 2))
    });
    kv("bench CPU during the storm", &|r| {
        format!("{} s", f(r.bench_cpu, 2))
    });
    kv("broker CPU during the storm", &|r| {
        format!("{} s", opt(r.broker_cpu, 2))
    });
    for (i, (k, _)) in runs[0].tcp.iter().enumerate() {
        kv(&format!("{k} (delta)"), &|r| r.tcp[i].1.to_string());
    }
    kv("failures", &|r| {
        r.failures
            .first()
            .map_or("0".into(), |e| format!("{} (first: {e})", r.failures.len()))
    });
    table.note("TCP counters are the whole network namespace's (/proc/net/netstat, as `nstat -az`), so another process's drops would show here too; a dropped SYN is retried by the client's kernel after 1 s, then 3 s");
    table.note("RSS is VmRSS of the fresh proxy before, and 1 s after the last client opened, all still connected; the kernel caps the backlog at net.core.somaxconn");
    ctx.tables.push(table);

    let mut json = Vec::new();
    for r in &runs {
        json.push(Json::obj(vec![
            (
                "listen_backlog",
                r.backlog.map_or(1024u64, u64::from).into(),
            ),
            ("clients", n.into()),
            ("opened", r.opened.into()),
            ("failures", r.failures.len().into()),
            ("first_failure", r.failures.first().cloned().into()),
            ("seconds_until_all_open", r.all_open.into()),
            ("open_ms", r.stats.json()),
            ("tcp_connected_ms", r.phases[0].json()),
            ("connection_start_ms", r.phases[1].json()),
            ("connection_open_ok_ms", r.phases[2].json()),
            ("clients_waiting_1s_for_start", r.retried.into()),
            ("upstream_connections", r.upstream.into()),
            ("upstream_connection_bound", bound.into()),
            ("proxy_rss_kib_before", r.rss_before.into()),
            ("proxy_rss_kib_after", r.rss_after.into()),
            ("proxy_rss_kib_per_client", r.per_client_kib.into()),
            ("proxy_cpu_s", r.proxy_cpu.into()),
            ("bench_cpu_s", r.bench_cpu.into()),
            ("broker_cpu_s", r.broker_cpu.into()),
            (
                "tcp_counter_deltas",
                Json::Obj(
                    r.tcp
                        .iter()
                        .map(|(k, v)| (k.clone(), (*v).into()))
                        .collect(),
                ),
            ),
        ]));
        let l = label(r);
        ctx.targets.push(TargetCheck {
            name: format!("storm: {n} clients open, {l}"),
            target: "≤ 1.5 s".into(),
            measured: r
                .all_open
                .map_or("not all opened".into(), |s| format!("{} s", f(s, 3))),
            met: Some(r.all_open.is_some_and(|s| s <= 1.5)),
        });
        ctx.targets.push(TargetCheck {
            name: format!("storm: SYN / listen queue drops, {l}"),
            target: "0".into(),
            measured: format!(
                "{} dropped (TcpExt), {} clients waited ≥ 1 s",
                r.drops, r.retried
            ),
            met: Some(r.drops == 0 && r.retried == 0),
        });
        ctx.targets.push(TargetCheck {
            name: format!("storm: proxy RSS per idle client, {l}"),
            target: "≤ 8 KiB".into(),
            measured: format!("{} KiB", f(r.per_client_kib, 2)),
            met: Some(r.per_client_kib <= 8.0),
        });
        ctx.targets.push(TargetCheck {
            name: format!("storm: upstream connections, {l}"),
            target: format!("≤ {bound} (workers × ⌈{n} / channel_max⌉)"),
            measured: r.upstream.map_or("-".into(), |u| u.to_string()),
            met: r.upstream.map(|u| u <= bound),
        });
    }
    ctx.results.push(("storm".into(), Json::Arr(json)));
    if o.perf {
        // One more storm, not reported above, with perf attached.
        thread_sleep_ms(3000);
        let data = ctx.target_dir.join("bench-perf-storm.data");
        eprintln!("storm: profiling with perf ({})", data.display());
        let r = storm_run(ctx, None, Some(&data))?;
        let label = format!(
            "storm of {n} clients under perf, {} open in {}{}",
            r.opened,
            r.all_open.map_or("-".into(), |s| format!("{} s", f(s, 2))),
            r.failures.first().map_or(String::new(), |e| format!(
                ", {} failed: {e}",
                r.failures.len()
            ))
        );
        let (tables, json) = crate::profile::report(&data, &label)?;
        ctx.tables.extend(tables);
        ctx.results.push(("profile_storm".into(), json));
    }
    Ok(())
}

fn thread_sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}
