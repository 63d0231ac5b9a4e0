//! An app that embeds crudgate: its own routes and crudgate's write endpoint in one axum
//! router, and an application rule enforced by a [`WriteHook`] before any SQL runs.

use axum::routing::get;
use axum::{Json, Router};
use crudgate::protocol::{OpKind, Operation};
use crudgate::{AppState, Context, Rejection, WriteHook};
use serde_json::{json, Value};

/// The error code the app's clients see (and find in `crudgate.rejections`) for a too-long
/// to-do description.
pub const DESCRIPTION_TOO_LONG: &str = "DESCRIPTION_TOO_LONG";

/// Refuses a `todos` description longer than `max_chars` characters (not bytes: what a user
/// typed is what counts). A refusal rejects the whole client transaction as `fatal_error`, is
/// recorded in the rejections table, and the client drops it instead of retrying forever.
pub struct DescriptionLimit {
    pub max_chars: usize,
}

impl WriteHook for DescriptionLimit {
    fn check(&self, _ctx: &Context, op: &Operation) -> Result<(), Rejection> {
        if op.table != "todos" || op.op == OpKind::Delete {
            return Ok(());
        }
        // Only a text value can be too long; other types are the engine's to judge.
        let Some(Value::String(text)) = op.op_data.as_ref().and_then(|d| d.get("description"))
        else {
            return Ok(());
        };
        let chars = text.chars().count();
        if chars <= self.max_chars {
            return Ok(());
        }
        Err(Rejection::new(
            DESCRIPTION_TOO_LONG,
            format!(
                "a to-do description has at most {} characters, this one has {chars}",
                self.max_chars
            ),
            json!({ "table": "todos", "column": "description", "max_chars": self.max_chars, "chars": chars }),
        ))
    }
}

/// The app's router: its own routes next to crudgate's (`POST /api/data`, the REST and other
/// upload shapes, `/health`, `/ready`, `/metrics`).
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/hello", get(hello))
        .merge(crudgate::router(state))
}

async fn hello() -> Json<Value> {
    Json(json!({ "hello": "from the app that embeds crudgate" }))
}
