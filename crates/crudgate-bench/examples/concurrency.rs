//! Single-PUT requests (W3's shape) from 1, 2, 4 and 8 clients against crudgate on a durable
//! throwaway cluster, with how many were committed in groups: how group commit behaves as
//! concurrency grows. Diagnosis aid, one run each, no targets:
//! `cargo run --release -p crudgate-bench --example concurrency [-- <requests per run>]`.

use crudgate::config::Planner;
use crudgate_bench::{db, gen, http};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let requests: usize = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => 4_000,
    };
    let cluster = tokio::task::spawn_blocking(|| {
        crudgate_pgtemp::Cluster::start_with(crudgate_pgtemp::ClusterOptions {
            durable: true,
            ..Default::default()
        })
    })
    .await?
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let admin = db::connect(&cluster.url()).await?;
    for (i, clients) in [1, 2, 4, 8].into_iter().enumerate() {
        let load = gen::puts(7, requests, clients);
        let name = format!("concurrency_{i}");
        let url = cluster.url_for(&name);
        db::prepare(&admin, &url, &name, &load).await?;
        let server = http::Server::start(&url, Planner::Bulk).await?;
        let sample = http::drive(&server.base, http::requests(&load, 1, 1)).await?;
        let m = server.engine.metrics();
        let (groups, grouped) = (
            m.get("group_commits_total").unwrap_or(0),
            m.get("grouped_requests_total").unwrap_or(0),
        );
        server.stop().await?;
        db::verify(&url, &load.expected()).await?;
        println!(
            "{clients} clients: {:>6.0} requests/s  p50 {:.2} ms  p99 {:.2} ms  {grouped} of {requests} grouped in {groups} groups",
            sample.ops_per_s, sample.p50_ms, sample.p99_ms
        );
    }
    Ok(())
}
