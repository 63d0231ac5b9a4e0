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
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Inspect, replay or purge rejected transactions (the dead-letter table).
    #[command(subcommand)]
    Rejections(RejectionsCommand),
}

#[derive(Debug, clap::Subcommand)]
pub enum RejectionsCommand {
    /// List rejections, newest first.
    List {
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        table: Option<String>,
        #[arg(long)]
        code: Option<String>,
        /// Only those younger than this (e.g. 30m, 24h, 7d).
        #[arg(long, value_parser = parse_duration)]
        since: Option<u64>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Apply stored rejected transactions again and record the new outcome.
    Replay {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Delete rejections older than a duration (e.g. 30d).
    Purge {
        #[arg(long, value_parser = parse_duration)]
        older_than: u64,
    },
}

/// `90s`, `30m`, `24h`, `7d` (or plain seconds) as seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("not a duration: {s:?}"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(format!("unknown unit in {s:?}: use s, m, h, d or w")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("duration too large: {s:?}"))
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
            let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
            // Other tools share the prefix (CRUDGATE_BIN in test harnesses): only variables
            // naming one of our sections or top-level keys are configuration.
            if !TOP_LEVEL_KEYS.contains(&path[0].as_str()) {
                continue;
            }
            set_path(&mut doc, &path, env_value(&value))
                .with_context(|| format!("environment variable {key}"))?;
        }
        let auth_in_file_or_env = doc.contains_key("auth");
        let unlisted_chosen = doc
            .get("engine")
            .and_then(|e| e.get("allow_unlisted_tables"))
            .is_some();
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
        let auth_chosen = args.auth.is_some() || auth_in_file_or_env;
        if embedded && !auth_chosen {
            settings.auth.mode = AuthMode::None;
        }
        // Likewise its demo tables are writable without rules, unless rules are given.
        if embedded && settings.engine.tables.is_empty() && !unlisted_chosen {
            settings.engine.allow_unlisted_tables = true;
        }
        Ok(settings)
    }
}

const TOP_LEVEL_KEYS: [&str; 5] = ["database_url", "listen", "log_format", "engine", "auth"];

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
