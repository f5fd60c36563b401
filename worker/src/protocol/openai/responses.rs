//! OpenAI's Responses API request (`POST /v1/responses`, what the AI SDK's default OpenAI
//! provider, the OpenAI Agents SDK and Codex send): checked and weighed as it arrived, and read
//! as a conversation for any provider.
//!
//! The endpoint is stateless: nothing is stored (`store` is read as false) and
//! `previous_response_id` is refused. Clients that store by default send earlier output items back
//! as `item_reference`s: the worker's own output items carry what they hold in their ids
//! (carry.rs), so those references resolve with nothing stored; any other is refused.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::carry::{self, uncarry};
use super::chat::{MAX_MESSAGES, MAX_PARTS_IN_ALL};
use crate::protocol::conversation::{
    Conversation, Effort, Image, JsonSchema, Message, Part, Reasoning, ResponseFormat, Role, Sampling, Tool, ToolCall,
    ToolChoice, ToolResult, MAX_TOOLS,
};
use crate::protocol::json::{printable, raw, Capped, Object, Text, Weight};

/// What an image or file part is counted as, in bytes of text (about 1,500 tokens).
const BYTES_PER_MEDIUM: usize = super::chat::CHARS_PER_MEDIA_PART;

/// Fields read by the worker, or asking nothing of the model.
const CONSUMED: &[&str] = &[
    "model",
    "input",
    "user",
    "stream",
    "store",
    "metadata",
    "prompt_cache_key",
    "safety_identifier",
    "include",
    "stream_options",
];

/// Fields the model carries.
const CARRIED: &[&str] = &[
    "instructions",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "text",
    "max_output_tokens",
    "reasoning",
    "temperature",
    "top_p",
];

/// A Responses request as an app sent it.
#[derive(Debug, Clone)]
pub struct ResponsesRequest {
    body: Object,
    model: Option<String>,
    user: Option<String>,
    stream: bool,
    max_tokens: Option<u64>,
    effort: Option<Effort>,
    weight: Weight,
}

#[derive(Deserialize)]
struct ReasoningIn {
    #[serde(default)]
    effort: Option<String>,
}

