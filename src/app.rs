//! The program: configuration, logging, then the server. `main.rs` only
//! calls [`main`] so everything stays reachable from the library.

use crate::config::{self, Loaded};
use simplelog::{ColorChoice, ConfigBuilder, LevelFilter, TermLogger, TerminalMode, WriteLogger};
use std::io::IsTerminal;

/// Exit status: 0 clean exit, 1 runtime failure, 2 bad configuration;
/// with `--health-check`, 0 healthy and 1 anything else.
pub fn main() -> i32 {
    let args: Vec<_> = std::env::args_os().collect();
    let env = |name: &str| std::env::var(name).ok();
    let config = match config::load(args.clone(), &env) {
        Ok(Loaded::Run(config)) => config,
        Ok(Loaded::Exit(text)) => {
            print!("{text}");
            return 0;
        }
        Err(e) => {
            eprintln!("amqproxy: {e}");
            // A container runtime reserves health check status 2.
            return if health_check::requested(&args) { 1 } else { 2 };
        }
    };
    if config.health_check {
        return health_check::run(&config);
    }
    init_logging(config.log_level);
    // SIGHUP re-reads every source with the same arguments and environment.
    let reload = Box::new(move || {
        match config::load(args.clone(), &|name: &str| std::env::var(name).ok()) {
            Ok(Loaded::Run(config)) => Ok(config),
            Ok(Loaded::Exit(_)) => Err("unexpected --help/--version".to_string()),
            Err(e) => Err(e.to_string()),
        }
    });
    match crate::server::run(config, reload) {
        Ok(()) => 0,
        Err(e) => {
            log::error!("{e}");
            eprintln!("amqproxy: {e}");
            1
        }
    }
}

/// One line per event on stderr; colours only on a terminal (journald and
/// log files get plain text).
fn init_logging(level: LevelFilter) {
    let config = ConfigBuilder::new()
        .set_target_level(LevelFilter::Off)
        .set_thread_level(LevelFilter::Off)
        .set_location_level(LevelFilter::Off)
        .set_time_format_rfc3339()
        .build();
    // The logger passes everything; the level is the `log` crate's global
    // filter, so SIGHUP can change it.
    if std::io::stderr().is_terminal() {
        let _ = TermLogger::init(
            LevelFilter::Trace,
            config,
            TerminalMode::Stderr,
            ColorChoice::Auto,
        );
    } else {
        let _ = WriteLogger::init(LevelFilter::Trace, config, std::io::stderr());
    }
    log::set_max_level(level);
}

/// `amqproxy --health-check`, for a container's HEALTHCHECK (a scratch
/// image has no curl): GET /healthz from the proxy that the same settings
/// describe, with a hand-written HTTP/1.1 request over a std `TcpStream`.
mod health_check {
    use crate::config::Config;
    use std::ffi::OsString;
    use std::io::{Read, Write};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
    use std::time::{Duration, Instant};

    /// For connecting, sending the request and reading the status line,
    /// together (resolving the address is the system resolver's business).
    pub const TIMEOUT: Duration = Duration::from_secs(2);

    /// Whether the command line asks for the check, for the exit status of
    /// a configuration error (the parsed flag is in [`Config::health_check`]).
    pub fn requested(args: &[OsString]) -> bool {
        args.iter().skip(1).any(|arg| arg == "--health-check")
    }

    /// 0 when /healthz answers 200; 1 with one line on stderr otherwise.
    pub fn run(config: &Config) -> i32 {
        match probe(&config.http_address, config.http_port, TIMEOUT) {
            Ok(()) => 0,
            Err(reason) => {
                eprintln!("amqproxy: health check failed: {reason}");
                1
            }
        }
    }

