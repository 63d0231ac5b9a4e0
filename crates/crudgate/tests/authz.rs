//! Authorization against a real Postgres: table rules (ops, columns, server-set columns,
//! ownership), renames, and row-level security modes. Each test gets a fresh database.
//!
//! "Before any SQL" is proven with statement-level triggers that bump a sequence: a sequence
//! does not roll back, so a statement that reached the table leaves a trace even when its
//! transaction was rolled back.

use std::collections::BTreeMap;

use crudgate::config::{PatchMissing, RlsConfig, SetValue, TableRule};
use crudgate::protocol::{Batch, OpKind, TxResult};
use crudgate::{Context, Engine, EngineConfig};
use serde_json::{json, Value};
use tokio_postgres::Client;

mod harness;

const A: &str = "alice";
const B: &str = "bob";
const LIST_1: &str = "00000000-0000-4000-8000-000000000001";
const LIST_2: &str = "00000000-0000-4000-8000-000000000002";

const SCHEMA: &str = r#"
create sequence attempts;
create function count_attempt() returns trigger language plpgsql as $$
begin perform nextval('attempts'); return null; end $$;
create function attempts() returns bigint language sql as $$
select case when is_called then last_value else 0 end from attempts $$;

create table lists (
  id uuid primary key,
  name text not null,
  owner_id text,
  updated_at timestamptz,
  archived boolean not null default false
);
create table notes (id text primary key, body text);
create trigger count_attempt before insert or update or delete on notes
  for each statement execute function count_attempt();
create trigger count_attempt before insert or update or delete on lists
  for each statement execute function count_attempt();
"#;

// ---------------------------------------------------------------------------------------------
// Harness

struct Db {
    url: String,
    admin: Client,
    name: String,
    /// Keeps the database until the test ends (dropped with it on a `DATABASE_URL` server).
    _db: harness::TestDb,
}

/// A fresh database with `schema` applied, and a superuser connection to it.
async fn fresh_db(schema: &str) -> Db {
    let db = harness::TestDb::with_schema(schema).await;
    Db {
        url: db.url.clone(),
        admin: db.client().await,
        name: db.name.clone(),
        _db: db,
    }
}

fn rule() -> TableRule {
    TableRule::default()
}

fn owned_lists() -> TableRule {
    TableRule {
        owner: Some("owner_id".into()),
        set: BTreeMap::from([("updated_at".to_string(), SetValue::Now)]),
        ..rule()
    }
}

fn config(tables: Vec<(&str, TableRule)>) -> EngineConfig {
    EngineConfig {
        tables: tables
            .into_iter()
            .map(|(n, r)| (n.to_string(), r))
            .collect(),
        ..EngineConfig::default()
    }
}

async fn engine(db: &Db, cfg: EngineConfig) -> Engine {
    Engine::connect(&db.url, cfg, Vec::new())
        .await
        .expect("engine")
}

fn user(sub: &str) -> Context {
    Context {
        user_id: Some(sub.into()),
        claims: json!({ "sub": sub, "aud": "test", "org": { "id": "org-7" } }),
        client_id: None,
    }
}

fn batch(txs: Vec<Vec<Value>>) -> Batch {
    let transactions: Vec<Value> = txs
        .into_iter()
        .enumerate()
        .map(|(i, crud)| json!({ "transaction_id": i + 1, "crud": crud }))
        .collect();
    serde_json::from_value(json!({ "transactions": transactions })).expect("batch")
}

fn put(table: &str, id: &str, data: Value) -> Value {
    json!({ "op": "PUT", "table": table, "id": id, "op_data": data })
}
fn patch(table: &str, id: &str, data: Value) -> Value {
    json!({ "op": "PATCH", "table": table, "id": id, "op_data": data })
}
fn delete(table: &str, id: &str) -> Value {
    json!({ "op": "DELETE", "table": table, "id": id })
}

async fn apply(engine: &Engine, ctx: Context, crud: Vec<Value>) -> TxResult {
    let out = engine.apply(ctx, batch(vec![crud])).await;
    assert!(!out.unavailable, "database unavailable");
    out.results.into_iter().next().expect("one result")
}

/// Asserts a fatal error with this code at this operation index; returns its message.
fn assert_fatal(r: &TxResult, code: &str, index: usize) -> String {
    match r {
        TxResult::FatalError {
            failed_operation, ..
        } => {
            assert_eq!(failed_operation.error_code, code, "{r:?}");
            assert_eq!(failed_operation.operation_index, index, "{r:?}");
            failed_operation.message.clone()
        }
        other => panic!("expected fatal {code} at {index}, got {other:?}"),
    }
}

async fn attempts(db: &Db) -> i64 {
    db.admin
        .query_one("select attempts()", &[])
        .await
        .expect("attempts")
        .get(0)
}

/// (name, owner_id) of a list, if it exists.
async fn list(db: &Db, id: &str) -> Option<(String, Option<String>)> {
    db.admin
        .query_opt(
            "select name, owner_id from lists where id = $1::text::uuid",
            &[&id],
        )
        .await
        .expect("query")
        .map(|r| (r.get(0), r.get(1)))
}

