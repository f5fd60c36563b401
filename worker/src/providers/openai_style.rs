//! OpenAI's wire format, spoken by OpenAI, xAI, Ollama (`/v1`), Gemini's `/openai` endpoint and
//! any OpenAI-compatible server. Requests go through nearly unchanged (the key's model, and a
//! request for the final usage chunk when streaming); answers pass through byte for byte.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use super::{Completion, Embeddings, KeyRef, ProviderError};
use crate::protocol::json;
use crate::protocol::openai::images::ImagesRequest;
use crate::protocol::openai::{self, ChatRequest, EmbeddingsRequest, Usage, WireUsage};
use crate::protocol::sse;
use crate::protocol::stream::Translate;

/// The base URL that `chat/completions` and `models` hang off.
fn api_base(key: &KeyRef) -> String {
    let base = key.base_url.trim_end_matches('/');
    if key.provider == "ollama" && !base.ends_with("/v1") {
        format!("{base}/v1")
    } else {
        base.to_string()
    }
}

fn authorized(builder: reqwest::RequestBuilder, key: &KeyRef) -> reqwest::RequestBuilder {
    // A keyless key (a local server such as Ollama) sends no Authorization header.
    if key.secret.is_empty() {
        builder
    } else {
        builder.bearer_auth(&key.secret)
    }
}

