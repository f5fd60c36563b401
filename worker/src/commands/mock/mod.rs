//! `keypool-worker mock-provider`: a local stand-in for OpenAI, Gemini, Anthropic and a SERP-like
//! API, so that the demo, the tests and the benchmarks run without any real provider.
//!
//! Chat in three formats (OpenAI's `chat/completions`, Gemini's `generateContent` and
//! `streamGenerateContent`, Anthropic's `messages`; `openai`, `gemini`, `anthropic`), each read
//! into one provider-neutral question whose answer is decided once (`script`): plain text, tool
//! calls and answers that quote tool results, JSON that follows a requested schema, reasoning
//! tokens when reasoning is asked for; streamed and not. Usage: prompt tokens are the prompt
//! text's characters divided by four (rounded up), output tokens the reply's words (a tool
//! call's JSON / 4), reasoning apart. Each format checks what its provider checks: tool results
//! answering calls of the turn before, Gemini 3's thought signatures on function calls, Anthropic's
//! tool ids and signed thinking before a tool use, thinking budgets.
//!
//! OpenAI's Responses API (`/v1/responses`, stateless) answers the same way, for apps and
//! gateways that pass it through to OpenAI.
//!
//! Embeddings (`/v1/embeddings`, Gemini's `:batchEmbedContents`) are 8 numbers (or
//! `dimensions`) derived from each input's text; OpenAI-style answers report prompt tokens.
//!
//! Failures, by the key's secret (always on): a secret containing `invalid` is rejected (401, or
//! Gemini's 400 API_KEY_INVALID), `ratelimited` gets 429 with a retry delay, `daily` a per-day
//! quota 429, `broke` a billing error, `down` a 503, `hang` no answer at all. And injected at
//! run time through the control API:
//!
//! - `POST /_mock/faults` `{"match": "<part of a secret, or *>", "fault": "429" | "daily" |
//!   "401" | "403" | "billing" | "400" | "500" | "503" | "529" | "hang" | "redirect",
//!   "times": <n, default unlimited>, "retry_after_s": <seconds, default 30>,
//!   "location": "<URL a redirect points to>", "path": "<part of the path it applies to>"}`
//! - `DELETE /_mock/faults`, `POST /_mock/reset` (faults and counters)
//! - `POST /_mock/ratelimit {"x-ratelimit-remaining-requests": "0", ...}`: headers every answer
//!   carries from now on (a provider's report of the key's own limits); `DELETE` stops it
//! - `GET /_mock/stats`: requests in total and per key (masked), `GET /_mock/requests`: the last
//!   100 requests (path, wire, masked key, body)
//!
//! With `--issued-keys-only`, the mock accepts only the keys it issued (`--issue KEY`, or
//! `POST /_mock/keys {"issue": "<secret>"}`) and rejects any other key as a real provider
//! does (401, Gemini's API_KEY_INVALID), model lists included.
//!
//! With `--call-log FILE`, every call with a key is appended to FILE as one JSON line:
//! `{"at_ms", "key" (masked), "granted_at_ms" (the worker's X-Keypool-Granted-At, or null),
//! "fault" (null, or what was injected), "path"}`: the soak's record of what reached the
//! provider.

// Handlers return early with a ready HTTP answer; boxing it would only add noise.
#![allow(clippy::result_large_err)]

mod anthropic;
mod gemini;
mod openai;
mod responses;
mod script;

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::MockArgs;
use keypool_mask::mask;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wire {
    OpenAi,
    Gemini,
    Anthropic,
    Serp,
}

