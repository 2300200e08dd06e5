//! The proxy's load tool: `cargo bench --bench proxy [-- OPTIONS] [SCENARIO...]`.
//!
//! Starts the release binary of amqproxy itself, talks to the local
//! RabbitMQ, prints tables and writes target/bench-results.json. Every
//! figure is measured in the run that prints it; proxy and direct figures
//! are measured side by side, because the machine is shared and absolute
//! times drift. See docs/PERFORMANCE.md for the method and the options.

mod amqp;
mod churn;
mod codec;
mod procfs;
mod profile;
mod relay;
mod report;
mod sink;
mod storm;
mod throughput;
mod tls;

use procfs::{Proxy, ProxyOptions};
use report::{Json, Table};
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Instant;

const SCENARIOS: [&str; 6] = ["codec", "churn", "amqps", "throughput", "sink", "storm"];

const HELP: &str = "\
amqproxy load tool

usage: cargo bench --bench proxy [-- [--quick | --full] [SCENARIO...]]

scenarios (default: all, in this order): codec churn amqps throughput sink storm
  amqps: the churn cycle with the broker behind TLS (stunnel4 in front of it):
         direct amqps vs plain to the proxy with an amqps upstream
  --quick   (default) small sizes, the whole run takes under a minute
  --full    larger sizes and repeated runs, a few minutes

sizes and settings come from environment variables (defaults quick / full):
  BENCH_BROKER=127.0.0.1:5672      RabbitMQ (guest/guest, vhost /; BENCH_USER,
                                   BENCH_PASSWORD, BENCH_VHOST to change)
  BENCH_DELAY_MS=25 / 0,25         churn: one-way delay(s) of the relay, ms
  BENCH_CHURN_DIRECT_CYCLES=10/40  churn: cycles direct (per delay and mode)
  BENCH_CHURN_CYCLES=300/2000      churn: measured cycles through the proxy
  BENCH_CHURN_NOREUSE_CYCLES=20/100  the same with --no-channel-reuse
  BENCH_CHURN_WARMUP=100/300       churn: warm-up cycles at 0 ms delay
  BENCH_CHURN_BURST=256            churn, reuse: clients of the warm-up burst
  BENCH_CHURN_WARMUP_SECONDS=5/15  churn, reuse: warm-up time limit
  BENCH_CHURN_MAX_IDLE=off/1024    churn: one more proxy run with this
                                   --max-idle-channels (its burst as large)
  BENCH_CHURN_PARALLEL=10          churn: clients in the parallel runs
  BENCH_SECONDS=1/2                throughput: seconds per run
  BENCH_REPEAT=1/5                 throughput: runs per path (median)
  BENCH_PUBLISHERS=1,50            throughput: publisher counts
  BENCH_SIZES=16,4096              throughput: message body sizes
  BENCH_CONFIRMS=off,on            throughput: without / with confirms
  BENCH_CONFIRM_WINDOW=512         throughput: unconfirmed messages in flight
  BENCH_INFLIGHT_KIB=4096          throughput without confirms: unsynced bytes,
                                   shared by the publishers (see PERFORMANCE.md)
  BENCH_MAX_LENGTH=10000           throughput: x-max-length of the queue
  BENCH_SINK_SECONDS=2/5           sink: measured seconds per run
  BENCH_SINK_LOADS=1x16 / 1x16,1x4096,50x16   sink: PUBLISHERSxBYTES list
  BENCH_STORM_CLIENTS=10000        storm: clients (needs ulimit -n > that)
  BENCH_STORM_THREADS=1            storm: bench threads driving the clients
  BENCH_STORM_BACKLOGS=default / default,4096   storm: proxy --listen-backlog
                                   per run (default: the proxy's own)
  BENCH_CODEC_SECONDS=0.3/1        codec: seconds per micro-benchmark
  BENCH_WORKERS=N                  proxy --workers (default: the proxy's, 1 per CPU)
  BENCH_PROXY_ARGS='--flag value'  extra proxy arguments
  BENCH_PROXY_LOG_LEVEL=info       proxy log level (log in target/bench-proxy.log)
  BENCH_PERF=1                     sink, storm: one more run each under `perf record`,
                                   prints where the proxy spends its CPU
  AMQPROXY_BIN=path                the proxy binary (default: the one cargo built)
";

#[derive(Clone)]
pub struct Opts {
    pub full: bool,
    pub scenarios: Vec<String>,
    pub broker: String,
    pub user: String,
    pub password: String,
    pub vhost: String,
    pub queue: String,
    pub delays_ms: Vec<u64>,
    pub churn_direct_cycles: usize,
    pub churn_cycles: usize,
    pub churn_noreuse_cycles: usize,
    pub churn_warmup: usize,
    pub churn_warmup_seconds: f64,
    pub churn_burst: usize,
    pub churn_max_idle: Option<u32>,
    pub churn_parallel: usize,
    pub seconds: f64,
    pub repeat: usize,
    pub publishers: Vec<usize>,
    pub sizes: Vec<usize>,
    pub confirms: Vec<bool>,
    pub confirm_window: u64,
    pub inflight_kib: usize,
    pub max_length: i32,
    pub sink_seconds: f64,
    pub sink_loads: Vec<(usize, usize)>,
    pub storm_clients: usize,
    pub storm_threads: usize,
    /// `None`: the proxy's default listen backlog.
    pub storm_backlogs: Vec<Option<u32>>,
    pub codec_seconds: f64,
    pub workers: Option<usize>,
    pub proxy_args: Vec<String>,
    pub log_level: String,
    pub perf: bool,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| format!("{name}={v}: not a valid value")),
        Err(_) => Ok(default),
    }
}

