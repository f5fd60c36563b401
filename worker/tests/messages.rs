//! Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) on every provider:
//! passed through to Anthropic keys, carried to the others; the token as `x-api-key`; tool loops
//! as the Anthropic SDKs send them; the event stream; errors and refusals in Anthropic's shape.

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
             SELECT keypool_add_key('oa', 'openai', 'sk-messages-openai-00001', 'gpt-4o-mini', base_url => '{u}/v1');
             SELECT keypool_create_pool('gem');
             SELECT keypool_add_key('gem', 'gemini', 'AIza-messages-gemini-001', 'gemini-3-flash-preview', base_url => '{u}');
             SELECT keypool_create_pool('ant');
             SELECT keypool_add_key('ant', 'anthropic', 'sk-ant-messages-000001', 'claude-sonnet-4-5', base_url => '{u}');
             SELECT keypool_create_pool('tight');
             SELECT keypool_add_key('tight', 'anthropic', 'sk-ant-messages-tight01', 'claude-sonnet-4-5', rpd => 4, base_url => '{u}');
             SELECT keypool_assign('m-user', 'tight'), keypool_assign('m-other', 'tight');",
            u = mock.url
        ),
    )
    .await;
}

async fn post(w: &Worker, path: &str, body: &Value) -> (u16, Value, reqwest::header::HeaderMap) {
    let r = http()
        .post(format!("{}{path}", w.url))
        .header("x-api-key", TOKEN)
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .expect("post");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, r.json().await.unwrap_or(Value::Null), headers)
}