    /// GET http://host:port/healthz; Ok on status 200. The proxy listens on
    /// the first address `host` resolves to; an unspecified address
    /// (0.0.0.0, ::) is reached through loopback.
    pub fn probe(host: &str, port: u16, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let addrs: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .map(|addr| match addr.ip() {
                IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, port).into(),
                IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, port).into(),
                _ => addr,
            })
            .collect();
        let mut failure = format!("{host} resolves to no address");
        for addr in addrs {
            match get_healthz(addr, deadline, timeout) {
                Ok(()) => return Ok(()),
                Err(reason) => failure = format!("http://{addr}/healthz: {reason}"),
            }
        }
        Err(failure)
    }

    fn get_healthz(addr: SocketAddr, deadline: Instant, timeout: Duration) -> Result<(), String> {
        let left = || {
            deadline
                .checked_duration_since(Instant::now())
                .filter(|left| !left.is_zero())
                .ok_or_else(|| format!("no answer within {timeout:?}"))
        };
        let mut stream = TcpStream::connect_timeout(&addr, left()?).map_err(|e| e.to_string())?;
        stream
            .set_write_timeout(Some(left()?))
            .map_err(|e| e.to_string())?;
        let request = format!(
            "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: amqproxy-health-check\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .map_err(|e| e.to_string())?;
        // The status line is all we need; it comes in the first bytes.
        let mut answer = Vec::new();
        let mut buffer = [0u8; 512];
        while !answer.windows(2).any(|pair| pair == b"\r\n") && answer.len() < 4096 {
            stream
                .set_read_timeout(Some(left()?))
                .map_err(|e| e.to_string())?;
            match stream.read(&mut buffer) {
                Ok(0) => break,
                Ok(read) => answer.extend_from_slice(&buffer[..read]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(format!("no answer within {timeout:?}"))
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        let answer = String::from_utf8_lossy(&answer);
        let status_line = answer.lines().next().unwrap_or("").trim();
        let mut words = status_line.split_whitespace();
        match (words.next(), words.next()) {
            (Some(version), Some("200")) if version.starts_with("HTTP/") => Ok(()),
            (Some(version), Some(_)) if version.starts_with("HTTP/") => {
                Err(format!("answered {status_line:?}"))
            }
            _ if status_line.is_empty() => Err("closed without an answer".to_string()),
            _ => Err(format!("not an HTTP answer: {status_line:?}")),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use std::net::TcpListener;

        /// A one-shot server answering `reply` to the first connection.
        fn serve(reply: &'static str) -> u16 {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let port = listener.local_addr().expect("addr").port();
            std::thread::spawn(move || {
                if let Ok((mut stream, _)) = listener.accept() {
                    let mut request = [0u8; 1024];
                    let read = stream.read(&mut request).unwrap_or(0);
                    assert!(request[..read].starts_with(b"GET /healthz HTTP/1.1\r\n"));
                    let _ = stream.write_all(reply.as_bytes());
                }
            });
            port
        }

        #[test]
        fn ok_on_200() {
            let port = serve("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK");
            assert_eq!(probe("127.0.0.1", port, TIMEOUT), Ok(()));
            let port = serve("HTTP/1.0 200 OK\r\n\r\n");
            assert_eq!(probe("0.0.0.0", port, TIMEOUT), Ok(()));
        }

        #[test]
        fn failure_names_the_reason() {
            let port = serve("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
            let reason = probe("127.0.0.1", port, TIMEOUT).expect_err("503 is unhealthy");
            assert_eq!(
                reason,
                format!("http://127.0.0.1:{port}/healthz: answered \"HTTP/1.1 503 Service Unavailable\"")
            );
            let port = serve("");
            assert!(probe("127.0.0.1", port, TIMEOUT)
                .expect_err("no answer")
                .ends_with("closed without an answer"));
            let port = serve("SSH-2.0-OpenSSH\r\n");
            assert!(probe("127.0.0.1", port, TIMEOUT)
                .expect_err("not HTTP")
                .contains("not an HTTP answer"));
        }

        #[test]
        fn nothing_listening_fails() {
            let port = {
                let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
                listener.local_addr().expect("addr").port()
            };
            let reason = probe("127.0.0.1", port, TIMEOUT).expect_err("closed port");
            assert!(
                reason.starts_with(&format!("http://127.0.0.1:{port}/healthz: ")),
                "{reason}"
            );
            assert!(!reason.contains('\n'));
        }

        #[test]
        fn silent_server_times_out() {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let port = listener.local_addr().expect("addr").port();
            let started = Instant::now();
            let reason = probe("127.0.0.1", port, Duration::from_millis(300)).expect_err("silent");
            assert!(reason.contains("no answer within"), "{reason}");
            assert!(started.elapsed() < Duration::from_secs(2));
            drop(listener);
        }

        #[test]
        fn requested_looks_at_arguments_only() {
            let args = |list: &[&str]| list.iter().map(OsString::from).collect::<Vec<_>>();
            assert!(requested(&args(&["amqproxy", "-c", "f", "--health-check"])));
            assert!(!requested(&args(&["--health-check"])));
            assert!(!requested(&args(&["amqproxy", "amqp://broker"])));
        }
    }
}
