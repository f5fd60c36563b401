//! The endpoint's shared state (settings, tokens, the gateway, caches), and the user a request
//! acts as.

// Refusals are ready HTTP answers; boxing them would only add noise (as in server.rs).
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::HashMap;
use std::sync::Mutex;

use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use tokio::sync::{RwLock, Semaphore};

use crate::gateway::Gateway;
use crate::http::credentials::{refuse, Principal, TokenCache};

/// (pool, model) pairs; model is empty for pools whose keys name none.
pub(crate) type PoolModels = Arc<Vec<(String, String)>>;

/// How long the pool/model list is trusted before it is read again.
pub(crate) const MODELS_TTL: Duration = Duration::from_secs(5);

pub struct Endpoint {
    pub gateway: Arc<Gateway>,
    pub tokens: Vec<String>,
    /// Tokens of the admin API and the dashboard.
    pub admin_tokens: Vec<String>,
    pub insecure_no_auth: bool,
    pub default_user: Option<String>,
    pub request_deadline: Duration,
    pub capacity_wait: Duration,
    pub worker_id: String,
    /// Largest request body read (KEYPOOL_MAX_BODY).
    pub max_body: usize,
    /// Longest pause in a request body (KEYPOOL_IDLE_TIMEOUT).
    pub idle_timeout: Duration,
    /// Longest time a whole request body may take (KEYPOOL_BODY_TIMEOUT).
    pub body_timeout: Duration,
    /// Requests handled at once (KEYPOOL_MAX_IN_FLIGHT), and their permits.
    pub max_in_flight: usize,
    pub(crate) in_flight: Arc<Semaphore>,
    /// Requests one caller may have in flight (KEYPOOL_MAX_IN_FLIGHT_PER_CALLER).
    pub(crate) per_caller: Arc<CallerLimits>,
    /// Token /metrics scrapes must present, if set (KEYPOOL_METRICS_TOKEN).
    pub metrics_token: Option<String>,
    /// Answers about database API tokens.
    pub token_cache: TokenCache,
    pub(crate) models: RwLock<Option<(Instant, PoolModels)>>,
    /// Held while the list is read, so that concurrent misses share one query.
    pub(crate) models_refresh: tokio::sync::Mutex<()>,
    /// Own keys each user tried to add in the current minute (`POST /v1/keys`), and how many
    /// they may (KEYPOOL_KEY_ADDS_PER_MINUTE).
    pub(crate) key_adds: Mutex<HashMap<String, (Instant, u32)>>,
    pub key_adds_per_minute: u32,
    /// The database part of the last /metrics answer, and when it was read.
    pub(crate) metrics_cache: tokio::sync::Mutex<Option<(Instant, String)>>,
}

pub const DEFAULT_MAX_BODY: usize = 4 << 20;

pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;

pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);

pub const DEFAULT_MAX_IN_FLIGHT_PER_CALLER: usize = 64;

/// Own keys one user may try to add per minute by default (KEYPOOL_KEY_ADDS_PER_MINUTE): each
/// attempt asks the database (a dry run that every backend's configuration follows) and the
/// provider twice.
pub const DEFAULT_KEY_ADDS_PER_MINUTE: u32 = 10;

impl Endpoint {
    /// Whether `user` may try to add another own key now; when not, how long until they may.
    pub(crate) fn may_add_key(&self, user: &str) -> Result<(), Duration> {
        let mut adds = self.key_adds.lock().unwrap_or_else(|p| p.into_inner());
        if adds.len() > 10_000 {
            adds.retain(|_, (at, _)| at.elapsed() < Duration::from_secs(60));
        }
        let entry = adds.entry(user.to_string()).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= Duration::from_secs(60) {
            *entry = (Instant::now(), 0);
        }
        if entry.1 >= self.key_adds_per_minute {
            return Err(Duration::from_secs(60).saturating_sub(entry.0.elapsed()));
        }
        entry.1 += 1;
        Ok(())
    }

    /// Sets KEYPOOL_MAX_IN_FLIGHT.
    pub fn with_max_in_flight(mut self, n: usize) -> Endpoint {
        self.max_in_flight = n;
        self.in_flight = Arc::new(Semaphore::new(n));
        self
    }

