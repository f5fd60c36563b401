//! The worker's side of pg_keypool's SQL API: a connection pool, `keypool_reserve`,
//! `keypool_settle` (at once when the worker needs the outcome class, batched in the background
//! when it does not), `keypool_release`, and the check that the database has the extension
//! version this worker was built with.

pub mod tls;

use std::time::{Duration, SystemTime};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::config::DbArgs;
use crate::protocol::openai::Usage;
use crate::providers::counters::Counters;
use crate::providers::KeyRef;

/// The pg_keypool version this worker speaks to.
pub const EXPECTED_EXTENSION_VERSION: &str = env!("CARGO_PKG_VERSION");

/// An error from the database, with its SQLSTATE when the server sent one.
#[derive(Debug, Clone)]
pub struct DbError {
    pub sqlstate: Option<String>,
    pub message: String,
    pub hint: Option<String>,
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.message)?;
        if let Some(code) = &self.sqlstate {
            write!(f, " (SQLSTATE {code})")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for DbError {}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> DbError {
        match e.as_db_error() {
            Some(d) => DbError {
                sqlstate: Some(d.code().code().to_string()),
                message: d.message().to_string(),
                hint: d.hint().map(str::to_string),
            },
            None => {
                // tokio-postgres names the kind of failure; its causes say what happened.
                let mut message = format!("database connection: {e}");
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    message.push_str(&format!(": {s}"));
                    source = s.source();
                }
                DbError {
                    sqlstate: None,
                    message,
                    hint: None,
                }
            }
        }
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> DbError {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => DbError {
                sqlstate: None,
                message: format!("database pool: {other}"),
                hint: None,
            },
        }
    }
}

impl DbError {
    /// The pool (or another named object) does not exist.
    pub fn is_undefined(&self) -> bool {
        self.sqlstate.as_deref() == Some("42704")
    }

    /// The caller passed something the database refused (22xxx: data exceptions).
    pub fn is_invalid_input(&self) -> bool {
        self.sqlstate.as_deref().is_some_and(|c| c.starts_with("22"))
    }
}

/// A user's share of the pool today, as a reservation reports it.
#[derive(Clone, Debug, Default)]
pub struct Allocation {
    pub remaining_today: Option<i64>,
    pub allocated_today: Option<i64>,
    pub warning_level: Option<String>,
    /// Requests the caller may still make this minute, when their pool or token limits it.
    pub minute_remaining: Option<i64>,
}

#[derive(Debug)]
pub struct Grant {
    pub reservation_id: i64,
    /// When the extension charged the key's windows (Unix milliseconds).
    pub granted_at_ms: i64,
    /// The pool that served: the one asked, or one of its fallback chain.
    pub pool: String,
    pub key: KeyRef,
    pub allocation: Allocation,
    /// A spend budget holds the reservation's estimate: the call must not generate more.
    pub budgeted: bool,
}

#[derive(Clone, Debug)]
pub struct Refusal {
    /// QUOTA_EXCEEDED, BUDGET_EXCEEDED, POOL_EXHAUSTED or NO_KEYS.
    pub code: String,
    pub retry_after_ms: Option<i64>,
    pub allocation: Allocation,
}

#[derive(Debug)]
pub enum Reserved {
    Granted(Grant),
    Refused(Refusal),
}

/// What a provider call did, for `keypool_settle`.
#[derive(Clone, Debug)]
pub struct Settlement {
    pub reservation_id: i64,
    /// HTTP status; 0 when no answer came.
    pub status: i32,
    pub usage: Usage,
    pub retry_after_ms: Option<i64>,
    pub error_code: Option<String>,
    /// What the provider's answer said of the key's own limits (providers/counters.rs).
    pub counters: Counters,
}

enum SettleMsg {
    Settle(Settlement),
    Flush(oneshot::Sender<()>),
}

