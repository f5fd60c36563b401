//! The JSON admin and user APIs (seed 000's `/allocation/...` routes) and `GET /metrics`.
//!
//! Admin routes need `Authorization: Bearer <admin token>` (KEYPOOL_ADMIN_TOKENS), checked by
//! `auth::admin` before anything is read, even with `--insecure-no-auth`. User routes accept an
//! API token (or an admin token) and report on the calling user: a token's own user, else
//! `X-Keypool-User`, else `?user=`, else the default user. `/metrics` needs
//! KEYPOOL_METRICS_TOKEN when it is set, and reads the database at most once a second.
//! Every figure comes from the extension's views and functions, read when asked; admin answers
//! use the views' column names, the two user routes the field names of seed 000.

// Handlers return early with a ready HTTP answer; boxing it would only add noise (as in server.rs).
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_postgres::types::ToSql;

use crate::http::credentials::Principal;
use crate::http::endpoint::Endpoint;
use crate::http::problem::{from_db, problem};

/// The user API: the calling user's own share.
pub fn user_router() -> Router<Arc<Endpoint>> {
    Router::new()
        .route("/allocation/daily", get(daily))
        .route("/allocation/can-request", get(can_request))
}

/// The admin API (the caller's admin token is checked by the layer `server::router` puts on it).
pub fn admin_router() -> Router<Arc<Endpoint>> {
    Router::new()
        .route("/allocation/system-overview", get(overview))
        .route("/allocation/health", get(health))
        .route("/allocation/alerts", get(alerts))
        .route("/allocation/events", get(events))
        .route("/allocation/failures", get(failures))
        .route("/allocation/key-pool/stats", get(key_stats))
        .route("/allocation/key-pool/available", get(available))
        .route("/allocation/usage-report", get(usage_report))
        .route("/allocation/usage-series", get(usage_series))
        .route("/allocation/keys/{key_id}/disable", post(disable_key))
        .route("/allocation/keys/{key_id}/enable", post(enable_key))
        .route("/allocation/pools/{pool}/reset", post(reset_pool))
}

/// Runs `sql` and answers with its rows as a JSON array (or the first row as an object).
pub(crate) async fn rows_json(
    ep: &Endpoint,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    one: bool,
) -> Result<Value, Response> {
    let client = ep.gateway.db.client().await.map_err(from_db)?;
    let wrapped = if one {
        format!("SELECT coalesce((SELECT row_to_json(t) FROM ({sql}) t LIMIT 1), 'null'::json)::text")
    } else {
        format!("SELECT coalesce(json_agg(t), '[]'::json)::text FROM ({sql}) t")
    };
    let row = client
        .query_one(&wrapped, params)
        .await
        .map_err(|e| from_db(e.into()))?;
    let text: String = row.get(0);
    serde_json::from_str(&text).map_err(|e| {
        problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot read the database's JSON: {e}"),
            "database_error",
        )
    })
}

fn ok(v: Value) -> Response {
    (StatusCode::OK, axum::Json(v)).into_response()
}

/// How long the database part of a scrape is reused.
const METRICS_DB_TTL: Duration = Duration::from_secs(1);

