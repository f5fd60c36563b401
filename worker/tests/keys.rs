//! Keys managed over HTTP (issue 15): rotating a key's secret through the admin API, checked
//! with the provider first.

mod common;

use common::*;
use keypool_tests::{one, shared};
use serde_json::{json, Value};

const ADMIN: &str = "admin-token-keys-0123456789";

async fn rotate(w: &Worker, key_id: i64, body: Value, token: &str) -> (u16, Value) {
    let r = http()
        .post(format!("{}/allocation/keys/{key_id}/rotate", w.url))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("rotate");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_is_rotated_over_http_only_to_a_secret_the_provider_accepts() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    let old = "sk-rotate-http-old-000001";
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('chat', 'openai', '{old}', 'gpt-4o-mini', base_url => '{}/v1');
             SELECT keypool_assign('u' || i, 'chat') FROM generate_series(1, 3) i;",
            mock.url
        ),
    )
    .await;
    let key_id: i64 = one(&db.client, "SELECT key_id FROM keypool_keys").await;
    let w = Worker::start(&conninfo(&db), "keys", &["--no-queue", "--admin-tokens", ADMIN]).await;
    let chat = json!({"model": "chat", "user": "u1", "messages": user_message("hi"), "max_tokens": 3});
    assert_eq!(w.chat(chat.clone()).await.status(), 200);

    // A secret the provider rejects: 422 with its reason, and nothing changes.
    let rejected = "sk-rotate-http-invalid-02";
    let (status, body) = rotate(&w, key_id, json!({"secret": rejected}), ADMIN).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "key_rejected", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("key_invalid"),
        "{body}"
    );
    assert_eq!(
        one::<String>(&db.client, "SELECT label FROM keypool_keys").await,
        "sk-…0001"
    );

    // An accepted one replaces the secret in place: same id, group, users.
    let new = "sk-rotate-http-new-000003";
    let (status, body) = rotate(&w, key_id, json!({"secret": new}), ADMIN).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["key_id"], key_id);
    assert_eq!(body["label"], "sk-…0003");
    assert!(
        body["check"].as_str().unwrap_or_default().starts_with("accepted"),
        "{body}"
    );
    assert_eq!(
        one::<String>(
            &db.client,
            "SELECT key_id || '/' || group_no || '/' || users FROM keypool_keys"
        )
        .await,
        format!("{key_id}/1/3")
    );
    // Requests go out with the new secret at once.
    let before = mock.calls_with(new).await;
    assert_eq!(w.chat(chat.clone()).await.status(), 200);
    assert_eq!(mock.calls_with(new).await, before + 1);

    // Bad bodies and callers: refused, and no answer or log line quotes a secret.
    let (status, body) = rotate(&w, key_id, json!({"secret": ""}), ADMIN).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = rotate(&w, key_id, json!({"sekret": "sk-typo-000000000000001"}), ADMIN).await;
    assert_eq!(status, 400, "{body}");
    assert!(!body.to_string().contains("sk-typo"), "{body}");
    let (status, _) = rotate(&w, key_id, json!({"secret": "sk-not-an-admin-0000001"}), TOKEN).await;
    assert_eq!(status, 401);
    let (status, body) = rotate(&w, 999_999, json!({"secret": "sk-no-such-key-0000001"}), ADMIN).await;
    assert_eq!(status, 404, "{body}");
    // Without a check: for a provider that cannot be asked, or when the operator says so.
    let (status, body) = rotate(
        &w,
        key_id,
        json!({"secret": "sk-rotate-http-unchecked-4", "validate": false}),
        ADMIN,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["check"], "not checked (validate: false)");
    let log = w.log();
    for s in [
        old,
        rejected,
        new,
        "sk-typo-000000000000001",
        "sk-rotate-http-unchecked-4",
    ] {
        assert!(!log.contains(s), "the log quotes {s}");
    }
    assert_eq!(
        one::<i64>(
            &db.client,
            "SELECT count(*) FROM keypool_events WHERE kind = 'key_rotated'"
        )
        .await,
        2
    );
}

