//! What clients send (SQLite types, often everything as strings) against what Postgres columns
//! hold: each value is read back with a typed query.

mod harness;

use chrono::{DateTime, TimeZone, Utc};
use crudgate::config::EngineConfig;
use harness::*;
use serde_json::{json, Value};

const KINDS: &str = "
    create type mood as enum ('low', 'high');
    create table kinds (
        id text primary key,
        flag boolean,
        doc jsonb,
        tags text[],
        at timestamptz,
        blob bytea,
        price numeric(10,2),
        big numeric,
        qty int4,
        ratio float8,
        mood mood,
        moods mood[],
        due_date date,
        addr inet,
        ref uuid,
        code char(3),
        codes char(3)[],
        bits bit(3),
        note json
    );";

async fn kinds_app() -> (TestDb, TestApp) {
    let db = TestDb::new().await;
    db.exec(KINDS).await;
    let app = spawn_app(&db.url, EngineConfig::default()).await;
    (db, app)
}

/// PUTs `data` into a new row of `kinds`; returns the row id and the result.
async fn put_kinds(app: &TestApp, data: Value) -> (String, Value) {
    let id = new_id().to_string();
    let r = app.apply_tx(vec![put("kinds", &id, data)]).await;
    (id, r)
}

async fn put_ok(app: &TestApp, data: Value) -> String {
    let (id, r) = put_kinds(app, data).await;
    assert_success(&r);
    id
}

/// Reads one column of the row as `T`.
async fn read<T>(app: &TestApp, id: &str, expr: &str) -> T
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    app.db
        .query_one(&format!("select {expr} from kinds where id = $1"), &[&id])
        .await
        .unwrap()
        .get(0)
}

async fn no_rows(app: &TestApp) {
    assert_eq!(count(&app.db, "kinds").await, 0);
}

#[tokio::test]
async fn a_char_n_value_is_stored_whole_and_one_too_long_is_rejected() {
    // Without its length, `character` means char(1): a cast to it would keep one letter.
    let (_db, app) = kinds_app().await;
    let id = put_ok(&app, json!({"code": "abc", "codes": ["abc", "de"]})).await;
    assert_eq!(read::<String>(&app, &id, "code::text").await, "abc");
    assert_eq!(
        read::<String>(&app, &id, "codes::text").await,
        "{abc,\"de \"}"
    );
    let (_, r) = put_kinds(&app, json!({"code": "abcd"})).await;
    assert_fatal(&r, "INVALID_DATA", 0);
    assert_eq!(count(&app.db, "kinds").await, 1);
}

#[tokio::test]
async fn a_bit_n_value_is_stored_whole_and_one_of_another_length_is_rejected() {
    let (_db, app) = kinds_app().await;
    let id = put_ok(&app, json!({"bits": "101"})).await;
    assert_eq!(read::<String>(&app, &id, "bits::text").await, "101");
    let (_, r) = put_kinds(&app, json!({"bits": "1011"})).await;
    assert_fatal(&r, "INVALID_DATA", 0);
    assert_eq!(count(&app.db, "kinds").await, 1);
}

#[tokio::test]
async fn boolean_accepts_the_integer_1_as_true() {
    let (_db, app) = kinds_app().await;
    let id = put_ok(&app, json!({"flag": 1})).await;
    assert_eq!(read::<Option<bool>>(&app, &id, "flag").await, Some(true));
}

#[tokio::test]
async fn boolean_accepts_the_string_1_as_true() {
    let (_db, app) = kinds_app().await;
    let id = put_ok(&app, json!({"flag": "1"})).await;
    assert_eq!(read::<Option<bool>>(&app, &id, "flag").await, Some(true));
}

#[tokio::test]
async fn boolean_accepts_the_string_true() {
    let (_db, app) = kinds_app().await;
    let id = put_ok(&app, json!({"flag": "true"})).await;
    assert_eq!(read::<Option<bool>>(&app, &id, "flag").await, Some(true));
}

