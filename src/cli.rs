//! Command line: the clap definition of every flag, `--help` and
//! `--version`. This is the only module that uses clap.
//!
//! It hands `config` the command line's settings as a table keyed by
//! config-file key, values already converted with [`config::text_to_value`];
//! precedence and defaults are `config`'s business. Flag values are taken as
//! text rather than typed by clap so a bad value gets the same one-line
//! message as the same mistake in an environment variable.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{CommandFactory, FromArgMatches, Parser};

use crate::config::{self, ConfigError, KeyDoc, Kind, Origin};

/// Value name of the positional upstream URL, as shown in usage and errors.
pub const UPSTREAM_VALUE_NAME: &str = "UPSTREAM_URL";

const ABOUT: &str = "AMQP 0-9-1 proxy that pools upstream connections and channels";

const AFTER_HELP: &str = "\
Precedence: for each setting on its own, the config file wins over the
command line, which wins over environment variables, which win over the
built-in defaults. So a key in the file given with -c overrides the same
setting's flag, and a flag overrides its environment variable.

Durations are whole seconds. Lists are comma-separated in flags and
environment variables, TOML arrays in the file. The config file may also
be named with the AMQPROXY_CONFIG environment variable. See amqproxy(1)
for every setting, signal, HTTP endpoint and exit status.";

/// The command line. Field names are config-file keys, so each flag's clap
/// id is its key (checked by a test).
#[derive(Parser, Debug, Default)]
#[command(
    name = "amqproxy",
    bin_name = "amqproxy",
    about = ABOUT,
    after_help = AFTER_HELP,
    disable_version_flag = true,
    color = clap::ColorChoice::Never
)]
pub struct Cli {
    #[arg(value_name = UPSTREAM_VALUE_NAME)]
    pub upstream: Option<String>,
    /// Read settings from this TOML file; its keys win over flags and environment [env: AMQPROXY_CONFIG]
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[arg(short = 'l', long = "listen", value_name = "ADDRESS")]
    pub listen_address: Option<String>,
    #[arg(short = 'p', long = "port", value_name = "PORT")]
    pub listen_port: Option<String>,
    #[arg(long, value_name = "CONNECTIONS")]
    pub listen_backlog: Option<String>,
    #[arg(long, value_name = "ADDRESS")]
    pub http_address: Option<String>,
    #[arg(short = 'b', long, value_name = "PORT")]
    pub http_port: Option<String>,
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Log at debug level, the same as --log-level debug
    #[arg(short = 'd', long, conflicts_with = "log_level")]
    pub debug: bool,
    #[arg(short = 't', long, value_name = "SECONDS")]
    pub idle_connection_timeout: Option<String>,
    #[arg(long, value_name = "CONNECTIONS")]
    pub min_idle_connections: Option<String>,
    #[arg(long, value_name = "CHANNELS")]
    pub max_upstream_channels: Option<String>,
    #[arg(long, value_name = "SECONDS")]
    pub term_timeout: Option<String>,
    #[arg(long, value_name = "SECONDS")]
    pub term_client_close_timeout: Option<String>,
    #[arg(long, value_name = "SECONDS")]
    pub handshake_timeout: Option<String>,
    #[arg(long, value_name = "SECONDS")]
    pub upstream_connect_timeout: Option<String>,
    #[arg(long, value_name = "CONNECTIONS")]
    pub max_client_connections: Option<String>,
    #[arg(long, value_name = "SECONDS")]
    pub heartbeat: Option<String>,
    #[arg(long, value_name = "CHANNELS")]
    pub channel_max: Option<String>,
    #[arg(long, value_name = "BYTES")]
    pub frame_max: Option<String>,
    /// Close channels upstream when clients close them instead of reusing them (channel_reuse = false) [env: CHANNEL_REUSE]
    #[arg(id = "channel_reuse", long = "no-channel-reuse")]
    pub no_channel_reuse: bool,
    #[arg(long, value_name = "CHANNELS")]
    pub max_idle_channels: Option<String>,
    #[arg(long, value_name = "SECONDS")]
    pub idle_channel_timeout: Option<String>,
    #[arg(long, value_name = "BYTES")]
    pub client_buffer_limit: Option<String>,
    #[arg(long, value_name = "BYTES")]
    pub client_buffer_budget: Option<String>,
    #[arg(long, value_name = "LIST")]
    pub exchange_types: Option<String>,
    #[arg(long, value_name = "FILE")]
    pub upstream_ca_file: Option<String>,
    #[arg(long, value_name = "FILE")]
    pub upstream_tls_cert: Option<String>,
    #[arg(long, value_name = "FILE")]
    pub upstream_tls_key: Option<String>,
    #[arg(long, value_name = "NAME")]
    pub upstream_tls_server_name: Option<String>,
    /// Do not verify the broker's certificate or host name (upstream_tls_insecure = true) [env: UPSTREAM_TLS_INSECURE]
    #[arg(id = "upstream_tls_insecure", long = "upstream-tls-insecure")]
    pub upstream_tls_insecure: bool,
    #[arg(id = "tls_listen_port", long = "tls-port", value_name = "PORT")]
    pub tls_listen_port: Option<String>,
    #[arg(id = "tls_cert_file", long = "tls-cert", value_name = "FILE")]
    pub tls_cert_file: Option<String>,
    #[arg(id = "tls_key_file", long = "tls-key", value_name = "FILE")]
    pub tls_key_file: Option<String>,
    #[arg(id = "tls_client_ca_file", long = "tls-client-ca", value_name = "FILE")]
    pub tls_client_ca_file: Option<String>,
    #[arg(long, value_name = "THREADS")]
    pub workers: Option<String>,
    /// Print the version and exit
    #[arg(short = 'v', long)]
    pub version: bool,
    /// Check a running amqproxy instead of starting one: GET /healthz on the HTTP address and port these settings give; exit 0 on 200, 1 otherwise
    #[arg(long)]
    pub health_check: bool,
}

