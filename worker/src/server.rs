//! The OpenAI-compatible HTTP endpoint: `POST /v1/chat/completions` (streaming included),
//! `GET /v1/models`, the plain-HTTP proxy `/v1/proxy/<pool>/<path>`, and `GET /healthz`.
//!
//! Apps authenticate with `Authorization: Bearer <token>` (one of KEYPOOL_API_TOKENS). A
//! request's `model` names a pool, or a model that exactly one pool serves (or the pool comes
//! from an `X-Keypool-Pool` header); the user is the `X-Keypool-User` header, else the OpenAI
//! `user` field, else the configured default user.

// Handlers return early with a ready HTTP answer; boxing it would only add noise.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::RwLock;

use crate::db::Allocation;
use crate::gateway::{Answer, ChatJob, Failure, Gateway, ProxyJob, Served};
use crate::openai::{error_body, ChatRequest};

/// (pool, model) pairs; model is empty for pools whose keys name none.
type PoolModels = Arc<Vec<(String, String)>>;

/// Largest request body accepted (chat requests with images can be large).
const BODY_LIMIT: usize = 20 * 1024 * 1024;
/// How long the pool/model list is trusted before it is read again.
const MODELS_TTL: Duration = Duration::from_secs(5);

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
    models: RwLock<Option<(Instant, PoolModels)>>,
}

impl Endpoint {
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
            models: RwLock::new(None),
        }
    }
}

pub fn router(endpoint: Arc<Endpoint>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/proxy/{pool}/{*path}", any(proxy))
        .route("/dashboard", get(crate::dashboard::page))
        .merge(crate::admin::router())
        .route_layer(axum::middleware::from_fn_with_state(endpoint.clone(), count_request))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(endpoint)
}

fn error(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response {
    (status, axum::Json(error_body(message, kind, code))).into_response()
}

/// Counts every routed request by its route pattern (never the raw path) for /metrics.
async fn count_request(
    State(ep): State<Arc<Endpoint>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "other".to_string(), |m| m.as_str().to_string());
    let started = Instant::now();
    let response = next.run(request).await;
    ep.gateway
        .metrics
        .http_request(&route, response.status().as_u16(), started.elapsed());
    response
}

async fn not_found(uri: Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        &format!(
            "no route {}; this endpoint serves /v1/chat/completions, /v1/models and /v1/proxy/<pool>/<path>",
            uri.path()
        ),
        "invalid_request_error",
        Some("unknown_url"),
    )
}

/// Compares without stopping at the first differing byte.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The bearer token of a request, if it sent one.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
}

/// Whether `token` is one of `tokens` (every comparison takes the same time).
pub(crate) fn one_of(tokens: &[String], token: &str) -> bool {
    let mut ok = false;
    for t in tokens {
        ok |= same(t.as_bytes(), token.as_bytes());
    }
    ok
}

fn authorize(ep: &Endpoint, headers: &HeaderMap) -> Result<(), Response> {
    if ep.insecure_no_auth {
        return Ok(());
    }
    let Some(token) = bearer(headers) else {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "missing API token: send `Authorization: Bearer <token>` with one of the worker's KEYPOOL_API_TOKENS",
            "invalid_request_error",
            Some("invalid_api_key"),
        ));
    };
    if one_of(&ep.tokens, token) {
        Ok(())
    } else {
        Err(error(
            StatusCode::UNAUTHORIZED,
            "the API token is not one of this worker's KEYPOOL_API_TOKENS",
            "invalid_request_error",
            Some("invalid_api_key"),
        ))
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

pub(crate) fn user_of(ep: &Endpoint, headers: &HeaderMap, field: Option<&str>) -> Result<String, Response> {
    header_str(headers, "x-keypool-user")
        .or(field)
        .or(ep.default_user.as_deref())
        .map(str::to_string)
        .ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                "no user: set the request's `user` field or the X-Keypool-User header (pg_keypool shares each pool among its users)",
                "invalid_request_error",
                Some("missing_user"),
            )
        })
}

impl Endpoint {
    async fn pool_models(&self, fresh: bool) -> Result<PoolModels, Response> {
        if !fresh {
            if let Some((at, list)) = self.models.read().await.as_ref() {
                if at.elapsed() < MODELS_TTL {
                    return Ok(list.clone());
                }
            }
        }
        let client = self
            .gateway
            .db
            .client()
            .await
            .map_err(|e| database_unavailable(&e.to_string()))?;
        let rows = client
            .query("SELECT pool, coalesce(model, '') FROM keypool_models()", &[])
            .await
            .map_err(|e| database_unavailable(&crate::db::DbError::from(e).to_string()))?;
        let all: PoolModels = Arc::new(rows.iter().map(|r| (r.get(0), r.get(1))).collect());
        *self.models.write().await = Some((Instant::now(), all.clone()));
        Ok(all)
    }