fn env_list<T: std::str::FromStr>(name: &str, default: &str) -> Result<Vec<T>, String> {
    let v = std::env::var(name).unwrap_or_else(|_| default.to_string());
    v.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse()
                .map_err(|_| format!("{name}={v}: cannot parse {s:?}"))
        })
        .collect()
}

/// The quick or the full default.
fn pick<T>(full: bool, quick: T, full_value: T) -> T {
    if full {
        full_value
    } else {
        quick
    }
}

impl Opts {
    fn parse() -> Result<Opts, String> {
        let mut full = false;
        let mut scenarios = Vec::new();
        let mut via_cargo_bench = false;
        for arg in std::env::args().skip(1) {
            match arg.as_str() {
                // cargo bench passes --bench to harness = false targets.
                "--bench" => via_cargo_bench = true,
                "--full" => full = true,
                "--quick" => full = false,
                "-h" | "--help" => return Err(HELP.into()),
                s if SCENARIOS.contains(&s) => scenarios.push(s.to_string()),
                s => return Err(format!("unknown argument {s:?}\n\n{HELP}")),
            }
        }
        if scenarios.is_empty() {
            if !via_cargo_bench {
                // `cargo test --benches` runs this without --bench: a
                // benchmark needs a broker and minutes, so do nothing.
                return Err(String::new());
            }
            scenarios = SCENARIOS.iter().map(|s| s.to_string()).collect();
        }
        let confirms = env_list::<String>("BENCH_CONFIRMS", "off,on")?
            .iter()
            .map(|s| match s.as_str() {
                "on" | "true" | "1" => Ok(true),
                "off" | "false" | "0" => Ok(false),
                _ => Err(format!("BENCH_CONFIRMS: {s:?} is not on/off")),
            })
            .collect::<Result<_, _>>()?;
        let sink_loads =
            env_list::<String>("BENCH_SINK_LOADS", pick(full, "1x16", "1x16,1x4096,50x16"))?
                .iter()
                .map(|s| {
                    let (p, b) = s
                        .split_once('x')
                        .ok_or(format!("BENCH_SINK_LOADS: {s:?} is not PxB"))?;
                    Ok((
                        p.parse().map_err(|_| format!("BENCH_SINK_LOADS: {s:?}"))?,
                        b.parse().map_err(|_| format!("BENCH_SINK_LOADS: {s:?}"))?,
                    ))
                })
                .collect::<Result<_, String>>()?;
        Ok(Opts {
            full,
            scenarios,
            broker: env_or("BENCH_BROKER", "127.0.0.1:5672".to_string())?,
            user: env_or("BENCH_USER", "guest".to_string())?,
            password: env_or("BENCH_PASSWORD", "guest".to_string())?,
            vhost: env_or("BENCH_VHOST", "/".to_string())?,
            queue: "amqproxy-bench".into(),
            delays_ms: env_list("BENCH_DELAY_MS", pick(full, "25", "0,25"))?,
            churn_direct_cycles: env_or("BENCH_CHURN_DIRECT_CYCLES", pick(full, 10, 40))?,
            churn_cycles: env_or("BENCH_CHURN_CYCLES", pick(full, 300, 2000))?,
            churn_noreuse_cycles: env_or("BENCH_CHURN_NOREUSE_CYCLES", pick(full, 20, 100))?,
            churn_warmup: env_or("BENCH_CHURN_WARMUP", pick(full, 100, 300))?,
            churn_warmup_seconds: env_or("BENCH_CHURN_WARMUP_SECONDS", pick(full, 5.0, 15.0))?,
            churn_burst: env_or("BENCH_CHURN_BURST", 256usize)?,
            churn_max_idle: match std::env::var("BENCH_CHURN_MAX_IDLE") {
                Ok(v) if v == "off" => None,
                Ok(v) => Some(v.parse().map_err(|_| format!("BENCH_CHURN_MAX_IDLE={v}"))?),
                Err(_) => pick(full, None, Some(1024)),
            },
            churn_parallel: env_or("BENCH_CHURN_PARALLEL", 10usize)?.max(1),
            seconds: env_or("BENCH_SECONDS", pick(full, 1.0, 2.0))?,
            repeat: env_or("BENCH_REPEAT", pick(full, 1usize, 5))?.max(1),
            publishers: env_list("BENCH_PUBLISHERS", "1,50")?,
            sizes: env_list("BENCH_SIZES", "16,4096")?,
            confirms,
            confirm_window: env_or("BENCH_CONFIRM_WINDOW", 512u64)?.max(1),
            inflight_kib: env_or("BENCH_INFLIGHT_KIB", 4096usize)?.max(64),
            max_length: env_or("BENCH_MAX_LENGTH", 10000i32)?,
            sink_seconds: env_or("BENCH_SINK_SECONDS", pick(full, 2.0, 5.0))?,
            sink_loads,
            storm_clients: env_or("BENCH_STORM_CLIENTS", 10000usize)?,
            storm_threads: env_or("BENCH_STORM_THREADS", 1usize)?,
            storm_backlogs: env_list::<String>(
                "BENCH_STORM_BACKLOGS",
                pick(full, "default", "default,4096"),
            )?
            .iter()
            .map(|b| match b.as_str() {
                "default" => Ok(None),
                b => b
                    .parse()
                    .map(Some)
                    .map_err(|_| format!("BENCH_STORM_BACKLOGS: {b:?}")),
            })
            .collect::<Result<_, String>>()?,
            codec_seconds: env_or("BENCH_CODEC_SECONDS", pick(full, 0.3, 1.0))?,
            workers: std::env::var("BENCH_WORKERS")
                .ok()
                .and_then(|w| w.parse().ok()),
            proxy_args: std::env::var("BENCH_PROXY_ARGS")
                .map(|a| a.split_whitespace().map(String::from).collect())
                .unwrap_or_default(),
            log_level: env_or("BENCH_PROXY_LOG_LEVEL", "info".to_string())?,
            perf: env_or("BENCH_PERF", 0u8)? != 0,
        })
    }
}