/// `GET /metrics`: the worker's own counters, and the pools' figures from the database (computed
/// at most once per [`METRICS_DB_TTL`], however many scrape).
pub async fn metrics(State(ep): State<Arc<Endpoint>>, headers: HeaderMap) -> Response {
    if let Some(token) = &ep.metrics_token {
        let presented = crate::http::credentials::bearer(&headers);
        if !presented.is_some_and(|t| {
            crate::http::credentials::one_of(std::slice::from_ref(token), t)
                || crate::http::credentials::one_of(&ep.admin_tokens, t)
        }) {
            return problem(
                StatusCode::UNAUTHORIZED,
                "scrapes need `Authorization: Bearer <KEYPOOL_METRICS_TOKEN>`",
                "invalid_metrics_token",
            );
        }
    }
    let mut text = String::new();
    ep.gateway.metrics.render_own(&mut text);
    {
        // Scrapes that arrive while one reads the database wait for it and share its answer.
        let mut cached = ep.metrics_cache.lock().await;
        let fresh = cached.as_ref().is_some_and(|(at, _)| at.elapsed() < METRICS_DB_TTL);
        if !fresh {
            tracing::debug!("metrics: read the database");
            let mut db_part = String::new();
            crate::gateway::metrics::render_database(&ep.gateway.db, &mut db_part).await;
            *cached = Some((Instant::now(), db_part));
        }
        if let Some((_, db_part)) = cached.as_ref() {
            text.push_str(db_part);
        }
    }
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")
        .body(Body::from(text))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[derive(Deserialize)]
struct AllocationQuery {
    model: Option<String>,
    pool: Option<String>,
    user: Option<String>,
}

/// The user and pool a user route reports on: a token bound to a user reports on that user
/// only, a token bound to pools on those pools only.
async fn user_and_pool(
    ep: &Endpoint,
    principal: &Principal,
    headers: &HeaderMap,
    q: &AllocationQuery,
) -> Result<(String, String), Response> {
    let user = crate::http::endpoint::user_of(ep, principal, headers, q.user.as_deref())?;
    let model = q.pool.as_deref().filter(|p| !p.is_empty()).or(q.model.as_deref());
    let pool = ep.resolve_pool(principal, headers, model).await?;
    Ok((user, pool))
}

/// `GET /allocation/daily?model=...`: the calling user's share of the pool today, their spend
/// and budget this period when the pool has a budget, and their minute when the pool limits it.
async fn daily(
    State(ep): State<Arc<Endpoint>>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    Query(q): Query<AllocationQuery>,
) -> Response {
    let (user, pool) = match user_and_pool(&ep, &principal, &headers, &q).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let row = rows_json(
        &ep,
        "SELECT $1::text AS \"user\", $2::text AS pool, allocated_today AS \"allocatedRequestsToday\",
                used_today AS \"requestsUsedToday\", remaining_today AS \"requestsRemainingToday\",
                warning_level AS \"warningLevel\", resets_at AS \"resetsAt\",
                allocated_tokens_today AS \"allocatedTokensToday\",
                spent AS \"spentThisPeriod\", budget AS \"budget\", budget_resets_at AS \"budgetResetsAt\",
                requests_this_minute AS \"requestsThisMinute\", minute_request_limit AS \"minuteRequestLimit\",
                tokens_this_minute AS \"tokensThisMinute\", minute_token_limit AS \"minuteTokenLimit\",
                open_reservations AS \"openReservations\"
           FROM keypool_allocation($1, $2)",
        &[&user, &pool],
        true,
    )
    .await;
    match row {
        Ok(v) => ok(v),
        Err(r) => r,
    }
}

/// `GET /allocation/can-request?model=...`: whether a request by the calling user would now be
/// granted a share (and the pool has a usable key). Reserves nothing.
async fn can_request(
    State(ep): State<Arc<Endpoint>>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    Query(q): Query<AllocationQuery>,
) -> Response {
    let (user, pool) = match user_and_pool(&ep, &principal, &headers, &q).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let row = rows_json(
        &ep,
        "SELECT $1::text AS \"user\", $2::text AS pool, keypool_can_request($1, $2) AS \"canRequest\",
                a.remaining_today AS \"requestsRemainingToday\", a.warning_level AS \"warningLevel\",
                a.resets_at AS \"resetsAt\"
           FROM keypool_allocation($1, $2) a",
        &[&user, &pool],
        true,
    )
    .await;
    match row {
        Ok(v) => ok(v),
        Err(r) => r,
    }
}

/// Admin route: answers `build`'s JSON (the admin token was checked by `auth::admin`).
pub(crate) async fn admin<F, Fut>(ep: Arc<Endpoint>, build: F) -> Response
where
    F: FnOnce(Arc<Endpoint>) -> Fut,
    Fut: std::future::Future<Output = Result<Value, Response>>,
{
    match build(ep).await {
        Ok(v) => ok(v),
        Err(r) => r,
    }
}

const HEALTH: &str = "SELECT * FROM keypool_health";
const POOLS: &str = "SELECT * FROM keypool_pool_stats ORDER BY pool";
const ALERTS: &str = "SELECT * FROM keypool_alerts ORDER BY severity DESC, kind, pool, key_id";
const WORKERS: &str = "SELECT * FROM keypool_workers ORDER BY id";
const EVENTS: &str = "SELECT * FROM keypool_events ORDER BY id DESC LIMIT $1";
const KEY_STATS: &str = "SELECT * FROM keypool_key_stats WHERE $1::text IS NULL OR pool = $1 ORDER BY pool, key_id";

/// `GET /allocation/system-overview`: health, pools, alerts, workers and the latest events.
async fn overview(State(ep): State<Arc<Endpoint>>) -> Response {
    admin(ep, |ep| async move {
        let limit: i64 = 20;
        Ok(json!({
            "health": rows_json(&ep, HEALTH, &[], true).await?,
            "pools": rows_json(&ep, POOLS, &[], false).await?,
            "alerts": rows_json(&ep, ALERTS, &[], false).await?,
            "workers": rows_json(&ep, WORKERS, &[], false).await?,
            "recent_events": rows_json(&ep, EVENTS, &[&limit], false).await?,
        }))
    })
    .await
}

async fn health(State(ep): State<Arc<Endpoint>>) -> Response {
    admin(ep, |ep| async move { rows_json(&ep, HEALTH, &[], true).await }).await
}

async fn alerts(State(ep): State<Arc<Endpoint>>) -> Response {
    admin(ep, |ep| async move { rows_json(&ep, ALERTS, &[], false).await }).await
}

/// `GET /allocation/failures`: this worker's last requests that every attempt failed for, with
/// what each attempt ran into (callers are told only a generic reason), newest first.
async fn failures(State(ep): State<Arc<Endpoint>>) -> Response {
    axum::Json(Value::Array(ep.gateway.failures.list())).into_response()
}

#[derive(Deserialize)]
struct EventsQuery {
    limit: Option<i64>,
}

async fn events(State(ep): State<Arc<Endpoint>>, Query(q): Query<EventsQuery>) -> Response {
    admin(ep, |ep| async move {
        let limit = q.limit.unwrap_or(50).clamp(1, 1000);
        rows_json(&ep, EVENTS, &[&limit], false).await
    })
    .await
}

#[derive(Deserialize)]
struct PoolQuery {
    pool: Option<String>,
}

/// `GET /allocation/key-pool/stats[?pool=]`: every key's use against its limits.
async fn key_stats(State(ep): State<Arc<Endpoint>>, Query(q): Query<PoolQuery>) -> Response {
    admin(
        ep,
        |ep| async move { rows_json(&ep, KEY_STATS, &[&q.pool], false).await },
    )
    .await
}

/// `GET /allocation/key-pool/available[?pool=]`: keys that can take a request now.
async fn available(State(ep): State<Arc<Endpoint>>, Query(q): Query<PoolQuery>) -> Response {
    admin(ep, |ep| async move {
        rows_json(
            &ep,
            "SELECT key_id, pool, provider, model, account, label, group_no, users, last_used_at
               FROM keypool_keys WHERE state = 'active' AND ($1::text IS NULL OR pool = $1) ORDER BY pool, key_id",
            &[&q.pool],
            false,
        )
        .await
    })
    .await
}

#[derive(Deserialize)]
struct ReportQuery {
    from: Option<String>,
    to: Option<String>,
}

fn day(name: &str, v: Option<&str>) -> Result<Option<String>, Response> {
    match v {
        None | Some("") => Ok(None),
        Some(d) if d.len() == 10 && d.chars().all(|c| c.is_ascii_digit() || c == '-') => Ok(Some(d.to_string())),
        Some(d) => Err(problem(
            StatusCode::BAD_REQUEST,
            &format!("`{name}` must be a date like 2026-11-23, not {d:?}"),
            "invalid_input",
        )),
    }
}

/// `GET /allocation/usage-report?from=&to=`: per key per day, with estimated cost (default:
/// the last 7 days).
async fn usage_report(State(ep): State<Arc<Endpoint>>, Query(q): Query<ReportQuery>) -> Response {
    admin(ep, |ep| async move {
        let from = day("from", q.from.as_deref())?;
        let to = day("to", q.to.as_deref())?;
        rows_json(
            &ep,
            "SELECT * FROM keypool_usage_report(coalesce($1::text::date, (keypool_now() AT TIME ZONE 'UTC')::date - 6),
                                                coalesce($2::text::date, (keypool_now() AT TIME ZONE 'UTC')::date))
              ORDER BY day, pool, key_id",
            &[&from, &to],
            false,
        )
        .await
    })
    .await
}

