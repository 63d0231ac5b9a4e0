//! Turns a JSON value from a client (SQLite types: text, integer, real, null; often everything
//! as strings) into the text form Postgres reads for the column's type. Values travel to
//! Postgres as text-array parameters and are cast there, so every type with a text input works;
//! the checks here catch what Postgres would silently accept wrongly (a JSON string stored in a
//! jsonb column, bytes of base64 text in a bytea) or reject confusingly (`1.0` into an integer).

use base64::Engine as _;
use serde_json::Value;

use crate::config::ByteaEncoding;
use crate::schema::Kind;

/// A value that does not fit its column. The caller names table, column and type; the value
/// itself is never repeated back in messages or logs.
#[derive(Debug, PartialEq)]
pub struct Mismatch;

pub fn coerce(kind: &Kind, v: &Value, bytea: ByteaEncoding) -> Result<Option<String>, Mismatch> {
    if v.is_null() {
        return Ok(None);
    }
    to_text(kind, v, bytea).map(Some)
}

fn to_text(kind: &Kind, v: &Value, bytea: ByteaEncoding) -> Result<String, Mismatch> {
    match kind {
        Kind::Bool => boolean(v),
        Kind::Int { bits } => integer(v, *bits),
        Kind::Numeric => decimal_text(v).map(str::to_owned),
        Kind::Float => match v {
            Value::String(s) if is_special_float(s.trim()) => Ok(s.trim().to_owned()),
            _ => decimal_text(v).map(str::to_owned),
        },
        Kind::Text | Kind::Other => Ok(plain_text(v)),
        Kind::Uuid => match v {
            Value::String(s) => uuid_text(s),
            _ => Err(Mismatch),
        },
        Kind::Enum(labels) => match v {
            Value::String(s) if labels.iter().any(|l| l == s) => Ok(s.clone()),
            _ => Err(Mismatch),
        },
        Kind::Json => json(v),
        Kind::Bytea => match v {
            Value::String(s) => bytes(s, bytea).map(|b| format!("\\x{}", hex::encode(b))),
            _ => Err(Mismatch),
        },
        Kind::Timestamptz => match v {
            Value::String(s) => timestamptz(s.trim()),
            _ => Err(Mismatch),
        },
        Kind::Array(elem) => {
            let items = match v {
                Value::Array(_) => v.clone(),
                Value::String(s) => match serde_json::from_str::<Value>(s) {
                    Ok(a @ Value::Array(_)) => a,
                    _ => return Err(Mismatch),
                },
                _ => return Err(Mismatch),
            };
            let mut out = String::new();
            array_literal(elem, &items, bytea, &mut out)?;
            Ok(out)
        }
    }
}

/// A uuid in any form the uuid crate reads, as Postgres prints it.
pub fn uuid_text(s: &str) -> Result<String, Mismatch> {
    uuid::Uuid::try_parse(s.trim())
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| Mismatch)
}

fn plain_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        // Numbers keep their exact text (serde_json's arbitrary_precision); objects and arrays
        // become their JSON text, which is what the client's SQLite column held.
        other => other.to_string(),
    }
}

fn boolean(v: &Value) -> Result<String, Mismatch> {
    let b = match v {
        Value::Bool(b) => *b,
        Value::Number(n) => match n.to_string().as_str() {
            "0" | "0.0" => false,
            "1" | "1.0" => true,
            _ => return Err(Mismatch),
        },
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "0" | "false" | "f" => false,
            "1" | "true" | "t" => true,
            _ => return Err(Mismatch),
        },
        _ => return Err(Mismatch),
    };
    Ok(if b { "true" } else { "false" }.to_owned())
}

/// The exact decimal text of a number or numeric string, checked for shape.
fn decimal_text(v: &Value) -> Result<&str, Mismatch> {
    let s = match v {
        Value::Number(n) => n.as_str(),
        Value::String(s) => s.trim(),
        _ => return Err(Mismatch),
    };
    parse_decimal(s).map(|_| s).ok_or(Mismatch)
}

