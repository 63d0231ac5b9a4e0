//! The HTTP face: `POST /api/data` in the reference contract, health and readiness. The other
//! request shapes clients send (see `dialects`) share its helpers.

use std::sync::Arc;

use axum::body::{to_bytes, Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::auth::{AuthError, Authenticator, Identity};
use crate::dialects;
use crate::execute::Engine;
use crate::plan::Context;
use crate::protocol::{self, Batch, BatchResponse, TxResult};

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub(crate) engine: Engine,
    auth: Arc<Authenticator>,
}

impl AppState {
    pub fn new(engine: Engine, auth: Authenticator) -> Self {
        Self {
            engine,
            auth: Arc::new(auth),
        }
    }
}

/// The crudgate routes, ready to be served or nested in an embedder's own router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/data", post(upload))
        .route("/health", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .merge(dialects::routes())
        .with_state(state)
}

/// An error answer: `{"message": …}` with the right status.
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
    retry_after_ms: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after_ms: None,
        }
    }
    fn unavailable(message: impl Into<String>, retry_after_ms: u64) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            retry_after_ms: Some(retry_after_ms),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (self.status, Json(json!({ "message": self.message }))).into_response();
        if let Some(ms) = self.retry_after_ms {
            let secs = ms.div_ceil(1000).max(1);
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.engine.metrics().render(),
    )
        .into_response()
}

async fn ready(State(state): State<AppState>) -> Response {
    if state.engine.ready().await {
        Json(json!({ "status": "ready" })).into_response()
    } else {
        ApiError::unavailable("database unavailable or schema not loaded", 1000).into_response()
    }
}

async fn upload(State(state): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let identity = authenticate(&state, &parts.headers).await?;
    let bytes = read_body(&state, body).await?;
    let batch = match serde_json::from_slice::<Batch>(&bytes) {
        Ok(batch) => batch,
        // Only a body that is not a reference batch is looked at again, so the reference
        // path costs nothing more; and only a bad batch is explained (one more parse).
        Err(_) => match dialects::other_shape(&bytes) {
            Some(shape) => {
                return dialects::upload(&state, identity, &parts.headers, shape, &bytes).await
            }
            None => {
                let why = protocol::explain::<Batch>("request", &bytes);
                return Err(ApiError::new(StatusCode::BAD_REQUEST, why.0));
            }
        },
    };
    check_limits(&state, &batch)?;
    let results = apply(&state, identity, &parts.headers, batch).await?;
    Ok(Json(BatchResponse { results }).into_response())
}

/// Applies a checked batch for an authenticated caller: what every request shape shares.
/// A database that is unavailable before anything was applied is a 503.
pub(crate) async fn apply(
    state: &AppState,
    identity: Identity,
    headers: &HeaderMap,
    batch: Batch,
) -> Result<Vec<TxResult>, ApiError> {
    let client_id = batch.client_id.clone().or_else(|| {
        headers
            .get("powersync-client-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });
    let ctx = Context {
        user_id: identity.user_id,
        claims: identity.claims,
        client_id,
    };
    // What the debug line needs, taken only when it will be written.
    let logged = tracing::enabled!(tracing::Level::DEBUG).then(|| {
        let ops: usize = batch.transactions.iter().map(|t| t.crud.len()).sum();
        let client_id = ctx.client_id.clone().unwrap_or_default();
        (
            batch.transactions.len(),
            ops,
            client_id,
            std::time::Instant::now(),
        )
    });
    let outcome = state.engine.apply(ctx, batch).await;
    if let Some((transactions, ops, client_id, started)) = logged {
        tracing::debug!(
            transactions,
            ops,
            client_id,
            elapsed_us = started.elapsed().as_micros() as u64,
            "batch applied"
        );
    }
    if outcome.unavailable {
        return Err(ApiError::unavailable(
            "database unavailable; nothing was applied",
            state.engine.config().retry_after_ms,
        ));
    }
    Ok(outcome.results)
}

pub(crate) async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<crate::auth::Identity, ApiError> {
    let header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    state.auth.authenticate(header).await.map_err(|e| match e {
        AuthError::Unauthorized(m) => ApiError::new(StatusCode::UNAUTHORIZED, m),
        AuthError::Unavailable(m) => ApiError::unavailable(m, state.engine.config().retry_after_ms),
    })
}

/// Reads the body, refusing one over the configured size.
pub(crate) async fn read_body(state: &AppState, body: Body) -> Result<Bytes, ApiError> {
    let limit = state.engine.config().body_limit;
    to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body exceeds {limit} bytes"),
        )
    })
}

/// Checks a parsed batch against the request limits.
pub(crate) fn check_limits(state: &AppState, batch: &Batch) -> Result<(), ApiError> {
    let cfg = state.engine.config();
    let txs = batch.transactions.len();
    if txs == 0 || txs > cfg.max_transactions {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "a request carries 1 to {} transactions, this one has {txs}",
                cfg.max_transactions
            ),
        ));
    }
    let ops: usize = batch.transactions.iter().map(|t| t.crud.len()).sum();
    check_operations(state, ops)
}

/// Checks the number of operations in one request.
pub(crate) fn check_operations(state: &AppState, ops: usize) -> Result<(), ApiError> {
    let max = state.engine.config().max_operations;
    if ops > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a request carries at most {max} operations, this one has {ops}"),
        ));
    }
    Ok(())
}
