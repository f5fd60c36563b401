//! Keys managed over HTTP (seed 001's `/api/v1/api-keys/*`): checking a secret with its
//! provider, adding, rotating and removing keys (admin API), and users' own keys through a
//! user-bound API token (`/v1/keys`). Every secret is checked with the provider (its model list,
//! as `validate` does) before it is stored, unless the caller says `"validate": false`.
//!
//! Bodies that carry a secret are never logged, and no answer or error quotes a secret: a body
//! that does not parse is refused without echoing it, and the provider's reason is scrubbed.
// The errors are the HTTP answers themselves, as in admin.rs.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{delete, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::db::seal_with;
use crate::gateway::validate::{self, Verdict};
use crate::http::admin::{act, admin, key_number, rows_json, KEY_AFTER};
use crate::http::credentials::Principal;
use crate::http::endpoint::Endpoint;
use crate::http::problem::{from_db, problem};
use crate::protocol::openai::check_model_name;
use crate::providers::KeyRef;

/// How long a provider may take to answer a key check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(15);

pub fn admin_routes() -> Router<Arc<Endpoint>> {
    Router::new()
        .route("/allocation/keys/validate", post(validate_key))
        .route("/allocation/keys", post(add_key))
        .route("/allocation/keys/{key_id}", delete(remove_key))
        .route("/allocation/keys/{key_id}/rotate", post(rotate_key))
}

/// The users' routes: they sit behind the API's authentication (auth::api).
pub fn user_routes() -> Router<Arc<Endpoint>> {
    Router::new()
        .route("/v1/keys", post(add_own_key).get(list_own_keys))
        .route("/v1/keys/{key_id}", delete(remove_own_key))
}

/// Parses a body that carries a secret; an error never quotes it.
fn secret_body<T: for<'de> Deserialize<'de>>(body: &[u8], shape: &str) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|_| {
        problem(
            StatusCode::BAD_REQUEST,
            &format!("the body must be JSON of the shape {shape}"),
            "invalid_input",
        )
    })
}

fn non_empty(secret: &str) -> Result<String, Response> {
    let secret = secret.trim();
    if secret.is_empty() {
        return Err(problem(StatusCode::BAD_REQUEST, "the secret is empty", "invalid_input"));
    }
    Ok(secret.to_string())
}

/// Asks the provider whether `key` works: what the check said, or the refusal to answer (422 a
/// rejected key, 502 no clear answer).
async fn check(ep: &Endpoint, key: &KeyRef) -> Result<String, Response> {
    let verdict = verdict_of(ep, key).await?;
    let said = keypool_mask::scrub(&validate::describe(&verdict), &key.secret);
    match verdict {
        Verdict::Accepted(_) | Verdict::NotCheckable(_) => Ok(said),
        Verdict::Rejected { .. } => Err(problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!("the provider rejected the key, {said}; nothing changed"),
            "key_rejected",
        )),
        Verdict::Unknown(_) => Err(problem(
            StatusCode::BAD_GATEWAY,
            &format!("the key check did not say: {said}; nothing changed"),
            "key_unchecked",
        )),
    }
}

/// The base URL the extension would give a key of this provider (the check must call the same
/// address the key will be called at).
fn base_url_of(provider: &str, given: Option<&str>) -> Result<String, Response> {
    given
        .map(str::to_string)
        .or_else(|| validate::default_base_url(provider).map(str::to_string))
        .ok_or_else(|| {
            problem(
                StatusCode::BAD_REQUEST,
                &format!("provider \"{provider}\" needs a base_url"),
                "invalid_input",
            )
        })
}

#[derive(Deserialize)]
struct ValidateBody {
    provider: String,
    secret: String,
    base_url: Option<String>,
    model: Option<String>,
}

