//! The conversation model: one provider-neutral shape for a chat request, its answer and its
//! stream. Every dialect parses into it and renders from it (`openai_chat`, `gemini`,
//! `anthropic`), so no pair of formats is translated by hand.
//!
//! Strings borrow from the request body where they can (`Cow`); JSON the worker does not look
//! into (tool arguments, tool schemas) stays JSON text. Whatever a dialect's request holds that
//! the model has no place for is listed in [`Conversation::unsupported`]: a provider of another
//! dialect is never sent the request with it silently left out.

use std::borrow::Cow;

use crate::protocol::json::Object;

/// Tools one request may declare (OpenAI allows 128; Gemini and Anthropic a few hundred).
pub const MAX_TOOLS: usize = 512;

/// Tokens actually used by a call, as the provider reported them (or as counted when it did not).
/// `prompt_tokens` includes `cached_tokens`; `completion_tokens` includes `reasoning_tokens`:
/// the two totals are what is settled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// Input read from the provider's cache (part of `prompt_tokens`).
    pub cached_tokens: i64,
    /// Reasoning or thought tokens (part of `completion_tokens`).
    pub reasoning_tokens: i64,
}

impl Usage {
    /// Input and output only (what a provider that reports no details says).
    pub fn new(prompt_tokens: i64, completion_tokens: i64) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
            ..Usage::default()
        }
    }
}

/// A chat request, whichever dialect it came in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Conversation<'a> {
    /// Instructions (OpenAI `system`/`developer` messages, Anthropic `system`, Gemini
    /// `systemInstruction`), in order.
    pub system: Vec<Cow<'a, str>>,
    pub messages: Vec<Message<'a>>,
    pub tools: Vec<Tool<'a>>,
    pub tool_choice: ToolChoice<'a>,
    /// Whether the model may call several tools at once (`None`: the provider's default).
    pub parallel_tool_calls: Option<bool>,
    pub response_format: ResponseFormat<'a>,
    /// The most tokens one choice may generate (reasoning included), if the app said.
    pub max_output_tokens: Option<u64>,
    /// How many choices (`n`, Gemini's `candidateCount`).
    pub choices: u64,
    pub sampling: Sampling<'a>,
    pub reasoning: Option<Effort>,
    /// Fields of the request that the model cannot carry (`logit_bias`, `messages[2].name`):
    /// refused for any provider that does not speak the request's own dialect.
    pub unsupported: Vec<String>,
}

impl Conversation<'_> {
    /// Fills each tool result's name from the call it answers (Gemini matches results by name;
    /// OpenAI's and Anthropic's results carry only the call's id).
    pub fn name_tool_results(&mut self) {
        let mut names: std::collections::HashMap<Cow<'_, str>, Cow<'_, str>> = std::collections::HashMap::new();
        for m in self.messages.iter_mut() {
            for p in m.parts.iter_mut() {
                match p {
                    Part::ToolCall(call) => {
                        names.insert(call.id.clone(), call.name.clone());
                    }
                    Part::ToolResult(r) if r.name.is_none() => r.name = names.get(&r.call_id).cloned(),
                    _ => {}
                }
            }
        }
    }
}

/// Who said a message. Tool results are parts of a user message (as Anthropic and Gemini have
/// them); OpenAI's `tool` messages become such parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message<'a> {
    pub role: Role,
    pub parts: Vec<Part<'a>>,
}

