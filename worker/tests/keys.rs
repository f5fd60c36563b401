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
