//! OpenAI's wire format, the worker's lingua franca: what a chat or embeddings request asks for,
//! the token estimate a reservation is made with, and the responses, stream chunks and error
//! bodies the endpoint answers with whichever provider served.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::protocol::json::{Capped, Object};

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

/// Messages one chat request may carry (OpenAI's own limit is 2,048).
pub const MAX_MESSAGES: usize = 10_000;
/// Content parts one message may carry.
pub const MAX_PARTS: usize = 1_000;
/// Content parts one request may carry in all.
pub const MAX_PARTS_IN_ALL: usize = 10_000;
/// Stop sequences one request may carry.
pub const MAX_STOP: usize = 64;
/// Choices one request may ask for (OpenAI's `n` goes up to 128).
pub const MAX_CHOICES: u64 = 128;

/// A chat request as an app sent it (an OpenAI `chat.completions` body): the body as it
/// arrived, indexed (json.rs), and the few fields the worker itself reads, checked.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    body: Object,
    model: Option<String>,
    user: Option<String>,
    stream: bool,
    include_usage: bool,
    max_tokens: Option<u64>,
    choices: u64,
    prompt: PromptSize,
}

/// What the messages hold, counted while they were checked.
#[derive(Debug, Clone, Copy, Default)]
struct PromptSize {
    messages: usize,
    chars: usize,
}

impl ChatRequest {
    /// Checks the shape the worker relies on; the error is for the caller (HTTP 400). Memory
    /// stays a small multiple of the body's size whatever its shape (json.rs).
    pub fn parse(bytes: Bytes) -> Result<ChatRequest, String> {
        let body = Object::parse(bytes)?;
        let Some(messages) = body.get("messages") else {
            return Err("`messages` (an array) is required".into());
        };
        let sizes: Capped<MessageSize, MAX_MESSAGES> =
            serde_json::from_str(messages).map_err(|e| format!("`messages`: {e}"))?;
        if sizes.0.is_empty() {
            return Err("`messages` must not be empty".into());
        }
        let parts: usize = sizes.0.iter().map(|m| m.parts).sum();
        if parts > MAX_PARTS_IN_ALL {
            return Err(format!(
                "`messages` hold {parts} content parts; at most {MAX_PARTS_IN_ALL} are allowed in one request"
            ));
        }
        // Tools and schemas are input the provider bills as well.
        let described: usize = ["tools", "functions", "response_format"]
            .iter()
            .filter_map(|m| body.get(m))
            .map(str::len)
            .sum();
        let prompt = PromptSize {
            messages: sizes.0.len(),
            chars: sizes.0.iter().map(|m| m.chars).sum::<usize>() + described,
        };
        let model: Option<String> = body
            .value("model")
            .map_err(|_| "`model` must be a string".to_string())?;
        let user: Option<String> = body.value("user").map_err(|_| "`user` must be a string".to_string())?;
        let stream: Option<bool> = body
            .value("stream")
            .map_err(|_| "`stream` must be true or false".to_string())?;
        let options: Option<StreamOptions> = body.value("stream_options")?;
        if body.has("max_tokens") && body.has("max_completion_tokens") {
            // A provider might read either: the hold must cover the one it reads.
            return Err("set either `max_completion_tokens` or `max_tokens`, not both".into());
        }
        let mut max_tokens = None;
        for field in ["max_completion_tokens", "max_tokens"] {
            let v: Option<u64> = body
                .value(field)
                .map_err(|_| format!("`{field}` must be a positive integer"))?;
            max_tokens = max_tokens.or(v);
        }
        let choices: Option<u64> = body
            .value("n")
            .map_err(|_| format!("`n` must be an integer from 1 to {MAX_CHOICES}"))?;
        if choices.is_some_and(|n| !(1..=MAX_CHOICES).contains(&n)) {
            return Err(format!("`n` must be an integer from 1 to {MAX_CHOICES}"));
        }
        Ok(ChatRequest {
            model,
            user: user.filter(|u| !u.is_empty()),
            stream: stream.unwrap_or(false),
            include_usage: options.and_then(|o| o.include_usage).unwrap_or(false),
            max_tokens,
            choices: choices.unwrap_or(1),
            prompt,
            body,
        })
    }

