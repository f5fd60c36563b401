//! `GET /metrics`: Prometheus text format.
//!
//! Counted in this worker: provider calls by pool, provider and outcome class (the extension's
//! `keypool_classify` classes, plus `timeout` and `unreachable`), provider latency and HTTP
//! request latency histograms, refusals by pool and reason. Read from the database at scrape
//! time (the same figures for every worker): keys by pool and state, queue depth, pools' daily
//! capacity and use, open alerts, health. A scrape whose database part fails still returns the
//! worker's own counters, with `keypool_database_up 0`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use crate::db::Db;

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// What this worker counted since it started.
#[derive(Default)]
pub struct Metrics {
    /// (pool, provider, outcome) -> calls
    calls: Mutex<BTreeMap<(String, String, String), u64>>,
    /// (pool, provider) -> time until the provider's answer (headers)
    provider_latency: Mutex<BTreeMap<(String, String), Histogram>>,
    /// (pool, reason) -> refusals
    refusals: Mutex<BTreeMap<(String, String), u64>>,
    /// (route, status) -> requests
    http_requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// route -> time until the response (for streams: until the first byte)
    http_latency: Mutex<BTreeMap<String, Histogram>>,
}

/// Requests kept in [`RecentFailures`].
pub const RECENT_FAILURES: usize = 100;

/// The last requests that every attempt failed for, with what each attempt ran into (keys,
/// provider messages). Callers get a generic reason; operators read these through the admin
/// API (`GET /allocation/failures`) and the log.
#[derive(Default)]
pub struct RecentFailures {
    list: Mutex<std::collections::VecDeque<serde_json::Value>>,
}

impl RecentFailures {
    pub fn record(&self, pool: &str, user: &str, attempts: u32, detail: &str) {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut list = lock(&self.list);
        if list.len() >= RECENT_FAILURES {
            list.pop_front();
        }
        list.push_back(serde_json::json!({
            "at_ms": at,
            "pool": pool,
            "user": user,
            "attempts": attempts,
            "detail": detail,
        }));
    }

