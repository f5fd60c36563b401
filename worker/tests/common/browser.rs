//! Headless Chromium driven over the DevTools protocol: open a page, evaluate JavaScript in it
//! (read what it shows, click its buttons), take a screenshot. The browser is its own process
//! with its own profile directory, stopped by PID when dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub struct Browser {
    child: Child,
    profile: PathBuf,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
}

impl Browser {
    /// Starts `chromium --headless` and opens one blank tab.
    pub async fn launch() -> Browser {
        // A profile of its own per browser: tests of one binary run in parallel, and two
        // browsers sharing a profile directory make the second one exit.
        static LAUNCHED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = LAUNCHED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let profile = std::env::temp_dir().join(format!("keypool-chromium-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).expect("browser profile directory");
        let mut child = Command::new("chromium")
            .args([
                "--headless=new",
                "--no-sandbox", // tests run as root
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1400,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium (Debian package `chromium`; scripts/lib.sh installs it)");
        let stderr = child.stderr.take().expect("chromium stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(url) = line.strip_prefix("DevTools listening on ") {
                        let _ = tx.send(url.trim().to_string());
                        sent = true;
                    }
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("chromium did not print its DevTools address within 30 s");
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("connect to chromium's DevTools socket");
        let mut b = Browser {
            child,
            profile,
            ws,
            session: String::new(),
            next_id: 0,
        };
        let target = b.call("Target.createTarget", json!({"url": "about:blank"})).await;
        let target_id = target["targetId"].as_str().expect("targetId").to_string();
        let attached = b
            .call("Target.attachToTarget", json!({"targetId": target_id, "flatten": true}))
            .await;
        b.session = attached["sessionId"].as_str().expect("sessionId").to_string();
        b.call("Page.enable", json!({})).await;
        b.call("Runtime.enable", json!({})).await;
        b
    }

    /// Sends one DevTools command (to the tab once attached) and returns its result.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .expect("send to chromium");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = tokio::time::timeout(left, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("chromium did not answer {method} within 30 s"))
                .expect("chromium closed the DevTools socket")
                .expect("DevTools socket error");
            let Message::Text(text) = frame else { continue };
            let v: Value = serde_json::from_str(&text).expect("DevTools JSON");
            if v["id"].as_u64() == Some(id) {
                if let Some(e) = v.get("error") {
                    panic!("{method}: {e}");
                }
                return v["result"].clone();
            }
        }
    }

    pub async fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
    }

    /// Evaluates a JavaScript expression in the page (promises awaited) and returns its value.
    pub async fn eval(&mut self, expression: &str) -> Value {
        self.try_eval(expression)
            .await
            .unwrap_or_else(|e| panic!("{expression}: {e}"))
    }

    /// Like `eval`, with the page's exception as the error.
    pub async fn try_eval(&mut self, expression: &str) -> Result<Value, Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        match r.get("exceptionDetails") {
            Some(e) => Err(e.clone()),
            None => Ok(r["result"]["value"].clone()),
        }
    }

    /// Waits until `expression` is truthy in the page.
    pub async fn wait_for(&mut self, expression: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            // Exceptions (the page is still loading) count as "not yet".
            let v = self.try_eval(&format!("!!({expression})")).await;
            if v == Ok(json!(true)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "page never showed: {expression} (last: {v:?})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves a PNG of the viewport.
    pub async fn screenshot(&mut self, path: &Path) {
        let r = self.call("Page.captureScreenshot", json!({"format": "png"})).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .expect("screenshot base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot directory");
        }
        std::fs::write(path, png).expect("write the screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
