//! Scenario 1, churn: the one-message script. Each cycle is connect →
//! Channel.Open → publish one 16 B message → Channel.Close → Connection.Close,
//! waiting for every answer as a client library does, directly to the
//! broker and through the proxy, with the broker behind the delay relay.

use crate::amqp::{self, Conn, Login};
use crate::relay::Relay;
use crate::report::{f, Json, Stats, Table};
use crate::{Ctx, TargetCheck};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

struct Frames {
    /// amqps: the client side of every cycle speaks TLS with this config.
    tls: Option<Arc<rustls::ClientConfig>>,
    login: Login,
    channel_open: Vec<u8>,
    publish_and_close: Vec<u8>,
    connection_close: Vec<u8>,
}

fn cycle(addr: SocketAddr, fr: &Frames) -> io::Result<()> {
    let step =
        |what: &'static str| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    let tls = match &fr.tls {
        Some(config) => Some(crate::tls::client(config).map_err(step("tls"))?),
        None => None,
    };
    let mut c = Conn::open_with(addr, &fr.login, tls).map_err(step("connection handshake"))?;
    let port = c.stream.local_addr().map(|a| a.port()).unwrap_or(0);
    let step = |what: &'static str| {
        move |e: io::Error| io::Error::new(e.kind(), format!("client port {port}: {what}: {e}"))
    };
    c.write(&fr.channel_open).map_err(step("channel.open"))?;
    c.expect(1, amqp::CHANNEL_OPEN_OK)
        .map_err(step("channel.open-ok"))?;
    c.write(&fr.publish_and_close)
        .map_err(step("publish + channel.close"))?;
    c.expect(1, amqp::CHANNEL_CLOSE_OK)
        .map_err(step("channel.close-ok"))?;
    c.write(&fr.connection_close)
        .map_err(step("connection.close"))?;
    c.expect(0, amqp::CONNECTION_CLOSE_OK)
        .map_err(step("connection.close-ok"))?;
    Ok(())
}

/// What `clients` clients running `cycles` cycles each back to back saw.
struct Outcome {
    /// ms per successful cycle.
    times: Vec<f64>,
    /// Failed cycles (the client goes on with the next one).
    errors: Vec<String>,
    wall: f64,
}

fn run(addr: SocketAddr, fr: &Arc<Frames>, clients: usize, cycles: usize) -> io::Result<Outcome> {
    let start = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let fr = fr.clone();
            thread::spawn(move || {
                let mut times = Vec::with_capacity(cycles);
                let mut errors = Vec::new();
                for _ in 0..cycles {
                    let t = Instant::now();
                    match cycle(addr, &fr) {
                        Ok(()) => times.push(t.elapsed().as_secs_f64() * 1e3),
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                (times, errors)
            })
        })
        .collect();
    let mut out = Outcome {
        times: Vec::new(),
        errors: Vec::new(),
        wall: 0.0,
    };
    for h in handles {
        let (t, e) = h
            .join()
            .map_err(|_| io::Error::other("churn thread panicked"))?;
        out.times.extend(t);
        out.errors.extend(e);
    }
    out.wall = start.elapsed().as_secs_f64();
    if out.times.is_empty() {
        return Err(io::Error::other(format!(
            "every cycle failed; first error: {}",
            out.errors.first().map_or("-", String::as_str)
        )));
    }
    Ok(out)
}

struct Row {
    delay_ms: u64,
    target: String,
    clients: usize,
    stats: Stats,
    wall: f64,
    errors: Vec<String>,
    warmup: Option<Warmup>,
}

/// How the proxy was brought to steady state before a measured run.
struct Warmup {
    /// Clients that held a channel open at once, then all closed.
    burst: usize,
    cycles: usize,
    /// Warm-up cycles that took at least half an RTT (a channel opened
    /// upstream rather than taken from the idle list).
    slow: usize,
    seconds: f64,
    converged: bool,
    errors: Vec<String>,
}

impl Warmup {
    fn text(&self) -> String {
        let burst = if self.burst > 0 {
            format!("burst of {} + ", self.burst)
        } else {
            String::new()
        };
        format!(
            "{burst}{} cycles ({} slow), {} s{}",
            self.cycles,
            self.slow,
            f(self.seconds, 1),
            if self.converged { "" } else { ", NOT steady" }
        )
    }
}

