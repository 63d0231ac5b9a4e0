//! What the integration tests share: a fresh database per test, the app served on a random
//! port, and a separate Postgres connection to check what was really committed.
#![allow(dead_code)]

use std::sync::Arc;

use crudgate::auth::{AuthConfig, AuthMode, Authenticator};
use crudgate::config::EngineConfig;
use crudgate::{AppState, Engine, WriteHook};
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio_postgres::{Client, NoTls};

/// The server every test database lives on: `DATABASE_URL` if set, else this test binary's
/// throwaway cluster. Returns the URL of its maintenance database.
pub fn server_url() -> String {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => crudgate_pgtemp::shared().url(),
    }
}

/// `url` with its database name replaced by `db`.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let authority_start = base.find("://").map(|i| i + 3).unwrap_or(0);
    let path_start = base[authority_start..]
        .find('/')
        .map(|i| authority_start + i)
        .unwrap_or(base.len());
    format!("{}/{db}{query}", &base[..path_start])
}

/// `url` connecting as `user` with `password` instead of its own credentials.
pub fn with_user(url: &str, user: &str, password: &str) -> String {
    let scheme_end = url.find("://").map(|i| i + 3).expect("a postgres:// URL");
    let rest = &url[scheme_end..];
    let host_start = match rest.find('@') {
        Some(at) if rest[..at].find('/').is_none() => at + 1,
        _ => 0,
    };
    format!(
        "{}{user}:{password}@{}",
        &url[..scheme_end],
        &rest[host_start..]
    )
}

/// Connects and drives the connection in the background.
pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A database of its own for one test, with the demo schema. Dropped (best effort) at the end.
pub struct TestDb {
    pub name: String,
    pub url: String,
    server_url: String,
    /// Roles created for this test (roles belong to the server, not the database).
    roles: std::sync::Mutex<Vec<String>>,
}

impl TestDb {
    /// A fresh database on the shared server.
    pub async fn new() -> TestDb {
        TestDb::on(&server_url()).await
    }

    /// A fresh database on the shared server with `schema` (SQL) instead of the demo schema.
    pub async fn with_schema(schema: &str) -> TestDb {
        let server = tokio::task::spawn_blocking(server_url)
            .await
            .expect("cluster");
        TestDb::create(&server, schema).await
    }

    /// A fresh database on the server of `server_url`.
    pub async fn on(server_url: &str) -> TestDb {
        TestDb::create(server_url, crudgate::DEMO_SCHEMA).await
    }

    async fn create(server_url: &str, schema: &str) -> TestDb {
        let name = format!("cg_{}", uuid::Uuid::new_v4().simple());
        let admin = connect(server_url).await;
        admin
            .batch_execute(&format!("create database {name}"))
            .await
            .expect("create database");
        let url = with_database(server_url, &name);
        connect(&url)
            .await
            .batch_execute(schema)
            .await
            .expect("schema");
        TestDb {
            name,
            url,
            server_url: server_url.to_owned(),
            roles: Default::default(),
        }
    }

    /// A new connection to this database, for setup and assertions.
    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// Runs SQL (several statements allowed) on a fresh connection.
    pub async fn exec(&self, sql: &str) {
        self.client()
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

impl TestDb {
    /// Creates a login role with password `pw` for this test; returns its name.
    pub async fn create_role(&self, prefix: &str) -> String {
        let role = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        self.exec(&format!("create role {role} login password 'pw'"))
            .await;
        self.roles.lock().unwrap().push(role.clone());
        role
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Only worth the trouble on a server that outlives the test binary.
        if std::env::var("DATABASE_URL").map_or(true, |u| u.is_empty()) {
            return;
        }
        let admin_url = self.server_url.clone();
        let name = self.name.clone();
        let roles = std::mem::take(&mut *self.roles.lock().unwrap_or_else(|e| e.into_inner()));
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok((c, conn)) = tokio_postgres::connect(&admin_url, NoTls).await {
                    tokio::spawn(conn);
                    let _ = c
                        .batch_execute(&format!("drop database if exists {name} with (force)"))
                        .await;
                    for role in roles {
                        let _ = c
                            .batch_execute(&format!("drop role if exists {role}"))
                            .await;
                    }
                }
            });
        })
        .join();
    }
}