/// List 1 is still as alice wrote it, and still hers.
async fn assert_alice_s_list_untouched(db: &Db) {
    assert_eq!(
        list(db, LIST_1).await,
        Some(("alice's".into(), Some(A.into())))
    );
}

async fn alice_owns_list_1(engine: &Engine) {
    let r = apply(
        engine,
        user(A),
        vec![put("lists", LIST_1, json!({ "name": "alice's" }))],
    )
    .await;
    assert_eq!(r, TxResult::Success);
}

// ---------------------------------------------------------------------------------------------
// Ownership

#[tokio::test]
async fn user_b_cannot_patch_user_a_s_row() {
    let db = fresh_db(SCHEMA).await;
    let engine = engine(&db, config(vec![("lists", owned_lists())])).await;
    alice_owns_list_1(&engine).await;
    let r = apply(
        &engine,
        user(B),
        vec![
            put("lists", LIST_2, json!({ "name": "bob's" })),
            patch("lists", LIST_1, json!({ "name": "taken" })),
        ],
    )
    .await;
    let msg = assert_fatal(&r, "UNAUTHORIZED", 1);
    assert!(msg.contains("another user"), "{msg}");
    assert_alice_s_list_untouched(&db).await;
    assert_eq!(list(&db, LIST_2).await, None, "the transaction is atomic");
}

#[tokio::test]
async fn user_b_cannot_delete_user_a_s_row() {
    let db = fresh_db(SCHEMA).await;
    let engine = engine(&db, config(vec![("lists", owned_lists())])).await;
    alice_owns_list_1(&engine).await;
    let r = apply(
        &engine,
        user(B),
        vec![
            put("lists", LIST_2, json!({ "name": "bob's" })),
            delete("lists", LIST_1),
        ],
    )
    .await;
    assert_fatal(&r, "UNAUTHORIZED", 1);
    assert_alice_s_list_untouched(&db).await;
}

#[tokio::test]
async fn an_owned_alias_of_a_table_is_enforced_next_to_an_open_alias_in_one_transaction() {
    // Two client names for one server table, only one of them owned: their operations may not
    // share a statement, or the first one's rule would decide for both.
    let db = fresh_db(SCHEMA).await;
    let open = TableRule {
        table: Some("lists".into()),
        ..rule()
    };
    let owned = TableRule {
        table: Some("lists".into()),
        owner: Some("owner_id".into()),
        ..rule()
    };
    let engine = engine(&db, config(vec![("open", open), ("owned", owned)])).await;
    alice_owns_list_1_as(&engine, "owned").await;
    let r = apply(
        &engine,
        user(B),
        vec![
            patch("open", LIST_2, json!({ "name": "anyone's" })),
            patch("owned", LIST_1, json!({ "name": "bob's now" })),
        ],
    )
    .await;
    assert_fatal(&r, "UNAUTHORIZED", 1);
    assert_alice_s_list_untouched(&db).await;
}

#[tokio::test]
async fn user_b_cannot_put_over_user_a_s_row() {
    let db = fresh_db(SCHEMA).await;
    let engine = engine(&db, config(vec![("lists", owned_lists())])).await;
    alice_owns_list_1(&engine).await;
    let r = apply(
        &engine,
        user(B),
        vec![
            put("lists", LIST_2, json!({ "name": "bob's" })),
            patch("lists", LIST_2, json!({ "name": "bob's, renamed" })),
            put("lists", LIST_1, json!({ "name": "taken", "owner_id": B })),
        ],
    )
    .await;
    assert_fatal(&r, "UNAUTHORIZED", 2);
    assert_alice_s_list_untouched(&db).await;
}

#[tokio::test]
async fn ownership_is_enforced_on_the_naive_planner_too() {
    let db = fresh_db(SCHEMA).await;
    let cfg = EngineConfig {
        planner: crudgate::config::Planner::Naive,
        ..config(vec![("lists", owned_lists())])
    };
    let engine = engine(&db, cfg).await;
    alice_owns_list_1(&engine).await;
    let r = apply(
        &engine,
        user(B),
        vec![patch("lists", LIST_1, json!({ "name": "taken" }))],
    )
    .await;
    assert_fatal(&r, "UNAUTHORIZED", 0);
    assert_eq!(list(&db, LIST_1).await.map(|l| l.0), Some("alice's".into()));
}

#[tokio::test]
async fn a_client_supplied_owner_is_overwritten_by_the_token_sub() {
    let db = fresh_db(SCHEMA).await;
    let engine = engine(&db, config(vec![("lists", owned_lists())])).await;
    let r = apply(
        &engine,
        user(A),
        vec![put(
            "lists",
            LIST_1,
            json!({ "name": "mine", "owner_id": "mallory", "updated_at": "2000-01-01 00:00:00Z" }),
        )],
    )
    .await;
    assert_eq!(r, TxResult::Success);
    assert_eq!(
        list(&db, LIST_1).await,
        Some(("mine".into(), Some(A.into())))
    );
    // updated_at came from the database, not from the client.
    let recent: bool = db
        .admin
        .query_one(
            "select updated_at > now() - interval '1 hour' from lists where id = $1::text::uuid",
            &[&LIST_1],
        )
        .await
        .expect("query")
        .get(0);
    assert!(recent);
    // A PATCH cannot re-own a row either: the owner column keeps its value.
    let r = apply(
        &engine,
        user(A),
        vec![patch(
            "lists",
            LIST_1,
            json!({ "name": "still mine", "owner_id": "mallory" }),
        )],
    )
    .await;
    assert_eq!(r, TxResult::Success);
    assert_eq!(
        list(&db, LIST_1).await,
        Some(("still mine".into(), Some(A.into())))
    );
}

