//! OpenAI chat completions answers read into the conversation model, whole ([`answer`]) or as
//! `chat.completion.chunk` events ([`StreamReader`]): for an OpenAI-style key when the app spoke
//! another dialect. Reasoning an OpenAI-compatible server shows (`reasoning_content`,
//! `reasoning`) is kept as unsigned reasoning.

use std::borrow::Cow;

use serde::Deserialize;

use super::WireUsage;
use crate::protocol::conversation::{Answer, Choice, Delta, Finish, Part, Reasoning, ToolCall};

#[derive(Deserialize)]
struct Completion {
    #[serde(default)]
    choices: Vec<ChoiceIn>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct ChoiceIn {
    #[serde(default)]
    index: Option<u32>,
    #[serde(default, alias = "delta")]
    message: Option<MessageIn>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct MessageIn {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default, alias = "reasoning")]
    reasoning_content: Option<String>,
    #[serde(default)]
    tool_calls: Vec<CallIn>,
}

#[derive(Deserialize)]
struct CallIn {
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<FunctionIn>,
}

#[derive(Deserialize)]
struct FunctionIn {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

fn finish(reason: &str) -> Finish {
    match reason {
        "length" => Finish::Length,
        "tool_calls" | "function_call" => Finish::ToolCalls,
        "content_filter" => Finish::ContentFilter,
        _ => Finish::Stop,
    }
}

/// A whole `chat.completion`.
pub fn answer(body: &[u8]) -> Result<Answer, String> {
    let c: Completion =
        serde_json::from_slice(body).map_err(|e| format!("the provider's answer cannot be read: {e}"))?;
    if c.choices.is_empty() {
        return Err("the provider's answer has no choices".into());
    }
    let choices = c
        .choices
        .into_iter()
        .map(|ch| {
            let mut parts: Vec<Part<'static>> = Vec::new();
            let m = ch.message.unwrap_or(MessageIn {
                content: None,
                refusal: None,
                reasoning_content: None,
                tool_calls: Vec::new(),
            });
            if let Some(r) = m.reasoning_content.filter(|r| !r.is_empty()) {
                parts.push(Part::Reasoning(Reasoning {
                    text: Cow::Owned(r),
                    signature: None,
                    redacted: None,
                }));
            }
            if let Some(t) = m.content.or(m.refusal).filter(|t| !t.is_empty()) {
                parts.push(Part::Text(Cow::Owned(t)));
            }
            for (i, call) in m.tool_calls.into_iter().enumerate() {
                let f = call.function.unwrap_or(FunctionIn {
                    name: None,
                    arguments: None,
                });
                parts.push(Part::ToolCall(ToolCall {
                    id: Cow::Owned(call.id.unwrap_or_else(|| format!("call_{i}"))),
                    name: Cow::Owned(f.name.unwrap_or_default()),
                    arguments: Cow::Owned(
                        f.arguments
                            .filter(|a| !a.trim().is_empty())
                            .unwrap_or_else(|| "{}".into()),
                    ),
                    signature: None,
                }));
            }
            Choice {
                parts,
                finish: finish(ch.finish_reason.as_deref().unwrap_or("stop")),
            }
        })
        .collect();
    Ok(Answer {
        choices,
        usage: c.usage.and_then(|u| u.usage()),
    })
}

/// Reads `chat.completion.chunk` events.
#[derive(Default)]
pub struct StreamReader {
    done: bool,
}

impl StreamReader {
    /// Whether `[DONE]` came.
    pub fn done(&self) -> bool {
        self.done
    }

    /// The deltas of one event's data.
    pub fn event(&mut self, data: &str, out: &mut Vec<Delta>) {
        if data == "[DONE]" {
            self.done = true;
            return;
        }
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(data) {
            if let Some(e) = v.get("error") {
                out.push(Delta::Error {
                    message: format!("the provider reported an error mid-stream: {e}"),
                });
                return;
            }
        }
        let Ok(c) = serde_json::from_str::<Completion>(data) else {
            return;
        };
        for (position, ch) in c.choices.into_iter().enumerate() {
            let choice = ch.index.unwrap_or(position as u32);
            if let Some(m) = ch.message {
                if let Some(text) = m.reasoning_content.filter(|t| !t.is_empty()) {
                    out.push(Delta::Reasoning {
                        choice,
                        text,
                        signature: None,
                        redacted: None,
                    });
                }
                if let Some(text) = m.content.or(m.refusal).filter(|t| !t.is_empty()) {
                    out.push(Delta::Text { choice, text });
                }
                for (i, call) in m.tool_calls.into_iter().enumerate() {
                    let index = call.index.unwrap_or(i as u32);
                    let (name, arguments) = call.function.map_or((None, None), |f| (f.name, f.arguments));
                    if let Some(id) = call.id {
                        out.push(Delta::ToolCall {
                            choice,
                            index,
                            id,
                            name: name.unwrap_or_default(),
                            signature: None,
                        });
                    }
                    if let Some(fragment) = arguments.filter(|a| !a.is_empty()) {
                        out.push(Delta::ToolArguments {
                            choice,
                            index,
                            fragment,
                        });
                    }
                }
            }
            if let Some(reason) = ch.finish_reason {
                out.push(Delta::Finish {
                    choice,
                    finish: finish(&reason),
                });
            }
        }
        if let Some(u) = c.usage.and_then(|u| u.usage()) {
            out.push(Delta::Usage(u));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::conversation::Usage;

    #[test]
    fn answers_and_chunks() {
        let a = answer(
            br#"{"choices":[{"index":0,"message":{"role":"assistant","content":null,"reasoning_content":"hmm",
                 "tool_calls":[{"id":"call_1","type":"function","function":{"name":"weather","arguments":"{\"city\":\"Oslo\"}"}}]},
                 "finish_reason":"tool_calls"}],"usage":{"prompt_tokens":5,"completion_tokens":7}}"#,
        )
        .unwrap();
        assert_eq!(a.choices[0].finish, Finish::ToolCalls);
        assert!(matches!(&a.choices[0].parts[0], Part::Reasoning(r) if r.text == "hmm"));
        assert!(
            matches!(&a.choices[0].parts[1], Part::ToolCall(c) if c.id == "call_1" && c.arguments == r#"{"city":"Oslo"}"#)
        );
        assert_eq!(a.usage, Some(Usage::new(5, 7)));
        assert!(answer(br#"{"choices":[]}"#).is_err());

        let mut r = StreamReader::default();
        let mut out = Vec::new();
        for data in [
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"Hi"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"f","arguments":""}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#,
            "[DONE]",
        ] {
            r.event(data, &mut out);
        }
        assert!(r.done());
        assert_eq!(
            out[0],
            Delta::Text {
                choice: 0,
                text: "Hi".into()
            }
        );
        assert!(matches!(&out[1], Delta::ToolCall { id, name, .. } if id == "call_1" && name == "f"));
        assert_eq!(
            out[2],
            Delta::ToolArguments {
                choice: 0,
                index: 0,
                fragment: "{}".into()
            }
        );
        assert_eq!(
            out[3],
            Delta::Finish {
                choice: 0,
                finish: Finish::ToolCalls
            }
        );
        assert_eq!(out[4], Delta::Usage(Usage::new(3, 4)));
    }
}
