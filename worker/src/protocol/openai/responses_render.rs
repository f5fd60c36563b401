//! Answers and streams in the Responses API's shape, from the conversation model: a `response`
//! object ([`response`]) and its event stream ([`EventWriter`]).
//!
//! Output items the worker makes carry what they hold where it can be known when the item is
//! named: a whole answer's message and reasoning items, and a stream's reasoning items (sent
//! once their signature closes them), are named by their content (carry.rs), so that a client
//! that stores by default and sends them back as `item_reference`s is understood with nothing
//! stored. A streamed message is named before its text is known: a reference to it is refused
//! (send the item itself: `store: false`). A tool call's id carries Gemini's signature.

use bytes::Bytes;
use serde_json::{json, Value};

use super::carry::{self, carry};
use crate::protocol::conversation::{Answer, Delta, Finish, Part, Reasoning, Usage};
use crate::protocol::sse;

/// A fresh response id.
pub fn response_id() -> String {
    format!("resp_kp{:016x}", rand::random::<u64>())
}

fn item_suffix() -> String {
    format!("{:016x}", rand::random::<u64>())
}

pub fn usage_json(u: Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// The response object around `output`.
fn envelope(
    id: &str,
    model: &str,
    created: u64,
    status: &str,
    output: Vec<Value>,
    finish: Option<Finish>,
    usage: Option<Usage>,
) -> Value {
    let incomplete = match finish {
        Some(Finish::Length) => json!({"reason": "max_output_tokens"}),
        Some(Finish::ContentFilter) => json!({"reason": "content_filter"}),
        _ => Value::Null,
    };
    let status = if status == "completed" && !incomplete.is_null() {
        "incomplete"
    } else {
        status
    };
    json!({
        "id": id,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": Value::Null,
        "incomplete_details": incomplete,
        "instructions": Value::Null,
        "metadata": {},
        "model": model,
        "output": output,
        "parallel_tool_calls": true,
        "temperature": Value::Null,
        "tool_choice": "auto",
        "tools": [],
        "top_p": Value::Null,
        "store": false,
        "usage": usage.map_or(Value::Null, usage_json),
    })
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({
        "id": id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    })
}

/// A reasoning item: its shown text as the summary, its signed blocks as encrypted content and
/// in its id.
fn reasoning_item(blocks: &[Reasoning<'_>]) -> Value {
    let text: String = blocks.iter().map(|r| r.text.as_ref()).collect();
    let signed = carry::reasoning_content(blocks);
    let id = match &signed {
        Some(content) => carry::item_id("rs", content),
        None => format!("rs_{}", item_suffix()),
    };
    let summary = if text.is_empty() {
        json!([])
    } else {
        json!([{"type": "summary_text", "text": text}])
    };
    json!({"id": id, "type": "reasoning", "summary": summary, "encrypted_content": signed})
}

fn call_item(call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({
        "id": format!("fc_{}", item_suffix()),
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    })
}

/// A whole answer as a `response` object (the first choice: the Responses API has one).
pub fn response(answer: &Answer, id: &str, model: &str, created: u64, usage: Usage) -> Bytes {
    let mut output = Vec::new();
    let (parts, finish) = match answer.choices.first() {
        Some(c) => (c.parts.as_slice(), Some(c.finish)),
        None => (&[][..], None),
    };
    let mut reasoning: Vec<Reasoning<'_>> = Vec::new();
    let mut text = String::new();
    let flush_text = |text: &mut String, output: &mut Vec<Value>| {
        if !text.is_empty() {
            output.push(message_item(&carry::item_id("msg", text), text, "completed"));
            text.clear();
        }
    };
    for p in parts {
        match p {
            Part::Reasoning(r) => {
                flush_text(&mut text, &mut output);
                reasoning.push(r.clone());
            }
            Part::Text(t) => {
                if !reasoning.is_empty() {
                    output.push(reasoning_item(&reasoning));
                    reasoning.clear();
                }
                text.push_str(t);
            }
            Part::ToolCall(c) => {
                if !reasoning.is_empty() {
                    output.push(reasoning_item(&reasoning));
                    reasoning.clear();
                }
                flush_text(&mut text, &mut output);
                let call_id = carry(&c.id, c.signature.as_ref(), &[]);
                output.push(call_item(&call_id, &c.name, &c.arguments, "completed"));
            }
            Part::Image(_) | Part::ToolResult(_) => {}
        }
    }
    if !reasoning.is_empty() {
        output.push(reasoning_item(&reasoning));
    }
    flush_text(&mut text, &mut output);
    Bytes::from(envelope(id, model, created, "completed", output, finish, Some(usage)).to_string())
}

/// The item a stream is writing.
enum Open {
    None,
    Message { index: usize, id: String, text: String },
}

/// A tool call being written.
struct Call {
    /// Its place among the provider's calls of the choice.
    index: u32,
    output_index: usize,
    item: Value,
    arguments: String,
    done: bool,
}

/// Writes [`Delta`]s as the Responses API's events.
pub struct EventWriter {
    id: String,
    model: String,
    created: u64,
    sequence: u64,
    started: bool,
    /// Items written whole, by output index (`Value::Null` for one still open).
    output: Vec<Value>,
    open: Open,
    calls: Vec<Call>,
    /// Reasoning read so far: shown text and the blocks its signatures closed.
    reasoning_text: String,
    reasoning: Vec<Reasoning<'static>>,
    finish: Option<Finish>,
    failed: Option<String>,
}

impl EventWriter {
    pub fn new(id: String, model: String, created: u64) -> EventWriter {
        EventWriter {
            id,
            model,
            created,
            sequence: 0,
            started: false,
            output: Vec::new(),
            open: Open::None,
            calls: Vec::new(),
            reasoning_text: String::new(),
            reasoning: Vec::new(),
            finish: None,
            failed: None,
        }
    }

    fn emit(&mut self, kind: &str, mut data: Value, out: &mut Vec<Bytes>) {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        out.push(sse::named(kind, &data.to_string()));
    }

    fn start(&mut self, out: &mut Vec<Bytes>) {
        if self.started {
            return;
        }
        self.started = true;
        let r = envelope(
            &self.id,
            &self.model,
            self.created,
            "in_progress",
            Vec::new(),
            None,
            None,
        );
        self.emit("response.created", json!({"response": r}), out);
        self.emit("response.in_progress", json!({"response": r}), out);
    }

    fn close_message(&mut self, out: &mut Vec<Bytes>) {
        if let Open::Message { index, id, text } = std::mem::replace(&mut self.open, Open::None) {
            let part = json!({"type": "output_text", "text": text, "annotations": []});
            self.emit(
                "response.output_text.done",
                json!({"item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}),
                out,
            );
            self.emit(
                "response.content_part.done",
                json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
                out,
            );
            let item = message_item(&id, &text, "completed");
            self.emit(
                "response.output_item.done",
                json!({"output_index": index, "item": item}),
                out,
            );
            self.output[index] = item;
        }
    }

    /// Writes the reasoning read so far as one whole item.
    fn flush_reasoning(&mut self, out: &mut Vec<Bytes>) {
        if self.reasoning.is_empty() && self.reasoning_text.is_empty() {
            return;
        }
        let mut blocks = std::mem::take(&mut self.reasoning);
        let unsigned = std::mem::take(&mut self.reasoning_text);
        if !unsigned.is_empty() {
            blocks.push(Reasoning {
                text: unsigned.into(),
                signature: None,
                redacted: None,
            });
        }
        let item = reasoning_item(&blocks);
        let index = self.output.len();
        let id = item["id"].clone();
        let text: String = blocks.iter().map(|r| r.text.as_ref()).collect();
        let mut added = item.clone();
        added["summary"] = json!([]);
        self.emit(
            "response.output_item.added",
            json!({"output_index": index, "item": added}),
            out,
        );
        if !text.is_empty() {
            self.emit(
                "response.reasoning_summary_part.added",
                json!({"item_id": id, "output_index": index, "summary_index": 0, "part": {"type": "summary_text", "text": ""}}),
                out,
            );
            self.emit(
                "response.reasoning_summary_text.delta",
                json!({"item_id": id, "output_index": index, "summary_index": 0, "delta": text}),
                out,
            );
            self.emit(
                "response.reasoning_summary_text.done",
                json!({"item_id": id, "output_index": index, "summary_index": 0, "text": text}),
                out,
            );
            self.emit(
                "response.reasoning_summary_part.done",
                json!({"item_id": id, "output_index": index, "summary_index": 0, "part": {"type": "summary_text", "text": text}}),
                out,
            );
        }
        self.emit(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
            out,
        );
        self.output.push(item);
    }

    fn close_calls(&mut self, out: &mut Vec<Bytes>) {
        let mut closing = Vec::new();
        for c in self.calls.iter_mut().filter(|c| !c.done) {
            c.done = true;
            c.item["arguments"] = json!(if c.arguments.is_empty() { "{}" } else { &c.arguments });
            c.item["status"] = json!("completed");
            closing.push((c.output_index, c.item.clone()));
        }
        for (index, item) in closing {
            self.emit(
                "response.function_call_arguments.done",
                json!({"item_id": item["id"], "output_index": index, "name": item["name"], "arguments": item["arguments"]}),
                out,
            );
            self.emit(
                "response.output_item.done",
                json!({"output_index": index, "item": item}),
                out,
            );
            self.output[index] = item;
        }
    }

    /// Writes one delta (the first choice's; the Responses API has one).
    pub fn write(&mut self, delta: Delta, out: &mut Vec<Bytes>) {
        self.start(out);
        match delta {
            Delta::Text { choice: 0, text } if !text.is_empty() => {
                self.flush_reasoning(out);
                self.close_calls(out);
                if matches!(self.open, Open::None) {
                    let index = self.output.len();
                    let id = format!("msg_{}", item_suffix());
                    self.output.push(Value::Null);
                    let mut item = message_item(&id, "", "in_progress");
                    item["content"] = json!([]);
                    self.emit(
                        "response.output_item.added",
                        json!({"output_index": index, "item": item}),
                        out,
                    );
                    self.emit(
                        "response.content_part.added",
                        json!({"item_id": id, "output_index": index, "content_index": 0,
                               "part": {"type": "output_text", "text": "", "annotations": []}}),
                        out,
                    );
                    self.open = Open::Message {
                        index,
                        id,
                        text: String::new(),
                    };
                }
                if let Open::Message { index, id, text: all } = &mut self.open {
                    all.push_str(&text);
                    let data = json!({"item_id": id, "output_index": index, "content_index": 0, "delta": text, "logprobs": []});
                    self.emit("response.output_text.delta", data, out);
                }
            }
            Delta::Reasoning {
                choice: 0,
                text,
                signature,
                redacted,
            } => {
                self.close_message(out);
                self.reasoning_text.push_str(&text);
                if let Some(data) = redacted {
                    self.reasoning.push(Reasoning {
                        text: "".into(),
                        signature: None,
                        redacted: Some(data.into()),
                    });
                }
                if signature.is_some() {
                    let text = std::mem::take(&mut self.reasoning_text);
                    self.reasoning.push(Reasoning {
                        text: text.into(),
                        signature,
                        redacted: None,
                    });
                }
            }
            Delta::ToolCall {
                choice: 0,
                index,
                id,
                name,
                signature,
            } => {
                self.close_message(out);
                self.flush_reasoning(out);
                let output_index = self.output.len();
                let item = call_item(&carry(&id, signature.as_ref(), &[]), &name, "", "in_progress");
                self.output.push(Value::Null);
                self.emit(
                    "response.output_item.added",
                    json!({"output_index": output_index, "item": item}),
                    out,
                );
                self.calls.push(Call {
                    index,
                    output_index,
                    item,
                    arguments: String::new(),
                    done: false,
                });
            }
            Delta::ToolArguments {
                choice: 0,
                index,
                fragment,
            } => {
                let Some(c) = self.calls.iter_mut().rev().find(|c| c.index == index && !c.done) else {
                    return;
                };
                c.arguments.push_str(&fragment);
                let data = json!({"item_id": c.item["id"], "output_index": c.output_index, "delta": fragment});
                self.emit("response.function_call_arguments.delta", data, out);
            }
            Delta::Finish { choice: 0, finish } => self.finish = Some(finish),
            Delta::Error { message } => {
                self.failed = Some(message.clone());
                self.emit(
                    "error",
                    json!({"code": "upstream_stream_error", "message": message, "param": Value::Null}),
                    out,
                );
            }
            _ => {}
        }
    }

    /// The stream ended: the open items closed, and `response.completed` (or `.incomplete`,
    /// `.failed`) with the whole response.
    pub fn finish(&mut self, usage: Usage, out: &mut Vec<Bytes>) {
        self.start(out);
        self.close_message(out);
        self.flush_reasoning(out);
        self.close_calls(out);
        let output: Vec<Value> = self.output.iter().filter(|v| !v.is_null()).cloned().collect();
        let (kind, status) = match (&self.failed, self.finish) {
            (Some(_), _) => ("response.failed", "failed"),
            (None, Some(Finish::Length | Finish::ContentFilter)) => ("response.incomplete", "incomplete"),
            _ => ("response.completed", "completed"),
        };
        let mut r = envelope(
            &self.id,
            &self.model,
            self.created,
            status,
            output,
            self.finish,
            Some(usage),
        );
        if let Some(m) = &self.failed {
            r["error"] = json!({"code": "server_error", "message": m});
        }
        self.emit(kind, json!({"response": r}), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::conversation::{Choice, Dialect, Signature, ToolCall};

    fn signed(text: &str) -> Reasoning<'static> {
        Reasoning {
            text: text.to_string().into(),
            signature: Some(Signature {
                dialect: Dialect::Anthropic,
                value: "SIG".into(),
            }),
            redacted: None,
        }
    }

    #[test]
    fn a_whole_answer_names_its_items_by_their_content() {
        let answer = Answer {
            choices: vec![Choice {
                parts: vec![
                    Part::Reasoning(signed("hmm")),
                    Part::Text("Checking.".into()),
                    Part::ToolCall(ToolCall {
                        id: "toolu_1".into(),
                        name: "weather".into(),
                        arguments: r#"{"city":"Oslo"}"#.into(),
                        signature: None,
                    }),
                ],
                finish: Finish::ToolCalls,
            }],
            usage: None,
        };
        let v: Value = serde_json::from_slice(&response(&answer, "resp_1", "m", 7, Usage::new(3, 4))).unwrap();
        assert_eq!(
            (v["object"].clone(), v["status"].clone()),
            (json!("response"), json!("completed"))
        );
        let out = v["output"].as_array().unwrap();
        assert_eq!(out[0]["type"], "reasoning");
        assert_eq!(out[0]["summary"][0]["text"], "hmm");
        let blocks = carry::item_content("rs", out[0]["id"].as_str().unwrap()).unwrap();
        assert_eq!(carry::reasoning_from(&blocks).unwrap(), vec![signed("hmm")]);
        assert_eq!(
            out[1]["content"][0],
            json!({"type": "output_text", "text": "Checking.", "annotations": []})
        );
        assert_eq!(
            carry::item_content("msg", out[1]["id"].as_str().unwrap()).as_deref(),
            Some("Checking.")
        );
        assert_eq!(
            (out[2]["call_id"].clone(), out[2]["arguments"].clone()),
            (json!("toolu_1"), json!(r#"{"city":"Oslo"}"#))
        );
        assert_eq!(v["usage"]["input_tokens"], 3);
        let cut = Answer {
            choices: vec![Choice {
                parts: vec![Part::Text("This".into())],
                finish: Finish::Length,
            }],
            usage: None,
        };
        let v: Value = serde_json::from_slice(&response(&cut, "resp_2", "m", 7, Usage::new(1, 1))).unwrap();
        assert_eq!(
            (v["status"].clone(), v["incomplete_details"]["reason"].clone()),
            (json!("incomplete"), json!("max_output_tokens"))
        );
    }

    #[test]
    fn streams_open_and_close_items_in_order() {
        let mut w = EventWriter::new("resp_1".into(), "m".into(), 7);
        let mut out = Vec::new();
        for d in [
            Delta::Reasoning {
                choice: 0,
                text: "hmm".into(),
                signature: None,
                redacted: None,
            },
            Delta::Reasoning {
                choice: 0,
                text: "".into(),
                signature: Some(Signature {
                    dialect: Dialect::Anthropic,
                    value: "SIG".into(),
                }),
                redacted: None,
            },
            Delta::Text {
                choice: 0,
                text: "Hel".into(),
            },
            Delta::Text {
                choice: 0,
                text: "lo".into(),
            },
            Delta::ToolCall {
                choice: 0,
                index: 0,
                id: "c1".into(),
                name: "f".into(),
                signature: None,
            },
            Delta::ToolArguments {
                choice: 0,
                index: 0,
                fragment: "{\"a\":".into(),
            },
            Delta::ToolArguments {
                choice: 0,
                index: 0,
                fragment: "1}".into(),
            },
            Delta::Finish {
                choice: 0,
                finish: Finish::ToolCalls,
            },
        ] {
            w.write(d, &mut out);
        }
        w.finish(Usage::new(2, 3), &mut out);
        let events: Vec<Value> = out
            .iter()
            .map(|b| {
                let s = String::from_utf8_lossy(b).to_string();
                serde_json::from_str(s.lines().find_map(|l| l.strip_prefix("data: ")).unwrap()).unwrap()
            })
            .collect();
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            vec![
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.reasoning_summary_part.added",
                "response.reasoning_summary_text.delta",
                "response.reasoning_summary_text.done",
                "response.reasoning_summary_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        assert!(events.iter().enumerate().all(|(i, e)| e["sequence_number"] == i as u64));
        let done = &events.last().unwrap()["response"];
        assert_eq!(done["output"].as_array().map(Vec::len), Some(3), "{done}");
        assert_eq!(done["output"][1]["content"][0]["text"], "Hello");
        assert_eq!(done["output"][2]["arguments"], "{\"a\":1}");
        assert_eq!(done["usage"]["output_tokens"], 3);
        // The reasoning item holds its signed block, in its id.
        assert!(carry::item_content("rs", events[7]["item"]["id"].as_str().unwrap()).is_some());
    }
}
