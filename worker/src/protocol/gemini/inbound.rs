//! Gemini's own request as an app sent it (`POST /v1beta/models/{model}:generateContent` and
//! `:streamGenerateContent`, what Google's SDKs send): checked and weighed as it arrived, passed
//! through to Gemini keys, and read as a conversation for any other provider.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use crate::protocol::conversation::{
    Conversation, Dialect, Effort, Image, JsonSchema, Message, Part, ResponseFormat, Role, Sampling, Signature, Tool,
    ToolCall, ToolChoice, ToolResult, MAX_TOOLS,
};
use crate::protocol::json::{printable, raw, Capped, Object, Text, Weight};
use crate::protocol::openai::carry;
use crate::protocol::openai::chat::{CHARS_PER_MEDIA_PART, MAX_MESSAGES, MAX_PARTS, MAX_PARTS_IN_ALL, MAX_STOP};

/// Fields the model carries.
const CARRIED: &[&str] = &[
    "contents",
    "systemInstruction",
    "tools",
    "toolConfig",
    "generationConfig",
];

/// A `generateContent` request as an app sent it; the model is the URL's.
#[derive(Debug, Clone)]
pub struct GeminiRequest {
    body: Object,
    model: String,
    stream: bool,
    max_tokens: Option<u64>,
    choices: u64,
    effort: Option<Effort>,
    /// Whether the app asked to be shown the model's thoughts (Gemini keys only).
    include_thoughts: bool,
    weight: Weight,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ConfigHead {
    #[serde(default, alias = "max_output_tokens")]
    max_output_tokens: Option<u64>,
    #[serde(default, alias = "candidate_count")]
    candidate_count: Option<u64>,
    #[serde(default, alias = "thinking_config")]
    thinking_config: Option<ThinkingIn>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ThinkingIn {
    #[serde(default, alias = "thinking_budget")]
    thinking_budget: Option<i64>,
    #[serde(default, alias = "thinking_level")]
    thinking_level: Option<String>,
    #[serde(default, alias = "include_thoughts")]
    include_thoughts: Option<bool>,
}

/// Tools Google runs itself and bills per use (search, maps, URL fetching, code execution, file
/// search ...): a cost the pool's budgets and shares do not count, so none is carried. Only
/// function declarations are.
const PRICED_TOOL_MESSAGE: &str = "is run and billed by Google per use, which the pool's budgets and shares do not count: only `functionDeclarations` are carried";

/// What of a request the worker refuses before any provider sees it, whichever key serves it:
/// Google's own tools, cached contents and file references (data stored in the key owner's
/// project, or fetched from an address the worker cannot weigh), and a member written both in
/// camelCase and in snake_case (which of the two a reader takes is not defined).
fn refuse_uncounted(body: &Object) -> Result<(), String> {
    use std::collections::HashMap;
    for name in body.names() {
        if name.contains('_') && body.has(&camel(name)) {
            return Err(format!(
                "`{}` and `{}` are the same member: send one",
                printable(name),
                printable(&camel(name))
            ));
        }
    }
    for name in ["cachedContent", "cached_content"] {
        if matches!(body.get(name), Some(v) if v != "null") {
            return Err(format!(
                "`{name}` names contents cached in the key owner's project: not carried through the pool"
            ));
        }
    }
    let tools: Option<Vec<HashMap<String, IgnoredAny>>> = body.value("tools")?;
    for (i, tool) in tools.unwrap_or_default().iter().enumerate() {
        if let Some(other) = tool.keys().find(|k| camel(k) != "functionDeclarations") {
            return Err(format!("`tools[{i}].{}` {PRICED_TOOL_MESSAGE}", printable(other)));
        }
    }
    #[derive(Deserialize)]
    struct ContentKeys {
        #[serde(default)]
        parts: Option<Vec<HashMap<String, IgnoredAny>>>,
    }
    let contents: Option<Vec<ContentKeys>> = body.value("contents")?;
    for (i, c) in contents.unwrap_or_default().iter().enumerate() {
        for (j, part) in c.parts.iter().flatten().enumerate() {
            if part.keys().any(|k| camel(k) == "fileData") {
                return Err(format!(
                    "`contents[{i}].parts[{j}].fileData` refers to a file stored with the key owner or at an address: send the data inline (`inlineData`)"
                ));
            }
        }
    }
    Ok(())
}

/// A member's name as Gemini's protobuf JSON writes it: camelCase, though snake_case is read as
/// well (Google's SDKs send either).
fn camel(name: &str) -> Cow<'_, str> {
    if !name.contains('_') {
        return Cow::Borrowed(name);
    }
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// The name under which `body` holds the member `camel_name` (its camelCase or snake_case form).
fn member<'n>(body: &Object, camel_name: &'n str) -> &'n str {
    if body.has(camel_name) {
        return camel_name;
    }
    match camel_name {
        "systemInstruction" if body.has("system_instruction") => "system_instruction",
        "toolConfig" if body.has("tool_config") => "tool_config",
        "generationConfig" if body.has("generation_config") => "generation_config",
        _ => camel_name,
    }
}

