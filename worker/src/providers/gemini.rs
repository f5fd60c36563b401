//! Gemini's native API: `models/{model}:generateContent` (and `:streamGenerateContent?alt=sse`),
//! key in `x-goog-api-key`; bodies in its dialect (protocol::gemini). Embeddings through
//! `:batchEmbedContents`. Errors carry their meaning in `details`: `ErrorInfo.reason`
//! (API_KEY_INVALID), the `QuotaFailure` quota id (per minute or per day), and
//! `RetryInfo.retryDelay`.

use base64::Engine;
use bytes::Bytes;
use serde_json::{json, Value};

use super::{Embeddings, KeyRef, ProviderError};
use crate::duration;
use crate::protocol::conversation::{CarryError, Usage};
use crate::protocol::gemini::GeminiRequest;
use crate::protocol::json;
use crate::protocol::openai::images::ImagesRequest;
use crate::protocol::openai::{EmbeddingInput, EmbeddingsRequest};

/// The model a call asks for: the key's, else the one requested (checked by the endpoint),
/// without Gemini's `models/` prefix.
pub fn model_name<'a>(key: &'a KeyRef, requested: Option<&'a str>) -> Result<&'a str, String> {
    let model = key
        .model_for(requested)
        .ok_or_else(|| format!("Gemini key {} has no model and the request names none", key.id))?;
    Ok(model.strip_prefix("models/").unwrap_or(model))
}

/// The model's segment of the URL, escaped so that it stays one path segment whatever it holds.
fn model_path(key: &KeyRef, requested: Option<&str>) -> Result<String, String> {
    Ok(super::percent_encoded(model_name(key, requested)?))
}

/// The app's own `generateContent` body, changed only where the worker must: the output cap a
/// spend budget holds (`generationConfig.maxOutputTokens`) when the app set none.
pub fn generate_body(req: &GeminiRequest, output_cap: Option<u64>) -> Bytes {
    let Some(cap) = output_cap.filter(|_| req.max_tokens().is_none()) else {
        return req.body().raw().clone();
    };
    let cap = cap.to_string();
    // Written as the app wrote its names (Gemini reads camelCase and snake_case alike).
    let (config_name, cap_name) = if req.body().has("generation_config") {
        ("generation_config", "max_output_tokens")
    } else {
        ("generationConfig", "maxOutputTokens")
    };
    let config = req
        .body()
        .get(config_name)
        .and_then(|g| json::render_nested(g, &[(cap_name, Some(&cap))]).ok())
        .unwrap_or_else(|| format!("{{\"{cap_name}\":{cap}}}"));
    Bytes::from(req.body().render(&[(config_name, Some(&config))]))
}

/// `models/{model}:generateContent` (or `:streamGenerateContent?alt=sse`) with `body`.
pub fn chat_request(
    http: &reqwest::Client,
    key: &KeyRef,
    requested: Option<&str>,
    stream: bool,
    body: Bytes,
) -> Result<reqwest::RequestBuilder, String> {
    let model = model_path(key, requested)?;
    let base = key.base_url.trim_end_matches('/');
    let url = if stream {
        format!("{base}/v1beta/models/{model}:streamGenerateContent?alt=sse")
    } else {
        format!("{base}/v1beta/models/{model}:generateContent")
    };
    Ok(http
        .post(url)
        .header("x-goog-api-key", &key.secret)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body))
}

/// `models/{model}:batchEmbedContents`, one request per input text.
pub fn embeddings_request(
    http: &reqwest::Client,
    key: &KeyRef,
    req: &EmbeddingsRequest,
) -> Result<reqwest::RequestBuilder, String> {
    let EmbeddingInput::Texts(texts) = req.input() else {
        return Err("Gemini embeds text only: send `input` as a string or an array of strings".into());
    };
    let model = model_path(key, req.model())?;
    let requests: Vec<Value> = texts
        .iter()
        .map(|t| {
            let mut r = json!({"model": format!("models/{model}"), "content": {"parts": [{"text": t}]}});
            if let Some(d) = req.dimensions() {
                r["outputDimensionality"] = json!(d);
            }
            r
        })
        .collect();
    let base = key.base_url.trim_end_matches('/');
    Ok(http
        .post(format!("{base}/v1beta/models/{model}:batchEmbedContents"))
        .header("x-goog-api-key", &key.secret)
        .json(&json!({"requests": requests})))
}

