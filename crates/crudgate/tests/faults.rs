//! A database that goes away and comes back, on clusters of these tests' own (stopping the
//! shared one would break the other tests), and a client that goes away midway.

mod harness;

use crudgate::config::EngineConfig;
use crudgate_pgtemp::Cluster;
use harness::*;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn a_stopped_database_is_503_and_the_same_batch_succeeds_after_a_restart() {
    let cluster = tokio::task::spawn_blocking(Cluster::start)
        .await
        .unwrap()
        .expect("own cluster");
    let db = TestDb::on(&cluster.url()).await;
    let cfg = EngineConfig {
        connect_timeout_ms: 1000,
        retry_after_ms: 3000,
        ..Default::default()
    };
    let app = spawn_app(&db.url, cfg).await;

    // Up: the app works and its pool holds connections that are about to die.
    let warm = new_id();
    assert_success(
        &app.apply_tx(vec![put("lists", warm, json!({"name": "warm"}))])
            .await,
    );
    assert_eq!(app.get("/ready").await.0, StatusCode::OK);

    let cluster = std::sync::Arc::new(cluster);
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.stop())
        .await
        .unwrap()
        .expect("stop");

    let list = new_id();
    let body = batch(vec![
        vec![put("lists", list, json!({"name": "while down"}))],
        vec![put(
            "todos",
            new_id(),
            json!({"list_id": list.to_string(), "description": "t"}),
        )],
    ]);
    for _ in 0..2 {
        let (status, headers, answer) = app.post(&body).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
        assert_eq!(
            headers.get("retry-after").and_then(|v| v.to_str().ok()),
            Some("3"),
            "{headers:?}"
        );
        assert!(
            answer["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{answer}"
        );
    }
    let (status, headers, _) = app.get("/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key("retry-after"));
    assert_eq!(
        app.get("/health").await.0,
        StatusCode::OK,
        "alive, not ready"
    );

    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.restart())
        .await
        .unwrap()
        .expect("restart");

    // Same crudgate, same batch.
    let r = app.apply(&body).await;
    assert_eq!(r.len(), 2);
    assert_success(&r[0]);
    assert_success(&r[1]);
    assert_eq!(app.get("/ready").await.0, StatusCode::OK);

    let check = db.client().await;
    assert_eq!(count(&check, "lists").await, 2);
    assert_eq!(count(&check, "todos").await, 1);
    let name: String = check
        .query_one("select name from lists where id = $1", &[&list])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "while down");
}

#[tokio::test]
async fn crudgate_started_before_its_database_serves_once_it_is_up() {
    let cluster = tokio::task::spawn_blocking(Cluster::start)
        .await
        .unwrap()
        .expect("own cluster");
    let db = TestDb::on(&cluster.url()).await;
    let cluster = std::sync::Arc::new(cluster);
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.stop())
        .await
        .unwrap()
        .expect("stop");

    // crudgate starts without its database: not ready, and uploads are 503.
    let server = spawn_server(
        &db.url,
        EngineConfig {
            connect_timeout_ms: 1000,
            ..Default::default()
        },
        Vec::new(),
    )
    .await;
    assert_eq!(
        server.get("/ready").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let body = batch(vec![vec![put("lists", new_id(), json!({"name": "late"}))]]);
    let (status, headers, _) = server.post(&body).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key("retry-after"));

    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.restart())
        .await
        .unwrap()
        .expect("restart");
    assert_eq!(server.get("/ready").await.0, StatusCode::OK);
    assert_success(&server.apply(&body).await[0]);
    assert_eq!(count(&db.client().await, "lists").await, 1);
}