/// `POST /allocation/keys/validate` `{provider, secret, base_url?, model?}`: whether the
/// provider accepts the key (200 `{"accepted": true, "label", "check"}`, or 422 with its
/// reason). Stores nothing.
async fn validate_key(State(ep): State<Arc<Endpoint>>, body: axum::body::Bytes) -> Response {
    admin(ep, |ep| async move {
        let b: ValidateBody = secret_body(&body, r#"{"provider": "...", "secret": "...", "base_url"?, "model"?}"#)?;
        let secret = non_empty(&b.secret)?;
        let key = KeyRef {
            id: 0,
            base_url: base_url_of(&b.provider, b.base_url.as_deref())?,
            provider: b.provider,
            model: b.model,
            label: keypool_mask::mask(&secret),
            secret,
        };
        let said = check(&ep, &key).await?;
        Ok(json!({"accepted": true, "label": key.label, "check": said}))
    })
    .await
}

#[derive(Deserialize)]
struct AddBody {
    pool: String,
    provider: String,
    secret: String,
    model: Option<String>,
    account: Option<String>,
    rpm: Option<i32>,
    rpd: Option<i32>,
    tpm: Option<i64>,
    tpd: Option<i64>,
    base_url: Option<String>,
    priority: Option<i32>,
    owner: Option<String>,
    validate: Option<bool>,
}

const ADD: &str = "SELECT keypool_add_key(pool => $1, provider => $2, secret => $3, model => $4, account => $5,
                                          rpm => $6, rpd => $7, tpm => $8, tpd => $9, base_url => $10,
                                          priority => $11, owner => $12)";

/// Checks (unless `validate: false`) and adds a key for an administrator; its row as
/// keypool_keys shows it.
async fn add_checked(ep: &Endpoint, b: AddBody, owner: Option<String>) -> Result<Value, Response> {
    let secret = non_empty(&b.secret)?;
    let check_said = if b.validate == Some(false) {
        "not checked (validate: false)".to_string()
    } else {
        let key = KeyRef {
            id: 0,
            provider: b.provider.clone(),
            model: b.model.clone(),
            base_url: base_url_of(&b.provider, b.base_url.as_deref())?,
            label: keypool_mask::mask(&secret),
            secret: secret.clone(),
        };
        check(ep, &key).await?
    };
    let (key_id, _) = add_in_transaction(ep, &b, &secret, owner.as_deref(), false, true).await?;
    let mut answer = rows_json(ep, KEY_AFTER, &[&key_id], true).await?;
    answer["check"] = json!(check_said);
    Ok(answer)
}

/// `keypool_add_key` in a transaction of its own, with the secret sealed for the call (no
/// statement log holds it) and, for an end user's key, users' rules whatever the worker's role
/// may do (`pg_keypool.acting_for_user`). The key's id and the address it is called at;
/// without `commit` nothing stays (a dry run: what the extension would say, and where).
async fn add_in_transaction(
    ep: &Endpoint,
    b: &AddBody,
    secret: &str,
    owner: Option<&str>,
    for_user: bool,
    commit: bool,
) -> Result<(i64, String), Response> {
    let refused = |e: tokio_postgres::Error| if for_user { user_refusal(e) } else { from_db(e.into()) };
    let mut client = ep.gateway.db.client().await.map_err(from_db)?;
    let tx = client.transaction().await.map_err(|e| from_db(e.into()))?;
    if for_user {
        tx.batch_execute("SET LOCAL pg_keypool.acting_for_user = on")
            .await
            .map_err(|e| from_db(e.into()))?;
    }
    let sealed = seal_with(&tx, secret, &keypool_transport::context_add(&b.pool, owner))
        .await
        .map_err(from_db)?;
    let row = tx
        .query_one(
            ADD,
            &[
                &b.pool,
                &b.provider,
                &sealed,
                &b.model,
                &b.account,
                &b.rpm,
                &b.rpd,
                &b.tpm,
                &b.tpd,
                &b.base_url,
                &b.priority,
                &owner,
            ],
        )
        .await
        .map_err(refused)?;
    let key_id: i64 = row.get(0);
    let at: String = tx
        .query_one("SELECT base_url FROM keypool_key_credentials($1)", &[&key_id])
        .await
        .map_err(|e| from_db(e.into()))?
        .get(0);
    if commit {
        tx.commit().await.map_err(|e| from_db(e.into()))?;
    } else {
        tx.rollback().await.map_err(|e| from_db(e.into()))?;
    }
    Ok((key_id, at))
}