#[tokio::test]
async fn boolean_accepts_the_integer_0_as_false() {
    let (_db, app) = kinds_app().await;
    let id = put_ok(&app, json!({"flag": 0})).await;
    assert_eq!(read::<Option<bool>>(&app, &id, "flag").await, Some(false));
}

#[tokio::test]
async fn boolean_rejects_an_integer_other_than_0_or_1() {
    let (_db, app) = kinds_app().await;
    let (_, r) = put_kinds(&app, json!({"flag": 2})).await;
    assert_fatal(&r, "INVALID_DATA", 0);
    no_rows(&app).await;
}

#[tokio::test]
async fn jsonb_from_json_text_is_stored_as_an_object() {
    let (_db, app) = kinds_app().await;
    let id = put_ok(&app, json!({"doc": "{\"a\":1}"})).await;
    assert_eq!(
        read::<String>(&app, &id, "jsonb_typeof(doc)").await,
        "object"
    );
    assert_eq!(read::<Value>(&app, &id, "doc").await, json!({"a": 1}));
}

#[tokio::test]
async fn a_json_column_keeps_the_clients_text_exactly() {
    let (_db, app) = kinds_app().await;
    // `json`, unlike `jsonb`, keeps key order, duplicate keys and number spelling.
    let text = r#"{"z": 1, "a": {"y": 2, "b": 3}, "z": 1e400}"#;
    let id = put_ok(&app, json!({ "note": text })).await;
    assert_eq!(read::<String>(&app, &id, "note::text").await, text);
}

#[tokio::test]
async fn jsonb_double_encoded_text_is_unwrapped_once() {
    let (_db, app) = kinds_app().await;
    let twice = serde_json::to_string("{\"a\":[1,2]}").unwrap();
    let id = put_ok(&app, json!({ "doc": twice })).await;
    assert_eq!(
        read::<String>(&app, &id, "jsonb_typeof(doc)").await,
        "object"
    );
    assert_eq!(read::<Value>(&app, &id, "doc").await, json!({"a": [1, 2]}));
}

#[tokio::test]
async fn jsonb_rejects_text_that_is_not_json() {
    let (_db, app) = kinds_app().await;
    let (_, r) = put_kinds(&app, json!({"doc": "not json"})).await;
    assert_fatal(&r, "INVALID_DATA", 0);
    no_rows(&app).await;
}

#[tokio::test]
async fn text_array_from_json_array_text() {
    let (_db, app) = kinds_app().await;
    let id = put_ok(
        &app,
        json!({"tags": "[\"a\",\"b \\\"quoted\\\"\",\"c,d\"]"}),
    )
    .await;
    assert_eq!(
        read::<Vec<String>>(&app, &id, "tags").await,
        vec!["a".to_owned(), "b \"quoted\"".to_owned(), "c,d".to_owned()]
    );
}

#[tokio::test]
async fn zone_less_timestamp_into_timestamptz_is_stored_as_utc() {
    let (_db, app) = kinds_app().await;
    let id = put_ok(&app, json!({"at": "2024-03-01 10:20:30.123"})).await;
    let want =
        Utc.with_ymd_and_hms(2024, 3, 1, 10, 20, 30).unwrap() + chrono::Duration::milliseconds(123);
    assert_eq!(read::<DateTime<Utc>>(&app, &id, "at").await, want);
}

#[tokio::test]
async fn zone_less_timestamp_is_utc_even_when_the_database_timezone_is_not() {
    let db = TestDb::new().await;
    db.exec(KINDS).await;
    db.exec(&format!(
        "alter database {} set timezone = 'America/New_York'",
        db.name
    ))
    .await;
    let app = spawn_app(&db.url, EngineConfig::default()).await;
    // The assertion connection sees the database's zone, so the check is not vacuous.
    let tz: String = db
        .client()
        .await
        .query_one("show timezone", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tz, "America/New_York");
    let id = put_ok(&app, json!({"at": "2024-07-01T08:00:00"})).await;
    let want = Utc.with_ymd_and_hms(2024, 7, 1, 8, 0, 0).unwrap();
    assert_eq!(read::<DateTime<Utc>>(&app, &id, "at").await, want);
    // A value with a zone keeps its instant.
    let id = put_ok(&app, json!({"at": "2024-07-01 08:00:00.000+02:00"})).await;
    let want = Utc.with_ymd_and_hms(2024, 7, 1, 6, 0, 0).unwrap();
    assert_eq!(read::<DateTime<Utc>>(&app, &id, "at").await, want);
}

