//! The quick mode end to end, so the benchmark cannot rot: every workload runs once at a tenth
//! of its size and its final state is verified (on a cluster with fsync off, for speed). Peak RSS is included when the release binary
//! has been built (`cargo build --release -p crudgate-cli`), and skipped otherwise.

use crudgate_bench::{run, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_mode_runs_and_verifies() {
    let out = std::env::temp_dir().join(format!("crudgate-bench-test-{}.json", std::process::id()));
    let release_bin = crudgate_bench::rss::target_dir().map(|t| t.join("release").join("crudgate"));
    let opts = Options {
        runs: 1,
        out: out.clone(),
        quick: true,
        seed: 7,
        rss: release_bin.as_ref().is_some_and(|b| b.exists()),
        crudgate_bin: release_bin,
        // fsync off keeps the smoke test fast on slow CI disks; every code path is the same.
        durable: false,
        only: Vec::new(),
    };
    let report = run(&opts).await.expect("benchmark verifies every workload");
    assert_eq!(report.measurements.len(), 14);
    assert!(report.measurements.iter().all(|m| m.median_ops_per_s > 0.0));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(json["measurements"].as_array().unwrap().len(), 14);
    println!("{}", report.table());
    std::fs::remove_file(out).ok();
}
