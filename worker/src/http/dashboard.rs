//! `GET /dashboard`: one page for operators. The page itself holds no data; its script reads the
//! admin API (admin.rs) with the admin token the operator enters (kept in the tab's
//! sessionStorage, or passed as `#token=...`, which never reaches a server log) and refreshes
//! itself. Disable, enable and reset go through the same API. Charts of the hourly history are
//! drawn with uPlot, vendored and served from the binary.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::http::endpoint::Endpoint;

const PAGE: &str = include_str!("dashboard.html");
/// The chart library, vendored (vendor/uplot/README.md): the page needs no network.
const UPLOT_JS: &str = include_str!("vendor/uplot/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("vendor/uplot/uPlot.min.css");

/// `GET /dashboard/uplot.min.js` and `.css`: static, no data, cached.
pub async fn uplot_js() -> Response {
    asset("text/javascript; charset=utf-8", UPLOT_JS)
}

pub async fn uplot_css() -> Response {
    asset("text/css; charset=utf-8", UPLOT_CSS)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "public, max-age=86400")
        .header("x-content-type-options", "nosniff")
        .body(Body::from(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// The page, when the worker has admin tokens (without them, nor with `--insecure-no-auth`
/// alone, is there a dashboard).
pub async fn page(State(ep): State<Arc<Endpoint>>) -> Response {
    if ep.admin_tokens.is_empty() {
        return crate::http::problem::problem(
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
            "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        )
        .header("x-content-type-options", "nosniff")
        .header("referrer-policy", "no-referrer")
        .body(Body::from(PAGE))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