    /// Sets KEYPOOL_MAX_IN_FLIGHT_PER_CALLER.
    pub fn with_max_in_flight_per_caller(mut self, n: usize) -> Endpoint {
        self.per_caller = Arc::new(CallerLimits::new(n));
        self
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gateway: Arc<Gateway>,
        tokens: Vec<String>,
        insecure_no_auth: bool,
        default_user: Option<String>,
        request_deadline: Duration,
        capacity_wait: Duration,
        worker_id: String,
    ) -> Endpoint {
        Endpoint {
            gateway,
            tokens,
            admin_tokens: Vec::new(),
            insecure_no_auth,
            default_user,
            request_deadline,
            capacity_wait,
            worker_id,
            max_body: DEFAULT_MAX_BODY,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            in_flight: Arc::new(Semaphore::new(DEFAULT_MAX_IN_FLIGHT)),
            per_caller: Arc::new(CallerLimits::new(DEFAULT_MAX_IN_FLIGHT_PER_CALLER)),
            metrics_token: None,
            token_cache: TokenCache::default(),
            models: RwLock::new(None),
            models_refresh: tokio::sync::Mutex::new(()),
            key_adds: Mutex::new(HashMap::new()),
            key_adds_per_minute: DEFAULT_KEY_ADDS_PER_MINUTE,
            metrics_cache: tokio::sync::Mutex::new(None),
        }
    }
}

pub(crate) fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// The user a request acts as: the token's, else the X-Keypool-User header, else `field` (the
/// body's `user`), else the default user. A token bound to a user refuses any other name (403);
/// a header that is there but cannot be read (not visible ASCII, or empty) is 400, never passed
/// over for the body's `user`.
pub(crate) fn user_of(
    ep: &Endpoint,
    principal: &Principal,
    headers: &HeaderMap,
    field: Option<&str>,
) -> Result<String, Response> {
    if headers.contains_key("x-keypool-user") && header_str(headers, "x-keypool-user").is_none() {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "X-Keypool-User must be a non-empty ASCII user id; send other user ids in the body's `user` field",
            "invalid_user",
        ));
    }
    let header = header_str(headers, "x-keypool-user");
    if let (Some(h), Some(f)) = (header, field) {
        if h != f {
            // Both name a user: the token check below sees the header; a bound token must
            // not be passed a different user in the body either.
            principal.user(Some(f), None)?;
        }
    }
    principal.user(header.or(field), ep.default_user.as_deref())
}

/// In-flight requests per caller: an API token (by id), else the user a request acts as.
pub struct CallerLimits {
    max: usize,
    counts: Mutex<HashMap<String, usize>>,
}

impl CallerLimits {
    pub fn new(max: usize) -> CallerLimits {
        CallerLimits {
            max,
            counts: Mutex::new(HashMap::new()),
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// A permit for one more request of `caller`, unless it has `max` in flight already.
    pub fn try_acquire(self: &Arc<Self>, caller: String) -> Option<CallerPermit> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(caller.clone()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(CallerPermit {
            limits: self.clone(),
            caller,
        })
    }

    /// Requests `caller` has in flight.
    pub fn in_flight(&self, caller: &str) -> usize {
        self.counts
            .lock()
            .map(|c| c.get(caller).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

/// One in-flight request of a caller; given back when dropped (with the answer's body).
pub struct CallerPermit {
    limits: Arc<CallerLimits>,
    caller: String,
}

impl Drop for CallerPermit {
    fn drop(&mut self) {
        let mut counts = self.limits.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.caller) {
            *n -= 1;
            // Callers with nothing in flight take no memory.
            if *n == 0 {
                counts.remove(&self.caller);
            }
        }
    }
}

/// `response` with its body holding `held` (permits) until the body is sent or dropped: a
/// stream counts until it ends.
pub(crate) fn holding<T: Send + Sync + Unpin + 'static>(response: Response, held: T) -> Response {
    let (parts, body) = response.into_parts();
    Response::from_parts(
        parts,
        axum::body::Body::new(Holding {
            inner: body,
            _held: held,
        }),
    )
}

/// A response body and what it holds.
struct Holding<T> {
    inner: axum::body::Body,
    _held: T,
}

impl<T: Unpin> http_body::Body for Holding<T> {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
