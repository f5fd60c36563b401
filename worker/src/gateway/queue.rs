//! The SQL request queue's consumer. It claims due requests (`keypool_claim_requests`, SKIP
//! LOCKED under a lease), carries each out like an HTTP request, and records how it ended
//! (`keypool_complete_request`). NOTIFY keypool_requests wakes it; when idle it sleeps until the
//! next request falls due or lease runs out (`keypool_queue_wake_at`), never polling faster.
//!
//! How a request ends: an answer is 'done'; QUOTA_EXCEEDED, BUDGET_EXCEEDED, NO_KEYS, caller
//! errors and unknown pools are 'failed' at once; POOL_EXHAUSTED and USER_RATE_LIMITED wait for
//! capacity without counting an attempt (up to the request's deadline); provider failures on every key are retried later, up to the
//! request's max_attempts. On shutdown, requests still running after the grace period go back
//! to the queue without counting an attempt.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio_postgres::AsyncMessage;
use tracing::{debug, info, warn};

use crate::db::DbError;
use crate::gateway::{Answer, ChatJob, Failure, Gateway};
use crate::protocol::inbound::Inbound;
use crate::protocol::openai::{check_model_name, ChatRequest};
use bytes::Bytes;
use serde_json::value::RawValue;
use tokio_postgres::types::Json;

#[derive(Clone, Debug)]
pub struct Settings {
    pub worker_id: String,
    pub concurrency: usize,
    pub lease: Duration,
    pub poll: Duration,
    pub request_deadline: Duration,
    pub grace: Duration,
}

struct Claimed {
    id: i64,
    user_id: String,
    pool: String,
    /// The request as JSON text: parsed with bounded memory, as an HTTP body is.
    request: String,
    attempts: i32,
}

/// How a request ended, for `keypool_complete_request`.
struct Completion {
    outcome: &'static str,
    /// The answer as it came (checked to be JSON), stored as jsonb.
    response: Option<Box<RawValue>>,
    error: Option<String>,
    retry_at: Option<SystemTime>,
}

