//! The worker's operations surface against the mock provider and a private cluster: `/metrics`,
//! the admin API's authentication and figures, seed 000's user API, and `/dashboard` in a real
//! headless Chromium (figures checked against the database, actions, a screenshot).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::browser::Browser;
use common::*;
use keypool_tests::{shared, TestDb};
use serde_json::{json, Value};

const ADMIN: &str = "admin-token-0123456789abcdef";

fn chat_body(model: &str, user: &str) -> Value {
    json!({"model": model, "user": user, "messages": user_message("hello"), "max_tokens": 20})
}

/// Sends `method path` to the worker, with a bearer token if given: status and body.
async fn send(w: &Worker, method: reqwest::Method, path: &str, token: Option<&str>) -> (u16, String) {
    let mut r = http().request(method, format!("{}{path}", w.url));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let r = r.send().await.expect("request to the worker");
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

async fn get(w: &Worker, path: &str, token: Option<&str>) -> (u16, String) {
    send(w, reqwest::Method::GET, path, token).await
}

async fn post(w: &Worker, path: &str, token: Option<&str>) -> (u16, String) {
    send(w, reqwest::Method::POST, path, token).await
}

async fn i64_of(db: &TestDb<'_>, sql: &str) -> i64 {
    value(db, sql)
        .await
        .unwrap_or_else(|| panic!("{sql}: NULL"))
        .parse()
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// One sample of a metric with exactly these labels, from Prometheus text.
fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().expect("sample value"))
}

