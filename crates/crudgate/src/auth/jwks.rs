//! The JWKS URL key source: fetch with a timeout, cache, refetch on an unknown `kid`.
//!
//! Why it is shaped like this:
//! - Keys rotate. An identity provider publishes a new key (new `kid`) and starts signing with
//!   it; the first token we see with that kid must trigger a refetch, or users are locked out
//!   until a periodic refresh.
//! - Anyone can send a token with a random kid. Without a limit each such request would make
//!   us hit the identity provider, so unknown-kid refetches are at most one per
//!   `jwks_min_refetch_secs`, and concurrent requests share one fetch (a mutex, plus a
//!   generation counter so a waiter sees that someone else already fetched). The limit is
//!   kept apart from the initial load and the periodic refresh, so a key rotated just after
//!   a load is still picked up at once; every kind of fetch also waits
//!   `jwks_min_refetch_secs` after a *failed* attempt, so a down endpoint is not hammered.
//!   Fetches are thus bounded at about two per interval whatever clients send.
//! - An unreachable endpoint is *our* problem, not the client's: with no usable cached key the
//!   caller answers 503 (retry later), never 401 (which would make an app sign its user out).
//!   Keys fetched earlier stay in use while the endpoint is down.
//! - Keys older than `jwks_cache_secs` are refreshed in the background on use, so removed keys
//!   eventually stop being accepted without slowing the request that noticed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::keys::{parse_jwks, JwkOrigin, Key};

/// Largest JWKS document read; a real one is a few kB.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// What is known about the remote key set at one moment.
#[derive(Clone)]
pub(crate) struct Snapshot {
    /// Keys from the last successful fetch (empty before the first one).
    pub(crate) keys: Arc<Vec<Key>>,
    /// When that successful fetch happened.
    pub(crate) fetched_at: Option<Instant>,
    /// Counts fetch attempts, successful or not.
    pub(crate) generation: u64,
    /// Why the most recent attempt failed; `None` when it succeeded (or none was made).
    pub(crate) last_error: Option<String>,
}

pub(crate) struct RemoteJwks {
    url: String,
    client: reqwest::Client,
    min_refetch: Duration,
    cache_for: Duration,
    current: RwLock<Snapshot>,
    /// Serialises fetches; holds what the rate limits need.
    fetching: tokio::sync::Mutex<Limits>,
    /// A background refresh is spawned or running: requests that find the cache stale
    /// meanwhile start no other.
    refreshing: AtomicBool,
}

/// Why a fetch is wanted; each has its own rate rule (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    InitialLoad,
    UnknownKid,
    CacheExpired,
}

impl Reason {
    fn name(self) -> &'static str {
        match self {
            Reason::InitialLoad => "initial load",
            Reason::UnknownKid => "unknown kid",
            Reason::CacheExpired => "cache expired",
        }
    }
}

#[derive(Default)]
struct Limits {
    last_attempt: Option<Instant>,
    last_failed: bool,
    last_unknown_kid: Option<Instant>,
}