#[tokio::test]
async fn base64_into_bytea_stores_the_decoded_bytes() {
    let (_db, app) = kinds_app().await;
    let id = put_ok(&app, json!({"blob": "AAH/aGk="})).await;
    assert_eq!(
        read::<Vec<u8>>(&app, &id, "blob").await,
        vec![0x00, 0x01, 0xff, b'h', b'i']
    );
}

#[tokio::test]
async fn numeric_string_is_stored_exactly() {
    let (_db, app) = kinds_app().await;
    let id = put_ok(&app, json!({"price": "12.50"})).await;
    assert_eq!(read::<String>(&app, &id, "price::text").await, "12.50");
    assert!(read::<bool>(&app, &id, "price = 12.50::numeric").await);
}

#[tokio::test]
async fn big_numerics_are_stored_exactly() {
    let (_db, app) = kinds_app().await;
    let id = new_id().to_string();
    // Sent as a JSON number that no float can hold, and as a string.
    let body = format!(
        r#"{{"transactions":[{{"crud":[{{"op":"PUT","table":"kinds","id":"{id}",
            "op_data":{{"big":123456789012345678901234567890.123456789012345678901}}}}]}}]}}"#
    );
    let (status, _, body) = app.post_raw(body).await;
    assert_eq!(status, 200, "{body}");
    assert_success(&results(&body)[0]);
    assert_eq!(
        read::<String>(&app, &id, "big::text").await,
        "123456789012345678901234567890.123456789012345678901"
    );
    let id = put_ok(&app, json!({"big": "-0.000000000000000000000000000001"})).await;
    assert_eq!(
        read::<String>(&app, &id, "big::text").await,
        "-0.000000000000000000000000000001"
    );
}

