//! Anthropic's Messages request as an app sent it (`POST /v1/messages`: the Anthropic SDKs,
//! Claude Code): checked and weighed as it arrived, passed through to Anthropic keys, and read as
//! a conversation for any other provider.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::protocol::conversation::{
    Conversation, Dialect, Effort, Image, JsonSchema, Message, Part, Reasoning, ResponseFormat, Role, Sampling,
    Signature, Tool, ToolCall, ToolChoice, ToolResult, MAX_TOOLS,
};
use crate::protocol::json::{printable, raw, Capped, Object, Text, Weight};
use crate::protocol::openai::carry;
use crate::protocol::openai::chat::{CHARS_PER_MEDIA_PART, MAX_MESSAGES, MAX_PARTS, MAX_PARTS_IN_ALL, MAX_STOP};

/// Fields read by the worker, or asking nothing of the model.
const CONSUMED: &[&str] = &["model", "messages", "metadata", "stream", "service_tier"];

/// Fields the model carries.
const CARRIED: &[&str] = &[
    "system",
    "max_tokens",
    "stop_sequences",
    "temperature",
    "top_p",
    "tools",
    "tool_choice",
    "thinking",
    "output_config",
];

/// A Messages request as an app sent it.
#[derive(Debug, Clone)]
pub struct MessagesRequest {
    body: Object,
    model: Option<String>,
    user: Option<String>,
    stream: bool,
    max_tokens: u64,
    effort: Option<Effort>,
    weight: Weight,
}

#[derive(Deserialize)]
struct MetadataIn {
    #[serde(default)]
    user_id: Option<String>,
}

