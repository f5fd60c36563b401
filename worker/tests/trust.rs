//! The worker in front of untrusted clients (issue 12), against the mock provider and a private
//! cluster: API tokens bound to a user or to pools, revocation and expiry, the proxy that never
//! disables keys, redirects not followed, limits applied before any work (bodies, in-flight
//! requests, slow clients), /metrics behind its token, the admin API closed under
//! `--insecure-no-auth`, escaped log fields, and `/v1/embeddings`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use keypool_tests::{one, shared, TestDb};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ADMIN: &str = "admin-token-0123456789abcdef";
const METRICS: &str = "metrics-token-0123456789abcdef";

async fn keys_state(db: &TestDb<'_>, pool: &str) -> Vec<(String, String)> {
    db.client
        .query(
            "SELECT label, state FROM keypool_keys WHERE pool = $1 ORDER BY key_id",
            &[&pool],
        )
        .await
        .expect("keypool_keys")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn used_today(db: &TestDb<'_>, user: &str, pool: &str) -> i64 {
    db.client
        .query_one("SELECT used_today FROM keypool_allocation($1, $2)", &[&user, &pool])
        .await
        .expect("keypool_allocation")
        .get(0)
}

/// Sends a chat request with `token`, `headers` and `body`; answers (status, JSON body).
async fn chat_as(w: &Worker, token: &str, headers: &[(&str, &str)], body: Value) -> (u16, Value) {
    let mut r = http()
        .post(format!("{}/v1/chat/completions", w.url))
        .bearer_auth(token)
        .json(&body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().await.expect("request to the worker");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get_as(w: &Worker, token: &str, path: &str) -> (u16, Value) {
    let r = http()
        .get(format!("{}{path}", w.url))
        .bearer_auth(token)
        .send()
        .await
        .expect("request to the worker");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn hello(model: &str) -> Value {
    json!({"model": model, "messages": user_message("hello"), "max_tokens": 3})
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_bound_to_a_user_and_pools_acts_as_that_user_on_those_pools_only() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat'); SELECT keypool_create_pool('other');
             SELECT keypool_add_key('chat', 'openai', 'sk-bound-chat-000000001', base_url => '{u}/v1', model => 'gpt-4o-mini', rpd => 1000);
             SELECT keypool_add_key('other', 'openai', 'sk-bound-other-00000001', base_url => '{u}/v1', model => 'grok-3');",
            u = mock.url
        ),
    )
    .await;
    let token: String = one(
        &db.client,
        "SELECT keypool_create_api_token('alice app', 'alice', ARRAY['chat'])",
    )
    .await;
    assert!(token.starts_with("kpt_") && token.len() >= 4 + 43, "{token}");
    let w = Worker::start(&conninfo(&db), "bound", &["--no-queue"]).await;

    // Served as alice whether or not the request names her.
    let (status, _) = chat_as(&w, &token, &[], hello("chat")).await;
    assert_eq!(status, 200);
    let (status, _) = chat_as(&w, &token, &[("X-Keypool-User", "alice")], hello("gpt-4o-mini")).await;
    assert_eq!(status, 200);
    // Naming anyone else is refused, in the header or in the body.
    let (status, v) = chat_as(&w, &token, &[("X-Keypool-User", "someone-else")], hello("chat")).await;
    assert_eq!((status, code(&v)), (403, "user_mismatch"), "{v}");
    let mut body = hello("chat");
    body["user"] = json!("someone-else");
    let (status, v) = chat_as(&w, &token, &[], body.clone()).await;
    assert_eq!((status, code(&v)), (403, "user_mismatch"), "{v}");
    let (status, _) = chat_as(&w, &token, &[("X-Keypool-User", "alice")], body).await;
    assert_eq!(status, 403);
    assert_eq!(used_today(&db, "alice", "chat").await, 2);
    assert_eq!(used_today(&db, "someone-else", "chat").await, 0);

    // Another pool is answered as a pool that does not exist, however it is named.
    let (status, unknown) = chat_as(&w, &token, &[], hello("no-such-pool")).await;
    assert_eq!((status, code(&unknown)), (404, "model_not_found"));
    for (headers, model) in [
        (vec![], "other"),
        (vec![], "grok-3"),
        (vec![("X-Keypool-Pool", "other")], "chat"),
    ] {
        let (status, v) = chat_as(&w, &token, &headers, hello(model)).await;
        assert_eq!((status, code(&v)), (404, "model_not_found"), "{model} {headers:?}: {v}");
    }
    let r = http()
        .get(format!("{}/v1/proxy/other/search", w.url))
        .bearer_auth(&token)
        .send()
        .await
        .expect("proxy");
    assert_eq!(r.status(), 404);
    let (_, models) = get_as(&w, &token, "/v1/models").await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("models")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["chat", "gpt-4o-mini"]);
    // The service token still reaches everything, as anyone.
    let (status, _) = chat_as(&w, TOKEN, &[("X-Keypool-User", "bob")], hello("other")).await;
    assert_eq!(status, 200);

    // The user API answers for the token's own user and pools only.
    let (status, v) = get_as(&w, &token, "/allocation/daily?model=chat").await;
    assert_eq!((status, v["user"].as_str()), (200, Some("alice")), "{v}");
    assert_eq!(v["requestsUsedToday"], 2);
    let (status, _) = get_as(&w, &token, "/allocation/daily?model=chat&user=bob").await;
    assert_eq!(status, 403);
    let (status, _) = get_as(&w, &token, "/allocation/can-request?pool=other").await;
    assert_eq!(status, 404);

    // Only the three requests that were served reached the provider.
    assert_eq!(mock.stats().await["requests"], 3);
    let last_used: bool = one(
        &db.client,
        "SELECT last_used_at IS NOT NULL FROM keypool_api_tokens WHERE label = 'alice app'",
    )
    .await;
    assert!(last_used);
}

/// Polls until a request with `token` is refused with 401; panics after `within`.
async fn refused_within(w: &Worker, token: &str, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let (status, v) = get_as(w, token, "/v1/models").await;
        if status == 401 {
            assert_eq!(code(&v), "invalid_api_key");
            return started.elapsed();
        }
        assert_eq!(status, 200);
        assert!(
            started.elapsed() < within,
            "the token was still accepted after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn revoked_and_expired_tokens_are_refused_within_five_seconds() {
    let db = shared().fresh_db().await;
    exec(&db, "SELECT keypool_create_pool('chat')").await;
    let token: String = one(&db.client, "SELECT keypool_create_api_token('to revoke')").await;
    let expiring: String = one(
        &db.client,
        "SELECT keypool_create_api_token('short-lived', expires_at => now() + interval '2 seconds')",
    )
    .await;
    let w = Worker::start(&conninfo(&db), "revoke", &["--no-queue"]).await;
    assert_eq!(get_as(&w, &token, "/v1/models").await.0, 200);
    assert_eq!(get_as(&w, &expiring, "/v1/models").await.0, 200);

    exec(
        &db,
        "SELECT keypool_revoke_api_token(id) FROM keypool_api_tokens WHERE label = 'to revoke'",
    )
    .await;
    refused_within(&w, &token, Duration::from_secs(5)).await;
    refused_within(&w, &expiring, Duration::from_secs(2 + 5)).await;

    // Made-up tokens, near misses and other schemes are refused too.
    let last = if token.ends_with('A') { 'B' } else { 'A' };
    let near_miss = format!("{}{last}", &token[..token.len() - 1]);
    for bad in [near_miss.as_str(), "kpt_short", "Basic dXNlcjpwYXNz", ""] {
        assert_eq!(get_as(&w, bad, "/v1/models").await.0, 401, "{bad}");
    }
    let revoked: bool = one(
        &db.client,
        "SELECT revoked_at IS NOT NULL FROM keypool_api_tokens WHERE label = 'to revoke'",
    )
    .await;
    assert!(revoked);
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_on_the_proxy_route_never_disable_keys() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('serp'); SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('serp', 'http', 'serp-proxy-0000000001', base_url => '{u}#query=api_key');
             SELECT keypool_add_key('serp', 'http', 'serp-proxy-0000000002', base_url => '{u}#header=x-api-key');
             SELECT keypool_add_key('chat', 'openai', 'sk-proxy-chat-00000001', base_url => '{u}/v1');",
            u = mock.url
        ),
    )
    .await;
    let w = Worker::start(&conninfo(&db), "proxy", &["--no-queue"]).await;
    mock.fault("*", "401", Some(25), None).await;
    mock.fault("*", "403", Some(25), None).await;
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..50 {
        let r = http()
            .post(format!("{}/v1/proxy/serp/search?q=probe", w.url))
            .bearer_auth(TOKEN)
            .header("X-Keypool-User", format!("prober-{}", i % 5))
            .body("{}")
            .send()
            .await
            .expect("proxy");
        *statuses.entry(r.status().as_u16()).or_insert(0) += 1;
    }
    // The faults made 25 of each, passed on to the caller.
    assert_eq!(
        statuses,
        [(401u16, 25), (403, 25)].into_iter().collect(),
        "{statuses:?}"
    );
    let keys = keys_state(&db, "serp").await;
    assert!(keys.iter().all(|k| k.1 == "active"), "{keys:?}");
    let disabled: i64 = one(
        &db.client,
        "SELECT count(*) FROM keypool_events WHERE kind IN ('key_disabled', 'scope_disabled')",
    )
    .await;
    assert_eq!(disabled, 0);

    // Chat providers are not reachable through the proxy at all.
    let before = mock.stats().await["requests"].as_u64().unwrap_or(0);
    let r = http()
        .post(format!("{}/v1/proxy/chat/v1/batches", w.url))
        .bearer_auth(TOKEN)
        .header("X-Keypool-User", "prober")
        .body("{}")
        .send()
        .await
        .expect("proxy");
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.expect("JSON");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("/v1/chat/completions"));
    assert_eq!(mock.stats().await["requests"].as_u64().unwrap_or(0), before);
    assert_eq!(keys_state(&db, "chat").await[0].1, "active");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redirect_to_another_host_is_not_followed() {
    let db = shared().fresh_db().await;
    let provider = Mock::start(&[]);
    let elsewhere = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('oa'); SELECT keypool_create_pool('gm'); SELECT keypool_create_pool('hp');
             SELECT keypool_add_key('oa', 'openai', 'sk-redirect-0000000001', base_url => '{u}/v1');
             SELECT keypool_add_key('gm', 'gemini', 'AIza-redirect-000000001', base_url => '{u}', model => 'gemini-2.5-flash');
             SELECT keypool_add_key('hp', 'http', 'serp-redirect-000000001', base_url => '{u}#header=x-api-key');",
            u = provider.url
        ),
    )
    .await;
    provider
        .fault_json(json!({"match": "*", "fault": "redirect", "location": format!("{}/search", elsewhere.url)}))
        .await;
    let w = Worker::start(&conninfo(&db), "redirect", &["--no-queue"]).await;
    for pool in ["oa", "gm"] {
        let (status, v) = chat_as(&w, TOKEN, &[("X-Keypool-User", "u")], hello(pool)).await;
        assert_eq!(status, 502, "{pool}: {v}");
    }
    let r = http()
        .get(format!("{}/v1/proxy/hp/search?q=x", w.url))
        .bearer_auth(TOKEN)
        .header("X-Keypool-User", "u")
        .send()
        .await
        .expect("proxy");
    assert_eq!(r.status(), 502);
    assert!(r.headers().get("location").is_none());
    provider.wait_for_requests(3).await;
    assert_eq!(elsewhere.stats().await["requests"], 0);
}

