//! The crudgate throughput benchmark.
//!
//! crudgate runs in-process (the library, served on 127.0.0.1 and a free port) against a
//! private, durable throwaway PostgreSQL cluster; every measurement gets a fresh database with
//! the demo schema and its pre-seeded rows, and is checked afterwards: the `todos` table must
//! hold exactly the rows computed from the generated operations (count and checksum), or the
//! benchmark fails. The raw SQL limit is measured on the same cluster with tokio-postgres
//! alone. Peak memory is measured on the real `crudgate` binary in its own process.
//!
//! Workloads (full size; `--quick` divides by 10):
//! - W1: 10,000 ops (60 % PUT, 30 % PATCH, 10 % DELETE), requests of 100 ops = one client
//!   transaction; 1 and 8 clients, crudgate, naive planner (1 client) and raw SQL.
//! - W1b: the same ops, requests of 50 client transactions of 2 ops.
//! - W2: one 10,000-op transaction of PUTs in one request; crudgate, naive, raw.
//! - W3: 1,000 single-PUT requests, 1 and 8 clients; raw = 1,000 single-row commits, from 1
//!   and from 8 connections.
//! - RSS: 8 clients × 10 requests of 1,000 ops against `target/release/crudgate`.

pub mod db;
pub mod gen;
pub mod http;
pub mod rss;
pub mod stats;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use crudgate::config::Planner;
use serde::Serialize;
use uuid::Uuid;

use crate::gen::{Load, Todo};
use crate::stats::{median, Sample};

/// Command-line options.
#[derive(Debug, Clone)]
pub struct Options {
    pub runs: usize,
    pub out: PathBuf,
    pub quick: bool,
    pub seed: u64,
    /// Measure peak RSS of the real binary.
    pub rss: bool,
    /// The crudgate binary for the RSS measurement (default `target/release/crudgate`).
    pub crudgate_bin: Option<PathBuf>,
    /// Keep fsync on (the default and the only setting the targets are judged on); off shows
    /// the CPU cost alone.
    pub durable: bool,
    /// Only these workloads (`W1`, `W1b`, `W2`, `W3`); all when empty.
    pub only: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// crudgate over HTTP with the bulk planner.
    Crudgate,
    /// crudgate over HTTP with `Planner::Naive`.
    Naive,
    /// tokio-postgres alone, best bulk SQL.
    Raw,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Crudgate => "crudgate",
            Mode::Naive => "naive",
            Mode::Raw => "raw",
        }
    }
}

struct Spec {
    workload: &'static str,
    mode: Mode,
    load: usize,
    ops_per_request: usize,
    ops_per_tx: usize,
}

/// One measurement over all runs.
#[derive(Debug, Serialize)]
pub struct Measurement {
    pub workload: String,
    pub mode: Mode,
    pub clients: usize,
    pub ops: usize,
    pub ops_per_request: usize,
    pub ops_per_transaction: usize,
    pub final_rows: usize,
    pub checksum: String,
    pub median_ops_per_s: f64,
    pub median_p50_ms: f64,
    pub median_p99_ms: f64,
    pub median_wal_bytes_per_op: f64,
    /// crudgate ops/s divided by the raw SQL limit's (W3: by the single-row commit rate).
    pub ratio_to_raw: Option<f64>,
    /// crudgate ops/s divided by the naive planner's.
    pub naive_factor: Option<f64>,
    pub runs: Vec<Sample>,
}

#[derive(Debug, Serialize)]
pub struct PeakRss {
    pub binary: String,
    pub clients: usize,
    pub ops: usize,
    pub ops_per_request: usize,
    pub median_vmhwm_kib: u64,
    pub median_vmhwm_mib: f64,
    pub median_ops_per_s: f64,
    /// User + system CPU time of the crudgate process per operation (µs).
    pub median_server_cpu_us_per_op: f64,
    pub runs_vmhwm_kib: Vec<u64>,
}