impl Cli {
    /// Every option that carries a setting's value, by config-file key.
    fn values(&self) -> [(&'static str, Option<&str>); 32] {
        [
            ("upstream", self.upstream.as_deref()),
            ("listen_address", self.listen_address.as_deref()),
            ("listen_port", self.listen_port.as_deref()),
            ("listen_backlog", self.listen_backlog.as_deref()),
            ("http_address", self.http_address.as_deref()),
            ("http_port", self.http_port.as_deref()),
            ("log_level", self.log_level.as_deref()),
            (
                "idle_connection_timeout",
                self.idle_connection_timeout.as_deref(),
            ),
            ("min_idle_connections", self.min_idle_connections.as_deref()),
            (
                "max_upstream_channels",
                self.max_upstream_channels.as_deref(),
            ),
            ("term_timeout", self.term_timeout.as_deref()),
            (
                "term_client_close_timeout",
                self.term_client_close_timeout.as_deref(),
            ),
            ("handshake_timeout", self.handshake_timeout.as_deref()),
            (
                "upstream_connect_timeout",
                self.upstream_connect_timeout.as_deref(),
            ),
            (
                "max_client_connections",
                self.max_client_connections.as_deref(),
            ),
            ("heartbeat", self.heartbeat.as_deref()),
            ("channel_max", self.channel_max.as_deref()),
            ("frame_max", self.frame_max.as_deref()),
            ("max_idle_channels", self.max_idle_channels.as_deref()),
            ("idle_channel_timeout", self.idle_channel_timeout.as_deref()),
            ("client_buffer_limit", self.client_buffer_limit.as_deref()),
            ("client_buffer_budget", self.client_buffer_budget.as_deref()),
            ("exchange_types", self.exchange_types.as_deref()),
            ("upstream_ca_file", self.upstream_ca_file.as_deref()),
            ("upstream_tls_cert", self.upstream_tls_cert.as_deref()),
            ("upstream_tls_key", self.upstream_tls_key.as_deref()),
            (
                "upstream_tls_server_name",
                self.upstream_tls_server_name.as_deref(),
            ),
            ("tls_listen_port", self.tls_listen_port.as_deref()),
            ("tls_cert_file", self.tls_cert_file.as_deref()),
            ("tls_key_file", self.tls_key_file.as_deref()),
            ("tls_client_ca_file", self.tls_client_ca_file.as_deref()),
            ("workers", self.workers.as_deref()),
        ]
    }
}

/// The clap command with each setting's help, environment variable and
/// default filled in from [`config::KEYS`], so `--help` cannot drift.
pub fn command() -> clap::Command {
    let mut command = Cli::command();
    for doc in config::KEYS.iter().filter(|doc| doc.kind != Kind::Bool) {
        let help = help_line(doc);
        let numeric = matches!(doc.kind, Kind::Int { .. });
        // Negative numbers must reach our range check, not look like flags.
        command = command.mut_arg(doc.key, |arg| {
            arg.help(help).allow_negative_numbers(numeric)
        });
    }
    command
}

fn help_line(doc: &KeyDoc) -> String {
    let mut line = doc.help.to_string();
    if let Some(env) = doc.env {
        line.push_str(&format!(" [env: {env}]"));
    }
    if let Some(default) = doc.default {
        let unit = match doc.kind {
            Kind::Int { unit, .. } => unit.suffix(),
            _ => "",
        };
        line.push_str(&format!(" [default: {}{unit}]", default.trim_matches('"')));
    }
    line
}

/// `amqproxy <version>`, plus the commit when the build set AMQPROXY_GIT_COMMIT.
pub fn version() -> String {
    let mut version = format!("amqproxy {}", env!("CARGO_PKG_VERSION"));
    if let Some(commit) = option_env!("AMQPROXY_GIT_COMMIT").filter(|c| !c.trim().is_empty()) {
        version.push_str(&format!(" (commit {})", commit.trim()));
    }
    version
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Parsed {
    /// `--help` / `--version`: print this text and exit 0.
    Exit(String),
    Run(CliSettings),
}

#[derive(Debug, Default)]
pub struct CliSettings {
    /// `-c/--config`; the environment's AMQPROXY_CONFIG is `config`'s concern.
    pub config_file: Option<PathBuf>,
    /// Settings given on the command line, keyed by config-file key.
    pub settings: toml::Table,
    /// `--health-check`: probe a running proxy's /healthz, start nothing.
    pub health_check: bool,
}

/// Parses the command line (including the program name).
pub fn parse(args: Vec<OsString>) -> Result<Parsed, ConfigError> {
    let matches = match command().try_get_matches_from(args) {
        Ok(matches) => matches,
        Err(error) => return exit_or_usage(error),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => return exit_or_usage(error),
    };
    if cli.version {
        return Ok(Parsed::Exit(format!("{}\n", version())));
    }
    let mut settings = toml::Table::new();
    for (key, text) in cli.values() {
        let (Some(text), Some(doc)) = (text, config::key_doc(key)) else {
            continue;
        };
        let value = config::text_to_value(doc, text, Origin::Cli.source(doc))?;
        settings.insert(key.to_string(), value);
    }
    if cli.debug {
        settings.insert(
            "log_level".to_string(),
            toml::Value::String("debug".to_string()),
        );
    }
    if cli.no_channel_reuse {
        settings.insert("channel_reuse".to_string(), toml::Value::Boolean(false));
    }
    if cli.upstream_tls_insecure {
        settings.insert(
            "upstream_tls_insecure".to_string(),
            toml::Value::Boolean(true),
        );
    }
    Ok(Parsed::Run(CliSettings {
        config_file: cli.config,
        settings,
        health_check: cli.health_check,
    }))
}

fn exit_or_usage(error: clap::Error) -> Result<Parsed, ConfigError> {
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let mut text = error.render().to_string();
            if !text.ends_with('\n') {
                text.push('\n');
            }
            Ok(Parsed::Exit(text))
        }
        _ => Err(ConfigError::Usage(usage_message(&error))),
    }
}

