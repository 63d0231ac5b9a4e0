//! PUT, PATCH and DELETE as PowerSync clients send them, and the per-transaction atomicity and
//! stop/skip policy of the reference contract. Every effect is read back through a separate
//! connection.

mod harness;

use crudgate::config::{EngineConfig, OnFatal, PatchMissing, Planner};
use harness::*;
use serde_json::json;
use uuid::Uuid;

async fn todo_description(app: &TestApp, id: Uuid) -> Option<String> {
    app.db
        .query_opt("select description from todos where id = $1", &[&id])
        .await
        .unwrap()
        .map(|r| r.get(0))
}

#[tokio::test]
async fn put_inserts_a_row() {
    let (_db, app) = app().await;
    let list = new_id();
    let r = app
        .apply_tx(vec![put(
            "lists",
            list,
            json!({"name": "groceries", "owner_id": "u1"}),
        )])
        .await;
    assert_success(&r);
    let row = app
        .db
        .query_one("select name, owner_id from lists where id = $1", &[&list])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "groceries");
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("u1"));
}

#[tokio::test]
async fn put_of_an_existing_id_updates_only_the_given_columns() {
    let (_db, app) = app().await;
    let list = seed_list(&app.db).await;
    let todo = new_id();
    let first = put(
        "todos",
        todo,
        json!({"list_id": list.to_string(), "description": "milk", "created_by": "alice", "completed": 1}),
    );
    assert_success(&app.apply_tx(vec![first]).await);
    let second = put(
        "todos",
        todo,
        json!({"list_id": list.to_string(), "description": "oat milk"}),
    );
    assert_success(&app.apply_tx(vec![second]).await);
    let row = app
        .db
        .query_one(
            "select description, created_by, completed from todos where id = $1",
            &[&todo],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "oat milk");
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("alice"));
    assert!(row.get::<_, bool>(2));
    assert_eq!(count(&app.db, "todos").await, 1);
}

#[tokio::test]
async fn put_leaves_absent_not_null_default_columns_at_their_default() {
    let (_db, app) = app().await;
    let list = seed_list(&app.db).await;
    let todo = new_id();
    let r = app
        .apply_tx(vec![put(
            "todos",
            todo,
            json!({"list_id": list.to_string(), "description": "bread"}),
        )])
        .await;
    assert_success(&r);
    let row = app
        .db
        .query_one(
            "select completed, created_at is not null, created_at > now() - interval '1 hour' \
             from todos where id = $1",
            &[&todo],
        )
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0), "completed takes its default false");
    assert!(row.get::<_, bool>(1), "created_at takes its default now()");
    assert!(row.get::<_, bool>(2));
}

#[tokio::test]
async fn patch_updates_the_given_columns_only() {
    let (_db, app) = app().await;
    let list = seed_list(&app.db).await;
    let todo = new_id();
    assert_success(
        &app.apply_tx(vec![put(
            "todos",
            todo,
            json!({"list_id": list.to_string(), "description": "eggs", "created_by": "bob"}),
        )])
        .await,
    );
    assert_success(
        &app.apply_tx(vec![patch(
            "todos",
            todo,
            json!({"completed": 1, "completed_by": "carol"}),
        )])
        .await,
    );
    let row = app
        .db
        .query_one(
            "select description, created_by, completed, completed_by from todos where id = $1",
            &[&todo],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "eggs");
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("bob"));
    assert!(row.get::<_, bool>(2));
    assert_eq!(row.get::<_, Option<String>>(3).as_deref(), Some("carol"));
}

#[tokio::test]
async fn patch_can_set_a_column_to_null() {
    let (_db, app) = app().await;
    let list = seed_list(&app.db).await;
    let todo = new_id();
    assert_success(
        &app.apply_tx(vec![put(
            "todos",
            todo,
            json!({"list_id": list.to_string(), "description": "tea", "created_by": "dan"}),
        )])
        .await,
    );
    assert_success(
        &app.apply_tx(vec![patch("todos", todo, json!({"created_by": null}))])
            .await,
    );
    let created_by: Option<String> = app
        .db
        .query_one("select created_by from todos where id = $1", &[&todo])
        .await
        .unwrap()
        .get(0);
    assert_eq!(created_by, None);
    assert_eq!(todo_description(&app, todo).await.as_deref(), Some("tea"));
}

#[tokio::test]
async fn patch_of_missing_row_is_success_without_effect() {
    let (_db, app) = app().await;
    let missing = new_id();
    let r = app
        .apply_tx(vec![patch("lists", missing, json!({"name": "ghost"}))])
        .await;
    assert_success(&r);
    assert_eq!(count(&app.db, "lists").await, 0);
}

