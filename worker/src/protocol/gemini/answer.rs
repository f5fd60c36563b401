//! Gemini's answers read into the conversation model: a `GenerateContentResponse` whole
//! ([`answer`]) or as the events of `streamGenerateContent?alt=sse` ([`StreamReader`]).
//!
//! Function calls come with no id from older models: each gets one, made once per answer.
//! Their thought signatures travel with them. Gemini ends a choice with tool calls as `STOP`:
//! it is `ToolCalls` here. Thought tokens are counted apart from candidates' and billed as
//! output, so they are added to it.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::protocol::conversation::{
    Answer, Choice, Delta, Dialect, Finish, Part, Reasoning, Signature, ToolCall, Usage,
};
use crate::protocol::openai::tokens;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Response {
    #[serde(default)]
    candidates: Vec<Candidate>,
    #[serde(default)]
    usage_metadata: Option<UsageMetadata>,
    #[serde(default)]
    prompt_feedback: Option<PromptFeedback>,
    #[serde(default)]
    error: Option<Box<RawValue>>,
}

/// Why Gemini answered a prompt with no candidate at all.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    #[serde(default)]
    block_reason: Option<String>,
}

/// Finish reasons that say the model failed to call a function as asked: no answer to pass on.
const FAILED_CALLS: &[&str] = &["MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL", "TOO_MANY_TOOL_CALLS"];

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Content {
    #[serde(default)]
    parts: Vec<PartIn>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PartIn {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    thought: Option<bool>,
    #[serde(default)]
    function_call: Option<FunctionCall>,
    #[serde(default)]
    thought_signature: Option<String>,
}

#[derive(Deserialize)]
struct FunctionCall {
    #[serde(default)]
    id: Option<String>,
    name: String,
    #[serde(default)]
    args: Option<Box<RawValue>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    prompt_token_count: Option<i64>,
    candidates_token_count: Option<i64>,
    thoughts_token_count: Option<i64>,
    cached_content_token_count: Option<i64>,
    tool_use_prompt_token_count: Option<i64>,
}

impl UsageMetadata {
    fn usage(&self) -> Usage {
        let thoughts = tokens(self.thoughts_token_count);
        Usage {
            prompt_tokens: tokens(self.prompt_token_count) + tokens(self.tool_use_prompt_token_count),
            completion_tokens: tokens(self.candidates_token_count) + thoughts,
            cached_tokens: tokens(self.cached_content_token_count),
            reasoning_tokens: thoughts,
        }
    }
}

fn finish(reason: &str, called: bool) -> Finish {
    match reason {
        "MAX_TOKENS" => Finish::Length,
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => Finish::ContentFilter,
        _ if called => Finish::ToolCalls,
        _ => Finish::Stop,
    }
}

/// Ids for calls Gemini gave none: unique within the answer and across answers.
struct CallIds {
    prefix: String,
    next: u32,
}

impl CallIds {
    fn new() -> CallIds {
        CallIds {
            prefix: format!("call_{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff),
            next: 0,
        }
    }

    fn id(&mut self, given: Option<String>) -> String {
        self.next += 1;
        given
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| format!("{}_{}", self.prefix, self.next))
    }
}

fn signature(s: Option<String>) -> Option<Signature<'static>> {
    s.filter(|s| !s.is_empty()).map(|value| Signature {
        dialect: Dialect::Gemini,
        value: Cow::Owned(value),
    })
}

fn arguments(args: Option<Box<RawValue>>) -> String {
    args.map(|a| a.get().to_string())
        .filter(|a| a.trim_start().starts_with('{'))
        .unwrap_or_else(|| "{}".to_string())
}

/// The usage a whole `generateContent` answer reports (`usageMetadata`), read without the rest:
/// what a pass-through needs, whatever the answer holds.
pub fn usage_of(body: &[u8]) -> Result<Option<Usage>, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Head {
        #[serde(default)]
        usage_metadata: Option<UsageMetadata>,
    }
    let h: Head = serde_json::from_slice(body).map_err(|e| format!("Gemini's answer cannot be read: {e}"))?;
    Ok(h.usage_metadata.map(|u| u.usage()))
}