/// A target from the issue next to the figure measured for it.
pub struct TargetCheck {
    pub name: String,
    pub target: String,
    pub measured: String,
    pub met: Option<bool>,
}

pub struct Ctx {
    pub opts: Opts,
    pub broker: SocketAddr,
    pub broker_pid: Option<u32>,
    pub broker_channel_max: u16,
    /// Worker threads of the proxies started (for the storm's bound).
    pub workers: usize,
    pub proxy: ProxyOptions,
    pub target_dir: PathBuf,
    pub tables: Vec<Table>,
    pub results: Vec<(String, Json)>,
    pub targets: Vec<TargetCheck>,
}

impl Ctx {
    pub fn start_proxy(&self, channel_reuse: bool, upstream: SocketAddr) -> io::Result<Proxy> {
        self.start_proxy_with(channel_reuse, upstream, &[])
    }

    pub fn start_proxy_with(
        &self,
        channel_reuse: bool,
        upstream: SocketAddr,
        args: &[String],
    ) -> io::Result<Proxy> {
        self.start_proxy_url(channel_reuse, &format!("amqp://{upstream}"), args)
    }

    pub fn start_proxy_url(
        &self,
        channel_reuse: bool,
        upstream: &str,
        args: &[String],
    ) -> io::Result<Proxy> {
        let options = ProxyOptions {
            bin: self.proxy.bin.clone(),
            channel_reuse,
            workers: self.proxy.workers,
            log_level: self.proxy.log_level.clone(),
            extra_args: [&self.proxy.extra_args[..], args].concat(),
            log_file: self.proxy.log_file.clone(),
        };
        Proxy::start(&options, upstream)
    }
}

