//! Applying a request to Postgres.
//!
//! The fast path sends all transactions of a request as bulk statements in one database
//! transaction, pipelined with BEGIN and COMMIT in a single round trip, on the bet that they all
//! succeed (they nearly always do). When anything in it fails, nothing of it is committed and
//! the exact path replays the request one client transaction at a time, one statement per
//! operation, which yields the reference contract's results: the committed prefix, the failing
//! operation's index, and what was not attempted.
//!
//! With a client id, each database transaction takes the client's advisory lock and records its
//! decisions in the ledger in the same transaction as the data (see `ledger`). The fast path
//! reads the ledger only after its insert finds a transaction already decided (one wasted
//! attempt for a resend, no extra round trip for anything new); the exact path reads it first.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use deadpool_postgres::{
    Client, Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime, TimeoutType,
};
use futures::future::{join_all, BoxFuture};
use futures::FutureExt;
use rand::Rng;
use serde_json::{json, Map, Value};
use tokio_postgres::error::DbError;
use tokio_postgres::types::ToSql;
use tokio_postgres::NoTls;

use crate::classify::{classify_error, Disposition};
use crate::config::{EngineConfig, OnFatal, Planner, RlsConfig};
use crate::ledger::{self, Decided, Scope, Tables, TxKey};
use crate::metrics::Metrics;
use crate::plan::{self, Context, Expect, OpRef, Param, Rejection, RowOp, Stmt, WriteHook};
use crate::protocol::{Batch, FailedOperation, Transaction, TxResult};
use crate::rules::Access;
use crate::schema::{quote_ident, Catalog, Kind};

mod group;

/// Why the engine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid database URL: {0}")]
    DatabaseUrl(String),
    #[error("database pool: {0}")]
    Pool(String),
    #[error("invalid engine configuration: {0}")]
    Config(String),
}

/// What became of a request: one result per client transaction, and whether the database was
/// unavailable before anything was known to be applied (the HTTP layer answers 503 then).
#[derive(Debug, Clone)]
pub struct Outcome {
    pub results: Vec<TxResult>,
    pub unavailable: bool,
    /// With `unavailable`: the connection was lost after COMMIT was sent, so the transactions
    /// may have been applied. A resend with a client id and transaction ids is answered from
    /// the ledger; without them it may apply them again.
    pub maybe_applied: bool,
}

/// The write engine: a connection pool, the catalog and the policies. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    cfg: EngineConfig,
    tables: Tables,
    hooks: Vec<Arc<dyn WriteHook>>,
    catalog: RwLock<Option<Arc<Catalog>>>,
    last_refresh: Mutex<Option<Instant>>,
    /// Serialises throttled refreshes; holds when the last successful one started.
    refresh_gate: tokio::sync::Mutex<Option<Instant>>,
    metrics: Metrics,
    lanes: Arc<group::Lanes>,
    /// Batches being applied, also those whose caller went away (see `Finish`), so that a
    /// shutdown can wait for them.
    applying: std::sync::atomic::AtomicUsize,
    applied_all: tokio::sync::Notify,
}

/// One batch being applied (see `Inner::applying`).
struct Applying(Engine);

impl Applying {
    fn new(engine: Engine) -> Self {
        engine.inner.applying.fetch_add(1, Ordering::SeqCst);
        Applying(engine)
    }
}

impl Drop for Applying {
    fn drop(&mut self) {
        if self.0.inner.applying.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.inner.applied_all.notify_waiters();
        }
    }
}

/// A client asking for an unknown table may refresh the catalog at most this often.
const REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// How often old ledger entries are pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