impl Wire {
    fn name(self) -> &'static str {
        match self {
            Wire::OpenAi => "openai",
            Wire::Gemini => "gemini",
            Wire::Anthropic => "anthropic",
            Wire::Serp => "serp",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FaultKind {
    RateLimited,
    DailyQuota,
    InvalidKey,
    Forbidden,
    Billing,
    CallerError,
    Status(u16),
    Hang,
    /// 307 to the fault's `location`.
    Redirect,
}

impl FaultKind {
    fn parse(s: &str) -> Option<FaultKind> {
        Some(match s {
            "429" | "rate_limit" | "rate_limited" => FaultKind::RateLimited,
            "daily" | "daily_quota" => FaultKind::DailyQuota,
            "401" | "invalid" | "invalid_key" => FaultKind::InvalidKey,
            "403" | "forbidden" => FaultKind::Forbidden,
            "redirect" | "307" => FaultKind::Redirect,
            "billing" | "402" => FaultKind::Billing,
            "400" | "caller_error" => FaultKind::CallerError,
            "hang" => FaultKind::Hang,
            n => match n.parse::<u16>() {
                Ok(code) if (500..600).contains(&code) => FaultKind::Status(code),
                _ => return None,
            },
        })
    }
}

struct Fault {
    matches: String,
    kind: FaultKind,
    remaining: Option<u64>,
    retry_after_s: f64,
    location: Option<String>,
    path: Option<String>,
}

/// An error answer in `wire`'s shape for a request the mock refuses as its provider would.
fn invalid(wire: Wire, message: &str) -> Response {
    let body = match wire {
        Wire::Gemini => json!({"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}}),
        Wire::Anthropic => json!({"type": "error", "error": {"type": "invalid_request_error", "message": message}}),
        Wire::OpenAi | Wire::Serp => {
            json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}})
        }
    };
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

/// The failure a request gets.
struct Injected {
    kind: FaultKind,
    retry_after_s: f64,
    location: Option<String>,
}

/// How requests without a key are counted (`--keyless`).
pub const NO_KEY: &str = "(no key)";

struct Mock {
    latency: Duration,
    stream_delay: Duration,
    reply_words: usize,
    faults: Mutex<Vec<Fault>>,
    requests: AtomicU64,
    next_id: AtomicU64,
    by_key: Mutex<HashMap<String, u64>>,
    recent: Mutex<VecDeque<Value>>,
    call_log: Option<Mutex<std::fs::File>>,
    /// Requests without a key are served (a local server), not refused.
    keyless: bool,
    /// With `--issued-keys-only`: the keys this provider issued (`--issue`, `POST /_mock/keys`);
    /// any other key is rejected as a real provider rejects a key it never issued.
    issued: Option<Mutex<std::collections::HashSet<String>>>,
    /// Headers every model answer carries (`POST /_mock/ratelimit`): a provider's report of the
    /// key's own limits, such as `x-ratelimit-remaining-requests`.
    ratelimit: Mutex<Vec<(String, String)>>,
}

type Shared = Arc<Mock>;

impl Mock {
    /// Counts the request and says which failure, if any, it gets.
    fn admit(&self, wire: Wire, path: &str, secret: &str, body: &Value, headers: &HeaderMap) -> Option<Injected> {
        let injected = self.inject(wire, path, secret, body);
        if let Some(log) = &self.call_log {
            let granted_at: Option<i64> = header(headers, "x-keypool-granted-at").and_then(|v| v.parse().ok());
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            let line = json!({
                "at_ms": now_ms,
                "key": if secret.is_empty() { NO_KEY.to_string() } else { mask(secret) },
                "granted_at_ms": granted_at,
                "fault": injected.as_ref().map(|i| format!("{:?}", i.kind)),
                "path": path,
            })
            .to_string()
                + "\n";
            if let Ok(mut f) = log.lock() {
                let _ = f.write_all(line.as_bytes());
            }
        }
        injected
    }

    fn inject(&self, wire: Wire, path: &str, secret: &str, body: &Value) -> Option<Injected> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let label = if secret.is_empty() {
            NO_KEY.to_string()
        } else {
            mask(secret)
        };
        if let Ok(mut m) = self.by_key.lock() {
            *m.entry(label.clone()).or_default() += 1;
        }
        if let Ok(mut r) = self.recent.lock() {
            if r.len() >= 100 {
                r.pop_front();
            }
            r.push_back(json!({"wire": wire.name(), "path": path, "key": label, "body": body}));
        }
        for (pattern, kind) in [
            ("invalid", FaultKind::InvalidKey),
            ("ratelimited", FaultKind::RateLimited),
            ("daily", FaultKind::DailyQuota),
            ("broke", FaultKind::Billing),
            ("down", FaultKind::Status(503)),
            ("hang", FaultKind::Hang),
        ] {
            if secret.contains(pattern) {
                return Some(Injected {
                    kind,
                    retry_after_s: 30.0,
                    location: None,
                });
            }
        }
        let mut faults = self.faults.lock().ok()?;
        let i = faults.iter().position(|f| {
            f.remaining != Some(0)
                && (f.matches == "*" || secret.contains(&f.matches))
                && f.path.as_deref().is_none_or(|p| path.contains(p))
        })?;
        let f = &mut faults[i];
        if let Some(n) = f.remaining.as_mut() {
            *n -= 1;
        }
        Some(Injected {
            kind: f.kind,
            retry_after_s: f.retry_after_s,
            location: f.location.clone(),
        })
    }
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string)
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

async fn pause(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

fn sse_body(events: Vec<String>, delay: Duration) -> Response {
    let stream = futures_util::stream::unfold((events.into_iter(), delay, true), |(mut it, delay, first)| async move {
        let next = it.next()?;
        if !first {
            pause(delay).await;
        }
        Some((Ok::<_, std::io::Error>(Bytes::from(next)), (it, delay, false)))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut()
        .insert("content-type", "text/event-stream".parse().expect("static header"));
    resp
}

fn failure(wire: Wire, kind: FaultKind, retry_after_s: f64, secret: &str) -> Response {
    let retry = format!("{retry_after_s}");
    let (status, body, retry_header): (u16, Value, bool) = match (wire, kind) {
        (_, FaultKind::Hang | FaultKind::Redirect) => unreachable!("handled by the caller"),
        (Wire::OpenAi, FaultKind::Forbidden) => (
            403,
            json!({"error": {"message": "Project does not have access to this endpoint.", "type": "invalid_request_error", "param": null, "code": "model_not_found"}}),
            false,
        ),
        (Wire::Gemini, FaultKind::Forbidden) => (
            403,
            json!({"error": {"code": 403, "message": "Method doesn't allow unregistered callers.", "status": "PERMISSION_DENIED"}}),
            false,
        ),
        (Wire::Anthropic, FaultKind::Forbidden) => (
            403,
            json!({"type": "error", "error": {"type": "permission_error", "message": "Your API key does not have permission to use the specified resource."}}),
            false,
        ),
        (Wire::Serp, FaultKind::Forbidden) => (403, json!({"error": "Forbidden."}), false),
        (Wire::OpenAi, FaultKind::RateLimited) | (Wire::OpenAi, FaultKind::DailyQuota) => (
            429,
            json!({"error": {"message": "Rate limit reached for requests", "type": "requests", "param": null, "code": "rate_limit_exceeded"}}),
            true,
        ),
        (Wire::OpenAi, FaultKind::InvalidKey) => (
            401,
            json!({"error": {"message": format!("Incorrect API key provided: {secret}."), "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}}),
            false,
        ),
        (Wire::OpenAi, FaultKind::Billing) => (
            429,
            json!({"error": {"message": "You exceeded your current quota, please check your plan and billing details.", "type": "insufficient_quota", "param": null, "code": "insufficient_quota"}}),
            false,
        ),
        (Wire::OpenAi, FaultKind::CallerError) => (
            400,
            json!({"error": {"message": "This model's maximum context length is 128000 tokens.", "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}),
            false,
        ),
        (Wire::OpenAi, FaultKind::Status(s)) => (
            s,
            json!({"error": {"message": "The server is overloaded or not ready yet.", "type": "server_error", "param": null, "code": null}}),
            false,
        ),
        (Wire::Gemini, FaultKind::RateLimited) | (Wire::Gemini, FaultKind::DailyQuota) => {
            let quota = if kind == FaultKind::DailyQuota {
                "GenerateRequestsPerDayPerProjectPerModel-FreeTier"
            } else {
                "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
            };
            (
                429,
                json!({"error": {"code": 429, "message": "You exceeded your current quota.", "status": "RESOURCE_EXHAUSTED",
                "details": [
                    {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests", "quotaId": quota}]},
                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": format!("{retry}s")}
                ]}}),
                false,
            )
        }
        (Wire::Gemini, FaultKind::InvalidKey) => (
            400,
            json!({"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.", "status": "INVALID_ARGUMENT",
                "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]}}),
            false,
        ),
        (Wire::Gemini, FaultKind::Billing) => (
            400,
            json!({"error": {"code": 400, "message": "User location is not supported for the API use without a billing account linked.", "status": "FAILED_PRECONDITION"}}),
            false,
        ),
        (Wire::Gemini, FaultKind::CallerError) => (
            400,
            json!({"error": {"code": 400, "message": "Request contains an invalid argument.", "status": "INVALID_ARGUMENT"}}),
            false,
        ),
        (Wire::Gemini, FaultKind::Status(s)) => (
            s,
            json!({"error": {"code": s, "message": "The model is overloaded. Please try again later.", "status": "UNAVAILABLE"}}),
            false,
        ),
        (Wire::Anthropic, FaultKind::RateLimited) | (Wire::Anthropic, FaultKind::DailyQuota) => (
            429,
            json!({"type": "error", "error": {"type": "rate_limit_error", "message": "Number of requests has exceeded your rate limit."}}),
            true,
        ),
        (Wire::Anthropic, FaultKind::InvalidKey) => (
            401,
            json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}),
            false,
        ),
        (Wire::Anthropic, FaultKind::Billing) => (
            402,
            json!({"type": "error", "error": {"type": "billing_error", "message": "Your credit balance is too low."}}),
            false,
        ),
        (Wire::Anthropic, FaultKind::CallerError) => (
            400,
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": "prompt is too long"}}),
            false,
        ),
        (Wire::Anthropic, FaultKind::Status(s)) => (
            s,
            json!({"type": "error", "error": {"type": if s == 529 { "overloaded_error" } else { "api_error" }, "message": "Overloaded"}}),
            false,
        ),
        (Wire::Serp, FaultKind::RateLimited) | (Wire::Serp, FaultKind::DailyQuota) => {
            (429, json!({"error": "Your account has run out of searches."}), true)
        }
        (Wire::Serp, FaultKind::InvalidKey) => (401, json!({"error": "Invalid API key."}), false),
        (Wire::Serp, FaultKind::Billing) => (402, json!({"error": "Payment required."}), false),
        (Wire::Serp, FaultKind::CallerError) => (400, json!({"error": "Missing query `q` parameter."}), false),
        (Wire::Serp, FaultKind::Status(s)) => (s, json!({"error": "Internal error."}), false),
    };
    let mut resp = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(body),
    )
        .into_response();
    if retry_header {
        if let Ok(v) = retry.parse() {
            resp.headers_mut().insert("retry-after", v);
        }
        if wire == Wire::OpenAi {
            if let Ok(v) = format!("{retry}s").parse() {
                resp.headers_mut().insert("x-ratelimit-reset-requests", v);
            }
        }
    }
    resp
}

fn missing_key(wire: Wire) -> Response {
    failure(wire, FaultKind::InvalidKey, 0.0, "")
}

/// Common start of every provider call: latency, counting, faults.
/// Requests are counted when they arrive, before the configured latency.
async fn start(
    mock: &Mock,
    wire: Wire,
    path: &str,
    secret: Option<String>,
    body: &Value,
    headers: &HeaderMap,
) -> Result<String, Response> {
    let secret = match secret.filter(|s| !s.is_empty()) {
        Some(s) => s,
        None if mock.keyless && wire == Wire::OpenAi => String::new(),
        None => {
            mock.requests.fetch_add(1, Ordering::Relaxed);
            pause(mock.latency).await;
            return Err(missing_key(wire));
        }
    };
    if let Some(issued) = &mock.issued {
        if !secret.is_empty() && !issued.lock().is_ok_and(|k| k.contains(&secret)) {
            mock.admit(wire, path, &secret, body, headers);
            pause(mock.latency).await;
            return Err(failure(wire, FaultKind::InvalidKey, 0.0, &secret));
        }
    }
    let fault = mock.admit(wire, path, &secret, body, headers);
    pause(mock.latency).await;
    if let Some(f) = fault {
        match f.kind {
            FaultKind::Hang => tokio::time::sleep(Duration::from_secs(3600)).await,
            FaultKind::Redirect => {
                let mut resp = StatusCode::TEMPORARY_REDIRECT.into_response();
                if let Some(v) = f.location.and_then(|l| l.parse().ok()) {
                    resp.headers_mut().insert("location", v);
                }
                return Err(resp);
            }
            _ => {}
        }
        return Err(failure(wire, f.kind, f.retry_after_s, &secret));
    }
    Ok(secret)
}

fn parse_json(body: &Bytes) -> Result<Value, Response> {
    serde_json::from_slice(body).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"message": format!("invalid JSON: {e}"), "type": "invalid_request_error", "code": null}})),
        )
            .into_response()
    })
}

fn embedding_of(text: &str, dims: usize) -> Vec<f64> {
    (0..dims)
        .map(|i| {
            // FNV-1a over the text and the position.
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in text.bytes().chain((i as u64).to_le_bytes()) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            ((h % 20_001) as f64 - 10_000.0) / 10_000.0
        })
        .collect()
}

fn mock_dims(req: &Value, field: &str) -> usize {
    req.get(field)
        .and_then(Value::as_u64)
        .map_or(8, |d| d.clamp(1, 4096) as usize)
}

async fn serp_search(
    State(mock): State<Shared>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    RawQuery(raw): RawQuery,
    uri: axum::http::Uri,
) -> Response {
    let key = query
        .get("api_key")
        .cloned()
        .or_else(|| header(&headers, "x-api-key"))
        .or_else(|| bearer(&headers));
    let q = query.get("q").cloned().unwrap_or_default();
    if let Err(r) = start(&mock, Wire::Serp, uri.path(), key, &json!({"q": q}), &headers).await {
        return r;
    }
    // Like APIs that echo the request they served, the query string as it arrived (with the
    // key in it when it came that way: the worker must scrub it, in every encoding).
    Json(json!({
        "search_metadata": {"raw_query": raw.unwrap_or_default()},
        "search_parameters": {"q": q},
        "organic_results": [
            {"position": 1, "title": format!("Mock result for {q}"), "link": "https://example.com/1"},
            {"position": 2, "title": "Another mock result", "link": "https://example.com/2"}
        ]
    }))
    .into_response()
}

#[derive(Deserialize)]
struct FaultRequest {
    #[serde(rename = "match")]
    matches: String,
    fault: String,
    times: Option<u64>,
    retry_after_s: Option<f64>,
    location: Option<String>,
    /// Only calls whose path contains this get the fault (say, `chat/completions` and not the
    /// model list).
    path: Option<String>,
}

async fn add_fault(State(mock): State<Shared>, Json(f): Json<FaultRequest>) -> Response {
    let Some(kind) = FaultKind::parse(&f.fault) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "fault must be one of 429, daily, 401, 403, billing, 400, 5xx, hang, redirect"})),
        )
            .into_response();
    };
    if kind == FaultKind::Redirect && f.location.is_none() {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "a redirect needs a `location`"})),
        )
            .into_response();
    }
    if let Ok(mut faults) = mock.faults.lock() {
        faults.push(Fault {
            matches: f.matches,
            kind,
            remaining: f.times,
            retry_after_s: f.retry_after_s.unwrap_or(30.0).clamp(0.0, 86400.0),
            location: f.location,
            path: f.path,
        });
    }
    Json(json!({"ok": true})).into_response()
}

