//! Providers: what differs per provider: its address and authentication, which dialect its
//! bodies are in (rendered and read by `protocol`), and what an error answer says (its code and
//! retry delay, which `keypool_settle` turns into an outcome; the worker does not judge errors
//! itself).
//!
//! - [`openai_style`]: OpenAI, xAI, Ollama, any OpenAI-compatible base URL, and Gemini's
//!   OpenAI-compatible endpoint (a Gemini key whose base URL ends in `/openai`)
//! - [`gemini`]: Gemini's native `generateContent`
//! - [`anthropic`]: Anthropic's messages API
//! - [`http`]: plain HTTP APIs (SERP ...) reached through the proxy route, key in a header or
//!   query parameter

pub mod anthropic;
pub mod counters;
pub mod gemini;
pub mod http;
pub mod openai_style;

use bytes::Bytes;
use reqwest::header::HeaderMap;
use serde_json::Value;

use crate::duration;
use crate::protocol::conversation::{Answer, CarryError, Conversation, Dialect, Usage};
use crate::protocol::inbound::Inbound;
use crate::protocol::openai::chat_render::{self, ChunkWriter};
use crate::protocol::openai::images::ImagesRequest;
use crate::protocol::openai::responses_render::{self, EventWriter};
use crate::protocol::openai::{self, EmbeddingsRequest};
use crate::protocol::stream::{Observed, Reader, Translate, Translated, Writer};
use crate::protocol::{anthropic as anthropic_dialect, gemini as gemini_dialect};

/// A key granted by `keypool_reserve`, with what is needed to call its provider.
#[derive(Clone)]
pub struct KeyRef {
    pub id: i64,
    pub provider: String,
    pub model: Option<String>,
    pub base_url: String,
    pub secret: String,
    pub label: String,
}

impl std::fmt::Debug for KeyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRef")
            .field("id", &self.id)
            .field("provider", &self.provider)
            .field("model", &self.model)
            .field("base_url", &self.base_url)
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

/// The wire format a key speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    OpenAi,
    Gemini,
    Anthropic,
    Http,
}

impl KeyRef {
    pub fn wire(&self) -> Wire {
        match self.provider.as_str() {
            "gemini" if self.base_url.trim_end_matches('/').ends_with("/openai") => Wire::OpenAi,
            "gemini" => Wire::Gemini,
            "anthropic" => Wire::Anthropic,
            "http" => Wire::Http,
            _ => Wire::OpenAi,
        }
    }

    /// The model to ask the provider for: the key's, else the one the app named (unless that
    /// was a pool name).
    pub fn model_for<'a>(&'a self, requested: Option<&'a str>) -> Option<&'a str> {
        self.model.as_deref().or(requested)
    }
}

/// What a provider's error answer says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProviderError {
    /// The provider's error code (OpenAI `error.code`/`type`, Gemini reason / quota id /
    /// status, Anthropic `error.type`), for `keypool_settle`.
    pub code: Option<String>,
    /// When the provider says to try again.
    pub retry_after_ms: Option<i64>,
    /// Its message, with the key masked.
    pub message: String,
}

/// What a chat call's body depends on besides the request: keys that agree on it share one
/// body (built once for all the attempts of a request, not copied per attempt).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BodyShape {
    wire: Wire,
    provider: String,
    model: Option<String>,
    output_cap: Option<u64>,
}

impl BodyShape {
    pub fn of(key: &KeyRef, output_cap: Option<u64>) -> BodyShape {
        BodyShape {
            wire: key.wire(),
            provider: key.provider.clone(),
            model: key.model.clone(),
            output_cap,
        }
    }
}

