//! Verification keys and the signature algorithms they allow.
//!
//! The one rule this module exists to enforce: **the algorithm comes from the key, not from the
//! token.** A key decides which algorithms it may verify (an RSA key: RS256/384/512, or only
//! the one its JWK `alg` names; a P-256 key: ES256; an Ed25519 key: EdDSA; a configured HMAC
//! secret: HS256). The token's header `alg` only picks among those. That closes `alg: none`
//! (no key allows it) and the classic key-confusion attack where an attacker signs an HS256
//! token using the server's *public* RSA key as the HMAC secret (an RSA key never allows HS256).
//!
//! Signature primitives come from RustCrypto crates (`rsa`, `p256`, `p384`, `p521`,
//! `ed25519-dalek`, `hmac`); the JWS framing around them is small and lives here.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use p256::ecdsa::signature::Verifier as _;
use rsa::pkcs1::DecodeRsaPublicKey as _;
use rsa::pkcs8::DecodePublicKey as _;
use rsa::traits::PublicKeyParts as _;
use rsa::{BigUint, Pkcs1v15Sign, RsaPublicKey};
use serde_json::Value;
use sha2::{Digest, Sha256, Sha384, Sha512};

/// Smallest RSA modulus accepted. 2048 bits is the floor RFC 7518 §3.3 sets for RS*.
const MIN_RSA_BITS: usize = 2048;
/// Smallest HS256 secret accepted: RFC 7518 §3.2 requires a key at least as long as the hash.
pub(crate) const MIN_HMAC_BYTES: usize = 32;

/// A JWS signature algorithm this server can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Alg {
    Hs256,
    Rs256,
    Rs384,
    Rs512,
    Es256,
    Es384,
    Es512,
    EdDsa,
}

impl Alg {
    /// Parses a JOSE `alg` name. Unknown names (including `none`) give `None`.
    pub(crate) fn parse(name: &str) -> Option<Alg> {
        Some(match name {
            "HS256" => Alg::Hs256,
            "RS256" => Alg::Rs256,
            "RS384" => Alg::Rs384,
            "RS512" => Alg::Rs512,
            "ES256" => Alg::Es256,
            "ES384" => Alg::Es384,
            "ES512" => Alg::Es512,
            "EdDSA" => Alg::EdDsa,
            _ => return None,
        })
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Alg::Hs256 => "HS256",
            Alg::Rs256 => "RS256",
            Alg::Rs384 => "RS384",
            Alg::Rs512 => "RS512",
            Alg::Es256 => "ES256",
            Alg::Es384 => "ES384",
            Alg::Es512 => "ES512",
            Alg::EdDsa => "EdDSA",
        }
    }
}

/// The public (or, for HS256, secret) material of one key.
enum Material {
    Hmac(Vec<u8>),
    Rsa(RsaPublicKey),
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
    P521(p521::ecdsa::VerifyingKey),
    Ed25519(ed25519_dalek::VerifyingKey),
}

/// One verification key: its optional `kid`, its material, and the algorithms it allows.
pub(crate) struct Key {
    kid: Option<String>,
    material: Material,
    /// Set when the key's source pinned one algorithm (JWK `alg`); otherwise every algorithm
    /// of the key type is allowed (RSA: RS256/384/512; the others have exactly one).
    pinned: Option<Alg>,
}

// Manual Debug: never print key material (an HMAC secret would leak into logs).
impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("type", &self.type_name())
            .field("pinned", &self.pinned)
            .finish()
    }
}

/// Why a key could not be loaded. Messages describe the key, never contain secret bytes.
#[derive(Debug)]
pub(crate) struct KeyError(pub(crate) String);

fn key_err(msg: impl Into<String>) -> KeyError {
    KeyError(msg.into())
}

/// Where a JWK came from: HMAC (`kty: oct`) keys are only accepted from configuration, never
/// from a JWKS URL (a secret published at a URL is no secret).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JwkOrigin {
    Config,
    Remote,
}