    /// The body as it arrived, indexed.
    pub fn body(&self) -> &Object {
        &self.body
    }

    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    pub fn stream(&self) -> bool {
        self.stream
    }

    /// Whether the app asked for the final usage chunk of a stream.
    pub fn wants_stream_usage(&self) -> bool {
        self.include_usage
    }

    /// The most tokens one choice may generate, if the app said.
    pub fn max_tokens(&self) -> Option<u64> {
        self.max_tokens
    }

    /// How many choices the app asked for (`n`).
    pub fn choices(&self) -> u64 {
        self.choices
    }

    /// The messages, typed, for the providers that translate them (at most [`MAX_MESSAGES`],
    /// each with at most [`MAX_PARTS`] parts; strings borrowed from the body where they can be).
    pub fn messages(&self) -> Result<Vec<Message<'_>>, String> {
        let messages: Option<Capped<Message<'_>, MAX_MESSAGES>> = self.body.borrowed("messages")?;
        Ok(messages.map(|m| m.0).unwrap_or_default())
    }

    /// The sampling settings the translating providers carry over.
    pub fn sampling(&self) -> Result<Sampling, String> {
        let number = |f: &str| -> Result<Option<f64>, String> {
            self.body.value(f).map_err(|_| format!("`{f}` must be a number"))
        };
        let stop: Option<Stop> = self.body.value("stop")?;
        let format: Option<ResponseFormat> = self.body.value("response_format")?;
        Ok(Sampling {
            temperature: number("temperature")?,
            top_p: number("top_p")?,
            presence_penalty: number("presence_penalty")?,
            frequency_penalty: number("frequency_penalty")?,
            seed: self
                .body
                .value("seed")
                .map_err(|_| "`seed` must be an integer".to_string())?,
            stop: match stop {
                None => Vec::new(),
                Some(Stop::One(s)) => vec![s],
                Some(Stop::Many(list)) => list.0,
            },
            response_format: format.map(|f| f.kind),
        })
    }

    /// Prompt tokens, estimated the way providers do before they count: about four characters
    /// per token plus a few per message.
    pub fn estimate_prompt_tokens(&self) -> i64 {
        (self.prompt.chars as i64 + 3) / 4 + 4 * self.prompt.messages as i64
    }

    /// The most tokens the answer may use: each choice's output cap (the app's, else
    /// `default_max_tokens`) times the number of choices.
    pub fn estimate_completion_tokens(&self, default_max_tokens: u32) -> i64 {
        let per_choice = self.max_tokens.unwrap_or(default_max_tokens as u64).min(1_000_000);
        (per_choice * self.choices) as i64
    }

    /// What a reservation charges up front: the prompt estimate plus the most the answer may
    /// use (OpenAI and Anthropic count the same way).
    pub fn estimate_tokens(&self, default_max_tokens: u32) -> i64 {
        self.estimate_prompt_tokens() + self.estimate_completion_tokens(default_max_tokens)
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// `stop`: one sequence or a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Capped<String, MAX_STOP>),
}

#[derive(Deserialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
}

/// Sampling settings of a chat request.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Sampling {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Vec<String>,
    /// `response_format.type`: `text`, `json_object`, `json_schema`.
    pub response_format: Option<String>,
}

/// A string borrowed from the body when it has no escapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text<'a>(pub Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// One message of a chat request, as the translating providers read it.
#[derive(Debug, Clone, PartialEq)]
pub struct Message<'a> {
    pub role: Cow<'a, str>,
    pub content: Content<'a>,
}

/// A message's `content`: none, a string, or parts.
#[derive(Debug, Clone, PartialEq)]
pub enum Content<'a> {
    None,
    Text(Cow<'a, str>),
    Parts(Vec<Part<'a>>),
}

/// A content part.
#[derive(Debug, Clone, PartialEq)]
pub enum Part<'a> {
    Text(Cow<'a, str>),
    /// `image_url`: its URL (a `data:` URL, or an address).
    Image(Cow<'a, str>),
    /// A part of another type (named).
    Other(String),
}

impl<'de> Deserialize<'de> for Message<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Message<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a message object with a `role`")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut role, mut content) = (None, Content::None);
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "role" => role = Some(map.next_value::<Text<'de>>()?.0),
                        "content" => content = map.next_value::<ContentIn<'de>>()?.0,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                let role = role.ok_or_else(|| de::Error::custom("a message has no `role`"))?;
                Ok(Message { role, content })
            }
        }
        d.deserialize_map(V)
    }
}

