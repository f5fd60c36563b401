//! A conversation as an OpenAI chat completions request, for an OpenAI-style key when the app
//! spoke another dialect (the Responses API, Anthropic's Messages, Gemini's own). Tool results
//! become `tool` messages, images `image_url` parts; reasoning other providers signed stays
//! behind (OpenAI's chat format has no place to send it back, and it is not OpenAI's).

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::protocol::conversation::{CarryError, Conversation, Part, ResponseFormat, Role, ToolChoice};

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    messages: Vec<Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<ToolOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    n: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stop: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_effort: Option<&'static str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<Value>,
}

#[derive(Serialize)]
struct ToolOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionOut<'a>,
}

#[derive(Serialize)]
struct FunctionOut<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    strict: bool,
}

fn raw<'a>(text: &'a str, what: &str) -> Result<&'a RawValue, CarryError> {
    serde_json::from_str(text).map_err(|e| CarryError::Invalid(format!("{what} is not valid JSON: {e}")))
}

/// The chat completions body for `c` and `provider`'s `model`. `openai_cap_field`: the output
/// cap is `max_completion_tokens` (OpenAI), else `max_tokens`; `output_cap` the cap when the app
/// set none (a spend budget holds only that much).
pub fn request(
    c: &Conversation<'_>,
    (provider, model): (&str, &str),
    stream: bool,
    output_cap: Option<u64>,
    openai_cap_field: bool,
) -> Result<Vec<u8>, CarryError> {
    if let Some(field) = c.unsupported.first() {
        return Err(CarryError::unsupported(field.clone(), provider));
    }
    let mut messages: Vec<Value> = Vec::with_capacity(c.messages.len() + c.system.len());
    for s in c.system.iter().filter(|s| !s.is_empty()) {
        messages.push(json!({"role": "system", "content": s}));
    }
    for m in &c.messages {
        let mut content: Vec<Value> = Vec::new();
        let mut calls: Vec<Value> = Vec::new();
        let mut results: Vec<Value> = Vec::new();
        for p in &m.parts {
            match p {
                Part::Text(t) if t.is_empty() => {}
                Part::Text(t) => content.push(json!({"type": "text", "text": t})),
                Part::Image(i) => content.push(json!({"type": "image_url", "image_url": {"url": i.url()}})),
                Part::ToolCall(call) => calls.push(json!({
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                })),
                Part::ToolResult(r) => {
                    if r.content.iter().any(|p| !matches!(p, Part::Text(_))) {
                        return Err(CarryError::unsupported("a tool result with images", provider));
                    }
                    results.push(json!({"role": "tool", "tool_call_id": r.call_id, "content": r.text()}));
                }
                Part::Reasoning(_) => {}
            }
        }
        // Results answer the calls of the turn before: they come first.
        messages.extend(results);
        let only_text = content.iter().all(|p| p["type"] == "text");
        let content = if content.is_empty() {
            None
        } else if only_text && m.role == Role::Assistant {
            Some(Value::String(
                content.iter().filter_map(|p| p["text"].as_str()).collect::<String>(),
            ))
        } else {
            Some(Value::Array(content))
        };
        match m.role {
            Role::User => {
                if let Some(content) = content {
                    messages.push(json!({"role": "user", "content": content}));
                }
            }
            Role::Assistant => {
                if content.is_none() && calls.is_empty() {
                    continue;
                }
                let mut msg = json!({"role": "assistant", "content": content});
                if !calls.is_empty() {
                    msg["tool_calls"] = Value::Array(calls);
                }
                messages.push(msg);
            }
        }
    }
    let mut tools = Vec::with_capacity(c.tools.len());
    for t in &c.tools {
        tools.push(ToolOut {
            kind: "function",
            function: FunctionOut {
                name: &t.name,
                description: t.description.as_deref(),
                parameters: t
                    .parameters
                    .as_deref()
                    .map(|p| raw(p, "a tool's parameters"))
                    .transpose()?,
                strict: t.strict,
            },
        });
    }
    let tool_choice = (!c.tools.is_empty()).then(|| match &c.tool_choice {
        ToolChoice::Auto => json!("auto"),
        ToolChoice::None => json!("none"),
        ToolChoice::Required => json!("required"),
        ToolChoice::Named(name) => json!({"type": "function", "function": {"name": name}}),
    });
    let response_format = match &c.response_format {
        ResponseFormat::Text => None,
        ResponseFormat::JsonObject => Some(json!({"type": "json_object"})),
        ResponseFormat::JsonSchema(js) => {
            let mut schema = json!({"name": js.name, "schema": raw(&js.schema, "a JSON schema")?, "strict": js.strict});
            if let Some(d) = &js.description {
                schema["description"] = json!(d);
            }
            Some(json!({"type": "json_schema", "json_schema": schema}))
        }
    };
    let cap = c.max_output_tokens.or(output_cap);
    let s = &c.sampling;
    let body = Body {
        model,
        messages,
        tools,
        tool_choice,
        parallel_tool_calls: c.parallel_tool_calls,
        response_format,
        max_completion_tokens: cap.filter(|_| openai_cap_field),
        max_tokens: cap.filter(|_| !openai_cap_field),
        n: (c.choices > 1).then_some(c.choices),
        temperature: s.temperature,
        top_p: s.top_p,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        seed: s.seed,
        stop: s.stop.iter().map(|x| x.as_ref()).collect(),
        reasoning_effort: c.reasoning.map(|e| e.name()),
        stream,
        stream_options: stream.then(|| json!({"include_usage": true})),
    };
    serde_json::to_vec(&body).map_err(|e| CarryError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::conversation::{Effort, Image, JsonSchema, Message, Tool, ToolCall, ToolResult};

    #[test]
    fn a_conversation_as_a_chat_request() {
        let c = Conversation {
            system: vec!["be brief".into()],
            messages: vec![
                Message {
                    role: Role::User,
                    parts: vec![
                        Part::Text("look".into()),
                        Part::Image(Image::Data {
                            mime: "image/png".into(),
                            base64: "AAAA".into(),
                        }),
                    ],
                },
                Message {
                    role: Role::Assistant,
                    parts: vec![
                        Part::Text("Checking.".into()),
                        Part::ToolCall(ToolCall {
                            id: "toolu_1".into(),
                            name: "weather".into(),
                            arguments: r#"{"city":"Oslo"}"#.into(),
                            signature: None,
                        }),
                    ],
                },
                Message {
                    role: Role::User,
                    parts: vec![
                        Part::ToolResult(ToolResult {
                            call_id: "toolu_1".into(),
                            name: Some("weather".into()),
                            content: vec![Part::Text("sunny".into())],
                            is_error: false,
                        }),
                        Part::Text("thanks".into()),
                    ],
                },
            ],
            tools: vec![Tool {
                name: "weather".into(),
                description: None,
                parameters: Some(r#"{"type":"object"}"#.into()),
                strict: true,
            }],
            tool_choice: ToolChoice::Required,
            response_format: ResponseFormat::JsonSchema(JsonSchema {
                name: "o".into(),
                description: None,
                schema: r#"{"type":"object"}"#.into(),
                strict: true,
            }),
            choices: 1,
            reasoning: Some(Effort::Low),
            ..Conversation::default()
        };
        let b: Value =
            serde_json::from_slice(&request(&c, ("openai", "gpt-4o-mini"), true, Some(64), true).unwrap()).unwrap();
        assert_eq!(b["messages"][0], json!({"role": "system", "content": "be brief"}));
        assert_eq!(
            b["messages"][1]["content"][1]["image_url"]["url"],
            "data:image/png;base64,AAAA"
        );
        assert_eq!(b["messages"][2]["content"], "Checking.");
        assert_eq!(
            b["messages"][2]["tool_calls"][0]["function"]["arguments"],
            r#"{"city":"Oslo"}"#
        );
        assert_eq!(
            b["messages"][3],
            json!({"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"})
        );
        assert_eq!(
            b["messages"][4],
            json!({"role": "user", "content": [{"type": "text", "text": "thanks"}]})
        );
        assert_eq!(b["tools"][0]["function"]["parameters"], json!({"type": "object"}));
        assert_eq!(b["tool_choice"], "required");
        assert_eq!(b["response_format"]["json_schema"]["schema"], json!({"type": "object"}));
        assert_eq!(
            (b["max_completion_tokens"].clone(), b["reasoning_effort"].clone()),
            (json!(64), json!("low"))
        );
        assert_eq!(b["stream_options"], json!({"include_usage": true}));
        let other: Value =
            serde_json::from_slice(&request(&c, ("ollama", "llama3"), false, Some(64), false).unwrap()).unwrap();
        assert_eq!(other["max_tokens"], 64);
        assert!(other.get("max_completion_tokens").is_none() && other.get("stream").is_none());
    }
}
