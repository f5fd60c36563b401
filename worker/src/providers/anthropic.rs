//! Anthropic's messages API (`/v1/messages`, key in `x-api-key`, `anthropic-version`).
//! Requests and answers are translated from and to OpenAI's shape; errors are
//! `{"type":"error","error":{"type","message"}}` with a `retry-after` header on 429.

use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::{content_pieces, Completion, KeyRef, Piece, ProviderError, Translate};
use crate::protocol::openai::{self, ChatRequest, Usage};
use crate::protocol::sse;

pub const VERSION: &str = "2023-06-01";

pub fn body(req: &ChatRequest, model: &str, stream: bool, default_max_tokens: u32) -> Result<Value, String> {
    let mut system: Vec<String> = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    for m in req.messages()? {
        let pieces = content_pieces(&m.content)?;
        match m.role.as_ref() {
            "system" | "developer" => system.extend(pieces.into_iter().filter_map(|p| match p {
                Piece::Text(t) => Some(t),
                Piece::Image { .. } => None,
            })),
            role @ ("user" | "assistant") => {
                let content: Vec<Value> = pieces
                    .into_iter()
                    .map(|p| match p {
                        Piece::Text(t) => json!({"type": "text", "text": t}),
                        Piece::Image { mime, data } => {
                            json!({"type": "image", "source": {"type": "base64", "media_type": mime, "data": data}})
                        }
                    })
                    .collect();
                messages.push(json!({"role": role, "content": content}));
            }
            other => {
                return Err(format!(
                    "messages with role \"{}\" are not supported with Anthropic keys",
                    other.chars().take(40).collect::<String>()
                ))
            }
        }
    }
    let sampling = req.sampling()?;
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    out.insert(
        "max_tokens".into(),
        json!(req.max_tokens().unwrap_or(default_max_tokens as u64)),
    );
    out.insert("messages".into(), Value::Array(messages));
    if !system.is_empty() {
        out.insert("system".into(), json!(system.join("\n\n")));
    }
    if let Some(t) = sampling.temperature {
        out.insert("temperature".into(), json!(t));
    }
    if let Some(p) = sampling.top_p {
        out.insert("top_p".into(), json!(p));
    }
    if !sampling.stop.is_empty() {
        out.insert("stop_sequences".into(), json!(sampling.stop));
    }
    if stream {
        out.insert("stream".into(), Value::Bool(true));
    }
    Ok(Value::Object(out))
}

/// The request body in Anthropic's shape for `key`'s model, as JSON bytes.
pub fn chat_body(key: &KeyRef, req: &ChatRequest, stream: bool, default_max_tokens: u32) -> Result<Bytes, String> {
    let model = key
        .model_for(req.model())
        .ok_or_else(|| format!("Anthropic key {} has no model and the request names none", key.id))?;
    serde_json::to_vec(&body(req, model, stream, default_max_tokens)?)
        .map(Bytes::from)
        .map_err(|e| e.to_string())
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

fn finish_reason(stop: &str) -> &'static str {
    match stop {
        "max_tokens" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    }
}

/// Input tokens that count towards the input limit: cache reads do not (provider facts).
fn usage_of(u: &Value) -> (Option<i64>, Option<i64>) {
    let n = |f: &str| u.get(f).and_then(Value::as_i64);
    let input = match (n("input_tokens"), n("cache_creation_input_tokens")) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
    };
    (input, n("output_tokens"))
}