async fn send(w: &Worker, method: reqwest::Method, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
    let mut r = http().request(method, format!("{}{path}", w.url)).bearer_auth(token);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.expect("request to the worker");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_are_checked_added_and_removed_through_the_admin_api() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('chat', 'openai', 'sk-keys-adm-first-001', 'gpt-4o-mini', base_url => '{u}/v1', rpm => 1);
             SELECT keypool_assign('u' || i, 'chat') FROM generate_series(1, 4) i;",
            u = mock.url
        ),
    )
    .await;
    let w = Worker::start(&conninfo(&db), "admin-keys", &["--no-queue", "--admin-tokens", ADMIN]).await;
    let base = format!("{}/v1", mock.url);
    let post = reqwest::Method::POST;

    // Checking only: the provider's verdict, nothing stored.
    let (status, body) = send(
        &w,
        post.clone(),
        "/allocation/keys/validate",
        ADMIN,
        Some(json!({"provider": "openai", "secret": "sk-keys-adm-invalid-02", "base_url": base})),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (422, json!("key_rejected")),
        "{body}"
    );
    let (status, body) = send(
        &w,
        post.clone(),
        "/allocation/keys/validate",
        ADMIN,
        Some(json!({"provider": "openai", "secret": "sk-keys-adm-good-0003", "base_url": base})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], true);
    assert_eq!(body["label"], "sk-…0003");
    assert_eq!(one::<i64>(&db.client, "SELECT count(*) FROM keypool_keys").await, 1);

    // Adding: a rejected key is 422 and nothing is added.
    let (status, body) = send(&w, post.clone(), "/allocation/keys", ADMIN, Some(json!({
        "pool": "chat", "provider": "openai", "secret": "sk-keys-adm-invalid-04", "model": "gpt-4o-mini", "base_url": base}))).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(one::<i64>(&db.client, "SELECT count(*) FROM keypool_keys").await, 1);
    // An accepted one is added and serves at once.
    let added = "sk-keys-adm-added-0005";
    let (status, body) = send(
        &w,
        post.clone(),
        "/allocation/keys",
        ADMIN,
        Some(json!({
        "pool": "chat", "provider": "openai", "secret": added, "model": "gpt-4o-mini", "base_url": base, "rpm": 100})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["label"], "sk-…0005");
    assert_eq!(body["state"], "active");
    let new_id = body["key_id"].as_i64().expect("key_id");
    let chat = |u: &str| json!({"model": "chat", "user": u, "messages": user_message("hi"), "max_tokens": 3});
    // The first key allows one request a minute: the second request needs the new key.
    for u in ["u1", "u2"] {
        assert_eq!(w.chat(chat(u)).await.status(), 200);
    }
    // The check asked for its model list once; then it served the second request.
    assert_eq!(mock.calls_with(added).await, 2);

    // Removing: its users go to the other key.
    let (status, body) = send(
        &w,
        reqwest::Method::DELETE,
        &format!("/allocation/keys/{new_id}"),
        ADMIN,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["key_id"], new_id);
    assert_eq!(one::<i64>(&db.client, "SELECT count(*) FROM keypool_keys").await, 1);
    // Not without an admin token; never a secret in an answer or the log.
    let (status, _) = send(
        &w,
        post,
        "/allocation/keys",
        TOKEN,
        Some(json!({
        "pool": "chat", "provider": "openai", "secret": "sk-keys-adm-sneaky-006"})),
    )
    .await;
    assert_eq!(status, 401);
    let log = w.log();
    for s in [
        "sk-keys-adm-invalid-02",
        "sk-keys-adm-good-0003",
        added,
        "sk-keys-adm-sneaky-006",
    ] {
        assert!(!log.contains(s), "the log quotes {s}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_manages_their_own_keys_with_their_token() {
    let db = shared().fresh_db().await;
    // A provider that accepts only the keys it issued, as real ones do.
    let mock = Mock::start(&[
        "--issued-keys-only",
        "--issue",
        "sk-own-keys-shared-0001",
        "--issue",
        "sk-own-keys-alices-00005",
    ]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('chat', 'openai', 'sk-own-keys-shared-0001', 'gpt-4o-mini', base_url => '{u}/v1', rpd => 100);
             SELECT keypool_add_key('chat', 'openai', 'sk-own-keys-bobs-000002', 'gpt-4o-mini', base_url => '{u}/v1', owner => 'bob');",
            u = mock.url
        ),
    )
    .await;
    let alice: String = one(
        &db.client,
        "SELECT keypool_create_api_token('alice', 'alice', ARRAY['chat'])",
    )
    .await;
    let bobs_key: i64 = one(&db.client, "SELECT key_id FROM keypool_keys WHERE owner = 'bob'").await;
    let w = Worker::start(&conninfo(&db), "own-keys", &["--no-queue"]).await;
    let post = reqwest::Method::POST;
    // A key the provider rejects is refused; nothing is added. (Her keys are called where the
    // pool's openai keys are: the mock.)
    let (status, body) = send(
        &w,
        post.clone(),
        "/v1/keys",
        &alice,
        Some(json!({
        "pool": "chat", "provider": "openai", "secret": "sk-own-keys-invalid-003"})),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (422, json!("key_rejected")),
        "{body}"
    );
    assert_eq!(one::<i64>(&db.client, "SELECT count(*) FROM keypool_keys").await, 2);
    // Pools the token does not list are not there for her.
    let (status, _) = send(
        &w,
        post.clone(),
        "/v1/keys",
        &alice,
        Some(json!({
        "pool": "other", "provider": "openai", "secret": "sk-own-keys-other-00004"})),
    )
    .await;
    assert_eq!(status, 404);
    // A user names no owner, address or account for their key, nor skips the check.
    for extra in [
        json!({"owner": "bob"}),
        json!({"base_url": "http://169.254.169.254/v1"}),
        json!({"validate": false}),
    ] {
        let mut body = json!({"pool": "chat", "provider": "openai", "secret": "sk-own-keys-extra-00006"});
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        let (status, answer) = send(&w, post.clone(), "/v1/keys", &alice, Some(body)).await;
        assert_eq!(status, 400, "{answer}");
        assert!(!answer.to_string().contains("sk-own-keys-extra"), "{answer}");
    }
    // Service tokens do not own keys.
    let (status, body) = send(&w, reqwest::Method::GET, "/v1/keys", TOKEN, None).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (403, json!("user_token_required"))
    );

    // Listing: nothing of hers yet; bob's key is not hers to see or remove.
    let (status, body) = send(&w, reqwest::Method::GET, "/v1/keys", &alice, None).await;
    assert_eq!((status, body.clone()), (200, json!([])), "{body}");
    let (status, _) = send(
        &w,
        reqwest::Method::DELETE,
        &format!("/v1/keys/{bobs_key}"),
        &alice,
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = send(&w, reqwest::Method::DELETE, "/v1/keys/999999", &alice, None).await;
    assert_eq!(status, 404);
    assert_eq!(one::<i64>(&db.client, "SELECT count(*) FROM keypool_keys").await, 2);

    // Her own key: checked, added as hers, listed (masked), and used for her requests first.
    let mine = "sk-own-keys-alices-00005";
    let (status, body) = send(
        &w,
        post,
        "/v1/keys",
        &alice,
        Some(json!({
        "pool": "chat", "provider": "openai", "secret": mine, "model": "gpt-4o-mini"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["label"], "sk-…0005");
    assert!(!body.to_string().contains(mine));
    let mine_id = body["key_id"].as_i64().expect("key_id");
    assert_eq!(
        one::<String>(
            &db.client,
            &format!("SELECT owner FROM keypool_keys WHERE key_id = {mine_id}")
        )
        .await,
        "alice"
    );
    let (status, body) = send(&w, reqwest::Method::GET, "/v1/keys", &alice, None).await;
    assert_eq!(status, 200);
    assert_eq!(body.as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(body[0]["label"], "sk-…0005");
    assert_eq!(body[0]["state"], "active");
    let r = http()
        .post(format!("{}/v1/chat/completions", w.url))
        .bearer_auth(&alice)
        .json(&json!({"model": "chat", "messages": user_message("hi"), "max_tokens": 3}))
        .send()
        .await
        .expect("chat");
    assert_eq!(r.status(), 200);
    // Once for the check, once for her request (the made-up key of the second check is not hers).
    assert_eq!(mock.calls_with(mine).await, 2);
    let (status, body) = send(&w, reqwest::Method::GET, "/v1/keys", &alice, None).await;
    assert_eq!((status, body[0]["requests_today"].clone()), (200, json!(1)), "{body}");
    // She removes it; it is gone from her list.
    let (status, _) = send(
        &w,
        reqwest::Method::DELETE,
        &format!("/v1/keys/{mine_id}"),
        &alice,
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (_, body) = send(&w, reqwest::Method::GET, "/v1/keys", &alice, None).await;
    assert_eq!(body, json!([]));
    assert!(!w.log().contains(mine));
}