async fn clear_faults(State(mock): State<Shared>) -> Response {
    if let Ok(mut f) = mock.faults.lock() {
        f.clear();
    }
    Json(json!({"ok": true})).into_response()
}

async fn reset(State(mock): State<Shared>) -> Response {
    if let Ok(mut f) = mock.faults.lock() {
        f.clear();
    }
    if let Ok(mut m) = mock.by_key.lock() {
        m.clear();
    }
    if let Ok(mut r) = mock.recent.lock() {
        r.clear();
    }
    mock.requests.store(0, Ordering::Relaxed);
    Json(json!({"ok": true})).into_response()
}

#[derive(Deserialize)]
struct IssueBody {
    issue: String,
}

/// `POST /_mock/keys {"issue": "<secret>"}`: a key this provider now accepts
/// (`--issued-keys-only`).
async fn issue_key(State(mock): State<Shared>, Json(b): Json<IssueBody>) -> Response {
    match &mock.issued {
        Some(issued) => {
            if let Ok(mut k) = issued.lock() {
                k.insert(b.issue);
            }
            Json(json!({"ok": true})).into_response()
        }
        None => (
            StatusCode::CONFLICT,
            Json(json!({"error": "start the mock with --issued-keys-only to issue keys"})),
        )
            .into_response(),
    }
}

