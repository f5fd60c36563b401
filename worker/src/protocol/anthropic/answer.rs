//! Anthropic's answers read into the conversation model: a Messages response whole ([`answer`])
//! or as its event stream ([`StreamReader`]): `message_start`, `content_block_start` /
//! `_delta` (`text_delta`, `thinking_delta`, `signature_delta`, `input_json_delta`) / `_stop`,
//! `message_delta`, `message_stop`, `error`.
//!
//! Usage: input is `input_tokens` plus both cache counts (Anthropic reports them apart; all are
//! billed), cache reads being the cached part; output includes thinking.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::protocol::conversation::{
    Answer, Choice, Delta, Dialect, Finish, Part, Reasoning, Signature, ToolCall, Usage,
};
use crate::protocol::openai::tokens;

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    content: Vec<BlockIn>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<UsageIn>,
}

/// A content block (read as a struct: serde's tagged enums cannot hold raw JSON).
#[derive(Deserialize)]
struct BlockIn {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    thinking: Option<String>,
    #[serde(default)]
    signature: Option<String>,
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    input: Option<Box<RawValue>>,
}

#[derive(Deserialize, Default, Clone, Copy)]
struct UsageIn {
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
    cache_creation_input_tokens: Option<i64>,
    cache_read_input_tokens: Option<i64>,
}

impl UsageIn {
    /// Counts reported later replace earlier ones (a stream's `message_delta` is cumulative).
    fn merge(&mut self, later: UsageIn) {
        self.input_tokens = later.input_tokens.or(self.input_tokens);
        self.output_tokens = later.output_tokens.or(self.output_tokens);
        self.cache_creation_input_tokens = later.cache_creation_input_tokens.or(self.cache_creation_input_tokens);
        self.cache_read_input_tokens = later.cache_read_input_tokens.or(self.cache_read_input_tokens);
    }

    fn usage(&self) -> Usage {
        let read = tokens(self.cache_read_input_tokens);
        Usage {
            prompt_tokens: tokens(self.input_tokens) + tokens(self.cache_creation_input_tokens) + read,
            completion_tokens: tokens(self.output_tokens),
            cached_tokens: read,
            reasoning_tokens: 0,
        }
    }
}

fn finish(stop: &str) -> Finish {
    match stop {
        "max_tokens" | "model_context_window_exceeded" => Finish::Length,
        "tool_use" => Finish::ToolCalls,
        "refusal" => Finish::ContentFilter,
        _ => Finish::Stop,
    }
}

fn signed(signature: Option<String>) -> Option<Signature<'static>> {
    signature.filter(|s| !s.is_empty()).map(|value| Signature {
        dialect: Dialect::Anthropic,
        value: Cow::Owned(value),
    })
}

/// The usage a whole Messages answer reports, read without the rest: what a pass-through needs,
/// whatever the answer holds.
pub fn usage_of(body: &[u8]) -> Result<Option<Usage>, String> {
    #[derive(Deserialize)]
    struct Head {
        #[serde(default)]
        usage: Option<UsageIn>,
    }
    let h: Head = serde_json::from_slice(body).map_err(|e| format!("Anthropic's answer cannot be read: {e}"))?;
    Ok(h.usage.map(|u| u.usage()))
}

/// A whole Messages answer.
pub fn answer(body: &[u8]) -> Result<Answer, String> {
    let m: Message = serde_json::from_slice(body).map_err(|e| format!("Anthropic's answer cannot be read: {e}"))?;
    let mut parts = Vec::with_capacity(m.content.len());
    for b in m.content {
        match b.kind.as_str() {
            "text" => {
                let text = b.text.unwrap_or_default();
                match parts.last_mut() {
                    Some(Part::Text(prev)) => Cow::to_mut(prev).push_str(&text),
                    _ => parts.push(Part::Text(Cow::Owned(text))),
                }
            }
            "thinking" => parts.push(Part::Reasoning(Reasoning {
                text: Cow::Owned(b.thinking.unwrap_or_default()),
                signature: signed(b.signature),
                redacted: None,
            })),
            "redacted_thinking" => parts.push(Part::Reasoning(Reasoning {
                text: Cow::Borrowed(""),
                signature: None,
                redacted: Some(Cow::Owned(b.data.unwrap_or_default())),
            })),
            "tool_use" => parts.push(Part::ToolCall(ToolCall {
                id: Cow::Owned(b.id.unwrap_or_default()),
                name: Cow::Owned(b.name.unwrap_or_default()),
                arguments: Cow::Owned(b.input.map_or_else(|| "{}".to_string(), |i| i.get().to_string())),
                signature: None,
            })),
            _ => {}
        }
    }
    Ok(Answer {
        choices: vec![Choice {
            parts,
            finish: finish(m.stop_reason.as_deref().unwrap_or("end_turn")),
        }],
        usage: m.usage.map(|u| u.usage()),
    })
}

