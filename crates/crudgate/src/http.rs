//! The HTTP face: `POST /api/data` in the reference contract, health and readiness. The other
//! request shapes clients send (see `dialects`) share its helpers.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

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
    /// Body bytes that may be in flight, in KiB (see `EngineConfig::bodies_in_flight`).
    bodies: Arc<Semaphore>,
}

impl AppState {
    pub fn new(engine: Engine, auth: Authenticator) -> Self {
        let cfg = engine.config();
        let budget = cfg.bodies_in_flight.max(cfg.body_limit);
        Self {
            bodies: Arc::new(Semaphore::new(kib(budget) as usize)),
            engine,
            auth: Arc::new(auth),
        }
    }
}

/// Body bytes as permits of the budget: KiB, within what one acquisition can take.
fn kib(bytes: usize) -> u32 {
    bytes.div_ceil(1024).min(u32::MAX as usize) as u32
}

/// The slowest average rate a body may arrive at, after the first idle window: a request's
/// share of the budget cannot be held for ever by a client sending a byte now and then.
const MIN_BODY_RATE: u64 = 16 * 1024;

/// Connections served at once, at most; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 4096;

/// `MAX_CONNECTIONS`, or fewer when the process may not open that many files: a reserve is
/// left for the database pool, the JWKS client and logging, which must keep working when
/// every connection slot is taken.
fn connection_slots() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    let files = if ok {
        usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
    } else {
        1024
    };
    files.saturating_sub(256).clamp(64, MAX_CONNECTIONS)
}