const RESERVE: &str = "SELECT granted, reservation_id, key_id, provider, model, base_url, secret, error, \
                       retry_after_ms, key_label, remaining_today, allocated_today, warning_level, \
                       (extract(epoch FROM granted_at) * 1000)::bigint, pool, budget_held IS NOT NULL, \
                       minute_remaining \
                       FROM keypool_reserve($1, $2, $3, $4)";
/// The same for a caller with an API token: the token's limits apply too (it is named by its
/// SHA-256, as when it was authenticated).
const RESERVE_AS_TOKEN: &str = "SELECT granted, reservation_id, key_id, provider, model, base_url, secret, error, \
                       retry_after_ms, key_label, remaining_today, allocated_today, warning_level, \
                       (extract(epoch FROM granted_at) * 1000)::bigint, pool, budget_held IS NOT NULL, \
                       minute_remaining \
                       FROM keypool_reserve($1, $2, $3, $4, $5)";
const SETTLE: &str = "SELECT keypool_settle($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";
const SETTLE_MANY: &str = "SELECT keypool_settle(r, s, p, c, ra, e, rr, rrs, rt, rts) \
                           FROM unnest($1::bigint[], $2::int[], $3::bigint[], $4::bigint[], $5::bigint[], $6::text[], \
                                       $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[]) \
                           AS t(r, s, p, c, ra, e, rr, rrs, rt, rts)";
const RELEASE: &str = "SELECT keypool_release($1)";
/// Tokens are looked up by their SHA-256: a bind parameter may reach the server log.
const AUTHENTICATE: &str = "SELECT token_id, user_id, pools, expires_at FROM keypool_authenticate_api_token_sha256($1)";
/// Settlements waiting for the background settler at most; beyond, senders wait for room
/// (back-pressure: nothing is dropped).
const SETTLE_QUEUE: usize = 4096;
/// Most settlements sent in one statement.
const SETTLE_BATCH: usize = 256;

#[derive(Clone)]
pub struct Db {
    pool: Pool,
    config: tokio_postgres::Config,
    /// TLS as the connection string's sslmode asks (pgtls.rs), for connections outside the pool.
    tls: crate::db::tls::Tls,
    settles: mpsc::Sender<SettleMsg>,
}

/// Where the worker connects, without the password.
pub fn describe(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "database {} on {}:{} as {}",
        config.get_dbname().unwrap_or("(default)"),
        hosts.join(","),
        port,
        config.get_user().unwrap_or("(default)")
    )
}

impl Db {
    /// Connects, checks the extension, and starts the background settler.
    pub async fn connect(args: &DbArgs) -> anyhow::Result<Db> {
        let (mut config, tls, ssl_mode) =
            crate::db::tls::configure(&args.database_url).map_err(|e| anyhow::anyhow!(e))?;
        if config.get_application_name().is_none() {
            config.application_name("keypool-worker");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(args.db_pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(15)))
            .build()
            .map_err(|e| anyhow::anyhow!("cannot set up the database pool: {e}"))?;
        let (tx, rx) = mpsc::channel(SETTLE_QUEUE);
        let db = Db {
            pool,
            config,
            tls,
            settles: tx,
        };
        let client = db.client().await.map_err(|e| {
            let mut message = format!("cannot connect to the {}: {e}", describe(&db.config));
            if e.message.contains("TLS") || e.message.contains("certificate") {
                message.push_str(&format!(
                    " (sslmode={}: verify-ca checks that the server's certificate chains to sslrootcert, \
                     verify-full also that it names the host)",
                    crate::db::tls::mode_name(ssl_mode)
                ));
            }
            anyhow::anyhow!(message)
        })?;
        check_extension(&client, &db.config).await?;
        warn_if_parameters_are_logged(&client).await;
        drop(client);
        tokio::spawn(settler(db.pool.clone(), rx));
        Ok(db)
    }

