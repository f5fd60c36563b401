//! Gemini's native API: `models/{model}:generateContent` (and `:streamGenerateContent?alt=sse`),
//! key in `x-goog-api-key`. Requests and answers are translated from and to OpenAI's shape.
//! Errors carry their meaning in `details`: `ErrorInfo.reason` (API_KEY_INVALID), the
//! `QuotaFailure` quota id (per minute or per day), and `RetryInfo.retryDelay`.

use base64::Engine;
use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::{content_pieces, Completion, Embeddings, KeyRef, Piece, ProviderError, Translate};
use crate::duration;
use crate::protocol::openai::{self, ChatRequest, EmbeddingInput, EmbeddingsRequest, Usage};
use crate::protocol::sse;

/// The model's segment of the URL: the key's model, else the one requested (checked by the
/// endpoint), escaped so that it stays one path segment whatever it holds.
fn model_path(key: &KeyRef, requested: Option<&str>) -> Result<String, String> {
    let model = key
        .model_for(requested)
        .ok_or_else(|| format!("Gemini key {} has no model and the request names none", key.id))?;
    Ok(super::percent_encoded(model.strip_prefix("models/").unwrap_or(model)))
}

/// The request body in Gemini's shape. `output_cap`: `maxOutputTokens` when the app set none.
pub fn body(req: &ChatRequest, output_cap: Option<u64>) -> Result<Value, String> {
    let mut system: Vec<Value> = Vec::new();
    let mut contents: Vec<Value> = Vec::new();
    for m in req.messages()? {
        let parts: Vec<Value> = content_pieces(&m.content)?
            .into_iter()
            .map(|p| match p {
                Piece::Text(t) => json!({"text": t}),
                Piece::Image { mime, data } => json!({"inlineData": {"mimeType": mime, "data": data}}),
            })
            .collect();
        match m.role.as_ref() {
            "system" | "developer" => system.extend(parts),
            "user" => contents.push(json!({"role": "user", "parts": parts})),
            "assistant" => contents.push(json!({"role": "model", "parts": parts})),
            other => {
                return Err(format!(
                    "messages with role \"{}\" are not supported with native Gemini keys \
                     (give the key the base URL of Gemini's OpenAI-compatible endpoint, .../v1beta/openai)",
                    other.chars().take(40).collect::<String>()
                ))
            }
        }
    }
    let mut out = Map::new();
    out.insert("contents".into(), Value::Array(contents));
    if !system.is_empty() {
        out.insert("systemInstruction".into(), json!({"parts": system}));
    }
    let sampling = req.sampling()?;
    let mut config = Map::new();
    if let Some(n) = req.max_tokens().or(output_cap) {
        config.insert("maxOutputTokens".into(), json!(n));
    }
    let numbers = [
        ("temperature", sampling.temperature),
        ("topP", sampling.top_p),
        ("presencePenalty", sampling.presence_penalty),
        ("frequencyPenalty", sampling.frequency_penalty),
    ];
    for (to, v) in numbers {
        if let Some(v) = v {
            config.insert(to.into(), json!(v));
        }
    }
    if req.choices() > 1 {
        config.insert("candidateCount".into(), json!(req.choices()));
    }
    if let Some(seed) = sampling.seed {
        config.insert("seed".into(), json!(seed));
    }
    if !sampling.stop.is_empty() {
        config.insert("stopSequences".into(), json!(sampling.stop));
    }
    if sampling.response_format.as_deref() == Some("json_object") {
        config.insert("responseMimeType".into(), json!("application/json"));
    }
    if !config.is_empty() {
        out.insert("generationConfig".into(), Value::Object(config));
    }
    Ok(Value::Object(out))
}

/// The request body in Gemini's shape, as JSON bytes.
pub fn chat_body(req: &ChatRequest, output_cap: Option<u64>) -> Result<Bytes, String> {
    serde_json::to_vec(&body(req, output_cap)?)
        .map(Bytes::from)
        .map_err(|e| e.to_string())
}

