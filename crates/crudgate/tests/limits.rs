//! Request limits and malformed bodies: each gets a 4xx with `{"message"}`, never a 500, and
//! nothing of it is applied.

mod harness;

use crudgate::config::EngineConfig;
use harness::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Asserts an error answer with `status` and a `{"message"}` body; returns the message.
#[track_caller]
fn assert_error(status: StatusCode, body: &Value, want: StatusCode) -> String {
    assert_eq!(status, want, "body: {body}");
    let message = body["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message in {body}"));
    assert!(!message.is_empty());
    assert_eq!(
        body.as_object().map(|o| o.len()),
        Some(1),
        "only a message: {body}"
    );
    message.to_owned()
}

fn list_tx() -> Vec<Value> {
    vec![put("lists", new_id(), json!({"name": "l"}))]
}

#[tokio::test]
async fn a_body_over_the_body_limit_is_413() {
    let (_db, app) = app_with(EngineConfig {
        body_limit: 4096,
        ..Default::default()
    })
    .await;
    let big = batch(vec![vec![put(
        "lists",
        new_id(),
        json!({"name": "x".repeat(8192)}),
    )]]);
    let (status, _, body) = app.post(&big).await;
    let message = assert_error(status, &body, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(message.contains("4096"), "{message}");
    assert_eq!(count(&app.db, "lists").await, 0);
    // Just under the limit is fine.
    let small = batch(vec![vec![put(
        "lists",
        new_id(),
        json!({"name": "x".repeat(3000)}),
    )]]);
    assert_success(&app.apply(&small).await[0]);
}

#[tokio::test]
async fn a_body_of_several_megabytes_under_the_default_limit_is_accepted() {
    // Real batches exceed web frameworks' default limits (axum's is 2 MB).
    let (_db, app) = app().await;
    let list = new_id();
    let r = app
        .apply(&batch(vec![vec![put(
            "lists",
            list,
            json!({"name": "y".repeat(3 * 1024 * 1024)}),
        )]]))
        .await;
    assert_success(&r[0]);
    let len: i32 = app
        .db
        .query_one("select length(name) from lists where id = $1", &[&list])
        .await
        .unwrap()
        .get(0);
    assert_eq!(len, 3 * 1024 * 1024);
}

#[tokio::test]
async fn more_than_max_transactions_is_400() {
    let (_db, app) = app_with(EngineConfig {
        max_transactions: 3,
        ..Default::default()
    })
    .await;
    let (status, _, body) = app.post(&batch(vec![list_tx(); 4])).await;
    let message = assert_error(status, &body, StatusCode::BAD_REQUEST);
    assert!(message.contains('3') && message.contains('4'), "{message}");
    assert_eq!(count(&app.db, "lists").await, 0);
    let r = app
        .apply(&batch(vec![list_tx(), list_tx(), list_tx()]))
        .await;
    assert_eq!(r.len(), 3);
}

#[tokio::test]
async fn the_default_allows_50_transactions_and_refuses_51() {
    let (_db, app) = app().await;
    let ok = batch((0..50).map(|_| list_tx()).collect());
    let r = app.apply(&ok).await;
    assert_eq!(r.len(), 50);
    r.iter().for_each(assert_success);
    let (status, _, body) = app.post(&batch((0..51).map(|_| list_tx()).collect())).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST);
    assert_eq!(count(&app.db, "lists").await, 50);
}

