//! `cargo run --release -p crudgate-bench -- [--runs 3] [--out bench-report.json] [--quick]`

use std::path::PathBuf;

use clap::Parser;
use crudgate_bench::{run, Options};

// The same allocator as the `crudgate` binary, so that crudgate served in-process here costs
// what the shipped server costs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "crudgate-bench",
    about = "crudgate throughput against the raw SQL limit"
)]
struct Args {
    /// Repetitions of every measurement; the report gives medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// JSON report (default: target/bench-report.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Sizes divided by 10: a smoke run.
    #[arg(long)]
    quick: bool,
    /// Seed of the generated operations.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Skip the peak-RSS measurement of the real binary.
    #[arg(long)]
    no_rss: bool,
    /// The crudgate binary for the peak-RSS measurement (default: target/release/crudgate,
    /// built with `cargo build --release -p crudgate-cli` when missing).
    #[arg(long)]
    crudgate_bin: Option<PathBuf>,
    /// Diagnosis only: run the cluster with fsync off to see CPU costs without commit
    /// latency. The targets are judged on durable runs.
    #[arg(long)]
    non_durable: bool,
    /// Only these workloads (comma-separated: W1,W1b,W2,W3); the raw and naive measurements of
    /// a workload come with it.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let out = args.out.unwrap_or_else(|| {
        crudgate_bench::rss::target_dir()
            .unwrap_or_else(|| PathBuf::from("target"))
            .join("bench-report.json")
    });
    let opts = Options {
        runs: args.runs.max(1),
        out,
        quick: args.quick,
        seed: args.seed,
        rss: !args.no_rss,
        crudgate_bin: args.crudgate_bin,
        durable: !args.non_durable,
        only: args.only,
    };
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(run(&opts)) {
        Ok(report) => {
            print!("{}", report.table());
            println!("report: {}", opts.out.display());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("benchmark failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