/// Sends a request head (and then `body_bytes` of body, if any) over a raw connection; answers
/// the status line of the response.
async fn raw_post(w: &Worker, head: &str, body_bytes: usize) -> String {
    let addr = w.url.trim_start_matches("http://").to_string();
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = stream.into_split();
    wr.write_all(head.as_bytes()).await.expect("head");
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0;
        while sent < body_bytes {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
        // The sending side stays open (a slow client), until the answer is in.
        std::future::pending::<()>().await;
        drop(wr);
    });
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    while !response.windows(2).any(|w| w == b"\r\n") {
        match tokio::time::timeout(Duration::from_secs(30), rd.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => response.extend_from_slice(&buf[..n]),
            Err(_) => panic!("no answer within 30 s"),
        }
    }
    // The worker answered; whatever of the body it did not want stays unsent.
    writer.abort();
    let _ = writer.await;
    String::from_utf8_lossy(&response)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_apply_before_any_work() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&["--latency", "1s"]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('chat', 'openai', 'sk-limits-0000000001', base_url => '{u}/v1');",
            u = mock.url
        ),
    )
    .await;
    let w = Worker::start(
        &conninfo(&db),
        "limits",
        &[
            "--no-queue",
            "--max-in-flight",
            "2",
            "--header-timeout",
            "500ms",
            "--idle-timeout",
            "500ms",
        ],
    )
    .await;
    let size = 30 << 20;
    let rss_before = w.rss();
    // No token: 401 as soon as the head is in, with none of the 30 MiB read.
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
    );
    assert!(raw_post(&w, &head, 0).await.contains(" 401 "));
    assert!(raw_post(&w, &head, size).await.contains(" 401 "));
    // A token, but over KEYPOOL_MAX_BODY (4 MiB): 413 without reading it.
    let with_token = head.replace("Host: w\r\n", &format!("Host: w\r\nAuthorization: Bearer {TOKEN}\r\n"));
    assert!(raw_post(&w, &with_token, size).await.contains(" 413 "));
    let chunked = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: w\r\nAuthorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
        size
    );
    assert!(raw_post(&w, &chunked, size).await.contains(" 413 "));
    let grown = w.rss().saturating_sub(rss_before);
    assert!(grown < 10 << 20, "the worker's RSS grew by {grown} bytes");
    let r = http()
        .post(format!("{}/v1/chat/completions", w.url))
        .bearer_auth(TOKEN)
        .body(vec![b' '; 5 << 20])
        .send()
        .await;
    if let Ok(r) = r {
        assert_eq!(r.status(), 413);
        let v: Value = r.json().await.expect("JSON");
        assert_eq!(code(&v), "request_too_large");
    }

    // A body that stops arriving: 408.
    let slow = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: w\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100\r\n\r\n{{\"model\""
    );
    let answer = raw_post(&w, &slow, 0).await;
    assert!(answer.contains(" 408 "), "{answer}");
    // A head that never ends: the connection is closed.
    let addr = w.url.trim_start_matches("http://").to_string();
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: w\r\n")
        .await
        .expect("partial head");
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf))
        .await
        .expect("the worker closes a connection whose head does not arrive");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");

    // Two requests in flight: a third is turned away at once.
    let url = format!("{}/v1/chat/completions", w.url);
    let calls: Vec<_> = (0..2)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                http()
                    .post(url)
                    .bearer_auth(TOKEN)
                    .header("X-Keypool-User", format!("u{i}"))
                    .json(&hello("chat"))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    mock.wait_for_requests(2).await;
    let (status, v) = chat_as(&w, TOKEN, &[("X-Keypool-User", "u3")], hello("chat")).await;
    assert_eq!((status, code(&v)), (503, "overloaded"), "{v}");
    for c in calls {
        assert_eq!(c.await.expect("task").expect("answer"), 200);
    }
    assert_eq!(mock.stats().await["requests"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_need_their_token_and_read_the_database_at_most_once_a_second() {
    let db = shared().fresh_db().await;
    exec(&db, "SELECT keypool_create_pool('chat')").await;
    let w = Worker::start(
        &conninfo(&db),
        "metrics",
        &[
            "--no-queue",
            "--metrics-token",
            METRICS,
            "--log",
            "info,keypool_worker::http::admin=debug",
        ],
    )
    .await;
    let url = format!("{}/metrics", w.url);
    assert_eq!(http().get(&url).send().await.expect("scrape").status(), 401);
    assert_eq!(
        http()
            .get(&url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("scrape")
            .status(),
        401
    );
    let started = Instant::now();
    let scrapes: Vec<_> = (0..20)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let r = http().get(url).bearer_auth(METRICS).send().await.expect("scrape");
                (r.status().as_u16(), r.text().await.unwrap_or_default())
            })
        })
        .collect();
    for s in scrapes {
        let (status, text) = s.await.expect("task");
        assert_eq!(status, 200);
        assert!(text.contains("keypool_pool_"), "{text}");
    }
    let elapsed = started.elapsed();
    let reads = w.log().matches("metrics: read the database").count() as u64;
    assert!(reads >= 1);
    assert!(
        reads <= elapsed.as_secs() + 1,
        "{reads} database reads for 20 scrapes in {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn insecure_no_auth_never_opens_the_admin_api_or_the_dashboard() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('chat', 'openai', 'sk-open-000000000001', base_url => '{u}/v1');",
            u = mock.url
        ),
    )
    .await;
    let w = Worker::start(&conninfo(&db), "open", &["--no-queue", "--insecure-no-auth"]).await;
    // The API is open, as asked ...
    let r = http()
        .post(format!("{}/v1/chat/completions", w.url))
        .json(&json!({"model": "chat", "user": "u", "messages": user_message("hi")}))
        .send()
        .await
        .expect("chat");
    assert_eq!(r.status(), 200);
    // ... the admin API is not.
    for path in ["/allocation/system-overview", "/allocation/key-pool/stats"] {
        let r = http().get(format!("{}{path}", w.url)).send().await.expect("admin");
        assert_eq!(r.status(), 401, "{path}");
    }
    let key_id: i64 = one(&db.client, "SELECT key_id FROM keypool_keys").await;
    for token in [None, Some(TOKEN)] {
        let mut r = http().post(format!("{}/allocation/keys/{key_id}/disable", w.url));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        assert_eq!(r.send().await.expect("disable").status(), 401);
    }
    assert_eq!(keys_state(&db, "chat").await[0].1, "active");
    let r = http()
        .get(format!("{}/dashboard", w.url))
        .send()
        .await
        .expect("dashboard");
    assert_eq!(r.status(), 404);

    // With admin tokens, the admin API answers them only.
    let w2 = Worker::start(
        &conninfo(&db),
        "open-admin",
        &["--no-queue", "--insecure-no-auth", "--admin-tokens", ADMIN],
    )
    .await;
    let url = format!("{}/allocation/health", w2.url);
    assert_eq!(http().get(&url).send().await.expect("admin").status(), 401);
    assert_eq!(
        http()
            .get(&url)
            .bearer_auth(ADMIN)
            .send()
            .await
            .expect("admin")
            .status(),
        200
    );
    let r = http()
        .get(format!("{}/dashboard", w2.url))
        .send()
        .await
        .expect("dashboard");
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn what_callers_send_is_logged_escaped() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('chat', 'openai', 'sk-logs-000000000001', base_url => '{u}/v1');",
            u = mock.url
        ),
    )
    .await;
    let w = Worker::start(&conninfo(&db), "logs", &["--no-queue"]).await;
    let forged = "2026-11-29T00:00:00.000000Z  WARN keypool_worker::gateway: key disabled";
    let mut body = hello("chat");
    body["user"] = json!(format!("eve\n{forged}\r\n{forged}"));
    let (status, _) = chat_as(&w, TOKEN, &[], body).await;
    assert_eq!(status, 200);
    let log = w.log();
    assert!(log.contains("eve\\n"), "{log}");
    assert!(
        !log.lines().any(|l| l.starts_with("2026-11-29T00:00:00.000000Z")),
        "{log}"
    );
}