    /// Newest first.
    pub fn list(&self) -> Vec<serde_json::Value> {
        lock(&self.list).iter().rev().cloned().collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Metrics {
    /// One call to a provider and the class of its outcome.
    pub fn provider_call(&self, pool: &str, provider: &str, outcome: &str, took: Duration) {
        *lock(&self.calls)
            .entry((pool.to_string(), provider.to_string(), outcome.to_string()))
            .or_default() += 1;
        lock(&self.provider_latency)
            .entry((pool.to_string(), provider.to_string()))
            .or_default()
            .observe(took.as_secs_f64());
    }

    /// A reservation the extension refused (QUOTA_EXCEEDED, POOL_EXHAUSTED, NO_KEYS).
    pub fn refusal(&self, pool: &str, reason: &str) {
        *lock(&self.refusals)
            .entry((pool.to_string(), reason.to_string()))
            .or_default() += 1;
    }

    /// One HTTP request to the worker, by route pattern (never the raw path).
    pub fn http_request(&self, route: &str, status: u16, took: Duration) {
        *lock(&self.http_requests)
            .entry((route.to_string(), status))
            .or_default() += 1;
        lock(&self.http_latency)
            .entry(route.to_string())
            .or_default()
            .observe(took.as_secs_f64());
    }

    /// The worker's own counters in the text format.
    pub fn render_own(&self, out: &mut String) {
        header(
            out,
            "keypool_worker_provider_calls_total",
            "counter",
            "Calls to providers by pool, provider and outcome class.",
        );
        for ((pool, provider, outcome), n) in lock(&self.calls).iter() {
            sample(
                out,
                "keypool_worker_provider_calls_total",
                &[("pool", pool), ("provider", provider), ("outcome", outcome)],
                *n as f64,
            );
        }
        header(
            out,
            "keypool_worker_provider_latency_seconds",
            "histogram",
            "Time until a provider answered (headers), by pool and provider.",
        );
        for ((pool, provider), h) in lock(&self.provider_latency).iter() {
            histogram(
                out,
                "keypool_worker_provider_latency_seconds",
                &[("pool", pool), ("provider", provider)],
                h,
            );
        }
        header(
            out,
            "keypool_worker_refusals_total",
            "counter",
            "Reservations the extension refused, by pool and reason.",
        );
        for ((pool, reason), n) in lock(&self.refusals).iter() {
            sample(
                out,
                "keypool_worker_refusals_total",
                &[("pool", pool), ("reason", reason)],
                *n as f64,
            );
        }
        header(
            out,
            "keypool_worker_http_requests_total",
            "counter",
            "HTTP requests to this worker by route and status.",
        );
        for ((route, status), n) in lock(&self.http_requests).iter() {
            sample(
                out,
                "keypool_worker_http_requests_total",
                &[("route", route), ("status", &status.to_string())],
                *n as f64,
            );
        }
        header(
            out,
            "keypool_worker_http_request_duration_seconds",
            "histogram",
            "Time until this worker answered (streams: the first byte), by route.",
        );
        for (route, h) in lock(&self.http_latency).iter() {
            histogram(
                out,
                "keypool_worker_http_request_duration_seconds",
                &[("route", route)],
                h,
            );
        }
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
    format!("{{{}}}", inner.join(","))
}

fn sample(out: &mut String, name: &str, pairs: &[(&str, &str)], value: f64) {
    let _ = writeln!(out, "{name}{} {value}", labels(pairs));
}

fn histogram(out: &mut String, name: &str, pairs: &[(&str, &str)], h: &Histogram) {
    for (bound, n) in BUCKETS.iter().zip(h.counts.iter()) {
        let le = bound.to_string();
        let mut with_le = pairs.to_vec();
        with_le.push(("le", &le));
        sample(out, &format!("{name}_bucket"), &with_le, *n as f64);
    }
    let mut inf = pairs.to_vec();
    inf.push(("le", "+Inf"));
    sample(out, &format!("{name}_bucket"), &inf, h.count as f64);
    sample(out, &format!("{name}_sum"), pairs, h.sum);
    sample(out, &format!("{name}_count"), pairs, h.count as f64);
}

/// The pool-wide figures, read from the database's views.
pub async fn render_database(db: &Db, out: &mut String) {
    match database_figures(db).await {
        Ok(text) => {
            header(
                out,
                "keypool_database_up",
                "gauge",
                "1 when the database part of this scrape succeeded.",
            );
            sample(out, "keypool_database_up", &[], 1.0);
            out.push_str(&text);
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics: cannot read the pool figures (does the worker's role have the ops grants?)");
            header(
                out,
                "keypool_database_up",
                "gauge",
                "1 when the database part of this scrape succeeded.",
            );
            sample(out, "keypool_database_up", &[], 0.0);
        }
    }
}

async fn database_figures(db: &Db) -> Result<String, crate::db::DbError> {
    let client = db.client().await?;
    let mut out = String::new();

    header(
        &mut out,
        "keypool_keys",
        "gauge",
        "Keys by pool and state (active, cooling, disabled).",
    );
    for r in client
        .query(
            "SELECT pool, state, count(*) FROM keypool_keys GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .await?
    {
        let (pool, state, n): (String, String, i64) = (r.get(0), r.get(1), r.get(2));
        sample(
            &mut out,
            "keypool_keys",
            &[("pool", &pool), ("state", &state)],
            n as f64,
        );
    }

    header(
        &mut out,
        "keypool_queue_depth",
        "gauge",
        "Requests in the SQL queue by pool and status (queued, running).",
    );
    for r in client
        .query(
            "SELECT pool, status, requests FROM keypool_queue_depth ORDER BY 1, 2",
            &[],
        )
        .await?
    {
        let (pool, status, n): (String, String, i64) = (r.get(0), r.get(1), r.get(2));
        sample(
            &mut out,
            "keypool_queue_depth",
            &[("pool", &pool), ("status", &status)],
            n as f64,
        );
    }

    let pools = client
        .query(
            "SELECT pool, daily_capacity::bigint, used_today::bigint, active_today::bigint,
                    budget::float8, spent::float8, coalesce(budget_period, '')
               FROM keypool_pool_stats ORDER BY pool",
            &[],
        )
        .await?;
    header(
        &mut out,
        "keypool_pool_daily_capacity",
        "gauge",
        "Requests per day the pool's keys allow (absent when unlimited).",
    );
    for r in &pools {
        if let Some(c) = r.get::<_, Option<i64>>(1) {
            sample(
                &mut out,
                "keypool_pool_daily_capacity",
                &[("pool", &r.get::<_, String>(0))],
                c as f64,
            );
        }
    }
    header(
        &mut out,
        "keypool_pool_used_today",
        "gauge",
        "Requests granted in the pool today.",
    );
    for r in &pools {
        sample(
            &mut out,
            "keypool_pool_used_today",
            &[("pool", &r.get::<_, String>(0))],
            r.get::<_, i64>(2) as f64,
        );
    }
    header(
        &mut out,
        "keypool_pool_active_users_today",
        "gauge",
        "Users who reserved in the pool today.",
    );
    for r in &pools {
        sample(
            &mut out,
            "keypool_pool_active_users_today",
            &[("pool", &r.get::<_, String>(0))],
            r.get::<_, i64>(3) as f64,
        );
    }

    header(
        &mut out,
        "keypool_pool_budget",
        "gauge",
        "The pool's spend budget per period, in the currency of keypool_prices (absent without one).",
    );
    for r in &pools {
        if let Some(b) = r.get::<_, Option<f64>>(4) {
            let (pool, period) = (r.get::<_, String>(0), r.get::<_, String>(6));
            sample(
                &mut out,
                "keypool_pool_budget",
                &[("pool", &pool), ("period", &period)],
                b,
            );
        }
    }
    header(
        &mut out,
        "keypool_pool_spent",
        "gauge",
        "What the pool spent of its budget this period, reservations held included.",
    );
    for r in &pools {
        if let Some(s) = r.get::<_, Option<f64>>(5) {
            let (pool, period) = (r.get::<_, String>(0), r.get::<_, String>(6));
            sample(
                &mut out,
                "keypool_pool_spent",
                &[("pool", &pool), ("period", &period)],
                s,
            );
        }
    }

    header(&mut out, "keypool_alerts", "gauge", "Open alerts by kind and severity.");
    for r in client
        .query(
            "SELECT kind, severity, count(*) FROM keypool_alerts GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .await?
    {
        let (kind, severity, n): (String, String, i64) = (r.get(0), r.get(1), r.get(2));
        sample(
            &mut out,
            "keypool_alerts",
            &[("kind", &kind), ("severity", &severity)],
            n as f64,
        );
    }

    header(
        &mut out,
        "keypool_health",
        "gauge",
        "1 for the current keypool_health status (EXCELLENT, GOOD, DEGRADED, CRITICAL).",
    );
    let health = client.query_one("SELECT status FROM keypool_health", &[]).await?;
    let status: String = health.get(0);
    for s in ["EXCELLENT", "GOOD", "DEGRADED", "CRITICAL"] {
        sample(
            &mut out,
            "keypool_health",
            &[("status", s)],
            if s == status { 1.0 } else { 0.0 },
        );
    }
    Ok(out)
}