/// The accept loop: HTTP/1.1 on each connection, with a timeout for a request's head
/// (`client_idle_timeout_ms`) and the connection limit above, which `axum::serve` does not
/// set. On `shutdown`, stops accepting, lets requests in flight finish (an answer is only sent
/// after its COMMIT) and closes idle connections.
pub(crate) async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let head_timeout = state.engine.config().client_idle_timeout();
    let engine = state.engine.clone();
    let app = router(state);
    let max = connection_slots();
    let slots = Arc::new(Semaphore::new(max));
    let (closing, _) = tokio::sync::watch::channel(());
    let mut shutdown = pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("never closed"),
            () = &mut shutdown => break,
        };
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors, say: wait for some to be freed, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Answers are small and latency-bound: never let Nagle hold one back.
        let _ = tcp.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(
            app.clone()
                .map_request(|r: axum::http::Request<hyper::body::Incoming>| r.map(Body::new)),
        );
        let mut closing = closing.subscribe();
        tokio::spawn(async move {
            let _slot = slot;
            let mut conn = pin!(hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(head_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service));
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = closing.changed() => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
    }
    // New connections are refused from here on, not left waiting in the backlog.
    drop(listener);
    let _ = closing.send(());
    // Every connection gives its slot back when it is done; batches whose clients hung up are
    // finished too. A client that keeps its request open cannot hold the shutdown for longer
    // than it could hold a request.
    let drained = async {
        let _ = slots.acquire_many(max as u32).await;
        engine.finished().await;
    };
    if tokio::time::timeout(head_timeout, drained).await.is_err() {
        tracing::warn!(
            connections = max - slots.available_permits(),
            "shutting down with requests still open"
        );
    }
    Ok(())
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
    pub(crate) fn unavailable(message: impl Into<String>, retry_after_ms: u64) -> Self {
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
    let mut body = read_body(&state, &parts.headers, body).await?;
    let mut parsed = serde_json::from_slice::<Batch>(&body.bytes);
    if parsed.is_err() {
        if let Some(fixed) = protocol::without_lone_surrogates(&body.bytes) {
            body.bytes = Bytes::from(fixed);
            parsed = serde_json::from_slice::<Batch>(&body.bytes);
        }
    }
    let batch = match parsed {
        Ok(batch) => batch,
        // Only a body that is not a reference batch is looked at again, so the reference
        // path costs nothing more; and only a bad batch is explained (one more parse).
        Err(_) => match dialects::other_shape(&body.bytes) {
            Some(shape) => {
                return dialects::upload(&state, identity, &parts.headers, shape, body).await
            }
            None => {
                let why = protocol::explain::<Batch>("request", &body.bytes);
                return Err(ApiError::new(StatusCode::BAD_REQUEST, why.0));
            }
        },
    };
    check_limits(&state, &batch)?;
    let results = apply(&state, identity, &parts.headers, batch, body.budget).await?;
    Ok(Json(BatchResponse { results }).into_response())
}

/// Applies a checked batch for an authenticated caller: what every request shape shares.
/// A database that is unavailable before anything was applied is a 503.
pub(crate) async fn apply(
    state: &AppState,
    identity: Identity,
    headers: &HeaderMap,
    batch: Batch,
    budget: Budget,
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
    let outcome = state.engine.apply_holding(ctx, batch, budget).await;
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
            if outcome.maybe_applied {
                "database connection lost while committing; the outcome is unknown: a resend \
                 with the same client id and transaction ids is answered with it"
            } else {
                "database unavailable; nothing was applied"
            },
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

/// A request body's share of `bodies_in_flight`. Held until its batch is applied, also when
/// that outlives the request (a client that hangs up, see `Engine::apply`): the parsed batch
/// takes memory that long.
#[derive(Clone, Default)]
pub(crate) struct Budget {
    _held: Option<Arc<OwnedSemaphorePermit>>,
}

/// A request body, read whole, and its share of the budget.
pub(crate) struct ReadBody {
    pub bytes: Bytes,
    pub budget: Budget,
}

/// Reads the body, taking its share of the budget as bytes arrive (a client that declares a
/// large body and then trickles holds only what it sent). Refuses one over the configured size
/// (413), one that stalls or arrives slower than `MIN_BODY_RATE` after the first idle window
/// (408), one cut short (400), and one that waited the idle timeout for budget (503: the
/// server is busy with other uploads; nothing was applied).
pub(crate) async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<ReadBody, ApiError> {
    let cfg = state.engine.config();
    let limit = cfg.body_limit;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body exceeds {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let idle = cfg.client_idle_timeout();
    let busy = || {
        ApiError::unavailable(
            "busy with other uploads; nothing was applied",
            cfg.retry_after_ms,
        )
    };
    let take = |kib: u32| tokio::time::timeout(idle, state.bodies.clone().acquire_many_owned(kib));
    let mut budget = take(1).await.map_err(|_| busy())?.expect("never closed");
    let started = tokio::time::Instant::now();
    let slow = || {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "request body stalled for {} ms or arrived slower than {} KiB/s",
                idle.as_millis(),
                MIN_BODY_RATE / 1024
            ),
        )
    };
    let mut chunks = body.into_data_stream();
    let mut parts: Vec<Bytes> = Vec::new();
    let mut len = 0;
    loop {
        // The first idle window, then time only for the bytes that actually arrived.
        let earned = started + idle + std::time::Duration::from_secs(len as u64 / MIN_BODY_RATE);
        let next = tokio::time::timeout_at(
            earned.min(tokio::time::Instant::now() + idle),
            chunks.next(),
        );
        match next.await {
            Err(_) => return Err(slow()),
            Ok(None) => break,
            Ok(Some(Err(_))) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "request body incomplete or malformed",
                ))
            }
            Ok(Some(Ok(chunk))) => {
                len += chunk.len();
                if len > limit {
                    return Err(too_large());
                }
                let held = budget.num_permits() as u32;
                if kib(len) > held {
                    let more = take(kib(len) - held).await.map_err(|_| busy())?;
                    budget.merge(more.expect("never closed"));
                }
                parts.push(chunk);
            }
        }
    }
    let mut bytes = match parts.len() {
        1 => parts.pop().expect("one part"),
        _ => Bytes::from(parts.concat()),
    };
    // A UTF-8 byte-order mark (some .NET and Windows writers emit one) is not JSON; refused,
    // the upload would be resent for ever.
    if bytes.starts_with(b"\xEF\xBB\xBF") {
        bytes = bytes.slice(3..);
    }
    Ok(ReadBody {
        bytes,
        budget: Budget {
            _held: Some(Arc::new(budget)),
        },
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
