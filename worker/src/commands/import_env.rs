//! `keypool-worker import-env`: turns the environment variables users already have into pools
//! and keys, idempotently (a secret already in its pool is reported, not added again).
//!
//! Recognized (see the seeds):
//! - `GEMINI_API_KEY_1..N` (seed 000): pool `gemini`, key group n
//! - `XAI_API_KEY`, `XAI_API_KEY_2..N` (seed 004): pool `xai`, key group 1 for the unnumbered one,
//!   n for the others, so that stored `api_key_group` values keep pointing at the same key
//! - `GOOGLE_KEY_1..N` (seed 003), provider gemini: with `--pool-map chat=1-2,artifact=3-6,image=7-10`
//!   into those pools (group = position in the pool), else pool `google`, group n
//! - `OPENAI_API_KEYS`, `GEMINI_API_KEYS`, `SERP_API_KEYS` comma lists (seed 002), with
//!   per-index (from 0) `*_MODEL_i`, `*_MAX_TOKENS_PER_MINUTE_i`, `*_MAX_TOKENS_PER_DAY_i`;
//!   `OPENAI_ORG_ID` makes the OpenAI keys share one account's limits (OpenAI limits belong to
//!   the organization). SERP calls carry no tokens: its per-minute/day numbers become request
//!   limits.
//! - `OPENAI_API_KEY`, `ANTHROPIC_API_KEY`: one key each
//!
//! Base URLs: `--base-url`, else `OPENAI_BASE_URL`, `GEMINI_BASE_URL`, `XAI_BASE_URL`,
//! `ANTHROPIC_BASE_URL`, `SERP_BASE_URL`, else the provider's.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use crate::config::ImportArgs;
use crate::db::{seal_with, Db, DbError};
use keypool_mask::mask;

/// One key to import.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub var: String,
    pub provider: &'static str,
    pub pool: String,
    pub secret: String,
    pub group_no: Option<i32>,
    pub model: Option<String>,
    pub account: Option<String>,
    pub rpm: Option<i32>,
    pub rpd: Option<i32>,
    pub tpm: Option<i64>,
    pub tpd: Option<i64>,
    pub base_url: Option<String>,
}

/// Reads a .env file: `KEY=VALUE` lines, `export ` prefixes, `#` comments, quoted values.
pub fn parse_env_file(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!("line {}: expected KEY=VALUE", n + 1));
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("line {}: \"{key}\" is not a variable name", n + 1));
        }
        let value = value.trim();
        let value = if let Some(q) = value.strip_prefix('"').and_then(|v| v.rfind('"').map(|i| &v[..i])) {
            q.to_string()
        } else if let Some(q) = value.strip_prefix('\'').and_then(|v| v.rfind('\'').map(|i| &v[..i])) {
            q.to_string()
        } else {
            // An unquoted value ends at " #".
            value.split(" #").next().unwrap_or("").trim().to_string()
        };
        out.insert(key.to_string(), value);
    }
    Ok(out)
}

/// The variables to import from: the process environment over the .env file.
pub fn environment(args: &ImportArgs) -> Result<BTreeMap<String, String>, String> {
    let file = match (&args.env_file, args.no_env_file) {
        (Some(p), _) => Some((p.clone(), true)),
        (None, false) => Some((Path::new(".env").to_path_buf(), false)),
        (None, true) => None,
    };
    let mut vars = BTreeMap::new();
    if let Some((path, explicit)) = file {
        match std::fs::read_to_string(&path) {
            Ok(text) => vars = parse_env_file(&text).map_err(|e| format!("{}: {e}", path.display()))?,
            Err(e) if explicit => return Err(format!("cannot read {}: {e}", path.display())),
            Err(_) => {}
        }
    }
    for (k, v) in std::env::vars() {
        vars.insert(k, v);
    }
    Ok(vars)
}

