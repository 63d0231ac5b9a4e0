//! Authentication over HTTP, end to end: the app is served in-process on 127.0.0.1:0 with a
//! local JWKS endpoint and a real Postgres, and every attack must be answered 401 without the
//! database being touched. That is proven three ways: the row the request would have written
//! is absent, a statement-level trigger bumping a (non-transactional) sequence never fired,
//! and the engine's request counter did not move.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use crudgate::auth::{AuthConfig, Authenticator};
use crudgate::config::{SetValue, TableRule};
use crudgate::{AppState, Engine, EngineConfig};
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rsa::pkcs8::{EncodePublicKey, LineEnding};
use rsa::traits::PublicKeyParts;
use rsa::RsaPrivateKey;
use serde_json::{json, Value};
use sha2::Sha256;
use tokio_postgres::Client;

mod harness;

const AUD: &str = "crudgate-http-test";

static RSA_A: LazyLock<RsaPrivateKey> =
    LazyLock::new(|| RsaPrivateKey::new(&mut OsRng, 2048).expect("rsa keygen"));
static RSA_B: LazyLock<RsaPrivateKey> =
    LazyLock::new(|| RsaPrivateKey::new(&mut OsRng, 2048).expect("rsa keygen"));
static ED: LazyLock<ed25519_dalek::SigningKey> =
    LazyLock::new(|| ed25519_dalek::SigningKey::generate(&mut OsRng));

// ---------------------------------------------------------------------------------------------
// Tokens

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn rsa_jwk(key: &RsaPrivateKey, kid: &str) -> Value {
    json!({"kty":"RSA","n":b64(&key.n().to_bytes_be()),"e":b64(&key.e().to_bytes_be()),
           "kid":kid,"alg":"RS256","use":"sig"})
}

fn ed_jwk(kid: &str) -> Value {
    json!({"kty":"OKP","crv":"Ed25519","x":b64(ED.verifying_key().as_bytes()),
           "kid":kid,"alg":"EdDSA","use":"sig"})
}

fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    )
}

fn rs256(key: &RsaPrivateKey, kid: &str, claims: &Value) -> String {
    use rsa::signature::{SignatureEncoding, Signer};
    let input = signing_input(&json!({"alg":"RS256","typ":"JWT","kid":kid}), claims);
    let sig = rsa::pkcs1v15::SigningKey::<Sha256>::new(key.clone())
        .sign(input.as_bytes())
        .to_vec();
    format!("{input}.{}", b64(&sig))
}

