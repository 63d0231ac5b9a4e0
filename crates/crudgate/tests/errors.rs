//! Every row of `classify()` that a client can reach, provoked for real in Postgres, and the
//! catalog checks that reject an operation before any SQL is sent.

mod harness;

use crudgate::config::EngineConfig;
use harness::*;
use serde_json::{json, Value};

/// The code, details and message of a rejected one-transaction request.
async fn rejected(app: &TestApp, ops: Vec<Value>, code: &str, index: usize) -> Value {
    let r = app.apply_tx(ops).await;
    assert_fatal(&r, code, index)
}

fn todo(list: impl ToString, description: &str) -> Value {
    put(
        "todos",
        new_id(),
        json!({"list_id": list.to_string(), "description": description}),
    )
}

#[tokio::test]
async fn a_put_missing_a_not_null_column_is_not_null_violation() {
    let (_db, app) = app().await;
    let list = seed_list(&app.db).await;
    let f = rejected(
        &app,
        vec![put("todos", new_id(), json!({"list_id": list.to_string()}))],
        "NOT_NULL_VIOLATION",
        0,
    )
    .await;
    assert_eq!(f["details"]["sqlstate"], "23502", "{f}");
    assert_eq!(f["details"]["column"], "description", "{f}");
    assert_eq!(count(&app.db, "todos").await, 0);
}

#[tokio::test]
async fn a_duplicate_in_an_extra_unique_column_is_unique_violation() {
    let db = TestDb::new().await;
    db.exec("alter table lists add column slug text unique")
        .await;
    let app = spawn_app(&db.url, EngineConfig::default()).await;
    let r = app
        .apply(&batch(vec![
            vec![put("lists", new_id(), json!({"name": "a", "slug": "same"}))],
            vec![put("lists", new_id(), json!({"name": "b", "slug": "same"}))],
        ]))
        .await;
    assert_success(&r[0]);
    let f = assert_fatal(&r[1], "UNIQUE_VIOLATION", 0);
    assert_eq!(f["details"]["sqlstate"], "23505", "{f}");
    assert_eq!(f["details"]["constraint"], "lists_slug_key", "{f}");
    assert_eq!(count(&app.db, "lists").await, 1);
}

#[tokio::test]
async fn a_missing_referenced_row_is_foreign_key_violation() {
    let (_db, app) = app().await;
    let f = rejected(
        &app,
        vec![todo(new_id(), "orphan")],
        "FOREIGN_KEY_VIOLATION",
        0,
    )
    .await;
    assert_eq!(f["details"]["sqlstate"], "23503", "{f}");
    assert_eq!(f["details"]["constraint"], "todos_list_id_fkey", "{f}");
    assert_eq!(count(&app.db, "todos").await, 0);
}

#[tokio::test]
async fn a_failed_check_constraint_is_check_violation() {
    let db = TestDb::new().await;
    db.exec("alter table todos add constraint description_not_blank check (description <> '')")
        .await;
    let app = spawn_app(&db.url, EngineConfig::default()).await;
    let list = seed_list(&app.db).await;
    let f = rejected(
        &app,
        vec![todo(list, "fine"), todo(list, "")],
        "CHECK_VIOLATION",
        1,
    )
    .await;
    assert_eq!(f["details"]["sqlstate"], "23514", "{f}");
    assert_eq!(f["details"]["constraint"], "description_not_blank", "{f}");
    assert_eq!(count(&app.db, "todos").await, 0);
}

#[tokio::test]
async fn an_exclusion_constraint_is_constraint_violation_without_the_other_rows_values() {
    let db = TestDb::new().await;
    db.exec(
        "create table bookings (id text primary key, during tsrange not null,
                                exclude using gist (during with &&))",
    )
    .await;
    let app = spawn_app(&db.url, EngineConfig::default()).await;
    let f = rejected(
        &app,
        vec![
            put(
                "bookings",
                "b1",
                json!({"during": "[2024-01-01 10:00, 2024-01-01 12:00)"}),
            ),
            put(
                "bookings",
                "b2",
                json!({"during": "[2024-01-01 11:00, 2024-01-01 13:00)"}),
            ),
        ],
        "CONSTRAINT_VIOLATION",
        1,
    )
    .await;
    assert_eq!(f["details"]["sqlstate"], "23P01", "{f}");
    // Postgres' detail names the other row's values, which may be someone else's.
    assert!(!f.to_string().contains("10:00"), "{f}");
    assert_eq!(count(&app.db, "bookings").await, 0);
}

