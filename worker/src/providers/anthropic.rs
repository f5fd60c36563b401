//! Anthropic's messages API (`/v1/messages`, key in `x-api-key`, `anthropic-version`); bodies
//! in its dialect (protocol::anthropic). Errors are `{"type":"error","error":{"type","message"}}`
//! with a `retry-after` header on 429.

use bytes::Bytes;
use serde_json::Value;

use super::{KeyRef, ProviderError};
use crate::protocol::anthropic::VERSION;

/// `POST {base}/v1/messages` with `body`.
pub fn chat_request(http: &reqwest::Client, key: &KeyRef, body: Bytes) -> reqwest::RequestBuilder {
    let base = key.base_url.trim_end_matches('/');
    http.post(format!("{base}/v1/messages"))
        .header("x-api-key", &key.secret)
        .header("anthropic-version", VERSION)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
}

pub fn list_models_request(http: &reqwest::Client, key: &KeyRef) -> reqwest::RequestBuilder {
    let base = key.base_url.trim_end_matches('/');
    http.get(format!("{base}/v1/models"))
        .header("x-api-key", &key.secret)
        .header("anthropic-version", VERSION)
}

pub fn read_error(v: &Value) -> ProviderError {
    let e = v.get("error").unwrap_or(v);
    ProviderError {
        code: e.get("type").and_then(Value::as_str).map(str::to_string),
        retry_after_ms: None,
        message: e.get("message").and_then(Value::as_str).unwrap_or("").to_string(),
    }
}