/// `chat=1-2,artifact=3-6,image=7-10` (or `chat:1-2`; single numbers and lists like `1,3` too).
pub fn parse_pool_map(text: &str) -> Result<Vec<(String, Vec<u32>)>, String> {
    let mut out: Vec<(String, Vec<u32>)> = Vec::new();
    let mut current: Option<usize> = None;
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (pool, range) = match item.split_once(['=', ':']) {
            Some((p, r)) => (Some(p.trim()), r.trim()),
            None => (None, item),
        };
        if let Some(p) = pool {
            if p.is_empty() {
                return Err(format!("\"{item}\": missing pool name"));
            }
            out.push((p.to_string(), Vec::new()));
            current = Some(out.len() - 1);
        }
        let Some(i) = current else {
            return Err(format!("\"{item}\": name the pool first, e.g. chat=1-2"));
        };
        let numbers: Vec<u32> = match range.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (
                    a.trim().parse().map_err(|_| format!("\"{item}\": bad range"))?,
                    b.trim().parse().map_err(|_| format!("\"{item}\": bad range"))?,
                );
                if a == 0 || b < a || b - a > 10_000 {
                    return Err(format!("\"{item}\": bad range"));
                }
                (a..=b).collect()
            }
            None => vec![range.parse().map_err(|_| format!("\"{item}\": not a key number"))?],
        };
        out[i].1.extend(numbers);
    }
    let mut seen = HashSet::new();
    for (pool, numbers) in &out {
        for n in numbers {
            if !seen.insert(*n) {
                return Err(format!("GOOGLE_KEY_{n} is mapped twice (again to pool {pool})"));
            }
        }
    }
    if out.is_empty() {
        return Err("the pool map is empty".into());
    }
    Ok(out)
}

fn looks_like_placeholder(secret: &str) -> bool {
    let s = secret.to_ascii_lowercase();
    s.starts_with("your_") || s.starts_with("your-") || s.ends_with("_here") || s.contains("...") || s.contains('…')
}

/// Numbered variables `PREFIX<n>` in order of n.
fn numbered<'a>(vars: &'a BTreeMap<String, String>, prefix: &str) -> Vec<(u32, &'a String, &'a String)> {
    let mut out: Vec<(u32, &String, &String)> = vars
        .iter()
        .filter_map(|(k, v)| {
            let n: u32 = k.strip_prefix(prefix)?.parse().ok()?;
            Some((n, k, v))
        })
        .collect();
    out.sort_by_key(|x| x.0);
    out
}

fn parse_num<T: std::str::FromStr>(
    vars: &BTreeMap<String, String>,
    name: &str,
    warnings: &mut Vec<String>,
) -> Option<T> {
    let v = vars.get(name)?.trim();
    if v.is_empty() {
        return None;
    }
    match v.parse() {
        Ok(n) => Some(n),
        Err(_) => {
            warnings.push(format!("{name}={v} is not a number; ignored"));
            None
        }
    }
}

