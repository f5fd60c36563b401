//! A conversation as a Gemini `generateContent` body.
//!
//! Tools become `functionDeclarations` (their schemas as `parametersJsonSchema`, converted by
//! schema.rs), tool calls `functionCall` parts with the thought signature Gemini attached to
//! them, tool results `functionResponse` parts matched by call id and name, the tool choice
//! `toolConfig`, a JSON schema `responseMimeType` + `responseJsonSchema`, the reasoning effort
//! `thinkingConfig`. What Gemini has no place for is refused (`CarryError`).

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::schema::for_gemini;
use crate::protocol::conversation::{
    is_json_object, CarryError, Conversation, Dialect, Effort, Image, Part, ResponseFormat, Role, ToolChoice,
};

const PROVIDER: &str = "gemini";

/// What Gemini documents to send when a call's signature is unknown (the call came from another
/// provider, or from a client that lost it): Gemini 3 refuses a turn's function call without one.
const NO_SIGNATURE: &str = "skip_thought_signature_validator";

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    contents: Vec<Content<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_instruction: Option<Content<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Tools<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_config: Option<Value>,
    #[serde(skip_serializing_if = "GenerationConfig::is_empty")]
    generation_config: GenerationConfig<'a>,
}

#[derive(Serialize)]
struct Content<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    parts: Vec<PartOut<'a>>,
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct PartOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    inline_data: Option<InlineData<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    function_call: Option<FunctionCall<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    function_response: Option<FunctionResponse<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thought_signature: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct InlineData<'a> {
    mime_type: &'a str,
    data: &'a str,
}

#[derive(Serialize)]
struct FunctionCall<'a> {
    id: &'a str,
    name: &'a str,
    args: &'a RawValue,
}

#[derive(Serialize)]
struct FunctionResponse<'a> {
    id: &'a str,
    name: &'a str,
    response: Value,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Tools<'a> {
    function_declarations: Vec<FunctionDeclaration<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FunctionDeclaration<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters_json_schema: Option<Box<RawValue>>,
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    max_output_tokens: Option<u64>,
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
    stop_sequences: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    candidate_count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_mime_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_json_schema: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking_config: Option<Value>,
}

impl GenerationConfig<'_> {
    fn is_empty(&self) -> bool {
        self.max_output_tokens.is_none()
            && self.temperature.is_none()
            && self.top_p.is_none()
            && self.presence_penalty.is_none()
            && self.frequency_penalty.is_none()
            && self.seed.is_none()
            && self.stop_sequences.is_empty()
            && self.candidate_count.is_none()
            && self.response_mime_type.is_none()
            && self.response_json_schema.is_none()
            && self.thinking_config.is_none()
    }
}

fn raw(text: String) -> Result<Box<RawValue>, CarryError> {
    RawValue::from_string(text).map_err(|e| CarryError::Invalid(format!("a schema is not valid JSON: {e}")))
}

/// Gemini 3 thinks in levels (Pro: low and high only), Gemini 2.5 in a token budget within its
/// model's range (Pro cannot stop thinking).
fn thinking_config(model: &str, effort: Effort) -> Result<Value, CarryError> {
    let name = model.strip_prefix("models/").unwrap_or(model);
    let pro = name.contains("-pro");
    if name.starts_with("gemini-3") {
        let level = match effort {
            Effort::None | Effort::Minimal | Effort::Low if pro => "low",
            _ if pro => "high",
            Effort::None | Effort::Minimal => "minimal",
            Effort::Low => "low",
            Effort::Medium => "medium",
            Effort::High | Effort::XHigh => "high",
        };
        return Ok(json!({"thinkingLevel": level}));
    }
    let (least, most) = if pro {
        (128, 32_768)
    } else if name.contains("flash-lite") {
        (512, 24_576)
    } else {
        (1, 24_576)
    };
    let budget = match effort.budget_tokens() {
        0 if pro => {
            return Err(CarryError::unsupported(
                "reasoning_effort: none (this model always thinks)",
                PROVIDER,
            ))
        }
        0 => 0,
        b => b.clamp(least, most),
    };
    Ok(json!({"thinkingBudget": budget}))
}