/// The app's body as it arrived, changed only where the worker must: the key's model, the
/// stream flags (and the final usage chunk a stream settles with), and the output cap a budget
/// holds when the app set none.
pub fn chat_body(key: &KeyRef, req: &ChatRequest, stream: bool, output_cap: Option<u64>) -> Bytes {
    let model = key.model.as_ref().map(|m| Value::String(m.clone()).to_string());
    let options = req
        .body()
        .get("stream_options")
        .and_then(|o| json::render_nested(o, &[("include_usage", Some("true"))]).ok())
        .unwrap_or_else(|| r#"{"include_usage":true}"#.to_string());
    let cap = output_cap.map(|n| n.to_string());
    // OpenAI's newer models take only max_completion_tokens; the others know max_tokens.
    let cap_field = if key.provider == "openai" {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    // Ids of tool calls another provider made carry its state: not this provider's to see.
    let messages = req.messages_without_carried_state();
    let mut changes: Vec<(&str, Option<&str>)> = Vec::with_capacity(5);
    if let Some(m) = &messages {
        changes.push(("messages", Some(m)));
    }
    if let Some(m) = &model {
        changes.push(("model", Some(m)));
    }
    if stream {
        changes.push(("stream", Some("true")));
        changes.push(("stream_options", Some(&options)));
    } else {
        changes.push(("stream", None));
        changes.push(("stream_options", None));
    }
    if let Some(c) = &cap {
        changes.push((cap_field, Some(c)));
    }
    Bytes::from(req.body().render(&changes))
}

/// `POST {base}/chat/completions` with `body`.
pub fn chat_request(http: &reqwest::Client, key: &KeyRef, body: Bytes) -> reqwest::RequestBuilder {
    let url = format!("{}/chat/completions", api_base(key));
    json_body(authorized(http.post(url), key), body)
}

/// `POST {base}/embeddings` with the app's body (and the key's model, if it names one).
pub fn embeddings_request(http: &reqwest::Client, key: &KeyRef, req: &EmbeddingsRequest) -> reqwest::RequestBuilder {
    let model = key.model.as_ref().map(|m| Value::String(m.clone()).to_string());
    let changes: Vec<(&str, Option<&str>)> = model.iter().map(|m| ("model", Some(m.as_str()))).collect();
    let url = format!("{}/embeddings", api_base(key));
    json_body(authorized(http.post(url), key), req.body().render(&changes))
}

fn json_body(builder: reqwest::RequestBuilder, body: impl Into<reqwest::Body>) -> reqwest::RequestBuilder {
    builder
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
}

/// The answer passes through unchanged; only its usage is read.
pub fn read_embeddings(body: Bytes) -> Result<Embeddings, String> {
    #[derive(Deserialize)]
    struct UsageOnly {
        usage: Option<WireUsage>,
    }
    let parsed: UsageOnly =
        serde_json::from_slice(&body).map_err(|e| format!("the provider's answer is not JSON: {e}"))?;
    Ok(Embeddings {
        usage: parsed.usage.and_then(|u| u.usage()),
        body,
    })
}

/// `POST {base}/images/generations` for one image: the app's body with `n` 1 and the key's model.
pub fn image_request(http: &reqwest::Client, key: &KeyRef, req: &ImagesRequest) -> reqwest::RequestBuilder {
    let model = key.model.as_ref().map(|m| Value::String(m.clone()).to_string());
    let mut changes: Vec<(&str, Option<&str>)> = vec![("n", Some("1"))];
    if let Some(m) = &model {
        changes.push(("model", Some(m)));
    }
    let url = format!("{}/images/generations", api_base(key));
    json_body(authorized(http.post(url), key), req.body().render(&changes))
}

/// An image answer: its `data` entries as they came, and `usage` (`input_tokens`,
/// `output_tokens`) when the provider reports it.
pub fn read_image(body: &[u8]) -> Result<super::Images, String> {
    #[derive(Deserialize)]
    struct Answer {
        #[serde(default)]
        data: Vec<Value>,
        #[serde(default)]
        usage: Option<ImageUsage>,
    }
    #[derive(Deserialize)]
    struct ImageUsage {
        #[serde(default)]
        input_tokens: Option<i64>,
        #[serde(default)]
        output_tokens: Option<i64>,
    }
    let a: Answer = serde_json::from_slice(body).map_err(|e| format!("the provider's answer is not JSON: {e}"))?;
    if a.data.is_empty() {
        return Err("the provider's answer holds no image".into());
    }
    Ok(super::Images {
        data: a.data,
        usage: a
            .usage
            .map(|u| Usage::new(openai::tokens(u.input_tokens), openai::tokens(u.output_tokens))),
        declined: None,
    })
}

pub fn list_models_request(http: &reqwest::Client, key: &KeyRef) -> reqwest::RequestBuilder {
    authorized(http.get(format!("{}/models", api_base(key))), key)
}

/// `{"error": {"message", "type", "code"}}`; the code is `code`, else `type`.
pub fn read_error(v: &Value) -> ProviderError {
    let e = v.get("error").unwrap_or(v);
    let text = |f: &str| {
        e.get(f)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let message = match e {
        Value::String(s) => s.clone(),
        _ => text("message").unwrap_or_default(),
    };
    ProviderError {
        code: text("code").or_else(|| text("type")),
        retry_after_ms: None,
        message,
    }
}

#[derive(Deserialize)]
struct UsageOnly {
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    choices: Vec<ChoiceText>,
}

#[derive(Deserialize)]
struct ChoiceText {
    #[serde(default)]
    message: Option<MessageText>,
    #[serde(default)]
    delta: Option<MessageText>,
}

#[derive(Deserialize)]
struct MessageText {
    #[serde(default)]
    content: Option<String>,
}

/// The answer passes through unchanged; only its usage (and length, in case there is none) is
/// read.
pub fn read_completion(body: Bytes, prompt_est: i64) -> Result<Completion, String> {
    let parsed: UsageOnly =
        serde_json::from_slice(&body).map_err(|e| format!("the provider's answer is not JSON: {e}"))?;
    let generated: usize = parsed
        .choices
        .iter()
        .filter_map(|c| c.message.as_ref().and_then(|m| m.content.as_ref()))
        .map(String::len)
        .sum();
    let usage = parsed
        .usage
        .and_then(|u| u.usage())
        .unwrap_or_else(|| Usage::new(prompt_est, openai::count_tokens(generated)));
    Ok(Completion { usage, body })
}

/// Passes an OpenAI stream through event by event, reading the usage chunk (which the worker
/// asked for) and dropping it when the app did not ask for it.
pub struct Passthrough {
    wants_usage: bool,
    usage: Option<Usage>,
    generated: usize,
    done: bool,
}

impl Passthrough {
    pub fn new(wants_usage: bool) -> Passthrough {
        Passthrough {
            wants_usage,
            usage: None,
            generated: 0,
            done: false,
        }
    }
}

impl Translate for Passthrough {
    fn event(&mut self, ev: sse::Event, out: &mut Vec<Bytes>) {
        if ev.data == "[DONE]" {
            self.done = true;
            out.push(ev.raw);
            return;
        }
        if let Ok(chunk) = serde_json::from_str::<UsageOnly>(&ev.data) {
            self.generated += chunk
                .choices
                .iter()
                .filter_map(|c| c.delta.as_ref().and_then(|d| d.content.as_ref()))
                .map(String::len)
                .sum::<usize>();
            if let Some(u) = chunk.usage.and_then(|u| u.usage()) {
                self.usage = Some(u);
                if chunk.choices.is_empty() && !self.wants_usage {
                    return;
                }
            }
        }
        out.push(ev.raw);
    }

    fn finish(&mut self, _usage: Usage, _out: &mut Vec<Bytes>) {}

    fn reported_usage(&self) -> Option<Usage> {
        self.usage
    }

    fn generated_bytes(&self) -> usize {
        self.generated
    }

    fn completed(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(data: &str) -> sse::Event {
        sse::Event {
            name: None,
            data: data.to_string(),
            raw: sse::data(data),
        }
    }

    #[test]
    fn usage_chunk_is_read_and_dropped_unless_asked_for() {
        for wants in [false, true] {
            let mut p = Passthrough::new(wants);
            let mut out = Vec::new();
            p.event(event(r#"{"choices":[{"delta":{"content":"hello"}}]}"#), &mut out);
            p.event(
                event(r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#),
                &mut out,
            );
            p.event(event("[DONE]"), &mut out);
            assert_eq!(out.len(), if wants { 3 } else { 2 });
            assert_eq!(p.reported_usage(), Some(Usage::new(3, 2)));
            assert_eq!(p.generated_bytes(), 5);
            assert!(p.completed());
        }
    }

    #[test]
    fn request_gets_the_keys_model_and_stream_usage() {
        let http = reqwest::Client::new();
        let key = KeyRef {
            id: 1,
            provider: "ollama".into(),
            model: Some("llama3".into()),
            base_url: "http://localhost:11434".into(),
            secret: String::new(),
            label: String::new(),
        };
        let req = ChatRequest::parse(bytes::Bytes::from_static(
            br#"{"model":"chat","messages":[{"role":"user","content":"hi"}],"stream_options":{"x":1},"future_field":[1,{}]}"#,
        ))
        .unwrap();
        let built = chat_request(&http, &key, chat_body(&key, &req, true, Some(64)))
            .build()
            .unwrap();
        assert_eq!(built.url().as_str(), "http://localhost:11434/v1/chat/completions");
        assert!(built.headers().get("authorization").is_none());
        let body: Value = serde_json::from_slice(built.body().unwrap().as_bytes().unwrap()).unwrap();
        assert_eq!(body["model"], "llama3");
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["stream_options"]["x"], 1);
        assert_eq!(body["max_tokens"], 64);
        assert_eq!(
            body["future_field"][1],
            serde_json::json!({}),
            "fields the worker does not know pass through"
        );
        let plain = chat_request(&http, &key, chat_body(&key, &req, false, None))
            .build()
            .unwrap();
        let body: Value = serde_json::from_slice(plain.body().unwrap().as_bytes().unwrap()).unwrap();
        assert!(
            body.get("stream_options").is_none() && body.get("max_tokens").is_none(),
            "{body}"
        );
    }
}
