//! OpenAI's wire format, the worker's lingua franca: what a chat or embeddings request asks for,
//! the token estimate a reservation is made with, and the responses, stream chunks and error
//! bodies the endpoint answers with whichever provider served.

use serde::Deserialize;
use serde_json::{json, Map, Value};

/// Tokens actually used by a call, as the provider reported them or as counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

/// The `usage` object of an OpenAI response or final stream chunk.
#[derive(Deserialize, Default)]
pub struct WireUsage {
    #[serde(default)]
    pub prompt_tokens: Option<i64>,
    #[serde(default)]
    pub completion_tokens: Option<i64>,
}

impl WireUsage {
    pub fn usage(&self) -> Option<Usage> {
        match (self.prompt_tokens, self.completion_tokens) {
            (None, None) => None,
            (p, c) => Some(Usage {
                prompt_tokens: p.unwrap_or(0).clamp(0, 1_000_000_000),
                completion_tokens: c.unwrap_or(0).clamp(0, 1_000_000_000),
            }),
        }
    }
}

/// A chat request as an app sent it (an OpenAI `chat.completions` body).
#[derive(Debug)]
pub struct ChatRequest {
    pub body: Map<String, Value>,
}

impl ChatRequest {
    /// Checks the shape the worker relies on; the error is for the caller (HTTP 400).
    pub fn parse(bytes: &[u8]) -> Result<ChatRequest, String> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| format!("the body is not valid JSON: {e}"))?;
        ChatRequest::from_value(value)
    }

    pub fn from_value(value: Value) -> Result<ChatRequest, String> {
        let Value::Object(body) = value else {
            return Err("the body must be a JSON object".into());
        };
        match body.get("messages") {
            Some(Value::Array(m)) if !m.is_empty() => {}
            Some(Value::Array(_)) => return Err("`messages` must not be empty".into()),
            _ => return Err("`messages` (an array) is required".into()),
        }
        if let Some(m) = body.get("model") {
            if !m.is_string() {
                return Err("`model` must be a string".into());
            }
        }
        for field in ["max_tokens", "max_completion_tokens"] {
            if let Some(v) = body.get(field) {
                if !v.is_null() && v.as_u64().is_none() {
                    return Err(format!("`{field}` must be a positive integer"));
                }
            }
        }
        Ok(ChatRequest { body })
    }

    pub fn model(&self) -> Option<&str> {
        self.body.get("model").and_then(Value::as_str)
    }

    pub fn user(&self) -> Option<&str> {
        self.body.get("user").and_then(Value::as_str).filter(|u| !u.is_empty())
    }

    pub fn stream(&self) -> bool {
        self.body.get("stream").and_then(Value::as_bool).unwrap_or(false)
    }

    /// Whether the app asked for the final usage chunk of a stream.
    pub fn wants_stream_usage(&self) -> bool {
        self.body
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    pub fn max_tokens(&self) -> Option<u64> {
        ["max_completion_tokens", "max_tokens"]
            .iter()
            .find_map(|f| self.body.get(*f).and_then(Value::as_u64))
    }

    pub fn messages(&self) -> &[Value] {
        self.body
            .get("messages")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Prompt tokens, estimated the way providers do before they count: about four characters
    /// per token plus a few per message.
    pub fn estimate_prompt_tokens(&self) -> i64 {
        let chars: usize = self
            .messages()
            .iter()
            .map(|m| text_of(m.get("content")).chars().count())
            .sum();
        (chars as i64 + 3) / 4 + 4 * self.messages().len() as i64
    }

    /// What a reservation charges up front: the prompt estimate plus the most the answer may
    /// use (OpenAI and Anthropic count the same way).
    pub fn estimate_tokens(&self, default_max_tokens: u32) -> i64 {
        let completion = self.max_tokens().unwrap_or(default_max_tokens as u64).min(1_000_000) as i64;
        self.estimate_prompt_tokens() + completion
    }
}

/// Inputs one embeddings request may carry (OpenAI's limit).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// An embeddings request as an app sent it (an OpenAI `/v1/embeddings` body).
#[derive(Debug)]
pub struct EmbeddingsRequest {
    pub body: Map<String, Value>,
}

/// What an embeddings request embeds.
#[derive(Debug, PartialEq, Eq)]
pub enum EmbeddingInput<'a> {
    Texts(Vec<&'a str>),
    /// Token ids (one list per input); only OpenAI-style providers take them.
    Tokens(usize),
}

impl EmbeddingsRequest {
    /// Checks the shape; the error is for the caller (HTTP 400).
    pub fn parse(bytes: &[u8]) -> Result<EmbeddingsRequest, String> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| format!("the body is not valid JSON: {e}"))?;
        let Value::Object(body) = value else {
            return Err("the body must be a JSON object".into());
        };
        let request = EmbeddingsRequest { body };
        request.input()?;
        if let Some(m) = request.body.get("model") {
            if !m.is_string() {
                return Err("`model` must be a string".into());
            }
        }
        match request.body.get("encoding_format") {
            None | Some(Value::Null) => {}
            Some(Value::String(f)) if f == "float" || f == "base64" => {}
            Some(_) => return Err("`encoding_format` must be \"float\" or \"base64\"".into()),
        }
        match request.body.get("dimensions") {
            None | Some(Value::Null) => {}
            Some(d) if d.as_u64().is_some_and(|n| (1..=65_536).contains(&n)) => {}
            Some(_) => return Err("`dimensions` must be a positive integer".into()),
        }
        Ok(request)
    }

    /// The inputs: a string, an array of strings, an array of token ids, or an array of arrays
    /// of token ids.
    pub fn input(&self) -> Result<EmbeddingInput<'_>, String> {
        const SHAPE: &str = "`input` must be a string, an array of strings, or an array of token arrays";
        let items = match self.body.get("input") {
            Some(Value::String(s)) => return Ok(EmbeddingInput::Texts(vec![s.as_str()])),
            Some(Value::Array(items)) if items.is_empty() => return Err("`input` must not be empty".into()),
            Some(Value::Array(items)) => items,
            Some(_) => return Err(SHAPE.into()),
            None => return Err("`input` is required".into()),
        };
        if items.len() > MAX_EMBEDDING_INPUTS {
            return Err(format!(
                "`input` holds {} items; at most {MAX_EMBEDDING_INPUTS} are allowed",
                items.len()
            ));
        }
        if let Some(texts) = items.iter().map(Value::as_str).collect::<Option<Vec<&str>>>() {
            return Ok(EmbeddingInput::Texts(texts));
        }
        let token = |v: &Value| v.as_u64().is_some();
        if items.iter().all(token) {
            return Ok(EmbeddingInput::Tokens(items.len()));
        }
        let lists: Option<Vec<&Vec<Value>>> = items.iter().map(Value::as_array).collect();
        match lists {
            Some(lists) if lists.iter().all(|l| !l.is_empty() && l.iter().all(token)) => {
                Ok(EmbeddingInput::Tokens(lists.iter().map(|l| l.len()).sum()))
            }
            _ => Err(SHAPE.into()),
        }
    }

    pub fn model(&self) -> Option<&str> {
        self.body.get("model").and_then(Value::as_str)
    }

    pub fn user(&self) -> Option<&str> {
        self.body.get("user").and_then(Value::as_str).filter(|u| !u.is_empty())
    }

    /// Whether the app wants each embedding as base64 of little-endian float32s.
    pub fn wants_base64(&self) -> bool {
        self.body.get("encoding_format").and_then(Value::as_str) == Some("base64")
    }

    pub fn dimensions(&self) -> Option<u64> {
        self.body.get("dimensions").and_then(Value::as_u64)
    }

    /// Input tokens: counted for token ids, about four characters per token for text. Settled
    /// when the provider reports none.
    pub fn estimate_tokens(&self) -> i64 {
        match self.input() {
            Ok(EmbeddingInput::Texts(texts)) => texts.iter().map(|t| (t.chars().count() as i64 + 3) / 4).sum(),
            Ok(EmbeddingInput::Tokens(n)) => n as i64,
            Err(_) => 0,
        }
    }
}

