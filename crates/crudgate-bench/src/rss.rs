//! Peak memory of the real `crudgate` binary, run as its own process.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::http::{drive, Request};
use crate::stats::Sample;

/// The `target` directory this bench was built into (`…/target/<profile>/crudgate-bench` or
/// `…/target/<profile>/deps/<test>`).
pub fn target_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let mut dir = exe.parent()?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent()?;
    }
    dir.parent().map(Path::to_path_buf)
}

/// `target/release/crudgate`, built with `cargo build --release -p crudgate-cli` if missing.
pub fn find_or_build_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let target = target_dir().context("cannot locate the target directory")?;
    let bin = target.join("release").join("crudgate");
    if !bin.exists() {
        eprintln!(
            "building {} (cargo build --release -p crudgate-cli)",
            bin.display()
        );
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "--release", "-p", "crudgate-cli"])
            .env("CARGO_TARGET_DIR", &target)
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
            .status()
            .context("running cargo")?;
        if !status.success() || !bin.exists() {
            bail!("could not build {}", bin.display());
        }
    }
    Ok(bin)
}

/// What the separate process used.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// `VmHWM`, KiB.
    pub vmhwm_kib: u64,
    /// User + system CPU time of the server process while the requests ran, ms.
    pub cpu_ms: f64,
}

/// Clock ticks per second (`getconf CLK_TCK`): 100 on Linux x86-64 and arm64.
const CLK_TCK: f64 = 100.0;

/// User + system CPU time of a process so far, ms (Linux `/proc/<pid>/stat`).
fn cpu_ms(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks * 1000.0 / CLK_TCK)
}

/// Starts the binary against `database_url`, sends the requests, and reads `VmHWM` and the
/// CPU time the server spent.
pub async fn measure(
    bin: &Path,
    database_url: &str,
    per_client: Vec<Vec<Request>>,
) -> anyhow::Result<(Usage, Sample)> {
    let mut child = Command::new(bin)
        .args([
            "--database-url",
            database_url,
            "--auth",
            "none",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "warn")
        .env("CRUDGATE_ENGINE__ALLOW_UNLISTED_TABLES", "true")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id().context("child pid")?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let base = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(addr) = line.strip_prefix("listening on ") {
                return anyhow::Ok(addr.trim().to_owned());
            }
        }
        bail!("crudgate exited before listening")
    })
    .await
    .context("crudgate did not start listening within 30 s")??;
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let cpu_before = cpu_ms(pid);
    let sample = drive(&base, per_client).await;
    let cpu_after = cpu_ms(pid);
    let hwm = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        });
    child.kill().await.ok();
    let sample = sample?;
    let usage = Usage {
        vmhwm_kib: hwm.context("VmHWM not readable")?,
        cpu_ms: cpu_after.zip(cpu_before).map_or(0.0, |(a, b)| a - b),
    };
    Ok((usage, sample))
}
