//! The OpenAI-compatible HTTP endpoint: `POST /v1/chat/completions` (streaming included),
//! `POST /v1/embeddings`, `GET /v1/models`, the proxy `/v1/proxy/<pool>/<path>` for pools of
//! plain HTTP APIs, and `GET /healthz`.
//!
//! Callers authenticate with `Authorization: Bearer <token>` (auth.rs: a service token, or an
//! API token from the database, which may bind the user and the pools), before the body is
//! read. A request's `model` names a pool, or a model that exactly one pool serves (or the pool
//! comes from an `X-Keypool-Pool` header); the user is the token's, else the `X-Keypool-User`
//! header, else the OpenAI `user` field, else the configured default user. Bodies larger than
//! `KEYPOOL_MAX_BODY` are refused (413) without being read whole; at most
//! `KEYPOOL_MAX_IN_FLIGHT` requests are handled at once (503 beyond).

// Handlers return early with a ready HTTP answer; boxing it would only add noise.
#![allow(clippy::result_large_err)]

use crate::http::endpoint::{header_str, holding, user_of, CallerPermit, Endpoint, PoolModels, MODELS_TTL};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use serde_json::{json, Value};
use tower_http::timeout::RequestBodyTimeoutLayer;

use crate::db::Allocation;
use crate::gateway::{Answer, ChatJob, EmbedJob, Failure, ImagesJob, ProxyJob, Served};
use crate::http::auth::{self};
use crate::http::credentials::Principal;
use crate::protocol::anthropic::MessagesRequest;
use crate::protocol::conversation::CarryError;
use crate::protocol::conversation::Dialect;
use crate::protocol::gemini::GeminiRequest;
use crate::protocol::inbound::Inbound;
use crate::protocol::openai::images::ImagesRequest;
use crate::protocol::openai::{check_model_name, error_body, ChatRequest, EmbeddingsRequest, ResponsesRequest};

pub fn router(endpoint: Arc<Endpoint>) -> Router {
    // Callers are known before any body is read: the auth layers run before the handlers'
    // extractors, and admit the request (KEYPOOL_MAX_IN_FLIGHT, and per caller) only then.
    let api = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/responses", post(responses))
        .route("/v1/messages", post(messages))
        .route("/v1/images/generations", post(images))
        .route("/v1beta/models/{action}", post(gemini_generate))
        .route("/v1/models/{action}", post(gemini_generate))
        .route("/v1/messages/count_tokens", post(count_tokens))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/proxy/{pool}/{*path}", any(proxy))
        .merge(crate::http::keys::user_routes())
        .route_layer(axum::middleware::from_fn_with_state(endpoint.clone(), auth::api));
    let user = crate::http::admin::user_router()
        .route_layer(axum::middleware::from_fn_with_state(endpoint.clone(), auth::user_api));
    let admin = crate::http::admin::admin_router()
        .merge(crate::http::keys::admin_routes())
        .route_layer(axum::middleware::from_fn_with_state(endpoint.clone(), auth::admin));
    let public = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(crate::http::admin::metrics))
        .route("/dashboard", get(crate::http::dashboard::page))
        .route("/dashboard/uplot.min.js", get(crate::http::dashboard::uplot_js))
        .route("/dashboard/uplot.min.css", get(crate::http::dashboard::uplot_css))
        .route_layer(axum::middleware::from_fn_with_state(endpoint.clone(), auth::public));
    Router::new()
        .merge(public)
        .merge(api)
        .merge(user)
        .merge(admin)
        .route_layer(axum::middleware::from_fn_with_state(endpoint.clone(), count_request))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(endpoint.max_body))
        .layer(RequestBodyTimeoutLayer::new(endpoint.idle_timeout))
        .layer(axum::middleware::from_fn_with_state(endpoint.clone(), body_deadline))
        .layer(axum::middleware::from_fn(dialect_errors))
        .layer(axum::middleware::from_fn(gemini_query_key))
        .with_state(endpoint)
}

/// A request body must arrive whole within KEYPOOL_BODY_TIMEOUT, however steadily it trickles
/// (the idle timeout alone restarts at every byte).
async fn body_deadline(
    State(ep): State<Arc<Endpoint>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let deadline = tokio::time::Instant::now() + ep.body_timeout;
    next.run(request.map(|body| Body::new(Deadline::new(body, deadline))))
        .await
}

