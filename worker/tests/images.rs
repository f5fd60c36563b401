//! Image generation (`POST /v1/images/generations`) on OpenAI-style keys (passed through) and
//! Gemini image models (through `generateContent`, answered as `b64_json`): each image its own
//! call and reservation, so the key's requests per minute count images.

mod common;

use common::*;
use keypool_tests::shared;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread")]
async fn every_image_counts_and_what_gemini_cannot_carry_is_refused() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('image');
             SELECT keypool_add_key('image', 'gemini', 'AIza-images-gemini-0001', 'gemini-2.5-flash-image', rpm => 2, base_url => '{u}');
             SELECT keypool_create_pool('image2');
             SELECT keypool_add_key('image2', 'gemini', 'AIza-images-gemini-0002', 'gemini-2.5-flash-image', base_url => '{u}');
             SELECT keypool_create_pool('oimage');
             SELECT keypool_add_key('oimage', 'openai', 'sk-images-openai-000001', 'gpt-image-1', base_url => '{u}/v1');",
            u = mock.url
        ),
    )
    .await;
    let w = Worker::start(&conninfo(&db), "images", &["--no-queue"]).await;
    let post = |body: Value| {
        let w = &w;
        async move {
            let r = w.post("/v1/images/generations", &body).await;
            let status = r.status().as_u16();
            let headers = r.headers().clone();
            (status, r.json::<Value>().await.unwrap_or(Value::Null), headers)
        }
    };
    // Three images asked of a key of 2 a minute: two made, the third refused and said so.
    let (status, r, headers) = post(json!({"model": "image", "user": "i-1", "prompt": "a cat", "n": 3})).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["data"].as_array().map(Vec::len), Some(2), "{r}");
    assert!(
        r["data"][0]["b64_json"]
            .as_str()
            .is_some_and(|d| d.starts_with("iVBOR")),
        "{r}"
    );
    assert_eq!(headers["x-keypool-images-short"], "POOL_EXHAUSTED");
    assert_eq!(mock.calls_with("AIza-images-gemini-0001").await, 2);
    // The next is refused whole: 429 with the wait.
    let (status, r, headers) = post(json!({"model": "image", "user": "i-1", "prompt": "a dog"})).await;
    assert_eq!(
        (status, r["error"]["code"].clone()),
        (429, json!("POOL_EXHAUSTED")),
        "{r}"
    );
    assert!(headers.get("retry-after").is_some());
    // Gemini makes the image itself: OpenAI-only fields and URLs are refused before any call.
    for (extra, field) in [
        (json!({"quality": "high"}), "quality"),
        (
            json!({"response_format": "url"}),
            "response_format: url (Gemini answers with the image itself)",
        ),
        (json!({"size": "333x777"}), "size \"333x777\""),
    ] {
        let mut body = json!({"model": "image2", "user": "i-2", "prompt": "x"});
        for (k, v) in extra.as_object().into_iter().flatten() {
            body[k] = v.clone();
        }
        let (status, r, _) = post(body).await;
        assert_eq!((status, r["error"]["param"].clone()), (400, json!(field)), "{r}");
    }
    assert_eq!(mock.calls_with("AIza-images-gemini-0002").await, 0);
    let (status, r, _) = post(json!({"model": "image2", "user": "i-2", "prompt": "x", "size": "1792x1024"})).await;
    assert_eq!(status, 200, "{r}");
    let sent = mock.recent().await;
    assert_eq!(
        sent.last().expect("a call")["body"]["generationConfig"]["imageConfig"]["aspectRatio"],
        "16:9"
    );
    // An OpenAI-style key takes them all, each image its own call of n = 1.
    let (status, r, _) = post(json!({"model": "oimage", "user": "i-3", "prompt": "a cat", "n": 2, "quality": "high", "response_format": "url"})).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["data"].as_array().map(Vec::len), Some(2));
    assert!(r["data"][0]["url"].is_string(), "{r}");
    let sent = mock.recent().await;
    let last = &sent.last().expect("a call")["body"];
    assert_eq!(
        (last["n"].clone(), last["quality"].clone(), last["model"].clone()),
        (json!(1), json!("high"), json!("gpt-image-1"))
    );
    // Tokens settled per image: 2 × 1,290 and the prompts, in the key's minute.
    eventually(
        &db,
        "SELECT s.tokens_this_minute >= 2 * 1290 FROM keypool_scopes s JOIN keypool.key k ON k.scope_id = s.scope_id
           JOIN keypool.pool p ON p.id = k.pool_id WHERE p.name = 'oimage'",
        "t",
    )
    .await;
}