/// Holds `n` clients with a channel open at once, then closes them all;
/// with reuse, the proxy keeps (up to max_idle_channels per pool) their
/// fenced channels for the next clients.
fn burst(addr: SocketAddr, fr: &Arc<Frames>, n: usize) -> Vec<String> {
    let barrier = Arc::new(std::sync::Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (fr, barrier) = (fr.clone(), barrier.clone());
            thread::spawn(move || -> io::Result<()> {
                let tls = fr.tls.as_ref().map(crate::tls::client).transpose();
                let opened = tls
                    .and_then(|tls| Conn::open_with(addr, &fr.login, tls))
                    .and_then(|mut c| {
                        c.write(&fr.channel_open)?;
                        c.expect(1, amqp::CHANNEL_OPEN_OK)?;
                        Ok(c)
                    });
                barrier.wait();
                let mut c = opened?;
                c.write(&amqp::channel_close(1))?;
                c.expect(1, amqp::CHANNEL_CLOSE_OK)?;
                c.close()
            })
        })
        .collect();
    handles
        .into_iter()
        .filter_map(|h| match h.join() {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("warm-up burst: {e}")),
            Err(_) => Some("warm-up burst: thread panicked".into()),
        })
        .collect()
}

/// Runs cycles until a round of them, lasting at least two RTTs, has no
/// slow cycle (the idle pool covers the fences in flight), or `cap`.
fn warm_up(
    addr: SocketAddr,
    fr: &Arc<Frames>,
    clients: usize,
    rtt_ms: f64,
    cap: Duration,
    burst_size: usize,
) -> io::Result<Warmup> {
    let start = Instant::now();
    let mut w = Warmup {
        burst: burst_size,
        cycles: 0,
        slow: 0,
        seconds: 0.0,
        converged: false,
        errors: Vec::new(),
    };
    if burst_size > 0 {
        w.errors.extend(burst(addr, fr, burst_size));
        thread::sleep(Duration::from_secs_f64(2.0 * rtt_ms / 1e3) + Duration::from_millis(20));
    }
    let mut per_client = 50;
    loop {
        let r = run(addr, fr, clients, per_client)?;
        let slow = r.times.iter().filter(|t| **t >= rtt_ms / 2.0).count();
        w.cycles += r.times.len();
        w.slow += slow;
        let clean = slow == 0 && r.errors.is_empty();
        w.errors.extend(r.errors);
        if clean {
            w.converged = true;
            break;
        }
        if start.elapsed() > cap {
            break;
        }
        let p50 = Stats::of(&r.times).p50.max(0.05);
        per_client = ((2.0 * rtt_ms / p50).ceil() as usize).clamp(50, 5000);
    }
    w.seconds = start.elapsed().as_secs_f64();
    Ok(w)
}

/// A fixed number of warm-up cycles (the upstream connection; no RTT to
/// cover).
fn warm_up_fixed(
    addr: SocketAddr,
    fr: &Arc<Frames>,
    clients: usize,
    cycles: usize,
) -> io::Result<Warmup> {
    let start = Instant::now();
    let r = run(addr, fr, clients, cycles.div_ceil(clients).max(1))?;
    Ok(Warmup {
        burst: 0,
        cycles: r.times.len(),
        slow: 0,
        seconds: start.elapsed().as_secs_f64(),
        converged: true,
        errors: r.errors,
    })
}

impl Row {
    fn new(
        delay_ms: u64,
        target: impl Into<String>,
        clients: usize,
        run: Outcome,
        warmup: Option<Warmup>,
    ) -> Row {
        Row {
            delay_ms,
            target: target.into(),
            clients,
            stats: Stats::of(&run.times),
            wall: run.wall,
            errors: run.errors,
            warmup,
        }
    }

    fn failed(&self) -> usize {
        self.errors.len() + self.warmup.as_ref().map_or(0, |w| w.errors.len())
    }
}

fn frames(o: &crate::Opts, tls: Option<Arc<rustls::ClientConfig>>) -> Frames {
    Frames {
        tls,
        login: Login::new(&o.user, &o.password, &o.vhost, "amqproxy-bench churn"),
        channel_open: amqp::channel_open(1),
        publish_and_close: [
            amqp::publish(1, "", &o.queue, &[b'x'; 16]),
            amqp::channel_close(1),
        ]
        .concat(),
        connection_close: amqp::connection_close(),
    }
}

/// How the proxy reaches the broker in a scenario.
struct Upstream<'a> {
    /// The proxy's upstream URL for the address clients would dial directly.
    url: &'a dyn Fn(SocketAddr) -> String,
    /// More proxy arguments (the CA file for amqps).
    args: Vec<String>,
}