#[tokio::test]
async fn a_whole_real_into_int4_is_stored_as_an_integer() {
    let (_db, app) = kinds_app().await;
    let body = json!({"transactions": [{"crud": [
        {"op": "PUT", "table": "kinds", "id": "r1", "op_data": serde_json::from_str::<Value>(r#"{"qty": 1.0}"#).unwrap()}
    ]}]});
    // The number must reach the server as `1.0`, not re-serialised as `1`.
    assert!(body.to_string().contains("1.0"), "{body}");
    assert_success(&app.apply(&body).await[0]);
    assert_eq!(read::<Option<i32>>(&app, "r1", "qty").await, Some(1));
}

#[tokio::test]
async fn a_fractional_real_into_int4_is_invalid_data_naming_table_column_and_type_not_value() {
    let (_db, app) = kinds_app().await;
    let data = serde_json::from_str::<Value>(r#"{"qty": 1.5, "flag": 1}"#).unwrap();
    let (_, r) = put_kinds(&app, data).await;
    let f = assert_fatal(&r, "INVALID_DATA", 0);
    let message = f["message"].as_str().unwrap();
    for word in ["kinds", "qty", "integer"] {
        assert!(message.contains(word), "{word} missing in {message:?}");
    }
    assert!(!message.contains("1.5"), "the value leaked: {message:?}");
    assert!(!r.to_string().contains("1.5"), "the value leaked: {r}");
    no_rows(&app).await;
}

#[tokio::test]
async fn kotlin_style_strings_go_into_int_and_float_columns() {
    let (_db, app) = kinds_app().await;
    let id = put_ok(&app, json!({"qty": "1", "ratio": "2.5"})).await;
    assert_eq!(read::<Option<i32>>(&app, &id, "qty").await, Some(1));
    assert_eq!(read::<Option<f64>>(&app, &id, "ratio").await, Some(2.5));
    // And a SQLite integer into a real column.
    let id = put_ok(&app, json!({"ratio": 2})).await;
    assert_eq!(read::<Option<f64>>(&app, &id, "ratio").await, Some(2.0));
}

#[tokio::test]
async fn enum_date_and_inet_come_in_as_text() {
    let (_db, app) = kinds_app().await;
    let id = put_ok(
        &app,
        json!({"mood": "high", "due_date": "2024-02-29", "addr": "192.168.1.20/32"}),
    )
    .await;
    assert_eq!(read::<String>(&app, &id, "mood::text").await, "high");
    assert_eq!(
        read::<String>(&app, &id, "to_char(due_date, 'YYYY-MM-DD')").await,
        "2024-02-29"
    );
    assert_eq!(
        read::<String>(&app, &id, "host(addr)").await,
        "192.168.1.20"
    );
}

#[tokio::test]
async fn an_unknown_enum_label_is_invalid_data() {
    let (_db, app) = kinds_app().await;
    let (_, r) = put_kinds(&app, json!({"mood": "medium"})).await;
    assert_fatal(&r, "INVALID_DATA", 0);
    no_rows(&app).await;
}

#[tokio::test]
async fn an_invalid_uuid_is_invalid_data() {
    let (_db, app) = kinds_app().await;
    let (_, r) = put_kinds(&app, json!({"ref": "not-a-uuid"})).await;
    let f = assert_fatal(&r, "INVALID_DATA", 0);
    assert_eq!(f["details"]["column"], "ref", "{f}");
    no_rows(&app).await;
    // An invalid uuid as the row id of a uuid-keyed table, too.
    let r = app
        .apply_tx(vec![put("lists", "not-a-uuid", json!({"name": "x"}))])
        .await;
    assert_fatal(&r, "INVALID_DATA", 0);
}

#[tokio::test]
async fn an_invalid_date_refused_by_postgres_is_invalid_data_naming_the_column() {
    let (_db, app) = kinds_app().await;
    let ok = new_id().to_string();
    let r = app
        .apply_tx(vec![
            put("kinds", &ok, json!({"due_date": "2024-02-28"})),
            put(
                "kinds",
                new_id(),
                json!({"due_date": "2023-02-30", "qty": 3}),
            ),
        ])
        .await;
    let f = assert_fatal(&r, "INVALID_DATA", 1);
    let message = f["message"].as_str().unwrap();
    assert!(message.contains("due_date"), "{message:?}");
    assert!(message.contains("kinds"), "{message:?}");
    assert!(
        !r.to_string().contains("2023-02-30"),
        "the value leaked: {r}"
    );
    assert_eq!(f["details"]["column"], "due_date", "{f}");
    no_rows(&app).await;
}

#[tokio::test]
async fn a_text_column_keeps_the_exact_text_of_a_number() {
    let db = TestDb::new().await;
    db.exec("create table notes (id text primary key, body text)")
        .await;
    let app = spawn_app(&db.url, EngineConfig::default()).await;
    let body = r#"{"transactions":[{"crud":[
        {"op":"PUT","table":"notes","id":"a","op_data":{"body":42.0}},
        {"op":"PUT","table":"notes","id":"b","op_data":{"body":12345678901234567890}}]}]}"#;
    let (status, _, answer) = app.post_raw(body).await;
    assert_eq!(status, 200, "{answer}");
    assert_success(&results(&answer)[0]);
    let rows: Vec<String> = app
        .db
        .query("select body from notes order by id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        rows,
        vec!["42.0".to_owned(), "12345678901234567890".to_owned()]
    );
}

#[tokio::test]
async fn a_utc_timestamp_in_the_sdk_format_is_stored_as_is() {
    let (_db, app) = kinds_app().await;
    let id = put_ok(&app, json!({"at": "2024-03-01 23:59:59.999Z"})).await;
    let want =
        Utc.with_ymd_and_hms(2024, 3, 1, 23, 59, 59).unwrap() + chrono::Duration::milliseconds(999);
    assert_eq!(read::<DateTime<Utc>>(&app, &id, "at").await, want);
}