#[tokio::test]
async fn the_owner_patches_and_deletes_own_rows_and_now_columns_are_refreshed() {
    let db = fresh_db(SCHEMA).await;
    let engine = engine(&db, config(vec![("lists", owned_lists())])).await;
    alice_owns_list_1(&engine).await;
    db.admin
        .batch_execute("update lists set updated_at = '2000-01-01'")
        .await
        .expect("age the row");
    let r = apply(
        &engine,
        user(A),
        vec![
            patch("lists", LIST_1, json!({ "name": "renamed" })),
            put("lists", LIST_2, json!({ "name": "second" })),
        ],
    )
    .await;
    assert_eq!(r, TxResult::Success);
    let fresh: bool = db
        .admin
        .query_one(
            "select updated_at > '2001-01-01' from lists where id = $1::text::uuid",
            &[&LIST_1],
        )
        .await
        .expect("query")
        .get(0);
    assert!(fresh, "PATCH sets now() columns");
    let r = apply(&engine, user(A), vec![delete("lists", LIST_1)]).await;
    assert_eq!(r, TxResult::Success);
    assert_eq!(list(&db, LIST_1).await, None);
    assert!(list(&db, LIST_2).await.is_some());
}

#[tokio::test]
async fn patch_and_delete_of_a_missing_row_on_an_owned_table_succeed_without_effect() {
    let db = fresh_db(SCHEMA).await;
    let engine = engine(&db, config(vec![("lists", owned_lists())])).await;
    let r = apply(
        &engine,
        user(B),
        vec![
            patch("lists", LIST_1, json!({ "name": "ghost" })),
            delete("lists", LIST_2),
        ],
    )
    .await;
    assert_eq!(r, TxResult::Success);
    assert_eq!(list(&db, LIST_1).await, None);
}

#[tokio::test]
async fn an_owned_table_refuses_a_caller_without_identity() {
    let db = fresh_db(SCHEMA).await;
    let engine = engine(&db, config(vec![("lists", owned_lists())])).await;
    let r = apply(
        &engine,
        Context::default(),
        vec![put("lists", LIST_1, json!({ "name": "anon" }))],
    )
    .await;
    assert_fatal(&r, "UNAUTHORIZED", 0);
    assert_eq!(attempts(&db).await, 0);
}

#[tokio::test]
async fn a_claim_set_column_takes_a_nested_claim() {
    let db = fresh_db(&format!(
        "{SCHEMA} create table docs (id text primary key, org text, body text);"
    ))
    .await;
    let docs = TableRule {
        set: BTreeMap::from([(
            "org".to_string(),
            SetValue::Claim(vec!["org".into(), "id".into()]),
        )]),
        ..rule()
    };
    let engine = engine(&db, config(vec![("docs", docs)])).await;
    let r = apply(
        &engine,
        user(A),
        vec![put("docs", "d1", json!({ "body": "x", "org": "org-evil" }))],
    )
    .await;
    assert_eq!(r, TxResult::Success);
    let org: String = db
        .admin
        .query_one("select org from docs where id = 'd1'", &[])
        .await
        .expect("query")
        .get(0);
    assert_eq!(org, "org-7");
}

#[tokio::test]
async fn rejection_rows_carry_the_user_id_and_the_client_s_names() {
    let db = fresh_db(SCHEMA).await;
    let engine = engine(&db, config(vec![("lists", owned_lists())])).await;
    alice_owns_list_1(&engine).await;
    let ctx = Context {
        client_id: Some("client-b".into()),
        ..user(B)
    };
    let r = apply(
        &engine,
        ctx,
        vec![patch("lists", LIST_1, json!({ "name": "taken" }))],
    )
    .await;
    assert_fatal(&r, "UNAUTHORIZED", 0);
    let row = db
        .admin
        .query_one(
            "select user_id, client_id, table_name, error_code, operation_index
               from crudgate.rejections",
            &[],
        )
        .await
        .expect("one rejection row");
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some(B));
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("client-b"));
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("lists"));
    assert_eq!(row.get::<_, String>(3), "UNAUTHORIZED");
    assert_eq!(row.get::<_, i32>(4), 0);
}

// ---------------------------------------------------------------------------------------------
// Rules checked before any SQL

#[tokio::test]
async fn an_unlisted_table_is_unauthorized_before_any_sql() {
    let db = fresh_db(SCHEMA).await;
    let engine = engine(&db, config(vec![("lists", owned_lists())])).await;
    let r = apply(
        &engine,
        user(A),
        vec![
            put("lists", LIST_1, json!({ "name": "ok" })),
            put("notes", "n1", json!({ "body": "no rule" })),
        ],
    )
    .await;
    let msg = assert_fatal(&r, "UNAUTHORIZED", 1);
    assert!(msg.contains("notes"), "{msg}");
    assert_eq!(attempts(&db).await, 0, "no statement reached any table");
    assert_eq!(list(&db, LIST_1).await, None);
}

