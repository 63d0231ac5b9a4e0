//! JWT verification against real keys and a real (local) JWKS endpoint.
//!
//! Keys are generated per test run with RustCrypto crates; tokens are assembled by hand here
//! (base64url header/payload, signature over `header.payload`) so the verifier is exercised
//! from the outside, including on tokens no honest library would produce (`alg: none`,
//! HS256 signed with a public key, tampered payloads).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use crudgate::auth::{AuthConfig, AuthError, AuthMode, Authenticator, PemKey};
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rsa::pkcs8::{EncodePublicKey, LineEnding};
use rsa::traits::PublicKeyParts;
use rsa::RsaPrivateKey;
use serde_json::{json, Value};
use sha2::Sha256;

const AUD: &str = "crudgate-test";

// ---------------------------------------------------------------------------------------------
// Keys and tokens

/// RSA key generation is slow in debug builds: make the two keys this file needs once.
static RSA_A: LazyLock<RsaPrivateKey> =
    LazyLock::new(|| RsaPrivateKey::new(&mut OsRng, 2048).expect("rsa keygen"));
static RSA_B: LazyLock<RsaPrivateKey> =
    LazyLock::new(|| RsaPrivateKey::new(&mut OsRng, 2048).expect("rsa keygen"));

enum TestKey {
    Rsa(&'static RsaPrivateKey),
    P256(p256::ecdsa::SigningKey),
    P384(p384::ecdsa::SigningKey),
    P521(p521::ecdsa::SigningKey),
    Ed(ed25519_dalek::SigningKey),
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

impl TestKey {
    fn rsa_a() -> Self {
        TestKey::Rsa(&RSA_A)
    }
    fn rsa_b() -> Self {
        TestKey::Rsa(&RSA_B)
    }
    fn p256() -> Self {
        TestKey::P256(p256::ecdsa::SigningKey::random(&mut OsRng))
    }
    fn p384() -> Self {
        TestKey::P384(p384::ecdsa::SigningKey::random(&mut OsRng))
    }
    fn p521() -> Self {
        TestKey::P521(p521::ecdsa::SigningKey::random(&mut OsRng))
    }
    fn ed25519() -> Self {
        TestKey::Ed(ed25519_dalek::SigningKey::generate(&mut OsRng))
    }

    fn alg(&self) -> &'static str {
        match self {
            TestKey::Rsa(_) => "RS256",
            TestKey::P256(_) => "ES256",
            TestKey::P384(_) => "ES384",
            TestKey::P521(_) => "ES512",
            TestKey::Ed(_) => "EdDSA",
        }
    }

    /// The public JWK, with `alg` and `use` as identity providers publish it.
    fn jwk(&self, kid: &str) -> Value {
        let ec = |crv: &str, x: &[u8], y: &[u8]| json!({"kty":"EC","crv":crv,"x":b64(x),"y":b64(y),"kid":kid,"alg":self.alg(),"use":"sig"});
        match self {
            TestKey::Rsa(k) => json!({
                "kty":"RSA","n":b64(&k.n().to_bytes_be()),"e":b64(&k.e().to_bytes_be()),
                "kid":kid,"alg":"RS256","use":"sig"
            }),
            TestKey::P256(k) => {
                let p = k.verifying_key().to_encoded_point(false);
                ec("P-256", p.x().expect("x"), p.y().expect("y"))
            }
            TestKey::P384(k) => {
                let p = k.verifying_key().to_encoded_point(false);
                ec("P-384", p.x().expect("x"), p.y().expect("y"))
            }
            TestKey::P521(k) => {
                // p521 0.13 gates SigningKey::verifying_key behind a feature it lacks.
                let p = p521::ecdsa::VerifyingKey::from(k).to_encoded_point(false);
                ec("P-521", p.x().expect("x"), p.y().expect("y"))
            }
            TestKey::Ed(k) => json!({
                "kty":"OKP","crv":"Ed25519","x":b64(k.verifying_key().as_bytes()),
                "kid":kid,"alg":"EdDSA","use":"sig"
            }),
        }
    }

    fn public_pem(&self) -> String {
        match self {
            TestKey::Rsa(k) => k.to_public_key().to_public_key_pem(LineEnding::LF),
            TestKey::P256(k) => {
                p256::PublicKey::from(k.verifying_key()).to_public_key_pem(LineEnding::LF)
            }
            TestKey::P384(k) => {
                p384::PublicKey::from(k.verifying_key()).to_public_key_pem(LineEnding::LF)
            }
            TestKey::P521(k) => {
                let point = p521::ecdsa::VerifyingKey::from(k).to_encoded_point(false);
                p521::PublicKey::from_sec1_bytes(point.as_bytes())
                    .expect("p521 point")
                    .to_public_key_pem(LineEnding::LF)
            }
            TestKey::Ed(k) => k.verifying_key().to_public_key_pem(LineEnding::LF),
        }
        .expect("pem")
    }

    fn sign(&self, alg: &str, msg: &[u8]) -> Vec<u8> {
        use p256::ecdsa::signature::{SignatureEncoding, Signer};
        match self {
            TestKey::Rsa(k) => match alg {
                "RS384" => rsa::pkcs1v15::SigningKey::<sha2::Sha384>::new((*k).clone())
                    .sign(msg)
                    .to_vec(),
                "RS512" => rsa::pkcs1v15::SigningKey::<sha2::Sha512>::new((*k).clone())
                    .sign(msg)
                    .to_vec(),
                _ => rsa::pkcs1v15::SigningKey::<Sha256>::new((*k).clone())
                    .sign(msg)
                    .to_vec(),
            },
            TestKey::P256(k) => {
                let s: p256::ecdsa::Signature = k.sign(msg);
                s.to_bytes().to_vec()
            }
            TestKey::P384(k) => {
                let s: p384::ecdsa::Signature = k.sign(msg);
                s.to_bytes().to_vec()
            }
            TestKey::P521(k) => {
                let s: p521::ecdsa::Signature = k.sign(msg);
                s.to_bytes().to_vec()
            }
            TestKey::Ed(k) => k.sign(msg).to_bytes().to_vec(),
        }
    }

    /// A token signed by this key with its natural algorithm.
    fn token(&self, kid: Option<&str>, claims: &Value) -> String {
        self.token_alg(self.alg(), kid, claims)
    }

    fn token_alg(&self, alg: &str, kid: Option<&str>, claims: &Value) -> String {
        let mut header = json!({"alg": alg, "typ": "JWT"});
        if let Some(kid) = kid {
            header["kid"] = json!(kid);
        }
        let input = signing_input(&header, claims);
        let sig = self.sign(alg, input.as_bytes());
        format!("{input}.{}", b64(&sig))
    }
}

fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    )
}

