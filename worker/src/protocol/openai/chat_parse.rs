//! An OpenAI chat completions request read as a [`Conversation`], for a provider of another
//! dialect. Lists are read with caps, strings borrowed from the body where they have no escapes,
//! tool schemas and arguments kept as JSON text. What the model has no place for (`logit_bias`,
//! an audio part, a message's `name`) is listed as unsupported, never left out in silence.
//!
//! Tool calls made by a provider of another dialect carry that provider's state in their ids
//! (`chat_render::carry`): it is taken back out here.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::carry::{base_id, uncarry};
use super::chat::{MAX_MESSAGES, MAX_PARTS, MAX_STOP};
use crate::protocol::conversation::{
    Conversation, Effort, Image, JsonSchema, Message, Part, Reasoning, ResponseFormat, Role, Sampling, Tool, ToolCall,
    ToolChoice, ToolResult, MAX_TOOLS,
};
use crate::protocol::json::{printable, raw, Capped, Object, Text};

/// Top-level fields the worker reads itself, or that ask nothing of the model: they are not
/// forwarded to a provider of another dialect, and nothing is lost by that.
const CONSUMED: &[&str] = &[
    "model",
    "messages",
    "user",
    "stream",
    "stream_options",
    // Storage of the completion on OpenAI's side, and hints for its cache and abuse checks.
    "store",
    "metadata",
    "prompt_cache_key",
    "safety_identifier",
];

/// Top-level fields the model carries.
const CARRIED: &[&str] = &[
    "max_tokens",
    "max_completion_tokens",
    "n",
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "reasoning_effort",
];

/// Reads `body` (an OpenAI chat request, already checked by `ChatRequest::parse`) as a
/// conversation. `max_tokens`, `choices` and `reasoning` were read by that check.
pub fn conversation(
    body: &Object,
    max_tokens: Option<u64>,
    choices: u64,
    reasoning: Option<Effort>,
) -> Result<Conversation<'_>, String> {
    let mut c = Conversation {
        max_output_tokens: max_tokens,
        choices,
        reasoning,
        ..Conversation::default()
    };
    for name in body.names() {
        // `null` and `false` ask for nothing (`logprobs: false`).
        let asks = !matches!(body.get(name), Some("null" | "false"));
        if !CONSUMED.contains(&name) && !CARRIED.contains(&name) && asks {
            c.unsupported.push(name.chars().take(64).collect());
        }
    }
    let messages: Capped<MessageIn<'_>, MAX_MESSAGES> = body
        .borrowed("messages")?
        .ok_or_else(|| "`messages` (an array) is required".to_string())?;
    for (i, m) in messages.0.into_iter().enumerate() {
        for field in m.unsupported {
            c.unsupported.push(format!("messages[{i}].{field}"));
        }
        match m.role {
            RoleIn::System => c.system.extend(m.texts),
            RoleIn::User => c.messages.push(Message {
                role: Role::User,
                parts: m.parts,
            }),
            RoleIn::Assistant => c.messages.push(Message {
                role: Role::Assistant,
                parts: m.parts,
            }),
            RoleIn::Tool => match c.messages.last_mut() {
                // Results of one turn's calls travel together (Anthropic and Gemini want them so).
                Some(last)
                    if last.role == Role::User && last.parts.iter().all(|p| matches!(p, Part::ToolResult(_))) =>
                {
                    last.parts.extend(m.parts)
                }
                _ => c.messages.push(Message {
                    role: Role::User,
                    parts: m.parts,
                }),
            },
        }
    }
    c.name_tool_results();

    let number =
        |f: &str| -> Result<Option<f64>, String> { body.value(f).map_err(|_| format!("`{f}` must be a number")) };
    let stop: Option<StopIn<'_>> = body.borrowed("stop")?;
    c.sampling = Sampling {
        temperature: number("temperature")?,
        top_p: number("top_p")?,
        // A penalty of 0 is none.
        presence_penalty: number("presence_penalty")?.filter(|p| *p != 0.0),
        frequency_penalty: number("frequency_penalty")?.filter(|p| *p != 0.0),
        seed: body
            .value("seed")
            .map_err(|_| "`seed` must be an integer".to_string())?,
        stop: stop.map(|s| s.0).unwrap_or_default(),
    };
    let tools: Option<Capped<ToolIn<'_>, MAX_TOOLS>> = body.borrowed("tools")?;
    for (i, t) in tools.map(|t| t.0).unwrap_or_default().into_iter().enumerate() {
        match t {
            ToolIn::Function { tool, unsupported } => {
                c.unsupported
                    .extend(unsupported.into_iter().map(|f| format!("tools[{i}].{f}")));
                c.tools.push(tool);
            }
            ToolIn::Other(kind) => c.unsupported.push(format!("tools[{i}] of type \"{kind}\"")),
        }
    }
    if let Some(choice) = body.borrowed::<ToolChoiceIn<'_>>("tool_choice")? {
        match choice {
            ToolChoiceIn::Choice(choice) => c.tool_choice = choice,
            ToolChoiceIn::Other(what) => c.unsupported.push(format!("tool_choice {what}")),
        }
    }
    c.parallel_tool_calls = body
        .value("parallel_tool_calls")
        .map_err(|_| "`parallel_tool_calls` must be true or false".to_string())?;
    if let Some(format) = body.borrowed::<FormatIn<'_>>("response_format")? {
        c.response_format = format.0;
    }
    Ok(c)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RoleIn {
    System,
    User,
    Assistant,
    Tool,
}

