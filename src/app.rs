//! The program: configuration, logging, then the server. `main.rs` only
//! calls [`main`] so everything stays reachable from the library.

use crate::config::{self, Loaded};
use simplelog::{ColorChoice, ConfigBuilder, LevelFilter, TermLogger, TerminalMode, WriteLogger};
use std::io::IsTerminal;

/// Exit status: 0 clean exit, 1 runtime failure, 2 bad configuration.
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
            return 2;
        }
    };
    if config.upstream.tls {
        eprintln!(
            "amqproxy: upstream {}: amqps:// is not supported by this version yet; use amqp://",
            config.upstream
        );
        return 2;
    }
    init_logging(config.log_level);
    // SIGHUP re-reads every source with the same arguments and environment.
    let reload = Box::new(move || match config::load(args.clone(), &|name: &str| std::env::var(name).ok()) {
        Ok(Loaded::Run(config)) => Ok(config),
        Ok(Loaded::Exit(_)) => Err("unexpected --help/--version".to_string()),
        Err(e) => Err(e.to_string()),
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
        let _ = TermLogger::init(LevelFilter::Trace, config, TerminalMode::Stderr, ColorChoice::Auto);
    } else {
        let _ = WriteLogger::init(LevelFilter::Trace, config, std::io::stderr());
    }
    log::set_max_level(level);
}
