//! The mock's OpenAI format: `chat/completions` (tools, JSON schemas, reasoning tokens,
//! streamed or not), `embeddings`, `models`.

use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::script::{self, Ask, Choice, Reply};
use super::{bearer, embedding_of, header, invalid, mock_dims, parse_json, sse_body, start, Shared, Wire};

/// The text of a message's `content`: a string, or the text parts of an array of parts.
fn text_of(content: Option<&Value>) -> String {
    crate::protocol::openai::text_of(content)
}

/// Reads a chat request as the mock's question; the error is the 400 OpenAI would give.
fn ask(req: &Value) -> Result<Ask, String> {
    let Some(messages) = req.get("messages").and_then(Value::as_array) else {
        return Err("'messages' is a required property".into());
    };
    let mut calls: Vec<String> = Vec::new();
    for m in messages {
        match m.get("role").and_then(Value::as_str) {
            Some("assistant") => {
                for c in m.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
                    calls.push(c.get("id").and_then(Value::as_str).unwrap_or("").to_string());
                }
            }
            Some("tool") => {
                let id = m.get("tool_call_id").and_then(Value::as_str).unwrap_or("");
                if !calls.iter().any(|c| c == id) {
                    return Err(format!(
                        "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with 'tool_calls' (no call has id {id:?})."
                    ));
                }
            }
            _ => {}
        }
    }
    let results: Vec<String> = messages
        .iter()
        .rev()
        .take_while(|m| m.get("role").and_then(Value::as_str) == Some("tool"))
        .map(|m| text_of(m.get("content")))
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let last_text = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(|m| text_of(m.get("content")))
        .unwrap_or_default();
    let tools = req
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| t.get("function"))
        .map(|f| {
            (
                f.get("name").and_then(Value::as_str).unwrap_or("").to_string(),
                f.get("parameters").cloned().unwrap_or(json!({})),
            )
        })
        .collect();
    let choice = match req.get("tool_choice") {
        Some(Value::String(s)) if s == "none" => Choice::None,
        Some(Value::String(s)) if s == "required" => Choice::Required,
        Some(Value::Object(o)) => Choice::Named(
            o.get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        ),
        _ => Choice::Auto,
    };
    let format = req.get("response_format");
    let schema = match format.and_then(|f| f.get("type")).and_then(Value::as_str) {
        Some("json_schema") => Some(
            format
                .and_then(|f| f.get("json_schema"))
                .and_then(|j| j.get("schema"))
                .cloned()
                .unwrap_or(json!({})),
        ),
        Some("json_object") => Some(Value::Null),
        _ => None,
    };
    Ok(Ask {
        tools,
        choice,
        parallel: req.get("parallel_tool_calls").and_then(Value::as_bool) != Some(false),
        results,
        last_text,
        schema,
        reasoning: script::reasoning_for_effort(req.get("reasoning_effort").and_then(Value::as_str).unwrap_or("")),
        max_tokens: req
            .get("max_completion_tokens")
            .or(req.get("max_tokens"))
            .and_then(Value::as_u64),
        prompt_chars: messages.iter().map(|m| text_of(m.get("content")).chars().count()).sum(),
    })
}

fn usage(prompt: i64, reply: &Reply, reasoning: i64) -> Value {
    let completion = reply.tokens() + reasoning;
    let mut u = json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion});
    if reasoning > 0 {
        u["completion_tokens_details"] = json!({"reasoning_tokens": reasoning});
    }
    u
}