/// `{"embeddings": [{"values": [...]}]}` as OpenAI's list. Gemini reports no usage: the
/// tokens are counted from the input.
pub fn read_embeddings(body: &[u8], req: &EmbeddingsRequest, shown_model: &str) -> Result<Embeddings, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("Gemini's answer is not JSON: {e}"))?;
    let embeddings = v
        .get("embeddings")
        .and_then(Value::as_array)
        .ok_or("Gemini's answer has no `embeddings`")?;
    let mut data = Vec::with_capacity(embeddings.len());
    for (i, e) in embeddings.iter().enumerate() {
        let values = e
            .get("values")
            .and_then(Value::as_array)
            .ok_or("an embedding in Gemini's answer has no `values`")?;
        let embedding = if req.wants_base64() {
            let mut raw = Vec::with_capacity(values.len() * 4);
            for x in values {
                let x = x
                    .as_f64()
                    .ok_or("an embedding value in Gemini's answer is not a number")?;
                raw.extend_from_slice(&(x as f32).to_le_bytes());
            }
            Value::String(base64::engine::general_purpose::STANDARD.encode(raw))
        } else {
            Value::Array(values.clone())
        };
        data.push(json!({"object": "embedding", "index": i, "embedding": embedding}));
    }
    let tokens = req.estimate_tokens();
    let answer = json!({
        "object": "list",
        "data": data,
        "model": shown_model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    });
    Ok(Embeddings {
        body: Bytes::from(answer.to_string()),
        usage: None,
    })
}

/// An OpenAI image size as Gemini's aspect ratio.
fn aspect_ratio(size: &str) -> Option<&'static str> {
    Some(match size {
        "1024x1024" | "512x512" | "256x256" | "auto" => "1:1",
        "1536x1024" => "3:2",
        "1024x1536" => "2:3",
        "1792x1024" => "16:9",
        "1024x1792" => "9:16",
        _ => return None,
    })
}

/// `models/{model}:generateContent` asking for one image of the prompt. What only OpenAI's image
/// API takes (`quality`, `style` ..., URLs instead of the image's bytes) is refused.
pub fn image_request(
    http: &reqwest::Client,
    key: &KeyRef,
    req: &ImagesRequest,
) -> Result<reqwest::RequestBuilder, CarryError> {
    if let Some(field) = req.provider_specific().into_iter().next() {
        return Err(CarryError::unsupported(field, "gemini"));
    }
    if !req.wants_base64() {
        return Err(CarryError::unsupported(
            "response_format: url (Gemini answers with the image itself)",
            "gemini",
        ));
    }
    let mut config = json!({"responseModalities": ["IMAGE"]});
    if let Some(size) = req.size() {
        let ratio = aspect_ratio(size).ok_or_else(|| CarryError::unsupported(format!("size \"{size}\""), "gemini"))?;
        config["imageConfig"] = json!({"aspectRatio": ratio});
    }
    let body = json!({"contents": [{"role": "user", "parts": [{"text": req.prompt()}]}], "generationConfig": config});
    let model = model_path(key, req.model()).map_err(CarryError::Invalid)?;
    let base = key.base_url.trim_end_matches('/');
    Ok(http
        .post(format!("{base}/v1beta/models/{model}:generateContent"))
        .header("x-goog-api-key", &key.secret)
        .json(&body))
}