/// Works out the keys to import. Returns them with warnings to print.
pub fn collect(vars: &BTreeMap<String, String>, args: &ImportArgs) -> Result<(Vec<Candidate>, Vec<String>), String> {
    let mut warnings = Vec::new();
    let mut out: Vec<Candidate> = Vec::new();
    let pool_for = |default: &str| args.pool.clone().unwrap_or_else(|| default.to_string());
    let base_for = |env: &str| {
        args.base_url
            .clone()
            .or_else(|| vars.get(env).filter(|v| !v.is_empty()).cloned())
    };
    let plain_model = |env: &str| {
        args.model
            .clone()
            .or_else(|| vars.get(env).filter(|v| !v.is_empty()).cloned())
    };
    let candidate = |var: &str, provider: &'static str, pool: String, secret: &str, group_no: Option<i32>| Candidate {
        var: var.to_string(),
        provider,
        pool,
        secret: secret.trim().to_string(),
        group_no,
        model: None,
        account: None,
        rpm: args.rpm,
        rpd: args.rpd,
        tpm: args.tpm,
        tpd: args.tpd,
        base_url: None,
    };

    // GEMINI_API_KEY_n
    for (n, var, secret) in numbered(vars, "GEMINI_API_KEY_") {
        let mut c = candidate(var, "gemini", pool_for("gemini"), secret, Some(n as i32));
        c.model = plain_model("GEMINI_MODEL");
        c.base_url = base_for("GEMINI_BASE_URL");
        out.push(c);
    }

    // XAI_API_KEY, XAI_API_KEY_2..N
    let mut xai: Vec<(u32, &String, &String)> = Vec::new();
    if let Some((k, v)) = vars.get_key_value("XAI_API_KEY") {
        xai.push((1, k, v));
    }
    for (n, k, v) in numbered(vars, "XAI_API_KEY_") {
        if n == 1 && !xai.is_empty() {
            warnings.push(
                "both XAI_API_KEY and XAI_API_KEY_1 are set; XAI_API_KEY_1 is imported without a fixed group".into(),
            );
            let mut c = candidate(k, "xai", pool_for("xai"), v, None);
            c.model = plain_model("XAI_MODEL");
            c.base_url = base_for("XAI_BASE_URL");
            out.push(c);
            continue;
        }
        xai.push((n, k, v));
    }
    for (n, var, secret) in xai {
        let mut c = candidate(var, "xai", pool_for("xai"), secret, Some(n as i32));
        c.model = plain_model("XAI_MODEL");
        c.base_url = base_for("XAI_BASE_URL");
        out.push(c);
    }

    // GOOGLE_KEY_n with the pool map
    let google = numbered(vars, "GOOGLE_KEY_");
    let map = args.pool_map.as_deref().map(parse_pool_map).transpose()?;
    for (n, var, secret) in &google {
        let (pool, group) = match &map {
            Some(map) => match map.iter().find(|(_, nums)| nums.contains(n)) {
                Some((pool, nums)) => {
                    let position = nums
                        .iter()
                        .filter(|m| google.iter().any(|(g, _, _)| g == *m))
                        .position(|m| m == n);
                    (pool.clone(), position.map(|p| p as i32 + 1))
                }
                None => {
                    warnings.push(format!("{var} is not in the pool map; skipped"));
                    continue;
                }
            },
            None => (pool_for("google"), Some(*n as i32)),
        };
        let mut c = candidate(var, "gemini", pool, secret, group);
        c.model = plain_model("GOOGLE_MODEL").or_else(|| plain_model("GEMINI_MODEL"));
        c.base_url = base_for("GEMINI_BASE_URL");
        out.push(c);
    }
    if let Some(map) = &map {
        for (pool, nums) in map {
            for n in nums {
                if !google.iter().any(|(g, _, _)| g == n) {
                    warnings.push(format!(
                        "the pool map puts GOOGLE_KEY_{n} in pool {pool}, but it is not set"
                    ));
                }
            }
        }
    }

    // Comma lists with per-index settings (seed 002).
    for (list, prefix, provider, default_pool, base_env) in [
        ("OPENAI_API_KEYS", "OPENAI", "openai", "openai", "OPENAI_BASE_URL"),
        ("GEMINI_API_KEYS", "GEMINI", "gemini", "gemini", "GEMINI_BASE_URL"),
        ("SERP_API_KEYS", "SERP", "http", "serp", "SERP_BASE_URL"),
    ] {
        let Some(value) = vars.get(list) else { continue };
        // Fixed groups only when no numbered variables already fill the same pool.
        let pool = pool_for(default_pool);
        let fixed_groups = !out.iter().any(|c| c.pool == pool);
        for (i, secret) in value.split(',').map(str::trim).enumerate() {
            if secret.is_empty() {
                continue;
            }
            let var = format!("{list}[{i}]");
            let mut c = candidate(
                &var,
                provider,
                pool.clone(),
                secret,
                fixed_groups.then_some(i as i32 + 1),
            );
            c.model = vars
                .get(&format!("{prefix}_MODEL_{i}"))
                .filter(|m| !m.is_empty())
                .cloned()
                .or_else(|| args.model.clone());
            let per_minute = format!("{prefix}_MAX_TOKENS_PER_MINUTE_{i}");
            let per_day = format!("{prefix}_MAX_TOKENS_PER_DAY_{i}");
            if provider == "http" {
                // SERP "tokens" are searches: request limits.
                c.rpm = parse_num::<i32>(vars, &per_minute, &mut warnings).or(c.rpm);
                c.rpd = parse_num::<i32>(vars, &per_day, &mut warnings).or(c.rpd);
                let base = base_for(base_env).unwrap_or_else(|| "https://serpapi.com".into());
                c.base_url = Some(if base.contains('#') {
                    base
                } else {
                    format!("{base}#query=api_key")
                });
            } else {
                c.tpm = parse_num::<i64>(vars, &per_minute, &mut warnings).or(c.tpm);
                c.tpd = parse_num::<i64>(vars, &per_day, &mut warnings).or(c.tpd);
                c.base_url = base_for(base_env);
            }
            if provider == "openai" {
                c.account = vars.get("OPENAI_ORG_ID").filter(|o| !o.is_empty()).cloned();
            }
            out.push(c);
        }
    }

    // Single keys.
    for (var, provider, default_pool, model_env, base_env) in [
        ("OPENAI_API_KEY", "openai", "openai", "OPENAI_MODEL", "OPENAI_BASE_URL"),
        (
            "ANTHROPIC_API_KEY",
            "anthropic",
            "anthropic",
            "ANTHROPIC_MODEL",
            "ANTHROPIC_BASE_URL",
        ),
    ] {
        if let Some(secret) = vars.get(var) {
            let mut c = candidate(var, provider, pool_for(default_pool), secret, None);
            c.model = plain_model(model_env);
            c.base_url = base_for(base_env);
            if provider == "openai" {
                c.account = vars.get("OPENAI_ORG_ID").filter(|o| !o.is_empty()).cloned();
            }
            out.push(c);
        }
    }

    // Drop empty values, placeholders and repeats.
    let mut seen: HashSet<(String, String)> = HashSet::new();
    let mut kept = Vec::new();
    for c in out {
        if c.secret.is_empty() {
            warnings.push(format!("{} is empty; skipped", c.var));
        } else if looks_like_placeholder(&c.secret) {
            warnings.push(format!(
                "{} looks like a placeholder ({}); skipped",
                c.var,
                mask(&c.secret)
            ));
        } else if !seen.insert((c.pool.clone(), c.secret.clone())) {
            warnings.push(format!(
                "{} repeats a secret already imported into pool {}; skipped",
                c.var, c.pool
            ));
        } else {
            kept.push(c);
        }
    }
    Ok((kept, warnings))
}

