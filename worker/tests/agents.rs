//! Agents through the pool: tool calling, structured output and reasoning on every provider
//! (an OpenAI-style key passed through, a native Gemini key and an Anthropic key translated),
//! streamed and not, against the mock provider, which checks what each provider checks (tool
//! results answering the turn's calls, Gemini 3's thought signatures, Anthropic's signed
//! thinking before a tool use). What a provider cannot carry is refused before anything is sent.

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
             SELECT keypool_add_key('oa', 'openai', 'sk-agents-openai-000001', 'gpt-4o-mini', base_url => '{u}/v1');
             SELECT keypool_create_pool('gem');
             SELECT keypool_add_key('gem', 'gemini', 'AIza-agents-gemini-00001', 'gemini-3-flash-preview', base_url => '{u}');
             SELECT keypool_create_pool('ant');
             SELECT keypool_add_key('ant', 'anthropic', 'sk-ant-agents-0000001', 'claude-sonnet-4-5', base_url => '{u}');
             SELECT keypool_assign('agent-user', p) FROM unnest(ARRAY['oa', 'gem', 'ant']) p;",
            u = mock.url
        ),
    )
    .await;
}

fn weather_tool() -> Value {
    json!([{"type": "function", "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": false}
    }}, {"type": "function", "function": {
        "name": "time",
        "description": "The time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}
    }}])
}