/// The body of a chat call to `key`'s provider: the app's own body changed only where the
/// worker must when the provider speaks its dialect, else the request read as a conversation
/// (`conversation`, made on first need and shared by all attempts) rendered in the provider's.
/// `output_cap`, when given, is the most tokens each choice may generate, set on the request
/// when the app set none (a spend budget holds only that much). The error is the caller's.
pub fn chat_body<'c>(
    key: &KeyRef,
    req: &Inbound,
    conversation: impl FnOnce() -> &'c Result<Conversation<'c>, String>,
    stream: bool,
    default_max_tokens: u32,
    output_cap: Option<u64>,
) -> Result<Bytes, CarryError> {
    let translated = |render: &dyn Fn(&Conversation<'_>) -> Result<Vec<u8>, CarryError>| {
        let c = conversation().as_ref().map_err(|e| CarryError::Invalid(e.clone()))?;
        render(c).map(Bytes::from)
    };
    match (key.wire(), req) {
        (Wire::OpenAi, Inbound::Chat(req)) => Ok(openai_style::chat_body(key, req, stream, output_cap)),
        (Wire::OpenAi, _) => {
            let model = key.model_for(req.model()).ok_or_else(|| {
                CarryError::Invalid(format!("key {} has no model and the request names none", key.id))
            })?;
            let openai_cap = key.provider == "openai";
            translated(&|c| openai::chat_request::request(c, (&key.provider, model), stream, output_cap, openai_cap))
        }
        (Wire::Gemini, Inbound::Gemini(req)) => Ok(gemini::generate_body(req, output_cap)),
        (Wire::Gemini, _) => {
            let model = gemini::model_name(key, req.model()).map_err(CarryError::Invalid)?;
            translated(&|c| gemini_dialect::request(c, model, output_cap))
        }
        (Wire::Anthropic, Inbound::Messages(req)) => Ok(anthropic::messages_body(key, req, stream)),
        (Wire::Anthropic, _) => {
            let model = key.model_for(req.model()).ok_or_else(|| {
                CarryError::Invalid(format!(
                    "Anthropic key {} has no model and the request names none",
                    key.id
                ))
            })?;
            translated(&|c| anthropic_dialect::request(c, model, stream, output_cap, default_max_tokens as u64))
        }
        (Wire::Http, _) => Err(CarryError::Invalid(format!(
            "key {} is a plain HTTP key ({}); call it through /v1/proxy/<pool>/<path>",
            key.id, key.label
        ))),
    }
}

/// The provider request for a chat call with `body` (from [`chat_body`]).
pub fn chat_request(
    http: &reqwest::Client,
    key: &KeyRef,
    req: &Inbound,
    stream: bool,
    body: Bytes,
) -> Result<reqwest::RequestBuilder, String> {
    match key.wire() {
        Wire::OpenAi => Ok(openai_style::chat_request(http, key, body)),
        Wire::Gemini => gemini::chat_request(http, key, req.model(), stream, body),
        Wire::Anthropic => Ok(anthropic::chat_request(http, key, body)),
        Wire::Http => Err(format!(
            "key {} is a plain HTTP key ({}); call it through /v1/proxy/<pool>/<path>",
            key.id, key.label
        )),
    }
}

/// Builds the provider request for an embeddings call. The error is the caller's (HTTP 400).
pub fn embeddings_request(
    http: &reqwest::Client,
    key: &KeyRef,
    req: &EmbeddingsRequest,
) -> Result<reqwest::RequestBuilder, String> {
    match key.wire() {
        Wire::OpenAi => Ok(openai_style::embeddings_request(http, key, req)),
        Wire::Gemini => gemini::embeddings_request(http, key, req),
        Wire::Anthropic => Err(format!(
            "key {} is an Anthropic key ({}): Anthropic has no embeddings API",
            key.id, key.label
        )),
        Wire::Http => Err(format!(
            "key {} is a plain HTTP key ({}); call it through /v1/proxy/<pool>/<path>",
            key.id, key.label
        )),
    }
}

/// The provider request for one image of `req` (each image is its own call and reservation).
pub fn image_request(
    http: &reqwest::Client,
    key: &KeyRef,
    req: &ImagesRequest,
) -> Result<reqwest::RequestBuilder, CarryError> {
    match key.wire() {
        Wire::OpenAi => Ok(openai_style::image_request(http, key, req)),
        Wire::Gemini => gemini::image_request(http, key, req),
        Wire::Anthropic => Err(CarryError::Invalid(format!(
            "pool's key {} is an Anthropic key: Anthropic makes no images",
            key.id
        ))),
        Wire::Http => Err(CarryError::Invalid(format!(
            "key {} is a plain HTTP key ({}); call it through /v1/proxy/<pool>/<path>",
            key.id, key.label
        ))),
    }
}

/// One image answer: the `data` entries in OpenAI's shape (`{"b64_json"}` or `{"url"}`), and the
/// usage it reports.
pub struct Images {
    pub data: Vec<Value>,
    pub usage: Option<Usage>,
    /// Why the provider made no image, when it declined the prompt (a safety block).
    pub declined: Option<String>,
}

pub fn read_image(key: &KeyRef, body: &[u8]) -> Result<Images, String> {
    match key.wire() {
        Wire::Gemini => gemini::read_image(body),
        _ => openai_style::read_image(body),
    }
}

/// A 2xx embeddings answer in OpenAI's shape, with the usage it reports.
pub struct Embeddings {
    pub body: Bytes,
    pub usage: Option<Usage>,
}

/// Reads a 2xx embeddings answer. `shown_model` is the model name the app sees in translated
/// answers.
pub fn read_embeddings(
    key: &KeyRef,
    body: Bytes,
    req: &EmbeddingsRequest,
    shown_model: &str,
) -> Result<Embeddings, String> {
    match key.wire() {
        Wire::Gemini => gemini::read_embeddings(&body, req, shown_model),
        _ => openai_style::read_embeddings(body),
    }
}

