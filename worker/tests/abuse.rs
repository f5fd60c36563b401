//! The abuse suite (issue 25): an end user holding only what an app hands out, a user-bound API
//! token, does the worst they can: floods of own keys, keys of providers that cannot check them,
//! model names and proxy paths aimed at other addresses, bodies of millions of tiny JSON values,
//! bodies that trickle, streams never read, more requests at once than anyone should hold. Each
//! case asserts what OTHER callers see afterwards (their requests served, keys active, rows and
//! slots not grown, memory bounded) and that no server log line holds a token or a secret.

mod common;

use std::time::{Duration, Instant};

use common::*;
use keypool_tests::{one, Cluster, TestDb};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn send(url: &str, method: reqwest::Method, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
    let mut r = http().request(method, format!("{url}{path}")).bearer_auth(token);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.expect("request to the worker");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn add_own(w: &Worker, token: &str, body: Value) -> (u16, Value) {
    send(&w.url, reqwest::Method::POST, "/v1/keys", token, Some(body)).await
}

async fn chat_as(w: &Worker, token: &str, body: Value) -> (u16, Value) {
    send(&w.url, reqwest::Method::POST, "/v1/chat/completions", token, Some(body)).await
}

fn hello(model: &str) -> Value {
    json!({"model": model, "messages": user_message("hello"), "max_tokens": 3})
}

async fn token(db: &TestDb<'_>, user: &str, pools: &[&str]) -> String {
    let pools: Vec<String> = pools.iter().map(|p| format!("'{p}'")).collect();
    one(
        &db.client,
        &format!(
            "SELECT keypool_create_api_token('{user}', '{user}', ARRAY[{}])",
            pools.join(",")
        ),
    )
    .await
}

async fn issue(mock: &Mock, secret: &str) {
    let r = http()
        .post(format!("{}/_mock/keys", mock.url))
        .json(&json!({"issue": secret}))
        .send()
        .await
        .expect("issue a key");
    assert!(r.status().is_success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_own_keys_takes_no_room_capacity_or_rows_from_anyone() {
    // Shared memory as small as in the report: 64 scopes and 64 keys; users' own keys may take
    // half of them (pg_keypool.owned_key_share = 0.5).
    let cluster = Cluster::start(
        "abuse-own-keys",
        &["pg_keypool.max_scopes = 64", "pg_keypool.max_keys = 64"],
    );
    let db = cluster.fresh_db().await;
    let mock = Mock::start(&["--issued-keys-only"]);
    for s in ["sk-abuse-shared-00000001", "sk-abuse-shared-00000002"] {
        issue(&mock, s).await;
    }
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('chat', 'openai', 'sk-abuse-shared-00000001', 'gpt-4o-mini', base_url => '{u}/v1', rpd => 10000);
             SELECT keypool_add_key('chat', 'openai', 'sk-abuse-shared-00000002', 'gpt-4o-mini', base_url => '{u}/v1', rpd => 10000);",
            u = mock.url
        ),
    )
    .await;
    let mallory = token(&db, "mallory", &["chat"]).await;
    let bob = token(&db, "bob", &["chat"]).await;
    // (More attempts a minute than the default 10, to see every other limit.)
    let w = Worker::start(
        &conninfo(&db),
        "abuse-keys",
        &["--no-queue", "--key-adds-per-minute", "1000"],
    )
    .await;
    assert_eq!(chat_as(&w, &bob, hello("chat")).await.0, 200);
    let scopes_before: i64 = one(&db.client, "SELECT count(*) FROM keypool.scope").await;

    // 100 keys from one user: 30 of a keyless server, 30 of a plain HTTP API (neither can tell
    // a real key from a made-up one), 30 made up for OpenAI, and 10 real ones.
    let mut statuses: std::collections::BTreeMap<(u16, String), usize> = Default::default();
    for i in 0..100 {
        let (provider, secret) = match i {
            0..30 => ("ollama", format!("made-up-ollama-{i:08}")),
            30..60 => ("http", format!("made-up-http-{i:010}")),
            60..90 => ("openai", format!("sk-made-up-mallory-{i:06}")),
            _ => {
                let s = format!("sk-abuse-mallory-real-{i:04}");
                issue(&mock, &s).await;
                ("openai", s)
            }
        };
        let (status, body) = add_own(
            &w,
            &mallory,
            json!({"pool": "chat", "provider": provider, "secret": secret, "model": "gpt-4o-mini"}),
        )
        .await;
        assert!(!body.to_string().contains(&secret), "{body}");
        *statuses
            .entry((status, body["error"]["code"].as_str().unwrap_or("").to_string()))
            .or_default() += 1;
    }
    let expected: std::collections::BTreeMap<(u16, String), usize> = [
        ((200, String::new()), 5),
        ((403, "not_allowed".to_string()), 60),
        ((409, "limit_reached".to_string()), 5),
        ((422, "key_rejected".to_string()), 30),
    ]
    .into_iter()
    .collect();
    assert_eq!(statuses, expected);
    assert_eq!(
        one::<i64>(&db.client, "SELECT count(*) FROM keypool_keys WHERE owner = 'mallory'").await,
        5
    );
    // Everyone else is served, on the shared keys, which are all still active.
    for _ in 0..5 {
        assert_eq!(chat_as(&w, &bob, hello("chat")).await.0, 200);
    }
    assert_eq!(
        one::<i64>(
            &db.client,
            "SELECT count(*) FROM keypool_keys WHERE owner IS NULL AND state = 'active'"
        )
        .await,
        2
    );

    // Adding and removing her keys again and again accumulates neither rows nor slots.
    let slots_before: i32 = one(&db.client, "SELECT scopes_used FROM keypool_status()").await;
    for _ in 0..4 {
        let (_, mine) = send(&w.url, reqwest::Method::GET, "/v1/keys", &mallory, None).await;
        for k in mine.as_array().expect("her keys") {
            let id = k["key_id"].as_i64().expect("key_id");
            let (status, _) = send(
                &w.url,
                reqwest::Method::DELETE,
                &format!("/v1/keys/{id}"),
                &mallory,
                None,
            )
            .await;
            assert_eq!(status, 200);
        }
        for i in 90..95 {
            let (status, body) = add_own(
                &w,
                &mallory,
                json!({"pool": "chat", "provider": "openai", "secret": format!("sk-abuse-mallory-real-{i:04}")}),
            )
            .await;
            assert_eq!(status, 200, "{body}");
        }
    }
    assert_eq!(
        one::<i64>(&db.client, "SELECT count(*) FROM keypool.scope").await,
        scopes_before + 5
    );
    assert_eq!(
        one::<i32>(&db.client, "SELECT scopes_used FROM keypool_status()").await,
        slots_before
    );

    // More users bring keys: together they never take more than their share of the slots (32
    // of 64), and the one who would exceed it is told so when adding, not anyone's reservation.
    let mut limited = 0;
    for u in 1..=6 {
        let user = format!("user{u}");
        let t = token(&db, &user, &["chat"]).await;
        for k in 0..5 {
            let s = format!("sk-abuse-{user}-key-{k:04}");
            issue(&mock, &s).await;
            let (status, body) = add_own(&w, &t, json!({"pool": "chat", "provider": "openai", "secret": s})).await;
            match status {
                200 => {}
                409 => {
                    assert_eq!(body["error"]["code"], "limit_reached", "{body}");
                    limited += 1;
                }
                other => panic!("{other}: {body}"),
            }
        }
    }
    assert!(limited > 0, "the owned keys' share was never reached");
    let owned: i64 = one(&db.client, "SELECT count(*) FROM keypool_keys WHERE owner IS NOT NULL").await;
    assert!(owned <= 32, "{owned} own keys in 64 slots");
    // Shared keys still fit, and everyone is served.
    issue(&mock, "sk-abuse-shared-00000003").await;
    exec(
        &db,
        &format!(
            "SELECT keypool_add_key('chat', 'openai', 'sk-abuse-shared-00000003', 'gpt-4o-mini', base_url => '{}/v1')",
            mock.url
        ),
    )
    .await;
    for _ in 0..3 {
        assert_eq!(chat_as(&w, &bob, hello("chat")).await.0, 200);
        assert_eq!(chat_as(&w, &mallory, hello("chat")).await.0, 200);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_own_key_never_serves_beside_the_shared_keys_limits() {
    let cluster = Cluster::start("abuse-beside", &[]);
    let db = cluster.fresh_db().await;
    // A local server that takes no key (and, like many, any key), and an OpenAI-style server
    // that accepts any key.
    let mock = Mock::start(&["--keyless"]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('local');
             SELECT keypool_add_key('local', 'ollama', NULL, 'llama3', base_url => '{u}', rpm => 1, rpd => 2);
             SELECT keypool_create_pool('lax');
             SELECT keypool_add_key('lax', 'openai', 'sk-abuse-lax-shared-0001', 'gpt-4o-mini', base_url => '{u}/v1', rpm => 1);",
            u = mock.url
        ),
    )
    .await;
    let mallory = token(&db, "mallory", &["local", "lax"]).await;
    let w = Worker::start(&conninfo(&db), "abuse-beside", &["--no-queue"]).await;
    let before = mock.stats().await["requests"].as_u64().unwrap_or(0);
    for (pool, provider) in [("local", "ollama"), ("local", "openai_compatible"), ("local", "http")] {
        let (status, body) = add_own(
            &w,
            &mallory,
            json!({"pool": pool, "provider": provider, "secret": "made-up-secret-0000000001", "model": "llama3"}),
        )
        .await;
        assert_eq!(
            (status, body["error"]["code"].clone()),
            (403, json!("not_allowed")),
            "{body}"
        );
    }
    // Nothing was asked of the servers for those.
    assert_eq!(mock.stats().await["requests"].as_u64().unwrap_or(0), before);
    // At a server that accepts made-up keys too, no key can be vouched for.
    let (status, body) = add_own(
        &w,
        &mallory,
        json!({"pool": "lax", "provider": "openai", "secret": "sk-made-up-mallory-lax-01"}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (422, json!("key_unchecked")),
        "{body}"
    );
    assert_eq!(
        one::<i64>(&db.client, "SELECT count(*) FROM keypool_keys WHERE owner IS NOT NULL").await,
        0
    );
    // Ten attempts a minute, then 429 with the wait: each attempt costs the database and the
    // provider something.
    for i in 0..6 {
        let (status, _) = add_own(
            &w,
            &mallory,
            json!({"pool": "lax", "provider": "openai", "secret": format!("sk-made-up-{i:016}")}),
        )
        .await;
        assert_eq!(status, 422);
    }
    let (status, body) = add_own(
        &w,
        &mallory,
        json!({"pool": "lax", "provider": "openai", "secret": "sk-made-up-one-too-many1"}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (429, json!("too_many_key_additions")),
        "{body}"
    );
    // So she gets what the shared keys allow: one request a minute in each pool.
    for pool in ["local", "lax"] {
        let mut served = 0;
        for _ in 0..10 {
            if chat_as(&w, &mallory, hello(pool)).await.0 == 200 {
                served += 1;
            }
        }
        assert_eq!(served, 1, "{pool}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn caller_chosen_names_and_paths_never_steer_routing_or_addresses() {
    let db = keypool_tests::shared().fresh_db().await;
    let mock = Mock::start(&[
        "--issued-keys-only",
        "--issue",
        "sk-abuse-route-shared-01",
        "--issue",
        "sk-abuse-route-mine-0001",
        "--issue",
        "AIza-abuse-gemini-000001",
        "--issue",
        "serp key+/abuse=1",
        "--issue",
        "sk-abuse-route-a-000001",
        "--issue",
        "sk-abuse-route-b-000001",
        "--issue",
        "sk-abuse-route-private-1",
    ]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('chat', 'openai', 'sk-abuse-route-shared-01', 'gpt-4o-mini', base_url => '{u}/v1');
             SELECT keypool_create_pool('private');
             SELECT keypool_add_key('private', 'openai', 'sk-abuse-route-private-1', 'other-model', base_url => '{u}/v1');
             SELECT keypool_create_pool('pool_a');
             SELECT keypool_add_key('pool_a', 'openai', 'sk-abuse-route-a-000001', 'shared-m', base_url => '{u}/v1');
             SELECT keypool_create_pool('pool_b');
             SELECT keypool_add_key('pool_b', 'openai', 'sk-abuse-route-b-000001', 'shared-m', base_url => '{u}/v1');
             SELECT keypool_create_pool('gem');
             SELECT keypool_add_key('gem', 'gemini', 'AIza-abuse-gemini-000001', base_url => '{u}');
             SELECT keypool_create_pool('serp');
             SELECT keypool_add_key('serp', 'http', 'serp key+/abuse=1', base_url => '{u}/api#query=api_key');",
            u = mock.url
        ),
    )
    .await;
    let mallory = token(&db, "mallory", &["private", "gem", "serp"]).await;
    let only_a = token(&db, "alice", &["pool_a"]).await;
    let w = Worker::start(&conninfo(&db), "abuse-route", &["--no-queue"]).await;

    // Her own key names gpt-4o-mini: that name still routes everyone else to pool chat.
    let (status, body) = add_own(
        &w,
        &mallory,
        json!({"pool": "private", "provider": "openai", "secret": "sk-abuse-route-mine-0001", "model": "gpt-4o-mini"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let r = w
        .chat(json!({"model": "gpt-4o-mini", "user": "bob", "messages": user_message("hi"), "max_tokens": 3}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-keypool-pool"], "chat");
    // A name two pools serve is ambiguous only among the pools a caller reaches, and the answer
    // names no pool it may not reach.
    let (status, body) = chat_as(&w, &only_a, hello("shared-m")).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = chat_as(&w, &mallory, hello("shared-m")).await;
    assert_eq!(status, 404, "{body}");
    assert!(
        !body.to_string().contains("pool_a") && !body.to_string().contains("pool_b"),
        "{body}"
    );
    let (status, body) = chat_as(
        &w,
        TOKEN,
        json!({"model": "shared-m", "user": "ops", "messages": user_message("x")}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (400, json!("ambiguous_model")),
        "{body}"
    );

    // Model names aimed at other paths of the provider: refused before anything is reserved.
    assert_eq!(
        chat_as(&w, &mallory, json!({"model": "gem", "messages": user_message("hi")}))
            .await
            .0,
        200
    );
    let calls = mock.stats().await["requests"].as_u64().unwrap_or(0);
    assert!(calls > 0);
    for model in [
        "../../_mock/reset?",
        "..%2F..%2F_mock/reset",
        "x/../../_mock/reset",
        "a?b",
        "a#b",
        "models/../x",
    ] {
        let r = http()
            .post(format!("{}/v1/chat/completions", w.url))
            .bearer_auth(&mallory)
            .header("x-keypool-pool", "gem")
            .json(&json!({"model": model, "messages": user_message("hi")}))
            .send()
            .await
            .expect("chat");
        assert_eq!(r.status(), 400, "{model}");
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(body["error"]["code"], "invalid_model", "{model}: {body}");
    }
    // A reset would have zeroed the counters; every path the provider saw is a model's.
    assert!(mock.stats().await["requests"].as_u64().unwrap_or(0) >= calls);
    for r in mock.recent().await {
        let path = r["path"].as_str().unwrap_or("");
        assert!(!path.contains("_mock") && !path.contains(".."), "{r}");
    }
    assert_eq!(
        one::<i64>(&db.client, "SELECT count(*) FROM keypool_keys WHERE state <> 'active'").await,
        0
    );
    // A model she picked whose day's quota is used up at the provider: the shared key's account
    // cools as for a per-minute limit, never until the day's end.
    mock.fault("AIza-abuse-gemini", "daily", Some(1), Some(30.0)).await;
    let r = http()
        .post(format!("{}/v1/chat/completions", w.url))
        .bearer_auth(&mallory)
        .header("x-keypool-pool", "gem")
        .json(&json!({"model": "gemini-2.5-pro", "messages": user_message("hi")}))
        .send()
        .await
        .expect("chat");
    assert_eq!(r.status(), 429);
    assert_eq!(
        one::<String>(
            &db.client,
            "SELECT format('%s %s', cooling_until > now(), cooling_until < now() + interval '2 minutes')
               FROM keypool_scopes WHERE provider = 'gemini'"
        )
        .await,
        "t t"
    );

    // Proxy paths that would leave the base URL's path, in any encoding: refused.
    // (Sent as raw bytes: an HTTP client library would normalise some of them away.)
    let host = w.url.trim_start_matches("http://").to_string();
    for path in [
        "..%2F_mock%2Freset",
        "%2e%2e/_mock/reset",
        "search/../../_mock/reset",
        ".%2e/_mock/reset",
        "%2E%2E%2F%2E%2E%2F_mock%2Freset",
        "..;/_mock/reset",
        "..%5C_mock%5Creset",
    ] {
        let head = format!(
            "POST /v1/proxy/serp/{path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {mallory}\r\nContent-Length: 0\r\n\r\n"
        );
        let mut s = raw_request(&w.url, &head, b"").await;
        let status = read_status(&mut s).await;
        assert_eq!(status, 400, "{path}");
    }
    assert!(mock.stats().await["requests"].as_u64().unwrap_or(0) >= calls);
    for r in mock.recent().await {
        let path = r["path"].as_str().unwrap_or("");
        assert!(!path.contains("_mock") && !path.contains(".."), "{r}");
    }
    // An API that echoes its query string: the key is scrubbed in whatever encoding it came.
    let r = http()
        .get(format!("{}/v1/proxy/serp/search?q=rust", w.url))
        .bearer_auth(&mallory)
        .send()
        .await
        .expect("proxy");
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("body");
    assert!(text.contains("raw_query") && text.contains("q=rust"), "{text}");
    for form in [
        "serp key+/abuse=1",
        "serp%20key%2B%2Fabuse%3D1",
        "serp%20key",
        "abuse%3D1",
    ] {
        assert!(!text.contains(form), "the answer quotes the key as {form}: {text}");
    }
}

/// The resident memory of the worker, sampled until `done` resolves: the largest value seen.
async fn peak_rss_during<F: std::future::Future>(w: &Worker, done: F) -> (u64, F::Output) {
    tokio::pin!(done);
    let mut peak = w.rss();
    loop {
        tokio::select! {
            out = &mut done => return (peak.max(w.rss()), out),
            _ = tokio::time::sleep(Duration::from_millis(20)) => peak = peak.max(w.rss()),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_of_millions_of_tiny_values_keep_the_workers_memory_bounded() {
    let db = keypool_tests::shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('chat', 'openai', 'sk-abuse-memory-0000001', 'gpt-4o-mini', base_url => '{u}/v1');
             SELECT keypool_create_pool('gem');
             SELECT keypool_add_key('gem', 'gemini', 'AIza-abuse-memory-00001', 'gemini-2.5-flash', base_url => '{u}');",
            u = mock.url
        ),
    )
    .await;
    let mallory = token(&db, "mallory", &["chat", "gem"]).await;
    let w = Worker::start(&conninfo(&db), "abuse-memory", &["--no-queue"]).await;
    assert_eq!(chat_as(&w, &mallory, hello("chat")).await.0, 200);
    const SIZE: usize = 3_500_000;
    let repeat = |item: &str| {
        let n = SIZE / (item.len() + 1);
        vec![item; n].join(",")
    };
    // Five shapes: tiny objects in a field passed on as it is, tiny messages, tiny content
    // parts for a provider that translates them, a tool schema of tiny properties converted for
    // Gemini, and a tool call id carrying (as other providers' state rides in ids) a list of
    // tiny values.
    let carried = {
        use base64::Engine;
        let list = format!("[{}]", vec!["0"; 1_320_000].join(","));
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(list)
    };
    let bodies: Vec<(String, String)> = (0..16)
        .map(|i| {
            let body = match i % 5 {
                3 => format!(
                    r#"{{"model":"gem","messages":[{{"role":"user","content":"hi"}}],"tools":[{{"type":"function","function":{{"name":"f","parameters":{{"type":"object","properties":{{{}}}}}}}}}]}}"#,
                    (0..SIZE / 10).map(|i| format!(r#""{i:x}":{{}}"#)).collect::<Vec<_>>().join(",")
                ),
                4 => format!(
                    r#"{{"model":"gem","messages":[{{"role":"tool","tool_call_id":"x.kpa.{carried}","content":"y"}}]}}"#
                ),
                0 => format!(
                    r#"{{"model":"chat","messages":[{{"role":"user","content":"hi"}}],"max_tokens":2,"metadata":[{}]}}"#,
                    repeat("{}")
                ),
                1 => format!(r#"{{"model":"chat","messages":[{}]}}"#, repeat(r#"{"role":"u"}"#)),
                _ => format!(
                    r#"{{"model":"gem","messages":[{{"role":"user","content":[{}]}}]}}"#,
                    repeat(r#"{"type":"text","text":""}"#)
                ),
            };
            assert!(body.len() >= SIZE - 100 && body.len() < 4 << 20, "{}", body.len());
            (mallory.clone(), body)
        })
        .collect();
    let baseline = w.rss();
    let url = w.url.clone();
    let (peak, statuses) = peak_rss_during(&w, async move {
        let mut tasks = Vec::new();
        for (token, body) in bodies {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                http()
                    .post(format!("{url}/v1/chat/completions"))
                    .bearer_auth(token)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap_or(0));
        }
        out
    })
    .await;
    // Refused as too many messages or parts (400), or passed on (the mock refuses bodies over
    // 2 MB: 413): never served by parsing a tree of millions of values.
    assert!(statuses.iter().all(|s| *s == 400 || *s == 413), "{statuses:?}");
    let grown = peak.saturating_sub(baseline);
    assert!(grown <= 256 << 20, "the worker grew by {} MiB", grown >> 20);
    // Everyone is served afterwards.
    assert_eq!(
        chat_as(
            &w,
            TOKEN,
            json!({"model": "chat", "user": "bob", "messages": user_message("hi")})
        )
        .await
        .0,
        200
    );
    eprintln!("16 bodies of 3.5 MB: the worker grew by {} MiB at most", grown >> 20);
}

/// A raw HTTP/1.1 request on its own connection: the head and body as given.
async fn raw_request(url: &str, head: &str, body: &[u8]) -> tokio::net::TcpStream {
    let addr = url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("head");
    s.write_all(body).await.expect("body");
    s
}

async fn read_status(s: &mut tokio::net::TcpStream) -> u16 {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut chunk).await.expect("read");
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_unread_and_many_connections_of_one_caller_hold_nothing_of_anyone_elses() {
    let db = keypool_tests::shared().fresh_db().await;
    // Long streams: 200,000 events.
    let mock = Mock::start(&["--reply-words", "200000"]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('chat', 'openai', 'sk-abuse-slow-00000001', 'gpt-4o-mini', base_url => '{u}/v1', tpm => 100000000);",
            u = mock.url
        ),
    )
    .await;
    let mallory = token(&db, "mallory", &["chat"]).await;
    let mallory_too = token(&db, "mallory", &["chat"]).await;
    let bob = token(&db, "bob", &["chat"]).await;
    let w = Worker::start(
        &conninfo(&db),
        "abuse-slow",
        &[
            "--no-queue",
            "--idle-timeout",
            "3s",
            "--body-timeout",
            "2s",
            "--max-in-flight-per-caller",
            "1",
        ],
    )
    .await;
    let host = w.url.trim_start_matches("http://").to_string();

    // A body that trickles a byte at a time, never pausing as long as the idle timeout: cut
    // by the body's deadline (408), not held for the body's 1,000 bytes.
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {mallory}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    );
    let mut s = raw_request(&w.url, &head, b"{").await;
    let (mut rd, mut wr) = s.split();
    let trickle = async {
        for _ in 0..999 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if wr.write_all(b" ").await.is_err() {
                break;
            }
        }
    };
    let status = tokio::select! {
        status = async {
            let mut buf = [0u8; 256];
            let n = rd.read(&mut buf).await.unwrap_or(0);
            String::from_utf8_lossy(&buf[..n]).split(' ').nth(1).and_then(|c| c.parse::<u16>().ok()).unwrap_or(0)
        } => status,
        _ = trickle => 0,
    };
    assert_eq!(status, 408);
    drop(s);

    // A stream she never reads: cut once it has made no progress for the idle timeout, its
    // reservation settled and her slot given back.
    let body =
        json!({"model": "chat", "messages": user_message("hi"), "stream": true, "max_tokens": 200000}).to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {mallory}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut unread = raw_request(&w.url, &head, body.as_bytes()).await;
    assert_eq!(read_status(&mut unread).await, 200);
    // While it is open, her second request is refused (one at a time for her, whichever of her
    // tokens she uses); bob is served.
    let (status, body) = chat_as(&w, &mallory, hello("chat")).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (429, json!("too_many_concurrent_requests")),
        "{body}"
    );
    let (status, body) = chat_as(&w, &mallory_too, hello("chat")).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (429, json!("too_many_concurrent_requests")),
        "{body}"
    );
    assert_eq!(chat_as(&w, &bob, hello("chat")).await.0, 200);
    // The worker gives up on the reader: her slot comes back (and the reservation is settled).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _) = chat_as(&w, &mallory, hello("chat")).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "her slot never came back: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(unread);
    // A token bound to no user counts as itself too: naming another user for each request
    // takes no more slots.
    let service: String = one(
        &db.client,
        "SELECT keypool_create_api_token('a service', NULL, ARRAY['chat'])",
    )
    .await;
    let body =
        json!({"model": "chat", "user": "u1", "messages": user_message("hi"), "stream": true, "max_tokens": 200000})
            .to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {service}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut held = raw_request(&w.url, &head, body.as_bytes()).await;
    assert_eq!(read_status(&mut held).await, 200);
    let (status, body) = chat_as(
        &w,
        &service,
        json!({"model": "chat", "user": "u2", "messages": user_message("hi"), "max_tokens": 3}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (429, json!("too_many_concurrent_requests")),
        "{body}"
    );
    drop(held);
    // Both streams were settled, as abandoned by their clients (no penalty for the key), with
    // what was generated before they were cut: more than nothing, less than the 200,000 they
    // asked for. Every other request asked for 3 tokens.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        exec(&db, "SELECT keypool_flush()").await;
        let row = value(
            &db,
            "SELECT format('%s %s %s', sum(other), sum(success), sum(completion_tokens)) FROM keypool.usage_hourly",
        )
        .await
        .unwrap_or_default();
        let n: Vec<i64> = row.split(' ').map(|x| x.parse().unwrap_or(0)).collect();
        let (abandoned, served, completion) = (n[0], n[1], n[2]);
        if abandoned >= 2 {
            assert_eq!(abandoned, 2, "{row}");
            let of_the_streams = completion - 3 * served;
            assert!(of_the_streams > 0 && of_the_streams < 400_000, "{row}");
            break;
        }
        assert!(Instant::now() < deadline, "the cut stream was never settled: {row}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_every_statement_logged_no_token_or_secret_reaches_the_server_log() {
    // Every statement logged, with its parameters (log_parameter_max_length's default, -1).
    let cluster = Cluster::start(
        "abuse-log",
        &["log_statement = 'all'", "log_min_duration_statement = 0"],
    );
    let db = cluster.fresh_db().await;
    let shared_key = "sk-abuse-log-shared-000001";
    let own_key = "sk-abuse-log-alices-000002";
    let rotated = "sk-abuse-log-rotated-00003";
    let imported = "sk-abuse-log-imported-0004";
    let mock = Mock::start(&[
        "--issued-keys-only",
        "--issue",
        shared_key,
        "--issue",
        own_key,
        "--issue",
        rotated,
    ]);
    exec(&db, "SELECT keypool_create_pool('chat')").await;
    let alice = token(&db, "alice", &["chat"]).await;
    let admin = "admin-token-abuse-log-0123456789";
    let w = Worker::start(&conninfo(&db), "abuse-log", &["--no-queue", "--admin-tokens", admin]).await;
    // The worker warns that this role's parameters are logged.
    assert!(w.log().contains("log_parameter_max_length"), "{}", w.log());
    let base = format!("{}/v1", mock.url);
    // An operator adds a shared key and rotates it, a user adds her own, everyone chats.
    let (status, body) = send(
        &w.url,
        reqwest::Method::POST,
        "/allocation/keys",
        admin,
        Some(json!({"pool": "chat", "provider": "openai", "secret": shared_key, "model": "gpt-4o-mini", "base_url": base})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let shared_id = body["key_id"].as_i64().expect("key_id");
    assert_eq!(chat_as(&w, &alice, hello("chat")).await.0, 200);
    let (status, body) = add_own(
        &w,
        &alice,
        json!({"pool": "chat", "provider": "openai", "secret": own_key}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(chat_as(&w, &alice, hello("chat")).await.0, 200);
    let (status, body) = send(
        &w.url,
        reqwest::Method::POST,
        &format!("/allocation/keys/{shared_id}/rotate"),
        admin,
        Some(json!({"secret": rotated})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        chat_as(
            &w,
            TOKEN,
            json!({"model": "chat", "user": "bob", "messages": user_message("hi")})
        )
        .await
        .0,
        200
    );
    // import-env seals too.
    let dir = std::env::temp_dir().join(format!("abuse-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let out = std::process::Command::new(bin())
        .args(["import-env", "--no-env-file", "--pool", "chat", "--base-url", &base])
        .env_clear()
        .env("KEYPOOL_DATABASE_URL", conninfo(&db))
        .env("OPENAI_API_KEY", imported)
        .current_dir(&dir)
        .output()
        .expect("import-env");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The secrets did arrive (sealed), and the statements were logged.
    assert_eq!(
        one::<i64>(&db.client, "SELECT count(*) FROM keypool_keys WHERE pool = 'chat'").await,
        3
    );
    let log = cluster.log();
    assert!(
        log.contains("keypool_add_key") && log.contains("keypool_rotate_secret"),
        "nothing was logged"
    );
    assert!(
        log.contains("kps1."),
        "the sealed secrets are in the log, not the secrets"
    );
    for s in [shared_key, own_key, rotated, imported, alice.as_str(), &alice[4..20]] {
        assert!(!log.contains(s), "the server log holds {s}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_small_ones_give_nothing_away() {
    let cluster = Cluster::start("abuse-small", &[]);
    let db = cluster.fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('chat', 'openai', 'sk-abuse-small-flaky-0001', 'gpt-4o-mini', base_url => '{u}/v1');
             SELECT keypool_add_key('chat', 'openai', 'sk-abuse-small-flaky-0002', 'gpt-4o-mini', base_url => '{u}/v1');
             SELECT keypool_create_pool('paid');
             SELECT keypool_add_key('paid', 'openai', 'sk-abuse-small-paid-0003', 'gpt-4o-mini', base_url => '{u}/v1');
             SELECT keypool_set_price('openai', 'gpt-4o-mini', 1.00, 2.00);
             SELECT keypool_set_budget('paid', 10.00, 'day');",
            u = mock.url
        ),
    )
    .await;
    let mallory = token(&db, "mallory", &["chat", "paid"]).await;
    let admin = "admin-token-abuse-small-0123456";
    let w = Worker::start(
        &conninfo(&db),
        "abuse-small",
        &["--no-queue", "--admin-tokens", admin, "--provider-timeout", "1s"],
    )
    .await;

    // Every attempt fails: she is told that, not which keys or what the provider said; the
    // operator finds the details in the admin API.
    mock.fault("sk-abuse-small-flaky", "503", None, None).await;
    let (status, body) = chat_as(&w, &mallory, hello("chat")).await;
    assert_eq!(status, 502, "{body}");
    let text = body.to_string();
    assert!(
        !text.contains("sk-") && !text.contains("overloaded") && !text.contains("503"),
        "{text}"
    );
    let (status, failures) = send(&w.url, reqwest::Method::GET, "/allocation/failures", admin, None).await;
    assert_eq!(status, 200);
    let detail = failures[0]["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("sk-…") && detail.contains("503"), "{failures}");
    assert_eq!(failures[0]["user"], "mallory");
    let (status, _) = send(&w.url, reqwest::Method::GET, "/allocation/failures", &mallory, None).await;
    assert_eq!(status, 401);
    mock.clear_faults().await;

    // A budget holds n choices of the output cap, and the call is capped at what was held.
    let (status, body) = chat_as(
        &w,
        &mallory,
        json!({"model": "paid", "messages": user_message("hi"), "n": 2}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let sent = mock.recent().await;
    let last = sent.last().expect("a call");
    assert_eq!(last["body"]["max_completion_tokens"], 1024, "{last}");
    assert_eq!(last["body"]["n"], 2);
    // Without a budget nothing is added to what the app sent.
    assert_eq!(
        chat_as(&w, &mallory, json!({"model": "chat", "messages": user_message("hi")}))
            .await
            .0,
        200
    );
    let sent = mock.recent().await;
    assert!(sent.last().expect("a call")["body"]
        .get("max_completion_tokens")
        .is_none());
    // A call whose answer never came may have been billed in full: it is charged what it held
    // (2 × 1,024 output tokens at $2 a million, and the prompt), not only its prompt. So is the
    // attempt after it, which the provider answers.
    const SPENT: &str = "SELECT spent::float8 FROM keypool_pool_stats WHERE pool = 'paid'";
    let before: f64 = one(&db.client, SPENT).await;
    mock.fault("sk-abuse-small-paid", "hang", Some(1), None).await;
    let (status, body) = chat_as(
        &w,
        &mallory,
        json!({"model": "paid", "messages": user_message("hi"), "n": 2}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 12, "{body}");
    let charged = one::<f64>(&db.client, SPENT).await - before;
    assert!(
        charged >= 2.0 * 1024.0 * 2.0 / 1e6,
        "the timed-out call was charged {charged}, less than the output it held"
    );
    mock.clear_faults().await;

    // An X-Keypool-User that cannot be read is refused, not passed over for the body's user.
    let r = http()
        .post(format!("{}/v1/chat/completions", w.url))
        .bearer_auth(TOKEN)
        .header(
            "x-keypool-user",
            reqwest::header::HeaderValue::from_bytes("ünïcode".as_bytes()).expect("bytes"),
        )
        .json(&json!({"model": "chat", "user": "someone-else", "messages": user_message("hi")}))
        .send()
        .await
        .expect("chat");
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap_or(Value::Null);
    assert_eq!(body["error"]["code"], "invalid_user");

    // /healthz says whether the database answers, never what it said.
    cluster.stop();
    let r = http().get(format!("{}/healthz", w.url)).send().await.expect("healthz");
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["database"], "unavailable");
    assert_eq!(body.as_object().map(|o| o.len()), Some(4), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_auth_only_json_to_a_loopback_host_is_served() {
    let db = keypool_tests::shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('chat', 'openai', 'sk-abuse-open-00000001', 'gpt-4o-mini', base_url => '{u}/v1');",
            u = mock.url
        ),
    )
    .await;
    let w = Worker::start(&conninfo(&db), "abuse-open", &["--no-queue", "--insecure-no-auth"]).await;
    let body = json!({"model": "chat", "user": "u", "messages": user_message("hi")}).to_string();
    let post = |content_type: &'static str, host: Option<&'static str>| {
        let (url, body) = (w.url.clone(), body.clone());
        async move {
            let mut r = http()
                .post(format!("{url}/v1/chat/completions"))
                .header("content-type", content_type)
                .body(body);
            if let Some(h) = host {
                r = r.header("host", h);
            }
            r.send().await.expect("post").status().as_u16()
        }
    };
    // What a web page can send without asking (a form, plain text) is refused; so is a request
    // to another host name (a page that rebound its name to the worker's address).
    assert_eq!(post("text/plain", None).await, 415);
    assert_eq!(post("application/x-www-form-urlencoded", None).await, 415);
    assert_eq!(post("application/json", Some("evil.example")).await, 403);
    assert_eq!(post("application/json", Some("localhost:8080")).await, 200);
    // What another site's page sends, whatever its method.
    for (name, value) in [("origin", "https://evil.example"), ("sec-fetch-site", "cross-site")] {
        let r = http()
            .get(format!("{}/v1/models", w.url))
            .header(name, value)
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 403, "{name}: {value}");
    }
    let r = http()
        .get(format!("{}/v1/models", w.url))
        .header("origin", "http://localhost:5173")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    assert_eq!(post("application/json; charset=utf-8", None).await, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_403_to_a_callers_request_checks_the_key_and_disables_nothing() {
    let db = keypool_tests::shared().fresh_db().await;
    let mock = Mock::start(&[]);
    let (first, second) = ("sk-abuse-forbidden-00001", "sk-abuse-forbidden-00002");
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
    let mallory = token(&db, "mallory", &["chat"]).await;
    let w = Worker::start(&conninfo(&db), "abuse-403", &["--no-queue"]).await;
    // Whatever she sends, the provider answers 403 on the first key ("no access to this
    // model"): an answer about her request, not about the key.
    mock.fault_json(json!({"match": first, "fault": "403", "path": "chat/completions"}))
        .await;
    let mut forbidden = 0;
    for _ in 0..10 {
        let (status, body) = chat_as(&w, &mallory, hello("chat")).await;
        match status {
            200 => {}
            403 => forbidden += 1,
            other => panic!("{other}: {body}"),
        }
    }
    assert!(forbidden > 0, "the first key never served her");
    // Both keys still serve everyone; the first was checked once (its model list), not once
    // per 403.
    assert_eq!(
        one::<i64>(
            &db.client,
            "SELECT count(*) FROM keypool_keys WHERE pool = 'chat' AND state = 'active'"
        )
        .await,
        2
    );
    let checks = mock
        .recent()
        .await
        .iter()
        .filter(|r| r["path"] == "/v1/models" && r["key"] == keypool_mask::mask(first))
        .count();
    assert_eq!(checks, 1);
    // A key its provider really rejects is disabled after the check.
    mock.clear_faults().await;
    mock.fault(second, "401", None, None).await;
    for _ in 0..4 {
        chat_as(&w, &mallory, hello("chat")).await;
    }
    assert_eq!(
        one::<String>(
            &db.client,
            &format!(
                "SELECT state FROM keypool_keys WHERE label = '{}'",
                keypool_mask::mask(second)
            )
        )
        .await,
        "disabled"
    );
}