/// A whole `generateContent` answer.
pub fn answer(body: &[u8]) -> Result<Answer, String> {
    let r: Response = serde_json::from_slice(body).map_err(|e| format!("Gemini's answer cannot be read: {e}"))?;
    if r.candidates.is_empty() {
        // A prompt Gemini blocked: an answer filtered away, as OpenAI says it.
        return match r.prompt_feedback.and_then(|f| f.block_reason) {
            Some(_) => Ok(Answer {
                choices: vec![Choice {
                    parts: Vec::new(),
                    finish: Finish::ContentFilter,
                }],
                usage: r.usage_metadata.map(|u| u.usage()),
            }),
            None => Err("Gemini's answer has no candidates".into()),
        };
    }
    if let Some(failed) = r
        .candidates
        .iter()
        .filter_map(|c| c.finish_reason.as_deref())
        .find(|f| FAILED_CALLS.contains(f))
    {
        return Err(format!(
            "Gemini answered {failed}: the model did not make a usable function call"
        ));
    }
    let mut ids = CallIds::new();
    let mut choices = Vec::with_capacity(r.candidates.len());
    for c in r.candidates {
        let mut parts: Vec<Part<'static>> = Vec::new();
        let mut called = false;
        for p in c.content.map(|c| c.parts).unwrap_or_default() {
            if let Some(f) = p.function_call {
                called = true;
                parts.push(Part::ToolCall(ToolCall {
                    id: Cow::Owned(ids.id(f.id)),
                    name: Cow::Owned(f.name),
                    arguments: Cow::Owned(arguments(f.args)),
                    signature: signature(p.thought_signature),
                }));
            } else if let Some(t) = p.text {
                if p.thought == Some(true) {
                    parts.push(Part::Reasoning(Reasoning {
                        text: Cow::Owned(t),
                        signature: None,
                        redacted: None,
                    }));
                } else {
                    match parts.last_mut() {
                        Some(Part::Text(prev)) => prev.to_mut().push_str(&t),
                        _ => parts.push(Part::Text(Cow::Owned(t))),
                    }
                }
            }
        }
        choices.push(Choice {
            parts,
            finish: finish(c.finish_reason.as_deref().unwrap_or("STOP"), called),
        });
    }
    Ok(Answer {
        choices,
        usage: r.usage_metadata.map(|u| u.usage()),
    })
}

/// Reads `streamGenerateContent?alt=sse` events (each a `GenerateContentResponse`).
pub struct StreamReader {
    ids: CallIds,
    /// Per choice: the calls seen so far.
    calls: Vec<u32>,
}

impl Default for StreamReader {
    fn default() -> Self {
        StreamReader {
            ids: CallIds::new(),
            calls: Vec::new(),
        }
    }
}

