//! The authentication layers the router puts on each group of routes (server.rs): who is calling
//! is decided from the request's headers (credentials.rs) before its body is read; the
//! admin API never opens without an admin token, even with `--insecure-no-auth`.

// Refusals are ready HTTP answers; boxing them would only add noise (as in server.rs).
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use tokio::sync::OwnedSemaphorePermit;

use crate::http::credentials::{bearer, one_of, presented_token, refuse, LookupError, Principal};
use crate::http::endpoint::{holding, CallerPermit, Endpoint};

/// Middleware of the API routes: decides who is calling from the headers (the body is not read
/// yet) and hands the [`Principal`] to the handler, or answers 401.
pub async fn api(State(ep): State<Arc<Endpoint>>, request: Request, next: Next) -> Response {
    with_principal(&ep, false, request, next).await
}

/// Middleware of the user API (`/allocation/daily`, `/can-request`): as [`api`], and admin
/// tokens are accepted as service tokens.
pub async fn user_api(State(ep): State<Arc<Endpoint>>, request: Request, next: Next) -> Response {
    with_principal(&ep, true, request, next).await
}

async fn with_principal(ep: &Endpoint, admin_ok: bool, mut request: Request, next: Next) -> Response {
    let principal = match principal(ep, request.headers(), request.method(), admin_ok).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    // Admitted only now that the caller is known: a token lookup that waits holds no slot.
    let global = match admit(ep) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let mut callers = Vec::new();
    for c in principal.callers() {
        match admit_caller(ep, c) {
            Ok(p) => callers.push(p),
            Err(r) => return r,
        }
    }
    request.extensions_mut().insert(principal);
    holding(next.run(request).await, (global, callers))
}

/// One of the KEYPOOL_MAX_IN_FLIGHT slots, or 503 at once.
pub(crate) fn admit(ep: &Endpoint) -> Result<OwnedSemaphorePermit, Response> {
    ep.in_flight.clone().try_acquire_owned().map_err(|_| {
        let mut r = refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "the worker is handling {} requests (KEYPOOL_MAX_IN_FLIGHT); try again shortly",
                ep.max_in_flight
            ),
            "overloaded",
        );
        r.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
        r
    })
}

/// One of a caller's KEYPOOL_MAX_IN_FLIGHT_PER_CALLER slots, or 429 at once.
pub(crate) fn admit_caller(ep: &Endpoint, caller: String) -> Result<CallerPermit, Response> {
    ep.per_caller.try_acquire(caller).ok_or_else(|| {
        let mut r = refuse(
            StatusCode::TOO_MANY_REQUESTS,
            &format!(
                "you have {} requests in flight, the most one caller may (KEYPOOL_MAX_IN_FLIGHT_PER_CALLER)",
                ep.per_caller.max()
            ),
            "too_many_concurrent_requests",
        );
        r.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
        r
    })
}

/// Whether a request without a token may be served under `--insecure-no-auth`: it must name a
/// loopback host (a web page's request to the worker names the page's host, or an address it
/// rebound to ours) and carry no body other than JSON (a web page can post a plain form or text
/// to any address without asking, but never JSON).
fn open_request_allowed(headers: &HeaderMap, method: &Method) -> Result<(), Response> {
    let host = headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("");
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    if !matches!(name.to_ascii_lowercase().as_str(), "localhost" | "127.0.0.1" | "::1") {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "without a token (--insecure-no-auth) the worker serves only requests to a loopback host (localhost, 127.0.0.1, [::1])",
            "forbidden_host",
        ));
    }
    // A browser says where a request comes from: another site's page (an <img>, a form, a
    // fetch) is refused whatever the method.
    let cross_site = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("cross-site"));
    let foreign_origin = headers.get("origin").is_some_and(|o| {
        let o = o.to_str().unwrap_or("");
        let host = o.split("://").nth(1).unwrap_or("");
        let name = match host.strip_prefix('[') {
            Some(rest) => rest.split(']').next().unwrap_or(""),
            None => host.rsplit_once(':').map_or(host, |(h, _)| h),
        };
        !matches!(name.to_ascii_lowercase().as_str(), "localhost" | "127.0.0.1" | "::1")
    });
    if cross_site || foreign_origin || *method == Method::OPTIONS {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "without a token (--insecure-no-auth) the worker serves no request from another site's page",
            "forbidden_origin",
        ));
    }
    let has_body = !matches!(*method, Method::GET | Method::HEAD);
    let json = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if has_body && !json {
        return Err(refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "without a token (--insecure-no-auth) request bodies must be sent as Content-Type: application/json",
            "unsupported_media_type",
        ));
    }
    Ok(())
}

async fn principal(ep: &Endpoint, headers: &HeaderMap, method: &Method, admin_ok: bool) -> Result<Principal, Response> {
    let token = presented_token(headers);
    if let Some(t) = token {
        if one_of(&ep.tokens, t) || (admin_ok && one_of(&ep.admin_tokens, t)) {
            return Ok(Principal::Service);
        }
    }
    if ep.insecure_no_auth && token.is_none() {
        open_request_allowed(headers, method)?;
        return Ok(Principal::Open);
    }
    let Some(token) = token else {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "missing API token: send `Authorization: Bearer <token>` (or `x-api-key`)",
            "invalid_api_key",
        ));
    };
    match ep.token_cache.grant(&ep.gateway.db, token).await {
        Ok(Some(g)) if g.expires_at.is_none_or(|at| at > SystemTime::now()) => Ok(Principal::Token(g)),
        Ok(_) => Err(refuse(
            StatusCode::UNAUTHORIZED,
            "the API token is not valid (unknown, revoked or expired)",
            "invalid_api_key",
        )),
        Err(LookupError::Busy) => {
            let mut r = refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many API tokens are being checked at once; try again shortly",
                "overloaded",
            );
            r.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
            Err(r)
        }
        Err(LookupError::Database(e)) => {
            tracing::warn!(error = %e, "cannot check an API token");
            Err(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "the key pool's database is unavailable; try again shortly",
                "DATABASE_UNAVAILABLE",
            ))
        }
    }
}

/// Middleware of the public routes (`/healthz`, `/metrics`, the dashboard's page): one of the
/// KEYPOOL_MAX_IN_FLIGHT slots each.
pub async fn public(State(ep): State<Arc<Endpoint>>, request: Request, next: Next) -> Response {
    match admit(&ep) {
        Ok(permit) => holding(next.run(request).await, permit),
        Err(r) => r,
    }
}

/// Middleware of the admin routes: an admin token, always (even with `--insecure-no-auth`).
pub async fn admin(State(ep): State<Arc<Endpoint>>, request: Request, next: Next) -> Response {
    match bearer(request.headers()) {
        Some(t) if one_of(&ep.admin_tokens, t) => match admit(&ep) {
            Ok(permit) => holding(next.run(request).await, permit),
            Err(r) => r,
        },
        None => crate::http::problem::problem(
            StatusCode::UNAUTHORIZED,
            "missing admin token: send `Authorization: Bearer <token>` with one of the worker's KEYPOOL_ADMIN_TOKENS",
            "invalid_admin_token",
        ),
        Some(_) => crate::http::problem::problem(
            StatusCode::UNAUTHORIZED,
            "the token is not an admin token (one of the worker's KEYPOOL_ADMIN_TOKENS)",
            "invalid_admin_token",
        ),
    }
}