/// Reads a provider's error answer.
pub fn read_error(key: &KeyRef, status: u16, headers: &HeaderMap, body: &[u8]) -> ProviderError {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let mut e = match (key.wire(), &json) {
        (Wire::Gemini, Some(v)) => gemini::read_error(v),
        (Wire::Anthropic, Some(v)) => anthropic::read_error(v),
        (Wire::OpenAi | Wire::Http, Some(v)) => openai_style::read_error(v),
        (_, None) => ProviderError {
            message: String::from_utf8_lossy(&body[..body.len().min(300)]).trim().to_string(),
            ..Default::default()
        },
    };
    if e.retry_after_ms.is_none() {
        e.retry_after_ms = retry_after_from_headers(headers);
    }
    if e.message.is_empty() {
        e.message = format!("HTTP {status}");
    }
    e.message = keypool_mask::scrub(&e.message, &key.secret);
    // An API may echo the key into any field: the code goes to the database and the caller too.
    e.code = e.code.map(|c| keypool_mask::scrub(&c, &key.secret));
    e
}

/// Retry delay from the headers providers send: `retry-after-ms`, `retry-after` (seconds),
/// OpenAI's `x-ratelimit-reset-requests` / `-tokens` (`1s`, `6m0s`).
pub fn retry_after_from_headers(headers: &HeaderMap) -> Option<i64> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        return Some(clamp_ms(ms));
    }
    if let Some(s) = get("retry-after").and_then(|v| v.parse::<f64>().ok()) {
        return Some(clamp_ms(s * 1000.0));
    }
    ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"]
        .iter()
        .filter_map(|h| get(h).and_then(duration::parse_compound))
        .map(|d| clamp_ms(d.as_secs_f64() * 1000.0))
        .max()
}

fn clamp_ms(ms: f64) -> i64 {
    if ms.is_finite() {
        (ms.ceil() as i64).clamp(0, 7 * 86_400_000)
    } else {
        0
    }
}

/// A 2xx chat answer in the app's shape, and the usage to settle.
pub struct Completion {
    pub body: Bytes,
    pub usage: Usage,
}

/// Reads a 2xx chat answer, in the app's dialect (`to`): passed through when the provider
/// speaks it, else read into the model and rendered. `shown_model` is the model name the app
/// sees in rendered answers; `prompt_est` the prompt's tokens, settled when the provider reports
/// none (the output is then counted from what was generated).
pub fn read_completion(
    key: &KeyRef,
    to: Dialect,
    body: Bytes,
    shown_model: &str,
    prompt_est: i64,
) -> Result<Completion, String> {
    let rendered = |answer: Answer| {
        let usage = answer
            .usage
            .unwrap_or_else(|| Usage::new(prompt_est, openai::count_tokens(answer.generated_bytes())));
        let now = openai::unix_now();
        let body = match to {
            Dialect::OpenAiResponses => {
                responses_render::response(&answer, &responses_render::response_id(), shown_model, now, usage)
            }
            Dialect::Anthropic => anthropic_dialect::render::message(
                &answer,
                &anthropic_dialect::render::message_id(),
                shown_model,
                usage,
            ),
            Dialect::Gemini => gemini_dialect::render::response(&answer, shown_model, usage),
            _ => chat_render::completion(&answer, &openai::completion_id(), shown_model, now, usage),
        };
        Completion { body, usage }
    };
    match (key.wire(), to) {
        (Wire::OpenAi, Dialect::OpenAiChat) => openai_style::read_completion(body, prompt_est),
        (Wire::OpenAi, _) => openai::chat_answer::answer(&body).map(rendered),
        // The app's own dialect: the answer as it came (whatever it holds), read for its usage.
        (Wire::Gemini, Dialect::Gemini) => {
            let usage = gemini_dialect::usage_of(&body)?
                .unwrap_or_else(|| Usage::new(prompt_est, openai::count_tokens(body.len())));
            Ok(Completion { body, usage })
        }
        (Wire::Gemini, _) => gemini_dialect::answer(&body).map(rendered),
        (Wire::Anthropic, Dialect::Anthropic) => {
            let usage = anthropic_dialect::usage_of(&body)?
                .unwrap_or_else(|| Usage::new(prompt_est, openai::count_tokens(body.len())));
            Ok(Completion { body, usage })
        }
        (Wire::Anthropic, _) => anthropic_dialect::answer(&body).map(rendered),
        (Wire::Http, _) => Ok(Completion {
            body,
            usage: Usage::new(prompt_est, 0),
        }),
    }
}