    /// A connection of its own (LISTEN), made as the pool's are.
    pub async fn dedicated(
        &self,
    ) -> Result<(tokio_postgres::Client, crate::db::tls::Connection), tokio_postgres::Error> {
        self.config.connect(self.tls.clone()).await
    }

    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    pub async fn client(&self) -> Result<Object, DbError> {
        Ok(self.pool.get().await?)
    }

    /// Reserves in `pool` or down its fallback chain; `reach` says which pools the caller may
    /// reach and which API token's limits the request counts against.
    pub async fn reserve(&self, user: &str, pool: &str, est_tokens: i64, reach: &Reach) -> Result<Reserved, DbError> {
        let client = self.client().await?;
        let within = reach.pools.as_deref();
        let row = match &reach.token_sha256 {
            Some(digest) => {
                let stmt = client.prepare_cached(RESERVE_AS_TOKEN).await?;
                let digest: &[u8] = digest;
                client
                    .query_one(&stmt, &[&user, &pool, &est_tokens, &within, &digest])
                    .await?
            }
            None => {
                let stmt = client.prepare_cached(RESERVE).await?;
                client.query_one(&stmt, &[&user, &pool, &est_tokens, &within]).await?
            }
        };
        let allocation = Allocation {
            remaining_today: row.get(10),
            allocated_today: row.get(11),
            warning_level: row.get(12),
            minute_remaining: row.get(16),
        };
        let granted: Option<bool> = row.get(0);
        if granted == Some(true) {
            let reservation_id: Option<i64> = row.get(1);
            let key_id: Option<i64> = row.get(2);
            let (Some(reservation_id), Some(key_id)) = (reservation_id, key_id) else {
                return Err(DbError {
                    sqlstate: None,
                    message: "keypool_reserve granted without a reservation or key id".into(),
                    hint: None,
                });
            };
            Ok(Reserved::Granted(Grant {
                reservation_id,
                granted_at_ms: row.get::<_, Option<i64>>(13).unwrap_or(0),
                pool: row.get::<_, Option<String>>(14).unwrap_or_else(|| pool.to_string()),
                key: KeyRef {
                    id: key_id,
                    provider: row.get::<_, Option<String>>(3).unwrap_or_default(),
                    model: row.get(4),
                    base_url: row.get::<_, Option<String>>(5).unwrap_or_default(),
                    secret: row.get::<_, Option<String>>(6).unwrap_or_default(),
                    label: row.get::<_, Option<String>>(9).unwrap_or_default(),
                },
                allocation,
                budgeted: row.get::<_, Option<bool>>(15).unwrap_or(false),
            }))
        } else {
            Ok(Reserved::Refused(Refusal {
                code: row.get::<_, Option<String>>(7).unwrap_or_else(|| "REFUSED".into()),
                retry_after_ms: row.get(8),
                allocation,
            }))
        }
    }

    /// Settles now and returns the outcome class (`success`, `rate_limited`, `key_invalid` ...).
    pub async fn settle(&self, s: &Settlement) -> Result<String, DbError> {
        let client = self.client().await?;
        Ok(settle_on(&client, s).await?.get(0))
    }

    /// Settles in the background, batched with other settlements; for answers whose outcome
    /// the worker does not need (successes). Waits while the settler's queue is full.
    pub async fn settle_later(&self, s: Settlement) {
        if let Err(mpsc::error::SendError(SettleMsg::Settle(s))) = self.settles.send(SettleMsg::Settle(s)).await {
            warn!(
                reservation = s.reservation_id,
                "settler stopped; reservation stays open until its lease"
            );
        }
    }

