//! `keypool-worker validate`: asks each key's provider for its model list (the cheapest call
//! that needs a valid key) and disables the keys the provider rejects; or checks one key that is
//! not in a pool yet, and adds it if asked (seed 001). What a rejection is, is the extension's
//! call (`keypool_classify`), as for every other provider answer.

use std::io::Read;
use std::process::ExitCode;

use crate::config::ValidateArgs;
use crate::db::{Db, DbError};
use crate::providers::{self, KeyRef};
use keypool_mask::mask;

/// What a provider said of a key.
#[derive(Debug)]
pub enum Verdict {
    Accepted(String),
    Rejected {
        outcome: String,
        reason: String,
        /// The HTTP status the check got.
        status: u16,
    },
    Unknown(String),
    NotCheckable(&'static str),
}

/// Base URLs of the providers (as the extension's provider list has them).
pub fn default_base_url(provider: &str) -> Option<&'static str> {
    Some(match provider {
        "openai" => "https://api.openai.com/v1",
        "gemini" => "https://generativelanguage.googleapis.com",
        "anthropic" => "https://api.anthropic.com",
        "xai" => "https://api.x.ai/v1",
        "ollama" => "http://localhost:11434",
        _ => return None,
    })
}

async fn classify(db: &Db, status: i32, code: Option<&str>) -> Result<String, DbError> {
    let client = db.client().await?;
    let row = client
        .query_one("SELECT keypool_classify($1, $2)", &[&status, &code])
        .await?;
    Ok(row.get(0))
}

/// Asks the key's provider for its model list; the extension classifies a refusal.
pub async fn check(http: &reqwest::Client, db: &Db, key: &KeyRef) -> Result<Verdict, DbError> {
    let Some(request) = providers::list_models_request(http, key) else {
        return Ok(Verdict::NotCheckable(match key.provider.as_str() {
            "ollama" => "Ollama takes no key",
            _ => "plain HTTP APIs have no standard check",
        }));
    };
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => {
            return Ok(Verdict::Unknown(format!(
                "no answer: {}",
                crate::gateway::without_url(&e)
            )))
        }
    };
    let status = response.status().as_u16();
    if response.status().is_success() {
        return Ok(Verdict::Accepted(format!("HTTP {status}")));
    }
    let headers = response.headers().clone();
    // An error answer's message and code are near its start: never read more.
    let body = crate::gateway::read_capped(response, crate::gateway::MAX_ERROR_BODY)
        .await
        .unwrap_or_default();
    let error = providers::read_error(key, status, &headers, &body);
    let outcome = classify(db, status as i32, error.code.as_deref()).await?;
    let reason = format!(
        "HTTP {status} {}: {}",
        error.code.as_deref().unwrap_or(""),
        error.message.chars().take(160).collect::<String>()
    );
    Ok(match outcome.as_str() {
        "key_invalid" => Verdict::Rejected {
            outcome,
            reason,
            status,
        },
        // The key works; its account is busy or out of today's quota.
        "rate_limited" | "daily_quota" => Verdict::Accepted(format!("valid, but {outcome}: {reason}")),
        _ => Verdict::Unknown(format!("{outcome}: {reason}")),
    })
}

fn read_secret(args: &ValidateArgs) -> anyhow::Result<String> {
    let secret = if let Some(var) = &args.secret_env {
        std::env::var(var).map_err(|_| anyhow::anyhow!("environment variable {var} is not set"))?
    } else if args.secret_stdin {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        s
    } else {
        anyhow::bail!("give the secret with --secret-env NAME or --secret-stdin (never on the command line)");
    };
    let secret = secret.trim().to_string();
    if secret.is_empty() {
        anyhow::bail!("the secret is empty");
    }
    Ok(secret)
}

