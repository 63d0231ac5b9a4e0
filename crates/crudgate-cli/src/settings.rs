//! Layered configuration: defaults, then the TOML file (`--config`), then `CRUDGATE_*`
//! environment variables (`CRUDGATE_ENGINE__ON_FATAL=skip` sets `[engine] on_fatal`), then
//! flags. `crudgate.example.toml` documents every key.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use crudgate::auth::{AuthConfig, AuthMode};
use crudgate::EngineConfig;
use serde::Deserialize;

#[derive(Debug, Parser)]
#[command(name = "crudgate", version, about = "The write path of PowerSync apps")]
pub struct Args {
    /// TOML configuration file.
    #[arg(long, env = "CRUDGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Postgres URL; without one, a throwaway cluster with the demo schema is started.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Address to listen on (port 0 picks a free one).
    #[arg(long)]
    pub listen: Option<String>,
    /// Authentication mode: `jwt` or `none` (development only).
    #[arg(long, value_parser = ["none", "jwt"])]
    pub auth: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub database_url: Option<String>,
    pub listen: String,
    /// `text` or `json`.
    pub log_format: String,
    pub engine: EngineConfig,
    pub auth: AuthConfig,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            database_url: None,
            listen: "127.0.0.1:8080".into(),
            log_format: "text".into(),
            engine: EngineConfig::default(),
            auth: AuthConfig::default(),
        }
    }
}

impl Settings {
    pub fn load(args: &Args) -> anyhow::Result<Settings> {
        let mut doc = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                text.parse::<toml::Table>()
                    .with_context(|| format!("invalid TOML in {}", path.display()))?
            }
            None => toml::Table::new(),
        };
        for (key, value) in std::env::vars() {
            let Some(rest) = key.strip_prefix("CRUDGATE_") else {
                continue;
            };
            if rest == "CONFIG" {
                continue;
            }
            let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
            set_path(&mut doc, &path, env_value(&value))
                .with_context(|| format!("environment variable {key}"))?;
        }
        let mut settings: Settings = toml::Value::Table(doc)
            .try_into()
            .context("invalid configuration")?;
        if let Some(url) = &args.database_url {
            settings.database_url = Some(url.clone());
        }
        if let Some(listen) = &args.listen {
            settings.listen = listen.clone();
        }
        if let Some(mode) = &args.auth {
            settings.auth.mode = if mode == "none" {
                AuthMode::None
            } else {
                AuthMode::Jwt
            };
        }
        // The throwaway demo database is for trying crudgate out: without an explicit auth
        // setting it runs without authentication (and says so loudly at start).
        let embedded = settings.database_url.as_deref().is_none_or(str::is_empty);
        let auth_chosen = args.auth.is_some()
            || std::env::var_os("CRUDGATE_AUTH__MODE").is_some()
            || args.config.is_some();
        if embedded && !auth_chosen {
            settings.auth.mode = AuthMode::None;
        }
        Ok(settings)
    }
}

/// An environment value as TOML when it reads as a TOML value (`50`, `true`, `["a"]`),
/// otherwise as a plain string.
fn env_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn set_path(doc: &mut toml::Table, path: &[String], value: toml::Value) -> anyhow::Result<()> {
    match path {
        [] => anyhow::bail!("empty key"),
        [last] => {
            doc.insert(last.clone(), value);
            Ok(())
        }
        [first, rest @ ..] => {
            let entry = doc
                .entry(first.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(t) => set_path(t, rest, value),
                _ => anyhow::bail!("{first} is not a section"),
            }
        }
    }
}
