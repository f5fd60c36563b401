//! The mock's OpenAI Responses API (`POST /v1/responses`), streamed or not: what an app or a
//! gateway that passes the Responses API through to OpenAI reaches (the worker itself calls
//! OpenAI-style keys through chat completions). Stateless like the worker: `store` is ignored and
//! `previous_response_id` and `item_reference`s are refused, as OpenAI refuses unknown ids.

use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::script::{self, Ask, Choice, Reply};
use super::{bearer, invalid, parse_json, sse_body, start, Shared, Wire};

/// The text of an item's `content`: a string, or its `input_text` / `output_text` parts.
fn text_of(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// Reads a Responses request as the mock's question; the error is the 400 OpenAI would give.
fn ask(req: &Value) -> Result<Ask, String> {
    if req.get("previous_response_id").is_some_and(|v| !v.is_null()) {
        return Err("Previous response with id not found (the mock stores nothing).".into());
    }
    let items: Vec<Value> = match req.get("input") {
        Some(Value::String(s)) => vec![json!({"type": "message", "role": "user", "content": s})],
        Some(Value::Array(items)) => items.clone(),
        _ => return Err("Missing required parameter: 'input'.".into()),
    };
    let mut calls: Vec<String> = Vec::new();
    for item in &items {
        let kind = item.get("type").and_then(Value::as_str).unwrap_or("message");
        match kind {
            "function_call" => calls.push(item.get("call_id").and_then(Value::as_str).unwrap_or("").to_string()),
            "function_call_output" => {
                let id = item.get("call_id").and_then(Value::as_str).unwrap_or("");
                if !calls.iter().any(|c| c == id) {
                    return Err(format!(
                        "No tool call found for function call output with call_id {id}."
                    ));
                }
            }
            "item_reference" => return Err("Item with id not found (the mock stores nothing).".into()),
            _ => {}
        }
    }
    let results: Vec<String> = items
        .iter()
        .rev()
        .take_while(|i| i.get("type").and_then(Value::as_str) == Some("function_call_output"))
        .map(|i| i.get("output").map_or_else(String::new, |o| text_of(Some(o))))
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let is_user = |i: &&Value| {
        i.get("type").and_then(Value::as_str).unwrap_or("message") == "message"
            && i.get("role").and_then(Value::as_str) == Some("user")
    };
    let last_text = items
        .iter()
        .rev()
        .find(is_user)
        .map(|i| text_of(i.get("content")))
        .unwrap_or_default();
    let tools = req
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|t| t.get("type").and_then(Value::as_str) == Some("function"))
        .map(|t| {
            (
                t.get("name").and_then(Value::as_str).unwrap_or("").to_string(),
                t.get("parameters").cloned().unwrap_or(json!({})),
            )
        })
        .collect();
    let choice = match req.get("tool_choice") {
        Some(Value::String(s)) if s == "none" => Choice::None,
        Some(Value::String(s)) if s == "required" => Choice::Required,
        Some(Value::Object(o)) => Choice::Named(o.get("name").and_then(Value::as_str).unwrap_or("").to_string()),
        _ => Choice::Auto,
    };
    let format = req.get("text").and_then(|t| t.get("format"));
    let schema = match format.and_then(|f| f.get("type")).and_then(Value::as_str) {
        Some("json_schema") => Some(format.and_then(|f| f.get("schema")).cloned().unwrap_or(json!({}))),
        Some("json_object") => Some(Value::Null),
        _ => None,
    };
    let instructions = req.get("instructions").and_then(Value::as_str).unwrap_or("");
    Ok(Ask {
        tools,
        choice,
        parallel: req.get("parallel_tool_calls").and_then(Value::as_bool) != Some(false),
        results,
        last_text,
        schema,
        reasoning: script::reasoning_for_effort(
            req.get("reasoning")
                .and_then(|r| r.get("effort"))
                .and_then(Value::as_str)
                .unwrap_or(""),
        ),
        max_tokens: req.get("max_output_tokens").and_then(Value::as_u64),
        prompt_chars: instructions.chars().count()
            + items
                .iter()
                .map(|i| text_of(i.get("content")).chars().count())
                .sum::<usize>(),
    })
}

/// One server-sent event of the Responses stream.
fn event(kind: &str, mut data: Value, sequence: &mut u64) -> String {
    data["type"] = json!(kind);
    data["sequence_number"] = json!(*sequence);
    *sequence += 1;
    format!("event: {kind}\ndata: {data}\n\n")
}