#[tokio::test]
async fn patch_of_missing_row_is_rejected_with_row_not_found_when_configured() {
    for planner in [Planner::Bulk, Planner::Naive] {
        let (_db, app) = app_with(EngineConfig {
            patch_missing: PatchMissing::Reject,
            planner,
            ..Default::default()
        })
        .await;
        let existing = new_id();
        let missing = new_id();
        let r = app
            .apply_tx(vec![
                put("lists", existing, json!({"name": "kept?"})),
                patch("lists", missing, json!({"name": "ghost"})),
            ])
            .await;
        assert_fatal(&r, "ROW_NOT_FOUND", 1);
        assert_eq!(
            count(&app.db, "lists").await,
            0,
            "{planner:?}: all or nothing"
        );
        // An empty PATCH of a missing row is a missing row too.
        let r = app.apply_tx(vec![patch("lists", missing, json!({}))]).await;
        assert_fatal(&r, "ROW_NOT_FOUND", 0);
        // And a PATCH of a row that exists still works.
        let list = seed_list(&app.db).await;
        let r = app
            .apply_tx(vec![
                patch("lists", list, json!({"name": "renamed"})),
                patch("lists", list, json!({})),
            ])
            .await;
        assert_success(&r);
    }
}

#[tokio::test]
async fn delete_removes_the_row() {
    let (_db, app) = app().await;
    let list = seed_list(&app.db).await;
    let keep = seed_list(&app.db).await;
    assert_success(&app.apply_tx(vec![delete("lists", list)]).await);
    let ids: Vec<Uuid> = app
        .db
        .query("select id from lists", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, vec![keep]);
}

#[tokio::test]
async fn delete_of_a_missing_row_is_success() {
    let (_db, app) = app().await;
    let keep = seed_list(&app.db).await;
    assert_success(&app.apply_tx(vec![delete("lists", new_id())]).await);
    assert_eq!(count(&app.db, "lists").await, 1);
    let _ = keep;
}

#[tokio::test]
async fn multiple_transactions_in_one_request_are_applied_in_order() {
    for planner in [Planner::Bulk, Planner::Naive] {
        let (_db, app) = app_with(EngineConfig {
            planner,
            ..Default::default()
        })
        .await;
        let list = new_id();
        let a = new_id();
        let b = new_id();
        let l = list.to_string();
        let results = app
            .apply(&batch(vec![
                vec![put("lists", list, json!({"name": "l"}))],
                vec![put("todos", a, json!({"list_id": l, "description": "one"}))],
                vec![patch("todos", a, json!({"description": "two"}))],
                vec![
                    put("todos", b, json!({"list_id": l, "description": "b"})),
                    delete("todos", a),
                ],
                vec![put(
                    "todos",
                    a,
                    json!({"list_id": l, "description": "three"}),
                )],
                vec![
                    patch("todos", a, json!({"description": "four"})),
                    delete("todos", b),
                ],
            ]))
            .await;
        assert_eq!(results.len(), 6);
        for r in &results {
            assert_success(r);
        }
        assert_eq!(
            todo_description(&app, a).await.as_deref(),
            Some("four"),
            "{planner:?}"
        );
        assert_eq!(todo_description(&app, b).await, None, "{planner:?}");
    }
}

#[tokio::test]
async fn the_response_is_sent_only_after_commit() {
    let (_db, app) = app().await;
    let list = seed_list(&app.db).await;
    for i in 0..30 {
        let todo = new_id();
        let ops: Vec<_> = (0..5)
            .map(|j| {
                if j == 0 {
                    put(
                        "todos",
                        todo,
                        json!({"list_id": list.to_string(), "description": format!("v{i}.0")}),
                    )
                } else {
                    patch("todos", todo, json!({"description": format!("v{i}.{j}")}))
                }
            })
            .collect();
        assert_success(&app.apply_tx(ops).await);
        // Read at once, on another connection: the change must already be visible.
        assert_eq!(
            todo_description(&app, todo).await.as_deref(),
            Some(format!("v{i}.4").as_str())
        );
    }
}