/// One piece of a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Part<'a> {
    Text(Cow<'a, str>),
    Image(Image<'a>),
    /// A tool call the assistant made.
    ToolCall(ToolCall<'a>),
    /// What a tool answered.
    ToolResult(ToolResult<'a>),
    /// The assistant's reasoning, carried back to the provider that produced it.
    Reasoning(Reasoning<'a>),
}

/// An image: inline bytes (base64) or an address the provider fetches.
#[derive(Debug, Clone, PartialEq)]
pub enum Image<'a> {
    Data { mime: Cow<'a, str>, base64: Cow<'a, str> },
    Url(Cow<'a, str>),
}

impl<'a> Image<'a> {
    /// An image from a URL as OpenAI's `image_url` gives it: a `data:<mime>;base64,` URL is
    /// inline data.
    pub fn from_url(url: Cow<'a, str>) -> Image<'a> {
        let data = |u: &str| -> Option<(usize, usize)> {
            let rest = u.strip_prefix("data:")?;
            let (meta, _) = rest.split_once(',')?;
            meta.strip_suffix(";base64")?;
            Some((5 + meta.len() - ";base64".len(), 5 + meta.len() + 1))
        };
        match (data(&url), url) {
            (Some((mime_end, data_start)), Cow::Borrowed(u)) => Image::Data {
                mime: Cow::Borrowed(&u[5..mime_end]),
                base64: Cow::Borrowed(&u[data_start..]),
            },
            (Some((mime_end, data_start)), Cow::Owned(u)) => Image::Data {
                mime: Cow::Owned(u[5..mime_end].to_string()),
                base64: Cow::Owned(u[data_start..].to_string()),
            },
            (None, url) => Image::Url(url),
        }
    }

    /// The image as a URL (`data:` for inline bytes).
    pub fn url(&self) -> Cow<'_, str> {
        match self {
            Image::Url(u) => Cow::Borrowed(u),
            Image::Data { mime, base64 } => Cow::Owned(format!("data:{mime};base64,{base64}")),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall<'a> {
    pub id: Cow<'a, str>,
    pub name: Cow<'a, str>,
    /// The arguments, JSON text of an object.
    pub arguments: Cow<'a, str>,
    /// State the provider attached to the call and wants back (Gemini's thought signature).
    pub signature: Option<Signature<'a>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ToolResult<'a> {
    pub call_id: Cow<'a, str>,
    /// The tool's name, from the call it answers (Gemini matches results by name).
    pub name: Option<Cow<'a, str>>,
    /// Text and images.
    pub content: Vec<Part<'a>>,
    pub is_error: bool,
}

impl ToolResult<'_> {
    /// The result's text parts, joined.
    pub fn text(&self) -> String {
        self.content
            .iter()
            .filter_map(|p| match p {
                Part::Text(t) => Some(t.as_ref()),
                _ => None,
            })
            .collect()
    }
}

/// Reasoning the provider showed (Anthropic's thinking block), with the signature it checks
/// when the block comes back, or a block it showed only encrypted (`redacted`).
#[derive(Debug, Clone, PartialEq)]
pub struct Reasoning<'a> {
    pub text: Cow<'a, str>,
    pub signature: Option<Signature<'a>>,
    /// Anthropic's `redacted_thinking` data.
    pub redacted: Option<Cow<'a, str>>,
}

/// Opaque state a provider attached to its answer and checks when it comes back: sent back
/// only to a provider of the dialect that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature<'a> {
    pub dialect: Dialect,
    pub value: Cow<'a, str>,
}

/// The wire formats the worker speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dialect {
    OpenAiChat,
    OpenAiResponses,
    Gemini,
    Anthropic,
}

impl Dialect {
    /// The short name used in signatures carried through other dialects.
    pub fn tag(self) -> &'static str {
        match self {
            Dialect::OpenAiChat => "o",
            Dialect::OpenAiResponses => "r",
            Dialect::Gemini => "g",
            Dialect::Anthropic => "a",
        }
    }

    pub fn from_tag(tag: &str) -> Option<Dialect> {
        match tag {
            "o" => Some(Dialect::OpenAiChat),
            "r" => Some(Dialect::OpenAiResponses),
            "g" => Some(Dialect::Gemini),
            "a" => Some(Dialect::Anthropic),
            _ => None,
        }
    }
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool<'a> {
    pub name: Cow<'a, str>,
    pub description: Option<Cow<'a, str>>,
    /// A JSON Schema of the arguments object (JSON text), if any.
    pub parameters: Option<Cow<'a, str>>,
    /// Whether the arguments must follow the schema exactly.
    pub strict: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub enum ToolChoice<'a> {
    #[default]
    Auto,
    None,
    /// Some tool must be called.
    Required,
    /// This tool must be called.
    Named(Cow<'a, str>),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub enum ResponseFormat<'a> {
    #[default]
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON following a schema.
    JsonSchema(JsonSchema<'a>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct JsonSchema<'a> {
    pub name: Cow<'a, str>,
    pub description: Option<Cow<'a, str>>,
    /// JSON text of the schema.
    pub schema: Cow<'a, str>,
    pub strict: bool,
}

impl JsonSchema<'_> {
    /// The schema, carrying the format's description as its own when it has none (for providers
    /// whose structured output takes a schema alone). Edited as text, never built into a tree.
    pub fn described(&self) -> Result<Cow<'_, str>, CarryError> {
        let Some(d) = &self.description else {
            return Ok(Cow::Borrowed(&self.schema));
        };
        let schema = Object::parse(bytes::Bytes::copy_from_slice(self.schema.as_bytes()))
            .map_err(|e| CarryError::Invalid(format!("response_format.json_schema.schema: {e}")))?;
        if schema.has("description") {
            return Ok(Cow::Borrowed(&self.schema));
        }
        let text = serde_json::Value::String(d.to_string()).to_string();
        String::from_utf8(schema.render(&[("description", Some(&text))]))
            .map(Cow::Owned)
            .map_err(|e| CarryError::Invalid(e.to_string()))
    }
}

/// How hard a reasoning model thinks before it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Effort {
    None,
    Minimal,
    Low,
    Medium,
    High,
    XHigh,
}

impl Effort {
    pub fn parse(s: &str) -> Option<Effort> {
        Some(match s {
            "none" => Effort::None,
            "minimal" => Effort::Minimal,
            "low" => Effort::Low,
            "medium" => Effort::Medium,
            "high" => Effort::High,
            "xhigh" => Effort::XHigh,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Effort::None => "none",
            Effort::Minimal => "minimal",
            Effort::Low => "low",
            Effort::Medium => "medium",
            Effort::High => "high",
            Effort::XHigh => "xhigh",
        }
    }

    /// The thinking budget in tokens a provider that counts thinking in tokens is given
    /// (Gemini 2.5's `thinkingBudget`, Anthropic's `budget_tokens`); 0 is no thinking.
    pub fn budget_tokens(self) -> u64 {
        match self {
            Effort::None => 0,
            Effort::Minimal => 512,
            Effort::Low => 1_024,
            Effort::Medium => 8_192,
            Effort::High => 24_576,
            Effort::XHigh => 32_768,
        }
    }
}

/// Sampling settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sampling<'a> {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Vec<Cow<'a, str>>,
}

/// Why a choice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
    ToolCalls,
    ContentFilter,
}

/// A whole answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub choices: Vec<Choice>,
    pub usage: Option<Usage>,
}

impl Answer {
    /// Bytes of generated text, reasoning and tool calls (to count usage a provider did not
    /// report).
    pub fn generated_bytes(&self) -> usize {
        self.choices
            .iter()
            .flat_map(|c| &c.parts)
            .map(|p| match p {
                Part::Text(t) => t.len(),
                Part::ToolCall(c) => c.arguments.len() + c.name.len(),
                Part::Reasoning(r) => r.text.len(),
                _ => 0,
            })
            .sum()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// Text, reasoning and tool calls, in the order the provider gave them.
    pub parts: Vec<Part<'static>>,
    pub finish: Finish,
}

/// One step of a streamed answer, whichever dialect it came in.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    Text {
        choice: u32,
        text: String,
    },
    /// Reasoning text, and the signature that closes a reasoning block.
    Reasoning {
        choice: u32,
        text: String,
        signature: Option<Signature<'static>>,
        redacted: Option<String>,
    },
    /// A tool call begins: its place among the choice's calls, id and name.
    ToolCall {
        choice: u32,
        index: u32,
        id: String,
        name: String,
        signature: Option<Signature<'static>>,
    },
    /// A fragment of the arguments of call `index`.
    ToolArguments {
        choice: u32,
        index: u32,
        fragment: String,
    },
    Finish {
        choice: u32,
        finish: Finish,
    },
    /// Usage so far (each report replaces the one before).
    Usage(Usage),
    /// The provider reported an error in the stream.
    Error {
        message: String,
    },
}

