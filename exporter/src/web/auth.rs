//! Basic authentication for a listener a web configuration protects: bcrypt checked off the
//! async runtime, a small cache of checks that passed, and the same bcrypt cost for an unknown
//! user as for a known one. It never logs, stores or returns a password or a hash.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use ring::hmac;

use super::config::Settings;
use super::Security;
use crate::routes::WEBHOOK_PATH;

/// Passed checks remembered at most; past that the cache starts over. Prometheus scrapes
/// with one or two identities, so a handful is plenty.
const CACHE_CAPACITY: usize = 64;

/// Cost of the hash an unknown user is checked against: the default of `hash-password`.
const DUMMY_COST: u32 = 10;

/// bcrypt checks running at once. More wait their turn as tasks, so a flood of wrong
/// passwords holds neither the blocking threads the collectors need nor every core.
const MAX_CONCURRENT_CHECKS: usize = 2;

/// Checks that passed, keyed by an HMAC of (user, password, hash) under a key made at start:
/// a memory dump shows neither passwords nor something cheaper to guess than bcrypt.
pub(super) struct Cache {
    key: hmac::Key,
    passed: Mutex<HashSet<Vec<u8>>>,
    checks: tokio::sync::Semaphore,
}

impl Cache {
    pub(super) fn new() -> Self {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .expect("the system random generator works");
        Cache {
            key,
            passed: Mutex::new(HashSet::new()),
            checks: tokio::sync::Semaphore::new(MAX_CONCURRENT_CHECKS),
        }
    }

    fn tag(&self, user: &str, password: &[u8], hash: &str) -> Vec<u8> {
        let mut ctx = hmac::Context::with_key(&self.key);
        for part in [user.as_bytes(), password, hash.as_bytes()] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        ctx.sign().as_ref().to_vec()
    }

    fn contains(&self, tag: &[u8]) -> bool {
        self.passed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(tag)
    }

    fn insert(&self, tag: Vec<u8>) {
        let mut passed = self.passed.lock().unwrap_or_else(|p| p.into_inner());
        if passed.len() >= CACHE_CAPACITY {
            passed.clear();
        }
        passed.insert(tag);
    }

    pub(super) fn clear(&self) {
        self.passed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// A valid bcrypt hash no password is known for, made once.
fn dummy_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| {
        bcrypt::hash(b"clusterwatch: no such user", DUMMY_COST)
            .expect("bcrypt hashes with a valid cost")
    })
}

/// `user` and `password` from an `Authorization: Basic` header.
fn credentials(headers: &HeaderMap) -> Option<(String, Vec<u8>)> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let encoded = value
        .strip_prefix(b"Basic ")
        .or_else(|| value.strip_prefix(b"basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim_ascii())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    let user = String::from_utf8(decoded[..colon].to_vec()).ok()?;
    Some((user, decoded[colon + 1..].to_vec()))
}

/// Whether `password` is `user`'s. An unknown user costs one bcrypt check like a known one,
/// so the answer's timing does not tell which users exist.
pub(super) async fn verify(
    cache: &Cache,
    settings: &Settings,
    user: &str,
    password: Vec<u8>,
) -> bool {
    let hash = settings.users.get(user).map(|h| h.expose().to_owned());
    let tag = hash.as_deref().map(|h| cache.tag(user, &password, h));
    if tag.as_deref().is_some_and(|t| cache.contains(t)) {
        return true;
    }
    let Ok(_permit) = cache.checks.acquire().await else {
        return false;
    };
    let checked = tokio::task::spawn_blocking(move || match hash {
        Some(h) => bcrypt::verify(&password, &h).unwrap_or(false),
        None => {
            let _ = bcrypt::verify(&password, dummy_hash());
            false
        }
    })
    .await
    .unwrap_or(false);
    if let (true, Some(tag)) = (checked, tag) {
        cache.insert(tag);
    }
    checked
}

/// Middleware: basic auth when the current settings have users (except on the webhook, which
/// has its own credentials and gets Alertmanager's only `Authorization` header), then the
/// configured response headers.
pub(super) async fn layer(
    State(security): State<Arc<Security>>,
    request: Request,
    next: Next,
) -> Response {
    let settings = security.current();
    if !settings.users.is_empty() && request.uri().path() != WEBHOOK_PATH {
        let allowed = match credentials(request.headers()) {
            Some((user, password)) => verify(&security.cache, &settings, &user, password).await,
            None => false,
        };
        if !allowed {
            tracing::debug!(path = request.uri().path(), "basic auth refused");
            let mut response = (StatusCode::UNAUTHORIZED, "Unauthorized\n").into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"clusterwatch\""),
            );
            add_headers(&settings, &mut response);
            return response;
        }
    }
    let mut response = next.run(request).await;
    add_headers(&settings, &mut response);
    response
}

fn add_headers(settings: &Settings, response: &mut Response) {
    for (name, value) in &settings.headers {
        response.headers_mut().insert(name.clone(), value.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::web::config::parse;

    fn settings(hash: &str) -> Settings {
        parse(
            &format!("basic_auth_users:\n  alice: '{hash}'\n"),
            "w.yml",
            std::path::Path::new("."),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn right_password_passes_and_is_cached_wrong_and_unknown_fail() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let s = settings(&hash);
        let cache = Cache::new();
        assert!(verify(&cache, &s, "alice", b"s3cret".to_vec()).await);
        assert_eq!(cache.passed.lock().unwrap().len(), 1);
        assert!(verify(&cache, &s, "alice", b"s3cret".to_vec()).await);
        assert!(!verify(&cache, &s, "alice", b"s3cre".to_vec()).await);
        assert!(!verify(&cache, &s, "bob", b"s3cret".to_vec()).await);
        // A new hash for the same user does not ride on the old cached check.
        let other = settings(&bcrypt::hash("other", 4).unwrap());
        assert!(!verify(&cache, &other, "alice", b"s3cret".to_vec()).await);
    }

    #[test]
    fn credentials_split_at_the_first_colon() {
        let mut h = HeaderMap::new();
        assert_eq!(credentials(&h), None);
        // alice:pa:ss
        h.insert(
            header::AUTHORIZATION,
            "Basic YWxpY2U6cGE6c3M=".parse().unwrap(),
        );
        assert_eq!(
            credentials(&h),
            Some(("alice".to_owned(), b"pa:ss".to_vec()))
        );
        h.insert(header::AUTHORIZATION, "Bearer x".parse().unwrap());
        assert_eq!(credentials(&h), None);
    }
}
