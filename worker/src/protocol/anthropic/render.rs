//! Answers and streams in Anthropic's Messages shape, from the conversation model: a `message`
//! ([`message`]) and its event stream ([`EventWriter`]: `message_start`, `content_block_start` /
//! `_delta` / `_stop`, `message_delta`, `message_stop`, each with its `event:` line, as the
//! Anthropic SDKs read them).
//!
//! Tool use ids carry Gemini's signatures (openai/carry.rs); thinking blocks carry Anthropic's
//! own signature, and reasoning no provider signed is shown with an empty one.

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::protocol::conversation::{Answer, Delta, Finish, Part, Usage};
use crate::protocol::openai::carry::carry;
use crate::protocol::sse;

/// A fresh message id.
pub fn message_id() -> String {
    format!("msg_kp{:016x}", rand::random::<u64>())
}

pub fn stop_reason(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "end_turn",
        Finish::Length => "max_tokens",
        Finish::ToolCalls => "tool_use",
        Finish::ContentFilter => "refusal",
    }
}

pub fn usage_json(u: Usage) -> Value {
    json!({
        "input_tokens": (u.prompt_tokens - u.cached_tokens).max(0),
        "output_tokens": u.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": u.cached_tokens,
    })
}

/// A tool call's arguments as a JSON value (they are JSON text of an object).
fn input(arguments: &str) -> Value {
    serde_json::from_str::<&RawValue>(arguments)
        .ok()
        .filter(|_| arguments.trim_start().starts_with('{'))
        .map_or_else(|| json!({}), |r| json!(r))
}

/// A whole answer as a `message`.
pub fn message(answer: &Answer, id: &str, model: &str, usage: Usage) -> Bytes {
    let (parts, finish) = match answer.choices.first() {
        Some(c) => (c.parts.as_slice(), c.finish),
        None => (&[][..], Finish::Stop),
    };
    let mut content = Vec::new();
    for p in parts {
        match p {
            Part::Text(t) if t.is_empty() => {}
            Part::Text(t) => match content.last_mut() {
                Some(Value::Object(last)) if last.get("type") == Some(&json!("text")) => {
                    let joined = format!("{}{t}", last["text"].as_str().unwrap_or(""));
                    last.insert("text".into(), json!(joined));
                }
                _ => content.push(json!({"type": "text", "text": t})),
            },
            Part::Reasoning(r) => content.push(match &r.redacted {
                Some(data) => json!({"type": "redacted_thinking", "data": data}),
                None => json!({"type": "thinking", "thinking": r.text,
                               "signature": r.signature.as_ref().map_or("", |s| s.value.as_ref())}),
            }),
            Part::ToolCall(c) => content.push(json!({
                "type": "tool_use",
                "id": carry(&c.id, c.signature.as_ref(), &[]),
                "name": c.name,
                "input": input(&c.arguments),
            })),
            Part::Image(_) | Part::ToolResult(_) => {}
        }
    }
    Bytes::from(
        json!({
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop_reason(finish),
            "stop_sequence": Value::Null,
            "usage": usage_json(usage),
        })
        .to_string(),
    )
}

/// The block a stream is writing.
#[derive(PartialEq, Eq)]
enum Open {
    None,
    Text,
    Thinking,
    /// A tool use: the provider's call index.
    Tool(u32),
}

/// Writes [`Delta`]s as Messages events.
pub struct EventWriter {
    id: String,
    model: String,
    started: bool,
    index: u32,
    open: Open,
    finish: Option<Finish>,
    usage: Usage,
}

impl EventWriter {
    pub fn new(id: String, model: String) -> EventWriter {
        EventWriter {
            id,
            model,
            started: false,
            index: 0,
            open: Open::None,
            finish: None,
            usage: Usage::default(),
        }
    }

    fn emit(kind: &str, mut data: Value, out: &mut Vec<Bytes>) {
        data["type"] = json!(kind);
        out.push(sse::named(kind, &data.to_string()));
    }

    fn start(&mut self, out: &mut Vec<Bytes>) {
        if self.started {
            return;
        }
        self.started = true;
        let message = json!({
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": Value::Null, "stop_sequence": Value::Null, "usage": usage_json(self.usage),
        });
        Self::emit("message_start", json!({"message": message}), out);
    }

    fn close(&mut self, out: &mut Vec<Bytes>) {
        if self.open != Open::None {
            Self::emit("content_block_stop", json!({"index": self.index}), out);
            self.index += 1;
            self.open = Open::None;
        }
    }

    fn open(&mut self, open: Open, block: Value, out: &mut Vec<Bytes>) {
        self.close(out);
        Self::emit(
            "content_block_start",
            json!({"index": self.index, "content_block": block}),
            out,
        );
        self.open = open;
    }

