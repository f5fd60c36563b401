//! JSON bodies read with bounded memory.
//!
//! A request body is kept as the bytes that arrived. Its top-level members are indexed (name and
//! byte range, [`Object`]) rather than parsed into a tree: a `serde_json::Value` of a few MB of
//! tiny objects takes a hundred times its size, whereas an index costs one entry per member.
//! The parts the worker reads are parsed into small typed values on demand; lists are read with
//! a cap on their length ([`Capped`]); nesting is bounded by serde_json's recursion limit (128).
//! A body passed on to a provider of the same format is re-assembled from the original bytes
//! with only the members the worker must change changed ([`Object::render`]).

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;

use bytes::Bytes;
use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Most top-level members a request may have (OpenAI's chat request has about 35 fields).
pub const MAX_MEMBERS: usize = 256;

/// One member of a JSON object: its name (unescaped) and where its value lies in the body.
#[derive(Clone, Debug)]
struct Member {
    name: String,
    value: Range<usize>,
}

/// A JSON object as it arrived, with an index of its members.
#[derive(Clone)]
pub struct Object {
    raw: Bytes,
    members: Vec<Member>,
}

impl fmt::Debug for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Bodies may carry anything (prompts, images): only their shape is shown.
        f.debug_struct("Object")
            .field("bytes", &self.raw.len())
            .field(
                "members",
                &self.members.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Object {
    /// Indexes a JSON object. Duplicate member names are refused: the worker and the provider
    /// must never read different values of one field.
    pub fn parse(raw: Bytes) -> Result<Object, String> {
        let members = index(&raw)?;
        Ok(Object { raw, members })
    }

    /// The body as it arrived.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    /// The JSON text of member `name`, if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        let m = self.members.iter().find(|m| m.name == name)?;
        // The index was made from this text: it is UTF-8 and the range lies on its boundaries.
        std::str::from_utf8(&self.raw[m.value.clone()]).ok()
    }

    /// Whether member `name` is present (null counts as present).
    pub fn has(&self, name: &str) -> bool {
        self.members.iter().any(|m| m.name == name)
    }

    /// Member `name` parsed as `T`; absent and `null` are `None`. The error names the member.
    pub fn value<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, String> {
        self.borrowed(name)
    }

    /// Member `name` parsed as `T`, borrowing from the body where `T` can.
    pub fn borrowed<'a, T: Deserialize<'a>>(&'a self, name: &str) -> Result<Option<T>, String> {
        match self.get(name) {
            None => Ok(None),
            Some("null") => Ok(None),
            Some(text) => serde_json::from_str(text)
                .map(Some)
                .map_err(|e| format!("`{name}`: {e}")),
        }
    }

    /// The members' names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.members.iter().map(|m| m.name.as_str())
    }

    /// The object with `changes` made: `(name, Some(json))` replaces a member's value (or adds
    /// the member at the end), `(name, None)` removes it. Everything else is copied byte for byte.
    pub fn render(&self, changes: &[(&str, Option<&str>)]) -> Vec<u8> {
        render(&self.raw, &self.members, changes)
    }
}

/// The members of the object `text` holds, with byte ranges into `text`.
fn index(text: &[u8]) -> Result<Vec<Member>, String> {
    let mut de = serde_json::Deserializer::from_slice(text);
    let raw_members = de.deserialize_map(MembersVisitor).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => e.to_string(),
        _ => format!("the body is not valid JSON: {e}"),
    })?;
    de.end().map_err(|e| format!("the body is not valid JSON: {e}"))?;
    let base = text.as_ptr() as usize;
    let mut members: Vec<Member> = Vec::with_capacity(raw_members.len());
    for (name, value) in raw_members {
        let start = value.get().as_ptr() as usize - base;
        let end = start + value.get().len();
        if members.iter().any(|m| m.name == name) {
            return Err(format!("the member `{}` appears twice", printable(&name)));
        }
        members.push(Member {
            name,
            value: start..end,
        });
    }
    Ok(members)
}

