//! One request's way through the pool: reserve a key, call its provider, settle what happened,
//! and try another key when the extension's outcome class says the key (not the request) was
//! the problem, within the attempt limit and the request's deadline.
//!
//! Which answers are retried is not decided here: `keypool_settle` classifies every error
//! answer and applies its consequence (cooldown until Retry-After, disabled key, tripped
//! breaker); the worker retries `rate_limited`, `daily_quota`, `key_invalid`, `billing` and
//! `server_error`, and returns `caller_error` and `other` to the caller untouched. Successes are
//! settled in the background (their class is known), everything else at once.

pub mod metrics;
pub mod queue;
pub mod recheck;
pub mod validate;

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{BoxStream, Stream, StreamExt};
use reqwest::header::HeaderMap;
use tracing::{info, warn};

use crate::db::Reach;
use crate::db::{Allocation, Db, DbError, Refusal, Reserved, Settlement};
use crate::gateway::metrics::{Metrics, RecentFailures};
use crate::protocol::conversation::{CarryError, Conversation, Usage};
use crate::protocol::inbound::Inbound;
use crate::protocol::openai::images::{self, ImagesRequest};
use crate::protocol::openai::{self, EmbeddingsRequest};
use crate::protocol::sse;
use crate::protocol::stream::Translate;
use crate::providers::counters::{self, Counters};
use crate::providers::{self, KeyRef, ProviderError, Wire};

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
    /// Largest provider answer the worker reads (streams: passes on) before cutting it.
    pub max_response: usize,
    /// Send each call's grant time to the provider as `X-Keypool-Granted-At` (audits: the soak
    /// checks the mock's log of calls against the limits with it).
    pub stamp_grants: bool,
}

/// The header `Settings::stamp_grants` adds: the grant time, Unix milliseconds.
pub const GRANTED_AT_HEADER: &str = "x-keypool-granted-at";

/// Below this much of KEYPOOL_MAX_RESPONSE left (or a quarter of it, if smaller), no further
/// image of a request is asked for: it could not be read.
const MIN_IMAGE_ANSWER: usize = 64 * 1024;

/// Error answers are read up to this much (their message and code are near the start).
pub(crate) const MAX_ERROR_BODY: usize = 64 * 1024;

/// Why an answer's body could not be read whole.
pub(crate) enum BodyError {
    /// Larger than the limit: the rest was never read.
    TooLarge,
    /// The connection broke off.
    Broken,
}

/// Reads an answer's body, holding at most `limit` bytes of it.
pub(crate) async fn read_capped(response: reqwest::Response, limit: usize) -> Result<Bytes, BodyError> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge);
    }
    let mut body = bytes::BytesMut::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|_| BodyError::Broken)?;
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// A chat request on its way.
pub struct ChatJob {
    pub user: String,
    pub pool: String,
    /// The pools the caller may reach (an API token's), if limited: the fallback chain skips
    /// the others; and the token whose limits the request counts against.
    pub reach: Reach,
    pub request: Inbound,
    pub stream: bool,
    pub deadline: Instant,
    /// How long to wait for capacity when the pool is exhausted before answering with the
    /// refusal.
    pub capacity_wait: Duration,
}

/// An embeddings request on its way.
pub struct EmbedJob {
    pub user: String,
    pub pool: String,
    pub reach: Reach,
    pub request: EmbeddingsRequest,
    pub deadline: Instant,
    pub capacity_wait: Duration,
}

/// An image generation request on its way: each image its own call and reservation.
pub struct ImagesJob {
    pub user: String,
    pub pool: String,
    pub reach: Reach,
    pub request: ImagesRequest,
    /// Output tokens each image is reserved with (the most the pool's models bill for it).
    pub tokens_per_image: i64,
    pub deadline: Instant,
    pub capacity_wait: Duration,
}

/// The images made, in OpenAI's shape, and why fewer than asked were made (the refusal or
/// failure of the first image not made), if any.
pub struct ImagesAnswer {
    pub body: Bytes,
    pub served: Served,
    pub short: Option<Failure>,
}

/// What every attempt of one request needs.
#[derive(Clone, Copy)]
struct Plan<'a> {
    user: &'a str,
    pool: &'a str,
    reach: &'a Reach,
    /// Tokens reserved per attempt, and the prompt's part of them (settled when a call's usage
    /// is not known).
    est: i64,
    prompt_est: i64,
    deadline: Instant,
    capacity_wait: Duration,
    started: Instant,
    /// The largest provider answer read whole (KEYPOOL_MAX_RESPONSE, or what is left of it).
    max_answer: usize,
}

/// A provider's 2xx answer, still to be read and settled.
struct Accepted {
    response: reqwest::Response,
    key: KeyRef,
    held: Held,
    served: Served,
    status: u16,
}

/// A whole answer in OpenAI's shape.
pub struct Complete {
    pub body: Bytes,
    pub served: Served,
}

