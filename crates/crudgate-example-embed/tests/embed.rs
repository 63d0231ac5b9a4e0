//! The embedding example end to end: the app's own route, crudgate's endpoint in the same
//! router, and the app's write hook, on a throwaway database.

use std::sync::Arc;

use crudgate::auth::{AuthConfig, AuthMode, Authenticator};
use crudgate::config::OnFatal;
use crudgate::{AppState, Engine, EngineConfig, WriteHook};
use crudgate_example_embed::{app, DescriptionLimit, DESCRIPTION_TOO_LONG};
use serde_json::{json, Value};
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

struct App {
    base: String,
    http: reqwest::Client,
    db: Client,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
}

/// The example app on a fresh database with the demo schema.
async fn start(on_fatal: OnFatal) -> App {
    let cluster = crudgate_pgtemp::shared();
    let name = format!("embed_{}", Uuid::new_v4().simple());
    connect(&cluster.url())
        .await
        .batch_execute(&format!("create database {name}"))
        .await
        .expect("create database");
    let url = cluster.url_for(&name);
    let db = connect(&url).await;
    db.batch_execute(crudgate::DEMO_SCHEMA)
        .await
        .expect("schema");

    let cfg = EngineConfig {
        allow_unlisted_tables: true,
        on_fatal,
        ..Default::default()
    };
    let hooks: Vec<Arc<dyn WriteHook>> = vec![Arc::new(DescriptionLimit { max_chars: 500 })];
    let engine = Engine::connect(&url, cfg, hooks).await.expect("engine");
    let auth = Authenticator::new(&AuthConfig {
        mode: AuthMode::None,
        ..Default::default()
    })
    .expect("auth");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let router = app(AppState::new(engine, auth));
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
    });
    App {
        base,
        http: reqwest::Client::new(),
        db,
        _stop: stop,
    }
}

impl App {
    async fn upload(&self, transactions: Vec<Vec<Value>>) -> Vec<Value> {
        let transactions: Vec<Value> = transactions
            .into_iter()
            .enumerate()
            .map(|(i, crud)| json!({"transaction_id": i + 1, "crud": crud}))
            .collect();
        let res = self
            .http
            .post(format!("{}/api/data", self.base))
            .json(&json!({ "transactions": transactions }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let body: Value = res.json().await.unwrap();
        body["results"].as_array().expect("results").clone()
    }

    async fn descriptions(&self) -> Vec<String> {
        self.db
            .query("select description from todos order by description", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    async fn lists(&self) -> i64 {
        self.db
            .query_one("select count(*) from lists", &[])
            .await
            .unwrap()
            .get(0)
    }
}

fn put(table: &str, id: Uuid, data: Value) -> Value {
    json!({"op": "PUT", "table": table, "id": id.to_string(), "op_data": data})
}

fn todo(list: Uuid, description: String) -> Value {
    put(
        "todos",
        Uuid::new_v4(),
        json!({"list_id": list.to_string(), "description": description}),
    )
}

#[tokio::test]
async fn the_app_s_own_route_is_served_next_to_crudgate_s() {
    let app = start(OnFatal::Stop).await;
    let hello: Value = app
        .http
        .get(format!("{}/hello", app.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(hello["hello"].is_string(), "{hello}");
    let health = app
        .http
        .get(format!("{}/health", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn a_description_of_500_characters_is_stored() {
    let app = start(OnFatal::Stop).await;
    let list = Uuid::new_v4();
    // 500 characters, 1000 bytes: the limit counts what the user typed.
    let long = "é".repeat(500);
    let r = app
        .upload(vec![vec![
            put("lists", list, json!({"name": "l"})),
            todo(list, "short".into()),
            todo(list, long.clone()),
        ]])
        .await;
    assert_eq!(r, [json!({"status": "success"})]);
    assert_eq!(app.descriptions().await, ["short".to_string(), long]);
}

/// A 501-character description in the first transaction, a good write in the second.
async fn long_then_short(app: &App) -> Vec<Value> {
    let list = Uuid::new_v4();
    app.upload(vec![
        vec![
            put("lists", list, json!({"name": "l"})),
            todo(list, "x".repeat(501)),
        ],
        vec![
            put("lists", list, json!({"name": "l"})),
            todo(list, "fine".into()),
        ],
    ])
    .await
}

async fn assert_recorded(app: &App) {
    let row = app
        .db
        .query_one(
            "select error_code, table_name, operation_index, transaction_id, details->>'chars'
             from crudgate.rejections",
            &[],
        )
        .await
        .unwrap();
    let got: (String, String, i32, String, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!(
        got,
        (
            DESCRIPTION_TOO_LONG.into(),
            "todos".into(),
            1,
            "1".into(),
            "501".into()
        )
    );
}

#[tokio::test]
async fn a_501_character_description_is_rejected_with_the_app_code_and_stops_the_request() {
    let app = start(OnFatal::Stop).await;
    let r = long_then_short(&app).await;
    assert_eq!(r[0]["status"], "fatal_error", "{r:?}");
    assert_eq!(r[0]["requires_client_handling"], false);
    assert_eq!(r[0]["failed_operation"]["error_code"], DESCRIPTION_TOO_LONG);
    assert_eq!(r[0]["failed_operation"]["operation_index"], 1);
    // on_fatal = stop: the transaction behind it waits for the next request.
    assert_eq!(r[1], json!({"status": "not_attempted"}));
    assert_eq!(app.lists().await, 0);
    assert!(app.descriptions().await.is_empty());
    assert_recorded(&app).await;
}

#[tokio::test]
async fn with_on_fatal_skip_the_writes_behind_a_501_character_description_are_applied() {
    let app = start(OnFatal::Skip).await;
    let r = long_then_short(&app).await;
    assert_eq!(r[0]["failed_operation"]["error_code"], DESCRIPTION_TOO_LONG);
    assert_eq!(r[1], json!({"status": "success"}));
    assert_eq!(app.lists().await, 1);
    assert_eq!(app.descriptions().await, ["fine"]);
    assert_recorded(&app).await;
}

#[tokio::test]
async fn the_hook_also_guards_the_rest_route() {
    let app = start(OnFatal::Stop).await;
    let list = Uuid::new_v4();
    app.upload(vec![vec![put("lists", list, json!({"name": "l"}))]])
        .await;
    let res: Value = app
        .http
        .put(format!("{}/api/data/todos/{}", app.base, Uuid::new_v4()))
        .json(&json!({"list_id": list.to_string(), "description": "y".repeat(501)}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(res["status"], "rejected");
    assert_eq!(res["error_code"], DESCRIPTION_TOO_LONG);
    assert!(app.descriptions().await.is_empty());
}
