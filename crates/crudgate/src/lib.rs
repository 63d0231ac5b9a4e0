//! crudgate: the write path of PowerSync apps.
//!
//! Clients queue their writes locally and upload them to a backend that must apply them to
//! Postgres before answering (a write the next sync checkpoint does not contain vanishes from the
//! device). crudgate is that backend: it speaks PowerSync's reference write API, checks every
//! operation against the live catalog before any SQL runs, applies each client transaction
//! atomically with bulk statements, and tells temporary failures (retry) from bad data
//! (acknowledge and reject) so a client's queue is never blocked by mistake.
//!
//! The data path, module by module: [`protocol`] (wire) → [`auth`] → [`schema`] → rules
//! (authorization) → plan (check, coerce, group) → execute → respond ([`http`]). Other request
//! shapes clients send (REST per operation, the Node demo's batch, raw SDK queue entries) are
//! translated into the same batches by `dialects`.
//!
//! Embedding: build an [`Engine`], wrap it with an [`Authenticator`](auth::Authenticator) in an
//! [`AppState`], and mount [`router`] in your own axum app; or call [`Engine::apply`] directly.

pub mod auth;
mod classify;
mod coerce;
pub mod config;
mod dialects;
mod execute;
mod http;
mod ledger;
mod metrics;
mod plan;
pub mod protocol;
pub mod rejections;
mod rules;
pub mod schema;

pub use classify::{classify, Disposition};
pub use config::EngineConfig;
pub use execute::{Engine, Outcome, StartError};
pub use http::{router, AppState};
pub use metrics::Metrics;
pub use plan::{Context, Rejection, WriteHook};

/// The PowerSync to-do demo schema used by the zero-configuration run and the examples.
pub const DEMO_SCHEMA: &str = include_str!("demo.sql");

/// Serves the router until `shutdown` resolves, then finishes the requests in flight: a
/// response is only ever sent after its COMMIT, so none is cut off halfway. Slow or idle
/// connections are closed and at most a few thousand are served at once (see `http::serve`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    http::serve(listener, state, shutdown).await
}