impl Engine {
    /// Builds the engine. The database need not be up yet: the catalog is loaded (and
    /// crudgate's own tables migrated) on first use, and requests meanwhile are answered as
    /// temporarily unavailable.
    pub async fn connect(
        database_url: &str,
        cfg: EngineConfig,
        hooks: Vec<Arc<dyn WriteHook>>,
    ) -> Result<Engine, StartError> {
        cfg.validate().map_err(StartError::Config)?;
        if cfg.tables.is_empty() && !cfg.allow_unlisted_tables {
            tracing::warn!(
                "no write rules ([engine.tables.*]) and allow_unlisted_tables = false: every \
                 write will be refused as UNAUTHORIZED"
            );
        }
        let mut pg: tokio_postgres::Config = database_url
            .parse()
            .map_err(|e: tokio_postgres::Error| StartError::DatabaseUrl(e.to_string()))?;
        pg.connect_timeout(cfg.connect_timeout());
        // A database behind a silent network failure is noticed within about a minute, not
        // the system default of two hours, so requests waiting on it end (as unavailable).
        pg.keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(10))
            .keepalives_retries(3);
        pg.application_name("crudgate");
        // UTC so that nothing depends on the server's TimeZone; a statement timeout so a stuck
        // lock cannot hold a client's upload forever.
        pg.options(format!(
            "-c TimeZone=UTC -c client_min_messages=warning -c statement_timeout={}",
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
                tables: Tables::new(&cfg),
                cfg,
                hooks,
                catalog: RwLock::new(None),
                last_refresh: Mutex::new(None),
                refresh_gate: tokio::sync::Mutex::new(None),
                metrics: Metrics::default(),
                lanes: Arc::default(),
                applying: Default::default(),
                applied_all: Default::default(),
            }),
        };
        if let Err(e) = engine.refresh_schema().await {
            tracing::warn!(error = %e, "database not ready yet; will retry on first request");
        }
        engine.spawn_pruning();
        Ok(engine)
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.cfg
    }

    pub(crate) fn tables(&self) -> &Tables {
        &self.inner.tables
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Returns once no batch is being applied, counting those whose caller went away (they
    /// run to completion on their own). For a shutdown, after the server stopped accepting.
    pub async fn finished(&self) {
        loop {
            let notified = self.inner.applied_all.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.inner.applying.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// The connection pool, for embedders that want to run their own queries alongside.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// Reloads the catalog from Postgres (on demand, and after schema errors). The first load
    /// also creates or upgrades crudgate's own tables.
    pub async fn refresh_schema(&self) -> Result<(), String> {
        *self.inner.last_refresh.lock().expect("not poisoned") = Some(Instant::now());
        let client = self.inner.pool.get().await.map_err(|e| e.to_string())?;
        let first = self.inner.catalog.read().expect("not poisoned").is_none();
        if first {
            self.inner
                .tables
                .migrate(&**client)
                .await
                .map_err(|e| format!("migrating crudgate's tables: {e}"))?;
        }
        let catalog = Catalog::load(&**client, &self.inner.cfg)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(tables = catalog.tables().count(), "schema loaded");
        if let Some(role) = &self.inner.cfg.rls.role {
            // A role that cannot be assumed fails every write as a temporary error (the data is
            // not at fault); say why once per load rather than once per request.
            let usable = client
                .query_opt(
                    "select pg_has_role(current_user, oid, 'MEMBER') from pg_roles where rolname = $1",
                    &[role],
                )
                .await
                .ok()
                .flatten()
                .is_some_and(|r| r.get::<_, bool>(0));
            if !usable {
                tracing::error!(role = %role, "rls.role does not exist or the login role is not a member of it; writes will fail");
            }
        }
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

    fn spawn_pruning(&self) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PRUNE_INTERVAL).await;
                let Some(inner) = weak.upgrade() else { return };
                let engine = Engine { inner };
                if let Err(e) = engine.prune_ledger().await {
                    tracing::warn!(error = %e, "ledger pruning failed");
                }
            }
        });
    }

    /// Forgets ledger entries older than the configured retention; returns how many.
    pub async fn prune_ledger(&self) -> Result<u64, String> {
        let client = self.inner.pool.get().await.map_err(|e| e.to_string())?;
        let n = self
            .inner
            .tables
            .prune(&**client, self.inner.cfg.ledger_retention_hours)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(pruned = n, "ledger pruned");
        Ok(n)
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

    /// Whether a column that refused a value while planning has another type in the database
    /// than in the catalog, or is gone: one catalog query per such column.
    async fn retyped(&self, catalog: &Catalog, prepared: &[Result<Vec<RowOp>, Rejection>]) -> bool {
        let columns: Vec<(&Arc<Access>, usize)> = prepared
            .iter()
            .filter_map(|p| p.as_ref().err())
            .filter(|r| r.code == "INVALID_DATA")
            .filter_map(|r| rejected_column(catalog, r))
            .collect();
        if columns.is_empty() {
            return false;
        }
        let Ok(client) = self.inner.pool.get().await else {
            return false;
        };
        for (access, c) in columns {
            let (table, col) = (&access.table, &access.table.columns[c]);
            let now = client
                .query_opt(
                    "select format_type(a.atttypid, a.atttypmod) from pg_attribute a \
                     join pg_class c on c.oid = a.attrelid \
                     join pg_namespace n on n.oid = c.relnamespace \
                     where n.nspname = $1 and c.relname = $2 and a.attname = $3 \
                     and not a.attisdropped",
                    &[&table.schema, &table.name, &col.name],
                )
                .await;
            match now {
                Ok(Some(row)) if row.get::<_, String>(0) == col.type_full => {}
                Ok(_) => return true,
                Err(_) => return false,
            }
        }
        false
    }

    /// Applies a batch: each client transaction atomically, in order, committed before this
    /// returns. Runs to completion even if the caller stops waiting (a client that hangs up
    /// must not leave a half-sent transaction on a pooled connection).
    pub async fn apply(&self, ctx: Context, batch: Batch) -> Outcome {
        self.apply_holding(ctx, batch, ()).await
    }

    /// `apply`, keeping `held` until the batch is done, even if the caller stops waiting.
    pub(crate) async fn apply_holding(
        &self,
        ctx: Context,
        batch: Batch,
        held: impl Send + 'static,
    ) -> Outcome {
        let engine = self.clone();
        let n = batch.transactions.len();
        let applying = Applying::new(self.clone());
        let work = async move {
            let _held = (held, applying);
            engine.apply_here(&ctx, &batch).await
        };
        match Finish(Some(Box::pin(AssertUnwindSafe(work).catch_unwind()))).await {
            Ok(outcome) => outcome,
            Err(_) => {
                tracing::error!("applying a request panicked");
                retry_first(n, &self.inner.cfg, "internal error; retry later", false)
            }
        }
    }

    async fn apply_here(&self, ctx: &Context, batch: &Batch) -> Outcome {
        let m = &self.inner.metrics;
        Metrics::add(&m.requests_total, 1);
        let scope = Scope::of(ctx);
        if scope.is_none() {
            Metrics::add(&m.requests_without_client_id_total, 1);
        }
        let outcome = self.apply_scoped(ctx, batch, scope.as_ref()).await;
        for r in &outcome.results {
            let counter = match r {
                TxResult::Success => &m.transactions_applied_total,
                TxResult::FatalError { .. } => &m.transactions_rejected_total,
                TxResult::RetryableError { .. } => &m.retryable_total,
                TxResult::NotAttempted => continue,
            };
            Metrics::add(counter, 1);
        }
        outcome
    }

    async fn apply_scoped(&self, ctx: &Context, batch: &Batch, scope: Option<&Scope>) -> Outcome {
        let cfg = &self.inner.cfg;
        let txs = &batch.transactions;
        let keys: Vec<Option<TxKey>> = match scope {
            Some(_) => txs.iter().map(TxKey::of).collect(),
            None => vec![None; txs.len()],
        };
        let mut schema_retry = true;
        loop {
            let Some(mut catalog) = self.catalog().await else {
                return retry_first(txs.len(), cfg, "database unavailable", true);
            };
            let prepare = |catalog: &Catalog| -> Vec<Result<Vec<RowOp>, Rejection>> {
                txs.iter()
                    .map(|tx| plan::prepare(catalog, tx, cfg, &self.inner.hooks, ctx))
                    .collect()
            };
            let mut prepared = prepare(&catalog);
            let unknown_names = prepared.iter().any(|p| {
                matches!(p, Err(r) if r.code == "SCHEMA_MISMATCH" || unknown_label(&catalog, r))
            });
            // The table, column or enum label may have been created since the catalog was read,
            // or a column that refused a value retyped (int to text, say): rejecting a write
            // that fits the database would lose it.
            if schema_retry
                && (unknown_names || self.retyped(&catalog, &prepared).await)
                && self.refresh_throttled().await
            {
                schema_retry = false;
                if let Some(fresh) = self.catalog().await {
                    prepared = prepare(&fresh);
                    catalog = fresh;
                }
            }
            let req = Req {
                ctx,
                scope,
                txs,
                keys: &keys,
                prepared: &prepared,
            };
            if cfg.planner == Planner::Naive {
                return self.exact_all(&req).await;
            }
            match self.fast(&req, &catalog).await {
                Ok(results) => {
                    return Outcome {
                        results,
                        unavailable: false,
                        maybe_applied: false,
                    }
                }
                Err(f) => match f.disposition() {
                    Disposition::Unavailable => return unavailable(txs.len(), cfg, &f),
                    // Transactions rejected before the failing one must still be answered (and
                    // recorded): the exact path does that, then meets the failure again.
                    Disposition::Temporary | Disposition::RetryHere
                        if prepared.iter().take_while(|p| p.is_err()).count() > 0 =>
                    {
                        return self.exact_all(&req).await;
                    }
                    Disposition::Temporary | Disposition::RetryHere => {
                        return retry_first(txs.len(), cfg, &f.summary(), false)
                    }
                    Disposition::Schema if schema_retry => {
                        schema_retry = false;
                        self.refresh_schema().await.ok();
                    }
                    Disposition::Schema | Disposition::Reject(_) => {
                        Metrics::add(&self.inner.metrics.fast_path_fallbacks_total, 1);
                        return self.exact_all(&req).await;
                    }
                },
            }
        }
    }

    /// The answer for a rejected transaction, with `requires_client_handling` per config.
    fn answer(&self, r: &Rejection) -> TxResult {
        let client_handles = self.inner.cfg.client_handled_codes.contains(&r.code);
        // The ledger replays this answer as stored: the same text both times.
        let mut details = r.details.clone();
        ledger::storable_value(&mut details);
        let message = ledger::storable(&r.message);
        TxResult::FatalError {
            requires_client_handling: client_handles,
            message: message.clone(),
            failed_operation: FailedOperation {
                error_code: ledger::storable(&r.code),
                message,
                details,
                operation_index: r.operation_index,
            },
        }
    }

    /// Whether the transactions after this result are left for a later request.
    fn stops(&self, r: &TxResult) -> bool {
        match r {
            TxResult::Success => false,
            TxResult::FatalError {
                requires_client_handling,
                ..
            } => *requires_client_handling || self.inner.cfg.on_fatal == OnFatal::Stop,
            TxResult::RetryableError { .. } | TxResult::NotAttempted => true,
        }
    }

    /// What to do with transaction `i` given the ledger's decisions.
    fn plan_tx<'r>(
        &self,
        req: &Req<'r>,
        i: usize,
        decided: &HashMap<String, Decided>,
        tally: &mut Tally,
    ) -> TxPlan<'r> {
        if let Some(key) = &req.keys[i] {
            if let Some(d) = decided.get(&key.id) {
                if d.fingerprint == key.fingerprint {
                    tally.replayed += 1;
                    return TxPlan::Replay(d.outcome.clone());
                }
                tally.conflicts += 1;
                tracing::warn!(
                    client_id = req.ctx.client_id.as_deref().unwrap_or(""),
                    "transaction id resent with different content"
                );
                return TxPlan::Reject {
                    rejection: Rejection::new(
                        "IDEMPOTENCY_CONFLICT",
                        format!(
                            "transaction {} was already decided with different content",
                            key.id
                        ),
                        json!({ "transaction_id": key.id }),
                    ),
                    // The ledger keeps the first decision; the conflicting one is only recorded
                    // as a rejection.
                    ledger: false,
                };
            }
        }
        match &req.prepared[i] {
            Ok(ops) => TxPlan::Apply(ops),
            Err(r) => TxPlan::Reject {
                rejection: r.clone(),
                ledger: true,
            },
        }
    }

    /// The writes that record a decision: a rejections row (unless the client handles it) and
    /// a ledger entry (collected by the caller into one insert).
    fn record(
        &self,
        req: &Req<'_>,
        i: usize,
        rejection: &Rejection,
        ledger: bool,
    ) -> (TxResult, Option<Stmt<'static>>, Option<(usize, TxResult)>) {
        let answer = self.answer(rejection);
        if matches!(
            answer,
            TxResult::FatalError {
                requires_client_handling: true,
                ..
            }
        ) {
            return (answer, None, None);
        }
        let params = ledger::rejection_params(req.ctx, &req.txs[i], rejection);
        // Without a ledger entry (a conflict with the ledger's), the resends are answered the
        // same way again: the rejection is recorded once.
        let sql = if ledger {
            self.inner.tables.reject_sql()
        } else {
            self.inner.tables.reject_once_sql()
        };
        let stmt = Stmt {
            sql,
            params: params.into_iter().map(Param::Text).collect(),
            ops: Vec::new(),
            expect: Expect::Any,
        };
        let entry = ledger.then(|| (i, answer.clone()));
        (answer, Some(stmt), entry)
    }

    /// Runs the data statements as the configured role, so that its privileges and row-level
    /// security policies apply. The role switch is pipelined like the statements (no round
    /// trip of its own) and undone before crudgate's bookkeeping, which the role need not be
    /// allowed to write.
    fn as_role<'a>(&self, data: Vec<Stmt<'a>>) -> Vec<Stmt<'a>> {
        let Some(role) = &self.inner.cfg.rls.role else {
            return data;
        };
        if data.is_empty() {
            return data;
        }
        let stmt = |sql: String| Stmt {
            sql,
            params: Vec::new(),
            ops: Vec::new(),
            expect: Expect::Any,
        };
        let mut out = Vec::with_capacity(data.len() + 2);
        out.push(stmt(format!("set local role {}", quote_ident(role))));
        out.extend(data);
        out.push(stmt("reset role".to_owned()));
        out
    }

    /// One insert for all ledger entries of a database transaction.
    fn ledger_insert(&self, req: &Req<'_>, entries: &[(usize, TxResult)]) -> Option<Stmt<'static>> {
        Some(ledger_rows(req, entries)?.into_stmt(&self.inner.tables))
    }

    /// The fast path, in a group commit when the request is small.
    async fn fast(&self, req: &Req<'_>, catalog: &Catalog) -> Result<Vec<TxResult>, Failure> {
        let mut failed = None;
        if self.groupable(req, catalog) {
            match self.grouped(req).await {
                group::Laned::Answered(done) => return done,
                group::Laned::Alone(f) => failed = f,
            }
        }
        // A lone attempt in a lane counts as the first; one that met a decided transaction id
        // goes straight to reading the ledger.
        let decided = failed.as_ref().is_some_and(Failure::already_decided);
        let failed = failed.filter(|_| !decided);
        self.with_retries_after(failed, || self.fast_attempt(req, decided))
            .await
    }

    /// The fast path: every transaction up to the first stopping point, in one database
    /// transaction.
    ///
    /// Nearly every request is new, so the ledger is not read first (that would cost a round
    /// trip): the client's lock and the ledger insert travel in the one pipeline with the
    /// data. A transaction id decided before fails that insert (the ledger's primary key),
    /// which rolls the attempt back whole; only then is it made again, reading the ledger.
    async fn fast_attempt(
        &self,
        req: &Req<'_>,
        read_ledger: bool,
    ) -> Result<Vec<TxResult>, Failure> {
        let client = self.connection().await?;
        match self.fast_try(&client, req, read_ledger).await {
            Err(f) if req.scope.is_some() && !read_ledger && f.already_decided() => {
                self.fast_try(&client, req, true).await
            }
            done => done,
        }
    }

    /// One fast attempt; `read_ledger` reads the client's decisions before planning.
    async fn fast_try(
        &self,
        client: &Client,
        req: &Req<'_>,
        read_ledger: bool,
    ) -> Result<Vec<TxResult>, Failure> {
        let ids: Vec<String> = req.keys.iter().flatten().map(|k| k.id.clone()).collect();
        let lookup = req
            .scope
            .filter(|_| read_ledger)
            .map(|s| (s, ids.as_slice()));
        let pipelined_lock = req
            .scope
            .filter(|_| !read_ledger)
            .map(|s| pipelined_locks(vec![s.lock_key]));
        let (results, tally) = self
            .attempt(client, req.ctx, Mode::Fast, lookup, |decided| {
                self.fast_plan(req, decided, pipelined_lock)
            })
            .await?;
        tally.count(&self.inner.metrics);
        Ok(results)
    }

    /// The fast path's statements and answers: every transaction up to the first stopping
    /// point, given the ledger's decisions and the client's lock (when it is pipelined).
    fn fast_plan<'r>(
        &self,
        req: &Req<'r>,
        decided: HashMap<String, Decided>,
        lock: Option<Stmt<'static>>,
    ) -> (Vec<Stmt<'r>>, (Vec<TxResult>, Tally)) {
        let plan = self.decide(req, decided);
        let mut stmts: Vec<Stmt> = lock.into_iter().collect();
        stmts.extend(self.as_role(plan::bulk(plan.ops(), &self.inner.cfg)));
        stmts.extend(plan.writes);
        stmts.extend(self.ledger_insert(req, &plan.entries));
        (stmts, (plan.results, plan.tally))
    }

    /// What the fast path does with each transaction: apply it, record its rejection, or
    /// answer it again; up to the first stopping point.
    fn decide<'r>(&self, req: &Req<'r>, mut decided: HashMap<String, Decided>) -> Decisions<'r> {
        let mut plan = Decisions {
            results: vec![TxResult::NotAttempted; req.txs.len()],
            tally: Tally::default(),
            runnable: Vec::new(),
            writes: Vec::new(),
            entries: Vec::new(),
        };
        #[allow(clippy::needless_range_loop)] // `i` also indexes the request's other slices
        for i in 0..req.txs.len() {
            let answer = match self.plan_tx(req, i, &decided, &mut plan.tally) {
                TxPlan::Apply(ops) => {
                    plan.runnable.push((i, ops));
                    plan.entries.push((i, TxResult::Success));
                    TxResult::Success
                }
                TxPlan::Reject { rejection, ledger } => {
                    let (answer, write, entry) = self.record(req, i, &rejection, ledger);
                    plan.writes.extend(write);
                    plan.entries.extend(entry);
                    answer
                }
                TxPlan::Replay(r) => r,
            };
            // A transaction id repeated within this request is a replay (or a conflict)
            // of the decision just made, as it would be in a later request.
            if let Some(k) = &req.keys[i] {
                if plan.entries.last().is_some_and(|(j, _)| *j == i) {
                    let d = Decided {
                        fingerprint: k.fingerprint.clone(),
                        outcome: answer.clone(),
                    };
                    decided.insert(k.id.clone(), d);
                }
            }
            let stop = self.stops(&answer);
            plan.results[i] = answer;
            if stop {
                break;
            }
        }
        plan
    }

    /// The exact path: one database transaction per client transaction, one statement per
    /// operation, so that a failure names its operation.
    async fn exact_all(&self, req: &Req<'_>) -> Outcome {
        let cfg = &self.inner.cfg;
        let mut results = vec![TxResult::NotAttempted; req.txs.len()];
        let mut committed_any = false;
        #[allow(clippy::needless_range_loop)] // `i` also indexes the request's other slices
        for i in 0..req.txs.len() {
            let mut res = self
                .with_retries(|| self.exact_attempt(req, i, None, Mode::Exact))
                .await;
            if res.as_ref().is_err_and(Failure::rejected_at_commit) {
                // A deferred constraint failed at COMMIT: once more with every constraint
                // checked per statement, to name the operation.
                res = self
                    .with_retries(|| self.exact_attempt(req, i, None, Mode::Checked))
                    .await;
            }
            let answer = match res {
                Ok(r) => r,
                Err(f) => match f.disposition() {
                    Disposition::Unavailable if !committed_any => {
                        return unavailable(req.txs.len(), cfg, &f);
                    }
                    Disposition::Reject(code) if f.op_failed() => {
                        let r = self.rejection(code, &f, req, i).await;
                        self.record_rejection(req, i, r).await
                    }
                    Disposition::Schema if f.op_failed() => {
                        self.refresh_throttled().await;
                        let r = self.rejection("SCHEMA_MISMATCH", &f, req, i).await;
                        self.record_rejection(req, i, r).await
                    }
                    _ => retryable(cfg, &f.summary()),
                },
            };
            committed_any = true;
            let stop = self.stops(&answer);
            if let TxResult::FatalError {
                failed_operation, ..
            } = &answer
            {
                tracing::info!(
                    tx = i,
                    code = %failed_operation.error_code,
                    op = failed_operation.operation_index,
                    client_id = req.ctx.client_id.as_deref().unwrap_or(""),
                    "transaction rejected"
                );
            }
            results[i] = answer;
            if stop {
                break;
            }
        }
        Outcome {
            results,
            unavailable: false,
            maybe_applied: false,
        }
    }

    /// Records a rejection found by running the transaction (which was rolled back).
    async fn record_rejection(&self, req: &Req<'_>, i: usize, r: Rejection) -> TxResult {
        let r = Some(r);
        match self
            .with_retries(|| self.exact_attempt(req, i, r.clone(), Mode::Exact))
            .await
        {
            Ok(answer) => answer,
            Err(f) => retryable(&self.inner.cfg, &f.summary()),
        }
    }

    /// One client transaction in its own database transaction; with `rejected`, only record
    /// that rejection (unless the ledger shows the transaction was decided meanwhile).
    async fn exact_attempt(
        &self,
        req: &Req<'_>,
        i: usize,
        rejected: Option<Rejection>,
        mode: Mode,
    ) -> Result<TxResult, Failure> {
        let cfg = &self.inner.cfg;
        let mode = match (cfg.planner, mode) {
            (Planner::Naive, Mode::Exact) => Mode::Sequential,
            (_, mode) => mode,
        };
        let client = self.connection().await?;
        let ids: Vec<String> = req.keys[i].iter().map(|k| k.id.clone()).collect();
        let lookup = req.scope.map(|s| (s, ids.as_slice()));
        let (answer, tally) = self
            .attempt(&client, req.ctx, mode, lookup, |decided| {
                let mut tally = Tally::default();
                let plan = match (self.plan_tx(req, i, &decided, &mut tally), rejected) {
                    (TxPlan::Apply(_), Some(rejection)) => TxPlan::Reject {
                        rejection,
                        ledger: true,
                    },
                    (plan, _) => plan,
                };
                let mut stmts = Vec::new();
                let mut entries = Vec::new();
                let answer = match plan {
                    TxPlan::Apply(ops) => {
                        stmts = self.as_role(plan::one_per_op(i, ops, cfg));
                        entries.push((i, TxResult::Success));
                        TxResult::Success
                    }
                    TxPlan::Reject { rejection, ledger } => {
                        let (answer, write, entry) = self.record(req, i, &rejection, ledger);
                        stmts.extend(write);
                        entries.extend(entry);
                        answer
                    }
                    TxPlan::Replay(r) => r,
                };
                stmts.extend(self.ledger_insert(req, &entries));
                (stmts, (answer, tally))
            })
            .await?;
        tally.count(&self.inner.metrics);
        Ok(answer)
    }

    async fn connection(&self) -> Result<Client, Failure> {
        self.inner.pool.get().await.map_err(|e| {
            tracing::warn!(error = %e, "no database connection");
            match e {
                PoolError::Timeout(TimeoutType::Wait) => Failure::pool_busy(),
                _ => Failure::no_connection(),
            }
        })
    }

    /// Runs an attempt, retrying serialization failures and deadlocks with jittered back-off,
    /// and a lost connection once on a fresh one.
    async fn with_retries<T, F, Fut>(&self, attempt: F) -> Result<T, Failure>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        self.with_retries_after(None, attempt).await
    }

    /// `with_retries`, when a first attempt was made elsewhere and failed with `failed`.
    async fn with_retries_after<T, F, Fut>(
        &self,
        mut failed: Option<Failure>,
        attempt: F,
    ) -> Result<T, Failure>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        let cfg = &self.inner.cfg;
        let mut tries = 0;
        let mut reconnected = false;
        loop {
            let Some(f) = failed.take() else {
                match attempt().await {
                    Ok(v) => return Ok(v),
                    Err(f) => failed = Some(f),
                }
                continue;
            };
            tries += 1;
            match f.disposition() {
                Disposition::RetryHere if tries < cfg.max_attempts => {
                    let base = 5u64 << tries.min(6);
                    let ms = rand::thread_rng().gen_range(base / 2..=base * 3 / 2);
                    tracing::debug!(tries, ms, "serialization failure or deadlock; retrying");
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                // A pooled connection may have died with a restarted server: one more try on a
                // fresh connection, but only when COMMIT cannot have been processed.
                Disposition::Unavailable
                    if !reconnected && !f.commit_maybe_sent && !f.pool_busy =>
                {
                    reconnected = true;
                    self.inner.pool.retain(|_, _| false);
                }
                _ => return Err(f),
            }
        }
    }

    /// One database transaction: BEGIN (with the client's lock and ledger lookup when there
    /// is a scope, awaited), then the statements `build` makes from the ledger's decisions,
    /// then COMMIT.
    async fn attempt<'s, T>(
        &self,
        client: &Client,
        ctx: &Context,
        mode: Mode,
        lookup: Option<(&Scope, &[String])>,
        build: impl FnOnce(HashMap<String, Decided>) -> (Vec<Stmt<'s>>, T),
    ) -> Result<T, Failure> {
        let head = Head::prepare(
            client,
            ctx,
            mode,
            lookup.map(|l| l.0),
            &self.inner.tables,
            &self.inner.cfg.rls,
        )
        .await?;
        let mut decided = HashMap::new();
        let head_sent = if let Some((scope, ids)) = lookup {
            let lookup_stmt = head.lookup.as_ref().expect("prepared with a scope");
            let ids: Vec<String> = ids.to_vec();
            let mut futs = head.futures(client, scope);
            let lookup_params: [&(dyn ToSql + Sync); 3] = [&scope.user_id, &scope.client_id, &ids];
            let rows_fut = client.query(lookup_stmt, &lookup_params);
            let (heads, rows) = futures::join!(join_all(futs.drain(..)), rows_fut);
            if let Some(e) = heads.into_iter().find_map(Result::err) {
                let _ = client.batch_execute("rollback").await;
                return Err(Failure::at(None, e, false));
            }
            let rows = match rows {
                Ok(rows) => rows,
                Err(e) => {
                    let _ = client.batch_execute("rollback").await;
                    return Err(Failure::at(None, e, false));
                }
            };
            for row in rows {
                let outcome: Option<TxResult> = serde_json::from_str(row.get::<_, &str>(2)).ok();
                if let Some(outcome) = outcome {
                    decided.insert(
                        row.get::<_, String>(0),
                        Decided {
                            fingerprint: row.get(1),
                            outcome,
                        },
                    );
                }
            }
            true
        } else {
            false
        };
        let (stmts, value) = build(decided);
        run(client, &head, head_sent, &stmts, mode).await?;
        Ok(value)
    }

    /// Builds the rejection for a failed exact-path transaction, in the client's names.
    async fn rejection(&self, code: &str, f: &Failure, req: &Req<'_>, i: usize) -> Rejection {
        let ops = req.prepared[i].as_deref().unwrap_or(&[]);
        let op_index = f.op.map(|o| o.op).unwrap_or(0);
        let op = ops.get(op_index);
        let table = req.txs[i]
            .crud
            .get(op_index)
            .map(|o| o.table.clone())
            .unwrap_or_default();
        let key = op.map(|o| o.key.as_str()).unwrap_or("");
        if f.guard {
            tracing::info!(table = %table, "operation on a row of another owner refused");
            return Rejection {
                code: code.to_owned(),
                message: format!("row {key:?} of table {table:?} belongs to another user"),
                details: json!({ "table": table, "reason": "owner" }),
                operation_index: op_index,
            };
        }
        let Some(db) = f.db_error() else {
            return Rejection {
                code: code.to_owned(),
                message: format!("row {key:?} of table {table:?} does not exist"),
                details: json!({ "table": table }),
                operation_index: op_index,
            };
        };
        let sqlstate = db.code().code();
        let mut details = Map::new();
        details.insert("sqlstate".into(), sqlstate.into());
        details.insert("table".into(), table.clone().into());
        // Postgres names server columns; the client knows its own names.
        let client_column = |name: &str| match op {
            Some(o) => o
                .table
                .column(name)
                .map_or_else(|| name.to_owned(), |c| o.access.client_name(c).to_owned()),
            None => name.to_owned(),
        };
        if let Some(c) = db.column() {
            details.insert("column".into(), client_column(c).into());
        }
        // Postgres' DETAIL names key values for a foreign key or unique violation: the
        // sender's own. Elsewhere it can show what the sender may not see: the whole failing
        // row, with columns the rules hide (NOT NULL, CHECK), or another row's values (an
        // exclusion conflict). Those go to no client.
        let detail = db
            .detail()
            .filter(|_| matches!(sqlstate, "23503" | "23505"));
        for (k, v) in [("constraint", db.constraint()), ("detail", detail)] {
            if let Some(v) = v {
                details.insert(k.into(), v.into());
            }
        }
        let message = if sqlstate.starts_with("22") {
            // Postgres' own message repeats the value; name the column and type instead.
            match self.find_bad_column(op).await {
                Some((column, ty)) => {
                    details.insert("column".into(), column.clone().into());
                    details.insert("expected_type".into(), ty.clone().into());
                    format!("invalid value for column {table:?}.{column:?}: expected {ty}")
                }
                None => format!(
                    "invalid data for table {table:?}: {}",
                    data_condition(sqlstate)
                ),
            }
        } else if sqlstate == "42501" {
            // Postgres' message names the server table (and policy).
            format!(
                "{} on table {table:?} is not permitted (privileges or row-level security)",
                op.map_or("operation", |o| o.kind.as_str())
            )
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

    /// Casts each value of a rejected operation on its own to find the one Postgres refused;
    /// answers with the client's column name.
    async fn find_bad_column(&self, op: Option<&RowOp>) -> Option<(String, String)> {
        let op = op?;
        let client = self.inner.pool.get().await.ok()?;
        let t = &op.table;
        let candidates = std::iter::once((t.pk, Some(op.key.clone())))
            .chain(op.cols.iter().copied().zip(op.vals.iter().cloned()));
        for (c, v) in candidates {
            let col = &t.columns[c];
            if matches!(
                col.kind,
                Kind::Bool | Kind::Uuid | Kind::Enum(_) | Kind::Json
            ) {
                continue;
            }
            let Some(v) = v else { continue };
            if let Err(e) = probe(&client, &col.type_full, &v).await {
                if e.code().is_some_and(|c| c.code().starts_with("22")) {
                    return Some((op.access.client_name(c).to_owned(), col.type_name.clone()));
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
    r.code == "INVALID_DATA"
        && rejected_column(catalog, r).is_some_and(|(a, c)| has_enum(&a.table.columns[c].kind))
}

/// The column a rejection names (in its details, by the client's names), if it still exists.
fn rejected_column<'c>(catalog: &'c Catalog, r: &Rejection) -> Option<(&'c Arc<Access>, usize)> {
    let access = catalog.access(r.details.get("table")?.as_str()?).ok()?;
    let c = access.column(r.details.get("column")?.as_str()?)?;
    Some((access, c))
}

/// Assigns a value to a column's full type (with its length or precision) the way an INSERT
/// would, so that overlong text fails too.
async fn probe(client: &Client, type_full: &str, v: &str) -> Result<(), tokio_postgres::Error> {
    let sql = format!(
        "do $probe$ declare x {type_full}; begin x := current_setting('crudgate.probe')::text; end $probe$"
    );
    client
        .execute("select set_config('crudgate.probe', $1, false)", &[&v])
        .await?;
    let result = client.batch_execute(&sql).await;
    // Leave no client value behind on a pooled connection.
    client.batch_execute("reset crudgate.probe").await?;
    result
}

/// Polls a future where it is awaited, and if it is dropped before it finishes (the client hung
/// up), spawns the rest: an attempt must never stop halfway through its pipeline on a pooled
/// connection. (Spawning every apply would cost two task hand-offs per request, about 30 µs of
/// a single-row request's 400 here.)
struct Finish<F: Future + Send + 'static>(Option<Pin<Box<F>>>)
where
    F::Output: Send + 'static;

impl<F: Future + Send + 'static> Future for Finish<F>
where
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<F::Output> {
        let work = self.0.as_mut().expect("not polled after it finished");
        let out = std::task::ready!(work.as_mut().poll(cx));
        self.0 = None;
        Poll::Ready(out)
    }
}

impl<F: Future + Send + 'static> Drop for Finish<F>
where
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        if let (Some(work), Ok(runtime)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            runtime.spawn(work);
        }
    }
}

/// Replays and conflicts met while planning an attempt; counted only once that attempt has
/// committed, so retries and the exact path's replay of a request do not count them twice.
#[derive(Default)]
struct Tally {
    replayed: u64,
    conflicts: u64,
}

impl Tally {
    fn count(&self, m: &Metrics) {
        Metrics::add(&m.transactions_replayed_total, self.replayed);
        Metrics::add(&m.idempotency_conflicts_total, self.conflicts);
    }
}

/// The fast path's decisions for a request (see `Engine::decide`).
struct Decisions<'r> {
    results: Vec<TxResult>,
    tally: Tally,
    /// The transactions to apply, with their operations.
    runnable: Vec<(usize, &'r [RowOp])>,
    /// Rejections to record.
    writes: Vec<Stmt<'static>>,
    /// The ledger's new entries.
    entries: Vec<(usize, TxResult)>,
}

impl<'r> Decisions<'r> {
    /// The operations to apply, in order.
    fn ops(&self) -> impl Iterator<Item = (OpRef, &'r RowOp)> + '_ {
        self.runnable.iter().flat_map(|&(tx, ops)| {
            ops.iter()
                .enumerate()
                .map(move |(op, row)| (OpRef { tx, op }, row))
        })
    }
}

/// The request being applied, shared by its attempts.
struct Req<'a> {
    ctx: &'a Context,
    scope: Option<&'a Scope>,
    txs: &'a [Transaction],
    keys: &'a [Option<TxKey>],
    prepared: &'a [Result<Vec<RowOp>, Rejection>],
}

enum TxPlan<'a> {
    Apply(&'a [RowOp]),
    /// Rejected before any SQL, or an idempotency conflict: record it and answer fatal.
    Reject {
        rejection: Rejection,
        ledger: bool,
    },
    /// Decided before: the same answer again, nothing applied.
    Replay(TxResult),
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

/// The statements every transaction starts with, prepared.
struct Head {
    immediate: bool,
    /// In a group commit's lane (see `group`): its BEGIN, which makes locks and statements
    /// wait briefly.
    lane: Option<String>,
    /// Hands the caller's identity to row-level security, with its parameters.
    identity: Option<(tokio_postgres::Statement, Vec<String>)>,
    lock: Option<tokio_postgres::Statement>,
    lookup: Option<tokio_postgres::Statement>,
}

/// The statement that hands the verified identity to Postgres (transaction-local settings),
/// with its parameters; none without a user or with both settings off.
fn identity_sql(rls: &RlsConfig, ctx: &Context) -> Option<(String, Vec<String>)> {
    let user = ctx.user_id.as_ref()?;
    let mut sets = Vec::new();
    let mut params = Vec::new();
    if rls.app_user_id {
        params.push(user.clone());
        sets.push(format!(
            "set_config('app.user_id', ${}, true)",
            params.len()
        ));
    }
    if rls.jwt_claims {
        params.push(ctx.claims.to_string());
        sets.push(format!(
            "set_config('request.jwt.claims', ${}, true)",
            params.len()
        ));
    }
    (!sets.is_empty()).then(|| (format!("select {}", sets.join(", ")), params))
}
const LOCK: &str = "select pg_advisory_xact_lock($1)";

/// The locks of clients (see `Scope::lock_key`) as one more statement of the pipeline: one
/// client's, or those of a group's members, taken in order.
fn pipelined_locks(keys: Vec<i64>) -> Stmt<'static> {
    Stmt {
        sql: "select pg_advisory_xact_lock(k) from unnest($1::bigint[]) as k".to_owned(),
        params: vec![Param::Ints(keys.into_iter().map(Some).collect())],
        ops: Vec::new(),
        expect: Expect::Any,
    }
}

/// Ledger entries of one user, to be written by one statement: a request's, or those of a
/// group's members of one caller, whatever their clients.
struct LedgerRows {
    user_id: String,
    client_ids: Vec<Option<String>>,
    tx_ids: Vec<Option<String>>,
    fingerprints: Vec<Option<String>>,
    outcomes: Vec<Option<String>>,
}

/// The ledger entries of a request's decided transactions that have an id under a client id.
fn ledger_rows(req: &Req<'_>, entries: &[(usize, TxResult)]) -> Option<LedgerRows> {
    let scope = req.scope?;
    let mut rows = LedgerRows {
        user_id: scope.user_id.clone(),
        client_ids: Vec::new(),
        tx_ids: Vec::new(),
        fingerprints: Vec::new(),
        outcomes: Vec::new(),
    };
    for (i, result) in entries {
        let Some(key) = &req.keys[*i] else { continue };
        rows.client_ids.push(Some(scope.client_id.clone()));
        rows.tx_ids.push(Some(key.id.clone()));
        rows.fingerprints.push(Some(key.fingerprint.clone()));
        // Answers are made storable once, where they are made (`answer`).
        rows.outcomes.push(Some(
            serde_json::to_string(result).expect("results serialize"),
        ));
    }
    (!rows.tx_ids.is_empty()).then_some(rows)
}

impl LedgerRows {
    /// Adds another's entries; both are the same user's.
    fn append(&mut self, other: LedgerRows) {
        debug_assert_eq!(self.user_id, other.user_id);
        self.client_ids.extend(other.client_ids);
        self.tx_ids.extend(other.tx_ids);
        self.fingerprints.extend(other.fingerprints);
        self.outcomes.extend(other.outcomes);
    }

    fn into_stmt(self, tables: &Tables) -> Stmt<'static> {
        Stmt {
            sql: tables.insert_sql(),
            params: vec![
                Param::Text(Some(self.user_id)),
                Param::Texts(self.client_ids),
                Param::Texts(self.tx_ids),
                Param::Texts(self.fingerprints),
                Param::Texts(self.outcomes),
            ],
            ops: Vec::new(),
            expect: Expect::Any,
        }
    }
}