impl Key {
    pub(crate) fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    fn type_name(&self) -> &'static str {
        match self.material {
            Material::Hmac(_) => "oct",
            Material::Rsa(_) => "RSA",
            Material::P256(_) => "EC P-256",
            Material::P384(_) => "EC P-384",
            Material::P521(_) => "EC P-521",
            Material::Ed25519(_) => "OKP Ed25519",
        }
    }

    /// Whether this key may verify a token signed with `alg`. This, not the token header, is
    /// what decides the algorithm.
    pub(crate) fn allows(&self, alg: Alg) -> bool {
        let type_allows = match self.material {
            Material::Hmac(_) => alg == Alg::Hs256,
            Material::Rsa(_) => matches!(alg, Alg::Rs256 | Alg::Rs384 | Alg::Rs512),
            Material::P256(_) => alg == Alg::Es256,
            Material::P384(_) => alg == Alg::Es384,
            Material::P521(_) => alg == Alg::Es512,
            Material::Ed25519(_) => alg == Alg::EdDsa,
        };
        type_allows && self.pinned.is_none_or(|p| p == alg)
    }

    /// Verifies `signature` over `message` with `alg`. Returns false for any mismatch,
    /// including an algorithm the key does not allow and a malformed signature.
    pub(crate) fn verify(&self, alg: Alg, message: &[u8], signature: &[u8]) -> bool {
        if !self.allows(alg) {
            return false;
        }
        match (&self.material, alg) {
            (Material::Hmac(secret), Alg::Hs256) => match Hmac::<Sha256>::new_from_slice(secret) {
                Ok(mut mac) => {
                    mac.update(message);
                    // verify_slice compares in constant time.
                    mac.verify_slice(signature).is_ok()
                }
                Err(_) => false,
            },
            (Material::Rsa(key), Alg::Rs256) => key
                .verify(
                    Pkcs1v15Sign::new::<Sha256>(),
                    &Sha256::digest(message),
                    signature,
                )
                .is_ok(),
            (Material::Rsa(key), Alg::Rs384) => key
                .verify(
                    Pkcs1v15Sign::new::<Sha384>(),
                    &Sha384::digest(message),
                    signature,
                )
                .is_ok(),
            (Material::Rsa(key), Alg::Rs512) => key
                .verify(
                    Pkcs1v15Sign::new::<Sha512>(),
                    &Sha512::digest(message),
                    signature,
                )
                .is_ok(),
            // JWS ECDSA signatures are the fixed-size concatenation r || s (RFC 7518 §3.4),
            // which is what `Signature::from_slice` accepts; DER is rejected.
            (Material::P256(key), Alg::Es256) => p256::ecdsa::Signature::from_slice(signature)
                .is_ok_and(|sig| key.verify(message, &sig).is_ok()),
            (Material::P384(key), Alg::Es384) => p384::ecdsa::Signature::from_slice(signature)
                .is_ok_and(|sig| key.verify(message, &sig).is_ok()),
            (Material::P521(key), Alg::Es512) => p521::ecdsa::Signature::from_slice(signature)
                .is_ok_and(|sig| key.verify(message, &sig).is_ok()),
            (Material::Ed25519(key), Alg::EdDsa) => ed25519_dalek::Signature::from_slice(signature)
                .is_ok_and(|sig| key.verify_strict(message, &sig).is_ok()),
            _ => false,
        }
    }

    /// The HS256 key from `auth.hs256_secret`. The value is **base64url** (padding optional),
    /// the same encoding as a JWK `k` and as PowerSync's own HS256 key configuration, so one
    /// value can be pasted into both. It must decode to at least 32 bytes.
    pub(crate) fn from_hs256_secret(secret: &str) -> Result<Key, KeyError> {
        let bytes = decode_b64url(secret.trim())
            .map_err(|_| key_err("hs256_secret is not valid base64url"))?;
        hmac_key(None, bytes, None)
    }

    /// A key from a PEM public key: SPKI (`BEGIN PUBLIC KEY`) for RSA, P-256, P-384, P-521
    /// or Ed25519, or PKCS#1 (`BEGIN RSA PUBLIC KEY`). Every algorithm of the key type is
    /// allowed (for RSA: RS256/384/512).
    pub(crate) fn from_pem(kid: Option<String>, pem: &str) -> Result<Key, KeyError> {
        let pem = pem.trim();
        let material = if let Ok(k) = RsaPublicKey::from_public_key_pem(pem) {
            Material::Rsa(checked_rsa(k)?)
        } else if let Ok(k) = RsaPublicKey::from_pkcs1_pem(pem) {
            Material::Rsa(checked_rsa(k)?)
        } else if let Ok(k) = p256::PublicKey::from_public_key_pem(pem) {
            Material::P256(p256::ecdsa::VerifyingKey::from(k))
        } else if let Ok(k) = p384::PublicKey::from_public_key_pem(pem) {
            Material::P384(p384::ecdsa::VerifyingKey::from(k))
        } else if let Ok(k) = p521::PublicKey::from_public_key_pem(pem) {
            Material::P521(
                p521::ecdsa::VerifyingKey::from_affine(*k.as_affine())
                    .map_err(|_| key_err("invalid P-521 public key"))?,
            )
        } else if let Ok(k) = ed25519_dalek::VerifyingKey::from_public_key_pem(pem) {
            Material::Ed25519(k)
        } else {
            return Err(key_err(
                "not a supported PEM public key (expected an RSA, EC P-256/P-384/P-521 or \
                 Ed25519 public key; private keys and certificates are not accepted)",
            ));
        };
        Ok(Key {
            kid,
            material,
            pinned: None,
        })
    }

    /// A key from one JWK object (RFC 7517). Keys whose `use` is not `sig`, or whose
    /// `key_ops` lacks `verify`, are rejected, as are types and algorithms not supported.
    pub(crate) fn from_jwk(jwk: &Value, origin: JwkOrigin) -> Result<Key, KeyError> {
        let obj = jwk
            .as_object()
            .ok_or_else(|| key_err("JWK is not a JSON object"))?;
        let field = |name: &str| -> Result<Option<&str>, KeyError> {
            match obj.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.as_str())),
                Some(_) => Err(key_err(format!("JWK field {name} is not a string"))),
            }
        };
        let required = |name: &str| -> Result<&str, KeyError> {
            field(name)?.ok_or_else(|| key_err(format!("JWK field {name} is missing")))
        };
        let b64 = |name: &str| -> Result<Vec<u8>, KeyError> {
            decode_b64url(required(name)?)
                .map_err(|_| key_err(format!("JWK field {name} is not base64url")))
        };

        let kid = field("kid")?.map(str::to_owned);
        if let Some(u) = field("use")? {
            if u != "sig" {
                return Err(key_err(format!("JWK use {u:?} is not \"sig\"")));
            }
        }
        if let Some(ops) = obj.get("key_ops").and_then(Value::as_array) {
            if !ops.iter().any(|op| op.as_str() == Some("verify")) {
                return Err(key_err("JWK key_ops does not include \"verify\""));
            }
        }
        let pinned = match field("alg")? {
            None => None,
            Some(name) => Some(
                Alg::parse(name)
                    .ok_or_else(|| key_err(format!("JWK alg {name:?} is not supported")))?,
            ),
        };

        let material = match required("kty")? {
            "RSA" => {
                let n = BigUint::from_bytes_be(&b64("n")?);
                let e = BigUint::from_bytes_be(&b64("e")?);
                let key = RsaPublicKey::new(n, e).map_err(|_| key_err("invalid RSA public key"))?;
                Material::Rsa(checked_rsa(key)?)
            }
            "EC" => {
                let crv = required("crv")?;
                let (x, y) = (b64("x")?, b64("y")?);
                // Rebuild the uncompressed SEC1 point; from_sec1_bytes checks it is on the curve.
                let point = |size: usize| -> Result<Vec<u8>, KeyError> {
                    if x.len() != size || y.len() != size {
                        return Err(key_err(format!(
                            "JWK {crv} coordinates have a wrong length"
                        )));
                    }
                    let mut p = Vec::with_capacity(1 + 2 * size);
                    p.push(0x04);
                    p.extend_from_slice(&x);
                    p.extend_from_slice(&y);
                    Ok(p)
                };
                let bad = |_| key_err(format!("JWK {crv} point is not on the curve"));
                match crv {
                    "P-256" => Material::P256(
                        p256::ecdsa::VerifyingKey::from_sec1_bytes(&point(32)?).map_err(bad)?,
                    ),
                    "P-384" => Material::P384(
                        p384::ecdsa::VerifyingKey::from_sec1_bytes(&point(48)?).map_err(bad)?,
                    ),
                    "P-521" => Material::P521(
                        p521::ecdsa::VerifyingKey::from_sec1_bytes(&point(66)?).map_err(bad)?,
                    ),
                    other => return Err(key_err(format!("EC curve {other:?} is not supported"))),
                }
            }
            "OKP" => match required("crv")? {
                "Ed25519" => {
                    let x: [u8; 32] = b64("x")?
                        .try_into()
                        .map_err(|_| key_err("Ed25519 JWK x must be 32 bytes"))?;
                    Material::Ed25519(
                        ed25519_dalek::VerifyingKey::from_bytes(&x)
                            .map_err(|_| key_err("invalid Ed25519 public key"))?,
                    )
                }
                other => return Err(key_err(format!("OKP curve {other:?} is not supported"))),
            },
            "oct" => {
                if origin == JwkOrigin::Remote {
                    return Err(key_err(
                        "symmetric (oct) keys are only accepted from the configuration, \
                         not from a JWKS URL",
                    ));
                }
                return hmac_key(kid, b64("k")?, pinned);
            }
            other => return Err(key_err(format!("JWK kty {other:?} is not supported"))),
        };
        let key = Key {
            kid,
            material,
            pinned,
        };
        // A pinned alg must fit the key type (e.g. an RSA key claiming HS256 or ES256 is bogus).
        if let Some(alg) = pinned {
            if !key.allows(alg) {
                return Err(key_err(format!(
                    "JWK alg {} does not match its key type {}",
                    alg.name(),
                    key.type_name()
                )));
            }
        }
        Ok(key)
    }
}

