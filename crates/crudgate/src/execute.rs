//! Applying planned statements to Postgres.
//!
//! The fast path sends all transactions of a request as bulk statements in one database
//! transaction, pipelined with BEGIN and COMMIT in a single round trip, on the bet that they all
//! succeed (they nearly always do). When anything in it fails, nothing of it is committed and
//! the exact path replays the request one client transaction at a time, one statement per
//! operation, which yields the reference contract's results: the committed prefix, the failing
//! operation's index, and what was not attempted.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use deadpool_postgres::{Client, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures::future::{join_all, BoxFuture};
use futures::FutureExt;
use rand::Rng;
use serde_json::{json, Map, Value};
use tokio_postgres::error::DbError;
use tokio_postgres::types::ToSql;
use tokio_postgres::NoTls;

use crate::classify::{classify_error, Disposition};
use crate::config::{EngineConfig, OnFatal, Planner};
use crate::plan::{self, Context, OpRef, Rejection, RowOp, Stmt, WriteHook};
use crate::protocol::{Batch, FailedOperation, TxResult};
use crate::schema::{Catalog, Kind};

/// Why the engine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid database URL: {0}")]
    DatabaseUrl(String),
    #[error("database pool: {0}")]
    Pool(String),
}

/// What became of a request: one result per client transaction, and whether the database was
/// unavailable before anything was applied (the HTTP layer answers 503 then).
#[derive(Debug, Clone)]
pub struct Outcome {
    pub results: Vec<TxResult>,
    pub unavailable: bool,
}

/// The write engine: a connection pool, the catalog and the policies. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    cfg: EngineConfig,
    hooks: Vec<Arc<dyn WriteHook>>,
    catalog: RwLock<Option<Arc<Catalog>>>,
    last_refresh: Mutex<Option<Instant>>,
    /// Serialises throttled refreshes; holds when the last successful one started.
    refresh_gate: tokio::sync::Mutex<Option<Instant>>,
}

/// A client asking for an unknown table may refresh the catalog at most this often.
const REFRESH_INTERVAL: Duration = Duration::from_secs(1);

