//! The OpenAI-compatible endpoint against the mock provider and a private cluster: failover,
//! disabled keys, streams settled with their real usage, refusals as 429, authentication, the
//! plain-HTTP proxy, and a graceful shutdown.

mod common;

use std::time::{Duration, Instant};

use common::*;
use keypool_tests::{one, shared, TestDb};
use serde_json::{json, Value};

async fn keys_state(db: &TestDb<'_>, pool: &str) -> Vec<(String, String, String)> {
    db.client
        .query(
            "SELECT label, state, coalesce(reason, '') FROM keypool_keys WHERE pool = $1 ORDER BY key_id",
            &[&pool],
        )
        .await
        .expect("keypool_keys")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Prompt and completion tokens recorded for a pool's keys (after flushing the counters).
async fn usage(db: &TestDb<'_>, pool: &str) -> (i64, i64) {
    db.client.batch_execute("SELECT keypool_flush()").await.expect("flush");
    let row = db
        .client
        .query_one(
            "SELECT coalesce(sum(prompt_tokens), 0)::bigint, coalesce(sum(completion_tokens), 0)::bigint
               FROM keypool_usage WHERE pool = $1",
            &[&pool],
        )
        .await
        .expect("keypool_usage");
    (row.get(0), row.get(1))
}

async fn usage_eventually(db: &TestDb<'_>, pool: &str, want: (i64, i64)) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = usage(db, pool).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "usage of pool {pool}: {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn chat_body(model: &str, user: &str, text: &str, max_tokens: u64) -> Value {
    json!({"model": model, "user": user, "messages": user_message(text), "max_tokens": max_tokens})
}

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_429_fails_over_to_another_key_and_the_client_sees_no_error() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    let (first, second) = ("sk-first-key-000001113", "sk-second-key-00001169");
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('chat', 'openai', '{first}', 'gpt-4o-mini', base_url => '{u}/v1');
             SELECT keypool_add_key('chat', 'openai', '{second}', 'gpt-4o-mini', base_url => '{u}/v1');",
            u = mock.url
        ),
    )
    .await;
    mock.fault("sk-first", "429", None, Some(20.0)).await;
    let w = Worker::start(&conninfo(&db), "failover", &["--no-queue"]).await;

    let mut retried = 0;
    for i in 0..20 {
        let r = w.chat(chat_body("chat", &format!("user-{i}"), "hello", 5)).await;
        assert_eq!(r.status(), 200, "request {i}");
        if header(&r, "x-keypool-attempts").as_deref() == Some("2") {
            retried += 1;
        }
        let body: Value = r.json().await.expect("JSON answer");
        assert_eq!(body["choices"][0]["message"]["content"], "This is a mock reply");
        assert_eq!(body["usage"]["completion_tokens"], 5);
    }
    // The 429 cooled the first key's scope for its Retry-After: it was asked once, never again.
    assert_eq!(retried, 1);
    assert_eq!(mock.calls_with(first).await, 1);
    assert_eq!(mock.calls_with(second).await, 20);
    let keys = keys_state(&db, "chat").await;
    assert_eq!(keys[0].1, "cooling", "{keys:?}");
    assert_eq!(keys[1].1, "active", "{keys:?}");

    // The log names the keys by label, never by secret.
    let log = w.log();
    assert!(log.contains("key=sk-…1113") && log.contains("rate_limited"), "{log}");
    assert!(!log.contains(first) && !log.contains(second));
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_the_provider_rejects_are_disabled_and_the_request_still_succeeds() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    let bad_openai = "sk-invalid-openai-001134";
    let bad_gemini = "AIza-invalid-gemini-1001";
    let good = "sk-good-key-00000001120";
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('mixed');
             SELECT keypool_add_key('mixed', 'openai', '{bad_openai}', 'gpt-4o-mini', base_url => '{u}/v1');
             SELECT keypool_add_key('mixed', 'gemini', '{bad_gemini}', 'gemini-2.5-flash', base_url => '{u}');
             SELECT keypool_add_key('mixed', 'openai', '{good}', 'gpt-4o-mini', base_url => '{u}/v1');",
            u = mock.url
        ),
    )
    .await;
    let w = Worker::start(&conninfo(&db), "disable", &["--no-queue"]).await;
    for i in 0..10 {
        let r = w.chat(chat_body("mixed", &format!("u{i}"), "hello", 3)).await;
        assert_eq!(r.status(), 200, "request {i}: {}", r.text().await.unwrap_or_default());
    }
    // Each rejected key was called once, then checked once with its provider (its model list)
    // before it was disabled: a 401 to a request may be about the request.
    assert_eq!(mock.calls_with(bad_openai).await, 2);
    assert_eq!(mock.calls_with(bad_gemini).await, 2);
    assert_eq!(mock.calls_with(good).await, 10);
    let keys = keys_state(&db, "mixed").await;
    assert_eq!(keys[0].1, "disabled");
    assert!(
        keys[0].2.contains("401") && keys[0].2.contains("invalid_api_key"),
        "{keys:?}"
    );
    assert_eq!(keys[1].1, "disabled");
    assert!(keys[1].2.contains("API_KEY_INVALID"), "{keys:?}");
    assert_eq!(keys[2].1, "active");
    assert!(!w.log().contains(bad_openai));
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_pass_through_and_settle_the_real_usage() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('oa');
             SELECT keypool_add_key('oa', 'openai', 'sk-stream-openai-0001183', 'gpt-4o-mini', base_url => '{u}/v1');
             SELECT keypool_create_pool('gem');
             SELECT keypool_add_key('gem', 'gemini', 'AIza-stream-gemini-01022', 'gemini-2.5-flash', base_url => '{u}');
             SELECT keypool_create_pool('gemcompat');
             SELECT keypool_add_key('gemcompat', 'gemini', 'AIza-stream-compat-01015', 'gemini-2.5-flash', base_url => '{u}/v1beta/openai');
             SELECT keypool_create_pool('ant');
             SELECT keypool_add_key('ant', 'anthropic', 'sk-ant-stream-000001057', 'claude-sonnet-4-5', base_url => '{u}');",
            u = mock.url
        ),
    )
    .await;
    let w = Worker::start(&conninfo(&db), "stream", &["--no-queue"]).await;

    // 12 characters: 3 prompt tokens at the mock; 7 words back.
    for pool in ["oa", "gem", "gemcompat", "ant"] {
        let mut body = chat_body(pool, "streamer", "abcdefghijkl", 7);
        body["stream"] = json!(true);
        let r = w.chat(body).await;
        assert_eq!(r.status(), 200, "{pool}");
        assert_eq!(header(&r, "content-type").as_deref(), Some("text/event-stream"));
        let text = r.text().await.expect("stream");
        let mut content = String::new();
        let mut finish = None;
        for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
            if line == "[DONE]" {
                continue;
            }
            let chunk: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{pool}: {line}: {e}"));
            // The app did not ask for usage: no usage-only chunk reaches it.
            assert!(
                chunk["choices"].as_array().is_some_and(|c| !c.is_empty()),
                "{pool}: {line}"
            );
            content.push_str(chunk["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
            if let Some(f) = chunk["choices"][0]["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
        assert!(text.trim_end().ends_with("data: [DONE]"), "{pool}: {text}");
        assert_eq!(content, "This is a mock reply from the", "{pool}");
        assert_eq!(finish.as_deref(), Some("length"), "{pool}");
        usage_eventually(&db, pool, (3, 7)).await;
    }
    // The worker asked the OpenAI-style providers for the usage chunk.
    let recent = mock.recent().await;
    let openai_call = recent
        .iter()
        .find(|r| r["path"] == "/v1/chat/completions")
        .expect("an OpenAI call");
    assert_eq!(openai_call["body"]["stream_options"]["include_usage"], true);

    // An app that asks for usage gets the final usage chunk, in every wire format.
    for pool in ["oa", "gem", "ant"] {
        let mut body = chat_body(pool, "streamer", "abcdefghijkl", 7);
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let text = w.chat(body).await.text().await.expect("stream");
        let last: Value = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .rfind(|l| *l != "[DONE]")
            .and_then(|l| serde_json::from_str(l).ok())
            .expect("a last chunk");
        assert_eq!(last["usage"]["prompt_tokens"], 3, "{pool}: {last}");
        assert_eq!(last["usage"]["completion_tokens"], 7, "{pool}: {last}");
        usage_eventually(&db, pool, (6, 14)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn non_streamed_answers_are_translated_and_settled() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('gem');
             SELECT keypool_add_key('gem', 'gemini', 'AIza-plain-gemini-01008', 'gemini-2.5-flash', base_url => '{u}');
             SELECT keypool_create_pool('ant');
             SELECT keypool_add_key('ant', 'anthropic', 'sk-ant-plain-0000001050', 'claude-sonnet-4-5', base_url => '{u}');",
            u = mock.url
        ),
    )
    .await;
    let w = Worker::start(&conninfo(&db), "translate", &["--no-queue"]).await;
    for (pool, model) in [("gem", "gemini-2.5-flash"), ("ant", "claude-sonnet-4-5")] {
        let body = json!({"model": pool, "user": "t", "max_tokens": 4,
                          "messages": [{"role": "system", "content": "abcd"}, {"role": "user", "content": "efgh"}]});
        let r = w.chat(body).await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.expect("JSON");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], model);
        assert_eq!(v["choices"][0]["message"]["content"], "This is a mock");
        assert_eq!(v["usage"]["prompt_tokens"], 2, "{pool}: {v}");
        usage_eventually(&db, pool, (2, 4)).await;
    }
    // The system message went where each provider wants it.
    let recent = mock.recent().await;
    let gemini = recent.iter().find(|r| r["wire"] == "gemini").expect("a Gemini call");
    assert_eq!(gemini["body"]["systemInstruction"]["parts"][0]["text"], "abcd");
    assert_eq!(gemini["body"]["generationConfig"]["maxOutputTokens"], 4);
    let anthropic = recent
        .iter()
        .find(|r| r["wire"] == "anthropic")
        .expect("an Anthropic call");
    assert_eq!(anthropic["body"]["system"], json!([{"type": "text", "text": "abcd"}]));
    assert_eq!(anthropic["body"]["messages"].as_array().map(Vec::len), Some(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn caller_errors_are_returned_untouched_and_never_retried() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('chat', 'openai', 'sk-caller-a-00000001078', base_url => '{u}/v1');
             SELECT keypool_add_key('chat', 'openai', 'sk-caller-b-00000001085', base_url => '{u}/v1');",
            u = mock.url
        ),
    )
    .await;
    mock.fault("*", "400", Some(1), None).await;
    let w = Worker::start(&conninfo(&db), "caller", &["--no-queue"]).await;
    let r = w.chat(chat_body("chat", "u", "hello", 3)).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.expect("JSON");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("maximum context length"));
    assert_eq!(mock.stats().await["requests"], 1);
    let keys = keys_state(&db, "chat").await;
    assert!(keys.iter().all(|k| k.1 == "active"), "{keys:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_that_does_not_answer_times_out_and_another_key_serves() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    let hanging = "sk-hang-forever-0001127";
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('chat', 'openai', '{hanging}', base_url => '{u}/v1');
             SELECT keypool_add_key('chat', 'openai', 'sk-answers-0000001043', base_url => '{u}/v1');",
            u = mock.url
        ),
    )
    .await;
    let w = Worker::start(&conninfo(&db), "timeout", &["--no-queue", "--provider-timeout", "1s"]).await;
    let mut slow = 0;
    for i in 0..4 {
        let started = Instant::now();
        let r = w.chat(chat_body("chat", &format!("u{i}"), "hello", 3)).await;
        assert_eq!(r.status(), 200);
        if header(&r, "x-keypool-attempts").as_deref() == Some("2") {
            slow += 1;
            assert!(started.elapsed() >= Duration::from_secs(1));
        }
    }
    assert!(slow >= 1);
    assert_eq!(mock.calls_with(hanging).await, slow);
    assert!(w.log().contains("no answer within 1000 ms"), "{}", w.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_become_429_with_retry_after_and_allocation_headers() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('tight');
             SELECT keypool_add_key('tight', 'openai', 'sk-tight-00000000001197', rpd => 10, base_url => '{u}/v1');
             SELECT keypool_assign('user-' || i, 'tight') FROM generate_series(1, 5) i;
             SELECT keypool_create_pool('slow');
             SELECT keypool_add_key('slow', 'openai', 'sk-slow-000000000001176', rpm => 1, base_url => '{u}/v1');
             SELECT keypool_create_pool('empty');
             SELECT keypool_create_pool('fair');
             SELECT keypool_add_key('fair', 'openai', 'sk-fair-000000000001913', rpm => 1000, base_url => '{u}/v1');
             SELECT keypool_alter_pool('fair', user_rpm => 1);",
            u = mock.url
        ),
    )
    .await;
    let w = Worker::start(&conninfo(&db), "refusals", &["--no-queue"]).await;

    // Ten a day among five users: two each.
    for left in ["1", "0"] {
        let r = w.chat(chat_body("tight", "user-1", "hi", 3)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-keypool-remaining-today").as_deref(), Some(left));
        assert_eq!(header(&r, "x-keypool-allocated-today").as_deref(), Some("2"));
    }
    let r = w.chat(chat_body("tight", "user-1", "hi", 3)).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = header(&r, "retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=86_400).contains(&retry), "{retry}");
    assert_eq!(header(&r, "x-keypool-remaining-today").as_deref(), Some("0"));
    let v: Value = r.json().await.expect("JSON");
    assert_eq!(v["error"]["code"], "QUOTA_EXCEEDED");
    assert_eq!(v["error"]["type"], "rate_limit_exceeded");
    // Another user still has a share.
    assert_eq!(w.chat(chat_body("tight", "user-2", "hi", 3)).await.status(), 200);

    // One request a minute: the second waits for the window.
    assert_eq!(w.chat(chat_body("slow", "guest-1", "hi", 3)).await.status(), 200);
    let r = w.chat(chat_body("slow", "guest-2", "hi", 3)).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = header(&r, "retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=60).contains(&retry), "{retry}");
    let v: Value = r.json().await.expect("JSON");
    assert_eq!(v["error"]["code"], "POOL_EXHAUSTED");

    // One request a minute per user: the user's second waits for their minute, with the
    // wait; others are served; the official clients may retry it.
    let r = w.chat(chat_body("fair", "user-1", "hi", 3)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-keypool-remaining-minute").as_deref(), Some("0"));
    let r = w.chat(chat_body("fair", "user-1", "hi", 3)).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = header(&r, "retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((55..=60).contains(&retry), "{retry}");
    assert_ne!(header(&r, "x-should-retry").as_deref(), Some("false"));
    let v: Value = r.json().await.expect("JSON");
    assert_eq!(v["error"]["code"], "USER_RATE_LIMITED");
    assert_eq!(v["error"]["type"], "rate_limit_exceeded");
    assert!(
        v["error"]["message"].as_str().unwrap_or("").contains("this minute"),
        "{v}"
    );
    assert_eq!(w.chat(chat_body("fair", "user-2", "hi", 3)).await.status(), 200);

    let r = w.chat(chat_body("empty", "u", "hi", 3)).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.json::<Value>().await.expect("JSON")["error"]["code"], "NO_KEYS");
    let r = w.chat(chat_body("nonexistent", "u", "hi", 3)).await;
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.expect("JSON")["error"]["code"],
        "model_not_found"
    );
    assert_eq!(mock.stats().await["requests"], 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_short_capacity_wait_turns_a_busy_pool_into_a_slower_answer() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('burst');
             SELECT keypool_add_key('burst', 'openai', 'sk-burst-a-000000001071', base_url => '{u}/v1');",
            u = mock.url
        ),
    )
    .await;
    mock.fault("*", "429", Some(1), Some(1.0)).await;
    let w = Worker::start(&conninfo(&db), "wait", &["--no-queue", "--capacity-wait", "3s"]).await;
    // The only key answers 429 with a one-second Retry-After: the worker waits for it.
    let started = Instant::now();
    let r = w.chat(chat_body("burst", "u", "hi", 3)).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(mock.stats().await["requests"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn pools_are_found_by_name_model_or_header_and_listed() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('chat', 'openai', 'sk-route-a-000000001162', 'gpt-4o-mini', base_url => '{u}/v1');
             SELECT keypool_create_pool('grok');
             SELECT keypool_add_key('grok', 'xai', 'xai-route-b-00000001204', 'grok-3', base_url => '{u}/v1');
             SELECT keypool_create_pool('grok2');
             SELECT keypool_add_key('grok2', 'xai', 'xai-route-c-00000001211', 'grok-3', base_url => '{u}/v1');",
            u = mock.url
        ),
    )
    .await;
    let w = Worker::start(&conninfo(&db), "routes", &["--no-queue"]).await;
    let r = w.chat(chat_body("gpt-4o-mini", "u", "hi", 3)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.expect("JSON")["model"], "gpt-4o-mini");
    let r = w.chat(chat_body("grok-3", "u", "hi", 3)).await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.expect("JSON")["error"]["code"],
        "ambiguous_model"
    );
    let r = http()
        .post(format!("{}/v1/chat/completions", w.url))
        .bearer_auth(TOKEN)
        .header("X-Keypool-Pool", "grok2")
        .header("X-Keypool-User", "header-user")
        .json(&json!({"model": "grok-3", "messages": user_message("hi")}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-keypool-provider").as_deref(), Some("xai"));

    let models: Value = http()
        .get(format!("{}/v1/models", w.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("JSON");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["chat", "grok", "grok2", "gpt-4o-mini", "grok-3"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_endpoint_needs_a_token_a_user_and_a_valid_body() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('chat', 'openai', 'sk-auth-0000000001064', base_url => '{u}/v1');",
            u = mock.url
        ),
    )
    .await;
    let w = Worker::start(&conninfo(&db), "auth", &["--no-queue"]).await;
    let url = format!("{}/v1/chat/completions", w.url);
    let body = chat_body("chat", "u", "hi", 3);

    let r = http().post(&url).json(&body).send().await.expect("request");
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.expect("JSON")["error"]["code"],
        "invalid_api_key"
    );
    let r = http()
        .post(&url)
        .bearer_auth("wrong-token-0123456789")
        .json(&body)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 401);
    let r = http()
        .get(format!("{}/v1/models", w.url))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 401);
    let health: Value = http()
        .get(format!("{}/healthz", w.url))
        .send()
        .await
        .expect("healthz")
        .json()
        .await
        .expect("JSON");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["database"], "ok");

    let r = w.chat(json!({"model": "chat", "messages": user_message("hi")})).await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.expect("JSON")["error"]["code"], "missing_user");
    let r = http()
        .post(&url)
        .bearer_auth(TOKEN)
        .body("{not json")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 400);
    let r = w.chat(json!({"model": "chat", "user": "u", "messages": []})).await;
    assert_eq!(r.status(), 400);
    let r = w
        .chat(json!({"model": "chat", "user": "x".repeat(300), "messages": user_message("hi")}))
        .await;
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().await.expect("JSON")["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("user_id"));
    assert_eq!(mock.stats().await["requests"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_http_apis_go_through_the_proxy_with_the_key_in_the_query() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('serp');
             SELECT keypool_add_key('serp', 'http', 'serp-good-00000001', rpm => 100, base_url => '{u}#query=api_key');
             SELECT keypool_add_key('serp', 'http', 'serp-good-00000002', rpm => 100, base_url => '{u}#query=api_key');",
            u = mock.url
        ),
    )
    .await;
    let w = Worker::start(&conninfo(&db), "serp", &["--no-queue"]).await;
    for i in 0..3 {
        let r = http()
            .get(format!("{}/v1/proxy/serp/search?q=rust+lang", w.url))
            .bearer_auth(TOKEN)
            .header("X-Keypool-User", format!("searcher-{i}"))
            .send()
            .await
            .expect("proxy request");
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.expect("JSON");
        assert_eq!(v["organic_results"][0]["title"], "Mock result for rust lang");
    }
    // Both keys took turns, each sent in the query string.
    let calls = [
        mock.calls_with("serp-good-00000001").await,
        mock.calls_with("serp-good-00000002").await,
    ];
    assert_eq!(calls.iter().sum::<u64>(), 3, "{calls:?}");
    assert!(calls.iter().all(|c| *c >= 1), "{calls:?}");
    let keys = keys_state(&db, "serp").await;
    assert!(keys.iter().all(|k| k.1 == "active"), "{keys:?}");
    assert!(!w.log().contains("serp-good-00000002"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_requests_in_flight_finish() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&["--latency", "1500ms"]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('chat', 'openai', 'sk-term-0000000001190', base_url => '{u}/v1');",
            u = mock.url
        ),
    )
    .await;
    let mut w = Worker::start(&conninfo(&db), "term", &["--no-queue"]).await;
    let url = format!("{}/v1/chat/completions", w.url);
    let in_flight = tokio::spawn(async move {
        http()
            .post(url)
            .bearer_auth(TOKEN)
            .json(&chat_body("chat", "u", "hello", 3))
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    mock.wait_for_requests(1).await;
    let status = w.terminate(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}\n{}", w.log());
    assert_eq!(in_flight.await.expect("task").expect("answer"), 200);
    assert!(w.log().contains("stopped served=1"), "{}", w.log());
    eventually(&db, "SELECT served FROM keypool_workers WHERE id = 'term'", "1").await;
}

/// Events of `kind` in `pool`, oldest first: (key label, reason).
async fn events(db: &TestDb<'_>, pool: &str, kind: &str) -> Vec<(String, String)> {
    db.client
        .query(
            "SELECT coalesce(label, ''), coalesce(reason, '') FROM keypool_events WHERE pool = $1 AND kind = $2 ORDER BY id",
            &[&pool, &kind],
        )
        .await
        .expect("events")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Waits until `cond` holds of the pool's keys (label, state, reason), for at most 30 s.
async fn keys_until(db: &TestDb<'_>, pool: &str, what: &str, cond: impl Fn(&[(String, String, String)]) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let keys = keys_state(db, pool).await;
        if cond(&keys) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {keys:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_the_provider_disabled_is_checked_again_and_enabled_when_accepted() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    let flaky = "sk-recheck-flaky-0001719";
    let parked = "sk-recheck-parked-001726";
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('rechecked');
             SELECT keypool_add_key('rechecked', 'openai', '{flaky}', 'gpt-4o-mini', base_url => '{u}/v1');
             SELECT keypool_add_key('rechecked', 'openai', '{parked}', 'gpt-4o-mini', base_url => '{u}/v1');
             SELECT keypool_disable_key(key_id, 'parked by an operator') FROM keypool_keys WHERE pool = 'rechecked' AND key_id = (SELECT max(key_id) FROM keypool_keys WHERE pool = 'rechecked');",
            u = mock.url
        ),
    )
    .await;
    // The provider rejects the key (a revoked key, say): the request fails, the key is disabled.
    mock.fault("recheck-flaky", "401", None, None).await;
    let w = Worker::start(&conninfo(&db), "recheck", &["--no-queue", "--recheck-after", "1s"]).await;
    let r = w.chat(chat_body("rechecked", "u1", "hello", 3)).await;
    assert_ne!(r.status(), 200);
    keys_until(&db, "rechecked", "the rejected key is disabled", |k| {
        k[0].1 == "disabled"
    })
    .await;
    // Checked again a second later: still rejected, it stays disabled (and says when next).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while events(&db, "rechecked", "key_rechecked").await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no recheck within 30 s:\n{}",
            w.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let first = events(&db, "rechecked", "key_rechecked").await;
    assert!(first[0].1.starts_with("still rejected"), "{first:?}");
    assert!(first[0].1.contains("next check in 2 s"), "{first:?}");
    assert_eq!(keys_state(&db, "rechecked").await[0].1, "disabled");
    // The provider takes the key again: enabled with no operator action, and it serves.
    mock.clear_faults().await;
    keys_until(&db, "rechecked", "the key is enabled again", |k| k[0].1 == "active").await;
    let last = events(&db, "rechecked", "key_rechecked").await;
    assert!(last.last().is_some_and(|e| e.1.starts_with("accepted")), "{last:?}");
    assert_eq!(w.chat(chat_body("rechecked", "u2", "hello", 3)).await.status(), 200);
    // The key an operator disabled was never checked, and stays disabled.
    let keys = keys_state(&db, "rechecked").await;
    assert_eq!(keys[1].1, "disabled");
    assert_eq!(mock.calls_with(parked).await, 0);
    assert!(!w.log().contains(flaky));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_reporting_less_room_than_we_count_holds_the_key_to_its_figure() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('leaked');
             SELECT keypool_add_key('leaked', 'openai', 'sk-leaked-counter-001977', 'gpt-4o-mini', rpm => 100, base_url => '{u}/v1');",
            u = mock.url
        ),
    )
    .await;
    let w = Worker::start(&conninfo(&db), "counters", &["--no-queue"]).await;
    // Someone else uses the key: OpenAI says no request is left for 20 s.
    mock.ratelimit_headers(&[
        ("x-ratelimit-remaining-requests", "0"),
        ("x-ratelimit-reset-requests", "20s"),
        ("x-ratelimit-remaining-tokens", "149000"),
        ("x-ratelimit-reset-tokens", "6ms"),
    ])
    .await;
    assert_eq!(w.chat(chat_body("leaked", "u1", "hello", 3)).await.status(), 200);
    // The settlement of that answer (in the background) holds the key's account: the next
    // request is refused, though the extension's own count (1 of 100 this minute) has room.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let refused = loop {
        let r = w.chat(chat_body("leaked", "u2", "hello", 3)).await;
        if r.status() == 429 {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "never held: {}", r.status());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let retry: u64 = header(&refused, "retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((15..=20).contains(&retry), "{retry}");
    let v: Value = refused.json().await.expect("JSON");
    assert_eq!(v["error"]["code"], "POOL_EXHAUSTED");
    let row = db
        .client
        .query_one(
            "SELECT requests_this_minute, provider_requests_left, held_to_provider_until > now() + interval '10 s'
               FROM keypool_scopes s JOIN keypool_keys k USING (scope_id) WHERE k.pool = 'leaked'",
            &[],
        )
        .await
        .expect("keypool_scopes");
    assert!(row.get::<_, i64>(0) < 100);
    assert_eq!(row.get::<_, Option<i64>>(1), Some(0));
    assert_eq!(row.get::<_, Option<bool>>(2), Some(true));
    let alert: String = one(
        &db.client,
        "SELECT message FROM keypool_alerts WHERE kind = 'limit_mismatch'",
    )
    .await;
    assert!(alert.contains("0 requests left"), "{alert}");
    assert_eq!(events(&db, "leaked", "limit_mismatch").await.len(), 1);
    // What the mock saw: only the one request that was served.
    assert_eq!(mock.stats().await["requests"], 1);

    // A key that names no model: the caller chose the model, and what the provider says of that
    // model's limits is no verdict on the account: nothing is held.
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('anymodel');
             SELECT keypool_add_key('anymodel', 'openai', 'sk-any-model-key-0002011', rpm => 100, base_url => '{u}/v1');",
            u = mock.url
        ),
    )
    .await;
    for user in ["u1", "u2", "u3"] {
        let r = w.chat(json!({"model": "anymodel", "user": user, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})).await;
        assert_eq!(r.status(), 200, "{user}");
    }
    let held: Option<i64> = one(
        &db.client,
        "SELECT max(provider_requests_left) FROM keypool_scopes s JOIN keypool_keys k USING (scope_id) WHERE k.pool = 'anymodel'",
    )
    .await;
    assert_eq!(held, None);
}