/// Turns `key`'s provider's event stream into the app's (`to`).
pub fn stream_translator(key: &KeyRef, to: Dialect, shown_model: &str, wants_usage: bool) -> Box<dyn Translate> {
    let writer = || match to {
        Dialect::OpenAiResponses => Writer::Responses(EventWriter::new(
            responses_render::response_id(),
            shown_model.to_string(),
            openai::unix_now(),
        )),
        Dialect::Gemini => Writer::Gemini(gemini_dialect::render::EventWriter::new(shown_model.to_string())),
        Dialect::Anthropic => Writer::Messages(anthropic_dialect::render::EventWriter::new(
            anthropic_dialect::render::message_id(),
            shown_model.to_string(),
        )),
        _ => Writer::OpenAiChat(ChunkWriter::new(
            openai::completion_id(),
            shown_model.to_string(),
            openai::unix_now(),
            wants_usage,
        )),
    };
    match (key.wire(), to) {
        (Wire::OpenAi | Wire::Http, Dialect::OpenAiChat) => Box::new(openai_style::Passthrough::new(wants_usage)),
        (Wire::OpenAi | Wire::Http, _) => Box::new(Translated::new(Reader::OpenAiChat(Default::default()), writer())),
        (Wire::Gemini, Dialect::Gemini) => Box::new(Observed::new(Reader::Gemini(Default::default()))),
        (Wire::Gemini, _) => Box::new(Translated::new(Reader::Gemini(Default::default()), writer())),
        (Wire::Anthropic, Dialect::Anthropic) => Box::new(Observed::new(Reader::Anthropic(Default::default()))),
        (Wire::Anthropic, _) => Box::new(Translated::new(Reader::Anthropic(Default::default()), writer())),
    }
}

/// The cheap call that tells whether a provider accepts a key: listing models. None when the
/// provider has no such call (Ollama takes no key, plain HTTP APIs have no standard one).
pub fn list_models_request(http: &reqwest::Client, key: &KeyRef) -> Option<reqwest::RequestBuilder> {
    match key.wire() {
        Wire::OpenAi if key.provider == "ollama" => None,
        Wire::OpenAi => Some(openai_style::list_models_request(http, key)),
        Wire::Gemini => Some(gemini::list_models_request(http, key)),
        Wire::Anthropic => Some(anthropic::list_models_request(http, key)),
        Wire::Http => None,
    }
}

/// Percent-encodes anything but `A-Z a-z 0-9 - . _ ~`: one path segment of a provider URL, or a
/// query component.
pub(crate) fn percent_encoded(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn retry_after_headers() {
        assert_eq!(retry_after_from_headers(&headers(&[("retry-after", "2")])), Some(2000));
        assert_eq!(
            retry_after_from_headers(&headers(&[("retry-after-ms", "150")])),
            Some(150)
        );
        assert_eq!(
            retry_after_from_headers(&headers(&[
                ("x-ratelimit-reset-requests", "6m0s"),
                ("x-ratelimit-reset-tokens", "1s")
            ])),
            Some(360_000)
        );
        assert_eq!(
            retry_after_from_headers(&headers(&[("retry-after", "Wed, 21 Oct 2015")])),
            None
        );
    }

    fn key(provider: &str, base: &str) -> KeyRef {
        KeyRef {
            id: 1,
            provider: provider.into(),
            model: None,
            base_url: base.into(),
            secret: "sk-proj-abcdefghijklmnop9xQa".into(),
            label: "sk-p…9xQa".into(),
        }
    }

    #[test]
    fn wires() {
        assert_eq!(key("gemini", "https://g/v1beta/openai").wire(), Wire::OpenAi);
        assert_eq!(key("gemini", "https://g").wire(), Wire::Gemini);
        assert_eq!(key("anthropic", "https://a").wire(), Wire::Anthropic);
        assert_eq!(key("xai", "https://x/v1").wire(), Wire::OpenAi);
        assert_eq!(key("http", "https://serp").wire(), Wire::Http);
    }

    #[test]
    fn errors_never_carry_the_secret() {
        let k = key("openai", "https://o/v1");
        let body = br#"{"error":{"message":"Incorrect API key provided: sk-proj-abcdefghijklmnop9xQa","type":"invalid_request_error","code":"invalid_api_key"}}"#;
        let e = read_error(&k, 401, &HeaderMap::new(), body);
        assert_eq!(e.code.as_deref(), Some("invalid_api_key"));
        assert!(!e.message.contains(&k.secret), "{}", e.message);
        assert!(e.message.contains("sk-proj-…9xQa"));
        let plain = read_error(&k, 502, &HeaderMap::new(), b"<html>bad gateway</html>");
        assert_eq!(plain.code, None);
        assert_eq!(plain.message, "<html>bad gateway</html>");
    }
}