impl Engine {
    /// Builds the engine. The database need not be up yet: the catalog is loaded on first use,
    /// and requests meanwhile are answered as temporarily unavailable.
    pub async fn connect(
        database_url: &str,
        cfg: EngineConfig,
        hooks: Vec<Arc<dyn WriteHook>>,
    ) -> Result<Engine, StartError> {
        let mut pg: tokio_postgres::Config = database_url
            .parse()
            .map_err(|e: tokio_postgres::Error| StartError::DatabaseUrl(e.to_string()))?;
        pg.connect_timeout(cfg.connect_timeout());
        pg.application_name("crudgate");
        // UTC so that nothing depends on the server's TimeZone; a statement timeout so a stuck
        // lock cannot hold a client's upload forever.
        pg.options(format!(
            "-c TimeZone=UTC -c statement_timeout={}",
            cfg.statement_timeout_ms
        ));
        let mgr = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(cfg.pool_size)
            .wait_timeout(Some(cfg.connect_timeout()))
            .create_timeout(Some(cfg.connect_timeout()))
            .recycle_timeout(Some(cfg.connect_timeout()))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StartError::Pool(e.to_string()))?;
        let engine = Engine {
            inner: Arc::new(Inner {
                pool,
                cfg,
                hooks,
                catalog: RwLock::new(None),
                last_refresh: Mutex::new(None),
                refresh_gate: tokio::sync::Mutex::new(None),
            }),
        };
        if let Err(e) = engine.refresh_schema().await {
            tracing::warn!(error = %e, "database not reachable yet; will retry on first request");
        }
        Ok(engine)
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.cfg
    }

    /// The connection pool, for embedders that want to run their own queries alongside.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// Reloads the catalog from Postgres (on demand, and after schema errors).
    pub async fn refresh_schema(&self) -> Result<(), String> {
        *self.inner.last_refresh.lock().expect("not poisoned") = Some(Instant::now());
        let client = self.inner.pool.get().await.map_err(|e| e.to_string())?;
        let catalog = Catalog::load(&**client, &self.inner.cfg.schemas)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(tables = catalog.tables().count(), "schema loaded");
        // Statements prepared against the old schema may no longer fit it.
        self.inner.pool.manager().statement_caches.clear();
        *self.inner.catalog.write().expect("not poisoned") = Some(Arc::new(catalog));
        Ok(())
    }

    /// The database answers and the catalog is loaded.
    pub async fn ready(&self) -> bool {
        if self.inner.catalog.read().expect("not poisoned").is_none()
            && self.refresh_schema().await.is_err()
        {
            return false;
        }
        match self.inner.pool.get().await {
            Ok(c) => c.simple_query("select 1").await.is_ok(),
            Err(_) => false,
        }
    }

    async fn catalog(&self) -> Option<Arc<Catalog>> {
        if let Some(c) = self.inner.catalog.read().expect("not poisoned").clone() {
            return Some(c);
        }
        self.refresh_schema().await.ok()?;
        self.inner.catalog.read().expect("not poisoned").clone()
    }

    /// Refreshes the catalog for a request that named something unknown, at most once per
    /// `REFRESH_INTERVAL`. A request that comes too soon waits out the interval rather than
    /// being rejected on a catalog older than its schema change, and a refresh that started
    /// after it asked serves it too. True if the catalog is now newer than the request.
    async fn refresh_throttled(&self) -> bool {
        let asked = Instant::now();
        let mut gate = self.inner.refresh_gate.lock().await;
        if gate.is_some_and(|started| started >= asked) {
            return true;
        }
        let last = *self.inner.last_refresh.lock().expect("not poisoned");
        if let Some(rest) = last.and_then(|t| REFRESH_INTERVAL.checked_sub(t.elapsed())) {
            tokio::time::sleep(rest).await;
        }
        let started = Instant::now();
        let ok = self.refresh_schema().await.is_ok();
        if ok {
            *gate = Some(started);
        }
        ok
    }

    /// Applies a batch: each client transaction atomically, in order, committed before this
    /// returns.
    pub async fn apply(&self, ctx: &Context, batch: &Batch) -> Outcome {
        let n = batch.transactions.len();
        let cfg = &self.inner.cfg;
        let mut schema_retry = true;
        loop {
            let Some(catalog) = self.catalog().await else {
                return unavailable(n, cfg, "database unavailable");
            };
            let prepare = |catalog: &Catalog| -> Vec<Result<Vec<RowOp>, Rejection>> {
                batch
                    .transactions
                    .iter()
                    .map(|tx| plan::prepare(catalog, tx, cfg, &self.inner.hooks, ctx))
                    .collect()
            };
            let mut prepared = prepare(&catalog);
            let unknown_names = prepared
                .iter()
                .any(|p| matches!(p, Err(r) if r.code == "SCHEMA_MISMATCH" || unknown_label(&catalog, r)));
            if unknown_names && schema_retry && self.refresh_throttled().await {
                // The table, column or enum label may have been created since the catalog was read.
                schema_retry = false;
                if let Some(fresh) = self.catalog().await {
                    prepared = prepare(&fresh);
                }
            }
            match self.apply_prepared(ctx, &prepared).await {
                Applied::Done(outcome) => return outcome,
                Applied::SchemaChanged if schema_retry => {
                    schema_retry = false;
                    self.refresh_schema().await.ok();
                }
                Applied::SchemaChanged => {
                    return self.exact_all(ctx, &prepared).await;
                }
            }
        }
    }

    async fn apply_prepared(
        &self,
        ctx: &Context,
        prepared: &[Result<Vec<RowOp>, Rejection>],
    ) -> Applied {
        let cfg = &self.inner.cfg;
        if cfg.planner == Planner::Naive {
            return Applied::Done(self.exact_all(ctx, prepared).await);
        }
        // The transactions the fast path may apply together: with `stop`, those before the
        // first rejected one; with `skip`, every valid one.
        let limit = match cfg.on_fatal {
            OnFatal::Stop => prepared.iter().position(|p| p.is_err()).unwrap_or(prepared.len()),
            OnFatal::Skip => prepared.len(),
        };
        let runnable: Vec<usize> = (0..limit).filter(|&i| prepared[i].is_ok()).collect();
        if runnable.is_empty() {
            return Applied::Done(self.exact_all(ctx, prepared).await);
        }
        let ops = runnable.iter().flat_map(|&tx| {
            let ops = prepared[tx].as_ref().expect("runnable");
            ops.iter()
                .enumerate()
                .map(move |(op, row)| (OpRef { tx, op }, row))
        });
        let stmts = plan::bulk(ops, cfg);
        match self.with_retries(ctx, &stmts, Mode::Fast).await {
            Ok(()) => {
                let mut results = Vec::with_capacity(prepared.len());
                for (i, p) in prepared.iter().enumerate() {
                    results.push(match p {
                        Ok(_) if i < limit => TxResult::Success,
                        Err(r) if i <= limit => fatal(r.clone()),
                        _ => TxResult::NotAttempted,
                    });
                }
                Applied::Done(Outcome {
                    results,
                    unavailable: false,
                })
            }
            Err(f) => match f.disposition() {
                Disposition::Unavailable => Applied::Done(unavailable(
                    prepared.len(),
                    cfg,
                    "database unavailable",
                )),
                Disposition::Temporary | Disposition::RetryHere => {
                    let mut results = vec![TxResult::NotAttempted; prepared.len()];
                    // With `skip`, transactions rejected before the first runnable one stand.
                    for (i, p) in prepared.iter().enumerate().take(runnable[0]) {
                        if let Err(r) = p {
                            results[i] = fatal(r.clone());
                        }
                    }
                    results[runnable[0]] = retryable(cfg, &f.summary());
                    Applied::Done(Outcome {
                        results,
                        unavailable: false,
                    })
                }
                Disposition::Schema => Applied::SchemaChanged,
                Disposition::Reject(_) => Applied::Done(self.exact_all(ctx, prepared).await),
            },
        }
    }

    /// The exact path: one database transaction per client transaction, one statement per
    /// operation, so that a failure names its operation.
    async fn exact_all(&self, ctx: &Context, prepared: &[Result<Vec<RowOp>, Rejection>]) -> Outcome {
        let cfg = &self.inner.cfg;
        let mut results = vec![TxResult::NotAttempted; prepared.len()];
        let mut committed_any = false;
        let mode = match cfg.planner {
            Planner::Naive => Mode::Sequential,
            Planner::Bulk => Mode::Exact,
        };
        for (i, p) in prepared.iter().enumerate() {
            let outcome = match p {
                Err(r) => Err(r.clone()),
                Ok(ops) => {
                    let stmts = plan::one_per_op(i, ops, cfg);
                    let mut res = self.with_retries(ctx, &stmts, mode).await;
                    if res.as_ref().is_err_and(Failure::rejected_at_commit) {
                        // A deferred constraint failed at COMMIT: once more with every
                        // constraint checked per statement, to name the operation.
                        res = self.with_retries(ctx, &stmts, Mode::Checked).await;
                    }
                    match res {
                        Ok(()) => Ok(()),
                        Err(f) => match f.disposition() {
                            Disposition::Unavailable if !committed_any => {
                                return unavailable(prepared.len(), cfg, "database unavailable");
                            }
                            Disposition::Unavailable
                            | Disposition::Temporary
                            | Disposition::RetryHere => {
                                results[i] = retryable(cfg, &f.summary());
                                break;
                            }
                            Disposition::Reject(code) => Err(self.rejection(code, &f, &stmts, ops).await),
                            Disposition::Schema => {
                                self.refresh_throttled().await;
                                Err(self.rejection("SCHEMA_MISMATCH", &f, &stmts, ops).await)
                            }
                        },
                    }
                }
            };
            match outcome {
                Ok(()) => {
                    committed_any = true;
                    results[i] = TxResult::Success;
                }
                Err(r) => {
                    tracing::info!(tx = i, code = %r.code, op = r.operation_index, "transaction rejected");
                    results[i] = fatal(r);
                    if cfg.on_fatal == OnFatal::Stop {
                        break;
                    }
                }
            }
        }
        Outcome {
            results,
            unavailable: false,
        }
    }

    /// Runs statements in one database transaction, retrying serialization failures and
    /// deadlocks with jittered back-off, and a lost connection once on a fresh one.
    async fn with_retries(&self, ctx: &Context, stmts: &[Stmt], mode: Mode) -> Result<(), Failure> {
        let cfg = &self.inner.cfg;
        let mut attempt = 0;
        let mut reconnected = false;
        loop {
            attempt += 1;
            let client = match self.inner.pool.get().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "no database connection");
                    return Err(Failure::no_connection());
                }
            };
            let mut in_use = DetachOnDrop(Some(client));
            let res = run(in_use.0.as_ref().expect("just set"), ctx, stmts, mode, cfg).await;
            let client = in_use.0.take().expect("just set");
            let Err(f) = res else { return Ok(()) };
            match f.disposition() {
                Disposition::RetryHere if attempt < cfg.max_attempts => {
                    let base = 5u64 << attempt.min(6);
                    let ms = rand::thread_rng().gen_range(base / 2..=base * 3 / 2);
                    tracing::debug!(attempt, ms, "serialization failure or deadlock; retrying");
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                // A pooled connection may have died with a restarted server: one more try on a
                // fresh connection before telling the client. Only when COMMIT cannot have been
                // processed, or a replay could apply twice.
                Disposition::Unavailable if !reconnected && !f.commit_maybe_sent => {
                    reconnected = true;
                    drop(client);
                    self.inner.pool.retain(|_, _| false);
                }
                _ => return Err(f),
            }
        }
    }

    /// Builds the rejection for a failed exact-path transaction.
    async fn rejection(&self, code: &str, f: &Failure, stmts: &[Stmt], ops: &[RowOp]) -> Rejection {
        let op_index = f.stmt.map(|s| stmts[s].ops[0].op).unwrap_or(0);
        let table = ops.get(op_index).map(|o| o.table.name.clone()).unwrap_or_default();
        let Some(db) = f.db_error() else {
            let key = ops.get(op_index).map(|o| o.key.clone());
            return Rejection {
                code: code.to_owned(),
                message: format!("row {} of table {table:?} does not exist", key.unwrap_or_default()),
                details: json!({ "table": table }),
                operation_index: op_index,
            };
        };
        let sqlstate = db.code().code();
        let mut details = Map::new();
        details.insert("sqlstate".into(), sqlstate.into());
        details.insert("table".into(), table.clone().into());
        for (k, v) in [
            ("constraint", db.constraint()),
            ("column", db.column()),
            ("detail", db.detail()),
        ] {
            if let Some(v) = v {
                details.insert(k.into(), v.into());
            }
        }
        let message = if sqlstate.starts_with("22") {
            // Postgres' own message repeats the value; name the column and type instead.
            match self.find_bad_column(ops.get(op_index)).await {
                Some((column, ty)) => {
                    details.insert("column".into(), column.clone().into());
                    details.insert("expected_type".into(), ty.clone().into());
                    format!("invalid value for column {table:?}.{column:?}: expected {ty}")
                }
                None => format!("invalid data for table {table:?}: {}", data_condition(sqlstate)),
            }
        } else {
            db.message().to_owned()
        };
        tracing::info!(table = %table, sqlstate, constraint = db.constraint().unwrap_or(""), "operation rejected by postgres");
        Rejection {
            code: code.to_owned(),
            message,
            details: Value::Object(details),
            operation_index: op_index,
        }
    }

    /// Casts each value of a rejected operation on its own to find the one Postgres refused.
    async fn find_bad_column(&self, op: Option<&RowOp>) -> Option<(String, String)> {
        let op = op?;
        let client = self.inner.pool.get().await.ok()?;
        let t = &op.table;
        let candidates = std::iter::once((t.pk, Some(op.key.clone())))
            .chain(op.cols.iter().copied().zip(op.vals.iter().cloned()));
        for (c, v) in candidates {
            let col = &t.columns[c];
            if matches!(col.kind, Kind::Bool | Kind::Uuid | Kind::Enum(_) | Kind::Json | Kind::Text) {
                continue;
            }
            let Some(v) = v else { continue };
            let sql = format!("select $1::text::{}", col.type_full);
            if let Err(e) = client.query(sql.as_str(), &[&v]).await {
                if e.code().is_some_and(|c| c.code().starts_with("22")) {
                    return Some((col.name.clone(), col.type_name.clone()));
                }
            }
        }
        None
    }
}

