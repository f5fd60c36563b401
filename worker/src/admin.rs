//! The JSON admin and user APIs (seed 000's `/allocation/...` routes) and `GET /metrics`.
//!
//! Admin routes need `Authorization: Bearer <admin token>` (KEYPOOL_ADMIN_TOKENS); without one
//! the answer is 401 and nothing is read. User routes accept an API token (or an admin token)
//! and report on the calling user (`X-Keypool-User`, else `?user=`, else the default user).
//! Every figure comes from the extension's views and functions, read when asked; admin answers
//! use the views' column names, the two user routes the field names of seed 000.

// Handlers return early with a ready HTTP answer; boxing it would only add noise (as in server.rs).
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_postgres::types::ToSql;

use crate::db::DbError;
use crate::server::{self, Endpoint};

pub fn router() -> Router<Arc<Endpoint>> {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/allocation/daily", get(daily))
        .route("/allocation/can-request", get(can_request))
        .route("/allocation/system-overview", get(overview))
        .route("/allocation/health", get(health))
        .route("/allocation/alerts", get(alerts))
        .route("/allocation/events", get(events))
        .route("/allocation/key-pool/stats", get(key_stats))
        .route("/allocation/key-pool/available", get(available))
        .route("/allocation/usage-report", get(usage_report))
        .route("/allocation/keys/{key_id}/disable", post(disable_key))
        .route("/allocation/keys/{key_id}/enable", post(enable_key))
        .route("/allocation/pools/{pool}/reset", post(reset_pool))
}

fn problem(status: StatusCode, message: &str, code: &str) -> Response {
    (status, axum::Json(json!({"error": {"message": message, "code": code}}))).into_response()
}