impl Head {
    async fn prepare(
        client: &Client,
        ctx: &Context,
        mode: Mode,
        scope: Option<&Scope>,
        tables: &Tables,
        rls: &RlsConfig,
    ) -> Result<Head, Failure> {
        let prep = |sql: String| async move {
            client
                .prepare_cached(&sql)
                .await
                .map_err(|e| Failure::at(None, e, false))
        };
        Ok(Head {
            immediate: mode == Mode::Checked,
            lane: None,
            identity: match identity_sql(rls, ctx) {
                Some((sql, params)) => Some((prep(sql).await?, params)),
                None => None,
            },
            lock: match scope {
                Some(_) => Some(prep(LOCK.to_owned()).await?),
                None => None,
            },
            lookup: match scope {
                Some(_) => Some(prep(tables.lookup_sql()).await?),
                None => None,
            },
        })
    }

    /// A lane's transaction: the statements carry each member's identity and lock.
    fn lane(cfg: &EngineConfig) -> Head {
        Head {
            immediate: false,
            lane: Some(group::lane_begin(cfg)),
            identity: None,
            lock: None,
            lookup: None,
        }
    }

    fn futures<'a>(
        &'a self,
        client: &'a Client,
        scope: &'a Scope,
    ) -> Vec<BoxFuture<'a, Result<u64, tokio_postgres::Error>>> {
        let mut out = self.begin(client);
        if let Some(lock) = &self.lock {
            out.push(
                async move { client.query(lock, &[&scope.lock_key]).await.map(|_| 0) }.boxed(),
            );
        }
        out
    }

    fn begin<'a>(
        &'a self,
        client: &'a Client,
    ) -> Vec<BoxFuture<'a, Result<u64, tokio_postgres::Error>>> {
        let begin = self.lane.as_deref().unwrap_or("begin");
        let mut out = vec![client.batch_execute(begin).map(|r| r.map(|_| 0)).boxed()];
        if self.immediate {
            out.push(
                client
                    .batch_execute("set constraints all immediate")
                    .map(|r| r.map(|_| 0))
                    .boxed(),
            );
        }
        if let Some((st, params)) = &self.identity {
            let params: Vec<&(dyn ToSql + Sync)> =
                params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
            out.push(async move { client.query(st, &params).await.map(|_| 0) }.boxed());
        }
        out
    }
}

