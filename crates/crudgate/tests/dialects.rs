//! The other request shapes (REST per operation, the Node demo's batch, the SDK's raw queue
//! entries) go through the same engine as the reference batch: the same changes leave the same
//! rows, rejections are acknowledged in each shape's own way and recorded, and the reference
//! contract is untouched. Every effect is read back through a separate connection.

mod harness;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use crudgate::auth::{AuthConfig, AuthMode, Authenticator};
use crudgate::config::EngineConfig;
use crudgate::{AppState, Engine};
use harness::*;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio_postgres::Client;
use uuid::Uuid;

/// One logical change, independent of the wire.
#[derive(Clone)]
struct Change {
    op: &'static str,
    table: &'static str,
    id: Uuid,
    data: Option<Value>,
}

fn change(op: &'static str, table: &'static str, id: Uuid, data: Option<Value>) -> Change {
    Change {
        op,
        table,
        id,
        data,
    }
}

/// Client transactions of changes, as a client would have queued them.
type Script = Vec<Vec<Change>>;

#[derive(Clone, Copy, Debug)]
enum Dialect {
    Reference,
    Rest,
    Demo,
    EntriesList,
    EntriesObject,
}

const ALL: [Dialect; 5] = [
    Dialect::Reference,
    Dialect::Rest,
    Dialect::Demo,
    Dialect::EntriesList,
    Dialect::EntriesObject,
];

impl Server {
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(body) = body {
            req = req.header("content-type", "application/json").body(body);
        }
        let res = req.send().await.expect("request sent");
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res.bytes().await.expect("body");
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, headers, body)
    }

    async fn send_json(
        &self,
        method: Method,
        path: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, Value) {
        self.send(method, path, Some(body.to_string().into_bytes()), headers)
            .await
    }
}

fn method_of(op: &str) -> Method {
    match op {
        "PUT" => Method::PUT,
        "PATCH" => Method::PATCH,
        _ => Method::DELETE,
    }
}

/// The SDK's `CrudEntry.toJSON()` of a script: op ids count up, tx ids have gaps.
fn entries(script: &Script) -> Vec<Value> {
    let mut op_id = 0;
    let mut out = Vec::new();
    for (t, tx) in script.iter().enumerate() {
        for c in tx {
            op_id += 1;
            let mut e = json!({"op_id": op_id, "op": c.op, "type": c.table,
                               "id": c.id.to_string(), "tx_id": 10 * (t + 1)});
            if let Some(d) = &c.data {
                e["data"] = d.clone();
            }
            out.push(e);
        }
    }
    out
}

/// Sends a script through a dialect, asserting every transaction was accepted.
async fn send_script(app: &TestApp, dialect: Dialect, script: &Script) {
    match dialect {
        Dialect::Reference => {
            let txs = script
                .iter()
                .map(|tx| {
                    tx.iter()
                        .map(|c| {
                            let mut op =
                                json!({"op": c.op, "table": c.table, "id": c.id.to_string()});
                            if let Some(d) = &c.data {
                                op["op_data"] = d.clone();
                            }
                            op
                        })
                        .collect()
                })
                .collect();
            for r in app.apply(&batch(txs)).await {
                assert_success(&r);
            }
        }
        Dialect::Rest => {
            for c in script.iter().flatten() {
                let path = format!("/api/data/{}/{}", c.table, c.id);
                let body = c.data.as_ref().map(|d| d.to_string().into_bytes());
                let (status, _, body) = app.send(method_of(c.op), &path, body, &[]).await;
                assert_eq!(status, StatusCode::OK, "body: {body}");
                assert_eq!(body, json!({"status": "success"}));
            }
        }
        Dialect::Demo => {
            // The demo treats a whole batch as one transaction: send each as one.
            for tx in script {
                let ops: Vec<Value> = tx
                    .iter()
                    .map(|c| json!({"op": c.op, "table": c.table, "id": c.id.to_string(), "data": c.data}))
                    .collect();
                let (status, _, body) = app
                    .send_json(Method::POST, "/api/data", &json!({ "batch": ops }), &[])
                    .await;
                assert_eq!(status, StatusCode::OK, "body: {body}");
                assert_eq!(body, json!({"message": "Batch completed"}));
            }
        }
        Dialect::EntriesList | Dialect::EntriesObject => {
            let list = entries(script);
            let body = match dialect {
                Dialect::EntriesList => Value::Array(list),
                _ => json!({"client_id": "c-entries", "crud": list}),
            };
            let (status, _, body) = app
                .send_json(
                    Method::POST,
                    "/api/data",
                    &body,
                    &[("powersync-client-id", "c-entries-header")],
                )
                .await;
            assert_eq!(status, StatusCode::OK, "body: {body}");
            let results = results(&body);
            assert_eq!(results.len(), script.len());
            for (t, r) in results.iter().enumerate() {
                assert_success(r);
                assert_eq!(r["tx_id"], json!(10 * (t + 1)));
            }
        }
    }
}