/// Keeps a LISTEN connection open (reconnecting when it drops) and wakes the consumer on every
/// notification.
async fn listen(db: crate::db::Db, wake: Arc<Notify>, mut shutdown: watch::Receiver<bool>) {
    let mut delay = Duration::from_millis(200);
    loop {
        if *shutdown.borrow() {
            return;
        }
        match db.dedicated().await {
            Ok((client, mut connection)) => {
                let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                let listening = async {
                    client.batch_execute("LISTEN keypool_requests").await?;
                    Ok::<_, tokio_postgres::Error>(())
                };
                // The connection must be polled for LISTEN to complete.
                let mut listening = std::pin::pin!(listening);
                let mut ready = false;
                loop {
                    tokio::select! {
                        r = &mut listening, if !ready => {
                            match r {
                                Ok(()) => {
                                    ready = true;
                                    delay = Duration::from_millis(200);
                                    // Anything queued while not listening.
                                    wake.notify_one();
                                }
                                Err(e) => {
                                    warn!(error = %DbError::from(e), "LISTEN keypool_requests failed");
                                    break;
                                }
                            }
                        }
                        m = messages.next() => match m {
                            Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
                            Some(Ok(_)) => {}
                            Some(Err(e)) => {
                                warn!(error = %DbError::from(e), "queue listener lost its connection; reconnecting");
                                break;
                            }
                            None => break,
                        },
                        _ = shutdown.changed() => return,
                    }
                }
            }
            Err(e) => warn!(error = %DbError::from(e), "queue listener cannot connect; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
        delay = (delay * 2).min(Duration::from_secs(10));
        // Requests may have arrived meanwhile.
        wake.notify_one();
    }
}

/// Runs the consumer until `shutdown` turns true, then finishes or returns its requests.
pub async fn run(gateway: Arc<Gateway>, settings: Settings, mut shutdown: watch::Receiver<bool>) {
    let wake = Arc::new(Notify::new());
    let listener = tokio::spawn(listen(gateway.db.clone(), wake.clone(), shutdown.clone()));
    let in_flight: Arc<Mutex<HashSet<i64>>> = Arc::default();
    let mut tasks: JoinSet<()> = JoinSet::new();
    info!(worker = %settings.worker_id, concurrency = settings.concurrency, "queue consumer started");

    loop {
        if *shutdown.borrow() {
            break;
        }
        while tasks.try_join_next().is_some() {}
        let free = settings.concurrency.saturating_sub(tasks.len());
        let mut claimed_all = false;
        if free > 0 {
            match claim(&gateway, &settings, free).await {
                Ok(batch) => {
                    claimed_all = batch.len() == free;
                    for c in batch {
                        if let Ok(mut set) = in_flight.lock() {
                            set.insert(c.id);
                        }
                        let (g, s, set) = (gateway.clone(), settings.clone(), in_flight.clone());
                        tasks.spawn(async move {
                            let id = c.id;
                            carry_out(&g, &s, c).await;
                            if let Ok(mut set) = set.lock() {
                                set.remove(&id);
                            }
                        });
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot claim requests; retrying in 1 s");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.changed() => {}
                    }
                    continue;
                }
            }
        }
        if claimed_all {
            // There may be more: claim again once a slot frees up.
            if tasks.len() >= settings.concurrency {
                tokio::select! {
                    _ = tasks.join_next() => {}
                    _ = shutdown.changed() => {}
                }
            }
            continue;
        }
        // Idle (or full): sleep until woken, a slot frees up, or the next request falls due.
        let sleep_for = next_due(&gateway).await.unwrap_or(settings.poll).min(settings.poll);
        let notified = wake.notified();
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(sleep_for) => {}
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = shutdown.changed() => {}
        }
    }

    // Shutting down: no more claims; let running requests finish within the grace period.
    let pending = tasks.len();
    if pending > 0 {
        info!(
            requests = pending,
            grace_ms = settings.grace.as_millis() as u64,
            "waiting for queued requests in flight"
        );
    }
    let drained = tokio::time::timeout(settings.grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        let left: Vec<i64> = in_flight
            .lock()
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        for id in left {
            let back = Completion {
                outcome: "wait",
                response: None,
                error: Some(format!(
                    "worker {} stopped before the request finished",
                    settings.worker_id
                )),
                retry_at: Some(SystemTime::now()),
            };
            match complete(&gateway, &settings, id, back).await {
                Ok(_) => info!(request = id, "returned to the queue"),
                Err(e) => {
                    warn!(request = id, error = %e, "cannot return the request; another worker takes it after its lease")
                }
            }
        }
    }
    listener.abort();
}

async fn claim(gateway: &Gateway, settings: &Settings, n: usize) -> Result<Vec<Claimed>, DbError> {
    let client = gateway.db.client().await?;
    let stmt = client
        .prepare_cached(
            "SELECT id, user_id, pool, request::text, attempts \
             FROM keypool_claim_requests($1, $2, make_interval(secs => $3))",
        )
        .await?;
    let rows = client
        .query(
            &stmt,
            &[
                &settings.worker_id,
                &(n.min(i32::MAX as usize) as i32),
                &settings.lease.as_secs_f64(),
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Claimed {
            id: r.get(0),
            user_id: r.get(1),
            pool: r.get(2),
            request: r.get(3),
            attempts: r.get(4),
        })
        .collect())
}

/// How long until something in the queue falls due.
async fn next_due(gateway: &Gateway) -> Option<Duration> {
    let client = gateway.db.client().await.ok()?;
    let row = client.query_one("SELECT keypool_queue_wake_at()", &[]).await.ok()?;
    let at: Option<SystemTime> = row.get(0);
    let at = at?;
    // Slightly after, so that the request is due when the claim runs.
    Some(at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO) + Duration::from_millis(20))
}

async fn complete(gateway: &Gateway, settings: &Settings, id: i64, c: Completion) -> Result<bool, DbError> {
    let client = gateway.db.client().await?;
    let stmt = client
        .prepare_cached("SELECT keypool_complete_request($1, $2, $3, $4, $5, $6)")
        .await?;
    let row = client
        .query_one(
            &stmt,
            &[
                &id,
                &settings.worker_id,
                &c.outcome,
                &c.response.as_deref().map(Json),
                &c.error,
                &c.retry_at,
            ],
        )
        .await?;
    Ok(row.get(0))
}

