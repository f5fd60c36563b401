//! Operations that only a live server shows: every event is announced on channel
//! keypool_events (NOTIFY, the event's id only), and the background raises alerts without
//! anyone asking.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use keypool_tests::shared;
use tokio_postgres::{AsyncMessage, NoTls};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_and_background_alerts_are_announced_on_keypool_events() {
    let cluster = shared();
    let db = cluster.fresh_db().await;
    let (listener, mut connection) = tokio_postgres::connect(&cluster.conninfo(&db.name), NoTls)
        .await
        .expect("listener connection");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    listener.batch_execute("LISTEN keypool_events").await.expect("LISTEN");

    db.client
        .batch_execute(
            "SELECT keypool_create_pool('ops');
             SELECT keypool_add_key('ops', 'openai', 'sk-TOPSECRET-ops-000001', 'gpt-4o-mini', rpm => 1);
             SELECT keypool_add_key('ops', 'openai', 'sk-TOPSECRET-ops-000002', 'gpt-4o-mini');
             SELECT keypool_settle((keypool_reserve('u1', 'ops')).reservation_id, 200);
             SELECT keypool_settle((keypool_reserve('u2', 'ops')).reservation_id, 401, error_code => 'invalid_api_key');",
        )
        .await
        .expect("set-up");

    // Announced at once: the keys added and the key the provider rejected. Within a flush
    // interval (10 s), the background raises the alerts: key 2 disabled, key 1's account at
    // 100% of its requests per minute.
    let mut kinds: Vec<String> = Vec::new();
    let mut alerts: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    while alerts.len() < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some((channel, payload))) = tokio::time::timeout(left, rx.recv()).await else {
            panic!("announced so far: {kinds:?}, alerts {alerts:?}");
        };
        assert_eq!(channel, "keypool_events");
        // The payload is the event's id, nothing else: reading the event needs `read`.
        let id: i64 = payload
            .parse()
            .unwrap_or_else(|_| panic!("a notification that is not an event id: {payload}"));
        let row = db
            .client
            .query_one(
                "SELECT kind, coalesce(reason, '') FROM keypool_events WHERE id = $1",
                &[&id],
            )
            .await
            .expect("the announced event");
        let (kind, reason): (String, String) = (row.get(0), row.get(1));
        assert!(!reason.contains("TOPSECRET"), "a secret in an event: {reason}");
        let payload = format!("{kind}: {reason}");
        if kind == "alert" {
            alerts.push(payload.clone());
        }
        kinds.push(kind);
    }
    assert_eq!(
        &kinds[..4],
        ["pool_created", "key_added", "key_added", "key_disabled"],
        "{kinds:?}"
    );
    let all = alerts.join("\n");
    assert!(all.contains("key_disabled") && all.contains("invalid_api_key"), "{all}");
    assert!(
        all.contains("scope_near_limit") && all.contains("100% of its requests per minute"),
        "{all}"
    );
}