#[derive(Debug, PartialEq)]
struct ListRow {
    id: Uuid,
    name: String,
    owner_id: Option<String>,
}

#[derive(Debug, PartialEq)]
struct TodoRow {
    id: Uuid,
    completed_at: Option<DateTime<Utc>>,
    description: String,
    completed: bool,
    created_by: Option<String>,
    completed_by: Option<String>,
    list_id: Uuid,
}

/// Every row of the demo tables, all columns but `created_at` (set by the database).
async fn demo_rows(db: &Client) -> (Vec<ListRow>, Vec<TodoRow>) {
    let lists = db
        .query("select id, name, owner_id from lists order by id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| ListRow {
            id: r.get(0),
            name: r.get(1),
            owner_id: r.get(2),
        })
        .collect();
    let todos = db
        .query(
            "select id, completed_at, description, completed, created_by, completed_by, list_id
             from todos order by id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| TodoRow {
            id: r.get(0),
            completed_at: r.get(1),
            description: r.get(2),
            completed: r.get(3),
            created_by: r.get(4),
            completed_by: r.get(5),
            list_id: r.get(6),
        })
        .collect();
    (lists, todos)
}

/// A list and two todos, one updated, one deleted.
fn todo_script(list: Uuid, a: Uuid, b: Uuid) -> Script {
    vec![
        vec![
            change(
                "PUT",
                "lists",
                list,
                Some(json!({"name": "groceries", "owner_id": "u1"})),
            ),
            change(
                "PUT",
                "todos",
                a,
                Some(
                    json!({"list_id": list.to_string(), "description": "milk", "completed": 0, "created_by": "alice"}),
                ),
            ),
            change(
                "PUT",
                "todos",
                b,
                Some(json!({"list_id": list.to_string(), "description": "bread"})),
            ),
        ],
        vec![change(
            "PATCH",
            "todos",
            a,
            Some(
                json!({"completed": 1, "completed_at": "2026-01-02 03:04:05.678Z", "completed_by": "bob", "created_by": null}),
            ),
        )],
        vec![change("DELETE", "todos", b, None)],
    ]
}

#[tokio::test]
async fn the_same_changes_through_every_dialect_leave_identical_rows() {
    let (list, a, b) = (new_id(), new_id(), new_id());
    let script = todo_script(list, a, b);
    let mut seen = Vec::new();
    for dialect in ALL {
        let (_db, app) = app().await;
        send_script(&app, dialect, &script).await;
        seen.push((dialect, demo_rows(&app.db).await));
    }
    let (_, (lists, todos)) = &seen[0];
    assert_eq!(
        lists,
        &[ListRow {
            id: list,
            name: "groceries".into(),
            owner_id: Some("u1".into())
        }]
    );
    assert_eq!(
        todos,
        &[TodoRow {
            id: a,
            completed_at: Some("2026-01-02T03:04:05.678Z".parse().unwrap()),
            description: "milk".into(),
            completed: true,
            created_by: None,
            completed_by: Some("bob".into()),
            list_id: list,
        }]
    );
    for (dialect, rows) in &seen[1..] {
        assert_eq!(rows, &seen[0].1, "{dialect:?} differs from the reference");
    }
}

