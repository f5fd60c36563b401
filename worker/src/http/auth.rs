//! The authentication layers the router puts on each group of routes (server.rs): who is calling
//! is decided from the request's headers (credentials.rs) before its body is read; the
//! admin API never opens without an admin token, even with `--insecure-no-auth`.

// Refusals are ready HTTP answers; boxing them would only add noise (as in server.rs).
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use crate::http::credentials::{bearer, one_of, refuse, Principal};
use crate::http::endpoint::Endpoint;

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
    let principal = match principal(ep, request.headers(), admin_ok).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    request.extensions_mut().insert(principal);
    next.run(request).await
}

async fn principal(ep: &Endpoint, headers: &HeaderMap, admin_ok: bool) -> Result<Principal, Response> {
    let token = bearer(headers);
    if let Some(t) = token {
        if one_of(&ep.tokens, t) || (admin_ok && one_of(&ep.admin_tokens, t)) {
            return Ok(Principal::Service);
        }
    }
    if ep.insecure_no_auth && token.is_none() {
        return Ok(Principal::Open);
    }
    let Some(token) = token else {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "missing API token: send `Authorization: Bearer <token>`",
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
        Err(e) => {
            tracing::warn!(error = %e, "cannot check an API token");
            Err(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "the key pool's database is unavailable; try again shortly",
                "DATABASE_UNAVAILABLE",
            ))
        }
    }
}

/// Middleware of the admin routes: an admin token, always (even with `--insecure-no-auth`).
pub async fn admin(State(ep): State<Arc<Endpoint>>, request: Request, next: Next) -> Response {
    match bearer(request.headers()) {
        Some(t) if one_of(&ep.admin_tokens, t) => next.run(request).await,
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