#[tokio::test]
async fn a_value_too_long_for_varchar_is_invalid_data_naming_the_column_without_the_value() {
    let db = TestDb::new().await;
    db.exec("create table codes (id text primary key, code varchar(3))")
        .await;
    let app = spawn_app(&db.url, EngineConfig::default()).await;
    let r = app
        .apply_tx(vec![put("codes", "c1", json!({"code": "toolong"}))])
        .await;
    let f = assert_fatal(&r, "INVALID_DATA", 0);
    assert_eq!(f["details"]["sqlstate"], "22001", "{f}");
    assert!(f["message"].as_str().unwrap().contains("codes"), "{f}");
    assert_eq!(f["details"]["column"], "code", "{f}");
    assert!(!r.to_string().contains("toolong"), "the value leaked: {r}");
    assert_eq!(count(&app.db, "codes").await, 0);
}

#[tokio::test]
async fn a_numeric_overflowing_its_precision_is_invalid_data_naming_the_column() {
    let db = TestDb::new().await;
    db.exec("create table prices (id text primary key, price numeric(5,2))")
        .await;
    let app = spawn_app(&db.url, EngineConfig::default()).await;
    let r = app
        .apply_tx(vec![put("prices", "p1", json!({"price": "123456.78"}))])
        .await;
    let f = assert_fatal(&r, "INVALID_DATA", 0);
    assert_eq!(f["details"]["sqlstate"], "22003", "{f}");
    assert_eq!(f["details"]["column"], "price", "{f}");
    assert!(!r.to_string().contains("123456"), "the value leaked: {r}");
}

#[tokio::test]
async fn a_missing_privilege_is_unauthorized() {
    let db = TestDb::new().await;
    let role = db.create_role("cg_writer").await;
    db.exec(&format!(
        "
         grant create on database {} to {role}; -- crudgate creates its own schema
         grant usage on schema public to {role};
         grant select, insert, update, delete on lists to {role};
         grant select, update, delete on todos to {role};",
        db.name
    ))
    .await;
    let url = with_user(&db.url, &role, "pw");
    let app = spawn_app(&url, EngineConfig::default()).await;
    let list = new_id();
    let r = app
        .apply(&batch(vec![
            vec![put("lists", list, json!({"name": "allowed"}))],
            vec![todo(list, "forbidden")],
        ]))
        .await;
    assert_success(&r[0]);
    let f = assert_fatal(&r[1], "UNAUTHORIZED", 0);
    assert_eq!(f["details"]["sqlstate"], "42501", "{f}");
    assert_eq!(count(&app.db, "lists").await, 1);
    assert_eq!(count(&app.db, "todos").await, 0);
}

#[tokio::test]
async fn a_row_level_security_refusal_is_unauthorized() {
    let db = TestDb::new().await;
    let role = db.create_role("cg_rls").await;
    db.exec(&format!(
        "
         grant create on database {} to {role}; -- crudgate creates its own schema
         grant usage on schema public to {role};
         grant select, insert, update, delete on lists to {role};
         alter table lists enable row level security;
         alter table lists force row level security;
         create policy own_lists on lists for all to {role}
           using (owner_id = 'me') with check (owner_id = 'me');",
        db.name
    ))
    .await;
    let app = spawn_app(&with_user(&db.url, &role, "pw"), EngineConfig::default()).await;
    let r = app
        .apply(&batch(vec![
            vec![put(
                "lists",
                new_id(),
                json!({"name": "mine", "owner_id": "me"}),
            )],
            vec![put(
                "lists",
                new_id(),
                json!({"name": "theirs", "owner_id": "them"}),
            )],
        ]))
        .await;
    assert_success(&r[0]);
    let f = assert_fatal(&r[1], "UNAUTHORIZED", 0);
    assert_eq!(f["details"]["sqlstate"], "42501", "{f}");
    assert_eq!(count(&app.db, "lists").await, 1);
}

#[tokio::test]
async fn a_value_too_big_for_its_index_is_invalid_data() {
    let db = TestDb::new().await;
    db.exec("create index lists_name on lists (name)").await;
    let app = spawn_app(&db.url, EngineConfig::default()).await;
    // Random, so that Postgres cannot compress it under the index entry limit (about 2.7 kB).
    let name: String = (0..300).map(|_| new_id().to_string()).collect();
    let f = rejected(
        &app,
        vec![put("lists", new_id(), json!({ "name": name }))],
        "INVALID_DATA",
        0,
    )
    .await;
    assert_eq!(f["details"]["sqlstate"], "54000", "{f}");
    assert!(!f.to_string().contains(&name[..36]), "{f}");
    assert_eq!(count(&app.db, "lists").await, 0);
}

