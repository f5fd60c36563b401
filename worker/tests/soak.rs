//! Soak under faults (issue 13): three workers on one database, HTTP and queue traffic from many
//! users, the mock injecting 429s with retry-after, 503 bursts, hangs and a 401 key; one worker
//! killed with `kill -9` and started again, PostgreSQL restarted once with `-m immediate` and once
//! with `-m fast`. Then traffic stops and the queue drains.
//!
//! The verdict comes from the mock's own log of calls, each carrying the grant time the workers
//! stamp (`--stamp-grants`): per key, calls in every rolling minute of grant time and per day
//! never exceed its limits; every queued request ends `done` or `failed` (none lost, none
//! stuck); no reservation is open past its lease; the workers' memory stays flat. It prints
//! `over-grants: N  lost: N  stuck: N` and fails when any is above 0.
//!
//! `SOAK_SECONDS` sets the length of the traffic (default 60; `bench/soak.sh` runs 300 and writes
//! the table of figures to `SOAK_REPORT`).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Mock, Worker, TOKEN};
use keypool_tests::{connect, Cluster};
use serde_json::{json, Value};
use tokio::sync::Mutex;

/// The keys: secret, rpm, rpd (0: none). The mock answers the `invalid` one 401 (the key is
/// disabled); faults are injected on the others during the run.
fn keys(seconds: u64) -> Vec<(&'static str, u64, u64)> {
    // bravo's day limit binds within the run; the others' minutes bind all the time.
    let bravo_day = (seconds / 60 * 40).max(60);
    vec![
        ("sk-soak-alpha-key-000000000001", 600, 0),
        ("sk-soak-bravo-key-000000000002", 60, bravo_day),
        ("sk-soak-charlie-key-00000000003", 300, 0),
        ("sk-soak-invalid-key-0000000004", 10, 0),
    ]
}

const USERS: u64 = 500;
const HTTP_CLIENTS: usize = 8;
const WORKERS: usize = 3;
const LEASE_S: u64 = 20;
const MAX_WAIT_S: u64 = 20;
const QUEUE_LEASE_S: u64 = 15;

fn worker_args() -> Vec<String> {
    [
        "--stamp-grants",
        "--provider-timeout",
        "3s",
        "--request-deadline",
        "10s",
        "--queue-lease",
        &format!("{QUEUE_LEASE_S}s"),
        "--queue-poll",
        "1s",
        "--queue-concurrency",
        "8",
        "--shutdown-grace",
        "5s",
        "--heartbeat-interval",
        "2s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

async fn start_worker(conninfo: &str, i: usize) -> Worker {
    let args = worker_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Worker::start(conninfo, &format!("soak-{i}"), &args).await
}

/// Keeps one database connection, reconnecting after server restarts.
struct Session {
    conninfo: String,
    client: Option<tokio_postgres::Client>,
}

impl Session {
    async fn client(&mut self) -> Option<&tokio_postgres::Client> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = connect(&self.conninfo).await.ok();
        }
        self.client.as_ref()
    }
}

#[derive(Default)]
struct Counts {
    /// HTTP answers by status and error code.
    http: BTreeMap<String, u64>,
    http_errors: u64,
    submitted: Vec<i64>,
    submit_errors: u64,
}

