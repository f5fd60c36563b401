//! Real client libraries against the worker, on an OpenAI-style, a native Gemini and an
//! Anthropic pool: the official `openai` Node client, the AI SDK (`ai` with `@ai-sdk/openai`,
//! its default Responses provider and `.chat()`, and `@ai-sdk/openai-compatible`) and the
//! Anthropic SDK (`@anthropic-ai/sdk`), pinned in tests/node/package-lock.json and
//! installed by this test (`npm ci`) when they are not yet; plain, streamed, multi-step tools
//! with `stopWhen`, streamed tools, `generateObject`, and seed 000's agent service, including a
//! user past their share (and the same user through the Anthropic SDK); `images.generate` on an
//! OpenAI-style and a Gemini image pool.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use keypool_tests::shared;
use serde_json::{json, Value};

/// tests/node with its packages installed as package-lock.json pins them.
fn node_clients() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/node");
    let lock = std::fs::read(dir.join("package-lock.json")).expect("tests/node/package-lock.json");
    let stamp = dir.join("node_modules/.installed-lock");
    if std::fs::read(&stamp).ok().as_deref() != Some(lock.as_slice()) {
        let out = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .output()
            .expect("run npm ci (Node.js and npm are needed for this test)");
        assert!(
            out.status.success(),
            "npm ci failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(&stamp, &lock).expect("write the install stamp");
    }
    dir
}

