//! Request shapes other than the reference batch, as real connectors send them.
//!
//! Each shape is translated into a [`Batch`] and applied by the same engine as `/api/data`, so
//! validation, write rules, hooks, the ledger and the rejections table behave identically; only
//! the wire differs. The answers follow one rule whatever the shape: data the server refused
//! for good is acknowledged with a 2xx (a connector that throws on anything else would make the
//! SDK resend it every 5 s, forever, blocking the user's queue), a temporary failure is a 503
//! with `Retry-After`, and a rejection the client must handle itself is a 409 (it stays queued,
//! which is what that setting asks for).
//!
//! - REST, one operation per request: `PUT|PATCH|DELETE /api/data/{table}/{id}`, body = the
//!   operation's data.
//! - PowerSync's Node demo backend: `POST /api/data` with `{"batch":[{"op","table","id","data"}]}`,
//!   the whole batch one client transaction.
//! - The JS SDK's `CrudEntry.toJSON()` entries as they are: `POST /api/data` with `[…]` or
//!   `{"crud":[…]}`, grouped into client transactions by consecutive `tx_id`.
//!
//! A body with a `transactions` key is always the reference shape (see `http::upload`).

use std::collections::BTreeMap;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use axum::{Json, Router};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::auth::Identity;
use crate::config::OnFatal;
use crate::http::{self, ApiError, AppState};
use crate::protocol::{Batch, OpKind, Operation, RowId, Transaction, TxResult};

/// The REST routes; `POST /api/data` itself dispatches to [`upload`].
pub(crate) fn routes() -> Router<AppState> {
    Router::new().route(
        "/api/data/{table}/{id}",
        put(rest_put).patch(rest_patch).delete(rest_delete),
    )
}

/// A `POST /api/data` body that is not a reference batch but another known shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// `{"batch":[…]}`: PowerSync's Node demo backend.
    Demo,
    /// `[…]` or `{"crud":[…]}`: the SDK's queue entries as they are.
    Entries,
}

/// Recognises another shape from the body's first character and top-level keys; `None` means
/// the body is a (bad) reference batch and the reference parser's message stands.
pub(crate) fn other_shape(body: &[u8]) -> Option<Shape> {
    match body.iter().find(|b| !b.is_ascii_whitespace())? {
        b'[' => Some(Shape::Entries),
        b'{' => {
            let keys: BTreeMap<String, IgnoredAny> = serde_json::from_slice(body).ok()?;
            // Both a demo batch and queue entries: which to apply is a guess, and applying
            // one would acknowledge the other unapplied. Neither; the request is a 400.
            match (
                keys.contains_key("transactions"),
                keys.contains_key("batch"),
                keys.contains_key("crud"),
            ) {
                (false, true, false) => Some(Shape::Demo),
                (false, false, true) => Some(Shape::Entries),
                _ => None,
            }
        }
        _ => None,
    }
}

/// `POST /api/data` in another shape, after authentication.
pub(crate) async fn upload(
    state: &AppState,
    identity: Identity,
    headers: &HeaderMap,
    shape: Shape,
    body: http::ReadBody,
) -> Result<Response, ApiError> {
    let (bytes, budget) = (&body.bytes, body.budget);
    match shape {
        Shape::Demo => {
            let batch = parse_demo(bytes, headers)?;
            let ops = batch.transactions[0].crud.len();
            http::check_operations(state, ops)?;
            let results = http::apply(state, identity, headers, batch, budget).await?;
            Ok(demo_answer(state, &results[0]))
        }
        Shape::Entries => {
            let (client_id, groups) = parse_entries(bytes)?;
            let ops = groups.iter().map(|t| t.crud.len()).sum();
            http::check_operations(state, ops)?;
            let tx_ids: Vec<Value> = groups
                .iter()
                .map(|t| t.transaction_id.clone().unwrap_or(Value::Null))
                .collect();
            let results =
                apply_in_chunks(state, identity, headers, client_id, groups, budget).await?;
            let results: Vec<EntryResult> = results
                .into_iter()
                .zip(tx_ids)
                .map(|(result, tx_id)| EntryResult { result, tx_id })
                .collect();
            Ok(Json(EntriesAnswer { results }).into_response())
        }
    }
}

/// The reference answer, each result with its `tx_id`. Typed rather than built as a `Value`,
/// whose map would sort the keys: `status` stays first, as in the reference answer.
#[derive(Serialize)]
struct EntriesAnswer {
    results: Vec<EntryResult>,
}

