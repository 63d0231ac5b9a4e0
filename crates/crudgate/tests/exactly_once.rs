//! Exactly once under retries, and rejected writes that are never lost: the ledger and the
//! rejections table, against a real Postgres.

mod harness;

use std::time::Duration;

use crudgate::config::{EngineConfig, OnFatal};
use harness::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Records every insert and update of `todos`, so a test can tell "applied once" from "applied
/// twice with the same result".
const COUNT_WRITES: &str = "
    create table todo_writes (id uuid, op text);
    create function count_todo_write() returns trigger language plpgsql as $$
    begin insert into todo_writes values (new.id, tg_op); return new; end $$;
    create trigger count_todo_writes after insert or update on todos
        for each row execute function count_todo_write();";

fn with_client(client_id: &str, body: Value) -> Value {
    let mut body = body;
    body["client_id"] = json!(client_id);
    body
}

/// An app whose `todos` writes are counted, a list to put todos in, and a new todo's id.
async fn counting_app() -> (TestDb, TestApp, uuid::Uuid, uuid::Uuid) {
    let (db, app) = app().await;
    db.exec(COUNT_WRITES).await;
    let list = seed_list(&app.db).await;
    (db, app, list, new_id())
}

/// A PUT of todo `todo` into `list`.
fn put_milk(todo: uuid::Uuid, list: uuid::Uuid) -> Value {
    put(
        "todos",
        todo,
        json!({"description": "milk", "list_id": list}),
    )
}

async fn writes_of(db: &tokio_postgres::Client, id: uuid::Uuid) -> i64 {
    db.query_one("select count(*) from todo_writes where id = $1", &[&id])
        .await
        .expect("count writes")
        .get(0)
}

