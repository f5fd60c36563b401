//! State other providers attach to an answer and check when it comes back (Gemini's thought
//! signatures, Anthropic's signed thinking blocks), carried in ids the client sends back anyway.
//!
//! OpenAI's formats have no field for it, yet every client sends a tool call's id back with its
//! result: the state rides in the ids of the tool calls ([`carry`]):
//! `<id>.kp<dialect>.<base64url>`, read back with caps ([`uncarry`]) and sent only to a provider
//! of the dialect that made it; [`base_id`] is the id without it, for the provider.

use std::borrow::Cow;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};

use crate::protocol::conversation::{Dialect, Reasoning, Signature};
use crate::protocol::json::Capped;

/// What marks carried state in a tool call's id.
const MARK: &str = ".kp";

/// The markers of carried state as they stand in an id (a quick test before reading further).
pub const MARKERS: [&str; 2] = [".kpg.", ".kpa."];

/// Signed reasoning blocks as carried: `[{"t": text, "s": signature} | {"r": redacted}]`, or
/// `None` when none of them is signed.
fn encode_blocks(reasoning: &[Reasoning<'_>]) -> Option<String> {
    let blocks: Vec<Value> = reasoning
        .iter()
        .filter(|r| r.signature.is_some() || r.redacted.is_some())
        .map(|r| match &r.redacted {
            Some(data) => json!({"r": data}),
            None => json!({"t": r.text, "s": r.signature.as_ref().map(|s| s.value.as_ref())}),
        })
        .collect();
    (!blocks.is_empty()).then(|| Value::Array(blocks).to_string())
}

/// A tool call id with the provider's state carried in it: the signature of the call, and the
/// signed reasoning that came before it in the same turn.
pub fn carry(id: &str, signature: Option<&Signature<'_>>, reasoning: &[Reasoning<'_>]) -> String {
    if let Some(blocks) = encode_blocks(reasoning) {
        let dialect = reasoning
            .iter()
            .find_map(|r| r.signature.as_ref())
            .map_or(Dialect::Anthropic, |s| s.dialect);
        return format!("{id}{MARK}{}.{}", dialect.tag(), URL_SAFE_NO_PAD.encode(blocks));
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

/// What marks an output item id that carries what it holds (the Responses API's items, which
/// clients send back as references only).
const ITEM_MARK: &str = "_kp";

/// The id of an output item that holds `content` (a message's text, reasoning blocks): a
/// reference to it can be resolved with nothing stored. `prefix` says what it is (`msg`, `rs`).
pub fn item_id(prefix: &str, content: &str) -> String {
    format!("{prefix}{ITEM_MARK}{}", URL_SAFE_NO_PAD.encode(content.as_bytes()))
}

/// What an id from [`item_id`] with `prefix` holds, if it is one (and within the caps).
pub fn item_content(prefix: &str, id: &str) -> Option<String> {
    let payload = id.strip_prefix(prefix)?.strip_prefix(ITEM_MARK)?;
    if payload.len() > MAX_CARRIED {
        return None;
    }
    String::from_utf8(URL_SAFE_NO_PAD.decode(payload).ok()?).ok()
}

/// The reasoning an output item carries (its signed blocks), as JSON text for [`item_id`].
pub fn reasoning_content(reasoning: &[Reasoning<'_>]) -> Option<String> {
    encode_blocks(reasoning)
}

/// Reasoning blocks read back from [`reasoning_content`] text.
pub fn reasoning_from(text: &str) -> Option<Vec<Reasoning<'static>>> {
    decode_blocks(text, Dialect::Anthropic)
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

fn decode_blocks(text: &str, dialect: Dialect) -> Option<Vec<Reasoning<'static>>> {
    let blocks: Capped<Block, MAX_CARRIED_BLOCKS> = serde_json::from_str(text).ok()?;
    Some(
        blocks
            .0
            .into_iter()
            .map(|b| match b.r {
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
            })
            .collect(),
    )
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
        Dialect::Anthropic => match decode_blocks(&text, dialect) {
            Some(blocks) => carried.reasoning = blocks,
            None => return nothing(),
        },
        _ => {
            carried.signature = Some(Signature {
                dialect,
                value: Cow::Owned(text),
            })
        }
    }
    (base_id(id), carried)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn items_hold_what_they_refer_to() {
        let id = item_id("msg", "Let me check.");
        assert!(id.starts_with("msg_kp"));
        assert_eq!(item_content("msg", &id).as_deref(), Some("Let me check."));
        assert_eq!(item_content("rs", &id), None);
        assert_eq!(item_content("msg", "msg_67ccd2bf17f0"), None);
        let blocks = [Reasoning {
            text: "hmm".into(),
            signature: Some(Signature {
                dialect: Dialect::Anthropic,
                value: "S".into(),
            }),
            redacted: None,
        }];
        let text = reasoning_content(&blocks).unwrap();
        assert_eq!(reasoning_from(&text).unwrap(), blocks.to_vec());
        assert_eq!(
            reasoning_content(&[Reasoning {
                text: "unsigned".into(),
                signature: None,
                redacted: None
            }]),
            None
        );
    }
}