impl GeminiRequest {
    /// Checks the shape the worker relies on; the error is the caller's (HTTP 400).
    pub fn parse(model: &str, stream: bool, bytes: Bytes) -> Result<GeminiRequest, String> {
        let body = Object::parse(bytes)?;
        if !body.has("contents") {
            return Err("`contents` is required".into());
        }
        let mut weight = Weight::of(&body, "contents")?;
        for f in ["systemInstruction", "tools"] {
            weight.add(Weight::of(&body, member(&body, f))?);
        }
        if weight.items > MAX_PARTS_IN_ALL + MAX_MESSAGES {
            return Err(format!(
                "the request holds {} list items; at most {} are allowed",
                weight.items,
                MAX_PARTS_IN_ALL + MAX_MESSAGES
            ));
        }
        refuse_uncounted(&body)?;
        let config: ConfigHead = body.value(member(&body, "generationConfig"))?.unwrap_or_default();
        if config.max_output_tokens == Some(0) {
            return Err("`generationConfig.maxOutputTokens` must be at least 1".into());
        }
        let choices = config.candidate_count.unwrap_or(1);
        if !(1..=8).contains(&choices) {
            return Err("`generationConfig.candidateCount` must be from 1 to 8".into());
        }
        let include_thoughts = config
            .thinking_config
            .as_ref()
            .and_then(|t| t.include_thoughts)
            .unwrap_or(false);
        if let Some(level) = config
            .thinking_config
            .as_ref()
            .and_then(|t| t.thinking_level.as_deref())
        {
            let level = level.to_ascii_lowercase();
            if level != "thinking_level_unspecified" && Effort::parse(&level).is_none() {
                return Err(format!(
                    "`generationConfig.thinkingConfig.thinkingLevel` \"{}\" is not a level (MINIMAL, LOW, MEDIUM, HIGH)",
                    printable(&level)
                ));
            }
        }
        let effort = config
            .thinking_config
            .and_then(|t| match (t.thinking_level.as_deref(), t.thinking_budget) {
                (Some(level), _) => Effort::parse(&level.to_ascii_lowercase()),
                (None, Some(0)) => Some(Effort::None),
                (None, Some(b)) if b < 0 => Some(Effort::Medium),
                (None, Some(b)) => Some(match b {
                    1..=512 => Effort::Minimal,
                    513..=1_024 => Effort::Low,
                    1_025..=8_192 => Effort::Medium,
                    8_193..=24_576 => Effort::High,
                    _ => Effort::XHigh,
                }),
                (None, None) => None,
            });
        Ok(GeminiRequest {
            model: model.to_string(),
            stream,
            max_tokens: config.max_output_tokens,
            choices,
            effort,
            include_thoughts,
            weight,
            body,
        })
    }

    pub fn body(&self) -> &Object {
        &self.body
    }

    /// The model the URL names.
    pub fn model(&self) -> Option<&str> {
        Some(&self.model)
    }

    pub fn stream(&self) -> bool {
        self.stream
    }

    pub fn max_tokens(&self) -> Option<u64> {
        self.max_tokens
    }

    pub fn default_output_cap(&self, default_max_tokens: u32) -> u64 {
        default_max_tokens as u64 + self.effort.map_or(0, Effort::budget_tokens)
    }

