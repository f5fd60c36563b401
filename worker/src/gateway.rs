//! One request's way through the pool: reserve a key, call its provider, settle what happened,
//! and try another key when the extension's outcome class says the key (not the request) was
//! the problem, within the attempt limit and the request's deadline.
//!
//! Which answers are retried is not decided here: `keypool_settle` classifies every error
//! answer and applies its consequence (cooldown until Retry-After, disabled key, tripped
//! breaker); the worker retries `rate_limited`, `daily_quota`, `key_invalid`, `billing` and
//! `server_error`, and returns `caller_error` and `other` to the caller untouched. Successes are
//! settled in the background (their class is known), everything else at once.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{BoxStream, Stream, StreamExt};
use reqwest::header::HeaderMap;
use tracing::{info, warn};

use crate::db::{Allocation, Db, DbError, Refusal, Reserved, Settlement};
use crate::metrics::Metrics;
use crate::openai::{self, ChatRequest, Usage};
use crate::providers::{self, KeyRef, ProviderError, Translate, Wire};
use crate::sse;

/// Counters reported in heartbeats.
#[derive(Default)]
pub struct Stats {
    pub served: AtomicU64,
    pub failed: AtomicU64,
    pub queue_done: AtomicU64,
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub provider_timeout: Duration,
    pub max_attempts: u32,
    pub default_max_tokens: u32,
}

/// A chat request on its way.
pub struct ChatJob {
    pub user: String,
    pub pool: String,
    pub request: ChatRequest,
    pub stream: bool,
    pub deadline: Instant,
    /// How long to wait for capacity when the pool is exhausted before answering with the
    /// refusal.
    pub capacity_wait: Duration,
}

/// Which key served a request, and the user's share afterwards.
#[derive(Clone, Debug)]
pub struct Served {
    pub key_id: i64,
    pub key_label: String,
    pub provider: String,
    pub attempts: u32,
    pub allocation: Allocation,
}

pub enum Answer {
    /// An OpenAI `chat.completion` body.
    Complete { body: Bytes, served: Served },
    /// OpenAI stream events, passed on as they come.
    Stream {
        events: BoxStream<'static, Result<Bytes, std::io::Error>>,
        served: Served,
    },
}

#[derive(Debug)]
pub enum Failure {
    /// The extension refused: QUOTA_EXCEEDED, POOL_EXHAUSTED, NO_KEYS. `after` says what the
    /// earlier attempts ran into, if there were any.
    Refused {
        refusal: Refusal,
        attempts: u32,
        after: Option<String>,
    },
    /// The request itself is wrong (before any provider saw it).
    Caller(String),
    /// No such pool.
    UnknownPool(String),
    /// The provider answered with an error that is the caller's (or nobody's) to fix; passed on.
    Provider {
        status: u16,
        error: ProviderError,
        outcome: String,
        key_id: i64,
        key_label: String,
        attempts: u32,
    },
    /// Every attempt failed on the provider side, or the deadline passed.
    Exhausted {
        last: String,
        attempts: u32,
        retry_after_ms: Option<i64>,
        timed_out: bool,
    },
    Database(DbError),
}

impl Failure {
    fn from_db(e: DbError, pool: &str) -> Failure {
        if e.is_undefined() {
            Failure::UnknownPool(pool.to_string())
        } else if e.is_invalid_input() {
            Failure::Caller(e.message)
        } else {
            Failure::Database(e)
        }
    }

    /// A one-line description for logs and the queue's error column.
    pub fn describe(&self) -> String {
        match self {
            Failure::Refused { refusal, after, .. } => {
                let mut s = refusal.code.clone();
                if let Some(ms) = refusal.retry_after_ms {
                    s.push_str(&format!(" (retry after {ms} ms)"));
                }
                if let Some(a) = after {
                    s.push_str(&format!(" after: {a}"));
                }
                s
            }
            Failure::Caller(m) => format!("invalid request: {m}"),
            Failure::UnknownPool(p) => format!("pool \"{p}\" does not exist"),
            Failure::Provider {
                status,
                error,
                key_id,
                key_label,
                ..
            } => format!(
                "provider answered HTTP {status} {} on key {key_id} ({key_label}): {}",
                error.code.as_deref().unwrap_or(""),
                error.message
            ),
            Failure::Exhausted { last, attempts, .. } => format!("gave up after {attempts} attempts: {last}"),
            Failure::Database(e) => format!("database: {e}"),
        }
    }
}