/// A name as it may be quoted in an error: at most 40 characters, no control characters.
pub fn printable(name: &str) -> String {
    name.chars()
        .take(40)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

struct MembersVisitor;

impl<'de> Visitor<'de> for MembersVisitor {
    type Value = Vec<(String, &'de RawValue)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the body must be a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(name) = map.next_key::<String>()? {
            if out.len() >= MAX_MEMBERS {
                return Err(de::Error::custom(format!(
                    "the body has more than {MAX_MEMBERS} members"
                )));
            }
            let value: &'de RawValue = map.next_value()?;
            out.push((name, value));
        }
        Ok(out)
    }
}

fn render(raw: &[u8], members: &[Member], changes: &[(&str, Option<&str>)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + 64);
    out.push(b'{');
    let mut first = true;
    let mut put = |out: &mut Vec<u8>, name: &str, value: &[u8]| {
        if !first {
            out.push(b',');
        }
        first = false;
        // A name is a JSON string; serializing a &str cannot fail.
        out.extend_from_slice(serde_json::to_string(name).unwrap_or_default().as_bytes());
        out.push(b':');
        out.extend_from_slice(value);
    };
    for m in members {
        match changes.iter().find(|(n, _)| *n == m.name) {
            Some((_, Some(v))) => put(&mut out, &m.name, v.as_bytes()),
            Some((_, None)) => {}
            None => put(&mut out, &m.name, &raw[m.value.clone()]),
        }
    }
    for (name, value) in changes {
        if let Some(v) = value {
            if !members.iter().any(|m| m.name == *name) {
                put(&mut out, name, v.as_bytes());
            }
        }
    }
    out.push(b'}');
    out
}

/// A nested JSON object given as text (a member's value), with `changes` made as
/// [`Object::render`] makes them.
pub fn render_nested(text: &str, changes: &[(&str, Option<&str>)]) -> Result<String, String> {
    let members = index(text.as_bytes())?;
    String::from_utf8(render(text.as_bytes(), &members, changes)).map_err(|e| e.to_string())
}

/// A string borrowed from the body when it has no escapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text<'a>(pub Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// JSON text borrowed from the body: any value, kept as it was written.
pub fn raw<'de, A: MapAccess<'de>>(map: &mut A) -> Result<Cow<'de, str>, A::Error> {
    let v: &'de RawValue = map.next_value()?;
    Ok(Cow::Borrowed(v.get()))
}

/// What a JSON value weighs as a prompt, read without keeping it: the bytes of its strings, its
/// media (images, files: their data is not text and is counted apart), and how many list items it
/// holds (to refuse requests of more parts than any provider takes, before they take memory).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Weight {
    pub text_bytes: usize,
    pub media: usize,
    pub items: usize,
}