#[derive(Deserialize)]
struct ThinkingIn {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    budget_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct OutputConfigIn {
    #[serde(default)]
    effort: Option<String>,
}

/// Anthropic's server tools: run by Anthropic and billed per use (searches, fetches, container
/// hours), a cost the pool's budgets and shares do not count, so none is carried. Client tools
/// (`bash`, `text_editor`, `computer`, `memory` ...) are the app's own to run: they are carried.
const SERVER_TOOLS: &[&str] = &["web_search", "web_fetch", "code_execution", "mcp_toolset"];

/// Refuses what Anthropic would bill beyond tokens, whichever key serves the request.
fn refuse_uncounted(body: &Object) -> Result<(), String> {
    #[derive(Deserialize)]
    struct ToolKind {
        #[serde(rename = "type", default)]
        kind: Option<String>,
    }
    let tools: Option<Vec<ToolKind>> = body.value("tools")?;
    for (i, t) in tools.unwrap_or_default().iter().enumerate() {
        if let Some(kind) = t
            .kind
            .as_deref()
            .filter(|k| SERVER_TOOLS.iter().any(|s| k.starts_with(s)))
        {
            return Err(format!(
                "tools.{i}: the server tool \"{}\" is run and billed by Anthropic per use, which the pool's budgets and shares do not count: not carried",
                printable(kind)
            ));
        }
    }
    for field in ["mcp_servers", "container"] {
        if matches!(body.get(field), Some(v) if v != "null" && v != "[]") {
            return Err(format!(
                "{field}: servers and containers Anthropic runs for the key owner are not carried through the pool"
            ));
        }
    }
    Ok(())
}

/// The effort a thinking budget asks for.
fn effort_of(budget: u64) -> Effort {
    match budget {
        0..=1_024 => Effort::Low,
        1_025..=8_192 => Effort::Medium,
        8_193..=24_576 => Effort::High,
        _ => Effort::XHigh,
    }
}

impl MessagesRequest {
    /// Checks the shape the worker relies on; the error is the caller's (HTTP 400).
    pub fn parse(bytes: Bytes) -> Result<MessagesRequest, String> {
        let body = Object::parse(bytes)?;
        if !body.has("messages") {
            return Err("messages: Field required".into());
        }
        let max_tokens: u64 = body
            .value("max_tokens")
            .map_err(|_| "max_tokens: Input should be a valid integer".to_string())?
            .ok_or_else(|| "max_tokens: Field required".to_string())?;
        let mut weight = Weight::of(&body, "messages")?;
        for f in ["system", "tools", "output_config"] {
            weight.add(Weight::of(&body, f)?);
        }
        if weight.items > MAX_PARTS_IN_ALL + MAX_MESSAGES {
            return Err(format!(
                "the request holds {} list items; at most {} are allowed",
                weight.items,
                MAX_PARTS_IN_ALL + MAX_MESSAGES
            ));
        }
        refuse_uncounted(&body)?;
        let model: Option<String> = body
            .value("model")
            .map_err(|_| "model: Input should be a valid string".to_string())?;
        let metadata: Option<MetadataIn> = body.value("metadata")?;
        let stream: Option<bool> = body
            .value("stream")
            .map_err(|_| "stream: Input should be a valid boolean".to_string())?;
        let thinking: Option<ThinkingIn> = body.value("thinking")?;
        let output: Option<OutputConfigIn> = body.value("output_config")?;
        let effort = match (thinking, output.and_then(|o| o.effort)) {
            (Some(t), _) if t.kind == "disabled" => Some(Effort::None),
            (_, Some(e)) => Some(match e.as_str() {
                "low" => Effort::Low,
                "medium" => Effort::Medium,
                "high" => Effort::High,
                "xhigh" | "max" => Effort::XHigh,
                other => {
                    return Err(format!(
                        "output_config.effort: \"{}\" is not an effort",
                        printable(other)
                    ))
                }
            }),
            (Some(t), None) if t.kind == "enabled" => Some(effort_of(t.budget_tokens.unwrap_or(1_024))),
            (Some(t), None) if t.kind == "adaptive" => Some(Effort::Medium),
            (Some(t), None) => {
                return Err(format!(
                    "thinking.type: \"{}\" is not a thinking mode",
                    printable(&t.kind)
                ))
            }
            (None, None) => None,
        };
        Ok(MessagesRequest {
            model,
            user: metadata.and_then(|m| m.user_id).filter(|u| !u.is_empty()),
            stream: stream.unwrap_or(false),
            max_tokens,
            effort,
            weight,
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

    /// `metadata.user_id`.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    pub fn stream(&self) -> bool {
        self.stream
    }

    /// `max_tokens` (required in this dialect).
    pub fn max_tokens(&self) -> u64 {
        self.max_tokens
    }

    pub fn estimate_prompt_tokens(&self) -> i64 {
        let bytes = self.weight.text_bytes + self.weight.media * CHARS_PER_MEDIA_PART;
        (bytes as i64 + 3) / 4 + 4 * self.weight.items as i64
    }

    pub fn estimate_tokens(&self) -> i64 {
        self.estimate_prompt_tokens() + self.max_tokens.min(1_000_000) as i64
    }

    /// The request as a conversation. The error is the caller's.
    pub fn conversation(&self) -> Result<Conversation<'_>, String> {
        let b = &self.body;
        let mut c = Conversation {
            max_output_tokens: Some(self.max_tokens),
            choices: 1,
            reasoning: self.effort.filter(|e| *e != Effort::None),
            ..Conversation::default()
        };
        for name in b.names() {
            let asks = !matches!(b.get(name), Some("null" | "false"));
            if !CONSUMED.contains(&name) && !CARRIED.contains(&name) && asks {
                c.unsupported.push(printable(name));
            }
        }
        if let Some(system) = b.borrowed::<ContentIn<'_>>("system")? {
            c.unsupported
                .extend(system.unsupported.into_iter().map(|u| format!("system {u}")));
            c.system.extend(system.parts.into_iter().filter_map(|p| match p {
                Part::Text(t) => Some(t),
                _ => None,
            }));
        }
        let messages: Capped<MessageIn<'_>, MAX_MESSAGES> = b.borrowed("messages")?.unwrap_or_default();
        for (i, m) in messages.0.into_iter().enumerate() {
            c.unsupported
                .extend(m.unsupported.into_iter().map(|u| format!("messages[{i}] {u}")));
            c.messages.push(Message {
                role: m.role,
                parts: m.parts,
            });
        }
        c.name_tool_results();
        let number = |f: &str| -> Result<Option<f64>, String> {
            b.value(f).map_err(|_| format!("{f}: Input should be a valid number"))
        };
        let stop: Option<Capped<Text<'_>, MAX_STOP>> = b.borrowed("stop_sequences")?;
        c.sampling = Sampling {
            temperature: number("temperature")?,
            top_p: number("top_p")?,
            stop: stop.map(|s| s.0.into_iter().map(|t| t.0).collect()).unwrap_or_default(),
            ..Sampling::default()
        };
        let tools: Option<Capped<ToolIn<'_>, MAX_TOOLS>> = b.borrowed("tools")?;
        for (i, t) in tools.map(|t| t.0).unwrap_or_default().into_iter().enumerate() {
            match t {
                ToolIn::Custom(tool) => c.tools.push(tool),
                ToolIn::Other(what) => c.unsupported.push(format!("tools[{i}] {what}")),
            }
        }
        if let Some(choice) = b.borrowed::<ChoiceIn<'_>>("tool_choice")? {
            c.tool_choice = choice.choice;
            if choice.no_parallel {
                c.parallel_tool_calls = Some(false);
            }
        }
        if let Some(format) = b.borrowed::<OutputIn<'_>>("output_config")? {
            if let Some(schema) = format.schema {
                c.response_format = ResponseFormat::JsonSchema(JsonSchema {
                    name: Cow::Borrowed("response"),
                    description: None,
                    schema,
                    strict: true,
                });
            }
        }
        Ok(c)
    }
}