/// A reference result with the `tx_id` of the entries it answers.
#[derive(Serialize)]
struct EntryResult {
    #[serde(flatten)]
    result: TxResult,
    tx_id: Value,
}

/// A refusal in the REST shape.
#[derive(Serialize)]
struct RestRefusal<'a> {
    status: &'static str,
    error_code: &'a str,
    message: &'a str,
    details: &'a Value,
}

/// A refusal in the demo shape: its `message` first, as the demo backend answers.
#[derive(Serialize)]
struct DemoRefusal<'a> {
    message: String,
    status: &'static str,
    error_code: &'a str,
    operation_index: usize,
    details: &'a Value,
}

/// Parses a body of one of these shapes; on failure names what is wrong, with the path into it.
fn parse_shape<T: serde::de::DeserializeOwned>(shape: &str, body: &[u8]) -> Result<T, ApiError> {
    crate::protocol::parse_json(shape, body).map_err(|e| bad_request(e.0))
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
}

/// The `Idempotency-Key` header: with a client id, it is the transaction id the ledger keys
/// replays on (shapes without a transaction id of their own could not be deduplicated).
fn idempotency_key(headers: &HeaderMap) -> Option<Value> {
    headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty())
        .map(|k| Value::String(k.to_owned()))
}

// ---- The Node demo's batch ----

#[derive(Deserialize)]
struct DemoBody {
    batch: Vec<DemoOp>,
    #[serde(default)]
    client_id: Option<String>,
}

#[derive(Deserialize)]
struct DemoOp {
    op: OpKind,
    table: String,
    /// The demo backend takes `id`, else `data.id`.
    #[serde(default)]
    id: Option<RowId>,
    #[serde(default)]
    data: Option<Map<String, Value>>,
}