/// Members whose value is media (OpenAI's `image_url`, `file_data`, Anthropic's `source`,
/// Gemini's `inlineData` / `fileData`): counted as one medium each.
const MEDIA_MEMBERS: &[&str] = &[
    "image_url",
    "file_data",
    "source",
    "inlineData",
    "inline_data",
    "fileData",
];

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Weight;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("JSON")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Weight, E> {
                Ok(Weight {
                    text_bytes: v.len(),
                    ..Weight::default()
                })
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Weight, E> {
                Ok(Weight::default())
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Weight, E> {
                Ok(Weight::default())
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Weight, E> {
                Ok(Weight::default())
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Weight, E> {
                Ok(Weight::default())
            }
            fn visit_unit<E: de::Error>(self) -> Result<Weight, E> {
                Ok(Weight::default())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Weight, A::Error> {
                let mut w = Weight::default();
                while let Some(item) = seq.next_element::<Weight>()? {
                    w.add(item);
                    w.items += 1;
                }
                Ok(w)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Weight, A::Error> {
                let mut w = Weight::default();
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    if MEDIA_MEMBERS.contains(&key.as_ref()) {
                        map.next_value::<de::IgnoredAny>()?;
                        w.media += 1;
                    } else {
                        w.add(map.next_value::<Weight>()?);
                        w.text_bytes += key.len();
                    }
                }
                Ok(w)
            }
        }
        d.deserialize_any(V)
    }
}

impl Weight {
    pub fn add(&mut self, other: Weight) {
        self.text_bytes += other.text_bytes;
        self.media += other.media;
        self.items += other.items;
    }

    /// The weight of member `name` of `body` (nothing when absent).
    pub fn of(body: &Object, name: &str) -> Result<Weight, String> {
        match body.get(name) {
            None => Ok(Weight::default()),
            Some(text) => serde_json::from_str(text).map_err(|e| format!("`{name}`: {e}")),
        }
    }
}

/// A list read with at most `N` items: longer lists are refused while they are read, before
/// they take memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capped<T, const N: usize>(pub Vec<T>);

impl<T, const N: usize> Default for Capped<T, N> {
    fn default() -> Self {
        Capped(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for Capped<T, N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T, const N: usize>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for V<T, N> {
            type Value = Capped<T, N>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a list of at most {N} items")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(N).min(1024));
                while let Some(item) = seq.next_element::<T>()? {
                    if out.len() >= N {
                        return Err(de::Error::custom(format!("more than {N} items")));
                    }
                    out.push(item);
                }
                Ok(Capped(out))
            }
        }
        d.deserialize_seq(V::<T, N>(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn members_are_indexed_and_rendered_with_only_the_changes_made() {
        let o = Object::parse(Bytes::from_static(
            br#" {"model": "chat", "messages":[{"role":"user","content":"hi"}],
                 "x-new-field": {"kept": [1, 2.50, "as is"]}, "stream" : true} "#,
        ))
        .unwrap();
        assert_eq!(o.get("model"), Some(r#""chat""#));
        assert_eq!(o.get("x-new-field"), Some(r#"{"kept": [1, 2.50, "as is"]}"#));
        assert_eq!(o.value::<bool>("stream").unwrap(), Some(true));
        assert_eq!(o.value::<bool>("absent").unwrap(), None);
        assert!(o.value::<u64>("model").unwrap_err().contains("`model`"));
        let out = o.render(&[("model", Some(r#""gpt-4o-mini""#)), ("stream", None), ("n", Some("2"))]);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"x-new-field":{"kept": [1, 2.50, "as is"]},"n":2}"#
        );
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["x-new-field"]["kept"][1], 2.5);
    }

    #[test]
    fn escaped_names_and_nested_objects() {
        let o = Object::parse(Bytes::from_static(br#"{"a\"b": 1, "\u006dodel": "m"}"#)).unwrap();
        assert_eq!(o.get("model"), Some(r#""m""#));
        assert_eq!(o.names().collect::<Vec<_>>(), vec!["a\"b", "model"]);
        assert_eq!(String::from_utf8(o.render(&[])).unwrap(), r#"{"a\"b":1,"model":"m"}"#);
        assert_eq!(
            render_nested(
                r#"{"include_usage": false, "other": 1}"#,
                &[("include_usage", Some("true"))]
            )
            .unwrap(),
            r#"{"include_usage":true,"other":1}"#
        );
    }

    #[test]
    fn bad_bodies_are_refused() {
        for (body, why) in [
            (&br#"[1]"#[..], "object"),
            (br#"{"model": "a", "model": "../x"}"#, "twice"),
            (br#"{"a": 1} trailing"#, "not valid JSON"),
            (br#"{"a": "#, "not valid JSON"),
            (b"\"str\"", "object"),
        ] {
            let e = Object::parse(Bytes::copy_from_slice(body)).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        let many: String = format!(
            "{{{}}}",
            (0..=MAX_MEMBERS)
                .map(|i| format!("\"m{i}\":0"))
                .collect::<Vec<_>>()
                .join(",")
        );
        assert!(Object::parse(Bytes::from(many)).unwrap_err().contains("members"));
        // Deep nesting costs the index nothing (it is skipped, not built); reading it as a tree
        // stops at serde_json's recursion limit.
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(200), "]".repeat(200));
        let o = Object::parse(Bytes::from(deep)).unwrap();
        assert!(o.value::<Value>("a").unwrap_err().contains("recursion"));
    }

    #[test]
    fn capped_lists_stop_at_their_cap() {
        let ok: Capped<u32, 3> = serde_json::from_str("[1,2,3]").unwrap();
        assert_eq!(ok.0, vec![1, 2, 3]);
        let e = serde_json::from_str::<Capped<u32, 3>>("[1,2,3,4]").unwrap_err();
        assert!(e.to_string().contains("more than 3"), "{e}");
    }
}