/// The text of a message's `content`: a string, or the text parts of an array of parts.
pub fn text_of(content: Option<&Value>) -> String {
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

/// Tokens in a piece of generated text, counted when a provider reports none.
pub fn count_tokens(chars: usize) -> i64 {
    (chars as i64 + 3) / 4
}

/// An OpenAI-style error body.
pub fn error_body(message: &str, kind: &str, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": Value::Null, "code": code}})
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A `chat.completion` response.
pub fn completion(id: &str, model: &str, content: &str, finish_reason: &str, usage: Usage) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": unix_now(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": finish_reason,
            "logprobs": Value::Null,
        }],
        "usage": usage_json(usage),
    })
}

pub fn usage_json(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// A `chat.completion.chunk` carrying a piece of the answer (or its end).
pub fn chunk(id: &str, model: &str, created: u64, delta: Value, finish_reason: Option<&str>) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": Value::Null}],
    })
}

/// The last chunk of a stream whose app asked for usage: no choices, only usage.
pub fn usage_chunk(id: &str, model: &str, created: u64, usage: Usage) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage_json(usage),
    })
}

/// A fresh completion id such as `chatcmpl-kp1a2b3c...`.
pub fn completion_id() -> String {
    format!("chatcmpl-kp{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked_and_estimated() {
        let r = ChatRequest::parse(
            br#"{"model":"chat","messages":[{"role":"user","content":"abcdefgh"},
                {"role":"user","content":[{"type":"text","text":"abcd"}]}],"max_tokens":100,"user":"u1"}"#,
        )
        .unwrap();
        assert_eq!(r.model(), Some("chat"));
        assert_eq!(r.user(), Some("u1"));
        assert_eq!(r.estimate_prompt_tokens(), 3 + 8);
        assert_eq!(r.estimate_tokens(1024), 111);
        assert!(!r.stream());

        assert!(ChatRequest::parse(b"[1]").unwrap_err().contains("object"));
        assert!(ChatRequest::parse(br#"{"model":"m"}"#)
            .unwrap_err()
            .contains("messages"));
        assert!(ChatRequest::parse(br#"{"messages":[]}"#).unwrap_err().contains("empty"));
        assert!(ChatRequest::parse(br#"{"messages":[{}],"max_tokens":-1}"#).is_err());
        assert!(ChatRequest::parse(br#"{"messages":[{}],"model":7}"#).is_err());
        let no_max = ChatRequest::parse(br#"{"messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(no_max.estimate_tokens(256), 1 + 4 + 256);
    }

    #[test]
    fn wire_usage() {
        let u: WireUsage =
            serde_json::from_str(r#"{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}"#).unwrap();
        assert_eq!(
            u.usage(),
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 7
            })
        );
        assert_eq!(WireUsage::default().usage(), None);
    }
}
