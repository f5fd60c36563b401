//! Answers and streams in OpenAI's chat completions shape, from the conversation model: a
//! `chat.completion` body ([`completion`]) and `chat.completion.chunk` events ([`ChunkWriter`]).
//! Other providers' state rides in the tool call ids (carry.rs).

use std::borrow::Cow;

use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::carry::carry;
use crate::protocol::conversation::{Answer, Delta, Finish, Part, Reasoning, Usage};
use crate::protocol::sse;

pub fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::Length => "length",
        Finish::ToolCalls => "tool_calls",
        Finish::ContentFilter => "content_filter",
    }
}

/// `usage` in OpenAI's shape, with the details when there are any.
pub fn usage_json(u: Usage) -> Value {
    let mut v = json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    });
    if u.cached_tokens > 0 {
        v["prompt_tokens_details"] = json!({"cached_tokens": u.cached_tokens});
    }
    if u.reasoning_tokens > 0 {
        v["completion_tokens_details"] = json!({"reasoning_tokens": u.reasoning_tokens});
    }
    v
}

/// The assistant message of one choice: text, reasoning, tool calls with what they carry.
fn message(parts: &[Part<'_>]) -> Value {
    let mut text = String::new();
    let mut reasoning_text = String::new();
    let mut reasoning: Vec<Reasoning<'_>> = Vec::new();
    let mut calls: Vec<Value> = Vec::new();
    for p in parts {
        match p {
            Part::Text(t) => text.push_str(t),
            Part::Reasoning(r) => {
                reasoning_text.push_str(&r.text);
                reasoning.push(r.clone());
            }
            Part::ToolCall(c) => {
                let id = carry(&c.id, c.signature.as_ref(), &reasoning);
                reasoning.clear();
                calls.push(json!({
                    "id": id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }));
            }
            Part::Image(_) | Part::ToolResult(_) => {}
        }
    }
    let mut m = Map::new();
    m.insert("role".into(), json!("assistant"));
    m.insert(
        "content".into(),
        if text.is_empty() && !calls.is_empty() {
            Value::Null
        } else {
            Value::String(text)
        },
    );
    if !reasoning_text.is_empty() {
        m.insert("reasoning_content".into(), Value::String(reasoning_text));
    }
    if !calls.is_empty() {
        m.insert("tool_calls".into(), Value::Array(calls));
    }
    Value::Object(m)
}

/// A `chat.completion` body.
pub fn completion(answer: &Answer, id: &str, model: &str, created: u64, usage: Usage) -> Bytes {
    let choices: Vec<Value> = answer
        .choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({
                "index": i,
                "message": message(&c.parts),
                "finish_reason": finish_reason(c.finish),
                "logprobs": Value::Null,
            })
        })
        .collect();
    Bytes::from(
        json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": usage_json(usage),
        })
        .to_string(),
    )
}

/// Writes [`Delta`]s as `chat.completion.chunk` events.
pub struct ChunkWriter {
    id: String,
    model: String,
    created: u64,
    wants_usage: bool,
    /// Per choice: whether its first chunk (the role) went out, the reasoning being read, and
    /// the signed reasoning blocks waiting for the next tool call to carry them.
    choices: Vec<ChoiceState>,
}

#[derive(Default)]
struct ChoiceState {
    started: bool,
    reading: String,
    signed: Vec<Reasoning<'static>>,
}

impl ChunkWriter {
    pub fn new(id: String, model: String, created: u64, wants_usage: bool) -> ChunkWriter {
        ChunkWriter {
            id,
            model,
            created,
            wants_usage,
            choices: Vec::new(),
        }
    }