/// clap's first line without its "error: " prefix: clap prints several
/// lines, but our errors are one line each.
fn usage_message(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    let first = rendered
        .lines()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("invalid command line");
    let first = first.trim().strip_prefix("error: ").unwrap_or(first.trim());
    format!("{first} (see amqproxy --help)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_list(list: &[&str]) -> Result<Parsed, ConfigError> {
        parse(
            std::iter::once("amqproxy")
                .chain(list.iter().copied())
                .map(OsString::from)
                .collect(),
        )
    }

    fn help() -> String {
        match parse_list(&["--help"]) {
            Ok(Parsed::Exit(text)) => text,
            other => panic!("--help must exit, got {other:?}"),
        }
    }

    #[test]
    fn clap_definition_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn every_key_with_a_flag_has_that_flag_under_its_key_as_id() {
        let command = command();
        for doc in config::KEYS {
            let arg = command.get_arguments().find(|arg| arg.get_id() == doc.key);
            let arg = arg.unwrap_or_else(|| panic!("no argument with id {}", doc.key));
            assert_eq!(arg.get_long(), doc.long, "{}", doc.key);
        }
    }

    #[test]
    fn every_value_option_is_read_into_settings() {
        let mut listed: Vec<_> = Cli::default()
            .values()
            .iter()
            .map(|(key, _)| *key)
            .collect();
        let mut expected: Vec<_> = config::KEYS
            .iter()
            .filter(|doc| doc.kind != Kind::Bool)
            .map(|doc| doc.key)
            .collect();
        listed.sort_unstable();
        expected.sort_unstable();
        assert_eq!(listed, expected);
    }

    #[test]
    fn help_states_precedence_and_every_environment_variable() {
        let help = help();
        assert!(help.contains(
            "Precedence: for each setting on its own, the config file wins over the\ncommand line"
        ));
        for env in config::KEYS
            .iter()
            .filter_map(|doc| doc.env)
            .chain([config::CONFIG_ENV])
        {
            assert!(
                help.contains(&format!("[env: {env}]")),
                "{env} missing from --help"
            );
        }
        assert!(help.contains("[default: 5673]"));
        assert!(help.contains("[default: 16777216 bytes]"));
        assert!(!help.contains('\u{1b}'), "no ANSI escapes");
        assert!(
            help.starts_with("AMQP 0-9-1 proxy")
                && help.contains("Usage: amqproxy [OPTIONS] [UPSTREAM_URL]")
        );
        assert!(help.ends_with(".\n"), "help ends with one newline");
    }

    #[test]
    fn short_help_exits_too() {
        assert!(matches!(parse_list(&["-h"]), Ok(Parsed::Exit(_))));
    }

    #[test]
    fn version_is_name_space_version() {
        let version = version();
        assert!(version.starts_with(&format!("amqproxy {}", env!("CARGO_PKG_VERSION"))));
        for flag in ["-v", "--version"] {
            match parse_list(&[flag]) {
                Ok(Parsed::Exit(text)) => assert_eq!(text, format!("{version}\n")),
                other => panic!("{flag} must exit, got {other:?}"),
            }
        }
    }

    #[test]
    fn flags_become_settings_by_key() {
        let Ok(Parsed::Run(cli)) = parse_list(&[
            "-l",
            "::",
            "-p",
            "1",
            "-b",
            "2",
            "-t",
            "3",
            "-d",
            "--no-channel-reuse",
            "-c",
            "f.toml",
            "amqp://b",
        ]) else {
            panic!("valid command line")
        };
        assert_eq!(cli.config_file, Some(PathBuf::from("f.toml")));
        let get = |key: &str| cli.settings.get(key).cloned();
        assert_eq!(
            get("listen_address"),
            Some(toml::Value::String("::".to_string()))
        );
        assert_eq!(get("listen_port"), Some(toml::Value::Integer(1)));
        assert_eq!(get("http_port"), Some(toml::Value::Integer(2)));
        assert_eq!(
            get("idle_connection_timeout"),
            Some(toml::Value::Integer(3))
        );
        assert_eq!(
            get("log_level"),
            Some(toml::Value::String("debug".to_string()))
        );
        assert_eq!(get("channel_reuse"), Some(toml::Value::Boolean(false)));
        assert_eq!(
            get("upstream"),
            Some(toml::Value::String("amqp://b".to_string()))
        );
        assert_eq!(cli.settings.len(), 7);
    }

    #[test]
    fn exchange_types_flag_becomes_an_array() {
        let get = |list: &[&str]| match parse_list(list) {
            Ok(Parsed::Run(cli)) => cli.settings.get("exchange_types").cloned(),
            other => panic!("{list:?} is valid, got {other:?}"),
        };
        let array = |list: &[&str]| {
            Some(toml::Value::Array(
                list.iter()
                    .map(|name| toml::Value::String(name.to_string()))
                    .collect(),
            ))
        };
        assert_eq!(
            get(&["--exchange-types", "x-delayed-message,x-consistent-hash"]),
            array(&["x-delayed-message", "x-consistent-hash"])
        );
        assert_eq!(get(&["--exchange-types=x-random"]), array(&["x-random"]));
        assert_eq!(get(&["--exchange-types", ""]), array(&[]));
        assert_eq!(get(&[]), None);
        match parse_list(&["--exchange-types", "a b"]) {
            Err(ConfigError::InvalidValue { key, source, .. }) => {
                assert_eq!(key, "exchange_types");
                assert_eq!(source, config::Source::Flag("exchange-types"));
            }
            other => panic!("a bad type must be refused, got {other:?}"),
        }
        assert!(help().contains("--exchange-types <LIST>"));
    }

    #[test]
    fn nothing_given_means_nothing_set() {
        let Ok(Parsed::Run(cli)) = parse_list(&[]) else {
            panic!("empty command line is valid")
        };
        assert!(cli.settings.is_empty());
        assert_eq!(cli.config_file, None);
        assert!(!cli.health_check);
    }

    #[test]
    fn health_check_is_a_mode_not_a_setting() {
        let Ok(Parsed::Run(cli)) = parse_list(&["--health-check", "-b", "8080"]) else {
            panic!("--health-check is valid")
        };
        assert!(cli.health_check);
        assert_eq!(
            cli.settings.get("http_port"),
            Some(&toml::Value::Integer(8080))
        );
        assert_eq!(cli.settings.len(), 1);
        assert!(help().contains("--health-check"));
    }

    #[test]
    fn usage_errors_are_one_line_and_point_to_help() {
        for list in [
            &["--bogus"][..],
            &["-p"],
            &["a", "b"],
            &["-d", "--log-level", "info"],
        ] {
            match parse_list(list) {
                Err(ConfigError::Usage(message)) => {
                    assert!(!message.contains('\n'), "{message:?}");
                    assert!(!message.starts_with("error:"), "{message:?}");
                    assert!(message.ends_with("(see amqproxy --help)"), "{message:?}");
                }
                other => panic!("{list:?} must be a usage error, got {other:?}"),
            }
        }
    }
}
