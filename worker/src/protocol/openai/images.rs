//! OpenAI's image generation request (`POST /v1/images/generations`): checked as it arrived. Each
//! image is its own provider call and its own reservation, so that every image counts against
//! the key's requests per minute and day, and its tokens against the minute, the budgets and the
//! user's share.

use bytes::Bytes;
use serde::Deserialize;

use crate::protocol::json::{printable, Object};

/// Images one request may ask for (OpenAI's limit).
pub const MAX_IMAGES: u64 = 10;

/// Output tokens an image is settled with when its answer reports no usage: what Gemini 2.5
/// Flash Image bills for one image (OpenAI's DALL·E, priced per image, reports none).
pub const TOKENS_PER_IMAGE: i64 = 1_290;

/// Output tokens gpt-image models bill for an image, by quality (low, medium, high) and size
/// (1024x1024, 1024x1536, 1536x1024), from OpenAI's image generation guide.
const GPT_IMAGE_TOKENS: [[i64; 3]; 3] = [[272, 408, 400], [1_056, 1_584, 1_568], [4_160, 6_240, 6_208]];

/// Fields the worker reads, or that ask nothing any image model is refused for.
const KNOWN: &[&str] = &["model", "prompt", "n", "size", "response_format", "user"];

#[derive(Debug, Clone)]
pub struct ImagesRequest {
    body: Object,
    model: Option<String>,
    user: Option<String>,
    prompt: String,
    n: u64,
    size: Option<String>,
    base64: bool,
}

#[derive(Deserialize)]
struct Head {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    n: Option<u64>,
    #[serde(default)]
    size: Option<String>,
    #[serde(default)]
    response_format: Option<String>,
}

impl ImagesRequest {
    /// Checks the shape; the error is the caller's (HTTP 400).
    pub fn parse(bytes: Bytes) -> Result<ImagesRequest, String> {
        let body = Object::parse(bytes)?;
        let head: Head = serde_json::from_slice(body.raw()).map_err(|e| format!("the request: {e}"))?;
        let prompt = head.prompt.filter(|p| !p.is_empty()).ok_or("`prompt` is required")?;
        let n = head.n.unwrap_or(1);
        if !(1..=MAX_IMAGES).contains(&n) {
            return Err(format!("`n` must be from 1 to {MAX_IMAGES}"));
        }
        // Images are answered whole: a stream of partial images has no place in the answer.
        for field in ["stream", "partial_images"] {
            if matches!(body.get(field), Some(v) if v != "null" && v != "false" && v != "0") {
                return Err(format!(
                    "`{field}` is not supported: the worker answers with the images made"
                ));
            }
        }
        let base64 = match head.response_format.as_deref() {
            None | Some("b64_json") => true,
            Some("url") => false,
            Some(other) => {
                return Err(format!(
                    "`response_format` must be \"b64_json\" or \"url\", not \"{}\"",
                    printable(other)
                ))
            }
        };
        Ok(ImagesRequest {
            model: head.model,
            user: head.user.filter(|u| !u.is_empty()),
            prompt,
            n,
            size: head.size,
            base64,
            body,
        })
    }

    pub fn body(&self) -> &Object {
        &self.body
    }

    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    pub fn prompt(&self) -> &str {
        &self.prompt
    }

    /// How many images.
    pub fn n(&self) -> u64 {
        self.n
    }

    pub fn size(&self) -> Option<&str> {
        self.size.as_deref()
    }

    /// Whether the app wants the images inline (`b64_json`, the default) rather than as URLs.
    pub fn wants_base64(&self) -> bool {
        self.base64
    }

    /// Fields other than the ones every image model takes (`quality`, `style`, `background`
    /// ...): carried only to a provider that speaks OpenAI's image API.
    pub fn provider_specific(&self) -> Vec<String> {
        self.body
            .names()
            .filter(|n| !KNOWN.contains(n) && self.body.get(n) != Some("null"))
            .map(printable)
            .collect()
    }

