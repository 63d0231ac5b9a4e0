//! Typed configuration. Every key has a default so that an empty TOML file is a valid
//! configuration; `crudgate.example.toml` at the repository root documents each key.

use std::time::Duration;

use serde::Deserialize;

/// What to do with the rest of a request once a client transaction is rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnFatal {
    /// Stop: later transactions are `not_attempted` (the reference default).
    #[default]
    Stop,
    /// Skip the rejected transaction and apply the ones after it.
    Skip,
}

/// What a PATCH of a row that does not exist means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PatchMissing {
    /// Success with no effect: a delete won the race, and the client will learn it on sync.
    #[default]
    Ignore,
    /// Reject the transaction with `ROW_NOT_FOUND`.
    Reject,
}

/// How clients encode `bytea` values (SQLite has no binary type in the JSON queue).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ByteaEncoding {
    #[default]
    Base64,
    Hex,
}

/// How operations become SQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Planner {
    /// Bulk statements over many rows, one database transaction per request when all goes well.
    #[default]
    Bulk,
    /// One statement per operation, one database transaction per client transaction: what the
    /// reference backend does. Kept to measure the planner against.
    Naive,
}

/// Engine settings (everything except where to listen and the database itself).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Postgres schemas whose tables clients may write.
    pub schemas: Vec<String>,
    /// Most client transactions in one request (the reference allows 50).
    pub max_transactions: usize,
    /// Most operations in one request, over all its transactions.
    pub max_operations: usize,
    /// Largest request body in bytes.
    pub body_limit: usize,
    pub on_fatal: OnFatal,
    pub patch_missing: PatchMissing,
    pub bytea: ByteaEncoding,
    pub planner: Planner,
    /// Attempts for serialization failures and deadlocks before answering `retryable_error`.
    pub max_attempts: u32,
    /// `retry_after_ms` told to clients on a temporary failure.
    pub retry_after_ms: u64,
    /// Database connections kept by the pool.
    pub pool_size: usize,
    /// How long a request waits for a connection (or to open one) before the database counts as
    /// unavailable.
    pub connect_timeout_ms: u64,
    /// Server-side statement timeout for write transactions, in milliseconds (0 = none).
    pub statement_timeout_ms: u64,
    /// Schema crudgate owns for its exactly-once ledger and migrations (created if missing).
    pub ledger_schema: String,
    /// How long decided transactions are remembered for deduplication.
    pub ledger_retention_hours: u64,
    /// Where rejected ("dead letter") transactions are written: schema and table. Put it in
    /// the PowerSync publication to sync each user their own rejections.
    pub rejections_schema: String,
    pub rejections_table: String,
    /// Error codes whose rejections the client must handle: answered with
    /// `requires_client_handling: true` (the client keeps the transaction queued), not written
    /// to the rejections table, and the batch stops there.
    pub client_handled_codes: Vec<String>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            schemas: vec!["public".into()],
            max_transactions: 50,
            max_operations: 10_000,
            body_limit: 32 * 1024 * 1024,
            on_fatal: OnFatal::Stop,
            patch_missing: PatchMissing::Ignore,
            bytea: ByteaEncoding::Base64,
            planner: Planner::Bulk,
            max_attempts: 5,
            retry_after_ms: 1000,
            pool_size: 16,
            connect_timeout_ms: 5000,
            statement_timeout_ms: 30_000,
            ledger_schema: "crudgate".into(),
            ledger_retention_hours: 24 * 7,
            rejections_schema: "crudgate".into(),
            rejections_table: "rejections".into(),
            client_handled_codes: Vec::new(),
        }
    }
}

impl EngineConfig {
    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
}