/// The `generateContent` body for `c` and `model`. `output_cap`: `maxOutputTokens` when the
/// app set none (a spend budget holds only that much).
pub fn request(c: &Conversation<'_>, model: &str, output_cap: Option<u64>) -> Result<Vec<u8>, CarryError> {
    if let Some(field) = c.unsupported.first() {
        return Err(CarryError::unsupported(field.clone(), PROVIDER));
    }
    if c.parallel_tool_calls == Some(false) {
        return Err(CarryError::unsupported("parallel_tool_calls: false", PROVIDER));
    }
    let gemini_3 = model.strip_prefix("models/").unwrap_or(model).starts_with("gemini-3");

    let mut contents: Vec<Content<'_>> = Vec::new();
    for m in &c.messages {
        let role = match m.role {
            Role::User => "user",
            Role::Assistant => "model",
        };
        let mut parts = Vec::with_capacity(m.parts.len());
        let mut first_call = true;
        for p in &m.parts {
            match p {
                // An empty text says nothing (and Gemini refuses an empty part).
                Part::Text(t) if t.is_empty() => {}
                Part::Text(t) => parts.push(PartOut {
                    text: Some(t),
                    ..PartOut::default()
                }),
                Part::Image(Image::Data { mime, base64 }) => parts.push(PartOut {
                    inline_data: Some(InlineData {
                        mime_type: mime,
                        data: base64,
                    }),
                    ..PartOut::default()
                }),
                Part::Image(Image::Url(_)) => {
                    return Err(CarryError::unsupported(
                        "image_url with an address (send the image inline, as a data: URL)",
                        PROVIDER,
                    ))
                }
                Part::ToolCall(call) => {
                    if !is_json_object(&call.arguments) {
                        return Err(CarryError::Invalid(format!(
                            "the arguments of tool call \"{}\" are not a JSON object",
                            call.id
                        )));
                    }
                    let args: &RawValue = serde_json::from_str(&call.arguments)
                        .map_err(|e| CarryError::Invalid(format!("tool call arguments: {e}")))?;
                    let signature = match &call.signature {
                        Some(s) if s.dialect == Dialect::Gemini => Some(s.value.as_ref()),
                        // Only the first call of a step carries one.
                        _ if gemini_3 && first_call => Some(NO_SIGNATURE),
                        _ => None,
                    };
                    first_call = false;
                    parts.push(PartOut {
                        function_call: Some(FunctionCall {
                            id: &call.id,
                            name: &call.name,
                            args,
                        }),
                        thought_signature: signature,
                        ..PartOut::default()
                    });
                }
                Part::ToolResult(r) => {
                    let name = r.name.as_deref().ok_or_else(|| {
                        CarryError::Invalid(format!(
                            "the tool result for call \"{}\" answers no tool call of an earlier assistant message",
                            r.call_id
                        ))
                    })?;
                    if r.content.iter().any(|p| !matches!(p, Part::Text(_))) {
                        return Err(CarryError::unsupported("a tool result with images", PROVIDER));
                    }
                    let text = r.text();
                    let response = if r.is_error {
                        json!({"error": text})
                    } else {
                        json!({"output": text})
                    };
                    parts.push(PartOut {
                        function_response: Some(FunctionResponse {
                            id: &r.call_id,
                            name,
                            response,
                        }),
                        ..PartOut::default()
                    });
                }
                // Reasoning another provider signed means nothing to Gemini; its own thoughts
                // come back as signatures on the calls.
                Part::Reasoning(_) => {}
            }
        }
        if parts.is_empty() {
            continue;
        }
        match contents.last_mut() {
            // Gemini wants one turn per role in a row: results of one step's calls together.
            Some(last) if last.role == Some(role) => last.parts.extend(parts),
            _ => contents.push(Content {
                role: Some(role),
                parts,
            }),
        }
    }

    let system_instruction = c.system.iter().any(|t| !t.is_empty()).then(|| Content {
        role: None,
        parts: c
            .system
            .iter()
            .filter(|t| !t.is_empty())
            .map(|t| PartOut {
                text: Some(t),
                ..PartOut::default()
            })
            .collect(),
    });

    let mut declarations = Vec::with_capacity(c.tools.len());
    for (i, t) in c.tools.iter().enumerate() {
        let parameters = match &t.parameters {
            Some(schema) => Some(raw(for_gemini(schema)
                .map_err(|why| CarryError::Invalid(format!("tools[{i}].function.parameters: {why}")))?)?),
            None => None,
        };
        declarations.push(FunctionDeclaration {
            name: &t.name,
            description: t.description.as_deref(),
            parameters_json_schema: parameters,
        });
    }
    let tools = if declarations.is_empty() {
        Vec::new()
    } else {
        vec![Tools {
            function_declarations: declarations,
        }]
    };
    let tool_config = (!c.tools.is_empty()).then(|| {
        let strict = c.tools.iter().any(|t| t.strict);
        let config = match &c.tool_choice {
            // VALIDATED: calls that follow their schema, or text.
            ToolChoice::Auto if strict => json!({"mode": "VALIDATED"}),
            ToolChoice::Auto => json!({"mode": "AUTO"}),
            ToolChoice::None => json!({"mode": "NONE"}),
            ToolChoice::Required => json!({"mode": "ANY"}),
            ToolChoice::Named(name) => json!({"mode": "ANY", "allowedFunctionNames": [name]}),
        };
        json!({"functionCallingConfig": config})
    });
    if c.tools.is_empty() && matches!(c.tool_choice, ToolChoice::Required | ToolChoice::Named(_)) {
        return Err(CarryError::Invalid(
            "`tool_choice` asks for a tool, but the request declares none".into(),
        ));
    }

    let s = &c.sampling;
    let mut config = GenerationConfig {
        max_output_tokens: c.max_output_tokens.or(output_cap),
        temperature: s.temperature,
        top_p: s.top_p,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        seed: s.seed,
        stop_sequences: s.stop.iter().map(|x| x.as_ref()).collect(),
        candidate_count: (c.choices > 1).then_some(c.choices),
        ..GenerationConfig::default()
    };
    match &c.response_format {
        ResponseFormat::Text => {}
        ResponseFormat::JsonObject => config.response_mime_type = Some("application/json"),
        ResponseFormat::JsonSchema(js) => {
            config.response_mime_type = Some("application/json");
            config.response_json_schema = Some(raw(for_gemini(&js.schema)
                .map_err(|why| CarryError::Invalid(format!("response_format.json_schema.schema: {why}")))?)?);
        }
    }
    if let Some(effort) = c.reasoning {
        config.thinking_config = Some(thinking_config(model, effort)?);
    }
    let body = Body {
        contents,
        system_instruction,
        tools,
        tool_config,
        generation_config: config,
    };
    serde_json::to_vec(&body).map_err(|e| CarryError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::conversation::{Signature, Tool, ToolCall, ToolResult};
    use crate::protocol::openai::ChatRequest;

    fn body_of(json_body: &str, model: &str) -> Result<Value, CarryError> {
        let r = ChatRequest::parse(bytes::Bytes::copy_from_slice(json_body.as_bytes())).unwrap();
        let c = r.conversation().unwrap();
        request(&c, model, None).map(|b| serde_json::from_slice(&b).unwrap())
    }

    #[test]
    fn messages_sampling_and_system() {
        let b = body_of(
            r#"{"model":"chat","max_tokens":50,"temperature":0.2,"stop":"END","n":2,
                "messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"},
                            {"role":"assistant","content":"hello"},{"role":"user","content":[{"type":"text","text":"more"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}]}"#,
            "gemini-2.5-flash",
        )
        .unwrap();
        assert_eq!(b["systemInstruction"]["parts"][0]["text"], "be brief");
        assert!(b["systemInstruction"].get("role").is_none());
        assert_eq!(b["contents"].as_array().unwrap().len(), 3);
        assert_eq!(b["contents"][1]["role"], "model");
        assert_eq!(b["contents"][2]["parts"][1]["inlineData"]["mimeType"], "image/png");
        let g = &b["generationConfig"];
        assert_eq!(
            (g["maxOutputTokens"].clone(), g["candidateCount"].clone()),
            (json!(50), json!(2))
        );
        assert_eq!(g["stopSequences"][0], "END");
        assert!(b.get("tools").is_none() && b.get("toolConfig").is_none());
    }

    #[test]
    fn tools_calls_results_and_signatures() {
        let c = Conversation {
            messages: vec![
                crate::protocol::conversation::Message {
                    role: Role::User,
                    parts: vec![Part::Text("weather?".into())],
                },
                crate::protocol::conversation::Message {
                    role: Role::Assistant,
                    parts: vec![
                        Part::ToolCall(ToolCall {
                            id: "c1".into(),
                            name: "weather".into(),
                            arguments: r#"{"city":"Oslo"}"#.into(),
                            signature: Some(Signature {
                                dialect: Dialect::Gemini,
                                value: "SIG".into(),
                            }),
                        }),
                        Part::ToolCall(ToolCall {
                            id: "c2".into(),
                            name: "weather".into(),
                            arguments: r#"{"city":"Bergen"}"#.into(),
                            signature: None,
                        }),
                    ],
                },
                crate::protocol::conversation::Message {
                    role: Role::User,
                    parts: vec![
                        Part::ToolResult(ToolResult {
                            call_id: "c1".into(),
                            name: Some("weather".into()),
                            content: vec![Part::Text("sunny".into())],
                            is_error: false,
                        }),
                        Part::ToolResult(ToolResult {
                            call_id: "c2".into(),
                            name: Some("weather".into()),
                            content: vec![Part::Text("no such city".into())],
                            is_error: true,
                        }),
                    ],
                },
            ],
            tools: vec![Tool {
                name: "weather".into(),
                description: Some("the weather".into()),
                parameters: Some(r#"{"$schema":"x","type":"object","properties":{"city":{"type":"string"}}}"#.into()),
                strict: false,
            }],
            tool_choice: ToolChoice::Named("weather".into()),
            choices: 1,
            reasoning: Some(Effort::Low),
            ..Conversation::default()
        };
        let b: Value = serde_json::from_slice(&request(&c, "gemini-2.5-flash", Some(99)).unwrap()).unwrap();
        let decl = &b["tools"][0]["functionDeclarations"][0];
        assert_eq!(decl["name"], "weather");
        assert_eq!(
            decl["parametersJsonSchema"],
            json!({"type":"object","properties":{"city":{"type":"string"}}})
        );
        assert_eq!(
            b["toolConfig"]["functionCallingConfig"],
            json!({"mode": "ANY", "allowedFunctionNames": ["weather"]})
        );
        let calls = &b["contents"][1]["parts"];
        assert_eq!(
            calls[0]["functionCall"],
            json!({"id": "c1", "name": "weather", "args": {"city": "Oslo"}})
        );
        assert_eq!(calls[0]["thoughtSignature"], "SIG");
        assert!(calls[1].get("thoughtSignature").is_none());
        let results = &b["contents"][2]["parts"];
        assert_eq!(
            results[0]["functionResponse"],
            json!({"id": "c1", "name": "weather", "response": {"output": "sunny"}})
        );
        assert_eq!(
            results[1]["functionResponse"]["response"],
            json!({"error": "no such city"})
        );
        assert_eq!(b["generationConfig"]["maxOutputTokens"], 99);
        assert_eq!(b["generationConfig"]["thinkingConfig"], json!({"thinkingBudget": 1024}));
        // Gemini 3: levels, and a call whose signature was lost gets the documented stand-in.
        let mut c3 = c.clone();
        if let Part::ToolCall(call) = &mut c3.messages[1].parts[0] {
            call.signature = None;
        }
        let b: Value = serde_json::from_slice(&request(&c3, "gemini-3-pro-preview", None).unwrap()).unwrap();
        assert_eq!(b["contents"][1]["parts"][0]["thoughtSignature"], NO_SIGNATURE);
        assert!(b["contents"][1]["parts"][1].get("thoughtSignature").is_none());
        assert_eq!(b["generationConfig"]["thinkingConfig"], json!({"thinkingLevel": "low"}));
        // Each model's range: Pro thinks always, 3 Pro in two levels.
        for (model, effort, want) in [
            (
                "gemini-3-pro-preview",
                Effort::Medium,
                Ok(json!({"thinkingLevel": "high"})),
            ),
            (
                "gemini-3-pro-preview",
                Effort::Minimal,
                Ok(json!({"thinkingLevel": "low"})),
            ),
            (
                "gemini-3-flash-preview",
                Effort::Medium,
                Ok(json!({"thinkingLevel": "medium"})),
            ),
            ("gemini-2.5-flash", Effort::XHigh, Ok(json!({"thinkingBudget": 24_576}))),
            ("gemini-2.5-flash", Effort::None, Ok(json!({"thinkingBudget": 0}))),
            ("gemini-2.5-pro", Effort::Minimal, Ok(json!({"thinkingBudget": 512}))),
            (
                "gemini-2.5-pro",
                Effort::None,
                Err(CarryError::unsupported(
                    "reasoning_effort: none (this model always thinks)",
                    "gemini",
                )),
            ),
        ] {
            assert_eq!(thinking_config(model, effort), want, "{model} {effort:?}");
        }
    }

    #[test]
    fn formats_and_refusals() {
        let b = body_of(
            r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema","json_schema":{"name":"o","schema":{"type":"object","properties":{"a":{"type":"string"}},"additionalProperties":false},"strict":true}}}"#,
            "gemini-2.5-flash",
        )
        .unwrap();
        assert_eq!(b["generationConfig"]["responseMimeType"], "application/json");
        assert_eq!(
            b["generationConfig"]["responseJsonSchema"]["additionalProperties"],
            false
        );
        for (body, field) in [
            (
                r#"{"messages":[{"role":"user","content":"x"}],"logit_bias":{"1":1}}"#,
                "logit_bias",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"parallel_tool_calls":false}"#,
                "parallel_tool_calls: false",
            ),
            (
                r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x/y.png"}}]}]}"#,
                "image_url with an address (send the image inline, as a data: URL)",
            ),
        ] {
            assert_eq!(
                body_of(body, "gemini-2.5-flash").unwrap_err(),
                CarryError::unsupported(field, "gemini"),
                "{body}"
            );
        }
        let e = body_of(
            r#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"e":{"type":"string","pattern":"@"}}}}}]}"#,
            "gemini-2.5-flash",
        )
        .unwrap_err();
        assert!(
            e.message().contains("pattern") && e.message().contains("tools[0]"),
            "{e:?}"
        );
        let e = body_of(
            r#"{"messages":[{"role":"tool","tool_call_id":"nobody","content":"x"}]}"#,
            "gemini-2.5-flash",
        )
        .unwrap_err();
        assert!(e.message().contains("answers no tool call"), "{e:?}");
    }
}
