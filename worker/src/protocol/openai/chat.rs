//! OpenAI's chat completions request as an app sent it: the body kept as it arrived (indexed,
//! json.rs), the few fields the worker itself reads, checked, and the token estimate a
//! reservation is made with. The whole conversation is read only for a provider of another
//! dialect (`chat_parse`).

use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::protocol::conversation::{Conversation, Effort};
use crate::protocol::json::{Capped, Object, Text};

/// Messages one chat request may carry (OpenAI's own limit is 2,048).
pub const MAX_MESSAGES: usize = 10_000;
/// Content parts one message may carry.
pub const MAX_PARTS: usize = 1_000;
/// Content parts one request may carry in all.
pub const MAX_PARTS_IN_ALL: usize = 10_000;
/// Stop sequences one request may carry.
pub const MAX_STOP: usize = 64;
/// Choices one request may ask for (OpenAI's `n` goes up to 128).
pub const MAX_CHOICES: u64 = 128;

/// A chat request as an app sent it (an OpenAI `chat.completions` body): the body as it
/// arrived, indexed (json.rs), and the few fields the worker itself reads, checked.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    body: Object,
    model: Option<String>,
    user: Option<String>,
    stream: bool,
    include_usage: bool,
    max_tokens: Option<u64>,
    choices: u64,
    effort: Option<Effort>,
    prompt: PromptSize,
}

/// What the messages hold, counted while they were checked.
#[derive(Debug, Clone, Copy, Default)]
struct PromptSize {
    messages: usize,
    chars: usize,
}

impl ChatRequest {
    /// Checks the shape the worker relies on; the error is for the caller (HTTP 400). Memory
    /// stays a small multiple of the body's size whatever its shape (json.rs).
    pub fn parse(bytes: Bytes) -> Result<ChatRequest, String> {
        let body = Object::parse(bytes)?;
        let Some(messages) = body.get("messages") else {
            return Err("`messages` (an array) is required".into());
        };
        let sizes: Capped<MessageSize, MAX_MESSAGES> =
            serde_json::from_str(messages).map_err(|e| format!("`messages`: {e}"))?;
        if sizes.0.is_empty() {
            return Err("`messages` must not be empty".into());
        }
        let parts: usize = sizes.0.iter().map(|m| m.parts).sum();
        if parts > MAX_PARTS_IN_ALL {
            return Err(format!(
                "`messages` hold {parts} content parts; at most {MAX_PARTS_IN_ALL} are allowed in one request"
            ));
        }
        // OpenAI's search models bill each search apart from tokens, a cost the pool's budgets
        // and shares do not count.
        if matches!(body.get("web_search_options"), Some(v) if v != "null") {
            return Err("`web_search_options`: searches are billed by the provider per use, which the pool's budgets and shares do not count: not carried".into());
        }
        // Tools and schemas are input the provider bills as well.
        let described: usize = ["tools", "functions", "response_format"]
            .iter()
            .filter_map(|m| body.get(m))
            .map(str::len)
            .sum();
        let prompt = PromptSize {
            messages: sizes.0.len(),
            chars: sizes.0.iter().map(|m| m.chars).sum::<usize>() + described,
        };
        let model: Option<String> = body
            .value("model")
            .map_err(|_| "`model` must be a string".to_string())?;
        let user: Option<String> = body.value("user").map_err(|_| "`user` must be a string".to_string())?;
        let stream: Option<bool> = body
            .value("stream")
            .map_err(|_| "`stream` must be true or false".to_string())?;
        let options: Option<StreamOptions> = body.value("stream_options")?;
        if body.has("max_tokens") && body.has("max_completion_tokens") {
            // A provider might read either: the hold must cover the one it reads.
            return Err("set either `max_completion_tokens` or `max_tokens`, not both".into());
        }
        let mut max_tokens = None;
        for field in ["max_completion_tokens", "max_tokens"] {
            let v: Option<u64> = body
                .value(field)
                .map_err(|_| format!("`{field}` must be a positive integer"))?;
            max_tokens = max_tokens.or(v);
        }
        let choices: Option<u64> = body
            .value("n")
            .map_err(|_| format!("`n` must be an integer from 1 to {MAX_CHOICES}"))?;
        let effort: Option<String> = body
            .value("reasoning_effort")
            .map_err(|_| "`reasoning_effort` must be a string".to_string())?;
        let effort = match effort.as_deref() {
            None => None,
            Some(e) => Some(Effort::parse(e).ok_or_else(|| {
                "`reasoning_effort` must be one of none, minimal, low, medium, high, xhigh".to_string()
            })?),
        };
        if choices.is_some_and(|n| !(1..=MAX_CHOICES).contains(&n)) {
            return Err(format!("`n` must be an integer from 1 to {MAX_CHOICES}"));
        }
        Ok(ChatRequest {
            model,
            user: user.filter(|u| !u.is_empty()),
            stream: stream.unwrap_or(false),
            include_usage: options.and_then(|o| o.include_usage).unwrap_or(false),
            max_tokens,
            choices: choices.unwrap_or(1),
            effort,
            prompt,
            body,
        })
    }