/// `models/{model}:generateContent` (or `:streamGenerateContent?alt=sse`) with `body`.
pub fn chat_request(
    http: &reqwest::Client,
    key: &KeyRef,
    req: &ChatRequest,
    stream: bool,
    body: Bytes,
) -> Result<reqwest::RequestBuilder, String> {
    let model = model_path(key, req.model())?;
    let base = key.base_url.trim_end_matches('/');
    let url = if stream {
        format!("{base}/v1beta/models/{model}:streamGenerateContent?alt=sse")
    } else {
        format!("{base}/v1beta/models/{model}:generateContent")
    };
    Ok(http
        .post(url)
        .header("x-goog-api-key", &key.secret)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body))
}

/// `models/{model}:batchEmbedContents`, one request per input text.
pub fn embeddings_request(
    http: &reqwest::Client,
    key: &KeyRef,
    req: &EmbeddingsRequest,
) -> Result<reqwest::RequestBuilder, String> {
    let EmbeddingInput::Texts(texts) = req.input() else {
        return Err("Gemini embeds text only: send `input` as a string or an array of strings".into());
    };
    let model = model_path(key, req.model())?;
    let requests: Vec<Value> = texts
        .iter()
        .map(|t| {
            let mut r = json!({"model": format!("models/{model}"), "content": {"parts": [{"text": t}]}});
            if let Some(d) = req.dimensions() {
                r["outputDimensionality"] = json!(d);
            }
            r
        })
        .collect();
    let base = key.base_url.trim_end_matches('/');
    Ok(http
        .post(format!("{base}/v1beta/models/{model}:batchEmbedContents"))
        .header("x-goog-api-key", &key.secret)
        .json(&json!({"requests": requests})))
}

/// `{"embeddings": [{"values": [...]}]}` as OpenAI's list. Gemini reports no usage: the
/// tokens are counted from the input.
pub fn read_embeddings(body: &[u8], req: &EmbeddingsRequest, shown_model: &str) -> Result<Embeddings, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("Gemini's answer is not JSON: {e}"))?;
    let embeddings = v
        .get("embeddings")
        .and_then(Value::as_array)
        .ok_or("Gemini's answer has no `embeddings`")?;
    let mut data = Vec::with_capacity(embeddings.len());
    for (i, e) in embeddings.iter().enumerate() {
        let values = e
            .get("values")
            .and_then(Value::as_array)
            .ok_or("an embedding in Gemini's answer has no `values`")?;
        let embedding = if req.wants_base64() {
            let mut raw = Vec::with_capacity(values.len() * 4);
            for x in values {
                let x = x
                    .as_f64()
                    .ok_or("an embedding value in Gemini's answer is not a number")?;
                raw.extend_from_slice(&(x as f32).to_le_bytes());
            }
            Value::String(base64::engine::general_purpose::STANDARD.encode(raw))
        } else {
            Value::Array(values.clone())
        };
        data.push(json!({"object": "embedding", "index": i, "embedding": embedding}));
    }
    let tokens = req.estimate_tokens();
    let answer = json!({
        "object": "list",
        "data": data,
        "model": shown_model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    });
    Ok(Embeddings {
        body: Bytes::from(answer.to_string()),
        usage: None,
    })
}

pub fn list_models_request(http: &reqwest::Client, key: &KeyRef) -> reqwest::RequestBuilder {
    let base = key.base_url.trim_end_matches('/');
    http.get(format!("{base}/v1beta/models"))
        .header("x-goog-api-key", &key.secret)
}