    /// The pool a request goes to.
    pub(crate) async fn resolve_pool(&self, headers: &HeaderMap, model: Option<&str>) -> Result<String, Response> {
        if let Some(pool) = header_str(headers, "x-keypool-pool") {
            return Ok(pool.to_string());
        }
        let Some(model) = model.filter(|m| !m.is_empty()) else {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "`model` is required: name a pool, or a model that a pool serves (see GET /v1/models)",
                "invalid_request_error",
                Some("missing_model"),
            ));
        };
        for fresh in [false, true] {
            let list = self.pool_models(fresh).await?;
            if list.iter().any(|(pool, _)| pool == model) {
                return Ok(model.to_string());
            }
            let mut serving: Vec<&str> = list
                .iter()
                .filter(|(_, m)| m == model)
                .map(|(p, _)| p.as_str())
                .collect();
            serving.dedup();
            match serving.len() {
                0 => continue,
                1 => return Ok(serving[0].to_string()),
                _ => {
                    return Err(error(
                        StatusCode::BAD_REQUEST,
                        &format!(
                        "model \"{model}\" is served by pools {}: name the pool as the model, or send X-Keypool-Pool",
                        serving.join(", ")
                    ),
                        "invalid_request_error",
                        Some("ambiguous_model"),
                    ))
                }
            }
        }
        Err(error(
            StatusCode::NOT_FOUND,
            &format!("no pool is named \"{model}\" or serves it (see GET /v1/models)"),
            "invalid_request_error",
            Some("model_not_found"),
        ))
    }
}

fn database_unavailable(detail: &str) -> Response {
    tracing::warn!(error = %detail, "database unavailable");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the key pool's database is unavailable; try again shortly",
        "server_error",
        Some("DATABASE_UNAVAILABLE"),
    )
}

fn set(headers: &mut HeaderMap, name: &'static str, value: impl ToString) {
    if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
        headers.insert(HeaderName::from_static(name), v);
    }
}

fn allocation_headers(headers: &mut HeaderMap, a: &Allocation) {
    if let Some(r) = a.remaining_today {
        set(headers, "x-keypool-remaining-today", r);
    }
    if let Some(r) = a.allocated_today {
        set(headers, "x-keypool-allocated-today", r);
    }
    if let Some(w) = &a.warning_level {
        set(headers, "x-keypool-warning", w);
    }
}

fn served_headers(headers: &mut HeaderMap, s: &Served) {
    set(headers, "x-keypool-key-id", s.key_id);
    set(headers, "x-keypool-provider", &s.provider);
    set(headers, "x-keypool-attempts", s.attempts);
    allocation_headers(headers, &s.allocation);
}

fn retry_headers(headers: &mut HeaderMap, ms: i64) {
    let ms = ms.max(1);
    set(headers, "retry-after", (ms + 999) / 1000);
    set(headers, "retry-after-ms", ms);
}

/// The HTTP answer for a request that did not succeed.
pub fn failure_response(pool: &str, f: Failure) -> Response {
    match f {
        Failure::Refused { refusal, after, .. } => {
            let (status, message) =
                match refusal.code.as_str() {
                    "QUOTA_EXCEEDED" => (
                        StatusCode::TOO_MANY_REQUESTS,
                        format!(
                        "QUOTA_EXCEEDED: your share of pool \"{pool}\" today is used up (allocated {}, remaining {})",
                        refusal.allocation.allocated_today.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
                        refusal.allocation.remaining_today.unwrap_or(0)
                    ),
                    ),
                    "POOL_EXHAUSTED" => (
                        StatusCode::TOO_MANY_REQUESTS,
                        format!("POOL_EXHAUSTED: every key of pool \"{pool}\" is at its limit right now"),
                    ),
                    "NO_KEYS" => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("NO_KEYS: pool \"{pool}\" has no usable key (all disabled or removed)"),
                    ),
                    other => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("{other}: pool \"{pool}\" refused"),
                    ),
                };
            let message = match after {
                Some(a) => format!("{message}; earlier attempts: {a}"),
                None => message,
            };
            let kind = if status == StatusCode::TOO_MANY_REQUESTS {
                "rate_limit_exceeded"
            } else {
                "server_error"
            };
            let mut resp = error(status, &message, kind, Some(&refusal.code));
            allocation_headers(resp.headers_mut(), &refusal.allocation);
            if let Some(ms) = refusal.retry_after_ms {
                retry_headers(resp.headers_mut(), ms);
            }
            resp
        }
        Failure::Caller(m) => error(StatusCode::BAD_REQUEST, &m, "invalid_request_error", None),
        Failure::UnknownPool(p) => error(
            StatusCode::NOT_FOUND,
            &format!("pool \"{p}\" does not exist"),
            "invalid_request_error",
            Some("model_not_found"),
        ),
        Failure::Provider {
            status,
            error: e,
            key_id,
            attempts,
            ..
        } => {
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            let kind = if code.is_client_error() {
                "invalid_request_error"
            } else {
                "api_error"
            };
            let mut resp = error(code, &e.message, kind, e.code.as_deref());
            set(resp.headers_mut(), "x-keypool-key-id", key_id);
            set(resp.headers_mut(), "x-keypool-attempts", attempts);
            resp
        }
        Failure::Exhausted {
            last,
            attempts,
            retry_after_ms,
            timed_out,
        } => {
            let message =
                format!("no key of pool \"{pool}\" could serve the request after {attempts} attempts; last: {last}");
            let mut resp = match (retry_after_ms, timed_out) {
                (Some(_), _) => error(
                    StatusCode::TOO_MANY_REQUESTS,
                    &message,
                    "rate_limit_exceeded",
                    Some("UPSTREAM_RATE_LIMITED"),
                ),
                (None, true) => error(
                    StatusCode::GATEWAY_TIMEOUT,
                    &message,
                    "server_error",
                    Some("UPSTREAM_TIMEOUT"),
                ),
                (None, false) => error(
                    StatusCode::BAD_GATEWAY,
                    &message,
                    "server_error",
                    Some("UPSTREAM_FAILED"),
                ),
            };
            if let Some(ms) = retry_after_ms {
                retry_headers(resp.headers_mut(), ms);
            }
            set(resp.headers_mut(), "x-keypool-attempts", attempts);
            resp
        }
        Failure::Database(e) => database_unavailable(&e.to_string()),
    }
}

