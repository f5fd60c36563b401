//! Who is calling, decided from the request's headers alone, before its body is read.
//!
//! - Service tokens (`KEYPOOL_API_TOKENS`): the operator's own apps, trusted as before: they
//!   name any user and any pool the worker's role may use.
//! - API tokens made in the database (`keypool_create_api_token`, `kpt_...`), for end users:
//!   a token bound to a user always acts as that user (a request naming another is 403), a
//!   token bound to pools reaches only those (others: 404, as for a pool that does not exist).
//!   The worker asks `keypool_authenticate_api_token` and keeps the answer for
//!   [`TOKEN_CACHE_TTL`], so a revoked token is refused within that time on every worker;
//!   expiry is checked on every request.
//! - Admin tokens (`KEYPOOL_ADMIN_TOKENS`) for the admin API; `--insecure-no-auth` never
//!   opens it.

// Refusals are ready HTTP answers; boxing them would only add noise (as in server.rs).
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::db::{Db, DbError, TokenGrant};
use crate::protocol::openai::error_body;

/// How long an answer about a database token is trusted (revocation takes effect within it).
pub const TOKEN_CACHE_TTL: Duration = Duration::from_secs(2);
/// Database lookups of tokens at once: a flood of made-up tokens cannot take the whole pool.
const CONCURRENT_LOOKUPS: usize = 8;
/// What database tokens start with (the extension's `tokens.rs`).
pub const TOKEN_PREFIX: &str = "kpt_";
/// A database token is the prefix and 43 characters of base64url.
const TOKEN_LEN: usize = 4 + 43;

/// Who sent a request.
#[derive(Clone, Debug)]
pub enum Principal {
    /// `--insecure-no-auth`: nobody checked.
    Open,
    /// A service token from the environment.
    Service,
    /// A database token.
    Token(Arc<TokenGrant>),
}

pub(crate) fn refuse(status: StatusCode, message: &str, code: &str) -> Response {
    let kind = if status == StatusCode::FORBIDDEN {
        "permission_error"
    } else {
        "invalid_request_error"
    };
    (status, axum::Json(error_body(message, kind, Some(code)))).into_response()
}

impl Principal {
    /// The user a request acts as. `named` is what the request says (X-Keypool-User header, or
    /// the body's `user` field); a token bound to a user refuses any other name.
    pub fn user(&self, named: Option<&str>, default_user: Option<&str>) -> Result<String, Response> {
        if let Principal::Token(t) = self {
            if let Some(bound) = &t.user {
                return match named {
                    Some(n) if n != bound => Err(refuse(
                        StatusCode::FORBIDDEN,
                        "this API token acts for one user only; the request names another",
                        "user_mismatch",
                    )),
                    _ => Ok(bound.clone()),
                };
            }
        }
        named.or(default_user).map(str::to_string).ok_or_else(|| {
            refuse(
                StatusCode::BAD_REQUEST,
                "no user: set the request's `user` field (`metadata.user_id` on /v1/messages) or the X-Keypool-User header (pg_keypool shares each pool among its users)",
                "missing_user",
            )
        })
    }

    /// Whether the request may reach `pool` (the database still checks the worker's role).
    /// The pools a request may reach, when its token limits them (a fallback chain skips the
    /// others), and the token whose limits it counts against.
    pub fn reach(&self) -> crate::db::Reach {
        match self {
            Principal::Token(t) => crate::db::Reach {
                pools: t.pools.clone(),
                token_sha256: Some(t.sha256),
            },
            _ => crate::db::Reach::default(),
        }
    }

    /// Who counts against KEYPOOL_MAX_IN_FLIGHT_PER_CALLER before the request's body is read:
    /// an API token, as that token, and, bound to a user, as that user (one user may hold
    /// several tokens). Requests of other callers, and of tokens bound to no user, count by the
    /// user they act as too, once the body said it ([`Principal::bound_user`] is `None`).
    pub fn callers(&self) -> Vec<String> {
        match self {
            Principal::Token(t) => match &t.user {
                Some(u) => vec![format!("token {}", t.id), format!("user {u}")],
                None => vec![format!("token {}", t.id)],
            },
            _ => Vec::new(),
        }
    }

    /// The user an API token is bound to, if it is.
    pub fn bound_user(&self) -> Option<&str> {
        match self {
            Principal::Token(t) => t.user.as_deref(),
            _ => None,
        }
    }

    pub fn reaches(&self, pool: &str) -> bool {
        match self {
            Principal::Token(t) => t.pools.as_ref().is_none_or(|p| p.iter().any(|x| x == pool)),
            _ => true,
        }
    }
}