fn run_clients(dir: &Path, url: &str, pools: &[&str], quota: (&str, &str)) -> Value {
    let out = Command::new("node")
        .arg(dir.join("clients.mjs"))
        .arg(url)
        .arg(TOKEN)
        .args(pools)
        .env("KEYPOOL_QUOTA_POOL", quota.0)
        .env("KEYPOOL_QUOTA_USER", quota.1)
        .env("KEYPOOL_IMAGE_POOLS", "oimg,gimg")
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the clients failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openai_node_client_and_the_ai_sdk_work_on_every_provider() {
    let dir = node_clients();
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('oa');
             SELECT keypool_add_key('oa', 'openai', 'sk-clients-openai-00001', 'gpt-4o-mini', base_url => '{u}/v1');
             SELECT keypool_create_pool('gem');
             SELECT keypool_add_key('gem', 'gemini', 'AIza-clients-gemini-0001', 'gemini-3-flash-preview', base_url => '{u}');
             SELECT keypool_create_pool('ant');
             SELECT keypool_add_key('ant', 'anthropic', 'sk-ant-clients-000001', 'claude-sonnet-4-5', base_url => '{u}');
             SELECT keypool_create_pool('tight');
             SELECT keypool_add_key('tight', 'gemini', 'AIza-clients-tight-00001', 'gemini-2.5-flash', rpd => 4, base_url => '{u}');
             SELECT keypool_assign('seed000-tight', 'tight'), keypool_assign('someone-else', 'tight');
             SELECT keypool_create_pool('oimg');
             SELECT keypool_add_key('oimg', 'openai', 'sk-clients-images-7731', 'gpt-image-1', base_url => '{u}/v1');
             SELECT keypool_create_pool('gimg');
             SELECT keypool_add_key('gimg', 'gemini', 'AIza-clients-images-8842', 'gemini-2.5-flash-image', base_url => '{u}');",
            u = mock.url
        ),
    )
    .await;
    let w = Worker::start(&conninfo(&db), "clients", &["--no-queue"]).await;
    let pools = ["oa", "gem", "ant"];
    let seen = run_clients(&dir, &w.url, &pools, ("tight", "seed000-tight"));

    let reply = "This is a mock reply";
    let quoted = "Tool results: Sunny in city-1";
    let whole = "This is a mock reply from the pg_keypool mock provider, with words";
    for pool in pools {
        let s = &seen[pool];
        let case = |name: &str| {
            let c = &s[name];
            assert!(c.get("error").is_none(), "{pool} {name}: {c}\nworker log:\n{}", w.log());
            c.clone()
        };
        assert_eq!(
            case("openai_plain"),
            json!({"content": reply, "finish": "length", "usage": [1, 5]}),
            "{pool}"
        );
        assert_eq!(
            case("openai_stream"),
            json!({"content": reply, "finish": "length", "usage": [1, 5]}),
            "{pool}"
        );
        for name in ["openai_tools", "openai_stream_tools"] {
            assert_eq!(
                case(name),
                json!({"called": "weather", "finish": "tool_calls", "content": quoted}),
                "{pool} {name}"
            );
        }
        assert_eq!(case("aisdk_text")["text"], reply, "{pool}");
        assert_eq!(case("aisdk_text")["finish"], "length", "{pool}");
        assert_eq!(
            case("aisdk_stream"),
            json!({"text": reply, "finish": "length"}),
            "{pool}"
        );
        assert_eq!(
            case("aisdk_tools"),
            json!({"steps": 2, "text": quoted, "calls": [["weather", {"city": "city-1"}]]}),
            "{pool}"
        );
        for name in ["aisdk_stream_tools", "compat_tools", "compat_stream_tools"] {
            assert_eq!(case(name), json!({"steps": 2, "text": quoted}), "{pool} {name}");
        }
        for name in ["aisdk_object", "compat_object"] {
            assert_eq!(
                case(name),
                json!({"object": {"name": "name-1", "age": 1}}),
                "{pool} {name}"
            );
        }
        assert_eq!(case("seed000_agent"), json!({"message": quoted, "steps": 2}), "{pool}");
        assert_eq!(case("responses_text")["text"], reply, "{pool}");
        assert_eq!(case("responses_text")["finish"], "length", "{pool}");
        for name in ["responses_tools", "responses_stream_tools"] {
            assert_eq!(case(name), json!({"steps": 2, "text": quoted}), "{pool} {name}");
        }
        assert_eq!(
            case("responses_object"),
            json!({"object": {"name": "name-1", "age": 1}}),
            "{pool}"
        );
        assert_eq!(
            case("openai_responses"),
            json!({"text": reply, "status": "incomplete"}),
            "{pool}"
        );
        assert_eq!(
            case("openai_responses_stream"),
            json!({"text": whole, "deltas": whole, "status": "completed"}),
            "{pool}"
        );
        assert_eq!(
            case("anthropic_plain"),
            json!({"text": reply, "stop": "max_tokens", "usage": [1, 5]}),
            "{pool}"
        );
        assert_eq!(
            case("anthropic_stream"),
            json!({"text": reply, "deltas": reply, "stop": "max_tokens"}),
            "{pool}"
        );
        for name in ["anthropic_tools", "anthropic_stream_tools"] {
            assert_eq!(
                case(name),
                json!({"stop": "tool_use", "called": "weather", "text": quoted}),
                "{pool} {name}"
            );
        }
        // Anthropic shows its thinking; the others keep theirs to themselves.
        let thought = if pool == "ant" {
            json!("The mock thinks about it.")
        } else {
            Value::Null
        };
        assert_eq!(
            case("compat_reasoning_tools"),
            json!({"steps": 2, "text": quoted, "reasoning": thought}),
            "{pool}"
        );
    }
    // Seed 000's service, for a user whose share of a 4-a-day pool of two members is 2.
    let quota = seen["quota"].as_array().cloned().unwrap_or_default();
    assert_eq!(quota.len(), 3, "{seen}");
    assert!(
        quota[0]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("This is a mock reply")),
        "{quota:?}"
    );
    assert!(
        quota[1]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("This is a mock reply")),
        "{quota:?}"
    );
    let refused = quota[2]["message"].as_str().unwrap_or("");
    assert!(
        refused.starts_with("Daily request limit reached. QUOTA_EXCEEDED"),
        "{quota:?}"
    );
    assert!(
        quota[2]["retryAfter"]
            .as_str()
            .is_some_and(|s| s.parse::<u64>().is_ok()),
        "{quota:?}"
    );
    // The same user through Anthropic's SDK: a RateLimitError of type rate_limit_error, with the wait.
    let limited = &seen["anthropic_quota"];
    assert_eq!(
        (
            limited["class"].clone(),
            limited["status"].clone(),
            limited["type"].clone()
        ),
        (json!("RateLimitError"), json!(429), json!("rate_limit_error")),
        "{limited}"
    );
    assert!(
        limited["retryAfter"].as_str().is_some_and(|s| s.parse::<u64>().is_ok()),
        "{limited}"
    );
    // images.generate on an OpenAI-style and a Gemini image pool: two PNGs each.
    for pool in ["oimg", "gimg"] {
        assert_eq!(
            seen[format!("images_{pool}")],
            json!({"count": 2, "png": true}),
            "{pool}"
        );
    }
    assert_eq!(mock.calls_with("sk-clients-images-7731").await, 2);
    assert_eq!(mock.calls_with("AIza-clients-images-8842").await, 2);
}
