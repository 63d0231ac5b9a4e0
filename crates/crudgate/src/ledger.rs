//! Exactly-once bookkeeping, in the same Postgres transactions as the data.
//!
//! PowerSync delivery is at-least-once: a lost response makes the client send the whole
//! transaction again. For each (user, client id) the ledger remembers which client transactions
//! were decided (applied or rejected), with a fingerprint of their content and the answer given.
//! A replay gets the same answer without touching the data; the same transaction id with other
//! content is an `IDEMPOTENCY_CONFLICT`. Requests of one client are serialized by a
//! transaction-scoped advisory lock, so a retry racing its original (on any crudgate instance)
//! waits for it, while other clients never wait.
//!
//! Rejected transactions are also written to the rejections table ("dead letters") so nothing a
//! client sent is ever lost, even when the answer told it to drop the transaction.

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_postgres::GenericClient;

use crate::config::EngineConfig;
use crate::plan::{Context, Rejection};
use crate::protocol::{Transaction, TxResult};
use crate::schema::quote_ident;

/// Where crudgate's own tables live, as quoted SQL names.
#[derive(Debug, Clone)]
pub(crate) struct Tables {
    schema: String,
    pub ledger: String,
    pub rejections: String,
    rejections_schema: String,
}

impl Tables {
    pub fn new(cfg: &EngineConfig) -> Self {
        let schema = quote_ident(&cfg.ledger_schema);
        Tables {
            ledger: format!("{schema}.\"ledger\""),
            rejections: format!(
                "{}.{}",
                quote_ident(&cfg.rejections_schema),
                quote_ident(&cfg.rejections_table)
            ),
            rejections_schema: quote_ident(&cfg.rejections_schema),
            schema,
        }
    }

    /// Creates or upgrades crudgate's tables. Versioned, and serialized by an advisory lock so
    /// that instances starting together do not race.
    pub async fn migrate(&self, client: &impl GenericClient) -> Result<(), tokio_postgres::Error> {
        let s = &self.schema;
        client
            .batch_execute(&format!(
                "select pg_advisory_lock(7262718201);
                 create schema if not exists {s};
                 create table if not exists {s}.\"migrations\" (
                     version int primary key,
                     applied_at timestamptz not null default now());"
            ))
            .await?;
        let result = self.apply_migrations(client).await;
        client
            .batch_execute("select pg_advisory_unlock(7262718201)")
            .await?;
        result
    }

    async fn apply_migrations(
        &self,
        client: &impl GenericClient,
    ) -> Result<(), tokio_postgres::Error> {
        let s = &self.schema;
        let done: i32 = client
            .query_one(
                &format!("select coalesce(max(version), 0) from {s}.\"migrations\""),
                &[],
            )
            .await?
            .get(0);
        let migrations = [format!(
            "create table {s}.\"ledger\" (
                 user_id text not null,
                 client_id text not null,
                 transaction_id text not null,
                 fingerprint text not null,
                 outcome jsonb not null,
                 decided_at timestamptz not null default now(),
                 primary key (user_id, client_id, transaction_id));
             create index on {s}.\"ledger\" (decided_at);"
        )];
        for (i, sql) in migrations.iter().enumerate() {
            let version = i as i32 + 1;
            if version <= done {
                continue;
            }
            client
                .batch_execute(&format!(
                    "begin; {sql}; insert into {s}.\"migrations\" (version) values ({version}); commit;"
                ))
                .await?;
            tracing::info!(version, "ledger migration applied");
        }
        // The rejections table may be moved by configuration (e.g. into the PowerSync
        // publication's schema), so it is created where configured rather than migrated.
        let r = &self.rejections;
        client
            .batch_execute(&format!(
                "create schema if not exists {rs};
                 create table if not exists {r} (
                     id uuid primary key default gen_random_uuid(),
                     created_at timestamptz not null default now(),
                     user_id text,
                     client_id text,
                     transaction_id text,
                     operation_index int not null,
                     table_name text,
                     row_id text,
                     op text,
                     data jsonb,
                     previous_values jsonb,
                     metadata text,
                     error_code text not null,
                     message text not null,
                     details jsonb,
                     transaction jsonb not null,
                     claims jsonb,
                     replayed_at timestamptz,
                     replay_result jsonb);
                 create index if not exists {idx} on {r} (user_id, created_at);
                 create index if not exists {tx_idx} on {r} (client_id, transaction_id);",
                rs = self.rejections_schema,
                idx = quote_ident("crudgate_rejections_user_created"),
                tx_idx = quote_ident("crudgate_rejections_client_transaction"),
            ))
            .await
    }

    /// Forgets decisions older than the retention period.
    pub async fn prune(
        &self,
        client: &impl GenericClient,
        retention_hours: u64,
    ) -> Result<u64, tokio_postgres::Error> {
        client
            .execute(
                &format!(
                    "delete from {} where decided_at < now() - make_interval(hours => $1::int)",
                    self.ledger
                ),
                &[&(retention_hours.min(i32::MAX as u64) as i32)],
            )
            .await
    }

    pub fn lookup_sql(&self) -> String {
        format!(
            "select transaction_id, fingerprint, outcome::text from {}
              where user_id = $1 and client_id = $2 and transaction_id = any($3::text[])",
            self.ledger
        )
    }

    /// Entries of one user, of one client or (in a group commit) several.
    pub fn insert_sql(&self) -> String {
        format!(
            "insert into {} (user_id, client_id, transaction_id, fingerprint, outcome)
             select $1, c, t, f, o::jsonb
               from unnest($2::text[], $3::text[], $4::text[], $5::text[]) as x(c, t, f, o)",
            self.ledger
        )
    }

    /// One rejection: its fifteen values as text parameters.
    pub fn reject_sql(&self) -> String {
        format!(
            "insert into {} (user_id, client_id, transaction_id, operation_index, table_name, row_id,
                              op, data, previous_values, metadata, error_code, message, details, transaction,
                              claims)
             select $1::text, $2::text, $3::text, $4::text::int, $5::text, $6::text, $7::text,
                    $8::text::jsonb, $9::text::jsonb, $10::text, $11::text, $12::text,
                    $13::text::jsonb, $14::text::jsonb, $15::text::jsonb",
            self.rejections
        )
    }

    /// `reject_sql` unless the same rejection of the same transaction content is recorded
    /// already: an IDEMPOTENCY_CONFLICT is answered again on every resend, and a replay of
    /// each copy would apply its content as many times.
    pub fn reject_once_sql(&self) -> String {
        format!(
            "{} where not exists (
                    select 1 from {}
                     where client_id = $2::text and transaction_id = $3::text
                       and user_id is not distinct from $1::text
                       and error_code = $11::text and transaction = $14::text::jsonb)",
            self.reject_sql(),
            self.rejections
        )
    }
}