/// The error a body past its deadline fails with.
#[derive(Debug)]
struct BodyDeadline;

impl std::fmt::Display for BodyDeadline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body took longer than KEYPOOL_BODY_TIMEOUT")
    }
}

impl std::error::Error for BodyDeadline {}

/// A request body that fails once its deadline has passed.
struct Deadline {
    inner: Body,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Deadline {
    fn new(inner: Body, at: tokio::time::Instant) -> Deadline {
        Deadline {
            inner,
            sleep: Box::pin(tokio::time::sleep_until(at)),
        }
    }
}

impl http_body::Body for Deadline {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        if let std::task::Poll::Ready(frame) = std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            return std::task::Poll::Ready(frame);
        }
        match self.sleep.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(Some(Err(axum::Error::new(BodyDeadline)))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The body of a request, or the answer to give when it could not be read: 413 when it is
/// larger than KEYPOOL_MAX_BODY (only that much was read), 408 when it stopped arriving for
/// KEYPOOL_IDLE_TIMEOUT.
pub(crate) fn body_or_error(body: Result<Bytes, BytesRejection>, max_body: usize) -> Result<Bytes, Response> {
    body.map_err(|e| {
        tracing::debug!(error = %e, "cannot read a request body");
        if timed_out(&e) {
            error(
                StatusCode::REQUEST_TIMEOUT,
                "the request body stopped arriving (KEYPOOL_IDLE_TIMEOUT) or took too long (KEYPOOL_BODY_TIMEOUT)",
                "invalid_request_error",
                Some("request_timeout"),
            )
        } else if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("the request body is larger than {max_body} bytes (KEYPOOL_MAX_BODY)"),
                "invalid_request_error",
                Some("request_too_large"),
            )
        } else {
            error(
                e.status(),
                &format!("cannot read the request body: {e}"),
                "invalid_request_error",
                None,
            )
        }
    })
}

/// Whether reading a body failed because it stopped arriving.
fn timed_out(e: &BytesRejection) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<tower_http::timeout::TimeoutError>() || s.is::<BodyDeadline>() {
            return true;
        }
        source = s.source();
    }
    false
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
            "no route {}; this endpoint serves /v1/chat/completions, /v1/responses, /v1/messages, /v1/messages/count_tokens, /v1beta/models/<model>:generateContent, /v1beta/models/<model>:streamGenerateContent, /v1/images/generations, /v1/embeddings, /v1/models and /v1/proxy/<pool>/<path>",
            uri.path()
        ),
        "invalid_request_error",
        Some("unknown_url"),
    )
}