impl ResponsesRequest {
    /// Checks the shape the worker relies on; the error is the caller's (HTTP 400).
    pub fn parse(bytes: Bytes) -> Result<ResponsesRequest, String> {
        let body = Object::parse(bytes)?;
        if !body.has("input") {
            return Err("`input` (a string or a list of items) is required".into());
        }
        if body.get("previous_response_id").is_some_and(|v| v != "null") {
            return Err(
                "`previous_response_id`: this endpoint stores no responses; send the whole conversation as `input`"
                    .into(),
            );
        }
        let mut weight = Weight::of(&body, "input")?;
        for f in ["instructions", "tools", "text"] {
            weight.add(Weight::of(&body, f)?);
        }
        if weight.items > MAX_PARTS_IN_ALL + MAX_MESSAGES {
            return Err(format!(
                "the request holds {} list items; at most {} are allowed",
                weight.items,
                MAX_PARTS_IN_ALL + MAX_MESSAGES
            ));
        }
        let model: Option<String> = body
            .value("model")
            .map_err(|_| "`model` must be a string".to_string())?;
        let user: Option<String> = body.value("user").map_err(|_| "`user` must be a string".to_string())?;
        let stream: Option<bool> = body
            .value("stream")
            .map_err(|_| "`stream` must be true or false".to_string())?;
        let max_tokens: Option<u64> = body
            .value("max_output_tokens")
            .map_err(|_| "`max_output_tokens` must be a positive integer".to_string())?;
        let reasoning: Option<ReasoningIn> = body.value("reasoning")?;
        let effort = match reasoning.and_then(|r| r.effort) {
            None => None,
            Some(e) => Some(Effort::parse(&e).ok_or_else(|| {
                "`reasoning.effort` must be one of none, minimal, low, medium, high, xhigh".to_string()
            })?),
        };
        Ok(ResponsesRequest {
            model,
            user: user.filter(|u| !u.is_empty()),
            stream: stream.unwrap_or(false),
            max_tokens,
            effort,
            weight,
            body,
        })
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

    pub fn max_tokens(&self) -> Option<u64> {
        self.max_tokens
    }

    /// The output cap when the app set none: the default and the effort's thinking budget.
    pub fn default_output_cap(&self, default_max_tokens: u32) -> u64 {
        default_max_tokens as u64 + self.effort.map_or(0, Effort::budget_tokens)
    }

    /// Prompt tokens: four bytes of text a token, media about 1,500 each.
    pub fn estimate_prompt_tokens(&self) -> i64 {
        let bytes = self.weight.text_bytes + self.weight.media * BYTES_PER_MEDIUM;
        (bytes as i64 + 3) / 4 + 4 * self.weight.items as i64
    }

    pub fn estimate_completion_tokens(&self, default_max_tokens: u32) -> i64 {
        self.max_tokens
            .unwrap_or_else(|| self.default_output_cap(default_max_tokens))
            .min(1_000_000) as i64
    }

    /// The request as a conversation (strings borrowed from the body). The error is the
    /// caller's.
    pub fn conversation(&self) -> Result<Conversation<'_>, String> {
        let b = &self.body;
        let mut c = Conversation {
            max_output_tokens: self.max_tokens,
            choices: 1,
            reasoning: self.effort,
            ..Conversation::default()
        };
        for name in b.names() {
            let asks = !matches!(b.get(name), Some("null" | "false"));
            if !CONSUMED.contains(&name) && !CARRIED.contains(&name) && asks {
                c.unsupported.push(printable(name));
            }
        }
        if let Some(instructions) = b.borrowed::<Text<'_>>("instructions")? {
            c.system.push(instructions.0);
        }
        let input: InputIn<'_> = b
            .borrowed("input")?
            .ok_or_else(|| "`input` (a string or a list of items) is required".to_string())?;
        for item in input.0 {
            match item {
                ItemIn::Message {
                    role,
                    parts,
                    unsupported,
                } => {
                    c.unsupported.extend(unsupported);
                    match role {
                        RoleIn::System => c.system.extend(parts.into_iter().filter_map(|p| match p {
                            Part::Text(t) => Some(t),
                            _ => None,
                        })),
                        RoleIn::User => push(&mut c.messages, Role::User, parts),
                        RoleIn::Assistant => push(&mut c.messages, Role::Assistant, parts),
                    }
                }
                ItemIn::Call(call, reasoning) => {
                    let mut parts: Vec<Part<'_>> = reasoning.into_iter().map(Part::Reasoning).collect();
                    parts.push(Part::ToolCall(call));
                    push(&mut c.messages, Role::Assistant, parts);
                }
                ItemIn::Output(result) => push(&mut c.messages, Role::User, vec![Part::ToolResult(result)]),
                ItemIn::Reasoning(blocks) => push(
                    &mut c.messages,
                    Role::Assistant,
                    blocks.into_iter().map(Part::Reasoning).collect(),
                ),
                ItemIn::Unsupported(what) => c.unsupported.push(what),
            }
        }
        c.name_tool_results();

        let number =
            |f: &str| -> Result<Option<f64>, String> { b.value(f).map_err(|_| format!("`{f}` must be a number")) };
        c.sampling = Sampling {
            temperature: number("temperature")?,
            top_p: number("top_p")?,
            ..Sampling::default()
        };
        let tools: Option<Capped<ToolIn<'_>, MAX_TOOLS>> = b.borrowed("tools")?;
        for (i, t) in tools.map(|t| t.0).unwrap_or_default().into_iter().enumerate() {
            match t {
                ToolIn::Function(tool) => c.tools.push(tool),
                ToolIn::Other(kind) => c.unsupported.push(format!("tools[{i}] of type \"{kind}\"")),
            }
        }
        if let Some(choice) = b.borrowed::<ChoiceIn<'_>>("tool_choice")? {
            match choice {
                ChoiceIn::Choice(choice) => c.tool_choice = choice,
                ChoiceIn::Other(what) => c.unsupported.push(format!("tool_choice {what}")),
            }
        }
        c.parallel_tool_calls = b
            .value("parallel_tool_calls")
            .map_err(|_| "`parallel_tool_calls` must be true or false".to_string())?;
        if let Some(text) = b.borrowed::<TextIn<'_>>("text")? {
            c.response_format = text.format;
            c.unsupported
                .extend(text.unsupported.into_iter().map(|f| format!("text.{f}")));
        }
        Ok(c)
    }
}

