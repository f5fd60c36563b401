//! OpenAI's image generation request (`POST /v1/images/generations`): checked as it arrived. Each
//! image is its own provider call and its own reservation, so that every image counts against
//! the key's requests per minute and day, and its tokens against the minute, the budgets and the
//! user's share.

use bytes::Bytes;
use serde::Deserialize;

use crate::protocol::json::{printable, Object};

/// Images one request may ask for (OpenAI's limit).
pub const MAX_IMAGES: u64 = 10;

/// Output tokens an image is reserved with: about what Gemini's image models bill for one image
/// (1,290) and OpenAI's image models for a medium-quality square one.
pub const TOKENS_PER_IMAGE: i64 = 1_290;

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

    /// Tokens a reservation for one image charges: the prompt, and the image.
    pub fn estimate_tokens_per_image(&self) -> i64 {
        (self.prompt.len() as i64 + 3) / 4 + TOKENS_PER_IMAGE
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
    }
}