async fn stats(State(mock): State<Shared>) -> Response {
    let by_key = mock.by_key.lock().map(|m| m.clone()).unwrap_or_default();
    Json(json!({"requests": mock.requests.load(Ordering::Relaxed), "by_key": by_key})).into_response()
}

async fn recent(State(mock): State<Shared>) -> Response {
    let list: Vec<Value> = mock
        .recent
        .lock()
        .map(|r| r.iter().cloned().collect())
        .unwrap_or_default();
    Json(Value::Array(list)).into_response()
}

pub fn router(args: &MockArgs) -> Router {
    let mock = Arc::new(Mock {
        latency: args.latency,
        stream_delay: args.stream_delay,
        reply_words: args.reply_words.max(1),
        faults: Mutex::new(Vec::new()),
        requests: AtomicU64::new(0),
        next_id: AtomicU64::new(1),
        by_key: Mutex::new(HashMap::new()),
        recent: Mutex::new(VecDeque::new()),
        keyless: args.keyless,
        ratelimit: Mutex::new(Vec::new()),
        issued: args
            .issued_keys_only
            .then(|| Mutex::new(args.issue.iter().cloned().collect())),
        call_log: args.call_log.as_ref().and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map(Mutex::new)
                .ok()
        }),
    });
    Router::new()
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1beta/openai/chat/completions", post(openai::chat))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/images/generations", post(openai::images))
        .route("/v1beta/openai/embeddings", post(openai::embeddings))
        .route("/v1/models", get(openai::models))
        .route("/v1beta/openai/models", get(openai::models))
        .route("/v1beta/models", get(gemini::models))
        .route("/v1beta/models/{action}", post(gemini::generate))
        .route("/v1/responses", post(responses::responses))
        .route("/v1/messages", post(anthropic::messages))
        .route("/search", get(serp_search).post(serp_search))
        // The same API under a path: a base URL with a path, for tests of proxy paths.
        .route("/api/search", get(serp_search).post(serp_search))
        .route("/_mock/faults", post(add_fault).delete(clear_faults))
        .route("/_mock/reset", post(reset))
        .route("/_mock/stats", get(stats))
        .route("/_mock/requests", get(recent))
        .route("/_mock/keys", post(issue_key))
        .route("/_mock/ratelimit", post(set_ratelimit).delete(clear_ratelimit))
        .layer(axum::middleware::map_response_with_state(
            mock.clone(),
            ratelimit_headers,
        ))
        .with_state(mock)
}