#[derive(Deserialize, Default)]
struct SeriesQuery {
    hours: Option<String>,
}

/// Longest series the dashboard asks for: 31 days of hours.
const MAX_SERIES_HOURS: i32 = 744;

/// `GET /allocation/usage-series?hours=24`: per pool per hour of the last `hours` (1 to 744,
/// default 24) from the hourly history: requests, tokens, estimated cost (the dashboard's charts).
async fn usage_series(State(ep): State<Arc<Endpoint>>, Query(q): Query<SeriesQuery>) -> Response {
    admin(ep, |ep| async move {
        let hours: i32 = match q.hours.as_deref() {
            None => 24,
            Some(h) => match h.parse::<i32>() {
                Ok(n) if (1..=MAX_SERIES_HOURS).contains(&n) => n,
                _ => {
                    return Err(problem(
                        StatusCode::BAD_REQUEST,
                        &format!("hours must be a whole number from 1 to {MAX_SERIES_HOURS}"),
                        "invalid_hours",
                    ))
                }
            },
        };
        rows_json(
            &ep,
            "SELECT pool, (extract(epoch FROM hour))::bigint AS hour, sum(requests)::bigint AS requests,
                    sum(prompt_tokens + completion_tokens)::bigint AS tokens, sum(estimated_cost) AS cost
               FROM keypool_usage
              WHERE hour > date_trunc('hour', keypool_now()) - make_interval(hours => $1)
              GROUP BY pool, hour ORDER BY pool, hour",
            &[&hours],
            false,
        )
        .await
    })
    .await
}