/// One event of the stream (read as a struct, as blocks are).
#[derive(Deserialize)]
struct EventIn {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: Option<Message>,
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    content_block: Option<BlockIn>,
    #[serde(default)]
    delta: Option<DeltaIn>,
    #[serde(default)]
    usage: Option<UsageIn>,
    #[serde(default)]
    error: Option<Box<RawValue>>,
}

/// A block's delta, or the message's (`stop_reason`).
#[derive(Deserialize)]
struct DeltaIn {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    thinking: Option<String>,
    #[serde(default)]
    signature: Option<String>,
    #[serde(default)]
    partial_json: Option<String>,
    #[serde(default)]
    stop_reason: Option<String>,
}

/// Reads a Messages event stream.
#[derive(Default)]
pub struct StreamReader {
    usage: UsageIn,
    /// Content block index → tool call index, for the blocks that are tool calls.
    tools: Vec<(u32, u32)>,
    stopped: bool,
}

impl StreamReader {
    /// Whether `message_stop` came.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The deltas of one event (`name` is its `event:` line, `data` its data).
    pub fn event(&mut self, name: Option<&str>, data: &str, out: &mut Vec<Delta>) {
        if name == Some("message_stop") {
            self.stopped = true;
            return;
        }
        let Ok(ev) = serde_json::from_str::<EventIn>(data) else {
            return;
        };
        match ev.kind.as_str() {
            "message_start" => {
                if let Some(u) = ev.message.and_then(|m| m.usage) {
                    self.usage.merge(u);
                    out.push(Delta::Usage(self.usage.usage()));
                }
            }
            "content_block_start" => {
                let (Some(index), Some(block)) = (ev.index, ev.content_block) else {
                    return;
                };
                match block.kind.as_str() {
                    "tool_use" => {
                        let tool = self.tools.len() as u32;
                        self.tools.push((index, tool));
                        out.push(Delta::ToolCall {
                            choice: 0,
                            index: tool,
                            id: block.id.unwrap_or_default(),
                            name: block.name.unwrap_or_default(),
                            signature: None,
                        });
                        // Input arrives as deltas; a start that already holds some passes it on.
                        if let Some(i) = block.input.filter(|i| i.get() != "{}") {
                            out.push(Delta::ToolArguments {
                                choice: 0,
                                index: tool,
                                fragment: i.get().to_string(),
                            });
                        }
                    }
                    "redacted_thinking" => out.push(Delta::Reasoning {
                        choice: 0,
                        text: String::new(),
                        signature: None,
                        redacted: block.data,
                    }),
                    "text" => {
                        if let Some(text) = block.text.filter(|t| !t.is_empty()) {
                            out.push(Delta::Text { choice: 0, text });
                        }
                    }
                    _ => {}
                }
            }
            "content_block_delta" => {
                let Some(d) = ev.delta else { return };
                match d.kind.as_deref() {
                    Some("text_delta") => out.push(Delta::Text {
                        choice: 0,
                        text: d.text.unwrap_or_default(),
                    }),
                    Some("thinking_delta") => out.push(Delta::Reasoning {
                        choice: 0,
                        text: d.thinking.unwrap_or_default(),
                        signature: None,
                        redacted: None,
                    }),
                    Some("signature_delta") => out.push(Delta::Reasoning {
                        choice: 0,
                        text: String::new(),
                        signature: signed(d.signature),
                        redacted: None,
                    }),
                    Some("input_json_delta") => {
                        let block = ev.index.unwrap_or(u32::MAX);
                        if let Some((_, tool)) = self.tools.iter().find(|(b, _)| *b == block) {
                            out.push(Delta::ToolArguments {
                                choice: 0,
                                index: *tool,
                                fragment: d.partial_json.unwrap_or_default(),
                            });
                        }
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(u) = ev.usage {
                    self.usage.merge(u);
                    out.push(Delta::Usage(self.usage.usage()));
                }
                if let Some(stop) = ev.delta.and_then(|d| d.stop_reason) {
                    out.push(Delta::Finish {
                        choice: 0,
                        finish: finish(&stop),
                    });
                }
            }
            "message_stop" => self.stopped = true,
            "error" => out.push(Delta::Error {
                message: format!(
                    "the provider reported an error mid-stream: {}",
                    ev.error.as_deref().map_or("", RawValue::get)
                ),
            }),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_with_thinking_tools_and_usage() {
        let a = answer(
            br#"{"id":"msg_1","type":"message","role":"assistant","content":[
                  {"type":"thinking","thinking":"Let me see","signature":"SIG"},
                  {"type":"redacted_thinking","data":"opaque"},
                  {"type":"text","text":"Checking."},
                  {"type":"tool_use","id":"toolu_1","name":"weather","input":{"city":"Oslo"}}],
                "stop_reason":"tool_use",
                "usage":{"input_tokens":10,"output_tokens":20,"cache_creation_input_tokens":3,"cache_read_input_tokens":5}}"#,
        )
        .unwrap();
        let c = &a.choices[0];
        assert_eq!(c.finish, Finish::ToolCalls);
        assert!(
            matches!(&c.parts[0], Part::Reasoning(r) if r.text == "Let me see" && r.signature.as_ref().is_some_and(|s| s.value == "SIG"))
        );
        assert!(matches!(&c.parts[1], Part::Reasoning(r) if r.redacted.as_deref() == Some("opaque")));
        assert_eq!(c.parts[2], Part::Text("Checking.".into()));
        assert!(matches!(&c.parts[3], Part::ToolCall(t) if t.id == "toolu_1" && t.arguments == r#"{"city":"Oslo"}"#));
        assert_eq!(
            a.usage,
            Some(Usage {
                prompt_tokens: 18,
                completion_tokens: 20,
                cached_tokens: 5,
                reasoning_tokens: 0
            })
        );
        assert!(answer(b"{").is_err());
    }

    #[test]
    fn stream_events() {
        let mut r = StreamReader::default();
        let mut out = Vec::new();
        for (name, data) in [
            (
                "message_start",
                r#"{"type":"message_start","message":{"content":[],"usage":{"input_tokens":9,"output_tokens":1}}}"#,
            ),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":""}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"hmm"}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"SIG"}}"#,
            ),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":"f","input":{}}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"a\":"}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"1}"}}"#,
            ),
            ("ping", r#"{"type":"ping"}"#),
            (
                "message_delta",
                r#"{"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":14}}"#,
            ),
            ("message_stop", r#"{"type":"message_stop"}"#),
        ] {
            r.event(Some(name), data, &mut out);
        }
        assert!(r.stopped());
        assert_eq!(out[0], Delta::Usage(Usage::new(9, 1)));
        assert!(matches!(&out[1], Delta::Reasoning { text, .. } if text == "hmm"));
        assert!(matches!(&out[2], Delta::Reasoning { signature: Some(s), .. } if s.value == "SIG"));
        assert!(matches!(&out[3], Delta::ToolCall { index: 0, id, .. } if id == "toolu_1"));
        assert!(matches!(&out[4], Delta::ToolArguments { fragment, .. } if fragment == "{\"a\":"));
        assert!(matches!(&out[5], Delta::ToolArguments { fragment, .. } if fragment == "1}"));
        assert_eq!(out[6], Delta::Usage(Usage::new(9, 14)));
        assert_eq!(
            out[7],
            Delta::Finish {
                choice: 0,
                finish: Finish::ToolCalls
            }
        );
        let mut out = Vec::new();
        r.event(
            Some("error"),
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            &mut out,
        );
        assert!(matches!(&out[0], Delta::Error { message } if message.contains("overloaded_error")));
    }
}
