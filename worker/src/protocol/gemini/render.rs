//! Answers and streams in Gemini's own shape, from the conversation model: a
//! `GenerateContentResponse` ([`response`]) and the events of `streamGenerateContent?alt=sse`
//! ([`EventWriter`], each event a partial response; function calls are sent whole, as Gemini
//! sends them).
//!
//! Function calls carry their ids (with Anthropic's signed thinking carried in them, openai/
//! carry.rs) and Gemini's own thought signatures in `thoughtSignature`.

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::protocol::conversation::{Answer, Delta, Dialect, Finish, Part, Reasoning, Signature, Usage};
use crate::protocol::openai::carry::carry;
use crate::protocol::sse;

pub fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Stop | Finish::ToolCalls => "STOP",
        Finish::Length => "MAX_TOKENS",
        Finish::ContentFilter => "SAFETY",
    }
}

pub fn usage_json(u: Usage) -> Value {
    json!({
        "promptTokenCount": u.prompt_tokens,
        "candidatesTokenCount": u.completion_tokens - u.reasoning_tokens,
        "thoughtsTokenCount": u.reasoning_tokens,
        "cachedContentTokenCount": u.cached_tokens,
        "totalTokenCount": u.prompt_tokens + u.completion_tokens,
    })
}

fn args(arguments: &str) -> Value {
    serde_json::from_str::<&RawValue>(arguments)
        .ok()
        .filter(|_| arguments.trim_start().starts_with('{'))
        .map_or_else(|| json!({}), |r| json!(r))
}

/// A function call part: its id carrying what other providers need back, Gemini's signature
/// where Gemini wants it.
fn call_part(
    id: &str,
    name: &str,
    arguments: &str,
    signature: Option<&Signature<'_>>,
    reasoning: &[Reasoning<'_>],
) -> Value {
    let gemini = signature.filter(|s| s.dialect == Dialect::Gemini);
    let other = signature.filter(|s| s.dialect != Dialect::Gemini);
    let mut part = json!({"functionCall": {"id": carry(id, other, reasoning), "name": name, "args": args(arguments)}});
    if let Some(s) = gemini {
        part["thoughtSignature"] = json!(s.value);
    }
    part
}

fn parts_of(parts: &[Part<'_>]) -> Vec<Value> {
    let mut out = Vec::new();
    let mut reasoning: Vec<Reasoning<'_>> = Vec::new();
    for p in parts {
        match p {
            Part::Text(t) if t.is_empty() => {}
            Part::Text(t) => out.push(json!({"text": t})),
            Part::Reasoning(r) => {
                if !r.text.is_empty() {
                    out.push(json!({"text": r.text, "thought": true}));
                }
                reasoning.push(r.clone());
            }
            Part::ToolCall(c) => {
                out.push(call_part(
                    &c.id,
                    &c.name,
                    &c.arguments,
                    c.signature.as_ref(),
                    &reasoning,
                ));
                reasoning.clear();
            }
            Part::Image(_) | Part::ToolResult(_) => {}
        }
    }
    out
}

/// A whole answer as a `GenerateContentResponse`.
pub fn response(answer: &Answer, model: &str, usage: Usage) -> Bytes {
    let candidates: Vec<Value> = answer
        .choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({
                "content": {"role": "model", "parts": parts_of(&c.parts)},
                "finishReason": finish_reason(c.finish),
                "index": i,
            })
        })
        .collect();
    Bytes::from(
        json!({"candidates": candidates, "usageMetadata": usage_json(usage), "modelVersion": model}).to_string(),
    )
}

/// A call being read, sent whole once its arguments are complete.
struct Call {
    choice: u32,
    index: u32,
    id: String,
    name: String,
    arguments: String,
    signature: Option<Signature<'static>>,
    reasoning: Vec<Reasoning<'static>>,
}

/// Writes [`Delta`]s as `streamGenerateContent` events.
pub struct EventWriter {
    model: String,
    calls: Vec<Call>,
    /// Per choice: signed reasoning waiting for the next call to carry it, and the finish.
    reasoning: Vec<(u32, Reasoning<'static>)>,
    reading: String,
    finishes: Vec<(u32, Finish)>,
}

impl EventWriter {
    pub fn new(model: String) -> EventWriter {
        EventWriter {
            model,
            calls: Vec::new(),
            reasoning: Vec::new(),
            reading: String::new(),
            finishes: Vec::new(),
        }
    }

    fn emit(&self, choice: u32, parts: Vec<Value>, finish: Option<Finish>, usage: Option<Usage>, out: &mut Vec<Bytes>) {
        let mut candidate = json!({"content": {"role": "model", "parts": parts}, "index": choice});
        if let Some(f) = finish {
            candidate["finishReason"] = json!(finish_reason(f));
        }
        let mut event = json!({"candidates": [candidate], "modelVersion": self.model});
        if let Some(u) = usage {
            event["usageMetadata"] = usage_json(u);
        }
        out.push(sse::data(&event.to_string()));
    }