#[tokio::test]
async fn the_same_request_posted_twice_with_a_client_id_applies_once_and_answers_the_same() {
    let (_db, app, list, todo) = counting_app().await;
    let body = with_client(
        "client-a",
        batch(vec![
            vec![put_milk(todo, list)],
            vec![patch("todos", todo, json!({"completed": 1}))],
        ]),
    );
    let (s1, _, first) = app.post(&body).await;
    let (s2, _, second) = app.post(&body).await;
    assert_eq!((s1.as_u16(), s2.as_u16()), (200, 200));
    assert_eq!(first, second);
    assert_eq!(results(&first).len(), 2);
    results(&first).iter().for_each(assert_success);
    assert_eq!(
        writes_of(&app.db, todo).await,
        2,
        "one insert and one update, once each"
    );
    let (_, _, metrics) = app.get_text("/metrics").await;
    assert!(
        metrics.contains("crudgate_transactions_replayed_total 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_client_id_header_deduplicates_like_the_body_field() {
    let (_db, app, list, todo) = counting_app().await;
    let body = batch(vec![vec![put_milk(todo, list)]]);
    for _ in 0..2 {
        let res = app
            .http
            .post(format!("{}/api/data", app.base))
            .header("content-type", "application/json")
            .header("PowerSync-Client-Id", "client-h")
            .body(body.to_string())
            .send()
            .await
            .expect("sent");
        assert_eq!(res.status(), 200);
    }
    assert_eq!(writes_of(&app.db, todo).await, 1);
}

#[tokio::test]
async fn without_a_client_id_a_replay_is_applied_again_like_the_reference() {
    let (_db, app, list, todo) = counting_app().await;
    let body = batch(vec![vec![put_milk(todo, list)]]);
    assert_success(&app.apply(&body).await[0]);
    assert_success(&app.apply(&body).await[0]);
    assert_eq!(writes_of(&app.db, todo).await, 2);
    let (_, _, metrics) = app.get_text("/metrics").await;
    assert!(
        metrics.contains("crudgate_requests_without_client_id_total 2"),
        "{metrics}"
    );
}

/// Forwards one HTTP exchange to `upstream` but never lets the answer reach the client: the
/// response is lost after the server committed.
async fn lossy_proxy(upstream: String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (mut client, _) = listener.accept().await.expect("accept");
        let mut server = TcpStream::connect(&upstream).await.expect("upstream");
        let mut buf = vec![0u8; 1 << 16];
        let mut answer = vec![0u8; 1 << 16];
        // Forward the request until the server starts answering, then drop both sides.
        loop {
            tokio::select! {
                n = client.read(&mut buf) => {
                    let n = n.expect("read request");
                    if n == 0 { break; }
                    server.write_all(&buf[..n]).await.expect("forward");
                }
                n = server.read(&mut answer) => {
                    let _ = n;
                    break;
                }
            }
        }
        drop(client);
        drop(server);
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn a_response_lost_after_commit_then_retried_applies_the_row_once() {
    let (_db, app, list, todo) = counting_app().await;
    let body = with_client("client-lost", batch(vec![vec![put_milk(todo, list)]]));
    let proxy = lossy_proxy(app.base.trim_start_matches("http://").to_owned()).await;
    let lost = app
        .http
        .post(format!("{proxy}/api/data"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await;
    assert!(lost.is_err(), "the client must not see the answer");
    assert_eq!(
        writes_of(&app.db, todo).await,
        1,
        "committed before answering"
    );

    // The client resends the whole transaction, as PowerSync does.
    assert_success(&app.apply(&body).await[0]);
    assert_eq!(writes_of(&app.db, todo).await, 1, "not applied twice");
}

#[tokio::test]
async fn sixteen_identical_concurrent_requests_on_two_instances_apply_once() {
    let db = TestDb::new().await;
    db.exec(COUNT_WRITES).await;
    let one = spawn_app(&db.url, EngineConfig::default()).await;
    let two = spawn_server(&db.url, EngineConfig::default(), Vec::new()).await;
    let list = seed_list(&one.db).await;
    let todos: Vec<uuid::Uuid> = (0..3).map(|_| new_id()).collect();
    let body = with_client(
        "client-race",
        batch(vec![
            todos
                .iter()
                .map(|t| put("todos", t, json!({"description": "x", "list_id": list})))
                .collect(),
            vec![patch("todos", todos[0], json!({"completed": true}))],
        ]),
    );
    let sends = (0..16).map(|i| {
        let server = if i % 2 == 0 { &one.server } else { &two };
        server.post(&body)
    });
    let answers = futures::future::join_all(sends).await;
    for (status, _, answer) in &answers {
        assert_eq!(status.as_u16(), 200, "{answer}");
        let r = results(answer);
        assert_eq!(r.len(), 2);
        r.iter().for_each(assert_success);
    }
    assert_eq!(
        writes_of(&one.db, todos[0]).await,
        2,
        "insert + update, once"
    );
    for t in &todos[1..] {
        assert_eq!(writes_of(&one.db, *t).await, 1);
    }
}

#[tokio::test]
async fn uploads_of_two_clients_proceed_concurrently() {
    let (_db, app) = app().await;
    let held = seed_list(&app.db).await;
    let other = seed_list(&app.db).await;
    // Hold a row lock in another session: client A's upload waits for it inside Postgres.
    let mut holder = harness::connect(&_db.url).await;
    let lock = holder.transaction().await.expect("begin");
    lock.execute("select 1 from lists where id = $1 for update", &[&held])
        .await
        .expect("lock");

    let a_body = with_client(
        "client-a",
        batch(vec![vec![patch("lists", held, json!({"name": "renamed"}))]]),
    );
    let a = tokio::spawn({
        let base = app.base.clone();
        let http = app.http.clone();
        async move {
            http.post(format!("{base}/api/data"))
                .header("content-type", "application/json")
                .body(a_body.to_string())
                .send()
                .await
                .expect("sent")
                .json::<Value>()
                .await
                .expect("json")
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!a.is_finished(), "client A must be waiting on the lock");

    let todo = new_id();
    let b_body = with_client(
        "client-b",
        batch(vec![vec![put(
            "todos",
            todo,
            json!({"description": "b", "list_id": other}),
        )]]),
    );
    let b = tokio::time::timeout(Duration::from_secs(5), app.post(&b_body))
        .await
        .expect("client B is not held up by client A");
    assert_success(&results(&b.2)[0]);
    assert!(!a.is_finished(), "client A is still waiting");

    lock.rollback().await.expect("release");
    let a = tokio::time::timeout(Duration::from_secs(10), a)
        .await
        .expect("client A finishes once the lock is gone")
        .expect("task");
    assert_success(&results(&a)[0]);
    let name: String = app
        .db
        .query_one("select name from lists where id = $1", &[&held])
        .await
        .expect("row")
        .get(0);
    assert_eq!(name, "renamed");
    drop(holder);
}

async fn rejection_rows(db: &tokio_postgres::Client) -> Vec<tokio_postgres::Row> {
    db.query(
        "select id::text, user_id, client_id, transaction_id, operation_index, table_name, row_id, op,
                data, previous_values, metadata, error_code, message, details, created_at, transaction
           from crudgate.rejections order by created_at",
        &[],
    )
    .await
    .expect("rejections")
}

#[tokio::test]
async fn a_string_transaction_id_is_stored_as_its_text_with_or_without_a_client_id() {
    let (_db, app) = app().await;
    let orphan = || {
        let tx = put(
            "todos",
            new_id(),
            json!({"description": "x", "list_id": new_id()}),
        );
        json!({"transaction_id": "tx-9", "crud": [tx]})
    };
    for body in [
        json!({"transactions": [orphan()]}),
        json!({"client_id": "client-s", "transactions": [orphan()]}),
    ] {
        assert_fatal(&app.apply(&body).await[0], "FOREIGN_KEY_VIOLATION", 0);
    }
    let ids: Vec<Option<String>> = rejection_rows(&app.db)
        .await
        .iter()
        .map(|r| r.get(3))
        .collect();
    assert_eq!(ids, vec![Some("tx-9".to_owned()); 2]);
}

#[tokio::test]
async fn a_rejected_transaction_is_stored_with_every_field_replayed_after_a_fix_and_purged_when_old(
) {
    // One connection: the replay must not hold one while it applies.
    let (_db, app) = app_with(EngineConfig {
        pool_size: 1,
        ..EngineConfig::default()
    })
    .await;
    let list = seed_list(&app.db).await;
    let missing_list = new_id();
    let todo = new_id();
    let mut bad = put(
        "todos",
        todo,
        json!({"description": "orphan", "list_id": missing_list}),
    );
    bad["previous_values"] = json!({"description": "before"});
    bad["metadata"] = json!("{\"source\":\"test\"}");
    let body = with_client(
        "client-r",
        batch(vec![vec![
            put(
                "todos",
                new_id(),
                json!({"description": "fine", "list_id": list}),
            ),
            bad,
        ]]),
    );
    let r = app.apply(&body).await;
    assert_fatal(&r[0], "FOREIGN_KEY_VIOLATION", 1);

    let rows = rejection_rows(&app.db).await;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    let id: String = row.get(0);
    assert_eq!(
        row.get::<_, Option<String>>(1),
        None,
        "no user without auth"
    );
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("client-r"));
    assert_eq!(row.get::<_, Option<String>>(3).as_deref(), Some("1"));
    assert_eq!(row.get::<_, i32>(4), 1);
    assert_eq!(row.get::<_, Option<String>>(5).as_deref(), Some("todos"));
    assert_eq!(row.get::<_, Option<String>>(6), Some(todo.to_string()));
    assert_eq!(row.get::<_, Option<String>>(7).as_deref(), Some("PUT"));
    assert_eq!(
        row.get::<_, Option<Value>>(8),
        Some(json!({"description": "orphan", "list_id": missing_list}))
    );
    assert_eq!(
        row.get::<_, Option<Value>>(9),
        Some(json!({"description": "before"}))
    );
    assert_eq!(
        row.get::<_, Option<String>>(10).as_deref(),
        Some("{\"source\":\"test\"}")
    );
    assert_eq!(row.get::<_, String>(11), "FOREIGN_KEY_VIOLATION");
    assert!(!row.get::<_, String>(12).is_empty());
    assert_eq!(
        row.get::<_, Option<Value>>(13).expect("details")["constraint"],
        "todos_list_id_fkey"
    );
    assert_eq!(row.get::<_, Value>(15).as_array().map(Vec::len), Some(2));
    assert_eq!(
        count(&app.db, "todos").await,
        0,
        "the transaction was rolled back whole"
    );

    // Fix the cause, then replay: the whole transaction applies and the outcome is recorded.
    app.db
        .execute(
            "insert into lists (id, name) values ($1, 'late')",
            &[&missing_list],
        )
        .await
        .expect("parent");
    let outcome = app.engine.replay_rejection(&id).await.expect("replay");
    assert_eq!(outcome, crudgate::protocol::TxResult::Success);
    assert_eq!(count(&app.db, "todos").await, 2);
    let replay: (Option<Value>, bool) = {
        let r = app
            .db
            .query_one(
                "select replay_result, replayed_at is not null from crudgate.rejections where id::text = $1",
                &[&id],
            )
            .await
            .expect("row");
        (r.get(0), r.get(1))
    };
    assert_eq!(replay, (Some(json!({"status": "success"})), true));
    // Once applied, never again: it could overwrite what the user wrote since.
    let again = app.engine.replay_rejection(&id).await;
    assert!(again.is_err_and(|e| e.contains("already replayed")));
    assert_eq!(count(&app.db, "todos").await, 2);

    // A second, newer rejection; then age the first: purge removes only the old one.
    let r = app
        .apply(&batch(vec![vec![put(
            "todos",
            new_id(),
            json!({"description": "orphan 2", "list_id": new_id()}),
        )]]))
        .await;
    assert_fatal(&r[0], "FOREIGN_KEY_VIOLATION", 0);
    app.db
        .execute(
            "update crudgate.rejections set created_at = now() - interval '3 days' where id::text = $1",
            &[&id],
        )
        .await
        .expect("age");
    assert_eq!(
        app.engine
            .purge_rejections(2 * 86_400)
            .await
            .expect("purge"),
        1
    );
    let left = rejection_rows(&app.db).await;
    assert_eq!(left.len(), 1);
    assert_ne!(left[0].get::<_, String>(0), id);
    let listed = app
        .engine
        .list_rejections(&crudgate::rejections::Filter {
            code: Some("FOREIGN_KEY_VIOLATION".into()),
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].table_name.as_deref(), Some("todos"));
}

#[tokio::test]
async fn a_replayed_rejection_gets_the_same_answer_and_is_stored_once() {
    let (_db, app) = app().await;
    let body = with_client(
        "client-rr",
        batch(vec![
            vec![put(
                "todos",
                new_id(),
                json!({"description": "x", "list_id": new_id()}),
            )],
            vec![put("lists", new_id(), json!({"name": "after"}))],
        ]),
    );
    let (_, _, first) = app.post(&body).await;
    let (_, _, second) = app.post(&body).await;
    assert_eq!(first, second);
    let r = results(&first);
    assert_fatal(&r[0], "FOREIGN_KEY_VIOLATION", 0);
    assert_eq!(r[1]["status"], "not_attempted");
    assert_eq!(rejection_rows(&app.db).await.len(), 1);
    assert_eq!(count(&app.db, "lists").await, 0);
}

#[tokio::test]
async fn the_same_transaction_id_with_other_content_is_an_idempotency_conflict() {
    let (_db, app) = app().await;
    let first = with_client(
        "client-c",
        batch(vec![vec![put("lists", new_id(), json!({"name": "one"}))]]),
    );
    assert_success(&app.apply(&first).await[0]);
    let other = with_client(
        "client-c",
        batch(vec![vec![put("lists", new_id(), json!({"name": "two"}))]]),
    );
    let r = app.apply(&other).await;
    assert_fatal(&r[0], "IDEMPOTENCY_CONFLICT", 0);
    assert_eq!(
        count(&app.db, "lists").await,
        1,
        "the conflicting content is not applied"
    );
    // Resent (the answer was lost, say), the conflict is answered again and recorded once, so
    // that a replay of the dead letters cannot apply it twice; other content is recorded too.
    assert_fatal(&app.apply(&other).await[0], "IDEMPOTENCY_CONFLICT", 0);
    assert_eq!(rejection_rows(&app.db).await.len(), 1);
    let third = with_client(
        "client-c",
        batch(vec![vec![put("lists", new_id(), json!({"name": "three"}))]]),
    );
    assert_fatal(&app.apply(&third).await[0], "IDEMPOTENCY_CONFLICT", 0);
    let rows = rejection_rows(&app.db).await;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].get::<_, String>(11), "IDEMPOTENCY_CONFLICT");
    // The ledger still answers the original content with its original outcome.
    assert_success(&app.apply(&first).await[0]);
}

#[tokio::test]
async fn client_handled_codes_are_answered_for_the_client_and_not_stored() {
    let cfg = EngineConfig {
        client_handled_codes: vec!["FOREIGN_KEY_VIOLATION".into()],
        on_fatal: OnFatal::Skip,
        ..Default::default()
    };
    let (_db, app) = app_with(cfg).await;
    let r = app
        .apply(&with_client(
            "client-h",
            batch(vec![
                vec![put(
                    "todos",
                    new_id(),
                    json!({"description": "x", "list_id": new_id()}),
                )],
                vec![put("lists", new_id(), json!({"name": "after"}))],
            ]),
        ))
        .await;
    assert_eq!(r[0]["status"], "fatal_error");
    assert_eq!(r[0]["requires_client_handling"], true);
    assert_eq!(
        r[1]["status"], "not_attempted",
        "the batch stops even with skip"
    );
    assert_eq!(rejection_rows(&app.db).await.len(), 0);
    let ledger: i64 = app
        .db
        .query_one("select count(*) from crudgate.ledger", &[])
        .await
        .expect("ledger")
        .get(0);
    assert_eq!(
        ledger, 0,
        "the client keeps the transaction, so nothing is decided"
    );
}

#[tokio::test]
async fn ledger_entries_older_than_the_retention_are_pruned_and_newer_ones_kept() {
    let cfg = EngineConfig {
        ledger_retention_hours: 24,
        ..Default::default()
    };
    let (_db, app) = app_with(cfg).await;
    for client in ["old", "new"] {
        let r = app
            .apply(&with_client(
                client,
                batch(vec![vec![put("lists", new_id(), json!({"name": client}))]]),
            ))
            .await;
        assert_success(&r[0]);
    }
    app.db
        .execute(
            "update crudgate.ledger set decided_at = now() - interval '2 days' where client_id = 'old'",
            &[],
        )
        .await
        .expect("age");
    assert_eq!(app.engine.prune_ledger().await.expect("prune"), 1);
    let left: Vec<String> = app
        .db
        .query("select client_id from crudgate.ledger", &[])
        .await
        .expect("ledger")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, vec!["new".to_owned()]);
}

#[tokio::test]
async fn a_transaction_id_repeated_within_one_request_is_a_replay_or_a_conflict_not_a_retry() {
    let (_db, app, list, todo) = counting_app().await;
    let tx = json!({"transaction_id": 7, "crud": [
        put("todos", todo, json!({"description": "once", "list_id": list}))
    ]});
    let other = json!({"transaction_id": 7, "crud": [
        put("lists", new_id(), json!({"name": "other content"}))
    ]});
    let body = json!({"client_id": "client-dup", "transactions": [tx.clone(), tx, other]});
    let r = app.apply(&body).await;
    assert_success(&r[0]);
    assert_success(&r[1]);
    assert_fatal(&r[2], "IDEMPOTENCY_CONFLICT", 0);
    assert_eq!(writes_of(&app.db, todo).await, 1, "applied once");
    assert_eq!(count(&app.db, "lists").await, 1, "only the seeded list");
}

#[tokio::test]
async fn a_replay_is_counted_once_even_when_its_request_falls_back_to_the_exact_path() {
    let (_db, app) = app().await;
    let first =
        json!({"transaction_id": 1, "crud": [put("lists", new_id(), json!({"name": "a"}))]});
    let body = json!({"client_id": "client-m", "transactions": [first.clone()]});
    assert_success(&app.apply(&body).await[0]);
    // The replay rides with a transaction that fails: the bulk attempt falls back and the
    // exact path plans the replay again.
    let failing = json!({"transaction_id": 2, "crud": [
        put("todos", new_id(), json!({"description": "x", "list_id": new_id()}))
    ]});
    let r = app
        .apply(&json!({"client_id": "client-m", "transactions": [first, failing]}))
        .await;
    assert_success(&r[0]);
    assert_fatal(&r[1], "FOREIGN_KEY_VIOLATION", 0);
    let (_, _, metrics) = app.get_text("/metrics").await;
    assert!(
        metrics.contains("crudgate_fast_path_fallbacks_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("crudgate_transactions_replayed_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_nul_character_anywhere_is_rejected_recorded_and_answered_again_never_retried() {
    // Postgres text and jsonb cannot hold U+0000, which a JSON string can. Were the rejection or
    // the ledger entry unstorable, the transaction could never be answered and would block its
    // client's queue.
    let (_db, app) = app().await;
    let list = seed_list(&app.db).await;
    let nul = "a\u{0}b";
    let cases = [
        (put("lists", new_id(), json!({"name": nul})), "INVALID_DATA"),
        (put(nul, new_id(), json!({"name": "x"})), "SCHEMA_MISMATCH"),
        (
            put("lists", new_id(), json!({ nul: "x" })),
            "SCHEMA_MISMATCH",
        ),
        (
            put("todos", nul, json!({"description": "x", "list_id": list})),
            "INVALID_DATA",
        ),
    ];
    for (i, (op, code)) in cases.iter().enumerate() {
        let body = json!({
            "client_id": format!("client-{nul}"),
            "transactions": [{"transaction_id": format!("tx-{i}-{nul}"), "crud": [op]}],
        });
        let first = app.apply(&body).await;
        assert_fatal(&first[0], code, 0);
        assert_eq!(
            app.apply(&body).await,
            first,
            "a resend is answered the same"
        );
    }
    let rows = rejection_rows(&app.db).await;
    assert_eq!(rows.len(), cases.len(), "each rejection is recorded once");
    for (i, row) in rows.iter().enumerate() {
        let client: String = row.get(2);
        let tx: String = row.get(3);
        assert_eq!(client, "client-a\u{FFFD}b");
        assert_eq!(tx, format!("tx-{i}-a\u{FFFD}b"));
    }
    let name: Value = rows[0].get(8);
    assert_eq!(
        name["name"], "a\u{FFFD}b",
        "the value is kept, its NUL marked"
    );
    // Replaying it would write U+FFFD, which the client never sent.
    let id: String = rows[0].get(0);
    let replay = app.engine.replay_rejection(&id).await;
    assert!(replay.is_err_and(|e| e.contains("replaced")));
    assert_eq!(count(&app.db, "lists").await, 1, "only the seeded list");
}

#[tokio::test]
async fn a_number_jsonb_cannot_hold_in_a_rejected_transaction_is_recorded_as_text_not_retried() {
    let (_db, app) = app().await;
    // A todo in a list that does not exist, with a number beyond Postgres' numeric range.
    let body = format!(
        r#"{{"transactions":[{{"transaction_id":1,"crud":[{{"op":"PUT","table":"todos","id":"{}",
            "op_data":{{"description":"x","list_id":"{}"}},"previous_values":{{"p":1e200000}}}}]}}]}}"#,
        new_id(),
        new_id()
    );
    let (status, _, answer) = app.post_raw(body).await;
    assert_eq!(status, 200);
    assert_fatal(&results(&answer)[0], "FOREIGN_KEY_VIOLATION", 0);
    let rows = rejection_rows(&app.db).await;
    assert_eq!(rows.len(), 1);
    let previous: Value = rows[0].get(9);
    assert!(
        previous["p"]
            .as_str()
            .is_some_and(|p| p.ends_with("200000")),
        "kept as text: {previous}"
    );
}

