//! Helpers for the worker's integration tests: the mock provider and workers as real processes
//! (the binary cargo built), stopped by PID when dropped, talking to a private cluster.

#![allow(dead_code)]

pub mod browser;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use keypool_tests::TestDb;
use serde_json::{json, Value};

pub const TOKEN: &str = "test-token-0123456789abcdef";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_keypool-worker")
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("HTTP client")
}

fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keypool-worker-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// The mock provider, as its own process.
pub struct Mock {
    child: Child,
    pub url: String,
}

impl Mock {
    pub fn start(args: &[&str]) -> Mock {
        let mut child = Command::new(bin())
            .args(["mock-provider", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mock-provider");
        let stdout = child.stdout.take().expect("mock stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("mock's first line");
        let url = line
            .trim()
            .strip_prefix("mock-provider listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from the mock: {line:?}"))
            .to_string();
        Mock { child, url }
    }

    pub async fn fault(&self, matches: &str, fault: &str, times: Option<u64>, retry_after_s: Option<f64>) {
        let r = http()
            .post(format!("{}/_mock/faults", self.url))
            .json(&json!({"match": matches, "fault": fault, "times": times, "retry_after_s": retry_after_s}))
            .send()
            .await
            .expect("mock fault");
        assert!(r.status().is_success(), "mock refused the fault {fault}");
    }

    /// Any fault, as the control API takes it (e.g. a redirect with its `location`).
    pub async fn fault_json(&self, fault: Value) {
        let r = http()
            .post(format!("{}/_mock/faults", self.url))
            .json(&fault)
            .send()
            .await
            .expect("mock fault");
        assert!(r.status().is_success(), "mock refused the fault {fault}");
    }

    /// Removes every injected fault.
    pub async fn clear_faults(&self) {
        let r = http()
            .delete(format!("{}/_mock/faults", self.url))
            .send()
            .await
            .expect("mock faults");
        assert!(r.status().is_success());
    }

    /// Every answer from now on carries these rate-limit headers (a provider's report of the
    /// key's own limits).
    pub async fn ratelimit_headers(&self, headers: &[(&str, &str)]) {
        let body: serde_json::Map<String, Value> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect();
        let r = http()
            .post(format!("{}/_mock/ratelimit", self.url))
            .json(&body)
            .send()
            .await
            .expect("mock ratelimit");
        assert!(r.status().is_success());
    }

    /// Waits until the mock has received `n` requests (counted when they arrive).
    pub async fn wait_for_requests(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.stats().await["requests"].as_u64().unwrap_or(0);
            if got >= n {
                return;
            }
            assert!(Instant::now() < deadline, "the mock got {got} requests, not {n}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stats(&self) -> Value {
        http()
            .get(format!("{}/_mock/stats", self.url))
            .send()
            .await
            .expect("mock stats")
            .json()
            .await
            .expect("mock stats JSON")
    }

    /// Requests the mock received with this secret.
    pub async fn calls_with(&self, secret: &str) -> u64 {
        self.stats().await["by_key"][keypool_mask::mask(secret)]
            .as_u64()
            .unwrap_or(0)
    }

    pub async fn recent(&self) -> Vec<Value> {
        http()
            .get(format!("{}/_mock/requests", self.url))
            .send()
            .await
            .expect("mock requests")
            .json()
            .await
            .expect("mock requests JSON")
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `keypool-worker serve` process.
pub struct Worker {
    child: Option<Child>,
    pub url: String,
    pub id: String,
    log_path: PathBuf,
}

impl Worker {
    /// Starts a worker against `conninfo` and waits until it serves (HTTP) or consumes the queue.
    pub async fn start(conninfo: &str, id: &str, extra: &[&str]) -> Worker {
        let port = keypool_tests::free_port();
        let log_path = scratch_dir().join(format!("{id}.log"));
        let log = std::fs::File::create(&log_path).expect("worker log file");
        let child = Command::new(bin())
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}"), "--worker-id", id])
            .args(extra)
            .env("KEYPOOL_DATABASE_URL", conninfo)
            .env("KEYPOOL_API_TOKENS", TOKEN)
            .env("KEYPOOL_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start keypool-worker serve");
        let w = Worker {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
            id: id.to_string(),
            log_path,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let http_off = extra.contains(&"--no-http");
        loop {
            let ready = if http_off {
                w.log().contains("queue consumer started")
            } else {
                matches!(http().get(format!("{}/healthz", w.url)).send().await, Ok(r) if r.status().is_success())
            };
            if ready {
                return w;
            }
            assert!(Instant::now() < deadline, "worker {id} did not come up:\n{}", w.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The worker's resident memory, in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("worker status");
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        kb * 1024
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the exit.
    pub async fn terminate(&mut self, within: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("worker is running");
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = c.try_wait().expect("wait for the worker") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("worker did not stop within {within:?} of SIGTERM:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        http()
            .post(format!("{}{path}", self.url))
            .bearer_auth(TOKEN)
            .json(body)
            .send()
            .await
            .expect("request to the worker")
    }

    pub async fn chat(&self, body: Value) -> reqwest::Response {
        self.post("/v1/chat/completions", &body).await
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub async fn exec(db: &TestDb<'_>, sql: &str) {
    db.client.batch_execute(sql).await.unwrap_or_else(|e| {
        panic!(
            "{sql}: {}",
            e.as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_else(|| e.to_string())
        )
    });
}

/// Runs a query and returns its first column of the first row as text.
pub async fn value(db: &TestDb<'_>, sql: &str) -> Option<String> {
    let rows = db
        .client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_string)),
        _ => None,
    })?
}

/// Polls `sql` until it returns `want` (settlements are sent in the background).
pub async fn eventually(db: &TestDb<'_>, sql: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = value(db, sql).await;
        if got.as_deref() == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{sql}: got {got:?}, want {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn conninfo(db: &TestDb<'_>) -> String {
    db.cluster.conninfo(&db.name)
}

pub fn user_message(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}