/// Compares without stopping at the first differing byte.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `token` is one of `tokens` (every comparison takes the same time).
pub fn one_of(tokens: &[String], token: &str) -> bool {
    let mut ok = false;
    for t in tokens {
        ok |= same(t.as_bytes(), token.as_bytes());
    }
    ok
}

/// The bearer token of a request, if it sent one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
}

/// The API token a request presents, as each dialect's clients send it: `Authorization: Bearer`
/// (OpenAI's), `x-api-key` (Anthropic's SDKs), `x-goog-api-key` (Google's).
pub fn presented_token(headers: &HeaderMap) -> Option<&str> {
    bearer(headers).or_else(|| {
        ["x-api-key", "x-goog-api-key"]
            .iter()
            .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()).map(str::trim))
    })
}

/// Whether `token` has the shape of a database token (anything else is not looked up).
pub(crate) fn looks_like_db_token(token: &str) -> bool {
    token.len() == TOKEN_LEN
        && token.starts_with(TOKEN_PREFIX)
        && token[TOKEN_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Tokens remembered at most, valid and not valid apart: a flood of made-up tokens churns only
/// the second.
const TOKEN_CACHE_SIZE: usize = 10_000;
/// Lookups that may wait for a turn at once; beyond, a request is answered 503 at once (it
/// holds no in-flight slot meanwhile: lookups happen before a request is admitted).
const MAX_WAITING_LOOKUPS: usize = 256;

/// Answers about tokens, by SHA-256, evicted oldest first.
struct Answers {
    entries: HashMap<[u8; 32], (Instant, Option<Arc<TokenGrant>>)>,
    /// Insertion order (key, when): an entry whose time differs was answered again since.
    order: VecDeque<([u8; 32], Instant)>,
}

impl Answers {
    fn new() -> Answers {
        Answers {
            entries: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn insert(&mut self, key: [u8; 32], grant: Option<Arc<TokenGrant>>) {
        let now = Instant::now();
        self.entries.insert(key, (now, grant));
        self.order.push_back((key, now));
        // The oldest answers go first, one at a time, never the whole cache at once.
        while self.entries.len() > TOKEN_CACHE_SIZE || self.order.len() > 4 * TOKEN_CACHE_SIZE {
            let Some((old, at)) = self.order.pop_front() else { break };
            if self.entries.get(&old).is_some_and(|(t, _)| *t == at) {
                self.entries.remove(&old);
            }
        }
    }
}

/// Answers about database tokens, kept for [`TOKEN_CACHE_TTL`]. Requests with a known token
/// only read them (a shared lock). The database is asked with the token's SHA-256, never the
/// token. Tokens that were valid when last asked are looked up again on turns of their own, so
/// that a flood of made-up tokens never delays a real caller whose answer just expired.
pub struct TokenCache {
    valid: RwLock<Answers>,
    invalid: RwLock<Answers>,
    known_lookups: Semaphore,
    unknown_lookups: Semaphore,
    /// Lookups waiting for a turn, for known and for unknown tokens apart.
    known_waiting: AtomicUsize,
    unknown_waiting: AtomicUsize,
}

impl Default for TokenCache {
    fn default() -> Self {
        TokenCache {
            valid: RwLock::new(Answers::new()),
            invalid: RwLock::new(Answers::new()),
            known_lookups: Semaphore::new(CONCURRENT_LOOKUPS),
            unknown_lookups: Semaphore::new(CONCURRENT_LOOKUPS),
            known_waiting: AtomicUsize::new(0),
            unknown_waiting: AtomicUsize::new(0),
        }
    }
}

/// What the cache knows of a token.
enum Known {
    /// A fresh answer.
    Fresh(Option<Arc<TokenGrant>>),
    /// It was valid when last asked, but that answer expired.
    WasValid,
    Unknown,
}

/// Why a token could not be checked.
#[derive(Debug)]
pub enum LookupError {
    /// Too many lookups are waiting already.
    Busy,
    Database(DbError),
}

impl TokenCache {
    fn known(&self, key: &[u8; 32]) -> Known {
        let fresh = |(at, g): &(Instant, Option<Arc<TokenGrant>>)| (at.elapsed() < TOKEN_CACHE_TTL).then(|| g.clone());
        if let Ok(v) = self.valid.read() {
            if let Some(e) = v.entries.get(key) {
                return fresh(e).map_or(Known::WasValid, Known::Fresh);
            }
        }
        if let Ok(i) = self.invalid.read() {
            if let Some(g) = i.entries.get(key).and_then(fresh) {
                return Known::Fresh(g);
            }
        }
        Known::Unknown
    }

    fn remember(&self, key: [u8; 32], grant: Option<Arc<TokenGrant>>) {
        match grant {
            Some(g) => {
                if let Ok(mut v) = self.valid.write() {
                    v.insert(key, Some(g));
                }
            }
            None => {
                if let Ok(mut v) = self.valid.write() {
                    v.entries.remove(&key);
                }
                if let Ok(mut i) = self.invalid.write() {
                    i.insert(key, None);
                }
            }
        }
    }

    /// What `token` allows, or `None` for a token the database does not know (or no longer
    /// accepts).
    pub async fn grant(&self, db: &Db, token: &str) -> Result<Option<Arc<TokenGrant>>, LookupError> {
        if !looks_like_db_token(token) {
            return Ok(None);
        }
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let (turns, waiting) = match self.known(&key) {
            Known::Fresh(g) => return Ok(g),
            Known::WasValid => (&self.known_lookups, &self.known_waiting),
            Known::Unknown => (&self.unknown_lookups, &self.unknown_waiting),
        };
        if waiting.fetch_add(1, Ordering::AcqRel) >= MAX_WAITING_LOOKUPS {
            waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(LookupError::Busy);
        }
        let permit = turns.acquire().await;
        waiting.fetch_sub(1, Ordering::AcqRel);
        let _permit = permit.map_err(|_| {
            LookupError::Database(DbError {
                sqlstate: None,
                message: "token lookups stopped".into(),
                hint: None,
            })
        })?;
        // Another request may have looked it up while this one waited.
        if let Known::Fresh(g) = self.known(&key) {
            return Ok(g);
        }
        let grant = db
            .authenticate_token(&key)
            .await
            .map_err(LookupError::Database)?
            .map(Arc::new);
        self.remember(key, grant.clone());
        Ok(grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(user: Option<&str>, pools: Option<&[&str]>) -> Principal {
        Principal::Token(Arc::new(TokenGrant {
            id: 1,
            user: user.map(str::to_string),
            pools: pools.map(|p| p.iter().map(|s| s.to_string()).collect()),
            expires_at: None,
            sha256: [7; 32],
        }))
    }

    #[test]
    fn a_user_bound_token_acts_as_its_user_only() {
        let t = token(Some("alice"), None);
        assert_eq!(t.user(None, Some("default")).unwrap(), "alice");
        assert_eq!(t.user(Some("alice"), None).unwrap(), "alice");
        assert_eq!(t.user(Some("bob"), None).unwrap_err().status(), StatusCode::FORBIDDEN);
        let free = token(None, None);
        assert_eq!(free.user(Some("bob"), None).unwrap(), "bob");
        assert_eq!(free.user(None, None).unwrap_err().status(), StatusCode::BAD_REQUEST);
        assert_eq!(Principal::Service.user(Some("bob"), None).unwrap(), "bob");
    }

    #[test]
    fn a_pool_bound_token_reaches_its_pools_only() {
        let t = token(None, Some(&["chat"]));
        assert!(t.reaches("chat"));
        assert!(!t.reaches("image"));
        assert!(token(None, None).reaches("image"));
        assert!(Principal::Service.reaches("image"));
    }

    #[test]
    fn the_cache_evicts_its_oldest_answers_one_by_one() {
        let mut a = Answers::new();
        let key = |i: u32| {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_le_bytes());
            k
        };
        for i in 0..TOKEN_CACHE_SIZE as u32 + 10 {
            a.insert(key(i), None);
        }
        assert_eq!(a.entries.len(), TOKEN_CACHE_SIZE);
        assert!(!a.entries.contains_key(&key(9)), "the oldest went");
        assert!(a.entries.contains_key(&key(10)));
        assert!(a.entries.contains_key(&key(TOKEN_CACHE_SIZE as u32 + 9)));
        // Answering one token again and again keeps the order bounded.
        for _ in 0..10 * TOKEN_CACHE_SIZE {
            a.insert(key(42), None);
        }
        assert!(a.order.len() <= 4 * TOKEN_CACHE_SIZE + 1);
        assert!(a.entries.contains_key(&key(42)));
    }

    #[test]
    fn only_well_formed_tokens_are_looked_up() {
        let good = format!("{TOKEN_PREFIX}{}", "A".repeat(43));
        assert!(looks_like_db_token(&good));
        assert!(!looks_like_db_token(&good[..good.len() - 1]));
        assert!(!looks_like_db_token(&format!("xyz_{}", "A".repeat(43))));
        assert!(!looks_like_db_token(&format!("{TOKEN_PREFIX}{}!", "A".repeat(42))));
    }
}