/// Why a conversation cannot be sent to a provider: the caller's to fix (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CarryError {
    /// A field of the request the provider has no place for: refused, never dropped.
    Unsupported { field: String, provider: String },
    /// The request cannot be carried as it is (a tool result that answers no call ...).
    Invalid(String),
}

impl CarryError {
    pub fn unsupported(field: impl Into<String>, provider: &str) -> CarryError {
        CarryError::Unsupported {
            field: field.into(),
            provider: provider.to_string(),
        }
    }

    /// What the caller is told.
    pub fn message(&self) -> String {
        match self {
            CarryError::Unsupported { field, provider } => format!(
                "`{field}` cannot be carried to {provider}: this pool's key speaks {provider}'s API, which has no such field; leave it out, or use a pool of a provider that takes it"
            ),
            CarryError::Invalid(why) => why.clone(),
        }
    }
}

/// Checks that `text` is the JSON text of an object (tool arguments, a tool's input).
pub fn is_json_object(text: &str) -> bool {
    serde_json::from_str::<&serde_json::value::RawValue>(text).is_ok() && text.trim_start().starts_with('{')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_urls_are_inline_images() {
        let i = Image::from_url(Cow::Borrowed("data:image/png;base64,AAAA"));
        assert_eq!(
            i,
            Image::Data {
                mime: Cow::Borrowed("image/png"),
                base64: Cow::Borrowed("AAAA")
            }
        );
        assert_eq!(i.url(), "data:image/png;base64,AAAA");
        let owned = Image::from_url(Cow::Owned("data:image/jpeg;base64,BB".to_string()));
        assert!(matches!(owned, Image::Data { ref mime, .. } if mime == "image/jpeg"));
        assert_eq!(
            Image::from_url(Cow::Borrowed("https://x/y.png")),
            Image::Url(Cow::Borrowed("https://x/y.png"))
        );
        assert!(matches!(
            Image::from_url(Cow::Borrowed("data:text/plain,hi")),
            Image::Url(_)
        ));
    }

    #[test]
    fn json_objects() {
        assert!(is_json_object(r#" {"a": [1]}"#));
        assert!(!is_json_object("[1]"));
        assert!(!is_json_object("{"));
        assert!(!is_json_object(""));
    }
}