struct MessageIn<'a> {
    role: Role,
    parts: Vec<Part<'a>>,
    unsupported: Vec<String>,
}

impl<'de> Deserialize<'de> for MessageIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MessageIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a message object with a `role` and `content`")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut role, mut content) = (None, None);
                let mut unsupported = Vec::new();
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "role" => role = Some(map.next_value::<Text<'de>>()?.0),
                        "content" => content = Some(map.next_value::<ContentIn<'de>>()?),
                        other => {
                            if map.next_value::<Option<IgnoredAny>>()?.is_some() {
                                unsupported.push(format!("field `{}`", printable(other)));
                            }
                        }
                    }
                }
                let role = match role.as_deref() {
                    Some("user") => Role::User,
                    Some("assistant") => Role::Assistant,
                    _ => return Err(de::Error::custom("a message's role must be \"user\" or \"assistant\"")),
                };
                let content = content.ok_or_else(|| de::Error::custom("a message has no `content`"))?;
                unsupported.extend(content.unsupported);
                Ok(MessageIn {
                    role,
                    parts: content.parts,
                    unsupported,
                })
            }
        }
        d.deserialize_map(V)
    }
}

/// `content` (or `system`, or a tool result's content): a string or blocks.
struct ContentIn<'a> {
    parts: Vec<Part<'a>>,
    unsupported: Vec<String>,
}

impl<'de> Deserialize<'de> for ContentIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ContentIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of content blocks")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(ContentIn {
                    parts: vec![Part::Text(Cow::Borrowed(v))],
                    unsupported: Vec::new(),
                })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ContentIn {
                    parts: vec![Part::Text(Cow::Owned(v.to_string()))],
                    unsupported: Vec::new(),
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                let blocks: Capped<BlockIn<'de>, MAX_PARTS> =
                    Deserialize::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
                let mut c = ContentIn {
                    parts: Vec::new(),
                    unsupported: Vec::new(),
                };
                for b in blocks.0 {
                    match b {
                        BlockIn::Part(p) => c.parts.push(p),
                        BlockIn::Other(what) => c.unsupported.push(what),
                    }
                }
                Ok(c)
            }
        }
        d.deserialize_any(V)
    }
}

enum BlockIn<'a> {
    Part(Part<'a>),
    Other(String),
}

/// An image block's `source`.
struct SourceIn<'a>(Option<Image<'a>>);