pub(super) async fn responses(State(mock): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse_json(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if let Err(r) = start(&mock, Wire::OpenAi, "/v1/responses", bearer(&headers), &req, &headers).await {
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
    let mut output: Vec<Value> = Vec::new();
    if ask.reasoning > 0 {
        output.push(json!({"type": "reasoning", "id": format!("rs_mock{n}"), "summary": []}));
    }
    match &reply {
        Reply::Text { .. } => output.push(json!({
            "type": "message", "id": format!("msg_mock{n}"), "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": reply.text(), "annotations": []}],
        })),
        Reply::Calls(calls) => {
            for (i, (name, args)) in calls.iter().enumerate() {
                output.push(json!({
                    "type": "function_call", "id": format!("fc_mock{n}_{i}"), "call_id": format!("call_mock{n}_{i}"),
                    "name": name, "arguments": args.to_string(), "status": "completed",
                }));
            }
        }
    }
    let completion = reply.tokens() + ask.reasoning;
    let cut = matches!(reply, Reply::Text { cut: true, .. });
    let response = |status: &str, output: &[Value], usage: Value| {
        json!({
            "id": format!("resp_mock{n}"), "object": "response", "created_at": 1, "status": status,
            "incomplete_details": if cut && status != "in_progress" { json!({"reason": "max_output_tokens"}) } else { Value::Null },
            "error": null, "model": model, "output": output,
            "instructions": req.get("instructions").cloned().unwrap_or(Value::Null),
            "tools": req.get("tools").cloned().unwrap_or(json!([])),
            "parallel_tool_calls": ask.parallel, "store": false,
            "usage": usage,
        })
    };
    let usage = json!({
        "input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": ask.reasoning},
        "total_tokens": prompt + completion,
    });
    let status = if cut { "incomplete" } else { "completed" };
    if req.get("stream").and_then(Value::as_bool) != Some(true) {
        return Json(response(status, &output, usage)).into_response();
    }
    let mut seq = 0u64;
    let mut events = vec![
        event(
            "response.created",
            json!({"response": response("in_progress", &[], Value::Null)}),
            &mut seq,
        ),
        event(
            "response.in_progress",
            json!({"response": response("in_progress", &[], Value::Null)}),
            &mut seq,
        ),
    ];
    for (index, item) in output.iter().enumerate() {
        let id = item.get("id").cloned().unwrap_or(Value::Null);
        match item.get("type").and_then(Value::as_str) {
            Some("message") => {
                let mut open = item.clone();
                open["status"] = json!("in_progress");
                open["content"] = json!([]);
                events.push(event(
                    "response.output_item.added",
                    json!({"output_index": index, "item": open}),
                    &mut seq,
                ));
                let part = json!({"type": "output_text", "text": "", "annotations": []});
                events.push(event(
                    "response.content_part.added",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
                    &mut seq,
                ));
                if let Reply::Text { words, .. } = &reply {
                    for w in words {
                        events.push(event(
                            "response.output_text.delta",
                            json!({"item_id": id, "output_index": index, "content_index": 0, "delta": w, "logprobs": []}),
                            &mut seq,
                        ));
                    }
                }
                let text = reply.text();
                events.push(event(
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}),
                    &mut seq,
                ));
                events.push(event(
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0,
                           "part": {"type": "output_text", "text": text, "annotations": []}}),
                    &mut seq,
                ));
            }
            Some("function_call") => {
                let mut open = item.clone();
                open["status"] = json!("in_progress");
                open["arguments"] = json!("");
                events.push(event(
                    "response.output_item.added",
                    json!({"output_index": index, "item": open}),
                    &mut seq,
                ));
                let args = item.get("arguments").and_then(Value::as_str).unwrap_or("");
                let half = args
                    .char_indices()
                    .nth(args.chars().count() / 2)
                    .map_or(0, |(at, _)| at);
                for fragment in [&args[..half], &args[half..]] {
                    events.push(event(
                        "response.function_call_arguments.delta",
                        json!({"item_id": id, "output_index": index, "delta": fragment}),
                        &mut seq,
                    ));
                }
                events.push(event(
                    "response.function_call_arguments.done",
                    json!({"item_id": id, "output_index": index, "arguments": args}),
                    &mut seq,
                ));
            }
            _ => events.push(event(
                "response.output_item.added",
                json!({"output_index": index, "item": item}),
                &mut seq,
            )),
        }
        events.push(event(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
            &mut seq,
        ));
    }
    let last = if cut {
        "response.incomplete"
    } else {
        "response.completed"
    };
    events.push(event(
        last,
        json!({"response": response(status, &output, usage)}),
        &mut seq,
    ));
    sse_body(events, mock.stream_delay)
}
