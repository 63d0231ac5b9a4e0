//! One measurement's numbers, and medians over runs.

use serde::Serialize;

/// What one run of one measurement produced.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub ops: usize,
    pub secs: f64,
    pub ops_per_s: f64,
    pub requests: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Requests crudgate committed as members of a group commit (none for raw SQL).
    pub grouped_requests: u64,
    /// WAL the cluster wrote during the run, per operation (bytes): full-page images and
    /// bookkeeping rows show here, and a larger WAL flush makes each COMMIT slower.
    pub wal_bytes_per_op: f64,
    #[serde(skip)]
    pub latencies_ms: Vec<f64>,
}

impl Sample {
    pub fn new(ops: usize, secs: f64, mut latencies_ms: Vec<f64>) -> Sample {
        latencies_ms.sort_by(f64::total_cmp);
        Sample {
            ops,
            secs,
            ops_per_s: ops as f64 / secs,
            requests: latencies_ms.len(),
            p50_ms: quantile(&latencies_ms, 0.50),
            p99_ms: quantile(&latencies_ms, 0.99),
            max_ms: latencies_ms.last().copied().unwrap_or(0.0),
            grouped_requests: 0,
            wal_bytes_per_op: 0.0,
            latencies_ms,
        }
    }
}

/// Nearest-rank quantile of sorted values.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}