#[tokio::test]
async fn a_table_with_a_bigint_primary_key_not_named_id_works() {
    let db = harness::TestDb::new().await;
    db.exec("create table counters (counter_id bigint primary key, label text, hits int not null default 0)")
        .await;
    let app = spawn_app(&db.url, EngineConfig::default()).await;
    let big: i64 = 9_007_199_254_740_993; // above 2^53: must not go through a float
    let r = app
        .apply(&json!({"transactions": [{"crud": [
            {"op": "PUT", "table": "counters", "id": big.to_string(), "op_data": {"label": "a"}},
            {"op": "PUT", "table": "counters", "id": 7, "op_data": {"label": "b", "hits": 3}},
            {"op": "PATCH", "table": "counters", "id": "7", "op_data": {"hits": 4}},
            {"op": "PUT", "table": "counters", "id": "8", "op_data": {}},
            {"op": "DELETE", "table": "counters", "id": "8"}
        ]}]}))
        .await;
    assert_success(&r[0]);
    let rows: Vec<(i64, Option<String>, i32)> = app
        .db
        .query(
            "select counter_id, label, hits from counters order by counter_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        rows,
        vec![(7, Some("b".into()), 4), (big, Some("a".into()), 0)]
    );
}

#[tokio::test]
async fn a_table_with_a_text_primary_key_not_named_id_works() {
    let db = harness::TestDb::new().await;
    db.exec("create table settings (key text primary key, value text not null)")
        .await;
    let app = spawn_app(&db.url, EngineConfig::default()).await;
    let r = app
        .apply_tx(vec![
            put("settings", "theme", json!({"value": "dark"})),
            put("settings", "lang", json!({"value": "en"})),
            patch("settings", "theme", json!({"value": "light"})),
            delete("settings", "lang"),
        ])
        .await;
    assert_success(&r);
    let rows: Vec<(String, String)> = app
        .db
        .query("select key, value from settings order by key", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows, vec![("theme".to_owned(), "light".to_owned())]);
}

#[tokio::test]
async fn previous_values_and_metadata_are_accepted_and_ignored() {
    let (_db, app) = app().await;
    let list = seed_list(&app.db).await;
    let r = app
        .apply(&json!({"transactions": [{"transaction_id": 12, "crud": [
            {"op": "PATCH", "table": "lists", "id": list.to_string(), "transaction_id": 12,
             "op_data": {"name": "new"},
             "previous_values": {"name": "seeded", "no_such_column": 1},
             "metadata": "{\"source\":\"test\"}"},
            {"op": "DELETE", "table": "lists", "id": new_id().to_string(),
             "previous_values": {"name": "x"}, "metadata": "m"}
        ]}]}))
        .await;
    assert_success(&r[0]);
    let name: String = app
        .db
        .query_one("select name from lists where id = $1", &[&list])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "new");
}

#[tokio::test]
async fn the_op_is_case_insensitive() {
    let (_db, app) = app().await;
    let a = new_id();
    let b = new_id();
    let r = app
        .apply(&json!({"transactions": [{"crud": [
            {"op": "put", "table": "lists", "id": a.to_string(), "op_data": {"name": "a"}},
            {"op": "Put", "table": "lists", "id": b.to_string(), "op_data": {"name": "b"}},
            {"op": "patch", "table": "lists", "id": a.to_string(), "op_data": {"name": "a2"}},
            {"op": "Delete", "table": "lists", "id": b.to_string()}
        ]}]}))
        .await;
    assert_success(&r[0]);
    let names: Vec<String> = app
        .db
        .query("select name from lists", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names, vec!["a2".to_owned()]);
}

#[tokio::test]
async fn a_transaction_whose_second_op_violates_a_foreign_key_leaves_no_row_of_its_first() {
    for planner in [Planner::Bulk, Planner::Naive] {
        let (_db, app) = app_with(EngineConfig {
            planner,
            ..Default::default()
        })
        .await;
        let list = new_id();
        let r = app
            .apply_tx(vec![
                put("lists", list, json!({"name": "first op"})),
                put(
                    "todos",
                    new_id(),
                    json!({"list_id": new_id().to_string(), "description": "orphan"}),
                ),
            ])
            .await;
        let f = assert_fatal(&r, "FOREIGN_KEY_VIOLATION", 1);
        assert_eq!(f["details"]["sqlstate"], "23503", "{f}");
        assert_eq!(count(&app.db, "lists").await, 0, "{planner:?}");
        assert_eq!(count(&app.db, "todos").await, 0, "{planner:?}");
    }
}

/// tx0 valid, tx1 violates a foreign key, tx2 valid.
fn three_transactions(ids: [Uuid; 3]) -> serde_json::Value {
    batch(vec![
        vec![put("lists", ids[0], json!({"name": "before"}))],
        vec![put(
            "todos",
            ids[1],
            json!({"list_id": new_id().to_string(), "description": "orphan"}),
        )],
        vec![put("lists", ids[2], json!({"name": "after"}))],
    ])
}