/// Appends `parts` to the conversation: to the last message when it has the same role (a turn's
/// calls, its reasoning and its text are one assistant message; a step's results one user
/// message), else as a new message.
fn push<'a>(messages: &mut Vec<Message<'a>>, role: Role, parts: Vec<Part<'a>>) {
    match messages.last_mut() {
        Some(last)
            if last.role == role && (role == Role::Assistant || is_results(last) == is_results_parts(&parts)) =>
        {
            last.parts.extend(parts)
        }
        _ => messages.push(Message { role, parts }),
    }
}

fn is_results(m: &Message<'_>) -> bool {
    is_results_parts(&m.parts)
}

fn is_results_parts(parts: &[Part<'_>]) -> bool {
    !parts.is_empty() && parts.iter().all(|p| matches!(p, Part::ToolResult(_)))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RoleIn {
    System,
    User,
    Assistant,
}

/// One item of `input`.
enum ItemIn<'a> {
    Message {
        role: RoleIn,
        parts: Vec<Part<'a>>,
        unsupported: Vec<String>,
    },
    /// A function call, with the signed reasoning that rode in its id.
    Call(ToolCall<'a>, Vec<Reasoning<'static>>),
    Output(ToolResult<'a>),
    Reasoning(Vec<Reasoning<'static>>),
    Unsupported(String),
}

/// `input`: a string (one user message) or items.
struct InputIn<'a>(Vec<ItemIn<'a>>);

impl<'de> Deserialize<'de> for InputIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = InputIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`input` as a string or a list of items")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(InputIn(vec![ItemIn::Message {
                    role: RoleIn::User,
                    parts: vec![Part::Text(Cow::Borrowed(v))],
                    unsupported: Vec::new(),
                }]))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(InputIn(vec![ItemIn::Message {
                    role: RoleIn::User,
                    parts: vec![Part::Text(Cow::Owned(v.to_string()))],
                    unsupported: Vec::new(),
                }]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                let items: Capped<ItemIn<'de>, MAX_MESSAGES> =
                    Deserialize::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
                Ok(InputIn(items.0))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for ItemIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ItemIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an input item object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut kind: Option<Cow<'de, str>> = None;
                let mut role: Option<Cow<'de, str>> = None;
                let mut content: Option<ContentIn<'de>> = None;
                let (mut call_id, mut name, mut arguments, mut id) = (None, None, None, None);
                let mut output: Option<ContentIn<'de>> = None;
                let mut encrypted: Option<Cow<'de, str>> = None;
                let mut unknown: Option<String> = None;
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "type" => kind = Some(map.next_value::<Text<'de>>()?.0),
                        "role" => role = Some(map.next_value::<Text<'de>>()?.0),
                        "content" => content = Some(map.next_value()?),
                        "call_id" => call_id = Some(map.next_value::<Text<'de>>()?.0),
                        "name" => name = Some(map.next_value::<Text<'de>>()?.0),
                        "arguments" => arguments = Some(map.next_value::<Text<'de>>()?.0),
                        "id" => id = map.next_value::<Option<Text<'de>>>()?.map(|t| t.0),
                        "output" => output = Some(map.next_value()?),
                        "encrypted_content" => encrypted = map.next_value::<Option<Text<'de>>>()?.map(|t| t.0),
                        // What the client knows of an item's progress, and a reasoning item's
                        // shown summary: the item itself is what is carried.
                        "status" | "summary" | "phase" => {
                            map.next_value::<IgnoredAny>()?;
                        }
                        other => {
                            if map.next_value::<Option<IgnoredAny>>()?.is_some() && unknown.is_none() {
                                unknown = Some(printable(other));
                            }
                        }
                    }
                }
                let item = match kind.as_deref() {
                    None | Some("message") => {
                        let role = match role.as_deref() {
                            Some("user") => RoleIn::User,
                            Some("assistant") => RoleIn::Assistant,
                            Some("system" | "developer") => RoleIn::System,
                            Some(other) => {
                                return Err(de::Error::custom(format!(
                                    "an input message's role must be user, assistant, system or developer; not \"{}\"",
                                    printable(other)
                                )))
                            }
                            None => return Err(de::Error::custom("an input message has no `role`")),
                        };
                        let content = content.ok_or_else(|| de::Error::custom("an input message has no `content`"))?;
                        let mut unsupported = content.unsupported;
                        unsupported.extend(unknown.map(|f| format!("input message field `{f}`")));
                        ItemIn::Message {
                            role,
                            parts: content.parts,
                            unsupported,
                        }
                    }
                    Some("function_call") => {
                        let call_id =
                            call_id.ok_or_else(|| de::Error::custom("a function_call item has no `call_id`"))?;
                        let (call_id, carried) = uncarry(&call_id);
                        let arguments = arguments
                            .filter(|a| !a.trim().is_empty())
                            .unwrap_or(Cow::Borrowed("{}"));
                        ItemIn::Call(
                            ToolCall {
                                id: call_id,
                                name: name.ok_or_else(|| de::Error::custom("a function_call item has no `name`"))?,
                                arguments,
                                signature: carried.signature,
                            },
                            carried.reasoning,
                        )
                    }
                    Some("function_call_output") => {
                        let call_id =
                            call_id.ok_or_else(|| de::Error::custom("a function_call_output item has no `call_id`"))?;
                        let output =
                            output.ok_or_else(|| de::Error::custom("a function_call_output item has no `output`"))?;
                        if let Some(what) = output.unsupported.into_iter().next() {
                            ItemIn::Unsupported(format!("function_call_output {what}"))
                        } else {
                            ItemIn::Output(ToolResult {
                                call_id: carry::base_id(&call_id),
                                name: None,
                                content: output.parts,
                                is_error: false,
                            })
                        }
                    }
                    Some("reasoning") => {
                        // Reasoning the worker showed carries its blocks (in its id and as its
                        // encrypted content); another's (OpenAI's own) means nothing to others.
                        let blocks = encrypted.as_deref().and_then(carry::reasoning_from).or_else(|| {
                            id.as_deref()
                                .and_then(|id| carry::item_content("rs", id))
                                .and_then(|t| carry::reasoning_from(&t))
                        });
                        ItemIn::Reasoning(blocks.unwrap_or_default())
                    }
                    Some("item_reference") => {
                        let id = id.ok_or_else(|| de::Error::custom("an item_reference has no `id`"))?;
                        if let Some(text) = carry::item_content("msg", &id) {
                            ItemIn::Message {
                                role: RoleIn::Assistant,
                                parts: vec![Part::Text(Cow::Owned(text))],
                                unsupported: Vec::new(),
                            }
                        } else if let Some(blocks) =
                            carry::item_content("rs", &id).and_then(|t| carry::reasoning_from(&t))
                        {
                            ItemIn::Reasoning(blocks)
                        } else {
                            ItemIn::Unsupported(
                                "item_reference to an item this endpoint did not make (it stores nothing: send the item itself)"
                                    .into(),
                            )
                        }
                    }
                    Some(other) => ItemIn::Unsupported(format!("input item of type \"{}\"", printable(other))),
                };
                Ok(item)
            }
        }
        d.deserialize_map(V)
    }
}

/// A message's `content` or a call's `output`: a string, or parts.
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
                f.write_str("a string or a list of content parts")
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
                let list: Capped<PartIn<'de>, { super::chat::MAX_PARTS }> =
                    Deserialize::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
                let mut c = ContentIn {
                    parts: Vec::new(),
                    unsupported: Vec::new(),
                };
                for p in list.0 {
                    match p {
                        PartIn::Part(p) => c.parts.push(p),
                        PartIn::Other(what) => c.unsupported.push(what),
                    }
                }
                Ok(c)
            }
        }
        d.deserialize_any(V)
    }
}