    pub fn estimate_prompt_tokens(&self) -> i64 {
        let bytes = self.weight.text_bytes + self.weight.media * CHARS_PER_MEDIA_PART;
        (bytes as i64 + 3) / 4 + 4 * self.weight.items as i64
    }

    pub fn estimate_tokens(&self, default_max_tokens: u32) -> i64 {
        let per_choice = self
            .max_tokens
            .unwrap_or_else(|| self.default_output_cap(default_max_tokens))
            .min(1_000_000);
        self.estimate_prompt_tokens() + (per_choice * self.choices) as i64
    }

    /// The request as a conversation. The error is the caller's.
    pub fn conversation(&self) -> Result<Conversation<'_>, String> {
        let b = &self.body;
        let mut c = Conversation {
            max_output_tokens: self.max_tokens,
            choices: self.choices,
            reasoning: self.effort,
            ..Conversation::default()
        };
        for name in b.names() {
            let asks = !matches!(b.get(name), Some("null" | "false" | "[]"));
            if !CARRIED.contains(&camel(name).as_ref()) && asks {
                c.unsupported.push(printable(name));
            }
        }
        if self.include_thoughts {
            c.unsupported.push(
                "generationConfig.thinkingConfig.includeThoughts (thoughts are shown by Gemini keys only)".into(),
            );
        }
        if let Some(system) = b.borrowed::<ContentIn<'_>>(member(b, "systemInstruction"))? {
            for p in system.parts {
                match p {
                    Part::Text(t) => c.system.push(t),
                    _ => c.unsupported.push("systemInstruction parts that are not text".into()),
                }
            }
            c.unsupported
                .extend(system.unsupported.into_iter().map(|u| format!("systemInstruction {u}")));
        }
        let contents: Capped<ContentIn<'_>, MAX_MESSAGES> = b.borrowed("contents")?.unwrap_or_default();
        for (i, content) in contents.0.into_iter().enumerate() {
            c.unsupported
                .extend(content.unsupported.into_iter().map(|u| format!("contents[{i}] {u}")));
            c.messages.push(Message {
                role: content.role,
                parts: content.parts,
            });
        }
        let tools: Option<Capped<ToolsIn<'_>, MAX_TOOLS>> = b.borrowed("tools")?;
        for t in tools.map(|t| t.0).unwrap_or_default() {
            c.tools.extend(t.declarations);
            c.unsupported
                .extend(t.unsupported.into_iter().map(|u| format!("tools {u}")));
        }
        if let Some(config) = b.borrowed::<ToolConfigIn<'_>>(member(b, "toolConfig"))? {
            c.tool_choice = config.choice;
            c.unsupported.extend(config.unsupported);
        }
        if let Some(g) = b.borrowed::<GenerationIn<'_>>(member(b, "generationConfig"))? {
            c.sampling = g.sampling;
            c.response_format = g.format;
            c.unsupported
                .extend(g.unsupported.into_iter().map(|u| format!("generationConfig.{u}")));
        }
        c.name_tool_results();
        Ok(c)
    }
}

/// One content (`{role, parts}`), or the system instruction.
struct ContentIn<'a> {
    role: Role,
    parts: Vec<Part<'a>>,
    unsupported: Vec<String>,
}

impl<'de> Deserialize<'de> for ContentIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ContentIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a content object with `parts`")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut c = ContentIn {
                    role: Role::User,
                    parts: Vec::new(),
                    unsupported: Vec::new(),
                };
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match camel(&key).as_ref() {
                        "role" => {
                            c.role = match map.next_value::<Text<'de>>()?.0.as_ref() {
                                "model" => Role::Assistant,
                                "user" | "function" => Role::User,
                                other => {
                                    return Err(de::Error::custom(format!(
                                        "a content's role must be \"user\" or \"model\", not \"{}\"",
                                        printable(other)
                                    )))
                                }
                            }
                        }
                        "parts" => {
                            let parts: Capped<PartIn<'de>, MAX_PARTS> = map.next_value()?;
                            for p in parts.0 {
                                match p {
                                    PartIn::Parts(ps) => c.parts.extend(ps),
                                    PartIn::Other(what) => c.unsupported.push(what),
                                }
                            }
                        }
                        other => {
                            if map.next_value::<Option<IgnoredAny>>()?.is_some() {
                                c.unsupported.push(format!("field `{}`", printable(other)));
                            }
                        }
                    }
                }
                Ok(c)
            }
        }
        d.deserialize_map(V)
    }
}