/// `POST /allocation/keys` `{pool, provider, secret, model, account?, rpm?, rpd?, tpm?, tpd?,
/// base_url?, priority?, owner?, validate?}`: checks the key with its provider, then adds it;
/// a rejected key is 422 and nothing is added.
async fn add_key(State(ep): State<Arc<Endpoint>>, body: axum::body::Bytes) -> Response {
    admin(ep, |ep| async move {
        let b: AddBody = secret_body(
            &body,
            r#"{"pool": "...", "provider": "...", "secret": "...", "model"?, ...}"#,
        )?;
        let owner = b.owner.clone();
        add_checked(&ep, b, owner).await
    })
    .await
}

/// `DELETE /allocation/keys/<id>`: keypool_remove_key (history kept, users reassigned).
async fn remove_key(State(ep): State<Arc<Endpoint>>, Path(key_id): Path<String>) -> Response {
    admin(ep, |ep| async move {
        let key_id = key_number(&key_id)?;
        rows_json(
            &ep,
            "SELECT $1::bigint AS key_id, keypool_remove_key($1) AS users_moved",
            &[&key_id],
            true,
        )
        .await
    })
    .await
}

#[derive(Deserialize)]
struct RotateBody {
    secret: String,
    /// `false`: replace the secret without asking the provider first.
    validate: Option<bool>,
}

/// `POST /allocation/keys/<id>/rotate` `{"secret": "...", "validate"?}`: checks the new secret
/// with the key's provider, then keypool_rotate_secret; a rejected secret is 422 and nothing
/// changes.
async fn rotate_key(State(ep): State<Arc<Endpoint>>, Path(key_id): Path<String>, body: axum::body::Bytes) -> Response {
    admin(ep, |ep| async move {
        let key_id = key_number(&key_id)?;
        let b: RotateBody = secret_body(&body, r#"{"secret": "...", "validate"?: false}"#)?;
        let secret = non_empty(&b.secret)?;
        let client = ep.gateway.db.client().await.map_err(from_db)?;
        let row = client
            .query_one(
                "SELECT provider, model, base_url FROM keypool_key_credentials($1)",
                &[&key_id],
            )
            .await
            .map_err(|e| from_db(e.into()))?;
        drop(client);
        let checked = if b.validate == Some(false) {
            "not checked (validate: false)".to_string()
        } else {
            let key = KeyRef {
                id: key_id,
                provider: row.get(0),
                model: row.get(1),
                base_url: row.get(2),
                label: keypool_mask::mask(&secret),
                secret: secret.clone(),
            };
            check(&ep, &key).await?
        };
        let sealed = ep
            .gateway
            .db
            .seal_secret(&secret, &keypool_transport::context_rotate(key_id))
            .await
            .map_err(from_db)?;
        act(&ep, "SELECT keypool_rotate_secret($1, $2)", &[&key_id, &sealed]).await?;
        let mut answer = rows_json(&ep, KEY_AFTER, &[&key_id], true).await?;
        answer["check"] = json!(checked);
        Ok(answer)
    })
    .await
}

/// The user a key route acts for: only a token bound to a user manages keys of its own.
fn token_user(principal: &Principal) -> Result<String, Response> {
    match principal {
        Principal::Token(t) if t.user.is_some() => Ok(t.user.clone().unwrap_or_default()),
        _ => Err(problem(
            StatusCode::FORBIDDEN,
            "a user's own keys are managed with an API token bound to that user",
            "user_token_required",
        )),
    }
}

/// What a user may say of their own key: no owner (it is the token's user), no address, no
/// account, no skipping the check; anything else is refused rather than ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OwnKeyBody {
    pool: String,
    provider: String,
    secret: String,
    model: Option<String>,
    rpm: Option<i32>,
    rpd: Option<i32>,
    tpm: Option<i64>,
    tpd: Option<i64>,
    priority: Option<i32>,
}