#[tokio::test]
async fn client_and_transaction_ids_of_any_length_deduplicate() {
    // A btree key holds about 2.7 kB: the ledger keeps long ids hashed.
    let (_db, app, list, todo) = counting_app().await;
    // Random, so that Postgres cannot compress it below the limit.
    let long: String = (0..200).map(|_| new_id().to_string()).collect();
    let body = json!({
        "client_id": long,
        "transactions": [{"transaction_id": long, "crud": [put_milk(todo, list)]}],
    });
    for _ in 0..2 {
        assert_success(&app.apply(&body).await[0]);
    }
    assert_eq!(writes_of(&app.db, todo).await, 1);
}

#[tokio::test]
async fn ids_that_would_be_stored_alike_keep_separate_ledger_entries() {
    // NUL is stored as U+FFFD, and long ids as "sha256:<hex>": ids that differ only so must
    // still be different clients (else one client's transaction 1 would be answered with the
    // other's, or refused as IDEMPOTENCY_CONFLICT, and never applied).
    use sha2::Digest as _;
    let (_db, app, list, _) = counting_app().await;
    let long = "L".repeat(300);
    let pairs = [
        ("nul\u{0}cid".to_owned(), "nul\u{FFFD}cid".to_owned()),
        (
            long.clone(),
            format!("sha256:{}", hex::encode(sha2::Sha256::digest(&long))),
        ),
    ];
    for (first, second) in pairs {
        let todos = [new_id(), new_id()];
        for (client, todo) in [&first, &second].into_iter().zip(todos) {
            let body = json!({
                "client_id": client,
                "transactions": [{"transaction_id": 1, "crud": [put_milk(todo, list)]}],
            });
            assert_success(&app.apply(&body).await[0]);
        }
        for todo in todos {
            assert_eq!(writes_of(&app.db, todo).await, 1);
        }
    }
}