async fn send(w: &Worker, body: &Value) -> (u16, Value) {
    let r = w.chat(body.clone()).await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A streamed answer put together as the client libraries do: the message (content, reasoning,
/// tool calls by index), the finish reason and the usage chunk.
async fn streamed(w: &Worker, body: &Value) -> (u16, Value) {
    let mut body = body.clone();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = w.chat(body).await;
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    if status != 200 {
        return (status, serde_json::from_str(&text).unwrap_or(Value::Null));
    }
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let (mut content, mut reasoning, mut finish, mut usage) = (String::new(), String::new(), Value::Null, Value::Null);
    let mut calls: Vec<Value> = Vec::new();
    for data in text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
    {
        let chunk: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"));
        assert!(chunk.get("error").is_none(), "{text}");
        if !chunk["usage"].is_null() {
            usage = chunk["usage"].clone();
        }
        let Some(choice) = chunk["choices"].get(0) else {
            continue;
        };
        let delta = &choice["delta"];
        content.push_str(delta["content"].as_str().unwrap_or(""));
        reasoning.push_str(delta["reasoning_content"].as_str().unwrap_or(""));
        for c in delta["tool_calls"].as_array().into_iter().flatten() {
            let i = c["index"].as_u64().expect("a tool call delta has its index") as usize;
            if i == calls.len() {
                assert!(
                    c["id"].is_string() && c["function"]["name"].is_string(),
                    "first delta of a call: {c}"
                );
                calls.push(json!({"id": c["id"], "type": "function", "function": {"name": c["function"]["name"], "arguments": ""}}));
            }
            let args = calls[i]["function"]["arguments"].as_str().unwrap_or("").to_string()
                + c["function"]["arguments"].as_str().unwrap_or("");
            calls[i]["function"]["arguments"] = json!(args);
        }
        if !choice["finish_reason"].is_null() {
            finish = choice["finish_reason"].clone();
        }
    }
    let mut message =
        json!({"role": "assistant", "content": if content.is_empty() { Value::Null } else { json!(content) }});
    if !calls.is_empty() {
        message["tool_calls"] = json!(calls);
    }
    if !reasoning.is_empty() {
        message["reasoning_content"] = json!(reasoning);
    }
    (
        200,
        json!({"choices": [{"message": message, "finish_reason": finish}], "usage": usage}),
    )
}

/// Two steps of an agent: the model calls the weather tool, the app answers, the model quotes
/// the answer. `stream` says which way the answers come.
async fn two_steps(w: &Worker, pool: &str, stream: bool, extra: Value) -> (Value, Value) {
    let mut body = json!({"model": pool, "user": "agent-user", "messages": [{"role": "user", "content": "What is the weather in Oslo?"}],
                          "tools": weather_tool()});
    for (k, v) in extra.as_object().into_iter().flatten() {
        body[k] = v.clone();
    }
    let (status, first) = if stream {
        streamed(w, &body).await
    } else {
        send(w, &body).await
    };
    assert_eq!(status, 200, "{pool}: {first}");
    let message = first["choices"][0]["message"].clone();
    assert_eq!(first["choices"][0]["finish_reason"], "tool_calls", "{pool}: {first}");
    let call = &message["tool_calls"][0];
    assert_eq!(call["function"]["name"], "weather", "{pool}: {first}");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap_or("")).expect("arguments are JSON");
    assert_eq!(args, json!({"city": "city-1"}), "{pool}");
    body["messages"].as_array_mut().expect("messages").extend([
        message.clone(),
        json!({"role": "tool", "tool_call_id": call["id"], "content": "Sunny in Oslo"}),
    ]);
    let (status, second) = if stream {
        streamed(w, &body).await
    } else {
        send(w, &body).await
    };
    assert_eq!(status, 200, "{pool}: {second}");
    (first, second)
}

#[tokio::test(flavor = "multi_thread")]
async fn tools_take_two_steps_on_every_provider_streamed_and_not() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    setup(&db, &mock).await;
    let w = Worker::start(&conninfo(&db), "agents-tools", &["--no-queue"]).await;
    for pool in POOLS {
        for stream in [false, true] {
            let (first, second) = two_steps(&w, pool, stream, json!({})).await;
            assert_eq!(
                second["choices"][0]["message"]["content"], "Tool results: Sunny in Oslo",
                "{pool} stream={stream}: {second}"
            );
            assert_eq!(second["choices"][0]["finish_reason"], "stop");
            let id = first["choices"][0]["message"]["tool_calls"][0]["id"]
                .as_str()
                .unwrap_or("")
                .to_string();
            if pool == "gem" {
                // Gemini's thought signature rode in the id and went back with the call.
                assert!(id.contains(".kpg."), "{id}");
                let sent = mock.recent().await;
                let last = &sent.last().expect("a call")["body"];
                let call = &last["contents"][1]["parts"][0];
                assert!(
                    call["thoughtSignature"]
                        .as_str()
                        .is_some_and(|s| s.starts_with("mocksig")),
                    "{last}"
                );
                assert_eq!(
                    last["contents"][2]["parts"][0]["functionResponse"]["name"], "weather",
                    "{last}"
                );
                assert_eq!(
                    call["functionCall"]["id"],
                    last["contents"][2]["parts"][0]["functionResponse"]["id"]
                );
            }
        }
    }

    // Several calls at once, when the provider may make them; refused where it cannot be told
    // not to.
    for pool in POOLS {
        let body = json!({"model": pool, "user": "agent-user", "tools": weather_tool(),
                          "messages": [{"role": "user", "content": "weather and time, in parallel"}]});
        let (status, answer) = send(&w, &body).await;
        assert_eq!(status, 200, "{answer}");
        let calls = answer["choices"][0]["message"]["tool_calls"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(calls.len(), 2, "{pool}: {answer}");
        let mut one_at_a_time = body.clone();
        one_at_a_time["parallel_tool_calls"] = json!(false);
        let (status, answer) = send(&w, &one_at_a_time).await;
        if pool == "gem" {
            assert_eq!(
                (status, answer["error"]["code"].clone()),
                (400, json!("unsupported_parameter")),
                "{answer}"
            );
        } else {
            assert_eq!(status, 200, "{pool}: {answer}");
            assert_eq!(
                answer["choices"][0]["message"]["tool_calls"].as_array().map(Vec::len),
                Some(1),
                "{pool}"
            );
        }
    }

    // A forced tool, and no tool at all.
    for pool in POOLS {
        let body = json!({"model": pool, "user": "agent-user", "tools": weather_tool(), "tool_choice": {"type": "function", "function": {"name": "time"}},
                          "messages": [{"role": "user", "content": "hi"}]});
        let (status, answer) = send(&w, &body).await;
        assert_eq!(status, 200, "{pool}: {answer}");
        assert_eq!(
            answer["choices"][0]["message"]["tool_calls"][0]["function"]["name"], "time",
            "{pool}: {answer}"
        );
        let mut none = body.clone();
        none["tool_choice"] = json!("none");
        let (status, answer) = send(&w, &none).await;
        assert_eq!(status, 200, "{pool}: {answer}");
        assert!(
            answer["choices"][0]["message"]["tool_calls"].is_null(),
            "{pool}: {answer}"
        );
        assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn anthropic_thinking_goes_back_with_the_tool_call_it_led_to() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    setup(&db, &mock).await;
    let w = Worker::start(&conninfo(&db), "agents-thinking", &["--no-queue"]).await;
    for stream in [false, true] {
        let (first, second) = two_steps(&w, "ant", stream, json!({"reasoning_effort": "low"})).await;
        let message = &first["choices"][0]["message"];
        assert_eq!(message["reasoning_content"], "The mock thinks about it.", "{first}");
        assert!(
            message["tool_calls"][0]["id"].as_str().unwrap_or("").contains(".kpa."),
            "{first}"
        );
        assert_eq!(
            second["choices"][0]["message"]["content"],
            "Tool results: Sunny in Oslo"
        );
    }
    // Without what the id carried, Anthropic refuses the turn (the worker passes its 400 on).
    let mut body = json!({"model": "ant", "user": "agent-user", "tools": weather_tool(), "reasoning_effort": "low",
                          "messages": [{"role": "user", "content": "What is the weather in Oslo?"}]});
    let (_, first) = send(&w, &body).await;
    let mut message = first["choices"][0]["message"].clone();
    let id = message["tool_calls"][0]["id"].as_str().unwrap_or("").to_string();
    let plain = id.split(".kpa.").next().unwrap_or("").to_string();
    message["tool_calls"][0]["id"] = json!(plain);
    body["messages"].as_array_mut().expect("messages").extend([
        message,
        json!({"role": "tool", "tool_call_id": plain, "content": "Sunny"}),
    ]);
    let (status, answer) = send(&w, &body).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]["message"].as_str().unwrap_or("").contains("thinking"),
        "{answer}"
    );
    // A forced tool while the model thinks is what Anthropic does not take: refused here.
    let (status, answer) = send(
        &w,
        &json!({"model": "ant", "user": "agent-user", "tools": weather_tool(), "reasoning_effort": "low", "tool_choice": "required",
                "messages": user_message("x")}),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].clone()),
        (400, json!("unsupported_parameter")),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_texts_and_refusals_make_turns_every_provider_takes() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    setup(&db, &mock).await;
    let w = Worker::start(&conninfo(&db), "agents-empty", &["--no-queue"]).await;
    for pool in POOLS {
        // A tool that returned nothing, an empty system message, an earlier refusal.
        let (_, first) = send(
            &w,
            &json!({"model": pool, "user": "agent-user", "tools": weather_tool(), "messages": user_message("weather?")}),
        )
        .await;
        let message = first["choices"][0]["message"].clone();
        let id = message["tool_calls"][0]["id"].clone();
        let body = json!({"model": pool, "user": "agent-user", "tools": weather_tool(), "messages": [
            {"role": "system", "content": ""},
            {"role": "user", "content": "insult me"},
            {"role": "assistant", "content": null, "refusal": "I won't."},
            {"role": "user", "content": "weather?"},
            message,
            {"role": "tool", "tool_call_id": id, "content": ""}]});
        let (status, answer) = send(&w, &body).await;
        assert_eq!(status, 200, "{pool}: {answer}");
        assert_eq!(
            answer["choices"][0]["message"]["content"], "Tool results:",
            "{pool}: {answer}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn json_schemas_are_followed_on_every_provider() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    setup(&db, &mock).await;
    let w = Worker::start(&conninfo(&db), "agents-json", &["--no-queue"]).await;
    let schema = json!({"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
                        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 18}},
                        "required": ["name", "age"], "additionalProperties": false});
    for pool in POOLS {
        for stream in [false, true] {
            let body = json!({"model": pool, "user": "agent-user", "messages": user_message("a person"),
                              "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": true}}});
            let (status, answer) = if stream {
                streamed(&w, &body).await
            } else {
                send(&w, &body).await
            };
            assert_eq!(status, 200, "{pool}: {answer}");
            let doc: Value = serde_json::from_str(answer["choices"][0]["message"]["content"].as_str().unwrap_or(""))
                .unwrap_or_else(|e| panic!("{pool}: {e}: {answer}"));
            assert_eq!(doc, json!({"name": "name-1", "age": 18}), "{pool}");
        }
    }
    let sent = mock.recent().await;
    let by_wire = |wire: &str| {
        sent.iter()
            .rev()
            .find(|r| r["wire"] == wire)
            .map(|r| r["body"].clone())
            .unwrap_or(Value::Null)
    };
    let gemini = by_wire("gemini");
    assert_eq!(gemini["generationConfig"]["responseMimeType"], "application/json");
    assert!(
        gemini["generationConfig"]["responseJsonSchema"]
            .get("$schema")
            .is_none(),
        "{gemini}"
    );
    assert_eq!(by_wire("anthropic")["output_config"]["format"]["type"], "json_schema");
    // A schema keyword Gemini cannot express is refused, not dropped.
    let body = json!({"model": "gem", "user": "agent-user", "messages": user_message("x"),
                      "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object", "properties": {"e": {"type": "string", "pattern": "@"}}}}}});
    let (status, answer) = send(&w, &body).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]["message"].as_str().unwrap_or("").contains("`pattern`"),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn what_a_provider_cannot_carry_is_refused_before_anything_is_sent() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    setup(&db, &mock).await;
    let w = Worker::start(&conninfo(&db), "agents-refuse", &["--no-queue"]).await;
    let remaining = |pool: &'static str| {
        let db = &db;
        async move {
            value(
                db,
                &format!("SELECT remaining_today FROM keypool_allocation('agent-user', '{pool}')"),
            )
            .await
        }
    };
    for (pool, extra, field) in [
        ("gem", json!({"logit_bias": {"50256": -100}}), "logit_bias"),
        ("gem", json!({"logprobs": true}), "logprobs"),
        ("ant", json!({"n": 2}), "n"),
        ("ant", json!({"seed": 7}), "seed"),
        (
            "ant",
            json!({"response_format": {"type": "json_object"}}),
            "response_format: json_object (give a json_schema)",
        ),
        (
            "gem",
            json!({"tools": [{"type": "web_search"}]}),
            "tools[0] of type \"web_search\"",
        ),
    ] {
        let before = (mock.stats().await["requests"].clone(), remaining(pool).await);
        let mut body = json!({"model": pool, "user": "agent-user", "messages": user_message("hi")});
        for (k, v) in extra.as_object().into_iter().flatten() {
            body[k] = v.clone();
        }
        let (status, answer) = send(&w, &body).await;
        assert_eq!(status, 400, "{pool} {field}: {answer}");
        assert_eq!(answer["error"]["code"], "unsupported_parameter", "{answer}");
        assert_eq!(answer["error"]["param"], field, "{answer}");
        let provider = if pool == "gem" { "gemini" } else { "anthropic" };
        assert!(
            answer["error"]["message"].as_str().unwrap_or("").contains(provider),
            "{answer}"
        );
        // No provider call, and the user's share is as it was.
        assert_eq!(
            (mock.stats().await["requests"].clone(), remaining(pool).await),
            before,
            "{pool} {field}"
        );
    }
    // The same fields pass through to an OpenAI-style key.
    let (status, answer) = send(
        &w,
        &json!({"model": "oa", "user": "agent-user", "messages": user_message("hi"), "logit_bias": {"50256": -100}, "n": 2}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        mock.recent().await.last().expect("a call")["body"]["logit_bias"],
        json!({"50256": -100})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reasoning_tokens_are_settled_into_the_keys_minute() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    setup(&db, &mock).await;
    let w = Worker::start(&conninfo(&db), "agents-reasoning", &["--no-queue"]).await;
    for pool in POOLS {
        let body = json!({"model": pool, "user": "agent-user", "messages": user_message("think hard"), "reasoning_effort": "high", "max_completion_tokens": 30000});
        let (status, answer) = streamed(&w, &body).await;
        assert_eq!(status, 200, "{pool}: {answer}");
        let usage = &answer["usage"];
        let total = usage["total_tokens"].as_i64().unwrap_or(0);
        // 32 reasoning tokens (the mock's for "high") and the 12 words of the reply.
        assert_eq!(usage["completion_tokens"], 12 + 32, "{pool}: {usage}");
        if pool != "ant" {
            assert_eq!(
                usage["completion_tokens_details"]["reasoning_tokens"], 32,
                "{pool}: {usage}"
            );
        }
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