/// One message as read: its parts (texts only, for system messages), and the fields it had
/// that the model cannot carry.
struct MessageIn<'a> {
    role: RoleIn,
    texts: Vec<Cow<'a, str>>,
    parts: Vec<Part<'a>>,
    unsupported: Vec<String>,
}

impl<'de> Deserialize<'de> for MessageIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MessageIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a message object with a `role`")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut role = None;
                let mut content: Option<ContentIn<'de>> = None;
                let mut calls: Vec<ToolCall<'de>> = Vec::new();
                let mut call_id: Option<Cow<'de, str>> = None;
                let mut refusal: Option<Cow<'de, str>> = None;
                let mut unsupported = Vec::new();
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "role" => role = Some(map.next_value::<Text<'de>>()?.0),
                        "content" => content = map.next_value::<Option<ContentIn<'de>>>()?,
                        "tool_calls" => {
                            let list: Option<Capped<CallIn<'de>, MAX_PARTS>> = map.next_value()?;
                            for call in list.map(|l| l.0).unwrap_or_default() {
                                match call {
                                    CallIn::Function(c) => calls.push(c),
                                    CallIn::Other(kind) => unsupported.push(format!("tool_calls of type \"{kind}\"")),
                                }
                            }
                        }
                        "tool_call_id" => call_id = Some(map.next_value::<Text<'de>>()?.0),
                        // What the assistant refused with is what it said.
                        "refusal" => refusal = map.next_value::<Option<Text<'de>>>()?.map(|t| t.0),
                        // Reasoning an OpenAI-compatible server showed in an earlier turn: providers
                        // keep their own (signed reasoning rides in the tool call ids).
                        "reasoning_content" | "reasoning" => {
                            map.next_value::<IgnoredAny>()?;
                        }
                        other => {
                            if map.next_value::<Option<IgnoredAny>>()?.is_some() {
                                unsupported.push(printable(other));
                            }
                        }
                    }
                }
                let role = match role.as_deref() {
                    Some("system" | "developer") => RoleIn::System,
                    Some("user") => RoleIn::User,
                    Some("assistant") => RoleIn::Assistant,
                    Some("tool") => RoleIn::Tool,
                    Some(other) => {
                        return Err(de::Error::custom(format!(
                            "a message's role must be system, developer, user, assistant or tool; not \"{}\"",
                            printable(other)
                        )))
                    }
                    None => return Err(de::Error::custom("a message has no `role`")),
                };
                let content = content.map(|c| c.0).unwrap_or_default();
                let mut m = MessageIn {
                    role,
                    texts: Vec::new(),
                    parts: Vec::new(),
                    unsupported,
                };
                match role {
                    RoleIn::System => {
                        for p in content {
                            match p {
                                PartIn::Part(Part::Text(t)) => m.texts.push(t),
                                PartIn::Part(_) => m.unsupported.push("content (an image in a system message)".into()),
                                PartIn::Other(what) => m.unsupported.push(what),
                            }
                        }
                    }
                    RoleIn::Tool => {
                        let call_id = call_id
                            .take()
                            .ok_or_else(|| de::Error::custom("a `tool` message needs its `tool_call_id`"))?;
                        let mut result = ToolResult {
                            call_id: base_id(&call_id),
                            name: None,
                            content: Vec::new(),
                            is_error: false,
                        };
                        for p in content {
                            match p {
                                PartIn::Part(p) => result.content.push(p),
                                PartIn::Other(what) => m.unsupported.push(what),
                            }
                        }
                        m.parts.push(Part::ToolResult(result));
                    }
                    RoleIn::User | RoleIn::Assistant => {
                        if role == RoleIn::User && !calls.is_empty() {
                            m.unsupported.push("tool_calls (in a user message)".into());
                        }
                        let mut calls: Vec<(ToolCall<'de>, Vec<Reasoning<'static>>)> = calls
                            .into_iter()
                            .map(|call| {
                                let (id, carried) = uncarry(&call.id);
                                let call = ToolCall {
                                    id,
                                    signature: carried.signature,
                                    ..call
                                };
                                (call, carried.reasoning)
                            })
                            .collect();
                        // Reasoning that rode on the first call came before the turn's text, as
                        // the provider gave it; on later calls, right before them.
                        if let Some((_, first)) = calls.first_mut() {
                            m.parts.extend(std::mem::take(first).into_iter().map(Part::Reasoning));
                        }
                        for p in content {
                            match p {
                                PartIn::Part(p) => m.parts.push(p),
                                PartIn::Other(what) => m.unsupported.push(what),
                            }
                        }
                        if role == RoleIn::Assistant {
                            m.parts.extend(refusal.take().map(Part::Text));
                        }
                        for (call, reasoning) in calls {
                            m.parts.extend(reasoning.into_iter().map(Part::Reasoning));
                            m.parts.push(Part::ToolCall(call));
                        }
                    }
                }
                if call_id.is_some() {
                    m.unsupported.push("tool_call_id (outside a tool message)".into());
                }
                if refusal.is_some() {
                    m.unsupported.push("refusal (outside an assistant message)".into());
                }
                Ok(m)
            }
        }
        d.deserialize_map(V)
    }
}

