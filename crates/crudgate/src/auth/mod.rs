//! JWT verification for the write endpoint.
//!
//! A PowerSync app sends the write endpoint the same JWT it gives the PowerSync service, so
//! this module accepts exactly what the PowerSync service accepts (and nothing the service
//! would refuse), see REFERENCE.md §5:
//!
//! - **Keys** come from a JWKS URL (fetched with a timeout, cached, refetched on an unknown
//!   `kid` at most once per `jwks_min_refetch_secs`), an inline JWKS document, PEM public
//!   keys, and, for development only, an HS256 secret. All sources may be combined.
//! - **Algorithms** RS256/384/512, ES256/384/512, EdDSA (Ed25519), and HS256 only with a
//!   configured symmetric key. The algorithm is decided by the *key* (see [`keys`]): `alg:
//!   none` and an HS256 token "signed" with an RSA/EC/OKP public key are refused.
//! - **Key choice** (as PowerSync's key store): a key whose `kid` equals the token's is *the*
//!   key, and no other is tried. Otherwise the "wildcard" keys (configured without a `kid`)
//!   are tried, for tokens with or without a `kid`. A token without a `kid` may also use the
//!   only key when exactly one is configured/published. A token with an unknown `kid` first
//!   triggers a JWKS refetch (rotation), and only then falls back to wildcard keys.
//! - **Claims**: `sub` (non-empty string), `iat`, `exp`, `aud` required; `aud` (string or
//!   array) must contain a configured audience; `exp - iat` at most `max_lifetime_secs`;
//!   `leeway_secs` of clock skew on `exp`, `nbf` and `iat`; `iss` only when configured
//!   (PowerSync does not check it).
//!
//! Failures are [`AuthError::Unauthorized`] (401: the token is bad) or
//! [`AuthError::Unavailable`] (503: we could not get keys to decide; the client retries).
//! Messages say which check failed and never contain the token or claim values. Logs carry
//! only `kid`, `alg` and the reason.
//!
//! Crates: `jsonwebtoken` (v9 and v10) has no ES512 (its `Algorithm` stops at ES384), so it
//! would need a second, hand-written path for P-521 anyway, and its claim validation does not
//! cover the lifetime rule. Verification therefore uses the RustCrypto primitives directly
//! (`rsa`, `p256`, `p384`, `p521`, `ed25519-dalek`, `hmac`, `sha2`) behind one key type whose
//! algorithm rules are explicit ([`keys`]); the JWS compact framing is small ([`token`]).
//! `reqwest` (rustls, no default features) fetches the JWKS.

mod jwks;
mod keys;
mod token;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::Value;

use jwks::{Reason, RemoteJwks};
use keys::{JwkOrigin, Key};
use token::ClaimRules;