struct ContentIn<'a>(Content<'a>);

impl<'de> Deserialize<'de> for ContentIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ContentIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`content` as a string or an array of parts")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(ContentIn(Content::None))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(ContentIn(Content::Text(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ContentIn(Content::Text(Cow::Owned(v.to_string()))))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                let parts: Capped<Part<'de>, MAX_PARTS> =
                    Deserialize::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
                Ok(ContentIn(Content::Parts(parts.0)))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Part<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Part<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a content part object with a `type`")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut kind, mut text, mut url) = (None, None, None);
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "type" => kind = Some(map.next_value::<Text<'de>>()?.0),
                        "text" => text = Some(map.next_value::<Text<'de>>()?.0),
                        "image_url" => url = Some(map.next_value::<ImageUrl<'de>>()?.0),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                match kind.as_deref() {
                    Some("text") => Ok(Part::Text(text.unwrap_or_default())),
                    Some("image_url") => Ok(Part::Image(url.unwrap_or_default())),
                    Some(other) => Ok(Part::Other(other.chars().take(40).collect())),
                    None => Err(de::Error::custom("a content part has no `type`")),
                }
            }
        }
        d.deserialize_map(V)
    }
}

/// `image_url`: `{"url": "..."}`, or the URL itself.
struct ImageUrl<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for ImageUrl<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ImageUrl<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`image_url` as an object with a `url`, or a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(ImageUrl(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ImageUrl(Cow::Owned(v.to_string())))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut url = None;
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    if key == "url" {
                        url = Some(map.next_value::<Text<'de>>()?.0);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(ImageUrl(url.unwrap_or_default()))
            }
        }
        d.deserialize_any(V)
    }
}

/// What one message weighs, read without keeping it: it must be an object with a string
/// `role`; its weight is the characters of its text (`content`, or its parts' `text`), the JSON
/// of its tool calls, and [`CHARS_PER_MEDIA_PART`] for each part that is not text.
#[derive(Default)]
struct MessageSize {
    chars: usize,
    parts: usize,
}

/// What an image, audio or file part is counted as, in characters: about 1,500 tokens, more
/// than OpenAI, Anthropic or Gemini charge for a typical image.
pub const CHARS_PER_MEDIA_PART: usize = 6_000;

impl<'de> Deserialize<'de> for MessageSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MessageSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a message object with a `role`")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut role, mut size) = (false, MessageSize::default());
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "role" => {
                            map.next_value::<Text<'de>>()?;
                            role = true;
                        }
                        "content" => {
                            let c = map.next_value::<Chars>()?;
                            size.chars += c.chars;
                            size.parts += c.parts;
                        }
                        // What the model reads back of its own tool calls is billed as input.
                        "tool_calls" | "function_call" => {
                            size.chars += map.next_value::<&'de RawValue>()?.get().len();
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                if !role {
                    return Err(de::Error::custom("a message has no `role`"));
                }
                Ok(size)
            }
        }
        d.deserialize_map(V)
    }
}

/// The weight of a `content` (a string, or parts) and how many parts it has.
struct Chars {
    chars: usize,
    parts: usize,
}

impl<'de> Deserialize<'de> for Chars {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Chars;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`content` as a string or an array of parts")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Chars { chars: 0, parts: 0 })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Chars {
                    chars: v.chars().count(),
                    parts: 0,
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let (mut chars, mut parts) = (0, 0usize);
                while let Some(PartChars(c)) = seq.next_element::<PartChars>()? {
                    parts += 1;
                    if parts > MAX_PARTS {
                        return Err(de::Error::custom(format!("a message has more than {MAX_PARTS} parts")));
                    }
                    chars += c;
                }
                Ok(Chars { chars, parts })
            }
        }
        d.deserialize_any(V)
    }
}

/// The weight of one content part: its text, or [`CHARS_PER_MEDIA_PART`] for any other part.
struct PartChars(usize);