/// `content`: a string, or parts.
#[derive(Default)]
struct ContentIn<'a>(Vec<PartIn<'a>>);

enum PartIn<'a> {
    Part(Part<'a>),
    /// A part the model cannot carry, described.
    Other(String),
}

impl<'de> Deserialize<'de> for ContentIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ContentIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`content` as a string or an array of parts")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(ContentIn(vec![PartIn::Part(Part::Text(Cow::Borrowed(v)))]))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ContentIn(vec![PartIn::Part(Part::Text(Cow::Owned(v.to_string())))]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                let parts: Capped<PartIn<'de>, MAX_PARTS> =
                    Deserialize::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
                Ok(ContentIn(parts.0))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for PartIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PartIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a content part object with a `type`")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut kind, mut text, mut url) = (None, None, None);
                let mut unknown: Option<String> = None;
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "type" => kind = Some(map.next_value::<Text<'de>>()?.0),
                        // An assistant's refusal is text it said.
                        "text" | "refusal" => text = Some(map.next_value::<Text<'de>>()?.0),
                        "image_url" => url = Some(map.next_value::<ImageUrl<'de>>()?.0),
                        other => {
                            if map.next_value::<Option<IgnoredAny>>()?.is_some() && unknown.is_none() {
                                unknown = Some(printable(other));
                            }
                        }
                    }
                }
                let kind = kind.ok_or_else(|| de::Error::custom("a content part has no `type`"))?;
                if !matches!(kind.as_ref(), "text" | "refusal" | "image_url") {
                    return Ok(PartIn::Other(format!("content part of type \"{}\"", printable(&kind))));
                }
                if let Some(field) = unknown {
                    return Ok(PartIn::Other(format!("content part field `{field}`")));
                }
                match kind.as_ref() {
                    "image_url" => match url {
                        Some(url) if !url.is_empty() => Ok(PartIn::Part(Part::Image(Image::from_url(url)))),
                        _ => Err(de::Error::custom("an `image_url` part has no `url`")),
                    },
                    _ => Ok(PartIn::Part(Part::Text(text.unwrap_or_default()))),
                }
            }
        }
        d.deserialize_map(V)
    }
}