/// The `[auth]` section of the configuration.
///
/// Every field has a default (see [`AuthConfig::default`]); unknown keys are an error so a
/// typo cannot silently disable a check. The default mode is `jwt`, and [`Authenticator::new`]
/// refuses a `jwt` configuration without audiences or without any key source, so a server
/// can never run "authenticated" with nothing to authenticate against. Running without
/// authentication needs an explicit `mode = "none"`.
///
/// ```toml
/// [auth]
/// audiences = ["https://myinstance.powersync.journeyapps.com"]
/// jwks_url = "https://example.com/.well-known/jwks.json"
/// # jwks = '{"keys":[...]}'                       # inline JWKS
/// # public_keys = [{ kid = "k1", pem = "-----BEGIN PUBLIC KEY-----..." }]
/// # hs256_secret = "base64url, >= 32 bytes"       # development only
/// ```
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `"jwt"` (default) or `"none"` (no authentication: every request has no user).
    pub mode: AuthMode,
    /// Accepted `aud` values; a token must carry at least one. Required in `jwt` mode.
    pub audiences: Vec<String>,
    /// When set, `iss` must equal it. PowerSync itself does not check `iss`.
    pub issuer: Option<String>,
    /// JWKS endpoint (http or https).
    pub jwks_url: Option<String>,
    /// An inline JWKS document (JSON text). May hold `kty: "oct"` HS256 keys, like PowerSync's
    /// own configuration; such keys are never accepted from `jwks_url`.
    pub jwks: Option<String>,
    /// PEM public keys (SPKI, or PKCS#1 for RSA), each with an optional `kid`.
    pub public_keys: Vec<PemKey>,
    /// HS256 secret, **base64url-encoded** (as a JWK `k`), at least 32 bytes once decoded.
    /// For development; the key has no `kid`, so it serves tokens without one.
    pub hs256_secret: Option<String>,
    /// Largest accepted `exp - iat`, in seconds. Default 86400 (one day, as PowerSync).
    pub max_lifetime_secs: u64,
    /// Clock skew allowed on `exp`, `nbf` and `iat`, in seconds. Default 60.
    pub leeway_secs: u64,
    /// Timeout of one JWKS fetch (connect and whole response), in ms. Default 5000.
    pub jwks_timeout_ms: u64,
    /// At most one JWKS fetch per this many seconds, whatever triggers it. Default 30.
    pub jwks_min_refetch_secs: u64,
    /// Fetched keys older than this are refreshed in the background on use. Default 3600.
    pub jwks_cache_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::Jwt,
            audiences: Vec::new(),
            issuer: None,
            jwks_url: None,
            jwks: None,
            public_keys: Vec::new(),
            hs256_secret: None,
            max_lifetime_secs: 86_400,
            leeway_secs: 60,
            jwks_timeout_ms: 5_000,
            jwks_min_refetch_secs: 30,
            jwks_cache_secs: 3_600,
        }
    }
}

// Manual Debug: the HS256 secret (and any oct key in the inline JWKS) must not reach logs.
impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |o: &Option<String>| o.as_ref().map(|_| "<redacted>");
        f.debug_struct("AuthConfig")
            .field("mode", &self.mode)
            .field("audiences", &self.audiences)
            .field("issuer", &self.issuer)
            .field("jwks_url", &self.jwks_url)
            .field("jwks", &redacted(&self.jwks))
            .field("public_keys", &self.public_keys)
            .field("hs256_secret", &redacted(&self.hs256_secret))
            .field("max_lifetime_secs", &self.max_lifetime_secs)
            .field("leeway_secs", &self.leeway_secs)
            .field("jwks_timeout_ms", &self.jwks_timeout_ms)
            .field("jwks_min_refetch_secs", &self.jwks_min_refetch_secs)
            .field("jwks_cache_secs", &self.jwks_cache_secs)
            .finish()
    }
}

/// Whether requests are authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// No authentication: every request gets an [`Identity`] without a user. Tokens are ignored.
    None,
    /// Verify a JWT on every request.
    #[default]
    Jwt,
}

/// One configured PEM public key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PemKey {
    /// Matched against the token header `kid`; without one the key serves tokens without a kid.
    pub kid: Option<String>,
    /// The PEM text.
    pub pem: String,
}

/// Who made the request.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// The verified `sub`; `None` in mode `none`.
    pub user_id: Option<String>,
    /// All verified claims; `Value::Null` in mode `none`.
    pub claims: Value,
}

/// Why a request is not authenticated. `Display` is the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The credentials are missing or invalid (HTTP 401). The message names the failed check.
    #[error("{0}")]
    Unauthorized(String),
    /// No key could be obtained to decide (JWKS endpoint down, slow or returning garbage, and
    /// no cached key for this token). Temporary: HTTP 503 with Retry-After, never 401.
    #[error("{0}")]
    Unavailable(String),
}

/// The `[auth]` configuration is unusable. `Display` says why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid [auth] configuration: {0}")]
pub struct ConfigError(String);