impl RemoteJwks {
    pub(crate) fn new(
        url: String,
        timeout: Duration,
        min_refetch: Duration,
        cache_for: Duration,
    ) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| format!("cannot build the JWKS HTTP client: {e}"))?;
        Ok(RemoteJwks {
            url,
            client,
            min_refetch,
            cache_for,
            current: RwLock::new(Snapshot {
                keys: Arc::new(Vec::new()),
                fetched_at: None,
                generation: 0,
                last_error: None,
            }),
            fetching: tokio::sync::Mutex::new(Limits::default()),
            refreshing: AtomicBool::new(false),
        })
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        match self.current.read() {
            Ok(s) => s.clone(),
            // A panic while holding the lock cannot leave a half-written Snapshot (it is
            // replaced whole), so the poisoned value is still consistent.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Whether `at` is within the minimum interval between fetches.
    fn recent(&self, at: Option<Instant>) -> bool {
        at.is_some_and(|t| t.elapsed() < self.min_refetch)
    }

    /// Whether the cached keys are older than `jwks_cache_secs`.
    pub(crate) fn is_stale(&self, snap: &Snapshot) -> bool {
        snap.fetched_at
            .is_some_and(|at| at.elapsed() >= self.cache_for)
    }

    /// Fetches the key set again unless a rate limit forbids it, or another task fetched
    /// after `seen_generation` (then its result is used). Returns the resulting snapshot;
    /// check `last_error` for the outcome.
    pub(crate) async fn refresh(&self, seen_generation: u64, why: Reason) -> Snapshot {
        let mut limits = self.fetching.lock().await;
        let snap = self.snapshot();
        if snap.generation != seen_generation {
            return snap;
        }
        let recent = |at| self.recent(at);
        let limited = match why {
            Reason::UnknownKid => {
                recent(limits.last_unknown_kid)
                    || (limits.last_failed && recent(limits.last_attempt))
            }
            Reason::InitialLoad | Reason::CacheExpired => recent(limits.last_attempt),
        };
        if limited {
            tracing::debug!(why = why.name(), "JWKS fetch skipped: rate limited");
            return snap;
        }
        let now = Instant::now();
        limits.last_attempt = Some(now);
        if why == Reason::UnknownKid {
            limits.last_unknown_kid = Some(now);
        }
        let result = self.fetch().await;
        limits.last_failed = result.is_err();
        let mut next = snap;
        next.generation += 1;
        match result {
            Ok(keys) => {
                tracing::info!(why = why.name(), keys = keys.len(), "JWKS fetched");
                next.keys = Arc::new(keys);
                next.fetched_at = Some(Instant::now());
                next.last_error = None;
            }
            Err(reason) => {
                tracing::warn!(why = why.name(), %reason, cached_keys = next.keys.len(), "JWKS fetch failed");
                next.last_error = Some(reason);
            }
        }
        match self.current.write() {
            Ok(mut cur) => *cur = next.clone(),
            Err(poisoned) => *poisoned.into_inner() = next.clone(),
        }
        next
    }

    /// Records that a fetch just made for a request (the initial load) has already answered
    /// that request's unknown kid, so it uses up the unknown-kid refetch budget: a burst of
    /// random kids against a fresh server then costs one fetch, not two.
    /// If a fetch is running right now, nothing is noted (that fetch will answer the next
    /// request), so a rejection never waits on the network.
    pub(crate) fn note_unknown_kid_answered(&self) {
        let Ok(mut limits) = self.fetching.try_lock() else {
            return;
        };
        if limits
            .last_unknown_kid
            .is_none_or(|t| t.elapsed() >= self.min_refetch)
        {
            limits.last_unknown_kid = Some(Instant::now());
        }
    }

    /// Starts a background refresh of stale keys. Skipped if one is already pending or a fetch
    /// is running, and while the rate limit would refuse it (an endpoint that keeps failing
    /// must not cost every request a task).
    pub(crate) fn refresh_in_background(self: &Arc<Self>, seen_generation: u64) {
        match self.fetching.try_lock() {
            Ok(limits) if !self.recent(limits.last_attempt) => {}
            _ => return,
        }
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            this.refresh(seen_generation, Reason::CacheExpired).await;
            this.refreshing.store(false, Ordering::Release);
        });
    }

    async fn fetch(&self) -> Result<Vec<Key>, String> {
        let mut resp = self
            .client
            .get(&self.url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(describe)?;
        if !resp.status().is_success() {
            return Err(format!(
                "JWKS endpoint answered HTTP {}",
                resp.status().as_u16()
            ));
        }
        if resp
            .content_length()
            .is_some_and(|len| len > MAX_JWKS_BYTES as u64)
        {
            return Err("JWKS document is too large".into());
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(describe)? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err("JWKS document is too large".into());
            }
            body.extend_from_slice(&chunk);
        }
        parse_jwks(&body, JwkOrigin::Remote)
            .map_err(|e| format!("JWKS endpoint returned an unusable document: {}", e.0))
    }
}

/// A short, URL-free description of a transport error (the message can reach clients).
fn describe(e: reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "response could not be read"
    } else {
        "request failed"
    };
    format!("JWKS endpoint unreachable: {what}")
}