/// Calls beyond a limit, from the mock's log: per key, every call whose rolling minute of grant
/// time (the 60 s ending at it) holds more than rpm calls, and per UTC day the calls beyond rpd.
fn over_grants(calls: &[Value], limits: &HashMap<String, (u64, u64)>) -> (u64, Vec<String>) {
    let mut by_key: HashMap<String, Vec<i64>> = HashMap::new();
    let (mut unstamped, mut checks) = (0u64, 0u64);
    for c in calls {
        let Some(key) = c["key"].as_str() else { continue };
        // The worker asks for a key's model list (no reservation) only after the provider
        // answered a call with 401 or 403, to learn whether the key itself is bad.
        if c["path"] == "/v1/models" {
            checks += 1;
            continue;
        }
        match c["granted_at_ms"].as_i64() {
            Some(t) => by_key.entry(key.to_string()).or_default().push(t),
            None => unstamped += 1,
        }
    }
    let mut over = unstamped;
    let mut notes = Vec::new();
    if checks > 0 {
        notes.push(format!("{checks} key checks (model lists after a 401 or 403)"));
    }
    if unstamped > 0 {
        notes.push(format!("{unstamped} calls carried no grant time"));
    }
    for (key, times) in by_key.iter_mut() {
        times.sort_unstable();
        let Some(&(rpm, rpd)) = limits.get(key) else {
            over += times.len() as u64;
            notes.push(format!("{} calls with an unknown key {key}", times.len()));
            continue;
        };
        let mut start = 0;
        let mut worst = 0;
        for i in 0..times.len() {
            while times[start] <= times[i] - 60_000 {
                start += 1;
            }
            let in_window = (i - start + 1) as u64;
            worst = worst.max(in_window);
            if rpm > 0 && in_window > rpm {
                over += 1;
            }
        }
        if rpm > 0 && worst > rpm {
            notes.push(format!("{key}: {worst} calls in one rolling minute (rpm {rpm})"));
        }
        if rpd > 0 {
            let mut per_day: BTreeMap<i64, u64> = BTreeMap::new();
            for t in times.iter() {
                *per_day.entry(t.div_euclid(86_400_000)).or_default() += 1;
            }
            for (day, n) in per_day {
                if n > rpd {
                    over += n - rpd;
                    notes.push(format!("{key}: {n} calls on day {day} (rpd {rpd})"));
                }
            }
        }
    }
    (over, notes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_under_faults() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60)
        .max(20);
    let lease = format!("pg_keypool.lease = '{LEASE_S}s'");
    let cluster = Cluster::start("soak", &[lease.as_str(), "max_connections = 200"]);
    let conninfo = cluster.conninfo("postgres");
    let setup = cluster.connect("postgres").await;
    let log_path = cluster.dir.join("mock-calls.jsonl");
    let mock = Mock::start(&["--latency", "5ms", "--call-log", log_path.to_str().expect("UTF-8 path")]);
    let keys = keys(seconds);
    let mut sql = String::from("CREATE EXTENSION pg_keypool; SELECT keypool_create_pool('soak');");
    for (secret, rpm, rpd) in &keys {
        let rpd = if *rpd > 0 {
            format!(", rpd => {rpd}")
        } else {
            String::new()
        };
        sql.push_str(&format!(
            "SELECT keypool_add_key('soak', 'openai', '{secret}', 'gpt-4o-mini', base_url => '{}/v1', account => '{secret}', rpm => {rpm}{rpd});",
            mock.url
        ));
    }
    setup.batch_execute(&sql).await.expect("set up the pool");
    drop(setup);

    let mut workers: Vec<Worker> = Vec::new();
    for i in 0..WORKERS {
        workers.push(start_worker(&conninfo, i).await);
    }
    let urls: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(workers.iter().map(|w| w.url.clone()).collect()));
    let running = Arc::new(AtomicBool::new(true));
    let counts = Arc::new(Mutex::new(Counts::default()));
    let turn = Arc::new(AtomicU64::new(0));

    // HTTP traffic: many users, round the workers.
    let mut tasks = Vec::new();
    for c in 0..HTTP_CLIENTS {
        let (urls, running, counts, turn) = (urls.clone(), running.clone(), counts.clone(), turn.clone());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("HTTP client");
            let mut n = c as u64;
            while running.load(Ordering::Acquire) {
                n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let user = format!("user-{}", (n >> 33) % USERS);
                let url = {
                    let urls = urls.lock().await;
                    urls[(turn.fetch_add(1, Ordering::Relaxed) as usize) % urls.len()].clone()
                };
                let sent = client
                    .post(format!("{url}/v1/chat/completions"))
                    .bearer_auth(TOKEN)
                    .json(&json!({"model": "soak", "user": user, "max_tokens": 8,
                                  "messages": [{"role": "user", "content": "soak"}]}))
                    .send()
                    .await;
                let answer = match sent {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let body: Value = r.json().await.unwrap_or(Value::Null);
                        Some(match body["error"]["code"].as_str() {
                            Some(code) => format!("{status} {code}"),
                            None => status.to_string(),
                        })
                    }
                    Err(_) => None,
                };
                let mut counts = counts.lock().await;
                match answer {
                    Some(a) => *counts.http.entry(a).or_default() += 1,
                    None => counts.http_errors += 1,
                }
                drop(counts);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    // Queue traffic: submissions through SQL, reconnecting after restarts.
    {
        let (running, counts, conninfo) = (running.clone(), counts.clone(), conninfo.clone());
        tasks.push(tokio::spawn(async move {
            let mut session = Session { conninfo, client: None };
            let mut i = 0u64;
            while running.load(Ordering::Acquire) {
                i += 1;
                let user = format!("user-{}", (i * 7919) % USERS);
                let submitted = match session.client().await {
                    Some(c) => c
                        .query_one(
                            &format!(
                                "SELECT keypool_submit($1, 'soak', $2::text::jsonb, max_wait => '{MAX_WAIT_S} seconds')"
                            ),
                            &[
                                &user,
                                &r#"{"messages": [{"role": "user", "content": "queued soak"}], "max_tokens": 8}"#,
                            ],
                        )
                        .await
                        .ok()
                        .map(|r| r.get::<_, i64>(0)),
                    None => None,
                };
                let mut counts = counts.lock().await;
                match submitted {
                    Some(id) => counts.submitted.push(id),
                    None => counts.submit_errors += 1,
                }
                drop(counts);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
    }

    // SOAK_TRACE=1: the keys' state every 5 s, to see where capacity goes.
    if std::env::var_os("SOAK_TRACE").is_some() {
        let (running, conninfo) = (running.clone(), conninfo.clone());
        tasks.push(tokio::spawn(async move {
            let mut session = Session { conninfo, client: None };
            while running.load(Ordering::Acquire) {
                if let Some(c) = session.client().await {
                    if let Ok(rows) = c
                        .query(
                            "SELECT k.label || ' ' || k.state || coalesce(' (' || k.reason || ')', '') || ' minute '
                                    || s.requests_this_minute || ' today ' || s.requests_today
                               FROM keypool_keys k JOIN keypool_scopes s USING (scope_id) ORDER BY k.key_id",
                            &[],
                        )
                        .await
                    {
                        let line: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                        println!("trace: {}", line.join(" | "));
                    }
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }));
    }

    // The faults, at fixed points of the run.
    let started = Instant::now();
    let at = |fraction: f64| started + Duration::from_secs_f64(seconds as f64 * fraction);
    let until = |t: Instant| tokio::time::sleep_until(tokio::time::Instant::from_std(t));
    until(at(0.1)).await;
    let rss_before: Vec<u64> = workers.iter().map(Worker::rss).collect();
    until(at(0.2)).await;
    // Enough to open every usable key's circuit breaker once (5 in a row each); the breakers'
    // trials close them again 30 s later.
    mock.fault("*", "503", Some(15), None).await;
    until(at(0.25)).await;
    workers[1].kill9();
    workers[1] = start_worker(&conninfo, 1).await;
    urls.lock().await[1] = workers[1].url.clone();
    until(at(0.35)).await;
    mock.fault("charlie", "429", Some(10), Some(2.0)).await;
    mock.fault("alpha", "hang", Some(3), None).await;
    until(at(0.5)).await;
    cluster.restart_immediately();
    until(at(0.75)).await;
    cluster.restart();
    until(at(1.0)).await;
    running.store(false, Ordering::Release);
    for t in tasks {
        let _ = t.await;
    }
    let traffic_ended = Instant::now();

    // The queue drains: every request ends within its max_wait plus a lease.
    let db = cluster.wait_ready("postgres").await;
    let drain_deadline = traffic_ended + Duration::from_secs(MAX_WAIT_S + QUEUE_LEASE_S + 30);
    let mut pending: i64;
    loop {
        pending = db
            .query_one(
                "SELECT count(*) FROM keypool.request WHERE status NOT IN ('done', 'failed')",
                &[],
            )
            .await
            .expect("pending requests")
            .get(0);
        if pending == 0 || Instant::now() > drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rss_after: Vec<u64> = workers.iter().map(Worker::rss).collect();
    for w in workers.iter_mut() {
        w.terminate(Duration::from_secs(30)).await;
    }
    // Reservations the killed worker held expire with their lease; nothing stays open past it.
    let lease_deadline = Instant::now() + Duration::from_secs(LEASE_S + 5);
    let mut open: i64;
    loop {
        open = db
            .query_one("SELECT reservations_open FROM keypool_status()", &[])
            .await
            .expect("keypool_status")
            .get(0);
        if open == 0 || Instant::now() > lease_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let counts = counts.lock().await;
    let ids = counts.submitted.clone();
    let found: i64 = db
        .query_one("SELECT count(*) FROM keypool.request WHERE id = ANY($1)", &[&ids])
        .await
        .expect("submitted requests")
        .get(0);
    let lost = ids.len() as i64 - found;
    let by_status: Vec<(String, i64)> = db
        .query(
            "SELECT status || coalesce(' (' || split_part(split_part(error, ';', 1), ' (', 1) || ')', ''), count(*)
               FROM keypool.request GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .expect("requests by status")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let disabled: Vec<String> = db
        .query(
            "SELECT label FROM keypool_keys WHERE state = 'disabled' ORDER BY key_id",
            &[],
        )
        .await
        .expect("disabled keys")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let stuck = pending + open;

    let calls: Vec<Value> = std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let limits: HashMap<String, (u64, u64)> = keys
        .iter()
        .map(|(s, rpm, rpd)| (keypool_mask::mask(s), (*rpm, *rpd)))
        .collect();
    let (over, notes) = over_grants(&calls, &limits);
    let mut per_key: BTreeMap<String, u64> = BTreeMap::new();
    for c in &calls {
        *per_key.entry(c["key"].as_str().unwrap_or("?").to_string()).or_default() += 1;
    }
    let growth: Vec<i64> = rss_before
        .iter()
        .zip(&rss_after)
        .map(|(b, a)| *a as i64 - *b as i64)
        .collect();

    let summary = format!("over-grants: {over}  lost: {lost}  stuck: {stuck}");
    let mut report = String::new();
    report.push_str(&format!(
        "Soak of {seconds} s: {WORKERS} workers, {HTTP_CLIENTS} HTTP clients and one SQL queue producer, {USERS} users; \
         worker 1 killed (-9) and started again at 25 %, PostgreSQL restarted -m immediate at 50 % and -m fast at 75 %; \
         503 burst (15: every breaker opens) at 20 %, 10 × 429 (retry-after 2 s) and 3 hangs at 35 %.\n\n"
    ));
    report.push_str("| figure | value |\n|---|---:|\n");
    report.push_str(&format!("| provider calls (mock's log) | {} |\n", calls.len()));
    for (k, n) in &per_key {
        let (rpm, rpd) = limits.get(k).copied().unwrap_or((0, 0));
        report.push_str(&format!("| calls with {k} (rpm {rpm}, rpd {rpd}) | {n} |\n"));
    }
    for (status, n) in &counts.http {
        report.push_str(&format!("| HTTP answers {status} | {n} |\n"));
    }
    report.push_str(&format!(
        "| HTTP requests without an answer (server restarting) | {} |\n",
        counts.http_errors
    ));
    report.push_str(&format!(
        "| queue submissions (refused while the server restarted) | {} ({}) |\n",
        counts.submitted.len(),
        counts.submit_errors
    ));
    for (status, n) in &by_status {
        report.push_str(&format!("| queued requests {status} | {n} |\n"));
    }
    report.push_str(&format!("| keys disabled | {} |\n", disabled.join(", ")));
    report.push_str(&format!(
        "| reservations open after one lease ({LEASE_S} s) | {open} |\n| worker memory growth (KiB) | {} |\n",
        growth
            .iter()
            .map(|g| (g / 1024).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    report.push_str(&format!("\n`{summary}`\n"));
    for n in &notes {
        report.push_str(&format!("- {n}\n"));
    }
    println!("{report}");
    if let Ok(path) = std::env::var("SOAK_REPORT") {
        std::fs::write(&path, &report).expect("write the soak report");
    }
    println!("{summary}");
    assert!(!calls.is_empty(), "the mock logged no calls");
    assert!(
        disabled.iter().any(|l| l.contains("0004")),
        "the 401 key was not disabled: {disabled:?}"
    );
    assert!(
        growth.iter().all(|g| *g < 64 << 20),
        "a worker's memory grew by {growth:?} bytes"
    );
    assert_eq!((over, lost, stuck), (0, 0, 0), "{summary}\n{notes:?}");
}