#[tokio::test]
async fn an_unknown_table_is_unauthorized_too_so_nothing_reveals_which_tables_exist() {
    let db = fresh_db(SCHEMA).await;
    let engine = engine(&db, config(vec![])).await;
    let r = apply(&engine, user(A), vec![put("nope", "1", json!({}))]).await;
    assert_fatal(&r, "UNAUTHORIZED", 0);
}

#[tokio::test]
async fn unlisted_tables_are_writable_when_allowed() {
    let db = fresh_db(SCHEMA).await;
    let cfg = EngineConfig {
        allow_unlisted_tables: true,
        ..config(vec![])
    };
    let engine = engine(&db, cfg).await;
    let r = apply(
        &engine,
        user(A),
        vec![put("notes", "n1", json!({ "body": "free" }))],
    )
    .await;
    assert_eq!(r, TxResult::Success);
    let r = apply(&engine, user(A), vec![put("nope", "1", json!({}))]).await;
    assert_fatal(&r, "SCHEMA_MISMATCH", 0);
}

#[tokio::test]
async fn a_disallowed_op_is_unauthorized_before_any_sql() {
    let db = fresh_db(SCHEMA).await;
    let notes = TableRule {
        ops: vec![OpKind::Put],
        ..rule()
    };
    let engine = engine(&db, config(vec![("notes", notes)])).await;
    let r = apply(
        &engine,
        user(A),
        vec![
            put("notes", "n1", json!({ "body": "ok" })),
            patch("notes", "n1", json!({ "body": "no" })),
        ],
    )
    .await;
    let msg = assert_fatal(&r, "UNAUTHORIZED", 1);
    assert!(msg.contains("PATCH"), "{msg}");
    let r = apply(&engine, user(A), vec![delete("notes", "n1")]).await;
    assert_fatal(&r, "UNAUTHORIZED", 0);
    assert_eq!(attempts(&db).await, 0);
}

#[tokio::test]
async fn a_column_outside_the_allow_list_is_unauthorized_before_any_sql() {
    let db = fresh_db(SCHEMA).await;
    let lists = TableRule {
        columns: Some(vec!["name".into()]),
        ..owned_lists()
    };
    let engine = engine(&db, config(vec![("lists", lists)])).await;
    let r = apply(
        &engine,
        user(A),
        vec![
            // owner_id and updated_at are server-set: sending them is fine.
            put(
                "lists",
                LIST_1,
                json!({ "name": "a", "owner_id": A, "updated_at": "2020-01-01 00:00:00Z" }),
            ),
            put("lists", LIST_2, json!({ "name": "b", "archived": 1 })),
        ],
    )
    .await;
    let msg = assert_fatal(&r, "UNAUTHORIZED", 1);
    assert!(msg.contains("archived"), "{msg}");
    assert_eq!(attempts(&db).await, 0);
}

#[tokio::test]
async fn a_denied_column_is_unauthorized_before_any_sql() {
    let db = fresh_db(SCHEMA).await;
    let lists = TableRule {
        deny_columns: vec!["archived".into()],
        ..owned_lists()
    };
    let engine = engine(&db, config(vec![("lists", lists)])).await;
    let r = apply(
        &engine,
        user(A),
        vec![patch("lists", LIST_1, json!({ "archived": true }))],
    )
    .await;
    assert_fatal(&r, "UNAUTHORIZED", 0);
    assert_eq!(attempts(&db).await, 0);
    let r = apply(
        &engine,
        user(A),
        vec![put("lists", LIST_1, json!({ "name": "fine" }))],
    )
    .await;
    assert_eq!(r, TxResult::Success);
}

#[tokio::test]
async fn a_rejection_never_shows_the_values_of_columns_the_rules_hide() {
    let db = fresh_db(SCHEMA).await;
    db.admin
        .batch_execute(
            "alter table lists add column secret text default 'TOPSECRET',
                               add constraint short_name check (length(name) < 10)",
        )
        .await
        .expect("secret column");
    let lists = TableRule {
        deny_columns: vec!["secret".into()],
        ..owned_lists()
    };
    let engine = engine(&db, config(vec![("lists", lists)])).await;
    alice_owns_list_1(&engine).await;
    // Postgres' detail for these shows the whole failing row.
    for (data, code) in [
        (json!({ "name": "far too long a name" }), "CHECK_VIOLATION"),
        (json!({ "name": null }), "NOT_NULL_VIOLATION"),
    ] {
        let r = apply(&engine, user(A), vec![patch("lists", LIST_1, data)]).await;
        assert_fatal(&r, code, 0);
        let shown = serde_json::to_string(&r).expect("serializes");
        assert!(!shown.contains("TOPSECRET"), "{shown}");
    }
}

#[tokio::test]
async fn a_rule_naming_an_unknown_column_refuses_its_table() {
    let db = fresh_db(SCHEMA).await;
    let lists = TableRule {
        columns: Some(vec!["nmae".into()]),
        ..rule()
    };
    let engine = engine(&db, config(vec![("lists", lists)])).await;
    let r = apply(
        &engine,
        user(A),
        vec![put("lists", LIST_1, json!({ "name": "x" }))],
    )
    .await;
    let msg = assert_fatal(&r, "SCHEMA_MISMATCH", 0);
    assert!(msg.contains("rule"), "{msg}");
}

