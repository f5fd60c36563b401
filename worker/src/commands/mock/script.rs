//! What the mock provider answers, whichever format asked: decided from a provider-neutral
//! reading of the request ([`Ask`]), deterministically, so that tests can tell what a client must
//! see.
//!
//! - With tools (and a tool choice other than none), when the conversation does not end with
//!   tool results: a call of the named tool, or of the first one, or of every tool when the last
//!   user text says "parallel" and parallel calls are allowed; arguments made from the tool's
//!   schema ([`example`]: each property its name and a number, enums their first value ...).
//! - When it ends with tool results: text that quotes them, `Tool results: <r1>; <r2>`.
//! - With a JSON schema (or JSON mode): a JSON document that follows the schema.
//! - Else the first words of a fixed text, as many as `--reply-words` and the output cap allow.
//! - With reasoning asked for, reasoning tokens counted apart (4 minimal, 8 low, 16 medium, 32
//!   high) and, where the format shows them, a thought.

use serde_json::{json, Map, Value};

pub const WORDS: &[&str] = &[
    "This",
    "is",
    "a",
    "mock",
    "reply",
    "from",
    "the",
    "pg_keypool",
    "mock",
    "provider,",
    "with",
    "words",
    "that",
    "never",
    "change",
    "so",
    "that",
    "tests",
    "can",
    "count",
    "every",
    "token",
    "they",
    "settle.",
];

/// The thought the mock shows where a format shows thoughts.
pub const THOUGHT: &str = "The mock thinks about it.";

/// How the model may use its tools.
#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    Auto,
    None,
    Required,
    Named(String),
}

/// A request, as the mock reads it in any format.
#[derive(Debug, Clone)]
pub struct Ask {
    /// Declared tools: name and JSON schema of the arguments.
    pub tools: Vec<(String, Value)>,
    pub choice: Choice,
    pub parallel: bool,
    /// The results the conversation ends with, if it ends with tool results.
    pub results: Vec<String>,
    /// The last user text.
    pub last_text: String,
    /// A JSON schema the answer must follow; `Some(Value::Null)` for any JSON object.
    pub schema: Option<Value>,
    /// Reasoning asked for: its tokens.
    pub reasoning: i64,
    pub max_tokens: Option<u64>,
    /// Characters of the prompt.
    pub prompt_chars: usize,
}

/// What the mock answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Tool calls: name and arguments.
    Calls(Vec<(String, Value)>),
    /// Text, and whether the output cap cut it.
    Text { words: Vec<String>, cut: bool },
}

impl Reply {
    /// Output tokens of the reply itself (reasoning apart).
    pub fn tokens(&self) -> i64 {
        match self {
            Reply::Calls(calls) => calls
                .iter()
                .map(|(n, a)| prompt_tokens(n.len() + a.to_string().len()))
                .sum(),
            Reply::Text { words, .. } => words.len() as i64,
        }
    }

    /// The text of a text reply.
    pub fn text(&self) -> String {
        match self {
            Reply::Text { words, .. } => words.concat(),
            Reply::Calls(_) => String::new(),
        }
    }
}

/// Prompt tokens: characters / 4, rounded up.
pub fn prompt_tokens(chars: usize) -> i64 {
    (chars as i64 + 3) / 4
}

/// Reasoning tokens for an effort's name, or a thinking budget.
pub fn reasoning_for_effort(effort: &str) -> i64 {
    match effort {
        "minimal" => 4,
        "low" => 8,
        "medium" => 16,
        "high" | "xhigh" | "max" => 32,
        _ => 0,
    }
}

pub fn reasoning_for_budget(budget: i64) -> i64 {
    match budget {
        i64::MIN..=0 => 0,
        1..=1024 => 8,
        1025..=8192 => 16,
        _ => 32,
    }
}

