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
    is_json_object, CarryError, Conversation, Dialect, Image, Part, ResponseFormat, Role, ToolChoice,
};

const PROVIDER: &str = "anthropic";

/// The smallest thinking budget Anthropic takes.
const MIN_THINKING: u64 = 1_024;

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
    output_config: Option<Value>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
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
        let mut thinking = Vec::new();
        let mut blocks = Vec::with_capacity(m.parts.len());
        for p in &m.parts {
            match p {
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
                // Thinking Anthropic signed goes back unchanged, first in its turn; reasoning
                // of other providers means nothing here.
                Part::Reasoning(r) => match (&r.redacted, &r.signature) {
                    (Some(data), _) => thinking.push(Block::RedactedThinking { data }),
                    (None, Some(sig)) if sig.dialect == Dialect::Anthropic => thinking.push(Block::Thinking {
                        thinking: &r.text,
                        signature: &sig.value,
                    }),
                    _ => {}
                },
            }
        }
        thinking.extend(blocks);
        match messages.last_mut() {
            // One message per role in a row: a turn's tool results travel together.
            Some(last) if last.role == role => last.content.extend(thinking),
            _ => messages.push(MessageOut {
                role,
                content: thinking,
            }),
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
    let (max_tokens, thinking) = match c.reasoning.map(|e| e.budget_tokens()).filter(|b| *b > 0) {
        None => (cap.unwrap_or(default_max_tokens), None),
        Some(wanted) => {
            let (max_tokens, budget) = match cap {
                Some(cap) => (cap, wanted.min(cap / 2).max(MIN_THINKING)),
                None => (default_max_tokens + wanted.max(MIN_THINKING), wanted.max(MIN_THINKING)),
            };
            if budget >= max_tokens {
                return Err(CarryError::Invalid(format!(
                    "with `reasoning_effort`, Anthropic needs an output cap above its smallest thinking budget ({MIN_THINKING} tokens): raise max_tokens, or leave reasoning_effort out"
                )));
            }
            (max_tokens, Some(json!({"type": "enabled", "budget_tokens": budget})))
        }
    };
    let output_config = match &c.response_format {
        ResponseFormat::JsonSchema(js) => {
            let schema: &RawValue = serde_json::from_str(&js.schema)
                .map_err(|e| CarryError::Invalid(format!("response_format.json_schema.schema: {e}")))?;
            Some(json!({"format": {"type": "json_schema", "schema": schema}}))
        }
        _ => None,
    };
    let body = Body {
        model,
        max_tokens,
        messages,
        system: c.system.iter().map(|t| json!({"type": "text", "text": t})).collect(),
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
    use crate::protocol::openai::chat_render::carry;
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
              "tool_choice":"required","parallel_tool_calls":false,"reasoning_effort":"low","max_completion_tokens":4096,
              "response_format":{{"type":"json_schema","json_schema":{{"name":"o","schema":{{"type":"object"}}}}}}}}"#
        );
        let b = body_of(&body, false, None).unwrap();
        assert_eq!(
            b["tools"][0],
            json!({"name": "weather", "description": "d", "input_schema": {"type": "object"}, "strict": true})
        );
        assert_eq!(
            b["tool_choice"],
            json!({"type": "any", "disable_parallel_tool_use": true})
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
        let e = body_of(
            r#"{"messages":[{"role":"user","content":"x"}],"reasoning_effort":"high","max_tokens":1024}"#,
            false,
            None,
        )
        .unwrap_err();
        assert!(e.message().contains("output cap"), "{e:?}");
    }
}