/// A part: text (or a thought), inline data, a function call with its signature, a function
/// response; a thought's signature on a text part is kept with it as signed reasoning.
enum PartIn<'a> {
    Parts(Vec<Part<'a>>),
    Other(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InlineIn<'a> {
    #[serde(borrow, alias = "mime_type")]
    mime_type: Cow<'a, str>,
    #[serde(borrow)]
    data: Cow<'a, str>,
}

impl<'de> Deserialize<'de> for PartIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PartIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a part object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut text, mut thought, mut signature, mut inline) = (None, false, None, None);
                let (mut call, mut response): (Option<CallIn<'de>>, Option<ResponseIn<'de>>) = (None, None);
                let mut unknown: Option<String> = None;
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match camel(&key).as_ref() {
                        "text" => text = Some(map.next_value::<Text<'de>>()?.0),
                        "thought" => thought = map.next_value::<Option<bool>>()?.unwrap_or(false),
                        "thoughtSignature" => signature = Some(map.next_value::<Text<'de>>()?.0),
                        "inlineData" => inline = Some(map.next_value::<InlineIn<'de>>()?),
                        "functionCall" => call = Some(map.next_value()?),
                        "functionResponse" => response = Some(map.next_value()?),
                        other => {
                            if map.next_value::<Option<IgnoredAny>>()?.is_some() && unknown.is_none() {
                                unknown = Some(printable(other));
                            }
                        }
                    }
                }
                if let Some(field) = unknown {
                    return Ok(PartIn::Other(format!("part field `{field}`")));
                }
                if let Some(field) = call.as_ref().and_then(|c| c.unknown.clone()) {
                    return Ok(PartIn::Other(format!("functionCall field `{field}`")));
                }
                if let Some(field) = response.as_ref().and_then(|r| r.unknown.clone()) {
                    return Ok(PartIn::Other(format!("functionResponse field `{field}`")));
                }
                let signed = signature.map(|value| Signature {
                    dialect: Dialect::Gemini,
                    value,
                });
                let part = if let Some(call) = call {
                    let id = call.id.unwrap_or(Cow::Borrowed(""));
                    let (id, carried) = carry::uncarry(&id);
                    let mut parts: Vec<Part<'de>> = carried.reasoning.into_iter().map(Part::Reasoning).collect();
                    parts.push(Part::ToolCall(ToolCall {
                        id: if id.is_empty() { call.name.clone() } else { id },
                        name: call.name,
                        arguments: call.args.unwrap_or(Cow::Borrowed("{}")),
                        signature: signed.or(carried.signature),
                    }));
                    return Ok(PartIn::Parts(parts));
                } else if let Some(r) = response {
                    let id = r.id.clone().unwrap_or_else(|| r.name.clone());
                    Part::ToolResult(ToolResult {
                        call_id: carry::base_id(&id),
                        name: Some(r.name),
                        content: vec![Part::Text(r.text)],
                        is_error: r.is_error,
                    })
                } else if let Some(i) = inline {
                    Part::Image(Image::Data {
                        mime: i.mime_type,
                        base64: i.data,
                    })
                } else if let Some(text) = text {
                    if thought {
                        Part::Reasoning(crate::protocol::conversation::Reasoning {
                            text,
                            signature: None,
                            redacted: None,
                        })
                    } else {
                        Part::Text(text)
                    }
                } else {
                    return Ok(PartIn::Other("part with nothing the worker can carry".into()));
                };
                Ok(PartIn::Parts(vec![part]))
            }
        }
        d.deserialize_map(V)
    }
}

struct CallIn<'a> {
    id: Option<Cow<'a, str>>,
    name: Cow<'a, str>,
    args: Option<Cow<'a, str>>,
    /// A member the worker does not carry, if any.
    unknown: Option<String>,
}