async fn list_names(app: &TestApp) -> Vec<String> {
    app.db
        .query("select name from lists order by name", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn with_on_fatal_stop_later_transactions_are_not_attempted_and_earlier_ones_stay_committed() {
    for planner in [Planner::Bulk, Planner::Naive] {
        let (_db, app) = app_with(EngineConfig {
            planner,
            on_fatal: OnFatal::Stop,
            ..Default::default()
        })
        .await;
        let r = app
            .apply(&three_transactions([new_id(), new_id(), new_id()]))
            .await;
        assert_eq!(r.len(), 3);
        assert_success(&r[0]);
        assert_fatal(&r[1], "FOREIGN_KEY_VIOLATION", 0);
        assert_eq!(r[2], json!({"status": "not_attempted"}));
        assert_eq!(
            list_names(&app).await,
            vec!["before".to_owned()],
            "{planner:?}"
        );
        assert_eq!(count(&app.db, "todos").await, 0);
    }
}

#[tokio::test]
async fn with_on_fatal_skip_later_transactions_are_applied() {
    for planner in [Planner::Bulk, Planner::Naive] {
        let (_db, app) = app_with(EngineConfig {
            planner,
            on_fatal: OnFatal::Skip,
            ..Default::default()
        })
        .await;
        let r = app
            .apply(&three_transactions([new_id(), new_id(), new_id()]))
            .await;
        assert_eq!(r.len(), 3);
        assert_success(&r[0]);
        assert_fatal(&r[1], "FOREIGN_KEY_VIOLATION", 0);
        assert_success(&r[2]);
        assert_eq!(
            list_names(&app).await,
            vec!["after".to_owned(), "before".to_owned()],
            "{planner:?}"
        );
        assert_eq!(count(&app.db, "todos").await, 0);
    }
}

#[tokio::test]
async fn a_transaction_rejected_before_sql_stops_the_batch_too() {
    // tx1 names an unknown column: rejected by the catalog check, never sent.
    let (_db, app) = app().await;
    let r = app
        .apply(&batch(vec![
            vec![put("lists", new_id(), json!({"name": "before"}))],
            vec![put(
                "lists",
                new_id(),
                json!({"name": "x", "no_such_column": 1}),
            )],
            vec![put("lists", new_id(), json!({"name": "after"}))],
        ]))
        .await;
    assert_success(&r[0]);
    assert_fatal(&r[1], "SCHEMA_MISMATCH", 0);
    assert_eq!(r[2], json!({"status": "not_attempted"}));
    assert_eq!(list_names(&app).await, vec!["before".to_owned()]);
}

#[tokio::test]
async fn an_empty_patch_is_success_without_effect_on_every_path() {
    // `{}` is what a no-op UPDATE uploads; with the default policy a missing row is no error.
    for planner in [Planner::Bulk, Planner::Naive] {
        let (_db, app) = app_with(EngineConfig {
            planner,
            on_fatal: OnFatal::Skip,
            ..Default::default()
        })
        .await;
        let list = seed_list(&app.db).await;
        let r = app
            .apply(&batch(vec![
                vec![
                    patch("lists", list, json!({})),
                    patch("lists", new_id(), json!({})),
                ],
                // A failing transaction sends the request down the exact path.
                vec![put(
                    "todos",
                    new_id(),
                    json!({"list_id": new_id().to_string(), "description": "x"}),
                )],
                vec![patch("lists", new_id(), json!({}))],
            ]))
            .await;
        assert_success(&r[0]);
        assert_fatal(&r[1], "FOREIGN_KEY_VIOLATION", 0);
        assert_success(&r[2]);
        assert_eq!(
            list_names(&app).await,
            vec!["seeded".to_owned()],
            "{planner:?}"
        );
    }
}

#[tokio::test]
async fn names_that_need_quoting_work() {
    for planner in [Planner::Bulk, Planner::Naive] {
        let db = harness::TestDb::new().await;
        db.exec(r#"create table "Weird Table" ("select" text primary key, "order" int, "Mixed""Quote" text)"#)
            .await;
        let app = spawn_app(
            &db.url,
            EngineConfig {
                planner,
                ..Default::default()
            },
        )
        .await;
        let r = app
            .apply_tx(vec![
                put("Weird Table", "a", json!({"order": 1, "Mixed\"Quote": "q"})),
                put("Weird Table", "b", json!({"order": 2})),
                patch("Weird Table", "a", json!({"order": 3})),
                delete("Weird Table", "b"),
            ])
            .await;
        assert_success(&r);
        let rows: Vec<(String, Option<i32>, Option<String>)> = app
            .db
            .query(
                r#"select "select", "order", "Mixed""Quote" from "Weird Table""#,
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert_eq!(
            rows,
            vec![("a".to_owned(), Some(3), Some("q".to_owned()))],
            "{planner:?}"
        );
    }
}

#[tokio::test]
async fn two_spellings_of_one_key_in_a_case_insensitive_key_apply_in_order() {
    // "abc" and "ABC" name the same row, so they may not share a bulk statement: in one UPDATE,
    // only one of the two PATCHes would apply.
    for key_type in [
        "citext",
        "text collate case_insensitive", // a nondeterministic ICU collation
    ] {
        let db = harness::TestDb::new().await;
        db.exec(&format!(
            "create extension if not exists citext;
             create collation case_insensitive
                 (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
             create table tags (id {key_type} primary key, v int not null, w int)"
        ))
        .await;
        let app = spawn_app(&db.url, EngineConfig::default()).await;
        // One request each: a failure in one would send the others down the exact path.
        for ops in [
            vec![put("tags", "abc", json!({"v": 0}))],
            vec![
                patch("tags", "abc", json!({"v": 1})),
                patch("tags", "ABC", json!({"w": 2})),
            ],
            vec![
                put("tags", "xyz", json!({"v": 1})),
                put("tags", "XYZ", json!({"v": 2})),
            ],
        ] {
            assert_success(&app.apply_tx(ops).await);
        }
        let rows: Vec<(String, i32, Option<i32>)> = app
            .db
            .query(
                "select id::text, v, w from tags order by lower(id::text)",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert_eq!(
            rows,
            vec![("abc".to_owned(), 1, Some(2)), ("xyz".to_owned(), 2, None)],
            "{key_type}"
        );
    }
}

#[tokio::test]
async fn patches_of_different_columns_in_one_request_each_change_only_their_own_columns() {
    let (_db, app) = app().await;
    let list = seed_list(&app.db).await;
    let other = seed_list(&app.db).await;
    let ids: Vec<uuid::Uuid> = (0..4).map(|_| new_id()).collect();
    for id in &ids {
        app.db
            .execute(
                "insert into todos (id, description, list_id, created_by) values ($1, 'd', $2, 'u')",
                &[id, &list],
            )
            .await
            .expect("seed todo");
    }
    // Interleaved PATCHes of different column sets (merged into one masked UPDATE), with a
    // NULL set through the mask, between other operations.
    let r = app
        .apply_tx(vec![
            patch("todos", ids[0], json!({"description": "only description"})),
            put("lists", new_id(), json!({"name": "between"})),
            patch("todos", ids[1], json!({"completed": 1, "created_by": null})),
            patch("todos", ids[2], json!({"list_id": other})),
            patch(
                "todos",
                ids[3],
                json!({"created_by": "x", "description": "both"}),
            ),
        ])
        .await;
    assert_success(&r);
    let rows: Vec<(String, bool, Option<String>, uuid::Uuid)> = {
        let mut out = Vec::new();
        for id in &ids {
            let row = app
                .db
                .query_one(
                    "select description, completed, created_by, list_id from todos where id = $1",
                    &[id],
                )
                .await
                .expect("row");
            out.push((row.get(0), row.get(1), row.get(2), row.get(3)));
        }
        out
    };
    assert_eq!(
        rows,
        vec![
            ("only description".into(), false, Some("u".into()), list),
            ("d".into(), true, None, list),
            ("d".into(), false, Some("u".into()), other),
            ("both".into(), false, Some("x".into()), list),
        ]
    );
}

#[tokio::test]
async fn a_transaction_is_not_accepted_for_a_row_only_a_later_transaction_writes() {
    // Applied in turn, the first PUT fails: its parent does not exist yet. One statement for
    // both would check the reference only once both rows were in.
    let db = TestDb::with_schema(
        "create table nodes (id text primary key, parent text references nodes (id))",
    )
    .await;
    let cfg = EngineConfig {
        allow_unlisted_tables: true,
        ..EngineConfig::default()
    };
    let app = spawn_app(&db.url, cfg).await;
    let r = app
        .apply(&batch(vec![
            vec![put("nodes", "x", json!({ "parent": "y" }))],
            vec![put("nodes", "y", json!({ "parent": "x" }))],
        ]))
        .await;
    assert_fatal(&r[0], "FOREIGN_KEY_VIOLATION", 0);
    assert_eq!(r[1], json!({ "status": "not_attempted" }));
    assert_eq!(count(&app.db, "nodes").await, 0);
}

#[tokio::test]
async fn rows_numbered_by_a_serial_or_stamped_by_clock_timestamp_are_inserted_in_the_clients_order()
{
    let (db, app) = app().await;
    db.exec(
        "create table messages (id text primary key, seq bigserial, body text, topic text,
                                at timestamptz not null default clock_timestamp());
         create sequence note_numbers;
         create domain numbered as bigint default nextval('note_numbers');
         create table notes (id text primary key, body text, topic text, seq numbered);",
    )
    .await;
    // `messages` numbers and stamps its rows itself; `notes` through its column's domain.
    for (table, orders) in [
        ("messages", &["seq", "at, seq"][..]),
        ("notes", &["seq"][..]),
    ] {
        // Interleaved column sets, within a transaction and across three transactions: a
        // planner that regrouped these PUTs by column set would number `c` before `b`.
        let m = |id: &str, topic: bool| {
            let data = if topic {
                json!({"body": id, "topic": "t"})
            } else {
                json!({"body": id})
            };
            put(table, id, data)
        };
        let r = app
            .apply(&batch(vec![
                vec![m("a", false), m("b", true), m("c", false), m("d", true)],
                vec![m("e", true)],
                vec![m("f", false)],
                vec![m("g", true)],
            ]))
            .await;
        assert!(r.iter().all(|r| r["status"] == "success"), "{r:?}");
        for order in orders {
            let rows = app
                .db
                .query(&format!("select id from {table} order by {order}"), &[])
                .await
                .unwrap();
            let ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            assert_eq!(
                ids,
                ["a", "b", "c", "d", "e", "f", "g"],
                "{table} by {order}"
            );
        }
    }
}

#[tokio::test]
async fn put_works_where_on_conflict_cannot_a_deferrable_key_or_an_update_rule() {
    let (db, app) = app().await;
    db.exec(
        "create table deferred_key (id text primary key deferrable initially immediate,
                                    v text, n int default 7);
         create table audited (id text primary key, v text);
         create table audit_log (v text);
         create rule log_update as on update to audited do also insert into audit_log values (new.v);",
    )
    .await;
    for table in ["deferred_key", "audited"] {
        // New rows, alone and several in one statement; then existing ones, replaced.
        let r = app
            .apply(&batch(vec![
                vec![put(table, "a", json!({"v": "a1"}))],
                vec![
                    put(table, "b", json!({"v": "b1"})),
                    put(table, "c", json!({"v": "c1"})),
                ],
                vec![
                    put(table, "a", json!({"v": "a2"})),
                    put(table, "b", json!({"v": "b2"})),
                    put(table, "d", json!({})),
                ],
                vec![patch(table, "c", json!({"v": "c2"})), delete(table, "d")],
            ]))
            .await;
        assert!(r.iter().all(|r| r["status"] == "success"), "{table}: {r:?}");
        let rows = app
            .db
            .query(&format!("select id, v from {table} order by id"), &[])
            .await
            .unwrap();
        let rows: Vec<(String, Option<String>)> =
            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let want = [("a", "a2"), ("b", "b2"), ("c", "c2")];
        assert_eq!(
            rows,
            want.map(|(i, v)| (i.to_owned(), Some(v.to_owned()))),
            "{table}"
        );
    }
    // The rule saw each update: two PUTs of existing rows and one PATCH.
    assert_eq!(count(&app.db, "audit_log").await, 3);

    // With an INSERT rule, a PUT is refused: the rule's copy of an insert that depends on the
    // table's rows would see the new row (and skip its action), and ON CONFLICT is refused.
    db.exec(
        "create table logged (id text primary key, v text);
         insert into logged values ('x', 'x0');
         create rule log_insert as on insert to logged do also insert into audit_log values (new.v);",
    )
    .await;
    let r = app
        .apply_tx(vec![put("logged", "y", json!({"v": "y1"}))])
        .await;
    assert_fatal(&r, "SCHEMA_MISMATCH", 0);
    assert_success(
        &app.apply_tx(vec![
            patch("logged", "x", json!({"v": "x1"})),
            delete("logged", "z"),
        ])
        .await,
    );
    assert_eq!(count(&app.db, "logged").await, 1);
}
