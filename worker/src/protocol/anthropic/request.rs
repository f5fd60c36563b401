//! A conversation as an Anthropic Messages body.
//!
//! Tools become `tools` with `input_schema`, tool calls `tool_use` blocks and tool results
//! `tool_result` blocks (ids kept to the characters Anthropic takes), the tool choice
//! `tool_choice` (with `disable_parallel_tool_use`), a JSON schema `output_config.format`, the
//! reasoning effort `thinking` with a token budget; signed thinking blocks the model made go
//! back first in their turn, as Anthropic requires. What it has no place for is refused.

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::protocol::conversation::{
    is_json_object, CarryError, Conversation, Dialect, Effort, Image, Part, ResponseFormat, Role, ToolChoice,
};

const PROVIDER: &str = "anthropic";

/// The smallest thinking budget Anthropic takes.
const MIN_THINKING: u64 = 1_024;

/// Models that only think adaptively (`thinking: {"type": "adaptive"}` with an effort), as the
/// AI SDK's model table has them; the others take a thinking budget.
const ADAPTIVE_ONLY: &[&str] = &[
    "claude-opus-5-5",
    "claude-sonnet-5-5",
    "claude-haiku-5-5",
    "claude-fable-5",
];

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    max_tokens: u64,
    messages: Vec<MessageOut<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    system: Vec<Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<ToolOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stop_sequences: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_config: Option<OutputConfig>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
}

#[derive(Serialize)]
struct OutputConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<Format>,
    #[serde(skip_serializing_if = "Option::is_none")]
    effort: Option<&'static str>,
}

#[derive(Serialize)]
struct Format {
    #[serde(rename = "type")]
    kind: &'static str,
    schema: Box<RawValue>,
}

#[derive(Serialize)]
struct MessageOut<'a> {
    role: &'static str,
    content: Vec<Block<'a>>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block<'a> {
    Text {
        text: &'a str,
    },
    Image {
        source: Value,
    },
    ToolUse {
        id: String,
        name: &'a str,
        input: &'a RawValue,
    },
    ToolResult {
        tool_use_id: String,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        content: Vec<Block<'a>>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        is_error: bool,
    },
    Thinking {
        thinking: &'a str,
        signature: &'a str,
    },
    RedactedThinking {
        data: &'a str,
    },
}

#[derive(Serialize)]
struct ToolOut<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    input_schema: Box<RawValue>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    strict: bool,
}

/// A tool call id as Anthropic takes it (`^[a-zA-Z0-9_-]+$`): other characters become `_`,
/// the same way for a call and for its result.
fn tool_id(id: &str) -> String {
    let clean: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        "call".to_string()
    } else {
        clean
    }
}

fn image(i: &Image<'_>) -> Value {
    match i {
        Image::Data { mime, base64 } => json!({"type": "base64", "media_type": mime, "data": base64}),
        Image::Url(url) => json!({"type": "url", "url": url}),
    }
}

