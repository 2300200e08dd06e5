//! Records the git commit the binary is built from, for `amqproxy
//! --version` (src/cli.rs) and the `amqproxy_build_info` metric
//! (src/http.rs), both of which read `AMQPROXY_GIT_COMMIT` with
//! `option_env!`.
//!
//! Where it comes from, first that answers:
//! 1. `AMQPROXY_GIT_COMMIT` set (not empty) in the build's environment, for
//!    builds without a `.git` (`docker build --build-arg`);
//! 2. `git rev-parse --short HEAD`, when the crate is the top of a git work
//!    tree and git works;
//! 3. nothing: the variable is left unset and the binary reports no commit
//!    (a crates.io tarball, no git installed, a "dubious ownership" refusal).

use std::path::{Path, PathBuf};
use std::process::Command;

const VAR: &str = "AMQPROXY_GIT_COMMIT";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed={VAR}");
    if let Some(commit) = std::env::var(VAR).ok().filter(|c| !c.trim().is_empty()) {
        println!("cargo:rustc-env={VAR}={}", commit.trim());
        return;
    }
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| ".".into()));
    // Only our own repository: a crate unpacked inside some other work tree
    // must not report that tree's commit.
    let top = git(&dir, &["rev-parse", "--show-toplevel"]);
    if top
        .as_deref()
        .map(Path::new)
        .and_then(|top| top.canonicalize().ok())
        != dir.canonicalize().ok()
    {
        return;
    }
    // Rebuild when HEAD moves: a checkout changes HEAD, a commit changes the
    // branch's ref file (or packed-refs once refs are packed).
    let mut watched = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(branch) = git(&dir, &["symbolic-ref", "-q", "HEAD"]) {
        watched.push(branch);
    }
    for name in watched {
        if let Some(path) = git(&dir, &["rev-parse", "--git-path", &name]) {
            let path = dir.join(path);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    if let Some(commit) = git(&dir, &["rev-parse", "--short=12", "HEAD"]) {
        println!("cargo:rustc-env={VAR}={commit}");
    }
}

/// The trimmed standard output of a successful git command, if any.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let text = text.trim();
    (output.status.success() && !text.is_empty()).then(|| text.to_string())
}