#[tokio::test]
async fn values_sent_as_strings_by_kotlin_and_swift_connectors_are_stored_typed_through_every_dialect(
) {
    let item = new_id();
    let script: Script = vec![
        vec![change(
            "PUT",
            "items",
            item,
            Some(json!({"qty": "3", "price": "2.50", "ratio": "0.25", "done": "1", "note": "x"})),
        )],
        vec![change(
            "PATCH",
            "items",
            item,
            Some(json!({"qty": "4", "ratio": "2", "done": "0"})),
        )],
    ];
    for dialect in ALL {
        let (db, app) = app().await;
        db.exec(
            "create table items (id uuid primary key, qty int4 not null, price numeric(10,2),
             ratio float8, done boolean not null default false, note text)",
        )
        .await;
        send_script(&app, dialect, &script).await;
        let row = app
            .db
            .query_one(
                "select qty, price::text, ratio, done, note from items where id = $1",
                &[&item],
            )
            .await
            .unwrap();
        let got: (i32, String, f64, bool, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        assert_eq!(
            got,
            (4, "2.50".into(), 2.0, false, "x".into()),
            "through {dialect:?}"
        );
    }
}

/// The rejections recorded: (table, row id, transaction id, operation index, error code).
async fn rejections(db: &Client) -> Vec<(String, String, Option<String>, i32, String)> {
    db.query(
        "select table_name, row_id, transaction_id, operation_index, error_code
         from crudgate.rejections order by created_at",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
    .collect()
}

#[tokio::test]
async fn a_rest_write_refused_for_good_is_acknowledged_200_rejected_and_recorded() {
    let (_db, app) = app().await;
    let todo = new_id();
    let (status, _, body) = app
        .send_json(
            Method::PUT,
            &format!("/api/data/todos/{todo}"),
            &json!({"list_id": new_id().to_string(), "description": "orphan"}),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "body: {body}");
    assert_eq!(body["status"], "rejected");
    assert_eq!(body["error_code"], "FOREIGN_KEY_VIOLATION");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(body["details"].is_object(), "body: {body}");
    assert_eq!(count(&app.db, "todos").await, 0);
    assert_eq!(
        rejections(&app.db).await,
        [(
            "todos".into(),
            todo.to_string(),
            None,
            0,
            "FOREIGN_KEY_VIOLATION".into()
        )]
    );
}

#[tokio::test]
async fn a_rest_rejection_the_client_must_handle_is_a_409_and_is_not_recorded() {
    let (_db, app) = app_with(EngineConfig {
        client_handled_codes: vec!["FOREIGN_KEY_VIOLATION".into()],
        ..Default::default()
    })
    .await;
    let (status, _, body) = app
        .send_json(
            Method::PUT,
            &format!("/api/data/todos/{}", new_id()),
            &json!({"list_id": new_id().to_string(), "description": "orphan"}),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "body: {body}");
    assert_eq!(body["status"], "client_handling_required");
    assert_eq!(body["error_code"], "FOREIGN_KEY_VIOLATION");
    assert_eq!(count(&app.db, "todos").await, 0);
    assert!(rejections(&app.db).await.is_empty());
}

#[tokio::test]
async fn a_demo_batch_is_one_transaction_and_its_rejection_is_acknowledged_200_and_recorded() {
    let (_db, app) = app().await;
    let (list, todo) = (new_id(), new_id());
    let body = json!({"batch": [
        {"op": "PUT", "table": "lists", "id": list.to_string(), "data": {"name": "kept?"}},
        // The demo's connector also puts the id into the data; no id of its own here.
        {"op": "PUT", "table": "todos", "data": {"id": todo.to_string(), "list_id": new_id().to_string(), "description": "orphan"}}
    ]});
    let (status, _, body) = app.send_json(Method::POST, "/api/data", &body, &[]).await;
    assert_eq!(status, StatusCode::OK, "body: {body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Batch rejected: ")),
        "body: {body}"
    );
    assert_eq!(body["status"], "rejected");
    assert_eq!(body["error_code"], "FOREIGN_KEY_VIOLATION");
    assert_eq!(body["operation_index"], 1);
    // All or nothing: the list before the refused todo is not stored either.
    assert_eq!(count(&app.db, "lists").await, 0);
    assert_eq!(count(&app.db, "todos").await, 0);
    assert_eq!(
        rejections(&app.db).await,
        [(
            "todos".into(),
            todo.to_string(),
            None,
            1,
            "FOREIGN_KEY_VIOLATION".into()
        )]
    );
}