#[tokio::test]
async fn a_trigger_raising_an_exception_is_unclassified_error() {
    let db = TestDb::new().await;
    db.exec(
        "create function refuse() returns trigger language plpgsql as $$
         begin raise exception 'lists are read-only today'; end $$;
         create trigger refuse before insert on lists for each row execute function refuse();",
    )
    .await;
    let app = spawn_app(&db.url, EngineConfig::default()).await;
    let f = rejected(
        &app,
        vec![put("lists", new_id(), json!({"name": "x"}))],
        "UNCLASSIFIED_ERROR",
        0,
    )
    .await;
    assert_eq!(f["details"]["sqlstate"], "P0001", "{f}");
    assert_eq!(count(&app.db, "lists").await, 0);
}

/// A statement trigger on `lists` that counts, in a sequence (which no rollback undoes), every
/// INSERT, UPDATE or DELETE statement that Postgres starts executing on it.
const COUNT_STATEMENTS: &str = "
    create sequence lists_statements;
    create function count_statement() returns trigger language plpgsql as $$
    begin perform nextval('lists_statements'); return null; end $$;
    create trigger count_statements before insert or update or delete on lists
      for each statement execute function count_statement();";

/// How many statements ran on `lists` (see `COUNT_STATEMENTS`).
async fn lists_statements(app: &TestApp) -> i64 {
    let row = app
        .db
        .query_one("select last_value, is_called from lists_statements", &[])
        .await
        .unwrap();
    if row.get::<_, bool>(1) {
        row.get(0)
    } else {
        0
    }
}

async fn counting_app() -> (TestDb, TestApp) {
    let db = TestDb::new().await;
    db.exec(COUNT_STATEMENTS).await;
    let app = spawn_app(&db.url, EngineConfig::default()).await;
    (db, app)
}

#[tokio::test]
async fn an_unknown_table_is_schema_mismatch_found_before_any_sql() {
    let (_db, app) = counting_app().await;
    let f = rejected(
        &app,
        vec![
            put(
                "lists",
                new_id(),
                json!({"name": "valid, before the bad one"}),
            ),
            put("no_such_table", new_id(), json!({"name": "x"})),
        ],
        "SCHEMA_MISMATCH",
        1,
    )
    .await;
    assert_eq!(f["details"]["table"], "no_such_table", "{f}");
    assert_eq!(lists_statements(&app).await, 0, "a statement was sent");
    assert_eq!(count(&app.db, "lists").await, 0);
    // The counter does count: the same valid operation alone runs one statement.
    assert_success(
        &app.apply_tx(vec![put("lists", new_id(), json!({"name": "valid"}))])
            .await,
    );
    // (An upsert fires both the INSERT and the UPDATE statement triggers.)
    assert!(lists_statements(&app).await > 0);
}

#[tokio::test]
async fn an_unknown_column_is_schema_mismatch_found_before_any_sql() {
    let (_db, app) = counting_app().await;
    let f = rejected(
        &app,
        vec![
            put(
                "lists",
                new_id(),
                json!({"name": "valid, before the bad one"}),
            ),
            put("lists", new_id(), json!({"name": "x", "colour": "red"})),
        ],
        "SCHEMA_MISMATCH",
        1,
    )
    .await;
    assert_eq!(f["details"]["column"], "colour", "{f}");
    assert_eq!(lists_statements(&app).await, 0, "a statement was sent");
    assert_eq!(count(&app.db, "lists").await, 0);
    assert_success(
        &app.apply_tx(vec![put("lists", new_id(), json!({"name": "valid"}))])
            .await,
    );
    // (An upsert fires both the INSERT and the UPDATE statement triggers.)
    assert!(lists_statements(&app).await > 0);
}

const HOSTILE: &str = "x\"; drop table todos; --";