async fn prompt_tokens(db: &TestDb<'_>, pool: &str) -> i64 {
    db.client.batch_execute("SELECT keypool_flush()").await.expect("flush");
    one(
        &db.client,
        &format!("SELECT coalesce(sum(prompt_tokens), 0)::bigint FROM keypool_usage WHERE pool = '{pool}'"),
    )
    .await
}

async fn prompt_tokens_eventually(db: &TestDb<'_>, pool: &str, want: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = prompt_tokens(db, pool).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "prompt tokens of {pool}: {got}, want {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn embed(w: &Worker, body: Value) -> (u16, Value) {
    let r = w.post("/v1/embeddings", &body).await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn embeddings_reach_openai_style_providers_and_gemini() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('emb'); SELECT keypool_create_pool('gemb'); SELECT keypool_create_pool('claude');
             SELECT keypool_add_key('emb', 'openai', 'sk-embed-000000000001', base_url => '{u}/v1', model => 'text-embedding-3-small');
             SELECT keypool_add_key('gemb', 'gemini', 'AIza-embed-0000000001', base_url => '{u}', model => 'gemini-embedding-001', rpd => 1000);
             SELECT keypool_add_key('claude', 'anthropic', 'sk-ant-embed-00000001', base_url => '{u}', rpd => 1000);",
            u = mock.url
        ),
    )
    .await;
    let w = Worker::start(&conninfo(&db), "embed", &["--no-queue"]).await;

    // OpenAI-style: passed through, usage as the provider reports it (11 and 3 characters).
    let (status, v) = embed(
        &w,
        json!({"model": "emb", "user": "u", "input": ["hello world", "abc"]}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(v["data"][1]["index"], 1);
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    prompt_tokens_eventually(&db, "emb", 4).await;
    let sent = mock.recent().await;
    assert_eq!(sent.last().expect("a request")["path"], "/v1/embeddings");

    // Gemini: batchEmbedContents, translated both ways; no usage reported, so it is counted.
    let (status, v) = embed(
        &w,
        json!({"model": "gemb", "user": "u", "input": ["hello world", "abc"], "dimensions": 4}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "gemini-embedding-001");
    assert_eq!(v["data"][0]["embedding"].as_array().map(Vec::len), Some(4));
    assert_eq!(v["data"][1]["object"], "embedding");
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    prompt_tokens_eventually(&db, "gemb", 4).await;
    let sent = mock.recent().await;
    let last = sent.last().expect("a request");
    assert_eq!(last["path"], "/v1beta/models/gemini-embedding-001:batchEmbedContents");
    assert_eq!(last["body"]["requests"][1]["content"]["parts"][0]["text"], "abc");
    assert_eq!(last["body"]["requests"][0]["outputDimensionality"], 4);
    let (status, v) = embed(
        &w,
        json!({"model": "gemb", "user": "u", "input": "hello", "encoding_format": "base64"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v["data"][0]["embedding"].as_str().expect("base64 string"))
        .expect("base64");
    assert_eq!(raw.len(), 8 * 4);

    // What a provider cannot do is the caller's error, and reaches no provider.
    let before = mock.stats().await["requests"].clone();
    for (body, what) in [
        (json!({"model": "gemb", "user": "u", "input": [1, 2, 3]}), "text only"),
        (
            json!({"model": "claude", "user": "u", "input": "hi"}),
            "no embeddings API",
        ),
        (json!({"model": "emb", "user": "u"}), "`input` is required"),
        (json!({"model": "emb", "user": "u", "input": []}), "must not be empty"),
        (
            json!({"model": "emb", "user": "u", "input": "x", "encoding_format": "hex"}),
            "encoding_format",
        ),
    ] {
        let (status, v) = embed(&w, body).await;
        assert_eq!(status, 400, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap_or("").contains(what),
            "{what}: {v}"
        );
    }
    assert_eq!(mock.stats().await["requests"], before);
    // Refused calls gave their capacity back: only the two Gemini calls served count.
    assert_eq!(used_today(&db, "u", "gemb").await, 2);
    assert_eq!(used_today(&db, "u", "claude").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_larger_than_max_response_are_cut_and_settled() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&["--reply-words", "3000", "--stream-delay", "1ms"]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('chat', 'openai', 'sk-large-00000000001', base_url => '{u}/v1', rpd => 1000);",
            u = mock.url
        ),
    )
    .await;
    let w = Worker::start(&conninfo(&db), "large", &["--no-queue", "--max-response", "4KiB"]).await;
    let body = |stream: bool| {
        json!({"model": "chat", "user": "u", "stream": stream, "max_tokens": 3000,
               "messages": user_message("a long answer, please")})
    };
    // Whole answers over the limit are not read: 502, and the call is settled.
    let (status, v) = chat_as(&w, TOKEN, &[], body(false)).await;
    assert_eq!(status, 502, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("KEYPOOL_MAX_RESPONSE"),
        "{v}"
    );
    // A stream passes through until the limit, then ends with an error event.
    let r = http()
        .post(format!("{}/v1/chat/completions", w.url))
        .bearer_auth(TOKEN)
        .json(&body(true))
        .send()
        .await
        .expect("stream");
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("stream body");
    assert!(text.contains("\"content\""), "{text}");
    assert!(text.contains("larger than KEYPOOL_MAX_RESPONSE"), "{text}");
    assert!(text.len() < 64 * 1024, "{} bytes passed on", text.len());
    // Both calls were settled with their prompt estimate (10 tokens each: 21 characters / 4 and 4
    // for the message), the stream with the completion it had counted when it was cut.
    prompt_tokens_eventually(&db, "chat", 20).await;
    let completion: i64 = one(
        &db.client,
        "SELECT coalesce(sum(completion_tokens), 0)::bigint FROM keypool_usage WHERE pool = 'chat'",
    )
    .await;
    assert!(completion > 0, "the cut stream settled no completion tokens");
    assert_eq!(used_today(&db, "u", "chat").await, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tokens_requests_per_minute_hold_across_three_workers() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('chat', 'openai', 'sk-three-workers-00000001', base_url => '{u}/v1', model => 'gpt-4o-mini', rpm => 1000);",
            u = mock.url
        ),
    )
    .await;
    let limited: String = one(&db.client, "SELECT keypool_create_api_token('agent', rpm => 5)").await;
    let free: String = one(&db.client, "SELECT keypool_create_api_token('another app')").await;
    let workers = [
        Worker::start(&conninfo(&db), "limits-1", &["--no-queue"]).await,
        Worker::start(&conninfo(&db), "limits-2", &["--no-queue"]).await,
        Worker::start(&conninfo(&db), "limits-3", &["--no-queue"]).await,
    ];
    // Twelve requests in turn through the three workers, each for another user: exactly five
    // are served, the others are told when the token's next request fits.
    let mut served = 0;
    for i in 0..12 {
        let w = &workers[i % 3];
        let (status, v) = chat_as(w, &limited, &[("X-Keypool-User", &format!("user-{i}"))], hello("chat")).await;
        match status {
            200 => served += 1,
            429 => assert_eq!(code(&v), "USER_RATE_LIMITED", "{v}"),
            other => panic!("{other}: {v}"),
        }
    }
    assert_eq!(served, 5);
    let r = http()
        .post(format!("{}/v1/chat/completions", workers[0].url))
        .bearer_auth(&limited)
        .header("X-Keypool-User", "user-99")
        .json(&hello("chat"))
        .send()
        .await
        .expect("request to the worker");
    assert_eq!(r.status(), 429);
    let retry: u64 = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=60).contains(&retry), "{retry}");
    // Another token on the same pool and workers is not held back.
    for w in &workers {
        assert_eq!(
            chat_as(w, &free, &[("X-Keypool-User", "someone")], hello("chat"))
                .await
                .0,
            200
        );
    }
    assert_eq!(mock.stats().await["requests"], 8);
}