/// The code: `ErrorInfo.reason`, else the first `QuotaFailure` quota id, else `status`.
pub fn read_error(v: &Value) -> ProviderError {
    let e = v.get("error").unwrap_or(v);
    let details = e
        .get("details")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let of_type = |suffix: &str| {
        details.iter().find(|d| {
            d.get("@type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.ends_with(suffix))
        })
    };
    let reason = of_type("ErrorInfo")
        .and_then(|d| d.get("reason"))
        .and_then(Value::as_str);
    let quota = of_type("QuotaFailure")
        .and_then(|d| d.get("violations"))
        .and_then(Value::as_array)
        .and_then(|v| v.iter().find_map(|x| x.get("quotaId").and_then(Value::as_str)));
    let status = e.get("status").and_then(Value::as_str);
    let retry = of_type("RetryInfo")
        .and_then(|d| d.get("retryDelay"))
        .and_then(Value::as_str)
        .and_then(duration::parse_compound)
        .map(|d| d.as_millis().min(7 * 86_400_000) as i64);
    ProviderError {
        code: reason.or(quota).or(status).map(str::to_string),
        retry_after_ms: retry,
        message: e.get("message").and_then(Value::as_str).unwrap_or("").to_string(),
    }
}

fn finish_reason(gemini: &str) -> &'static str {
    match gemini {
        "MAX_TOKENS" => "length",
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" => "content_filter",
        _ => "stop",
    }
}

fn candidate_text(c: &Value) -> String {
    c.get("content")
        .and_then(|c| c.get("parts"))
        .and_then(Value::as_array)
        .map(|parts| {
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<String>()
        })
        .unwrap_or_default()
}

/// Gemini counts thoughts apart; they are output the key paid for.
fn usage_of(v: &Value) -> Option<Usage> {
    let m = v.get("usageMetadata")?;
    let n = |f: &str| m.get(f).and_then(Value::as_i64).unwrap_or(0);
    Some(Usage {
        prompt_tokens: n("promptTokenCount"),
        completion_tokens: n("candidatesTokenCount") + n("thoughtsTokenCount"),
    })
}

pub fn read_completion(body: &[u8], shown_model: &str) -> Result<Completion, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("Gemini's answer is not JSON: {e}"))?;
    let candidates = v
        .get("candidates")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let usage = usage_of(&v);
    let id = openai::completion_id();
    let choices: Vec<Value> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({
                "index": i,
                "message": {"role": "assistant", "content": candidate_text(c)},
                "finish_reason": finish_reason(c.get("finishReason").and_then(Value::as_str).unwrap_or("STOP")),
                "logprobs": Value::Null,
            })
        })
        .collect();
    let generated_chars = candidates.iter().map(|c| candidate_text(c).chars().count()).sum();
    let u = usage.unwrap_or_default();
    let answer = json!({
        "id": id,
        "object": "chat.completion",
        "created": openai::unix_now(),
        "model": shown_model,
        "choices": choices,
        "usage": openai::usage_json(u),
    });
    Ok(Completion {
        body: Bytes::from(answer.to_string()),
        usage,
        generated_chars,
    })
}

/// `streamGenerateContent?alt=sse` events (each a `GenerateContentResponse`) as OpenAI chunks.
pub struct StreamTranslator {
    id: String,
    model: String,
    created: u64,
    wants_usage: bool,
    started: bool,
    finished: bool,
    usage: Option<Usage>,
    chars: usize,
}