/// Outcome classes after which another key may well succeed.
fn worth_another_key(outcome: &str) -> bool {
    matches!(
        outcome,
        "rate_limited" | "daily_quota" | "key_invalid" | "billing" | "server_error"
    )
}

pub struct Gateway {
    pub db: Db,
    pub http: reqwest::Client,
    pub settings: Settings,
    pub stats: Arc<Stats>,
    pub metrics: Arc<Metrics>,
}

/// A reservation whose call went out; settled as "the caller went away" (HTTP 499, no penalty
/// for the key) if nothing else settles it, e.g. when the app disconnects mid-call.
struct Held {
    db: Db,
    reservation_id: i64,
    usage: Usage,
    armed: bool,
}

impl Held {
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.armed {
            self.db.settle_later(Settlement {
                reservation_id: self.reservation_id,
                status: 499,
                usage: self.usage,
                retry_after_ms: None,
                error_code: Some("client_closed_request".into()),
            });
        }
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

impl Gateway {
    pub fn new(db: Db, settings: Settings) -> anyhow::Result<Gateway> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .user_agent(concat!("keypool-worker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the HTTP client: {e}"))?;
        Ok(Gateway {
            db,
            http,
            settings,
            stats: Arc::new(Stats::default()),
            metrics: Arc::new(Metrics::default()),
        })
    }

    /// Reserves; waits for capacity within `capacity_wait` when the pool is exhausted.
    async fn reserve(
        &self,
        user: &str,
        pool: &str,
        est: i64,
        deadline: Instant,
        capacity_wait: Duration,
        waited: &mut Duration,
    ) -> Result<Result<crate::db::Grant, Refusal>, Failure> {
        loop {
            match self.db.reserve(user, pool, est).await {
                Ok(Reserved::Granted(g)) => return Ok(Ok(g)),
                Ok(Reserved::Refused(r)) => {
                    if r.code == "POOL_EXHAUSTED" {
                        if let Some(ms) = r.retry_after_ms {
                            let wait = Duration::from_millis(ms.max(1) as u64);
                            if *waited + wait <= capacity_wait && wait < remaining(deadline) {
                                tokio::time::sleep(wait).await;
                                *waited += wait;
                                continue;
                            }
                        }
                    }
                    self.metrics.refusal(pool, &r.code);
                    return Ok(Err(r));
                }
                Err(e) => return Err(Failure::from_db(e, pool)),
            }
        }
    }