    /// The body as it arrived, indexed.
    pub fn body(&self) -> &Object {
        &self.body
    }

    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    pub fn stream(&self) -> bool {
        self.stream
    }

    /// Whether the app asked for the final usage chunk of a stream.
    pub fn wants_stream_usage(&self) -> bool {
        self.include_usage
    }

    /// The most tokens one choice may generate, if the app said.
    pub fn max_tokens(&self) -> Option<u64> {
        self.max_tokens
    }

    /// How many choices the app asked for (`n`).
    pub fn choices(&self) -> u64 {
        self.choices
    }

    /// The request as a conversation, for a provider of another dialect (strings borrowed from
    /// the body). The error is the caller's (HTTP 400).
    pub fn conversation(&self) -> Result<Conversation<'_>, String> {
        super::chat_parse::conversation(&self.body, self.max_tokens, self.choices, self.effort)
    }

    /// `messages` without the state other providers left in tool call ids (`chat_render::carry`),
    /// for a provider that speaks this dialect (OpenAI takes ids of at most 40 characters, and
    /// the state is not its own); `None` when no id carries any.
    pub fn messages_without_carried_state(&self) -> Option<String> {
        let messages = self.body.get("messages")?;
        if !super::carry::MARKERS.iter().any(|m| messages.contains(m)) {
            return None;
        }
        let list: Capped<&RawValue, MAX_MESSAGES> = serde_json::from_str(messages).ok()?;
        let strip = |id: &str| -> Option<String> {
            let base = super::carry::base_id(&std::borrow::Cow::Borrowed(id));
            (base.len() != id.len()).then(|| serde_json::Value::String(base.into_owned()).to_string())
        };
        let mut out = String::with_capacity(messages.len());
        out.push('[');
        for (i, m) in list.0.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let text = m.get();
            let edited = (super::carry::MARKERS.iter().any(|k| text.contains(k)))
                .then(|| Object::parse(Bytes::copy_from_slice(text.as_bytes())).ok())
                .flatten()
                .map(|message| {
                    let call_id = message
                        .value::<String>("tool_call_id")
                        .ok()
                        .flatten()
                        .and_then(|id| strip(&id));
                    let calls = message.get("tool_calls").and_then(|calls| {
                        let list: Capped<&RawValue, MAX_PARTS> = serde_json::from_str(calls).ok()?;
                        let rendered: Vec<String> = list
                            .0
                            .iter()
                            .map(|c| {
                                Object::parse(Bytes::copy_from_slice(c.get().as_bytes()))
                                    .ok()
                                    .and_then(|call| {
                                        let id = call.value::<String>("id").ok().flatten().and_then(|id| strip(&id))?;
                                        String::from_utf8(call.render(&[("id", Some(&id))])).ok()
                                    })
                                    .unwrap_or_else(|| c.get().to_string())
                            })
                            .collect();
                        Some(format!("[{}]", rendered.join(",")))
                    });
                    let mut changes: Vec<(&str, Option<&str>)> = Vec::new();
                    if let Some(id) = &call_id {
                        changes.push(("tool_call_id", Some(id)));
                    }
                    if let Some(calls) = &calls {
                        changes.push(("tool_calls", Some(calls)));
                    }
                    String::from_utf8(message.render(&changes)).unwrap_or_else(|_| text.to_string())
                });
            out.push_str(edited.as_deref().unwrap_or(text));
        }
        out.push(']');
        Some(out)
    }

    /// Prompt tokens, estimated the way providers do before they count: about four characters
    /// per token plus a few per message.
    pub fn estimate_prompt_tokens(&self) -> i64 {
        (self.prompt.chars as i64 + 3) / 4 + 4 * self.prompt.messages as i64
    }

    /// The most tokens the answer may use: each choice's output cap (the app's, else
    /// [`Self::default_output_cap`]) times the number of choices.
    pub fn estimate_completion_tokens(&self, default_max_tokens: u32) -> i64 {
        let per_choice = self
            .max_tokens
            .unwrap_or_else(|| self.default_output_cap(default_max_tokens))
            .min(1_000_000);
        (per_choice * self.choices) as i64
    }

    /// The output cap of a choice when the app set none: `default_max_tokens`, and the thinking
    /// budget of the reasoning effort asked for (reasoning is output, and billed so).
    pub fn default_output_cap(&self, default_max_tokens: u32) -> u64 {
        default_max_tokens as u64 + self.effort.map_or(0, Effort::budget_tokens)
    }

    /// What a reservation charges up front: the prompt estimate plus the most the answer may
    /// use (OpenAI and Anthropic count the same way).
    pub fn estimate_tokens(&self, default_max_tokens: u32) -> i64 {
        self.estimate_prompt_tokens() + self.estimate_completion_tokens(default_max_tokens)
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// What one message weighs, read without keeping it: it must be an object with a string
/// `role`; its weight is the characters of its text (`content`, or its parts' `text`), the JSON
/// of its tool calls, and [`CHARS_PER_MEDIA_PART`] for each part that is not text.
#[derive(Default)]
struct MessageSize {
    chars: usize,
    parts: usize,
}

/// What an image, audio or file part is counted as, in characters: about 1,500 tokens, more
/// than OpenAI, Anthropic or Gemini charge for a typical image.
pub const CHARS_PER_MEDIA_PART: usize = 6_000;

impl<'de> Deserialize<'de> for MessageSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MessageSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a message object with a `role`")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut role, mut size) = (false, MessageSize::default());
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "role" => {
                            map.next_value::<Text<'de>>()?;
                            role = true;
                        }
                        "content" => {
                            let c = map.next_value::<Chars>()?;
                            size.chars += c.chars;
                            size.parts += c.parts;
                        }
                        // What the model reads back of its own tool calls is billed as input;
                        // each call counts as a part.
                        "tool_calls" => {
                            let raw = map.next_value::<&'de RawValue>()?.get();
                            size.chars += raw.len();
                            if let Ok(calls) = serde_json::from_str::<Capped<IgnoredAny, MAX_PARTS>>(raw) {
                                size.parts += calls.0.len();
                            }
                        }
                        "function_call" | "tool_call_id" => {
                            size.chars += map.next_value::<&'de RawValue>()?.get().len();
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                if !role {
                    return Err(de::Error::custom("a message has no `role`"));
                }
                Ok(size)
            }
        }
        d.deserialize_map(V)
    }
}