impl<'de> Deserialize<'de> for CallIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CallIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a functionCall object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut id, mut name, mut args, mut unknown) = (None, None, None, None);
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match camel(&key).as_ref() {
                        "id" => id = map.next_value::<Option<Text<'de>>>()?.map(|t| t.0),
                        "name" => name = Some(map.next_value::<Text<'de>>()?.0),
                        "args" => args = Some(raw(&mut map)?),
                        other => {
                            if map.next_value::<Option<IgnoredAny>>()?.is_some() && unknown.is_none() {
                                unknown = Some(printable(other));
                            }
                        }
                    }
                }
                Ok(CallIn {
                    id,
                    name: name.ok_or_else(|| de::Error::custom("a functionCall has no `name`"))?,
                    args,
                    unknown,
                })
            }
        }
        d.deserialize_map(V)
    }
}

/// A `functionResponse`: its `response` object read as the result's text (`output` or `error`
/// when it holds one, else the whole object as JSON).
struct ResponseIn<'a> {
    id: Option<Cow<'a, str>>,
    name: Cow<'a, str>,
    text: Cow<'a, str>,
    is_error: bool,
    /// A member the worker does not carry (`parts`, `willContinue` ...), if any.
    unknown: Option<String>,
}

impl<'de> Deserialize<'de> for ResponseIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ResponseIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a functionResponse object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut id, mut name, mut response, mut unknown) = (None, None, None, None);
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match camel(&key).as_ref() {
                        "id" => id = map.next_value::<Option<Text<'de>>>()?.map(|t| t.0),
                        "name" => name = Some(map.next_value::<Text<'de>>()?.0),
                        "response" => response = Some(raw(&mut map)?),
                        other => {
                            if map.next_value::<Option<IgnoredAny>>()?.is_some() && unknown.is_none() {
                                unknown = Some(printable(other));
                            }
                        }
                    }
                }
                let response = response.unwrap_or(Cow::Borrowed("{}"));
                #[derive(Deserialize)]
                struct Shape<'a> {
                    #[serde(borrow, default)]
                    output: Option<&'a serde_json::value::RawValue>,
                    #[serde(borrow, default)]
                    error: Option<&'a serde_json::value::RawValue>,
                }
                let (text, is_error) = match serde_json::from_str::<Shape<'_>>(&response) {
                    Ok(Shape { output: Some(o), .. }) => (as_text(o.get()), false),
                    Ok(Shape { error: Some(e), .. }) => (as_text(e.get()), true),
                    _ => (response.to_string(), false),
                };
                Ok(ResponseIn {
                    id,
                    name: name.ok_or_else(|| de::Error::custom("a functionResponse has no `name`"))?,
                    text: Cow::Owned(text),
                    is_error,
                    unknown,
                })
            }
        }
        d.deserialize_map(V)
    }
}

/// A JSON value as a tool result's text: a string as itself, anything else as JSON.
fn as_text(json: &str) -> String {
    serde_json::from_str::<String>(json).unwrap_or_else(|_| json.to_string())
}

/// One entry of `tools`: its function declarations (other tools are named as unsupported).
struct ToolsIn<'a> {
    declarations: Vec<Tool<'a>>,
    unsupported: Vec<String>,
}

impl<'de> Deserialize<'de> for ToolsIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ToolsIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a tool object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut t = ToolsIn {
                    declarations: Vec::new(),
                    unsupported: Vec::new(),
                };
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match camel(&key).as_ref() {
                        "functionDeclarations" => {
                            let list: Capped<DeclarationIn<'de>, MAX_TOOLS> = map.next_value()?;
                            for decl in list.0 {
                                match decl {
                                    DeclarationIn::Tool(tool) => t.declarations.push(tool),
                                    DeclarationIn::Other(what) => t.unsupported.push(what),
                                }
                            }
                        }
                        other => {
                            if map.next_value::<Option<IgnoredAny>>()?.is_some() {
                                t.unsupported.push(format!("`{}`", printable(other)));
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

enum DeclarationIn<'a> {
    Tool(Tool<'a>),
    Other(String),
}

impl<'de> Deserialize<'de> for DeclarationIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = DeclarationIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a function declaration")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut name, mut description, mut schema) = (None, None, None);
                let mut unknown: Option<String> = None;
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match camel(&key).as_ref() {
                        "name" => name = Some(map.next_value::<Text<'de>>()?.0),
                        "description" => description = map.next_value::<Option<Text<'de>>>()?.map(|t| t.0),
                        "parametersJsonSchema" => schema = Some(raw(&mut map)?),
                        // The OpenAPI subset: uppercase type names, otherwise JSON Schema's words.
                        "parameters" => {
                            let p = raw(&mut map)?;
                            schema = Some(Cow::Owned(lowercase_types(&p)));
                        }
                        other => {
                            if map.next_value::<Option<IgnoredAny>>()?.is_some() && unknown.is_none() {
                                unknown = Some(printable(other));
                            }
                        }
                    }
                }
                if let Some(field) = unknown {
                    return Ok(DeclarationIn::Other(format!("functionDeclarations field `{field}`")));
                }
                Ok(DeclarationIn::Tool(Tool {
                    name: name.ok_or_else(|| de::Error::custom("a function declaration has no `name`"))?,
                    description,
                    parameters: schema,
                    strict: false,
                }))
            }
        }
        d.deserialize_map(V)
    }
}