#[tokio::test]
async fn queue_entries_are_answered_per_tx_id_and_a_rejected_group_is_recorded() {
    let (_db, app) = app().await;
    let (l1, todo, l2) = (new_id(), new_id(), new_id());
    let body = json!([
        {"op_id": 1, "op": "PUT", "type": "lists", "id": l1.to_string(), "tx_id": 5, "data": {"name": "one"}},
        {"op_id": 2, "op": "PUT", "type": "todos", "id": todo.to_string(), "tx_id": 6,
         "data": {"list_id": new_id().to_string(), "description": "orphan"}, "metadata": "{\"source\":\"test\"}"},
        {"op_id": 3, "op": "PUT", "type": "lists", "id": l2.to_string(), "tx_id": 8, "data": {"name": "two"}}
    ]);
    let (status, _, body) = app
        .send_json(
            Method::POST,
            "/api/data",
            &body,
            &[("powersync-client-id", "c1")],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "body: {body}");
    let r = results(&body);
    assert_eq!(r.len(), 3);
    assert_success(&r[0]);
    assert_eq!(r[0]["tx_id"], 5);
    assert_fatal(&r[1], "FOREIGN_KEY_VIOLATION", 0);
    assert_eq!(r[1]["tx_id"], 6);
    assert_eq!(r[2], json!({"status": "not_attempted", "tx_id": 8}));
    let names: Vec<String> = app
        .db
        .query("select name from lists", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names, ["one"]);
    assert_eq!(
        rejections(&app.db).await,
        [(
            "todos".into(),
            todo.to_string(),
            Some("6".into()),
            0,
            "FOREIGN_KEY_VIOLATION".into()
        )]
    );
    let meta: (Option<String>, Option<String>) = app
        .db
        .query_one("select client_id, metadata from crudgate.rejections", &[])
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(
        meta,
        (Some("c1".into()), Some("{\"source\":\"test\"}".into()))
    );
}

#[tokio::test]
async fn a_crud_batch_of_more_transactions_than_one_request_allows_is_applied_whole_in_order() {
    let (_db, app) = app().await;
    // The SDK's default batch is 100 entries; here every entry is its own transaction.
    let ids: Vec<Uuid> = (0..60).map(|_| new_id()).collect();
    let list: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| json!({"op_id": i, "op": "PUT", "type": "lists", "id": id.to_string(), "tx_id": i, "data": {"name": format!("l{i}")}}))
        .collect();
    let (status, _, body) = app
        .send_json(Method::POST, "/api/data", &json!({ "crud": list }), &[])
        .await;
    assert_eq!(status, StatusCode::OK, "body: {body}");
    let r = results(&body);
    assert_eq!(r.len(), 60);
    for (i, r) in r.iter().enumerate() {
        assert_success(r);
        assert_eq!(r["tx_id"], i);
    }
    assert_eq!(count(&app.db, "lists").await, 60);
}

#[tokio::test]
async fn a_rejection_at_the_end_of_one_chunk_leaves_the_groups_after_it_not_attempted() {
    let (_db, app) = app().await;
    // 50 groups go per chunk; the 50th is refused, so the engine itself never sees the 51st.
    let ids: Vec<Uuid> = (0..60).map(|_| new_id()).collect();
    let list: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let data = if i == 49 {
                json!({"list_id": new_id().to_string(), "description": "orphan"})
            } else {
                json!({"name": format!("l{i}")})
            };
            let table = if i == 49 { "todos" } else { "lists" };
            json!({"op_id": i, "op": "PUT", "type": table, "id": id.to_string(), "tx_id": i, "data": data})
        })
        .collect();
    let (status, _, body) = app
        .send_json(Method::POST, "/api/data", &Value::Array(list), &[])
        .await;
    assert_eq!(status, StatusCode::OK, "body: {body}");
    let r = results(&body);
    assert_eq!(r.len(), 60);
    r[..49].iter().for_each(assert_success);
    assert_fatal(&r[49], "FOREIGN_KEY_VIOLATION", 0);
    for (i, r) in r.iter().enumerate().skip(50) {
        assert_eq!(r, &json!({"status": "not_attempted", "tx_id": i}));
    }
    assert_eq!(count(&app.db, "lists").await, 49);
}

