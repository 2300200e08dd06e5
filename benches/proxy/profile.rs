//! `perf record` attached to the proxy, and the report as tables: CPU
//! samples by thread, by binary (the kernel's share is system calls, TCP
//! and scheduling), and by function.

use crate::report::{Json, Table};
use std::io;
use std::path::Path;
use std::process::{Child, Command, Stdio};

pub struct PerfRecord {
    child: Child,
}

impl PerfRecord {
    /// Samples the process on the cpu-clock (hardware counters are not
    /// available in most VMs) until [`PerfRecord::stop`].
    pub fn start(pid: u32, data: &Path) -> Option<PerfRecord> {
        let child = Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-F", "999", "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok();
        if child.is_none() {
            eprintln!("perf record could not start (is linux-perf installed?)");
        }
        // Give it a moment to attach to every thread.
        std::thread::sleep(std::time::Duration::from_millis(100));
        child.map(|child| PerfRecord { child })
    }

    pub fn stop(mut self) {
        // perf writes its data on SIGINT; std can only send SIGKILL.
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// Tables of the top entries of a perf.data file.
pub fn report(data: &Path, label: &str) -> io::Result<(Vec<Table>, Json)> {
    let mut tables = Vec::new();
    let mut json = Vec::new();
    for (sort, title, limit) in [
        ("comm", "thread", 10),
        ("dso", "binary", 10),
        ("sym", "function", 25),
    ] {
        let out = Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "--percent-limit",
                "0.5",
            ])
            .args(["--sort", sort, "-i"])
            .arg(data)
            .stderr(Stdio::null())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut table = Table::new(
            format!("profile of the proxy by {title}: {label}"),
            &["share of CPU samples", title],
        );
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains('%'))
            .take(limit)
        {
            let Some((pct, rest)) = line.trim().split_once('%') else {
                continue;
            };
            let name = rest
                .trim()
                .trim_start_matches("[.]")
                .trim_start_matches("[k]")
                .trim()
                .to_string();
            table.row(vec![format!("{}%", pct.trim()), name.clone()]);
            json.push(Json::obj(vec![
                ("by", sort.into()),
                ("name", name.into()),
                ("percent", pct.trim().parse::<f64>().unwrap_or(0.0).into()),
            ]));
        }
        if sort == "sym" {
            table.note(format!(
                "perf record -e cpu-clock -F 999 -p PROXY_PID; perf report --no-children --sort comm / dso / sym -i {}",
                data.display()
            ));
        }
        tables.push(table);
    }
    Ok((tables, Json::Arr(json)))
}
