//! The mock's Gemini format: `generateContent`, `streamGenerateContent?alt=sse` (function calls
//! with thought signatures, JSON schemas, thought tokens), `batchEmbedContents`, the model list.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::script::{self, Ask, Choice, Reply};
use super::{embedding_of, header, invalid, mock_dims, parse_json, sse_body, start, Shared, Wire};

/// Gemini reads its members in camelCase or snake_case (protobuf JSON); so does the mock.
trait Member {
    fn member(&self, camel: &str) -> Option<&Value>;
}

impl Member for Value {
    fn member(&self, camel: &str) -> Option<&Value> {
        self.get(camel).or_else(|| {
            let snake: String = camel
                .chars()
                .flat_map(|c| {
                    if c.is_ascii_uppercase() {
                        vec!['_', c.to_ascii_lowercase()]
                    } else {
                        vec![c]
                    }
                })
                .collect();
            self.get(snake)
        })
    }
}

/// What Gemini documents as the stand-in for an unknown thought signature.
const NO_SIGNATURE: &str = "skip_thought_signature_validator";

fn parts(content: &Value) -> &[Value] {
    content
        .get("parts")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn text_of(content: &Value) -> String {
    parts(content)
        .iter()
        .filter_map(|p| p.get("text").and_then(Value::as_str))
        .collect()
}

/// Reads a `generateContent` body as the mock's question; the error is the 400 Gemini gives.
fn ask(req: &Value, model: &str) -> Result<Ask, String> {
    let contents: &[Value] = req
        .get("contents")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    // Each user turn of function responses answers the calls of the model turn before it.
    let mut calls_before: Vec<String> = Vec::new();
    for c in contents {
        if parts(c).is_empty()
            || parts(c)
                .iter()
                .any(|p| p.get("text").and_then(Value::as_str) == Some(""))
        {
            return Err("Unable to submit request because it has an empty text parameter. Add a value to the parameter and try again.".into());
        }
        let names = |kind: &str| -> Vec<String> {
            parts(c)
                .iter()
                .filter_map(|p| p.member(kind).and_then(|f| f.get("name")).and_then(Value::as_str))
                .map(str::to_string)
                .collect()
        };
        let responses = names("functionResponse");
        if !responses.is_empty() && responses != calls_before {
            return Err(format!(
                "Please ensure that the number of function response parts is equal to the number of function call parts of the function call turn (calls {calls_before:?}, responses {responses:?})."
            ));
        }
        calls_before = names("functionCall");
    }
    // Gemini 3: every step of the current turn must bring back the signature of its first call.
    if model.starts_with("gemini-3") {
        let turn_start = contents
            .iter()
            .rposition(|c| {
                c.get("role").and_then(Value::as_str) == Some("user")
                    && parts(c).iter().any(|p| p.member("functionResponse").is_none())
            })
            .unwrap_or(0);
        for c in &contents[turn_start..] {
            if let Some(first) = parts(c).iter().find(|p| p.member("functionCall").is_some()) {
                let sig = first.member("thoughtSignature").and_then(Value::as_str).unwrap_or("");
                if !(script::is_mock_signature(sig) || sig == NO_SIGNATURE) {
                    return Err("Function call is missing a thought_signature in functionCall parts. This is required for tools to work correctly, and missing thought_signature may lead to degraded model performance.".into());
                }
            }
        }
    }
    let last = contents.last();
    let results: Vec<String> = last
        .map(parts)
        .unwrap_or(&[])
        .iter()
        .filter_map(|p| p.member("functionResponse"))
        .map(|f| {
            let r = f.get("response").cloned().unwrap_or(Value::Null);
            match r.get("output").or(r.get("error")) {
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => r.to_string(),
            }
        })
        .collect();
    let last_text = contents
        .iter()
        .rev()
        .find(|c| c.get("role").and_then(Value::as_str) != Some("model") && !text_of(c).is_empty())
        .map(text_of)
        .unwrap_or_default();
    let tools = req
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| t.member("functionDeclarations").and_then(Value::as_array))
        .flatten()
        .map(|d| {
            (
                d.get("name").and_then(Value::as_str).unwrap_or("").to_string(),
                d.member("parametersJsonSchema")
                    .or(d.get("parameters"))
                    .cloned()
                    .unwrap_or(json!({})),
            )
        })
        .collect();
    let fc = req.member("toolConfig").and_then(|t| t.member("functionCallingConfig"));
    let allowed: Vec<String> = fc
        .and_then(|f| f.member("allowedFunctionNames"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default();
    let choice = match fc.and_then(|f| f.get("mode")).and_then(Value::as_str) {
        Some("NONE") => Choice::None,
        Some("ANY") if allowed.len() == 1 => Choice::Named(allowed[0].clone()),
        Some("ANY") => Choice::Required,
        _ => Choice::Auto,
    };
    let g = req.member("generationConfig");
    let json_mode = g.and_then(|g| g.member("responseMimeType")).and_then(Value::as_str) == Some("application/json");
    let schema = g
        .and_then(|g| g.member("responseJsonSchema").or(g.member("responseSchema")))
        .cloned()
        .or(json_mode.then_some(Value::Null));
    let thinking = g.and_then(|g| g.member("thinkingConfig"));
    let reasoning = match (
        thinking
            .and_then(|t| t.member("thinkingBudget"))
            .and_then(Value::as_i64),
        thinking.and_then(|t| t.member("thinkingLevel")).and_then(Value::as_str),
    ) {
        (Some(_), Some(_)) => return Err("You can only set one of thinking budget and thinking level.".into()),
        (Some(0), None) if model.contains("-pro") => {
            return Err("Budget 0 is invalid. This model only works in thinking mode.".into())
        }
        (Some(budget), None) => script::reasoning_for_budget(budget),
        (None, Some(level))
            if model.starts_with("gemini-3")
                && model.contains("-pro")
                && !matches!(level, "low" | "high" | "LOW" | "HIGH") =>
        {
            return Err(format!("Thinking level {level} is not supported for this model."))
        }
        (None, Some(level)) => script::reasoning_for_effort(&level.to_ascii_lowercase()),
        (None, None) => 0,
    };
    let mut prompt_chars: usize = contents.iter().map(|c| text_of(c).chars().count()).sum();
    if let Some(s) = req.member("systemInstruction") {
        prompt_chars += text_of(s).chars().count();
    }
    Ok(Ask {
        tools,
        choice,
        parallel: true,
        results,
        last_text,
        schema,
        reasoning,
        max_tokens: g.and_then(|g| g.member("maxOutputTokens")).and_then(Value::as_u64),
        prompt_chars,
    })
}

pub(super) async fn generate(
    State(mock): State<Shared>,
    Path(action): Path<String>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let req = match parse_json(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let path = format!("/v1beta/models/{action}");
    if let Err(r) = start(&mock, Wire::Gemini, &path, gemini_key(&headers, &query), &req, &headers).await {
        return r;
    }
    let Some((model, method)) = action.split_once(':') else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}})),
        )
            .into_response();
    };
    if method == "batchEmbedContents" {
        let requests = req
            .get("requests")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let embeddings: Vec<Value> = requests
            .iter()
            .map(|r| {
                let text = r.get("content").map(text_of).unwrap_or_default();
                json!({"values": embedding_of(&text, mock_dims(r, "outputDimensionality"))})
            })
            .collect();
        return Json(json!({"embeddings": embeddings})).into_response();
    }
    // An image model asked for images: one 1×1 PNG, 1,290 tokens; Gemini 3 shows an interim
    // image as a thought first (and a line of text); a prompt that says "forbidden" is blocked
    // as Gemini blocks an unsafe image (no parts, finishReason IMAGE_SAFETY, the prompt billed).
    let modalities = req
        .member("generationConfig")
        .and_then(|g| g.member("responseModalities"))
        .and_then(Value::as_array);
    if method == "generateContent" && modalities.is_some_and(|m| m.iter().any(|x| x == "IMAGE")) {
        let prompt = req["contents"][0]["parts"][0]["text"].as_str().unwrap_or("");
        let input = script::prompt_tokens(prompt.chars().count());
        if prompt.contains("forbidden") {
            return Json(json!({
                "candidates": [{"finishReason": "IMAGE_SAFETY", "index": 0}],
                "usageMetadata": {"promptTokenCount": input, "totalTokenCount": input},
                "modelVersion": model,
            }))
            .into_response();
        }
        let image = json!({"inlineData": {"mimeType": "image/png", "data": super::openai::PNG}});
        let parts = if model.starts_with("gemini-3") {
            json!([{"text": "Here is the image.", "thought": true},
                   {"inlineData": {"mimeType": "image/png", "data": super::openai::PNG}, "thought": true},
                   image])
        } else {
            json!([image])
        };
        return Json(json!({
            "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": input, "candidatesTokenCount": 1290, "totalTokenCount": input + 1290},
            "modelVersion": model,
        }))
        .into_response();
    }
    let ask = match ask(&req, model) {
        Ok(a) => a,
        Err(why) => return invalid(Wire::Gemini, &why),
    };
    let reply = script::reply(&ask, mock.reply_words);
    let prompt = script::prompt_tokens(ask.prompt_chars);
    let n = mock.next_id.fetch_add(1, Ordering::Relaxed);
    let gemini_3 = model.starts_with("gemini-3");
    let finish = match &reply {
        Reply::Text { cut: true, .. } => "MAX_TOKENS",
        _ => "STOP",
    };
    let usage = |candidates: i64| {
        let mut u = json!({"promptTokenCount": prompt, "candidatesTokenCount": candidates,
                           "totalTokenCount": prompt + candidates + ask.reasoning});
        if ask.reasoning > 0 {
            u["thoughtsTokenCount"] = json!(ask.reasoning);
        }
        u
    };
    // Function calls (one event when streamed): Gemini 3 names each, the first of a step signed.
    let call_parts = |calls: &[(String, Value)]| -> Vec<Value> {
        calls
            .iter()
            .enumerate()
            .map(|(i, (name, args))| {
                let mut call = json!({"name": name, "args": args});
                if gemini_3 {
                    call["id"] = json!(format!("fc_mock{n}_{i}"));
                }
                let mut part = json!({"functionCall": call});
                if i == 0 {
                    part["thoughtSignature"] = json!(script::signature(&format!("{n}/{name}")));
                }
                part
            })
            .collect()
    };
    match method {
        "generateContent" => {
            let parts = match &reply {
                Reply::Text { .. } => vec![json!({"text": reply.text()})],
                Reply::Calls(calls) => call_parts(calls),
            };
            Json(json!({
                "candidates": [{"content": {"parts": parts, "role": "model"}, "finishReason": finish, "index": 0}],
                "usageMetadata": usage(reply.tokens()),
                "modelVersion": model,
            }))
            .into_response()
        }
        "streamGenerateContent" => {
            let mut events = Vec::new();
            let event = |parts: Vec<Value>, last: bool| {
                let cand = json!({"content": {"parts": parts, "role": "model"}, "index": 0});
                let mut ev = json!({"candidates": [cand], "modelVersion": model});
                if last {
                    ev["candidates"][0]["finishReason"] = json!(finish);
                    ev["usageMetadata"] = usage(reply.tokens());
                }
                format!("data: {ev}\r\n\r\n")
            };
            match &reply {
                Reply::Text { words, .. } => {
                    for (i, w) in words.iter().enumerate() {
                        events.push(event(vec![json!({"text": w})], i + 1 == words.len()));
                    }
                }
                Reply::Calls(calls) => events.push(event(call_parts(calls), true)),
            }
            sse_body(events, mock.stream_delay)
        }
        _ => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": {"code": 404, "message": "unknown method", "status": "NOT_FOUND"}})),
        )
            .into_response(),
    }
}

fn gemini_key(headers: &HeaderMap, query: &HashMap<String, String>) -> Option<String> {
    header(headers, "x-goog-api-key").or_else(|| query.get("key").cloned())
}

pub(super) async fn models(
    State(mock): State<Shared>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Err(r) = start(
        &mock,
        Wire::Gemini,
        "/v1beta/models",
        gemini_key(&headers, &query),
        &Value::Null,
        &headers,
    )
    .await
    {
        return r;
    }
    Json(json!({"models": [{"name": "models/gemini-2.5-flash", "displayName": "Gemini 2.5 Flash"}]})).into_response()
}