#[tokio::test]
async fn hex_into_bytea_when_configured() {
    let db = TestDb::new().await;
    db.exec(KINDS).await;
    let app = spawn_app(
        &db.url,
        EngineConfig {
            bytea: crudgate::config::ByteaEncoding::Hex,
            ..Default::default()
        },
    )
    .await;
    let id = put_ok(&app, json!({"blob": "00ff10"})).await;
    assert_eq!(
        read::<Vec<u8>>(&app, &id, "blob").await,
        vec![0x00, 0xff, 0x10]
    );
    let (_, r) = put_kinds(&app, json!({"blob": "not hex"})).await;
    assert_fatal(&r, "INVALID_DATA", 0);
}

#[tokio::test]
async fn jsonb_takes_arrays_scalars_and_json_values_sent_as_such() {
    let (_db, app) = kinds_app().await;
    let id = put_ok(&app, json!({"doc": "[1,\"two\"]"})).await;
    assert_eq!(read::<Value>(&app, &id, "doc").await, json!([1, "two"]));
    let id = put_ok(&app, json!({"doc": "\"just a string\""})).await;
    assert_eq!(
        read::<String>(&app, &id, "jsonb_typeof(doc)").await,
        "string"
    );
    let id = put_ok(&app, json!({"doc": {"nested": {"x": true}}})).await;
    assert_eq!(
        read::<Value>(&app, &id, "doc").await,
        json!({"nested": {"x": true}})
    );
}

#[tokio::test]
async fn an_enum_label_added_after_crudgate_started_is_accepted() {
    let (db, app) = kinds_app().await;
    assert_success(&put_kinds(&app, json!({"mood": "low"})).await.1);
    db.exec("alter type mood add value 'medium'").await;
    let id = put_ok(&app, json!({"mood": "medium"})).await;
    assert_eq!(read::<String>(&app, &id, "mood::text").await, "medium");
    db.exec("alter type mood add value 'elated'").await;
    let id = put_ok(&app, json!({"moods": "[\"elated\",\"low\"]"})).await;
    assert_eq!(
        read::<String>(&app, &id, "moods::text").await,
        "{elated,low}"
    );
}

#[tokio::test]
async fn a_value_for_a_column_retyped_after_crudgate_started_is_checked_against_the_new_type() {
    let (db, app) = kinds_app().await;
    let (_, r) = put_kinds(&app, json!({"qty": "two"})).await;
    assert_fatal(&r, "INVALID_DATA", 0);
    // A migration widens the column; the write that was invalid is now good and must not be
    // rejected (the client would drop it) on the strength of the old type.
    db.exec("alter table kinds alter column qty type text")
        .await;
    let id = put_ok(&app, json!({"qty": "two"})).await;
    assert_eq!(read::<String>(&app, &id, "qty").await, "two");
}

// Bulk statements send uuid, boolean, integer and timestamptz columns as typed binary arrays;
// the rows must come out as the text path would store them.

/// PUTs two new rows of `kinds` in one transaction, so in one bulk statement; returns their ids.
async fn put_two(app: &TestApp, a: Value, b: Value) -> (String, String) {
    let ids = (new_id().to_string(), new_id().to_string());
    let r = app
        .apply_tx(vec![put("kinds", &ids.0, a), put("kinds", &ids.1, b)])
        .await;
    assert_success(&r);
    ids
}