#[tokio::test]
async fn contradictory_rules_fail_the_start() {
    let db = fresh_db(SCHEMA).await;
    let lists = TableRule {
        columns: Some(vec!["name".into()]),
        deny_columns: vec!["archived".into()],
        ..rule()
    };
    let err = Engine::connect(&db.url, config(vec![("lists", lists)]), Vec::new())
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("deny_columns"), "{err}");
}

#[derive(serde::Deserialize)]
struct Settings {
    engine: EngineConfig,
}

#[test]
fn rules_parse_from_toml_with_their_documented_defaults() {
    let cfg = toml::from_str::<Settings>(
        r#"
        [engine.tables.todos]
        table = "todo_items"
        schema = "app"
        ops = ["put", "PATCH"]
        deny_columns = ["secret"]
        rename = { done = "completed" }
        owner = "owner_id"
        set = { updated_at = "now()", org = "claim:org.id" }

        [engine.tables.lists]

        [engine.rls]
        jwt_claims = true
        role = "authenticated"
        "#,
    )
    .expect("config")
    .engine;
    let todos = &cfg.tables["todos"];
    assert_eq!(todos.ops, vec![OpKind::Put, OpKind::Patch]);
    assert_eq!(todos.set["updated_at"], SetValue::Now);
    assert_eq!(
        todos.set["org"],
        SetValue::Claim(vec!["org".into(), "id".into()])
    );
    assert_eq!(todos.rename["done"], "completed");
    let lists = &cfg.tables["lists"];
    assert_eq!(lists.ops.len(), 3, "all ops by default");
    assert!(lists.columns.is_none() && lists.deny_columns.is_empty() && lists.owner.is_none());
    assert!(
        !cfg.allow_unlisted_tables,
        "unlisted tables are refused by default"
    );
    assert!(cfg.rls.app_user_id && cfg.rls.jwt_claims);
    assert_eq!(cfg.rls.role.as_deref(), Some("authenticated"));
    assert!(!RlsConfig::default().jwt_claims && RlsConfig::default().role.is_none());
    for bad in [
        "[engine.tables.t]\nset = { a = \"uuid()\" }",
        "[engine.tables.t]\nown = \"x\"",
        "[engine.tables.t]\nops = [\"UPSERT\"]",
        "[engine.rls]\nrole_name = \"x\"",
    ] {
        assert!(toml::from_str::<Settings>(bad).is_err(), "{bad}");
    }
}

// ---------------------------------------------------------------------------------------------
// Renames

#[tokio::test]
async fn a_renamed_table_and_column_land_in_the_server_table_and_column() {
    let db = fresh_db(
        "create schema app;
         create table app.todo_items (id text primary key, description text,
                                      completed boolean not null default false, owner_id text);",
    )
    .await;
    let todos = TableRule {
        table: Some("todo_items".into()),
        schema: Some("app".into()),
        rename: BTreeMap::from([("done".to_string(), "completed".to_string())]),
        owner: Some("owner_id".into()),
        ..rule()
    };
    let engine = engine(&db, config(vec![("todos", todos)])).await;
    let r = apply(
        &engine,
        user(A),
        vec![
            put("todos", "t1", json!({ "description": "milk", "done": 0 })),
            patch("todos", "t1", json!({ "done": 1 })),
        ],
    )
    .await;
    assert_eq!(r, TxResult::Success);
    let row = db
        .admin
        .query_one(
            "select description, completed, owner_id from app.todo_items where id = 't1'",
            &[],
        )
        .await
        .expect("row in the server table");
    assert_eq!(row.get::<_, String>(0), "milk");
    assert!(row.get::<_, bool>(1));
    assert_eq!(row.get::<_, String>(2), A);

    // The server's name for the column is not the client's.
    let r = apply(
        &engine,
        user(A),
        vec![patch("todos", "t1", json!({ "completed": 0 }))],
    )
    .await;
    assert_fatal(&r, "SCHEMA_MISMATCH", 0);
    // Rejections speak the client's names.
    let r = apply(
        &engine,
        user(A),
        vec![patch("todos", "t1", json!({ "done": "maybe" }))],
    )
    .await;
    let msg = assert_fatal(&r, "INVALID_DATA", 0);
    assert!(
        msg.contains("\"todos\".\"done\""),
        "message names the client's table and column: {msg}"
    );
    // The server table is not writable under its own name.
    let r = apply(&engine, user(A), vec![delete("todo_items", "t1")]).await;
    assert_fatal(&r, "UNAUTHORIZED", 0);
}

#[tokio::test]
async fn a_ruled_server_table_is_not_reachable_by_its_own_name_even_when_unlisted_tables_are_allowed(
) {
    let db = fresh_db(SCHEMA).await;
    let cfg = EngineConfig {
        allow_unlisted_tables: true,
        ..config(vec![(
            "my_lists",
            TableRule {
                table: Some("lists".into()),
                ..owned_lists()
            },
        )])
    };
    let engine = engine(&db, cfg).await;
    alice_owns_list_1_as(&engine, "my_lists").await;
    let r = apply(
        &engine,
        user(B),
        vec![patch("lists", LIST_1, json!({ "name": "bypass" }))],
    )
    .await;
    assert_fatal(&r, "SCHEMA_MISMATCH", 0);
    assert_eq!(list(&db, LIST_1).await.map(|l| l.0), Some("alice's".into()));
}