/// Sends the statements (after BEGIN unless the head was sent already) and COMMIT.
async fn run(
    client: &Client,
    head: &Head,
    head_sent: bool,
    stmts: &[Stmt<'_>],
    mode: Mode,
) -> Result<(), Failure> {
    let mut prepared = Vec::with_capacity(stmts.len());
    for (i, r) in join_all(stmts.iter().map(|s| client.prepare_cached(&s.sql)))
        .await
        .into_iter()
        .enumerate()
    {
        match r {
            Ok(st) => prepared.push(st),
            Err(e) => {
                if head_sent {
                    let _ = client.batch_execute("rollback").await;
                }
                return Err(Failure::at(Some((i, stmts)), e, false));
            }
        }
    }
    let params: Vec<Vec<&(dyn ToSql + Sync)>> = stmts
        .iter()
        .map(|s| s.params.iter().map(Param::as_sql).collect())
        .collect();
    // COMMIT goes in the same pipeline unless row counts must be checked first. If a statement
    // fails, Postgres answers that COMMIT with a rollback, so nothing partial is ever kept.
    let check_rows = stmts.iter().any(|s| matches!(s.expect, Expect::Rows(_)));
    let commit_in_pipeline = !check_rows && mode != Mode::Sequential;

    let head_futs = if head_sent {
        Vec::new()
    } else {
        head.begin(client)
    };
    let head_len = head_futs.len();
    let results: Vec<Result<u64, tokio_postgres::Error>> = if mode == Mode::Sequential {
        let mut out = Vec::new();
        for f in head_futs {
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
        let mut all = head_futs;
        for (st, p) in prepared.iter().zip(&params) {
            all.push(client.execute(st, p).boxed());
        }
        if commit_in_pipeline {
            all.push(client.batch_execute("commit").map(|r| r.map(|_| 0)).boxed());
        }
        join_all(all).await
    };

    let mut failure = None;
    for (i, r) in results.into_iter().enumerate() {
        let stmt = i.checked_sub(head_len).filter(|&s| s < stmts.len());
        match r {
            Err(e) => {
                failure = Some(Failure::at(stmt.map(|s| (s, stmts)), e, commit_in_pipeline));
                break;
            }
            Ok(rows) => {
                if let Some(s) = stmt {
                    if matches!(stmts[s].expect, Expect::Rows(want) if rows < want) {
                        failure = Some(Failure {
                            op: stmts[s].ops.first().copied(),
                            ..Failure::no_connection()
                        });
                        break;
                    }
                }
            }
        }
    }
    if let Some(f) = failure {
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
            .map_err(|e| Failure::at(None, e, true))?;
    }
    Ok(())
}

/// A failed attempt: which operation (if a statement of operations failed) and why.
#[derive(Debug)]
struct Failure {
    op: Option<OpRef>,
    /// A statement of crudgate's own (ledger, rejections) failed.
    bookkeeping: bool,
    /// An ownership guard found a row of another owner.
    guard: bool,
    error: Option<tokio_postgres::Error>,
    /// COMMIT was sent, so the transaction may have been committed.
    commit_maybe_sent: bool,
    /// Every pooled connection was busy for `connect_timeout_ms`: the database is fine, so
    /// neither the pool is emptied nor the wait repeated.
    pool_busy: bool,
}

impl Failure {
    fn no_connection() -> Self {
        Failure {
            op: None,
            bookkeeping: false,
            guard: false,
            error: None,
            commit_maybe_sent: false,
            pool_busy: false,
        }
    }

    fn pool_busy() -> Self {
        Failure {
            pool_busy: true,
            ..Failure::no_connection()
        }
    }

    /// A group's connection was lost with its COMMIT sent.
    fn commit_lost() -> Self {
        Failure {
            commit_maybe_sent: true,
            ..Failure::no_connection()
        }
    }

    fn at(
        stmt: Option<(usize, &[Stmt<'_>])>,
        e: tokio_postgres::Error,
        commit_maybe_sent: bool,
    ) -> Self {
        let op = stmt.and_then(|(s, stmts)| stmts[s].ops.first().copied());
        // A guard fails by dividing by zero, and only then; any other error of it (a lost
        // connection) keeps its own meaning.
        let guard = stmt.is_some_and(|(s, stmts)| stmts[s].expect == Expect::Guard)
            && e.as_db_error().is_some_and(|d| d.code().code() == "22012");
        Failure {
            op,
            bookkeeping: stmt.is_some() && op.is_none(),
            guard,
            error: Some(e),
            commit_maybe_sent,
            pool_busy: false,
        }
    }

    /// Rejected by the database at COMMIT (a deferred constraint).
    fn rejected_at_commit(&self) -> bool {
        self.op.is_none()
            && !self.bookkeeping
            && self.error.is_some()
            // A schema error at COMMIT (a deferred trigger calling a function that does not
            // exist) is found the same way, then rejected as SCHEMA_MISMATCH.
            && matches!(self.disposition(), Disposition::Reject(_) | Disposition::Schema)
    }

    /// A lane's lock or statement timeout ended the attempt (see `group::lane_begin`): it
    /// says nothing about the request, which is then applied alone as if for the first time.
    fn cut_short_by_lane(&self) -> bool {
        self.db_error()
            .is_some_and(|d| matches!(d.code().code(), "55P03" | "57014"))
    }

    /// The ledger already holds one of the attempt's transaction ids (its insert, the only
    /// bookkeeping that can break a unique key, failed).
    fn already_decided(&self) -> bool {
        self.bookkeeping && self.db_error().is_some_and(|d| d.code().code() == "23505")
    }

    /// A statement applying client operations failed (so the failure names an operation).
    fn op_failed(&self) -> bool {
        self.op.is_some()
    }

    fn disposition(&self) -> Disposition {
        if self.guard {
            return Disposition::Reject("UNAUTHORIZED");
        }
        match (&self.error, self.op) {
            // Our own bookkeeping failing is never the client's fault.
            (Some(e), _) if self.bookkeeping => match classify_error(e) {
                d @ (Disposition::Unavailable | Disposition::RetryHere) => d,
                _ => {
                    // The client will be told to retry: an operator must be able to see why.
                    tracing::warn!(
                        sqlstate = e.code().map_or("", |c| c.code()),
                        "crudgate's own bookkeeping (ledger or rejections) failed"
                    );
                    Disposition::Temporary
                }
            },
            (Some(e), _) => classify_error(e),
            // A statement that touched fewer rows than it had to (PATCH of a missing row).
            (None, Some(_)) => Disposition::Reject("ROW_NOT_FOUND"),
            (None, None) => Disposition::Unavailable,
        }
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

fn retryable(cfg: &EngineConfig, message: &str) -> TxResult {
    TxResult::RetryableError {
        message: message.to_owned(),
        retry_after_ms: cfg.retry_after_ms,
    }
}

/// The first transaction to retry and the rest not attempted; `unavailable` when the database
/// could not be reached before anything was applied (answered 503).
fn retry_first(n: usize, cfg: &EngineConfig, message: &str, unavailable: bool) -> Outcome {
    let mut results = vec![TxResult::NotAttempted; n];
    if let Some(first) = results.first_mut() {
        *first = retryable(cfg, message);
    }
    Outcome {
        results,
        unavailable,
        maybe_applied: false,
    }
}

/// The database went away before anything was known to be applied.
fn unavailable(n: usize, cfg: &EngineConfig, f: &Failure) -> Outcome {
    if f.commit_maybe_sent {
        Outcome {
            maybe_applied: true,
            ..retry_first(n, cfg, "database connection lost while committing", true)
        }
    } else {
        retry_first(n, cfg, "database unavailable", true)
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