fn hmac_key(kid: Option<String>, secret: Vec<u8>, pinned: Option<Alg>) -> Result<Key, KeyError> {
    if pinned.is_some_and(|a| a != Alg::Hs256) {
        return Err(key_err("symmetric keys support HS256 only"));
    }
    if secret.len() < MIN_HMAC_BYTES {
        return Err(key_err(format!(
            "HS256 secret must be at least {MIN_HMAC_BYTES} bytes after base64url decoding"
        )));
    }
    Ok(Key {
        kid,
        material: Material::Hmac(secret),
        pinned: Some(Alg::Hs256),
    })
}

fn checked_rsa(key: RsaPublicKey) -> Result<RsaPublicKey, KeyError> {
    if key.size() * 8 < MIN_RSA_BITS {
        return Err(key_err(format!(
            "RSA key is shorter than {MIN_RSA_BITS} bits"
        )));
    }
    Ok(key)
}

/// Decodes base64url with or without padding (JOSE omits it; hand-written config may not).
pub(crate) fn decode_b64url(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    URL_SAFE_NO_PAD.decode(s.trim_end_matches('='))
}

/// Parses a JWKS document (`{"keys": [...]}`) into keys. Keys that cannot be used (encryption
/// keys, unsupported types) are skipped with a warning, since real JWKS endpoints often mix
/// them in; a document that is not a JWKS at all, or holds no usable key, is an error.
pub(crate) fn parse_jwks(text: &[u8], origin: JwkOrigin) -> Result<Vec<Key>, KeyError> {
    let doc: Value = serde_json::from_slice(text).map_err(|_| key_err("JWKS is not valid JSON"))?;
    let entries = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| key_err("JWKS has no \"keys\" array"))?;
    let mut keys = Vec::with_capacity(entries.len());
    for entry in entries {
        match Key::from_jwk(entry, origin) {
            Ok(k) => keys.push(k),
            Err(e) => {
                let kid = entry.get("kid").and_then(|k| k.as_str()).unwrap_or("-");
                tracing::warn!(kid, reason = %e.0, "skipping JWKS key");
            }
        }
    }
    if keys.is_empty() {
        return Err(key_err("JWKS contains no usable signing key"));
    }
    Ok(keys)
}