pub fn scenario(ctx: &mut Ctx) -> io::Result<()> {
    let fr = Arc::new(frames(&ctx.opts, None));
    let upstream = Upstream {
        url: &|a| format!("amqp://{a}"),
        args: Vec::new(),
    };
    let broker = ctx.broker;
    let rows = measure(ctx, broker, &fr, &fr, &upstream, "direct")?;
    report(
        ctx,
        "churn",
        "churn: connect, channel, publish 16 B, close (ms per cycle)",
        &rows,
    );
    for r in rows
        .iter()
        .filter(|r| r.target == "proxy, reuse" && r.clients == 1 && r.delay_ms > 0)
    {
        ctx.targets.push(TargetCheck {
            name: format!("churn p50 at {} ms RTT, proxy with reuse", 2 * r.delay_ms),
            target: "≤ 2 ms".into(),
            measured: format!("{} ms", f(r.stats.p50, 2)),
            met: Some(r.stats.p50 <= 2.0),
        });
    }
    Ok(())
}

/// The churn cycle against a broker that clients can reach only over TLS
/// (amqps, a TLS terminator in front of the broker, behind the delay
/// relay): direct amqps from the client vs plain AMQP to a local proxy
/// whose upstream is amqps.
pub fn amqps_scenario(ctx: &mut Ctx) -> io::Result<()> {
    let Some(terminator) = crate::tls::Terminator::start(ctx)? else {
        eprintln!("amqps: skipped, stunnel4 (Debian package stunnel4) is not installed");
        return Ok(());
    };
    let direct = Arc::new(frames(&ctx.opts, Some(terminator.client_config.clone())));
    let plain = Arc::new(frames(&ctx.opts, None));
    let upstream = Upstream {
        // The certificate is for localhost: the proxy verifies it by name.
        url: &|a| format!("amqps://localhost:{}", a.port()),
        args: vec![
            "--upstream-ca-file".into(),
            terminator.ca_file.display().to_string(),
        ],
    };
    let rows = measure(
        ctx,
        terminator.addr,
        &direct,
        &plain,
        &upstream,
        "direct amqps",
    )?;
    drop(terminator);
    report(
        ctx,
        "amqps",
        "amqps churn: connect, channel, publish 16 B, close (ms per cycle); the broker behind TLS, the proxy's upstream amqps",
        &rows,
    );
    for r in rows
        .iter()
        .filter(|r| r.target == "proxy, reuse" && r.clients == 1 && r.delay_ms > 0)
    {
        let direct = rows
            .iter()
            .find(|d| d.delay_ms == r.delay_ms && d.clients == 1 && d.target == "direct amqps");
        if let Some(d) = direct {
            ctx.targets.push(TargetCheck {
                name: format!(
                    "amqps churn p50 at {} ms RTT: direct amqps / proxy (amqps upstream)",
                    2 * r.delay_ms
                ),
                target: "proxy faster".into(),
                measured: format!(
                    "{} ms / {} ms = {}×",
                    f(d.stats.p50, 1),
                    f(r.stats.p50, 2),
                    f(d.stats.p50 / r.stats.p50, 0)
                ),
                met: Some(r.stats.p50 < d.stats.p50),
            });
        }
    }
    Ok(())
}

/// Every delay: `direct_fr` cycles straight to `target` (through the delay
/// relay), then proxies with and without reuse in front of it.
fn measure(
    ctx: &mut Ctx,
    target: SocketAddr,
    direct_fr: &Arc<Frames>,
    fr: &Arc<Frames>,
    up: &Upstream<'_>,
    direct_name: &str,
) -> io::Result<Vec<Row>> {
    let mut rows: Vec<Row> = Vec::new();
    let p = ctx.opts.churn_parallel;
    for &delay_ms in &ctx.opts.delays_ms.clone() {
        let delay = Duration::from_millis(delay_ms);
        let relay = if delay_ms > 0 {
            Some(Relay::start(target, delay)?)
        } else {
            None
        };
        let upstream = relay.as_ref().map_or(target, |r| r.addr);
        let o = &ctx.opts;
        eprintln!("churn: delay {delay_ms} ms each way: {direct_name}");
        let direct_n = o.churn_direct_cycles;
        rows.push(Row::new(
            delay_ms,
            direct_name,
            1,
            run(upstream, direct_fr, 1, direct_n)?,
            None,
        ));
        let per_client = direct_n.div_ceil(p).max(2);
        rows.push(Row::new(
            delay_ms,
            direct_name,
            p,
            run(upstream, direct_fr, p, per_client)?,
            None,
        ));

        // (reuse, max_idle_channels, label)
        let mut variants: Vec<(bool, Option<u32>, String)> = vec![
            (true, None, "proxy, reuse".into()),
            (false, None, "proxy, no reuse".into()),
        ];
        if let Some(m) = ctx.opts.churn_max_idle {
            variants.push((
                true,
                Some(m),
                format!("proxy, reuse, max_idle_channels {m}"),
            ));
        }
        for (reuse, max_idle, name) in variants {
            eprintln!("churn: delay {delay_ms} ms each way: {name}");
            let mut args: Vec<String> = max_idle
                .map(|m| vec!["--max-idle-channels".into(), m.to_string()])
                .unwrap_or_default();
            args.extend(up.args.iter().cloned());
            let proxy = ctx.start_proxy_url(reuse, &(up.url)(upstream), &args)?;
            let o = &ctx.opts;
            let n = if reuse {
                o.churn_cycles
            } else {
                o.churn_noreuse_cycles
            };
            let cap = Duration::from_secs_f64(o.churn_warmup_seconds);
            let burst_size = max_idle.map_or(o.churn_burst, |m| o.churn_burst.max(m as usize));
            let warmup_cycles = o.churn_warmup;
            let rtt = 2.0 * delay_ms as f64;
            for clients in [1, p] {
                // Warm-up: the upstream connection, and with reuse enough
                // idle channels to cover the fences in flight.
                let w = if reuse && delay_ms > 0 {
                    warm_up(proxy.addr, fr, clients, rtt, cap, burst_size)?
                } else {
                    warm_up_fixed(
                        proxy.addr,
                        fr,
                        clients,
                        if reuse { warmup_cycles } else { 3 * clients },
                    )?
                };
                let t = run(proxy.addr, fr, clients, n.div_ceil(clients).max(2))?;
                rows.push(Row::new(delay_ms, name.clone(), clients, t, Some(w)));
            }
            drop(proxy);
        }
        drop(relay);
    }
    Ok(rows)
}

