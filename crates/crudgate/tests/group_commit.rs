//! Group commit: small requests that wait together commit in one database transaction, and
//! grouping never changes an answer, never mixes identities, and never lets one request hold
//! up the others.
//!
//! Each test first occupies the lane with a request stuck on a row lock held by another
//! session: the lane gives up on it after its lock timeout (20 ms), and meanwhile the requests
//! sent next are waiting, so they form a group when the lane is handed on (and any that come
//! later queue behind the first of them).

mod harness;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crudgate::config::EngineConfig;
use crudgate::protocol::{Batch, TxResult};
use crudgate::{Context, Engine};
use harness::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const SCHEMA: &str = "
    create table notes (
        id uuid primary key,
        body text not null,
        n int check (n >= 0),
        author text default current_setting('app.user_id', true)
    );
    create table held (id uuid primary key, v int);
    create table note_writes (id uuid);
    create function count_note_write() returns trigger language plpgsql as $$
    begin insert into note_writes values (new.id); return new; end $$;
    create trigger count_note_writes after insert or update on notes
        for each row execute function count_note_write();";

const HELD: &str = "00000000-0000-0000-0000-0000000000a1";

async fn engine(db: &TestDb) -> Engine {
    engine_at(&db.url).await
}

async fn engine_at(url: &str) -> Engine {
    let cfg = EngineConfig {
        allow_unlisted_tables: true,
        ..EngineConfig::default()
    };
    Engine::connect(url, cfg, vec![]).await.expect("engine")
}

async fn setup() -> (TestDb, Engine) {
    let db = TestDb::with_schema(SCHEMA).await;
    db.exec(&format!("insert into held values ('{HELD}', 0)"))
        .await;
    let engine = engine(&db).await;
    (db, engine)
}

fn ctx(user: Option<&str>, client: &str) -> Context {
    Context {
        user_id: user.map(str::to_owned),
        claims: user.map_or(Value::Null, |u| json!({ "sub": u })),
        client_id: Some(client.to_owned()),
    }
}

/// One client transaction of `ops`.
fn one_tx(ops: Vec<Value>) -> Batch {
    serde_json::from_value(batch(vec![ops])).expect("a batch")
}

fn note(id: uuid::Uuid, n: i32) -> Value {
    put("notes", id, json!({ "body": "b", "n": n }))
}