fn is_special_float(s: &str) -> bool {
    matches!(
        s.to_ascii_lowercase().as_str(),
        "nan" | "infinity" | "-infinity" | "+infinity" | "inf" | "-inf"
    )
}

/// A decimal number split into its parts: sign, digits without the point, and the power of ten
/// that the last digit stands for.
struct Decimal<'a> {
    negative: bool,
    int: &'a str,
    frac: &'a str,
    exp: i64,
}

fn parse_decimal(s: &str) -> Option<Decimal<'_>> {
    let (negative, rest) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let (mantissa, exp) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], rest[i + 1..].parse::<i64>().ok()?),
        None => (rest, 0),
    };
    let (int, frac) = match mantissa.find('.') {
        Some(i) => (&mantissa[..i], &mantissa[i + 1..]),
        None => (mantissa, ""),
    };
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) || exp.abs() > 10_000 {
        return None;
    }
    Some(Decimal {
        negative,
        int,
        frac,
        exp,
    })
}

/// Integers from 1, "1", 1.0 or 1e3; a fractional part that is not zero does not fit.
fn integer(v: &Value, bits: u8) -> Result<String, Mismatch> {
    let d = parse_decimal(decimal_text(v)?).ok_or(Mismatch)?;
    // Shift the point by the exponent, then require only zeros after it.
    let all: String = format!("{}{}", d.int, d.frac);
    let point = d.int.len() as i64 + d.exp;
    let (whole, fraction) = if point <= 0 {
        (String::new(), all.as_str())
    } else if point as usize >= all.len() {
        let mut w = all.clone();
        w.extend(std::iter::repeat_n('0', point as usize - all.len()));
        (w, "")
    } else {
        (all[..point as usize].to_owned(), &all[point as usize..])
    };
    if fraction.bytes().any(|b| b != b'0') {
        return Err(Mismatch);
    }
    let whole = whole.trim_start_matches('0');
    let magnitude: u128 = if whole.is_empty() {
        0
    } else if whole.len() > 39 {
        return Err(Mismatch);
    } else {
        whole.parse().map_err(|_| Mismatch)?
    };
    let limit: u128 = 1u128 << (bits - 1);
    let fits = if d.negative {
        magnitude <= limit
    } else {
        magnitude < limit
    };
    if !fits {
        return Err(Mismatch);
    }
    Ok(if d.negative && magnitude != 0 {
        format!("-{magnitude}")
    } else {
        magnitude.to_string()
    })
}

/// JSON columns: SQLite holds JSON as text, so a string is parsed (and a double-encoded one
/// unwrapped once); a JSON value sent as such is stored as it is. A string that is not JSON
/// does not fit: storing it as a JSON string scalar would corrupt it silently.
fn json(v: &Value) -> Result<String, Mismatch> {
    match v {
        Value::String(s) => {
            let parsed: Value = serde_json::from_str(s).map_err(|_| Mismatch)?;
            if let Value::String(inner) = &parsed {
                if let Ok(twice @ (Value::Object(_) | Value::Array(_))) =
                    serde_json::from_str::<Value>(inner)
                {
                    return Ok(twice.to_string());
                }
            }
            // The client's own text: a `json` column keeps it exactly (key order, duplicate
            // keys, number spelling); `jsonb` normalises it either way.
            Ok(s.clone())
        }
        other => Ok(other.to_string()),
    }
}

fn bytes(s: &str, encoding: ByteaEncoding) -> Result<Vec<u8>, Mismatch> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let s = s.trim();
    match encoding {
        ByteaEncoding::Hex => {
            let h = s.strip_prefix("\\x").unwrap_or(s);
            hex::decode(h).map_err(|_| Mismatch)
        }
        ByteaEncoding::Base64 => [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
            .iter()
            .find_map(|e| e.decode(s).ok())
            .ok_or(Mismatch),
    }
}