impl Endpoint {
    /// The pools and models the worker's role may use, read at most every [`MODELS_TTL`], or
    /// with `fresh` once more (a pool made a moment ago routes at once). Reads are shared:
    /// however many requests name a model nobody serves at once, they wait for one query.
    async fn pool_models(&self, fresh: bool) -> Result<PoolModels, Response> {
        let asked = Instant::now();
        if let Some((at, list)) = self.models.read().await.as_ref() {
            if (!fresh && at.elapsed() < MODELS_TTL) || (fresh && *at >= asked) {
                return Ok(list.clone());
            }
        }
        let _reading = self.models_refresh.lock().await;
        // Read while this request waited its turn: that answer is fresh enough.
        if let Some((at, list)) = self.models.read().await.as_ref() {
            if *at >= asked || (!fresh && at.elapsed() < MODELS_TTL) {
                return Ok(list.clone());
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

    /// The pool a request goes to; a pool the caller's token does not reach is answered as one
    /// that does not exist.
    pub(crate) async fn resolve_pool(
        &self,
        principal: &Principal,
        headers: &HeaderMap,
        model: Option<&str>,
    ) -> Result<String, Response> {
        let pool = self.resolve_pool_name(principal, headers, model).await?;
        if principal.reaches(&pool) {
            Ok(pool)
        } else {
            Err(no_such_pool(model.unwrap_or(&pool)))
        }
    }

    /// A model name routes among the pools the caller reaches only: a pool it may not use
    /// neither makes a name ambiguous nor is named to it.
    async fn resolve_pool_name(
        &self,
        principal: &Principal,
        headers: &HeaderMap,
        model: Option<&str>,
    ) -> Result<String, Response> {
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
            // A pool the caller does not reach is looked for no differently from one that does
            // not exist (the same fresh read, the same answer): its name reveals nothing.
            if list.iter().any(|(pool, _)| pool == model && principal.reaches(pool)) {
                return Ok(model.to_string());
            }
            let mut serving: Vec<&str> = list
                .iter()
                .filter(|(p, m)| m == model && principal.reaches(p))
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
        Err(no_such_pool(model))
    }
}

/// The answer for a pool that does not exist, or that the caller's token does not reach.
fn no_such_pool(model: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        &format!("no pool is named \"{model}\" or serves it (see GET /v1/models)"),
        "invalid_request_error",
        Some("model_not_found"),
    )
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
    if let Some(m) = a.minute_remaining {
        set(headers, "x-keypool-remaining-minute", m);
    }
}

fn served_headers(headers: &mut HeaderMap, s: &Served) {
    set(headers, "x-keypool-pool", &s.pool);
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

/// The answer when a provider redirected: never followed (the key would go along), never
/// passed on.
fn redirect_refused(status: u16) -> Response {
    error(
        StatusCode::BAD_GATEWAY,
        &format!(
            "the provider answered HTTP {status} (a redirect); keypool-worker follows no redirects, so that keys never leave for another host"
        ),
        "server_error",
        Some("UPSTREAM_REDIRECT"),
    )
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
                    "USER_RATE_LIMITED" => (
                        StatusCode::TOO_MANY_REQUESTS,
                        format!(
                            "USER_RATE_LIMITED: you are at your limit of pool \"{pool}\" for this minute{}",
                            refusal
                                .retry_after_ms
                                .map(|ms| format!("; your next request fits in {:.1} s", ms as f64 / 1000.0))
                                .unwrap_or_default()
                        ),
                    ),
                    "BUDGET_EXCEEDED" => (
                        StatusCode::TOO_MANY_REQUESTS,
                        format!(
                            "BUDGET_EXCEEDED: the spend budget of pool \"{pool}\" (or yours in it) is used up until it resets{}",
                            refusal
                                .retry_after_ms
                                .map(|ms| format!(" in {} s", (ms + 999) / 1000))
                                .unwrap_or_default()
                        ),
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
            // What earlier attempts ran into (keys, providers' messages) is for the log and the
            // admin API (gateway::note_failure), not for the caller.
            let message = match after {
                Some(_) => format!("{message} (after earlier attempts on other keys failed)"),
                None => message,
            };
            let kind = if status == StatusCode::TOO_MANY_REQUESTS {
                "rate_limit_exceeded"
            } else {
                "server_error"
            };
            let mut resp = error(status, &message, kind, Some(&refusal.code));
            if matches!(refusal.code.as_str(), "QUOTA_EXCEEDED" | "BUDGET_EXCEEDED") {
                // Nothing changes before the day or the period ends: the official clients, which
                // retry a 429 on their own, are told not to.
                set(resp.headers_mut(), "x-should-retry", "false");
            }
            allocation_headers(resp.headers_mut(), &refusal.allocation);
            if let Some(ms) = refusal.retry_after_ms {
                retry_headers(resp.headers_mut(), ms);
            }
            resp
        }
        Failure::Caller(m) => error(StatusCode::BAD_REQUEST, &m, "invalid_request_error", None),
        Failure::Unsupported { field, provider } => {
            let e = CarryError::Unsupported { field, provider };
            let mut body = error_body(&e.message(), "invalid_request_error", Some("unsupported_parameter"));
            if let CarryError::Unsupported { field, .. } = e {
                body["error"]["param"] = Value::String(field);
            }
            (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
        }
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
            // A redirect is never followed (the key would go along) nor passed on.
            let code = StatusCode::from_u16(status)
                .ok()
                .filter(|c| !c.is_redirection() && !c.is_informational())
                .unwrap_or(StatusCode::BAD_GATEWAY);
            let kind = if code.is_client_error() {
                "invalid_request_error"
            } else {
                "api_error"
            };
            let mut resp = if (300..400).contains(&status) {
                redirect_refused(status)
            } else {
                error(code, &e.message, kind, e.code.as_deref())
            };
            set(resp.headers_mut(), "x-keypool-key-id", key_id);
            set(resp.headers_mut(), "x-keypool-attempts", attempts);
            resp
        }
        Failure::Exhausted {
            last: _,
            attempts,
            retry_after_ms,
            timed_out,
            reason,
        } => {
            let mut message = format!("no key of pool \"{pool}\" could serve the request after {attempts} attempts");
            if let Some(r) = reason {
                message.push_str(": ");
                message.push_str(&r);
            }
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
    // Anyone may ask: the answer says whether, never why (the log says why).
    let (status, database) = match db {
        Ok(Ok(())) => (StatusCode::OK, "ok"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "healthz: the database does not answer");
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        }
        Err(_) => {
            tracing::warn!("healthz: the database did not answer within 2 s");
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        }
    };
    let body = json!({
        "status": if status == StatusCode::OK { "ok" } else { "unavailable" },
        "worker_id": ep.worker_id,
        "version": env!("CARGO_PKG_VERSION"),
        "database": database,
    });
    (status, axum::Json(body)).into_response()
}

async fn models(State(ep): State<Arc<Endpoint>>, Extension(principal): Extension<Principal>) -> Response {
    let all = match ep.pool_models(true).await {
        Ok(l) => l,
        Err(r) => return r,
    };
    let list: Vec<&(String, String)> = all.iter().filter(|(pool, _)| principal.reaches(pool)).collect();
    let mut data: Vec<Value> = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for (pool, _) in list.iter().copied() {
        if !seen.contains(&pool.as_str()) {
            seen.push(pool);
            data.push(json!({"id": pool, "object": "model", "created": 0, "owned_by": "pg_keypool"}));
        }
    }
    for (pool, model) in list.iter().copied() {
        if !model.is_empty() && !seen.contains(&model.as_str()) {
            seen.push(model);
            data.push(
                json!({"id": model, "object": "model", "created": 0, "owned_by": format!("pg_keypool pool {pool}")}),
            );
        }
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// What the API routes need of a request body: parsing, and the user and model it names.
trait RoutedRequest: Sized {
    fn parse(body: Bytes) -> Result<Self, String>;
    fn user(&self) -> Option<&str>;
    fn model(&self) -> Option<&str>;
}

impl RoutedRequest for ChatRequest {
    fn parse(body: Bytes) -> Result<Self, String> {
        ChatRequest::parse(body)
    }
    fn user(&self) -> Option<&str> {
        ChatRequest::user(self)
    }
    fn model(&self) -> Option<&str> {
        ChatRequest::model(self)
    }
}

impl RoutedRequest for ResponsesRequest {
    fn parse(body: Bytes) -> Result<Self, String> {
        ResponsesRequest::parse(body)
    }
    fn user(&self) -> Option<&str> {
        ResponsesRequest::user(self)
    }
    fn model(&self) -> Option<&str> {
        ResponsesRequest::model(self)
    }
}

impl RoutedRequest for MessagesRequest {
    fn parse(body: Bytes) -> Result<Self, String> {
        MessagesRequest::parse(body)
    }
    fn user(&self) -> Option<&str> {
        MessagesRequest::user(self)
    }
    fn model(&self) -> Option<&str> {
        MessagesRequest::model(self)
    }
}

impl RoutedRequest for ImagesRequest {
    fn parse(body: Bytes) -> Result<Self, String> {
        ImagesRequest::parse(body)
    }
    fn user(&self) -> Option<&str> {
        ImagesRequest::user(self)
    }
    fn model(&self) -> Option<&str> {
        ImagesRequest::model(self)
    }
}

impl RoutedRequest for EmbeddingsRequest {
    fn parse(body: Bytes) -> Result<Self, String> {
        EmbeddingsRequest::parse(body)
    }
    fn user(&self) -> Option<&str> {
        EmbeddingsRequest::user(self)
    }
    fn model(&self) -> Option<&str> {
        EmbeddingsRequest::model(self)
    }
}

/// Reads and parses an API request's body (within KEYPOOL_MAX_BODY), finds the user it acts for
/// and the pool it goes to, as the caller's token allows, and admits it for that caller
/// (KEYPOOL_MAX_IN_FLIGHT_PER_CALLER): the request, the user, the pool, and the permit.
async fn routed<R: RoutedRequest>(
    ep: &Endpoint,
    principal: &Principal,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(R, String, String, Option<CallerPermit>), Response> {
    let body = body_or_error(body, ep.max_body)?;
    let request = R::parse(body).map_err(|m| error(StatusCode::BAD_REQUEST, &m, "invalid_request_error", None))?;
    let user = user_of(ep, principal, headers, request.user())?;
    let pool = ep.resolve_pool(principal, headers, request.model()).await?;
    // A model the caller chose (not the pool's name) may reach a provider's URL.
    if let Some(m) = request.model().filter(|m| *m != pool) {
        check_model_name(m).map_err(|why| {
            error(
                StatusCode::BAD_REQUEST,
                &why,
                "invalid_request_error",
                Some("invalid_model"),
            )
        })?;
    }
    let permit = admit_user(ep, principal, &user)?;
    Ok((request, user, pool, permit))
}

/// Callers that are not a user-bound token count against their limit by the user a request
/// acts as too (a token was admitted as itself already).
fn admit_user(ep: &Endpoint, principal: &Principal, user: &str) -> Result<Option<CallerPermit>, Response> {
    if principal.bound_user().is_some() {
        return Ok(None);
    }
    auth::admit_caller(ep, format!("user {user}")).map(Some)
}

async fn chat(
    State(ep): State<Arc<Endpoint>>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (request, user, pool, permit) = match routed::<ChatRequest>(&ep, &principal, &headers, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    holding(
        chat_answer(&ep, &principal, Inbound::Chat(request), user, pool).await,
        permit,
    )
}

/// `POST /v1/responses`: the Responses API, carried to any provider.
async fn responses(
    State(ep): State<Arc<Endpoint>>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (request, user, pool, permit) = match routed::<ResponsesRequest>(&ep, &principal, &headers, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    holding(
        chat_answer(&ep, &principal, Inbound::Responses(request), user, pool).await,
        permit,
    )
}

/// `POST /v1/messages`: Anthropic's Messages API, carried to any provider.
async fn messages(
    State(ep): State<Arc<Endpoint>>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (request, user, pool, permit) = match routed::<MessagesRequest>(&ep, &principal, &headers, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    holding(
        chat_answer(&ep, &principal, Inbound::Messages(request), user, pool).await,
        permit,
    )
}

/// `POST /v1/messages/count_tokens`: the worker's count of a Messages request's input tokens (what
/// a reservation for it is charged up front), with no provider call.
async fn count_tokens(
    State(ep): State<Arc<Endpoint>>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body_or_error(body, ep.max_body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    // count_tokens takes no max_tokens: the request is read as one of a single token.
    let with_cap = match crate::protocol::json::Object::parse(body) {
        Ok(o) if !o.has("max_tokens") => Bytes::from(o.render(&[("max_tokens", Some("1"))])),
        Ok(o) => o.raw().clone(),
        Err(m) => return error(StatusCode::BAD_REQUEST, &m, "invalid_request_error", None),
    };
    let request = match MessagesRequest::parse(with_cap) {
        Ok(r) => r,
        Err(m) => return error(StatusCode::BAD_REQUEST, &m, "invalid_request_error", None),
    };
    if let Err(r) = ep.resolve_pool(&principal, &headers, request.model()).await {
        return r;
    }
    axum::Json(json!({"input_tokens": request.estimate_prompt_tokens()})).into_response()
}

/// Gemini's own routes: `POST /v1beta/models/{model}:generateContent` and
/// `:streamGenerateContent?alt=sse` (Google's SDKs; `/v1/models/...` alike), carried to any
/// provider. The model is the
/// URL's: a pool's name or a model a pool serves.
async fn gemini_generate(
    State(ep): State<Arc<Endpoint>>,
    Extension(principal): Extension<Principal>,
    Path(action): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Some((model, method)) = action.rsplit_once(':') else {
        return error(
            StatusCode::NOT_FOUND,
            "no such method: use models/{model}:generateContent",
            "invalid_request_error",
            None,
        );
    };
    let stream = match method {
        "generateContent" => false,
        "streamGenerateContent" if uri.query().is_some_and(|q| q.split('&').any(|p| p == "alt=sse")) => true,
        "streamGenerateContent" => {
            return error(
                StatusCode::BAD_REQUEST,
                "streamGenerateContent is served as server-sent events: add ?alt=sse (Google's SDKs do)",
                "invalid_request_error",
                None,
            )
        }
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                "no such method: this endpoint serves :generateContent and :streamGenerateContent",
                "invalid_request_error",
                None,
            )
        }
    };
    let model = model.strip_prefix("models/").unwrap_or(model);
    let body = match body_or_error(body, ep.max_body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let request = match GeminiRequest::parse(model, stream, body) {
        Ok(r) => r,
        Err(m) => return error(StatusCode::BAD_REQUEST, &m, "invalid_request_error", None),
    };
    let user = match user_of(&ep, &principal, &headers, None) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let pool = match ep.resolve_pool(&principal, &headers, Some(model)).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    if model != pool {
        if let Err(why) = check_model_name(model) {
            return error(
                StatusCode::BAD_REQUEST,
                &why,
                "invalid_request_error",
                Some("invalid_model"),
            );
        }
    }
    let permit = match admit_user(&ep, &principal, &user) {
        Ok(p) => p,
        Err(r) => return r,
    };
    holding(
        chat_answer(&ep, &principal, Inbound::Gemini(request), user, pool).await,
        permit,
    )
}

/// Errors of the Messages and Gemini routes in their own shapes, as their SDKs read them
/// (Anthropic's `{"type": "error", "error": {"type", "message"}}`, Google's `{"error": {"code",
/// "message", "status"}}`); headers (the wait) are kept.
async fn dialect_errors(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let path = request.uri().path();
    let dialect = if path.starts_with("/v1/messages") {
        Some(Dialect::Anthropic)
    } else if is_gemini_path(path) {
        Some(Dialect::Gemini)
    } else {
        None
    };
    let response = next.run(request).await;
    let status = response.status();
    let Some(dialect) = dialect.filter(|_| !status.is_success()) else {
        return response;
    };
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024).await.unwrap_or_default();
    let openai: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let e = &openai["error"];
    let message = match (e["message"].as_str(), e["code"].as_str()) {
        (Some(m), Some(code)) if !m.starts_with(code) => format!("{code}: {m}"),
        (Some(m), _) => m.to_string(),
        _ => status.canonical_reason().unwrap_or("error").to_string(),
    };
    let body = match dialect {
        Dialect::Gemini => {
            let grpc = match status.as_u16() {
                400 | 413 | 415 | 422 => "INVALID_ARGUMENT",
                401 => "UNAUTHENTICATED",
                403 => "PERMISSION_DENIED",
                404 => "NOT_FOUND",
                408 | 504 => "DEADLINE_EXCEEDED",
                429 => "RESOURCE_EXHAUSTED",
                402 | 412 => "FAILED_PRECONDITION",
                405 | 501 => "UNIMPLEMENTED",
                409 => "ABORTED",
                499 => "CANCELLED",
                502 | 503 => "UNAVAILABLE",
                _ => "INTERNAL",
            };
            json!({"error": {"code": status.as_u16(), "message": message, "status": grpc}})
        }
        _ => {
            let kind = match status.as_u16() {
                400 | 408 | 415 | 422 => "invalid_request_error",
                401 => "authentication_error",
                402 => "billing_error",
                403 => "permission_error",
                404 => "not_found_error",
                413 => "request_too_large",
                429 => "rate_limit_error",
                503 | 529 => "overloaded_error",
                _ => "api_error",
            };
            json!({"type": "error", "error": {"type": kind, "message": message}})
        }
    };
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts
        .headers
        .insert("content-type", HeaderValue::from_static("application/json"));
    Response::from_parts(parts, Body::from(body.to_string()))
}

/// Gemini's routes: under `/v1beta/` or `/v1/` (Google's SDKs use either version), a model's method.
fn is_gemini_path(path: &str) -> bool {
    // The colon may come percent-encoded (`%3A`): the route matches the decoded path.
    let colon = path.contains(':') || path.to_ascii_lowercase().contains("%3a");
    path.starts_with("/v1beta/") || (path.starts_with("/v1/models/") && colon)
}

/// Google's SDKs may send the key as `?key=`: it is taken as the request's token (an
/// `x-goog-api-key` header) before the token is checked.
async fn gemini_query_key(mut request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if is_gemini_path(request.uri().path()) && !request.headers().contains_key("x-goog-api-key") {
        let key = request.uri().query().and_then(|q| {
            q.split('&')
                .find_map(|p| p.strip_prefix("key="))
                .and_then(|k| HeaderValue::from_str(k).ok())
        });
        if let Some(k) = key {
            request.headers_mut().insert("x-goog-api-key", k);
        }
    }
    next.run(request).await
}

async fn chat_answer(ep: &Endpoint, principal: &Principal, request: Inbound, user: String, pool: String) -> Response {
    let stream = request.stream();
    let job = ChatJob {
        user,
        pool: pool.clone(),
        reach: principal.reach(),
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

/// `POST /v1/images/generations`: OpenAI's image API, on OpenAI-style and Gemini image models;
/// every image its own call and reservation. When the images after the first cannot all be made
/// (the user's share or the pool's minute used up) the answer holds those made, and
/// `x-keypool-images-short` says why the others are missing.
async fn images(
    State(ep): State<Arc<Endpoint>>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (request, user, pool, permit) = match routed::<ImagesRequest>(&ep, &principal, &headers, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    // Each image is reserved with the most the pool's models bill for the quality and size asked.
    let models = match ep.pool_models(false).await {
        Ok(m) => m,
        Err(r) => return r,
    };
    let tokens_per_image = models
        .iter()
        .filter(|(p, _)| *p == pool)
        .map(|(_, model)| request.estimate_image_tokens(model))
        .max()
        .unwrap_or_else(|| request.estimate_image_tokens(""));
    let job = ImagesJob {
        user,
        pool: pool.clone(),
        reach: principal.reach(),
        request,
        tokens_per_image,
        deadline: Instant::now() + ep.request_deadline,
        capacity_wait: ep.capacity_wait,
    };
    let resp = match ep.gateway.images(job).await {
        Ok(answer) => {
            let mut resp = Response::new(Body::from(answer.body));
            resp.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            served_headers(resp.headers_mut(), &answer.served);
            if let Some(f) = answer.short {
                // What the caller may be told: a refusal's code, never keys or providers' words.
                let why = match &f {
                    Failure::Refused { refusal, .. } => refusal.code.clone(),
                    Failure::Provider { status, .. } => format!("UPSTREAM_ERROR {status}"),
                    // The worker's own words (a limit of its own), never a provider's.
                    Failure::Exhausted {
                        timed_out: true,
                        reason,
                        ..
                    } => format!(
                        "UPSTREAM_TIMEOUT: {}",
                        reason.as_deref().unwrap_or("the deadline passed")
                    ),
                    Failure::Exhausted { reason: Some(why), .. } => format!("UPSTREAM_FAILED: {why}"),
                    Failure::Caller(why) => format!("NO_IMAGE: {why}"),
                    _ => "UPSTREAM_FAILED".to_string(),
                };
                set(resp.headers_mut(), "x-keypool-images-short", why);
            }
            resp
        }
        Err(f) => failure_response(&pool, f),
    };
    holding(resp, permit)
}

async fn embeddings(
    State(ep): State<Arc<Endpoint>>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (request, user, pool, permit) = match routed::<EmbeddingsRequest>(&ep, &principal, &headers, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let job = EmbedJob {
        user,
        pool: pool.clone(),
        reach: principal.reach(),
        request,
        deadline: Instant::now() + ep.request_deadline,
        capacity_wait: ep.capacity_wait,
    };
    let resp = match ep.gateway.embed(job).await {
        Ok(answer) => {
            let mut resp = Response::new(Body::from(answer.body));
            resp.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            served_headers(resp.headers_mut(), &answer.served);
            resp
        }
        Err(f) => failure_response(&pool, f),
    };
    holding(resp, permit)
}

async fn proxy(
    State(ep): State<Arc<Endpoint>>,
    Extension(principal): Extension<Principal>,
    Path((pool, path)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if !principal.reaches(&pool) {
        return no_such_pool(&pool);
    }
    let body = match body_or_error(body, ep.max_body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let user = match user_of(&ep, &principal, &headers, None) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let permit = match admit_user(&ep, &principal, &user) {
        Ok(p) => p,
        Err(r) => return r,
    };
    holding(
        proxy_answer(&ep, &principal, pool, path, method, uri, headers, body, user).await,
        permit,
    )
}

#[allow(clippy::too_many_arguments)]
async fn proxy_answer(
    ep: &Endpoint,
    principal: &Principal,
    pool: String,
    path: String,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
    user: String,
) -> Response {
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
        reach: principal.reach(),
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
        Ok(a) if (300..400).contains(&a.status) => redirect_refused(a.status),
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