#[derive(Deserialize, Default)]
struct DisableBody {
    reason: Option<String>,
}

/// `POST /allocation/keys/{key_id}/disable` with an optional `{"reason": "..."}`.
async fn disable_key(State(ep): State<Arc<Endpoint>>, Path(key_id): Path<String>, body: axum::body::Bytes) -> Response {
    admin(ep, |ep| async move {
        let key_id = key_number(&key_id)?;
        let body: DisableBody = if body.is_empty() {
            DisableBody::default()
        } else {
            serde_json::from_slice(&body).map_err(|e| {
                problem(
                    StatusCode::BAD_REQUEST,
                    &format!("the body must be {{\"reason\": \"...\"}}: {e}"),
                    "invalid_input",
                )
            })?
        };
        let reason = body.reason.unwrap_or_else(|| "disabled from the dashboard".into());
        act(&ep, "SELECT keypool_disable_key($1, $2)", &[&key_id, &reason]).await?;
        rows_json(&ep, KEY_AFTER, &[&key_id], true).await
    })
    .await
}

/// `POST /allocation/keys/{key_id}/enable`.
async fn enable_key(State(ep): State<Arc<Endpoint>>, Path(key_id): Path<String>) -> Response {
    admin(ep, |ep| async move {
        let key_id = key_number(&key_id)?;
        act(&ep, "SELECT keypool_enable_key($1)", &[&key_id]).await?;
        rows_json(&ep, KEY_AFTER, &[&key_id], true).await
    })
    .await
}

/// `POST /allocation/pools/{pool}/reset`: keypool_reset_usage(pool).
async fn reset_pool(State(ep): State<Arc<Endpoint>>, Path(pool): Path<String>) -> Response {
    admin(ep, |ep| async move {
        rows_json(
            &ep,
            "SELECT $1::text AS pool, keypool_reset_usage($1) AS reset",
            &[&pool],
            true,
        )
        .await
    })
    .await
}

/// A key as an action left it.
pub(crate) const KEY_AFTER: &str = "SELECT key_id, pool, label, state, reason FROM keypool_keys WHERE key_id = $1";

/// Runs an admin action in its own statement, so that what is read next sees its effect.
pub(crate) async fn act(ep: &Endpoint, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<(), Response> {
    let client = ep.gateway.db.client().await.map_err(from_db)?;
    client.execute(sql, params).await.map_err(|e| from_db(e.into()))?;
    Ok(())
}

pub(crate) fn key_number(text: &str) -> Result<i64, Response> {
    text.parse::<i64>().map_err(|_| {
        problem(
            StatusCode::BAD_REQUEST,
            &format!("key id must be a number, not {text:?}"),
            "invalid_input",
        )
    })
}