/// Verifies requests' credentials. Cheap to clone (shared state behind an `Arc`).
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    mode: AuthMode,
    audiences: Vec<String>,
    issuer: Option<String>,
    max_lifetime_secs: u64,
    leeway_secs: u64,
    /// Keys from the configuration: inline JWKS, PEM keys, HS256 secret.
    static_keys: Vec<Key>,
    remote: Option<Arc<RemoteJwks>>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("mode", &self.inner.mode)
            .field("audiences", &self.inner.audiences)
            .field("static_keys", &self.inner.static_keys)
            .field("jwks_url", &self.inner.remote.is_some())
            .finish()
    }
}

fn unauthorized(msg: impl Into<String>) -> AuthError {
    AuthError::Unauthorized(msg.into())
}

impl Authenticator {
    /// Builds an authenticator, validating the configuration: `jwt` mode needs at least one
    /// audience and at least one key source, and every configured key must parse. The JWKS
    /// URL is not contacted here (the server may start before its identity provider); the
    /// first request fetches it.
    pub fn new(cfg: &AuthConfig) -> Result<Self, ConfigError> {
        let err = |m: String| ConfigError(m);
        let mut inner = Inner {
            mode: cfg.mode,
            audiences: cfg.audiences.clone(),
            issuer: cfg.issuer.clone(),
            max_lifetime_secs: cfg.max_lifetime_secs,
            leeway_secs: cfg.leeway_secs,
            static_keys: Vec::new(),
            remote: None,
        };
        if cfg.mode == AuthMode::None {
            tracing::warn!(
                "AUTHENTICATION IS OFF (auth.mode = \"none\"): anyone who can reach this server \
                 can write to the database. Use it for development only."
            );
            return Ok(Authenticator {
                inner: Arc::new(inner),
            });
        }
        if cfg.audiences.is_empty() || cfg.audiences.iter().any(|a| a.is_empty()) {
            return Err(err(
                "auth.audiences must list at least one non-empty audience in jwt mode".into(),
            ));
        }
        if cfg.max_lifetime_secs == 0 {
            return Err(err("auth.max_lifetime_secs must be positive".into()));
        }
        if let Some(text) = &cfg.jwks {
            let doc: Value = serde_json::from_str(text)
                .map_err(|_| err("auth.jwks is not valid JSON".into()))?;
            let entries = doc
                .get("keys")
                .and_then(Value::as_array)
                .ok_or_else(|| err("auth.jwks has no \"keys\" array".into()))?;
            // Unlike a fetched JWKS, a configured one is strict: a key we cannot use is a typo.
            for (i, jwk) in entries.iter().enumerate() {
                let key = Key::from_jwk(jwk, JwkOrigin::Config)
                    .map_err(|e| err(format!("auth.jwks key #{i}: {}", e.0)))?;
                inner.static_keys.push(key);
            }
        }
        for (i, pk) in cfg.public_keys.iter().enumerate() {
            let key = Key::from_pem(pk.kid.clone(), &pk.pem)
                .map_err(|e| err(format!("auth.public_keys[{i}]: {}", e.0)))?;
            inner.static_keys.push(key);
        }
        if let Some(secret) = &cfg.hs256_secret {
            let key = Key::from_hs256_secret(secret)
                .map_err(|e| err(format!("auth.hs256_secret: {}", e.0)))?;
            tracing::warn!("HS256 secret configured: meant for development only");
            inner.static_keys.push(key);
        }
        if let Some(url) = &cfg.jwks_url {
            let parsed = reqwest::Url::parse(url)
                .map_err(|_| err("auth.jwks_url is not a valid URL".into()))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(err("auth.jwks_url must be http or https".into()));
            }
            if cfg.jwks_timeout_ms == 0 {
                return Err(err("auth.jwks_timeout_ms must be positive".into()));
            }
            let remote = RemoteJwks::new(
                url.clone(),
                Duration::from_millis(cfg.jwks_timeout_ms),
                Duration::from_secs(cfg.jwks_min_refetch_secs),
                Duration::from_secs(cfg.jwks_cache_secs),
            )
            .map_err(err)?;
            inner.remote = Some(Arc::new(remote));
        }
        if inner.static_keys.is_empty() && inner.remote.is_none() {
            return Err(err(
                "jwt mode needs a key source: auth.jwks_url, auth.jwks, auth.public_keys or \
                 auth.hs256_secret"
                    .into(),
            ));
        }
        Ok(Authenticator {
            inner: Arc::new(inner),
        })
    }

    /// Authenticates a request from its `Authorization` header value (`Bearer <jwt>` or
    /// `Token <jwt>`, scheme case-insensitive).
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Identity, AuthError> {
        let inner = &self.inner;
        if inner.mode == AuthMode::None {
            return Ok(Identity {
                user_id: None,
                claims: Value::Null,
            });
        }
        let result = self.verify(authorization).await;
        if let Err(e) = &result {
            tracing::debug!(reason = %e, "request not authenticated");
        }
        result
    }

    async fn verify(&self, authorization: Option<&str>) -> Result<Identity, AuthError> {
        let inner = &self.inner;
        let raw = token_from_header(authorization)?;
        let parsed = token::parse(raw).map_err(unauthorized)?;
        let kid = parsed.kid.as_deref();

        let mut snap = None;
        // Whether this request already caused (or waited for) a fetch.
        let mut refreshed = false;
        // Whether that fetch was refused by the rate limit, so the key set was not asked.
        let mut not_asked = false;
        if let Some(remote) = &inner.remote {
            let mut s = remote.snapshot();
            if s.fetched_at.is_none() {
                s = remote.refresh(s.generation, Reason::InitialLoad).await;
                refreshed = true;
            } else if remote.is_stale(&s) {
                remote.refresh_in_background(s.generation);
            }
            snap = Some(s);
        }

        loop {
            let remote_keys: &[Key] = snap.as_ref().map_or(&[], |s| s.keys.as_slice());
            // Wildcard fallback for a kid'd token only once the JWKS had its chance to show
            // the kid, so a rotated key is found even when wildcard keys are configured.
            let wildcards_ok = inner.remote.is_none() || refreshed;
            let candidates = select_keys(&inner.static_keys, remote_keys, kid, wildcards_ok);
            if !candidates.is_empty() {
                // Keys without a kid standing in for a kid nobody could look up (the JWKS
                // fetch failed or was not allowed yet): if they refuse the token, it may still
                // be signed by a rotated key, so that is temporary, never a 401.
                let unsure = kid.is_some()
                    && candidates.iter().all(|k| k.kid().is_none())
                    && (not_asked || snap.as_ref().is_some_and(|s| s.last_error.is_some()));
                let refuse = |reason: String| {
                    if unsure {
                        let why = snap
                            .as_ref()
                            .and_then(|s| s.last_error.clone())
                            .unwrap_or_else(|| "the key set cannot be fetched again yet".into());
                        tracing::warn!(kid, alg = parsed.alg.name(), reason = %why, "no key for the kid");
                        AuthError::Unavailable(format!("cannot verify the token now: {why}"))
                    } else {
                        unauthorized(reason)
                    }
                };
                let usable: Vec<&Key> = candidates
                    .into_iter()
                    .filter(|k| k.allows(parsed.alg))
                    .collect();
                if usable.is_empty() {
                    tracing::info!(
                        kid,
                        alg = parsed.alg.name(),
                        "algorithm not allowed for key"
                    );
                    return Err(refuse(format!(
                        "token algorithm {} is not allowed for its key",
                        parsed.alg.name()
                    )));
                }
                let valid = usable
                    .iter()
                    .any(|k| k.verify(parsed.alg, parsed.signing_input, &parsed.signature));
                if !valid {
                    tracing::info!(kid, alg = parsed.alg.name(), "bad signature");
                    return Err(refuse("token signature is invalid".into()));
                }
                break;
            }
            // No key for this token: the key set may have rotated. Refetch once (rate-limited).
            match (&inner.remote, snap.as_ref()) {
                (Some(remote), Some(s)) if !refreshed => {
                    let before = s.generation;
                    let now = remote.refresh(before, Reason::UnknownKid).await;
                    not_asked = now.generation == before;
                    snap = Some(now);
                    refreshed = true;
                    continue;
                }
                (_, Some(s)) if s.last_error.is_some() => {
                    // We could not ask the key source; the token may be fine.
                    let why = s.last_error.as_deref().unwrap_or("JWKS fetch failed");
                    tracing::warn!(kid, alg = parsed.alg.name(), reason = why, "no usable key");
                    return Err(AuthError::Unavailable(format!(
                        "cannot verify the token now: {why}"
                    )));
                }
                _ if not_asked => {
                    // Someone else's unknown kid used up the refetch budget a moment ago; a
                    // key published since then would be refused for good by a 401.
                    tracing::info!(
                        kid,
                        alg = parsed.alg.name(),
                        "unknown key id, refetch rate-limited"
                    );
                    return Err(AuthError::Unavailable(
                        "the token's key id is not among the keys fetched last, and the key set \
                         cannot be fetched again yet"
                            .into(),
                    ));
                }
                _ => {
                    if let (Some(remote), true) = (&inner.remote, refreshed) {
                        remote.note_unknown_kid_answered();
                    }
                    tracing::info!(kid, alg = parsed.alg.name(), "unknown key id");
                    return Err(unauthorized(if kid.is_some() {
                        "unknown key id (kid)"
                    } else {
                        "token has no kid and no key without a kid matches"
                    }));
                }
            }
        }

        let claims = parsed.claims().map_err(unauthorized)?;
        let rules = ClaimRules {
            audiences: &inner.audiences,
            issuer: inner.issuer.as_deref(),
            max_lifetime_secs: inner.max_lifetime_secs,
            leeway_secs: inner.leeway_secs,
        };
        let sub = token::check_claims(&claims, &rules, now_secs()).map_err(|reason| {
            tracing::info!(kid, alg = parsed.alg.name(), %reason, "claims rejected");
            unauthorized(reason)
        })?;
        Ok(Identity {
            user_id: Some(sub),
            claims: Value::Object(claims),
        })
    }
}