/// The images of one request together stay within KEYPOOL_MAX_RESPONSE: each is read with what
/// the ones before it left, and the answer holds those that fitted and says why the rest are
/// missing. (Each mock answer is a few hundred bytes, so a 1 KiB limit holds only some of ten.)
#[tokio::test(flavor = "multi_thread")]
async fn the_images_of_a_request_together_stay_within_max_response() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('image');
             SELECT keypool_add_key('image', 'gemini', 'AIza-images-cap-000031', 'gemini-2.5-flash-image', base_url => '{u}');",
            u = mock.url
        ),
    )
    .await;
    let w = Worker::start(&conninfo(&db), "images-cap", &["--no-queue", "--max-response", "1024"]).await;
    let r = w
        .post(
            "/v1/images/generations",
            &json!({"model": "image", "user": "cap", "prompt": "a cat", "n": 10}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let short = r
        .headers()
        .get("x-keypool-images-short")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = r.bytes().await.expect("body");
    let answer: Value = serde_json::from_slice(&body).expect("JSON");
    let made = answer["data"].as_array().map_or(0, Vec::len);
    assert!((1..10).contains(&made), "{answer}");
    assert!(
        short.starts_with("UPSTREAM_FAILED: the answers together are larger than KEYPOOL_MAX_RESPONSE")
            || short.starts_with("UPSTREAM_FAILED: the images made fill KEYPOOL_MAX_RESPONSE"),
        "{short}"
    );
    assert!(body.len() <= 1024 + 64, "{} bytes", body.len());
    // Every call the provider made was one image the answer holds, or the one that did not fit.
    let calls = mock.calls_with("AIza-images-cap-000031").await as usize;
    assert!(calls == made || calls == made + 1, "{calls} calls, {made} images");
}

/// Each image is reserved with what the pool's models bill for the quality and size asked (the
/// most they could bill where left to them); Gemini 3's interim thought images are not answers;
/// an image Gemini declines is a 400 that says why; a stream of partial images is refused.
#[tokio::test(flavor = "multi_thread")]
async fn images_are_reserved_at_their_price_and_declined_ones_say_why() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('gpt');
             SELECT keypool_add_key('gpt', 'openai', 'sk-images-price-0000041', 'gpt-image-1', tpm => 5000, base_url => '{u}/v1');
             SELECT keypool_create_pool('gem3');
             SELECT keypool_add_key('gem3', 'gemini', 'AIza-images-price-000042', 'gemini-3-pro-image-preview', base_url => '{u}');",
            u = mock.url
        ),
    )
    .await;
    let w = Worker::start(&conninfo(&db), "images-price", &["--no-queue"]).await;
    let post = |body: Value| {
        let w = &w;
        async move {
            let r = w.post("/v1/images/generations", &body).await;
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    // gpt-image-1 at high quality in portrait bills 6,240 tokens: more than the key's minute
    // could ever hold (quality left to the model counts as high).
    let (status, r) = post(json!({"model": "gpt", "user": "p-1", "prompt": "a cat", "size": "1024x1536"})).await;
    assert_eq!(status, 400, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("(6242) is more than any usable key")),
        "{r}"
    );
    assert_eq!(mock.calls_with("sk-images-price-0000041").await, 0);
    // At low quality it is 408: served.
    let (status, r) =
        post(json!({"model": "gpt", "user": "p-1", "prompt": "a cat", "size": "1024x1536", "quality": "low"})).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(mock.calls_with("sk-images-price-0000041").await, 1);

    // Gemini 3 Pro Image shows interim images as thoughts: they are left out.
    let (status, r) = post(json!({"model": "gem3", "user": "p-2", "prompt": "a dog", "n": 2})).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["data"].as_array().map(Vec::len), Some(2), "{r}");
    assert_eq!(r["usage"]["output_tokens"], 2 * 1290, "{r}");
    // A declined image: 400 saying why, with the prompt billed and no image.
    let (status, r) = post(json!({"model": "gem3", "user": "p-2", "prompt": "something forbidden"})).await;
    assert_eq!(status, 400, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("finishReason IMAGE_SAFETY")),
        "{r}"
    );
    // Streams of partial images have no place in the answer: refused before any call.
    let before = mock.calls_with("AIza-images-price-000042").await;
    for extra in [json!({"stream": true}), json!({"partial_images": 2})] {
        let mut body = json!({"model": "gem3", "user": "p-2", "prompt": "x"});
        for (k, v) in extra.as_object().into_iter().flatten() {
            body[k] = v.clone();
        }
        let (status, r) = post(body).await;
        assert_eq!(status, 400, "{r}");
    }
    assert_eq!(mock.calls_with("AIza-images-price-000042").await, before);
}