async fn healthz(State(ep): State<Arc<Endpoint>>) -> Response {
    let db = tokio::time::timeout(Duration::from_secs(2), async {
        let client = ep.gateway.db.client().await?;
        client.simple_query("SELECT 1").await?;
        Ok::<_, crate::db::DbError>(())
    })
    .await;
    let (status, database) = match db {
        Ok(Ok(())) => (StatusCode::OK, "ok".to_string()),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "no answer within 2 s".to_string()),
    };
    let body = json!({
        "status": if status == StatusCode::OK { "ok" } else { "unavailable" },
        "worker_id": ep.worker_id,
        "version": env!("CARGO_PKG_VERSION"),
        "database": database,
    });
    (status, axum::Json(body)).into_response()
}

async fn models(State(ep): State<Arc<Endpoint>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&ep, &headers) {
        return r;
    }
    let list = match ep.pool_models(true).await {
        Ok(l) => l,
        Err(r) => return r,
    };
    let mut data: Vec<Value> = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for (pool, _) in list.iter() {
        if !seen.contains(&pool.as_str()) {
            seen.push(pool);
            data.push(json!({"id": pool, "object": "model", "created": 0, "owned_by": "pg_keypool"}));
        }
    }
    for (pool, model) in list.iter() {
        if !model.is_empty() && !seen.contains(&model.as_str()) {
            seen.push(model);
            data.push(
                json!({"id": model, "object": "model", "created": 0, "owned_by": format!("pg_keypool pool {pool}")}),
            );
        }
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn chat(State(ep): State<Arc<Endpoint>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = authorize(&ep, &headers) {
        return r;
    }
    let request = match ChatRequest::parse(&body) {
        Ok(r) => r,
        Err(m) => return error(StatusCode::BAD_REQUEST, &m, "invalid_request_error", None),
    };
    let user = match user_of(&ep, &headers, request.user()) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let pool = match ep.resolve_pool(&headers, request.model()).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let stream = request.stream();
    let job = ChatJob {
        user,
        pool: pool.clone(),
        request,
        stream,
        deadline: Instant::now() + ep.request_deadline,
        capacity_wait: ep.capacity_wait,
    };
    match ep.gateway.chat(job).await {
        Ok(Answer::Complete { body, served }) => {
            let mut resp = Response::new(Body::from(body));
            resp.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            served_headers(resp.headers_mut(), &served);
            resp
        }
        Ok(Answer::Stream { events, served }) => {
            let mut resp = Response::new(Body::from_stream(events));
            let h = resp.headers_mut();
            h.insert("content-type", HeaderValue::from_static("text/event-stream"));
            h.insert("cache-control", HeaderValue::from_static("no-cache"));
            served_headers(h, &served);
            resp
        }
        Err(f) => failure_response(&pool, f),
    }
}

async fn proxy(
    State(ep): State<Arc<Endpoint>>,
    Path((pool, path)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = authorize(&ep, &headers) {
        return r;
    }
    let user = match user_of(&ep, &headers, None) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let Ok(method) = reqwest::Method::from_bytes(method.as_str().as_bytes()) else {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "unsupported method",
            "invalid_request_error",
            None,
        );
    };
    let job = ProxyJob {
        user,
        pool: pool.clone(),
        method,
        path,
        query: uri.query().map(str::to_string),
        content_type: header_str(&headers, "content-type").map(str::to_string),
        accept: header_str(&headers, "accept").map(str::to_string),
        body,
        deadline: Instant::now() + ep.request_deadline,
        capacity_wait: ep.capacity_wait,
    };
    match ep.gateway.proxy(job).await {
        Ok(a) => {
            let mut resp = Response::new(Body::from(a.body));
            *resp.status_mut() = StatusCode::from_u16(a.status).unwrap_or(StatusCode::BAD_GATEWAY);
            if let Some(ct) = a.headers.get("content-type") {
                resp.headers_mut().insert("content-type", ct.clone());
            }
            served_headers(resp.headers_mut(), &a.served);
            resp
        }
        Err(f) => failure_response(&pool, f),
    }
}
