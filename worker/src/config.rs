//! The worker's configuration: command-line flags, each mirrored by a `KEYPOOL_*` environment
//! variable, checked at start with messages that say what to change.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::duration;

#[derive(Parser, Debug)]
#[command(
    name = "keypool-worker",
    version,
    about = "The hands of pg_keypool: reserves keys through SQL, calls providers, settles outcomes"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "KEYPOOL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (tracing's EnvFilter syntax), e.g. info or keypool_worker=debug.
    #[arg(long, global = true, env = "KEYPOOL_LOG", default_value = "info")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serves the OpenAI-compatible HTTP endpoint and consumes the SQL request queue.
    Serve(ServeArgs),
    /// Imports provider keys from the environment (and a .env file) into pools.
    ImportEnv(ImportArgs),
    /// Checks keys with their provider (listing models) and disables those it rejects.
    Validate(ValidateArgs),
    /// A local server speaking the OpenAI, Gemini and Anthropic wire formats, for tests and demos.
    MockProvider(MockArgs),
}

#[derive(Args, Debug, Clone)]
pub struct DbArgs {
    /// PostgreSQL connection string (URL or key=value) of the database with pg_keypool.
    #[arg(long, env = "KEYPOOL_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Connections in the worker's pool.
    #[arg(long, env = "KEYPOOL_DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: usize,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Address of the HTTP endpoint.
    #[arg(long, env = "KEYPOOL_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Service tokens the operator's own apps present as `Authorization: Bearer TOKEN`
    /// (comma-separated); they may act as any user. End users get API tokens from
    /// keypool_create_api_token instead, which the worker accepts as well.
    #[arg(long, env = "KEYPOOL_API_TOKENS", hide_env_values = true)]
    pub api_tokens: Option<String>,
    /// Tokens for the admin API, `/dashboard` and its actions (comma-separated; none: admin
    /// routes answer 401).
    #[arg(long, env = "KEYPOOL_ADMIN_TOKENS", hide_env_values = true)]
    pub admin_tokens: Option<String>,
    /// Token Prometheus presents to scrape /metrics (none: /metrics is open).
    #[arg(long, env = "KEYPOOL_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
    /// Serves the API routes without any token check (local experiments only; the admin API
    /// and the dashboard still need an admin token).
    #[arg(long, env = "KEYPOOL_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// Largest request body, e.g. 4MiB (larger: 413, without reading it whole).
    #[arg(long, env = "KEYPOOL_MAX_BODY", default_value = "4MiB", value_parser = parse_size)]
    pub max_body: usize,
    /// Largest provider answer read; a stream over it is cut and settled.
    #[arg(long, env = "KEYPOOL_MAX_RESPONSE", default_value = "32MiB", value_parser = parse_size)]
    pub max_response: usize,
    /// Sends each provider call's grant time (Unix ms) as X-Keypool-Granted-At, for audits of
    /// the calls a provider received against the limits (bench/soak.sh).
    #[arg(long, env = "KEYPOOL_STAMP_GRANTS")]
    pub stamp_grants: bool,
    /// HTTP requests handled at once (more: 503 at once).
    #[arg(long, env = "KEYPOOL_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub max_in_flight: usize,
    /// Longest wait for a request's head, and for the next request on an idle connection.
    #[arg(long, env = "KEYPOOL_HEADER_TIMEOUT", default_value = "10s", value_parser = duration::parse)]
    pub header_timeout: Duration,
    /// HTTP requests one caller (an API token, else a user) may have in flight at once (more: 429).
    #[arg(long, env = "KEYPOOL_MAX_IN_FLIGHT_PER_CALLER", default_value_t = 64)]
    pub max_in_flight_per_caller: usize,
    /// Own keys one user may try to add per minute through `POST /v1/keys` (more: 429).
    #[arg(long, env = "KEYPOOL_KEY_ADDS_PER_MINUTE", default_value_t = 10)]
    pub key_adds_per_minute: u32,
    /// Longest pause while a request body arrives (longer: 408), and while an answer waits for
    /// the client to read it (longer: the connection is closed and the call settled).
    #[arg(long, env = "KEYPOOL_IDLE_TIMEOUT", default_value = "30s", value_parser = duration::parse)]
    pub idle_timeout: Duration,
    /// Longest time a whole request body may take to arrive, however steadily (longer: 408).
    #[arg(long, env = "KEYPOOL_BODY_TIMEOUT", default_value = "60s", value_parser = duration::parse)]
    pub body_timeout: Duration,
    /// Turns the HTTP endpoint off (queue consumer only).
    #[arg(long, env = "KEYPOOL_NO_HTTP")]
    pub no_http: bool,
    /// Turns the queue consumer off (HTTP endpoint only).
    #[arg(long, env = "KEYPOOL_NO_QUEUE")]
    pub no_queue: bool,
    /// This worker's name in heartbeats and leases (default: host-pid).
    #[arg(long, env = "KEYPOOL_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Longest wait for one provider call (for streams: for the first byte, then between events).
    #[arg(long, env = "KEYPOOL_PROVIDER_TIMEOUT", default_value = "60s", value_parser = duration::parse)]
    pub provider_timeout: Duration,
    /// Longest time one request may take over all its attempts.
    #[arg(long, env = "KEYPOOL_REQUEST_DEADLINE", default_value = "120s", value_parser = duration::parse)]
    pub request_deadline: Duration,
    /// Provider calls one request may make (first try plus retries on other keys).
    #[arg(long, env = "KEYPOOL_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// How long an HTTP request may wait for capacity when every key of its pool is busy
    /// (0: answer 429 with Retry-After at once).
    #[arg(long, env = "KEYPOOL_CAPACITY_WAIT", default_value = "0s", value_parser = duration::parse)]
    pub capacity_wait: Duration,
    /// User for HTTP requests that name none (no `user` field, no X-Keypool-User header).
    #[arg(long, env = "KEYPOOL_DEFAULT_USER")]
    pub default_user: Option<String>,
    /// max_tokens assumed when a request sets none (token estimate; Anthropic requires one).
    #[arg(long, env = "KEYPOOL_DEFAULT_MAX_TOKENS", default_value_t = 1024)]
    pub default_max_tokens: u32,
    /// Queued requests this worker carries out at once.
    #[arg(long, env = "KEYPOOL_QUEUE_CONCURRENCY", default_value_t = 16)]
    pub queue_concurrency: usize,
    /// Lease on a claimed request: after it, another worker may take the request.
    #[arg(long, env = "KEYPOOL_QUEUE_LEASE", default_value = "5m", value_parser = duration::parse)]
    pub queue_lease: Duration,
    /// Longest idle sleep of the queue consumer between checks (NOTIFY wakes it earlier).
    #[arg(long, env = "KEYPOOL_QUEUE_POLL", default_value = "30s", value_parser = duration::parse)]
    pub queue_poll: Duration,
    /// Interval between heartbeats.
    #[arg(long, env = "KEYPOOL_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = duration::parse)]
    pub heartbeat_interval: Duration,
    /// How long after a provider's answer disabled a key (or its account) the worker first
    /// checks it again with the provider; later checks wait twice as long each time, up to a
    /// day. A key the provider accepts is enabled again.
    #[arg(long, env = "KEYPOOL_RECHECK_AFTER", default_value = "10m", value_parser = duration::parse)]
    pub recheck_after: Duration,
    /// On SIGTERM: how long in-flight work may finish before it is released.
    #[arg(long, env = "KEYPOOL_SHUTDOWN_GRACE", default_value = "30s", value_parser = duration::parse)]
    pub shutdown_grace: Duration,
}