#[tokio::test]
async fn a_rest_write_with_client_id_and_idempotency_key_is_applied_once() {
    let (_db, app) = app().await;
    let list = new_id();
    let path = format!("/api/data/lists/{list}");
    let headers = [("powersync-client-id", "c9"), ("idempotency-key", "k1")];
    let body = json!({"name": "first"});
    let (status, _, res) = app.send_json(Method::PUT, &path, &body, &headers).await;
    assert_eq!(
        (status, res),
        (StatusCode::OK, json!({"status": "success"}))
    );
    app.db
        .execute(
            "update lists set name = 'changed since' where id = $1",
            &[&list],
        )
        .await
        .unwrap();
    // The same request again (a lost response): answered from the ledger, not applied.
    let (status, _, res) = app.send_json(Method::PUT, &path, &body, &headers).await;
    assert_eq!(
        (status, res),
        (StatusCode::OK, json!({"status": "success"}))
    );
    let name: String = app
        .db
        .query_one("select name from lists where id = $1", &[&list])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "changed since");
    // The same key for other content is not a replay.
    let (status, _, res) = app
        .send_json(Method::PUT, &path, &json!({"name": "other"}), &headers)
        .await;
    assert_eq!(status, StatusCode::OK, "body: {res}");
    assert_eq!(res["status"], "rejected");
    assert_eq!(res["error_code"], "IDEMPOTENCY_CONFLICT");
}

#[tokio::test]
async fn a_rest_delete_ignores_its_body_and_removes_the_row() {
    let (_db, app) = app().await;
    let list = seed_list(&app.db).await;
    let (status, _, res) = app
        .send(
            Method::DELETE,
            &format!("/api/data/lists/{list}"),
            Some(b"not even json".to_vec()),
            &[],
        )
        .await;
    assert_eq!(
        (status, res),
        (StatusCode::OK, json!({"status": "success"}))
    );
    assert_eq!(count(&app.db, "lists").await, 0);
}

#[tokio::test]
async fn malformed_dialect_bodies_are_answered_400_naming_the_problem() {
    let (_db, app) = app().await;
    let id = new_id().to_string();
    let cases: Vec<(Method, String, Vec<u8>, &str)> = vec![
        (
            Method::POST,
            "/api/data".into(),
            json!({"batch": [{"op": "UPSERT", "table": "lists", "id": id}]})
                .to_string()
                .into_bytes(),
            "batch[0].op",
        ),
        (
            Method::POST,
            "/api/data".into(),
            json!({"batch": [{"op": "PUT", "table": "lists", "data": {"name": "x"}}]})
                .to_string()
                .into_bytes(),
            "no row id",
        ),
        (
            Method::POST,
            "/api/data".into(),
            br#"{"batch": []}"#.to_vec(),
            "empty",
        ),
        (
            Method::POST,
            "/api/data".into(),
            json!([{"op": "PUT", "id": id, "tx_id": 1}])
                .to_string()
                .into_bytes(),
            "missing field `type`",
        ),
        (
            Method::POST,
            "/api/data".into(),
            json!({"crud": [{"op": "PUT", "type": "lists", "id": id, "data": [1]}]})
                .to_string()
                .into_bytes(),
            "crud[0].data",
        ),
        (
            Method::POST,
            "/api/data".into(),
            b"[]".to_vec(),
            "no queue entries",
        ),
        (
            Method::POST,
            "/api/data".into(),
            br#"{"entries": []}"#.to_vec(),
            "missing field `transactions`",
        ),
        (
            // A demo batch and queue entries at once: applying either would drop the other.
            Method::POST,
            "/api/data".into(),
            json!({
                "batch": [{"op": "PUT", "table": "lists", "id": id, "data": {"name": "x"}}],
                "crud": [{"op": "PUT", "type": "lists", "id": id, "data": {"name": "y"}}],
            })
            .to_string()
            .into_bytes(),
            "missing field `transactions`",
        ),
        (
            Method::PUT,
            format!("/api/data/lists/{id}"),
            b"[1, 2]".to_vec(),
            "JSON object",
        ),
        (
            Method::PATCH,
            format!("/api/data/lists/{id}"),
            Vec::new(),
            "needs a body",
        ),
        (
            Method::PUT,
            format!("/api/data/lists/{id}"),
            b"{\"name\":".to_vec(),
            "invalid body",
        ),
    ];
    for (method, path, body, needle) in cases {
        let shown = String::from_utf8_lossy(&body).into_owned();
        let (status, _, res) = app.send(method.clone(), &path, Some(body), &[]).await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{method} {path} {shown}: {res}"
        );
        let message = res["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(needle),
            "{method} {path} {shown}: {message:?} does not name {needle:?}"
        );
    }
    assert_eq!(count(&app.db, "lists").await, 0);
}