/// `image_url`: `{"url": "...", "detail": ...}`, or the URL itself.
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
                        // `detail` only tunes how many tokens an image costs.
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(ImageUrl(url.unwrap_or_default()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A call in an assistant message's `tool_calls`.
enum CallIn<'a> {
    Function(ToolCall<'a>),
    Other(String),
}

impl<'de> Deserialize<'de> for CallIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CallIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a tool call object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut id, mut kind, mut function) = (None, None, None);
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "id" => id = Some(map.next_value::<Text<'de>>()?.0),
                        "type" => kind = Some(map.next_value::<Text<'de>>()?.0),
                        "function" => function = Some(map.next_value::<FunctionIn<'de>>()?),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                if kind.as_deref().is_some_and(|k| k != "function") {
                    return Ok(CallIn::Other(printable(kind.as_deref().unwrap_or(""))));
                }
                let id = id.ok_or_else(|| de::Error::custom("a tool call has no `id`"))?;
                let f = function.ok_or_else(|| de::Error::custom("a tool call has no `function`"))?;
                let arguments = f.arguments.unwrap_or(Cow::Borrowed("{}"));
                let arguments = if arguments.trim().is_empty() {
                    Cow::Borrowed("{}")
                } else {
                    arguments
                };
                Ok(CallIn::Function(ToolCall {
                    id,
                    name: f.name,
                    arguments,
                    signature: None,
                }))
            }
        }
        d.deserialize_map(V)
    }
}

/// `function` of a tool call: its name and arguments (a JSON string).
struct FunctionIn<'a> {
    name: Cow<'a, str>,
    arguments: Option<Cow<'a, str>>,
}

impl<'de> Deserialize<'de> for FunctionIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FunctionIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a function object with a `name`")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut name, mut arguments) = (None, None);
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "name" => name = Some(map.next_value::<Text<'de>>()?.0),
                        "arguments" => arguments = map.next_value::<Option<Text<'de>>>()?.map(|t| t.0),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(FunctionIn {
                    name: name.ok_or_else(|| de::Error::custom("a function has no `name`"))?,
                    arguments,
                })
            }
        }
        d.deserialize_map(V)
    }
}

/// An entry of `tools`.
enum ToolIn<'a> {
    Function { tool: Tool<'a>, unsupported: Vec<String> },
    Other(String),
}

impl<'de> Deserialize<'de> for ToolIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ToolIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a tool object with a `type`")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut kind, mut function) = (None, None);
                let mut unsupported = Vec::new();
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "type" => kind = Some(map.next_value::<Text<'de>>()?.0),
                        "function" => function = Some(map.next_value::<ToolFunctionIn<'de>>()?),
                        other => {
                            if map.next_value::<Option<IgnoredAny>>()?.is_some() {
                                unsupported.push(printable(other));
                            }
                        }
                    }
                }
                match kind.as_deref() {
                    Some("function") => {}
                    Some(other) => return Ok(ToolIn::Other(printable(other))),
                    None => return Err(de::Error::custom("a tool has no `type`")),
                }
                let f = function.ok_or_else(|| de::Error::custom("a function tool has no `function`"))?;
                unsupported.extend(f.unsupported.into_iter().map(|u| format!("function.{u}")));
                Ok(ToolIn::Function {
                    tool: f.tool,
                    unsupported,
                })
            }
        }
        d.deserialize_map(V)
    }
}

struct ToolFunctionIn<'a> {
    tool: Tool<'a>,
    unsupported: Vec<String>,
}

