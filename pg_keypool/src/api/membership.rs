//! The SQL functions that change a pool's membership: `keypool_assign`, the signup trigger
//! `keypool_on_signup`, `keypool_backfill`, `keypool_rebalance`, `keypool_remove_key` and
//! `keypool_set_user_weight`.

use std::collections::HashSet;
use std::sync::atomic::Ordering::{AcqRel, Acquire};

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::{pg_sys, spi, AnyNumeric};

use crate::catalog::config::{self};
use crate::catalog::grants::Privilege;
use crate::catalog::model::Config;
use crate::catalog::privilege;
use crate::engine::access::{self};
use crate::engine::args::check_user_id;
use crate::engine::assign::{apply, assign, assign_locked, before_of, pool_or_error, track, with_pool, Change};
use crate::engine::key_tree::{add_assigned, ensure_tree, key_slot_in, least_loaded, tree_keys};
use crate::engine::member_cache;
use crate::engine::member_cache::{as_owner, rows, stored_by_user};
use crate::engine::member_load::too_many_weights;
use crate::errors::{self, Code};
use crate::policy::rebalance::rebalance_plan;
use crate::policy::shares::{NEVER, WEIGHT_SCALE};
use crate::state::clock;
use crate::state::members::{self};
use crate::state::registry;
use crate::state::shmem::{self, Shared};
use crate::state::txn;

/// Rows handled per step of a backfill.
const BATCH: i64 = 10_000;
/// Largest weight a user can get.
const MAX_WEIGHT: i64 = 1_000_000;

/// `keypool_assign`: the user's key in the pool; a new user gets the usable key with the fewest
/// users (ties: lowest id). Idempotent.
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_assign(user_id: Option<&str>, pool: default!(Option<&str>, "'default'")) -> i64 {
    let _path = privilege::pin_search_path();
    let user = check_user_id(user_id);
    let Some(pool) = pool else {
        errors::null_argument("pool").raise()
    };
    access::pool(&config::current(), pool, Privilege::Use);
    assign(user, pool).1
}

/// The group number of a key (stable within its pool).
fn group_of(cfg: &Config, key_id: i64) -> Option<i32> {
    cfg.key_by_id(key_id).map(|k| k.group_no)
}

/// Reads a user id column of a supported type as text.
fn id_as_text(tuple: &PgHeapTuple<'_, impl pgrx::WhoAllocated>, column: &str, type_oid: pg_sys::Oid) -> Option<String> {
    let get_err = |e: pgrx::datum::TryFromDatumError| -> ! {
        errors::error(
            Code::ERRCODE_DATATYPE_MISMATCH,
            format!("cannot read column \"{column}\": {e}"),
        )
        .raise()
    };
    match type_oid {
        pg_sys::TEXTOID | pg_sys::VARCHAROID | pg_sys::BPCHAROID => {
            tuple.get_by_name::<String>(column).unwrap_or_else(|e| get_err(e))
        }
        pg_sys::INT4OID => tuple
            .get_by_name::<i32>(column)
            .unwrap_or_else(|e| get_err(e))
            .map(|v| v.to_string()),
        pg_sys::INT8OID => tuple
            .get_by_name::<i64>(column)
            .unwrap_or_else(|e| get_err(e))
            .map(|v| v.to_string()),
        pg_sys::INT2OID => tuple
            .get_by_name::<i16>(column)
            .unwrap_or_else(|e| get_err(e))
            .map(|v| v.to_string()),
        pg_sys::UUIDOID => tuple
            .get_by_name::<pgrx::Uuid>(column)
            .unwrap_or_else(|e| get_err(e))
            .map(|v| uuid_text(&v)),
        other => unsupported_id_type(column, other),
    }
}

