//! Answers and streams in OpenAI's chat completions shape, from the conversation model: a
//! `chat.completion` body ([`completion`]) and `chat.completion.chunk` events ([`ChunkWriter`]).
//!
//! OpenAI's chat format has no place for the state other providers attach to an answer and check
//! when it comes back (Gemini's thought signatures, Anthropic's signed thinking blocks), yet
//! every client sends a tool call's id back with its result. So that state rides in the ids of
//! the tool calls ([`carry`]): `<id>.kp<dialect>.<base64url>`, read back by `chat_parse`
//! ([`uncarry`]) and sent only to a provider of the dialect that made it.

use std::borrow::Cow;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::protocol::conversation::{Answer, Delta, Dialect, Finish, Part, Reasoning, Signature, Usage};
use crate::protocol::json::Capped;
use crate::protocol::sse;

/// What marks carried state in a tool call's id.
const MARK: &str = ".kp";

/// The markers of carried state as they stand in an id (a quick test before reading further).
pub const MARKERS: [&str; 2] = [".kpg.", ".kpa."];

/// A tool call id with the provider's state carried in it: the signature of the call, and the
/// signed reasoning that came before it in the same turn.
pub fn carry(id: &str, signature: Option<&Signature<'_>>, reasoning: &[Reasoning<'_>]) -> String {
    let signed: Vec<&Reasoning<'_>> = reasoning
        .iter()
        .filter(|r| r.signature.is_some() || r.redacted.is_some())
        .collect();
    if !signed.is_empty() {
        let blocks: Vec<Value> = signed
            .iter()
            .map(|r| match &r.redacted {
                Some(data) => json!({"r": data}),
                None => json!({"t": r.text, "s": r.signature.as_ref().map(|s| s.value.as_ref())}),
            })
            .collect();
        let dialect = signed[0].signature.as_ref().map_or(Dialect::Anthropic, |s| s.dialect);
        return format!(
            "{id}{MARK}{}.{}",
            dialect.tag(),
            URL_SAFE_NO_PAD.encode(Value::Array(blocks).to_string())
        );
    }
    match signature {
        Some(s) => format!(
            "{id}{MARK}{}.{}",
            s.dialect.tag(),
            URL_SAFE_NO_PAD.encode(s.value.as_bytes())
        ),
        None => id.to_string(),
    }
}

/// What a tool call's id carried.
#[derive(Debug, Default, PartialEq)]
pub struct Carried {
    /// The call's own signature (Gemini).
    pub signature: Option<Signature<'static>>,
    /// Signed reasoning that came before the call (Anthropic).
    pub reasoning: Vec<Reasoning<'static>>,
}

/// Most carried state one id may hold (base64url): signatures are a few hundred bytes, thinking
/// blocks a few tens of kilobytes.
const MAX_CARRIED: usize = 1 << 20;

/// Most signed reasoning blocks one id may carry.
const MAX_CARRIED_BLOCKS: usize = 16;

/// Where the carried state of `id` starts (the marker), its dialect and payload, if it carries
/// any.
fn carried_part(id: &str) -> Option<(usize, Dialect, &str)> {
    let at = id.rfind(MARK)?;
    let (tag, payload) = id[at + MARK.len()..].split_once('.')?;
    let dialect = Dialect::from_tag(tag)?;
    let plain = payload
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (!payload.is_empty() && plain).then_some((at, dialect, payload))
}

/// A tool call id without the state [`carry`] put in it (not decoded).
pub fn base_id<'a>(id: &Cow<'a, str>) -> Cow<'a, str> {
    match (carried_part(id), id) {
        (None, id) => id.clone(),
        (Some((at, ..)), Cow::Borrowed(s)) => Cow::Borrowed(&s[..at]),
        (Some((at, ..)), Cow::Owned(s)) => Cow::Owned(s[..at].to_string()),
    }
}

/// One signed reasoning block as [`carry`] writes it.
#[derive(serde::Deserialize)]
struct Block {
    #[serde(default)]
    t: Option<String>,
    #[serde(default)]
    s: Option<String>,
    #[serde(default)]
    r: Option<String>,
}