/// Which key served a request, and the user's share afterwards.
#[derive(Clone, Debug)]
pub struct Served {
    /// The pool that served (the one asked, or a fallback).
    pub pool: String,
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
        refusal: Box<Refusal>,
        attempts: u32,
        after: Option<String>,
    },
    /// The request itself is wrong (before any provider saw it).
    Caller(String),
    /// The request holds a field the granted key's provider has no place for (before any
    /// provider saw it).
    Unsupported {
        field: String,
        provider: String,
    },
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
    /// Every attempt failed on the provider side, or the deadline passed. `last` is for the
    /// log and the admin API (keys, providers' messages); `reason`, when set, the worker's own
    /// reason that the caller may be told (a limit of its own, such as KEYPOOL_MAX_RESPONSE).
    Exhausted {
        last: String,
        attempts: u32,
        retry_after_ms: Option<i64>,
        timed_out: bool,
        reason: Option<String>,
    },
    Database(DbError),
}

impl Failure {
    fn from_carry(e: CarryError) -> Failure {
        match e {
            CarryError::Unsupported { field, provider } => Failure::Unsupported { field, provider },
            CarryError::Invalid(why) => Failure::Caller(why),
        }
    }

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
            Failure::Unsupported { field, provider } => format!("`{field}` cannot be carried to {provider}"),
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
    /// Keys checked lately that their provider did not reject (after a 401 or 403 that was the
    /// request's).
    key_checks: KeyChecks,
    /// Requests every attempt of which failed, with the details their callers are not shown.
    pub failures: RecentFailures,
}

/// What `keypool_settle` is told of an answer to a request whose shape the caller chose, and what
/// it answers when that needs a check of the key (the extension's outcome.rs).
const KEY_UNCHECKED: &str = "unchecked:";
const KEY_CHECKED: &str = "checked:";
const NEEDS_KEY_CHECK: &str = "key_unchecked";
const CALLER_MODEL: &str = "model:";
/// How long a key check may take.
const KEY_CHECK_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a key the provider accepted is not checked again.
const KEY_CHECK_TTL: Duration = Duration::from_secs(60);

/// Keys checked within [`KEY_CHECK_TTL`] that their provider did not reject: a caller sending
/// request after request that the provider refuses with 403 causes one check per key and
/// minute, not one per request.
#[derive(Default)]
struct KeyChecks {
    accepted: std::sync::Mutex<std::collections::HashMap<i64, Instant>>,
}

impl KeyChecks {
    fn recently_passed(&self, key_id: i64) -> bool {
        self.accepted
            .lock()
            .map(|m| m.get(&key_id).is_some_and(|at| at.elapsed() < KEY_CHECK_TTL))
            .unwrap_or(false)
    }

    fn passed(&self, key_id: i64) {
        if let Ok(mut m) = self.accepted.lock() {
            // Keys are few (the extension's pg_keypool.max_keys); old verdicts go when it grows.
            if m.len() >= 4096 {
                m.retain(|_, at| at.elapsed() < KEY_CHECK_TTL);
            }
            m.insert(key_id, Instant::now());
        }
    }
}

/// What an answer's headers say of the key's own limits, for a key that names its model. For a
/// model the caller chose (the key names none) they are that model's limits, not the account's:
/// not passed on, so that no caller can hold a shared account by picking a model with tiny
/// limits.
fn reported_counters(key: &KeyRef, headers: &reqwest::header::HeaderMap) -> Counters {
    match key.model {
        Some(_) => counters::read(&key.provider, headers, std::time::SystemTime::now()),
        None => Counters::default(),
    }
}

/// A reservation whose call went out; settled as "the caller went away" (HTTP 499, no penalty
/// for the key) if nothing else settles it, e.g. when the app disconnects mid-call.
struct Held {
    db: Db,
    reservation_id: i64,
    usage: Usage,
    /// What the provider's answer said of the key's own limits.
    counters: Counters,
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
            self.db.settle_soon(Settlement {
                reservation_id: self.reservation_id,
                status: 499,
                usage: self.usage,
                retry_after_ms: None,
                error_code: Some("client_closed_request".into()),
                counters: self.counters,
            });
        }
    }
}