async fn pool_with_keys(db: &TestDb<'_>, mock: &Mock, pool: &str, secrets: &[&str], extra: &str) {
    exec(db, &format!("SELECT keypool_create_pool('{pool}'{extra})")).await;
    for s in secrets {
        exec(
            db,
            &format!(
                "SELECT keypool_add_key('{pool}', 'openai', '{s}', 'gpt-4o-mini', base_url => '{}/v1', rpm => 50, rpd => 500)",
                mock.url
            ),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_calls_outcomes_refusals_keys_and_the_queue() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    pool_with_keys(
        &db,
        &mock,
        "chat",
        &["sk-metrics-one-001141", "sk-metrics-two-001155"],
        ", min_share => 3",
    )
    .await;
    let w = Worker::start(&conninfo(&db), "metrics", &["--no-queue"]).await;
    // One 429 on the first key: that call is rate_limited, the request fails over and succeeds.
    mock.fault("sk-metrics-one", "429", Some(1), Some(30.0)).await;
    for i in 0..4 {
        let r = w.chat(chat_body("chat", &format!("user-{i}"))).await;
        assert_eq!(r.status(), 200);
    }
    // Pool "small" grants one request per day per user's share: the second is QUOTA_EXCEEDED.
    exec(&db, "SELECT keypool_create_pool('small', min_share => 1)").await;
    exec(
        &db,
        &format!(
            "SELECT keypool_add_key('small', 'openai', 'sk-metrics-small-1148', 'gpt-4o-mini', base_url => '{}/v1', rpd => 1)",
            mock.url
        ),
    )
    .await;
    assert_eq!(w.chat(chat_body("small", "u")).await.status(), 200);
    assert_eq!(w.chat(chat_body("small", "u")).await.status(), 429);
    // Two requests wait in the SQL queue (this worker does not consume it).
    exec(
        &db,
        "SELECT keypool_submit('q' || i, 'chat', '{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}') FROM generate_series(1, 2) i",
    )
    .await;

    // No token needed, like /healthz; the figures are the same a token would get.
    let (status, text) = get(&w, "/metrics", None).await;
    assert_eq!(status, 200);
    let calls = |outcome: &str| {
        sample(
            &text,
            &format!("keypool_worker_provider_calls_total{{pool=\"chat\",provider=\"openai\",outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(calls("success"), Some(4.0), "{text}");
    assert_eq!(calls("rate_limited"), Some(1.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "keypool_worker_provider_latency_seconds_count{pool=\"chat\",provider=\"openai\"}"
        ),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &text,
            "keypool_worker_provider_latency_seconds_bucket{pool=\"chat\",provider=\"openai\",le=\"+Inf\"}"
        ),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &text,
            "keypool_worker_refusals_total{pool=\"small\",reason=\"QUOTA_EXCEEDED\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "keypool_worker_http_requests_total{route=\"/v1/chat/completions\",status=\"200\"}"
        ),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &text,
            "keypool_worker_http_requests_total{route=\"/v1/chat/completions\",status=\"429\"}"
        ),
        Some(1.0)
    );
    assert_eq!(sample(&text, "keypool_database_up"), Some(1.0));
    // Keys by state: the rate-limited key cools for its 30 s.
    assert_eq!(
        sample(&text, "keypool_keys{pool=\"chat\",state=\"cooling\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "keypool_keys{pool=\"chat\",state=\"active\"}"), Some(1.0));
    assert_eq!(
        sample(&text, "keypool_queue_depth{pool=\"chat\",status=\"queued\"}"),
        Some(2.0)
    );
    let used = i64_of(&db, "SELECT used_today FROM keypool_pool_stats WHERE pool = 'chat'").await;
    assert_eq!(
        sample(&text, "keypool_pool_used_today{pool=\"chat\"}"),
        Some(used as f64)
    );
    let status_now = value(&db, "SELECT status FROM keypool_health")
        .await
        .unwrap_or_default();
    assert_eq!(
        sample(&text, &format!("keypool_health{{status=\"{status_now}\"}}")),
        Some(1.0)
    );
    // No secret and no user id reaches the metrics.
    for secret in ["sk-metrics-one-001141", "sk-metrics-two-001155", "user-1"] {
        assert!(!text.contains(secret), "{secret} in /metrics");
    }
}

/// Every admin route, with the method it takes.
const ADMIN_ROUTES: &[(&str, &str)] = &[
    ("GET", "/allocation/system-overview"),
    ("GET", "/allocation/health"),
    ("GET", "/allocation/alerts"),
    ("GET", "/allocation/events"),
    ("GET", "/allocation/key-pool/stats"),
    ("GET", "/allocation/key-pool/available"),
    ("GET", "/allocation/usage-report"),
    ("GET", "/allocation/usage-series"),
    ("POST", "/allocation/keys/1/disable"),
    ("POST", "/allocation/keys/1/enable"),
    ("POST", "/allocation/keys/1/rotate"),
    ("POST", "/allocation/pools/chat/reset"),
];

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_answers_401_without_an_admin_token_and_never_data() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    pool_with_keys(&db, &mock, "chat", &["sk-admin-auth-key-0001"], "").await;
    let w = Worker::start(&conninfo(&db), "admin-auth", &["--no-queue", "--admin-tokens", ADMIN]).await;
    assert_eq!(w.chat(chat_body("chat", "someone")).await.status(), 200);
    let before = value(
        &db,
        "SELECT state || '/' || (SELECT used_today FROM keypool_pool_stats) FROM keypool_keys",
    )
    .await;

    for (method, path) in ADMIN_ROUTES {
        for token in [None, Some(TOKEN), Some("admin-token-0123456789abcdeX")] {
            let (status, body) = match *method {
                "GET" => get(&w, path, token).await,
                _ => post(&w, path, token).await,
            };
            assert_eq!(status, 401, "{method} {path} with {token:?}: {body}");
            let v: Value = serde_json::from_str(&body).expect("JSON error body");
            assert!(
                v["error"]["message"].as_str().is_some_and(|m| m.contains("admin")),
                "{body}"
            );
            for leak in ["chat", "sk-", "someone", "key_id", "EXCELLENT"] {
                assert!(!body.contains(leak), "{method} {path} answered {body}");
            }
        }
    }
    // Nothing was disabled or reset by the refused actions.
    let after = value(
        &db,
        "SELECT state || '/' || (SELECT used_today FROM keypool_pool_stats) FROM keypool_keys",
    )
    .await;
    assert_eq!(before, after);
    assert_eq!(before.as_deref(), Some("active/1"));
    // An admin token on a worker without admin tokens configured opens nothing either.
    let plain = Worker::start(&conninfo(&db), "no-admin", &["--no-queue"]).await;
    let (status, _) = get(&plain, "/allocation/system-overview", Some(ADMIN)).await;
    assert_eq!(status, 401);
    // The user API takes an app's API token, not no token.
    let (status, body) = get(&w, "/allocation/daily?model=chat&user=someone", None).await;
    assert_eq!(status, 401);
    assert!(!body.contains("someone"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_reports_what_the_database_holds_and_acts() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    pool_with_keys(
        &db,
        &mock,
        "chat",
        &["sk-admin-one-0001029", "sk-admin-two-0001036"],
        ", min_share => 10",
    )
    .await;
    exec(&db, "SELECT keypool_set_price('openai', 'gpt-4o-mini', 0.15, 0.60)").await;
    let w = Worker::start(&conninfo(&db), "admin", &["--no-queue", "--admin-tokens", ADMIN]).await;
    for i in 0..3 {
        assert_eq!(w.chat(chat_body("chat", &format!("u{i}"))).await.status(), 200);
    }
    w.chat(chat_body("chat", "u0")).await;

    let (status, body) = get(&w, "/allocation/system-overview", Some(ADMIN)).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["health"]["status"].as_str(),
        value(&db, "SELECT status FROM keypool_health").await.as_deref()
    );
    assert_eq!(v["pools"][0]["pool"], "chat");
    assert_eq!(v["pools"][0]["used_today"], 4);
    assert_eq!(v["pools"][0]["daily_capacity"], 1000);
    assert_eq!(v["workers"][0]["id"], "admin");
    assert!(v["recent_events"]
        .as_array()
        .is_some_and(|e| e.iter().any(|e| e["kind"] == "key_added")));
    for secret in ["sk-admin-one-0001029", "sk-admin-two-0001036"] {
        assert!(!body.contains(secret));
    }

    let (_, body) = get(&w, "/allocation/key-pool/stats", Some(ADMIN)).await;
    let keys: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(keys.len(), 2);
    let total: i64 = keys.iter().map(|k| k["requests_today"].as_i64().unwrap()).sum();
    assert_eq!(total, 4);
    assert_eq!(keys[0]["rpd"], 500);

    // Disable key 1 from the API: the database says so, and "available" leaves it out.
    let first = i64_of(&db, "SELECT min(key_id) FROM keypool_keys").await;
    let (status, body) = post(&w, &format!("/allocation/keys/{first}/disable"), Some(ADMIN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["state"], "disabled");
    assert_eq!(
        value(
            &db,
            &format!("SELECT state || ': ' || reason FROM keypool_keys WHERE key_id = {first}")
        )
        .await
        .as_deref(),
        Some("disabled: disabled from the dashboard")
    );
    let (_, body) = get(&w, "/allocation/key-pool/available", Some(ADMIN)).await;
    let available: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(available.len(), 1);
    assert_ne!(available[0]["key_id"], first);
    let (status, _) = post(&w, &format!("/allocation/keys/{first}/enable"), Some(ADMIN)).await;
    assert_eq!(status, 200);
    assert_eq!(
        value(&db, &format!("SELECT state FROM keypool_keys WHERE key_id = {first}"))
            .await
            .as_deref(),
        Some("active")
    );
    // Unknown things are 404s, bad input 400s.
    assert_eq!(post(&w, "/allocation/keys/999999/enable", Some(ADMIN)).await.0, 404);
    assert_eq!(post(&w, "/allocation/keys/abc/enable", Some(ADMIN)).await.0, 400);
    assert_eq!(post(&w, "/allocation/pools/nope/reset", Some(ADMIN)).await.0, 404);
    assert_eq!(
        get(&w, "/allocation/usage-report?from=yesterday", Some(ADMIN)).await.0,
        400
    );

    // The usage report prices what the keys did.
    exec(&db, "SELECT keypool_flush()").await;
    let (status, body) = get(&w, "/allocation/usage-report", Some(ADMIN)).await;
    assert_eq!(status, 200, "{body}");
    let report: Vec<Value> = serde_json::from_str(&body).unwrap();
    let calls: i64 = report.iter().map(|r| r["requests"].as_i64().unwrap()).sum();
    assert_eq!(calls, 4);
    assert!(report.iter().all(|r| r["estimated_cost"].is_number()), "{body}");

    // Reset: the pool's use today is back to zero, and the event says so.
    let (status, body) = post(&w, "/allocation/pools/chat/reset", Some(ADMIN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        i64_of(&db, "SELECT used_today FROM keypool_pool_stats WHERE pool = 'chat'").await,
        0
    );
    let (_, body) = get(&w, "/allocation/events?limit=5", Some(ADMIN)).await;
    let events: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(events[0]["kind"], "usage_reset");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_user_api_reports_the_callers_allocation_like_seed_000() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    pool_with_keys(&db, &mock, "chat", &["sk-user-api-key-00001"], ", min_share => 100").await;
    let w = Worker::start(&conninfo(&db), "user-api", &["--no-queue"]).await;
    for _ in 0..3 {
        assert_eq!(w.chat(chat_body("gpt-4o-mini", "alice")).await.status(), 200);
    }
    let r = http()
        .get(format!("{}/allocation/daily?model=gpt-4o-mini", w.url))
        .bearer_auth(TOKEN)
        .header("x-keypool-user", "alice")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["user"], "alice");
    assert_eq!(v["pool"], "chat");
    assert_eq!(v["requestsUsedToday"], 3);
    assert_eq!(v["allocatedRequestsToday"], 500);
    assert_eq!(v["requestsRemainingToday"], 497);
    assert_eq!(v["warningLevel"], "ok");
    let (status, body) = get(&w, "/allocation/can-request?pool=chat&user=bob", Some(TOKEN)).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["canRequest"], true);
    assert_eq!(v["requestsRemainingToday"], 500);
    // The answer matches the SQL function, and asking reserved nothing.
    assert_eq!(
        value(&db, "SELECT keypool_can_request('bob', 'chat')::text")
            .await
            .as_deref(),
        Some("true")
    );
    assert_eq!(i64_of(&db, "SELECT used_today FROM keypool_pool_stats").await, 3);
    let (status, _) = get(&w, "/allocation/daily?model=no-such-model&user=bob", Some(TOKEN)).await;
    assert_eq!(status, 404);
}

fn screenshot_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/test-artifacts")
        .join("dashboard.png")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_the_databases_figures_in_chromium_and_its_buttons_act() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    pool_with_keys(
        &db,
        &mock,
        "chat",
        &["sk-dash-one-00001092", "sk-dash-two-00001106", "sk-dash-three-001099"],
        ", min_share => 20",
    )
    .await;
    let w = Worker::start(&conninfo(&db), "dashboard", &["--no-queue", "--admin-tokens", ADMIN]).await;
    mock.fault("sk-dash-three", "429", Some(1), Some(120.0)).await;
    for i in 0..7 {
        assert_eq!(w.chat(chat_body("chat", &format!("user-{i}"))).await.status(), 200);
    }

    let mut browser = Browser::launch().await;
    // Without a token the page shows the login form and no figures.
    browser.navigate(&format!("{}/dashboard", w.url)).await;
    browser
        .wait_for(
            "document.getElementById('board').hidden && !document.getElementById('login').hidden",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(
        browser.eval("document.querySelectorAll('#keys tbody tr').length").await,
        json!(0)
    );
    // A wrong token: still the login form, with the server's reason.
    browser
        .navigate(&format!("{}/dashboard#token=not-an-admin-token-000", w.url))
        .await;
    browser
        .wait_for(
            "document.getElementById('login-error').textContent.includes('KEYPOOL_ADMIN_TOKENS')",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(
        browser.eval("document.querySelectorAll('#keys tbody tr').length").await,
        json!(0)
    );

    browser
        .navigate(&format!("{}/dashboard#token={ADMIN}&refresh=1", w.url))
        .await;
    browser
        .wait_for("Number(document.body.dataset.refreshes) >= 1", Duration::from_secs(20))
        .await;
    // The token left the address bar.
    assert_eq!(browser.eval("location.hash").await, json!("#refresh=1"));

    // Health as the database has it.
    let health = value(&db, "SELECT status FROM keypool_health").await.unwrap();
    assert_eq!(
        browser
            .eval("document.getElementById('health-status').textContent")
            .await,
        json!(health)
    );
    // Every key's bars show the database's figures against its limits.
    let rows = db
        .client
        .query(
            "SELECT key_id, requests_today, rpd, requests_this_minute, rpm, state FROM keypool_key_stats ORDER BY key_id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    let shown = browser
        .eval(
            "[...document.querySelectorAll('#keys tbody tr')].map(tr => ({
                id: Number(tr.dataset.keyId),
                today: Number(tr.querySelector('[data-field=requests_today]').dataset.used),
                rpd: Number(tr.querySelector('[data-field=requests_today]').dataset.limit),
                text: tr.querySelector('[data-field=requests_today]').textContent,
                minute: Number(tr.querySelector('[data-field=requests_this_minute]').dataset.used),
                rpm: Number(tr.querySelector('[data-field=requests_this_minute]').dataset.limit),
                state: tr.querySelector('[data-field=state] .badge').textContent }))",
        )
        .await;
    for (r, s) in rows.iter().zip(shown.as_array().unwrap()) {
        let (id, today, rpd, minute, rpm, state): (i64, i64, i32, i64, i32, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5));
        assert_eq!(s["id"], id);
        assert_eq!(s["today"], today, "{s}");
        assert_eq!(s["rpd"], rpd);
        assert_eq!(s["minute"], minute);
        assert_eq!(s["rpm"], rpm);
        assert_eq!(s["state"], json!(state));
        assert_eq!(
            s["text"],
            json!(format!(
                "{today} / {rpd} ({}%)",
                (100.0 * today as f64 / rpd as f64).round()
            ))
        );
    }
    let total: i64 = rows.iter().map(|r| r.get::<_, i64>(1)).sum();
    assert_eq!(total, 8, "7 requests and the one 429");
    // The cooling key is on the page, and so is its alert and event.
    assert!(shown.as_array().unwrap().iter().any(|s| s["state"] == "cooling"));
    let alerts = i64_of(&db, "SELECT count(*) FROM keypool_alerts").await;
    assert_eq!(
        browser
            .eval("document.querySelectorAll('#alerts li[data-alert]').length")
            .await,
        json!(alerts)
    );
    assert!(alerts >= 1);
    let newest = value(&db, "SELECT kind FROM keypool_events ORDER BY id DESC LIMIT 1")
        .await
        .unwrap();
    assert_eq!(
        browser.eval("document.querySelector('#events li').dataset.event").await,
        json!(newest)
    );
    // Pool capacity against use.
    let (used, capacity) = (
        i64_of(&db, "SELECT used_today FROM keypool_pool_stats WHERE pool = 'chat'").await,
        i64_of(&db, "SELECT daily_capacity FROM keypool_pool_stats WHERE pool = 'chat'").await,
    );
    assert_eq!(
        browser.eval("[document.querySelector('tr[data-pool=chat] [data-field=used_today]').dataset.used, document.querySelector('tr[data-pool=chat] [data-field=used_today]').dataset.limit].map(Number)").await,
        json!([used, capacity])
    );
    browser.screenshot(&screenshot_path()).await;
    println!("dashboard screenshot: {}", screenshot_path().display());

    // The disable button disables the key in the database, and the page shows it.
    let first = i64_of(&db, "SELECT min(key_id) FROM keypool_keys").await;
    // Every action asks first: cancelling changes nothing.
    browser
        .eval(&format!(
            "document.querySelector('button[data-action=disable][data-key-id=\"{first}\"]').click()"
        ))
        .await;
    assert_eq!(
        browser.eval("document.getElementById('confirm').hidden").await,
        json!(false)
    );
    assert!(browser
        .eval("document.getElementById('confirm-text').textContent")
        .await
        .as_str()
        .unwrap_or_default()
        .starts_with(&format!("Disable key #{first}")));
    browser.eval("document.getElementById('confirm-no').click()").await;
    assert_eq!(
        value(&db, &format!("SELECT state FROM keypool_keys WHERE key_id = {first}"))
            .await
            .as_deref(),
        Some("active")
    );
    browser
        .eval(&format!(
            "document.querySelector('button[data-action=disable][data-key-id=\"{first}\"]').click()"
        ))
        .await;
    browser.eval("document.getElementById('confirm-yes').click()").await;
    eventually(
        &db,
        &format!("SELECT state FROM keypool_keys WHERE key_id = {first}"),
        "disabled",
    )
    .await;
    browser
        .wait_for(&format!("document.querySelector('tr[data-key-id=\"{first}\"] [data-field=state] .badge').textContent === 'disabled'"), Duration::from_secs(20))
        .await;
    browser
        .eval(&format!(
            "document.querySelector('button[data-action=enable][data-key-id=\"{first}\"]').click()"
        ))
        .await;
    browser.eval("document.getElementById('confirm-yes').click()").await;
    eventually(
        &db,
        &format!("SELECT state FROM keypool_keys WHERE key_id = {first}"),
        "active",
    )
    .await;
    // Reset: the pool's use today goes to zero in the database and on the page.
    browser
        .eval("document.querySelector('button[data-action=reset][data-pool=chat]').click()")
        .await;
    browser.eval("document.getElementById('confirm-yes').click()").await;
    eventually(
        &db,
        "SELECT used_today FROM keypool_pool_stats WHERE pool = 'chat'",
        "0",
    )
    .await;
    browser
        .wait_for(
            "document.querySelector('tr[data-pool=chat] [data-field=used_today]').dataset.used === '0'",
            Duration::from_secs(20),
        )
        .await;
    // It keeps refreshing by itself: new traffic shows up without a reload.
    assert_eq!(w.chat(chat_body("chat", "late")).await.status(), 200);
    browser
        .wait_for(
            "document.querySelector('tr[data-pool=chat] [data-field=used_today]').dataset.used === '1'",
            Duration::from_secs(20),
        )
        .await;
    // The add-key form: a key the provider rejects is refused with its reason and not added;
    // an accepted one is added and appears; its remove button asks, then removes it.
    let keys_before = i64_of(&db, "SELECT count(*) FROM keypool_keys").await;
    let fill = |secret: &str| {
        format!(
            "(() => {{ const f = document.getElementById('add-key');
                f.elements.pool.value = 'chat'; f.elements.provider.value = 'openai';
                f.elements.secret.value = '{secret}'; f.elements.model.value = 'gpt-4o-mini';
                f.elements.base_url.value = '{}/v1'; f.elements.rpm.value = '50';
                document.getElementById('add-key-result').dataset.status = ''; }})()",
            mock.url
        )
    };
    browser.eval(&fill("sk-dash-form-invalid-0001")).await;
    browser.eval("document.getElementById('check-key').click()").await;
    browser
        .wait_for(
            "document.getElementById('add-key-result').dataset.status === '422'",
            Duration::from_secs(20),
        )
        .await;
    // Its own answer, not the check's: the status is cleared before the click.
    browser
        .eval("document.getElementById('add-key-result').dataset.status = ''; document.getElementById('add-key-button').click()")
        .await;
    browser
        .wait_for(
            "document.getElementById('add-key-result').dataset.status === '422'",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(i64_of(&db, "SELECT count(*) FROM keypool_keys").await, keys_before);
    browser.eval(&fill("sk-dash-form-good-00001234")).await;
    browser.eval("document.getElementById('check-key').click()").await;
    browser
        .wait_for(
            "document.getElementById('add-key-result').dataset.status === '200'",
            Duration::from_secs(20),
        )
        .await;
    assert!(browser
        .eval("document.getElementById('add-key-result').textContent")
        .await
        .as_str()
        .unwrap_or_default()
        .starts_with("accepted: sk-…1234"));
    assert_eq!(i64_of(&db, "SELECT count(*) FROM keypool_keys").await, keys_before);
    browser.eval(&fill("sk-dash-form-good-00001234")).await;
    browser.eval("document.getElementById('add-key-button').click()").await;
    browser
        .wait_for(
            "document.getElementById('add-key-result').dataset.status === '200'",
            Duration::from_secs(20),
        )
        .await;
    let added = i64_of(&db, "SELECT max(key_id) FROM keypool_keys").await;
    assert_eq!(i64_of(&db, "SELECT count(*) FROM keypool_keys").await, keys_before + 1);
    assert_eq!(
        browser
            .eval("document.querySelector('#add-key input[name=secret]').value")
            .await,
        json!("")
    );
    browser
        .wait_for(
            &format!("document.querySelector('tr[data-key-id=\"{added}\"]') !== null"),
            Duration::from_secs(20),
        )
        .await;
    browser
        .eval(&format!(
            "document.querySelector('button[data-action=remove][data-key-id=\"{added}\"]').click()"
        ))
        .await;
    browser.eval("document.getElementById('confirm-yes').click()").await;
    eventually(&db, "SELECT count(*) FROM keypool_keys", &keys_before.to_string()).await;
    browser
        .wait_for(
            &format!("document.querySelector('tr[data-key-id=\"{added}\"]') === null"),
            Duration::from_secs(20),
        )
        .await;

    // No secret anywhere in the page.
    let html = browser.eval("document.documentElement.outerHTML").await;
    for secret in [
        "sk-dash-one-00001092",
        "sk-dash-two-00001106",
        "sk-dash-three-001099",
        "sk-dash-form-good-00001234",
    ] {
        assert!(!html.as_str().unwrap().contains(secret));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_charts_the_hourly_history_and_budgets_in_chromium() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    pool_with_keys(
        &db,
        &mock,
        "chat",
        &["sk-chart-one-00001092", "sk-chart-two-00001106"],
        "",
    )
    .await;
    pool_with_keys(&db, &mock, "paid", &["sk-chart-paid-0001099"], "").await;
    exec(
        &db,
        "SELECT keypool_set_price('openai', 'gpt-4o-mini', 0.15, 0.60, 0.001);
         SELECT keypool_set_budget('paid', 0.05, 'day');",
    )
    .await;
    let w = Worker::start(&conninfo(&db), "charts", &["--no-queue", "--admin-tokens", ADMIN]).await;
    for i in 0..6 {
        assert_eq!(w.chat(chat_body("chat", &format!("user-{i}"))).await.status(), 200);
    }
    for i in 0..3 {
        assert_eq!(w.chat(chat_body("paid", &format!("user-{i}"))).await.status(), 200);
    }
    // The history the charts draw: the settled calls, flushed now.
    eventually(
        &db,
        "SELECT keypool_flush() >= 0 AND (SELECT sum(requests) FROM keypool_usage) = 9",
        "t",
    )
    .await;
    let (status, _) = get(&w, "/allocation/usage-series?hours=0", Some(ADMIN)).await;
    assert_eq!(status, 400);
    let (status, _) = get(&w, "/allocation/usage-series?hours=745", Some(ADMIN)).await;
    assert_eq!(status, 400);

    let mut browser = Browser::launch().await;
    browser
        .navigate(&format!("{}/dashboard#token={ADMIN}&refresh=1", w.url))
        .await;
    browser
        .wait_for(
            "Number(document.getElementById('chart-requests').dataset.drawn) >= 1 && document.querySelectorAll('#chart-spend canvas').length === 1",
            Duration::from_secs(30),
        )
        .await;
    for (range, hours) in [("24", "24 hours"), ("168", "7 days")] {
        browser
            .eval(&format!(
                "document.querySelector('#ranges button[data-range=\"{range}\"]').click()"
            ))
            .await;
        browser
            .wait_for(
                &format!("document.getElementById('chart-requests').dataset.points === '{range}'"),
                Duration::from_secs(20),
            )
            .await;
        let want = value(
            &db,
            &format!(
                "SELECT sum(requests) || '|' || sum(prompt_tokens + completion_tokens) || '|' || trim_scale(sum(estimated_cost))
                   FROM keypool_usage WHERE hour > date_trunc('hour', keypool_now()) - interval '{range} hours'"
            ),
        )
        .await
        .unwrap();
        let shown = browser
            .eval("['requests', 'tokens', 'spend'].map(c => document.getElementById('chart-' + c).dataset.total).join('|')")
            .await;
        assert_eq!(shown, json!(want), "{hours}");
        assert_eq!(
            browser
                .eval("document.getElementById('chart-requests').dataset.series")
                .await,
            json!("chat,paid")
        );
        // uPlot drew a canvas and a legend with one entry per pool.
        assert_eq!(
            browser
                .eval("document.querySelectorAll('#chart-tokens canvas').length")
                .await,
            json!(1)
        );
        assert_eq!(
            browser
                .eval("document.querySelectorAll('#chart-tokens .u-legend .u-series').length")
                .await,
            json!(3)
        );
    }
    // The budget as a bar: spent this period against the budget, as the database has them.
    let (spent, budget) = (
        value(
            &db,
            "SELECT trim_scale(spent) FROM keypool_pool_stats WHERE pool = 'paid'",
        )
        .await
        .unwrap(),
        value(
            &db,
            "SELECT trim_scale(budget) FROM keypool_pool_stats WHERE pool = 'paid'",
        )
        .await
        .unwrap(),
    );
    assert_eq!(
        browser
            .eval("[...document.querySelectorAll('tr[data-pool=paid] [data-field=spent]')].map(b => b.dataset.used + '/' + b.dataset.limit)[0]")
            .await,
        json!(format!("{spent}/{budget}"))
    );
    assert_eq!(
        browser
            .eval("document.querySelector('tr[data-pool=chat] [data-field=spent]').textContent")
            .await,
        json!("no budget")
    );
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/test-artifacts")
        .join("dashboard-charts.png");
    browser.screenshot(&path).await;
    println!("dashboard charts screenshot: {}", path.display());
}

/// Metric names and, per name, the label names its samples carry, from `/metrics` text.
fn exported(text: &str) -> std::collections::HashMap<String, std::collections::HashSet<String>> {
    let mut out: std::collections::HashMap<String, std::collections::HashSet<String>> = Default::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap_or_default().to_string();
            out.entry(name).or_default();
        } else if !line.starts_with('#') && !line.is_empty() {
            let (name, labels) = match line.split_once('{') {
                Some((n, l)) => (n, l.split_once('}').map_or("", |x| x.0)),
                None => (line.split(' ').next().unwrap_or_default(), ""),
            };
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| out.contains_key(*b)))
                .unwrap_or(name);
            let set = out.entry(base.to_string()).or_default();
            for pair in labels.split(',').filter(|p| !p.is_empty()) {
                set.insert(pair.split('=').next().unwrap_or_default().to_string());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn the_grafana_dashboard_parses_and_uses_only_metrics_the_worker_exports() {
    let json: Value = serde_json::from_str(include_str!("../../ops/grafana/pg_keypool.json")).expect("valid JSON");
    assert_eq!(json["uid"], "pg-keypool");
    assert_eq!(
        json["__inputs"][0]["pluginId"], "prometheus",
        "importable with a Prometheus data source"
    );
    let panels = json["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);

    // A worker with traffic of every kind, so that every metric has samples.
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    pool_with_keys(&db, &mock, "chat", &["sk-grafana-one-0001092"], "").await;
    exec(
        &db,
        "SELECT keypool_set_price('openai', 'gpt-4o-mini', 0.15, 0.60, 0.01);
         SELECT keypool_set_budget('chat', 0.025, 'day');
         SELECT keypool_submit('u', 'chat', '{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}'::jsonb, max_wait => '1 hour');",
    )
    .await;
    let w = Worker::start(&conninfo(&db), "grafana", &["--no-queue"]).await;
    assert_eq!(w.chat(chat_body("chat", "a")).await.status(), 200);
    assert_eq!(w.chat(chat_body("chat", "b")).await.status(), 200);
    assert_eq!(w.chat(chat_body("chat", "c")).await.status(), 429);
    let (status, text) = get(&w, "/metrics", None).await;
    assert_eq!(status, 200);
    let metrics = exported(&text);

    let mut checked = 0;
    for p in panels {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            let used = metrics_in(expr);
            assert!(!used.is_empty(), "{expr}");
            for (metric, labels) in used {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| metric.strip_suffix(s).filter(|b| metrics.contains_key(*b)))
                    .unwrap_or(&metric);
                let Some(have) = metrics.get(base) else {
                    panic!("panel {:?} uses {metric}, which the worker does not export", p["title"]);
                };
                for l in labels.iter().filter(|l| *l != "le") {
                    assert!(
                        have.contains(l),
                        "panel {:?}: {metric} has no label {l} (it has {have:?})",
                        p["title"]
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 13);
}

/// Each `keypool_*` metric an expression uses, with the labels of the `by (...)` that follows
/// its aggregation (if any).
fn metrics_in(expr: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    // The labels of each `by (...)` in the expression, in order; an aggregation's `by` comes
    // before the metric it wraps.
    let mut pending: Vec<String> = Vec::new();
    while i < bytes.len() {
        if expr[i..].starts_with("by (") {
            let end = expr[i..].find(')').map_or(bytes.len(), |e| i + e);
            pending = expr[i + 4..end].split(',').map(|s| s.trim().to_string()).collect();
            i = end;
        } else if expr[i..].starts_with("keypool_") && (i == 0 || !(bytes[i - 1] as char).is_ascii_alphanumeric()) {
            let end = expr[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(bytes.len(), |e| i + e);
            out.push((expr[i..end].to_string(), std::mem::take(&mut pending)));
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

/// The book's Privileges grants for the admin API are enough: a worker role with the worker grants,
/// membership in an ops role and the listed extra grants serves metrics, the admin and user APIs
/// and the dashboard's actions.
#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_runs_with_only_the_documented_grants() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    pool_with_keys(&db, &mock, "chat", &["sk-admin-grants-00001"], "").await;
    let (worker, ops) = (format!("{}_aw", db.name), format!("{}_ops", db.name));
    exec(
        &db,
        &format!(
            "DROP ROLE IF EXISTS {worker}; DROP ROLE IF EXISTS {ops};
             CREATE ROLE {ops}; CREATE ROLE {worker} LOGIN;
             GRANT SELECT ON keypool_keys, keypool_scopes, keypool_usage, keypool_events TO {ops};
             GRANT SELECT ON keypool_pool_stats, keypool_members, keypool_key_stats, keypool_alerts, keypool_health,
                             keypool_prices TO {ops};
             GRANT EXECUTE ON FUNCTION keypool.scope_state(), keypool.key_state(), keypool.pool_state(), keypool.health(),
                                       keypool_now(), keypool_usage_report(date, date) TO {ops};
             GRANT USAGE ON SCHEMA keypool TO {ops};
             GRANT EXECUTE ON FUNCTION keypool_reserve(text, text, bigint, text[]), keypool_reserve(text, text, bigint, text[], bytea),
                 keypool_settle(bigint, integer, bigint, bigint, bigint, text, bigint, bigint, bigint, bigint),
                 keypool_release(bigint), keypool_models(), keypool_claim_requests(text, integer, interval),
                 keypool_complete_request(bigint, text, text, jsonb, text, timestamptz), keypool_queue_wake_at(),
                 keypool_worker_heartbeat(text, text, text, integer, timestamptz, bigint, bigint, bigint),
                 keypool_worker_stopped(text), keypool_authenticate_api_token_sha256(bytea), keypool_classify(integer, text),
                 keypool_recheck_due(interval, integer), keypool_recheck_result(bigint, boolean, text, interval)
               TO {worker};
             GRANT {ops} TO {worker};
             GRANT SELECT ON keypool_requests, keypool_workers, keypool_queue_depth TO {worker};
             GRANT EXECUTE ON FUNCTION keypool_allocation(text, text), keypool_can_request(text, text),
                 keypool_disable_key(bigint, text), keypool_enable_key(bigint), keypool_reset_usage(text) TO {worker};
             SELECT keypool_grant('chat', '{worker}', 'use');
             SELECT keypool_grant('chat', '{worker}', 'read');
             SELECT keypool_grant('chat', '{worker}', 'admin');"
        ),
    )
    .await;
    let as_worker = conninfo(&db).replace("user=postgres", &format!("user={worker}"));
    let w = Worker::start(&as_worker, "admin-grants", &["--no-queue", "--admin-tokens", ADMIN]).await;
    assert_eq!(w.chat(chat_body("chat", "u1")).await.status(), 200);
    let (status, text) = get(&w, "/metrics", None).await;
    assert_eq!(status, 200);
    assert_eq!(sample(&text, "keypool_database_up"), Some(1.0), "{}", w.log());
    let key = i64_of(&db, "SELECT min(key_id) FROM keypool_keys").await;
    for path in [
        "/allocation/system-overview",
        "/allocation/health",
        "/allocation/alerts",
        "/allocation/events",
        "/allocation/key-pool/stats",
        "/allocation/key-pool/available",
        "/allocation/usage-report",
        "/allocation/usage-series?hours=168",
    ] {
        let (status, body) = get(&w, path, Some(ADMIN)).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    for path in [
        format!("/allocation/keys/{key}/disable"),
        format!("/allocation/keys/{key}/enable"),
        "/allocation/pools/chat/reset".to_string(),
    ] {
        let (status, body) = post(&w, &path, Some(ADMIN)).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    for path in [
        "/allocation/daily?pool=chat&user=u1",
        "/allocation/can-request?pool=chat&user=u1",
    ] {
        let (status, body) = get(&w, path, Some(TOKEN)).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    // An end user's API token, checked with the one function granted for it.
    let token = value(&db, "SELECT keypool_create_api_token('u2', 'u2', ARRAY['chat'])")
        .await
        .expect("a token");
    let r = http()
        .post(format!("{}/v1/chat/completions", w.url))
        .bearer_auth(&token)
        .json(&chat_body("chat", "u2"))
        .send()
        .await
        .expect("chat with an API token");
    assert_eq!(r.status(), 200);
    let (status, body) = get(&w, "/allocation/daily?pool=chat", Some(&token)).await;
    let daily: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!((status, daily["user"].as_str()), (200, Some("u2")), "{body}");
    assert!(!w.log().contains("permission denied"), "{}", w.log());
}