    /// Carries out a chat request.
    pub async fn chat(&self, job: ChatJob) -> Result<Answer, Failure> {
        let started = Instant::now();
        let result = self.chat_inner(&job, started).await;
        if result.is_err() {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn chat_inner(&self, job: &ChatJob, started: Instant) -> Result<Answer, Failure> {
        let est = job.request.estimate_tokens(self.settings.default_max_tokens);
        let prompt_est = job.request.estimate_prompt_tokens();
        let mut attempts = 0u32;
        let mut waited = Duration::ZERO;
        let mut last: Option<(String, Option<i64>)> = None;
        loop {
            if Instant::now() >= job.deadline {
                return Err(Failure::Exhausted {
                    last: last
                        .map(|l| l.0)
                        .unwrap_or_else(|| "no attempt fitted in the deadline".into()),
                    attempts,
                    retry_after_ms: None,
                    timed_out: true,
                });
            }
            let grant = match self
                .reserve(&job.user, &job.pool, est, job.deadline, job.capacity_wait, &mut waited)
                .await?
            {
                Ok(g) => g,
                Err(refusal) => {
                    return Err(Failure::Refused {
                        refusal,
                        attempts,
                        after: last.map(|l| l.0),
                    })
                }
            };
            attempts += 1;
            let key = grant.key;
            let builder = match providers::chat_request(
                &self.http,
                &key,
                &job.request,
                job.stream,
                self.settings.default_max_tokens,
            ) {
                Ok(b) => b,
                Err(msg) => {
                    // Never sent: give the capacity back.
                    if let Err(e) = self.db.release(grant.reservation_id).await {
                        warn!(reservation = grant.reservation_id, error = %e, "release failed");
                    }
                    return Err(Failure::Caller(msg));
                }
            };
            let mut held = Held {
                db: self.db.clone(),
                reservation_id: grant.reservation_id,
                usage: Usage {
                    prompt_tokens: prompt_est,
                    completion_tokens: 0,
                },
                armed: true,
            };
            let call_timeout = self.settings.provider_timeout.min(remaining(job.deadline));
            let sent_at = Instant::now();
            let sent = tokio::time::timeout(call_timeout, builder.send()).await;
            let took = sent_at.elapsed();
            let response = match sent {
                Ok(Ok(r)) => r,
                Ok(Err(_)) | Err(_) => {
                    let class = if sent.is_err() { "timeout" } else { "unreachable" };
                    let why = match sent {
                        Err(_) => format!("no answer within {} ms", call_timeout.as_millis()),
                        Ok(Err(e)) => format!("connection failed: {}", without_url(&e)),
                        Ok(Ok(_)) => unreachable!(),
                    };
                    held.disarm();
                    let outcome = self
                        .settle_now(grant.reservation_id, 0, held.usage, None, None)
                        .await
                        .map_err(|e| Failure::from_db(e, &job.pool))?;
                    self.metrics.provider_call(&job.pool, &key.provider, class, took);
                    warn!(user = %job.user, pool = %job.pool, key_id = key.id, key = %key.label, provider = %key.provider, attempt = attempts,
                          outcome = %outcome, "{why}; trying another key");
                    last = Some((format!("key {} ({}): {why}", key.id, key.label), None));
                    if attempts >= self.settings.max_attempts {
                        return Err(exhausted(last, attempts));
                    }
                    continue;
                }
            };
            let status = response.status().as_u16();
            if response.status().is_success() {
                self.metrics.provider_call(&job.pool, &key.provider, "success", took);
                let served = Served {
                    key_id: key.id,
                    key_label: key.label.clone(),
                    provider: key.provider.clone(),
                    attempts,
                    allocation: grant.allocation,
                };
                let shown_model = key
                    .model
                    .clone()
                    .or_else(|| job.request.model().map(str::to_string))
                    .unwrap_or_else(|| job.pool.clone());
                if job.stream {
                    let translator = providers::stream_translator(&key, &shown_model, job.request.wants_stream_usage());
                    let events = relay(
                        response,
                        translator,
                        held,
                        self.settings.provider_timeout,
                        StreamLog {
                            user: job.user.clone(),
                            pool: job.pool.clone(),
                            key_id: key.id,
                            key_label: key.label.clone(),
                            provider: key.provider.clone(),
                            attempts,
                            started,
                            stats: self.stats.clone(),
                        },
                    );
                    return Ok(Answer::Stream { events, served });
                }
                let body = match tokio::time::timeout(remaining(job.deadline), response.bytes()).await {
                    Ok(Ok(b)) => b,
                    _ => {
                        held.disarm();
                        self.db.settle_later(Settlement {
                            reservation_id: grant.reservation_id,
                            status: status as i32,
                            usage: held.usage,
                            retry_after_ms: None,
                            error_code: None,
                        });
                        return Err(Failure::Exhausted {
                            last: format!("key {} ({}): the answer broke off", key.id, key.label),
                            attempts,
                            retry_after_ms: None,
                            timed_out: false,
                        });
                    }
                };
                held.disarm();
                let completion = providers::read_completion(&key, body, &shown_model);
                let usage = match &completion {
                    Ok(c) => c.usage.unwrap_or(Usage {
                        prompt_tokens: prompt_est,
                        completion_tokens: openai::count_tokens(c.generated_chars),
                    }),
                    Err(_) => held.usage,
                };
                self.db.settle_later(Settlement {
                    reservation_id: grant.reservation_id,
                    status: status as i32,
                    usage,
                    retry_after_ms: None,
                    error_code: None,
                });
                let completion = completion.map_err(|msg| Failure::Exhausted {
                    last: format!("key {} ({}): {msg}", key.id, key.label),
                    attempts,
                    retry_after_ms: None,
                    timed_out: false,
                })?;
                self.stats.served.fetch_add(1, Ordering::Relaxed);
                info!(user = %job.user, pool = %job.pool, key_id = key.id, key = %key.label, provider = %key.provider,
                      status, attempts, prompt_tokens = usage.prompt_tokens, completion_tokens = usage.completion_tokens,
                      ms = started.elapsed().as_millis() as u64, "served");
                return Ok(Answer::Complete {
                    body: completion.body,
                    served,
                });
            }

            // An error answer: the extension says what it means.
            let headers = response.headers().clone();
            let body = tokio::time::timeout(Duration::from_secs(5).min(remaining(job.deadline)), response.bytes())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            let error = providers::read_error(&key, status, &headers, &body);
            held.disarm();
            let outcome = self
                .settle_now(
                    grant.reservation_id,
                    status as i32,
                    Usage::default(),
                    error.retry_after_ms,
                    error.code.clone(),
                )
                .await
                .map_err(|e| Failure::from_db(e, &job.pool))?;
            self.metrics.provider_call(&job.pool, &key.provider, &outcome, took);
            if !worth_another_key(&outcome) {
                return Err(Failure::Provider {
                    status,
                    error,
                    outcome,
                    key_id: key.id,
                    key_label: key.label,
                    attempts,
                });
            }
            warn!(user = %job.user, pool = %job.pool, key_id = key.id, key = %key.label, provider = %key.provider, status, code = error.code.as_deref().unwrap_or(""),
                  outcome = %outcome, attempt = attempts, "provider refused; trying another key");
            let retry_after = (outcome == "rate_limited").then_some(error.retry_after_ms).flatten();
            last = Some((
                format!(
                    "key {} ({}): HTTP {status} {} ({outcome}): {}",
                    key.id,
                    key.label,
                    error.code.as_deref().unwrap_or(""),
                    error.message
                ),
                retry_after,
            ));
            if attempts >= self.settings.max_attempts {
                return Err(exhausted(last, attempts));
            }
            if outcome == "server_error" {
                // Provider trouble: a short pause before the next key.
                let pause = Duration::from_millis(50 << attempts.min(5)).min(remaining(job.deadline));
                tokio::time::sleep(pause).await;
            }
        }
    }

    async fn settle_now(
        &self,
        reservation_id: i64,
        status: i32,
        usage: Usage,
        retry_after_ms: Option<i64>,
        error_code: Option<String>,
    ) -> Result<String, DbError> {
        self.db
            .settle(&Settlement {
                reservation_id,
                status,
                usage,
                retry_after_ms,
                error_code: error_code.map(|c| c.chars().take(200).collect()),
            })
            .await
    }

    /// Forwards a plain HTTP request (`/v1/proxy/<pool>/<path>`) with a key of the pool.
    pub async fn proxy(&self, job: ProxyJob) -> Result<ProxyAnswer, Failure> {
        let mut attempts = 0u32;
        let mut waited = Duration::ZERO;
        let mut last: Option<(String, Option<i64>)> = None;
        let idempotent = matches!(job.method, reqwest::Method::GET | reqwest::Method::HEAD);
        loop {
            if Instant::now() >= job.deadline {
                return Err(exhausted(last, attempts));
            }
            let grant = match self
                .reserve(&job.user, &job.pool, 0, job.deadline, job.capacity_wait, &mut waited)
                .await?
            {
                Ok(g) => g,
                Err(refusal) => {
                    return Err(Failure::Refused {
                        refusal,
                        attempts,
                        after: last.map(|l| l.0),
                    })
                }
            };
            attempts += 1;
            let key = grant.key;
            let builder = match proxy_request(&self.http, &key, &job) {
                Ok(b) => b,
                Err(msg) => {
                    let _ = self.db.release(grant.reservation_id).await;
                    return Err(Failure::Caller(msg));
                }
            };
            let mut held = Held {
                db: self.db.clone(),
                reservation_id: grant.reservation_id,
                usage: Usage::default(),
                armed: true,
            };
            let call_timeout = self.settings.provider_timeout.min(remaining(job.deadline));
            let sent_at = Instant::now();
            let answer = match tokio::time::timeout(call_timeout, async {
                let r = builder.send().await?;
                let status = r.status().as_u16();
                let headers = r.headers().clone();
                let body = r.bytes().await?;
                Ok::<_, reqwest::Error>((status, headers, body))
            })
            .await
            {
                Ok(Ok(a)) => a,
                failed => {
                    let class = if failed.is_err() { "timeout" } else { "unreachable" };
                    let why = match failed {
                        Err(_) => format!("no answer within {} ms", call_timeout.as_millis()),
                        Ok(Err(e)) => format!("connection failed: {}", without_url(&e)),
                        Ok(Ok(_)) => unreachable!(),
                    };
                    held.disarm();
                    self.settle_now(grant.reservation_id, 0, Usage::default(), None, None)
                        .await
                        .map_err(|e| Failure::from_db(e, &job.pool))?;
                    self.metrics
                        .provider_call(&job.pool, &key.provider, class, sent_at.elapsed());
                    last = Some((format!("key {} ({}): {why}", key.id, key.label), None));
                    if !idempotent || attempts >= self.settings.max_attempts {
                        return Err(exhausted(last, attempts));
                    }
                    continue;
                }
            };
            held.disarm();
            let (status, headers, body) = answer;
            let usage = usage_in(&body);
            let error = (!(200..300).contains(&status)).then(|| providers::read_error(&key, status, &headers, &body));
            let outcome = self
                .settle_now(
                    grant.reservation_id,
                    status as i32,
                    usage,
                    error.as_ref().and_then(|e| e.retry_after_ms),
                    error.as_ref().and_then(|e| e.code.clone()),
                )
                .await
                .map_err(|e| Failure::from_db(e, &job.pool))?;
            self.metrics
                .provider_call(&job.pool, &key.provider, &outcome, sent_at.elapsed());
            let served = Served {
                key_id: key.id,
                key_label: key.label.clone(),
                provider: key.provider.clone(),
                attempts,
                allocation: grant.allocation,
            };
            if error.is_none() || !worth_another_key(&outcome) || attempts >= self.settings.max_attempts {
                info!(user = %job.user, pool = %job.pool, key_id = key.id, key = %key.label, provider = %key.provider,
                      status, attempts, outcome = %outcome, "proxied");
                if error.is_none() {
                    self.stats.served.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                }
                return Ok(ProxyAnswer {
                    status,
                    headers,
                    body: Bytes::from(keypool_mask::scrub(&String::from_utf8_lossy(&body), &key.secret).into_bytes()),
                    served,
                });
            }
            warn!(user = %job.user, pool = %job.pool, key_id = key.id, key = %key.label, status, outcome = %outcome, attempt = attempts, "provider refused; trying another key");
            last = Some((
                format!("key {} ({}): HTTP {status} ({outcome})", key.id, key.label),
                None,
            ));
        }
    }
}

fn exhausted(last: Option<(String, Option<i64>)>, attempts: u32) -> Failure {
    let (last, retry_after_ms) = last.unwrap_or_else(|| ("no attempt was made".into(), None));
    Failure::Exhausted {
        last,
        attempts,
        retry_after_ms,
        timed_out: false,
    }
}

/// What went wrong with a call, without the URL (which, for query-parameter keys, holds the
/// secret): the kind of failure and its causes.
pub(crate) fn without_url(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else if e.is_body() || e.is_decode() {
        "the answer broke off".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A plain HTTP request for the proxy route.
pub struct ProxyJob {
    pub user: String,
    pub pool: String,
    pub method: reqwest::Method,
    pub path: String,
    pub query: Option<String>,
    pub content_type: Option<String>,
    pub accept: Option<String>,
    pub body: Bytes,
    pub deadline: Instant,
    pub capacity_wait: Duration,
}

pub struct ProxyAnswer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub served: Served,
}

fn proxy_request(http: &reqwest::Client, key: &KeyRef, job: &ProxyJob) -> Result<reqwest::RequestBuilder, String> {
    let mut builder = match key.wire() {
        Wire::Http => providers::http::proxy_request(http, key, job.method.clone(), &job.path, job.query.as_deref())?,
        wire => {
            let mut url = format!(
                "{}/{}",
                key.base_url.trim_end_matches('/'),
                job.path.trim_start_matches('/')
            );
            if let Some(q) = job.query.as_deref().filter(|q| !q.is_empty()) {
                url.push('?');
                url.push_str(q);
            }
            let b = http.request(job.method.clone(), url);
            match wire {
                Wire::Gemini => b.header("x-goog-api-key", &key.secret),
                Wire::Anthropic => b
                    .header("x-api-key", &key.secret)
                    .header("anthropic-version", providers::anthropic::VERSION),
                _ if key.secret.is_empty() => b,
                _ => b.bearer_auth(&key.secret),
            }
        }
    };
    if let Some(ct) = &job.content_type {
        builder = builder.header(reqwest::header::CONTENT_TYPE, ct);
    }
    if let Some(a) = &job.accept {
        builder = builder.header(reqwest::header::ACCEPT, a);
    }
    if !job.body.is_empty() {
        builder = builder.body(job.body.clone());
    }
    Ok(builder)
}

/// Tokens in a JSON answer of any of the known shapes (OpenAI, Gemini, Anthropic), if any.
fn usage_in(body: &[u8]) -> Usage {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Usage::default();
    };
    let n = |o: Option<&serde_json::Value>, f: &str| o.and_then(|o| o.get(f)).and_then(|x| x.as_i64()).unwrap_or(0);
    if let Some(u) = v.get("usageMetadata") {
        return Usage {
            prompt_tokens: n(Some(u), "promptTokenCount"),
            completion_tokens: n(Some(u), "candidatesTokenCount"),
        };
    }
    let u = v.get("usage");
    Usage {
        prompt_tokens: n(u, "prompt_tokens") + n(u, "input_tokens"),
        completion_tokens: n(u, "completion_tokens") + n(u, "output_tokens"),
    }
}

struct StreamLog {
    user: String,
    pool: String,
    key_id: i64,
    key_label: String,
    provider: String,
    attempts: u32,
    started: Instant,
    stats: Arc<Stats>,
}

/// The state of a relayed stream. Dropping it before the end (the app went away) settles what
/// was counted so far.
struct Relay {
    upstream: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    parser: sse::Parser,
    translator: Box<dyn Translate>,
    pending: VecDeque<Bytes>,
    held: Held,
    idle_timeout: Duration,
    ended: bool,
    log: StreamLog,
}

impl Relay {
    /// Usage as the provider reported it; what it did not report is counted from the stream.
    fn usage(&self) -> Usage {
        let counted = openai::count_tokens(self.translator.generated_chars());
        match self.translator.reported_usage() {
            Some(u) if u.completion_tokens > 0 || counted == 0 => u,
            Some(u) => Usage {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: counted,
            },
            None => Usage {
                prompt_tokens: self.held.usage.prompt_tokens,
                completion_tokens: counted,
            },
        }
    }

    fn settle(&mut self, status: i32, note: &str) {
        let usage = self.usage();
        self.held.disarm();
        self.held.db.settle_later(Settlement {
            reservation_id: self.held.reservation_id,
            status,
            usage,
            retry_after_ms: None,
            error_code: None,
        });
        if status == 200 {
            self.log.stats.served.fetch_add(1, Ordering::Relaxed);
        }
        let l = &self.log;
        info!(user = %l.user, pool = %l.pool, key_id = l.key_id, key = %l.key_label, provider = %l.provider,
              status, attempts = l.attempts, prompt_tokens = usage.prompt_tokens, completion_tokens = usage.completion_tokens,
              ms = l.started.elapsed().as_millis() as u64, stream = true, "{note}");
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if self.held.armed {
            // The app stopped reading: settle what was generated, with no penalty for the key.
            self.held.usage = self.usage();
            self.settle(499, "stream abandoned by the client");
        }
    }
}

fn relay(
    response: reqwest::Response,
    translator: Box<dyn Translate>,
    held: Held,
    idle_timeout: Duration,
    log: StreamLog,
) -> BoxStream<'static, Result<Bytes, std::io::Error>> {
    let state = Relay {
        upstream: Box::pin(response.bytes_stream()),
        parser: sse::Parser::default(),
        translator,
        pending: VecDeque::new(),
        held,
        idle_timeout,
        ended: false,
        log,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(b) = st.pending.pop_front() {
                return Some((Ok(b), st));
            }
            if st.ended {
                return None;
            }
            let mut out = Vec::new();
            match tokio::time::timeout(st.idle_timeout, st.upstream.next()).await {
                Ok(Some(Ok(chunk))) => match st.parser.feed(&chunk) {
                    Ok(events) => {
                        for ev in events {
                            st.translator.event(ev, &mut out);
                        }
                    }
                    Err(why) => {
                        out.push(stream_error(&format!("the provider's stream is broken: {why}")));
                        st.settle(200, "stream broken");
                        st.ended = true;
                    }
                },
                Ok(None) => {
                    if let Some(ev) = st.parser.finish() {
                        st.translator.event(ev, &mut out);
                    }
                    let usage = st.usage();
                    st.translator.finish(usage, &mut out);
                    st.settle(200, "served");
                    st.ended = true;
                }
                Ok(Some(Err(_))) | Err(_) => {
                    out.push(stream_error("the provider's stream broke off"));
                    st.settle(200, "stream broke off");
                    st.ended = true;
                }
            }
            st.pending.extend(out);
        }
    })
    .boxed()
}

fn stream_error(message: &str) -> Bytes {
    sse::data(&openai::error_body(message, "server_error", Some("upstream_stream_error")).to_string())
}