impl<'de> Deserialize<'de> for ToolFunctionIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ToolFunctionIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a function object with a `name`")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut name, mut description, mut parameters, mut strict) = (None, None, None, false);
                let mut unsupported = Vec::new();
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "name" => name = Some(map.next_value::<Text<'de>>()?.0),
                        "description" => description = map.next_value::<Option<Text<'de>>>()?.map(|t| t.0),
                        "parameters" => {
                            let p = raw(&mut map)?;
                            if p.as_ref() != "null" {
                                parameters = Some(p);
                            }
                        }
                        "strict" => strict = map.next_value::<Option<bool>>()?.unwrap_or(false),
                        other => {
                            if map.next_value::<Option<IgnoredAny>>()?.is_some() {
                                unsupported.push(printable(other));
                            }
                        }
                    }
                }
                let name = name.ok_or_else(|| de::Error::custom("a function tool has no `name`"))?;
                Ok(ToolFunctionIn {
                    tool: Tool {
                        name,
                        description,
                        parameters,
                        strict,
                    },
                    unsupported,
                })
            }
        }
        d.deserialize_map(V)
    }
}

/// `tool_choice`: `"auto" | "none" | "required"` or `{"type": "function", "function": {"name"}}`.
enum ToolChoiceIn<'a> {
    Choice(ToolChoice<'a>),
    /// A choice the model has no place for, described.
    Other(String),
}

impl<'de> Deserialize<'de> for ToolChoiceIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ToolChoiceIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`tool_choice` as \"auto\", \"none\", \"required\" or a function object")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ToolChoiceIn::Choice(match v {
                    "auto" => ToolChoice::Auto,
                    "none" => ToolChoice::None,
                    "required" => ToolChoice::Required,
                    other => {
                        return Err(E::custom(format!(
                            "`tool_choice` must be \"auto\", \"none\", \"required\" or a function; not \"{}\"",
                            printable(other)
                        )))
                    }
                }))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut kind, mut function) = (None, None);
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "type" => kind = Some(map.next_value::<Text<'de>>()?.0),
                        "function" => function = Some(map.next_value::<FunctionIn<'de>>()?),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                match (kind.as_deref(), function) {
                    (Some("function"), Some(f)) => Ok(ToolChoiceIn::Choice(ToolChoice::Named(f.name))),
                    (Some("function"), None) => Err(de::Error::custom("`tool_choice` names no `function`")),
                    (kind, _) => Ok(ToolChoiceIn::Other(format!(
                        "of type \"{}\"",
                        printable(kind.unwrap_or(""))
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `response_format`: `{"type": "text" | "json_object"}` or a JSON schema.
struct FormatIn<'a>(ResponseFormat<'a>);

impl<'de> Deserialize<'de> for FormatIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FormatIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`response_format` as an object with a `type`")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut kind, mut schema) = (None, None);
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "type" => kind = Some(map.next_value::<Text<'de>>()?.0),
                        "json_schema" => schema = Some(map.next_value::<SchemaIn<'de>>()?.0),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(FormatIn(match kind.as_deref() {
                    Some("text") => ResponseFormat::Text,
                    Some("json_object") => ResponseFormat::JsonObject,
                    Some("json_schema") => ResponseFormat::JsonSchema(schema.ok_or_else(|| {
                        de::Error::custom("`response_format` of type json_schema has no `json_schema`")
                    })?),
                    _ => {
                        return Err(de::Error::custom(
                            "`response_format.type` must be \"text\", \"json_object\" or \"json_schema\"",
                        ))
                    }
                }))
            }
        }
        d.deserialize_map(V)
    }
}

struct SchemaIn<'a>(JsonSchema<'a>);

impl<'de> Deserialize<'de> for SchemaIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SchemaIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`json_schema` as an object with a `name` and a `schema`")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut name, mut description, mut schema, mut strict) = (None, None, None, false);
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "name" => name = Some(map.next_value::<Text<'de>>()?.0),
                        "description" => description = map.next_value::<Option<Text<'de>>>()?.map(|t| t.0),
                        "schema" => schema = Some(raw(&mut map)?),
                        "strict" => strict = map.next_value::<Option<bool>>()?.unwrap_or(false),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(SchemaIn(JsonSchema {
                    name: name.unwrap_or(Cow::Borrowed("response")),
                    description,
                    schema: schema.ok_or_else(|| de::Error::custom("`json_schema` has no `schema`"))?,
                    strict,
                }))
            }
        }
        d.deserialize_map(V)
    }
}