/// A value refused for an enum column (or array of one): the label may have been added since
/// the catalog was read.
fn unknown_label(catalog: &Catalog, r: &Rejection) -> bool {
    fn has_enum(kind: &Kind) -> bool {
        match kind {
            Kind::Enum(_) => true,
            Kind::Array(elem) => has_enum(elem),
            _ => false,
        }
    }
    let column = || {
        let table = catalog.table(r.details.get("table")?.as_str()?).ok()?;
        let c = table.column(r.details.get("column")?.as_str()?)?;
        Some(has_enum(&table.columns[c].kind))
    };
    r.code == "INVALID_DATA" && column().unwrap_or(false)
}

/// A pooled connection while a transaction runs on it. If the request is dropped midway (its
/// HTTP client went away), the connection may hold the open transaction, which the next
/// user's COMMIT would commit by halves: it is taken out of the pool and closed instead, which
/// rolls the transaction back.
struct DetachOnDrop(Option<Client>);

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

enum Applied {
    Done(Outcome),
    SchemaChanged,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Bulk statements, BEGIN … COMMIT in one pipeline.
    Fast,
    /// One statement per operation, pipelined.
    Exact,
    /// Like `Exact`, with constraints checked per statement (`set constraints all immediate`),
    /// so that a deferred constraint also names its operation. Only for a transaction that
    /// already failed at COMMIT: it would reject valid ones that rely on deferral.
    Checked,
    /// One statement per operation, each awaited: the naive planner.
    Sequential,
}