enum PartIn<'a> {
    Part(Part<'a>),
    Other(String),
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
                        "text" | "refusal" => text = Some(map.next_value::<Text<'de>>()?.0),
                        "image_url" => url = map.next_value::<Option<Text<'de>>>()?.map(|t| t.0),
                        // How many tokens an image costs; an answer's citations and log
                        // probabilities (of text the assistant said before).
                        "detail" | "annotations" | "logprobs" => {
                            map.next_value::<IgnoredAny>()?;
                        }
                        other => {
                            if map.next_value::<Option<IgnoredAny>>()?.is_some() && unknown.is_none() {
                                unknown = Some(printable(other));
                            }
                        }
                    }
                }
                let kind = kind.ok_or_else(|| de::Error::custom("a content part has no `type`"))?;
                if let Some(field) = unknown {
                    return Ok(PartIn::Other(format!("content part field `{field}`")));
                }
                match kind.as_ref() {
                    "input_text" | "output_text" | "refusal" | "text" => {
                        Ok(PartIn::Part(Part::Text(text.unwrap_or_default())))
                    }
                    "input_image" => match url {
                        Some(url) if !url.is_empty() => Ok(PartIn::Part(Part::Image(Image::from_url(url)))),
                        _ => Ok(PartIn::Other(
                            "input_image without an image_url (a file_id needs OpenAI's storage)".into(),
                        )),
                    },
                    other => Ok(PartIn::Other(format!("content part of type \"{}\"", printable(other)))),
                }
            }
        }
        d.deserialize_map(V)
    }
}