/// Holds the `held` row in another session, and sends a request that needs it, so that the
/// lane is busy for its lock timeout. Returns that session (roll it back to release the row)
/// and the stuck request.
async fn occupy_lane(
    db: &TestDb,
    engine: &Engine,
    user: Option<&str>,
) -> (tokio_postgres::Client, JoinHandle<Vec<TxResult>>) {
    let holder = db.client().await;
    holder
        .batch_execute(&format!(
            "begin; select * from held where id = '{HELD}' for update"
        ))
        .await
        .expect("lock the row");
    let (engine, ctx) = (engine.clone(), ctx(user, "stuck"));
    let stuck = tokio::spawn(async move {
        let b = one_tx(vec![patch("held", HELD, json!({ "v": 1 }))]);
        engine.apply(ctx, b).await.results
    });
    // The others are sent once it waits for the row.
    let watcher = db.client().await;
    for _ in 0..1000 {
        let waiting: i64 = watcher
            .query_one(
                "select count(*) from pg_stat_activity \
                 where datname = current_database() and wait_event_type = 'Lock'",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if waiting > 0 {
            return (holder, stuck);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("the stuck request never waited for the row");
}

/// Releases the held row; the stuck request's answer.
async fn release(
    holder: tokio_postgres::Client,
    stuck: JoinHandle<Vec<TxResult>>,
) -> Vec<TxResult> {
    holder.batch_execute("rollback").await.expect("release");
    stuck.await.expect("stuck request")
}

/// Sends each request at once, each from its own client; answers in order.
async fn send_all(engine: &Engine, requests: Vec<(Option<&str>, Batch)>) -> Vec<Vec<TxResult>> {
    let tasks: Vec<_> = requests
        .into_iter()
        .enumerate()
        .map(|(i, (user, b))| {
            let (engine, ctx) = (engine.clone(), ctx(user, &format!("client-{i}")));
            tokio::spawn(async move { engine.apply(ctx, b).await.results })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("request task"));
    }
    out
}

fn metric(engine: &Engine, name: &str) -> u64 {
    engine.metrics().get(name).expect("a counter")
}

fn json_of(r: &TxResult) -> Value {
    serde_json::to_value(r).expect("serialize")
}

async fn scalar(db: &TestDb, sql: &str) -> i64 {
    db.client()
        .await
        .query_one(sql, &[])
        .await
        .expect(sql)
        .get(0)
}

#[tokio::test]
async fn small_requests_that_wait_together_commit_together_and_each_is_recorded() {
    let (db, engine) = setup().await;
    let (holder, stuck) = occupy_lane(&db, &engine, None).await;
    let ids: Vec<uuid::Uuid> = (0..10).map(|_| new_id()).collect();
    let answers = send_all(
        &engine,
        ids.iter()
            .map(|&id| (None, one_tx(vec![note(id, 1)])))
            .collect(),
    )
    .await;
    for a in &answers {
        assert_success(&json_of(&a[0]));
    }
    assert!(
        metric(&engine, "grouped_requests_total") >= 2,
        "requests that waited together were grouped"
    );
    assert!(metric(&engine, "group_commits_total") >= 1);
    assert_eq!(scalar(&db, "select count(*) from notes").await, 10);
    assert_eq!(
        scalar(&db, "select count(*) from crudgate.ledger").await,
        10,
        "each request's transaction is in the ledger, under its own client"
    );
    assert_eq!(
        scalar(&db, "select count(distinct client_id) from crudgate.ledger").await,
        10
    );
    assert_success(&json_of(&release(holder, stuck).await[0]));
}

#[tokio::test]
async fn a_request_waiting_for_a_row_lock_does_not_hold_up_the_others() {
    let (db, engine) = setup().await;
    let (holder, stuck) = occupy_lane(&db, &engine, None).await;
    let others = send_all(
        &engine,
        (0..5)
            .map(|_| (None, one_tx(vec![note(new_id(), 1)])))
            .collect(),
    );
    let answers = tokio::time::timeout(Duration::from_secs(5), others)
        .await
        .expect("answered while the row is still locked");
    assert!(answers.iter().all(|a| matches!(a[0], TxResult::Success)));
    assert!(
        metric(&engine, "grouped_requests_total") >= 2,
        "the lane gave up on the stuck request and grouped the others"
    );
    assert!(
        !stuck.is_finished(),
        "the stuck request still waits for its row"
    );
    assert_success(&json_of(&release(holder, stuck).await[0]));
    assert_eq!(
        scalar(&db, "select v::bigint from held").await,
        1,
        "applied once the row was free"
    );
}

#[tokio::test]
async fn a_slow_member_holds_up_its_group_for_half_a_second_at_most() {
    let (db, _) = setup().await;
    db.exec(
        "create table slow (id uuid primary key, secs float8);
         create function sleep_a_while() returns trigger language plpgsql as $$
         begin perform pg_sleep(new.secs); return new; end $$;
         create trigger sleep_a_while before insert on slow
             for each row execute function sleep_a_while();",
    )
    .await;
    let engine = engine(&db).await;
    // While the lane is busy, a slow request and four quick ones queue up: one group.
    let (holder, stuck) = occupy_lane(&db, &engine, None).await;
    let slow_id = new_id();
    let mut requests = vec![(
        None,
        one_tx(vec![put("slow", slow_id, json!({ "secs": 3 }))]),
    )];
    requests.extend((0..4).map(|_| (None, one_tx(vec![note(new_id(), 1)]))));
    let started = std::time::Instant::now();
    let tasks: Vec<_> = requests
        .into_iter()
        .enumerate()
        .map(|(i, (user, b))| {
            let (engine, ctx) = (engine.clone(), ctx(user, &format!("client-{i}")));
            tokio::spawn(async move {
                let r = engine.apply(ctx, b).await.results;
                (r, started.elapsed())
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.expect("request task"));
    }
    for (r, _) in &answers {
        assert_success(&json_of(&r[0]));
    }
    let quick = answers[1..].iter().map(|(_, took)| *took).max().unwrap();
    assert!(
        quick < Duration::from_millis(2_000),
        "the quick requests waited {quick:?} for the slow one's 3 s"
    );
    assert!(answers[0].1 >= Duration::from_secs(3));
    assert_eq!(scalar(&db, "select count(*) from slow").await, 1);
    assert_eq!(scalar(&db, "select count(*) from notes").await, 4);
    assert_success(&json_of(&release(holder, stuck).await[0]));
}

#[tokio::test]
async fn a_bad_request_in_a_group_is_rejected_alone_and_the_others_commit() {
    let (db, engine) = setup().await;
    let (holder, stuck) = occupy_lane(&db, &engine, None).await;
    let bad = new_id();
    let mut requests: Vec<(Option<&str>, Batch)> = (0..6)
        .map(|_| (None, one_tx(vec![note(new_id(), 1)])))
        .collect();
    requests.insert(3, (None, one_tx(vec![note(new_id(), 2), note(bad, -1)])));
    let answers = send_all(&engine, requests).await;
    for (i, a) in answers.iter().enumerate() {
        if i == 3 {
            assert_fatal(&json_of(&a[0]), "CHECK_VIOLATION", 1);
        } else {
            assert_success(&json_of(&a[0]));
        }
    }
    assert!(
        metric(&engine, "group_fallbacks_total") >= 1,
        "the bad request's group was undone"
    );
    assert_eq!(
        scalar(&db, "select count(*) from notes").await,
        6,
        "the others' notes, none of the rejected transaction"
    );
    assert_eq!(
        scalar(&db, "select count(*) from note_writes").await,
        6,
        "the undone group left no write behind"
    );
    release(holder, stuck).await;
}

#[tokio::test]
async fn each_member_of_a_group_writes_as_its_own_user() {
    let (db, engine) = setup().await;
    let (holder, stuck) = occupy_lane(&db, &engine, Some("stuck-user")).await;
    let users = ["ann", "bob", "cy", "dee", "eve", "fay"];
    let ids: Vec<uuid::Uuid> = users.iter().map(|_| new_id()).collect();
    send_all(
        &engine,
        users
            .iter()
            .zip(&ids)
            .map(|(u, &id)| (Some(*u), one_tx(vec![note(id, 1)])))
            .collect(),
    )
    .await;
    assert!(metric(&engine, "grouped_requests_total") >= 2);
    let c = db.client().await;
    for (u, id) in users.iter().zip(&ids) {
        let author: String = c
            .query_one("select author from notes where id = $1", &[id])
            .await
            .expect("note")
            .get(0);
        assert_eq!(&author, u, "the default saw its own request's user");
    }
    release(holder, stuck).await;
}

#[tokio::test]
async fn with_a_check_deferred_to_commit_nothing_is_grouped() {
    let db = TestDb::with_schema(SCHEMA).await;
    db.exec(&format!(
        "insert into held values ('{HELD}', 0);
         create function noop() returns trigger language plpgsql as $$
         begin return null; end $$;
         create constraint trigger late after insert on notes
             deferrable initially deferred for each row execute function noop();"
    ))
    .await;
    let engine = engine(&db).await;
    let (holder, stuck) = occupy_lane(&db, &engine, None).await;
    let users = [Some("ann"), Some("bob"), None, None, None, None];
    let answers = send_all(
        &engine,
        users
            .iter()
            .map(|u| (*u, one_tx(vec![note(new_id(), 1)])))
            .collect(),
    )
    .await;
    assert!(answers.iter().all(|a| matches!(a[0], TxResult::Success)));
    assert_eq!(metric(&engine, "grouped_requests_total"), 0);
    assert_eq!(scalar(&db, "select count(*) from notes").await, 6);
    release(holder, stuck).await;
}

#[tokio::test]
async fn a_member_is_not_accepted_for_a_row_only_another_member_writes() {
    // Rows of a self-referencing table do not commute: each member keeps its own statement,
    // so each is judged as alone (where neither row exists yet).
    let (db, engine) = setup().await;
    db.exec("create table nodes (id text primary key, parent text references nodes (id))")
        .await;
    engine.refresh_schema().await.expect("catalog");
    let (holder, stuck) = occupy_lane(&db, &engine, None).await;
    let answers = send_all(
        &engine,
        vec![
            (
                None,
                one_tx(vec![put("nodes", "x", json!({ "parent": "y" }))]),
            ),
            (
                None,
                one_tx(vec![put("nodes", "y", json!({ "parent": "x" }))]),
            ),
            (None, one_tx(vec![note(new_id(), 1)])),
        ],
    )
    .await;
    assert_fatal(&json_of(&answers[0][0]), "FOREIGN_KEY_VIOLATION", 0);
    assert_fatal(&json_of(&answers[1][0]), "FOREIGN_KEY_VIOLATION", 0);
    assert!(matches!(answers[2][0], TxResult::Success));
    assert!(
        metric(&engine, "group_fallbacks_total") >= 1,
        "a group was tried"
    );
    assert_eq!(scalar(&db, "select count(*) from nodes").await, 0);
    release(holder, stuck).await;
}

#[tokio::test]
async fn a_resent_transaction_in_a_group_is_answered_from_the_ledger_and_applied_once() {
    let (db, engine) = setup().await;
    let resent = new_id();
    let first = engine
        .apply(ctx(None, "client-0"), one_tx(vec![note(resent, 1)]))
        .await;
    assert!(matches!(first.results[0], TxResult::Success));
    let (holder, stuck) = occupy_lane(&db, &engine, None).await;
    // `send_all` names its clients client-0, client-1, …: the first is the resend.
    let mut requests = vec![(None, one_tx(vec![note(resent, 1)]))];
    requests.extend((0..4).map(|_| (None, one_tx(vec![note(new_id(), 1)]))));
    let answers = send_all(&engine, requests).await;
    assert!(answers.iter().all(|a| matches!(a[0], TxResult::Success)));
    assert!(
        metric(&engine, "group_fallbacks_total") >= 1,
        "the resend's group was undone"
    );
    assert_eq!(metric(&engine, "transactions_replayed_total"), 1);
    assert_eq!(
        scalar(
            &db,
            &format!("select count(*) from note_writes where id = '{resent}'")
        )
        .await,
        1,
        "written once"
    );
    assert_eq!(scalar(&db, "select count(*) from notes").await, 5);
    release(holder, stuck).await;
}

/// A TCP proxy in front of Postgres that, once armed, cuts the first connection to send COMMIT:
/// the server gets the COMMIT and has time to apply it, the client never sees the answer.
/// Returns the database URL through the proxy and the switch that arms it.
async fn commit_cutting_proxy(db_url: &str) -> (String, Arc<AtomicBool>) {
    let scheme = db_url.find("://").expect("a postgres:// URL") + 3;
    let authority_end = scheme + db_url[scheme..].find('/').expect("a database in the URL");
    let host_start = db_url[scheme..authority_end]
        .rfind('@')
        .map_or(scheme, |at| scheme + at + 1);
    let upstream = db_url[host_start..authority_end].to_owned();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let armed = Arc::new(AtomicBool::new(false));
    let switch = armed.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(relay(client, upstream.clone(), armed.clone()));
        }
    });
    let url = format!(
        "{}{addr}{}",
        &db_url[..host_start],
        &db_url[authority_end..]
    );
    (url, switch)
}

async fn relay(mut client: TcpStream, upstream: String, armed: Arc<AtomicBool>) {
    let Ok(mut server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let (mut client_in, mut client_out) = client.split();
    let (mut server_in, mut server_out) = server.split();
    let (mut up, mut down) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        tokio::select! {
            n = client_in.read(&mut up) => {
                let n = match n { Ok(0) | Err(_) => return, Ok(n) => n };
                if server_out.write_all(&up[..n]).await.is_err() {
                    return;
                }
                let commit = up[..n].windows(7).any(|w| w == b"commit\0");
                if commit && armed.swap(false, Ordering::SeqCst) {
                    // Let the server commit, then drop both ends before its answer gets through.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    return;
                }
            }
            n = server_in.read(&mut down) => {
                let n = match n { Ok(0) | Err(_) => return, Ok(n) => n };
                if client_out.write_all(&down[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn writes_of(db: &TestDb, id: uuid::Uuid) -> i64 {
    scalar(
        db,
        &format!("select count(*) from note_writes where id = '{id}'"),
    )
    .await
}

#[tokio::test]
async fn a_commit_lost_in_the_lane_is_not_applied_again_for_a_transaction_without_an_id() {
    let (db, _) = setup().await;
    let (url, armed) = commit_cutting_proxy(&db.url).await;
    let engine = engine_at(&url).await;
    let id = new_id();
    let b: Batch = serde_json::from_value(json!({
        "transactions": [{ "crud": [note(id, 1)] }]
    }))
    .expect("a batch without a transaction id");
    armed.store(true, Ordering::SeqCst);
    let out = engine.apply(ctx(None, "client-lost"), b).await;
    assert!(
        !armed.load(Ordering::SeqCst),
        "the COMMIT went through the proxy"
    );
    assert!(out.unavailable, "answered 503: it may have been committed");
    assert!(out.maybe_applied, "and the answer says so");
    assert_eq!(
        writes_of(&db, id).await,
        1,
        "committed once, and not applied again: nothing could tell a second time"
    );
}

#[tokio::test]
async fn a_commit_lost_in_the_lane_is_answered_from_the_ledger_for_a_transaction_with_an_id() {
    let (db, _) = setup().await;
    let (url, armed) = commit_cutting_proxy(&db.url).await;
    let engine = engine_at(&url).await;
    let id = new_id();
    armed.store(true, Ordering::SeqCst);
    let out = engine
        .apply(ctx(None, "client-lost"), one_tx(vec![note(id, 1)]))
        .await;
    assert!(
        !armed.load(Ordering::SeqCst),
        "the COMMIT went through the proxy"
    );
    assert!(
        matches!(out.results[0], TxResult::Success),
        "{:?}",
        out.results
    );
    assert_eq!(metric(&engine, "transactions_replayed_total"), 1);
    assert_eq!(writes_of(&db, id).await, 1, "applied once");
}

#[tokio::test]
async fn in_a_group_a_write_to_another_users_row_is_still_refused() {
    // Identity settings off, so requests of different users may share a group; each must still
    // be held to its own rows.
    let db = TestDb::with_schema(SCHEMA).await;
    let rows: Vec<uuid::Uuid> = (0..4).map(|_| new_id()).collect();
    db.exec(&format!("insert into held values ('{HELD}', 0)"))
        .await;
    for id in &rows {
        db.exec(&format!(
            "insert into notes (id, body, author) values ('{id}', 'ann''s', 'ann')"
        ))
        .await;
    }
    let mut cfg = EngineConfig {
        allow_unlisted_tables: true,
        ..EngineConfig::default()
    };
    cfg.rls.app_user_id = false;
    cfg.tables.insert(
        "notes".into(),
        crudgate::config::TableRule {
            owner: Some("author".into()),
            ..Default::default()
        },
    );
    let engine = Engine::connect(&db.url, cfg, vec![]).await.expect("engine");
    let (holder, stuck) = occupy_lane(&db, &engine, Some("stuck-user")).await;
    // Ann edits her first note; three others try her other notes, from the same group.
    let users = ["ann", "mallory", "bob", "cy"];
    let answers = send_all(
        &engine,
        users
            .iter()
            .zip(&rows)
            .map(|(u, id)| {
                (
                    Some(*u),
                    one_tx(vec![patch("notes", id, json!({ "body": *u }))]),
                )
            })
            .collect(),
    )
    .await;
    assert!(matches!(answers[0][0], TxResult::Success), "{answers:?}");
    for a in &answers[1..] {
        assert_fatal(&json_of(&a[0]), "UNAUTHORIZED", 0);
    }
    assert!(
        metric(&engine, "grouped_requests_total") + metric(&engine, "group_fallbacks_total") >= 1
    );
    let c = db.client().await;
    for (u, id) in users.iter().zip(&rows) {
        let (body, author): (String, String) = c
            .query_one("select body, author from notes where id = $1", &[id])
            .await
            .map(|r| (r.get(0), r.get(1)))
            .expect("note");
        let expected = if *u == "ann" { "ann" } else { "ann's" };
        assert_eq!((body.as_str(), author.as_str()), (expected, "ann"));
    }
    release(holder, stuck).await;
}

#[tokio::test]
async fn members_of_a_group_writing_one_row_are_all_applied_in_turn() {
    let (db, engine) = setup().await;
    let (holder, stuck) = occupy_lane(&db, &engine, None).await;
    let id = new_id();
    let answers = send_all(
        &engine,
        (0..6).map(|n| (None, one_tx(vec![note(id, n)]))).collect(),
    )
    .await;
    assert!(answers.iter().all(|a| matches!(a[0], TxResult::Success)));
    assert!(metric(&engine, "grouped_requests_total") >= 2);
    assert_eq!(writes_of(&db, id).await, 6, "each request wrote the row");
    assert_eq!(scalar(&db, "select count(*) from notes").await, 1);
    release(holder, stuck).await;
}

#[tokio::test]
async fn a_crowd_of_clients_with_bad_writes_and_resends_gets_the_answers_it_would_get_alone() {
    let (db, engine) = setup().await;
    const CLIENTS: usize = 16;
    const REQUESTS: u64 = 12;
    // Every fifth transaction breaks a CHECK constraint; the seventh request resends the sixth.
    let bad = |tx: u64| tx.is_multiple_of(5);
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let ids: Vec<uuid::Uuid> = (0..=REQUESTS).map(|_| new_id()).collect();
                let mut answers = Vec::new();
                for tx in 1..=REQUESTS {
                    let sent = if tx == 7 { 6 } else { tx };
                    let n = if bad(sent) { -1 } else { 1 };
                    let body = json!({ "transactions": [
                        { "transaction_id": sent, "crud": [note(ids[sent as usize], n)] }
                    ]});
                    let b: Batch = serde_json::from_value(body).expect("a batch");
                    let out = engine.apply(ctx(None, &format!("crowd-{c}")), b).await;
                    answers.push((sent, json_of(&out.results[0])));
                }
                (ids, answers)
            })
        })
        .collect();
    let mut good_ids = Vec::new();
    for t in tasks {
        let (ids, answers) = t.await.expect("client task");
        for (sent, answer) in answers {
            if bad(sent) {
                assert_fatal(&answer, "CHECK_VIOLATION", 0);
            } else {
                assert_success(&answer);
                good_ids.push(ids[sent as usize]);
            }
        }
    }
    good_ids.sort();
    good_ids.dedup();
    let good_per_client = (1..=REQUESTS).filter(|&t| t != 7 && !bad(t)).count();
    assert_eq!(good_ids.len(), CLIENTS * good_per_client);
    assert_eq!(
        scalar(&db, "select count(*) from notes").await,
        good_ids.len() as i64
    );
    assert_eq!(
        scalar(&db, "select count(*) from note_writes").await,
        good_ids.len() as i64,
        "each good note written once, the resent one too"
    );
    assert_eq!(
        scalar(&db, "select count(*) from crudgate.ledger").await,
        (CLIENTS as i64) * (REQUESTS as i64 - 1),
        "every transaction id decided once"
    );
    assert_eq!(
        metric(&engine, "transactions_replayed_total"),
        CLIENTS as u64
    );
    assert!(
        metric(&engine, "grouped_requests_total") > 0,
        "groups committed"
    );
    assert!(
        metric(&engine, "group_fallbacks_total") > 0,
        "groups undone"
    );
}