#[tokio::test]
async fn a_bulk_put_of_typed_columns_stores_what_the_text_path_stores() {
    let (_db, app) = kinds_app().await;
    let (a, b) = put_two(
        &app,
        json!({"flag": "t", "qty": "2147483647", "at": "2024-03-01 10:00:00+02:00",
               "ref": "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"}),
        json!({"flag": 0, "qty": -2147483648i64, "at": null, "ref": null}),
    )
    .await;
    assert_eq!(read::<Option<bool>>(&app, &a, "flag").await, Some(true));
    assert_eq!(read::<Option<i32>>(&app, &a, "qty").await, Some(i32::MAX));
    assert_eq!(
        read::<Option<DateTime<Utc>>>(&app, &a, "at").await,
        Some(Utc.with_ymd_and_hms(2024, 3, 1, 8, 0, 0).unwrap())
    );
    assert_eq!(
        read::<Option<String>>(&app, &a, "ref::text")
            .await
            .as_deref(),
        Some("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
    );
    assert_eq!(read::<Option<bool>>(&app, &b, "flag").await, Some(false));
    assert_eq!(read::<Option<i32>>(&app, &b, "qty").await, Some(i32::MIN));
    assert_eq!(read::<Option<DateTime<Utc>>>(&app, &b, "at").await, None);
    assert_eq!(read::<Option<String>>(&app, &b, "ref::text").await, None);
}

#[tokio::test]
async fn sub_microsecond_timestamps_are_rounded_as_postgres_rounds_them() {
    let (_db, app) = kinds_app().await;
    let (a, b) = put_two(
        &app,
        json!({"at": "2024-01-01T00:00:00.0000009Z"}),
        json!({"at": "2024-01-01T00:00:00.5Z"}),
    )
    .await;
    // A binary timestamp would be truncated to 0 µs; Postgres's text input rounds to 1 µs.
    let micros = |id| read::<String>(&app, id, "to_char(at, 'US')");
    assert_eq!(micros(&a).await, "000001");
    assert_eq!(micros(&b).await, "500000");
}

#[tokio::test]
async fn a_leap_second_in_a_bulk_put_is_stored_as_postgres_reads_it() {
    let (_db, app) = kinds_app().await;
    let (a, _) = put_two(
        &app,
        json!({"at": "2016-12-31T23:59:60Z"}),
        json!({"at": "2024-01-01T00:00:00Z"}),
    )
    .await;
    assert_eq!(
        read::<Option<DateTime<Utc>>>(&app, &a, "at").await,
        Some(Utc.with_ymd_and_hms(2017, 1, 1, 0, 0, 0).unwrap())
    );
}

#[tokio::test]
async fn infinity_among_ordinary_timestamps_is_stored_in_a_bulk_put() {
    let (_db, app) = kinds_app().await;
    let (a, b) = put_two(
        &app,
        json!({"at": "infinity"}),
        json!({"at": "2024-01-01T00:00:00Z"}),
    )
    .await;
    assert_eq!(read::<String>(&app, &a, "at::text").await, "infinity");
    assert_eq!(
        read::<Option<DateTime<Utc>>>(&app, &b, "at").await,
        Some(Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap())
    );
}

#[tokio::test]
async fn a_domain_check_failing_in_a_bulk_patch_names_its_operation() {
    let db = TestDb::new().await;
    db.exec(&format!(
        "{KINDS} create domain small_positive as int2 check (value > 0);
         alter table kinds add column n small_positive"
    ))
    .await;
    let app = spawn_app(&db.url, EngineConfig::default()).await;
    let ids: Vec<String> = (0..3).map(|_| new_id().to_string()).collect();
    let puts = ids
        .iter()
        .map(|id| put("kinds", id, json!({"n": 1})))
        .collect();
    assert_success(&app.apply_tx(puts).await);
    let r = app
        .apply_tx(vec![
            patch("kinds", &ids[0], json!({"n": 2})),
            patch("kinds", &ids[1], json!({"n": 0})),
            patch("kinds", &ids[2], json!({"n": 3})),
        ])
        .await;
    assert_eq!(r["status"], "fatal_error", "{r}");
    assert_eq!(r["failed_operation"]["operation_index"], 1, "{r}");
    assert_eq!(
        r["failed_operation"]["error_code"], "CHECK_VIOLATION",
        "{r}"
    );
    let ns: Vec<i16> = app
        .db
        .query("select n from kinds order by n", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        ns,
        vec![1, 1, 1],
        "nothing of the failed transaction is kept"
    );
}

#[tokio::test]
async fn a_lone_surrogate_from_a_cut_emoji_is_stored_as_the_replacement_character() {
    // JavaScript's JSON.stringify writes "ab\ud83d" for "ab😀".slice(0, 3): no Unicode text,
    // which UTF-8 encoders turn into U+FFFD. A 400 would block the client's queue for good.
    let (_db, app) = kinds_app().await;
    let id = new_id().to_string();
    let body = format!(
        r#"{{"transactions":[{{"transaction_id":1,"crud":[{{"op":"PUT","table":"kinds","id":"{id}",
            "op_data":{{"code":"a\ud83d"}},"metadata":"\udc00"}}]}}]}}"#
    );
    let (status, _, answer) = app.post_raw(body).await;
    assert_eq!(status, 200, "{answer}");
    assert_success(&results(&answer)[0]);
    assert_eq!(read::<String>(&app, &id, "code::text").await, "a\u{FFFD}");
}