async fn add(db: &Db, c: &Candidate, group_no: Option<i32>) -> Result<i64, DbError> {
    let client = db.client().await?;
    // Sealed for this call, so that no statement log holds the secret.
    let secret = match c.secret.is_empty() {
        true => c.secret.clone(),
        false => seal_with(&client, &c.secret, &keypool_transport::context_add(&c.pool, None)).await?,
    };
    let row = client
        .query_one(
            "SELECT keypool_add_key(pool => $1, provider => $2, secret => $3, model => $4, account => $5, \
             rpm => $6, rpd => $7, tpm => $8, tpd => $9, base_url => $10, group_no => $11)",
            &[
                &c.pool,
                &c.provider,
                &secret,
                &c.model,
                &c.account,
                &c.rpm,
                &c.rpd,
                &c.tpm,
                &c.tpd,
                &c.base_url,
                &group_no,
            ],
        )
        .await?;
    Ok(row.get(0))
}

pub async fn run(args: ImportArgs) -> anyhow::Result<()> {
    let vars = environment(&args).map_err(|e| anyhow::anyhow!(e))?;
    let (candidates, warnings) = collect(&vars, &args).map_err(|e| anyhow::anyhow!("{e}"))?;
    for w in &warnings {
        println!("warning: {w}");
    }
    if candidates.is_empty() {
        println!(
            "no keys found: set GEMINI_API_KEY_1.., XAI_API_KEY.., GOOGLE_KEY_1.., OPENAI_API_KEYS, GEMINI_API_KEYS, \
             SERP_API_KEYS, OPENAI_API_KEY or ANTHROPIC_API_KEY (or put them in .env)"
        );
        return Ok(());
    }
    let db = Db::connect(&args.db).await?;
    let client = db.client().await?;
    let pools: HashSet<String> = client
        .query("SELECT DISTINCT pool FROM keypool_models()", &[])
        .await
        .map_err(DbError::from)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let existing: HashSet<i64> = client
        .query("SELECT key_id FROM keypool_keys", &[])
        .await
        .map_err(DbError::from)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    drop(client);

    let mut created_pools = 0;
    let mut wanted: Vec<&str> = candidates.iter().map(|c| c.pool.as_str()).collect();
    wanted.dedup();
    let mut done_pools: HashSet<&str> = HashSet::new();
    for pool in wanted {
        if pools.contains(pool) || !done_pools.insert(pool) {
            continue;
        }
        if args.dry_run {
            println!("would create pool {pool}");
        } else {
            let client = db.client().await?;
            client
                .query_one(
                    "SELECT keypool_create_pool($1, 'imported by keypool-worker import-env')",
                    &[&pool],
                )
                .await
                .map_err(DbError::from)?;
            println!("created pool {pool}");
        }
        created_pools += 1;
    }

    let (mut added, mut present) = (0, 0);
    for c in &candidates {
        let what = format!(
            "{:<9} {:<10} {:<12} {:<24} {}",
            c.provider,
            c.pool,
            c.group_no
                .map(|g| format!("group {g}"))
                .unwrap_or_else(|| "next group".into()),
            c.var,
            mask(&c.secret)
        );
        if args.dry_run {
            println!("would add  {what}");
            continue;
        }
        let id = match add(&db, c, c.group_no).await {
            Ok(id) => id,
            Err(e) if e.sqlstate.as_deref() == Some("23505") && c.group_no.is_some() => {
                println!("warning: {}: {}; adding it with the next free group", c.var, e.message);
                add(&db, c, None).await.map_err(|e| anyhow::anyhow!("{}: {e}", c.var))?
            }
            Err(e) => anyhow::bail!("{}: {e}", c.var),
        };
        if existing.contains(&id) {
            present += 1;
            println!("present    key {id:<5} {what}");
        } else {
            added += 1;
            println!("added      key {id:<5} {what}");
        }
    }
    if args.dry_run {
        println!(
            "dry run: {} keys, {created_pools} new pools; nothing changed",
            candidates.len()
        );
    } else {
        println!("{added} keys added, {present} already present, {created_pools} pools created");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> ImportArgs {
        let mut all = vec!["keypool-worker", "import-env", "--database-url", "host=/tmp"];
        all.extend_from_slice(extra);
        match crate::config::Cli::parse_from(all).command {
            crate::config::Command::ImportEnv(a) => a,
            _ => unreachable!(),
        }
    }

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn env_file_syntax() {
        let v = parse_env_file(
            "# keys\nexport GEMINI_API_KEY_1=\"AIza one\"\nXAI_API_KEY='xai-1' \nSERP_API_KEYS=a,b # two\n\nEMPTY=\n",
        )
        .unwrap();
        assert_eq!(v["GEMINI_API_KEY_1"], "AIza one");
        assert_eq!(v["XAI_API_KEY"], "xai-1");
        assert_eq!(v["SERP_API_KEYS"], "a,b");
        assert_eq!(v["EMPTY"], "");
        assert!(parse_env_file("NOT A LINE").is_err());
    }

    #[test]
    fn pool_map_of_seed_003() {
        let m = parse_pool_map("chat=1-2, artifact=3-6, image=7-10").unwrap();
        assert_eq!(m[0], ("chat".to_string(), vec![1, 2]));
        assert_eq!(m[1].1, vec![3, 4, 5, 6]);
        assert_eq!(m[2].1, vec![7, 8, 9, 10]);
        assert_eq!(parse_pool_map("chat:1,3,x:2").unwrap()[0].1, vec![1, 3]);
        assert!(parse_pool_map("chat=1-2,image=2-3").unwrap_err().contains("twice"));
        assert!(parse_pool_map("1-2").is_err());
        assert!(parse_pool_map("chat=3-1").is_err());
    }

    #[test]
    fn seed_formats() {
        let v = vars(&[
            ("GEMINI_API_KEY_2", "AIzaGemini-two-000000"),
            ("GEMINI_API_KEY_1", "AIzaGemini-one-000000"),
            ("XAI_API_KEY", "xai-first-0000000000"),
            ("XAI_API_KEY_3", "xai-third-0000000000"),
            ("XAI_API_KEY_2", "xai-second-000000000"),
            ("GOOGLE_KEY_1", "AIzaGoogle-1-0000000"),
            ("GOOGLE_KEY_3", "AIzaGoogle-3-0000000"),
            ("GOOGLE_KEY_4", "AIzaGoogle-4-0000000"),
            ("OPENAI_API_KEYS", "sk-proj-a-000000000, sk-proj-b-000000000"),
            ("OPENAI_ORG_ID", "org-1"),
            ("OPENAI_MODEL_0", "gpt-4o"),
            ("OPENAI_MAX_TOKENS_PER_MINUTE_0", "90000"),
            ("OPENAI_MAX_TOKENS_PER_DAY_1", "2000000"),
            ("SERP_API_KEYS", "serp-key-one-0000"),
            ("SERP_MAX_TOKENS_PER_MINUTE_0", "100"),
            ("SERP_MAX_TOKENS_PER_DAY_0", "100000"),
            ("GEMINI_API_KEY_9", "your_ninth_api_key_here"),
        ]);
        let (c, warnings) = collect(&v, &args(&["--pool-map", "chat=1-2,artifact=3-6", "--rpm", "10"])).unwrap();
        let find = |var: &str| {
            c.iter()
                .find(|c| c.var == var)
                .unwrap_or_else(|| panic!("{var} missing: {c:?}"))
        };

        assert_eq!(find("GEMINI_API_KEY_1").group_no, Some(1));
        assert_eq!(find("GEMINI_API_KEY_2").pool, "gemini");
        assert!(warnings
            .iter()
            .any(|w| w.contains("GEMINI_API_KEY_9") && w.contains("placeholder")));
        assert!(!warnings.iter().any(|w| w.contains("your_ninth")), "{warnings:?}");

        assert_eq!(find("XAI_API_KEY").group_no, Some(1));
        assert_eq!(find("XAI_API_KEY_2").group_no, Some(2));
        assert_eq!(find("XAI_API_KEY_3").provider, "xai");

        assert_eq!(find("GOOGLE_KEY_1").pool, "chat");
        assert_eq!(find("GOOGLE_KEY_3").pool, "artifact");
        assert_eq!(find("GOOGLE_KEY_3").group_no, Some(1));
        assert_eq!(find("GOOGLE_KEY_4").group_no, Some(2));
        assert!(warnings.iter().any(|w| w.contains("GOOGLE_KEY_2")));

        let a = find("OPENAI_API_KEYS[0]");
        assert_eq!(
            (a.model.as_deref(), a.tpm, a.account.as_deref(), a.rpm),
            (Some("gpt-4o"), Some(90000), Some("org-1"), Some(10))
        );
        assert_eq!(find("OPENAI_API_KEYS[1]").tpd, Some(2_000_000));
        assert_eq!(find("OPENAI_API_KEYS[1]").secret, "sk-proj-b-000000000");

        let s = find("SERP_API_KEYS[0]");
        assert_eq!(
            (s.provider, s.rpm, s.rpd, s.tpm),
            ("http", Some(100), Some(100000), None)
        );
        assert_eq!(s.base_url.as_deref(), Some("https://serpapi.com#query=api_key"));
    }

    #[test]
    fn base_url_override_and_repeats() {
        let v = vars(&[
            ("GEMINI_API_KEY_1", "AIzaSame-000000000"),
            ("GEMINI_API_KEYS", "AIzaSame-000000000"),
            ("SERP_API_KEYS", "serp-1-0000000"),
        ]);
        let (c, warnings) = collect(&v, &args(&["--base-url", "http://127.0.0.1:9"])).unwrap();
        assert_eq!(c.len(), 2, "{c:?}");
        assert!(warnings.iter().any(|w| w.contains("repeats")));
        assert_eq!(c[0].base_url.as_deref(), Some("http://127.0.0.1:9"));
        assert_eq!(c[1].base_url.as_deref(), Some("http://127.0.0.1:9#query=api_key"));
    }
}