    fn chunk(&self, choice: u32, delta: Value, finish: Option<Finish>, out: &mut Vec<Bytes>) {
        let c = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": choice, "delta": delta, "finish_reason": finish.map(finish_reason), "logprobs": Value::Null}],
        });
        out.push(sse::data(&c.to_string()));
    }

    fn state(&mut self, choice: u32, out: &mut Vec<Bytes>) -> &mut ChoiceState {
        let i = choice as usize;
        if self.choices.len() <= i {
            // Choices are few (`n` is capped); an index beyond the cap is not the provider's to send.
            self.choices.resize_with((i + 1).min(1024), ChoiceState::default);
        }
        let i = i.min(self.choices.len() - 1);
        if !self.choices[i].started {
            self.choices[i].started = true;
            let c = json!({
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [{"index": choice, "delta": {"role": "assistant", "content": ""}, "finish_reason": Value::Null, "logprobs": Value::Null}],
            });
            out.push(sse::data(&c.to_string()));
        }
        &mut self.choices[i]
    }

    /// Writes one delta.
    pub fn write(&mut self, delta: Delta, out: &mut Vec<Bytes>) {
        match delta {
            Delta::Text { choice, text } => {
                self.state(choice, out);
                if !text.is_empty() {
                    self.chunk(choice, json!({"content": text}), None, out);
                }
            }
            Delta::Reasoning {
                choice,
                text,
                signature,
                redacted,
            } => {
                let st = self.state(choice, out);
                st.reading.push_str(&text);
                if let Some(data) = redacted {
                    st.signed.push(Reasoning {
                        text: Cow::Borrowed(""),
                        signature: None,
                        redacted: Some(Cow::Owned(data)),
                    });
                }
                if signature.is_some() {
                    let text = std::mem::take(&mut st.reading);
                    st.signed.push(Reasoning {
                        text: Cow::Owned(text),
                        signature,
                        redacted: None,
                    });
                }
                if !text.is_empty() {
                    self.chunk(choice, json!({"reasoning_content": text}), None, out);
                }
            }
            Delta::ToolCall {
                choice,
                index,
                id,
                name,
                signature,
            } => {
                let st = self.state(choice, out);
                let signed = std::mem::take(&mut st.signed);
                st.reading.clear();
                let id = carry(&id, signature.as_ref(), &signed);
                self.chunk(
                    choice,
                    json!({"tool_calls": [{"index": index, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]}),
                    None,
                    out,
                );
            }
            Delta::ToolArguments {
                choice,
                index,
                fragment,
            } => {
                self.state(choice, out);
                if !fragment.is_empty() {
                    self.chunk(
                        choice,
                        json!({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}),
                        None,
                        out,
                    );
                }
            }
            Delta::Finish { choice, finish } => {
                self.state(choice, out);
                self.chunk(choice, json!({}), Some(finish), out);
            }
            Delta::Usage(_) => {}
            Delta::Error { message } => out.push(sse::data(
                &super::error_body(&message, "server_error", Some("upstream_stream_error")).to_string(),
            )),
        }
    }

    /// The stream ended: the usage chunk if the app asked for it, and `[DONE]`.
    pub fn finish(&mut self, usage: Usage, out: &mut Vec<Bytes>) {
        if self.wants_usage {
            let c = json!({
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage_json(usage),
            });
            out.push(sse::data(&c.to_string()));
        }
        out.push(sse::data("[DONE]"));
    }
}

#[cfg(test)]
mod tests {
    use super::super::carry::uncarry;
    use super::*;
    use crate::protocol::conversation::{Choice, Dialect, Signature, ToolCall};

    fn gemini(value: &str) -> Signature<'static> {
        Signature {
            dialect: Dialect::Gemini,
            value: Cow::Owned(value.to_string()),
        }
    }

    #[test]
    fn completions_and_chunks() {
        let answer = Answer {
            choices: vec![Choice {
                parts: vec![
                    Part::Text("Checking.".into()),
                    Part::ToolCall(ToolCall {
                        id: "c1".into(),
                        name: "weather".into(),
                        arguments: r#"{"city":"Oslo"}"#.into(),
                        signature: Some(gemini("sig")),
                    }),
                ],
                finish: Finish::ToolCalls,
            }],
            usage: None,
        };
        let usage = Usage {
            prompt_tokens: 5,
            completion_tokens: 9,
            cached_tokens: 0,
            reasoning_tokens: 4,
        };
        let v: Value = serde_json::from_slice(&completion(&answer, "chatcmpl-1", "m", 7, usage)).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "Checking.");
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        let call = &v["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["function"]["arguments"], r#"{"city":"Oslo"}"#);
        assert!(call["id"].as_str().unwrap().starts_with("c1.kpg."));
        assert_eq!(v["usage"]["completion_tokens_details"]["reasoning_tokens"], 4);
        assert_eq!(v["usage"]["total_tokens"], 14);

        let mut w = ChunkWriter::new("chatcmpl-2".into(), "m".into(), 7, true);
        let mut out = Vec::new();
        w.write(
            Delta::Reasoning {
                choice: 0,
                text: "hmm".into(),
                signature: None,
                redacted: None,
            },
            &mut out,
        );
        w.write(
            Delta::Reasoning {
                choice: 0,
                text: "".into(),
                signature: Some(Signature {
                    dialect: Dialect::Anthropic,
                    value: "S".into(),
                }),
                redacted: None,
            },
            &mut out,
        );
        w.write(
            Delta::ToolCall {
                choice: 0,
                index: 0,
                id: "toolu_1".into(),
                name: "f".into(),
                signature: None,
            },
            &mut out,
        );
        w.write(
            Delta::ToolArguments {
                choice: 0,
                index: 0,
                fragment: "{\"a\":".into(),
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
        w.finish(usage, &mut out);
        let events: Vec<Value> = out
            .iter()
            .map(|b| String::from_utf8_lossy(b).to_string())
            .filter(|s| !s.contains("[DONE]"))
            .map(|s| serde_json::from_str(s.trim().trim_start_matches("data: ")).unwrap())
            .collect();
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(events[1]["choices"][0]["delta"]["reasoning_content"], "hmm");
        let id = events[2]["choices"][0]["delta"]["tool_calls"][0]["id"]
            .as_str()
            .unwrap()
            .to_string();
        let (base, carried) = uncarry(&Cow::Owned(id));
        assert_eq!(base, "toolu_1");
        assert_eq!(carried.reasoning[0].text, "hmm");
        assert_eq!(
            events[3]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"],
            "{\"a\":"
        );
        assert_eq!(events[4]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(events[5]["usage"]["prompt_tokens"], 5);
        assert!(String::from_utf8_lossy(out.last().unwrap()).contains("[DONE]"));
    }
}