/// An OpenAPI-subset schema (`"type": "OBJECT"`) with JSON Schema's type names, edited as text:
/// only the values of `"type"` members change.
fn lowercase_types(schema: &str) -> String {
    let mut out = String::with_capacity(schema.len());
    let mut rest = schema;
    const KEY: &str = "\"type\":";
    while let Some(at) = rest.find(KEY) {
        let (head, tail) = rest.split_at(at + KEY.len());
        out.push_str(head);
        let trimmed = tail.trim_start();
        out.push_str(&tail[..tail.len() - trimmed.len()]);
        match trimmed.strip_prefix('"').and_then(|t| t.find('"').map(|end| (t, end))) {
            Some((t, end)) if t[..end].chars().all(|c| c.is_ascii_alphabetic()) => {
                out.push('"');
                out.push_str(&t[..end].to_ascii_lowercase());
                rest = &t[end..];
            }
            _ => rest = trimmed,
        }
    }
    out.push_str(rest);
    out
}

struct ToolConfigIn<'a> {
    choice: ToolChoice<'a>,
    unsupported: Vec<String>,
}

impl<'de> Deserialize<'de> for ToolConfigIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        struct Calling<'a> {
            #[serde(default)]
            mode: Option<String>,
            #[serde(borrow, default, alias = "allowed_function_names")]
            allowed_function_names: Option<Vec<Cow<'a, str>>>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Config<'a> {
            #[serde(borrow, default, alias = "function_calling_config")]
            function_calling_config: Option<Calling<'a>>,
            #[serde(default, alias = "retrieval_config")]
            retrieval_config: Option<IgnoredAny>,
        }
        let c: Config<'de> = Config::deserialize(d)?;
        let mut unsupported = Vec::new();
        if c.retrieval_config.is_some() {
            unsupported.push("toolConfig.retrievalConfig".into());
        }
        let calling = c.function_calling_config;
        let mode = calling
            .as_ref()
            .and_then(|c| c.mode.clone())
            .unwrap_or_else(|| "AUTO".into());
        let mut allowed = calling.and_then(|c| c.allowed_function_names).unwrap_or_default();
        let choice = match mode.as_str() {
            "AUTO" | "VALIDATED" | "MODE_UNSPECIFIED" => ToolChoice::Auto,
            "NONE" => ToolChoice::None,
            "ANY" if allowed.len() == 1 => ToolChoice::Named(allowed.remove(0)),
            "ANY" if allowed.is_empty() => ToolChoice::Required,
            "ANY" => {
                unsupported.push("toolConfig with several allowedFunctionNames".into());
                ToolChoice::Required
            }
            other => {
                return Err(de::Error::custom(format!(
                    "functionCallingConfig.mode \"{}\"",
                    printable(other)
                )))
            }
        };
        Ok(ToolConfigIn { choice, unsupported })
    }
}

struct GenerationIn<'a> {
    sampling: Sampling<'a>,
    format: ResponseFormat<'a>,
    unsupported: Vec<String>,
}