    /// Output tokens one image of this request is reserved with when `model` makes it: what
    /// the model bills for the quality and size asked, and the most it could bill where they
    /// are left to it (`auto`, or not given). A model the worker does not know is taken to bill
    /// as gpt-image does.
    pub fn estimate_image_tokens(&self, model: &str) -> i64 {
        let model = model.to_ascii_lowercase();
        if model.starts_with("gemini-3") || model.starts_with("nano-banana-pro") {
            // Gemini 3 Pro Image: 1,120 tokens up to 2K, 2,000 at 4K.
            return 2_000;
        }
        if model.starts_with("gemini") || model.starts_with("imagen") || model.starts_with("dall-e") {
            return TOKENS_PER_IMAGE;
        }
        let text = |field: &str| {
            self.body
                .get(field)
                .and_then(|v| serde_json::from_str::<String>(v).ok())
        };
        let quality = match text("quality").as_deref() {
            Some("low") => Some(0),
            Some("medium") => Some(1),
            Some("high") => Some(2),
            _ => None,
        };
        let size = match self.size.as_deref() {
            Some("1024x1024") => Some(0),
            Some("1024x1536") => Some(1),
            Some("1536x1024") => Some(2),
            _ => None,
        };
        let rows: &[[i64; 3]] = match quality {
            Some(q) => &GPT_IMAGE_TOKENS[q..=q],
            None => &GPT_IMAGE_TOKENS[..],
        };
        rows.iter()
            .map(|row| size.map_or_else(|| row.iter().copied().max().unwrap_or(0), |s| row[s]))
            .max()
            .unwrap_or(TOKENS_PER_IMAGE)
    }

    pub fn estimate_prompt_tokens(&self) -> i64 {
        (self.prompt.len() as i64 + 3) / 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(body: &str) -> Result<ImagesRequest, String> {
        ImagesRequest::parse(Bytes::copy_from_slice(body.as_bytes()))
    }

    #[test]
    fn image_requests() {
        let r = req(r#"{"model":"image","prompt":"a cat","n":2,"size":"1024x1024","quality":"high"}"#).unwrap();
        assert_eq!((r.n(), r.prompt(), r.wants_base64()), (2, "a cat", true));
        assert_eq!(r.provider_specific(), vec!["quality"]);
        assert!(!req(r#"{"prompt":"x","response_format":"url"}"#).unwrap().wants_base64());
        assert!(req(r#"{"prompt":""}"#).is_err());
        assert!(req(r#"{"prompt":"x","n":11}"#).is_err());
        assert!(req(r#"{"prompt":"x","response_format":"png"}"#).is_err());
        assert!(req(r#"{"prompt":"x","stream":true}"#).is_err());
        assert!(req(r#"{"prompt":"x","partial_images":2}"#).is_err());
        assert!(req(r#"{"prompt":"x","stream":false,"partial_images":0}"#).is_ok());
    }

    #[test]
    fn an_image_is_reserved_with_what_its_model_bills() {
        let r = |body: &str| req(body).unwrap();
        // Quality and size left to the model: the most it could bill.
        assert_eq!(r(r#"{"prompt":"x"}"#).estimate_image_tokens("gpt-image-1"), 6_240);
        assert_eq!(
            r(r#"{"prompt":"x","size":"1024x1024"}"#).estimate_image_tokens("gpt-image-1"),
            4_160
        );
        assert_eq!(
            r(r#"{"prompt":"x","quality":"low","size":"1536x1024"}"#).estimate_image_tokens("gpt-image-1"),
            400
        );
        assert_eq!(
            r(r#"{"prompt":"x","quality":"medium"}"#).estimate_image_tokens(""),
            1_584
        );
        assert_eq!(
            r(r#"{"prompt":"x","quality":"auto"}"#).estimate_image_tokens("gpt-image-1-mini"),
            6_240
        );
        assert_eq!(
            r(r#"{"prompt":"x"}"#).estimate_image_tokens("gemini-2.5-flash-image"),
            1_290
        );
        assert_eq!(
            r(r#"{"prompt":"x"}"#).estimate_image_tokens("gemini-3-pro-image-preview"),
            2_000
        );
        assert_eq!(
            r(r#"{"prompt":"x","quality":"hd"}"#).estimate_image_tokens("dall-e-3"),
            1_290
        );
    }
}
