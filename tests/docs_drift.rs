//! Docs that cannot drift: fails when a setting, flag or environment
//! variable is missing from `config/amqproxy.toml` or `man/amqproxy.1`, when
//! a documented default differs from the code's, or when the settings table
//! `config::KEYS` and the serde struct `FileConfig` disagree.
//!
//! Sources of truth: `config::KEYS` for keys, environment variables and
//! defaults; the clap command for flags.

use std::collections::BTreeSet;
use std::path::Path;

use amqproxy::config::{self, Config, FileConfig, Loaded, UpstreamUrl, KEYS};
use serde::de::{self, Visitor};

fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()))
}

/// The man page source with font changes and roff escapes removed, so
/// `\fB\-\-listen\fR` reads `--listen`.
fn man_page() -> String {
    read("man/amqproxy.1")
        .replace("\\fB", "")
        .replace("\\fI", "")
        .replace("\\fR", "")
        .replace("\\fP", "")
        .replace("\\-", "-")
        .replace("\\(dq", "\"")
}

/// The lines of one `.SH` section.
fn section<'a>(man: &'a str, name: &str) -> Vec<&'a str> {
    let heading = format!(".SH {name}");
    let quoted = format!(".SH \"{name}\"");
    man.lines()
        .skip_while(|line| *line != heading && *line != quoted)
        .skip(1)
        .take_while(|line| !line.starts_with(".SH"))
        .collect()
}

/// `.TP` entries of a section: the tag (after `.B` or as written) and the
/// paragraph text that follows it.
fn entries(lines: &[&str]) -> Vec<(String, String)> {
    let mut entries = Vec::new();
    let mut index = 0;
    while index < lines.len() {
        if lines[index] == ".TP" && index + 1 < lines.len() {
            let tag = lines[index + 1]
                .trim_start_matches(".B ")
                .trim_start_matches(".BR ")
                .to_string();
            let body: Vec<&str> = lines[index + 2..]
                .iter()
                .take_while(|line| **line != ".TP")
                .copied()
                .collect();
            entries.push((tag, body.join(" ")));
            index += 2;
        } else {
            index += 1;
        }
    }
    entries
}

/// Whether `text` contains `word` not followed by a name character, so
/// `--listen` is not found inside `--listen-backlog`.
fn contains_word(text: &str, word: &str) -> bool {
    text.match_indices(word).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        let name_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            && !after.is_some_and(name_char)
    })
}

#[test]
fn man_page_documents_every_key_with_its_default() {
    let man = man_page();
    let documented = entries(&section(&man, "CONFIGURATION"));
    for doc in KEYS {
        let Some((_, body)) = documented.iter().find(|(tag, _)| tag == doc.key) else {
            panic!(
                "config key {} is missing from the man page's CONFIGURATION section",
                doc.key
            )
        };
        if let Some(default) = doc.default {
            let expected = format!("Default: {default}");
            assert!(
                body.contains(&expected),
                "man page entry for {} should say {expected:?}: {body}",
                doc.key
            );
        }
    }
    for (tag, _) in &documented {
        assert!(
            config::key_doc(tag).is_some(),
            "man page documents {tag:?}, which is not a config key"
        );
    }
}

#[test]
fn man_page_documents_every_flag() {
    let man = man_page();
    let options = section(&man, "OPTIONS").join("\n");
    for arg in amqproxy::cli::command().get_arguments() {
        if let Some(long) = arg.get_long() {
            assert!(
                contains_word(&options, &format!("--{long}")),
                "--{long} is missing from the man page's OPTIONS"
            );
        }
        if let Some(short) = arg.get_short() {
            assert!(
                contains_word(&options, &format!("-{short}")),
                "-{short} is missing from the man page's OPTIONS"
            );
        }
        if arg.is_positional() {
            let name = arg
                .get_value_names()
                .and_then(|names| names.first())
                .map(|n| n.to_string());
            let name = name.unwrap_or_else(|| arg.get_id().to_string());
            assert!(
                contains_word(&options, &name),
                "{name} is missing from the man page's OPTIONS"
            );
        }
    }
}

#[test]
fn man_page_documents_every_environment_variable() {
    let man = man_page();
    let documented: BTreeSet<String> = entries(&section(&man, "ENVIRONMENT"))
        .into_iter()
        .map(|(tag, _)| tag)
        .collect();
    let expected: BTreeSet<String> = KEYS
        .iter()
        .filter_map(|doc| doc.env)
        .chain([config::CONFIG_ENV])
        .map(str::to_string)
        .collect();
    assert_eq!(
        documented, expected,
        "the man page's ENVIRONMENT entries differ from the code's variables"
    );
}

#[test]
fn man_page_has_every_section() {
    let man = man_page();
    for name in [
        "NAME",
        "SYNOPSIS",
        "DESCRIPTION",
        "OPTIONS",
        "ENVIRONMENT",
        "FILES",
        "CONFIGURATION",
        "SIGNALS",
        "HTTP ENDPOINTS",
        "EXIT STATUS",
        "EXAMPLES",
        "SEE ALSO",
    ] {
        assert!(
            !section(&man, name).is_empty(),
            "man page section {name} is missing or empty"
        );
    }
    let signals = section(&man, "SIGNALS").join(" ");
    for word in [
        "SIGTERM",
        "SIGINT",
        "SIGHUP",
        "term_client_close_timeout",
        "term_timeout",
        "320",
    ] {
        assert!(signals.contains(word), "SIGNALS should mention {word}");
    }
    let endpoints = section(&man, "HTTP ENDPOINTS").join(" ");
    for word in ["/healthz", "/readyz", "/metrics", "15673"] {
        assert!(
            endpoints.contains(word),
            "HTTP ENDPOINTS should mention {word}"
        );
    }
    assert!(section(&man, "EXAMPLES")
        .join(" ")
        .contains("curl -fsS http://localhost:15673/healthz"));
    assert!(man.to_lowercase().contains("precedence"));
}

