//! The wire protocol: PowerSync's reference write API (`POST /api/data`), parsed strictly
//! enough to name what is wrong with a bad request and leniently enough to accept what real
//! connectors send (unknown fields are ignored; the op is case-insensitive).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One upload: the client's transactions in queue order.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Batch {
    /// The PowerSync client id (`db.getClientId()`), when the connector sends one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    pub transactions: Vec<Transaction>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Transaction {
    /// The client's transaction id; kept as sent (usually an integer).
    #[serde(default)]
    pub transaction_id: Option<Value>,
    pub crud: Vec<Operation>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum OpKind {
    #[serde(rename = "PUT")]
    Put,
    #[serde(rename = "PATCH")]
    Patch,
    #[serde(rename = "DELETE")]
    Delete,
}

impl<'de> Deserialize<'de> for OpKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A visitor reads the op in place: no string is allocated per operation.
        struct Op;
        impl serde::de::Visitor<'_> for Op {
            type Value = OpKind;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("PUT, PATCH or DELETE")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<OpKind, E> {
                [OpKind::Put, OpKind::Patch, OpKind::Delete]
                    .into_iter()
                    .find(|k| s.eq_ignore_ascii_case(k.as_str()))
                    .ok_or_else(|| E::custom("unknown op: expected PUT, PATCH or DELETE"))
            }
        }
        d.deserialize_str(Op)
    }
}

impl OpKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Put => "PUT",
            OpKind::Patch => "PATCH",
            OpKind::Delete => "DELETE",
        }
    }
}

/// One queued change.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Operation {
    pub op: OpKind,
    pub table: String,
    pub id: RowId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op_data: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_values: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

/// A row id as sent: PowerSync ids are text, but a number is accepted for integer keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RowId(pub String);

impl Serialize for RowId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RowId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(RowId(s)),
            Value::Number(n) => Ok(RowId(n.to_string())),
            _ => Err(serde::de::Error::custom("id must be a string or a number")),
        }
    }
}

/// The outcome of one client transaction, in the reference contract's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum TxResult {
    Success,
    RetryableError {
        message: String,
        retry_after_ms: u64,
    },
    FatalError {
        requires_client_handling: bool,
        message: String,
        failed_operation: FailedOperation,
    },
    NotAttempted,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedOperation {
    pub error_code: String,
    pub message: String,
    pub details: Value,
    pub operation_index: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchResponse {
    pub results: Vec<TxResult>,
}

/// Why a body is not a valid batch: the message names the path, line and column.
#[derive(Debug)]
pub struct ParseError(pub String);

/// Parses a request body, naming where it went wrong.
pub fn parse_batch(body: &[u8]) -> Result<Batch, ParseError> {
    parse_json("request", body)
}

/// Parses a JSON body of some shape (`what` names it in messages), explaining a failure.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    what: &str,
    body: &[u8],
) -> Result<T, ParseError> {
    serde_json::from_slice::<T>(body).map_err(|_| explain::<T>(what, body))
}

/// Why `body` is not a `T`: parsed again with path tracking, which costs a good share of a
/// parse, so only once a body is known to be bad.
pub(crate) fn explain<T: serde::de::DeserializeOwned>(what: &str, body: &[u8]) -> ParseError {
    let de = &mut serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(_) => ParseError(format!("invalid {what} body")),
        Err(e) => {
            let inner = e.inner();
            let path = e.path().to_string();
            let at = if path == "." || path.is_empty() {
                String::new()
            } else {
                format!(" at {path}")
            };
            ParseError(format!(
                "invalid {what} body{at} (line {}, column {}): {}",
                inner.line(),
                inner.column(),
                strip_position(&inner.to_string())
            ))
        }
    }
}

/// serde_json appends " at line L column C" to its messages; we print the position once.
fn strip_position(msg: &str) -> &str {
    match msg.rfind(" at line ") {
        Some(i) => &msg[..i],
        None => msg,
    }
}

/// The body with every `\u` escape of a lone UTF-16 surrogate replaced by `\ufffd`, or `None`
/// when it has none. JavaScript's `JSON.stringify` writes such escapes for a string cut in the
/// middle of an emoji, and they are no Unicode text: the JSON parser refuses them, and so would
/// Postgres. U+FFFD is what UTF-8 encoding does with them everywhere else (WHATWG's
/// `TextEncoder`, Rust's `from_utf16_lossy`). Only tried on a body that failed to parse.
pub(crate) fn without_lone_surrogates(body: &[u8]) -> Option<Vec<u8>> {
    fn unit(b: &[u8], at: usize) -> Option<u16> {
        let hex = b.get(at..at + 6)?;
        if hex[0] != b'\\' || hex[1] != b'u' {
            return None;
        }
        u16::from_str_radix(std::str::from_utf8(&hex[2..]).ok()?, 16).ok()
    }
    let mut out = Vec::with_capacity(body.len());
    let mut replaced = false;
    let mut i = 0;
    while i < body.len() {
        if body[i] != b'\\' {
            out.push(body[i]);
            i += 1;
            continue;
        }
        // Every backslash in JSON starts an escape of two characters or `\uXXXX`.
        match unit(body, i) {
            Some(0xD800..=0xDBFF) if matches!(unit(body, i + 6), Some(0xDC00..=0xDFFF)) => {
                out.extend_from_slice(&body[i..i + 12]);
                i += 12;
            }
            Some(0xD800..=0xDFFF) => {
                out.extend_from_slice(b"\\ufffd");
                replaced = true;
                i += 6;
            }
            _ => {
                let end = (i + 2).min(body.len());
                out.extend_from_slice(&body[i..end]);
                i = end;
            }
        }
    }
    replaced.then_some(out)
}

#[cfg(test)]
mod surrogate_tests {
    use super::without_lone_surrogates as fix;

    #[test]
    fn lone_surrogates_become_the_replacement_character_and_pairs_stay() {
        assert_eq!(
            fix(br#"{"s":"ab\ud83d"}"#).as_deref(),
            Some(&br#"{"s":"ab\ufffd"}"#[..])
        );
        assert_eq!(
            fix(br#"{"s":"\udc00y"}"#).as_deref(),
            Some(&br#"{"s":"\ufffdy"}"#[..])
        );
        assert_eq!(fix(br#"{"s":"\ud83d\ude00"}"#), None, "a pair is one emoji");
        assert_eq!(
            fix(br#"{"s":"\\ud83d"}"#),
            None,
            "an escaped backslash, then text"
        );
        assert_eq!(fix(br#"{"s":"x"}"#), None);
    }
}