impl<'de> Deserialize<'de> for PartChars {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PartChars;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a content part object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut text, mut media) = (0, false);
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "text" => text = map.next_value::<Text<'de>>()?.0.chars().count(),
                        "type" => media = map.next_value::<Text<'de>>()?.0 != "text",
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(PartChars(if media { CHARS_PER_MEDIA_PART } else { text }))
            }
        }
        d.deserialize_map(V)
    }
}

/// Inputs one embeddings request may carry (OpenAI's limit).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// An embeddings request as an app sent it (an OpenAI `/v1/embeddings` body).
#[derive(Debug, Clone)]
pub struct EmbeddingsRequest {
    body: Object,
    model: Option<String>,
    user: Option<String>,
    input: EmbeddingInput,
    base64: bool,
    dimensions: Option<u64>,
}

/// What an embeddings request embeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbeddingInput {
    Texts(Vec<String>),
    /// Token ids (how many in all); only OpenAI-style providers take them.
    Tokens(usize),
}

impl EmbeddingsRequest {
    /// Checks the shape; the error is for the caller (HTTP 400).
    pub fn parse(bytes: Bytes) -> Result<EmbeddingsRequest, String> {
        let body = Object::parse(bytes)?;
        let input = match body.get("input") {
            None | Some("null") => return Err("`input` is required".into()),
            Some(text) => {
                serde_json::from_str::<InputIn>(text)
                    .map_err(|e| format!("`input`: {e}"))?
                    .0
            }
        };
        let model: Option<String> = body
            .value("model")
            .map_err(|_| "`model` must be a string".to_string())?;
        let user: Option<String> = body.value("user").map_err(|_| "`user` must be a string".to_string())?;
        const FORMAT: &str = "`encoding_format` must be \"float\" or \"base64\"";
        let format: Option<String> = body.value("encoding_format").map_err(|_| FORMAT.to_string())?;
        let base64 = match format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(_) => return Err(FORMAT.into()),
        };
        let dimensions: Option<u64> = body
            .value("dimensions")
            .map_err(|_| "`dimensions` must be a positive integer".to_string())?;
        if dimensions.is_some_and(|n| !(1..=65_536).contains(&n)) {
            return Err("`dimensions` must be a positive integer".into());
        }
        Ok(EmbeddingsRequest {
            body,
            model,
            user: user.filter(|u| !u.is_empty()),
            input,
            base64,
            dimensions,
        })
    }

    pub fn body(&self) -> &Object {
        &self.body
    }

    /// The inputs: texts, or how many token ids.
    pub fn input(&self) -> &EmbeddingInput {
        &self.input
    }

    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// Whether the app wants each embedding as base64 of little-endian float32s.
    pub fn wants_base64(&self) -> bool {
        self.base64
    }

    pub fn dimensions(&self) -> Option<u64> {
        self.dimensions
    }

    /// Input tokens: counted for token ids, about four characters per token for text. Settled
    /// when the provider reports none.
    pub fn estimate_tokens(&self) -> i64 {
        match &self.input {
            EmbeddingInput::Texts(texts) => texts.iter().map(|t| (t.chars().count() as i64 + 3) / 4).sum(),
            EmbeddingInput::Tokens(n) => *n as i64,
        }
    }
}

const INPUT_SHAPE: &str = "a string, an array of strings, or an array of token arrays";

/// `input`, read with at most [`MAX_EMBEDDING_INPUTS`] items and without keeping token ids.
struct InputIn(EmbeddingInput);

