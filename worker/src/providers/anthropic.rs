//! Anthropic's messages API (`/v1/messages`, key in `x-api-key`, `anthropic-version`); bodies
//! in its dialect (protocol::anthropic). Errors are `{"type":"error","error":{"type","message"}}`
//! with a `retry-after` header on 429.

use bytes::Bytes;
use serde_json::Value;

use super::{KeyRef, ProviderError};
use crate::protocol::anthropic::{MessagesRequest, VERSION};

/// The app's own Messages body for `key`: changed only where the worker must (the key's model,
/// the stream flag); fields the worker does not know pass through.
pub fn messages_body(key: &KeyRef, req: &MessagesRequest, stream: bool) -> Bytes {
    let model = key.model.as_ref().map(|m| Value::String(m.clone()).to_string());
    let mut changes: Vec<(&str, Option<&str>)> = Vec::with_capacity(2);
    if let Some(m) = &model {
        changes.push(("model", Some(m)));
    }
    changes.push(("stream", stream.then_some("true")));
    Bytes::from(req.body().render(&changes))
}

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