fn main() {
    let opts = match Opts::parse() {
        Ok(o) => o,
        Err(text) if text.is_empty() => {
            eprintln!("amqproxy load tool: run it with `cargo bench --bench proxy` (or name scenarios: --help)");
            return;
        }
        Err(text) => {
            eprintln!("{text}");
            std::process::exit(if text == HELP { 0 } else { 2 });
        }
    };
    if let Err(e) = run(opts) {
        eprintln!("bench failed: {e}");
        std::process::exit(1);
    }
}

fn run(opts: Opts) -> io::Result<()> {
    let began = Instant::now();
    let date = report::utc_now();
    let load_before = procfs::load_average();
    let cpu_self_before = procfs::cpu_seconds("self");
    let broker = opts
        .broker
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::other(format!("{} resolves to nothing", opts.broker)))?;
    // One direct connection: is the broker up, which version, channel_max.
    let probe = amqp::Conn::open(
        broker,
        &amqp::Login::new(
            &opts.user,
            &opts.password,
            &opts.vhost,
            "amqproxy-bench probe",
        ),
    )
    .map_err(|e| io::Error::new(e.kind(), format!("RabbitMQ at {broker}: {e}")))?;
    let broker_version = probe.server_version().unwrap_or_else(|| "unknown".into());
    let broker_channel_max = probe.channel_max;
    let _ = probe.close();

    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    std::fs::create_dir_all(&target_dir)?;
    let bin = procfs::proxy_binary()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = opts.workers.unwrap_or(cores);
    let log_file = target_dir.join("bench-proxy.log");
    let _ = std::fs::remove_file(&log_file);
    eprintln!(
        "amqproxy bench ({}): proxy {}, RabbitMQ {broker_version} at {broker}, {cores} cores, load {load_before}",
        if opts.full { "full" } else { "quick" },
        bin.display()
    );
    let mut ctx = Ctx {
        proxy: ProxyOptions {
            bin: bin.clone(),
            channel_reuse: true,
            workers: opts.workers,
            log_level: opts.log_level.clone(),
            extra_args: opts.proxy_args.clone(),
            log_file,
        },
        opts,
        broker,
        broker_pid: procfs::find_broker_pid(),
        broker_channel_max,
        workers,
        target_dir: target_dir.clone(),
        tables: Vec::new(),
        results: Vec::new(),
        targets: Vec::new(),
    };
    for s in ctx.opts.scenarios.clone() {
        let t = Instant::now();
        let tables_before = ctx.tables.len();
        let result = match s.as_str() {
            "codec" => codec::scenario(&mut ctx),
            "churn" => churn::scenario(&mut ctx),
            "amqps" => churn::amqps_scenario(&mut ctx),
            "throughput" => throughput::scenario(&mut ctx),
            "sink" => throughput::sink_scenario(&mut ctx),
            "storm" => storm::scenario(&mut ctx),
            _ => Ok(()),
        };
        if let Err(e) = result {
            return Err(io::Error::new(e.kind(), format!("{s}: {e}")));
        }
        for t in &ctx.tables[tables_before..] {
            print!("{}", t.render());
        }
        eprintln!("{s}: done in {:.1} s", t.elapsed().as_secs_f64());
    }

    let mut targets = Table::new(
        "targets (issue 5) next to this run's figures",
        &["target", "wanted", "measured", "met"],
    );
    for t in &ctx.targets {
        targets.row(vec![
            t.name.clone(),
            t.target.clone(),
            t.measured.clone(),
            match t.met {
                Some(true) => "met".into(),
                Some(false) => "MISSED".into(),
                None => "-".into(),
            },
        ]);
    }
    let bench_cpu = procfs::cpu_seconds("self") - cpu_self_before;
    let wall = began.elapsed().as_secs_f64();
    let load_after = procfs::load_average();
    targets.note(format!(
        "{date}; {cores} cores ({}), kernel {}, RabbitMQ {broker_version}, loopback; load average {load_before} before, {load_after} after; whole run {wall:.0} s wall, bench process {bench_cpu:.1} s CPU",
        procfs::cpu_model(),
        procfs::kernel()
    ));
    print!("{}", targets.render());

    let json = Json::obj(vec![
        ("date", date.clone().into()),
        ("mode", if ctx.opts.full { "full" } else { "quick" }.into()),
        (
            "machine",
            Json::obj(vec![
                ("cores", cores.into()),
                ("cpu", procfs::cpu_model().into()),
                ("kernel", procfs::kernel().into()),
                ("load_average_before", load_before.into()),
                ("load_average_after", load_after.into()),
            ]),
        ),
        (
            "broker",
            Json::obj(vec![
                ("address", broker.to_string().into()),
                ("version", broker_version.into()),
                ("channel_max", u64::from(ctx.broker_channel_max).into()),
            ]),
        ),
        (
            "proxy",
            Json::obj(vec![
                ("binary", bin.display().to_string().into()),
                ("workers", workers.into()),
                ("extra_args", ctx.opts.proxy_args.join(" ").into()),
            ]),
        ),
        ("wall_seconds", wall.into()),
        ("bench_cpu_seconds", bench_cpu.into()),
        ("results", Json::Obj(ctx.results.clone())),
        (
            "targets",
            Json::Arr(
                ctx.targets
                    .iter()
                    .map(|t| {
                        Json::obj(vec![
                            ("name", t.name.clone().into()),
                            ("target", t.target.clone().into()),
                            ("measured", t.measured.clone().into()),
                            ("met", t.met.into()),
                        ])
                    })
                    .collect(),
            ),
        ),
    ]);
    let mut text = String::new();
    json.write(&mut text, 0);
    text.push('\n');
    let path = target_dir.join("bench-results.json");
    std::fs::write(&path, text)?;
    // The same tables as printed, for pasting into docs/PERFORMANCE.md.
    let mut md = format!("# amqproxy bench, {date}\n");
    for t in ctx.tables.iter().chain(std::iter::once(&targets)) {
        md.push_str(&t.render());
    }
    let md_path = target_dir.join("bench-results.md");
    std::fs::write(&md_path, md)?;
    eprintln!("wrote {} and {}", path.display(), md_path.display());
    Ok(())
}