/// Timestamps with a zone are kept; without one they are UTC (never the session TimeZone).
fn timestamptz(s: &str) -> Result<String, Mismatch> {
    use chrono::{DateTime, NaiveDate, NaiveDateTime};
    if s.eq_ignore_ascii_case("infinity") || s.eq_ignore_ascii_case("-infinity") {
        return Ok(s.to_owned());
    }
    // The common case (what the SDKs send) without trying formats one by one.
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.to_rfc3339());
    }
    const NAIVE: [&str; 4] = [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M",
    ];
    const ZONED: [&str; 4] = [
        "%Y-%m-%dT%H:%M:%S%.f%#z",
        "%Y-%m-%d %H:%M:%S%.f%#z",
        "%Y-%m-%dT%H:%M%#z",
        "%Y-%m-%d %H:%M%#z",
    ];
    let utc = |n: NaiveDateTime| n.and_utc().to_rfc3339();
    if let Some(naive) = s.strip_suffix(['Z', 'z']) {
        return NAIVE
            .iter()
            .find_map(|f| NaiveDateTime::parse_from_str(naive, f).ok())
            .map(utc)
            .ok_or(Mismatch);
    }
    if let Some(t) = ZONED
        .iter()
        .find_map(|f| DateTime::parse_from_str(s, f).ok())
    {
        return Ok(t.to_rfc3339());
    }
    if let Some(n) = NAIVE
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
    {
        return Ok(utc(n));
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map(|d| utc(d.and_hms_opt(0, 0, 0).expect("midnight exists")))
        .map_err(|_| Mismatch)
}