fn from_db(e: DbError) -> Response {
    let (status, code) = match e.sqlstate.as_deref() {
        Some("42704") => (StatusCode::NOT_FOUND, "not_found"),
        Some(s) if s.starts_with("22") => (StatusCode::BAD_REQUEST, "invalid_input"),
        Some("42501") => (StatusCode::FORBIDDEN, "insufficient_privilege"),
        None => (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable"),
        Some(_) => (StatusCode::INTERNAL_SERVER_ERROR, "database_error"),
    };
    let mut message = e.message.clone();
    if let Some(h) = &e.hint {
        message.push_str("; hint: ");
        message.push_str(h);
    }
    if code == "insufficient_privilege" {
        message.push_str(" (the worker's role needs the grants README's Roles section lists for the admin API)");
    }
    problem(status, &message, code)
}

/// Answers 401 unless an admin token was presented.
pub(crate) fn authorize_admin(ep: &Endpoint, headers: &HeaderMap) -> Result<(), Response> {
    if ep.insecure_no_auth {
        return Ok(());
    }
    match server::bearer(headers) {
        None => Err(problem(
            StatusCode::UNAUTHORIZED,
            "missing admin token: send `Authorization: Bearer <token>` with one of the worker's KEYPOOL_ADMIN_TOKENS",
            "invalid_admin_token",
        )),
        Some(t) if server::one_of(&ep.admin_tokens, t) => Ok(()),
        Some(_) => Err(problem(
            StatusCode::UNAUTHORIZED,
            "the token is not an admin token (one of the worker's KEYPOOL_ADMIN_TOKENS)",
            "invalid_admin_token",
        )),
    }
}

/// Answers 401 unless an API token or an admin token was presented.
fn authorize_user(ep: &Endpoint, headers: &HeaderMap) -> Result<(), Response> {
    if ep.insecure_no_auth {
        return Ok(());
    }
    match server::bearer(headers) {
        Some(t) if server::one_of(&ep.tokens, t) || server::one_of(&ep.admin_tokens, t) => Ok(()),
        _ => Err(problem(
            StatusCode::UNAUTHORIZED,
            "missing or unknown token: send `Authorization: Bearer <token>` with one of the worker's KEYPOOL_API_TOKENS",
            "invalid_api_key",
        )),
    }
}

/// Runs `sql` and answers with its rows as a JSON array (or the first row as an object).
async fn rows_json(ep: &Endpoint, sql: &str, params: &[&(dyn ToSql + Sync)], one: bool) -> Result<Value, Response> {
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

async fn metrics(State(ep): State<Arc<Endpoint>>) -> Response {
    let mut text = String::new();
    ep.gateway.metrics.render_own(&mut text);
    crate::metrics::render_database(&ep.gateway.db, &mut text).await;
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

/// The user and pool a user route reports on.
async fn user_and_pool(ep: &Endpoint, headers: &HeaderMap, q: &AllocationQuery) -> Result<(String, String), Response> {
    let user = server::user_of(ep, headers, q.user.as_deref())?;
    let pool = match &q.pool {
        Some(p) if !p.is_empty() => p.clone(),
        _ => ep.resolve_pool(headers, q.model.as_deref()).await?,
    };
    Ok((user, pool))
}

/// `GET /allocation/daily?model=...`: the calling user's share of the pool today.
async fn daily(State(ep): State<Arc<Endpoint>>, headers: HeaderMap, Query(q): Query<AllocationQuery>) -> Response {
    if let Err(r) = authorize_user(&ep, &headers) {
        return r;
    }
    let (user, pool) = match user_and_pool(&ep, &headers, &q).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let row = rows_json(
        &ep,
        "SELECT $1::text AS \"user\", $2::text AS pool, allocated_today AS \"allocatedRequestsToday\",
                used_today AS \"requestsUsedToday\", remaining_today AS \"requestsRemainingToday\",
                warning_level AS \"warningLevel\", resets_at AS \"resetsAt\",
                allocated_tokens_today AS \"allocatedTokensToday\"
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
    headers: HeaderMap,
    Query(q): Query<AllocationQuery>,
) -> Response {
    if let Err(r) = authorize_user(&ep, &headers) {
        return r;
    }
    let (user, pool) = match user_and_pool(&ep, &headers, &q).await {
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

/// Admin route: answers `build`'s JSON, or 401 before anything is read.
async fn admin<F, Fut>(ep: Arc<Endpoint>, headers: HeaderMap, build: F) -> Response
where
    F: FnOnce(Arc<Endpoint>) -> Fut,
    Fut: std::future::Future<Output = Result<Value, Response>>,
{
    if let Err(r) = authorize_admin(&ep, &headers) {
        return r;
    }
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
async fn overview(State(ep): State<Arc<Endpoint>>, headers: HeaderMap) -> Response {
    admin(ep, headers, |ep| async move {
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

async fn health(State(ep): State<Arc<Endpoint>>, headers: HeaderMap) -> Response {
    admin(ep, headers, |ep| async move { rows_json(&ep, HEALTH, &[], true).await }).await
}

async fn alerts(State(ep): State<Arc<Endpoint>>, headers: HeaderMap) -> Response {
    admin(
        ep,
        headers,
        |ep| async move { rows_json(&ep, ALERTS, &[], false).await },
    )
    .await
}

#[derive(Deserialize)]
struct EventsQuery {
    limit: Option<i64>,
}

async fn events(State(ep): State<Arc<Endpoint>>, headers: HeaderMap, Query(q): Query<EventsQuery>) -> Response {
    admin(ep, headers, |ep| async move {
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
async fn key_stats(State(ep): State<Arc<Endpoint>>, headers: HeaderMap, Query(q): Query<PoolQuery>) -> Response {
    admin(ep, headers, |ep| async move {
        rows_json(&ep, KEY_STATS, &[&q.pool], false).await
    })
    .await
}

/// `GET /allocation/key-pool/available[?pool=]`: keys that can take a request now.
async fn available(State(ep): State<Arc<Endpoint>>, headers: HeaderMap, Query(q): Query<PoolQuery>) -> Response {
    admin(ep, headers, |ep| async move {
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
async fn usage_report(State(ep): State<Arc<Endpoint>>, headers: HeaderMap, Query(q): Query<ReportQuery>) -> Response {
    admin(ep, headers, |ep| async move {
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
struct DisableBody {
    reason: Option<String>,
}

/// `POST /allocation/keys/{key_id}/disable` with an optional `{"reason": "..."}`.
async fn disable_key(
    State(ep): State<Arc<Endpoint>>,
    headers: HeaderMap,
    Path(key_id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    admin(ep, headers, |ep| async move {
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
async fn enable_key(State(ep): State<Arc<Endpoint>>, headers: HeaderMap, Path(key_id): Path<String>) -> Response {
    admin(ep, headers, |ep| async move {
        let key_id = key_number(&key_id)?;
        act(&ep, "SELECT keypool_enable_key($1)", &[&key_id]).await?;
        rows_json(&ep, KEY_AFTER, &[&key_id], true).await
    })
    .await
}

/// `POST /allocation/pools/{pool}/reset`: keypool_reset_usage(pool).
async fn reset_pool(State(ep): State<Arc<Endpoint>>, headers: HeaderMap, Path(pool): Path<String>) -> Response {
    admin(ep, headers, |ep| async move {
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
const KEY_AFTER: &str = "SELECT key_id, pool, label, state, reason FROM keypool_keys WHERE key_id = $1";

/// Runs an admin action in its own statement, so that what is read next sees its effect.
async fn act(ep: &Endpoint, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<(), Response> {
    let client = ep.gateway.db.client().await.map_err(from_db)?;
    client.execute(sql, params).await.map_err(|e| from_db(e.into()))?;
    Ok(())
}

fn key_number(text: &str) -> Result<i64, Response> {
    text.parse::<i64>().map_err(|_| {
        problem(
            StatusCode::BAD_REQUEST,
            &format!("key id must be a number, not {text:?}"),
            "invalid_input",
        )
    })
}