/// The keys a token may be checked against: those with its `kid`; failing that (and when
/// `wildcards_ok`), the keys without a kid. For a token without a kid: the keys without a kid,
/// or the only key when there is exactly one.
fn select_keys<'k>(
    static_keys: &'k [Key],
    remote: &'k [Key],
    kid: Option<&str>,
    wildcards_ok: bool,
) -> Vec<&'k Key> {
    let all = || static_keys.iter().chain(remote.iter());
    let wildcards = || all().filter(|k| k.kid().is_none()).collect::<Vec<_>>();
    match kid {
        Some(kid) => {
            let exact: Vec<&Key> = all().filter(|k| k.kid() == Some(kid)).collect();
            if exact.is_empty() && wildcards_ok {
                wildcards()
            } else {
                exact
            }
        }
        None if static_keys.len() + remote.len() == 1 => all().collect(),
        None => wildcards(),
    }
}

/// Extracts the token from `Bearer <jwt>` or `Token <jwt>` (scheme case-insensitive).
fn token_from_header(authorization: Option<&str>) -> Result<&str, AuthError> {
    let value = authorization
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| unauthorized("missing Authorization header"))?;
    let bad_scheme =
        || unauthorized("Authorization header must be \"Bearer <token>\" or \"Token <token>\"");
    let (scheme, rest) = value
        .split_once(|c: char| c.is_ascii_whitespace())
        .ok_or_else(bad_scheme)?;
    if !(scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token")) {
        return Err(bad_scheme());
    }
    let token = rest.trim();
    if token.is_empty() {
        return Err(unauthorized("Authorization header has no token"));
    }
    Ok(token)
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
