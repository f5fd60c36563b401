//! The endpoint's shared state (settings, tokens, the gateway, caches), and the user a request
//! acts as.

// Refusals are ready HTTP answers; boxing them would only add noise (as in server.rs).
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use axum::response::Response;
use tokio::sync::{RwLock, Semaphore};

use crate::gateway::Gateway;
use crate::http::credentials::{Principal, TokenCache};

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
    /// Requests handled at once (KEYPOOL_MAX_IN_FLIGHT), and their permits.
    pub max_in_flight: usize,
    pub(crate) in_flight: Arc<Semaphore>,
    /// Token /metrics scrapes must present, if set (KEYPOOL_METRICS_TOKEN).
    pub metrics_token: Option<String>,
    /// Answers about database API tokens.
    pub token_cache: TokenCache,
    pub(crate) models: RwLock<Option<(Instant, PoolModels)>>,
    /// The database part of the last /metrics answer, and when it was read.
    pub(crate) metrics_cache: tokio::sync::Mutex<Option<(Instant, String)>>,
}

pub const DEFAULT_MAX_BODY: usize = 4 << 20;

pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;

pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

impl Endpoint {
    /// Sets KEYPOOL_MAX_IN_FLIGHT.
    pub fn with_max_in_flight(mut self, n: usize) -> Endpoint {
        self.max_in_flight = n;
        self.in_flight = Arc::new(Semaphore::new(n));
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
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            in_flight: Arc::new(Semaphore::new(DEFAULT_MAX_IN_FLIGHT)),
            metrics_token: None,
            token_cache: TokenCache::default(),
            models: RwLock::new(None),
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
/// body's `user`), else the default user. A token bound to a user refuses any other name (403).
pub(crate) fn user_of(
    ep: &Endpoint,
    principal: &Principal,
    headers: &HeaderMap,
    field: Option<&str>,
) -> Result<String, Response> {
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