pub fn read_completion(body: &[u8], shown_model: &str) -> Result<Completion, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("Anthropic's answer is not JSON: {e}"))?;
    let text: String = v
        .get("content")
        .and_then(Value::as_array)
        .map(|blocks| {
            blocks
                .iter()
                .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
                .filter_map(|b| b.get("text").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    let (input, output) = v.get("usage").map(usage_of).unwrap_or((None, None));
    let usage = (input.is_some() || output.is_some()).then(|| Usage {
        prompt_tokens: input.unwrap_or(0),
        completion_tokens: output.unwrap_or(0),
    });
    let reason = finish_reason(v.get("stop_reason").and_then(Value::as_str).unwrap_or("end_turn"));
    let answer = openai::completion(
        &openai::completion_id(),
        shown_model,
        &text,
        reason,
        usage.unwrap_or_default(),
    );
    Ok(Completion {
        body: Bytes::from(answer.to_string()),
        usage,
        generated_chars: text.chars().count(),
    })
}

/// Anthropic's stream events (`message_start`, `content_block_delta`, `message_delta`,
/// `message_stop`, `error`) as OpenAI chunks.
pub struct StreamTranslator {
    id: String,
    model: String,
    created: u64,
    wants_usage: bool,
    input: Option<i64>,
    output: Option<i64>,
    chars: usize,
    stopped: bool,
}

impl StreamTranslator {
    pub fn new(model: &str, wants_usage: bool) -> StreamTranslator {
        StreamTranslator {
            id: openai::completion_id(),
            model: model.to_string(),
            created: openai::unix_now(),
            wants_usage,
            input: None,
            output: None,
            chars: 0,
            stopped: false,
        }
    }

    fn push(&self, delta: Value, finish: Option<&str>, out: &mut Vec<Bytes>) {
        out.push(sse::data(
            &openai::chunk(&self.id, &self.model, self.created, delta, finish).to_string(),
        ));
    }
}

impl Translate for StreamTranslator {
    fn event(&mut self, ev: sse::Event, out: &mut Vec<Bytes>) {
        let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
            return;
        };
        let kind = v
            .get("type")
            .and_then(Value::as_str)
            .or(ev.name.as_deref())
            .unwrap_or("");
        match kind {
            "message_start" => {
                if let Some(u) = v.get("message").and_then(|m| m.get("usage")) {
                    let (i, o) = usage_of(u);
                    self.input = i.or(self.input);
                    self.output = o.or(self.output);
                }
                self.push(json!({"role": "assistant", "content": ""}), None, out);
            }
            "content_block_delta" => {
                if let Some(text) = v.get("delta").and_then(|d| d.get("text")).and_then(Value::as_str) {
                    self.chars += text.chars().count();
                    self.push(json!({"content": text}), None, out);
                }
            }
            "message_delta" => {
                if let Some(u) = v.get("usage") {
                    let (i, o) = usage_of(u);
                    self.input = i.or(self.input);
                    self.output = o.or(self.output);
                }
                if let Some(stop) = v
                    .get("delta")
                    .and_then(|d| d.get("stop_reason"))
                    .and_then(Value::as_str)
                {
                    self.push(json!({}), Some(finish_reason(stop)), out);
                }
            }
            "message_stop" => self.stopped = true,
            "error" => out.push(sse::data(
                &json!({"error": v.get("error").cloned().unwrap_or(Value::Null)}).to_string(),
            )),
            _ => {}
        }
    }

    fn finish(&mut self, usage: Usage, out: &mut Vec<Bytes>) {
        if self.wants_usage {
            out.push(sse::data(
                &openai::usage_chunk(&self.id, &self.model, self.created, usage).to_string(),
            ));
        }
        out.push(sse::data("[DONE]"));
    }

    fn reported_usage(&self) -> Option<Usage> {
        (self.input.is_some() || self.output.is_some()).then(|| Usage {
            prompt_tokens: self.input.unwrap_or(0),
            completion_tokens: self.output.unwrap_or(0),
        })
    }

    fn generated_chars(&self) -> usize {
        self.chars
    }

    fn completed(&self) -> bool {
        self.stopped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_translation() {
        let req = ChatRequest::parse(bytes::Bytes::from_static(
            br#"{"model":"chat","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}],"stop":["x"]}"#,
        ))
        .unwrap();
        let b = body(&req, "claude-sonnet-4-5", true, 333).unwrap();
        assert_eq!(b["model"], "claude-sonnet-4-5");
        assert_eq!(b["max_tokens"], 333);
        assert_eq!(b["system"], "be brief");
        assert_eq!(b["messages"].as_array().unwrap().len(), 1);
        assert_eq!(b["messages"][0]["content"][0]["text"], "hi");
        assert_eq!(b["stop_sequences"][0], "x");
        assert_eq!(b["stream"], true);
    }

    #[test]
    fn stream_translation_counts_usage() {
        let mut t = StreamTranslator::new("claude", false);
        let mut out = Vec::new();
        let ev = |name: &str, data: &str| sse::Event {
            name: Some(name.into()),
            data: data.into(),
            raw: sse::named(name, data),
        };
        t.event(
            ev(
                "message_start",
                r#"{"type":"message_start","message":{"usage":{"input_tokens":9,"output_tokens":1}}}"#,
            ),
            &mut out,
        );
        t.event(
            ev(
                "content_block_delta",
                r#"{"type":"content_block_delta","delta":{"type":"text_delta","text":"Hi!"}}"#,
            ),
            &mut out,
        );
        t.event(
            ev(
                "message_delta",
                r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":4}}"#,
            ),
            &mut out,
        );
        t.event(ev("message_stop", r#"{"type":"message_stop"}"#), &mut out);
        assert!(t.completed());
        assert_eq!(
            t.reported_usage(),
            Some(Usage {
                prompt_tokens: 9,
                completion_tokens: 4
            })
        );
        t.finish(t.reported_usage().unwrap(), &mut out);
        let texts: Vec<String> = out.iter().map(|b| String::from_utf8_lossy(b).to_string()).collect();
        assert_eq!(texts.len(), 4, "{texts:?}");
        assert!(texts[1].contains("\"content\":\"Hi!\""));
        assert!(texts[2].contains("\"finish_reason\":\"stop\""));
        assert_eq!(texts[3], "data: [DONE]\n\n");
    }
}