/// Text split into streamable pieces: each word with the space after it.
fn pieces(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for c in text.chars() {
        current.push(c);
        if c == ' ' {
            out.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// The answer to `ask` with `reply_words` words of plain text at most.
pub fn reply(ask: &Ask, reply_words: usize) -> Reply {
    let calling = !ask.tools.is_empty() && ask.choice != Choice::None && ask.results.is_empty();
    if calling {
        let chosen: Vec<&(String, Value)> = match &ask.choice {
            Choice::Named(name) => ask.tools.iter().filter(|(n, _)| n == name).take(1).collect(),
            _ if ask.parallel && ask.last_text.contains("parallel") => ask.tools.iter().collect(),
            _ => ask.tools.iter().take(1).collect(),
        };
        if !chosen.is_empty() {
            return Reply::Calls(chosen.into_iter().map(|(n, s)| (n.clone(), example(s, n, s))).collect());
        }
    }
    let text = if !ask.results.is_empty() {
        format!("Tool results: {}", ask.results.join("; "))
    } else if let Some(schema) = &ask.schema {
        let doc = if schema.is_null() {
            json!({"result": "mock"})
        } else {
            example(schema, "result", schema)
        };
        return Reply::Text {
            words: vec![doc.to_string()],
            cut: false,
        };
    } else {
        let n = reply_words.max(1);
        WORDS.iter().cycle().take(n).copied().collect::<Vec<_>>().join(" ")
    };
    let words = pieces(&text);
    let cap = (ask.max_tokens.unwrap_or(u64::MAX).min(usize::MAX as u64) as usize).max(1);
    let cut = words.len() > cap;
    let mut words: Vec<String> = words.into_iter().take(cap).collect();
    if let Some(last) = words.last_mut() {
        let trimmed = last.trim_end().len();
        last.truncate(trimmed);
    }
    Reply::Text { words, cut }
}

/// A value that follows `schema` (`root` for `$ref`s), named after `name` where it is text.
pub fn example(schema: &Value, name: &str, root: &Value) -> Value {
    example_at(schema, name, root, 0)
}

fn example_at(schema: &Value, name: &str, root: &Value, depth: usize) -> Value {
    if depth > 16 {
        return Value::Null;
    }
    let Some(s) = schema.as_object() else {
        return json!(format!("{name}-1"));
    };
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        let target = r
            .strip_prefix("#/")
            .and_then(|path| path.split('/').try_fold(root, |v, step| v.get(step)));
        return target.map_or(Value::Null, |t| example_at(t, name, root, depth + 1));
    }
    if let Some(c) = s.get("const") {
        return c.clone();
    }
    if let Some(first) = s.get("enum").and_then(Value::as_array).and_then(|e| e.first()) {
        return first.clone();
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(first) = s.get(key).and_then(Value::as_array).and_then(|a| a.first()) {
            return example_at(first, name, root, depth + 1);
        }
    }
    let kind = match s.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("null"),
        _ if s.contains_key("properties") => "object",
        _ => "string",
    };
    match kind {
        "object" => {
            let mut out = Map::new();
            if let Some(props) = s.get("properties").and_then(Value::as_object) {
                for (k, v) in props {
                    out.insert(k.clone(), example_at(v, k, root, depth + 1));
                }
            }
            Value::Object(out)
        }
        "array" => {
            let n = s.get("minItems").and_then(Value::as_u64).unwrap_or(1).clamp(1, 8);
            let item = s.get("items").cloned().unwrap_or(json!({}));
            Value::Array((0..n).map(|_| example_at(&item, name, root, depth + 1)).collect())
        }
        "integer" => json!(s.get("minimum").and_then(Value::as_i64).unwrap_or(1).max(1)),
        "number" => json!(s.get("minimum").and_then(Value::as_f64).unwrap_or(1.5).max(1.5)),
        "boolean" => json!(true),
        "null" => Value::Null,
        _ => match s.get("format").and_then(Value::as_str) {
            Some("date") => json!("2026-01-01"),
            Some("date-time") => json!("2026-01-01T00:00:00Z"),
            Some("email") => json!("mock@example.com"),
            Some("uri" | "url") => json!("https://example.com/mock"),
            _ => json!(format!("{name}-1")),
        },
    }
}

/// A deterministic signature the mock issues (and checks when it comes back).
pub fn signature(seed: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("mocksig{h:016x}")
}

/// Whether the mock issued `s`.
pub fn is_mock_signature(s: &str) -> bool {
    s.starts_with("mocksig")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask() -> Ask {
        Ask {
            tools: Vec::new(),
            choice: Choice::Auto,
            parallel: true,
            results: Vec::new(),
            last_text: "hi".into(),
            schema: None,
            reasoning: 0,
            max_tokens: None,
            prompt_chars: 2,
        }
    }

    #[test]
    fn tools_are_called_then_their_results_quoted() {
        let weather = json!({"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 2},
                               "unit": {"enum": ["c", "f"]}}, "required": ["city"]});
        let mut a = ask();
        a.tools = vec![("weather".into(), weather), ("time".into(), json!({"type": "object"}))];
        assert_eq!(
            reply(&a, 5),
            Reply::Calls(vec![(
                "weather".into(),
                json!({"city": "city-1", "days": 2, "unit": "c"})
            )])
        );
        a.last_text = "do it in parallel".into();
        assert!(matches!(reply(&a, 5), Reply::Calls(c) if c.len() == 2));
        a.parallel = false;
        assert!(matches!(reply(&a, 5), Reply::Calls(c) if c.len() == 1));
        a.choice = Choice::Named("time".into());
        assert_eq!(reply(&a, 5), Reply::Calls(vec![("time".into(), json!({}))]));
        a.results = vec!["Sunny in city-1".into()];
        assert_eq!(reply(&a, 5).text(), "Tool results: Sunny in city-1");
        a.choice = Choice::None;
        a.results.clear();
        assert_eq!(reply(&a, 3).text(), "This is a");
    }

    #[test]
    fn schemas_and_caps() {
        let mut a = ask();
        a.schema = Some(
            json!({"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
                                "kind": {"$ref": "#/$defs/k"}}, "$defs": {"k": {"const": "x"}}}),
        );
        let doc: Value = serde_json::from_str(&reply(&a, 5).text()).unwrap();
        assert_eq!(doc, json!({"name": "name-1", "tags": ["tags-1"], "kind": "x"}));
        let mut a = ask();
        a.max_tokens = Some(2);
        assert_eq!(
            reply(&a, 5),
            Reply::Text {
                words: vec!["This ".into(), "is".into()],
                cut: true
            }
        );
        assert_eq!(reasoning_for_effort("low"), 8);
        assert_eq!(reasoning_for_budget(24576), 32);
        assert!(is_mock_signature(&signature("x")));
    }
}