    /// [`Db::settle_later`] from where nothing can wait (a request dropped mid-call): queued
    /// at once when there is room, else by a task that waits for it.
    pub fn settle_soon(&self, s: Settlement) {
        match self.settles.try_send(SettleMsg::Settle(s)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(SettleMsg::Settle(s))) => {
                let db = self.clone();
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        rt.spawn(async move { db.settle_later(s).await });
                    }
                    Err(_) => warn!(
                        reservation = s.reservation_id,
                        "no runtime to settle; reservation stays open until its lease"
                    ),
                }
            }
            Err(mpsc::error::TrySendError::Full(_)) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => {
                warn!("settler stopped; a reservation stays open until its lease")
            }
        }
    }

    /// Waits until every settlement handed to [`Db::settle_later`] so far has been sent.
    pub async fn flush_settlements(&self) {
        let (tx, rx) = oneshot::channel();
        if self.settles.send(SettleMsg::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// What a database API token allows, if it is valid, asked by the token's SHA-256
    /// (`keypool_authenticate_api_token_sha256`): the token itself never leaves the worker.
    pub async fn authenticate_token(&self, token_sha256: &[u8; 32]) -> Result<Option<TokenGrant>, DbError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(AUTHENTICATE).await?;
        let digest: &[u8] = token_sha256;
        let row = client.query_opt(&stmt, &[&digest]).await?;
        Ok(row.map(|r| TokenGrant {
            id: r.get(0),
            user: r.get(1),
            pools: r.get(2),
            expires_at: r.get(3),
            sha256: *token_sha256,
        }))
    }

    /// Keys a provider disabled whose check is due (gateway/recheck.rs), claimed for this
    /// worker, with how many checks already said no.
    pub async fn recheck_due(&self, after: Duration, max_n: i32) -> Result<Vec<(KeyRef, i32)>, DbError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT key_id, provider, model, base_url, secret, rechecks
                   FROM keypool_recheck_due($1::bigint * interval '1 millisecond', $2)",
            )
            .await?;
        let after_ms = after.as_millis().min(i64::MAX as u128) as i64;
        let rows = client.query(&stmt, &[&after_ms, &max_n]).await?;
        Ok(rows
            .iter()
            .map(|r| {
                let id: i64 = r.get(0);
                let key = KeyRef {
                    id,
                    provider: r.get(1),
                    model: r.get(2),
                    base_url: r.get(3),
                    secret: r.get::<_, Option<String>>(4).unwrap_or_default(),
                    label: format!("key {id}"),
                };
                (key, r.get(5))
            })
            .collect())
    }

    /// Records a recheck: accepted enables the key again; otherwise it is checked after `next`.
    pub async fn recheck_result(
        &self,
        key_id: i64,
        accepted: bool,
        detail: &str,
        next: Duration,
    ) -> Result<(), DbError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("SELECT keypool_recheck_result($1, $2, $3, $4::bigint * interval '1 millisecond')")
            .await?;
        let next_ms = next.as_millis().min(i64::MAX as u128) as i64;
        client.execute(&stmt, &[&key_id, &accepted, &detail, &next_ms]).await?;
        Ok(())
    }

    /// `secret` sealed to the database for `context` (keypool-transport): what the worker
    /// passes to `keypool_add_key` and `keypool_rotate_secret` in its place, so that no
    /// statement log holds a provider secret. The transport key is read each time (it changes
    /// with a master key rotation; adding keys is rare).
    pub async fn seal_secret(&self, secret: &str, context: &[u8]) -> Result<String, DbError> {
        let client = self.client().await?;
        seal_with(&client, secret, context).await
    }

    /// Gives back a reservation whose call was never sent.
    pub async fn release(&self, reservation_id: i64) -> Result<(), DbError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(RELEASE).await?;
        client.execute(&stmt, &[&reservation_id]).await?;
        Ok(())
    }
}

/// [`Db::seal_secret`] on a connection of the caller's (a transaction, a one-off connection).
pub async fn seal_with(
    client: &impl deadpool_postgres::GenericClient,
    secret: &str,
    context: &[u8],
) -> Result<String, DbError> {
    let row = client.query_one("SELECT keypool_transport_key()", &[]).await?;
    let bytes: Vec<u8> = row.get(0);
    let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| DbError {
        sqlstate: None,
        message: "keypool_transport_key() did not answer with 32 bytes".into(),
        hint: None,
    })?;
    let mut random = [0u8; 56];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut random);
    Ok(keypool_transport::seal(&key, secret, context, random))
}

