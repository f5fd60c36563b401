//! OpenAI's dialects: chat completions (`chat`: the request and its estimate; `chat_parse`:
//! the request as a conversation; `chat_render`: answers and streams in its shape) and
//! embeddings (`embeddings`); the error body and the helpers the other dialects share.

pub mod carry;
pub mod chat;
pub mod chat_answer;
pub mod chat_parse;
pub mod chat_render;
pub mod chat_request;
pub mod embeddings;
pub mod images;
pub mod responses;
pub mod responses_render;

pub use chat::ChatRequest;
pub use embeddings::{EmbeddingInput, EmbeddingsRequest};
pub use responses::ResponsesRequest;

use serde::Deserialize;
use serde_json::{json, Value};

pub use crate::protocol::conversation::Usage;

/// The `usage` object of an OpenAI response or final stream chunk.
#[derive(Deserialize, Default)]
pub struct WireUsage {
    #[serde(default)]
    pub prompt_tokens: Option<i64>,
    #[serde(default)]
    pub completion_tokens: Option<i64>,
    #[serde(default)]
    pub prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    pub completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Deserialize, Default)]
pub struct PromptDetails {
    #[serde(default)]
    pub cached_tokens: Option<i64>,
}

#[derive(Deserialize, Default)]
pub struct CompletionDetails {
    #[serde(default)]
    pub reasoning_tokens: Option<i64>,
}

/// A token count as settled: never negative, never absurd.
pub fn tokens(n: Option<i64>) -> i64 {
    n.unwrap_or(0).clamp(0, 1_000_000_000)
}

impl WireUsage {
    pub fn usage(&self) -> Option<Usage> {
        match (self.prompt_tokens, self.completion_tokens) {
            (None, None) => None,
            (p, c) => Some(Usage {
                prompt_tokens: tokens(p),
                completion_tokens: tokens(c),
                cached_tokens: tokens(self.prompt_tokens_details.as_ref().and_then(|d| d.cached_tokens)),
                reasoning_tokens: tokens(self.completion_tokens_details.as_ref().and_then(|d| d.reasoning_tokens)),
            }),
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

/// Longest model name a caller may send.
pub const MAX_MODEL_NAME: usize = 256;

/// Checks a model name a caller chose before it can reach a provider's URL or body: letters,
/// digits and `. _ - : / @ +` only, no `..`, no empty path segment, not starting with `/`.
/// (Provider URLs escape it as well.)
pub fn check_model_name(name: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/' | '@' | '+');
    let ok = !name.is_empty()
        && name.len() <= MAX_MODEL_NAME
        && name.chars().all(allowed)
        && !name.starts_with('/')
        && !name.contains("//")
        && !name.split('/').any(|segment| segment == ".." || segment == ".");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`model` must be 1 to {MAX_MODEL_NAME} characters of letters, digits and . _ - : / @ +, without `..` or empty path segments"
        ))
    }
}

/// Tokens in generated text of `bytes` bytes, counted when a provider reports none: a token
/// per four bytes (four characters of English; three quarters of one per character of Chinese
/// or Japanese, which providers count at about one).
pub fn count_tokens(bytes: usize) -> i64 {
    (bytes as i64 + 3) / 4
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

/// A fresh completion id such as `chatcmpl-kp1a2b3c...`.
pub fn completion_id() -> String {
    format!("chatcmpl-kp{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_a_caller_chooses_are_checked() {
        for ok in [
            "gemini-2.5-flash",
            "models/gemini-2.5-flash",
            "llama3:8b",
            "meta-llama/Llama-3-8B",
            "claude@2024",
            "ft:gpt-4o:org:x:1",
        ] {
            assert!(check_model_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "../../x?", "a?b", "a#b", "a%2e", "a/../b", "..", "/abs", "a b", "a\nb", "", "a//b",
        ] {
            assert!(check_model_name(bad).is_err(), "{bad}");
        }
        assert!(check_model_name(&"m".repeat(MAX_MODEL_NAME + 1)).is_err());
    }

    #[test]
    fn wire_usage() {
        let u: WireUsage = serde_json::from_str(
            r#"{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12,
                "prompt_tokens_details":{"cached_tokens":2},"completion_tokens_details":{"reasoning_tokens":3}}"#,
        )
        .unwrap();
        assert_eq!(
            u.usage(),
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 7,
                cached_tokens: 2,
                reasoning_tokens: 3
            })
        );
        assert_eq!(WireUsage::default().usage(), None);
    }
}
