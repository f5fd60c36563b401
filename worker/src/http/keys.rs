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

use crate::gateway::validate::{self, Verdict};
use crate::http::admin::{act, admin, key_number, rows_json, KEY_AFTER};
use crate::http::credentials::Principal;
use crate::http::endpoint::Endpoint;
use crate::http::problem::{from_db, problem};
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
    let verdict = tokio::time::timeout(CHECK_TIMEOUT, validate::check(&ep.gateway.http, &ep.gateway.db, key))
        .await
        .map_err(|_| {
            problem(
                StatusCode::BAD_GATEWAY,
                "the provider did not answer the key check in time; nothing changed",
                "provider_timeout",
            )
        })?
        .map_err(from_db)?;
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

/// Checks (unless `validate: false`) and adds a key; its row as keypool_keys shows it.
/// `check_at`: the address the key will be called at, when the body does not say.
async fn add_checked(
    ep: &Endpoint,
    b: AddBody,
    owner: Option<String>,
    check_at: Option<String>,
) -> Result<Value, Response> {
    let secret = non_empty(&b.secret)?;
    let check_said = if b.validate == Some(false) {
        "not checked (validate: false)".to_string()
    } else {
        let key = KeyRef {
            id: 0,
            provider: b.provider.clone(),
            model: b.model.clone(),
            base_url: base_url_of(&b.provider, b.base_url.as_deref().or(check_at.as_deref()))?,
            label: keypool_mask::mask(&secret),
            secret: secret.clone(),
        };
        check(ep, &key).await?
    };
    let client = ep.gateway.db.client().await.map_err(from_db)?;
    let row = client
        .query_one(
            ADD,
            &[
                &b.pool,
                &b.provider,
                &secret,
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
        .map_err(|e| from_db(e.into()))?;
    drop(client);
    let key_id: i64 = row.get(0);
    let mut answer = rows_json(ep, KEY_AFTER, &[&key_id], true).await?;
    answer["check"] = json!(check_said);
    Ok(answer)
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
        add_checked(&ep, b, owner, None).await
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
        act(&ep, "SELECT keypool_rotate_secret($1, $2)", &[&key_id, &secret]).await?;
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
/// token's user to a pool the token may use, after the provider accepted it (always checked;
/// called where the pool's shared keys of that provider are, else at the provider's address).
async fn add_own_key(
    State(ep): State<Arc<Endpoint>>,
    Extension(principal): Extension<Principal>,
    body: axum::body::Bytes,
) -> Response {
    admin(ep, |ep| async move {
        let user = token_user(&principal)?;
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
        let add = AddBody {
            pool: b.pool,
            provider: b.provider,
            secret: b.secret,
            model: b.model,
            account: None,
            rpm: b.rpm,
            rpd: b.rpd,
            tpm: b.tpm,
            tpd: b.tpd,
            base_url: None,
            priority: b.priority,
            owner: None,
            validate: None,
        };
        // Her key is called where the pool's keys of that provider are (as the extension adds
        // it): check it there.
        let at = shared_address(&ep, &add.pool, &add.provider).await;
        let mut answer = add_checked(&ep, add, Some(user), at).await?;
        if let Some(o) = answer.as_object_mut() {
            o.remove("reason");
        }
        Ok(answer)
    })
    .await
}

/// Where the pool's shared keys of `provider` are called (what a user's own key inherits), if
/// the worker's role may read it.
async fn shared_address(ep: &Endpoint, pool: &str, provider: &str) -> Option<String> {
    let client = ep.gateway.db.client().await.ok()?;
    client
        .query_opt(
            "SELECT c.base_url FROM keypool_keys k, LATERAL keypool_key_credentials(k.key_id) c
              WHERE k.pool = $1 AND k.provider = $2 AND k.owner IS NULL ORDER BY k.key_id LIMIT 1",
            &[&pool, &provider],
        )
        .await
        .ok()
        .flatten()
        .map(|r| r.get(0))
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
        let pools = principal.pools();
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
        let pools = principal.pools();
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