fn tools() -> Value {
    json!([{"name": "weather", "description": "The weather in a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}])
}

fn text_of(message: &Value) -> String {
    message["content"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["type"] == "text")
        .filter_map(|b| b["text"].as_str())
        .collect()
}

/// A streamed message put together as the Anthropic SDK's MessageStream does.
async fn streamed(w: &Worker, body: &Value) -> Value {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let r = http()
        .post(format!("{}/v1/messages", w.url))
        .header("x-api-key", TOKEN)
        .json(&body)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap_or_default();
    let mut message = Value::Null;
    let mut json_parts: Vec<String> = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let name = block.lines().find_map(|l| l.strip_prefix("event: ")).unwrap_or("");
        let data: Value = serde_json::from_str(block.lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or("null"))
            .unwrap_or_else(|e| panic!("{e}: {block}"));
        assert_eq!(data["type"], name, "{block}");
        match name {
            "message_start" => message = data["message"].clone(),
            "content_block_start" => {
                message["content"]
                    .as_array_mut()
                    .expect("content")
                    .push(data["content_block"].clone());
                json_parts.push(String::new());
            }
            "content_block_delta" => {
                let i = data["index"].as_u64().expect("index") as usize;
                let block = &mut message["content"][i];
                let d = &data["delta"];
                match d["type"].as_str() {
                    Some("text_delta") => {
                        block["text"] = json!(format!(
                            "{}{}",
                            block["text"].as_str().unwrap_or(""),
                            d["text"].as_str().unwrap_or("")
                        ))
                    }
                    Some("input_json_delta") => json_parts[i].push_str(d["partial_json"].as_str().unwrap_or("")),
                    _ => {}
                }
            }
            "content_block_stop" => {
                let i = data["index"].as_u64().expect("index") as usize;
                if message["content"][i]["type"] == "tool_use" && !json_parts[i].is_empty() {
                    message["content"][i]["input"] = serde_json::from_str(&json_parts[i]).expect("input JSON");
                }
            }
            "message_delta" => {
                message["stop_reason"] = data["delta"]["stop_reason"].clone();
                message["usage"]["output_tokens"] = data["usage"]["output_tokens"].clone();
            }
            "message_stop" => return message,
            _ => {}
        }
    }
    panic!("no message_stop: {text}")
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_carry_text_and_tools_on_every_provider() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    setup(&db, &mock).await;
    let w = Worker::start(&conninfo(&db), "messages", &["--no-queue"]).await;
    for pool in POOLS {
        let (status, m, headers) = post(
            &w,
            "/v1/messages",
            &json!({"model": pool, "max_tokens": 5, "system": "be brief", "metadata": {"user_id": "m-1"},
                    "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(status, 200, "{pool}: {m}");
        assert_eq!(headers["x-keypool-pool"], pool);
        assert_eq!(
            (m["type"].clone(), m["role"].clone()),
            (json!("message"), json!("assistant"))
        );
        assert_eq!(text_of(&m), "This is a mock reply", "{pool}: {m}");
        assert_eq!(
            (m["stop_reason"].clone(), m["usage"]["output_tokens"].clone()),
            (json!("max_tokens"), json!(5)),
            "{pool}"
        );

        for stream in [false, true] {
            let mut body = json!({"model": pool, "max_tokens": 1024, "tools": tools(), "metadata": {"user_id": "m-1"},
                                  "messages": [{"role": "user", "content": "weather in Oslo?"}]});
            let first = if stream {
                streamed(&w, &body).await
            } else {
                post(&w, "/v1/messages", &body).await.1
            };
            assert_eq!(first["stop_reason"], "tool_use", "{pool}: {first}");
            let call = first["content"]
                .as_array()
                .and_then(|c| c.iter().find(|b| b["type"] == "tool_use"))
                .cloned()
                .unwrap_or_else(|| panic!("{pool}: {first}"));
            assert_eq!(call["input"], json!({"city": "city-1"}), "{pool}");
            let messages = body["messages"].as_array_mut().expect("messages");
            messages.push(json!({"role": "assistant", "content": first["content"]}));
            messages.push(json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "Sunny in Oslo"}]}));
            let second = if stream {
                streamed(&w, &body).await
            } else {
                post(&w, "/v1/messages", &body).await.1
            };
            assert_eq!(
                text_of(&second),
                "Tool results: Sunny in Oslo",
                "{pool} stream={stream}: {second}"
            );
            assert_eq!(second["stop_reason"], "end_turn");
        }
    }
    // To an Anthropic key the body goes as it came: a field the worker does not know included.
    let (status, _, _) = post(
        &w,
        "/v1/messages",
        &json!({"model": "ant", "max_tokens": 5, "top_k": 3, "metadata": {"user_id": "m-1"},
                                                          "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(mock.recent().await.last().expect("a call")["body"]["top_k"], 3);
    // To another provider it cannot be carried: refused, in Anthropic's error shape.
    let (status, e, _) = post(
        &w,
        "/v1/messages",
        &json!({"model": "gem", "max_tokens": 5, "top_k": 3, "metadata": {"user_id": "m-1"},
                                                          "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 400, "{e}");
    assert_eq!(
        (e["type"].clone(), e["error"]["type"].clone()),
        (json!("error"), json!("invalid_request_error")),
        "{e}"
    );
    assert!(e["error"]["message"].as_str().unwrap_or("").contains("top_k"), "{e}");
    // count_tokens: the worker's count, no provider call.
    let calls = mock.stats().await["requests"].clone();
    let (status, count, _) = post(
        &w,
        "/v1/messages/count_tokens",
        &json!({"model": "gem", "metadata": {"user_id": "m-1"}, "messages": [{"role": "user", "content": "abcdefgh"}]}),
    )
    .await;
    assert_eq!(status, 200, "{count}");
    assert!(count["input_tokens"].as_i64().is_some_and(|n| n > 0), "{count}");
    assert_eq!(mock.stats().await["requests"], calls);
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_and_bad_tokens_speak_anthropics_error_shape() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    setup(&db, &mock).await;
    let w = Worker::start(&conninfo(&db), "messages-errors", &["--no-queue"]).await;
    let hi = |user: &str| json!({"model": "tight", "max_tokens": 5, "metadata": {"user_id": user}, "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..2 {
        assert_eq!(post(&w, "/v1/messages", &hi("m-user")).await.0, 200);
    }
    let (status, e, headers) = post(&w, "/v1/messages", &hi("m-user")).await;
    assert_eq!(status, 429, "{e}");
    assert_eq!(e["error"]["type"], "rate_limit_error", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("QUOTA_EXCEEDED"),
        "{e}"
    );
    assert!(headers.get("retry-after").is_some());
    let r = http()
        .post(format!("{}/v1/messages", w.url))
        .header("x-api-key", "not-a-token-000000000000")
        .json(&hi("m-other"))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 401);
    let e: Value = r.json().await.unwrap_or(Value::Null);
    assert_eq!(e["error"]["type"], "authentication_error", "{e}");
    // The route's own counters in /metrics: two served, one refused.
    let text = http()
        .get(format!("{}/metrics", w.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let count = |labels: &str| {
        let name = format!("keypool_worker_http_requests_total{{{labels}}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(name.as_str()))
            .map(|v| v.trim().to_string())
    };
    assert_eq!(
        count("route=\"/v1/messages\",status=\"200\"").as_deref(),
        Some("2"),
        "{text}"
    );
    assert_eq!(
        count("route=\"/v1/messages\",status=\"429\"").as_deref(),
        Some("1"),
        "{text}"
    );
}

/// Anthropic's server tools (billed per use) and OpenAI's web search are refused on every key,
/// before any provider call: the pool's budgets and shares cannot count them.
#[tokio::test(flavor = "multi_thread")]
async fn provider_run_tools_billed_per_use_are_refused() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    setup(&db, &mock).await;
    let w = Worker::start(&conninfo(&db), "messages-server-tools", &["--no-queue"]).await;
    for pool in ["ant", "oa"] {
        let (status, e, _) = post(
            &w,
            "/v1/messages",
            &json!({"model": pool, "max_tokens": 50, "metadata": {"user_id": "st"},
                    "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}],
                    "messages": [{"role": "user", "content": "news?"}]}),
        )
        .await;
        assert_eq!(
            (status, e["error"]["type"].clone()),
            (400, json!("invalid_request_error")),
            "{e}"
        );
        assert!(
            e["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("web_search_20250305")),
            "{e}"
        );
    }
    let (status, e, _) = post(
        &w,
        "/v1/chat/completions",
        &json!({"model": "oa", "user": "st", "web_search_options": {},
                "messages": [{"role": "user", "content": "news?"}]}),
    )
    .await;
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("web_search_options")),
        "{e}"
    );
    assert_eq!(mock.calls_with("sk-ant-messages-000001").await, 0);
    assert_eq!(mock.calls_with("sk-messages-openai-00001").await, 0);
}
