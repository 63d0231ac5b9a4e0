//! crudgate in-process, and the simulated PowerSync clients that talk to it over HTTP.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context as _};
use crudgate::auth::{AuthConfig, AuthMode, Authenticator};
use crudgate::config::Planner;
use crudgate::{AppState, Engine, EngineConfig};
use tokio::sync::{oneshot, Barrier};
use tokio::task::JoinHandle;

use crate::gen::{body, Load, Op};
use crate::stats::Sample;

/// A crudgate server running in this process on 127.0.0.1 and a free port.
pub struct Server {
    pub base: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    pub async fn start(database_url: &str, planner: Planner) -> anyhow::Result<Server> {
        let cfg = EngineConfig {
            planner,
            // The benchmark writes the demo tables without write rules.
            allow_unlisted_tables: true,
            ..EngineConfig::default()
        };
        let engine = Engine::connect(database_url, cfg, vec![]).await?;
        #[allow(clippy::needless_update)] // AuthConfig may grow fields
        let auth = Authenticator::new(&AuthConfig {
            mode: AuthMode::None,
            ..AuthConfig::default()
        })
        .map_err(|e| anyhow::anyhow!("auth: {e}"))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(crudgate::serve(
            listener,
            AppState::new(engine, auth),
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(Server {
            base: format!("http://{addr}"),
            stop,
            task,
        })
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await??;
        Ok(())
    }
}

/// One prepared request: its body and what it carries.
pub struct Request {
    pub body: Vec<u8>,
    pub ops: usize,
    pub txs: usize,
}

/// Splits each client's ops into requests of `ops_per_request` ops, each made of client
/// transactions of `ops_per_tx` ops.
pub fn requests(load: &Load, ops_per_request: usize, ops_per_tx: usize) -> Vec<Vec<Request>> {
    load.clients
        .iter()
        .map(|c| {
            let mut tx_id = 1;
            c.ops
                .chunks(ops_per_request)
                .map(|chunk| {
                    let txs: Vec<&[Op]> = chunk.chunks(ops_per_tx).collect();
                    let r = Request {
                        body: body(&txs, tx_id),
                        ops: chunk.len(),
                        txs: txs.len(),
                    };
                    tx_id += txs.len() as u64;
                    r
                })
                .collect()
        })
        .collect()
}

/// Sends each client's requests in order on its own keep-alive connection, all clients at
/// once. Every request must come back 200 with `success` for each transaction.
pub async fn drive(base: &str, per_client: Vec<Vec<Request>>) -> anyhow::Result<Sample> {
    let url = format!("{base}/api/data");
    let ops: usize = per_client.iter().flatten().map(|r| r.ops).sum();
    let barrier = Arc::new(Barrier::new(per_client.len() + 1));
    let mut tasks = Vec::new();
    for reqs in per_client {
        let url = url.clone();
        let barrier = barrier.clone();
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .tcp_nodelay(true)
            .build()?;
        tasks.push(tokio::spawn(async move {
            // One request outside the clock would change the table; instead open the
            // connection with a health check.
            http.get(url.replace("/api/data", "/health"))
                .send()
                .await?
                .error_for_status()?;
            barrier.wait().await;
            let mut lat = Vec::with_capacity(reqs.len());
            for r in reqs {
                let t0 = Instant::now();
                let res = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(r.body)
                    .send()
                    .await?;
                let status = res.status();
                let bytes = res.bytes().await?;
                lat.push(t0.elapsed().as_secs_f64() * 1e3);
                check(status, &bytes, r.txs)?;
            }
            anyhow::Ok(lat)
        }));
    }
    barrier.wait().await;
    let start = Instant::now();
    let mut lats = Vec::new();
    for t in tasks {
        lats.push(t.await??);
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Sample::new(ops, secs, lats.concat()))
}

fn check(status: reqwest::StatusCode, bytes: &[u8], txs: usize) -> anyhow::Result<()> {
    let text = || String::from_utf8_lossy(&bytes[..bytes.len().min(600)]).into_owned();
    if status != reqwest::StatusCode::OK {
        bail!("HTTP {status}: {}", text());
    }
    let v: serde_json::Value =
        serde_json::from_slice(bytes).with_context(|| format!("response: {}", text()))?;
    let results = v["results"]
        .as_array()
        .with_context(|| format!("no results: {}", text()))?;
    if results.len() != txs || results.iter().any(|r| r["status"] != "success") {
        bail!("expected {txs} successes, got: {}", text());
    }
    Ok(())
}
