//! Typed configuration. Every key has a default so that an empty TOML file is a valid
//! configuration; `crudgate.example.toml` at the repository root documents each key.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::protocol::OpKind;

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
    /// Most request-body bytes read and being applied at once, over all requests; more wait.
    /// A parsed body takes several times its size in memory, so this bounds the server's
    /// memory under many large uploads. At least `body_limit`.
    pub bodies_in_flight: usize,
    /// How long a client may take to send a request's head, stay idle between requests on a
    /// kept-alive connection, or stall in the middle of a body, in milliseconds. Connections
    /// that send nothing would otherwise pile up until no one can connect.
    pub client_idle_timeout_ms: u64,
    pub on_fatal: OnFatal,
    pub patch_missing: PatchMissing,
    pub bytea: ByteaEncoding,
    pub planner: Planner,
    /// Whether small requests that arrive together may share one database transaction and
    /// its COMMIT (group commit). Each still gets its own answer; a group that fails in any way
    /// is undone and its requests applied one by one.
    pub group_commit: bool,
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
    /// Write rules per client table (`[engine.tables.<client table>]`), see [`TableRule`].
    pub tables: BTreeMap<String, TableRule>,
    /// Whether clients may write tables that have no rule (all ops, all columns, no owner).
    /// Off by default: a table is writable only once a rule says how.
    pub allow_unlisted_tables: bool,
    /// How the caller's identity reaches Postgres row-level security.
    pub rls: RlsConfig,
}

/// What clients may write to one table, and what the server writes for them.
///
/// Column names: `columns`, `deny_columns` and the keys of `rename` are the CLIENT's names (what
/// arrives in `op_data`); `set`, `owner` and the values of `rename` are the SERVER's columns.
///
/// ```toml
/// [engine.tables.todos]
/// table = "todo_items"                    # server table (default: the client's name)
/// schema = "app"                          # its schema (default: the first of engine.schemas
///                                         # that has it); a rule exposes its own schema
/// ops = ["PUT", "PATCH", "DELETE"]        # default: all three
/// columns = ["description", "completed"]  # writable client columns (default: all)
/// # deny_columns = ["archived"]           # or: all but these
/// rename = { done = "completed" }         # client column = server column
/// owner = "owner_id"                      # rows belong to the caller's `sub`
/// set = { owner_id = "claim:sub", updated_at = "now()" }
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TableRule {
    pub table: Option<String>,
    pub schema: Option<String>,
    pub ops: Vec<OpKind>,
    /// Allow list of client columns (the key is always allowed). Exclusive with `deny_columns`.
    pub columns: Option<Vec<String>>,
    /// Deny list of client columns.
    pub deny_columns: Vec<String>,
    /// Client column name → server column name.
    pub rename: BTreeMap<String, String>,
    /// Server-set columns (`"claim:<path>"` or `"now()"`). Whatever the client sends for them
    /// is ignored, and they never count against `columns`/`deny_columns` (a PUT carries every
    /// non-null column of the local row, the client's copy of `owner_id` included). On PUT
    /// (insert or update) each gets its value from here. On PATCH only `now()` columns are set,
    /// and only when the PATCH changes something; claim columns keep their stored value, so a
    /// PATCH can never re-own a row. A claim the token lacks (or that does not fit the column)
    /// makes the PUT `UNAUTHORIZED`.
    pub set: BTreeMap<String, SetValue>,
    /// Server column holding the owner's user id; implies `set.<owner> = "claim:sub"`. PATCH
    /// and DELETE only touch rows whose owner is the caller's `sub`; a PUT may not take over a
    /// row of another owner, or of none (NULL). Breaking this is `UNAUTHORIZED` at the
    /// operation's index; a PATCH or DELETE of a row that does not exist stays a success
    /// without effect. Needs an authenticated caller, and SELECT on the table for the guard.
    pub owner: Option<String>,
}

impl Default for TableRule {
    fn default() -> Self {
        Self {
            table: None,
            schema: None,
            ops: vec![OpKind::Put, OpKind::Patch, OpKind::Delete],
            columns: None,
            deny_columns: Vec::new(),
            rename: BTreeMap::new(),
            set: BTreeMap::new(),
            owner: None,
        }
    }
}

/// Where a server-set column's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetValue {
    /// `claim:<name>` or `claim:<a>.<b>`: a verified token claim (a dotted path into nested
    /// objects). Text as is, numbers and booleans as their JSON text, objects as JSON.
    Claim(Vec<String>),
    /// `now()`: the database's transaction timestamp.
    Now,
}

impl<'de> Deserialize<'de> for SetValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let s = s.trim();
        if s.eq_ignore_ascii_case("now()") {
            return Ok(SetValue::Now);
        }
        if let Some(path) = s.strip_prefix("claim:") {
            let parts: Vec<String> = path.split('.').map(str::to_owned).collect();
            if parts.iter().all(|p| !p.is_empty()) {
                return Ok(SetValue::Claim(parts));
            }
        }
        Err(serde::de::Error::custom(
            "expected \"claim:<name>\" (dotted path allowed) or \"now()\"",
        ))
    }
}

/// How the verified identity is handed to Postgres in every write transaction, all in the
/// transaction's first round trip.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RlsConfig {
    /// `set_config('app.user_id', sub, true)`, as PowerSync's reference backend does.
    pub app_user_id: bool,
    /// `set_config('request.jwt.claims', <claims as JSON>, true)`, as PostgREST/Supabase do.
    pub jwt_claims: bool,
    /// A role to write as (`SET LOCAL ROLE`), e.g. Supabase's `authenticated`, so that policies
    /// apply even though crudgate logs in as the tables' owner. crudgate's own bookkeeping
    /// (ledger, rejections) still runs as the login role.
    pub role: Option<String>,
}

impl Default for RlsConfig {
    fn default() -> Self {
        Self {
            app_user_id: true,
            jwt_claims: false,
            role: None,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            schemas: vec!["public".into()],
            max_transactions: 50,
            max_operations: 10_000,
            body_limit: 32 * 1024 * 1024,
            bodies_in_flight: 64 * 1024 * 1024,
            client_idle_timeout_ms: 30_000,
            on_fatal: OnFatal::Stop,
            patch_missing: PatchMissing::Ignore,
            bytea: ByteaEncoding::Base64,
            planner: Planner::Bulk,
            group_commit: true,
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
            tables: BTreeMap::new(),
            allow_unlisted_tables: false,
            rls: RlsConfig::default(),
        }
    }
}

impl EngineConfig {
    pub(crate) fn client_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.client_idle_timeout_ms.max(1))
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// Checks what can be checked without the database (rules against the catalog are checked
    /// when it loads). `Engine::connect` refuses a configuration that fails this.
    pub fn validate(&self) -> Result<(), String> {
        for (name, rule) in &self.tables {
            if rule.columns.is_some() && !rule.deny_columns.is_empty() {
                return Err(format!(
                    "engine.tables.{name}: give either columns or deny_columns, not both"
                ));
            }
            if rule.ops.is_empty() {
                return Err(format!("engine.tables.{name}: ops is empty"));
            }
            if let Some(owner) = &rule.owner {
                match rule.set.get(owner) {
                    None => {}
                    Some(SetValue::Claim(p)) if p.len() == 1 && p[0] == "sub" => {}
                    Some(_) => {
                        return Err(format!(
                            "engine.tables.{name}: the owner column {owner:?} can only be set \
                             from claim:sub"
                        ))
                    }
                }
            }
        }
        if self.rls.role.as_deref() == Some("") {
            return Err("engine.rls.role is empty".into());
        }
        Ok(())
    }
}
