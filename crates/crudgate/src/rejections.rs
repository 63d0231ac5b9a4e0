//! Operator access to the rejections ("dead letter") table: list, replay, purge.
//!
//! Every transaction crudgate acknowledged as rejected is kept there with the whole client
//! transaction, so a rejection caused by something fixable (a missing parent row, a too-strict
//! constraint) can be applied later through the same engine.

use serde::Serialize;
use serde_json::Value;
use tokio_postgres::types::ToSql;

use crate::execute::Engine;
use crate::plan::Context;
use crate::protocol::{Batch, Operation, Transaction, TxResult};

/// Which rejections to list.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub user_id: Option<String>,
    pub table: Option<String>,
    pub code: Option<String>,
    /// Only rejections at most this many seconds old.
    pub since_secs: Option<u64>,
    pub limit: Option<i64>,
}

/// One stored rejection.
#[derive(Debug, Clone, Serialize)]
pub struct StoredRejection {
    pub id: String,
    pub created_at: String,
    pub user_id: Option<String>,
    pub client_id: Option<String>,
    pub transaction_id: Option<String>,
    pub operation_index: i32,
    pub table_name: Option<String>,
    pub row_id: Option<String>,
    pub op: Option<String>,
    pub data: Option<Value>,
    pub previous_values: Option<Value>,
    pub metadata: Option<String>,
    pub error_code: String,
    pub message: String,
    pub details: Option<Value>,
    pub replayed_at: Option<String>,
    pub replay_result: Option<Value>,
}

const COLUMNS: &str = "id::text, to_char(created_at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
    user_id, client_id, transaction_id, operation_index, table_name, row_id, op, data, previous_values,
    metadata, error_code, message, details,
    to_char(replayed_at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), replay_result";

fn stored(r: &tokio_postgres::Row) -> StoredRejection {
    StoredRejection {
        id: r.get(0),
        created_at: r.get(1),
        user_id: r.get(2),
        client_id: r.get(3),
        transaction_id: r.get(4),
        operation_index: r.get(5),
        table_name: r.get(6),
        row_id: r.get(7),
        op: r.get(8),
        data: r.get(9),
        previous_values: r.get(10),
        metadata: r.get(11),
        error_code: r.get(12),
        message: r.get(13),
        details: r.get(14),
        replayed_at: r.get(15),
        replay_result: r.get(16),
    }
}

impl Engine {
    /// Rejections matching `filter`, newest first.
    pub async fn list_rejections(&self, filter: &Filter) -> Result<Vec<StoredRejection>, String> {
        let client = self.pool().get().await.map_err(|e| e.to_string())?;
        let since = filter.since_secs.map(|s| s.min(i32::MAX as u64) as i32);
        let limit = filter.limit.unwrap_or(1000);
        let sql = format!(
            "select {COLUMNS} from {}
              where ($1::text is null or user_id = $1)
                and ($2::text is null or table_name = $2)
                and ($3::text is null or error_code = $3)
                and ($4::int is null or created_at >= now() - make_interval(secs => $4))
              order by created_at desc limit $5",
            self.tables().rejections
        );
        let params: [&(dyn ToSql + Sync); 5] =
            [&filter.user_id, &filter.table, &filter.code, &since, &limit];
        let rows = client
            .query(&sql, &params)
            .await
            .map_err(|e| e.to_string())?;
        Ok(rows.iter().map(stored).collect())
    }

    /// Applies a stored rejected transaction again, as its user (with the claims of the token
    /// it came with), and records the new outcome
    /// on the stored row. The ledger is bypassed (it remembers the first outcome, which is
    /// exactly what is being overridden); a failing replay is rejected and stored again.
    pub async fn replay_rejection(&self, id: &str) -> Result<TxResult, String> {
        let missing = || format!("no rejection {id}");
        let key = uuid::Uuid::parse_str(id).map_err(|_| missing())?;
        // The connection goes back to the pool before the replay, which needs its own.
        let row = self
            .pool()
            .get()
            .await
            .map_err(|e| e.to_string())?
            .query_opt(
                &format!(
                    "select user_id, transaction_id, transaction, claims,
                            replayed_at::text, replay_result->>'status',
                            coalesce((details->>'{}')::boolean, false)
                       from {} where id = $1",
                    crate::ledger::REPLACED,
                    self.tables().rejections
                ),
                &[&key],
            )
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(missing)?;
        // Applied once already: again could overwrite what the user wrote since.
        if let (Some(at), Some("success")) = (row.get::<_, Option<String>>(4), row.get(5)) {
            return Err(format!(
                "rejection {id} was already replayed successfully at {at}"
            ));
        }
        if row.get::<_, bool>(6) {
            return Err(format!(
                "rejection {id} was stored with characters or numbers Postgres cannot hold \
                 replaced; replaying it would write other data than the client sent"
            ));
        }
        let user_id: Option<String> = row.get(0);
        let transaction_id: Option<String> = row.get(1);
        let crud: Vec<Operation> = serde_json::from_value(row.get::<_, Value>(2))
            .map_err(|e| format!("stored transaction unreadable: {e}"))?;
        let claims: Option<Value> = row.get(3);
        let ctx = Context {
            claims: claims.unwrap_or_else(|| {
                user_id
                    .as_ref()
                    .map_or(Value::Null, |u| serde_json::json!({ "sub": u }))
            }),
            user_id,
            client_id: None,
        };
        let batch = Batch {
            client_id: None,
            transactions: vec![Transaction {
                transaction_id: transaction_id.map(Value::String),
                crud,
            }],
        };
        let outcome = self.apply(ctx, batch).await;
        let result = outcome.results.into_iter().next().ok_or("no result")?;
        if !matches!(result, TxResult::RetryableError { .. }) {
            // Storable already: every answer is made so where it is made (`Engine::answer`).
            let json = serde_json::to_string(&result).expect("results serialize");
            self.pool()
                .get()
                .await
                .map_err(|e| e.to_string())?
                .execute(
                    &format!(
                        "update {} set replayed_at = now(), replay_result = $2::text::jsonb
                          where id = $1",
                        self.tables().rejections
                    ),
                    &[&key, &json],
                )
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(result)
    }

    /// Deletes rejections older than `older_than_secs`; returns how many.
    pub async fn purge_rejections(&self, older_than_secs: u64) -> Result<u64, String> {
        let client = self.pool().get().await.map_err(|e| e.to_string())?;
        let secs = older_than_secs.min(i32::MAX as u64) as i32;
        client
            .execute(
                &format!(
                    "delete from {} where created_at < now() - make_interval(secs => $1::int)",
                    self.tables().rejections
                ),
                &[&secs],
            )
            .await
            .map_err(|e| e.to_string())
    }
}