fn backoff(attempts: i32) -> Duration {
    Duration::from_secs(1u64 << attempts.clamp(0, 6) as u32)
}

async fn carry_out(gateway: &Gateway, settings: &Settings, c: Claimed) {
    let started = Instant::now();
    let parsed = ChatRequest::parse(Bytes::from(c.request.clone().into_bytes())).and_then(|r| {
        // A model other than the pool may reach the provider's URL.
        match r.model() {
            Some(m) if m != c.pool => check_model_name(m).map(|_| r),
            _ => Ok(r),
        }
    });
    let completion = match parsed {
        Err(m) => Completion {
            outcome: "failed",
            response: None,
            error: Some(format!("invalid request: {m}")),
            retry_at: None,
        },
        Ok(request) => {
            // The request must end well before the lease, or another worker would take it.
            let budget = settings
                .request_deadline
                .min(settings.lease.saturating_sub(Duration::from_secs(5)));
            let job = ChatJob {
                user: c.user_id.clone(),
                pool: c.pool.clone(),
                reach: crate::db::Reach::default(),
                request: Inbound::Chat(request),
                stream: false,
                deadline: Instant::now() + budget,
                capacity_wait: Duration::ZERO,
            };
            match gateway.chat(job).await {
                Ok(Answer::Complete { body, served }) => match serde_json::from_slice::<Box<RawValue>>(&body) {
                    Ok(v) => {
                        debug!(request = c.id, key_id = served.key_id, "queued request done");
                        Completion {
                            outcome: "done",
                            response: Some(v),
                            error: None,
                            retry_at: None,
                        }
                    }
                    Err(e) => Completion {
                        outcome: "failed",
                        response: None,
                        error: Some(format!("the answer is not JSON: {e}")),
                        retry_at: None,
                    },
                },
                Ok(Answer::Stream { .. }) => Completion {
                    outcome: "failed",
                    response: None,
                    error: Some("internal: a stream for a queued request".into()),
                    retry_at: None,
                },
                Err(f) => settle_failure(&c, f),
            }
        }
    };
    let outcome = completion.outcome;
    match complete(gateway, settings, c.id, completion).await {
        Ok(true) => {
            if outcome == "done" {
                gateway.stats.queue_done.fetch_add(1, Ordering::Relaxed);
            }
            info!(request = c.id, user = ?c.user_id, pool = ?c.pool, outcome, attempt = c.attempts,
                  ms = started.elapsed().as_millis() as u64, "queued request");
        }
        Ok(false) => warn!(
            request = c.id,
            "the request's lease ran out and another worker took it; this result is dropped"
        ),
        Err(e) => warn!(request = c.id, error = %e, "cannot record the result; the request is retried after its lease"),
    }
}

fn settle_failure(c: &Claimed, f: Failure) -> Completion {
    let text = f.describe();
    let in_ms = |ms: i64| SystemTime::now() + Duration::from_millis(ms.max(0) as u64);
    match f {
        Failure::Refused { ref refusal, .. }
            if matches!(refusal.code.as_str(), "POOL_EXHAUSTED" | "USER_RATE_LIMITED") =>
        {
            Completion {
                outcome: "wait",
                response: None,
                error: Some(text),
                retry_at: Some(in_ms(refusal.retry_after_ms.unwrap_or(1000).max(50))),
            }
        }
        Failure::Exhausted { retry_after_ms, .. } => Completion {
            outcome: "retry",
            response: None,
            error: Some(text),
            retry_at: Some(
                SystemTime::now()
                    + backoff(c.attempts).max(Duration::from_millis(retry_after_ms.unwrap_or(0).max(0) as u64)),
            ),
        },
        Failure::Database(_) => Completion {
            outcome: "retry",
            response: None,
            error: Some(text),
            retry_at: Some(SystemTime::now() + backoff(c.attempts)),
        },
        _ => Completion {
            outcome: "failed",
            response: None,
            error: Some(text),
            retry_at: None,
        },
    }
}
