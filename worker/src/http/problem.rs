//! Error answers of the admin and users' APIs: a JSON body `{"error": {"message", "code"}}`
//! with a status, and the translation of a database refusal into one.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::db::DbError;

pub(crate) fn problem(status: StatusCode, message: &str, code: &str) -> Response {
    (status, axum::Json(json!({"error": {"message": message, "code": code}}))).into_response()
}

pub(crate) fn from_db(e: DbError) -> Response {
    let (status, code) = match e.sqlstate.as_deref() {
        Some("42704") => (StatusCode::NOT_FOUND, "not_found"),
        Some(s) if s.starts_with("22") => (StatusCode::BAD_REQUEST, "invalid_input"),
        Some("42501") => (StatusCode::FORBIDDEN, "insufficient_privilege"),
        Some("53400") => (StatusCode::CONFLICT, "limit_reached"),
        Some("23505") => (StatusCode::CONFLICT, "already_exists"),
        None => (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable"),
        Some(_) => (StatusCode::INTERNAL_SERVER_ERROR, "database_error"),
    };
    let mut message = e.message.clone();
    if let Some(h) = &e.hint {
        message.push_str("; hint: ");
        message.push_str(h);
    }
    if code == "insufficient_privilege" {
        message.push_str(" (the worker's role needs the grants the book's Privileges page lists for the admin API)");
    }
    problem(status, &message, code)
}