/// The model an answer names: the key's, else the one requested, else the pool.
fn shown_model(key: &KeyRef, requested: Option<&str>, pool: &str) -> String {
    key.model
        .clone()
        .or_else(|| requested.map(str::to_string))
        .unwrap_or_else(|| pool.to_string())
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

impl Gateway {
    pub fn new(db: Db, settings: Settings) -> anyhow::Result<Gateway> {
        let http = reqwest::Client::builder()
            // A redirect would take the key (in a header reqwest does not strip, or in the
            // query) to wherever the provider points: never follow one.
            .redirect(reqwest::redirect::Policy::none())
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
            key_checks: KeyChecks::default(),
            failures: RecentFailures::default(),
        })
    }

    /// Reserves; waits for capacity within `capacity_wait` when the pool is exhausted.
    fn stamp(&self, builder: reqwest::RequestBuilder, granted_at_ms: i64) -> reqwest::RequestBuilder {
        if self.settings.stamp_grants {
            builder.header(GRANTED_AT_HEADER, granted_at_ms)
        } else {
            builder
        }
    }

    async fn reserve(
        &self,
        user: &str,
        (pool, reach): (&str, &Reach),
        est: i64,
        deadline: Instant,
        capacity_wait: Duration,
        waited: &mut Duration,
    ) -> Result<Result<crate::db::Grant, Refusal>, Failure> {
        loop {
            match self.db.reserve(user, pool, est, reach).await {
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
        let plan = Plan {
            user: &job.user,
            pool: &job.pool,
            reach: &job.reach,
            est: job.request.estimate_tokens(self.settings.default_max_tokens),
            prompt_est: job.request.estimate_prompt_tokens(),
            deadline: job.deadline,
            capacity_wait: job.capacity_wait,
            started: Instant::now(),
            max_answer: self.settings.max_response,
        };
        let default_max_tokens = self.settings.default_max_tokens;
        // Under a budget the output is capped at what the reservation holds.
        let cap = job
            .request
            .max_tokens()
            .is_none()
            .then(|| job.request.default_output_cap(default_max_tokens));
        // Bodies built so far, by what they depend on: attempts on like keys share one. The
        // request is read as a conversation once, when a key of another dialect needs it.
        let bodies: std::sync::Mutex<Vec<(providers::BodyShape, Bytes)>> = Default::default();
        let conversation: std::sync::OnceLock<Result<Conversation<'_>, String>> = std::sync::OnceLock::new();
        let result = self
            .attempts(
                &plan,
                |key, budgeted| {
                    let cap = cap.filter(|_| budgeted);
                    let shape = providers::BodyShape::of(key, cap);
                    let known = bodies
                        .lock()
                        .ok()
                        .and_then(|b| b.iter().find(|(s, _)| *s == shape).map(|(_, body)| body.clone()));
                    let body = match known {
                        Some(body) => body,
                        None => {
                            let body = providers::chat_body(
                                key,
                                &job.request,
                                || conversation.get_or_init(|| job.request.conversation()),
                                job.stream,
                                default_max_tokens,
                                cap,
                            )
                            .map_err(Failure::from_carry)?;
                            if let Ok(mut b) = bodies.lock() {
                                b.push((shape, body.clone()));
                            }
                            body
                        }
                    };
                    providers::chat_request(&self.http, key, &job.request, job.stream, body).map_err(Failure::Caller)
                },
                |accepted| self.chat_answer(&plan, &job, accepted),
            )
            .await;
        if let Err(f) = &result {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            self.note_failure(plan.pool, plan.user, f);
        }
        result
    }

    /// Reads (or starts relaying) a provider's 2xx answer to a chat request.
    async fn chat_answer(&self, plan: &Plan<'_>, job: &ChatJob, accepted: Accepted) -> Result<Answer, Failure> {
        let shown_model = shown_model(&accepted.key, job.request.model(), &job.pool);
        if job.stream {
            let Accepted {
                response,
                key,
                held,
                served,
                ..
            } = accepted;
            let translator = providers::stream_translator(
                &key,
                job.request.dialect(),
                &shown_model,
                job.request.wants_stream_usage(),
            );
            let events = relay(
                response,
                translator,
                held,
                (self.settings.provider_timeout, self.settings.max_response),
                StreamLog {
                    user: job.user.clone(),
                    pool: job.pool.clone(),
                    key_id: key.id,
                    key_label: key.label.clone(),
                    provider: key.provider.clone(),
                    attempts: served.attempts,
                    started: plan.started,
                    stats: self.stats.clone(),
                },
            );
            return Ok(Answer::Stream { events, served });
        }
        let prompt_est = plan.prompt_est;
        let (body, served) = self
            .read_answer(plan, accepted, |key, body| {
                let c = providers::read_completion(key, job.request.dialect(), body, &shown_model, prompt_est)?;
                Ok((c.body, c.usage))
            })
            .await?;
        Ok(Answer::Complete { body, served })
    }

    /// Carries out an embeddings request (OpenAI's `/v1/embeddings` shape in and out).
    pub async fn embed(&self, job: EmbedJob) -> Result<Complete, Failure> {
        let plan = Plan {
            user: &job.user,
            pool: &job.pool,
            reach: &job.reach,
            est: job.request.estimate_tokens(),
            prompt_est: job.request.estimate_tokens(),
            deadline: job.deadline,
            capacity_wait: job.capacity_wait,
            started: Instant::now(),
            max_answer: self.settings.max_response,
        };
        let result = self
            .attempts(
                &plan,
                |key, _| providers::embeddings_request(&self.http, key, &job.request).map_err(Failure::Caller),
                |accepted| async {
                    let shown_model = shown_model(&accepted.key, job.request.model(), &job.pool);
                    let counted = plan.prompt_est;
                    let (body, served) = self
                        .read_answer(&plan, accepted, |key, body| {
                            let e = providers::read_embeddings(key, body, &job.request, &shown_model)?;
                            let usage = e.usage.unwrap_or(Usage::new(counted, 0));
                            Ok((e.body, usage))
                        })
                        .await?;
                    Ok(Complete { body, served })
                },
            )
            .await;
        if let Err(f) = &result {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            self.note_failure(plan.pool, plan.user, f);
        }
        result
    }

    /// Carries out an image generation request: one call and one reservation per image, so each
    /// image counts against the key's requests per minute and day. When an image after the first
    /// cannot be made (the user's share or the pool's minute is used up, the deadline or
    /// KEYPOOL_MAX_RESPONSE would not hold another, the provider declined it), the images made
    /// so far are the answer and `short` says why the rest are missing. What no key could carry
    /// (a field its provider has no place for) fails the request, whichever image it came to.
    pub async fn images(&self, job: ImagesJob) -> Result<ImagesAnswer, Failure> {
        let plan = Plan {
            user: &job.user,
            pool: &job.pool,
            reach: &job.reach,
            est: job.request.estimate_prompt_tokens() + job.tokens_per_image,
            prompt_est: job.request.estimate_prompt_tokens(),
            deadline: job.deadline,
            capacity_wait: job.capacity_wait,
            started: Instant::now(),
            max_answer: self.settings.max_response,
        };
        // The answer is written as the images come, each entry once: `{"created", "data": [...]}`.
        let mut body = format!("{{\"created\":{},\"data\":[", openai::unix_now());
        let mut made_count = 0usize;
        let (mut served, mut short) = (None, None);
        // Usage summed over the images, while every answer reported it.
        let mut usage: Option<(i64, i64)> = Some((0, 0));
        // What the largest answer so far took to read and how long the last image took: another
        // image is asked for only while the deadline and KEYPOOL_MAX_RESPONSE can hold one more.
        let (mut largest, mut slowest) = (0usize, Duration::ZERO);
        for _ in 0..job.request.n() {
            let left = self.settings.max_response.saturating_sub(body.len());
            let stop = if made_count == 0 {
                None
            } else if left < largest.max(MIN_IMAGE_ANSWER.min(self.settings.max_response / 4)) {
                Some((false, "the images made fill KEYPOOL_MAX_RESPONSE"))
            } else if remaining(plan.deadline) < slowest {
                Some((true, "the deadline would pass before another image is made"))
            } else {
                None
            };
            if let Some((timed_out, why)) = stop {
                short = Some(Failure::Exhausted {
                    last: why.into(),
                    attempts: 0,
                    retry_after_ms: None,
                    timed_out,
                    reason: Some(why.into()),
                });
                break;
            }
            let plan = Plan {
                max_answer: left,
                ..plan
            };
            let started = Instant::now();
            let one = self
                .attempts(
                    &plan,
                    |key, _| providers::image_request(&self.http, key, &job.request).map_err(Failure::from_carry),
                    |accepted| async {
                        let prompt_est = plan.prompt_est;
                        let mut answer = None;
                        let (_, served) = self
                            .read_answer(&plan, accepted, |key, raw| {
                                let size = raw.len();
                                let i = providers::read_image(key, &raw)?;
                                let settled = i.usage.unwrap_or(Usage::new(prompt_est, images::TOKENS_PER_IMAGE));
                                let entries: Vec<String> = i.data.iter().map(|d| d.to_string()).collect();
                                answer = Some((entries, i.usage, i.declined, size));
                                Ok((Bytes::new(), settled))
                            })
                            .await?;
                        match answer {
                            Some((entries, _, declined, _)) if entries.is_empty() => Err(Failure::Caller(
                                declined.unwrap_or_else(|| "the provider's answer holds no image".into()),
                            )),
                            Some((entries, reported, _, size)) => Ok((entries, reported, size, served)),
                            None => Err(Failure::Caller("the provider's answer holds no image".into())),
                        }
                    },
                )
                .await;
            match one {
                Ok((entries, reported, size, s)) => {
                    for e in entries {
                        if made_count > 0 {
                            body.push(',');
                        }
                        body.push_str(&e);
                        made_count += 1;
                    }
                    usage = usage
                        .zip(reported)
                        .map(|((p, c), u)| (p + u.prompt_tokens, c + u.completion_tokens));
                    largest = largest.max(size);
                    slowest = slowest.max(started.elapsed());
                    served = Some(s);
                }
                Err(f) if served.is_none() || matches!(f, Failure::Unsupported { .. }) => {
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    self.note_failure(plan.pool, plan.user, &f);
                    return Err(f);
                }
                Err(f) => {
                    short = Some(f);
                    break;
                }
            }
        }
        let served = served.ok_or_else(|| Failure::Caller("no image was asked for".into()))?;
        body.push(']');
        if let Some((input, output)) = usage {
            body.push_str(&format!(
                ",\"usage\":{{\"input_tokens\":{input},\"output_tokens\":{output},\"total_tokens\":{}}}",
                input + output
            ));
        }
        body.push('}');
        Ok(ImagesAnswer {
            body: Bytes::from(body),
            served,
            short,
        })
    }

    /// Reserve → call → settle, trying another key while the extension's outcome class says the
    /// key (not the request) was the problem. `build` makes the provider request for a granted
    /// key (an error is the caller's, and gives the capacity back: no provider sees the
    /// request); `accept` reads a 2xx answer and settles it.
    async fn attempts<T, B, A, F>(&self, plan: &Plan<'_>, build: B, accept: A) -> Result<T, Failure>
    where
        B: Fn(&KeyRef, bool) -> Result<reqwest::RequestBuilder, Failure>,
        A: FnOnce(Accepted) -> F,
        F: std::future::Future<Output = Result<T, Failure>>,
    {
        let mut attempts = 0u32;
        let mut waited = Duration::ZERO;
        let mut last: Option<(String, Option<i64>)> = None;
        loop {
            if Instant::now() >= plan.deadline {
                return Err(Failure::Exhausted {
                    last: last
                        .map(|l| l.0)
                        .unwrap_or_else(|| "no attempt fitted in the deadline".into()),
                    attempts,
                    retry_after_ms: None,
                    timed_out: true,
                    reason: None,
                });
            }
            let grant = match self
                .reserve(
                    plan.user,
                    (plan.pool, plan.reach),
                    plan.est,
                    plan.deadline,
                    plan.capacity_wait,
                    &mut waited,
                )
                .await?
            {
                Ok(g) => g,
                Err(refusal) => {
                    return Err(Failure::Refused {
                        refusal: Box::new(refusal),
                        attempts,
                        after: last.map(|l| l.0),
                    })
                }
            };
            attempts += 1;
            let key = grant.key;
            let served_pool = grant.pool;
            let builder = match build(&key, grant.budgeted) {
                Ok(b) => self.stamp(b, grant.granted_at_ms),
                Err(refused) => {
                    // Never sent: give the capacity back.
                    if let Err(e) = self.db.release(grant.reservation_id).await {
                        warn!(reservation = grant.reservation_id, error = %e, "release failed");
                    }
                    return Err(refused);
                }
            };
            // Until the answer says otherwise, the call may cost all it holds: a call whose
            // answer never arrives (a timeout, the caller gone) may well have been billed.
            let mut held = Held {
                db: self.db.clone(),
                reservation_id: grant.reservation_id,
                usage: Usage::new(plan.prompt_est, plan.est - plan.prompt_est),
                counters: Counters::default(),
                armed: true,
            };
            let call_timeout = self.settings.provider_timeout.min(remaining(plan.deadline));
            let sent_at = Instant::now();
            let sent = tokio::time::timeout(call_timeout, builder.send()).await;
            let took = sent_at.elapsed();
            let response = match sent {
                Ok(Ok(r)) => r,
                Ok(Err(_)) | Err(_) => {
                    let class = if sent.is_err() { "timeout" } else { "unreachable" };
                    // A connection that was never made carried nothing to bill.
                    let usage = match &sent {
                        Ok(Err(e)) if e.is_connect() => Usage::default(),
                        _ => held.usage,
                    };
                    let why = match sent {
                        Err(_) => format!("no answer within {} ms", call_timeout.as_millis()),
                        Ok(Err(e)) => format!("connection failed: {}", without_url(&e)),
                        Ok(Ok(_)) => unreachable!(),
                    };
                    held.disarm();
                    let outcome = self
                        .settle_now(grant.reservation_id, 0, usage, None, None, Counters::default())
                        .await
                        .map_err(|e| Failure::from_db(e, plan.pool))?;
                    self.metrics.provider_call(&served_pool, &key.provider, class, took);
                    warn!(user = ?plan.user, pool = ?plan.pool, key_id = key.id, key = %key.label, provider = %key.provider, attempt = attempts,
                          outcome = %outcome, "{why}; trying another key");
                    last = Some((format!("key {} ({}): {why}", key.id, key.label), None));
                    if attempts >= self.settings.max_attempts {
                        return Err(exhausted(last, attempts));
                    }
                    continue;
                }
            };
            let status = response.status().as_u16();
            held.counters = reported_counters(&key, response.headers());
            if response.status().is_success() {
                self.metrics.provider_call(&served_pool, &key.provider, "success", took);
                let served = Served {
                    pool: served_pool,
                    key_id: key.id,
                    key_label: key.label.clone(),
                    provider: key.provider.clone(),
                    attempts,
                    allocation: grant.allocation,
                };
                return accept(Accepted {
                    response,
                    key,
                    held,
                    served,
                    status,
                })
                .await;
            }

            // An error answer: the extension says what it means.
            let headers = response.headers().clone();
            let body = tokio::time::timeout(
                Duration::from_secs(5).min(remaining(plan.deadline)),
                read_capped(response, MAX_ERROR_BODY),
            )
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
            let error = providers::read_error(&key, status, &headers, &body);
            // Still armed while the key may be checked: a caller that goes away meanwhile
            // leaves no reservation open.
            held.usage = Usage::default();
            let outcome = self
                .settle_error(grant.reservation_id, &key, (status, held.counters), &error)
                .await
                .map_err(|e| Failure::from_db(e, plan.pool))?;
            held.disarm();
            self.metrics.provider_call(&served_pool, &key.provider, &outcome, took);
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
            warn!(user = ?plan.user, pool = ?plan.pool, key_id = key.id, key = %key.label, provider = %key.provider, status, code = error.code.as_deref().unwrap_or(""),
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
                let pause = Duration::from_millis(50 << attempts.min(5)).min(remaining(plan.deadline));
                tokio::time::sleep(pause).await;
            }
        }
    }

    /// Reads a 2xx answer whole (at most KEYPOOL_MAX_RESPONSE), turns it into what the app gets
    /// with `parse` (which also says the usage), and settles it.
    async fn read_answer(
        &self,
        plan: &Plan<'_>,
        accepted: Accepted,
        parse: impl FnOnce(&KeyRef, Bytes) -> Result<(Bytes, Usage), String>,
    ) -> Result<(Bytes, Served), Failure> {
        let Accepted {
            response,
            key,
            mut held,
            served,
            status,
        } = accepted;
        let read = tokio::time::timeout(remaining(plan.deadline), read_capped(response, plan.max_answer)).await;
        // The guard stays armed until the settlement is queued: a caller gone while the queue is
        // full still has the call settled (by the guard, with all it held).
        let body = match read {
            Ok(Ok(b)) => b,
            failed => {
                self.db
                    .settle_later(Settlement {
                        reservation_id: held.reservation_id,
                        status: status as i32,
                        usage: held.usage,
                        retry_after_ms: None,
                        error_code: None,
                        counters: held.counters,
                    })
                    .await;
                held.disarm();
                let timed_out = failed.is_err();
                let why = match failed {
                    Ok(Err(BodyError::TooLarge)) if plan.max_answer < self.settings.max_response => format!(
                        "the answers together are larger than KEYPOOL_MAX_RESPONSE ({} bytes)",
                        self.settings.max_response
                    ),
                    Ok(Err(BodyError::TooLarge)) => format!(
                        "the answer is larger than KEYPOOL_MAX_RESPONSE ({} bytes)",
                        self.settings.max_response
                    ),
                    Err(_) => "the answer was not read before the deadline".to_string(),
                    _ => "the answer broke off".to_string(),
                };
                return Err(Failure::Exhausted {
                    last: format!("key {} ({}): {why}", key.id, key.label),
                    attempts: served.attempts,
                    retry_after_ms: None,
                    timed_out,
                    reason: Some(why),
                });
            }
        };
        let parsed = parse(&key, body);
        let usage = parsed.as_ref().map_or(held.usage, |(_, u)| *u);
        self.db
            .settle_later(Settlement {
                reservation_id: held.reservation_id,
                status: status as i32,
                usage,
                retry_after_ms: None,
                error_code: None,
                counters: held.counters,
            })
            .await;
        held.disarm();
        let (body, _) = parsed.map_err(|msg| Failure::Exhausted {
            last: format!("key {} ({}): {msg}", key.id, key.label),
            attempts: served.attempts,
            retry_after_ms: None,
            timed_out: false,
            reason: Some("the provider's answer could not be read".into()),
        })?;
        self.stats.served.fetch_add(1, Ordering::Relaxed);
        info!(user = ?plan.user, pool = ?plan.pool, key_id = key.id, key = %key.label, provider = %key.provider,
              status, attempts = served.attempts, prompt_tokens = usage.prompt_tokens, completion_tokens = usage.completion_tokens,
              ms = plan.started.elapsed().as_millis() as u64, "served");
        Ok((body, served))
    }

    /// Settles a provider's error answer to a request whose shape the caller chose. An answer
    /// that would disable the key (401, 403, API_KEY_INVALID ...) may be about the request (its
    /// model, its fields): the extension then settles nothing until the key itself was checked
    /// with its provider (its model list), and the key is disabled only if the provider rejects
    /// it there; otherwise the answer costs the key nothing.
    async fn settle_error(
        &self,
        reservation_id: i64,
        key: &KeyRef,
        (status, counters): (u16, Counters),
        error: &ProviderError,
    ) -> Result<String, DbError> {
        // A model the caller chose (the key names none): what the provider says of that model
        // (its day's quota) is no verdict on the key's account for the day.
        let code = match key.model {
            None => format!("{CALLER_MODEL}{}", error.code.as_deref().unwrap_or("")),
            Some(_) => error.code.clone().unwrap_or_default(),
        };
        let code = code.as_str();
        let outcome = self
            .settle_now(
                reservation_id,
                status as i32,
                Usage::default(),
                error.retry_after_ms,
                Some(format!("{KEY_UNCHECKED}{code}")),
                counters,
            )
            .await?;
        if outcome != NEEDS_KEY_CHECK {
            return Ok(outcome);
        }
        let rejected = if self.key_checks.recently_passed(key.id) {
            false
        } else {
            let verdict = tokio::time::timeout(KEY_CHECK_TIMEOUT, validate::check(&self.http, &self.db, key)).await;
            let said = match &verdict {
                Ok(Ok(v)) => validate::describe(v),
                Ok(Err(e)) => format!("not known: {e}"),
                Err(_) => "not known: no answer in time".to_string(),
            };
            info!(key_id = key.id, key = %key.label, status, code = %code, check = %said,
                  "checked the key after an answer that may be about the request");
            let rejected = match verdict {
                // A 403 to the model list is a key without that permission (a restricted
                // key), not a bad one.
                Ok(Ok(validate::Verdict::Rejected { status, .. })) => status != 403,
                // Accepted, or no clear verdict on the key itself: it keeps serving.
                _ => false,
            };
            if !rejected {
                // Not asked again for a while, whatever the verdict: a caller sending request
                // after request the provider refuses costs one check per key and minute.
                self.key_checks.passed(key.id);
            }
            rejected
        };
        let settled_code = if rejected {
            code.to_string()
        } else {
            format!("{KEY_CHECKED}{code}")
        };
        self.settle_now(
            reservation_id,
            status as i32,
            Usage::default(),
            error.retry_after_ms,
            Some(settled_code),
            counters,
        )
        .await
    }

    async fn settle_now(
        &self,
        reservation_id: i64,
        status: i32,
        usage: Usage,
        retry_after_ms: Option<i64>,
        error_code: Option<String>,
        counters: Counters,
    ) -> Result<String, DbError> {
        self.db
            .settle(&Settlement {
                reservation_id,
                status,
                usage,
                retry_after_ms,
                error_code: error_code.map(|c| c.chars().take(200).collect()),
                counters,
            })
            .await
    }

    /// Keeps what failed attempts ran into for operators (log, admin API): callers are told
    /// only a generic reason (server.rs), never shared keys' labels or providers' messages.
    fn note_failure(&self, pool: &str, user: &str, f: &Failure) {
        let attempts = match f {
            Failure::Exhausted { attempts, .. } => *attempts,
            Failure::Refused {
                attempts,
                after: Some(_),
                ..
            } => *attempts,
            _ => return,
        };
        let detail = f.describe();
        warn!(user = ?user, pool = ?pool, attempts, detail = %detail, "request failed");
        self.failures.record(pool, user, attempts, &detail);
    }

    /// Forwards a plain HTTP request (`/v1/proxy/<pool>/<path>`) with a key of the pool.
    pub async fn proxy(&self, job: ProxyJob) -> Result<ProxyAnswer, Failure> {
        let result = self.proxy_attempts(&job).await;
        if let Err(f) = &result {
            self.note_failure(&job.pool, &job.user, f);
        }
        result
    }

    async fn proxy_attempts(&self, job: &ProxyJob) -> Result<ProxyAnswer, Failure> {
        let mut attempts = 0u32;
        let mut waited = Duration::ZERO;
        let mut last: Option<(String, Option<i64>)> = None;
        let idempotent = matches!(job.method, reqwest::Method::GET | reqwest::Method::HEAD);
        loop {
            if Instant::now() >= job.deadline {
                return Err(exhausted(last, attempts));
            }
            let grant = match self
                .reserve(
                    &job.user,
                    (&job.pool, &job.reach),
                    0,
                    job.deadline,
                    job.capacity_wait,
                    &mut waited,
                )
                .await?
            {
                Ok(g) => g,
                Err(refusal) => {
                    return Err(Failure::Refused {
                        refusal: Box::new(refusal),
                        attempts,
                        after: last.map(|l| l.0),
                    })
                }
            };
            attempts += 1;
            let key = grant.key;
            let served_pool = grant.pool;
            let builder = match proxy_request(&self.http, &key, job) {
                Ok(b) => self.stamp(b, grant.granted_at_ms),
                Err(msg) => {
                    let _ = self.db.release(grant.reservation_id).await;
                    return Err(Failure::Caller(msg));
                }
            };
            let mut held = Held {
                db: self.db.clone(),
                reservation_id: grant.reservation_id,
                usage: Usage::default(),
                counters: Counters::default(),
                armed: true,
            };
            let call_timeout = self.settings.provider_timeout.min(remaining(job.deadline));
            let sent_at = Instant::now();
            let max_response = self.settings.max_response;
            let answer = match tokio::time::timeout(call_timeout, async {
                let r = builder
                    .send()
                    .await
                    .map_err(|e| format!("connection failed: {}", without_url(&e)))?;
                let status = r.status().as_u16();
                let headers = r.headers().clone();
                let limit = if r.status().is_success() {
                    max_response
                } else {
                    MAX_ERROR_BODY
                };
                let body = read_capped(r, limit).await.map_err(|e| match e {
                    BodyError::TooLarge => {
                        format!("the answer is larger than KEYPOOL_MAX_RESPONSE ({max_response} bytes)")
                    }
                    BodyError::Broken => "the answer broke off".to_string(),
                })?;
                Ok::<_, String>((status, headers, body))
            })
            .await
            {
                Ok(Ok(a)) => a,
                failed => {
                    let class = if failed.is_err() { "timeout" } else { "unreachable" };
                    let why = match failed {
                        Err(_) => format!("no answer within {} ms", call_timeout.as_millis()),
                        Ok(Err(e)) => e,
                        Ok(Ok(_)) => unreachable!(),
                    };
                    held.disarm();
                    self.settle_now(
                        grant.reservation_id,
                        0,
                        Usage::default(),
                        None,
                        None,
                        Counters::default(),
                    )
                    .await
                    .map_err(|e| Failure::from_db(e, &job.pool))?;
                    self.metrics
                        .provider_call(&served_pool, &key.provider, class, sent_at.elapsed());
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
            // The caller chose the path: the extension may cool or trip the key on this answer,
            // never disable it (outcome.rs, CALLER_PATH).
            let code = format!("proxy:{}", error.as_ref().and_then(|e| e.code.as_deref()).unwrap_or(""));
            let outcome = self
                .settle_now(
                    grant.reservation_id,
                    status as i32,
                    usage,
                    error.as_ref().and_then(|e| e.retry_after_ms),
                    Some(code),
                    reported_counters(&key, &headers),
                )
                .await
                .map_err(|e| Failure::from_db(e, &job.pool))?;
            self.metrics
                .provider_call(&served_pool, &key.provider, &outcome, sent_at.elapsed());
            let served = Served {
                pool: served_pool,
                key_id: key.id,
                key_label: key.label.clone(),
                provider: key.provider.clone(),
                attempts,
                allocation: grant.allocation,
            };
            if error.is_none() || !worth_another_key(&outcome) || attempts >= self.settings.max_attempts {
                info!(user = ?job.user, pool = ?job.pool, key_id = key.id, key = %key.label, provider = %key.provider,
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
            warn!(user = ?job.user, pool = ?job.pool, key_id = key.id, key = %key.label, status, outcome = %outcome, attempt = attempts, "provider refused; trying another key");
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
        reason: None,
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
    pub reach: Reach,
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
    if key.wire() != Wire::Http {
        return Err(format!(
            "pool \"{}\" serves a chat provider ({}): use /v1/chat/completions or /v1/embeddings; \
             /v1/proxy/<pool>/<path> is for pools of plain HTTP APIs (provider http)",
            job.pool, key.provider
        ));
    }
    let mut builder = providers::http::proxy_request(http, key, job.method.clone(), &job.path, job.query.as_deref())?;
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

/// Tokens in a JSON answer of any of the known shapes (OpenAI, Gemini, Anthropic), if any. Read
/// into a few numbers: the rest of the answer (a proxied API's, of any shape and up to
/// KEYPOOL_MAX_RESPONSE) is skipped, not built into a tree.
fn usage_in(body: &[u8]) -> Usage {
    #[derive(serde::Deserialize, Default)]
    #[allow(non_snake_case)]
    struct Counts {
        prompt_tokens: Option<i64>,
        completion_tokens: Option<i64>,
        input_tokens: Option<i64>,
        output_tokens: Option<i64>,
        promptTokenCount: Option<i64>,
        candidatesTokenCount: Option<i64>,
    }
    #[derive(serde::Deserialize)]
    #[allow(non_snake_case)]
    struct Answer {
        usage: Option<Counts>,
        usageMetadata: Option<Counts>,
    }
    let Ok(a) = serde_json::from_slice::<Answer>(body) else {
        return Usage::default();
    };
    let n = |v: Option<i64>| v.unwrap_or(0).clamp(0, 1_000_000_000);
    if let Some(u) = a.usageMetadata {
        return Usage::new(n(u.promptTokenCount), n(u.candidatesTokenCount));
    }
    let u = a.usage.unwrap_or_default();
    Usage::new(
        n(u.prompt_tokens) + n(u.input_tokens),
        n(u.completion_tokens) + n(u.output_tokens),
    )
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
    /// Bytes read from the provider so far, and the most that are passed on.
    read: usize,
    max_response: usize,
    ended: bool,
    log: StreamLog,
}

impl Relay {
    /// Usage as the provider reported it; what it did not report is counted from the stream.
    fn usage(&self) -> Usage {
        let counted = openai::count_tokens(self.translator.generated_bytes());
        match self.translator.reported_usage() {
            Some(u) if u.completion_tokens > 0 || counted == 0 => u,
            Some(u) => Usage {
                completion_tokens: counted,
                ..u
            },
            None => Usage::new(self.held.usage.prompt_tokens, counted),
        }
    }

    fn settle(&mut self, status: i32, note: &str) {
        let usage = self.usage();
        self.held.disarm();
        self.held.db.settle_soon(Settlement {
            reservation_id: self.held.reservation_id,
            status,
            usage,
            retry_after_ms: None,
            error_code: None,
            counters: self.held.counters,
        });
        if status == 200 {
            self.log.stats.served.fetch_add(1, Ordering::Relaxed);
        }
        let l = &self.log;
        info!(user = ?l.user, pool = ?l.pool, key_id = l.key_id, key = %l.key_label, provider = %l.provider,
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
    limits: (Duration, usize),
    log: StreamLog,
) -> BoxStream<'static, Result<Bytes, std::io::Error>> {
    let (idle_timeout, max_response) = limits;
    let state = Relay {
        upstream: Box::pin(response.bytes_stream()),
        parser: sse::Parser::default(),
        translator,
        pending: VecDeque::new(),
        held,
        idle_timeout,
        read: 0,
        max_response,
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
                Ok(Some(Ok(chunk))) if st.read + chunk.len() > st.max_response => {
                    st.translator.error(
                        &format!(
                            "the answer is larger than KEYPOOL_MAX_RESPONSE ({} bytes); cut here",
                            st.max_response
                        ),
                        &mut out,
                    );
                    st.settle(200, "stream cut: larger than KEYPOOL_MAX_RESPONSE");
                    st.ended = true;
                }
                Ok(Some(Ok(chunk))) => {
                    st.read += chunk.len();
                    match st.parser.feed(&chunk) {
                        Ok(events) => {
                            for ev in events {
                                st.translator.event(ev, &mut out);
                            }
                        }
                        Err(why) => {
                            st.translator
                                .error(&format!("the provider's stream is broken: {why}"), &mut out);
                            st.settle(200, "stream broken");
                            st.ended = true;
                        }
                    }
                }
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
                    st.translator.error("the provider's stream broke off", &mut out);
                    st.settle(200, "stream broke off");
                    st.ended = true;
                }
            }
            st.pending.extend(out);
        }
    })
    .boxed()
}