/// `stop`: one sequence or a list.
struct StopIn<'a>(Vec<Cow<'a, str>>);

impl<'de> Deserialize<'de> for StopIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StopIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`stop` as a string or a list of strings")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(StopIn(vec![Cow::Borrowed(v)]))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(StopIn(vec![Cow::Owned(v.to_string())]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                let list: Capped<Text<'de>, MAX_STOP> =
                    Deserialize::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
                Ok(StopIn(list.0.into_iter().map(|t| t.0).collect()))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::conversation::{Dialect, Signature};
    use crate::protocol::openai::ChatRequest;

    fn conv(body: &str) -> Result<(ChatRequest, ()), String> {
        Ok((ChatRequest::parse(bytes::Bytes::copy_from_slice(body.as_bytes()))?, ()))
    }

    #[test]
    fn messages_tools_and_formats_become_the_model() {
        let (r, _) = conv(
            r#"{"model":"chat","max_tokens":50,"temperature":0.2,"stop":"END","n":2,"seed":7,
                "messages":[{"role":"system","content":"be \"brief\""},{"role":"developer","content":[{"type":"text","text":"and kind"}]},
                  {"role":"user","content":[{"type":"text","text":"look"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA","detail":"low"}}]},
                  {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"weather","arguments":"{\"city\":\"Oslo\"}"}},
                                                                    {"id":"call_2","type":"function","function":{"name":"time","arguments":""}}]},
                  {"role":"tool","tool_call_id":"call_1","content":"sunny"},
                  {"role":"tool","tool_call_id":"call_2","content":[{"type":"text","text":"noon"}]},
                  {"role":"user","content":"thanks"}],
                "tools":[{"type":"function","function":{"name":"weather","description":"d","parameters":{"type":"object","properties":{"city":{"type":"string"}}},"strict":true}}],
                "tool_choice":{"type":"function","function":{"name":"weather"}},"parallel_tool_calls":false,
                "response_format":{"type":"json_schema","json_schema":{"name":"out","schema":{"type":"object"},"strict":true}},
                "reasoning_effort":"low","stream_options":{"include_usage":true},"store":false,"logit_bias":null}"#,
        )
        .unwrap();
        let c = r.conversation().unwrap();
        assert_eq!(c.unsupported, Vec::<String>::new());
        assert_eq!(c.system, vec!["be \"brief\"", "and kind"]);
        assert_eq!(c.messages.len(), 4, "{:?}", c.messages);
        assert_eq!(
            c.messages[0].parts[1],
            Part::Image(Image::Data {
                mime: "image/png".into(),
                base64: "AAAA".into()
            })
        );
        let Part::ToolCall(call) = &c.messages[1].parts[0] else {
            panic!("{:?}", c.messages[1])
        };
        assert_eq!((call.id.as_ref(), call.name.as_ref()), ("call_1", "weather"));
        assert_eq!(call.arguments, r#"{"city":"Oslo"}"#);
        let Part::ToolCall(empty) = &c.messages[1].parts[1] else {
            panic!()
        };
        assert_eq!(empty.arguments, "{}");
        // Both results in one user turn, named after their calls.
        assert_eq!(c.messages[2].role, Role::User);
        let names: Vec<_> = c.messages[2]
            .parts
            .iter()
            .map(|p| match p {
                Part::ToolResult(r) => (
                    r.call_id.to_string(),
                    r.name.as_deref().unwrap_or("").to_string(),
                    r.text(),
                ),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            names,
            vec![
                ("call_1".into(), "weather".into(), "sunny".into()),
                ("call_2".into(), "time".into(), "noon".into())
            ]
        );
        assert_eq!(c.messages[3].parts, vec![Part::Text("thanks".into())]);
        assert_eq!(
            c.tools[0].parameters.as_deref(),
            Some(r#"{"type":"object","properties":{"city":{"type":"string"}}}"#)
        );
        assert!(c.tools[0].strict);
        assert_eq!(c.tool_choice, ToolChoice::Named("weather".into()));
        assert_eq!(c.parallel_tool_calls, Some(false));
        let ResponseFormat::JsonSchema(s) = &c.response_format else {
            panic!()
        };
        assert_eq!(
            (s.name.as_ref(), s.schema.as_ref(), s.strict),
            ("out", r#"{"type":"object"}"#, true)
        );
        assert_eq!(c.reasoning, Some(Effort::Low));
        assert_eq!((c.max_output_tokens, c.choices), (Some(50), 2));
        assert_eq!(c.sampling.stop, vec!["END"]);
        assert_eq!((c.sampling.temperature, c.sampling.seed), (Some(0.2), Some(7)));
    }

    #[test]
    fn what_the_model_cannot_carry_is_named() {
        let (r, _) = conv(
            r#"{"messages":[{"role":"user","name":"bob","content":[{"type":"input_audio","input_audio":{}},{"type":"text","text":"x","cache_control":{}}]}],
                "logit_bias":{"1":2},"logprobs":true,"tools":[{"type":"web_search"},{"type":"function","function":{"name":"f","x":1}}],
                "tool_choice":{"type":"allowed_tools","allowed_tools":{}}}"#,
        )
        .unwrap();
        let c = r.conversation().unwrap();
        assert_eq!(
            c.unsupported,
            vec![
                "logit_bias",
                "logprobs",
                "messages[0].name",
                "messages[0].content part of type \"input_audio\"",
                "messages[0].content part field `cache_control`",
                "tools[0] of type \"web_search\"",
                "tools[1].function.x",
                "tool_choice of type \"allowed_tools\""
            ]
        );
    }

    #[test]
    fn refusals_are_said_and_settings_that_ask_nothing_pass() {
        let (r, _) = conv(
            r#"{"messages":[{"role":"assistant","content":null,"refusal":"I can't"}],"logprobs":false,"presence_penalty":0,"frequency_penalty":0.0}"#,
        )
        .unwrap();
        let c = r.conversation().unwrap();
        assert_eq!(c.unsupported, Vec::<String>::new());
        assert_eq!(c.messages[0].parts, vec![Part::Text("I can't".into())]);
        assert_eq!(
            (c.sampling.presence_penalty, c.sampling.frequency_penalty),
            (None, None)
        );
    }

    #[test]
    fn bad_shapes_are_the_callers_errors() {
        for (body, why) in [
            (r#"{"messages":[{"role":"tool","content":"x"}]}"#, "tool_call_id"),
            (r#"{"messages":[{"role":"wizard","content":"x"}]}"#, "role"),
            (
                r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}"#,
                "url",
            ),
            (
                r#"{"messages":[{"role":"assistant","tool_calls":[{"type":"function","function":{"name":"f"}}]}]}"#,
                "id",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"tool_choice":"sometimes"}"#,
                "tool_choice",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"yaml"}}"#,
                "response_format",
            ),
        ] {
            let (r, _) = conv(body).unwrap();
            let e = r.conversation().unwrap_err();
            assert!(e.contains(why), "{body}: {e}");
        }
    }

    #[test]
    fn carried_state_comes_back_out_of_tool_call_ids() {
        let id = super::super::carry::carry(
            "call_9",
            Some(&Signature {
                dialect: Dialect::Gemini,
                value: "c2lnbmF0dXJl".into(),
            }),
            &[],
        );
        let body = format!(
            r#"{{"messages":[{{"role":"assistant","tool_calls":[{{"id":"{id}","type":"function","function":{{"name":"f","arguments":"{{}}"}}}}]}},
                {{"role":"tool","tool_call_id":"{id}","content":"ok"}}]}}"#
        );
        let (r, _) = conv(&body).unwrap();
        let c = r.conversation().unwrap();
        let Part::ToolCall(call) = &c.messages[0].parts[0] else {
            panic!()
        };
        assert_eq!(call.id, "call_9");
        assert_eq!(
            call.signature.as_ref().map(|s| (s.dialect, s.value.as_ref())),
            Some((Dialect::Gemini, "c2lnbmF0dXJl"))
        );
        let Part::ToolResult(result) = &c.messages[1].parts[0] else {
            panic!()
        };
        assert_eq!(result.call_id, "call_9");
        assert_eq!(result.name.as_deref(), Some("f"));
    }
}