/// crudgate serving on 127.0.0.1 and a random port until dropped.
pub struct Server {
    pub base: String,
    pub http: reqwest::Client,
    pub engine: Engine,
    shutdown: Option<oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Shuts the server down and returns once `crudgate::serve` has returned.
    #[allow(dead_code)] // not every test binary stops its server explicitly
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(served) = self.served.take() {
            served.await.expect("serve joined");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// crudgate serving one test database, with a separate connection to that database for
/// assertions. Derefs to its [`Server`] for requests.
pub struct TestApp {
    pub server: Server,
    /// A separate connection to the same database, for assertions.
    pub db: Client,
}

impl std::ops::Deref for TestApp {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.server
    }
}

/// Starts crudgate on `db_url` with `cfg`, no authentication and no hooks.
pub async fn spawn_app(db_url: &str, cfg: EngineConfig) -> TestApp {
    spawn_app_with_hooks(db_url, cfg, Vec::new()).await
}

pub async fn spawn_app_with_hooks(
    db_url: &str,
    cfg: EngineConfig,
    hooks: Vec<Arc<dyn WriteHook>>,
) -> TestApp {
    let server = spawn_server(db_url, cfg, hooks).await;
    TestApp {
        server,
        db: connect(db_url).await,
    }
}

/// Starts crudgate alone: the database need not be up.
pub async fn spawn_server(
    db_url: &str,
    cfg: EngineConfig,
    hooks: Vec<Arc<dyn WriteHook>>,
) -> Server {
    // Tests that configure no write rules write any table, as before rules existed.
    let cfg = EngineConfig {
        allow_unlisted_tables: cfg.allow_unlisted_tables || cfg.tables.is_empty(),
        ..cfg
    };
    let engine = Engine::connect(db_url, cfg, hooks).await.expect("engine");
    let auth = Authenticator::new(&AuthConfig {
        mode: AuthMode::None,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("authenticator: {e}"));
    let state = AppState::new(engine.clone(), auth);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (tx, rx) = oneshot::channel::<()>();
    let served = tokio::spawn(async move {
        crudgate::serve(listener, state, async move {
            let _ = rx.await;
        })
        .await
        .expect("serve");
    });
    Server {
        base: format!("http://{addr}"),
        http: reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .expect("http client"),
        engine,
        shutdown: Some(tx),
        served: Some(served),
    }
}

/// A fresh database and the app on it, with `cfg`.
pub async fn app_with(cfg: EngineConfig) -> (TestDb, TestApp) {
    let db = TestDb::new().await;
    let app = spawn_app(&db.url, cfg).await;
    (db, app)
}

/// A fresh database and the app on it, with the default configuration.
pub async fn app() -> (TestDb, TestApp) {
    app_with(EngineConfig::default()).await
}

impl Server {
    /// `POST /api/data` with a JSON body.
    pub async fn post(&self, body: &Value) -> (StatusCode, HeaderMap, Value) {
        self.post_raw(serde_json::to_vec(body).expect("serialise"))
            .await
    }

    /// `POST /api/data` with the body as given.
    pub async fn post_raw(&self, body: impl Into<reqwest::Body>) -> (StatusCode, HeaderMap, Value) {
        let res = self
            .http
            .post(format!("{}/api/data", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request sent");
        decode(res).await
    }

    /// `GET` of a text resource (such as `/metrics`).
    pub async fn get_text(&self, path: &str) -> (StatusCode, HeaderMap, String) {
        let res = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("request sent");
        let status = res.status();
        let headers = res.headers().clone();
        (status, headers, res.text().await.expect("body"))
    }

    pub async fn get(&self, path: &str) -> (StatusCode, HeaderMap, Value) {
        let res = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("request sent");
        decode(res).await
    }

    /// Posts a batch that must be answered 200; returns its results.
    pub async fn apply(&self, body: &Value) -> Vec<Value> {
        let (status, _, body) = self.post(body).await;
        assert_eq!(status, StatusCode::OK, "body: {body}");
        results(&body)
    }

    /// Posts one client transaction; returns its one result.
    pub async fn apply_tx(&self, ops: Vec<Value>) -> Value {
        let mut r = self.apply(&batch(vec![ops])).await;
        assert_eq!(r.len(), 1);
        r.remove(0)
    }
}

async fn decode(res: reqwest::Response) -> (StatusCode, HeaderMap, Value) {
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = res.bytes().await.expect("body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            panic!(
                "status {status}: body is not JSON: {}",
                String::from_utf8_lossy(&bytes)
            )
        })
    };
    (status, headers, body)
}

/// The `results` array of a 200 answer.
pub fn results(body: &Value) -> Vec<Value> {
    body["results"]
        .as_array()
        .unwrap_or_else(|| panic!("no results in {body}"))
        .clone()
}

/// A request body: one client transaction per element, each a list of operations.
pub fn batch(txs: Vec<Vec<Value>>) -> Value {
    let transactions: Vec<Value> = txs
        .into_iter()
        .enumerate()
        .map(|(i, crud)| json!({ "transaction_id": i + 1, "crud": crud }))
        .collect();
    json!({ "transactions": transactions })
}

pub fn put(table: &str, id: impl ToString, data: Value) -> Value {
    json!({ "op": "PUT", "table": table, "id": id.to_string(), "op_data": data })
}

pub fn patch(table: &str, id: impl ToString, data: Value) -> Value {
    json!({ "op": "PATCH", "table": table, "id": id.to_string(), "op_data": data })
}

pub fn delete(table: &str, id: impl ToString) -> Value {
    json!({ "op": "DELETE", "table": table, "id": id.to_string() })
}

pub fn new_id() -> uuid::Uuid {
    uuid::Uuid::new_v4()
}

/// Asserts a `success` result.
#[track_caller]
pub fn assert_success(r: &Value) {
    assert_eq!(r["status"], "success", "result: {r}");
}

/// Asserts a `fatal_error` with `code` at operation `index`; returns `failed_operation`.
#[track_caller]
pub fn assert_fatal(r: &Value, code: &str, index: usize) -> Value {
    assert_eq!(r["status"], "fatal_error", "result: {r}");
    assert_eq!(r["requires_client_handling"], false, "result: {r}");
    let f = &r["failed_operation"];
    assert_eq!(f["error_code"], code, "result: {r}");
    assert_eq!(f["operation_index"], index, "result: {r}");
    assert!(
        f["message"].as_str().is_some_and(|m| !m.is_empty()),
        "result: {r}"
    );
    f.clone()
}

/// Asserts a `retryable_error` telling the client to come back after `retry_after_ms`.
#[track_caller]
pub fn assert_retryable(r: &Value, retry_after_ms: u64) {
    assert_eq!(r["status"], "retryable_error", "result: {r}");
    assert_eq!(r["retry_after_ms"], retry_after_ms, "result: {r}");
    assert!(
        r["message"].as_str().is_some_and(|m| !m.is_empty()),
        "result: {r}"
    );
}

/// Inserts a list directly (not through crudgate) and returns its id.
pub async fn seed_list(db: &Client) -> uuid::Uuid {
    let id = new_id();
    db.execute("insert into lists (id, name) values ($1, 'seeded')", &[&id])
        .await
        .expect("seed list");
    id
}

/// Number of rows of `table` (a trusted, test-chosen name).
pub async fn count(db: &Client, table: &str) -> i64 {
    db.query_one(&format!("select count(*) from {table}"), &[])
        .await
        .expect("count")
        .get(0)
}

/// Holds a row lock on list `list` from another session until the returned client is told to
/// roll back.
pub async fn lock_row(db: &TestDb, list: uuid::Uuid) -> Client {
    let locker = db.client().await;
    locker.batch_execute("begin").await.unwrap();
    locker
        .execute("select 1 from lists where id = $1 for update", &[&list])
        .await
        .unwrap();
    locker
}