/// The image of a `generateContent` answer asked for one: its first `inlineData` part that is
/// not a thought (Gemini 3 shows interim images as thoughts), as a `{"b64_json"}` entry; or,
/// when the prompt or the image was blocked, why.
pub fn read_image(body: &[u8]) -> Result<super::Images, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("Gemini's answer is not JSON: {e}"))?;
    let candidates = v["candidates"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let data: Vec<Value> = candidates
        .iter()
        .flat_map(|c| c["content"]["parts"].as_array().map(Vec::as_slice).unwrap_or(&[]))
        .filter(|p| p.get("thought").and_then(Value::as_bool) != Some(true))
        .find_map(|p| {
            p.get("inlineData")
                .and_then(|d| d["data"].as_str())
                .map(|d| json!({"b64_json": d}))
        })
        .into_iter()
        .collect();
    let declined = if data.is_empty() {
        let finish = candidates.first().and_then(|c| c["finishReason"].as_str());
        match (v["promptFeedback"]["blockReason"].as_str(), finish) {
            (Some(block), _) => Some(format!(
                "Gemini declined the prompt (blockReason {})",
                json::printable(block)
            )),
            (None, Some(f)) if f != "STOP" && f != "MAX_TOKENS" => {
                Some(format!("Gemini made no image (finishReason {})", json::printable(f)))
            }
            _ => return Err("Gemini's answer holds no image".into()),
        }
    } else {
        None
    };
    let n = |f: &str| v["usageMetadata"][f].as_i64();
    let usage = (!v["usageMetadata"].is_null()).then(|| {
        Usage::new(
            crate::protocol::openai::tokens(n("promptTokenCount")),
            crate::protocol::openai::tokens(n("candidatesTokenCount"))
                + crate::protocol::openai::tokens(n("thoughtsTokenCount")),
        )
    });
    Ok(super::Images { data, usage, declined })
}

pub fn list_models_request(http: &reqwest::Client, key: &KeyRef) -> reqwest::RequestBuilder {
    let base = key.base_url.trim_end_matches('/');
    http.get(format!("{base}/v1beta/models"))
        .header("x-goog-api-key", &key.secret)
}

/// The code: `ErrorInfo.reason`, else the first `QuotaFailure` quota id, else `status`.
pub fn read_error(v: &Value) -> ProviderError {
    let e = v.get("error").unwrap_or(v);
    let details = e
        .get("details")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let of_type = |suffix: &str| {
        details.iter().find(|d| {
            d.get("@type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.ends_with(suffix))
        })
    };
    let reason = of_type("ErrorInfo")
        .and_then(|d| d.get("reason"))
        .and_then(Value::as_str);
    let quota = of_type("QuotaFailure")
        .and_then(|d| d.get("violations"))
        .and_then(Value::as_array)
        .and_then(|v| v.iter().find_map(|x| x.get("quotaId").and_then(Value::as_str)));
    let status = e.get("status").and_then(Value::as_str);
    let retry = of_type("RetryInfo")
        .and_then(|d| d.get("retryDelay"))
        .and_then(Value::as_str)
        .and_then(duration::parse_compound)
        .map(|d| d.as_millis().min(7 * 86_400_000) as i64);
    ProviderError {
        code: reason.or(quota).or(status).map(str::to_string),
        retry_after_ms: retry,
        message: e.get("message").and_then(Value::as_str).unwrap_or("").to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_name_stays_one_path_segment() {
        let key = KeyRef {
            id: 1,
            provider: "gemini".into(),
            model: None,
            base_url: "https://g.test".into(),
            secret: "AIza-test".into(),
            label: String::new(),
        };
        let built = chat_request(
            &reqwest::Client::new(),
            &key,
            Some("../../_mock/reset?"),
            false,
            Bytes::from_static(b"{}"),
        )
        .unwrap()
        .build()
        .unwrap();
        assert_eq!(
            built.url().path(),
            "/v1beta/models/..%2F..%2F_mock%2Freset%3F:generateContent"
        );
        assert_eq!(built.url().query(), None);
    }

    #[test]
    fn error_details() {
        let invalid: Value = serde_json::from_str(
            r#"{"error":{"code":400,"message":"API key not valid.","status":"INVALID_ARGUMENT",
                "details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID"}]}}"#,
        )
        .unwrap();
        assert_eq!(read_error(&invalid).code.as_deref(), Some("API_KEY_INVALID"));
        let quota: Value = serde_json::from_str(
            r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"quota",
                "details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure",
                            "violations":[{"quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]},
                           {"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"26s"}]}}"#,
        )
        .unwrap();
        let e = read_error(&quota);
        assert_eq!(
            e.code.as_deref(),
            Some("GenerateRequestsPerDayPerProjectPerModel-FreeTier")
        );
        assert_eq!(e.retry_after_ms, Some(26_000));
        let bare: Value = serde_json::from_str(r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED"}}"#).unwrap();
        assert_eq!(read_error(&bare).code.as_deref(), Some("RESOURCE_EXHAUSTED"));
    }
}
