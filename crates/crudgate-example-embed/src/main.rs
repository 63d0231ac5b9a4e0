//! Runs the example app.
//!
//! ```sh
//! DATABASE_URL=postgres://… AUTH_AUDIENCE=powersync-dev AUTH_HS256_SECRET=<base64url> \
//!     cargo run -p crudgate-example-embed
//! ```
//!
//! Without `AUTH_HS256_SECRET` the app runs without authentication (every write is anonymous):
//! for local development only.

use std::sync::Arc;

use anyhow::Context as _;
use crudgate::auth::{AuthConfig, AuthMode, Authenticator};
use crudgate::{AppState, Engine, EngineConfig, WriteHook};
use crudgate_example_embed::{app, DescriptionLimit};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let database_url = std::env::var("DATABASE_URL").context("DATABASE_URL is not set")?;
    let listen = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:8080".into());

    let auth = match std::env::var("AUTH_HS256_SECRET") {
        Ok(secret) => AuthConfig {
            mode: AuthMode::Jwt,
            audiences: vec![std::env::var("AUTH_AUDIENCE").context("AUTH_AUDIENCE is not set")?],
            hs256_secret: Some(secret),
            ..Default::default()
        },
        Err(_) => {
            // `Authenticator::new` warns that authentication is off.
            AuthConfig {
                mode: AuthMode::None,
                ..Default::default()
            }
        }
    };
    let auth = Authenticator::new(&auth).context("auth configuration")?;

    // The demo's tables have no write rules; a real app lists its tables instead.
    let cfg = EngineConfig {
        allow_unlisted_tables: true,
        ..Default::default()
    };
    let hooks: Vec<Arc<dyn WriteHook>> = vec![Arc::new(DescriptionLimit { max_chars: 500 })];
    let engine = Engine::connect(&database_url, cfg, hooks).await?;

    let listener = tokio::net::TcpListener::bind(&listen).await?;
    tracing::info!(%listen, "serving");
    axum::serve(listener, app(AppState::new(engine, auth)))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