/// A tool call id without the state [`carry`] put in it, and that state. An id that carries
/// nothing (or nothing readable, or more than [`MAX_CARRIED`]) is returned as it is.
pub fn uncarry<'a>(id: &Cow<'a, str>) -> (Cow<'a, str>, Carried) {
    let nothing = || (id.clone(), Carried::default());
    let Some((_, dialect, payload)) = carried_part(id) else {
        return nothing();
    };
    if payload.len() > MAX_CARRIED {
        return nothing();
    }
    let Some(text) = URL_SAFE_NO_PAD
        .decode(payload)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
    else {
        return nothing();
    };
    let mut carried = Carried::default();
    match dialect {
        Dialect::Anthropic => {
            let Ok(blocks) = serde_json::from_str::<Capped<Block, MAX_CARRIED_BLOCKS>>(&text) else {
                return nothing();
            };
            for b in blocks.0 {
                carried.reasoning.push(match b.r {
                    Some(data) => Reasoning {
                        text: Cow::Borrowed(""),
                        signature: None,
                        redacted: Some(Cow::Owned(data)),
                    },
                    None => Reasoning {
                        text: Cow::Owned(b.t.unwrap_or_default()),
                        signature: b.s.map(|s| Signature {
                            dialect,
                            value: Cow::Owned(s),
                        }),
                        redacted: None,
                    },
                });
            }
        }
        _ => {
            carried.signature = Some(Signature {
                dialect,
                value: Cow::Owned(text),
            })
        }
    }
    (base_id(id), carried)
}

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
    use super::*;
    use crate::protocol::conversation::{Choice, ToolCall};

    fn gemini(value: &str) -> Signature<'static> {
        Signature {
            dialect: Dialect::Gemini,
            value: Cow::Owned(value.to_string()),
        }
    }

    #[test]
    fn state_rides_in_ids_and_comes_back() {
        assert_eq!(carry("call_1", None, &[]), "call_1");
        let id = carry("call_1", Some(&gemini("CiQB+/sig==")), &[]);
        assert!(id.starts_with("call_1.kpg."), "{id}");
        assert!(
            id.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
            "{id}"
        );
        let (base, carried) = uncarry(&Cow::Borrowed(id.as_str()));
        assert_eq!(base, "call_1");
        assert_eq!(carried.signature, Some(gemini("CiQB+/sig==")));

        let thinking = [
            Reasoning {
                text: "let me see".into(),
                signature: Some(Signature {
                    dialect: Dialect::Anthropic,
                    value: "EqQB".into(),
                }),
                redacted: None,
            },
            Reasoning {
                text: "".into(),
                signature: None,
                redacted: Some("opaque".into()),
            },
        ];
        let id = carry("toolu_01", None, &thinking);
        let (base, carried) = uncarry(&Cow::Owned(id));
        assert_eq!(base, "toolu_01");
        assert_eq!(carried.reasoning, thinking.to_vec());
        // Ids that carry nothing, or nothing readable, stay as they are.
        let huge = format!(
            "a.kpa.{}",
            URL_SAFE_NO_PAD.encode(format!("[{}]", vec!["{}"; 500_000].join(",")))
        );
        for plain in [
            "call_x",
            "a.kpg.",
            "a.kpz.AAAA",
            "a.kpg.!!",
            "a.kpa.bm90IGpzb24",
            huge.as_str(),
        ] {
            let (base, carried) = uncarry(&Cow::Borrowed(plain));
            assert_eq!((base.as_ref(), carried), (plain, Carried::default()));
        }
        // More blocks than one turn has: nothing is read.
        let many = format!(
            "a.kpa.{}",
            URL_SAFE_NO_PAD.encode(format!("[{}]", vec![r#"{"r":"x"}"#; 17].join(",")))
        );
        assert_eq!(uncarry(&Cow::Borrowed(many.as_str())).1, Carried::default());
        assert_eq!(base_id(&Cow::Borrowed("toolu_1.kpa.AAAA")), "toolu_1");
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