async fn check_extension(client: &Object, config: &tokio_postgres::Config) -> anyhow::Result<()> {
    let row = client
        .query_opt("SELECT extversion FROM pg_extension WHERE extname = 'pg_keypool'", &[])
        .await
        .map_err(DbError::from)?;
    let Some(row) = row else {
        anyhow::bail!(
            "pg_keypool is not installed in the {}: run CREATE EXTENSION pg_keypool there \
             (the server must have shared_preload_libraries = 'pg_keypool')",
            describe(config)
        );
    };
    let version: String = row.get(0);
    if version != EXPECTED_EXTENSION_VERSION {
        warn!(
            database_version = %version,
            worker_version = EXPECTED_EXTENSION_VERSION,
            "the database has pg_keypool {version} but this worker was built for {EXPECTED_EXTENSION_VERSION}; \
             upgrade one of them (ALTER EXTENSION pg_keypool UPDATE, or a matching worker)"
        );
    }
    Ok(())
}

/// Warns when this role's settings make the server log bind parameters: provider secrets pass
/// through the worker's statements as parameters (the keys routes, `import-env`, `validate`).
async fn warn_if_parameters_are_logged(client: &Object) {
    let Ok(row) = client
        .query_one(
            "SELECT current_setting('log_parameter_max_length')::int, current_setting('log_statement'),
                    current_setting('log_min_duration_statement')::int,
                    current_setting('log_parameter_max_length_on_error')::int, current_user::text",
            &[],
        )
        .await
    else {
        return;
    };
    let (max_length, statement, min_duration, on_error, role): (i32, String, i32, i32, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    if parameters_are_logged(max_length, &statement, min_duration, on_error) {
        warn!(
            role = %role,
            log_parameter_max_length = max_length,
            log_statement = %statement,
            log_min_duration_statement = min_duration,
            log_parameter_max_length_on_error = on_error,
            "the server logs this role's bind parameters, and provider secrets pass through them \
             (adding or rotating keys): ALTER ROLE {role} SET log_parameter_max_length = 0 (and \
             log_parameter_max_length_on_error = 0), as a superuser"
        );
    }
}

/// Whether statements with their parameters reach the log under these settings: every
/// statement (`log_statement = 'all'`) or slow ones (`log_min_duration_statement`) with
/// `log_parameter_max_length` not 0, or failing ones with `log_parameter_max_length_on_error`
/// not 0. (`mod` and `ddl` do not log the worker's SELECTs; `log_duration` logs no text.)
pub fn parameters_are_logged(max_length: i32, log_statement: &str, min_duration_ms: i32, on_error: i32) -> bool {
    (max_length != 0 && (log_statement == "all" || min_duration_ms >= 0)) || on_error != 0
}

/// Sends settlements in batches: whatever queued up while the previous batch was in flight
/// goes in the next statement.
async fn settler(pool: Pool, mut rx: mpsc::Receiver<SettleMsg>) {
    let mut batch: Vec<Settlement> = Vec::with_capacity(SETTLE_BATCH);
    let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                SettleMsg::Settle(s) => batch.push(s),
                SettleMsg::Flush(done) => flushes.push(done),
            }
            if batch.len() >= SETTLE_BATCH {
                break;
            }
            next = rx.try_recv().ok();
        }
        if !batch.is_empty() {
            send_batch(&pool, &batch).await;
            batch.clear();
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

async fn send_batch(pool: &Pool, batch: &[Settlement]) {
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=5 {
        match try_batch(pool, batch).await {
            Ok(()) => return,
            // One settlement the server refused (say, a reservation that expired): the others
            // before it went through; settle one by one so that each error is reported alone.
            Err(e) if e.sqlstate.is_some() => {
                debug!(error = %e, "batched settle failed; settling one by one");
                for s in batch {
                    if let Err(e) = settle_one(pool, s).await {
                        if e.sqlstate.as_deref() == Some("55000") && e.message.contains("already settled") {
                            continue;
                        }
                        warn!(reservation = s.reservation_id, error = %e, "settle failed");
                    }
                }
                return;
            }
            Err(e) => {
                warn!(attempt, error = %e, settlements = batch.len(), "cannot reach the database to settle; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
    warn!(
        settlements = batch.len(),
        "gave up settling; those reservations stay charged at their estimate until pg_keypool.lease"
    );
}

async fn try_batch(pool: &Pool, batch: &[Settlement]) -> Result<(), DbError> {
    let client = pool.get().await?;
    if batch.len() == 1 {
        settle_on(&client, &batch[0]).await?;
        return Ok(());
    }
    let stmt = client.prepare_cached(SETTLE_MANY).await?;
    let ids: Vec<i64> = batch.iter().map(|s| s.reservation_id).collect();
    let statuses: Vec<i32> = batch.iter().map(|s| s.status).collect();
    let prompts: Vec<i64> = batch.iter().map(|s| s.usage.prompt_tokens).collect();
    let completions: Vec<i64> = batch.iter().map(|s| s.usage.completion_tokens).collect();
    let retries: Vec<Option<i64>> = batch.iter().map(|s| s.retry_after_ms).collect();
    let codes: Vec<Option<&str>> = batch.iter().map(|s| s.error_code.as_deref()).collect();
    let requests_left: Vec<Option<i64>> = batch.iter().map(|s| s.counters.requests.map(|r| r.remaining)).collect();
    let requests_reset: Vec<Option<i64>> = batch.iter().map(|s| s.counters.requests.map(|r| r.reset_ms)).collect();
    let tokens_left: Vec<Option<i64>> = batch.iter().map(|s| s.counters.tokens.map(|r| r.remaining)).collect();
    let tokens_reset: Vec<Option<i64>> = batch.iter().map(|s| s.counters.tokens.map(|r| r.reset_ms)).collect();
    client
        .query(
            &stmt,
            &[
                &ids,
                &statuses,
                &prompts,
                &completions,
                &retries,
                &codes,
                &requests_left,
                &requests_reset,
                &tokens_left,
                &tokens_reset,
            ],
        )
        .await?;
    Ok(())
}

/// `keypool_settle` of one settlement.
async fn settle_on(client: &Object, s: &Settlement) -> Result<tokio_postgres::Row, DbError> {
    let stmt = client.prepare_cached(SETTLE).await?;
    Ok(client
        .query_one(
            &stmt,
            &[
                &s.reservation_id,
                &s.status,
                &s.usage.prompt_tokens,
                &s.usage.completion_tokens,
                &s.retry_after_ms,
                &s.error_code,
                &s.counters.requests.map(|r| r.remaining),
                &s.counters.requests.map(|r| r.reset_ms),
                &s.counters.tokens.map(|r| r.remaining),
                &s.counters.tokens.map(|r| r.reset_ms),
            ],
        )
        .await?)
}

async fn settle_one(pool: &Pool, s: &Settlement) -> Result<(), DbError> {
    try_batch(pool, std::slice::from_ref(s)).await
}

/// What a database token allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenGrant {
    pub id: i64,
    /// The user it acts as, if bound to one.
    pub user: Option<String>,
    /// The pools it reaches, if bound to some.
    pub pools: Option<Vec<String>>,
    pub expires_at: Option<SystemTime>,
    /// The token's SHA-256: reservations name it so that its limits apply.
    pub sha256: [u8; 32],
}

/// What a caller may reach and what it counts against: an API token's pools (None: any the
/// worker's role may use) and the token's SHA-256 (None: a service token, no token limits).
#[derive(Clone, Debug, Default)]
pub struct Reach {
    pub pools: Option<Vec<String>>,
    pub token_sha256: Option<[u8; 32]>,
}