impl<'de> Deserialize<'de> for SourceIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SourceIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an image source object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut kind, mut media, mut data, mut url) = (None, None, None, None);
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "type" => kind = Some(map.next_value::<Text<'de>>()?.0),
                        "media_type" => media = Some(map.next_value::<Text<'de>>()?.0),
                        "data" => data = Some(map.next_value::<Text<'de>>()?.0),
                        "url" => url = Some(map.next_value::<Text<'de>>()?.0),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(SourceIn(match (kind.as_deref(), media, data, url) {
                    (Some("base64"), Some(mime), Some(base64), _) => Some(Image::Data { mime, base64 }),
                    (Some("url"), _, _, Some(url)) => Some(Image::Url(url)),
                    _ => None,
                }))
            }
        }
        d.deserialize_map(V)
    }
}

impl<'de> Deserialize<'de> for BlockIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BlockIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a content block object with a `type`")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut kind: Option<Cow<'de, str>> = None;
                let (mut text, mut id, mut name, mut input, mut tool_use_id) = (None, None, None, None, None);
                let (mut thinking, mut signature, mut data, mut source) = (None, None, None, None);
                let mut content: Option<ContentIn<'de>> = None;
                let mut is_error = false;
                let mut unknown: Option<String> = None;
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "type" => kind = Some(map.next_value::<Text<'de>>()?.0),
                        "text" => text = Some(map.next_value::<Text<'de>>()?.0),
                        "id" => id = Some(map.next_value::<Text<'de>>()?.0),
                        "name" => name = Some(map.next_value::<Text<'de>>()?.0),
                        "input" => input = Some(raw(&mut map)?),
                        "tool_use_id" => tool_use_id = Some(map.next_value::<Text<'de>>()?.0),
                        "content" => content = Some(map.next_value()?),
                        "is_error" => is_error = map.next_value::<Option<bool>>()?.unwrap_or(false),
                        "thinking" => thinking = Some(map.next_value::<Text<'de>>()?.0),
                        "signature" => signature = Some(map.next_value::<Text<'de>>()?.0),
                        "data" => data = Some(map.next_value::<Text<'de>>()?.0),
                        "source" => source = Some(map.next_value::<SourceIn<'de>>()?),
                        // A caching hint; an answer's citations of the earlier turn.
                        "cache_control" | "citations" => {
                            map.next_value::<IgnoredAny>()?;
                        }
                        other => {
                            if map.next_value::<Option<IgnoredAny>>()?.is_some() && unknown.is_none() {
                                unknown = Some(printable(other));
                            }
                        }
                    }
                }
                let kind = kind.ok_or_else(|| de::Error::custom("a content block has no `type`"))?;
                if let Some(field) = unknown {
                    return Ok(BlockIn::Other(format!("content block field `{field}`")));
                }
                let missing = |f: &str| de::Error::custom(format!("a {kind} block has no `{f}`"));
                Ok(BlockIn::Part(match kind.as_ref() {
                    "text" => Part::Text(text.ok_or_else(|| missing("text"))?),
                    "image" => match source.and_then(|s| s.0) {
                        Some(i) => Part::Image(i),
                        None => return Ok(BlockIn::Other("image block without a base64 or url source".into())),
                    },
                    "tool_use" => {
                        let id = id.ok_or_else(|| missing("id"))?;
                        let (id, carried) = carry::uncarry(&id);
                        Part::ToolCall(ToolCall {
                            id,
                            name: name.ok_or_else(|| missing("name"))?,
                            arguments: input.unwrap_or(Cow::Borrowed("{}")),
                            signature: carried.signature,
                        })
                    }
                    "tool_result" => {
                        let content = content.unwrap_or(ContentIn {
                            parts: Vec::new(),
                            unsupported: Vec::new(),
                        });
                        if let Some(what) = content.unsupported.into_iter().next() {
                            return Ok(BlockIn::Other(format!("tool_result with {what}")));
                        }
                        Part::ToolResult(ToolResult {
                            call_id: carry::base_id(&tool_use_id.ok_or_else(|| missing("tool_use_id"))?),
                            name: None,
                            content: content.parts,
                            is_error,
                        })
                    }
                    "thinking" => Part::Reasoning(Reasoning {
                        text: thinking.unwrap_or_default(),
                        signature: signature.filter(|s| !s.is_empty()).map(|s| Signature {
                            dialect: Dialect::Anthropic,
                            value: s,
                        }),
                        redacted: None,
                    }),
                    "redacted_thinking" => Part::Reasoning(Reasoning {
                        text: Cow::Borrowed(""),
                        signature: None,
                        redacted: Some(data.ok_or_else(|| missing("data"))?),
                    }),
                    other => {
                        return Ok(BlockIn::Other(format!(
                            "content block of type \"{}\"",
                            printable(other)
                        )))
                    }
                }))
            }
        }
        d.deserialize_map(V)
    }
}

enum ToolIn<'a> {
    Custom(Tool<'a>),
    Other(String),
}

impl<'de> Deserialize<'de> for ToolIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ToolIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a tool object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut kind, mut name, mut description, mut schema, mut strict) = (None, None, None, None, false);
                let mut unknown: Option<String> = None;
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "type" => kind = map.next_value::<Option<Text<'de>>>()?.map(|t| t.0),
                        "name" => name = Some(map.next_value::<Text<'de>>()?.0),
                        "description" => description = map.next_value::<Option<Text<'de>>>()?.map(|t| t.0),
                        "input_schema" => schema = Some(raw(&mut map)?),
                        "strict" => strict = map.next_value::<Option<bool>>()?.unwrap_or(false),
                        "cache_control" => {
                            map.next_value::<IgnoredAny>()?;
                        }
                        other => {
                            if map.next_value::<Option<IgnoredAny>>()?.is_some() && unknown.is_none() {
                                unknown = Some(printable(other));
                            }
                        }
                    }
                }
                if let Some(k) = kind.filter(|k| k != "custom") {
                    return Ok(ToolIn::Other(format!("of type \"{}\"", printable(&k))));
                }
                if let Some(field) = unknown {
                    return Ok(ToolIn::Other(format!("with the field `{field}`")));
                }
                Ok(ToolIn::Custom(Tool {
                    name: name.ok_or_else(|| de::Error::custom("a tool has no `name`"))?,
                    description,
                    parameters: schema,
                    strict,
                }))
            }
        }
        d.deserialize_map(V)
    }
}