fn hs256_token(secret: &[u8], kid: Option<&str>, claims: &Value) -> String {
    let mut header = json!({"alg": "HS256", "typ": "JWT"});
    if let Some(kid) = kid {
        header["kid"] = json!(kid);
    }
    let input = signing_input(&header, claims);
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("hmac key");
    mac.update(input.as_bytes());
    format!("{input}.{}", b64(&mac.finalize().into_bytes()))
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// Claims that pass every check: a 10-minute token issued now.
fn claims() -> Value {
    let t = now();
    json!({"sub": "user-1", "aud": AUD, "iat": t, "exp": t + 600, "secret_claim": "s3cr3t-value"})
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

// ---------------------------------------------------------------------------------------------
// A local JWKS endpoint

#[derive(Clone)]
enum Behaviour {
    Serve(Value),
    Garbage,
    Status(u16),
    Hang,
}

#[derive(Clone)]
struct JwksServer {
    url: String,
    hits: Arc<AtomicUsize>,
    behaviour: Arc<Mutex<Behaviour>>,
}

impl JwksServer {
    async fn start(keys: Vec<Value>) -> Self {
        let hits = Arc::new(AtomicUsize::new(0));
        let behaviour = Arc::new(Mutex::new(Behaviour::Serve(json!({ "keys": keys }))));
        let state = (hits.clone(), behaviour.clone());
        let app = Router::new()
            .route("/jwks.json", get(serve_jwks))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        JwksServer {
            url: format!("http://{addr}/jwks.json"),
            hits,
            behaviour,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn set(&self, b: Behaviour) {
        *self.behaviour.lock().expect("lock") = b;
    }

    fn serve_keys(&self, keys: Vec<Value>) {
        self.set(Behaviour::Serve(json!({ "keys": keys })));
    }
}

async fn serve_jwks(
    State((hits, behaviour)): State<(Arc<AtomicUsize>, Arc<Mutex<Behaviour>>)>,
) -> Response {
    hits.fetch_add(1, Ordering::SeqCst);
    let b = behaviour.lock().expect("lock").clone();
    match b {
        Behaviour::Serve(doc) => axum::Json(doc).into_response(),
        Behaviour::Garbage => "<html>not a jwks</html>".into_response(),
        Behaviour::Status(code) => StatusCode::from_u16(code).expect("status").into_response(),
        Behaviour::Hang => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            "late".into_response()
        }
    }
}

fn config_for_url(url: &str) -> AuthConfig {
    AuthConfig {
        audiences: vec![AUD.to_string()],
        jwks_url: Some(url.to_string()),
        jwks_timeout_ms: 1_000,
        ..AuthConfig::default()
    }
}

/// An authenticator reading the given public keys from a fresh local JWKS endpoint.
async fn setup(keys: Vec<Value>) -> (JwksServer, Authenticator) {
    let server = JwksServer::start(keys).await;
    let auth = Authenticator::new(&config_for_url(&server.url)).expect("config");
    (server, auth)
}

/// Asserts a 401 whose message mentions `expected` and leaks neither the token nor claims.
fn assert_unauthorized(
    result: Result<crudgate::auth::Identity, AuthError>,
    token: &str,
    expected: &str,
) {
    match result {
        Err(AuthError::Unauthorized(msg)) => {
            assert!(
                msg.to_lowercase().contains(&expected.to_lowercase()),
                "message {msg:?} should mention {expected:?}"
            );
            assert_no_leak(&msg, token);
        }
        other => panic!("expected Unauthorized({expected}), got {other:?}"),
    }
}

fn assert_no_leak(msg: &str, token: &str) {
    assert!(
        !token.is_empty() && !msg.contains(token),
        "message leaks the token"
    );
    for part in token.split('.').filter(|p| p.len() > 8) {
        assert!(!msg.contains(part), "message leaks part of the token");
    }
    assert!(!msg.contains("s3cr3t-value"), "message leaks a claim value");
    assert!(!msg.contains("user-1"), "message leaks the subject");
}

// ---------------------------------------------------------------------------------------------
// Algorithms

#[tokio::test]
async fn a_valid_rs256_token_passes() {
    let key = TestKey::rsa_a();
    let (_server, auth) = setup(vec![key.jwk("rsa-1")]).await;
    let token = key.token(Some("rsa-1"), &claims());
    let id = auth
        .authenticate(Some(&bearer(&token)))
        .await
        .expect("valid");
    assert_eq!(id.user_id.as_deref(), Some("user-1"));
    assert_eq!(id.claims["aud"], json!(AUD));
    assert_eq!(id.claims["secret_claim"], json!("s3cr3t-value"));
}

#[tokio::test]
async fn rs384_and_rs512_tokens_pass_with_an_rsa_key_without_alg() {
    let key = TestKey::rsa_a();
    let mut jwk = key.jwk("rsa-1");
    jwk.as_object_mut().expect("object").remove("alg");
    let (_server, auth) = setup(vec![jwk]).await;
    for alg in ["RS256", "RS384", "RS512"] {
        let token = key.token_alg(alg, Some("rsa-1"), &claims());
        auth.authenticate(Some(&bearer(&token)))
            .await
            .unwrap_or_else(|e| panic!("{alg}: {e}"));
    }
}

#[tokio::test]
async fn an_rsa_key_pinned_to_rs256_rejects_an_rs512_token() {
    let key = TestKey::rsa_a();
    let (_server, auth) = setup(vec![key.jwk("rsa-1")]).await;
    let token = key.token_alg("RS512", Some("rsa-1"), &claims());
    assert_unauthorized(
        auth.authenticate(Some(&bearer(&token))).await,
        &token,
        "not allowed",
    );
}

#[tokio::test]
async fn a_valid_eddsa_token_passes() {
    let key = TestKey::ed25519();
    let (_server, auth) = setup(vec![key.jwk("ed-1")]).await;
    let token = key.token(Some("ed-1"), &claims());
    let id = auth
        .authenticate(Some(&bearer(&token)))
        .await
        .expect("valid");
    assert_eq!(id.user_id.as_deref(), Some("user-1"));
}

#[tokio::test]
async fn a_valid_es256_token_passes() {
    let key = TestKey::p256();
    let (_server, auth) = setup(vec![key.jwk("ec-1")]).await;
    let token = key.token(Some("ec-1"), &claims());
    auth.authenticate(Some(&bearer(&token)))
        .await
        .expect("valid");
}

#[tokio::test]
async fn a_valid_es384_token_passes() {
    let key = TestKey::p384();
    let (_server, auth) = setup(vec![key.jwk("ec-384")]).await;
    let token = key.token(Some("ec-384"), &claims());
    auth.authenticate(Some(&bearer(&token)))
        .await
        .expect("valid");
}

#[tokio::test]
async fn a_valid_es512_token_passes() {
    let key = TestKey::p521();
    let (_server, auth) = setup(vec![key.jwk("ec-521")]).await;
    let token = key.token(Some("ec-521"), &claims());
    auth.authenticate(Some(&bearer(&token)))
        .await
        .expect("valid");
}

#[tokio::test]
async fn an_es256_token_is_refused_by_a_p384_key_with_the_same_kid() {
    let signer = TestKey::p256();
    let published = TestKey::p384();
    let (_server, auth) = setup(vec![published.jwk("ec-1")]).await;
    let token = signer.token(Some("ec-1"), &claims());
    assert_unauthorized(
        auth.authenticate(Some(&bearer(&token))).await,
        &token,
        "not allowed",
    );
}

#[tokio::test]
async fn an_alg_none_token_is_unauthorized() {
    let key = TestKey::rsa_a();
    let (_server, auth) = setup(vec![key.jwk("rsa-1")]).await;
    for alg in ["none", "None", "NONE"] {
        let header = json!({"alg": alg, "kid": "rsa-1"});
        let token = format!("{}.", signing_input(&header, &claims()));
        assert_unauthorized(auth.authenticate(Some(&bearer(&token))).await, &token, "");
        // Even with a (bogus) signature part present.
        let token = format!("{}.{}", signing_input(&header, &claims()), b64(b"sig"));
        assert_unauthorized(
            auth.authenticate(Some(&bearer(&token))).await,
            &token,
            "none",
        );
    }
}

#[tokio::test]
async fn an_hs256_token_signed_with_the_rsa_public_key_pem_is_unauthorized() {
    let key = TestKey::rsa_a();
    let (_server, auth) = setup(vec![key.jwk("rsa-1")]).await;
    let pem = key.public_pem();
    let pkcs1 = {
        use rsa::pkcs1::EncodeRsaPublicKey;
        RSA_A
            .to_public_key()
            .to_pkcs1_pem(LineEnding::LF)
            .expect("pkcs1 pem")
    };
    for secret in [pem.as_bytes(), pem.trim_end().as_bytes(), pkcs1.as_bytes()] {
        for kid in [Some("rsa-1"), None] {
            let token = hs256_token(secret, kid, &claims());
            let res = auth.authenticate(Some(&bearer(&token))).await;
            assert_unauthorized(res, &token, "");
        }
    }
    // With the kid it is the algorithm check that refuses it.
    let token = hs256_token(pem.as_bytes(), Some("rsa-1"), &claims());
    assert_unauthorized(
        auth.authenticate(Some(&bearer(&token))).await,
        &token,
        "HS256 is not allowed",
    );
}

#[tokio::test]
async fn an_hs256_token_signed_with_the_rsa_public_key_der_is_unauthorized() {
    let key = TestKey::rsa_a();
    let (_server, auth) = setup(vec![key.jwk("rsa-1")]).await;
    let spki_der = RSA_A.to_public_key().to_public_key_der().expect("der");
    let pkcs1_der = {
        use rsa::pkcs1::EncodeRsaPublicKey;
        RSA_A.to_public_key().to_pkcs1_der().expect("pkcs1 der")
    };
    for secret in [spki_der.as_bytes(), pkcs1_der.as_bytes()] {
        for kid in [Some("rsa-1"), None] {
            let token = hs256_token(secret, kid, &claims());
            assert_unauthorized(auth.authenticate(Some(&bearer(&token))).await, &token, "");
        }
    }
}

#[tokio::test]
async fn an_hs256_token_is_refused_for_an_ed25519_public_key_configured_as_pem() {
    let key = TestKey::ed25519();
    let pem = key.public_pem();
    let cfg = AuthConfig {
        audiences: vec![AUD.into()],
        public_keys: vec![PemKey {
            kid: None,
            pem: pem.clone(),
        }],
        ..AuthConfig::default()
    };
    let auth = Authenticator::new(&cfg).expect("config");
    let token = hs256_token(pem.as_bytes(), None, &claims());
    assert_unauthorized(
        auth.authenticate(Some(&bearer(&token))).await,
        &token,
        "not allowed",
    );
    // The real EdDSA token passes through the PEM key.
    let token = key.token(None, &claims());
    auth.authenticate(Some(&bearer(&token)))
        .await
        .expect("valid");
}

// ---------------------------------------------------------------------------------------------
// Claims

#[tokio::test]
async fn a_token_expired_beyond_the_leeway_is_unauthorized() {
    let key = TestKey::p256();
    let (_server, auth) = setup(vec![key.jwk("ec-1")]).await;
    let t = now();
    let token = key.token(
        Some("ec-1"),
        &json!({"sub":"user-1","aud":AUD,"iat":t - 700,"exp":t - 61 - 5}),
    );
    assert_unauthorized(
        auth.authenticate(Some(&bearer(&token))).await,
        &token,
        "expired",
    );
}

#[tokio::test]
async fn a_token_expired_within_the_leeway_passes() {
    let key = TestKey::p256();
    let (_server, auth) = setup(vec![key.jwk("ec-1")]).await;
    let t = now();
    let token = key.token(
        Some("ec-1"),
        &json!({"sub":"user-1","aud":AUD,"iat":t - 700,"exp":t - 30}),
    );
    auth.authenticate(Some(&bearer(&token)))
        .await
        .expect("within leeway");
}

#[tokio::test]
async fn a_token_with_nbf_in_the_future_is_unauthorized() {
    let key = TestKey::p256();
    let (_server, auth) = setup(vec![key.jwk("ec-1")]).await;
    let t = now();
    let token = key.token(
        Some("ec-1"),
        &json!({"sub":"user-1","aud":AUD,"iat":t,"nbf":t + 300,"exp":t + 600}),
    );
    assert_unauthorized(
        auth.authenticate(Some(&bearer(&token))).await,
        &token,
        "nbf",
    );
    // nbf within the leeway passes.
    let token = key.token(
        Some("ec-1"),
        &json!({"sub":"user-1","aud":AUD,"iat":t,"nbf":t + 30,"exp":t + 600}),
    );
    auth.authenticate(Some(&bearer(&token)))
        .await
        .expect("nbf within leeway");
}

#[tokio::test]
async fn a_token_issued_in_the_future_is_unauthorized() {
    let key = TestKey::p256();
    let (_server, auth) = setup(vec![key.jwk("ec-1")]).await;
    let t = now();
    let token = key.token(
        Some("ec-1"),
        &json!({"sub":"user-1","aud":AUD,"iat":t + 300,"exp":t + 600}),
    );
    assert_unauthorized(
        auth.authenticate(Some(&bearer(&token))).await,
        &token,
        "iat",
    );
}

#[tokio::test]
async fn a_token_with_the_wrong_audience_is_unauthorized() {
    let key = TestKey::p256();
    let (_server, auth) = setup(vec![key.jwk("ec-1")]).await;
    let t = now();
    for aud in [
        json!("someone-else"),
        json!(["a", "b"]),
        json!([]),
        json!(42),
    ] {
        let token = key.token(
            Some("ec-1"),
            &json!({"sub":"user-1","aud":aud,"iat":t,"exp":t + 600}),
        );
        assert_unauthorized(
            auth.authenticate(Some(&bearer(&token))).await,
            &token,
            "aud",
        );
    }
    let token = key.token(Some("ec-1"), &json!({"sub":"user-1","iat":t,"exp":t + 600}));
    assert_unauthorized(
        auth.authenticate(Some(&bearer(&token))).await,
        &token,
        "aud",
    );
}

#[tokio::test]
async fn an_audience_array_containing_a_configured_audience_passes() {
    let key = TestKey::p256();
    let (_server, auth) = setup(vec![key.jwk("ec-1")]).await;
    let t = now();
    let token = key.token(
        Some("ec-1"),
        &json!({"sub":"user-1","aud":["other", AUD],"iat":t,"exp":t + 600}),
    );
    auth.authenticate(Some(&bearer(&token)))
        .await
        .expect("valid");
}

#[tokio::test]
async fn a_token_without_a_usable_sub_is_unauthorized() {
    let key = TestKey::p256();
    let (_server, auth) = setup(vec![key.jwk("ec-1")]).await;
    let t = now();
    // A NUL cannot be stored in Postgres text: such a user could record nothing.
    for sub in [
        None,
        Some(json!("")),
        Some(json!(42)),
        Some(json!("a\u{0}b")),
    ] {
        let mut c = json!({"aud":AUD,"iat":t,"exp":t + 600});
        if let Some(sub) = sub {
            c["sub"] = sub;
        }
        let token = key.token(Some("ec-1"), &c);
        assert_unauthorized(
            auth.authenticate(Some(&bearer(&token))).await,
            &token,
            "sub",
        );
    }
}

#[tokio::test]
async fn a_token_without_iat_or_exp_is_unauthorized() {
    let key = TestKey::p256();
    let (_server, auth) = setup(vec![key.jwk("ec-1")]).await;
    let t = now();
    let token = key.token(
        Some("ec-1"),
        &json!({"sub":"user-1","aud":AUD,"exp":t + 600}),
    );
    assert_unauthorized(
        auth.authenticate(Some(&bearer(&token))).await,
        &token,
        "iat",
    );
    let token = key.token(Some("ec-1"), &json!({"sub":"user-1","aud":AUD,"iat":t}));
    assert_unauthorized(
        auth.authenticate(Some(&bearer(&token))).await,
        &token,
        "exp",
    );
}

#[tokio::test]
async fn a_token_lifetime_over_the_maximum_is_unauthorized() {
    let key = TestKey::p256();
    let (_server, auth) = setup(vec![key.jwk("ec-1")]).await;
    let t = now();
    let token = key.token(
        Some("ec-1"),
        &json!({"sub":"user-1","aud":AUD,"iat":t,"exp":t + 86_401}),
    );
    assert_unauthorized(
        auth.authenticate(Some(&bearer(&token))).await,
        &token,
        "lifetime",
    );
    let token = key.token(
        Some("ec-1"),
        &json!({"sub":"user-1","aud":AUD,"iat":t,"exp":t + 86_400}),
    );
    auth.authenticate(Some(&bearer(&token)))
        .await
        .expect("exactly the maximum");
}

#[tokio::test]
async fn the_issuer_is_checked_only_when_configured() {
    let key = TestKey::p256();
    let server = JwksServer::start(vec![key.jwk("ec-1")]).await;
    let t = now();
    let token = key.token(
        Some("ec-1"),
        &json!({"sub":"user-1","aud":AUD,"iat":t,"exp":t + 600,"iss":"https://idp.example"}),
    );
    let open = Authenticator::new(&config_for_url(&server.url)).expect("config");
    open.authenticate(Some(&bearer(&token)))
        .await
        .expect("no issuer check");
    let mut cfg = config_for_url(&server.url);
    cfg.issuer = Some("https://other.example".into());
    let strict = Authenticator::new(&cfg).expect("config");
    assert_unauthorized(
        strict.authenticate(Some(&bearer(&token))).await,
        &token,
        "issuer",
    );
    cfg.issuer = Some("https://idp.example".into());
    let strict = Authenticator::new(&cfg).expect("config");
    strict
        .authenticate(Some(&bearer(&token)))
        .await
        .expect("issuer matches");
}

// ---------------------------------------------------------------------------------------------
// Signatures and keys

#[tokio::test]
async fn a_payload_tampered_after_signing_is_unauthorized() {
    let key = TestKey::rsa_a();
    let (_server, auth) = setup(vec![key.jwk("rsa-1")]).await;
    let token = key.token(Some("rsa-1"), &claims());
    let parts: Vec<&str> = token.split('.').collect();
    let mut c = claims();
    c["sub"] = json!("admin");
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(c.to_string().as_bytes()),
        parts[2]
    );
    assert_unauthorized(
        auth.authenticate(Some(&bearer(&tampered))).await,
        &tampered,
        "signature",
    );
}

#[tokio::test]
async fn a_token_signed_by_an_unknown_key_with_a_known_kid_is_unauthorized() {
    let known = TestKey::rsa_a();
    let attacker = TestKey::rsa_b();
    let (_server, auth) = setup(vec![known.jwk("rsa-1")]).await;
    let token = attacker.token(Some("rsa-1"), &claims());
    assert_unauthorized(
        auth.authenticate(Some(&bearer(&token))).await,
        &token,
        "signature",
    );
}

#[tokio::test]
async fn an_unknown_kid_is_unauthorized_after_exactly_one_refetch() {
    let key = TestKey::p256();
    let (server, auth) = setup(vec![key.jwk("ec-1")]).await;
    auth.authenticate(Some(&bearer(&key.token(Some("ec-1"), &claims()))))
        .await
        .expect("valid");
    assert_eq!(server.hits(), 1, "initial load");
    let token = key.token(Some("ec-unknown"), &claims());
    assert_unauthorized(
        auth.authenticate(Some(&bearer(&token))).await,
        &token,
        "unknown key id",
    );
    assert_eq!(server.hits(), 2, "exactly one refetch");
}

#[tokio::test]
async fn the_refetch_rate_limit_holds_for_two_unknown_kids_in_a_row() {
    let key = TestKey::p256();
    let (server, auth) = setup(vec![key.jwk("ec-1")]).await;
    auth.authenticate(Some(&bearer(&key.token(Some("ec-1"), &claims()))))
        .await
        .expect("valid");
    assert_eq!(server.hits(), 1);
    let first = key.token(Some("unknown-a"), &claims());
    let second = key.token(Some("unknown-b"), &claims());
    assert_unauthorized(
        auth.authenticate(Some(&bearer(&first))).await,
        &first,
        "unknown key id",
    );
    assert_eq!(server.hits(), 2, "the first unknown kid refetches");
    // The key set was not asked about the second kid: it may be a key published since, so
    // the answer is "try later", not a final 401.
    assert!(matches!(
        auth.authenticate(Some(&bearer(&second))).await,
        Err(AuthError::Unavailable(_))
    ));
    assert_eq!(server.hits(), 2, "the second one, within 30 s, does not");
    // Known keys keep working and cause no fetch.
    auth.authenticate(Some(&bearer(&key.token(Some("ec-1"), &claims()))))
        .await
        .expect("valid");
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn two_unknown_kids_in_a_row_cause_one_fetch_on_a_fresh_authenticator() {
    let key = TestKey::p256();
    let (server, auth) = setup(vec![key.jwk("ec-1")]).await;
    let first = key.token(Some("unknown-a"), &claims());
    let second = key.token(Some("unknown-b"), &claims());
    assert_unauthorized(
        auth.authenticate(Some(&bearer(&first))).await,
        &first,
        "unknown key id",
    );
    assert!(matches!(
        auth.authenticate(Some(&bearer(&second))).await,
        Err(AuthError::Unavailable(_))
    ));
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn concurrent_unknown_kids_share_one_fetch() {
    let key = TestKey::p256();
    let (server, auth) = setup(vec![key.jwk("ec-1")]).await;
    let mut tasks = Vec::new();
    for i in 0..10 {
        let auth = auth.clone();
        let token = key.token(Some(&format!("unknown-{i}")), &claims());
        tasks.push(tokio::spawn(async move {
            auth.authenticate(Some(&bearer(&token))).await
        }));
    }
    for t in tasks {
        assert!(matches!(
            t.await.expect("join"),
            Err(AuthError::Unauthorized(_))
        ));
    }
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn key_rotation_a_new_kid_passes_without_recreating_the_authenticator() {
    let old = TestKey::p256();
    let new = TestKey::ed25519();
    let server = JwksServer::start(vec![old.jwk("k-old")]).await;
    let mut cfg = config_for_url(&server.url);
    cfg.jwks_min_refetch_secs = 0;
    let auth = Authenticator::new(&cfg).expect("config");
    auth.authenticate(Some(&bearer(&old.token(Some("k-old"), &claims()))))
        .await
        .expect("old key");
    assert_eq!(server.hits(), 1);
    server.serve_keys(vec![old.jwk("k-old"), new.jwk("k-new")]);
    auth.authenticate(Some(&bearer(&new.token(Some("k-new"), &claims()))))
        .await
        .expect("rotated key");
    assert_eq!(server.hits(), 2);
    auth.authenticate(Some(&bearer(&old.token(Some("k-old"), &claims()))))
        .await
        .expect("old key still published");
    assert_eq!(server.hits(), 2, "known kids cause no fetch");
}

#[tokio::test]
async fn a_token_without_kid_uses_the_only_key_of_the_jwks() {
    let key = TestKey::p521();
    let (_server, auth) = setup(vec![key.jwk("only")]).await;
    let token = key.token(None, &claims());
    auth.authenticate(Some(&bearer(&token)))
        .await
        .expect("single key");
}

#[tokio::test]
async fn a_token_without_kid_is_refused_when_the_jwks_has_several_keys() {
    let a = TestKey::p256();
    let b = TestKey::ed25519();
    let (_server, auth) = setup(vec![a.jwk("a"), b.jwk("b")]).await;
    let token = a.token(None, &claims());
    assert_unauthorized(
        auth.authenticate(Some(&bearer(&token))).await,
        &token,
        "kid",
    );
}

// ---------------------------------------------------------------------------------------------
// JWKS endpoint trouble

#[tokio::test]
async fn a_jwks_server_that_is_down_with_no_cached_key_is_unavailable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let auth =
        Authenticator::new(&config_for_url(&format!("http://{addr}/jwks.json"))).expect("config");
    let key = TestKey::p256();
    let token = key.token(Some("ec-1"), &claims());
    for _ in 0..2 {
        match auth.authenticate(Some(&bearer(&token))).await {
            Err(AuthError::Unavailable(msg)) => assert_no_leak(&msg, &token),
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_jwks_server_that_times_out_is_unavailable() {
    let key = TestKey::p256();
    let server = JwksServer::start(vec![key.jwk("ec-1")]).await;
    server.set(Behaviour::Hang);
    let mut cfg = config_for_url(&server.url);
    cfg.jwks_timeout_ms = 200;
    let auth = Authenticator::new(&cfg).expect("config");
    let token = key.token(Some("ec-1"), &claims());
    let started = std::time::Instant::now();
    let res = auth.authenticate(Some(&bearer(&token))).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "timeout honoured"
    );
    match res {
        Err(AuthError::Unavailable(msg)) => {
            assert!(msg.contains("timed out"), "{msg}");
            assert_no_leak(&msg, &token);
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn a_jwks_server_returning_garbage_or_errors_is_unavailable() {
    let key = TestKey::p256();
    for behaviour in [
        Behaviour::Garbage,
        Behaviour::Status(500),
        Behaviour::Serve(json!({"keys": []})),
    ] {
        let server = JwksServer::start(vec![]).await;
        server.set(behaviour);
        let auth = Authenticator::new(&config_for_url(&server.url)).expect("config");
        let token = key.token(Some("ec-1"), &claims());
        match auth.authenticate(Some(&bearer(&token))).await {
            Err(AuthError::Unavailable(msg)) => assert_no_leak(&msg, &token),
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_cached_key_is_used_when_the_jwks_server_goes_down() {
    let key = TestKey::p256();
    let server = JwksServer::start(vec![key.jwk("ec-1")]).await;
    let mut cfg = config_for_url(&server.url);
    cfg.jwks_min_refetch_secs = 0;
    cfg.jwks_cache_secs = 0; // every use finds the cache stale and tries a refresh
    let auth = Authenticator::new(&cfg).expect("config");
    let token = key.token(Some("ec-1"), &claims());
    auth.authenticate(Some(&bearer(&token)))
        .await
        .expect("valid");
    server.set(Behaviour::Status(503));
    for _ in 0..3 {
        auth.authenticate(Some(&bearer(&token)))
            .await
            .expect("cached key");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An unknown kid while the endpoint is down cannot be decided: temporary, not 401.
    let other = key.token(Some("ec-2"), &claims());
    assert!(matches!(
        auth.authenticate(Some(&bearer(&other))).await,
        Err(AuthError::Unavailable(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Header and modes

#[tokio::test]
async fn the_token_prefix_is_accepted_and_schemes_are_case_insensitive() {
    let key = TestKey::p256();
    let (_server, auth) = setup(vec![key.jwk("ec-1")]).await;
    let token = key.token(Some("ec-1"), &claims());
    for header in [
        format!("Token {token}"),
        format!("token {token}"),
        format!("BEARER {token}"),
        format!("bearer   {token}  "),
    ] {
        auth.authenticate(Some(&header)).await.expect(&header);
    }
    assert_unauthorized(
        auth.authenticate(Some(&format!("Basic {token}"))).await,
        &token,
        "bearer",
    );
    assert_unauthorized(auth.authenticate(Some(&token)).await, &token, "bearer");
}

#[tokio::test]
async fn a_missing_header_is_unauthorized() {
    let key = TestKey::p256();
    let (_server, auth) = setup(vec![key.jwk("ec-1")]).await;
    match auth.authenticate(None).await {
        Err(AuthError::Unauthorized(msg)) => assert!(msg.contains("missing"), "{msg}"),
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    assert!(matches!(
        auth.authenticate(Some("")).await,
        Err(AuthError::Unauthorized(_))
    ));
    assert!(matches!(
        auth.authenticate(Some("Bearer ")).await,
        Err(AuthError::Unauthorized(_))
    ));
}

#[tokio::test]
async fn malformed_tokens_are_unauthorized() {
    let key = TestKey::p256();
    let (_server, auth) = setup(vec![key.jwk("ec-1")]).await;
    let good = key.token(Some("ec-1"), &claims());
    let cases = [
        "not-a-jwt".to_string(),
        "a.b".to_string(),
        format!("{good}.extra.parts"),
        format!("{good}!"),
        "x".repeat(20_000),
    ];
    for token in cases {
        assert_unauthorized(auth.authenticate(Some(&bearer(&token))).await, &token, "");
    }
}

#[tokio::test]
async fn mode_none_returns_an_identity_without_user_and_ignores_tokens() {
    let cfg = AuthConfig {
        mode: AuthMode::None,
        ..AuthConfig::default()
    };
    let auth = Authenticator::new(&cfg).expect("config");
    let id = auth.authenticate(None).await.expect("no auth");
    assert_eq!(id.user_id, None);
    assert_eq!(id.claims, Value::Null);
    let id = auth
        .authenticate(Some("Bearer garbage"))
        .await
        .expect("ignored");
    assert_eq!(id.user_id, None);
}

// ---------------------------------------------------------------------------------------------
// Configured keys

#[tokio::test]
async fn an_hs256_secret_works_only_where_configured() {
    let secret = [7u8; 32];
    let cfg = AuthConfig {
        audiences: vec![AUD.into()],
        hs256_secret: Some(b64(&secret)),
        ..AuthConfig::default()
    };
    let auth = Authenticator::new(&cfg).expect("config");
    let token = hs256_token(&secret, None, &claims());
    let id = auth
        .authenticate(Some(&bearer(&token)))
        .await
        .expect("hs256");
    assert_eq!(id.user_id.as_deref(), Some("user-1"));
    let wrong = hs256_token(&[8u8; 32], None, &claims());
    assert_unauthorized(
        auth.authenticate(Some(&bearer(&wrong))).await,
        &wrong,
        "signature",
    );
    // A secret too short to be safe is refused at startup.
    let short = AuthConfig {
        hs256_secret: Some(b64(b"short")),
        ..cfg.clone()
    };
    assert!(Authenticator::new(&short).is_err());
    // The Debug output of the configuration never shows the secret.
    assert!(!format!("{cfg:?}").contains(&b64(&secret)));
}

#[tokio::test]
async fn inline_jwks_and_pem_keys_from_the_config_verify_tokens() {
    let ec = TestKey::p384();
    let rsa = TestKey::rsa_a();
    let ed = TestKey::ed25519();
    let p521 = TestKey::p521();
    let cfg = AuthConfig {
        audiences: vec![AUD.into()],
        jwks: Some(json!({"keys": [ec.jwk("inline-ec")]}).to_string()),
        public_keys: vec![
            PemKey {
                kid: Some("pem-rsa".into()),
                pem: rsa.public_pem(),
            },
            PemKey {
                kid: Some("pem-ed".into()),
                pem: ed.public_pem(),
            },
            PemKey {
                kid: Some("pem-521".into()),
                pem: p521.public_pem(),
            },
        ],
        ..AuthConfig::default()
    };
    let auth = Authenticator::new(&cfg).expect("config");
    for (key, kid) in [
        (&ec, "inline-ec"),
        (&rsa, "pem-rsa"),
        (&ed, "pem-ed"),
        (&p521, "pem-521"),
    ] {
        let token = key.token(Some(kid), &claims());
        auth.authenticate(Some(&bearer(&token))).await.expect(kid);
    }
    // A PEM RSA key allows RS512 too; it never allows HS256.
    let token = rsa.token_alg("RS512", Some("pem-rsa"), &claims());
    auth.authenticate(Some(&bearer(&token)))
        .await
        .expect("RS512");
    let token = hs256_token(rsa.public_pem().as_bytes(), Some("pem-rsa"), &claims());
    assert_unauthorized(
        auth.authenticate(Some(&bearer(&token))).await,
        &token,
        "not allowed",
    );
}

#[tokio::test]
async fn a_key_configured_without_kid_serves_tokens_with_any_kid_after_a_refetch() {
    let wildcard = TestKey::ed25519();
    let published = TestKey::p256();
    let server = JwksServer::start(vec![published.jwk("ec-1")]).await;
    let cfg = AuthConfig {
        public_keys: vec![PemKey {
            kid: None,
            pem: wildcard.public_pem(),
        }],
        ..config_for_url(&server.url)
    };
    let auth = Authenticator::new(&cfg).expect("config");
    auth.authenticate(Some(&bearer(&published.token(Some("ec-1"), &claims()))))
        .await
        .expect("published key");
    let token = wildcard.token(Some("some-kid"), &claims());
    auth.authenticate(Some(&bearer(&token)))
        .await
        .expect("wildcard key");
    assert_eq!(server.hits(), 2, "the unknown kid was looked up first");
    // A kid that matches a key pins that key: the wildcard is not tried.
    let token = wildcard.token(Some("ec-1"), &claims());
    assert_unauthorized(
        auth.authenticate(Some(&bearer(&token))).await,
        &token,
        "not allowed",
    );
}

#[tokio::test]
async fn an_hs256_key_in_the_inline_jwks_verifies_tokens_with_its_kid() {
    let secret = [9u8; 48];
    let cfg = AuthConfig {
        audiences: vec![AUD.into()],
        jwks: Some(
            json!({"keys": [{"kty": "oct", "alg": "HS256", "kid": "dev", "k": b64(&secret)}]})
                .to_string(),
        ),
        ..AuthConfig::default()
    };
    let auth = Authenticator::new(&cfg).expect("config");
    let token = hs256_token(&secret, Some("dev"), &claims());
    auth.authenticate(Some(&bearer(&token)))
        .await
        .expect("hs256 via jwks");
}

#[tokio::test]
async fn a_symmetric_key_published_at_the_jwks_url_is_ignored() {
    let secret = [9u8; 48];
    let ec = TestKey::p256();
    let oct = json!({"kty": "oct", "alg": "HS256", "kid": "leaked", "k": b64(&secret)});
    let (_server, auth) = setup(vec![oct, ec.jwk("ec-1")]).await;
    auth.authenticate(Some(&bearer(&ec.token(Some("ec-1"), &claims()))))
        .await
        .expect("the EC key still works");
    let token = hs256_token(&secret, Some("leaked"), &claims());
    assert_unauthorized(
        auth.authenticate(Some(&bearer(&token))).await,
        &token,
        "unknown key id",
    );
}

#[tokio::test]
async fn invalid_configurations_are_refused() {
    let ok_url = Some("http://127.0.0.1:9/jwks.json".to_string());
    let cases = [
        // jwt is the default mode and needs audiences and a key source.
        AuthConfig::default(),
        AuthConfig {
            audiences: vec![AUD.into()],
            ..AuthConfig::default()
        },
        AuthConfig {
            jwks_url: ok_url.clone(),
            ..AuthConfig::default()
        },
        AuthConfig {
            audiences: vec![AUD.into()],
            jwks_url: Some("ftp://x/y".into()),
            ..AuthConfig::default()
        },
        AuthConfig {
            audiences: vec![AUD.into()],
            jwks: Some("{".into()),
            ..AuthConfig::default()
        },
        AuthConfig {
            audiences: vec![AUD.into()],
            public_keys: vec![PemKey {
                kid: None,
                pem: "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----".into(),
            }],
            ..AuthConfig::default()
        },
        AuthConfig {
            audiences: vec![AUD.into()],
            hs256_secret: Some("not base64!".into()),
            ..AuthConfig::default()
        },
    ];
    for cfg in cases {
        assert!(
            Authenticator::new(&cfg).is_err(),
            "{cfg:?} should be refused"
        );
    }
    let ok = AuthConfig {
        audiences: vec![AUD.into()],
        jwks_url: ok_url,
        ..AuthConfig::default()
    };
    Authenticator::new(&ok).expect("valid config");
}

#[test]
fn the_config_deserializes_with_documented_defaults_and_refuses_unknown_keys() {
    let cfg: AuthConfig =
        serde_json::from_value(json!({"audiences": [AUD], "jwks_url": "http://x/"}))
            .expect("config");
    assert_eq!(cfg.mode, AuthMode::Jwt);
    assert_eq!(cfg.max_lifetime_secs, 86_400);
    assert_eq!(cfg.leeway_secs, 60);
    assert_eq!(cfg.jwks_timeout_ms, 5_000);
    assert_eq!(cfg.jwks_min_refetch_secs, 30);
    assert_eq!(cfg.jwks_cache_secs, 3_600);
    let none: AuthConfig = serde_json::from_value(json!({"mode": "none"})).expect("mode none");
    assert_eq!(none.mode, AuthMode::None);
    assert!(serde_json::from_value::<AuthConfig>(json!({"audience": AUD})).is_err());
}

#[tokio::test]
async fn a_rotated_kid_while_the_jwks_is_down_is_unavailable_even_beside_a_key_without_kid() {
    let published = TestKey::rsa_a();
    let rotated = TestKey::rsa_b();
    let secret = [7u8; 32];
    let server = JwksServer::start(vec![published.jwk("rsa-1")]).await;
    let cfg = AuthConfig {
        hs256_secret: Some(b64(&secret)),
        jwks_min_refetch_secs: 0,
        ..config_for_url(&server.url)
    };
    let auth = Authenticator::new(&cfg).expect("config");
    auth.authenticate(Some(&bearer(&published.token(Some("rsa-1"), &claims()))))
        .await
        .expect("published key");
    server.set(Behaviour::Status(503));
    // The issuer rotated to a key the endpoint would publish if it were up. The secret (a key
    // without kid) refuses the token, but that says nothing about the rotated key: a 401
    // would log the user out.
    let token = rotated.token(Some("rsa-2"), &claims());
    assert!(matches!(
        auth.authenticate(Some(&bearer(&token))).await,
        Err(AuthError::Unavailable(_))
    ));
    // The secret still serves its own tokens, kid or not, while the endpoint is down.
    auth.authenticate(Some(&bearer(&hs256_token(&secret, Some("hs"), &claims()))))
        .await
        .expect("hs256 with a kid");
    // Back up, the rotated key is found.
    server.serve_keys(vec![published.jwk("rsa-1"), rotated.jwk("rsa-2")]);
    auth.authenticate(Some(&bearer(&token)))
        .await
        .expect("rotated key");
}