/// Who the ledger entries belong to: the verified user (empty without auth) and client id.
#[derive(Debug, Clone)]
pub(crate) struct Scope {
    pub user_id: String,
    pub client_id: String,
    /// The advisory lock that serializes this client's requests.
    pub lock_key: i64,
}

impl Scope {
    pub fn of(ctx: &Context) -> Option<Scope> {
        let client_id = bounded(ctx.client_id.as_deref().filter(|c| !c.is_empty())?);
        let user_id = bounded(ctx.user_id.as_deref().unwrap_or_default());
        let mut h = Sha256::new();
        h.update(user_id.as_bytes());
        h.update([0]);
        h.update(client_id.as_bytes());
        let digest = h.finalize();
        let lock_key = i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
        Some(Scope {
            user_id,
            client_id,
            lock_key,
        })
    }
}

/// A client transaction's ledger identity: its id as text and the fingerprint of its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TxKey {
    pub id: String,
    pub fingerprint: String,
}

impl TxKey {
    /// None when the transaction has no id: it cannot be deduplicated.
    pub fn of(tx: &Transaction) -> Option<TxKey> {
        let id = match tx.transaction_id.as_ref().filter(|v| !v.is_null())? {
            Value::String(s) => bounded(s),
            other => bounded(&other.to_string()),
        };
        let content = serde_json::to_vec(&tx.crud).expect("operations serialize");
        Some(TxKey {
            id,
            fingerprint: hex::encode(Sha256::digest(&content)),
        })
    }
}

const HASHED: &str = "sha256:";

/// A part of a ledger key: as sent when that is short and storable, else its SHA-256, so that
/// two different ids never share a key.
/// - A btree key holds about 2.7 kB, and a long client or transaction id must still be
///   remembered rather than fail every time (which would block the client's queue).
/// - Postgres text cannot hold NUL; stored as U+FFFD, "a\0b" would be "a\u{FFFD}b".
/// - An id that looks like a hashed one ("sha256:<hash of a long id>", a user's `sub` say)
///   would be another's.
fn bounded(s: &str) -> String {
    if s.len() <= 256 && !s.starts_with(HASHED) && !s.contains(['\0', '\u{FFFD}']) {
        return s.to_owned();
    }
    format!("{HASHED}{}", hex::encode(Sha256::digest(s.as_bytes())))
}

/// A client transaction's id as text: a string as is (no JSON quotes), a number as written.
fn tx_id(tx: &Transaction) -> Option<String> {
    tx.transaction_id
        .as_ref()
        .filter(|v| !v.is_null())
        .map(text_of)
}