/// A size in bytes: `4194304`, `512KiB`, `4MiB`, `1GiB` (also kB, MB, GB as powers of 1000).
pub fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size; write e.g. 4MiB, 512KiB or 1048576"))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?}; use B, KiB, MiB or GiB"
            ))
        }
    };
    n.checked_mul(factor)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| format!("{text:?} is too large"))
}

fn token_list(list: Option<&str>) -> Vec<String> {
    list.unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

impl ServeArgs {
    pub fn tokens(&self) -> Vec<String> {
        token_list(self.api_tokens.as_deref())
    }

    pub fn admin_tokens(&self) -> Vec<String> {
        token_list(self.admin_tokens.as_deref())
    }

    /// Checks the combination of settings; the error says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.no_http && self.no_queue {
            return Err("--no-http and --no-queue together leave nothing to do".into());
        }
        if let Some(short) = self.tokens().iter().find(|t| t.len() < 16) {
            return Err(format!(
                "API token {} is {} characters long; use at least 16 (e.g. `openssl rand -hex 24`)",
                keypool_mask::mask(short),
                short.len()
            ));
        }
        if let Some(t) = &self.metrics_token {
            if t.len() < 16 {
                return Err(format!(
                    "the metrics token {} is {} characters long; use at least 16",
                    keypool_mask::mask(t),
                    t.len()
                ));
            }
            if self.tokens().contains(t) {
                return Err("the metrics token must not be an API token".into());
            }
        }
        if self.max_body < 1024 || self.max_body > 1 << 30 {
            return Err(format!(
                "--max-body must be between 1KiB and 1GiB, not {} bytes",
                self.max_body
            ));
        }
        if self.max_response < 1024 || self.max_response > 1 << 32 {
            return Err(format!(
                "--max-response must be between 1KiB and 4GiB, not {} bytes",
                self.max_response
            ));
        }
        if self.max_in_flight == 0 || self.max_in_flight > 1_000_000 {
            return Err("--max-in-flight must be between 1 and 1000000".into());
        }
        if self.max_in_flight_per_caller == 0 || self.max_in_flight_per_caller > 1_000_000 {
            return Err("--max-in-flight-per-caller must be between 1 and 1000000".into());
        }
        if self.header_timeout < Duration::from_millis(100)
            || self.idle_timeout < Duration::from_millis(100)
            || self.body_timeout < Duration::from_millis(100)
        {
            return Err("--header-timeout, --idle-timeout and --body-timeout must be at least 100ms".into());
        }
        let admin = self.admin_tokens();
        if let Some(short) = admin.iter().find(|t| t.len() < 16) {
            return Err(format!(
                "admin token {} is {} characters long; use at least 16 (e.g. `openssl rand -hex 24`)",
                keypool_mask::mask(short),
                short.len()
            ));
        }
        if let Some(shared) = admin.iter().find(|t| self.tokens().contains(t)) {
            return Err(format!(
                "token {} is both an API token and an admin token; apps must not hold admin rights",
                keypool_mask::mask(shared)
            ));
        }
        if !(1..=20).contains(&self.max_attempts) {
            return Err(format!(
                "--max-attempts must be between 1 and 20, not {}",
                self.max_attempts
            ));
        }
        if self.provider_timeout < Duration::from_millis(100) {
            return Err("--provider-timeout must be at least 100ms".into());
        }
        if self.request_deadline < self.provider_timeout {
            return Err(format!(
                "--request-deadline ({:?}) must not be shorter than --provider-timeout ({:?})",
                self.request_deadline, self.provider_timeout
            ));
        }
        if self.db.db_pool_size == 0 || self.db.db_pool_size > 1000 {
            return Err("--db-pool-size must be between 1 and 1000".into());
        }
        if !self.no_queue {
            if self.queue_concurrency == 0 || self.queue_concurrency > 10_000 {
                return Err("--queue-concurrency must be between 1 and 10000".into());
            }
            if self.queue_lease < self.provider_timeout + Duration::from_secs(5) {
                return Err(format!(
                    "--queue-lease ({:?}) must exceed --provider-timeout ({:?}) by at least 5s, or requests \
                     would be taken over while their call is still running",
                    self.queue_lease, self.provider_timeout
                ));
            }
            if self.queue_poll < Duration::from_millis(100) {
                return Err("--queue-poll must be at least 100ms".into());
            }
        }
        if self.recheck_after < Duration::from_secs(1) {
            return Err("--recheck-after must be at least 1s".into());
        }
        if self.heartbeat_interval < Duration::from_millis(100) {
            return Err("--heartbeat-interval must be at least 100ms".into());
        }
        if self.default_max_tokens == 0 {
            return Err("--default-max-tokens must be positive".into());
        }
        if let Some(id) = &self.worker_id {
            if id.is_empty() || id.len() > 200 {
                return Err("--worker-id must be 1 to 200 characters".into());
            }
        }
        Ok(())
    }

    pub fn worker_id(&self) -> String {
        self.worker_id.clone().unwrap_or_else(|| {
            let host = hostname();
            format!("{host}-{}", std::process::id())
        })
    }
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "worker".to_string())
}