pub async fn run(args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let db = Db::connect(&args.db).await?;
    let http = reqwest::Client::builder()
        // Keys never follow a redirect to another host.
        .redirect(reqwest::redirect::Policy::none())
        .timeout(args.timeout)
        .user_agent(concat!("keypool-worker/", env!("CARGO_PKG_VERSION")))
        .build()?;

    if let Some(provider) = &args.provider {
        let secret = read_secret(&args)?;
        let base_url = args
            .base_url
            .clone()
            .or_else(|| default_base_url(provider).map(str::to_string))
            .ok_or_else(|| anyhow::anyhow!("provider {provider} needs --base-url"))?;
        let key = KeyRef {
            id: 0,
            provider: provider.clone(),
            model: args.model.clone(),
            base_url: base_url.clone(),
            label: mask(&secret),
            secret,
        };
        let verdict = check(&http, &db, &key).await?;
        println!("{} key {}: {}", provider, key.label, describe(&verdict));
        return Ok(match verdict {
            Verdict::Accepted(_) => {
                if let Some(pool) = &args.add_to {
                    let client = db.client().await?;
                    let sealed =
                        crate::db::seal_with(&client, &key.secret, &keypool_transport::context_add(pool, None)).await?;
                    let row = client
                        .query_one(
                            "SELECT keypool_add_key(pool => $1, provider => $2, secret => $3, model => $4, base_url => $5)",
                            &[pool, provider, &sealed, &args.model, &args.base_url],
                        )
                        .await
                        .map_err(DbError::from)?;
                    let id: i64 = row.get(0);
                    println!("added as key {id} to pool {pool}");
                }
                ExitCode::SUCCESS
            }
            Verdict::Rejected { .. } => ExitCode::from(1),
            _ => ExitCode::from(2),
        });
    }

    let client = db.client().await?;
    let rows = client
        .query(
            "SELECT key_id, pool, provider, label, state FROM keypool_keys \
             WHERE ($1::text IS NULL OR pool = $1) AND ($2::bigint IS NULL OR key_id = $2) ORDER BY key_id",
            &[&args.pool, &args.key_id],
        )
        .await
        .map_err(DbError::from)?;
    drop(client);
    if rows.is_empty() {
        println!("no keys to check");
        return Ok(ExitCode::SUCCESS);
    }
    let (mut ok, mut rejected, mut unknown) = (0, 0, 0);
    for row in rows {
        let (id, pool, provider, label, state): (i64, String, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        let prefix = format!("key {id:<5} {pool:<10} {provider:<9} {label:<12}");
        if state == "disabled" {
            println!("{prefix} skipped: disabled");
            continue;
        }
        let client = db.client().await?;
        let creds = client
            .query_one(
                "SELECT provider, model, base_url, secret FROM keypool_key_credentials($1)",
                &[&id],
            )
            .await
            .map_err(DbError::from)?;
        drop(client);
        let key = KeyRef {
            id,
            provider: creds.get(0),
            model: creds.get(1),
            base_url: creds.get(2),
            secret: creds.get(3),
            label: label.clone(),
        };
        let verdict = check(&http, &db, &key).await?;
        match &verdict {
            Verdict::Rejected { reason, .. } => {
                rejected += 1;
                if args.no_disable {
                    println!("{prefix} rejected ({reason}); left enabled (--no-disable)");
                } else {
                    let client = db.client().await?;
                    client
                        .execute(
                            "SELECT keypool_disable_key($1, $2)",
                            &[&id, &format!("validate: provider rejected the key ({reason})")],
                        )
                        .await
                        .map_err(DbError::from)?;
                    println!("{prefix} rejected ({reason}); disabled");
                }
            }
            Verdict::Accepted(_) => {
                ok += 1;
                println!("{prefix} {}", describe(&verdict));
            }
            _ => {
                unknown += 1;
                println!("{prefix} {}", describe(&verdict));
            }
        }
    }
    println!("{ok} accepted, {rejected} rejected, {unknown} not known");
    Ok(if rejected > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

pub fn describe(v: &Verdict) -> String {
    match v {
        Verdict::Accepted(how) => format!("accepted ({how})"),
        Verdict::Rejected { outcome, reason, .. } => format!("rejected: {outcome} ({reason})"),
        Verdict::Unknown(why) => format!("not known: {why}"),
        Verdict::NotCheckable(why) => format!("cannot be checked: {why}"),
    }
}