/// A tool: `{"type": "function", "name", "description", "parameters", "strict"}`.
enum ToolIn<'a> {
    Function(Tool<'a>),
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
                let (mut kind, mut name, mut description, mut parameters, mut strict) = (None, None, None, None, false);
                let mut unknown: Option<String> = None;
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "type" => kind = Some(map.next_value::<Text<'de>>()?.0),
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
                            if map.next_value::<Option<IgnoredAny>>()?.is_some() && unknown.is_none() {
                                unknown = Some(printable(other));
                            }
                        }
                    }
                }
                let kind = kind.ok_or_else(|| de::Error::custom("a tool has no `type`"))?;
                if kind != "function" {
                    return Ok(ToolIn::Other(printable(&kind)));
                }
                if let Some(field) = unknown {
                    return Ok(ToolIn::Other(format!("function with the field `{field}`")));
                }
                Ok(ToolIn::Function(Tool {
                    name: name.ok_or_else(|| de::Error::custom("a function tool has no `name`"))?,
                    description,
                    parameters,
                    strict,
                }))
            }
        }
        d.deserialize_map(V)
    }
}

/// `tool_choice`: `"auto" | "none" | "required"` or `{"type": "function", "name"}`.
enum ChoiceIn<'a> {
    Choice(ToolChoice<'a>),
    Other(String),
}

impl<'de> Deserialize<'de> for ChoiceIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ChoiceIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`tool_choice` as \"auto\", \"none\", \"required\" or a function object")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ChoiceIn::Choice(match v {
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
                let (mut kind, mut name) = (None, None);
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "type" => kind = Some(map.next_value::<Text<'de>>()?.0),
                        "name" => name = Some(map.next_value::<Text<'de>>()?.0),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                match (kind.as_deref(), name) {
                    (Some("function"), Some(n)) => Ok(ChoiceIn::Choice(ToolChoice::Named(n))),
                    (kind, _) => Ok(ChoiceIn::Other(format!(
                        "of type \"{}\"",
                        printable(kind.unwrap_or(""))
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `text`: `{"format": {...}}`.
struct TextIn<'a> {
    format: ResponseFormat<'a>,
    unsupported: Vec<String>,
}

impl<'de> Deserialize<'de> for TextIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TextIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`text` as an object with a `format`")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut t = TextIn {
                    format: ResponseFormat::Text,
                    unsupported: Vec::new(),
                };
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "format" => t.format = map.next_value::<FormatIn<'de>>()?.0,
                        other => {
                            if map.next_value::<Option<IgnoredAny>>()?.is_some() {
                                t.unsupported.push(printable(other));
                            }
                        }
                    }
                }
                Ok(t)
            }
        }
        d.deserialize_map(V)
    }
}

/// `text.format`: `{"type": "text" | "json_object"}` or `{"type": "json_schema", "name",
/// "schema", "strict", "description"}`.
struct FormatIn<'a>(ResponseFormat<'a>);