#[derive(Args, Debug, Clone)]
pub struct ImportArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// A .env file to read as well (default: ./.env when it exists). Its values do not override
    /// the process environment.
    #[arg(long, env = "KEYPOOL_ENV_FILE")]
    pub env_file: Option<PathBuf>,
    /// Ignore ./.env.
    #[arg(long)]
    pub no_env_file: bool,
    /// Pool for every imported key (default: one pool per provider: gemini, xai, openai, serp, google).
    #[arg(long)]
    pub pool: Option<String>,
    /// Which GOOGLE_KEY_n go to which pool, e.g. "chat=1-2,artifact=3-6,image=7-10".
    #[arg(long, env = "KEYPOOL_POOL_MAP")]
    pub pool_map: Option<String>,
    /// Model for keys whose variables name none.
    #[arg(long)]
    pub model: Option<String>,
    /// Requests per minute for keys whose variables set no limit.
    #[arg(long)]
    pub rpm: Option<i32>,
    /// Requests per day for keys whose variables set no limit.
    #[arg(long)]
    pub rpd: Option<i32>,
    /// Tokens per minute for keys whose variables set no limit.
    #[arg(long)]
    pub tpm: Option<i64>,
    /// Tokens per day for keys whose variables set no limit.
    #[arg(long)]
    pub tpd: Option<i64>,
    /// Base URL for every imported key (overrides OPENAI_BASE_URL, GEMINI_BASE_URL, ...).
    #[arg(long)]
    pub base_url: Option<String>,
    /// Prints what would be imported without changing anything.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Only the keys of this pool.
    #[arg(long)]
    pub pool: Option<String>,
    /// Only this key.
    #[arg(long)]
    pub key_id: Option<i64>,
    /// Report rejected keys without disabling them.
    #[arg(long)]
    pub no_disable: bool,
    /// Timeout of each check.
    #[arg(long, default_value = "15s", value_parser = duration::parse)]
    pub timeout: Duration,
    /// Check one key that is not in a pool yet: its provider ...
    #[arg(long, requires = "secret_source")]
    pub provider: Option<String>,
    /// ... the name of the environment variable that holds its secret ...
    #[arg(long, group = "secret_source")]
    pub secret_env: Option<String>,
    /// ... or read the secret from standard input.
    #[arg(long, group = "secret_source")]
    pub secret_stdin: bool,
    /// ... its base URL (default: the provider's).
    #[arg(long)]
    pub base_url: Option<String>,
    /// Add the checked key to this pool when the provider accepts it.
    #[arg(long, requires = "provider")]
    pub add_to: Option<String>,
    /// Model of the key added with --add-to.
    #[arg(long, requires = "add_to")]
    pub model: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct MockArgs {
    /// Address to listen on (port 0: any free port; the chosen address is printed).
    #[arg(long, env = "KEYPOOL_MOCK_LISTEN", default_value = "127.0.0.1:9090")]
    pub listen: SocketAddr,
    /// Delay before every answer.
    #[arg(long, env = "KEYPOOL_MOCK_LATENCY", default_value = "0ms", value_parser = duration::parse)]
    pub latency: Duration,
    /// Delay between streamed events.
    #[arg(long, env = "KEYPOOL_MOCK_STREAM_DELAY", default_value = "0ms", value_parser = duration::parse)]
    pub stream_delay: Duration,
    /// Words in every reply (at most max_tokens).
    #[arg(long, env = "KEYPOOL_MOCK_REPLY_WORDS", default_value_t = 12)]
    pub reply_words: usize,
    /// Appends one JSON line per provider call received (time, masked key, the grant time the
    /// worker stamped, the fault injected) to this file.
    #[arg(long, env = "KEYPOOL_MOCK_CALL_LOG")]
    pub call_log: Option<std::path::PathBuf>,
    /// Serves OpenAI-style requests that carry no key, as a local server (Ollama) does; they are
    /// counted under the key "(no key)".
    #[arg(long, env = "KEYPOOL_MOCK_KEYLESS")]
    pub keyless: bool,
    /// Accepts only the keys it issued (`--issue`, `POST /_mock/keys`), as a real provider
    /// does; without it every key is accepted (but those whose secret names a failure).
    #[arg(long)]
    pub issued_keys_only: bool,
    /// A key the mock issued (repeatable; with --issued-keys-only).
    #[arg(long = "issue")]
    pub issue: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> Result<ServeArgs, String> {
        let mut all = vec!["keypool-worker", "serve", "--database-url", "host=/tmp"];
        all.extend_from_slice(args);
        let cli = Cli::try_parse_from(all).map_err(|e| e.to_string())?;
        match cli.command {
            Command::Serve(s) => s.validate().map(|_| s),
            _ => unreachable!(),
        }
    }

    #[test]
    fn service_tokens_are_optional_but_long() {
        // Without service tokens, API tokens from the database are the way in.
        assert!(serve(&[]).is_ok());
        assert!(serve(&["--insecure-no-auth"]).is_ok());
        assert!(serve(&["--no-http"]).is_ok());
        let ok = serve(&["--api-tokens", " 0123456789abcdef0123 , fedcba9876543210fedc"]).unwrap();
        assert_eq!(ok.tokens().len(), 2);
        let short = serve(&["--api-tokens", "secret"]).unwrap_err();
        assert!(short.contains("at least 16") && !short.contains("secret"), "{short}");
        let metrics = serve(&["--metrics-token", "scrape"]).unwrap_err();
        assert!(
            metrics.contains("at least 16") && !metrics.contains("scrape"),
            "{metrics}"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("512 KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("4XB").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
        let s = serve(&["--max-body", "1MiB", "--max-response", "8MiB"]).unwrap();
        assert_eq!((s.max_body, s.max_response), (1 << 20, 8 << 20));
        assert!(serve(&["--max-body", "10"]).is_err());
        assert!(serve(&["--max-in-flight", "0"]).is_err());
    }

    #[test]
    fn inconsistent_settings_are_refused() {
        let base = ["--insecure-no-auth"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            serve(&v)
        };
        assert!(with(&["--no-queue", "--no-http"]).is_err());
        assert!(with(&["--max-attempts", "0"]).is_err());
        assert!(with(&["--queue-lease", "10s", "--provider-timeout", "60s"])
            .unwrap_err()
            .contains("--queue-lease"));
        assert!(with(&["--provider-timeout", "soon"]).is_err());
        assert!(with(&["--request-deadline", "1s", "--provider-timeout", "5s"]).is_err());
    }
}
