//! OpenAI's embeddings request (`/v1/embeddings`): checked, its inputs counted.

use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use crate::protocol::json::Object;

/// Inputs one embeddings request may carry (OpenAI's limit).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// An embeddings request as an app sent it (an OpenAI `/v1/embeddings` body).
#[derive(Debug, Clone)]
pub struct EmbeddingsRequest {
    body: Object,
    model: Option<String>,
    user: Option<String>,
    input: EmbeddingInput,
    base64: bool,
    dimensions: Option<u64>,
}

/// What an embeddings request embeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbeddingInput {
    Texts(Vec<String>),
    /// Token ids (how many in all); only OpenAI-style providers take them.
    Tokens(usize),
}

impl EmbeddingsRequest {
    /// Checks the shape; the error is for the caller (HTTP 400).
    pub fn parse(bytes: Bytes) -> Result<EmbeddingsRequest, String> {
        let body = Object::parse(bytes)?;
        let input = match body.get("input") {
            None | Some("null") => return Err("`input` is required".into()),
            Some(text) => {
                serde_json::from_str::<InputIn>(text)
                    .map_err(|e| format!("`input`: {e}"))?
                    .0
            }
        };
        let model: Option<String> = body
            .value("model")
            .map_err(|_| "`model` must be a string".to_string())?;
        let user: Option<String> = body.value("user").map_err(|_| "`user` must be a string".to_string())?;
        const FORMAT: &str = "`encoding_format` must be \"float\" or \"base64\"";
        let format: Option<String> = body.value("encoding_format").map_err(|_| FORMAT.to_string())?;
        let base64 = match format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(_) => return Err(FORMAT.into()),
        };
        let dimensions: Option<u64> = body
            .value("dimensions")
            .map_err(|_| "`dimensions` must be a positive integer".to_string())?;
        if dimensions.is_some_and(|n| !(1..=65_536).contains(&n)) {
            return Err("`dimensions` must be a positive integer".into());
        }
        Ok(EmbeddingsRequest {
            body,
            model,
            user: user.filter(|u| !u.is_empty()),
            input,
            base64,
            dimensions,
        })
    }

    pub fn body(&self) -> &Object {
        &self.body
    }

    /// The inputs: texts, or how many token ids.
    pub fn input(&self) -> &EmbeddingInput {
        &self.input
    }

    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// Whether the app wants each embedding as base64 of little-endian float32s.
    pub fn wants_base64(&self) -> bool {
        self.base64
    }

    pub fn dimensions(&self) -> Option<u64> {
        self.dimensions
    }

    /// Input tokens: counted for token ids, about four characters per token for text. Settled
    /// when the provider reports none.
    pub fn estimate_tokens(&self) -> i64 {
        match &self.input {
            EmbeddingInput::Texts(texts) => texts.iter().map(|t| (t.chars().count() as i64 + 3) / 4).sum(),
            EmbeddingInput::Tokens(n) => *n as i64,
        }
    }
}

const INPUT_SHAPE: &str = "a string, an array of strings, or an array of token arrays";

/// `input`, read with at most [`MAX_EMBEDDING_INPUTS`] items and without keeping token ids.
struct InputIn(EmbeddingInput);

impl<'de> Deserialize<'de> for InputIn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = InputIn;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(INPUT_SHAPE)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(InputIn(EmbeddingInput::Texts(vec![v.to_string()])))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut texts: Vec<String> = Vec::new();
                let (mut items, mut flat, mut lists, mut in_lists) = (0usize, 0usize, 0usize, 0usize);
                while let Some(item) = seq.next_element::<InputItem>()? {
                    items += 1;
                    if items > MAX_EMBEDDING_INPUTS {
                        return Err(de::Error::custom(format!(
                            "more than {MAX_EMBEDDING_INPUTS} items; at most {MAX_EMBEDDING_INPUTS} are allowed"
                        )));
                    }
                    match item {
                        InputItem::Text(t) => texts.push(t),
                        InputItem::Token => flat += 1,
                        InputItem::Tokens(0) => return Err(de::Error::custom("a token array is empty")),
                        InputItem::Tokens(n) => {
                            lists += 1;
                            in_lists += n;
                        }
                    }
                }
                match (texts.len(), flat, lists) {
                    (0, 0, 0) => Err(de::Error::custom("`input` must not be empty")),
                    (_, 0, 0) => Ok(InputIn(EmbeddingInput::Texts(texts))),
                    (0, n, 0) => Ok(InputIn(EmbeddingInput::Tokens(n))),
                    (0, 0, _) => Ok(InputIn(EmbeddingInput::Tokens(in_lists))),
                    _ => Err(de::Error::custom(INPUT_SHAPE)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

enum InputItem {
    Text(String),
    Token,
    Tokens(usize),
}

impl<'de> Deserialize<'de> for InputItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = InputItem;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(INPUT_SHAPE)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(InputItem::Text(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(InputItem::Token)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut n = 0;
                while seq.next_element::<u64>()?.is_some() {
                    n += 1;
                }
                Ok(InputItem::Tokens(n))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_inputs() {
        let e = |b: &str| EmbeddingsRequest::parse(Bytes::copy_from_slice(b.as_bytes()));
        assert_eq!(
            e(r#"{"input":"abcd"}"#).unwrap().input(),
            &EmbeddingInput::Texts(vec!["abcd".into()])
        );
        assert_eq!(e(r#"{"input":[1,2,3]}"#).unwrap().input(), &EmbeddingInput::Tokens(3));
        assert_eq!(e(r#"{"input":[[1,2],[3]]}"#).unwrap().estimate_tokens(), 3);
        assert!(e(r#"{"input":["a",1]}"#).is_err());
        assert!(e(r#"{"input":[]}"#).unwrap_err().contains("empty"));
        assert!(e(r#"{"input":[[]]}"#).is_err());
        assert!(e(r#"{}"#).unwrap_err().contains("required"));
        assert!(e(r#"{"input":"a","encoding_format":"hex"}"#).is_err());
        assert!(e(r#"{"input":"a","dimensions":0}"#).is_err());
        let many = format!(r#"{{"input":[{}]}}"#, vec!["[1]"; MAX_EMBEDDING_INPUTS + 1].join(","));
        assert!(e(&many).unwrap_err().contains("at most"));
    }
}
