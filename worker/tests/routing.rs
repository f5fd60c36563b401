//! Fallback chains through the worker (issue 14): a request for one pool is served, in the same
//! call, by the next pool of its chain, in the served key's provider format; an API token's
//! pools bound the chain.

mod common;

use common::*;
use keypool_tests::{one, shared};
use serde_json::{json, Value};

fn hello(model: &str) -> Value {
    json!({"model": model, "user": "u", "messages": user_message("hello"), "max_tokens": 3})
}

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

async fn chat_with(w: &Worker, token: &str, body: Value) -> reqwest::Response {
    http()
        .post(format!("{}/v1/chat/completions", w.url))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("request to the worker")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chain_serves_from_the_next_provider_in_its_own_format() {
    let db = shared().fresh_db().await;
    // The mock also answers without a key, as a local Ollama does.
    let mock = Mock::start(&["--keyless"]);
    // Local first (an OpenAI-compatible server such as Ollama, which needs no key), the free
    // tier next, paid last: one request a minute each.
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('local');
             SELECT keypool_add_key('local', 'ollama', NULL, 'llama3', rpm => 1, base_url => '{u}');
             SELECT keypool_create_pool('free');
             SELECT keypool_add_key('free', 'gemini', 'AIza-routing-gemini-0001', 'gemini-2.5-flash', rpm => 1, base_url => '{u}');
             SELECT keypool_create_pool('paid');
             SELECT keypool_add_key('paid', 'openai', 'sk-routing-openai-000001', 'gpt-4o-mini', rpm => 1, base_url => '{u}/v1');
             SELECT keypool_set_fallbacks('local', ARRAY['free', 'paid']);",
            u = mock.url
        ),
    )
    .await;
    let w = Worker::start(&conninfo(&db), "routing", &["--no-queue"]).await;

    for (pool, model, wire, key) in [
        ("local", "llama3", "openai", "(no key)"),
        ("free", "gemini-2.5-flash", "gemini", "AIza…0001"),
        ("paid", "gpt-4o-mini", "openai", "sk-…0001"),
    ] {
        let r = w.chat(hello("local")).await;
        assert_eq!(r.status(), 200, "served by {pool}");
        assert_eq!(header(&r, "x-keypool-pool").as_deref(), Some(pool));
        assert_eq!(header(&r, "x-keypool-attempts").as_deref(), Some("1"));
        let v: Value = r.json().await.expect("JSON");
        // Always OpenAI's shape for the app, with the model of the key that served.
        assert_eq!(v["object"], "chat.completion", "{v}");
        assert_eq!(v["model"], model, "{v}");
        let last = mock.recent().await.pop().expect("a provider call");
        assert_eq!(last["wire"], wire, "{last}");
        assert_eq!(last["key"], key, "{last}");
    }
    // The whole chain is used up: 429 with the smallest wait of the chain.
    let r = w.chat(hello("local")).await;
    assert_eq!(r.status(), 429);
    let wait: u64 = header(&r, "retry-after")
        .and_then(|s| s.parse().ok())
        .expect("Retry-After");
    assert!((1..=60).contains(&wait), "{wait}");
    let v: Value = r.json().await.expect("JSON");
    assert_eq!(v["error"]["code"], "POOL_EXHAUSTED", "{v}");

    let fell: i64 = one(
        &db.client,
        "SELECT fell_through_today FROM keypool_pool_stats WHERE pool = 'local'",
    )
    .await;
    assert_eq!(fell, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tokens_pools_bound_the_chain() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('first');
             SELECT keypool_add_key('first', 'openai', 'sk-bound-first-00000011', 'gpt-4o-mini', rpm => 1, base_url => '{u}/v1');
             SELECT keypool_create_pool('second');
             SELECT keypool_add_key('second', 'openai', 'sk-bound-second-0000022', 'gpt-4o', rpm => 1, base_url => '{u}/v1');
             SELECT keypool_create_pool('third');
             SELECT keypool_add_key('third', 'openai', 'sk-bound-third-00000033', 'o3', rpm => 5, base_url => '{u}/v1');
             SELECT keypool_set_fallbacks('first', ARRAY['second', 'third']);",
            u = mock.url
        ),
    )
    .await;
    let token: String = one(
        &db.client,
        "SELECT keypool_create_api_token('first and third', NULL, ARRAY['first', 'third'])",
    )
    .await;
    let w = Worker::start(&conninfo(&db), "bound-chain", &["--no-queue"]).await;

    let mut served = Vec::new();
    for _ in 0..3 {
        let r = chat_with(&w, &token, hello("first")).await;
        assert_eq!(r.status(), 200);
        served.push(header(&r, "x-keypool-pool").unwrap_or_default());
    }
    // "second" is not the token's: the chain skips it.
    assert_eq!(served, ["first", "third", "third"]);
    assert_eq!(mock.calls_with("sk-bound-second-0000022").await, 0);
    // Without the bound token the chain goes through "second".
    let r = w.chat(hello("first")).await;
    assert_eq!(header(&r, "x-keypool-pool").as_deref(), Some("second"));
}