#[tokio::test]
async fn a_client_that_goes_away_midway_has_its_transaction_finished_whole_not_by_halves() {
    // The naive planner awaits each statement: a client that disconnects while one waits must
    // neither leave its transaction open on the pooled connection (the next request's COMMIT
    // would commit half of it) nor lose it. crudgate finishes what it started; the client's
    // retry is then answered from the ledger, or re-applied like the reference without one.
    let db = TestDb::new().await;
    let app = spawn_app(
        &db.url,
        EngineConfig {
            planner: crudgate::config::Planner::Naive,
            pool_size: 1,
            ..Default::default()
        },
    )
    .await;
    let locked = seed_list(&app.db).await;
    let other = lock_row(&db, locked).await;
    let first = new_id();
    let third = new_id();
    let body = batch(vec![vec![
        put("lists", first, json!({"name": "first"})),
        patch("lists", locked, json!({"name": "second"})),
        put("lists", third, json!({"name": "third"})),
    ]]);
    let impatient = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(500))
        .build()
        .unwrap();
    let gone = impatient
        .post(format!("{}/api/data", app.base))
        .json(&body)
        .send()
        .await;
    assert!(gone.is_err(), "the request was meant to time out");
    // Let the server see the client go before the lock is released.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    other.batch_execute("rollback").await.unwrap();

    // The next request gets the same (only) connection.
    let next = new_id();
    assert_success(
        &app.apply_tx(vec![put("lists", next, json!({"name": "next"}))])
            .await,
    );
    let names = |ids: Vec<uuid::Uuid>| {
        let db = &app.db;
        async move {
            let mut out = Vec::new();
            for id in ids {
                let n: Option<String> = db
                    .query_opt("select name from lists where id = $1", &[&id])
                    .await
                    .unwrap()
                    .map(|r| r.get(0));
                out.push(n);
            }
            out
        }
    };
    // The abandoned transaction was applied whole, in its own database transaction.
    assert_eq!(
        names(vec![first, locked, third, next]).await,
        vec![
            Some("first".to_owned()),
            Some("second".to_owned()),
            Some("third".to_owned()),
            Some("next".to_owned())
        ]
    );
}

#[tokio::test]
async fn a_shutdown_finishes_the_batch_of_a_client_that_hung_up_before_it_returns() {
    use tokio::io::AsyncWriteExt;
    let (_db, TestApp { server, db }) = app().await;
    let addr = server.base.trim_start_matches("http://").to_owned();
    // 10,000 lists in one request; the client hangs up while they are applied.
    let ops = (0..10_000)
        .map(|_| put("lists", new_id(), json!({"name": "l"})))
        .collect();
    let body = batch(vec![ops]).to_string();
    let mut tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /api/data HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(format!("{head}{body}").as_bytes())
        .await
        .expect("sent");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    drop(tcp);
    server.stop().await;
    assert!(
        tokio::net::TcpStream::connect(&addr).await.is_err(),
        "no one is accepted after a shutdown"
    );
    assert_eq!(
        count(&db, "lists").await,
        10_000,
        "finished before serve returned"
    );
}

#[tokio::test]
async fn a_request_that_finds_every_connection_busy_is_503_after_one_wait_and_the_pool_is_kept() {
    let db = TestDb::new().await;
    let app = spawn_app(
        &db.url,
        EngineConfig {
            pool_size: 1,
            connect_timeout_ms: 800,
            ..Default::default()
        },
    )
    .await;
    let locked = seed_list(&app.db).await;
    let other = lock_row(&db, locked).await;
    // The only connection waits for the row.
    let holder = {
        let (base, body) = (
            app.base.clone(),
            batch(vec![vec![patch("lists", locked, json!({"name": "x"}))]]),
        );
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{base}/api/data"))
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let (status, _, body) = app
        .post(&batch(vec![vec![put(
            "lists",
            new_id(),
            json!({"name": "y"}),
        )]]))
        .await;
    let waited = started.elapsed();
    assert_eq!(status, 503, "{body}");
    // One wait for a free connection (plus the wait for a group), not a second one after
    // throwing the busy connection's siblings away: a busy pool is not a dead database.
    assert!(
        waited < std::time::Duration::from_millis(1_300),
        "answered after {waited:?}"
    );
    other.batch_execute("rollback").await.unwrap();
    assert_eq!(holder.await.unwrap(), 200);
}