impl StreamReader {
    /// The deltas of one event's data.
    pub fn event(&mut self, data: &str, out: &mut Vec<Delta>) {
        let r: Response = match serde_json::from_str(data) {
            Ok(r) => r,
            Err(_) => return,
        };
        if let Some(e) = r.error {
            out.push(Delta::Error {
                message: format!("the provider reported an error mid-stream: {}", e.get()),
            });
            return;
        }
        if r.candidates.is_empty() && r.prompt_feedback.is_some_and(|f| f.block_reason.is_some()) {
            out.push(Delta::Finish {
                choice: 0,
                finish: Finish::ContentFilter,
            });
        }
        for (position, c) in r.candidates.into_iter().enumerate() {
            let choice = c.index.unwrap_or(position as u32);
            let slot = (choice as usize).min(1023);
            if self.calls.len() <= slot {
                self.calls.resize(slot + 1, 0);
            }
            for p in c.content.map(|c| c.parts).unwrap_or_default() {
                if let Some(f) = p.function_call {
                    let index = self.calls[slot];
                    self.calls[slot] += 1;
                    out.push(Delta::ToolCall {
                        choice,
                        index,
                        id: self.ids.id(f.id),
                        name: f.name,
                        signature: signature(p.thought_signature),
                    });
                    out.push(Delta::ToolArguments {
                        choice,
                        index,
                        fragment: arguments(f.args),
                    });
                } else if let Some(text) = p.text {
                    if p.thought == Some(true) {
                        out.push(Delta::Reasoning {
                            choice,
                            text,
                            signature: None,
                            redacted: None,
                        });
                    } else {
                        out.push(Delta::Text { choice, text });
                    }
                }
            }
            if let Some(reason) = c.finish_reason {
                if FAILED_CALLS.contains(&reason.as_str()) {
                    out.push(Delta::Error {
                        message: format!("Gemini answered {reason}: the model did not make a usable function call"),
                    });
                }
                out.push(Delta::Finish {
                    choice,
                    finish: finish(&reason, self.calls[slot] > 0),
                });
            }
        }
        if let Some(u) = r.usage_metadata {
            out.push(Delta::Usage(u.usage()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_with_calls_thoughts_and_usage() {
        let a = answer(
            br#"{"candidates":[{"content":{"role":"model","parts":[
                    {"text":"I think","thought":true},
                    {"text":"Let me check."},
                    {"functionCall":{"name":"weather","args":{"city":"Oslo"}},"thoughtSignature":"SIG1"},
                    {"functionCall":{"name":"time"}}]},
                  "finishReason":"STOP","index":0}],
                "usageMetadata":{"promptTokenCount":10,"candidatesTokenCount":5,"thoughtsTokenCount":7,"cachedContentTokenCount":4,"totalTokenCount":22}}"#,
        )
        .unwrap();
        let c = &a.choices[0];
        assert_eq!(c.finish, Finish::ToolCalls);
        assert!(matches!(&c.parts[0], Part::Reasoning(r) if r.text == "I think"));
        assert_eq!(c.parts[1], Part::Text("Let me check.".into()));
        let (Part::ToolCall(a1), Part::ToolCall(a2)) = (&c.parts[2], &c.parts[3]) else {
            panic!("{:?}", c.parts)
        };
        assert_eq!(a1.arguments, r#"{"city":"Oslo"}"#);
        assert_eq!(a1.signature.as_ref().map(|s| s.value.as_ref()), Some("SIG1"));
        assert_eq!(a2.arguments, "{}");
        assert_ne!(a1.id, a2.id);
        assert_eq!(
            a.usage,
            Some(Usage {
                prompt_tokens: 10,
                completion_tokens: 12,
                cached_tokens: 4,
                reasoning_tokens: 7
            })
        );
        let plain =
            answer(br#"{"candidates":[{"content":{"parts":[{"text":"Hi"}]},"finishReason":"MAX_TOKENS"}]}"#).unwrap();
        assert_eq!(plain.choices[0].finish, Finish::Length);
        assert_eq!(plain.usage, None);
        // Gemini 3's own ids are kept.
        let own =
            answer(br#"{"candidates":[{"content":{"parts":[{"functionCall":{"id":"abc","name":"f","args":{}}}]}}]}"#)
                .unwrap();
        assert!(matches!(&own.choices[0].parts[0], Part::ToolCall(c) if c.id == "abc"));
        assert!(answer(b"not json").is_err());
        // A blocked prompt is an answer filtered away; a failed function call is no answer.
        let blocked =
            answer(br#"{"promptFeedback":{"blockReason":"SAFETY"},"usageMetadata":{"promptTokenCount":4}}"#).unwrap();
        assert_eq!(blocked.choices[0].finish, Finish::ContentFilter);
        assert!(answer(br#"{"candidates":[]}"#).is_err());
        let e = answer(br#"{"candidates":[{"content":{"parts":[]},"finishReason":"MALFORMED_FUNCTION_CALL"}]}"#)
            .unwrap_err();
        assert!(e.contains("MALFORMED_FUNCTION_CALL"), "{e}");
    }

    #[test]
    fn stream_events() {
        let mut r = StreamReader::default();
        let mut out = Vec::new();
        r.event(
            r#"{"candidates":[{"content":{"parts":[{"text":"Hel"}]},"index":0}]}"#,
            &mut out,
        );
        r.event(
            r#"{"candidates":[{"content":{"parts":[{"functionCall":{"name":"f","args":{"a":1}},"thoughtSignature":"S"}]},"finishReason":"STOP","index":0}],
                "usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":2,"thoughtsTokenCount":1}}"#,
            &mut out,
        );
        assert_eq!(
            out[0],
            Delta::Text {
                choice: 0,
                text: "Hel".into()
            }
        );
        let Delta::ToolCall {
            index, name, signature, ..
        } = &out[1]
        else {
            panic!("{out:?}")
        };
        assert_eq!((*index, name.as_str()), (0, "f"));
        assert_eq!(signature.as_ref().map(|s| s.value.as_ref()), Some("S"));
        assert_eq!(
            out[2],
            Delta::ToolArguments {
                choice: 0,
                index: 0,
                fragment: r#"{"a":1}"#.into()
            }
        );
        assert_eq!(
            out[3],
            Delta::Finish {
                choice: 0,
                finish: Finish::ToolCalls
            }
        );
        assert_eq!(
            out[4],
            Delta::Usage(Usage {
                prompt_tokens: 3,
                completion_tokens: 3,
                cached_tokens: 0,
                reasoning_tokens: 1
            })
        );
        let mut out = Vec::new();
        r.event(r#"{"error":{"code":500,"message":"boom"}}"#, &mut out);
        assert!(matches!(&out[0], Delta::Error { message } if message.contains("boom")));
    }
}