#[tokio::test]
async fn a_value_too_long_for_a_domain_over_a_sized_type_is_rejected_not_cut() {
    let db = TestDb::new().await;
    db.exec(
        "create domain code3 as varchar(3) check (value <> 'zzz');
         create domain code3_alias as code3;
         create domain flags3 as bit(3);
         create domain pad3 as char(3);
         create domain pads3 as char(3)[];
         create table codes (id code3 primary key, label code3_alias, flags flags3, pad pad3,
                             pads pads3);",
    )
    .await;
    let app = spawn_app(&db.url, EngineConfig::default()).await;
    assert_success(
        &app.apply_tx(vec![put(
            "codes",
            "abc",
            json!({"label": "xy", "flags": "101", "pad": "ab", "pads": ["abc", "de"]}),
        )])
        .await,
    );
    // Cut to three letters, these ids would name the row above and overwrite it (Postgres
    // cuts trailing spaces beyond the length without an error).
    for id in ["abcXYZ", "abc  "] {
        let r = app
            .apply_tx(vec![put("codes", id, json!({"label": "new"}))])
            .await;
        assert_fatal(&r, "INVALID_DATA", 0);
    }
    // Each column alone, on the one-row and the multi-row path.
    for data in [
        json!({"label": "long"}),
        json!({"flags": "10101"}),
        json!({"pad": "abcd"}),
        json!({"pads": ["abc", "abcd"]}),
    ] {
        let r = app.apply_tx(vec![put("codes", "k", data.clone())]).await;
        assert_fatal(&r, "INVALID_DATA", 0);
        let r = app
            .apply_tx(vec![put("codes", "m", json!({})), put("codes", "n", data)])
            .await;
        assert_fatal(&r, "INVALID_DATA", 1);
    }
    // The domain's check still applies; a PATCH and a DELETE of a longer id touch nothing.
    let r = app.apply_tx(vec![put("codes", "zzz", json!({}))]).await;
    assert_fatal(&r, "CHECK_VIOLATION", 0);
    assert_success(
        &app.apply_tx(vec![
            patch("codes", "abcXYZ", json!({"label": "new"})),
            delete("codes", "abc-other"),
        ])
        .await,
    );
    let rows = app
        .db
        .query(
            "select id::text || '|' || label::text || '|' || flags::text || '|' || pad::text
                    || '|' || pads::text from codes",
            &[],
        )
        .await
        .unwrap();
    let rows: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(rows, ["abc|xy|101|ab|{abc,\"de \"}"]);
}

#[tokio::test]
async fn a_put_of_a_key_longer_than_its_varchar_column_is_rejected_not_moved_onto_another_row() {
    let db = TestDb::new().await;
    db.exec("create table short_keys (id varchar(3) primary key, v text); insert into short_keys values ('abc', 'mine')")
        .await;
    let app = spawn_app(&db.url, EngineConfig::default()).await;
    // Postgres stores 'abc  ' as 'abc' (trailing spaces beyond the length are cut silently).
    let r = app
        .apply_tx(vec![put("short_keys", "abc  ", json!({"v": "theirs"}))])
        .await;
    assert_fatal(&r, "INVALID_DATA", 0);
    // A PATCH or DELETE of such a key finds no row.
    assert_success(
        &app.apply_tx(vec![
            patch("short_keys", "abc  ", json!({"v": "theirs"})),
            delete("short_keys", "abc  "),
        ])
        .await,
    );
    let v: String = app
        .db
        .query_one("select v from short_keys where id = 'abc'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "mine");
}
