//! The endpoint is a drop-in for OpenAI's official client: the `openai` package from PyPI
//! (pinned in tests/python/requirements.txt; the test command installs it in a virtualenv)
//! talks to a real worker, streaming included, and sees the errors it expects.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use keypool_tests::shared;
use serde_json::Value;

/// The Python with the `openai` package: KEYPOOL_PYTHON, else the test command's virtualenv.
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("KEYPOOL_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/python-venv/bin/python");
    assert!(
        venv.exists(),
        "no Python with the openai package: run scripts/test.sh (it creates {}), or set KEYPOOL_PYTHON",
        venv.display()
    );
    venv
}

#[tokio::test(flavor = "multi_thread")]
async fn the_official_openai_python_client_works_against_the_endpoint() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('chat', 'openai', 'sk-python-a-0000000001', 'gpt-4o-mini', base_url => '{u}/v1');
             SELECT keypool_add_key('chat', 'gemini', 'AIza-python-b-00000002', 'gemini-2.5-flash', base_url => '{u}');
             SELECT keypool_create_pool('tight');
             SELECT keypool_add_key('tight', 'anthropic', 'sk-ant-python-000003', 'claude-sonnet-4-5', rpd => 4, base_url => '{u}');
             SELECT keypool_assign('tight-user', 'tight'), keypool_assign('other-user', 'tight');
             SELECT keypool_create_pool('oa');
             SELECT keypool_add_key('oa', 'openai', 'sk-python-oa-000000004', 'gpt-4o-mini', base_url => '{u}/v1');
             SELECT keypool_create_pool('gem');
             SELECT keypool_add_key('gem', 'gemini', 'AIza-python-gem-000005', 'gemini-3-flash-preview', base_url => '{u}');
             SELECT keypool_create_pool('ant');
             SELECT keypool_add_key('ant', 'anthropic', 'sk-ant-python-000006', 'claude-sonnet-4-5', base_url => '{u}');
             SELECT keypool_create_pool('img');
             SELECT keypool_add_key('img', 'gemini', 'AIza-python-img-000007', 'gemini-2.5-flash-image', rpm => 2, base_url => '{u}');",
            u = mock.url
        ),
    )
    .await;
    let w = Worker::start(&conninfo(&db), "python", &["--no-queue"]).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_client.py");
    let out = Command::new(python())
        .arg(&script)
        .args([w.url.as_str(), TOKEN, "oa", "gem", "ant"])
        .output()
        .expect("run the Python client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the OpenAI client failed:\n{stdout}\n{}\nworker log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.log()
    );
    let seen: Value = serde_json::from_str(stdout.trim()).expect("the script's JSON");

    // Whichever key (OpenAI or Gemini, translated) served, the client sees OpenAI's shape.
    assert_eq!(seen["content"], "This is a mock reply");
    assert_eq!(seen["raw_content"], "This is a mock reply");
    assert_eq!(seen["finish_reason"], "length");
    assert_eq!(seen["usage"], serde_json::json!([2, 5]));
    assert!(
        seen["key_id_header"].as_str().is_some_and(|k| k == "1" || k == "2"),
        "{seen}"
    );
    assert_eq!(seen["streamed"], "This is a mock reply");
    assert_eq!(seen["stream_usage"], serde_json::json!([2, 5]));
    assert_eq!(
        seen["models"],
        serde_json::json!([
            "ant",
            "chat",
            "claude-sonnet-4-5",
            "gem",
            "gemini-2.5-flash",
            "gemini-2.5-flash-image",
            "gemini-3-flash-preview",
            "gpt-4o-mini",
            "img",
            "oa",
            "tight"
        ])
    );
    assert_eq!(seen["bad_token"], serde_json::json!([401, "invalid_api_key"]));
    assert_eq!(seen["unknown_model"], serde_json::json!([404, "model_not_found"]));
    assert_eq!(seen["quota"], serde_json::json!([429, "QUOTA_EXCEEDED", true]));
    assert_eq!(
        seen["images"],
        serde_json::json!([true, true, [429, "POOL_EXHAUSTED", true]]),
        "{seen}"
    );
    // Tools, streamed tools and structured output on every kind of key.
    for pool in ["oa", "gem", "ant"] {
        let quoted = "Tool results: Sunny in city-1";
        assert_eq!(
            seen["pools"][pool],
            serde_json::json!({
                "tools": ["weather", "tool_calls", quoted],
                "stream_tools": ["weather", "tool_calls", quoted],
                "parsed": {"name": "name-1", "age": 1},
            }),
            "{pool}: {seen}"
        );
    }
    // The client retried nothing: one refusal reached the worker.
    let metrics = http()
        .get(format!("{}/metrics", w.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .unwrap_or_default();
    assert!(
        metrics.contains(r#"keypool_worker_refusals_total{pool="tight",reason="QUOTA_EXCEEDED"} 1"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_official_anthropic_python_sdk_works_on_every_provider() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('oa');
             SELECT keypool_add_key('oa', 'openai', 'sk-pyant-oa-0000000001', 'gpt-4o-mini', base_url => '{u}/v1');
             SELECT keypool_create_pool('gem');
             SELECT keypool_add_key('gem', 'gemini', 'AIza-pyant-gem-000002', 'gemini-3-flash-preview', base_url => '{u}');
             SELECT keypool_create_pool('ant');
             SELECT keypool_add_key('ant', 'anthropic', 'sk-ant-pyant-0000003', 'claude-sonnet-4-5', base_url => '{u}');",
            u = mock.url
        ),
    )
    .await;
    let w = Worker::start(&conninfo(&db), "python-anthropic", &["--no-queue"]).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/anthropic_client.py");
    let out = Command::new(python())
        .arg(&script)
        .args([w.url.as_str(), TOKEN, "oa", "gem", "ant"])
        .output()
        .expect("run the Anthropic client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the Anthropic client failed:\n{stdout}\n{}\nworker log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.log()
    );
    let seen: Value = serde_json::from_str(stdout.trim()).expect("the script's JSON");
    let quoted = "Tool results: Sunny in city-1";
    for pool in ["oa", "gem", "ant"] {
        let s = &seen[pool];
        assert!(s.get("error").is_none(), "{pool}: {s}");
        assert_eq!(
            s["plain"],
            serde_json::json!(["This is a mock reply", "max_tokens", 5]),
            "{pool}"
        );
        assert_eq!(
            s["stream"],
            serde_json::json!(["This is a mock reply", "max_tokens"]),
            "{pool}"
        );
        assert_eq!(s["tools"], serde_json::json!(["tool_use", "weather", quoted]), "{pool}");
        assert_eq!(
            s["stream_tools"],
            serde_json::json!(["tool_use", "weather", quoted]),
            "{pool}"
        );
        assert!(s["count"].as_i64().is_some_and(|n| n > 0), "{pool}: {s}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn googles_genai_python_sdk_works_on_every_provider() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('oa');
             SELECT keypool_add_key('oa', 'openai', 'sk-pygenai-oa-00000001', 'gpt-4o-mini', base_url => '{u}/v1');
             SELECT keypool_create_pool('gem');
             SELECT keypool_add_key('gem', 'gemini', 'AIza-pygenai-gem-00002', 'gemini-3-flash-preview', base_url => '{u}');
             SELECT keypool_create_pool('ant');
             SELECT keypool_add_key('ant', 'anthropic', 'sk-ant-pygenai-000003', 'claude-sonnet-4-5', base_url => '{u}');",
            u = mock.url
        ),
    )
    .await;
    let w = Worker::start(&conninfo(&db), "python-genai", &["--no-queue"]).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/genai_client.py");
    let out = Command::new(python())
        .arg(&script)
        .args([w.url.as_str(), TOKEN, "oa", "gem", "ant"])
        .output()
        .expect("run the google-genai client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the google-genai client failed:\n{stdout}\n{}\nworker log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.log()
    );
    let seen: Value = serde_json::from_str(stdout.trim()).expect("the script's JSON");
    for pool in ["oa", "gem", "ant"] {
        let s = &seen[pool];
        assert!(s.get("error").is_none(), "{pool}: {s}\nworker log:\n{}", w.log());
        assert_eq!(
            s["plain"],
            serde_json::json!(["This is a mock reply", "MAX_TOKENS"]),
            "{pool}"
        );
        assert_eq!(s["stream"], "This is a mock reply", "{pool}");
        assert_eq!(
            s["tools"],
            serde_json::json!(["weather", "Tool results: Sunny in city-1"]),
            "{pool}"
        );
        assert_eq!(s["json"], serde_json::json!({"name": "name-1"}), "{pool}");
    }
}