fn parse_demo(body: &[u8], headers: &HeaderMap) -> Result<Batch, ApiError> {
    let demo: DemoBody = parse_shape("demo batch", body)?;
    if demo.batch.is_empty() {
        return Err(bad_request("the batch is empty: it carries no operation"));
    }
    let crud = demo
        .batch
        .into_iter()
        .enumerate()
        .map(|(i, op)| {
            let id = match (op.id, op.data.as_ref().and_then(|d| d.get("id"))) {
                (Some(id), _) => id,
                (None, Some(Value::String(s))) => RowId(s.clone()),
                (None, Some(Value::Number(n))) => RowId(n.to_string()),
                _ => {
                    return Err(bad_request(format!(
                        "invalid demo batch body at batch[{i}]: no row id (neither id nor data.id)"
                    )))
                }
            };
            Ok(Operation {
                op: op.op,
                table: op.table,
                id,
                // A DELETE's data only ever carried its id.
                op_data: if op.op == OpKind::Delete {
                    None
                } else {
                    op.data
                },
                previous_values: None,
                metadata: None,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Batch {
        client_id: demo.client_id,
        transactions: vec![Transaction {
            transaction_id: idempotency_key(headers),
            crud,
        }],
    })
}

/// The demo backend answers `{"message": …}`; the extra fields say what became of a refused
/// batch without changing what its connector reads.
fn demo_answer(state: &AppState, r: &TxResult) -> Response {
    match r {
        TxResult::Success => Json(json!({ "message": "Batch completed" })).into_response(),
        TxResult::FatalError {
            requires_client_handling,
            message,
            failed_operation: f,
        } => {
            let status = if *requires_client_handling {
                StatusCode::CONFLICT
            } else {
                StatusCode::OK
            };
            let body = DemoRefusal {
                message: format!("Batch rejected: {message}"),
                status: if *requires_client_handling {
                    "client_handling_required"
                } else {
                    "rejected"
                },
                error_code: &f.error_code,
                operation_index: f.operation_index,
                details: &f.details,
            };
            (status, Json(body)).into_response()
        }
        TxResult::RetryableError {
            message,
            retry_after_ms,
        } => retry_later(json!({ "message": message }), *retry_after_ms),
        TxResult::NotAttempted => retry_later(
            json!({ "message": "not attempted; retry later" }),
            state.engine.config().retry_after_ms,
        ),
    }
}

/// A 503 with `Retry-After` in whole seconds (at least 1).
fn retry_later(body: Value, retry_after_ms: u64) -> Response {
    let mut res = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    let secs = retry_after_ms.div_ceil(1000).max(1);
    res.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    res
}

// ---- The SDK's queue entries ----

/// `{"crud":[…]}`: a `CrudBatch` or `CrudTransaction` serialised as it is, with the client id.
#[derive(Deserialize)]
struct EntriesObject {
    crud: Vec<Entry>,
    #[serde(default)]
    client_id: Option<String>,
}

/// `CrudEntry.toJSON()`: `op_id` is ignored (the SDK's local sequence number).
#[derive(Deserialize)]
struct Entry {
    op: OpKind,
    #[serde(rename = "type")]
    table: String,
    id: RowId,
    #[serde(default)]
    tx_id: Option<Value>,
    #[serde(default)]
    data: Option<Map<String, Value>>,
    #[serde(default)]
    old: Option<Map<String, Value>>,
    #[serde(default)]
    metadata: Option<Value>,
}

fn parse_entries(body: &[u8]) -> Result<(Option<String>, Vec<Transaction>), ApiError> {
    let (client_id, entries) = if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        (None, parse_shape::<Vec<Entry>>("queue entries", body)?)
    } else {
        let o: EntriesObject = parse_shape("queue entries", body)?;
        (o.client_id, o.crud)
    };
    if entries.is_empty() {
        return Err(bad_request(
            "no queue entries: the request carries no operation",
        ));
    }
    // One client transaction per run of consecutive entries with the same tx_id, in order.
    let mut groups: Vec<Transaction> = Vec::new();
    for e in entries {
        let tx_id = e.tx_id.filter(|v| !v.is_null());
        let op = Operation {
            op: e.op,
            table: e.table,
            id: e.id,
            op_data: e.data,
            previous_values: e.old,
            metadata: e.metadata,
        };
        match groups.last_mut() {
            Some(last) if last.transaction_id == tx_id => last.crud.push(op),
            _ => groups.push(Transaction {
                transaction_id: tx_id,
                crud: vec![op],
            }),
        }
    }
    Ok((client_id, groups))
}

/// Applies the groups `max_transactions` at a time: an SDK batch (100 entries by default) can
/// hold more single-statement transactions than one reference request may. Stops where the
/// engine would have stopped, answering the rest `not_attempted`.
async fn apply_in_chunks(
    state: &AppState,
    identity: Identity,
    headers: &HeaderMap,
    client_id: Option<String>,
    groups: Vec<Transaction>,
    budget: http::Budget,
) -> Result<Vec<TxResult>, ApiError> {
    let cfg = state.engine.config();
    let total = groups.len();
    let mut results: Vec<TxResult> = Vec::with_capacity(total);
    let mut groups = groups.into_iter().peekable();
    while groups.peek().is_some() {
        let chunk: Vec<Transaction> = groups.by_ref().take(cfg.max_transactions).collect();
        let batch = Batch {
            client_id: client_id.clone(),
            transactions: chunk,
        };
        match http::apply(state, identity.clone(), headers, batch, budget.clone()).await {
            Ok(rs) => results.extend(rs),
            // Nothing applied at all: the request as a whole is to be retried.
            Err(e) if results.is_empty() => return Err(e),
            // Earlier chunks are committed: answer them, and ask for the rest later.
            Err(_) => results.push(TxResult::RetryableError {
                message: "database unavailable; retry later".into(),
                retry_after_ms: cfg.retry_after_ms,
            }),
        }
        if results.iter().any(|r| stops(cfg.on_fatal, r)) {
            break;
        }
    }
    results.resize(total, TxResult::NotAttempted);
    Ok(results)
}

/// Whether the engine leaves the transactions after this result for a later request.
fn stops(on_fatal: OnFatal, r: &TxResult) -> bool {
    match r {
        TxResult::Success => false,
        TxResult::FatalError {
            requires_client_handling,
            ..
        } => *requires_client_handling || on_fatal == OnFatal::Stop,
        TxResult::RetryableError { .. } | TxResult::NotAttempted => true,
    }
}

// ---- REST, one operation per request ----

async fn rest_put(
    State(state): State<AppState>,
    Path((table, id)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    rest(state, OpKind::Put, table, id, req).await
}

async fn rest_patch(
    State(state): State<AppState>,
    Path((table, id)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    rest(state, OpKind::Patch, table, id, req).await
}

async fn rest_delete(
    State(state): State<AppState>,
    Path((table, id)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    rest(state, OpKind::Delete, table, id, req).await
}

async fn rest(
    state: AppState,
    op: OpKind,
    table: String,
    id: String,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let identity = http::authenticate(&state, &parts.headers).await?;
    // A DELETE's body, if any, says nothing the path does not.
    let body = match op {
        OpKind::Delete => None,
        OpKind::Put | OpKind::Patch => Some(http::read_body(&state, &parts.headers, body).await?),
    };
    let op_data = match &body {
        None => None,
        Some(body) => Some(rest_data(op, &body.bytes)?),
    };
    let batch = Batch {
        client_id: None,
        transactions: vec![Transaction {
            transaction_id: idempotency_key(&parts.headers),
            crud: vec![Operation {
                op,
                table,
                id: RowId(id),
                op_data,
                previous_values: None,
                metadata: None,
            }],
        }],
    };
    let budget = body.map(|b| b.budget).unwrap_or_default();
    let results = http::apply(&state, identity, &parts.headers, batch, budget).await?;
    Ok(rest_answer(&state, &results[0]))
}

fn rest_data(op: OpKind, bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(bad_request(format!(
            "{} needs a body: a JSON object of column values",
            op.as_str()
        )));
    }
    let mut parsed = serde_json::from_slice::<Value>(bytes);
    if parsed.is_err() {
        if let Some(fixed) = crate::protocol::without_lone_surrogates(bytes) {
            parsed = serde_json::from_slice::<Value>(&fixed);
        }
    }
    match parsed {
        Ok(Value::Object(data)) => Ok(data),
        Ok(_) => Err(bad_request(
            "invalid body: expected a JSON object of column values",
        )),
        Err(e) => Err(bad_request(format!("invalid body: {e}"))),
    }
}

fn rest_answer(state: &AppState, r: &TxResult) -> Response {
    match r {
        TxResult::Success => Json(json!({ "status": "success" })).into_response(),
        TxResult::FatalError {
            requires_client_handling,
            message,
            failed_operation: f,
        } => {
            let (status, word) = if *requires_client_handling {
                (StatusCode::CONFLICT, "client_handling_required")
            } else {
                (StatusCode::OK, "rejected")
            };
            let body = RestRefusal {
                status: word,
                error_code: &f.error_code,
                message,
                details: &f.details,
            };
            (status, Json(body)).into_response()
        }
        TxResult::RetryableError {
            message,
            retry_after_ms,
        } => retry_later(
            json!({ "status": "retryable_error", "message": message, "retry_after_ms": retry_after_ms }),
            *retry_after_ms,
        ),
        TxResult::NotAttempted => {
            let ms = state.engine.config().retry_after_ms;
            retry_later(
                json!({ "status": "retryable_error", "message": "not attempted; retry later", "retry_after_ms": ms }),
                ms,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_told_apart_by_their_first_character_and_top_level_keys() {
        assert_eq!(other_shape(b"  [{\"op\":\"PUT\"}]"), Some(Shape::Entries));
        assert_eq!(other_shape(br#"{"batch":[]}"#), Some(Shape::Demo));
        assert_eq!(
            other_shape(br#"{"client_id":"c","crud":[]}"#),
            Some(Shape::Entries)
        );
        assert_eq!(other_shape(br#"{"transactions":1,"batch":[]}"#), None);
        assert_eq!(other_shape(br#"{"other":[]}"#), None);
        assert_eq!(other_shape(b"{not json"), None);
        assert_eq!(other_shape(b""), None);
    }

    #[test]
    fn consecutive_entries_with_one_tx_id_form_one_transaction() {
        let body = br#"[
            {"op":"PUT","type":"a","id":"1","tx_id":7,"data":{}},
            {"op":"PATCH","type":"a","id":"1","tx_id":7,"data":{}},
            {"op":"DELETE","type":"a","id":"1","tx_id":9},
            {"op":"PUT","type":"a","id":"2","tx_id":7,"data":{}}
        ]"#;
        let (client_id, groups) = parse_entries(body).ok().unwrap();
        assert_eq!(client_id, None);
        let sizes: Vec<usize> = groups.iter().map(|g| g.crud.len()).collect();
        assert_eq!(sizes, [2, 1, 1]);
        assert_eq!(groups[1].transaction_id, Some(json!(9)));
    }
}