impl<'de> Deserialize<'de> for FormatIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FormatIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`text.format` as an object with a `type`")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut kind, mut name, mut description, mut schema, mut strict) = (None, None, None, None, false);
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "type" => kind = Some(map.next_value::<Text<'de>>()?.0),
                        "name" => name = Some(map.next_value::<Text<'de>>()?.0),
                        "description" => description = map.next_value::<Option<Text<'de>>>()?.map(|t| t.0),
                        "schema" => schema = Some(raw(&mut map)?),
                        "strict" => strict = map.next_value::<Option<bool>>()?.unwrap_or(false),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(FormatIn(match kind.as_deref() {
                    Some("text") => ResponseFormat::Text,
                    Some("json_object") => ResponseFormat::JsonObject,
                    Some("json_schema") => ResponseFormat::JsonSchema(JsonSchema {
                        name: name.unwrap_or(Cow::Borrowed("response")),
                        description,
                        schema: schema
                            .ok_or_else(|| de::Error::custom("`text.format` of type json_schema has no `schema`"))?,
                        strict,
                    }),
                    _ => {
                        return Err(de::Error::custom(
                            "`text.format.type` must be \"text\", \"json_object\" or \"json_schema\"",
                        ))
                    }
                }))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::conversation::{Dialect, Signature};

    fn req(body: &str) -> Result<ResponsesRequest, String> {
        ResponsesRequest::parse(Bytes::copy_from_slice(body.as_bytes()))
    }

    #[test]
    fn a_string_or_items_become_the_conversation() {
        let r = req(r#"{"model":"chat","input":"hi","instructions":"be brief","max_output_tokens":50,"reasoning":{"effort":"low"},"store":true}"#)
            .unwrap();
        let c = r.conversation().unwrap();
        assert_eq!(c.system, vec!["be brief"]);
        assert_eq!(c.messages[0].parts, vec![Part::Text("hi".into())]);
        assert_eq!((c.max_output_tokens, c.reasoning), (Some(50), Some(Effort::Low)));
        assert!(c.unsupported.is_empty(), "{:?}", c.unsupported);

        let call_id = carry::carry(
            "call_1",
            Some(&Signature {
                dialect: Dialect::Gemini,
                value: "SIG".into(),
            }),
            &[],
        );
        let text_id = carry::item_id("msg", "Let me check.");
        let body = format!(
            r#"{{"model":"chat","input":[
                {{"role":"user","content":[{{"type":"input_text","text":"weather?"}},{{"type":"input_image","image_url":"data:image/png;base64,AA","detail":"auto"}}]}},
                {{"type":"item_reference","id":"{text_id}"}},
                {{"type":"function_call","call_id":"{call_id}","name":"weather","arguments":"{{\"city\":\"Oslo\"}}","id":"fc_1","status":"completed"}},
                {{"type":"function_call_output","call_id":"{call_id}","output":"sunny"}},
                {{"type":"message","role":"user","content":"thanks"}}],
              "tools":[{{"type":"function","name":"weather","parameters":{{"type":"object"}},"strict":true}}],
              "tool_choice":{{"type":"function","name":"weather"}},
              "text":{{"format":{{"type":"json_schema","name":"o","schema":{{"type":"object"}},"strict":true}}}}}}"#
        );
        let r = req(&body).unwrap();
        let c = r.conversation().unwrap();
        assert!(c.unsupported.is_empty(), "{:?}", c.unsupported);
        assert_eq!(c.messages.len(), 4, "{:?}", c.messages);
        assert!(matches!(&c.messages[0].parts[1], Part::Image(Image::Data { .. })));
        assert_eq!(c.messages[1].role, Role::Assistant);
        assert_eq!(c.messages[1].parts[0], Part::Text("Let me check.".into()));
        let Part::ToolCall(call) = &c.messages[1].parts[1] else {
            panic!("{:?}", c.messages[1])
        };
        assert_eq!(
            (call.id.as_ref(), call.signature.as_ref().map(|s| s.value.as_ref())),
            ("call_1", Some("SIG"))
        );
        let Part::ToolResult(result) = &c.messages[2].parts[0] else {
            panic!()
        };
        assert_eq!(
            (result.call_id.as_ref(), result.name.as_deref(), result.text()),
            ("call_1", Some("weather"), "sunny".to_string())
        );
        assert_eq!(c.messages[3].parts, vec![Part::Text("thanks".into())]);
        assert_eq!(c.tool_choice, ToolChoice::Named("weather".into()));
        assert!(matches!(c.response_format, ResponseFormat::JsonSchema(ref s) if s.name == "o" && s.strict));
        assert!(r.estimate_prompt_tokens() > 1500);
    }

    #[test]
    fn what_cannot_be_carried_or_kept_is_named() {
        assert!(req(r#"{"input":"x","previous_response_id":"resp_1"}"#)
            .unwrap_err()
            .contains("previous_response_id"));
        assert!(req(r#"{"model":"m"}"#).unwrap_err().contains("input"));
        let r = req(
            r#"{"input":[{"type":"item_reference","id":"msg_abc"},{"type":"web_search_call","id":"ws"}],
                "tools":[{"type":"web_search"}],"truncation":"auto","text":{"verbosity":"low"}}"#,
        )
        .unwrap();
        let c = r.conversation().unwrap();
        assert_eq!(
            c.unsupported,
            vec![
                "truncation".to_string(),
                "item_reference to an item this endpoint did not make (it stores nothing: send the item itself)".into(),
                "input item of type \"web_search_call\"".into(),
                "tools[0] of type \"web_search\"".into(),
                "text.verbosity".into(),
            ]
        );
    }
}
