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
    pub engine: Engine,
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
            AppState::new(engine.clone(), auth),
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(Server {
            base: format!("http://{addr}"),
            engine,
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
///
/// The clients speak HTTP/1.1 themselves over one TCP connection each, as load generators such
/// as wrk do: on two cores shared with the server and Postgres, a full client library's own CPU
/// would be measured as the server's.
pub async fn drive(base: &str, per_client: Vec<Vec<Request>>) -> anyhow::Result<Sample> {
    let addr = base
        .strip_prefix("http://")
        .context("an http:// base address")?
        .to_owned();
    let ops: usize = per_client.iter().flatten().map(|r| r.ops).sum();
    let barrier = Arc::new(Barrier::new(per_client.len() + 1));
    let mut tasks = Vec::new();
    for reqs in per_client {
        let barrier = barrier.clone();
        let addr = addr.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = Connection::open(&addr).await?;
            barrier.wait().await;
            let mut lat = Vec::with_capacity(reqs.len());
            for r in reqs {
                let t0 = Instant::now();
                let (status, body) = conn.post("/api/data", &r.body).await?;
                lat.push(t0.elapsed().as_secs_f64() * 1e3);
                check(status, &body, r.txs)?;
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

/// A keep-alive HTTP/1.1 connection that posts JSON and reads responses with a
/// `content-length` (what crudgate sends).
struct Connection {
    stream: tokio::io::BufReader<tokio::net::TcpStream>,
    host: String,
}

impl Connection {
    async fn open(addr: &str) -> anyhow::Result<Connection> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            stream: tokio::io::BufReader::new(stream),
            host: addr.to_owned(),
        })
    }

    async fn post(&mut self, path: &str, body: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        let s = self.stream.get_mut();
        s.write_all(head.as_bytes()).await?;
        s.write_all(body).await?;
        let mut line = String::new();
        self.stream.read_line(&mut line).await?;
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("status line {line:?}"))?;
        let mut length = None;
        loop {
            line.clear();
            if self.stream.read_line(&mut line).await? == 0 {
                bail!("connection closed in the response head");
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = Some(value.trim().parse::<usize>()?);
                }
            }
        }
        let mut body = vec![0; length.context("a response without content-length")?];
        self.stream.read_exact(&mut body).await?;
        Ok((status, body))
    }
}

fn check(status: u16, bytes: &[u8], txs: usize) -> anyhow::Result<()> {
    let text = || String::from_utf8_lossy(&bytes[..bytes.len().min(600)]).into_owned();
    if status != 200 {
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