async fn todos_exists(app: &TestApp) -> bool {
    app.db
        .query_one("select to_regclass('public.todos') is not null", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_hostile_table_name_is_only_a_lookup_key() {
    let (_db, app) = app().await;
    let list = seed_list(&app.db).await;
    assert_success(&app.apply_tx(vec![todo(list, "survivor")]).await);
    for op in [
        put(HOSTILE, new_id(), json!({"name": "x"})),
        patch(HOSTILE, new_id(), json!({"name": "x"})),
        delete(HOSTILE, new_id()),
    ] {
        rejected(&app, vec![op], "SCHEMA_MISMATCH", 0).await;
    }
    assert!(todos_exists(&app).await);
    assert_eq!(count(&app.db, "todos").await, 1);
}

#[tokio::test]
async fn a_hostile_column_name_is_only_a_lookup_key() {
    let (_db, app) = app().await;
    let list = seed_list(&app.db).await;
    assert_success(&app.apply_tx(vec![todo(list, "survivor")]).await);
    let f = rejected(
        &app,
        vec![put("lists", new_id(), json!({ "name": "x", HOSTILE: 1 }))],
        "SCHEMA_MISMATCH",
        0,
    )
    .await;
    assert_eq!(f["details"]["column"], HOSTILE, "{f}");
    rejected(
        &app,
        vec![patch("lists", list, json!({ HOSTILE: 1 }))],
        "SCHEMA_MISMATCH",
        0,
    )
    .await;
    assert!(todos_exists(&app).await);
    assert_eq!(count(&app.db, "todos").await, 1);
}

#[tokio::test]
async fn a_column_added_after_crudgate_started_is_accepted() {
    let (db, app) = app().await;
    // The catalog is loaded and in use.
    assert_success(
        &app.apply_tx(vec![put("lists", new_id(), json!({"name": "before"}))])
            .await,
    );
    db.exec("alter table lists add column colour text").await;
    let list = new_id();
    assert_success(
        &app.apply_tx(vec![put(
            "lists",
            list,
            json!({"name": "after", "colour": "red"}),
        )])
        .await,
    );
    let colour: Option<String> = app
        .db
        .query_one("select colour from lists where id = $1", &[&list])
        .await
        .unwrap()
        .get(0);
    assert_eq!(colour.as_deref(), Some("red"));
}

#[tokio::test]
async fn a_table_created_after_crudgate_started_is_accepted() {
    let (db, app) = app().await;
    assert_success(
        &app.apply_tx(vec![put("lists", new_id(), json!({"name": "before"}))])
            .await,
    );
    db.exec("create table notes (id text primary key, body text not null)")
        .await;
    assert_success(
        &app.apply_tx(vec![put("notes", "n1", json!({"body": "hello"}))])
            .await,
    );
    assert_eq!(count(&app.db, "notes").await, 1);
}

#[tokio::test]
async fn a_column_dropped_after_crudgate_started_is_schema_mismatch() {
    let db = TestDb::new().await;
    db.exec("alter table lists add column colour text").await;
    let app = spawn_app(&db.url, EngineConfig::default()).await;
    assert_success(
        &app.apply_tx(vec![put(
            "lists",
            new_id(),
            json!({"name": "a", "colour": "red"}),
        )])
        .await,
    );
    db.exec("alter table lists drop column colour").await;
    let r = app
        .apply(&batch(vec![
            vec![put("lists", new_id(), json!({"name": "fine"}))],
            vec![put(
                "lists",
                new_id(),
                json!({"name": "b", "colour": "blue"}),
            )],
        ]))
        .await;
    assert_success(&r[0]);
    assert_fatal(&r[1], "SCHEMA_MISMATCH", 0);
    assert_eq!(count(&app.db, "lists").await, 2);
}

/// A trigger on `lists` that raises `sqlstate` for the first `times` statements, counted in a
/// sequence (sequences ignore rollbacks).
async fn failing_app(sqlstate: &str, times: i64, cfg: EngineConfig) -> (TestDb, TestApp) {
    let db = TestDb::new().await;
    db.exec(&format!(
        "create sequence attempts;
         create function flaky() returns trigger language plpgsql as $$
         begin
           if nextval('attempts') <= {times} then
             raise exception 'provoked' using errcode = '{sqlstate}';
           end if;
           return null;
         end $$;
         create trigger flaky before insert on lists
           for each statement execute function flaky();"
    ))
    .await;
    let app = spawn_app(&db.url, cfg).await;
    (db, app)
}

async fn attempts(app: &TestApp) -> i64 {
    app.db
        .query_one("select last_value from attempts", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_serialization_failure_is_retried_inside_the_server() {
    let (_db, app) = failing_app("40001", 1, EngineConfig::default()).await;
    let list = new_id();
    let r = app
        .apply(&batch(vec![
            vec![put("lists", list, json!({"name": "l"}))],
            vec![put(
                "todos",
                new_id(),
                json!({"list_id": list.to_string(), "description": "t"}),
            )],
        ]))
        .await;
    assert_success(&r[0]);
    assert_success(&r[1]);
    assert_eq!(attempts(&app).await, 2, "one failure, one retry");
    assert_eq!(count(&app.db, "lists").await, 1);
    assert_eq!(count(&app.db, "todos").await, 1);
}

#[tokio::test]
async fn a_deadlock_is_retried_inside_the_server() {
    let (_db, app) = failing_app("40P01", 2, EngineConfig::default()).await;
    let r = app
        .apply_tx(vec![put("lists", new_id(), json!({"name": "l"}))])
        .await;
    assert_success(&r);
    assert_eq!(attempts(&app).await, 3, "two failures, then success");
    assert_eq!(count(&app.db, "lists").await, 1);
}

#[tokio::test]
async fn a_serialization_failure_that_persists_is_a_retryable_error() {
    let cfg = EngineConfig {
        max_attempts: 3,
        retry_after_ms: 2500,
        ..Default::default()
    };
    let (_db, app) = failing_app("40001", 1_000, cfg).await;
    let r = app
        .apply(&batch(vec![
            vec![put("lists", new_id(), json!({"name": "a"}))],
            vec![put("lists", new_id(), json!({"name": "b"}))],
        ]))
        .await;
    assert_retryable(&r[0], 2500);
    assert_eq!(r[1], json!({"status": "not_attempted"}));
    assert_eq!(attempts(&app).await, 3, "max_attempts statements ran");
    assert_eq!(count(&app.db, "lists").await, 0);
}

#[tokio::test]
async fn a_lock_timeout_is_a_retryable_error() {
    let db = TestDb::new().await;
    db.exec(&format!(
        "alter database {} set lock_timeout = '200ms'",
        db.name
    ))
    .await;
    let app = spawn_app(&db.url, EngineConfig::default()).await;
    let list = seed_list(&app.db).await;
    let body = batch(vec![
        vec![patch("lists", list, json!({"name": "renamed"}))],
        vec![put("lists", new_id(), json!({"name": "next"}))],
    ]);
    let locker = lock_row(&db, list).await;
    let r = app.apply(&body).await;
    assert_retryable(&r[0], 1000);
    assert!(
        r[0]["message"].as_str().unwrap().contains("55P03"),
        "{}",
        r[0]
    );
    assert_eq!(r[1], json!({"status": "not_attempted"}));
    locker.batch_execute("rollback").await.unwrap();
    assert_eq!(count(&app.db, "lists").await, 1);
    // Once the lock is gone, the same batch goes through.
    let r = app.apply(&body).await;
    assert_success(&r[0]);
    assert_success(&r[1]);
    assert_eq!(count(&app.db, "lists").await, 2);
}

#[tokio::test]
async fn a_statement_timeout_is_a_retryable_error() {
    let db = TestDb::new().await;
    let cfg = EngineConfig {
        statement_timeout_ms: 300,
        ..Default::default()
    };
    let app = spawn_app(&db.url, cfg).await;
    let list = seed_list(&app.db).await;
    let body = batch(vec![vec![
        put("lists", new_id(), json!({"name": "first"})),
        patch("lists", list, json!({"name": "renamed"})),
    ]]);
    let locker = lock_row(&db, list).await;
    let r = app.apply(&body).await;
    assert_retryable(&r[0], 1000);
    assert!(
        r[0]["message"].as_str().unwrap().contains("57014"),
        "{}",
        r[0]
    );
    locker.batch_execute("rollback").await.unwrap();
    assert_eq!(count(&app.db, "lists").await, 1);
    let r = app.apply(&body).await;
    assert_success(&r[0]);
    assert_eq!(count(&app.db, "lists").await, 2);
}

#[tokio::test]
async fn a_column_added_right_after_a_catalog_refresh_is_accepted() {
    let (db, app) = app().await;
    // An unknown name makes the engine reload its catalog (the column does not exist yet).
    rejected(
        &app,
        vec![put(
            "lists",
            new_id(),
            json!({"name": "x", "colour": "red"}),
        )],
        "SCHEMA_MISMATCH",
        0,
    )
    .await;
    // The migration lands, and a client that has it writes at once.
    db.exec("alter table lists add column colour text").await;
    let list = new_id();
    assert_success(
        &app.apply_tx(vec![put(
            "lists",
            list,
            json!({"name": "after", "colour": "red"}),
        )])
        .await,
    );
    let colour: Option<String> = app
        .db
        .query_one("select colour from lists where id = $1", &[&list])
        .await
        .unwrap()
        .get(0);
    assert_eq!(colour.as_deref(), Some("red"));
}

#[tokio::test]
async fn with_skip_a_rejected_transaction_before_a_temporary_failure_is_still_reported() {
    let db = TestDb::new().await;
    db.exec(&format!(
        "alter database {} set lock_timeout = '200ms'",
        db.name
    ))
    .await;
    let cfg = EngineConfig {
        on_fatal: crudgate::config::OnFatal::Skip,
        ..Default::default()
    };
    let app = spawn_app(&db.url, cfg).await;
    let list = seed_list(&app.db).await;
    let body = batch(vec![
        vec![put(
            "lists",
            new_id(),
            json!({"name": "x", "colour": "red"}),
        )],
        vec![patch("lists", list, json!({"name": "renamed"}))],
        vec![put("lists", new_id(), json!({"name": "later"}))],
    ]);
    let locker = lock_row(&db, list).await;
    let r = app.apply(&body).await;
    locker.batch_execute("rollback").await.unwrap();
    // The same results as the exact path gives: the rejection stands, the batch stops at the
    // temporary failure.
    assert_fatal(&r[0], "SCHEMA_MISMATCH", 0);
    assert_retryable(&r[1], 1000);
    assert_eq!(r[2], json!({"status": "not_attempted"}));
    assert_eq!(count(&app.db, "lists").await, 1);
}

#[tokio::test]
async fn a_deferred_constraint_names_its_operation() {
    for planner in [
        crudgate::config::Planner::Bulk,
        crudgate::config::Planner::Naive,
    ] {
        let db = TestDb::new().await;
        db.exec(
            "alter table todos drop constraint todos_list_id_fkey;
             alter table todos add constraint todos_list_id_fkey foreign key (list_id)
               references lists(id) on delete cascade deferrable initially deferred;",
        )
        .await;
        let app = spawn_app(
            &db.url,
            EngineConfig {
                planner,
                ..Default::default()
            },
        )
        .await;
        let list = new_id();
        let f = rejected(
            &app,
            vec![
                put("lists", list, json!({"name": "l"})),
                todo(list, "fine"),
                todo(new_id(), "orphan"),
                todo(list, "fine too"),
            ],
            "FOREIGN_KEY_VIOLATION",
            2,
        )
        .await;
        assert_eq!(
            f["details"]["constraint"], "todos_list_id_fkey",
            "{planner:?}: {f}"
        );
        assert_eq!(count(&app.db, "lists").await, 0);
        // Deferred means deferred: a child before its parent in one transaction is fine.
        let list = new_id();
        let r = app
            .apply_tx(vec![
                todo(list, "child first"),
                put("lists", list, json!({"name": "parent second"})),
            ])
            .await;
        assert_success(&r);
    }
}

#[tokio::test]
async fn a_deferred_constraint_stays_deferred_when_another_transaction_fails() {
    let db = TestDb::new().await;
    db.exec(
        "alter table todos drop constraint todos_list_id_fkey;
         alter table todos add constraint todos_list_id_fkey foreign key (list_id)
           references lists(id) on delete cascade deferrable initially deferred;
         alter table lists add constraint name_not_blank check (name <> '');",
    )
    .await;
    let app = spawn_app(
        &db.url,
        EngineConfig {
            on_fatal: crudgate::config::OnFatal::Skip,
            ..Default::default()
        },
    )
    .await;
    let list = new_id();
    let r = app
        .apply(&batch(vec![
            // Valid: the parent arrives later in the same transaction.
            vec![
                todo(list, "child first"),
                put("lists", list, json!({"name": "parent second"})),
            ],
            // Invalid, which sends the request down the exact path.
            vec![put("lists", new_id(), json!({"name": ""}))],
        ]))
        .await;
    assert_success(&r[0]);
    assert_fatal(&r[1], "CHECK_VIOLATION", 0);
    assert_eq!(count(&app.db, "todos").await, 1);
    assert_eq!(count(&app.db, "lists").await, 1);
}

/// Waits until one of crudgate's connections to this database waits for a lock.
async fn until_crudgate_waits_for_a_lock(app: &TestApp) {
    for _ in 0..500 {
        let waiting: i64 = app
            .db
            .query_one(
                "select count(*) from pg_stat_activity
                  where datname = current_database() and application_name = 'crudgate'
                    and wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("crudgate never waited for the lock");
}

#[tokio::test]
async fn a_real_serialization_failure_is_retried_inside_the_server() {
    let db = TestDb::new().await;
    db.exec(&format!(
        "alter database {} set default_transaction_isolation = 'serializable'",
        db.name
    ))
    .await;
    let app = spawn_app(&db.url, EngineConfig::default()).await;
    let list = seed_list(&app.db).await;
    // Another session changes the row and keeps it locked.
    let other = db.client().await;
    other.batch_execute("begin").await.unwrap();
    other
        .execute(
            "update lists set owner_id = 'other' where id = $1",
            &[&list],
        )
        .await
        .unwrap();
    let body = batch(vec![vec![patch(
        "lists",
        list,
        json!({"name": "from crudgate"}),
    )]]);
    let request = {
        let http = app.http.clone();
        let url = format!("{}/api/data", app.base);
        tokio::spawn(async move { http.post(url).json(&body).send().await })
    };
    // crudgate's snapshot is taken and it waits for the row; the other session's commit
    // then makes its UPDATE a serialization failure (40001).
    until_crudgate_waits_for_a_lock(&app).await;
    other.batch_execute("commit").await.unwrap();
    let res = request.await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    let answer: Value = res.json().await.unwrap();
    assert_success(&results(&answer)[0]);
    let row = app
        .db
        .query_one("select name, owner_id from lists where id = $1", &[&list])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "from crudgate");
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("other"));
}

#[tokio::test]
async fn a_real_deadlock_is_retried_inside_the_server() {
    let db = TestDb::new().await;
    // crudgate's sessions look for deadlocks first, so they are the victim.
    db.exec(&format!(
        "alter database {} set deadlock_timeout = '1s'",
        db.name
    ))
    .await;
    let app = spawn_app(&db.url, EngineConfig::default()).await;
    let x = seed_list(&app.db).await;
    let y = seed_list(&app.db).await;
    let other = db.client().await;
    other
        .batch_execute("set deadlock_timeout = '60s'; begin")
        .await
        .unwrap();
    other
        .execute("update lists set owner_id = 'other' where id = $1", &[&x])
        .await
        .unwrap();
    // crudgate locks y, then waits for x.
    let body = batch(vec![vec![
        patch("lists", y, json!({"name": "y by crudgate"})),
        patch("lists", x, json!({"owner_id": "crudgate"})),
    ]]);
    let request = {
        let http = app.http.clone();
        let url = format!("{}/api/data", app.base);
        tokio::spawn(async move { http.post(url).json(&body).send().await })
    };
    until_crudgate_waits_for_a_lock(&app).await;
    // The other session now waits for y: a cycle, which crudgate's session detects (40P01).
    // Once crudgate rolls back, the other session gets y and commits; the retry then runs.
    other
        .execute("update lists set name = 'y by other' where id = $1", &[&y])
        .await
        .unwrap();
    other.batch_execute("commit").await.unwrap();
    let res = request.await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    let answer: Value = res.json().await.unwrap();
    assert_success(&results(&answer)[0]);
    let owner: Option<String> = app
        .db
        .query_one("select owner_id from lists where id = $1", &[&x])
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner.as_deref(), Some("crudgate"));
    let name: String = app
        .db
        .query_one("select name from lists where id = $1", &[&y])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        name, "y by crudgate",
        "the retry ran after the other commit"
    );
}

#[tokio::test]
async fn tables_crudgate_cannot_write_are_schema_mismatch() {
    let db = TestDb::new().await;
    db.exec(
        "create table no_key (id text, body text);
         create table two_keys (a text, b text, primary key (a, b));
         create view list_names as select id, name from lists;
         create table computed (id text primary key, n int,
                                twice int generated always as (n * 2) stored,
                                seq int generated always as identity);
         create schema hidden;
         create table hidden.secrets (id text primary key, body text);",
    )
    .await;
    let app = spawn_app(&db.url, EngineConfig::default()).await;
    for (op, what) in [
        (put("no_key", "a", json!({"body": "x"})), "no_key"),
        (put("two_keys", "a", json!({"b": "x"})), "two_keys"),
        (
            put("list_names", new_id(), json!({"name": "x"})),
            "list_names",
        ),
        (put("secrets", "a", json!({"body": "x"})), "secrets"),
        (put("computed", "a", json!({"n": 1, "twice": 2})), "twice"),
        (put("computed", "a", json!({"n": 1, "seq": 5})), "seq"),
    ] {
        let f = rejected(&app, vec![op], "SCHEMA_MISMATCH", 0).await;
        assert!(f["message"].as_str().unwrap().contains(what), "{f}");
    }
    // The writable columns of that table are fine.
    assert_success(
        &app.apply_tx(vec![put("computed", "a", json!({"n": 21}))])
            .await,
    );
    let twice: i32 = app
        .db
        .query_one("select twice from computed where id = 'a'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(twice, 42);
    assert_eq!(count(&app.db, "hidden.secrets").await, 0);
}

#[tokio::test]
async fn the_first_configured_schema_wins_for_a_table_name() {
    let db = TestDb::new().await;
    db.exec(
        "create schema app;
         create table app.lists (id uuid primary key, title text not null);",
    )
    .await;
    let app = spawn_app(
        &db.url,
        EngineConfig {
            schemas: vec!["app".into(), "public".into()],
            ..Default::default()
        },
    )
    .await;
    let list = new_id();
    assert_success(
        &app.apply_tx(vec![put("lists", list, json!({"title": "in app"}))])
            .await,
    );
    assert_eq!(count(&app.db, "app.lists").await, 1);
    assert_eq!(count(&app.db, "public.lists").await, 0);
    // public's other tables are still there.
    assert_fatal(
        &app.apply_tx(vec![todo(list, "the fk points at public.lists")])
            .await,
        "FOREIGN_KEY_VIOLATION",
        0,
    );
}

/// A hook that panics on lists named "boom".
struct Boom;

impl crudgate::WriteHook for Boom {
    fn check(
        &self,
        _: &crudgate::Context,
        op: &crudgate::protocol::Operation,
    ) -> Result<(), crudgate::Rejection> {
        let boom = op
            .op_data
            .as_ref()
            .is_some_and(|d| d.get("name").is_some_and(|n| n == "boom"));
        assert!(!boom, "the hook fell over");
        Ok(())
    }
}

#[tokio::test]
async fn a_panic_while_applying_is_a_retryable_error_and_the_server_carries_on() {
    let db = TestDb::new().await;
    let app = spawn_app_with_hooks(
        &db.url,
        EngineConfig::default(),
        vec![std::sync::Arc::new(Boom)],
    )
    .await;
    let r = app
        .apply(&batch(vec![vec![put(
            "lists",
            new_id(),
            json!({"name": "boom"}),
        )]]))
        .await;
    assert_retryable(&r[0], EngineConfig::default().retry_after_ms);
    assert_success(
        &app.apply_tx(vec![put("lists", new_id(), json!({"name": "fine"}))])
            .await,
    );
    assert_eq!(count(&app.db, "lists").await, 1);
}

#[tokio::test]
async fn a_key_column_retyped_after_crudgate_started_is_written_with_its_new_type() {
    let db = TestDb::new().await;
    db.exec("create table notes (id text primary key, body text)")
        .await;
    let app = spawn_app(&db.url, EngineConfig::default()).await;
    let (a, b) = (new_id(), new_id());
    assert_success(
        &app.apply_tx(vec![
            put("notes", a, json!({"body": "a"})),
            put("notes", b, json!({"body": "b"})),
        ])
        .await,
    );
    // The migration makes `uuid = text` an unknown operator for the statements crudgate had
    // planned (42883): the catalog is refreshed, not the client's writes dropped.
    db.exec("alter table notes alter column id type uuid using id::uuid")
        .await;
    assert_success(
        &app.apply_tx(vec![
            patch("notes", a, json!({"body": "patched"})),
            delete("notes", b),
        ])
        .await,
    );
    let rows = app
        .db
        .query("select id, body from notes", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, uuid::Uuid>(0), a);
    assert_eq!(
        rows[0].get::<_, Option<String>>(1).as_deref(),
        Some("patched")
    );
}

#[tokio::test]
async fn a_deferred_trigger_calling_a_missing_function_rejects_its_transaction() {
    // 42883 at COMMIT, with no operation named: rejected once the operation is found, never
    // answered retryable for ever.
    let db = TestDb::new().await;
    db.exec(
        "create function call_missing() returns trigger language plpgsql as $$
         begin perform no_such_function(); return null; end $$;
         create constraint trigger late_check after insert on lists
             deferrable initially deferred for each row execute function call_missing();",
    )
    .await;
    let app = spawn_app(&db.url, EngineConfig::default()).await;
    let r = app
        .apply(&batch(vec![
            vec![put("lists", new_id(), json!({"name": "a"}))],
            vec![put("lists", new_id(), json!({"name": "b"}))],
        ]))
        .await;
    assert_fatal(&r[0], "SCHEMA_MISMATCH", 0);
    assert_eq!(r[1]["status"], "not_attempted");
    assert_eq!(count(&app.db, "lists").await, 0);
}