pub(super) async fn chat(State(mock): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse_json(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Err(r) = start(
        &mock,
        Wire::OpenAi,
        "/v1/chat/completions",
        bearer(&headers),
        &req,
        &headers,
    )
    .await
    {
        return r;
    }
    let ask = match ask(&req) {
        Ok(a) => a,
        Err(why) => return invalid(Wire::OpenAi, &why),
    };
    let reply = script::reply(&ask, mock.reply_words);
    let prompt = script::prompt_tokens(ask.prompt_chars);
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-model")
        .to_string();
    let n = mock.next_id.fetch_add(1, Ordering::Relaxed);
    let id = format!("chatcmpl-mock{n}");
    let call_id = |i: usize| format!("call_mock{n}_{i}");
    let finish = match &reply {
        Reply::Calls(_) => "tool_calls",
        Reply::Text { cut: true, .. } => "length",
        Reply::Text { .. } => "stop",
    };
    let usage = usage(prompt, &reply, ask.reasoning);
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        let chunk = |delta: Value, finish: Option<&str>| {
            format!(
                "data: {}\n\n",
                json!({"id": id, "object": "chat.completion.chunk", "created": 1, "model": model,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            )
        };
        let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
        match &reply {
            Reply::Text { words, .. } => {
                for w in words {
                    events.push(chunk(json!({"content": w}), None));
                }
            }
            Reply::Calls(calls) => {
                for (i, (name, args)) in calls.iter().enumerate() {
                    events.push(chunk(
                        json!({"tool_calls": [{"index": i, "id": call_id(i), "type": "function", "function": {"name": name, "arguments": ""}}]}),
                        None,
                    ));
                    // Arguments in two fragments, as providers send them.
                    let text = args.to_string();
                    let half = text
                        .char_indices()
                        .nth(text.chars().count() / 2)
                        .map_or(0, |(at, _)| at);
                    for fragment in [&text[..half], &text[half..]] {
                        events.push(chunk(
                            json!({"tool_calls": [{"index": i, "function": {"arguments": fragment}}]}),
                            None,
                        ));
                    }
                }
            }
        }
        events.push(chunk(json!({}), Some(finish)));
        let include_usage = req
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            == Some(true);
        if include_usage {
            events.push(format!(
                "data: {}\n\n",
                json!({"id": id, "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [], "usage": usage})
            ));
        }
        events.push("data: [DONE]\n\n".into());
        return sse_body(events, mock.stream_delay);
    }
    let message = match &reply {
        Reply::Text { .. } => json!({"role": "assistant", "content": reply.text()}),
        Reply::Calls(calls) => {
            json!({"role": "assistant", "content": null, "tool_calls": calls.iter().enumerate().map(|(i, (name, args))| {
            json!({"id": call_id(i), "type": "function", "function": {"name": name, "arguments": args.to_string()}})
        }).collect::<Vec<_>>()})
        }
    };
    Json(json!({
        "id": id, "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": usage,
    }))
    .into_response()
}

pub(super) async fn embeddings(State(mock): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse_json(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Err(r) = start(&mock, Wire::OpenAi, "/v1/embeddings", bearer(&headers), &req, &headers).await {
        return r;
    }
    let inputs: Vec<String> = match req.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_string))
            .collect(),
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": {"message": "'input' is a required property", "type": "invalid_request_error", "param": "input", "code": null}})),
            )
                .into_response()
        }
    };
    let dims = mock_dims(&req, "dimensions");
    let base64 = req.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let v = embedding_of(t, dims);
            let embedding = if base64 {
                use base64::Engine;
                let raw: Vec<u8> = v.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(raw))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let tokens: i64 = inputs.iter().map(|t| script::prompt_tokens(t.chars().count())).sum();
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("text-embedding-3-small");
    Json(json!({"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}))
    .into_response()
}

pub(super) async fn models(State(mock): State<Shared>, headers: HeaderMap) -> Response {
    if let Some(key) = header(&headers, "x-api-key") {
        if let Err(r) = start(&mock, Wire::Anthropic, "/v1/models", Some(key), &Value::Null, &headers).await {
            return r;
        }
        return Json(json!({"data": [{"type": "model", "id": "claude-sonnet-4-5", "display_name": "Claude Sonnet 4.5"}], "has_more": false}))
            .into_response();
    }
    if let Err(r) = start(
        &mock,
        Wire::OpenAi,
        "/v1/models",
        bearer(&headers),
        &Value::Null,
        &headers,
    )
    .await
    {
        return r;
    }
    Json(json!({"object": "list", "data": [
        {"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "mock"},
        {"id": "grok-3", "object": "model", "created": 0, "owned_by": "mock"}
    ]}))
    .into_response()
}

/// A 1×1 PNG, base64: every image the mock makes.
pub(super) const PNG: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII=";

/// `POST /v1/images/generations`: `n` images (a 1×1 PNG each), usage as gpt-image reports it
/// (the prompt's tokens in, 1,290 tokens an image out).
pub(super) async fn images(State(mock): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse_json(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Err(r) = start(
        &mock,
        Wire::OpenAi,
        "/v1/images/generations",
        bearer(&headers),
        &req,
        &headers,
    )
    .await
    {
        return r;
    }
    let Some(prompt) = req.get("prompt").and_then(Value::as_str) else {
        return invalid(Wire::OpenAi, "'prompt' is a required property");
    };
    let n = req.get("n").and_then(Value::as_u64).unwrap_or(1).clamp(1, 10) as i64;
    let url = req.get("response_format").and_then(Value::as_str) == Some("url");
    let data: Vec<Value> = (0..n)
        .map(|i| {
            if url {
                json!({"url": format!("https://images.mock.invalid/{i}.png")})
            } else {
                json!({"b64_json": PNG, "revised_prompt": prompt})
            }
        })
        .collect();
    let input = script::prompt_tokens(prompt.chars().count());
    Json(json!({"created": 1, "data": data,
                "usage": {"input_tokens": input, "output_tokens": 1290 * n, "total_tokens": input + 1290 * n}}))
    .into_response()
}