#[derive(Debug, Serialize)]
pub struct Target {
    pub name: String,
    pub value: Option<f64>,
    /// `>= x` or `<= x`.
    pub requirement: String,
    pub met: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub quick: bool,
    pub runs: usize,
    pub seed: u64,
    pub cores: usize,
    pub postgres: String,
    pub durable: bool,
    pub measurements: Vec<Measurement>,
    pub peak_rss: Option<PeakRss>,
    pub targets: Vec<Target>,
}

/// Runs the whole benchmark and writes the JSON report. Any wrong final state is an error.
pub async fn run(opts: &Options) -> anyhow::Result<Report> {
    let scale = if opts.quick { 10 } else { 1 };
    let w1_ops = 10_000 / scale;
    let w2_ops = 10_000 / scale;
    let w3_ops = 1_000 / scale;
    let rss_ops = 80_000 / scale;

    let loads: Vec<Load> = vec![
        gen::mixed(opts.seed, w1_ops, 1, 100),
        gen::mixed(opts.seed, w1_ops, 8, 100),
        gen::puts(opts.seed, w2_ops, 1),
        gen::puts(opts.seed + 1, w3_ops, 1),
        gen::puts(opts.seed + 1, w3_ops, 8),
    ];
    let expected: Vec<BTreeMap<Uuid, Todo>> = loads.iter().map(Load::expected).collect();
    let spec = |workload, mode, load, ops_per_request, ops_per_tx| Spec {
        workload,
        mode,
        load,
        ops_per_request,
        ops_per_tx,
    };
    let specs = vec![
        spec("W1", Mode::Crudgate, 0, 100, 100),
        spec("W1", Mode::Crudgate, 1, 100, 100),
        spec("W1", Mode::Naive, 0, 100, 100),
        spec("W1", Mode::Raw, 0, 100, 100),
        spec("W1", Mode::Raw, 1, 100, 100),
        spec("W1b", Mode::Crudgate, 0, 100, 2),
        spec("W1b", Mode::Crudgate, 1, 100, 2),
        spec("W2", Mode::Crudgate, 2, w2_ops, w2_ops),
        spec("W2", Mode::Naive, 2, w2_ops, w2_ops),
        spec("W2", Mode::Raw, 2, w2_ops, w2_ops),
        spec("W3", Mode::Crudgate, 3, 1, 1),
        spec("W3", Mode::Crudgate, 4, 1, 1),
        spec("W3", Mode::Raw, 3, 1, 1),
        spec("W3", Mode::Raw, 4, 1, 1),
    ];
    let specs: Vec<Spec> = specs
        .into_iter()
        .filter(|s| {
            opts.only.is_empty() || opts.only.iter().any(|w| w.eq_ignore_ascii_case(s.workload))
        })
        .collect();

    let durable = opts.durable;
    eprintln!(
        "starting a {} throwaway PostgreSQL cluster",
        if durable {
            "durable"
        } else {
            "NON-DURABLE (fsync off)"
        }
    );
    let cluster = tokio::task::spawn_blocking(move || {
        crudgate_pgtemp::Cluster::start_with(crudgate_pgtemp::ClusterOptions {
            durable,
            ..Default::default()
        })
    })
    .await?
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let admin = db::connect(&cluster.url()).await?;
    let postgres: String = admin.query_one("select version()", &[]).await?.get(0);
    let mut ctx = Ctx {
        cluster,
        admin,
        counter: 0,
    };

    // One unrecorded pass of W1 (crudgate and raw, 1 client) first: the first measurement on a
    // fresh cluster otherwise pays for cold caches. Not in a smoke run.
    for s in specs
        .iter()
        .filter(|s| !opts.quick && s.workload == "W1" && s.load == 0 && s.mode != Mode::Naive)
    {
        ctx.measure(s, &loads[s.load], &expected[s.load]).await?;
    }
    let mut samples: Vec<Vec<Sample>> = specs.iter().map(|_| Vec::new()).collect();
    let mut checksums = vec![0u64; specs.len()];
    // Runs are interleaved (every measurement once, then again) so that drift on a noisy
    // machine spreads over all of them.
    for run in 0..opts.runs {
        for (i, s) in specs.iter().enumerate() {
            let load = &loads[s.load];
            let (sample, checksum) = ctx.measure(s, load, &expected[s.load]).await?;
            checksums[i] = checksum;
            eprintln!(
                "run {}/{}: {:<4} {:<8} {} clients: {:>9.0} ops/s  p50 {:>7.2} ms  p99 {:>7.2} ms  {:>5} requests grouped  {:>6.0} WAL bytes/op  (verified)",
                run + 1,
                opts.runs,
                s.workload,
                s.mode.name(),
                load.clients.len(),
                sample.ops_per_s,
                sample.p50_ms,
                sample.p99_ms,
                sample.grouped_requests,
                sample.wal_bytes_per_op
            );
            samples[i].push(sample);
        }
    }

    let mut measurements: Vec<Measurement> = specs
        .iter()
        .zip(samples)
        .zip(checksums)
        .map(|((s, runs), checksum)| Measurement {
            workload: s.workload.to_owned(),
            mode: s.mode,
            clients: loads[s.load].clients.len(),
            ops: loads[s.load].total_ops(),
            ops_per_request: s.ops_per_request,
            ops_per_transaction: s.ops_per_tx,
            final_rows: expected[s.load].len(),
            checksum: format!("{checksum:016x}"),
            median_ops_per_s: median(runs.iter().map(|r| r.ops_per_s)),
            median_p50_ms: median(runs.iter().map(|r| r.p50_ms)),
            median_p99_ms: median(runs.iter().map(|r| r.p99_ms)),
            median_wal_bytes_per_op: median(runs.iter().map(|r| r.wal_bytes_per_op)),
            ratio_to_raw: None,
            naive_factor: None,
            runs,
        })
        .collect();
    let rate = |ms: &[Measurement], w: &str, mode: Mode, clients: usize| {
        ms.iter()
            .find(|m| m.workload == w && m.mode == mode && m.clients == clients)
            .map(|m| m.median_ops_per_s)
    };
    for i in 0..measurements.len() {
        let m = &measurements[i];
        if m.mode != Mode::Crudgate {
            continue;
        }
        let raw_workload = if m.workload == "W1b" {
            "W1"
        } else {
            m.workload.as_str()
        };
        let raw = rate(&measurements, raw_workload, Mode::Raw, m.clients);
        let naive = rate(&measurements, &m.workload, Mode::Naive, m.clients);
        let own = m.median_ops_per_s;
        measurements[i].ratio_to_raw = raw.map(|r| own / r);
        measurements[i].naive_factor = naive.map(|n| own / n);
    }

    let peak_rss = if opts.rss {
        let bin = rss::find_or_build_binary(opts.crudgate_bin.as_deref())?;
        let load = gen::mixed(opts.seed + 2, rss_ops, 8, 1000);
        let want = load.expected();
        let mut hwms = Vec::new();
        let mut rates = Vec::new();
        let mut cpu = Vec::new();
        for run in 0..opts.runs {
            let (name, url) = ctx.fresh(&load).await?;
            let (usage, sample) = rss::measure(&bin, &url, http::requests(&load, 1000, 1000))
                .await
                .context("peak RSS measurement")?;
            db::verify(&url, &want)
                .await
                .context("peak RSS measurement")?;
            db::drop_database(&ctx.admin, &name).await?;
            let cpu_us_per_op = usage.cpu_ms * 1000.0 / sample.ops as f64;
            eprintln!(
                "run {}/{}: RSS binary 8 clients × 1,000-op requests: VmHWM {:.1} MiB, {:.0} ops/s, server CPU {:.2} µs/op (verified)",
                run + 1,
                opts.runs,
                usage.vmhwm_kib as f64 / 1024.0,
                sample.ops_per_s,
                cpu_us_per_op
            );
            hwms.push(usage.vmhwm_kib);
            cpu.push(cpu_us_per_op);
            rates.push(sample.ops_per_s);
        }
        let mut sorted = hwms.clone();
        sorted.sort_unstable();
        let med = sorted[(sorted.len() - 1) / 2];
        Some(PeakRss {
            binary: bin.display().to_string(),
            clients: 8,
            ops: load.total_ops(),
            ops_per_request: 1000,
            median_vmhwm_kib: med,
            median_vmhwm_mib: med as f64 / 1024.0,
            median_ops_per_s: median(rates),
            median_server_cpu_us_per_op: median(cpu),
            runs_vmhwm_kib: hwms,
        })
    } else {
        None
    };

    let targets = targets(&measurements, peak_rss.as_ref());
    let report = Report {
        quick: opts.quick,
        runs: opts.runs,
        seed: opts.seed,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        postgres,
        durable: opts.durable,
        measurements,
        peak_rss,
        targets,
    };
    if let Some(dir) = opts.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&opts.out, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", opts.out.display()))?;
    drop(ctx);
    Ok(report)
}