/// `POST /v1/keys` `{pool, provider, secret, model?, rpm?, ...}`: adds a key owned by the
/// token's user to a pool the token may use. In three steps, so that nothing a user sends can
/// take room, capacity or an address from anyone else:
/// 1. a dry run of `keypool_add_key` (rolled back): every rule of the extension applies first
///    (the user's cap, the share of shared memory owned keys may take, providers that check keys
///    only, the address: where the pool's shared keys of the provider are called);
/// 2. the provider's verdict at that address, on the key and on a made-up key of the same shape:
///    the key must be accepted and the made-up one rejected (a server that accepts any key would
///    let an "own key" reach the shared backend beside the shared keys' limits);
/// 3. the key is added.
async fn add_own_key(
    State(ep): State<Arc<Endpoint>>,
    Extension(principal): Extension<Principal>,
    body: axum::body::Bytes,
) -> Response {
    admin(ep, |ep| async move {
        let user = token_user(&principal)?;
        if let Err(wait) = ep.may_add_key(&user) {
            let mut r = problem(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "at most {} own keys may be tried per minute (KEYPOOL_KEY_ADDS_PER_MINUTE)",
                    ep.key_adds_per_minute
                ),
                "too_many_key_additions",
            );
            if let Ok(v) = axum::http::HeaderValue::from_str(&wait.as_secs().max(1).to_string()) {
                r.headers_mut().insert("retry-after", v);
            }
            return Err(r);
        }
        let b: OwnKeyBody = secret_body(
            &body,
            r#"{"pool": "...", "provider": "...", "secret": "...", "model"?}"#,
        )?;
        if !principal.reaches(&b.pool) {
            return Err(problem(
                StatusCode::NOT_FOUND,
                &format!("no pool is named \"{}\"", b.pool),
                "model_not_found",
            ));
        }
        if let Some(m) = &b.model {
            check_model_name(m).map_err(|why| problem(StatusCode::BAD_REQUEST, &why, "invalid_model"))?;
        }
        let secret = non_empty(&b.secret)?;
        let add = AddBody {
            pool: b.pool,
            provider: b.provider,
            secret: secret.clone(),
            model: b.model,
            account: None,
            rpm: b.rpm,
            rpd: b.rpd,
            tpm: b.tpm,
            tpd: b.tpd,
            base_url: None,
            priority: b.priority,
            owner: None,
            validate: Some(false),
        };
        let (_, at) = add_in_transaction(&ep, &add, &secret, Some(&user), true, false).await?;
        let key = KeyRef {
            id: 0,
            provider: add.provider.clone(),
            model: add.model.clone(),
            base_url: at.clone(),
            label: keypool_mask::mask(&secret),
            secret: secret.clone(),
        };
        let said = check_own(&ep, &key).await?;
        let (key_id, now_at) = add_in_transaction(&ep, &add, &secret, Some(&user), true, true).await?;
        let mut answer = rows_json(&ep, KEY_AFTER, &[&key_id], true).await?;
        if now_at != at {
            // The pool's shared keys moved while the key was checked: not where it was checked.
            let _ = act(&ep, "SELECT keypool_remove_key($1)", &[&key_id]).await;
            return Err(problem(
                StatusCode::CONFLICT,
                "the pool's keys of that provider changed while the key was checked; try again",
                "key_moved",
            ));
        }
        if let Some(o) = answer.as_object_mut() {
            o.remove("reason");
            o.insert("check".into(), json!(said));
        }
        Ok(answer)
    })
    .await
}