impl<'de> Deserialize<'de> for InputIn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = InputIn;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(INPUT_SHAPE)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(InputIn(EmbeddingInput::Texts(vec![v.to_string()])))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut texts: Vec<String> = Vec::new();
                let (mut items, mut flat, mut lists, mut in_lists) = (0usize, 0usize, 0usize, 0usize);
                while let Some(item) = seq.next_element::<InputItem>()? {
                    items += 1;
                    if items > MAX_EMBEDDING_INPUTS {
                        return Err(de::Error::custom(format!(
                            "more than {MAX_EMBEDDING_INPUTS} items; at most {MAX_EMBEDDING_INPUTS} are allowed"
                        )));
                    }
                    match item {
                        InputItem::Text(t) => texts.push(t),
                        InputItem::Token => flat += 1,
                        InputItem::Tokens(0) => return Err(de::Error::custom("a token array is empty")),
                        InputItem::Tokens(n) => {
                            lists += 1;
                            in_lists += n;
                        }
                    }
                }
                match (texts.len(), flat, lists) {
                    (0, 0, 0) => Err(de::Error::custom("`input` must not be empty")),
                    (_, 0, 0) => Ok(InputIn(EmbeddingInput::Texts(texts))),
                    (0, n, 0) => Ok(InputIn(EmbeddingInput::Tokens(n))),
                    (0, 0, _) => Ok(InputIn(EmbeddingInput::Tokens(in_lists))),
                    _ => Err(de::Error::custom(INPUT_SHAPE)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

enum InputItem {
    Text(String),
    Token,
    Tokens(usize),
}

impl<'de> Deserialize<'de> for InputItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = InputItem;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(INPUT_SHAPE)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(InputItem::Text(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(InputItem::Token)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut n = 0;
                while seq.next_element::<u64>()?.is_some() {
                    n += 1;
                }
                Ok(InputItem::Tokens(n))
            }
        }
        d.deserialize_any(V)
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

    fn chat(body: &[u8]) -> Result<ChatRequest, String> {
        ChatRequest::parse(Bytes::copy_from_slice(body))
    }

    #[test]
    fn requests_are_checked_and_estimated() {
        let r = chat(
            br#"{"model":"chat","messages":[{"role":"user","content":"abcdefgh"},
                {"role":"user","content":[{"type":"text","text":"abcd"}]}],"max_tokens":100,"user":"u1"}"#,
        )
        .unwrap();
        assert_eq!(r.model(), Some("chat"));
        assert_eq!(r.user(), Some("u1"));
        assert_eq!(r.estimate_prompt_tokens(), 3 + 8);
        assert_eq!(r.estimate_tokens(1024), 111);
        assert!(!r.stream());

        assert!(chat(b"[1]").unwrap_err().contains("object"));
        assert!(chat(br#"{"model":"m"}"#).unwrap_err().contains("messages"));
        assert!(chat(br#"{"messages":[]}"#).unwrap_err().contains("empty"));
        assert!(chat(br#"{"messages":[{}]}"#).unwrap_err().contains("role"));
        assert!(chat(br#"{"messages":[{"role":"user"}],"max_tokens":-1}"#).is_err());
        assert!(chat(br#"{"messages":[{"role":"user"}],"model":7}"#).is_err());
        assert!(chat(br#"{"messages":[{"role":"user"}],"stream":"yes"}"#).is_err());
        assert!(chat(br#"{"messages":[{"role":"user"}],"n":0}"#).is_err());
        assert!(chat(br#"{"messages":[{"role":"user"}],"n":129}"#).is_err());
        let no_max = chat(br#"{"messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(no_max.estimate_tokens(256), 1 + 4 + 256);
    }

    #[test]
    fn the_estimate_counts_what_the_provider_bills() {
        let plain = chat(br#"{"messages":[{"role":"user","content":"abcd"}]}"#).unwrap();
        let with_image = chat(
            br#"{"messages":[{"role":"user","content":[{"type":"text","text":"abcd"},{"type":"image_url","image_url":{"url":"https://x/y.png"}}]}]}"#,
        )
        .unwrap();
        assert_eq!(
            with_image.estimate_prompt_tokens() - plain.estimate_prompt_tokens(),
            (CHARS_PER_MEDIA_PART / 4) as i64
        );
        let tools = format!(
            r#"{{"messages":[{{"role":"user","content":"abcd"}}],"tools":[{{"type":"function","function":{{"name":"f","description":"{}"}}}}]}}"#,
            "d".repeat(4000)
        );
        assert!(chat(tools.as_bytes()).unwrap().estimate_prompt_tokens() > 1000);
        let calls = chat(br#"{"messages":[{"role":"assistant","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{\"q\":\"0123456789012345678901234567890123456789\"}"}}]}]}"#).unwrap();
        assert!(
            calls.estimate_prompt_tokens() > 20,
            "{}",
            calls.estimate_prompt_tokens()
        );
        // Both output caps: refused, a provider might read either.
        assert!(
            chat(br#"{"messages":[{"role":"user"}],"max_tokens":5,"max_completion_tokens":1}"#)
                .unwrap_err()
                .contains("not both")
        );
        // Parts are capped per request too.
        let message = format!(
            r#"{{"role":"user","content":[{}]}}"#,
            vec![r#"{"type":"text"}"#; 1000].join(",")
        );
        let many = format!(r#"{{"messages":[{}]}}"#, [message.as_str(); 11].join(","));
        assert!(chat(many.as_bytes()).unwrap_err().contains("in one request"));
    }

    #[test]
    fn the_hold_covers_every_choice() {
        let r = chat(br#"{"messages":[{"role":"user","content":"hi"}],"n":3,"max_completion_tokens":50}"#).unwrap();
        assert_eq!(r.choices(), 3);
        assert_eq!(r.estimate_completion_tokens(1024), 150);
        let r = chat(br#"{"messages":[{"role":"user","content":"hi"}],"n":2}"#).unwrap();
        assert_eq!(r.estimate_completion_tokens(1000), 2000);
    }

    #[test]
    fn messages_are_typed_for_translation_and_capped() {
        let r = chat(
            br#"{"messages":[{"role":"system","content":"be \"brief\""},
                {"role":"user","content":[{"type":"text","text":"look"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}},
                                          {"type":"input_audio","input_audio":{}}],"name":"x"},
                {"role":"assistant","content":null}],
                "stop":["a","b"],"temperature":0.5,"response_format":{"type":"json_object"}}"#,
        )
        .unwrap();
        let m = r.messages().unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].content, Content::Text(Cow::Borrowed("be \"brief\"")));
        let Content::Parts(parts) = &m[1].content else {
            panic!("{m:?}")
        };
        assert_eq!(parts[0], Part::Text(Cow::Borrowed("look")));
        assert_eq!(parts[1], Part::Image(Cow::Borrowed("data:image/png;base64,AAAA")));
        assert_eq!(parts[2], Part::Other("input_audio".into()));
        assert_eq!(m[2].content, Content::None);
        let s = r.sampling().unwrap();
        assert_eq!(s.stop, vec!["a", "b"]);
        assert_eq!(s.temperature, Some(0.5));
        assert_eq!(s.response_format.as_deref(), Some("json_object"));
        assert!(chat(br#"{"messages":[{"role":"user"}],"temperature":[{}]}"#)
            .unwrap()
            .sampling()
            .is_err());

        let many = format!(
            r#"{{"messages":[{}]}}"#,
            vec![r#"{"role":"user","content":"x"}"#; MAX_MESSAGES + 1].join(",")
        );
        assert!(chat(many.as_bytes()).unwrap_err().contains("more than"));
        let parts = format!(
            r#"{{"messages":[{{"role":"user","content":[{}]}}]}}"#,
            vec![r#"{"type":"text","text":""}"#; MAX_PARTS + 1].join(",")
        );
        assert!(chat(parts.as_bytes()).unwrap_err().contains("parts"));
    }

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
    fn embeddings_inputs() {
        let e = |b: &str| EmbeddingsRequest::parse(Bytes::copy_from_slice(b.as_bytes()));
        assert_eq!(
            e(r#"{"input":"abcd"}"#).unwrap().input(),
            &EmbeddingInput::Texts(vec!["abcd".into()])
        );
        assert_eq!(e(r#"{"input":[1,2,3]}"#).unwrap().input(), &EmbeddingInput::Tokens(3));
        assert_eq!(e(r#"{"input":[[1,2],[3]]}"#).unwrap().estimate_tokens(), 3);
        assert!(e(r#"{"input":["a",1]}"#).is_err());
        assert!(e(r#"{"input":[]}"#).unwrap_err().contains("empty"));
        assert!(e(r#"{"input":[[]]}"#).is_err());
        assert!(e(r#"{}"#).unwrap_err().contains("required"));
        assert!(e(r#"{"input":"a","encoding_format":"hex"}"#).is_err());
        assert!(e(r#"{"input":"a","dimensions":0}"#).is_err());
        let many = format!(r#"{{"input":[{}]}}"#, vec!["[1]"; MAX_EMBEDDING_INPUTS + 1].join(","));
        assert!(e(&many).unwrap_err().contains("at most"));
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