/// The Messages body for `c` and `model`. `output_cap` is the output cap when the app set none
/// (`max_tokens` is required: `default_max_tokens` without either).
pub fn request(
    c: &Conversation<'_>,
    model: &str,
    stream: bool,
    output_cap: Option<u64>,
    default_max_tokens: u64,
) -> Result<Vec<u8>, CarryError> {
    if let Some(field) = c.unsupported.first() {
        return Err(CarryError::unsupported(field.clone(), PROVIDER));
    }
    let s = &c.sampling;
    for (set, field) in [
        (c.choices > 1, "n"),
        (s.seed.is_some(), "seed"),
        (s.presence_penalty.is_some(), "presence_penalty"),
        (s.frequency_penalty.is_some(), "frequency_penalty"),
        (
            matches!(c.response_format, ResponseFormat::JsonObject),
            "response_format: json_object (give a json_schema)",
        ),
    ] {
        if set {
            return Err(CarryError::unsupported(field, PROVIDER));
        }
    }

    let mut messages: Vec<MessageOut<'_>> = Vec::new();
    for m in &c.messages {
        let role = match m.role {
            Role::User => "user",
            Role::Assistant => "assistant",
        };
        let mut blocks = Vec::with_capacity(m.parts.len());
        for p in &m.parts {
            match p {
                // Anthropic refuses empty text blocks; an empty text says nothing.
                Part::Text(t) if t.is_empty() => {}
                Part::Text(t) => blocks.push(Block::Text { text: t }),
                Part::Image(i) => blocks.push(Block::Image { source: image(i) }),
                Part::ToolCall(call) => {
                    if !is_json_object(&call.arguments) {
                        return Err(CarryError::Invalid(format!(
                            "the arguments of tool call \"{}\" are not a JSON object",
                            call.id
                        )));
                    }
                    let input: &RawValue = serde_json::from_str(&call.arguments)
                        .map_err(|e| CarryError::Invalid(format!("tool call arguments: {e}")))?;
                    blocks.push(Block::ToolUse {
                        id: tool_id(&call.id),
                        name: &call.name,
                        input,
                    });
                }
                Part::ToolResult(r) => {
                    let mut content = Vec::with_capacity(r.content.len());
                    for p in &r.content {
                        match p {
                            Part::Text(t) if t.is_empty() => {}
                            Part::Text(t) => content.push(Block::Text { text: t }),
                            Part::Image(i) => content.push(Block::Image { source: image(i) }),
                            _ => {}
                        }
                    }
                    blocks.push(Block::ToolResult {
                        tool_use_id: tool_id(&r.call_id),
                        content,
                        is_error: r.is_error,
                    });
                }
                // Thinking Anthropic signed goes back unchanged, where it stood in its turn;
                // reasoning of other providers means nothing here.
                Part::Reasoning(r) => match (&r.redacted, &r.signature) {
                    (Some(data), _) => blocks.push(Block::RedactedThinking { data }),
                    (None, Some(sig)) if sig.dialect == Dialect::Anthropic => blocks.push(Block::Thinking {
                        thinking: &r.text,
                        signature: &sig.value,
                    }),
                    _ => {}
                },
            }
        }
        if blocks.is_empty() {
            // Nothing left to say (an empty text): Anthropic refuses an empty message.
            continue;
        }
        match messages.last_mut() {
            // One message per role in a row: a turn's tool results travel together.
            Some(last) if last.role == role => last.content.extend(blocks),
            _ => messages.push(MessageOut { role, content: blocks }),
        }
    }

    let mut tools = Vec::with_capacity(c.tools.len());
    for t in &c.tools {
        let schema = t
            .parameters
            .as_deref()
            .unwrap_or(r#"{"type":"object","properties":{}}"#)
            .to_string();
        tools.push(ToolOut {
            name: &t.name,
            description: t.description.as_deref(),
            input_schema: RawValue::from_string(schema)
                .map_err(|e| CarryError::Invalid(format!("a tool's parameters are not valid JSON: {e}")))?,
            strict: t.strict,
        });
    }
    let no_parallel = c.parallel_tool_calls == Some(false);
    let tool_choice = if c.tools.is_empty() {
        if matches!(c.tool_choice, ToolChoice::Required | ToolChoice::Named(_)) {
            return Err(CarryError::Invalid(
                "`tool_choice` asks for a tool, but the request declares none".into(),
            ));
        }
        None
    } else {
        let mut choice = match &c.tool_choice {
            ToolChoice::Auto => json!({"type": "auto"}),
            ToolChoice::None => json!({"type": "none"}),
            ToolChoice::Required => json!({"type": "any"}),
            ToolChoice::Named(name) => json!({"type": "tool", "name": name}),
        };
        if no_parallel && c.tool_choice != ToolChoice::None {
            choice["disable_parallel_tool_use"] = json!(true);
        }
        Some(choice)
    };

    // Anthropic's max_tokens counts thinking, as OpenAI's output caps count reasoning.
    let cap = c.max_output_tokens.or(output_cap);
    let adaptive_only = ADAPTIVE_ONLY.iter().any(|m| model.starts_with(m));
    let mut effort = None;
    let (max_tokens, thinking) = match c.reasoning {
        None => (cap.unwrap_or(default_max_tokens), None),
        // These models think as they see fit; effort says how much.
        Some(e) if adaptive_only => {
            effort = Some(match e {
                Effort::None => {
                    return Err(CarryError::unsupported(
                        "reasoning_effort: none (this model always thinks)",
                        PROVIDER,
                    ))
                }
                Effort::Minimal | Effort::Low => "low",
                Effort::Medium => "medium",
                Effort::High => "high",
                Effort::XHigh => "xhigh",
            });
            (
                cap.unwrap_or(default_max_tokens + e.budget_tokens()),
                Some(json!({"type": "adaptive"})),
            )
        }
        Some(e) if e.budget_tokens() == 0 => (cap.unwrap_or(default_max_tokens), None),
        Some(e) => {
            let wanted = e.budget_tokens().max(MIN_THINKING);
            let (max_tokens, budget) = match cap {
                Some(cap) => (cap, wanted.min(cap / 2).max(MIN_THINKING)),
                None => (default_max_tokens + wanted, wanted),
            };
            if budget >= max_tokens {
                return Err(CarryError::Invalid(format!(
                    "with `reasoning_effort`, Anthropic needs an output cap above its smallest thinking budget ({MIN_THINKING} tokens): raise max_tokens, or leave reasoning_effort out"
                )));
            }
            (max_tokens, Some(json!({"type": "enabled", "budget_tokens": budget})))
        }
    };
    if thinking.is_some() {
        // What Anthropic does not take while the model thinks: refused, not left out.
        for (set, field) in [
            (
                matches!(c.tool_choice, ToolChoice::Required | ToolChoice::Named(_)) && !c.tools.is_empty(),
                "tool_choice (a forced tool) with reasoning_effort",
            ),
            (
                s.temperature.is_some_and(|t| t != 1.0),
                "temperature with reasoning_effort",
            ),
            (
                s.top_p.is_some_and(|p| p < 0.95),
                "top_p below 0.95 with reasoning_effort",
            ),
        ] {
            if set {
                return Err(CarryError::unsupported(field, PROVIDER));
            }
        }
    }
    let format = match &c.response_format {
        ResponseFormat::JsonSchema(js) => Some(Format {
            kind: "json_schema",
            schema: RawValue::from_string(js.described()?.into_owned())
                .map_err(|e| CarryError::Invalid(format!("response_format.json_schema.schema: {e}")))?,
        }),
        _ => None,
    };
    let output_config = (format.is_some() || effort.is_some()).then_some(OutputConfig { format, effort });
    let body = Body {
        model,
        max_tokens,
        messages,
        system: c
            .system
            .iter()
            .filter(|t| !t.is_empty())
            .map(|t| json!({"type": "text", "text": t}))
            .collect(),
        tools,
        tool_choice,
        temperature: s.temperature,
        top_p: s.top_p,
        stop_sequences: s.stop.iter().map(|x| x.as_ref()).collect(),
        thinking,
        output_config,
        stream,
    };
    serde_json::to_vec(&body).map_err(|e| CarryError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::conversation::{Reasoning, Signature};
    use crate::protocol::openai::carry::carry;
    use crate::protocol::openai::ChatRequest;

    fn body_of(json_body: &str, stream: bool, cap: Option<u64>) -> Result<Value, CarryError> {
        let r = ChatRequest::parse(bytes::Bytes::copy_from_slice(json_body.as_bytes())).unwrap();
        let c = r.conversation().unwrap();
        request(&c, "claude-sonnet-4-5", stream, cap, 333).map(|b| serde_json::from_slice(&b).unwrap())
    }

    #[test]
    fn messages_and_sampling() {
        let b = body_of(
            r#"{"model":"chat","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}],"stop":["x"],"temperature":0.5}"#,
            true,
            None,
        )
        .unwrap();
        assert_eq!(b["model"], "claude-sonnet-4-5");
        assert_eq!(b["max_tokens"], 333);
        assert_eq!(b["system"], json!([{"type": "text", "text": "be brief"}]));
        assert_eq!(
            b["messages"],
            json!([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
        );
        assert_eq!(
            (b["stop_sequences"][0].clone(), b["temperature"].clone()),
            (json!("x"), json!(0.5))
        );
        assert_eq!(b["stream"], true);
        assert!(b.get("tools").is_none() && b.get("thinking").is_none());
    }

    #[test]
    fn tools_calls_results_and_thinking() {
        let thinking = [Reasoning {
            text: "Let me think".into(),
            signature: Some(Signature {
                dialect: Dialect::Anthropic,
                value: "SIG".into(),
            }),
            redacted: None,
        }];
        let id = carry("toolu_01", None, &thinking);
        let body = format!(
            r#"{{"messages":[{{"role":"user","content":"weather?"}},
                {{"role":"assistant","content":"Checking.","tool_calls":[{{"id":"{id}","type":"function","function":{{"name":"weather","arguments":"{{\"city\":\"Oslo\"}}"}}}},
                                                                         {{"id":"call.2","type":"function","function":{{"name":"weather","arguments":"{{}}"}}}}]}},
                {{"role":"tool","tool_call_id":"{id}","content":"sunny"}},{{"role":"tool","tool_call_id":"call.2","content":"rain"}}],
              "tools":[{{"type":"function","function":{{"name":"weather","description":"d","parameters":{{"type":"object"}},"strict":true}}}}],
              "tool_choice":"auto","parallel_tool_calls":false,"reasoning_effort":"low","max_completion_tokens":4096,
              "response_format":{{"type":"json_schema","json_schema":{{"name":"o","schema":{{"type":"object"}}}}}}}}"#
        );
        let b = body_of(&body, false, None).unwrap();
        assert_eq!(
            b["tools"][0],
            json!({"name": "weather", "description": "d", "input_schema": {"type": "object"}, "strict": true})
        );
        assert_eq!(
            b["tool_choice"],
            json!({"type": "auto", "disable_parallel_tool_use": true})
        );
        let turn = &b["messages"][1]["content"];
        assert_eq!(
            turn[0],
            json!({"type": "thinking", "thinking": "Let me think", "signature": "SIG"})
        );
        assert_eq!(turn[1], json!({"type": "text", "text": "Checking."}));
        assert_eq!(
            turn[2],
            json!({"type": "tool_use", "id": "toolu_01", "name": "weather", "input": {"city": "Oslo"}})
        );
        assert_eq!(turn[3]["id"], "call_2");
        let results = &b["messages"][2]["content"];
        assert_eq!(
            results[0],
            json!({"type": "tool_result", "tool_use_id": "toolu_01", "content": [{"type": "text", "text": "sunny"}]})
        );
        assert_eq!(results[1]["tool_use_id"], "call_2");
        assert_eq!(b["max_tokens"], 4096);
        assert_eq!(b["thinking"], json!({"type": "enabled", "budget_tokens": 1024}));
        assert_eq!(
            b["output_config"],
            json!({"format": {"type": "json_schema", "schema": {"type": "object"}}})
        );
        // Without a cap the budget is added to the default output.
        let b = body_of(
            r#"{"messages":[{"role":"user","content":"x"}],"reasoning_effort":"medium"}"#,
            false,
            None,
        )
        .unwrap();
        assert_eq!(
            (b["max_tokens"].clone(), b["thinking"]["budget_tokens"].clone()),
            (json!(333 + 8192), json!(8192))
        );
    }

    #[test]
    fn empty_texts_are_left_out_and_adaptive_models_get_an_effort() {
        let b = body_of(
            r#"{"messages":[{"role":"system","content":""},{"role":"user","content":"hi"},{"role":"assistant","content":""},
                {"role":"assistant","content":null,"tool_calls":[{"id":"t1","type":"function","function":{"name":"f","arguments":"{}"}}]},
                {"role":"tool","tool_call_id":"t1","content":""}]}"#,
            false,
            None,
        )
        .unwrap();
        assert!(b.get("system").is_none(), "{b}");
        assert_eq!(
            b["messages"][1]["content"],
            json!([{"type": "tool_use", "id": "t1", "name": "f", "input": {}}])
        );
        assert_eq!(
            b["messages"][2]["content"][0],
            json!({"type": "tool_result", "tool_use_id": "t1"})
        );
        let r = ChatRequest::parse(bytes::Bytes::from_static(
            br#"{"messages":[{"role":"user","content":"x"}],"reasoning_effort":"medium"}"#,
        ))
        .unwrap();
        let b: Value =
            serde_json::from_slice(&request(&r.conversation().unwrap(), "claude-opus-5-5", false, None, 333).unwrap())
                .unwrap();
        assert_eq!(
            (b["thinking"].clone(), b["output_config"].clone()),
            (json!({"type": "adaptive"}), json!({"effort": "medium"}))
        );
    }

    #[test]
    fn what_anthropic_cannot_carry_is_refused() {
        for (extra, field) in [
            (r#""n":2"#, "n"),
            (r#""seed":1"#, "seed"),
            (r#""presence_penalty":0.5"#, "presence_penalty"),
            (r#""logprobs":true"#, "logprobs"),
            (
                r#""response_format":{"type":"json_object"}"#,
                "response_format: json_object (give a json_schema)",
            ),
        ] {
            let body = format!(r#"{{"messages":[{{"role":"user","content":"x"}}],{extra}}}"#);
            assert_eq!(
                body_of(&body, false, None).unwrap_err(),
                CarryError::unsupported(field, "anthropic"),
                "{body}"
            );
        }
        // What Anthropic does not take while the model thinks.
        for (extra, field) in [
            (
                r#""tool_choice":"required""#,
                "tool_choice (a forced tool) with reasoning_effort",
            ),
            (r#""temperature":0.7"#, "temperature with reasoning_effort"),
        ] {
            let body = format!(
                r#"{{"messages":[{{"role":"user","content":"x"}}],"reasoning_effort":"low","tools":[{{"type":"function","function":{{"name":"f"}}}}],{extra}}}"#
            );
            assert_eq!(
                body_of(&body, false, None).unwrap_err(),
                CarryError::unsupported(field, "anthropic")
            );
        }
        let e = body_of(
            r#"{"messages":[{"role":"user","content":"x"}],"reasoning_effort":"high","max_tokens":1024}"#,
            false,
            None,
        )
        .unwrap_err();
        assert!(e.message().contains("output cap"), "{e:?}");
    }
}