fn report(ctx: &mut Ctx, key: &str, title: &str, rows: &[Row]) {
    let mut table = Table::new(
        title,
        &[
            "one-way delay",
            "path",
            "clients",
            "cycles",
            "mean",
            "p50",
            "p99",
            "max",
            "cycles/s",
            "p50 vs direct",
            "warm-up before measuring",
            "failed cycles",
        ],
    );
    let mut json = Vec::new();
    for r in rows {
        let direct = rows
            .iter()
            .find(|d| {
                d.delay_ms == r.delay_ms && d.clients == r.clients && d.target.starts_with("direct")
            })
            .map(|d| d.stats.p50);
        let speedup = direct.map(|d| d / r.stats.p50);
        table.row(vec![
            format!("{} ms", r.delay_ms),
            r.target.clone(),
            r.clients.to_string(),
            r.stats.n.to_string(),
            f(r.stats.mean, 2),
            f(r.stats.p50, 2),
            f(r.stats.p99, 2),
            f(r.stats.max, 2),
            f(r.stats.n as f64 / r.wall, 0),
            match speedup {
                Some(s) if !r.target.starts_with("direct") => format!("{}× faster", f(s, 1)),
                _ => "-".into(),
            },
            r.warmup.as_ref().map_or("-".into(), Warmup::text),
            r.failed().to_string(),
        ]);
        json.push(Json::obj(vec![
            ("one_way_delay_ms", r.delay_ms.into()),
            ("rtt_ms", (2 * r.delay_ms).into()),
            ("path", r.target.clone().into()),
            ("clients", r.clients.into()),
            ("cycle_ms", r.stats.json()),
            ("cycles_per_s", (r.stats.n as f64 / r.wall).into()),
            (
                "warmup",
                r.warmup.as_ref().map_or(Json::Null, |w| {
                    Json::obj(vec![
                        ("burst_clients", w.burst.into()),
                        ("cycles", w.cycles.into()),
                        ("slow_cycles", w.slow.into()),
                        ("seconds", w.seconds.into()),
                        ("steady", w.converged.into()),
                    ])
                }),
            ),
            ("failed_cycles", r.failed().into()),
            (
                "first_failure",
                r.errors
                    .iter()
                    .chain(r.warmup.iter().flat_map(|w| w.errors.iter()))
                    .next()
                    .cloned()
                    .into(),
            ),
        ]));
    }
    table.note("steady state: measured after the warm-up listed (not included). A channel a client returns is fenced (Basic.Qos → QosOk, one upstream RTT) before the next client may take it, so with reuse the pool must hold about RTT / cycle time channels; the proxy adds one per miss, so a cold proxy converges slowly. The warm-up is a burst of clients holding a channel at once (their channels are kept, up to max_idle_channels per pool), then cycles until a round of at least two RTTs has no slow cycle (≥ RTT/2); at 0 ms delay a fixed number of cycles. A slow cycle in the warm-up opened its channel upstream");
    table.note("the relay holds each chunk for the one-way delay in each direction and holds a new connection's first bytes one extra RTT, as a TCP connect over that link would take");
    ctx.tables.push(table);
    ctx.results.push((key.into(), Json::Arr(json)));
}