    /// Sends the calls read so far, whole.
    fn flush_calls(&mut self, out: &mut Vec<Bytes>) {
        for c in std::mem::take(&mut self.calls) {
            let arguments = if c.arguments.is_empty() { "{}" } else { &c.arguments };
            let part = call_part(&c.id, &c.name, arguments, c.signature.as_ref(), &c.reasoning);
            self.emit(c.choice, vec![part], None, None, out);
        }
    }

    pub fn write(&mut self, delta: Delta, out: &mut Vec<Bytes>) {
        match delta {
            Delta::Text { choice, text } if !text.is_empty() => {
                self.flush_calls(out);
                self.emit(choice, vec![json!({"text": text})], None, None, out);
            }
            Delta::Reasoning {
                choice,
                text,
                signature,
                redacted,
            } => {
                if !text.is_empty() {
                    self.reading.push_str(&text);
                    self.emit(choice, vec![json!({"text": text, "thought": true})], None, None, out);
                }
                if let Some(data) = redacted {
                    self.reasoning.push((
                        choice,
                        Reasoning {
                            text: "".into(),
                            signature: None,
                            redacted: Some(data.into()),
                        },
                    ));
                }
                if signature.is_some() {
                    let text = std::mem::take(&mut self.reading);
                    self.reasoning.push((
                        choice,
                        Reasoning {
                            text: text.into(),
                            signature,
                            redacted: None,
                        },
                    ));
                }
            }
            Delta::ToolCall {
                choice,
                index,
                id,
                name,
                signature,
            } => {
                let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reasoning)
                    .into_iter()
                    .partition(|(c, _)| *c == choice);
                self.reasoning = rest;
                self.calls.push(Call {
                    choice,
                    index,
                    id,
                    name,
                    arguments: String::new(),
                    signature,
                    reasoning: mine.into_iter().map(|(_, r)| r).collect(),
                });
            }
            Delta::ToolArguments {
                choice,
                index,
                fragment,
            } => {
                if let Some(c) = self
                    .calls
                    .iter_mut()
                    .rev()
                    .find(|c| c.choice == choice && c.index == index)
                {
                    c.arguments.push_str(&fragment);
                }
            }
            Delta::Finish { choice, finish } => self.finishes.push((choice, finish)),
            Delta::Error { message } => out.push(sse::data(
                &json!({"error": {"code": 500, "message": message, "status": "INTERNAL"}}).to_string(),
            )),
            _ => {}
        }
    }

    /// The stream ended: the calls still held, then each choice's finish, the last with usage.
    pub fn finish(&mut self, usage: Usage, out: &mut Vec<Bytes>) {
        self.flush_calls(out);
        let finishes = std::mem::take(&mut self.finishes);
        if finishes.is_empty() {
            self.emit(0, Vec::new(), Some(Finish::Stop), Some(usage), out);
        }
        let last = finishes.len().saturating_sub(1);
        for (i, (choice, finish)) in finishes.into_iter().enumerate() {
            self.emit(choice, Vec::new(), Some(finish), (i == last).then_some(usage), out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::conversation::{Choice, ToolCall};

    #[test]
    fn answers_and_events() {
        let answer = Answer {
            choices: vec![Choice {
                parts: vec![
                    Part::Text("Checking.".into()),
                    Part::ToolCall(ToolCall {
                        id: "c1".into(),
                        name: "weather".into(),
                        arguments: r#"{"city":"Oslo"}"#.into(),
                        signature: Some(Signature {
                            dialect: Dialect::Gemini,
                            value: "SIG".into(),
                        }),
                    }),
                ],
                finish: Finish::ToolCalls,
            }],
            usage: None,
        };
        let v: Value = serde_json::from_slice(&response(&answer, "m", Usage::new(3, 4))).unwrap();
        let parts = &v["candidates"][0]["content"]["parts"];
        assert_eq!(parts[0], json!({"text": "Checking."}));
        assert_eq!(
            parts[1],
            json!({"functionCall": {"id": "c1", "name": "weather", "args": {"city": "Oslo"}}, "thoughtSignature": "SIG"})
        );
        assert_eq!(v["candidates"][0]["finishReason"], "STOP");
        assert_eq!(v["usageMetadata"]["totalTokenCount"], 7);

        let mut w = EventWriter::new("m".into());
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
                fragment: "{\"a\":".into(),
            },
            &mut out,
        );
        w.write(
            Delta::ToolArguments {
                choice: 0,
                index: 0,
                fragment: "1}".into(),
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
        w.finish(Usage::new(1, 2), &mut out);
        let events: Vec<Value> = out
            .iter()
            .map(|b| serde_json::from_str(String::from_utf8_lossy(b).trim().trim_start_matches("data: ")).unwrap())
            .collect();
        assert_eq!(events.len(), 3);
        assert_eq!(
            events[1]["candidates"][0]["content"]["parts"][0]["functionCall"]["args"],
            json!({"a": 1})
        );
        assert_eq!(events[2]["candidates"][0]["finishReason"], "STOP");
        assert_eq!(events[2]["usageMetadata"]["promptTokenCount"], 1);
    }
}