/// The example with its `# key = value` lines uncommented.
fn example_uncommented() -> (String, BTreeSet<String>) {
    let mut keys = BTreeSet::new();
    let mut text = String::new();
    for line in read("config/amqproxy.toml").lines() {
        let setting = line
            .strip_prefix("# ")
            .and_then(|rest| rest.split_once(" = "));
        match setting {
            Some((key, _)) if config::key_doc(key).is_some() => {
                assert!(
                    keys.insert(key.to_string()),
                    "{key} is listed twice in the example config"
                );
                text.push_str(&line[2..]);
            }
            _ => text.push_str(line),
        }
        text.push('\n');
    }
    (text, keys)
}

#[test]
fn example_config_lists_every_key() {
    let (_, listed) = example_uncommented();
    let expected: BTreeSet<String> = KEYS.iter().map(|doc| doc.key.to_string()).collect();
    assert_eq!(
        listed, expected,
        "config/amqproxy.toml must list every key as `# key = default`"
    );
}

#[test]
fn example_config_shows_the_documented_defaults() {
    let (text, _) = example_uncommented();
    let example: toml::Table = text.parse().expect("uncommented example parses");
    for doc in KEYS {
        let Some(default) = doc.default else { continue };
        let expected: toml::Table = format!("value = {default}")
            .parse()
            .expect("KEYS default is a TOML literal");
        assert_eq!(
            example.get(doc.key),
            expected.get("value"),
            "example config default for {}",
            doc.key
        );
    }
}

#[test]
fn example_config_is_valid_as_shipped() {
    let shipped: FileConfig =
        toml::from_str(&read("config/amqproxy.toml")).expect("example parses");
    assert_eq!(
        shipped,
        FileConfig::default(),
        "every key in the example should be commented out"
    );
}

#[test]
fn example_config_values_are_the_defaults() {
    let (text, _) = example_uncommented();
    let path = std::env::temp_dir().join(format!("amqproxy-example-{}.toml", std::process::id()));
    std::fs::write(&path, text).expect("write temp file");
    let args = vec![
        "amqproxy".into(),
        "-c".into(),
        path.clone().into_os_string(),
    ];
    let loaded = config::load(args, &|_| None);
    let _ = std::fs::remove_file(&path);
    let mut config = match loaded {
        Ok(Loaded::Run(config)) => config,
        Ok(Loaded::Exit(text)) => panic!("unexpected exit: {text}"),
        Err(error) => panic!("example config with every key uncommented is invalid: {error}"),
    };
    config.config_file = None;
    // Keys without a default (like `upstream`) show an example value.
    for doc in KEYS.iter().filter(|d| d.default.is_none()) {
        match doc.key {
            "upstream" | "http_address" => {} // compared below; defaults to listen_address
            "upstream_ca_file" => assert!(config.upstream_ca_file.take().is_some()),
            "upstream_tls_cert" => assert!(config.upstream_tls_cert.take().is_some()),
            "upstream_tls_key" => assert!(config.upstream_tls_key.take().is_some()),
            "upstream_tls_server_name" => assert!(config.upstream_tls_server_name.take().is_some()),
            "tls_cert_file" => assert!(config.tls_cert_file.take().is_some()),
            "tls_key_file" => assert!(config.tls_key_file.take().is_some()),
            "tls_client_ca_file" => assert!(config.tls_client_ca_file.take().is_some()),
            other => panic!("key {other} has no default: say here what its example shows"),
        }
    }
    let upstream = UpstreamUrl {
        tls: false,
        host: "localhost".to_string(),
        port: 5672,
    };
    assert_eq!(config, Config::with_defaults(upstream));
}

#[test]
fn file_config_accepts_every_key_at_its_default() {
    let mut text = String::from("upstream = \"amqp://localhost\"\nhttp_address = \"localhost\"\n");
    for doc in KEYS {
        if let Some(default) = doc.default {
            text.push_str(&format!("{} = {default}\n", doc.key));
        }
    }
    let parsed: FileConfig =
        toml::from_str(&text).unwrap_or_else(|error| panic!("{error}\n{text}"));
    assert_eq!(parsed.listen_port, Some(config::DEFAULT_LISTEN_PORT));
    assert_eq!(parsed.frame_max, Some(config::DEFAULT_FRAME_MAX));
}

#[test]
fn file_config_rejects_an_unknown_key() {
    assert!(toml::from_str::<FileConfig>("no_such_key = 1\n").is_err());
}

/// A deserializer that records the field names serde asks for; the only
/// way to list a derived struct's fields without instantiating it.
struct FieldNames<'a>(&'a mut &'static [&'static str]);

impl<'de> de::Deserializer<'de> for FieldNames<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("fields recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

#[test]
fn keys_table_matches_file_config_fields() {
    let mut fields: &'static [&'static str] = &[];
    let _ = <FileConfig as serde::Deserialize>::deserialize(FieldNames(&mut fields));
    let fields: BTreeSet<&str> = fields.iter().copied().collect();
    let keys: BTreeSet<&str> = KEYS.iter().map(|doc| doc.key).collect();
    assert_eq!(fields, keys, "config::KEYS and FileConfig's fields differ");
}