/// A failed attempt: which statement (None: BEGIN/COMMIT/connection) and why.
#[derive(Debug)]
struct Failure {
    stmt: Option<usize>,
    error: Option<tokio_postgres::Error>,
    /// COMMIT was sent, so the transaction may have been committed.
    commit_maybe_sent: bool,
}

impl Failure {
    fn no_connection() -> Self {
        Failure {
            stmt: None,
            error: None,
            commit_maybe_sent: false,
        }
    }

    fn disposition(&self) -> Disposition {
        match (&self.error, self.stmt) {
            (Some(e), _) => classify_error(e),
            // A statement that touched fewer rows than it had to (PATCH of a missing row).
            (None, Some(_)) => Disposition::Reject("ROW_NOT_FOUND"),
            (None, None) => Disposition::Unavailable,
        }
    }

    /// Rejected by the database at COMMIT (a deferred constraint).
    fn rejected_at_commit(&self) -> bool {
        self.stmt.is_none()
            && self.error.is_some()
            && matches!(self.disposition(), Disposition::Reject(_))
    }

    fn db_error(&self) -> Option<&DbError> {
        self.error.as_ref().and_then(|e| e.as_db_error())
    }

    /// For logs and retryable messages: the SQLSTATE, never values.
    fn summary(&self) -> String {
        match self.db_error() {
            Some(db) => format!("temporary database error (SQLSTATE {})", db.code().code()),
            None => "database connection lost".to_owned(),
        }
    }
}

