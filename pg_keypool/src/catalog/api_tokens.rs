//! API tokens as reservations see them: a token's id and limits, found by its SHA-256 in
//! `keypool.api_token` and kept per backend until any token is created, changed or revoked (a
//! generation in shared memory, bumped when such a transaction ends).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::Ordering;

use crate::catalog::model::Config;
use crate::catalog::privilege;
use crate::policy::minute::UserLimits;
use crate::state::clock;
use crate::state::shmem::Shared;
use crate::state::txn;

/// Tokens a backend keeps; beyond, it starts over.
const CACHE_ENTRIES: usize = 4096;

/// A valid token's limits.
#[derive(Clone, Copy, Debug)]
pub struct TokenLimits {
    pub id: i64,
    /// `rpm`, `tpm` and `max_concurrent` (never a share).
    pub limits: UserLimits,
    /// Requests per UTC day (0: none).
    pub rpd: u64,
    /// When it expires (None: never).
    pub expires_ms: Option<i64>,
}

impl TokenLimits {
    pub fn any(&self) -> bool {
        self.limits.any() || self.rpd > 0
    }
}

struct Cache {
    generation: u64,
    tokens: HashMap<[u8; 32], Option<TokenLimits>>,
}

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(Cache { generation: u64::MAX, tokens: HashMap::new() });
}

/// The limits of the token whose SHA-256 is `digest`, if it is valid now (known, not revoked,
/// not expired).
pub fn limits_of(sh: &Shared, cfg: &Config, digest: &[u8]) -> Option<TokenLimits> {
    let key: [u8; 32] = digest.try_into().ok()?;
    let generation = sh.header.tokens_generation.load(Ordering::Acquire);
    let cached = CACHE.with_borrow_mut(|c| {
        if c.generation != generation {
            c.generation = generation;
            c.tokens.clear();
        }
        c.tokens.get(&key).copied()
    });
    let found = match cached {
        Some(found) => found,
        None => {
            let found = read(cfg, &key);
            CACHE.with_borrow_mut(|c| {
                if c.tokens.len() >= CACHE_ENTRIES {
                    c.tokens.clear();
                }
                c.tokens.insert(key, found);
            });
            found
        }
    };
    found.filter(|t| t.expires_ms.is_none_or(|at| at > clock::real_now_ms()))
}

fn read(cfg: &Config, digest: &[u8; 32]) -> Option<TokenLimits> {
    privilege::spi_as_owner(cfg.extension_owner, |client| {
        let t = client
            .select(
                "SELECT id, coalesce(rpm, 0)::bigint, coalesce(tpm, 0), coalesce(rpd, 0)::bigint,
                        coalesce(max_concurrent, 0), (extract(epoch FROM expires_at) * 1000)::bigint
                   FROM keypool.api_token WHERE token_sha256 = $1 AND revoked_at IS NULL",
                None,
                &[digest.to_vec().into()],
            )
            .ok()?;
        let row = t.first();
        let id = row.get::<i64>(1).ok().flatten()?;
        let get = |i: usize| row.get::<i64>(i).ok().flatten().unwrap_or(0).max(0) as u64;
        Some(TokenLimits {
            id,
            limits: UserLimits {
                share_milli: 0,
                rpm: get(2),
                tpm: get(3),
                max_concurrent: row.get::<i32>(5).ok().flatten().unwrap_or(0).max(0) as u32,
            },
            rpd: get(4),
            expires_ms: row.get::<i64>(6).ok().flatten(),
        })
    })
}

/// A token was created, changed or revoked: every backend reads tokens again, now and once
/// this transaction has ended (a backend that read the old row meanwhile reads it again).
pub fn changed(sh: &'static Shared) {
    sh.header.tokens_generation.fetch_add(1, Ordering::AcqRel);
    txn::at_end(move |_| {
        sh.header.tokens_generation.fetch_add(1, Ordering::AcqRel);
    });
}