fn eddsa(kid: &str, claims: &Value) -> String {
    use ed25519_dalek::Signer;
    let input = signing_input(&json!({"alg":"EdDSA","typ":"JWT","kid":kid}), claims);
    format!("{input}.{}", b64(&ED.sign(input.as_bytes()).to_bytes()))
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn claims(sub: &str) -> Value {
    let t = now();
    json!({"sub": sub, "aud": AUD, "iat": t, "exp": t + 600})
}

// ---------------------------------------------------------------------------------------------
// A local JWKS endpoint

#[derive(Clone)]
struct Jwks {
    url: String,
    hits: Arc<AtomicUsize>,
    /// The document served, or None to answer 503.
    doc: Arc<Mutex<Option<Value>>>,
}

type JwksState = (Arc<AtomicUsize>, Arc<Mutex<Option<Value>>>);

async fn serve_jwks(State((hits, doc)): State<JwksState>) -> Response {
    hits.fetch_add(1, Ordering::SeqCst);
    match doc.lock().expect("lock").clone() {
        Some(d) => axum::Json(d).into_response(),
        None => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

impl Jwks {
    async fn start(keys: Option<Vec<Value>>) -> Jwks {
        let hits = Arc::new(AtomicUsize::new(0));
        let doc = Arc::new(Mutex::new(keys.map(|k| json!({ "keys": k }))));
        let app = Router::new()
            .route("/jwks.json", get(serve_jwks))
            .with_state((hits.clone(), doc.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Jwks {
            url: format!("http://{addr}/jwks.json"),
            hits,
            doc,
        }
    }

    fn serve(&self, keys: Vec<Value>) {
        *self.doc.lock().expect("lock") = Some(json!({ "keys": keys }));
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------------------------
// Database and app

const SCHEMA: &str = r#"
create sequence attempts;
create function count_attempt() returns trigger language plpgsql as $$
begin perform nextval('attempts'); return null; end $$;
create table lists (id text primary key, name text not null, owner_id text);
create trigger count_attempt before insert or update or delete on lists
  for each statement execute function count_attempt();
"#;

struct App {
    base: String,
    db: Client,
    /// Keeps the database until the test ends (dropped with it on a `DATABASE_URL` server).
    _test_db: harness::TestDb,
    engine: Engine,
    http: reqwest::Client,
}

/// A fresh database, the engine with an owner rule on `lists`, and the app served with an
/// authenticator reading `jwks`.
async fn app(jwks: &Jwks) -> App {
    let test_db = harness::TestDb::with_schema(SCHEMA).await;
    let url = test_db.url.clone();
    let db = test_db.client().await;

    let lists = TableRule {
        owner: Some("owner_id".into()),
        set: BTreeMap::from([("owner_id".to_string(), SetValue::Claim(vec!["sub".into()]))]),
        ..TableRule::default()
    };
    let cfg = EngineConfig {
        tables: BTreeMap::from([("lists".to_string(), lists)]),
        ..EngineConfig::default()
    };
    let engine = Engine::connect(&url, cfg, Vec::new())
        .await
        .expect("engine");
    let auth = Authenticator::new(&AuthConfig {
        audiences: vec![AUD.into()],
        jwks_url: Some(jwks.url.clone()),
        jwks_timeout_ms: 1_000,
        // Rotation and unknown-kid tests refetch right away.
        jwks_min_refetch_secs: 0,
        ..AuthConfig::default()
    })
    .expect("auth config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let state = AppState::new(engine.clone(), auth);
    tokio::spawn(async move {
        let _ = crudgate::serve(listener, state, std::future::pending()).await;
    });
    App {
        base: format!("http://{addr}"),
        db,
        _test_db: test_db,
        engine,
        http: reqwest::Client::new(),
    }
}

impl App {
    /// PUTs list `id` (with a client-chosen owner) with this bearer token.
    async fn put(&self, token: &str, id: &str) -> reqwest::Response {
        let body = json!({"transactions": [{"transaction_id": 1, "crud": [
            {"op": "PUT", "table": "lists", "id": id,
             "op_data": {"name": "written", "owner_id": "mallory"}}
        ]}]});
        self.http
            .post(format!("{}/api/data", self.base))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("request")
    }

    async fn owner_of(&self, id: &str) -> Option<String> {
        self.db
            .query_opt("select owner_id from lists where id = $1", &[&id])
            .await
            .expect("query")
            .map(|r| r.get(0))
    }

    async fn attempts(&self) -> i64 {
        let row = self
            .db
            .query_one("select last_value, is_called from attempts", &[])
            .await
            .expect("sequence");
        if row.get::<_, bool>(1) {
            row.get(0)
        } else {
            0
        }
    }

    fn requests(&self) -> u64 {
        let text = self.engine.metrics().render();
        text.lines()
            .find_map(|l| l.strip_prefix("crudgate_requests_total "))
            .and_then(|v| v.parse().ok())
            .expect("requests counter")
    }

    /// The request is answered 401 and nothing reached the database.
    async fn assert_refused_untouched(&self, token: &str, id: &str) {
        let res = self.put(token, id).await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        let body: Value = json_of(res).await;
        assert!(body["message"].is_string(), "{body}");
        assert_eq!(self.owner_of(id).await, None, "no row written");
        assert_eq!(self.attempts().await, 0, "no statement reached the table");
        assert_eq!(self.requests(), 0, "the engine never saw the request");
    }
}

async fn json_of(res: reqwest::Response) -> Value {
    serde_json::from_slice(&res.bytes().await.expect("body")).expect("json body")
}

async fn standard() -> (Jwks, App) {
    let jwks = Jwks::start(Some(vec![rsa_jwk(&RSA_A, "rsa-1"), ed_jwk("ed-1")])).await;
    let app = app(&jwks).await;
    (jwks, app)
}

// ---------------------------------------------------------------------------------------------
// Valid tokens

#[tokio::test]
async fn a_valid_rs256_token_writes_and_the_owner_is_the_token_sub() {
    let (_jwks, app) = standard().await;
    let res = app
        .put(&rs256(&RSA_A, "rsa-1", &claims("alice")), "l1")
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = json_of(res).await;
    assert_eq!(body, json!({"results": [{"status": "success"}]}));
    assert_eq!(app.owner_of("l1").await.as_deref(), Some("alice"));
}

#[tokio::test]
async fn a_valid_eddsa_token_writes() {
    let (_jwks, app) = standard().await;
    let res = app.put(&eddsa("ed-1", &claims("erin")), "l1").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(app.owner_of("l1").await.as_deref(), Some("erin"));
}

#[tokio::test]
async fn another_user_s_put_over_an_owned_row_is_unauthorized_over_http() {
    let (_jwks, app) = standard().await;
    let res = app
        .put(&rs256(&RSA_A, "rsa-1", &claims("alice")), "l1")
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let res = app.put(&eddsa("ed-1", &claims("bob")), "l1").await;
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = json_of(res).await;
    let failed = &body["results"][0]["failed_operation"];
    assert_eq!(failed["error_code"], "UNAUTHORIZED", "{body}");
    assert_eq!(failed["operation_index"], 0);
    assert_eq!(app.owner_of("l1").await.as_deref(), Some("alice"));
}

// ---------------------------------------------------------------------------------------------
// Attacks: each answered 401 without touching the database

#[tokio::test]
async fn an_alg_none_token_is_refused_untouched() {
    let (_jwks, app) = standard().await;
    let input = signing_input(
        &json!({"alg":"none","typ":"JWT","kid":"rsa-1"}),
        &claims("alice"),
    );
    app.assert_refused_untouched(&format!("{input}."), "l1")
        .await;
}

#[tokio::test]
async fn an_hs256_token_signed_with_the_rsa_public_key_is_refused_untouched() {
    let (_jwks, app) = standard().await;
    let pem = RSA_A
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("pem");
    let input = signing_input(
        &json!({"alg":"HS256","typ":"JWT","kid":"rsa-1"}),
        &claims("alice"),
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(pem.as_bytes()).expect("hmac");
    mac.update(input.as_bytes());
    let token = format!("{input}.{}", b64(&mac.finalize().into_bytes()));
    app.assert_refused_untouched(&token, "l1").await;
}

#[tokio::test]
async fn an_expired_token_is_refused_untouched() {
    let (_jwks, app) = standard().await;
    let t = now();
    let c = json!({"sub": "alice", "aud": AUD, "iat": t - 7200, "exp": t - 3600});
    app.assert_refused_untouched(&rs256(&RSA_A, "rsa-1", &c), "l1")
        .await;
}

#[tokio::test]
async fn a_token_not_valid_before_a_future_time_is_refused_untouched() {
    let (_jwks, app) = standard().await;
    let t = now();
    let c = json!({"sub": "alice", "aud": AUD, "iat": t, "exp": t + 7200, "nbf": t + 3600});
    app.assert_refused_untouched(&rs256(&RSA_A, "rsa-1", &c), "l1")
        .await;
}

#[tokio::test]
async fn a_token_for_another_audience_is_refused_untouched() {
    let (_jwks, app) = standard().await;
    let mut c = claims("alice");
    c["aud"] = json!("someone-else");
    app.assert_refused_untouched(&rs256(&RSA_A, "rsa-1", &c), "l1")
        .await;
}

#[tokio::test]
async fn a_token_without_sub_is_refused_untouched() {
    let (_jwks, app) = standard().await;
    let mut c = claims("alice");
    c.as_object_mut().expect("object").remove("sub");
    app.assert_refused_untouched(&rs256(&RSA_A, "rsa-1", &c), "l1")
        .await;
}

#[tokio::test]
async fn a_token_with_an_unknown_kid_is_refused_untouched_after_one_refetch() {
    let (jwks, app) = standard().await;
    // Load the key set first, so the unknown kid is what triggers the next fetch.
    let ok = app.put(&eddsa("ed-1", &claims("erin")), "l0").await;
    assert_eq!(ok.status(), StatusCode::OK);
    let before = jwks.hits();
    let requests = app.requests();
    let token = rs256(&RSA_A, "rsa-9", &claims("alice"));
    let res = app.put(&token, "l1").await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(jwks.hits(), before + 1, "exactly one refetch");
    assert_eq!(app.owner_of("l1").await, None);
    assert_eq!(app.requests(), requests, "the engine never saw the request");
}

#[tokio::test]
async fn a_token_living_longer_than_the_maximum_is_refused_untouched() {
    let (_jwks, app) = standard().await;
    let t = now();
    let c = json!({"sub": "alice", "aud": AUD, "iat": t, "exp": t + 2 * 86_400});
    app.assert_refused_untouched(&rs256(&RSA_A, "rsa-1", &c), "l1")
        .await;
}

#[tokio::test]
async fn a_token_with_a_tampered_payload_is_refused_untouched() {
    let (_jwks, app) = standard().await;
    let token = rs256(&RSA_A, "rsa-1", &claims("alice"));
    let parts: Vec<&str> = token.split('.').collect();
    let forged = b64(claims("root").to_string().as_bytes());
    let tampered = format!("{}.{forged}.{}", parts[0], parts[2]);
    app.assert_refused_untouched(&tampered, "l1").await;
}

#[tokio::test]
async fn a_token_signed_by_an_unknown_key_is_refused_untouched() {
    let (_jwks, app) = standard().await;
    app.assert_refused_untouched(&rs256(&RSA_B, "rsa-1", &claims("alice")), "l1")
        .await;
}

#[tokio::test]
async fn a_request_without_a_token_is_refused_untouched() {
    let (_jwks, app) = standard().await;
    let res = app
        .http
        .post(format!("{}/api/data", app.base))
        .header("content-type", "application/json")
        .body(
            json!({"transactions": [{"crud": [
                {"op": "PUT", "table": "lists", "id": "l1", "op_data": {"name": "x"}}]}]})
            .to_string(),
        )
        .send()
        .await
        .expect("request");
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(app.owner_of("l1").await, None);
    assert_eq!(app.requests(), 0);
}

// ---------------------------------------------------------------------------------------------
// Key source availability and rotation

#[tokio::test]
async fn a_jwks_endpoint_down_without_a_cached_key_answers_503_with_retry_after() {
    let jwks = Jwks::start(None).await;
    let app = app(&jwks).await;
    let res = app
        .put(&rs256(&RSA_A, "rsa-1", &claims("alice")), "l1")
        .await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let retry_after = res
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .expect("Retry-After in seconds");
    assert!(retry_after >= 1);
    assert_eq!(app.owner_of("l1").await, None);
    assert_eq!(app.requests(), 0);
    // Once the endpoint is back, the same token goes through.
    jwks.serve(vec![rsa_jwk(&RSA_A, "rsa-1")]);
    let res = app
        .put(&rs256(&RSA_A, "rsa-1", &claims("alice")), "l1")
        .await;
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_rotated_key_is_picked_up_without_restart() {
    let jwks = Jwks::start(Some(vec![rsa_jwk(&RSA_A, "2024-a")])).await;
    let app = app(&jwks).await;
    let res = app
        .put(&rs256(&RSA_A, "2024-a", &claims("alice")), "l1")
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    jwks.serve(vec![rsa_jwk(&RSA_B, "2025-b")]);
    let res = app
        .put(&rs256(&RSA_B, "2025-b", &claims("alice")), "l2")
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(app.owner_of("l2").await.as_deref(), Some("alice"));
}