/// The cluster and what every measurement needs from it.
struct Ctx {
    cluster: crudgate_pgtemp::Cluster,
    admin: tokio_postgres::Client,
    counter: usize,
}

impl Ctx {
    /// A new database with the demo schema and the load's seed rows.
    async fn fresh(&mut self, load: &Load) -> anyhow::Result<(String, String)> {
        self.counter += 1;
        let name = format!("bench_{}", self.counter);
        let url = self.cluster.url_for(&name);
        db::prepare(&self.admin, &url, &name, load).await?;
        Ok((name, url))
    }

    /// The cluster's current WAL position, in bytes.
    async fn wal_lsn(&self) -> anyhow::Result<f64> {
        let row = self
            .admin
            .query_one("select (pg_current_wal_lsn() - '0/0'::pg_lsn)::float8", &[])
            .await?;
        Ok(row.get(0))
    }

    /// One run of one measurement on a fresh database, verified; returns the checksum.
    async fn measure(
        &mut self,
        s: &Spec,
        load: &Load,
        expected: &BTreeMap<Uuid, Todo>,
    ) -> anyhow::Result<(Sample, u64)> {
        let what = || {
            format!(
                "{} {} {} clients",
                s.workload,
                s.mode.name(),
                load.clients.len()
            )
        };
        let (name, url) = self.fresh(load).await?;
        let wal_before = self.wal_lsn().await?;
        let mut sample = match s.mode {
            Mode::Raw => db::run_raw(&url, load, s.ops_per_tx).await,
            Mode::Crudgate | Mode::Naive => {
                let planner = if s.mode == Mode::Naive {
                    Planner::Naive
                } else {
                    Planner::Bulk
                };
                let server = http::Server::start(&url, planner).await?;
                let reqs = http::requests(load, s.ops_per_request, s.ops_per_tx);
                let sample = http::drive(&server.base, reqs).await.map(|mut s| {
                    let grouped = server.engine.metrics().get("grouped_requests_total");
                    s.grouped_requests = grouped.unwrap_or(0);
                    s
                });
                server.stop().await?;
                sample
            }
        }
        .with_context(what)?;
        sample.wal_bytes_per_op = (self.wal_lsn().await? - wal_before) / sample.ops as f64;
        let checksum = db::verify(&url, expected).await.with_context(what)?;
        db::drop_database(&self.admin, &name).await?;
        Ok((sample, checksum))
    }
}