    /// Writes one delta (the first choice's: Messages has one).
    pub fn write(&mut self, delta: Delta, out: &mut Vec<Bytes>) {
        self.start(out);
        match delta {
            Delta::Text { choice: 0, text } if !text.is_empty() => {
                if self.open != Open::Text {
                    self.open(Open::Text, json!({"type": "text", "text": ""}), out);
                }
                let d = json!({"index": self.index, "delta": {"type": "text_delta", "text": text}});
                Self::emit("content_block_delta", d, out);
            }
            Delta::Reasoning {
                choice: 0,
                text,
                signature,
                redacted,
            } => {
                if let Some(data) = redacted {
                    self.open(Open::Thinking, json!({"type": "redacted_thinking", "data": data}), out);
                    self.close(out);
                    return;
                }
                if self.open != Open::Thinking {
                    self.open(
                        Open::Thinking,
                        json!({"type": "thinking", "thinking": "", "signature": ""}),
                        out,
                    );
                }
                if !text.is_empty() {
                    let d = json!({"index": self.index, "delta": {"type": "thinking_delta", "thinking": text}});
                    Self::emit("content_block_delta", d, out);
                }
                if let Some(s) = signature {
                    let d = json!({"index": self.index, "delta": {"type": "signature_delta", "signature": s.value}});
                    Self::emit("content_block_delta", d, out);
                    self.close(out);
                }
            }
            Delta::ToolCall {
                choice: 0,
                index,
                id,
                name,
                signature,
            } => {
                let block =
                    json!({"type": "tool_use", "id": carry(&id, signature.as_ref(), &[]), "name": name, "input": {}});
                self.open(Open::Tool(index), block, out);
            }
            Delta::ToolArguments {
                choice: 0,
                index,
                fragment,
            } if self.open == Open::Tool(index) && !fragment.is_empty() => {
                let d = json!({"index": self.index, "delta": {"type": "input_json_delta", "partial_json": fragment}});
                Self::emit("content_block_delta", d, out);
            }
            Delta::Finish { choice: 0, finish } => self.finish = Some(finish),
            Delta::Usage(u) => self.usage = u,
            Delta::Error { message } => Self::emit(
                "error",
                json!({"error": {"type": "api_error", "message": message}}),
                out,
            ),
            _ => {}
        }
    }

    /// The stream ended: the open block closed, the stop reason and usage, `message_stop`.
    pub fn finish(&mut self, usage: Usage, out: &mut Vec<Bytes>) {
        self.start(out);
        self.close(out);
        let u = usage_json(usage);
        let d = json!({
            "delta": {"stop_reason": stop_reason(self.finish.unwrap_or(Finish::Stop)), "stop_sequence": Value::Null},
            "usage": {"input_tokens": u["input_tokens"], "output_tokens": u["output_tokens"],
                      "cache_read_input_tokens": u["cache_read_input_tokens"]},
        });
        Self::emit("message_delta", d, out);
        Self::emit("message_stop", json!({}), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::conversation::{Choice, Dialect, Reasoning, Signature, ToolCall};

    #[test]
    fn answers_and_events() {
        let answer = Answer {
            choices: vec![Choice {
                parts: vec![
                    Part::Reasoning(Reasoning {
                        text: "hmm".into(),
                        signature: Some(Signature {
                            dialect: Dialect::Anthropic,
                            value: "SIG".into(),
                        }),
                        redacted: None,
                    }),
                    Part::Text("Check".into()),
                    Part::Text("ing.".into()),
                    Part::ToolCall(ToolCall {
                        id: "c1".into(),
                        name: "weather".into(),
                        arguments: r#"{"city":"Oslo"}"#.into(),
                        signature: None,
                    }),
                ],
                finish: Finish::ToolCalls,
            }],
            usage: None,
        };
        let v: Value = serde_json::from_slice(&message(&answer, "msg_1", "m", Usage::new(5, 7))).unwrap();
        assert_eq!(
            v["content"][0],
            json!({"type": "thinking", "thinking": "hmm", "signature": "SIG"})
        );
        assert_eq!(v["content"][1], json!({"type": "text", "text": "Checking."}));
        assert_eq!(v["content"][2]["input"], json!({"city": "Oslo"}));
        assert_eq!(
            (v["stop_reason"].clone(), v["usage"]["output_tokens"].clone()),
            (json!("tool_use"), json!(7))
        );

        let mut w = EventWriter::new("msg_2".into(), "m".into());
        let mut out = Vec::new();
        w.write(
            Delta::Text {
                choice: 0,
                text: "Hi".into(),
            },
            &mut out,
        );
        w.write(
            Delta::ToolCall {
                choice: 0,
                index: 0,
                id: "c1".into(),
                name: "f".into(),
                signature: None,
            },
            &mut out,
        );
        w.write(
            Delta::ToolArguments {
                choice: 0,
                index: 0,
                fragment: "{}".into(),
            },
            &mut out,
        );
        w.write(
            Delta::Finish {
                choice: 0,
                finish: Finish::ToolCalls,
            },
            &mut out,
        );
        w.finish(Usage::new(3, 4), &mut out);
        let names: Vec<String> = out
            .iter()
            .map(|b| {
                String::from_utf8_lossy(b)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim_start_matches("event: ")
                    .to_string()
            })
            .collect();
        assert_eq!(
            names,
            vec![
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert!(String::from_utf8_lossy(&out[7]).contains("\"stop_reason\":\"tool_use\""));
    }
}