struct ChoiceIn<'a> {
    choice: ToolChoice<'a>,
    no_parallel: bool,
}

impl<'de> Deserialize<'de> for ChoiceIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ChoiceIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`tool_choice` as an object with a `type`")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut kind, mut name, mut no_parallel) = (None, None, false);
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "type" => kind = Some(map.next_value::<Text<'de>>()?.0),
                        "name" => name = Some(map.next_value::<Text<'de>>()?.0),
                        "disable_parallel_tool_use" => no_parallel = map.next_value::<Option<bool>>()?.unwrap_or(false),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                let choice = match (kind.as_deref(), name) {
                    (Some("auto"), _) => ToolChoice::Auto,
                    (Some("none"), _) => ToolChoice::None,
                    (Some("any"), _) => ToolChoice::Required,
                    (Some("tool"), Some(n)) => ToolChoice::Named(n),
                    _ => {
                        return Err(de::Error::custom(
                            "tool_choice.type must be auto, any, tool (with a name) or none",
                        ))
                    }
                };
                Ok(ChoiceIn { choice, no_parallel })
            }
        }
        d.deserialize_map(V)
    }
}

/// `output_config`: its `format` (a JSON schema) and `effort` (read with the thinking mode).
struct OutputIn<'a> {
    schema: Option<Cow<'a, str>>,
}

impl<'de> Deserialize<'de> for OutputIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OutputIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`output_config` as an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = OutputIn { schema: None };
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "format" => out.schema = map.next_value::<Option<FormatIn<'de>>>()?.map(|f| f.0),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

