//! Scenario 2, throughput: publishers write pre-encoded batches of
//! messages as fast as the path takes them, directly to the broker or
//! through the proxy; and the proxy alone, in front of the discard-
//! everything sink.
//!
//! Rates are counted only for messages the far end has processed: with
//! confirms, acked ones; without, each publisher sends a
//! Queue.Declare(passive) on its channel every so many messages (at most two
//! unanswered, which bounds the bytes in flight) and one at the end; the
//! broker answers it only after every earlier publish on that channel was
//! routed. Against the sink, the sink counts what it received.

use crate::amqp::{self, Conn, FrameRef, Login};
use crate::procfs::{self, Proxy, SyscallCounter, Syscalls};
use crate::profile::PerfRecord;
use crate::report::{f, median, opt, rate, Json, Table};
use crate::sink::Sink;
use crate::{Ctx, TargetCheck};
use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

/// Confirms settle in order for one queue, but the bench does not rely on it.
#[derive(Default)]
struct Confirms {
    floor: u64,
    above: BTreeSet<u64>,
    nacks: u64,
}

impl Confirms {
    fn settled(&self) -> u64 {
        self.floor + self.above.len() as u64
    }

    fn on(&mut self, frame: FrameRef<'_>) -> io::Result<()> {
        let id = frame.method_id();
        if id != Some(amqp::BASIC_ACK) && id != Some(amqp::BASIC_NACK) {
            if frame.frame_type == amqp::FRAME_HEARTBEAT {
                return Ok(());
            }
            let text = match id {
                Some(amqp::CHANNEL_CLOSE) | Some(amqp::CONNECTION_CLOSE) => {
                    amqp::close_text(frame.payload)
                }
                _ => String::new(),
            };
            return Err(io::Error::other(format!(
                "unexpected frame {id:?} while waiting for confirms {text}"
            )));
        }
        let p = frame.payload;
        if p.len() < 13 {
            return Err(io::Error::other("short ack"));
        }
        if id == Some(amqp::BASIC_NACK) {
            self.nacks += 1;
        }
        let tag = u64::from_be_bytes(p[4..12].try_into().unwrap_or_default());
        let multiple = p[12] & 1 == 1;
        if multiple {
            if tag > self.floor {
                self.floor = tag;
                self.above = self.above.split_off(&(tag + 1));
            }
        } else if tag > self.floor {
            self.above.insert(tag);
        }
        while self.above.first() == Some(&(self.floor + 1)) {
            self.above.pop_first();
            self.floor += 1;
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
pub struct Load {
    pub publishers: usize,
    pub size: usize,
    pub confirms: bool,
    pub window: u64,
}

impl Load {
    fn label(&self) -> String {
        format!(
            "{} pub, {} B, {}",
            self.publishers,
            self.size,
            if self.confirms {
                "confirms"
            } else {
                "no confirms"
            }
        )
    }
}

struct PublisherResult {
    sent: u64,
    end: Instant,
    nacks: u64,
}

/// Pre-encoded frames for one publisher.
struct PubFrames {
    login: Login,
    batch: Vec<u8>,
    per_batch: u64,
    /// Without confirms, to the broker: a Queue.Declare(passive) after
    /// every `sync_every` messages, at most two unanswered.
    sync: Vec<u8>,
    sync_every: u64,
}

fn pub_frames(ctx: &Ctx, load: &Load) -> PubFrames {
    let o = &ctx.opts;
    let msg = amqp::publish(1, "", &o.queue, &vec![b'x'; load.size]);
    // About 16 KiB per write, and at most a quarter of the confirm window.
    let mut per_batch = (16 * 1024 / msg.len()).max(1) as u64;
    if load.confirms {
        per_batch = per_batch.min((load.window / 4).max(1));
    }
    // The in-flight budget is shared by the publishers; half of a
    // publisher's share between two syncs.
    let share = (o.inflight_kib * 1024 / load.publishers.max(1)).max(64 * 1024);
    let sync_every = ((share / 2 / msg.len()) as u64).div_ceil(per_batch).max(1) * per_batch;
    PubFrames {
        login: Login::new(&o.user, &o.password, &o.vhost, "amqproxy-bench publisher"),
        batch: msg.repeat(per_batch as usize),
        per_batch,
        sync: amqp::queue_declare(1, &o.queue, true, None),
        sync_every,
    }
}

fn publisher(
    addr: SocketAddr,
    fr: &PubFrames,
    load: &Load,
    sync_with_broker: bool,
    start: &Barrier,
    stop: &AtomicBool,
) -> io::Result<PublisherResult> {
    let setup = (|| -> io::Result<Conn> {
        let mut c = Conn::open(addr, &fr.login)?;
        c.write(&amqp::channel_open(1))?;
        c.expect(1, amqp::CHANNEL_OPEN_OK)?;
        if load.confirms {
            c.write(&amqp::confirm_select(1))?;
            c.expect(1, amqp::CONFIRM_SELECT_OK)?;
        }
        Ok(c)
    })();
    start.wait();
    let mut c = setup?;
    let mut sent = 0u64;
    let mut confirms = Confirms::default();
    if load.confirms {
        while !stop.load(Ordering::Relaxed) {
            if sent - confirms.settled() + fr.per_batch <= load.window {
                c.write(&fr.batch)?;
                sent += fr.per_batch;
            } else {
                c.read_frames(|fr| confirms.on(fr))?;
            }
        }
        while confirms.settled() < sent {
            c.read_frames(|fr| confirms.on(fr))?;
        }
    } else if sync_with_broker {
        let mut unanswered = 0;
        let mut since_sync = 0;
        while !stop.load(Ordering::Relaxed) {
            if unanswered == 2 {
                c.expect(1, amqp::QUEUE_DECLARE_OK)?;
                unanswered -= 1;
            }
            c.write(&fr.batch)?;
            sent += fr.per_batch;
            since_sync += fr.per_batch;
            if since_sync >= fr.sync_every {
                c.write(&fr.sync)?;
                unanswered += 1;
                since_sync = 0;
            }
        }
        c.write(&fr.sync)?;
        for _ in 0..=unanswered {
            c.expect(1, amqp::QUEUE_DECLARE_OK)?;
        }
    } else {
        while !stop.load(Ordering::Relaxed) {
            match c.write(&fr.batch) {
                Ok(()) => sent += fr.per_batch,
                // The sink scenario stops by dropping everything.
                Err(_) if stop.load(Ordering::Relaxed) => break,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(PublisherResult {
        sent,
        end: Instant::now(),
        nacks: confirms.nacks,
    })
}

/// One measured run against the broker (direct or through a proxy).
#[derive(Clone, Copy)]
struct Run {
    msgs: u64,
    secs: f64,
    nacks: u64,
    proxy_cpu: Option<f64>,
    proxy_sys: Option<Syscalls>,
    broker_cpu: Option<f64>,
    bench_cpu: f64,
}

fn broker_run(
    ctx: &Ctx,
    addr: SocketAddr,
    proxy: Option<&Proxy>,
    load: &Load,
    admin: &mut Conn,
) -> io::Result<Run> {
    // Start from an empty queue (it is also bounded by x-max-length).
    admin.write(&amqp::queue_purge(1, &ctx.opts.queue))?;
    admin.expect(1, amqp::QUEUE_PURGE_OK)?;
    let fr = Arc::new(pub_frames(ctx, load));
    let barrier = Arc::new(Barrier::new(load.publishers + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..load.publishers)
        .map(|_| {
            let (fr, barrier, stop) = (fr.clone(), barrier.clone(), stop.clone());
            let load = *load;
            thread::spawn(move || publisher(addr, &fr, &load, true, &barrier, &stop))
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let counter = proxy.and_then(|p| SyscallCounter::start(p.pid));
    let proxy_cpu0 = proxy.map(Proxy::cpu_seconds);
    let broker_cpu0 = ctx.broker_pid.map(|p| procfs::cpu_seconds(&p.to_string()));
    let bench_cpu0 = procfs::cpu_seconds("self");
    thread::sleep(Duration::from_secs_f64(ctx.opts.seconds));
    stop.store(true, Ordering::Relaxed);
    let mut msgs = 0;
    let mut nacks = 0;
    let mut end = start;
    let mut error = None;
    for h in handles {
        match h
            .join()
            .map_err(|_| io::Error::other("publisher panicked"))?
        {
            Ok(r) => {
                msgs += r.sent;
                nacks += r.nacks;
                end = end.max(r.end);
            }
            Err(e) => error = Some(e),
        }
    }
    let proxy_sys = counter.and_then(SyscallCounter::stop);
    if let Some(e) = error {
        return Err(e);
    }
    Ok(Run {
        msgs,
        secs: end.duration_since(start).as_secs_f64(),
        nacks,
        proxy_cpu: proxy
            .map(Proxy::cpu_seconds)
            .zip(proxy_cpu0)
            .map(|(b, a)| b - a),
        proxy_sys,
        broker_cpu: ctx
            .broker_pid
            .map(|p| procfs::cpu_seconds(&p.to_string()))
            .zip(broker_cpu0)
            .map(|(b, a)| b - a),
        bench_cpu: procfs::cpu_seconds("self") - bench_cpu0,
    })
}

/// Sums of several runs of one path.
#[derive(Default)]
struct Agg {
    rates: Vec<f64>,
    msgs: u64,
    secs: f64,
    nacks: u64,
    proxy_cpu: f64,
    sys: Option<Syscalls>,
    broker_cpu: Option<f64>,
    bench_cpu: f64,
}

impl Agg {
    fn add(&mut self, r: Run) {
        self.rates.push(r.msgs as f64 / r.secs);
        self.msgs += r.msgs;
        self.secs += r.secs;
        self.nacks += r.nacks;
        self.proxy_cpu += r.proxy_cpu.unwrap_or(0.0);
        if let Some(n) = r.proxy_sys {
            let s = self.sys.get_or_insert_with(Syscalls::default);
            s.total += n.total;
            s.recvfrom += n.recvfrom;
            s.sendto += n.sendto;
            s.epoll_wait += n.epoll_wait;
            s.futex += n.futex;
        }
        self.broker_cpu = r.broker_cpu.map(|c| c + self.broker_cpu.unwrap_or(0.0));
        self.bench_cpu += r.bench_cpu;
    }

    fn rate(&self) -> f64 {
        median(&self.rates)
    }

    /// The median, and the range when there were several runs.
    fn rate_text(&self) -> String {
        let s = crate::report::Stats::of(&self.rates);
        if self.rates.len() > 1 {
            format!("{} ({}–{})", rate(s.p50), rate(s.min), rate(s.max))
        } else {
            rate(s.p50)
        }
    }

    fn us_per_msg(&self, cpu: f64) -> f64 {
        cpu * 1e6 / self.msgs.max(1) as f64
    }
}

pub fn scenario(ctx: &mut Ctx) -> io::Result<()> {
    let o = ctx.opts.clone();
    let mut admin = Conn::open(
        ctx.broker,
        &Login::new(&o.user, &o.password, &o.vhost, "amqproxy-bench admin"),
    )?;
    admin.write(&amqp::channel_open(1))?;
    admin.expect(1, amqp::CHANNEL_OPEN_OK)?;
    admin.write(&amqp::queue_declare(1, &o.queue, false, Some(o.max_length)))?;
    admin.expect(1, amqp::QUEUE_DECLARE_OK)?;
    let proxy = ctx.start_proxy(true, ctx.broker)?;
    let mut table = Table::new(
        "throughput to RabbitMQ (msgs/s the broker processed; median (min–max) of runs)",
        &[
            "load",
            "direct msgs/s",
            "proxy msgs/s",
            "proxy/direct (median of pairs)",
            "proxy CPU µs/msg",
            "proxy syscalls/msg",
            "msgs per proxy send",
            "broker CPU µs/msg direct/proxy",
            "bench CPU % of a core direct/proxy",
        ],
    );
    let mut json = Vec::new();
    for &publishers in &o.publishers {
        for &size in &o.sizes {
            for &confirms in &o.confirms {
                let load = Load {
                    publishers,
                    size,
                    confirms,
                    window: o.confirm_window,
                };
                eprintln!("throughput: {}", load.label());
                let (mut direct, mut via) = (Agg::default(), Agg::default());
                for rep in 0..o.repeat {
                    // ABBA order, so a drift in the machine's load hits both.
                    if rep % 2 == 0 {
                        direct.add(broker_run(ctx, ctx.broker, None, &load, &mut admin)?);
                        via.add(broker_run(
                            ctx,
                            proxy.addr,
                            Some(&proxy),
                            &load,
                            &mut admin,
                        )?);
                    } else {
                        via.add(broker_run(
                            ctx,
                            proxy.addr,
                            Some(&proxy),
                            &load,
                            &mut admin,
                        )?);
                        direct.add(broker_run(ctx, ctx.broker, None, &load, &mut admin)?);
                    }
                }
                // Each repetition measured both paths back to back: the
                // median of those ratios, so slow drift in the machine's
                // load cancels out.
                let ratios: Vec<f64> = via
                    .rates
                    .iter()
                    .zip(&direct.rates)
                    .map(|(v, d)| v / d)
                    .collect();
                let ratio = median(&ratios);
                let ratio_text = if ratios.len() > 1 {
                    let s = crate::report::Stats::of(&ratios);
                    format!("{} ({}–{})", f(ratio, 3), f(s.min, 2), f(s.max, 2))
                } else {
                    f(ratio, 3)
                };
                let cpu_us = via.us_per_msg(via.proxy_cpu);
                let per_msg = |n: u64| n as f64 / via.msgs.max(1) as f64;
                table.row(vec![
                    load.label(),
                    direct.rate_text(),
                    via.rate_text(),
                    ratio_text,
                    f(cpu_us, 3),
                    opt(via.sys.map(|s| per_msg(s.total)), 3),
                    opt(via.sys.map(|s| via.msgs as f64 / s.sendto.max(1) as f64), 1),
                    format!(
                        "{} / {}",
                        opt(direct.broker_cpu.map(|c| direct.us_per_msg(c)), 2),
                        opt(via.broker_cpu.map(|c| via.us_per_msg(c)), 2)
                    ),
                    format!(
                        "{} / {}",
                        f(100.0 * direct.bench_cpu / direct.secs, 0),
                        f(100.0 * via.bench_cpu / via.secs, 0)
                    ),
                ]);
                let side = |a: &Agg, proxy: bool| {
                    Json::obj(vec![
                        ("msgs_per_s_median", a.rate().into()),
                        (
                            "msgs_per_s_runs",
                            Json::Arr(a.rates.iter().map(|r| (*r).into()).collect()),
                        ),
                        ("messages", a.msgs.into()),
                        ("seconds", a.secs.into()),
                        ("nacks", a.nacks.into()),
                        ("broker_cpu_s", a.broker_cpu.into()),
                        ("bench_cpu_s", a.bench_cpu.into()),
                        (
                            "proxy_cpu_s",
                            if proxy {
                                a.proxy_cpu.into()
                            } else {
                                Json::Null
                            },
                        ),
                        (
                            "proxy_syscalls",
                            if proxy {
                                syscalls_json(a.sys)
                            } else {
                                Json::Null
                            },
                        ),
                    ])
                };
                json.push(Json::obj(vec![
                    ("publishers", publishers.into()),
                    ("message_bytes", size.into()),
                    ("confirms", confirms.into()),
                    ("direct", side(&direct, false)),
                    ("proxy", side(&via, true)),
                    ("proxy_over_direct", ratio.into()),
                    (
                        "proxy_over_direct_per_repetition",
                        Json::Arr(ratios.iter().map(|r| (*r).into()).collect()),
                    ),
                    ("proxy_cpu_us_per_msg", cpu_us.into()),
                ]));
                {
                    let want = if publishers == 1 { 0.95 } else { 1.0 };
                    ctx.targets.push(TargetCheck {
                        name: format!("throughput proxy/direct, {}", load.label()),
                        target: format!("≥ {want:.2}×"),
                        measured: format!("{}×", f(ratio, 3)),
                        met: Some(ratio >= want),
                    });
                }
                if size == 16 && !confirms {
                    ctx.targets.push(TargetCheck {
                        name: format!("proxy CPU per 16 B message to RabbitMQ, {}", load.label()),
                        target: "≤ 0.4 µs".into(),
                        measured: format!("{} µs", f(cpu_us, 3)),
                        met: Some(cpu_us <= 0.4),
                    });
                }
            }
        }
    }
    table.note(format!(
        "queue `{}` (x-max-length {}, drop-head; purged before each run), default exchange, transient 16 B / 4 KiB bodies; {} s per run, {} run(s) per path in ABBA order; confirm window {} messages",
        o.queue, o.max_length, o.seconds, o.repeat, o.confirm_window
    ));
    table.note("proxy syscalls: all of the proxy's system calls during the run (perf stat on raw_syscalls:sys_enter); msgs per send: messages / sendto calls, i.e. how well writes are batched");
    ctx.tables.push(table);
    drop(proxy);
    admin.write(&amqp::queue_delete(1, &o.queue))?;
    admin.expect(1, amqp::QUEUE_DELETE_OK)?;
    let _ = admin.close();
    ctx.results.push(("throughput".into(), Json::Arr(json)));
    Ok(())
}

pub fn syscalls_json(s: Option<Syscalls>) -> Json {
    s.map_or(Json::Null, |s| {
        Json::obj(vec![
            ("total", s.total.into()),
            ("recvfrom", s.recvfrom.into()),
            ("sendto", s.sendto.into()),
            ("epoll_wait", s.epoll_wait.into()),
            ("futex", s.futex.into()),
        ])
    })
}

// ---- the proxy into the sink -------------------------------------------------------

pub struct SinkRun {
    pub rate: f64,
    pub proxy_cpu: f64,
    pub proxy_cores: f64,
    pub sys: Option<Syscalls>,
    pub bench_cpu: f64,
    pub secs: f64,
    pub msgs: u64,
}

/// Runs instead of the plain sleep of the measurement window (used to
/// attach `perf record`).
type During<'a> = Option<&'a dyn Fn(&Proxy, f64)>;

/// Publishers into the proxy into the sink.
fn sink_run(ctx: &Ctx, load: &Load, during: During<'_>) -> io::Result<SinkRun> {
    let sink = Sink::start()?;
    let proxy = ctx.start_proxy(true, sink.addr)?;
    let fr = Arc::new(pub_frames(ctx, load));
    let barrier = Arc::new(Barrier::new(load.publishers + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..load.publishers)
        .map(|_| {
            let (fr, barrier, stop) = (fr.clone(), barrier.clone(), stop.clone());
            let load = *load;
            let addr = proxy.addr;
            thread::spawn(move || publisher(addr, &fr, &load, false, &barrier, &stop))
        })
        .collect();
    barrier.wait();
    thread::sleep(Duration::from_millis(500)); // warm-up
    let counted = || sink.counters.messages.load(Ordering::Relaxed);
    let counter = match during {
        Some(_) => None,
        None => SyscallCounter::start(proxy.pid),
    };
    let (m0, t0, c0, b0) = (
        counted(),
        Instant::now(),
        proxy.cpu_seconds(),
        procfs::cpu_seconds("self"),
    );
    match during {
        Some(run) => run(&proxy, ctx.opts.sink_seconds),
        None => thread::sleep(Duration::from_secs_f64(ctx.opts.sink_seconds)),
    }
    let (m1, t1, c1, b1) = (
        counted(),
        Instant::now(),
        proxy.cpu_seconds(),
        procfs::cpu_seconds("self"),
    );
    let sys = counter.and_then(SyscallCounter::stop);
    stop.store(true, Ordering::Relaxed);
    drop(proxy); // unblocks publishers stuck in write
    for h in handles {
        let _ = h.join();
    }
    let secs = t1.duration_since(t0).as_secs_f64();
    let msgs = m1 - m0;
    Ok(SinkRun {
        rate: msgs as f64 / secs,
        proxy_cpu: c1 - c0,
        proxy_cores: (c1 - c0) / secs,
        sys,
        bench_cpu: b1 - b0,
        secs,
        msgs,
    })
}

pub fn sink_scenario(ctx: &mut Ctx) -> io::Result<()> {
    let o = ctx.opts.clone();
    let mut table = Table::new(
        "proxy alone: publishers → proxy → discard-everything sink",
        &[
            "load",
            "msgs/s",
            "proxy CPU µs/msg",
            "proxy CPU cores busy",
            "proxy syscalls/msg",
            "msgs per proxy send",
            "bench CPU % of a core (publishers + sink)",
        ],
    );
    let mut json = Vec::new();
    for &(publishers, size) in &o.sink_loads {
        let load = Load {
            publishers,
            size,
            confirms: false,
            window: 0,
        };
        eprintln!("sink: {}", load.label());
        let r = sink_run(ctx, &load, None)?;
        let per = |v: u64| v as f64 / r.msgs.max(1) as f64;
        table.row(vec![
            load.label(),
            rate(r.rate),
            f(r.proxy_cpu * 1e6 / r.msgs.max(1) as f64, 3),
            f(r.proxy_cores, 2),
            opt(r.sys.map(|s| per(s.total)), 4),
            opt(r.sys.map(|s| r.msgs as f64 / s.sendto.max(1) as f64), 1),
            f(100.0 * r.bench_cpu / r.secs, 0),
        ]);
        json.push(Json::obj(vec![
            ("publishers", publishers.into()),
            ("message_bytes", size.into()),
            ("msgs_per_s", r.rate.into()),
            ("messages", r.msgs.into()),
            ("seconds", r.secs.into()),
            ("proxy_cpu_s", r.proxy_cpu.into()),
            (
                "proxy_cpu_us_per_msg",
                (r.proxy_cpu * 1e6 / r.msgs.max(1) as f64).into(),
            ),
            ("proxy_syscalls", syscalls_json(r.sys)),
            ("bench_cpu_s", r.bench_cpu.into()),
        ]));
        if publishers == 1 && size == 16 {
            ctx.targets.push(TargetCheck {
                name: "proxy into a discard-everything upstream, 1 publisher, 16 B".into(),
                target: "≥ 2,000,000 msgs/s".into(),
                measured: format!("{} msgs/s", rate(r.rate)),
                met: Some(r.rate >= 2e6),
            });
            ctx.targets.push(TargetCheck {
                name: "proxy CPU per 16 B message into the sink".into(),
                target: "≤ 0.4 µs".into(),
                measured: format!("{} µs", f(r.proxy_cpu * 1e6 / r.msgs.max(1) as f64, 3)),
                met: Some(r.proxy_cpu * 1e6 / r.msgs.max(1) as f64 <= 0.4),
            });
        }
    }
    table.note(format!(
        "0.5 s warm-up, then {} s counted at the sink; the sink and the publishers run in the bench process on the same 2 cores as the proxy",
        o.sink_seconds
    ));
    ctx.tables.push(table);
    ctx.results.push(("sink".into(), Json::Arr(json)));
    if o.perf {
        profile(ctx)?;
    }
    Ok(())
}

/// An extra, unreported sink run of 1 publisher × 16 B with `perf record`
/// attached to the proxy; prints where its CPU time goes.
fn profile(ctx: &mut Ctx) -> io::Result<()> {
    let data = ctx.target_dir.join("bench-perf-sink.data");
    let load = Load {
        publishers: 1,
        size: 16,
        confirms: false,
        window: 0,
    };
    eprintln!("sink: profiling with perf ({})", data.display());
    let data2 = data.clone();
    let record = move |proxy: &Proxy, secs: f64| {
        let perf = PerfRecord::start(proxy.pid, &data2);
        thread::sleep(Duration::from_secs_f64(secs));
        if let Some(p) = perf {
            p.stop();
        }
    };
    let run = sink_run(ctx, &load, Some(&record))?;
    let label = format!(
        "sink run of 1 pub × 16 B under perf, {} msgs/s",
        rate(run.rate)
    );
    let (tables, json) = crate::profile::report(&data, &label)?;
    ctx.tables.extend(tables);
    ctx.results.push(("profile_sink".into(), json));
    Ok(())
}
