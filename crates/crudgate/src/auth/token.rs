//! JWS compact parsing and claim checks.
//!
//! Error messages name the check that failed and never echo the token or claim values: a
//! message reaches the client and the logs, and a claim (or the token itself) can be a secret.

use serde_json::{Map, Value};

use super::keys::{decode_b64url, Alg};

/// Tokens longer than this are rejected before any decoding (a real JWT is well under 4 kB).
pub(crate) const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// A token split into its parts; nothing verified yet.
pub(crate) struct Parsed<'a> {
    pub(crate) alg: Alg,
    pub(crate) kid: Option<String>,
    /// `base64url(header) "." base64url(payload)`: the bytes the signature covers.
    pub(crate) signing_input: &'a [u8],
    pub(crate) signature: Vec<u8>,
    payload_b64: &'a str,
}

/// Splits and decodes a compact JWS. Only the header is interpreted here; the payload is
/// decoded only after the signature checks out.
pub(crate) fn parse(token: &str) -> Result<Parsed<'_>, String> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err("token is too long".into());
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("token is not a JWT (expected three dot-separated parts)".into());
    };
    let header: Value = decode_b64url(h)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or("token header is not base64url-encoded JSON")?;
    let header = header
        .as_object()
        .ok_or("token header is not a JSON object")?;
    // RFC 7515 §4.1.11: a header naming extensions we do not implement must be rejected.
    if header.contains_key("crit") {
        return Err("token header uses unsupported critical extensions".into());
    }
    let alg_name = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or("token header has no alg")?;
    let alg = Alg::parse(alg_name).ok_or_else(|| {
        if alg_name.eq_ignore_ascii_case("none") {
            "unsigned tokens (alg none) are not accepted".to_string()
        } else {
            "token algorithm is not supported".to_string()
        }
    })?;
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err("token header kid is not a string".into()),
    };
    let signature = decode_b64url(s).map_err(|_| "token signature is not base64url")?;
    if signature.is_empty() {
        return Err("token has no signature".into());
    }
    let signing_input = &token.as_bytes()[..h.len() + 1 + p.len()];
    Ok(Parsed {
        alg,
        kid,
        signing_input,
        signature,
        payload_b64: p,
    })
}

impl Parsed<'_> {
    /// The decoded claims. Call only after the signature was verified.
    pub(crate) fn claims(&self) -> Result<Map<String, Value>, String> {
        let bytes =
            decode_b64url(self.payload_b64).map_err(|_| "token payload is not base64url")?;
        match serde_json::from_slice(&bytes) {
            Ok(Value::Object(map)) => Ok(map),
            _ => Err("token payload is not a JSON object".into()),
        }
    }
}

/// The claim rules, taken from the configuration.
pub(crate) struct ClaimRules<'a> {
    pub(crate) audiences: &'a [String],
    pub(crate) issuer: Option<&'a str>,
    pub(crate) max_lifetime_secs: u64,
    pub(crate) leeway_secs: u64,
}

/// Checks the claims as the PowerSync service does, at time `now` (Unix seconds), and
/// returns the subject.
pub(crate) fn check_claims(
    claims: &Map<String, Value>,
    rules: &ClaimRules<'_>,
    now: f64,
) -> Result<String, String> {
    let leeway = rules.leeway_secs as f64;
    let sub = match claims.get("sub") {
        // Postgres text cannot hold NUL: such a subject could own nothing and record nothing.
        Some(Value::String(s)) if s.contains('\0') => {
            return Err("token sub claim contains a NUL character".into())
        }
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) => return Err("token sub claim is empty".into()),
        Some(_) => return Err("token sub claim is not a string".into()),
        None => return Err("token has no sub claim".into()),
    };
    let exp = numeric_date(claims, "exp")?.ok_or("token has no exp claim")?;
    let iat = numeric_date(claims, "iat")?.ok_or("token has no iat claim")?;
    if now > exp + leeway {
        return Err("token expired".into());
    }
    if iat > now + leeway {
        return Err("token issued in the future (iat)".into());
    }
    if let Some(nbf) = numeric_date(claims, "nbf")? {
        if nbf > now + leeway {
            return Err("token not yet valid (nbf)".into());
        }
    }
    if exp - iat > rules.max_lifetime_secs as f64 {
        return Err(format!(
            "token lifetime (exp - iat) exceeds the maximum of {} s",
            rules.max_lifetime_secs
        ));
    }
    let aud_ok = match claims.get("aud") {
        Some(Value::String(a)) => rules.audiences.iter().any(|c| c == a),
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .any(|a| rules.audiences.iter().any(|c| c == a)),
        Some(_) => return Err("token aud claim is not a string or array".into()),
        None => return Err("token has no aud claim".into()),
    };
    if !aud_ok {
        return Err("token audience does not match".into());
    }
    if let Some(expected) = rules.issuer {
        match claims.get("iss") {
            Some(Value::String(iss)) if iss == expected => {}
            Some(_) => return Err("token issuer does not match".into()),
            None => return Err("token has no iss claim".into()),
        }
    }
    Ok(sub)
}

/// A NumericDate claim (RFC 7519 §2: seconds, possibly fractional). Absent gives `None`;
/// any other type is an error.
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, String> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(v) if v.is_finite() => Ok(Some(v)),
            _ => Err(format!("token {name} claim is not a valid number")),
        },
        Some(_) => Err(format!("token {name} claim is not a number")),
    }
}
