//! `GET /dashboard`: one page for operators. The page itself holds no data; its script reads the
//! admin API (admin.rs) with the admin token the operator enters (kept in the tab's
//! sessionStorage, or passed as `#token=...`, which never reaches a server log) and refreshes
//! itself. Disable, enable and reset go through the same API.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::server::Endpoint;

const PAGE: &str = include_str!("dashboard.html");

/// The page, when the worker has admin tokens (without them, nor with `--insecure-no-auth`
/// alone, is there a dashboard).
pub async fn page(State(ep): State<Arc<Endpoint>>) -> Response {
    if ep.admin_tokens.is_empty() {
        return crate::admin::problem(
            StatusCode::NOT_FOUND,
            "the dashboard is off: start the worker with KEYPOOL_ADMIN_TOKENS",
            "dashboard_off",
        );
    }
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store")
        .header(
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        )
        .header("x-content-type-options", "nosniff")
        .header("referrer-policy", "no-referrer")
        .body(Body::from(PAGE))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