/// Writes a Postgres array literal: `{"a","b",NULL}`, elements checked like columns.
fn array_literal(
    elem: &Kind,
    items: &Value,
    bytea: ByteaEncoding,
    out: &mut String,
) -> Result<(), Mismatch> {
    let Value::Array(items) = items else {
        return Err(Mismatch);
    };
    out.push('{');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match item {
            Value::Null => out.push_str("NULL"),
            Value::Array(_) if !matches!(elem, Kind::Json) => {
                array_literal(elem, item, bytea, out)?
            }
            _ => {
                let text = to_text(elem, item, bytea)?;
                out.push('"');
                for ch in text.chars() {
                    if ch == '"' || ch == '\\' {
                        out.push('\\');
                    }
                    out.push(ch);
                }
                out.push('"');
            }
        }
    }
    out.push('}');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn c(kind: &Kind, v: Value) -> Result<Option<String>, Mismatch> {
        coerce(kind, &v, ByteaEncoding::Base64)
    }
    fn num(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn booleans_come_from_sqlite_integers_and_strings() {
        for (v, want) in [
            (json!(1), "true"),
            (json!(0), "false"),
            (json!("1"), "true"),
            (json!("0"), "false"),
            (json!(true), "true"),
            (json!("false"), "false"),
        ] {
            assert_eq!(c(&Kind::Bool, v).unwrap().as_deref(), Some(want));
        }
        assert_eq!(c(&Kind::Bool, json!(2)), Err(Mismatch));
        assert_eq!(c(&Kind::Bool, json!("yes please")), Err(Mismatch));
    }

    #[test]
    fn integers_accept_whole_reals_and_reject_fractions() {
        let i4 = Kind::Int { bits: 32 };
        assert_eq!(c(&i4, num("1.0")).unwrap().as_deref(), Some("1"));
        assert_eq!(c(&i4, json!("42")).unwrap().as_deref(), Some("42"));
        assert_eq!(c(&i4, num("1e3")).unwrap().as_deref(), Some("1000"));
        assert_eq!(c(&i4, num("-0")).unwrap().as_deref(), Some("0"));
        assert_eq!(c(&i4, num("1.5")), Err(Mismatch));
        assert_eq!(c(&i4, num("2147483648")), Err(Mismatch));
        assert_eq!(
            c(&i4, num("-2147483648")).unwrap().as_deref(),
            Some("-2147483648")
        );
        let i8 = Kind::Int { bits: 64 };
        assert_eq!(
            c(&i8, num("9223372036854775807")).unwrap().as_deref(),
            Some("9223372036854775807")
        );
        assert_eq!(c(&i8, json!("12a")), Err(Mismatch));
    }

    #[test]
    fn numeric_keeps_the_exact_text() {
        assert_eq!(
            c(&Kind::Numeric, json!("12.50")).unwrap().as_deref(),
            Some("12.50")
        );
        assert_eq!(
            c(&Kind::Numeric, num("12345678901234567890.123456789"))
                .unwrap()
                .as_deref(),
            Some("12345678901234567890.123456789")
        );
        assert_eq!(c(&Kind::Numeric, json!("1,5")), Err(Mismatch));
    }

    #[test]
    fn json_text_is_parsed_and_double_encoding_unwrapped_once() {
        assert_eq!(
            c(&Kind::Json, json!("{\"a\":1}")).unwrap().as_deref(),
            Some("{\"a\":1}")
        );
        assert_eq!(
            c(&Kind::Json, json!("\"{\\\"a\\\":1}\""))
                .unwrap()
                .as_deref(),
            Some("{\"a\":1}")
        );
        assert_eq!(
            c(&Kind::Json, json!({"b": [1]})).unwrap().as_deref(),
            Some("{\"b\":[1]}")
        );
        assert_eq!(c(&Kind::Json, json!("not json")), Err(Mismatch));
    }

    #[test]
    fn arrays_come_from_json_text_or_json_arrays() {
        let k = Kind::Array(Box::new(Kind::Text));
        assert_eq!(
            c(&k, json!("[\"a\",\"b \\\"q\\\"\"]")).unwrap().as_deref(),
            Some("{\"a\",\"b \\\"q\\\"\"}")
        );
        let k = Kind::Array(Box::new(Kind::Int { bits: 32 }));
        assert_eq!(
            c(&k, json!([[1, 2], [3, null]])).unwrap().as_deref(),
            Some("{{\"1\",\"2\"},{\"3\",NULL}}")
        );
        assert_eq!(c(&k, json!("{1,2}")), Err(Mismatch));
    }

    #[test]
    fn zone_less_timestamps_are_utc() {
        assert_eq!(
            c(&Kind::Timestamptz, json!("2024-03-01 10:20:30.123"))
                .unwrap()
                .as_deref(),
            Some("2024-03-01T10:20:30.123+00:00")
        );
        assert_eq!(
            c(&Kind::Timestamptz, json!("2024-03-01 10:20:30.123Z"))
                .unwrap()
                .as_deref(),
            Some("2024-03-01T10:20:30.123+00:00")
        );
        assert_eq!(
            c(&Kind::Timestamptz, json!("2024-03-01T10:20:30+02:00"))
                .unwrap()
                .as_deref(),
            Some("2024-03-01T10:20:30+02:00")
        );
        assert_eq!(c(&Kind::Timestamptz, json!("yesterday")), Err(Mismatch));
    }

    #[test]
    fn bytea_comes_from_base64_or_hex() {
        assert_eq!(
            c(&Kind::Bytea, json!("AAH/")).unwrap().as_deref(),
            Some("\\x0001ff")
        );
        assert_eq!(
            coerce(&Kind::Bytea, &json!("\\x0001ff"), ByteaEncoding::Hex)
                .unwrap()
                .as_deref(),
            Some("\\x0001ff")
        );
        assert_eq!(c(&Kind::Bytea, json!("@@@")), Err(Mismatch));
    }

    #[test]
    fn uuids_and_enums_are_checked_before_postgres() {
        assert_eq!(c(&Kind::Uuid, json!("not-a-uuid")), Err(Mismatch));
        let e = Kind::Enum(vec!["low".to_owned(), "high".to_owned()].into());
        assert_eq!(c(&e, json!("low")).unwrap().as_deref(), Some("low"));
        assert_eq!(c(&e, json!("mid")), Err(Mismatch));
    }
}