struct FormatIn<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for FormatIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FormatIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`output_config.format` as {\"type\": \"json_schema\", \"schema\": ...}")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut kind, mut schema) = (None, None);
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "type" => kind = Some(map.next_value::<Text<'de>>()?.0),
                        "schema" => schema = Some(raw(&mut map)?),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                match (kind.as_deref(), schema) {
                    (Some("json_schema"), Some(s)) => Ok(FormatIn(s)),
                    _ => Err(de::Error::custom(
                        "output_config.format must be {\"type\": \"json_schema\", \"schema\": ...}",
                    )),
                }
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(body: &str) -> Result<MessagesRequest, String> {
        MessagesRequest::parse(Bytes::copy_from_slice(body.as_bytes()))
    }

    #[test]
    fn a_messages_request_becomes_the_conversation() {
        let r = req(
            r#"{"model":"ant","max_tokens":1024,"system":[{"type":"text","text":"be brief","cache_control":{"type":"ephemeral"}}],
                "metadata":{"user_id":"u-1"},"stop_sequences":["END"],"temperature":1,
                "thinking":{"type":"enabled","budget_tokens":2048},
                "tools":[{"name":"weather","description":"d","input_schema":{"type":"object"}}],
                "tool_choice":{"type":"auto","disable_parallel_tool_use":true},
                "messages":[{"role":"user","content":"weather?"},
                  {"role":"assistant","content":[{"type":"thinking","thinking":"hmm","signature":"SIG"},
                                                 {"type":"tool_use","id":"toolu_1","name":"weather","input":{"city":"Oslo"}}]},
                  {"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1","content":[{"type":"text","text":"sunny"}]},
                                            {"type":"image","source":{"type":"base64","media_type":"image/png","data":"AA"}}]}]}"#,
        )
        .unwrap();
        assert_eq!((r.user(), r.max_tokens()), (Some("u-1"), 1024));
        let c = r.conversation().unwrap();
        assert!(c.unsupported.is_empty(), "{:?}", c.unsupported);
        assert_eq!(c.system, vec!["be brief"]);
        assert_eq!((c.reasoning, c.max_output_tokens), (Some(Effort::Medium), Some(1024)));
        assert!(
            matches!(&c.messages[1].parts[0], Part::Reasoning(r) if r.signature.as_ref().is_some_and(|s| s.value == "SIG"))
        );
        assert!(matches!(&c.messages[1].parts[1], Part::ToolCall(t) if t.arguments == r#"{"city":"Oslo"}"#));
        let Part::ToolResult(res) = &c.messages[2].parts[0] else {
            panic!()
        };
        assert_eq!(
            (res.name.as_deref(), res.text()),
            (Some("weather"), "sunny".to_string())
        );
        assert!(matches!(&c.messages[2].parts[1], Part::Image(Image::Data { .. })));
        assert_eq!(c.parallel_tool_calls, Some(false));
        assert_eq!(c.sampling.stop, vec!["END"]);
    }

    #[test]
    fn what_the_model_cannot_carry_is_named() {
        assert!(req(r#"{"messages":[]}"#).unwrap_err().contains("max_tokens"));
        let r = req(
            r#"{"max_tokens":5,"top_k":3,"mcp_servers":[],"tools":[{"type":"bash_20250124","name":"bash"}],
                "messages":[{"role":"user","content":[{"type":"document","source":{}}]}]}"#,
        )
        .unwrap();
        assert_eq!(
            r.conversation().unwrap().unsupported,
            vec![
                "top_k".to_string(),
                "mcp_servers".into(),
                "messages[0] content block of type \"document\"".into(),
                "tools[0] of type \"bash_20250124\"".into()
            ]
        );
    }

    #[test]
    fn what_anthropic_bills_beyond_tokens_is_refused_for_every_key() {
        for body in [
            r#"{"max_tokens":5,"tools":[{"type":"web_search_20250305","name":"web_search"}],"messages":[]}"#,
            r#"{"max_tokens":5,"tools":[{"type":"code_execution_20250825","name":"code_execution"}],"messages":[]}"#,
            r#"{"max_tokens":5,"mcp_servers":[{"type":"url","url":"https://mcp.example","name":"x"}],"messages":[]}"#,
            r#"{"max_tokens":5,"container":"container_1","messages":[]}"#,
        ] {
            let e = req(body).unwrap_err();
            assert!(e.contains("not carried"), "{body}: {e}");
        }
        assert!(
            req(r#"{"max_tokens":5,"tools":[{"name":"weather","input_schema":{"type":"object"}}],"messages":[]}"#)
                .is_ok()
        );
    }
}