fn targets(ms: &[Measurement], rss: Option<&PeakRss>) -> Vec<Target> {
    let find = |w: &str, mode: Mode, c: usize| {
        ms.iter()
            .find(|m| m.workload == w && m.mode == mode && m.clients == c)
    };
    let crud = |w, c| find(w, Mode::Crudgate, c);
    let at_least = |name: &str, value: Option<f64>, min: f64| Target {
        name: name.to_owned(),
        value,
        requirement: format!(">= {min}"),
        met: value.is_some_and(|v| v >= min),
    };
    let at_most = |name: &str, value: Option<f64>, max: f64| Target {
        name: name.to_owned(),
        value,
        requirement: format!("<= {max}"),
        met: value.is_some_and(|v| v <= max),
    };
    vec![
        at_least(
            "W1 1 client ops/s",
            crud("W1", 1).map(|m| m.median_ops_per_s),
            40_000.0,
        ),
        at_most(
            "W1 1 client p99 ms",
            crud("W1", 1).map(|m| m.median_p99_ms),
            5.0,
        ),
        at_least(
            "W1 8 clients ops/s",
            crud("W1", 8).map(|m| m.median_ops_per_s),
            60_000.0,
        ),
        at_least(
            "W2 ratio to raw",
            crud("W2", 1).and_then(|m| m.ratio_to_raw),
            0.60,
        ),
        at_least(
            "W3 1 client ratio to single-row commit rate",
            crud("W3", 1).and_then(|m| m.ratio_to_raw),
            0.75,
        ),
        at_least(
            "W3 8 clients ops/s",
            crud("W3", 8).map(|m| m.median_ops_per_s),
            8_000.0,
        ),
        at_least(
            "W1 1 client planner vs naive",
            crud("W1", 1).and_then(|m| m.naive_factor),
            5.0,
        ),
        at_least(
            "W2 planner vs naive",
            crud("W2", 1).and_then(|m| m.naive_factor),
            15.0,
        ),
        at_most(
            "peak RSS MiB (8 clients, 1,000-op requests)",
            rss.map(|r| r.median_vmhwm_mib),
            64.0,
        ),
    ]
}