const SET_USER: &str = "select set_config('app.user_id', $1, true)";

/// One attempt: BEGIN, the statements, COMMIT.
async fn run(
    client: &Client,
    ctx: &Context,
    stmts: &[Stmt],
    mode: Mode,
    cfg: &EngineConfig,
) -> Result<(), Failure> {
    let fail = |stmt: Option<usize>, e: tokio_postgres::Error, commit_maybe_sent: bool| Failure {
        stmt,
        error: Some(e),
        commit_maybe_sent,
    };
    let mut prepared = Vec::with_capacity(stmts.len());
    for (i, r) in join_all(stmts.iter().map(|s| client.prepare_cached(&s.sql)))
        .await
        .into_iter()
        .enumerate()
    {
        prepared.push(r.map_err(|e| fail(Some(i), e, false))?);
    }
    let set_user = match &ctx.user_id {
        Some(_) => Some(client.prepare_cached(SET_USER).await.map_err(|e| fail(None, e, false))?),
        None => None,
    };
    let user_param: Option<[&(dyn ToSql + Sync); 1]> =
        ctx.user_id.as_ref().map(|u| [u as &(dyn ToSql + Sync)]);
    let params: Vec<Vec<&(dyn ToSql + Sync)>> = stmts
        .iter()
        .map(|s| s.params.iter().map(|p| p as &(dyn ToSql + Sync)).collect())
        .collect();
    // COMMIT goes in the same pipeline unless row counts must be checked first. If a statement
    // fails, Postgres answers that COMMIT with a rollback, so nothing partial is ever kept.
    let check_rows = stmts.iter().any(|s| s.expect_rows.is_some());
    let commit_in_pipeline = !check_rows && mode != Mode::Sequential;

    let mut head: Vec<BoxFuture<'_, Result<u64, tokio_postgres::Error>>> = Vec::new();
    head.push(client.batch_execute("begin").map(|r| r.map(|_| 0)).boxed());
    if mode == Mode::Checked {
        head.push(client.batch_execute("set constraints all immediate").map(|r| r.map(|_| 0)).boxed());
    }
    if let (Some(st), Some(uid)) = (&set_user, &user_param) {
        head.push(client.execute(st, uid).boxed());
    }
    let head_len = head.len();

    let results: Vec<Result<u64, tokio_postgres::Error>> = if mode == Mode::Sequential {
        let mut out = Vec::new();
        for f in head {
            out.push(f.await);
        }
        for (st, p) in prepared.iter().zip(&params) {
            let r = client.execute(st, p).await;
            let failed = r.is_err();
            out.push(r);
            if failed {
                break;
            }
        }
        out
    } else {
        let mut all = head;
        for (st, p) in prepared.iter().zip(&params) {
            all.push(client.execute(st, p).boxed());
        }
        if commit_in_pipeline {
            all.push(client.batch_execute("commit").map(|r| r.map(|_| 0)).boxed());
        }
        join_all(all).await
    };

    let mut first_failure = None;
    for (i, r) in results.into_iter().enumerate() {
        let stmt = i.checked_sub(head_len).filter(|&s| s < stmts.len());
        match r {
            Err(e) => {
                first_failure = Some(fail(stmt, e, commit_in_pipeline));
                break;
            }
            Ok(rows) => {
                if let Some(s) = stmt {
                    if stmts[s].expect_rows.is_some_and(|want| rows < want) {
                        first_failure = Some(Failure {
                            stmt: Some(s),
                            error: None,
                            commit_maybe_sent: false,
                        });
                        break;
                    }
                }
            }
        }
    }
    if let Some(f) = first_failure {
        if !commit_in_pipeline {
            // Best effort: a broken connection is discarded by the pool anyway.
            let _ = client.batch_execute("rollback").await;
        }
        return Err(f);
    }
    if !commit_in_pipeline {
        client
            .batch_execute("commit")
            .await
            .map_err(|e| fail(None, e, true))?;
    }
    let _ = cfg;
    Ok(())
}

fn fatal(r: Rejection) -> TxResult {
    TxResult::FatalError {
        requires_client_handling: false,
        message: r.message.clone(),
        failed_operation: FailedOperation {
            error_code: r.code,
            message: r.message,
            details: r.details,
            operation_index: r.operation_index,
        },
    }
}

fn retryable(cfg: &EngineConfig, message: &str) -> TxResult {
    TxResult::RetryableError {
        message: message.to_owned(),
        retry_after_ms: cfg.retry_after_ms,
    }
}

fn unavailable(n: usize, cfg: &EngineConfig, message: &str) -> Outcome {
    let mut results = vec![TxResult::NotAttempted; n];
    if let Some(first) = results.first_mut() {
        *first = retryable(cfg, message);
    }
    Outcome {
        results,
        unavailable: true,
    }
}

/// Names of data exceptions whose Postgres messages would repeat the value.
fn data_condition(sqlstate: &str) -> &'static str {
    match sqlstate {
        "22001" => "value too long for the column",
        "22003" => "numeric value out of range",
        "22P02" => "invalid text representation",
        "22007" => "invalid datetime format",
        "22008" => "datetime field out of range",
        "22004" => "null value not allowed",
        "22012" => "division by zero",
        _ => "data exception",
    }
}