async fn alice_owns_list_1_as(engine: &Engine, table: &str) {
    let r = apply(
        engine,
        user(A),
        vec![put(table, LIST_1, json!({ "name": "alice's" }))],
    )
    .await;
    assert_eq!(r, TxResult::Success);
}

// ---------------------------------------------------------------------------------------------
// Row-level security

/// A unique role name (roles are cluster-wide, databases are not).
fn role_name(db: &Db, what: &str) -> String {
    format!("{}_{what}", db.name)
}

#[tokio::test]
async fn an_app_user_id_policy_admits_the_owner_and_rejects_others() {
    let db = fresh_db("").await;
    // crudgate logs in as the tables' owner (not a superuser, which bypasses every policy);
    // FORCE makes the owner subject to the policies too.
    let owner = role_name(&db, "owner");
    db.admin
        .batch_execute(&format!(
            "create role {owner} login;
             grant create on database {db} to {owner};
             grant usage, create on schema public to {owner};
             set role {owner};
             create table lists (id uuid primary key, name text not null, owner_id text);
             alter table lists enable row level security;
             alter table lists force row level security;
             create policy own on lists
               using (owner_id = current_setting('app.user_id', true))
               with check (owner_id = current_setting('app.user_id', true));
             reset role;",
            db = db.name
        ))
        .await
        .expect("rls setup");
    let url = db.url.replacen("://postgres@", &format!("://{owner}@"), 1);
    let engine = Engine::connect(&url, config(vec![("lists", rule())]), Vec::new())
        .await
        .expect("engine");
    // No owner rule: the policy alone decides.
    let r = apply(
        &engine,
        user(A),
        vec![put("lists", LIST_1, json!({ "name": "a", "owner_id": A }))],
    )
    .await;
    assert_eq!(r, TxResult::Success);
    // B may not create a row for someone else …
    let r = apply(
        &engine,
        user(B),
        vec![
            put("lists", LIST_2, json!({ "name": "b", "owner_id": B })),
            put(
                "lists",
                "00000000-0000-4000-8000-000000000003",
                json!({ "name": "x", "owner_id": A }),
            ),
        ],
    )
    .await;
    let msg = assert_fatal(&r, "UNAUTHORIZED", 1);
    assert!(msg.contains("\"lists\""), "{msg}");
    // … nor take A's row over.
    let r = apply(
        &engine,
        user(B),
        vec![put(
            "lists",
            LIST_1,
            json!({ "name": "taken", "owner_id": B }),
        )],
    )
    .await;
    assert_fatal(&r, "UNAUTHORIZED", 0);
    assert_eq!(list(&db, LIST_1).await, Some(("a".into(), Some(A.into()))));
    assert_eq!(list(&db, LIST_2).await, None);
}

#[tokio::test]
async fn a_jwt_claims_policy_under_set_local_role_admits_the_owner_and_rejects_others() {
    let db = fresh_db("").await;
    // Supabase style: crudgate logs in as a superuser and writes as `authenticated`, whose
    // policies read the claims as auth.uid() does.
    let role = role_name(&db, "authenticated");
    db.admin
        .batch_execute(&format!(
            "create role {role} nologin;
             create table lists (id uuid primary key, name text not null, owner_id text);
             grant usage on schema public to {role};
             grant select, insert, update, delete on lists to {role};
             alter table lists enable row level security;
             create policy own on lists
               using (owner_id = current_setting('request.jwt.claims', true)::jsonb->>'sub')
               with check (owner_id = current_setting('request.jwt.claims', true)::jsonb->>'sub');"
        ))
        .await
        .expect("rls setup");
    let cfg = EngineConfig {
        rls: RlsConfig {
            app_user_id: false,
            jwt_claims: true,
            role: Some(role.clone()),
        },
        ..config(vec![("lists", rule())])
    };
    let engine = engine(&db, cfg).await;
    let r = apply(
        &engine,
        Context {
            client_id: Some("c-a".into()),
            ..user(A)
        },
        vec![put("lists", LIST_1, json!({ "name": "a", "owner_id": A }))],
    )
    .await;
    assert_eq!(r, TxResult::Success, "the owner is admitted");
    let r = apply(
        &engine,
        Context {
            client_id: Some("c-b".into()),
            ..user(B)
        },
        vec![put(
            "lists",
            LIST_1,
            json!({ "name": "taken", "owner_id": B }),
        )],
    )
    .await;
    assert_fatal(&r, "UNAUTHORIZED", 0);
    let r = apply(
        &engine,
        user(B),
        vec![put(
            "lists",
            LIST_2,
            json!({ "name": "for a", "owner_id": A }),
        )],
    )
    .await;
    assert_fatal(&r, "UNAUTHORIZED", 0);
    assert_eq!(list(&db, LIST_1).await, Some(("a".into(), Some(A.into()))));
    // The bookkeeping (ledger, rejections) ran as the login role, after the role was reset.
    let rejections: i64 = db
        .admin
        .query_one("select count(*) from crudgate.rejections", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rejections, 2);
}