impl StreamTranslator {
    pub fn new(model: &str, wants_usage: bool) -> StreamTranslator {
        StreamTranslator {
            id: openai::completion_id(),
            model: model.to_string(),
            created: openai::unix_now(),
            wants_usage,
            started: false,
            finished: false,
            usage: None,
            chars: 0,
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
        if let Some(e) = v.get("error") {
            out.push(sse::data(&json!({"error": e}).to_string()));
            return;
        }
        if let Some(u) = usage_of(&v) {
            self.usage = Some(u);
        }
        let Some(c) = v.get("candidates").and_then(Value::as_array).and_then(|c| c.first()) else {
            return;
        };
        if !self.started {
            self.started = true;
            self.push(json!({"role": "assistant", "content": ""}), None, out);
        }
        let text = candidate_text(c);
        if !text.is_empty() {
            self.chars += text.chars().count();
            self.push(json!({"content": text}), None, out);
        }
        if let Some(reason) = c.get("finishReason").and_then(Value::as_str) {
            self.finished = true;
            self.push(json!({}), Some(finish_reason(reason)), out);
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
        self.usage
    }

    fn generated_chars(&self) -> usize {
        self.chars
    }

    fn completed(&self) -> bool {
        self.finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_translation() {
        let req = ChatRequest::parse(bytes::Bytes::from_static(
            br#"{"model":"chat","max_tokens":50,"temperature":0.2,"stop":"END",
                "messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"},
                            {"role":"assistant","content":"hello"},{"role":"user","content":[{"type":"text","text":"more"}]}]}"#,
        ))
        .unwrap();
        let b = body(&req, None).unwrap();
        assert_eq!(b["systemInstruction"]["parts"][0]["text"], "be brief");
        assert_eq!(b["contents"].as_array().unwrap().len(), 3);
        assert_eq!(b["contents"][1]["role"], "model");
        assert_eq!(b["contents"][2]["parts"][0]["text"], "more");
        assert_eq!(b["generationConfig"]["maxOutputTokens"], 50);
        assert_eq!(b["generationConfig"]["stopSequences"][0], "END");
        let tool = ChatRequest::parse(bytes::Bytes::from_static(
            br#"{"messages":[{"role":"tool","content":"x"}]}"#,
        ))
        .unwrap();
        assert!(body(&tool, None).unwrap_err().contains("tool"));
        // A budget's cap when the app set none; the app's own when it did.
        let uncapped = ChatRequest::parse(bytes::Bytes::from_static(
            br#"{"messages":[{"role":"user","content":"x"}],"n":2}"#,
        ))
        .unwrap();
        let b = body(&uncapped, Some(77)).unwrap();
        assert_eq!(b["generationConfig"]["maxOutputTokens"], 77);
        assert_eq!(b["generationConfig"]["candidateCount"], 2);
        assert_eq!(body(&req, Some(77)).unwrap()["generationConfig"]["maxOutputTokens"], 50);
    }

    #[test]
    fn a_model_name_stays_one_path_segment() {
        let key = KeyRef {
            id: 1,
            provider: "gemini".into(),
            model: None,
            base_url: "https://g.test".into(),
            secret: "AIza-test".into(),
            label: String::new(),
        };
        let req = ChatRequest::parse(bytes::Bytes::from_static(
            br#"{"model":"../../_mock/reset?","messages":[{"role":"user","content":"x"}]}"#,
        ))
        .unwrap();
        let built = chat_request(
            &reqwest::Client::new(),
            &key,
            &req,
            false,
            chat_body(&req, None).unwrap(),
        )
        .unwrap()
        .build()
        .unwrap();
        assert_eq!(
            built.url().path(),
            "/v1beta/models/..%2F..%2F_mock%2Freset%3F:generateContent"
        );
        assert_eq!(built.url().query(), None);
    }

    #[test]
    fn error_details() {
        let invalid: Value = serde_json::from_str(
            r#"{"error":{"code":400,"message":"API key not valid.","status":"INVALID_ARGUMENT",
                "details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID"}]}}"#,
        )
        .unwrap();
        assert_eq!(read_error(&invalid).code.as_deref(), Some("API_KEY_INVALID"));
        let quota: Value = serde_json::from_str(
            r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"quota",
                "details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure",
                            "violations":[{"quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]},
                           {"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"26s"}]}}"#,
        )
        .unwrap();
        let e = read_error(&quota);
        assert_eq!(
            e.code.as_deref(),
            Some("GenerateRequestsPerDayPerProjectPerModel-FreeTier")
        );
        assert_eq!(e.retry_after_ms, Some(26_000));
        let bare: Value = serde_json::from_str(r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED"}}"#).unwrap();
        assert_eq!(read_error(&bare).code.as_deref(), Some("RESOURCE_EXHAUSTED"));
    }

    #[test]
    fn answer_translation() {
        let c = read_completion(
            br#"{"candidates":[{"content":{"parts":[{"text":"Hel"},{"text":"lo"}],"role":"model"},"finishReason":"MAX_TOKENS"}],
                "usageMetadata":{"promptTokenCount":7,"candidatesTokenCount":2,"thoughtsTokenCount":3,"totalTokenCount":12}}"#,
            "gemini-2.5-flash",
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&c.body).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "Hello");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["completion_tokens"], 5);
        assert_eq!(
            c.usage,
            Some(Usage {
                prompt_tokens: 7,
                completion_tokens: 5
            })
        );
    }
}
