//! The Responses API (`POST /v1/responses`) on every provider: text, tool loops sent back the way
//! clients send them (items, `item_reference`s to the worker's own items), JSON schemas,
//! reasoning, streams in the Responses event sequence, and what it cannot carry or keep refused.

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
             SELECT keypool_add_key('oa', 'openai', 'sk-responses-openai-0001', 'gpt-4o-mini', base_url => '{u}/v1');
             SELECT keypool_create_pool('gem');
             SELECT keypool_add_key('gem', 'gemini', 'AIza-responses-gemini-01', 'gemini-3-flash-preview', base_url => '{u}');
             SELECT keypool_create_pool('ant');
             SELECT keypool_add_key('ant', 'anthropic', 'sk-ant-responses-00001', 'claude-sonnet-4-5', base_url => '{u}');
             SELECT keypool_create_pool('tight');
             SELECT keypool_add_key('tight', 'gemini', 'AIza-responses-tight-001', 'gemini-2.5-flash', rpd => 4, base_url => '{u}');
             SELECT keypool_assign('r-user', 'tight'), keypool_assign('r-other', 'tight');",
            u = mock.url
        ),
    )
    .await;
}

fn weather() -> Value {
    json!([{"type": "function", "name": "weather", "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}])
}

async fn post(w: &Worker, body: &Value) -> (u16, Value, reqwest::header::HeaderMap) {
    let r = w.post("/v1/responses", body).await;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, r.json().await.unwrap_or(Value::Null), headers)
}

/// A streamed response: its events (type, data), checked for order, and the final response.
async fn streamed(w: &Worker, body: &Value) -> (Vec<Value>, Value) {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let r = w.post("/v1/responses", &body).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap_or_default();
    let mut events = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let name = block.lines().find_map(|l| l.strip_prefix("event: ")).unwrap_or("");
        let data: Value = serde_json::from_str(block.lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or("null"))
            .unwrap_or_else(|e| panic!("{e}: {block}"));
        assert_eq!(data["type"], name, "{block}");
        assert_eq!(data["sequence_number"], events.len() as u64, "{text}");
        events.push(data);
    }
    assert_eq!(events[0]["type"], "response.created", "{text}");
    let last = events.last().cloned().unwrap_or(Value::Null);
    (events, last["response"].clone())
}

fn output_text(response: &Value) -> String {
    response["output"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["type"] == "message")
        .flat_map(|i| i["content"].as_array().cloned().unwrap_or_default())
        .filter_map(|c| c["text"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn responses_carry_text_tools_and_schemas_on_every_provider() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    setup(&db, &mock).await;
    let w = Worker::start(&conninfo(&db), "responses", &["--no-queue"]).await;
    for pool in POOLS {
        // Plain text, cut at the output cap.
        let (status, r, headers) = post(
            &w,
            &json!({"model": pool, "user": "u", "input": "hi", "instructions": "be brief", "max_output_tokens": 5}),
        )
        .await;
        assert_eq!(status, 200, "{pool}: {r}");
        assert_eq!(headers["x-keypool-pool"], pool);
        assert_eq!(
            (r["object"].clone(), r["status"].clone()),
            (json!("response"), json!("incomplete")),
            "{pool}: {r}"
        );
        assert_eq!(r["incomplete_details"]["reason"], "max_output_tokens");
        assert_eq!(output_text(&r), "This is a mock reply", "{pool}");
        assert_eq!(r["usage"]["output_tokens"], 5, "{pool}: {r}");

        // Two steps of tools, both ways: whole and streamed.
        for stream in [false, true] {
            let mut body = json!({"model": pool, "user": "u", "tools": weather(),
                                  "input": [{"role": "user", "content": [{"type": "input_text", "text": "weather in Oslo?"}]}]});
            let first = if stream {
                streamed(&w, &body).await.1
            } else {
                post(&w, &body).await.1
            };
            let call = first["output"]
                .as_array()
                .and_then(|o| o.iter().find(|i| i["type"] == "function_call"))
                .cloned()
                .unwrap_or_else(|| panic!("{pool}: {first}"));
            assert_eq!(call["name"], "weather");
            assert_eq!(call["arguments"], r#"{"city":"city-1"}"#, "{pool}");
            // Sent back as the AI SDK sends it: the call without its id, and the output.
            let input = body["input"].as_array_mut().expect("input");
            input.push(json!({"type": "function_call", "call_id": call["call_id"], "name": "weather", "arguments": call["arguments"]}));
            input.push(json!({"type": "function_call_output", "call_id": call["call_id"], "output": "Sunny in Oslo"}));
            let second = if stream {
                streamed(&w, &body).await.1
            } else {
                post(&w, &body).await.1
            };
            assert_eq!(
                output_text(&second),
                "Tool results: Sunny in Oslo",
                "{pool} stream={stream}: {second}"
            );
            assert_eq!(second["status"], "completed");
        }

        // JSON following a schema.
        let (status, r, _) = post(
            &w,
            &json!({"model": pool, "user": "u", "input": "a person", "text": {"format": {"type": "json_schema", "name": "person", "strict": true,
                    "schema": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"], "additionalProperties": false}}}}),
        )
        .await;
        assert_eq!(status, 200, "{pool}: {r}");
        assert_eq!(
            serde_json::from_str::<Value>(&output_text(&r)).ok(),
            Some(json!({"name": "name-1"})),
            "{pool}"
        );
    }

    // The worker's own items come back as references: it wrote what they hold into their ids.
    let (_, first, _) = post(
        &w,
        &json!({"model": "ant", "user": "u", "tools": weather(), "reasoning": {"effort": "low"}, "input": "weather?"}),
    )
    .await;
    let items = first["output"].as_array().cloned().unwrap_or_default();
    let reasoning = items
        .iter()
        .find(|i| i["type"] == "reasoning")
        .cloned()
        .unwrap_or_else(|| panic!("{first}"));
    assert_eq!(reasoning["summary"][0]["text"], "The mock thinks about it.");
    let call = items
        .iter()
        .find(|i| i["type"] == "function_call")
        .cloned()
        .expect("a call");
    let body = json!({"model": "ant", "user": "u", "tools": weather(), "reasoning": {"effort": "low"}, "input": [
        {"role": "user", "content": "weather?"},
        {"type": "item_reference", "id": reasoning["id"]},
        {"type": "function_call", "call_id": call["call_id"], "name": "weather", "arguments": call["arguments"]},
        {"type": "function_call_output", "call_id": call["call_id"], "output": "Sunny"}]});
    let (status, r, _) = post(&w, &body).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(output_text(&r), "Tool results: Sunny");
    // Anthropic refuses the step without its signed thinking: the reference did carry it.
    let mut without = body.clone();
    without["input"].as_array_mut().expect("input").remove(1);
    let (status, r, _) = post(&w, &without).await;
    assert_eq!(status, 400, "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_follow_the_responses_event_sequence_and_settle() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    setup(&db, &mock).await;
    let w = Worker::start(&conninfo(&db), "responses-stream", &["--no-queue"]).await;
    for pool in POOLS {
        let (events, done) = streamed(
            &w,
            &json!({"model": pool, "user": "u", "input": "think", "reasoning": {"effort": "high"},
                                                  "max_output_tokens": 30000}),
        )
        .await;
        let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
        let at = |k: &str| {
            kinds
                .iter()
                .position(|x| *x == k)
                .unwrap_or_else(|| panic!("{pool}: no {k} in {kinds:?}"))
        };
        assert!(
            at("response.output_item.added") < at("response.content_part.added"),
            "{kinds:?}"
        );
        assert!(at("response.content_part.added") < at("response.output_text.delta"));
        assert!(at("response.output_text.done") < at("response.completed"));
        assert_eq!(*kinds.last().unwrap_or(&""), "response.completed", "{pool}");
        let text: String = events
            .iter()
            .filter(|e| e["type"] == "response.output_text.delta")
            .filter_map(|e| e["delta"].as_str())
            .collect();
        assert_eq!(text, output_text(&done), "{pool}");
        assert_eq!(done["usage"]["output_tokens"], 12 + 32, "{pool}: {done}");
        let total = done["usage"]["total_tokens"].as_i64().unwrap_or(0);
        eventually(
            &db,
            &format!(
                "SELECT s.tokens_this_minute FROM keypool_scopes s JOIN keypool.key k ON k.scope_id = s.scope_id
                   JOIN keypool.pool p ON p.id = k.pool_id WHERE p.name = '{pool}'"
            ),
            &total.to_string(),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn what_responses_cannot_carry_or_keep_is_refused_and_refusals_are_429s() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    setup(&db, &mock).await;
    let w = Worker::start(&conninfo(&db), "responses-refuse", &["--no-queue"]).await;
    let calls = mock.stats().await["requests"].clone();
    for (body, code) in [
        (
            json!({"model": "gem", "input": "x", "previous_response_id": "resp_1"}),
            Value::Null,
        ),
        (
            json!({"model": "gem", "user": "u", "input": [{"type": "item_reference", "id": "msg_67ccd2"}]}),
            json!("unsupported_parameter"),
        ),
        (
            json!({"model": "ant", "user": "u", "input": "x", "tools": [{"type": "web_search"}]}),
            json!("unsupported_parameter"),
        ),
        (
            json!({"model": "oa", "user": "u", "input": "x", "truncation": "auto"}),
            json!("unsupported_parameter"),
        ),
    ] {
        let (status, r, _) = post(&w, &body).await;
        assert_eq!((status, r["error"]["code"].clone()), (400, code), "{body}: {r}");
    }
    assert_eq!(mock.stats().await["requests"], calls, "no provider saw any of them");
    // A user past their share: 429 in OpenAI's error shape, with the wait.
    let mut last = (0, Value::Null, reqwest::header::HeaderMap::new());
    for _ in 0..2 {
        last = post(&w, &json!({"model": "tight", "user": "r-user", "input": "hi"})).await;
    }
    assert_eq!(last.0, 200);
    let (status, r, headers) = post(&w, &json!({"model": "tight", "user": "r-user", "input": "hi"})).await;
    assert_eq!(
        (status, r["error"]["code"].clone()),
        (429, json!("QUOTA_EXCEEDED")),
        "{r}"
    );
    assert!(headers.get("retry-after").is_some() && headers["x-should-retry"] == "false");
}

/// The mock's own `/v1/responses` (what a gateway that passes Responses through to OpenAI
/// reaches, bench/vs-peers.sh) answers as the worker does over chat completions: the same text,
/// the same tool loop, the same event sequence; and it refuses stored state as OpenAI does.
#[tokio::test(flavor = "multi_thread")]
async fn the_mocks_responses_api_answers_as_the_worker_does() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    setup(&db, &mock).await;
    let w = Worker::start(&conninfo(&db), "responses-mock", &["--no-queue"]).await;
    let direct = |body: Value, stream: bool| {
        let url = format!("{}/v1/responses", mock.url);
        async move {
            let mut body = body;
            if stream {
                body["stream"] = json!(true);
            }
            let r = http()
                .post(url)
                .bearer_auth("sk-responses-direct-0001")
                .json(&body)
                .send()
                .await
                .expect("post");
            let status = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            if !stream || status != 200 {
                return (status, serde_json::from_str(&text).unwrap_or(Value::Null), Vec::new());
            }
            let events: Vec<Value> = text
                .split("\n\n")
                .filter(|b| !b.trim().is_empty())
                .map(|b| {
                    let data = b.lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or("null");
                    serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {b}"))
                })
                .collect();
            let last = events.last().map(|e| e["response"].clone()).unwrap_or(Value::Null);
            (status, last, events)
        }
    };
    let ask = json!({"model": "gpt-4o-mini", "input": "hi", "instructions": "be brief", "max_output_tokens": 5});
    let (status, mine, _) = direct(ask.clone(), false).await;
    assert_eq!(status, 200, "{mine}");
    let mut via_worker = ask.clone();
    via_worker["model"] = json!("oa");
    via_worker["user"] = json!("u");
    let (status, worker_answer, _) = post(&w, &via_worker).await;
    assert_eq!(status, 200, "{worker_answer}");
    assert_eq!(output_text(&mine), output_text(&worker_answer));
    assert_eq!(mine["status"], "incomplete");
    assert_eq!(mine["usage"]["output_tokens"], worker_answer["usage"]["output_tokens"]);

    // The tool loop, whole and streamed.
    for stream in [false, true] {
        let mut body = json!({"model": "gpt-4o-mini", "tools": weather(),
                              "input": [{"role": "user", "content": [{"type": "input_text", "text": "weather in Oslo?"}]}]});
        let (status, first, events) = direct(body.clone(), stream).await;
        assert_eq!(status, 200, "{first}");
        let call = first["output"]
            .as_array()
            .and_then(|o| o.iter().find(|i| i["type"] == "function_call"))
            .cloned()
            .unwrap_or_else(|| panic!("{first}"));
        assert_eq!(call["arguments"], r#"{"city":"city-1"}"#);
        if stream {
            let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
            assert_eq!(
                types,
                [
                    "response.created",
                    "response.in_progress",
                    "response.output_item.added",
                    "response.function_call_arguments.delta",
                    "response.function_call_arguments.delta",
                    "response.function_call_arguments.done",
                    "response.output_item.done",
                    "response.completed"
                ]
            );
            let sequence: Vec<u64> = events.iter().filter_map(|e| e["sequence_number"].as_u64()).collect();
            assert_eq!(sequence, (0..events.len() as u64).collect::<Vec<_>>());
        }
        let input = body["input"].as_array_mut().expect("input");
        input.push(json!({"type": "function_call", "call_id": call["call_id"], "name": "weather", "arguments": call["arguments"]}));
        input.push(json!({"type": "function_call_output", "call_id": call["call_id"], "output": "Sunny in Oslo"}));
        let (status, second, events) = direct(body, stream).await;
        assert_eq!(status, 200, "{second}");
        assert_eq!(output_text(&second), "Tool results: Sunny in Oslo");
        if stream {
            let deltas: String = events
                .iter()
                .filter(|e| e["type"] == "response.output_text.delta")
                .filter_map(|e| e["delta"].as_str())
                .collect();
            assert_eq!(deltas, "Tool results: Sunny in Oslo");
        }
    }
    // Nothing is stored: no earlier response, no reference, no output without its call.
    for bad in [
        json!({"model": "gpt-4o-mini", "input": "hi", "previous_response_id": "resp_mock1"}),
        json!({"model": "gpt-4o-mini", "input": [{"type": "item_reference", "id": "msg_mock1"}]}),
        json!({"model": "gpt-4o-mini", "input": [{"type": "function_call_output", "call_id": "call_x", "output": "?"}]}),
    ] {
        let (status, e, _) = direct(bad.clone(), false).await;
        assert_eq!(status, 400, "{bad}: {e}");
        assert_eq!(e["error"]["type"], "invalid_request_error");
    }
}