// ---------------------------------------------------------------------------------------------
// Cost

/// A TCP proxy to Postgres that delays everything the server sends by `delay` (without
/// limiting throughput), so a request's time counts its round trips.
async fn slow_proxy(db_url: &str, delay: std::time::Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (prefix, rest) = db_url.split_once("@127.0.0.1:").expect("local url");
    let (port, path) = rest.split_once('/').expect("path");
    let upstream = format!("127.0.0.1:{port}");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(&upstream)
                .await
                .expect("upstream");
            client.set_nodelay(true).ok();
            server.set_nodelay(true).ok();
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut cr, &mut sw).await;
            });
            let (tx, mut rx) =
                tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = sr.read(&mut buf).await {
                    if n == 0
                        || tx
                            .send((tokio::time::Instant::now(), buf[..n].to_vec()))
                            .is_err()
                    {
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                while let Some((at, bytes)) = rx.recv().await {
                    tokio::time::sleep_until(at + delay).await;
                    if cw.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    format!("{prefix}@{addr}/{path}")
}

#[tokio::test]
async fn ownership_guards_add_no_round_trip() {
    let delay = std::time::Duration::from_millis(60);
    let db = fresh_db(SCHEMA).await;
    let url = slow_proxy(&db.url, delay).await;
    let open = TableRule {
        table: Some("lists".into()),
        ..rule()
    };
    let owned = TableRule {
        table: Some("lists".into()),
        ..owned_lists()
    };
    let engine = Engine::connect(
        &url,
        config(vec![("open", open), ("owned", owned)]),
        Vec::new(),
    )
    .await
    .expect("engine");
    alice_owns_list_1_as(&engine, "owned").await;
    let mut best = BTreeMap::new();
    // Each shape runs once to prepare its statements, then is timed.
    for round in 0..4 {
        for table in ["open", "owned"] {
            let started = std::time::Instant::now();
            let r = apply(
                &engine,
                user(A),
                vec![
                    patch(table, LIST_1, json!({ "name": format!("n{round}") })),
                    put(table, LIST_2, json!({ "name": "two", "owner_id": A })),
                ],
            )
            .await;
            assert_eq!(r, TxResult::Success);
            if round > 0 {
                let t = started.elapsed();
                let e = best.entry(table).or_insert(t);
                *e = (*e).min(t);
            }
        }
    }
    let (open, owned) = (best["open"], best["owned"]);
    eprintln!("round trip {delay:?}: open table {open:?}, owned table {owned:?}");
    // One round trip each: BEGIN, settings, guards, statements and COMMIT in one pipeline.
    assert!(owned < delay * 2, "owned table took {owned:?}");
    assert!(owned < open + delay / 2, "open {open:?}, owned {owned:?}");
}

#[tokio::test]
async fn rls_settings_and_the_role_switch_add_no_round_trip() {
    let delay = std::time::Duration::from_millis(60);
    let db = fresh_db(SCHEMA).await;
    let role = role_name(&db, "writer");
    db.admin
        .batch_execute(&format!(
            "create role {role} nologin;
             grant usage on schema public to {role};
             grant select, insert, update, delete on lists to {role};
             grant usage on sequence attempts to {role};"
        ))
        .await
        .expect("role");
    let url = slow_proxy(&db.url, delay).await;
    let cfg = EngineConfig {
        rls: RlsConfig {
            app_user_id: true,
            jwt_claims: true,
            role: Some(role),
        },
        ..config(vec![("lists", owned_lists())])
    };
    let engine = Engine::connect(&url, cfg, Vec::new())
        .await
        .expect("engine");
    let mut best = std::time::Duration::MAX;
    for round in 0..4 {
        let started = std::time::Instant::now();
        let r = apply(
            &engine,
            user(A),
            vec![put("lists", LIST_1, json!({ "name": format!("n{round}") }))],
        )
        .await;
        assert_eq!(r, TxResult::Success);
        if round > 0 {
            best = best.min(started.elapsed());
        }
    }
    eprintln!("round trip {delay:?}: settings, role, guard, PUT, COMMIT in {best:?}");
    assert!(best < delay * 2, "took {best:?}");
}

#[tokio::test]
async fn a_client_id_adds_no_round_trip_and_a_resent_transaction_is_still_answered_once() {
    let delay = std::time::Duration::from_millis(60);
    let db = fresh_db(SCHEMA).await;
    let url = slow_proxy(&db.url, delay).await;
    let engine = Engine::connect(&url, config(vec![("lists", rule())]), Vec::new())
        .await
        .expect("engine");
    let ctx = Context {
        client_id: Some("device-1".into()),
        ..user(A)
    };
    let request = |round: usize| -> Batch {
        let crud = vec![put("lists", LIST_1, json!({ "name": format!("n{round}") }))];
        serde_json::from_value(
            json!({ "transactions": [{ "transaction_id": round, "crud": crud }] }),
        )
        .expect("batch")
    };
    let mut best = std::time::Duration::MAX;
    for round in 0..4 {
        let started = std::time::Instant::now();
        let out = engine.apply(ctx.clone(), request(round)).await;
        assert_eq!(out.results, vec![TxResult::Success]);
        if round > 0 {
            best = best.min(started.elapsed());
        }
    }
    eprintln!("round trip {delay:?}: lock, PUT, ledger insert, COMMIT in {best:?}");
    assert!(best < delay * 2, "took {best:?}");
    // Resent after a later one: answered from the ledger, not applied again.
    let out = engine.apply(ctx.clone(), request(1)).await;
    assert_eq!(out.results, vec![TxResult::Success]);
    assert_eq!(list(&db, LIST_1).await.map(|l| l.0).as_deref(), Some("n3"));
    assert!(engine
        .metrics()
        .render()
        .contains("crudgate_transactions_replayed_total 1"));
}

#[tokio::test]
async fn a_role_that_cannot_be_assumed_is_a_temporary_failure_not_a_rejection() {
    let db = fresh_db(SCHEMA).await;
    let cfg = EngineConfig {
        rls: RlsConfig {
            role: Some(role_name(&db, "missing")),
            ..RlsConfig::default()
        },
        ..config(vec![("lists", owned_lists())])
    };
    let engine = engine(&db, cfg).await;
    let r = apply(
        &engine,
        user(A),
        vec![put("lists", LIST_1, json!({ "name": "x" }))],
    )
    .await;
    assert!(matches!(r, TxResult::RetryableError { .. }), "{r:?}");
    assert_eq!(list(&db, LIST_1).await, None);
}

#[tokio::test]
async fn a_replayed_rejection_runs_with_the_claims_of_its_original_token() {
    let db = fresh_db(&format!(
        "{SCHEMA} create table docs (id text primary key, org text, body text not null);"
    ))
    .await;
    let docs = TableRule {
        set: BTreeMap::from([(
            "org".to_string(),
            SetValue::Claim(vec!["org".into(), "id".into()]),
        )]),
        ..rule()
    };
    let engine = engine(&db, config(vec![("docs", docs)])).await;
    // Rejected first: `body` is missing and may not be null.
    let r = apply(&engine, user(A), vec![put("docs", "d1", json!({}))]).await;
    assert_fatal(&r, "NOT_NULL_VIOLATION", 0);
    db.admin
        .batch_execute("alter table docs alter column body drop not null")
        .await
        .expect("fix the cause");
    engine.refresh_schema().await.expect("refresh");
    let id: String = db
        .admin
        .query_one("select id::text from crudgate.rejections", &[])
        .await
        .expect("one rejection")
        .get(0);
    assert_eq!(
        engine.replay_rejection(&id).await.expect("replay"),
        TxResult::Success
    );
    let org: String = db
        .admin
        .query_one("select org from docs where id = 'd1'", &[])
        .await
        .expect("replayed row")
        .get(0);
    assert_eq!(org, "org-7", "the nested claim came from the stored claims");
}

#[tokio::test]
async fn a_patch_of_only_the_owner_column_of_another_user_s_row_is_unauthorized() {
    for patch_missing in [PatchMissing::Ignore, PatchMissing::Reject] {
        let db = fresh_db(SCHEMA).await;
        let cfg = EngineConfig {
            patch_missing,
            ..config(vec![("lists", owned_lists())])
        };
        let engine = engine(&db, cfg).await;
        alice_owns_list_1(&engine).await;
        // The owner column is server-set, so this PATCH is empty once it is dropped: it must
        // not look like a success to bob's client.
        let r = apply(
            &engine,
            user(B),
            vec![patch("lists", LIST_1, json!({ "owner_id": B }))],
        )
        .await;
        assert_fatal(&r, "UNAUTHORIZED", 0);
        let r = apply(
            &engine,
            user(A),
            vec![patch("lists", LIST_1, json!({ "owner_id": B }))],
        )
        .await;
        assert_eq!(r, TxResult::Success, "{patch_missing:?}");
        assert_alice_s_list_untouched(&db).await;
    }
}

#[tokio::test]
async fn a_sub_spelled_like_the_hash_of_a_long_sub_does_not_share_its_ledger() {
    use sha2::Digest as _;
    let db = fresh_db(SCHEMA).await;
    let engine = engine(&db, config(vec![("lists", rule())])).await;
    // The ledger keeps ids longer than 256 bytes as "sha256:<hex>".
    let victim = "v".repeat(300);
    let forged = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&victim)));
    let as_client = |sub: &str| Context {
        client_id: Some("c1".into()),
        ..user(sub)
    };
    let r = apply(
        &engine,
        as_client(&forged),
        vec![put("lists", LIST_1, json!({ "name": "planted" }))],
    )
    .await;
    assert_eq!(r, TxResult::Success);
    // The victim's own transaction 1 of client c1, with other content: applied, not
    // IDEMPOTENCY_CONFLICT with the other user's entry.
    let r = apply(
        &engine,
        as_client(&victim),
        vec![put("lists", LIST_2, json!({ "name": "victim's" }))],
    )
    .await;
    assert_eq!(r, TxResult::Success);
    assert_eq!(
        list(&db, LIST_2).await.map(|l| l.0).as_deref(),
        Some("victim's")
    );
}