impl Report {
    /// The human-readable summary.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "crudgate bench ({}; {} run(s), medians; {} cores; {}; {})",
            if self.quick {
                "QUICK, sizes / 10"
            } else {
                "full"
            },
            self.runs,
            self.cores,
            if self.durable {
                "durable"
            } else {
                "NON-DURABLE, fsync off: diagnosis only"
            },
            self.postgres.split(" on ").next().unwrap_or(&self.postgres)
        );
        let _ = writeln!(
            s,
            "{:<5} {:<9} {:>7} {:>7} {:>6} {:>11} {:>9} {:>9} {:>8} {:>9} {:>7}",
            "work",
            "mode",
            "clients",
            "ops",
            "op/req",
            "ops/s",
            "p50 ms",
            "p99 ms",
            "vs raw",
            "vs naive",
            "WAL/op"
        );
        let opt = |v: Option<f64>, pct: bool| match v {
            Some(v) if pct => format!("{:.0}%", v * 100.0),
            Some(v) => format!("{v:.1}x"),
            None => "-".to_owned(),
        };
        for m in &self.measurements {
            let _ = writeln!(
                s,
                "{:<5} {:<9} {:>7} {:>7} {:>6} {:>11.0} {:>9.2} {:>9.2} {:>8} {:>9} {:>7.0}",
                m.workload,
                m.mode.name(),
                m.clients,
                m.ops,
                if m.ops_per_transaction == m.ops_per_request {
                    m.ops_per_request.to_string()
                } else {
                    format!(
                        "{}x{}",
                        m.ops_per_request / m.ops_per_transaction,
                        m.ops_per_transaction
                    )
                },
                m.median_ops_per_s,
                m.median_p50_ms,
                m.median_p99_ms,
                opt(m.ratio_to_raw, true),
                opt(m.naive_factor, false),
                m.median_wal_bytes_per_op
            );
        }
        if let Some(r) = &self.peak_rss {
            let _ = writeln!(
                s,
                "peak RSS of {} with {} clients × {}-op requests ({} ops): {:.1} MiB (VmHWM), {:.0} ops/s, server CPU {:.2} µs/op",
                r.binary,
                r.clients,
                r.ops_per_request,
                r.ops,
                r.median_vmhwm_mib,
                r.median_ops_per_s,
                r.median_server_cpu_us_per_op
            );
        }
        let _ = writeln!(
            s,
            "targets{}:",
            if self.quick {
                " (quick sizes: indicative only)"
            } else {
                ""
            }
        );
        for t in &self.targets {
            let _ = writeln!(
                s,
                "  [{}] {:<46} {:>10} (need {})",
                if t.met { "met" } else { "MISSED" },
                t.name,
                t.value.map_or("-".to_owned(), |v| format!("{v:.2}")),
                t.requirement
            );
        }
        s
    }
}