/// A JSON value as storable text: a string's contents, anything else as JSON.
fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => storable(s),
        other => storable_json(other),
    }
}

/// Text for crudgate's own tables. Postgres text and jsonb cannot hold NUL (U+0000), which a
/// JSON string can: what crudgate records about a request (ids, a rejected transaction, an
/// answer) must always be storable, or that transaction could never be answered and would
/// block its client's queue. NUL is recorded as U+FFFD.
pub(crate) fn storable(s: &str) -> String {
    s.replace('\0', "\u{FFFD}")
}

/// JSON text for crudgate's jsonb columns (see `storable_value`).
pub(crate) fn storable_json<T: Serialize + ?Sized>(v: &T) -> String {
    storable_json_marked(v).0
}

/// `storable_json`, and whether anything had to be replaced.
fn storable_json_marked<T: Serialize + ?Sized>(v: &T) -> (String, bool) {
    let mut tree = serde_json::to_value(v).expect("serializes");
    let replaced = storable_value(&mut tree);
    (tree.to_string(), replaced)
}

/// Makes a JSON value one jsonb can hold, for the same reason as `storable`: NUL in strings
/// and keys is recorded as U+FFFD, and a number beyond jsonb's numeric range (`1e200000`) as
/// its text. Whether anything was replaced.
pub(crate) fn storable_value(v: &mut Value) -> bool {
    match v {
        Value::String(s) if s.contains('\0') => {
            *s = storable(s);
            true
        }
        Value::Number(n) if !fits_jsonb(&n.to_string()) => {
            *v = Value::String(n.to_string());
            true
        }
        Value::Array(items) => items.iter_mut().fold(false, |r, v| storable_value(v) | r),
        Value::Object(m) if m.keys().any(|k| k.contains('\0')) => {
            *m = std::mem::take(m)
                .into_iter()
                .map(|(k, mut v)| {
                    storable_value(&mut v);
                    (storable(&k), v)
                })
                .collect();
            true
        }
        Value::Object(m) => m.values_mut().fold(false, |r, v| storable_value(v) | r),
        _ => false,
    }
}

/// The key in a stored rejection's `details` that says its transaction was stored with
/// replacements (see `storable_value`): replaying it would write other data than was sent.
pub(crate) const REPLACED: &str = "stored_with_replacements";

/// Whether a JSON number's digits fit Postgres' numeric, which jsonb uses: at most 131,072
/// digits before the decimal point and 16,383 after (with a margin).
fn fits_jsonb(number: &str) -> bool {
    let (mantissa, exp) = match number.find(['e', 'E']) {
        Some(i) => (&number[..i], number[i + 1..].parse::<i64>()),
        None => (number, Ok(0)),
    };
    let Ok(exp) = exp else { return false };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let before = int.trim_start_matches('-').len() as i64 + exp;
    let after = frac.len() as i64 - exp;
    // Older Postgres also refuses exponents beyond ±1000 in numeric input.
    before < 131_000 && after < 16_000 && exp.abs() <= 1000
}

/// A decision already in the ledger.
#[derive(Debug, Clone)]
pub(crate) struct Decided {
    pub fingerprint: String,
    pub outcome: TxResult,
}

/// The text parameters of a rejections-table row.
pub(crate) fn rejection_params(
    ctx: &Context,
    tx: &Transaction,
    r: &Rejection,
) -> Vec<Option<String>> {
    let op = tx.crud.get(r.operation_index);
    let json = |v: Option<&serde_json::Map<String, Value>>| v.map(storable_json);
    let (transaction, replaced) = storable_json_marked(&tx.crud);
    let mut details = r.details.clone();
    if let (true, Value::Object(d)) = (replaced, &mut details) {
        d.insert(REPLACED.into(), Value::Bool(true));
    }
    vec![
        ctx.user_id.as_deref().map(storable),
        ctx.client_id.as_deref().map(storable),
        tx_id(tx),
        Some(r.operation_index.to_string()),
        op.map(|o| storable(&o.table)),
        op.map(|o| storable(&o.id.0)),
        op.map(|o| o.op.as_str().to_owned()),
        op.and_then(|o| json(o.op_data.as_ref())),
        op.and_then(|o| json(o.previous_values.as_ref())),
        op.and_then(|o| o.metadata.as_ref()).map(text_of),
        Some(r.code.clone()),
        Some(storable(&r.message)),
        Some(storable_json(&details)),
        Some(transaction),
        // The verified claims, so a replay runs with the same identity (server-set columns
        // and RLS policies may read any claim).
        (!ctx.claims.is_null()).then(|| storable_json(&ctx.claims)),
    ]
}
