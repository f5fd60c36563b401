//! Gemini's own API in (`POST /v1beta/models/{model}:generateContent`, `:streamGenerateContent
//! ?alt=sse`) on every provider: passed through to Gemini keys, carried to the others; the token
//! as `x-goog-api-key` or `?key=`; function calls sent back as Google's SDKs send them; errors and
//! refusals in Google's shape.

mod common;

use common::*;
use keypool_tests::{shared, TestDb};
use serde_json::{json, Value};

const POOLS: [&str; 3] = ["oa", "gem", "ant"];

async fn setup(db: &TestDb<'_>, mock: &Mock) {
    exec(
        db,
        &format!(
            "SELECT keypool_create_pool('oa');
             SELECT keypool_add_key('oa', 'openai', 'sk-gemapi-openai-000001', 'gpt-4o-mini', base_url => '{u}/v1');
             SELECT keypool_create_pool('gem');
             SELECT keypool_add_key('gem', 'gemini', 'AIza-gemapi-gemini-0001', 'gemini-3-flash-preview', base_url => '{u}');
             SELECT keypool_create_pool('ant');
             SELECT keypool_add_key('ant', 'anthropic', 'sk-ant-gemapi-0000001', 'claude-sonnet-4-5', base_url => '{u}');
             SELECT keypool_create_pool('tight');
             SELECT keypool_add_key('tight', 'gemini', 'AIza-gemapi-tight-00001', 'gemini-2.5-flash', rpd => 4, base_url => '{u}');
             SELECT keypool_assign('g-user', 'tight'), keypool_assign('g-other', 'tight');",
            u = mock.url
        ),
    )
    .await;
}

async fn generate(w: &Worker, model: &str, user: &str, body: &Value) -> (u16, Value, reqwest::header::HeaderMap) {
    let r = http()
        .post(format!("{}/v1beta/models/{model}:generateContent", w.url))
        .header("x-goog-api-key", TOKEN)
        .header("x-keypool-user", user)
        .json(body)
        .send()
        .await
        .expect("post");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, r.json().await.unwrap_or(Value::Null), headers)
}

/// A streamed answer, its events' parts put together in order (function calls come whole).
async fn streamed(w: &Worker, model: &str, body: &Value) -> Value {
    let r = http()
        .post(format!(
            "{}/v1beta/models/{model}:streamGenerateContent?alt=sse&key={TOKEN}",
            w.url
        ))
        .header("x-keypool-user", "g-1")
        .json(body)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap_or_default();
    let (mut parts, mut finish, mut usage) = (Vec::<Value>::new(), Value::Null, Value::Null);
    for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        let ev: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"));
        let c = &ev["candidates"][0];
        for p in c["content"]["parts"].as_array().into_iter().flatten() {
            match (parts.last_mut(), p.get("text")) {
                (Some(last), Some(t)) if last.get("text").is_some() && p.get("thought").is_none() => {
                    last["text"] = json!(format!(
                        "{}{}",
                        last["text"].as_str().unwrap_or(""),
                        t.as_str().unwrap_or("")
                    ));
                }
                _ => parts.push(p.clone()),
            }
        }
        if !c["finishReason"].is_null() {
            finish = c["finishReason"].clone();
        }
        if !ev["usageMetadata"].is_null() {
            usage = ev["usageMetadata"].clone();
        }
    }
    json!({"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": finish}], "usageMetadata": usage})
}