fn uuid_text(u: &pgrx::Uuid) -> String {
    let b = u.as_bytes();
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn unsupported_id_type(column: &str, oid: pg_sys::Oid) -> ! {
    errors::error(
        Code::ERRCODE_DATATYPE_MISMATCH,
        format!(
            "user id column \"{column}\" has an unsupported type (oid {})",
            oid.to_u32()
        ),
    )
    .hint("User id columns may be text, varchar, uuid, smallint, integer or bigint.")
    .raise()
}

fn is_supported_id_type(oid: pg_sys::Oid) -> bool {
    matches!(
        oid,
        pg_sys::TEXTOID
            | pg_sys::VARCHAROID
            | pg_sys::BPCHAROID
            | pg_sys::INT2OID
            | pg_sys::INT4OID
            | pg_sys::INT8OID
            | pg_sys::UUIDOID
    )
}

/// `keypool_on_signup(pool, id_column [, group_column])`: a trigger that assigns the new row's
/// user in the pool and, when a group column is named, writes the key's group number into it.
#[pg_trigger]
fn keypool_on_signup<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, impl pgrx::WhoAllocated>>, pgrx::datum::TryFromDatumError> {
    let _path = privilege::pin_search_path();
    let args = trigger.extra_args().unwrap_or_default();
    if !(2..=3).contains(&args.len()) {
        errors::invalid("keypool_on_signup takes the pool, the user id column and optionally the group column")
            .hint("CREATE TRIGGER t BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION keypool_on_signup('chat', 'id', 'api_key_group')")
            .raise();
    }
    let (pool, id_column, group_column) = (&args[0], &args[1], args.get(2).filter(|g| !g.is_empty()));
    if !matches!(trigger.level(), pgrx::PgTriggerLevel::Row) {
        errors::invalid("keypool_on_signup must be a FOR EACH ROW trigger").raise();
    }
    let before = matches!(trigger.when(), Ok(pgrx::PgTriggerWhen::Before));
    if group_column.is_some() && !before {
        errors::invalid("keypool_on_signup writes the group column only as a BEFORE trigger")
            .hint("Use BEFORE INSERT, or leave out the group column.")
            .raise();
    }
    let Some(new) = trigger.new() else {
        errors::invalid("keypool_on_signup runs on INSERT or UPDATE").raise()
    };
    let rel = trigger
        .relation()
        .unwrap_or_else(|e| errors::invalid(e.to_string()).raise());
    let desc = rel.tuple_desc();
    let type_of = |name: &str| -> Option<pg_sys::Oid> {
        desc.iter()
            .find(|a| !a.is_dropped() && a.name() == name)
            .map(|a| a.type_oid().value())
    };
    let Some(id_type) = type_of(id_column) else {
        errors::error(
            Code::ERRCODE_UNDEFINED_COLUMN,
            format!("column \"{id_column}\" does not exist"),
        )
        .raise()
    };
    if !is_supported_id_type(id_type) {
        unsupported_id_type(id_column, id_type);
    }
    let Some(user) = id_as_text(&new, id_column, id_type) else {
        errors::error(
            Code::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            format!("the new row's \"{id_column}\" is NULL"),
        )
        .raise()
    };
    // The role inserting the row (current_user) must hold `use` on the pool.
    access::pool(&config::current(), pool, Privilege::Use);
    let (cfg, key_id) = assign(check_user_id(Some(&user)), pool);
    let mut new = new.into_owned();
    if let Some(group_column) = group_column {
        let group = group_of(&cfg, key_id);
        match check_group_column(group_column, type_of(group_column), "the table") {
            pg_sys::INT8OID => new.set_by_name(group_column, group.map(i64::from))?,
            pg_sys::INT2OID => new.set_by_name(group_column, group.map(|g| g as i16))?,
            _ => new.set_by_name(group_column, group)?,
        }
    }
    Ok(Some(new))
}

/// Checks that a group column exists and holds integers; returns its type.
fn check_group_column(column: &str, type_oid: Option<pg_sys::Oid>, table: &str) -> pg_sys::Oid {
    match type_oid {
        Some(t @ (pg_sys::INT2OID | pg_sys::INT4OID | pg_sys::INT8OID)) => t,
        Some(_) => errors::error(
            Code::ERRCODE_DATATYPE_MISMATCH,
            format!("group column \"{column}\" must be an integer column"),
        )
        .raise(),
        None => errors::error(
            Code::ERRCODE_UNDEFINED_COLUMN,
            format!("column \"{column}\" of {table} does not exist"),
        )
        .raise(),
    }
}

/// Column type of `table.column`, as (type oid, SQL type name).
fn column_type(table: pg_sys::Oid, column: &str) -> Option<(pg_sys::Oid, String)> {
    Spi::connect(|client| {
        let t = errors::spi(client.select(
            "SELECT atttypid, format_type(atttypid, atttypmod) FROM pg_catalog.pg_attribute
              WHERE attrelid = $1 AND attname = $2 AND attnum > 0 AND NOT attisdropped",
            None,
            &[table.into(), column.into()],
        ));
        rows(t, |r| {
            (
                r.get::<pg_sys::Oid>(1).ok().flatten(),
                r.get::<String>(2).ok().flatten(),
            )
        })
        .into_iter()
        .next()
        .and_then(|(o, n)| Some((o?, n?)))
    })
}

/// `keypool_backfill`: assigns every user of an existing table (seed 004's migration), in
/// batches, balanced and idempotent; writes group numbers when a group column is named. Returns
/// how many users were newly assigned.
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_backfill(
    tbl: Option<pgrx::PgRelation>,
    id_column: Option<&str>,
    pool: default!(Option<&str>, "'default'"),
    group_column: default!(Option<&str>, "NULL"),
) -> i64 {
    let _path = privilege::pin_search_path();
    let sh = shmem::shared();
    let Some(tbl) = tbl.map(|r| r.oid()) else {
        errors::null_argument("tbl").raise()
    };
    let Some(id_column) = id_column else {
        errors::null_argument("id_column").raise()
    };
    let Some(pool_name) = pool else {
        errors::null_argument("pool").raise()
    };
    access::pool(&config::current(), pool_name, Privilege::Use);
    let table_name: String = Spi::get_one_with_args("SELECT $1::regclass::text", &[tbl.into()])
        .ok()
        .flatten()
        .unwrap_or_else(|| errors::undefined(format!("relation {} does not exist", tbl.to_u32())).raise());
    let Some((id_type, id_type_name)) = column_type(tbl, id_column) else {
        errors::error(
            Code::ERRCODE_UNDEFINED_COLUMN,
            format!("column \"{id_column}\" of {table_name} does not exist"),
        )
        .raise()
    };
    if !is_supported_id_type(id_type) {
        unsupported_id_type(id_column, id_type);
    }
    let group_column = group_column.filter(|g| !g.is_empty());
    if let Some(g) = group_column {
        check_group_column(g, column_type(tbl, g).map(|c| c.0), &table_name);
    }
    let id = spi::quote_identifier(id_column);
    let total: i64 = Spi::get_one(&format!("SELECT count(*) FROM {table_name}"))
        .ok()
        .flatten()
        .unwrap_or(0);
    let cfg = config::current();
    let pool = pool_or_error(&cfg, pool_name);
    let pool_id = pool.id;
    let mut last: Option<String> = None;
    let (mut seen, mut added) = (0i64, 0i64);
    loop {
        // The next batch of user ids, in the id column's own order.
        let users: Vec<String> = Spi::connect(|client| {
            // Qualified, so that ORDER BY sorts by the column's own type, not by the text
            // output column of the same name.
            let sql =
                format!(
                "SELECT t.{id}::text FROM {table_name} AS t WHERE t.{id} IS NOT NULL {} ORDER BY t.{id} LIMIT {BATCH}",
                if last.is_some() { format!("AND t.{id} > $1::{id_type_name}") } else { String::new() }
            );
            let args: Vec<DatumWithOid<'_>> = last.iter().map(|l| l.as_str().into()).collect();
            let t = errors::spi(client.select(&sql, None, &args));
            rows(t, |r| r.get::<String>(1).ok().flatten().unwrap_or_default())
        });
        let Some(tail) = users.last().cloned() else { break };
        seen += users.len() as i64;
        added += assign_batch(sh, pool_name, pool_id, &users);
        if let Some(g) = group_column {
            write_groups(
                pool_name,
                &table_name,
                &id,
                &id_type_name,
                &spi::quote_identifier(g),
                &users,
            );
        }
        notice!("keypool_backfill: {seen} of {total} rows of {table_name}, {added} users newly assigned to pool \"{pool_name}\"");
        last = Some(tail);
        if (users.len() as i64) < BATCH {
            break;
        }
    }
    added
}

/// Assigns the users of one batch that are not members yet; returns how many.
fn assign_batch(sh: &'static Shared, pool_name: &str, pool_id: i64, users: &[String]) -> i64 {
    let cfg = config::current();
    let pool = pool_or_error(&cfg, pool_name);
    let hash_of = |u: &str| members::user_hash(cfg.owner.instance, pool_id, u);
    let hashes: Vec<u64> = users.iter().map(|u| hash_of(u)).collect();
    let stored = stored_by_user(&cfg, pool, users, &hashes);
    let new: Vec<(&String, u64)> = users
        .iter()
        .zip(hashes)
        .filter(|(_, h)| {
            stored
                .get(h)
                .is_none_or(|s| s.key_id == 0 || key_slot_in(&cfg, pool, s.key_id).is_none())
        })
        .collect();
    if new.is_empty() {
        return 0;
    }
    let (cfg, (keys, gen, changes)) = with_pool(pool_name, |cfg, pool, shares| {
        let gen = sh.pool(pool.slot).members_gen.load(Acquire);
        let mut keys = Vec::with_capacity(new.len());
        let mut changes = Vec::new();
        for &(_, h) in &new {
            let (key, change) = assign_locked(sh, cfg, pool, shares, h, stored.get(&h))?;
            keys.push(key);
            changes.extend(change);
        }
        Ok((keys, gen, changes))
    });
    let pool = pool_or_error(&cfg, pool_name);
    let tracked = track(sh, pool.slot, gen, changes);
    let names: Vec<String> = new.iter().map(|u| u.0.clone()).collect();
    let sql_hashes: Vec<i64> = new.iter().map(|u| members::hash_to_sql(u.1)).collect();
    // Rows written: new members, and members whose key was removed.
    let written: HashSet<u64> = as_owner(&cfg, |client| {
        let t = errors::spi(client.update(
            "INSERT INTO keypool.member AS m (pool_id, user_id, user_hash, key_id)
             SELECT $1, u, h, k FROM unnest($2::text[], $3::bigint[], $4::bigint[]) AS t(u, h, k)
             ON CONFLICT (pool_id, user_id) DO UPDATE SET key_id = excluded.key_id
              WHERE m.key_id IS NULL
                 OR NOT EXISTS (SELECT 1 FROM keypool.key k WHERE k.id = m.key_id AND k.removed_at IS NULL)
             RETURNING m.user_hash",
            None,
            &[pool_id.into(), names.into(), sql_hashes.into(), keys.into()],
        ));
        rows(t, |r| {
            members::hash_from_sql(r.get::<i64>(1).ok().flatten().unwrap_or(0))
        })
        .into_iter()
        .collect()
    });
    // Users another transaction assigned meanwhile keep that assignment.
    let not_made: HashSet<u64> = new.iter().map(|u| u.1).filter(|h| !written.contains(h)).collect();
    tracked.revert_now(&not_made);
    (new.len() - not_made.len()) as i64
}

/// Writes each user's group number into the application's table.
fn write_groups(pool_name: &str, table: &str, id: &str, id_type: &str, group: &str, users: &[String]) {
    let cfg = config::current();
    let pool = pool_or_error(&cfg, pool_name);
    let assigned: Vec<(String, i64)> = as_owner(&cfg, |client| {
        let t = errors::spi(client.select(
            "SELECT m.user_id, m.key_id FROM unnest($2::text[]) AS u(id)
               JOIN keypool.member m ON m.pool_id = $1 AND m.user_id = u.id AND m.key_id IS NOT NULL",
            None,
            &[pool.id.into(), users.to_vec().into()],
        ));
        rows(t, |r| {
            (
                r.get::<String>(1).ok().flatten().unwrap_or_default(),
                r.get::<i64>(2).ok().flatten().unwrap_or(0),
            )
        })
    });
    let (ids, groups): (Vec<String>, Vec<Option<i32>>) =
        assigned.into_iter().map(|(u, k)| (u, group_of(&cfg, k))).unzip();
    // As the caller: the application's table is theirs to write.
    Spi::connect_mut(|client| {
        errors::spi(client.update(
            &format!(
                "UPDATE {table} AS t SET {group} = v.g FROM unnest($1::text[], $2::int[]) AS v(u, g)
                  WHERE t.{id} = v.u::{id_type} AND t.{group} IS DISTINCT FROM v.g"
            ),
            None,
            &[ids.into(), groups.into()],
        ));
    });
}

/// Moves users of `pool` from the keys listed in `moves` (user id, hash, from key, to key) in
/// the table and in shared memory.
fn apply_moves(sh: &'static Shared, pool_name: &str, moves: &[(String, u64, i64, i64)]) {
    if moves.is_empty() {
        return;
    }
    let (cfg, (gen, changes)) = with_pool(pool_name, |cfg, pool, shares| {
        let gen = sh.pool(pool.slot).members_gen.load(Acquire);
        let mut changes = Vec::new();
        for (_, hash, from, to) in moves {
            // Only the key changes: the class stays whatever it is.
            let c = Change {
                hash: *hash,
                was_member: true,
                before_key: *from,
                before_class: 0,
                after_key: *to,
                after_class: 0,
                last_active: NEVER,
                from_slot: key_slot_in(cfg, pool, *from).unwrap_or(u32::MAX),
                to_slot: key_slot_in(cfg, pool, *to).unwrap_or(u32::MAX),
                key_only: true,
            };
            apply(sh, shares, pool.slot, &c);
            changes.push(c);
        }
        Ok((gen, changes))
    });
    let pool = pool_or_error(&cfg, pool_name);
    track(sh, pool.slot, gen, changes);
    let users: Vec<String> = moves.iter().map(|m| m.0.clone()).collect();
    let keys: Vec<i64> = moves.iter().map(|m| m.3).collect();
    as_owner(&cfg, |client| {
        errors::spi(client.update(
            "UPDATE keypool.member m SET key_id = v.k FROM unnest($2::text[], $3::bigint[]) AS v(u, k)
              WHERE m.pool_id = $1 AND m.user_id = v.u",
            None,
            &[pool.id.into(), users.into(), keys.into()],
        ));
    });
}

/// Users of a key, most recently assigned first.
fn users_of_key(cfg: &Config, pool_id: i64, key_id: i64, limit: Option<i64>) -> Vec<(String, u64)> {
    as_owner(cfg, |client| {
        let t = errors::spi(client.select(
            "SELECT user_id, user_hash FROM keypool.member WHERE pool_id = $1 AND key_id = $2
              ORDER BY assigned_at DESC, user_id LIMIT $3",
            None,
            &[pool_id.into(), key_id.into(), limit.into()],
        ));
        rows(t, |r| {
            (
                r.get::<String>(1).ok().flatten().unwrap_or_default(),
                members::hash_from_sql(r.get::<i64>(2).ok().flatten().unwrap_or(0)),
            )
        })
    })
}

/// `keypool_rebalance`: after keys were added or removed, moves the fewest users needed so that
/// the usable keys' user counts differ by at most one. Returns how many moved.
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_rebalance(pool: default!(Option<&str>, "'default'")) -> i64 {
    let _path = privilege::pin_search_path();
    let sh = shmem::shared();
    let Some(pool_name) = pool else {
        errors::null_argument("pool").raise()
    };
    access::pool(&config::current(), pool_name, Privilege::Admin);
    let (cfg, counts) = with_pool(pool_name, |cfg, pool, shares| {
        ensure_tree(sh, cfg, pool, shares)?;
        Ok(tree_keys(cfg, pool)
            .iter()
            .map(|k| (k.id, sh.key(k.slot).assigned.load(Acquire)))
            .collect::<Vec<_>>())
    });
    let pool = pool_or_error(&cfg, pool_name);
    let plan = rebalance_plan(&counts);
    let mut takers: Vec<(i64, i64)> = plan.iter().filter(|p| p.1 < 0).map(|&(k, d)| (k, -d)).collect();
    let mut moves: Vec<(String, u64, i64, i64)> = Vec::new();
    for &(from, surplus) in plan.iter().filter(|p| p.1 > 0) {
        for (user, hash) in users_of_key(&cfg, pool.id, from, Some(surplus)) {
            let Some(taker) = takers.iter_mut().find(|t| t.1 > 0) else {
                break;
            };
            taker.1 -= 1;
            moves.push((user, hash, from, taker.0));
        }
    }
    apply_moves(sh, pool_name, &moves);
    if !moves.is_empty() {
        record_event(
            &cfg,
            "rebalanced",
            Some(pool.id),
            None,
            &format!("moved {} users", moves.len()),
        );
    }
    moves.len() as i64
}

/// `keypool_remove_key`: takes a key out of its pool for good and reassigns its users to the
/// least-loaded remaining keys. Its history is kept. Returns how many users moved.
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_remove_key(key_id: Option<i64>) -> i64 {
    let _path = privilege::pin_search_path();
    let sh = shmem::shared();
    let Some(key_id) = key_id else {
        errors::null_argument("key_id").raise()
    };
    let cfg = config::current();
    access::key(&cfg, key_id, Privilege::Admin);
    if remove_owned_key(sh, &cfg, key_id) {
        return 0;
    }
    // Known before the removal: afterwards the configuration no longer has the key.
    let removed_slot = cfg.key_by_id(key_id).map(|k| k.slot);
    let pool_name: Option<String> = as_owner(&cfg, |client| {
        let t = errors::spi(client.update(
            "UPDATE keypool.key k SET removed_at = now() FROM keypool.pool p
              WHERE k.id = $1 AND k.removed_at IS NULL AND p.id = k.pool_id RETURNING p.name",
            None,
            &[key_id.into()],
        ));
        rows(t, |r| r.get::<String>(1).ok().flatten())
            .into_iter()
            .next()
            .flatten()
    });
    let Some(pool_name) = pool_name else {
        errors::undefined(format!("key {key_id} does not exist")).raise()
    };
    // This transaction now sees the pool without the key.
    let cfg = config::current();
    let pool = pool_or_error(&cfg, &pool_name);
    let users = users_of_key(&cfg, pool.id, key_id, None);
    let (cfg, targets) = with_pool(&pool_name, |cfg, pool, shares| {
        ensure_tree(sh, cfg, pool, shares)?;
        let mut targets = Vec::with_capacity(users.len());
        for _ in &users {
            let Some(to) = least_loaded(sh, shares) else {
                errors::error(
                    Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!("pool \"{pool_name}\" would have no usable key left for its users"),
                )
                .hint("Add another key first, or disable this one instead of removing it.")
                .raise()
            };
            let slot = key_slot_in(cfg, pool, to).unwrap_or(u32::MAX);
            add_assigned(sh, shares, slot, to, 1);
            targets.push((to, slot));
        }
        // Counted again by apply_moves.
        for &(to, slot) in &targets {
            add_assigned(sh, shares, slot, to, -1);
        }
        Ok(targets.into_iter().map(|t| t.0).collect::<Vec<_>>())
    });
    let moves: Vec<(String, u64, i64, i64)> = users
        .into_iter()
        .zip(targets)
        .map(|((u, h), to)| (u, h, key_id, to))
        .collect();
    apply_moves(sh, &pool_name, &moves);
    let pool = pool_or_error(&cfg, &pool_name);
    if let Some(slot) = removed_slot {
        let ks = sh.key(slot);
        if ks.tag.is(cfg.owner, key_id) {
            let before = ks.assigned.swap(0, AcqRel);
            txn::on_abort(move || {
                let ks = sh.key(slot);
                if ks.tag.id() == key_id {
                    ks.assigned.fetch_add(before, AcqRel);
                }
            });
        }
    }
    record_event(
        &cfg,
        "key_removed",
        Some(pool.id),
        Some(key_id),
        &format!("{} users reassigned", moves.len()),
    );
    moves.len() as i64
}

/// Removes a user's own key for good, with its account (an owned key's account is its own) and
/// history, so that adding and removing own keys accumulates no rows; its shared-memory slots
/// are given back when the transaction commits. False when the key is not an owned one (it is
/// then removed as a shared key: history kept, users reassigned).
fn remove_owned_key(sh: &'static Shared, cfg: &Config, key_id: i64) -> bool {
    let removed: Option<(String, i64, String)> = as_owner(cfg, |client| {
        let t = errors::spi(client.update(
            "DELETE FROM keypool.key k USING keypool.pool p
              WHERE k.id = $1 AND k.owner IS NOT NULL AND k.removed_at IS NULL AND p.id = k.pool_id
          RETURNING p.name, k.scope_id, k.owner",
            None,
            &[key_id.into()],
        ));
        let row = rows(t, |r| {
            Some((
                r.get::<String>(1).ok().flatten()?,
                r.get::<i64>(2).ok().flatten()?,
                r.get::<String>(3).ok().flatten()?,
            ))
        })
        .into_iter()
        .next()
        .flatten();
        if let Some((_, scope_id, _)) = &row {
            errors::spi(client.update(
                "DELETE FROM keypool.scope s WHERE s.id = $1
                    AND NOT EXISTS (SELECT 1 FROM keypool.key k WHERE k.scope_id = s.id)",
                None,
                &[(*scope_id).into()],
            ));
        }
        row
    });
    let Some((pool_name, scope_id, owner)) = removed else {
        return false;
    };
    let slots = cfg.key_by_id(key_id).map(|k| (k.slot, cfg.scope_of(k).slot));
    let db_owner = cfg.owner;
    // Only if the removal itself commits: a savepoint rolled back around it keeps the key.
    let undone = std::rc::Rc::new(std::cell::Cell::new(false));
    let mark = undone.clone();
    txn::on_abort(move || mark.set(true));
    txn::at_end(move |committed| {
        if let (true, false, Some((key_slot, scope_slot))) = (committed, undone.get(), slots) {
            registry::release(sh, db_owner, Some((key_slot, key_id)), Some((scope_slot, scope_id)));
        }
    });
    let pool_id = cfg.pool_by_name(&pool_name).map(|p| p.id);
    record_event(
        cfg,
        "key_removed",
        pool_id,
        Some(key_id),
        &format!("own key of {owner} removed with its account and history"),
    );
    true
}

/// `keypool_set_user_weight`: the user's weight in the pool's fair share (tiers: free 1, pro 5
/// ...). Assigns the user first if needed. A share already fixed today keeps until tomorrow.
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_set_user_weight(user_id: Option<&str>, pool: Option<&str>, weight: Option<AnyNumeric>) {
    let _path = privilege::pin_search_path();
    let sh = shmem::shared();
    let user = check_user_id(user_id);
    let Some(pool_name) = pool else {
        errors::null_argument("pool").raise()
    };
    access::pool(&config::current(), pool_name, Privilege::Use);
    let Some(weight) = weight else {
        errors::null_argument("weight").raise()
    };
    let w: f64 = weight.clone().try_into().unwrap_or(f64::NAN);
    if !(w > 0.0 && w <= MAX_WEIGHT as f64) {
        errors::invalid(format!(
            "weight must be greater than 0 and at most {MAX_WEIGHT}, not {weight}"
        ))
        .raise();
    }
    let milli = ((w * WEIGHT_SCALE as f64).round() as i64).max(1);
    let (cfg, _) = assign(user, pool_name);
    let pool = pool_or_error(&cfg, pool_name);
    let hash = members::user_hash(cfg.owner.instance, pool.id, user);
    let stored = member_cache::lookup(&cfg, pool, user);
    let (cfg, (gen, change)) = with_pool(pool_name, |_, pool, shares| {
        let gen = sh.pool(pool.slot).members_gen.load(Acquire);
        let cached = {
            let stripe = sh.members.stripe(hash);
            stripe.find(hash, pool.slot).map(|i| *stripe.at(i))
        };
        let before = before_of(shares, pool, cached.as_ref(), stored.as_ref());
        let class = shares.class_of(milli).unwrap_or_else(|| too_many_weights(&pool.name));
        let change = Change {
            hash,
            was_member: true,
            before_key: before.key_id,
            before_class: before.class,
            after_key: before.key_id,
            after_class: class,
            last_active: before.last_active,
            from_slot: u32::MAX,
            to_slot: u32::MAX,
            key_only: false,
        };
        apply(sh, shares, pool.slot, &change);
        Ok((gen, change))
    });
    let pool = pool_or_error(&cfg, pool_name);
    track(sh, pool.slot, gen, vec![change]);
    as_owner(&cfg, |client| {
        errors::spi(client.update(
            "UPDATE keypool.member SET weight = $3 WHERE pool_id = $1 AND user_id = $2",
            None,
            &[pool.id.into(), user.into(), weight.into()],
        ));
    });
}

fn record_event(cfg: &Config, kind: &str, pool_id: Option<i64>, key_id: Option<i64>, reason: &str) {
    as_owner(cfg, |client| {
        errors::spi(client.update(
            "INSERT INTO keypool.event (at, kind, pool_id, key_id, reason) VALUES ($1, $2, $3, $4, $5)",
            None,
            &[
                clock::to_timestamptz(clock::now_ms()).into(),
                kind.into(),
                pool_id.into(),
                key_id.into(),
                reason.into(),
            ],
        ));
    });
}