/// `POST /_mock/ratelimit {"<header>": "<value>", ...}`: every model answer from now on
/// carries these headers (a provider's report of the key's limits); `DELETE` stops it.
async fn set_ratelimit(State(mock): State<Shared>, Json(h): Json<HashMap<String, String>>) -> Response {
    let valid = h.iter().all(|(k, v)| {
        k.starts_with("x-ratelimit-") || k.starts_with("anthropic-ratelimit-")
    } && axum::http::HeaderValue::from_str(v).is_ok());
    if !valid {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "only x-ratelimit-* and anthropic-ratelimit-* headers with valid values"})),
        )
            .into_response();
    }
    if let Ok(mut r) = mock.ratelimit.lock() {
        *r = h.into_iter().collect();
    }
    Json(json!({"ok": true})).into_response()
}

async fn clear_ratelimit(State(mock): State<Shared>) -> Response {
    if let Ok(mut r) = mock.ratelimit.lock() {
        r.clear();
    }
    Json(json!({"ok": true})).into_response()
}

/// Adds the configured rate-limit headers to the answers of model routes.
async fn ratelimit_headers(State(mock): State<Shared>, mut response: Response) -> Response {
    let pairs = mock.ratelimit.lock().map(|r| r.clone()).unwrap_or_default();
    for (k, v) in pairs {
        if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::from_bytes(k.as_bytes()),
            axum::http::HeaderValue::from_str(&v),
        ) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

pub async fn run(args: MockArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr()?;
    // Tests and scripts read this line to learn the port.
    println!("mock-provider listening on http://{addr}");
    let _ = std::io::stdout().flush();
    let app = router(&args);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