impl<'de> Deserialize<'de> for GenerationIn<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = GenerationIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a generationConfig object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut g = GenerationIn {
                    sampling: Sampling::default(),
                    format: ResponseFormat::Text,
                    unsupported: Vec::new(),
                };
                let (mut json, mut schema) = (false, None);
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match camel(&key).as_ref() {
                        "temperature" => g.sampling.temperature = map.next_value()?,
                        "topP" => g.sampling.top_p = map.next_value()?,
                        "presencePenalty" => {
                            g.sampling.presence_penalty = map.next_value::<Option<f64>>()?.filter(|p| *p != 0.0)
                        }
                        "frequencyPenalty" => {
                            g.sampling.frequency_penalty = map.next_value::<Option<f64>>()?.filter(|p| *p != 0.0)
                        }
                        "seed" => g.sampling.seed = map.next_value()?,
                        "stopSequences" => {
                            let stop: Capped<Text<'de>, MAX_STOP> = map.next_value()?;
                            g.sampling.stop = stop.0.into_iter().map(|t| t.0).collect();
                        }
                        "responseMimeType" => json = map.next_value::<Text<'de>>()?.0 == "application/json",
                        "responseJsonSchema" => schema = Some(raw(&mut map)?),
                        "responseSchema" => schema = Some(Cow::Owned(lowercase_types(&raw(&mut map)?))),
                        // Read with the request's head (the cap, the choices, the thinking).
                        "maxOutputTokens" | "candidateCount" | "thinkingConfig" => {
                            map.next_value::<IgnoredAny>()?;
                        }
                        other => {
                            if map.next_value::<Option<IgnoredAny>>()?.is_some() {
                                g.unsupported.push(printable(other));
                            }
                        }
                    }
                }
                g.format = match (json, schema) {
                    (_, Some(schema)) => ResponseFormat::JsonSchema(JsonSchema {
                        name: Cow::Borrowed("response"),
                        description: None,
                        schema,
                        strict: true,
                    }),
                    (true, None) => ResponseFormat::JsonObject,
                    (false, None) => ResponseFormat::Text,
                };
                Ok(g)
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(body: &str) -> GeminiRequest {
        GeminiRequest::parse("gem", false, Bytes::copy_from_slice(body.as_bytes())).unwrap()
    }

    #[test]
    fn a_gemini_request_becomes_the_conversation() {
        let r = req(r#"{"systemInstruction":{"parts":[{"text":"be brief"}]},
                "contents":[{"role":"user","parts":[{"text":"weather?"},{"inlineData":{"mimeType":"image/png","data":"AA"}}]},
                            {"role":"model","parts":[{"functionCall":{"id":"fc1","name":"weather","args":{"city":"Oslo"}},"thoughtSignature":"SIG"}]},
                            {"role":"user","parts":[{"functionResponse":{"id":"fc1","name":"weather","response":{"output":"sunny"}}}]}],
                "tools":[{"functionDeclarations":[{"name":"weather","parameters":{"type":"OBJECT","properties":{"city":{"type":"STRING"}}}}]}],
                "toolConfig":{"functionCallingConfig":{"mode":"ANY","allowedFunctionNames":["weather"]}},
                "generationConfig":{"maxOutputTokens":50,"temperature":0.5,"responseMimeType":"application/json",
                                    "responseSchema":{"type":"OBJECT"},"thinkingConfig":{"thinkingBudget":1024}}}"#);
        assert_eq!((r.max_tokens(), r.model()), (Some(50), Some("gem")));
        let c = r.conversation().unwrap();
        assert!(c.unsupported.is_empty(), "{:?}", c.unsupported);
        assert_eq!(c.system, vec!["be brief"]);
        assert!(matches!(&c.messages[0].parts[1], Part::Image(Image::Data { .. })));
        let Part::ToolCall(call) = &c.messages[1].parts[0] else {
            panic!("{:?}", c.messages[1])
        };
        assert_eq!(
            (call.id.as_ref(), call.signature.as_ref().map(|s| s.value.as_ref())),
            ("fc1", Some("SIG"))
        );
        let Part::ToolResult(res) = &c.messages[2].parts[0] else {
            panic!()
        };
        assert_eq!((res.call_id.as_ref(), res.text()), ("fc1", "sunny".to_string()));
        assert_eq!(
            c.tools[0].parameters.as_deref(),
            Some(r#"{"type":"object","properties":{"city":{"type":"string"}}}"#)
        );
        assert_eq!(c.tool_choice, ToolChoice::Named("weather".into()));
        assert!(matches!(c.response_format, ResponseFormat::JsonSchema(ref s) if s.schema == r#"{"type":"object"}"#));
        assert_eq!((c.reasoning, c.sampling.temperature), (Some(Effort::Low), Some(0.5)));
    }

    #[test]
    fn snake_case_is_read_as_camel_case() {
        let r = req(
            r#"{"system_instruction":{"parts":[{"text":"s"}]},"contents":[{"role":"user","parts":[{"text":"x"}]}],
                        "tools":[{"function_declarations":[{"name":"f","parameters_json_schema":{"type":"object"}}]}],
                        "generation_config":{"max_output_tokens":7,"response_mime_type":"application/json"}}"#,
        );
        assert_eq!(r.max_tokens(), Some(7));
        let c = r.conversation().unwrap();
        assert!(c.unsupported.is_empty(), "{:?}", c.unsupported);
        assert_eq!((c.system.len(), c.tools.len()), (1, 1));
        assert_eq!(c.response_format, ResponseFormat::JsonObject);
    }

    #[test]
    fn what_google_bills_beyond_tokens_or_keeps_for_the_key_owner_is_refused_for_every_key() {
        let parse = |body: &str| GeminiRequest::parse("m", false, Bytes::copy_from_slice(body.as_bytes()));
        let text = r#"{"role":"user","parts":[{"text":"hi"}]}"#;
        for (body, says) in [
            (
                format!(r#"{{"contents":[{text}],"tools":[{{"googleSearch":{{}}}}]}}"#),
                "tools[0].googleSearch",
            ),
            (
                format!(r#"{{"contents":[{text}],"tools":[{{"function_declarations":[]}},{{"url_context":{{}}}}]}}"#),
                "tools[1].url_context",
            ),
            (
                format!(r#"{{"contents":[{text}],"cachedContent":"cachedContents/x"}}"#),
                "cachedContent",
            ),
            (
                r#"{"contents":[{"parts":[{"file_data":{"file_uri":"https://youtu.be/x"}}]}]}"#.to_string(),
                "parts[0].fileData",
            ),
            (
                format!(
                    r#"{{"contents":[{text}],"generationConfig":{{"maxOutputTokens":1}},"generation_config":{{"max_output_tokens":9000}}}}"#
                ),
                "same member",
            ),
            (
                format!(r#"{{"contents":[{text}],"generationConfig":{{"maxOutputTokens":0}}}}"#),
                "at least 1",
            ),
            (
                format!(r#"{{"contents":[{text}],"generationConfig":{{"candidateCount":9}}}}"#),
                "from 1 to 8",
            ),
            (
                format!(
                    r#"{{"contents":[{text}],"generationConfig":{{"thinkingConfig":{{"thinkingLevel":"extreme"}}}}}}"#
                ),
                "not a level",
            ),
        ] {
            let e = parse(&body).unwrap_err();
            assert!(e.contains(says), "{body}: {e}");
        }
        assert!(parse(&format!(
            r#"{{"contents":[{text}],"tools":[{{"functionDeclarations":[]}}],"cachedContent":null}}"#
        ))
        .is_ok());
    }

    #[test]
    fn what_the_model_cannot_carry_is_named() {
        let r = req(r#"{"contents":[{"role":"user","parts":[{"videoMetadata":{"fps":1}}]},
                            {"role":"model","parts":[{"functionCall":{"name":"f","args":{},"willContinue":true}}]}],
                        "safetySettings":[{"category":"x"}],"toolConfig":{"retrievalConfig":{}},
                        "generationConfig":{"topK":3,"thinkingConfig":{"includeThoughts":true}}}"#);
        let c = r.conversation().unwrap();
        assert_eq!(
            c.unsupported,
            vec![
                "safetySettings".to_string(),
                "generationConfig.thinkingConfig.includeThoughts (thoughts are shown by Gemini keys only)".into(),
                "contents[0] part field `videoMetadata`".into(),
                "contents[1] functionCall field `willContinue`".into(),
                "toolConfig.retrievalConfig".into(),
                "generationConfig.topK".into()
            ]
        );
        assert_eq!(
            lowercase_types(r#"{"type": "ARRAY","items":{"type":"INTEGER"},"description":"\"type\": X"}"#),
            r#"{"type": "array","items":{"type":"integer"},"description":"\"type\": X"}"#
        );
    }
}