#[tokio::test]
async fn zero_transactions_is_400() {
    let (_db, app) = app().await;
    let (status, _, body) = app.post(&json!({"transactions": []})).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn more_than_max_operations_is_413() {
    let (_db, app) = app_with(EngineConfig {
        max_operations: 5,
        ..Default::default()
    })
    .await;
    // Counted over all transactions of the request.
    let six = batch(vec![
        (0..3).flat_map(|_| list_tx()).collect(),
        (0..3).flat_map(|_| list_tx()).collect(),
    ]);
    let (status, _, body) = app.post(&six).await;
    let message = assert_error(status, &body, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(message.contains('5') && message.contains('6'), "{message}");
    assert_eq!(count(&app.db, "lists").await, 0);
    let five = batch(vec![(0..5).flat_map(|_| list_tx()).collect()]);
    assert_success(&app.apply(&five).await[0]);
    assert_eq!(count(&app.db, "lists").await, 5);
}

#[tokio::test]
async fn malformed_json_is_400_naming_line_and_column() {
    let (_db, app) = app().await;
    // The stray `}` is on line 2, column 13.
    let body = "{\"transactions\": [\n  {\"crud\": [}\n]}";
    let (status, _, body) = app.post_raw(body).await;
    let message = assert_error(status, &body, StatusCode::BAD_REQUEST);
    assert!(message.contains("line 2"), "{message}");
    assert!(message.contains("column 13"), "{message}");
}

#[tokio::test]
async fn an_empty_body_is_400() {
    let (_db, app) = app().await;
    let (status, _, body) = app.post_raw("").await;
    assert_error(status, &body, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn crud_that_is_not_an_array_is_400_naming_the_path() {
    let (_db, app) = app().await;
    let (status, _, body) = app
        .post(&json!({"transactions": [{"crud": []}, {"crud": {"op": "PUT"}}]}))
        .await;
    let message = assert_error(status, &body, StatusCode::BAD_REQUEST);
    assert!(message.contains("transactions[1].crud"), "{message}");
}

#[tokio::test]
async fn a_missing_table_field_is_400_naming_the_path() {
    let (_db, app) = app().await;
    let (status, _, body) = app
        .post(&json!({"transactions": [{"crud": [
            {"op": "PUT", "table": "lists", "id": "a", "op_data": {}},
            {"op": "PUT", "id": "b", "op_data": {}}
        ]}]}))
        .await;
    let message = assert_error(status, &body, StatusCode::BAD_REQUEST);
    assert!(message.contains("transactions[0].crud[1]"), "{message}");
    assert!(message.contains("table"), "{message}");
}

#[tokio::test]
async fn an_unknown_op_is_400() {
    let (_db, app) = app().await;
    let (status, _, body) = app
        .post(&json!({"transactions": [{"crud": [
            {"op": "UPSERT", "table": "lists", "id": new_id().to_string(), "op_data": {"name": "x"}}
        ]}]}))
        .await;
    let message = assert_error(status, &body, StatusCode::BAD_REQUEST);
    assert!(message.contains("transactions[0].crud[0].op"), "{message}");
    assert_eq!(count(&app.db, "lists").await, 0);
}

#[tokio::test]
async fn no_malformed_request_is_ever_a_500() {
    let (_db, app) = app_with(EngineConfig {
        body_limit: 1024,
        ..Default::default()
    })
    .await;
    let bodies: Vec<String> = vec![
        "".into(),
        "null".into(),
        "[]".into(),
        "42".into(),
        "\"transactions\"".into(),
        "{}".into(),
        "{\"transactions\": null}".into(),
        "{\"transactions\": {}}".into(),
        "{\"transactions\": [null]}".into(),
        "{\"transactions\": [{}]}".into(),
        "{\"transactions\": [{\"crud\": [null]}]}".into(),
        "{\"transactions\": [{\"crud\": [{\"op\": 1, \"table\": \"lists\", \"id\": \"a\"}]}]}".into(),
        "{\"transactions\": [{\"crud\": [{\"op\": \"PUT\", \"table\": 5, \"id\": \"a\"}]}]}".into(),
        "{\"transactions\": [{\"crud\": [{\"op\": \"PUT\", \"table\": \"lists\", \"id\": null}]}]}".into(),
        "{\"transactions\": [{\"crud\": [{\"op\": \"PUT\", \"table\": \"lists\", \"id\": {}}]}]}".into(),
        "{\"transactions\": [{\"crud\": [{\"op\": \"PUT\", \"table\": \"lists\", \"id\": \"a\", \"op_data\": []}]}]}".into(),
        "{\"transactions\": [{\"crud\": [{\"op\": \"PUT\", \"table\": \"lists\", \"id\": \"a\", \"op_data\": \"{}\"}]}]}".into(),
        "{\"transactions\": [{\"crud\": []}]".into(),
        "\u{feff}{\"transactions\": []}".into(),
        "{\"transactions\": [".repeat(200),
        "x".repeat(2000),
    ];
    for raw in bodies {
        let (status, _, body) = app.post_raw(raw.clone()).await;
        assert!(
            status.is_client_error(),
            "{raw:?} got {status}, body {body}"
        );
        assert!(body["message"].is_string(), "{raw:?}: {body}");
    }
    // Bodies that parse but carry hopeless operations are answered per transaction, not 500.
    for op in [
        json!({"op": "PUT", "table": "lists", "id": "", "op_data": {"name": "x"}}),
        json!({"op": "PUT", "table": "", "id": "a", "op_data": {}}),
        json!({"op": "DELETE", "table": "lists", "id": 12}),
        json!({"op": "PATCH", "table": "lists", "id": new_id().to_string(), "op_data": {"id": "other"}}),
    ] {
        let (status, _, body) = app.post(&batch(vec![vec![op.clone()]])).await;
        assert_eq!(status, StatusCode::OK, "{op}: {body}");
        assert_eq!(results(&body)[0]["status"], "fatal_error", "{op}: {body}");
    }
    assert_eq!(count(&app.db, "lists").await, 0);
}

#[tokio::test]
async fn health_is_200() {
    let (_db, app) = app().await;
    let (status, _, _) = app.get("/health").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn ready_is_200_when_the_database_answers() {
    let (_db, app) = app().await;
    let (status, _, _) = app.get("/ready").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_transaction_of_thousands_of_operations_is_applied_or_rejected_whole() {
    let (_db, app) = app().await;
    let list = new_id();
    let mut ops = vec![put("lists", list, json!({"name": "big"}))];
    let ids: Vec<_> = (0..5000).map(|_| new_id()).collect();
    for (i, id) in ids.iter().enumerate() {
        ops.push(put(
            "todos",
            id,
            json!({"list_id": list.to_string(), "description": format!("t{i}")}),
        ));
    }
    for id in ids.iter().step_by(2) {
        ops.push(patch("todos", id, json!({"completed": 1})));
    }
    let mut bad = ops.clone();
    bad.push(put(
        "todos",
        new_id(),
        json!({"list_id": new_id().to_string(), "description": "orphan"}),
    ));
    let last = bad.len() - 1;
    assert_fatal(&app.apply_tx(bad).await, "FOREIGN_KEY_VIOLATION", last);
    assert_eq!(count(&app.db, "todos").await, 0);
    assert_success(&app.apply_tx(ops).await);
    assert_eq!(count(&app.db, "todos").await, 5000);
    let done: i64 = app
        .db
        .query_one("select count(*) from todos where completed", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(done, 2500);
}

/// Opens a TCP connection to the app and sends `bytes`.
async fn raw_connection(app: &TestApp, bytes: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let addr = app.base.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(bytes).await.expect("write");
    tcp
}

/// Reads until the server closes the connection; what it sent.
async fn until_closed(tcp: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tcp.read_to_end(&mut got),
    )
    .await
    .expect("closed by the server")
    .ok();
    String::from_utf8_lossy(&got).into_owned()
}

fn idle_timeout(ms: u64) -> EngineConfig {
    EngineConfig {
        client_idle_timeout_ms: ms,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_connection_that_never_finishes_its_headers_is_closed() {
    let (_db, app) = app_with(idle_timeout(500)).await;
    let mut tcp = raw_connection(&app, b"POST /api/data HTTP/1.1\r\nHost: x\r\n").await;
    until_closed(&mut tcp).await;
    // The server still serves everyone else.
    assert_success(&app.apply_tx(list_tx()).await);
}

#[tokio::test]
async fn a_body_that_stalls_is_408_and_nothing_is_applied() {
    let (_db, app) = app_with(idle_timeout(500)).await;
    let mut tcp = raw_connection(
        &app,
        b"POST /api/data HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"transactions\":",
    )
    .await;
    let answer = until_closed(&mut tcp).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(count(&app.db, "lists").await, 0);
}

#[tokio::test]
async fn a_body_cut_short_is_400_not_413() {
    let (_db, app) = app().await;
    let body = batch(vec![list_tx()]).to_string();
    let head = format!(
        "POST /api/data HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len() + 100
    );
    let mut tcp = raw_connection(&app, format!("{head}{body}").as_bytes()).await;
    tokio::io::AsyncWriteExt::shutdown(&mut tcp)
        .await
        .expect("half-close");
    let answer = until_closed(&mut tcp).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(count(&app.db, "lists").await, 0);
}

#[tokio::test]
async fn requests_wait_while_the_bodies_in_flight_fill_the_budget() {
    // A request that has sent the whole budget's worth of body and stalls holds everyone else
    // back until it times out; without the budget the second request would not wait.
    let (_db, app) = app_with(EngineConfig {
        body_limit: 64 * 1024,
        bodies_in_flight: 64 * 1024,
        client_idle_timeout_ms: 2000,
        ..Default::default()
    })
    .await;
    let mut head = b"POST /api/data HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 65536\r\n\r\n{\"s\":\"".to_vec();
    head.extend(std::iter::repeat_n(b'x', 64 * 1024 - 16));
    let mut hog = raw_connection(&app, &head).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    assert_success(&app.apply_tx(list_tx()).await);
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(1200),
        "waited {waited:?}"
    );
    assert!(until_closed(&mut hog).await.starts_with("HTTP/1.1 408"));
}

#[tokio::test]
async fn a_body_that_trickles_is_408_once_it_falls_behind_the_minimum_rate() {
    use tokio::io::AsyncWriteExt;
    let (_db, app) = app_with(idle_timeout(1000)).await;
    let mut tcp = raw_connection(
        &app,
        b"POST /api/data HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{",
    )
    .await;
    // A byte every 300 ms never stalls for the idle timeout, but is far below 16 KiB/s.
    let started = std::time::Instant::now();
    for _ in 0..30 {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        if tcp.write_all(b" ").await.is_err() {
            break;
        }
    }
    let answer = until_closed(&mut tcp).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_body_starting_with_a_utf8_byte_order_mark_is_applied() {
    let (_db, app) = app().await;
    let list = new_id();
    let json = batch(vec![vec![put("lists", list, json!({"name": "bom"}))]]).to_string();
    let mut body = b"\xEF\xBB\xBF".to_vec();
    body.extend_from_slice(json.as_bytes());
    let (status, _, answer) = app.post_raw(body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_success(&results(&answer)[0]);
    assert_eq!(count(&app.db, "lists").await, 1);
}
