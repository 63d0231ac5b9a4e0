//! Placeholder until JWT verification lands: only `mode = "none"`.

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    None,
    #[default]
    Jwt,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct AuthConfig {
    pub mode: AuthMode,
}

pub struct Identity {
    pub user_id: Option<String>,
    pub claims: serde_json::Value,
}

pub enum AuthError {
    Unauthorized(String),
    Unavailable(String),
}

#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub struct Authenticator;

impl Authenticator {
    pub fn new(cfg: &AuthConfig) -> Result<Self, ConfigError> {
        match cfg.mode {
            AuthMode::None => Ok(Authenticator),
            AuthMode::Jwt => Err(ConfigError("JWT verification is not available yet".into())),
        }
    }
    pub async fn authenticate(&self, _authorization: Option<&str>) -> Result<Identity, AuthError> {
        Ok(Identity {
            user_id: None,
            claims: serde_json::Value::Null,
        })
    }
}