#[tokio::test]
async fn the_reference_contract_still_answers_byte_for_byte() {
    let (_db, app) = app().await;
    let list = new_id();
    let body = batch(vec![vec![put("lists", list, json!({"name": "ref"}))]]);
    let res = app
        .http
        .post(format!("{}/api/data", app.base))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "application/json");
    assert_eq!(
        res.text().await.unwrap(),
        r#"{"results":[{"status":"success"}]}"#
    );
    assert_eq!(count(&app.db, "lists").await, 1);
    // A body that is no known shape still gets the reference parser's message.
    let (status, _, res) = app.post(&json!({"transaction": []})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        res,
        json!({"message": "invalid request body (line 1, column 18): missing field `transactions`"})
    );
}

#[tokio::test]
async fn every_dialect_is_503_with_retry_after_while_the_database_is_down() {
    let server = spawn_server(
        "postgres://postgres@127.0.0.1:1/nowhere",
        EngineConfig {
            connect_timeout_ms: 300,
            retry_after_ms: 2500,
            ..Default::default()
        },
        Vec::new(),
    )
    .await;
    let id = new_id().to_string();
    let requests: Vec<(Method, String, Value)> = vec![
        (
            Method::PUT,
            format!("/api/data/lists/{id}"),
            json!({"name": "x"}),
        ),
        (
            Method::POST,
            "/api/data".into(),
            json!({"batch": [{"op": "PUT", "table": "lists", "id": id, "data": {"name": "x"}}]}),
        ),
        (
            Method::POST,
            "/api/data".into(),
            json!([{"op": "PUT", "type": "lists", "id": id, "tx_id": 1, "data": {"name": "x"}}]),
        ),
    ];
    for (method, path, body) in requests {
        let (status, headers, res) = server.send_json(method.clone(), &path, &body, &[]).await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{method} {path}: {res}"
        );
        assert_eq!(headers["retry-after"], "3", "{method} {path}");
        assert!(res["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
}

#[tokio::test]
async fn every_dialect_without_a_valid_token_is_401_and_writes_nothing() {
    let db = TestDb::new().await;
    let engine = Engine::connect(
        &db.url,
        EngineConfig {
            allow_unlisted_tables: true,
            ..Default::default()
        },
        Vec::<Arc<dyn crudgate::WriteHook>>::new(),
    )
    .await
    .expect("engine");
    let auth = Authenticator::new(&AuthConfig {
        mode: AuthMode::Jwt,
        audiences: vec!["crudgate-test".into()],
        hs256_secret: Some("dGVzdC1zZWNyZXQtdGhhdC1pcy1sb25nLWVub3VnaC1mb3ItaHMyNTY".into()),
        ..Default::default()
    })
    .expect("authenticator");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(crudgate::serve(
        listener,
        AppState::new(engine, auth),
        async move {
            let _ = stopped.await;
        },
    ));
    let http = reqwest::Client::new();
    let id = new_id().to_string();
    let requests: Vec<(Method, String, Value)> = vec![
        (
            Method::PUT,
            format!("/api/data/lists/{id}"),
            json!({"name": "x"}),
        ),
        (Method::DELETE, format!("/api/data/lists/{id}"), Value::Null),
        (
            Method::POST,
            "/api/data".into(),
            json!({"batch": [{"op": "PUT", "table": "lists", "id": id, "data": {"name": "x"}}]}),
        ),
        (
            Method::POST,
            "/api/data".into(),
            json!({"crud": [{"op": "PUT", "type": "lists", "id": id, "tx_id": 1, "data": {"name": "x"}}]}),
        ),
    ];
    for (method, path, body) in requests {
        for token in [None, Some("Bearer not-a-jwt")] {
            let mut req = http
                .request(method.clone(), format!("{base}{path}"))
                .body(body.to_string());
            if let Some(t) = token {
                req = req.header("authorization", t);
            }
            let res = req.send().await.unwrap();
            assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
        }
    }
    let _ = stop.send(());
    assert_eq!(count(&db.client().await, "lists").await, 0);
}

#[tokio::test]
async fn a_rest_body_over_the_limit_is_413_and_writes_nothing() {
    let (_db, app) = app_with(EngineConfig {
        body_limit: 64,
        ..Default::default()
    })
    .await;
    let (status, _, res) = app
        .send_json(
            Method::PUT,
            &format!("/api/data/lists/{}", new_id()),
            &json!({"name": "x".repeat(100)}),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "body: {res}");
    assert_eq!(count(&app.db, "lists").await, 0);
}