/// The provider's verdict on a user's key: accepted, while a made-up key of the same shape is
/// rejected at the same address. Anything less is refused, nothing is stored.
async fn check_own(ep: &Endpoint, key: &KeyRef) -> Result<String, Response> {
    let verdict = verdict_of(ep, key).await?;
    let said = keypool_mask::scrub(&validate::describe(&verdict), &key.secret);
    match verdict {
        Verdict::Accepted(_) => {}
        Verdict::Rejected { .. } => {
            return Err(problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                &format!("the provider rejected the key, {said}; nothing changed"),
                "key_rejected",
            ))
        }
        Verdict::NotCheckable(_) | Verdict::Unknown(_) => {
            return Err(problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                &format!("the key could not be checked ({said}); own keys must be accepted by their provider, so nothing changed"),
                "key_unchecked",
            ))
        }
    }
    let probe = KeyRef {
        secret: made_up_like(&key.secret),
        label: "(made-up key)".into(),
        ..key.clone()
    };
    match verdict_of(ep, &probe).await? {
        Verdict::Rejected { .. } => Ok(said),
        _ => Err(problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the provider at this address accepts made-up keys too, so it cannot vouch for yours; nothing changed",
            "key_unchecked",
        )),
    }
}

async fn verdict_of(ep: &Endpoint, key: &KeyRef) -> Result<Verdict, Response> {
    tokio::time::timeout(CHECK_TIMEOUT, validate::check(&ep.gateway.http, &ep.gateway.db, key))
        .await
        .map_err(|_| {
            problem(
                StatusCode::BAD_GATEWAY,
                "the provider did not answer the key check in time; nothing changed",
                "provider_timeout",
            )
        })?
        .map_err(from_db)
}

/// A key of the same provider prefix and length as `secret`, made up at random.
fn made_up_like(secret: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let prefix = keypool_mask::prefix_of(secret);
    let n = secret.chars().count().saturating_sub(prefix.chars().count()).max(24);
    let mut out = String::from(prefix);
    for _ in 0..n {
        out.push(ALPHABET[rand::random_range(0..ALPHABET.len())] as char);
    }
    out
}

/// The extension's refusal of a user's key, in its own words (a 42501 here is about the key,
/// not about the worker's grants).
fn user_refusal(e: tokio_postgres::Error) -> Response {
    let e = crate::db::DbError::from(e);
    match e.sqlstate.as_deref() {
        Some("42501") => problem(StatusCode::FORBIDDEN, &e.message, "not_allowed"),
        _ => from_db(e),
    }
}

/// The user's own keys: `key_id, pool, provider, model, label, state, requests_today`.
const OWN_KEYS: &str =
    "SELECT k.key_id, k.pool, k.provider, k.model, k.label, k.state, s.key_requests_today AS requests_today
                          FROM keypool_keys k JOIN keypool_key_stats s USING (key_id)
                         WHERE k.owner = $1 AND ($2::text[] IS NULL OR k.pool = ANY ($2))
                         ORDER BY k.key_id";

/// `GET /v1/keys`: the token's user's own keys (masked label, state, use today).
async fn list_own_keys(State(ep): State<Arc<Endpoint>>, Extension(principal): Extension<Principal>) -> Response {
    admin(ep, |ep| async move {
        let user = token_user(&principal)?;
        let pools = principal.reach().pools;
        rows_json(&ep, OWN_KEYS, &[&user, &pools], false).await
    })
    .await
}

/// `DELETE /v1/keys/<id>`: removes one of the user's own keys; another's key, or none, is 404.
async fn remove_own_key(
    State(ep): State<Arc<Endpoint>>,
    Extension(principal): Extension<Principal>,
    Path(key_id): Path<String>,
) -> Response {
    admin(ep, |ep| async move {
        let user = token_user(&principal)?;
        let key_id = key_number(&key_id)?;
        let pools = principal.reach().pools;
        let theirs = rows_json(
            &ep,
            "SELECT count(*) AS n FROM keypool_keys WHERE key_id = $1 AND owner = $2
                AND ($3::text[] IS NULL OR pool = ANY ($3))",
            &[&key_id, &user, &pools],
            true,
        )
        .await?;
        if theirs["n"] != json!(1) {
            return Err(problem(
                StatusCode::NOT_FOUND,
                &format!("you have no key {key_id}"),
                "key_not_found",
            ));
        }
        act(&ep, "SELECT keypool_remove_key($1)", &[&key_id]).await?;
        Ok(json!({"key_id": key_id, "removed": true}))
    })
    .await
}
