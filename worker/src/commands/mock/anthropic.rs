//! The mock's Anthropic format: `messages`, streamed or not, with `tool_use` / `tool_result`,
//! signed thinking blocks, structured output (`output_config.format`).

use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::script::{self, Ask, Choice, Reply};
use super::{header, invalid, parse_json, sse_body, start, Shared, Wire};

fn blocks(m: &Value) -> Vec<Value> {
    match m.get("content") {
        Some(Value::String(s)) => vec![json!({"type": "text", "text": s})],
        Some(Value::Array(b)) => b.clone(),
        _ => Vec::new(),
    }
}

fn kind(b: &Value) -> &str {
    b.get("type").and_then(Value::as_str).unwrap_or("")
}

fn text_of(blocks: &[Value]) -> String {
    blocks
        .iter()
        .filter(|b| kind(b) == "text")
        .filter_map(|b| b.get("text").and_then(Value::as_str))
        .collect()
}

/// Reads a Messages body as the mock's question; the error is the 400 Anthropic gives.
fn ask(req: &Value) -> Result<Ask, String> {
    let Some(max_tokens) = req.get("max_tokens").and_then(Value::as_u64) else {
        return Err("max_tokens: Field required".into());
    };
    let messages: &[Value] = req
        .get("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let thinking = req
        .get("thinking")
        .filter(|t| t.get("type").and_then(Value::as_str) == Some("enabled"));
    let budget = thinking.and_then(|t| t.get("budget_tokens")).and_then(Value::as_i64);
    if let Some(b) = budget {
        if b < 1024 {
            return Err("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024".into());
        }
        if b as u64 >= max_tokens {
            return Err("`max_tokens` must be greater than `thinking.budget_tokens`.".into());
        }
    }
    if thinking.is_some() {
        let forced = req
            .get("tool_choice")
            .and_then(|t| t.get("type"))
            .and_then(Value::as_str)
            .is_some_and(|t| t == "any" || t == "tool");
        if forced {
            return Err("Thinking may not be enabled when tool_choice forces tool use.".into());
        }
        if req.get("temperature").and_then(Value::as_f64).is_some_and(|t| t != 1.0) {
            return Err("`temperature` may only be set to 1 when thinking is enabled.".into());
        }
    }
    let mut uses_before: Vec<String> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let b = blocks(m);
        if b.is_empty() {
            return Err(format!("messages.{i}: all messages must have non-empty content"));
        }
        let empty_text = |x: &Value| kind(x) == "text" && x.get("text").and_then(Value::as_str) == Some("");
        let nested = b
            .iter()
            .filter_map(|x| x.get("content").and_then(Value::as_array))
            .flatten()
            .any(empty_text);
        if b.iter().any(empty_text) || nested {
            return Err(format!("messages.{i}: text content blocks must be non-empty"));
        }
        match m.get("role").and_then(Value::as_str) {
            Some("assistant") => {
                uses_before = b
                    .iter()
                    .filter(|x| kind(x) == "tool_use")
                    .map(|x| x.get("id").and_then(Value::as_str).unwrap_or("").to_string())
                    .collect();
                if let Some(bad) = uses_before
                    .iter()
                    .find(|id| id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'))
                {
                    return Err(format!(
                        "messages.{i}.content: tool_use.id: String should match pattern '^[a-zA-Z0-9_-]+$' ({bad:?})"
                    ));
                }
                // With thinking on, the last assistant turn that used a tool starts with its
                // signed thinking, unchanged.
                if thinking.is_some() && i + 2 >= messages.len() && !uses_before.is_empty() {
                    let first = b.first();
                    let signed = first.is_some_and(|f| {
                        kind(f) == "redacted_thinking"
                            || (kind(f) == "thinking"
                                && f.get("signature")
                                    .and_then(Value::as_str)
                                    .is_some_and(script::is_mock_signature))
                    });
                    if !signed {
                        return Err(format!(
                            "messages.{i}.content.0.type: Expected `thinking` or `redacted_thinking`, but found `{}`. When `thinking` is enabled, a final `assistant` message must start with a thinking block.",
                            first.map(kind).unwrap_or("nothing")
                        ));
                    }
                }
            }
            _ => {
                for r in b.iter().filter(|x| kind(x) == "tool_result") {
                    let id = r.get("tool_use_id").and_then(Value::as_str).unwrap_or("");
                    if !uses_before.iter().any(|u| u == id) {
                        return Err(format!(
                            "messages.{i}.content: unexpected `tool_use_id` found in `tool_result` blocks: {id}. Each `tool_result` block must have a corresponding `tool_use` block in the previous message."
                        ));
                    }
                }
            }
        }
    }
    let last = messages.last().map(blocks).unwrap_or_default();
    let results: Vec<String> = last
        .iter()
        .filter(|b| kind(b) == "tool_result")
        .map(|b| match b.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => text_of(parts),
            _ => String::new(),
        })
        .collect();
    let last_text = messages
        .iter()
        .rev()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(|m| text_of(&blocks(m)))
        .find(|t| !t.is_empty())
        .unwrap_or_default();
    let tools = req
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|t| {
            (
                t.get("name").and_then(Value::as_str).unwrap_or("").to_string(),
                t.get("input_schema").cloned().unwrap_or(json!({})),
            )
        })
        .collect();
    let tc = req.get("tool_choice");
    let choice = match tc.and_then(|t| t.get("type")).and_then(Value::as_str) {
        Some("none") => Choice::None,
        Some("any") => Choice::Required,
        Some("tool") => Choice::Named(
            tc.and_then(|t| t.get("name"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        ),
        _ => Choice::Auto,
    };
    let format = req
        .get("output_config")
        .and_then(|o| o.get("format"))
        .filter(|f| f.get("type").and_then(Value::as_str) == Some("json_schema"));
    let system_chars = match req.get("system") {
        Some(Value::String(s)) => s.chars().count(),
        Some(Value::Array(b)) => text_of(b).chars().count(),
        _ => 0,
    };
    Ok(Ask {
        tools,
        choice,
        parallel: tc
            .and_then(|t| t.get("disable_parallel_tool_use"))
            .and_then(Value::as_bool)
            != Some(true),
        results,
        last_text,
        schema: format.map(|f| f.get("schema").cloned().unwrap_or(json!({}))),
        reasoning: budget.map_or(0, script::reasoning_for_budget),
        max_tokens: Some(max_tokens),
        prompt_chars: system_chars
            + messages
                .iter()
                .map(|m| text_of(&blocks(m)).chars().count())
                .sum::<usize>(),
    })
}

pub(super) async fn messages(State(mock): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse_json(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Err(r) = start(
        &mock,
        Wire::Anthropic,
        "/v1/messages",
        header(&headers, "x-api-key"),
        &req,
        &headers,
    )
    .await
    {
        return r;
    }
    if header(&headers, "anthropic-version").is_none() {
        return invalid(Wire::Anthropic, "anthropic-version: header is required");
    }
    let ask = match ask(&req) {
        Ok(a) => a,
        Err(why) => return invalid(Wire::Anthropic, &why),
    };
    // Thinking can cut the reply short: what is left of the cap after it.
    let reply = script::reply(
        &Ask {
            max_tokens: ask.max_tokens.map(|m| m.saturating_sub(ask.reasoning as u64).max(1)),
            ..ask.clone()
        },
        mock.reply_words,
    );
    let prompt = script::prompt_tokens(ask.prompt_chars);
    let model = req.get("model").and_then(Value::as_str).unwrap_or("claude").to_string();
    let n = mock.next_id.fetch_add(1, Ordering::Relaxed);
    let id = format!("msg_mock{n}");
    let stop = match &reply {
        Reply::Calls(_) => "tool_use",
        Reply::Text { cut: true, .. } => "max_tokens",
        Reply::Text { .. } => "end_turn",
    };
    let output = reply.tokens() + ask.reasoning;
    let signature = script::signature(&format!("{n}/thinking"));
    let use_id = |i: usize| format!("toolu_mock{n}_{i}");
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        let ev = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
        let mut events = vec![
            ev(
                "message_start",
                json!({"type": "message_start", "message": {"id": id, "type": "message", "role": "assistant", "model": model,
                        "content": [], "stop_reason": null, "usage": {"input_tokens": prompt, "output_tokens": 1}}}),
            ),
            ev("ping", json!({"type": "ping"})),
        ];
        let mut index = 0;
        if ask.reasoning > 0 {
            events.push(ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": index, "content_block": {"type": "thinking", "thinking": ""}}),
            ));
            events.push(ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": {"type": "thinking_delta", "thinking": script::THOUGHT}}),
            ));
            events.push(ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": {"type": "signature_delta", "signature": signature}}),
            ));
            events.push(ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            ));
            index += 1;
        }
        match &reply {
            Reply::Text { words, .. } => {
                events.push(ev(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}),
                ));
                for w in words {
                    events.push(ev(
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": w}}),
                    ));
                }
                events.push(ev(
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": index}),
                ));
            }
            Reply::Calls(calls) => {
                for (i, (name, args)) in calls.iter().enumerate() {
                    events.push(ev(
                        "content_block_start",
                        json!({"type": "content_block_start", "index": index, "content_block": {"type": "tool_use", "id": use_id(i), "name": name, "input": {}}}),
                    ));
                    let text = args.to_string();
                    let half = text
                        .char_indices()
                        .nth(text.chars().count() / 2)
                        .map_or(0, |(at, _)| at);
                    for fragment in [&text[..half], &text[half..]] {
                        events.push(ev(
                            "content_block_delta",
                            json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": fragment}}),
                        ));
                    }
                    events.push(ev(
                        "content_block_stop",
                        json!({"type": "content_block_stop", "index": index}),
                    ));
                    index += 1;
                }
            }
        }
        events.push(ev(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": {"output_tokens": output}}),
        ));
        events.push(ev("message_stop", json!({"type": "message_stop"})));
        return sse_body(events, mock.stream_delay);
    }
    let mut content = Vec::new();
    if ask.reasoning > 0 {
        content.push(json!({"type": "thinking", "thinking": script::THOUGHT, "signature": signature}));
    }
    match &reply {
        Reply::Text { .. } => content.push(json!({"type": "text", "text": reply.text()})),
        Reply::Calls(calls) => {
            for (i, (name, args)) in calls.iter().enumerate() {
                content.push(json!({"type": "tool_use", "id": use_id(i), "name": name, "input": args}));
            }
        }
    }
    Json(json!({
        "id": id, "type": "message", "role": "assistant", "model": model,
        "content": content,
        "stop_reason": stop, "stop_sequence": null,
        "usage": {"input_tokens": prompt, "output_tokens": output},
    }))
    .into_response()
}