fn text_of(r: &Value) -> String {
    r["candidates"][0]["content"]["parts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p.get("thought").is_none())
        .filter_map(|p| p["text"].as_str())
        .collect()
}

fn weather() -> Value {
    json!([{"functionDeclarations": [{"name": "weather", "description": "The weather in a city",
            "parametersJsonSchema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]}])
}

#[tokio::test(flavor = "multi_thread")]
async fn gemini_requests_are_served_by_every_provider() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    setup(&db, &mock).await;
    let w = Worker::start(&conninfo(&db), "gemini-api", &["--no-queue"]).await;
    for pool in POOLS {
        let (status, r, headers) = generate(
            &w,
            pool,
            "g-1",
            &json!({"systemInstruction": {"parts": [{"text": "be brief"}]}, "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
                    "generationConfig": {"maxOutputTokens": 5}}),
        )
        .await;
        assert_eq!(status, 200, "{pool}: {r}");
        assert_eq!(headers["x-keypool-pool"], pool);
        assert_eq!(text_of(&r), "This is a mock reply", "{pool}: {r}");
        assert_eq!(r["candidates"][0]["finishReason"], "MAX_TOKENS", "{pool}");

        for stream in [false, true] {
            let mut body =
                json!({"contents": [{"role": "user", "parts": [{"text": "weather in Oslo?"}]}], "tools": weather()});
            let first = if stream {
                streamed(&w, pool, &body).await
            } else {
                generate(&w, pool, "g-1", &body).await.1
            };
            let model_turn = first["candidates"][0]["content"].clone();
            let call = model_turn["parts"]
                .as_array()
                .and_then(|p| p.iter().find(|p| p.get("functionCall").is_some()))
                .map(|p| p["functionCall"].clone())
                .unwrap_or_else(|| panic!("{pool}: {first}"));
            assert_eq!(call["args"], json!({"city": "city-1"}), "{pool}");
            let contents = body["contents"].as_array_mut().expect("contents");
            contents.push(model_turn);
            contents.push(json!({"role": "user", "parts": [{"functionResponse": {"id": call["id"], "name": "weather", "response": {"output": "Sunny in Oslo"}}}]}));
            let second = if stream {
                streamed(&w, pool, &body).await
            } else {
                generate(&w, pool, "g-1", &body).await.1
            };
            assert_eq!(
                text_of(&second),
                "Tool results: Sunny in Oslo",
                "{pool} stream={stream}: {second}"
            );
        }
    }
    // To a Gemini key the body goes as it came; to another provider what it cannot carry is
    // refused, in Google's error shape.
    let body = json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}]});
    assert_eq!(generate(&w, "gem", "g-1", &body).await.0, 200);
    assert_eq!(
        mock.recent().await.last().expect("a call")["body"]["safetySettings"][0]["threshold"],
        "BLOCK_NONE"
    );
    let (status, e, _) = generate(&w, "oa", "g-1", &body).await;
    assert_eq!(status, 400, "{e}");
    assert_eq!(
        (e["error"]["code"].clone(), e["error"]["status"].clone()),
        (json!(400), json!("INVALID_ARGUMENT")),
        "{e}"
    );
    assert!(
        e["error"]["message"].as_str().unwrap_or("").contains("safetySettings"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_and_bad_tokens_speak_googles_error_shape() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    setup(&db, &mock).await;
    let w = Worker::start(&conninfo(&db), "gemini-api-errors", &["--no-queue"]).await;
    let hi = json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]});
    for _ in 0..2 {
        assert_eq!(generate(&w, "tight", "g-user", &hi).await.0, 200);
    }
    let (status, e, headers) = generate(&w, "tight", "g-user", &hi).await;
    assert_eq!(
        (status, e["error"]["status"].clone()),
        (429, json!("RESOURCE_EXHAUSTED")),
        "{e}"
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("QUOTA_EXCEEDED"),
        "{e}"
    );
    assert!(headers.get("retry-after").is_some());
    let r = http()
        .post(format!(
            "{}/v1beta/models/gem:generateContent?key=not-a-token-0000000000",
            w.url
        ))
        .header("x-keypool-user", "g-1")
        .json(&hi)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 401);
    let e: Value = r.json().await.unwrap_or(Value::Null);
    assert_eq!(e["error"]["status"], "UNAUTHENTICATED", "{e}");
}

/// What Google bills beyond tokens (its own tools) or keeps for the key owner (cached contents,
/// stored files) is refused on every key, before any provider call, in Google's error shape; a
/// body naming one member twice (camelCase and snake_case) too.
#[tokio::test(flavor = "multi_thread")]
async fn what_the_pool_cannot_count_is_refused_before_any_call() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    setup(&db, &mock).await;
    let w = Worker::start(&conninfo(&db), "gemini-api-uncounted", &["--no-queue"]).await;
    let hi = json!([{"role": "user", "parts": [{"text": "hi"}]}]);
    for (body, says) in [
        (
            json!({"contents": hi, "tools": [{"googleSearch": {}}]}),
            "tools[0].googleSearch",
        ),
        (
            json!({"contents": hi, "tools": [{"code_execution": {}}]}),
            "tools[0].code_execution",
        ),
        (
            json!({"contents": hi, "cachedContent": "cachedContents/abc"}),
            "cachedContent",
        ),
        (
            json!({"contents": [{"role": "user", "parts": [{"fileData": {"fileUri": "https://www.youtube.com/watch?v=x"}}]}]}),
            "fileData",
        ),
        (
            json!({"contents": hi, "generationConfig": {"maxOutputTokens": 1}, "generation_config": {"max_output_tokens": 60000}}),
            "same member",
        ),
    ] {
        for pool in ["gem", "oa"] {
            let (status, e, _) = generate(&w, pool, "g-1", &body).await;
            assert_eq!(
                (status, e["error"]["status"].clone()),
                (400, json!("INVALID_ARGUMENT")),
                "{pool} {body}: {e}"
            );
            assert!(
                e["error"]["message"].as_str().is_some_and(|m| m.contains(says)),
                "{pool} {body}: {e}"
            );
        }
    }
    assert_eq!(mock.calls_with("AIza-gemapi-gemini-0001").await, 0);
    assert_eq!(mock.calls_with("sk-gemapi-openai-000001").await, 0);
}