/// The weight of a `content` (a string, or parts) and how many parts it has.
struct Chars {
    chars: usize,
    parts: usize,
}

impl<'de> Deserialize<'de> for Chars {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Chars;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`content` as a string or an array of parts")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Chars { chars: 0, parts: 0 })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Chars {
                    chars: v.chars().count(),
                    parts: 0,
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let (mut chars, mut parts) = (0, 0usize);
                while let Some(PartChars(c)) = seq.next_element::<PartChars>()? {
                    parts += 1;
                    if parts > MAX_PARTS {
                        return Err(de::Error::custom(format!("a message has more than {MAX_PARTS} parts")));
                    }
                    chars += c;
                }
                Ok(Chars { chars, parts })
            }
        }
        d.deserialize_any(V)
    }
}

/// The weight of one content part: its text, or [`CHARS_PER_MEDIA_PART`] for any other part.
struct PartChars(usize);

impl<'de> Deserialize<'de> for PartChars {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PartChars;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a content part object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut text, mut media) = (0, false);
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "text" => text = map.next_value::<Text<'de>>()?.0.chars().count(),
                        "type" => media = map.next_value::<Text<'de>>()?.0 != "text",
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(PartChars(if media { CHARS_PER_MEDIA_PART } else { text }))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &[u8]) -> Result<ChatRequest, String> {
        ChatRequest::parse(Bytes::copy_from_slice(body))
    }

    #[test]
    fn requests_are_checked_and_estimated() {
        let r = chat(
            br#"{"model":"chat","messages":[{"role":"user","content":"abcdefgh"},
                {"role":"user","content":[{"type":"text","text":"abcd"}]}],"max_tokens":100,"user":"u1"}"#,
        )
        .unwrap();
        assert_eq!(r.model(), Some("chat"));
        assert_eq!(r.user(), Some("u1"));
        assert_eq!(r.estimate_prompt_tokens(), 3 + 8);
        assert_eq!(r.estimate_tokens(1024), 111);
        assert!(!r.stream());

        assert!(chat(b"[1]").unwrap_err().contains("object"));
        assert!(chat(br#"{"model":"m"}"#).unwrap_err().contains("messages"));
        assert!(chat(br#"{"messages":[]}"#).unwrap_err().contains("empty"));
        assert!(chat(br#"{"messages":[{}]}"#).unwrap_err().contains("role"));
        assert!(chat(br#"{"messages":[{"role":"user"}],"max_tokens":-1}"#).is_err());
        assert!(chat(br#"{"messages":[{"role":"user"}],"model":7}"#).is_err());
        assert!(chat(br#"{"messages":[{"role":"user"}],"stream":"yes"}"#).is_err());
        assert!(chat(br#"{"messages":[{"role":"user"}],"n":0}"#).is_err());
        assert!(chat(br#"{"messages":[{"role":"user"}],"n":129}"#).is_err());
        let no_max = chat(br#"{"messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(no_max.estimate_tokens(256), 1 + 4 + 256);
    }

    #[test]
    fn the_estimate_counts_what_the_provider_bills() {
        let plain = chat(br#"{"messages":[{"role":"user","content":"abcd"}]}"#).unwrap();
        let with_image = chat(
            br#"{"messages":[{"role":"user","content":[{"type":"text","text":"abcd"},{"type":"image_url","image_url":{"url":"https://x/y.png"}}]}]}"#,
        )
        .unwrap();
        assert_eq!(
            with_image.estimate_prompt_tokens() - plain.estimate_prompt_tokens(),
            (CHARS_PER_MEDIA_PART / 4) as i64
        );
        let tools = format!(
            r#"{{"messages":[{{"role":"user","content":"abcd"}}],"tools":[{{"type":"function","function":{{"name":"f","description":"{}"}}}}]}}"#,
            "d".repeat(4000)
        );
        assert!(chat(tools.as_bytes()).unwrap().estimate_prompt_tokens() > 1000);
        let calls = chat(br#"{"messages":[{"role":"assistant","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{\"q\":\"0123456789012345678901234567890123456789\"}"}}]}]}"#).unwrap();
        assert!(
            calls.estimate_prompt_tokens() > 20,
            "{}",
            calls.estimate_prompt_tokens()
        );
        // Both output caps: refused, a provider might read either.
        assert!(
            chat(br#"{"messages":[{"role":"user"}],"max_tokens":5,"max_completion_tokens":1}"#)
                .unwrap_err()
                .contains("not both")
        );
        // Parts are capped per request too.
        let message = format!(
            r#"{{"role":"user","content":[{}]}}"#,
            vec![r#"{"type":"text"}"#; 1000].join(",")
        );
        let many = format!(r#"{{"messages":[{}]}}"#, [message.as_str(); 11].join(","));
        assert!(chat(many.as_bytes()).unwrap_err().contains("in one request"));
    }

    #[test]
    fn the_hold_covers_every_choice() {
        let r = chat(br#"{"messages":[{"role":"user","content":"hi"}],"n":3,"max_completion_tokens":50}"#).unwrap();
        assert_eq!(r.choices(), 3);
        assert_eq!(r.estimate_completion_tokens(1024), 150);
        let r = chat(br#"{"messages":[{"role":"user","content":"hi"}],"n":2}"#).unwrap();
        assert_eq!(r.estimate_completion_tokens(1000), 2000);
    }

    #[test]
    fn state_carried_in_ids_is_taken_out_for_an_openai_style_key() {
        let id = super::super::carry::carry(
            "call_1",
            Some(&crate::protocol::conversation::Signature {
                dialect: crate::protocol::conversation::Dialect::Gemini,
                value: "sig".into(),
            }),
            &[],
        );
        let body = format!(
            r#"{{"messages":[{{"role":"user","content":"a .kpg. in text stays"}},
                {{"role":"assistant","content":null,"tool_calls":[{{"id":"{id}","type":"function","function":{{"name":"f","arguments":"{{}}"}}}},{{"id":"call_2","type":"function","function":{{"name":"f","arguments":"{{}}"}}}}]}},
                {{"role":"tool","tool_call_id":"{id}","content":"ok"}}]}}"#
        );
        let r = chat(body.as_bytes()).unwrap();
        let messages: serde_json::Value = serde_json::from_str(&r.messages_without_carried_state().unwrap()).unwrap();
        assert_eq!(messages[0]["content"], "a .kpg. in text stays");
        assert_eq!(messages[1]["tool_calls"][0]["id"], "call_1");
        assert_eq!(messages[1]["tool_calls"][1]["id"], "call_2");
        assert_eq!(messages[2]["tool_call_id"], "call_1");
        assert!(chat(br#"{"messages":[{"role":"user","content":"x"}]}"#)
            .unwrap()
            .messages_without_carried_state()
            .is_none());
    }
}
