//! The SQL request queue's public functions (the tables and the internal functions that do the
//! work are in `sql/queue.sql`).
//!
//! Each function checks the caller first, then calls the internal function as the extension's
//! owner with the caller's role as an argument (only the owner may call the internal ones):
//! - `keypool_submit` needs `use` on the pool, and refuses requests larger than
//!   `pg_keypool.max_request_bytes` before reading them;
//! - `keypool_result` answers about the caller's own requests (and every request of the pools
//!   it administers); others' requests do not exist for it;
//! - workers claim only requests of the pools their role may use, complete only what their role
//!   claimed, and report heartbeats only for worker ids of their role.

use pgrx::datum::{DatumWithOid, Interval, TimestampWithTimeZone};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::JsonB;

use crate::catalog::grants::{Grants, Privilege};
use crate::catalog::privilege;
use crate::engine::access::{self};
use crate::engine::args::check_user_id;
use crate::engine::composite::{self, Value};
use crate::errors::{self, Code};
use crate::settings;

const MAX_WORKER_ID: usize = 200;
const MAX_TEXT: usize = 1000;
const MAX_ERROR: usize = 64 * 1024;

fn text_arg<'a>(name: &str, v: Option<&'a str>, max: usize) -> &'a str {
    let Some(v) = v else {
        errors::null_argument(name).raise()
    };
    if v.is_empty() {
        errors::invalid(format!("{name} must not be empty")).raise();
    }
    if v.len() > max {
        errors::invalid(format!("{name} is longer than {max} bytes")).raise();
    }
    v
}

/// The size of a varlena argument once decompressed, read from its header only.
unsafe fn raw_size(datum: pg_sys::Datum) -> usize {
    unsafe { pg_sys::toast_raw_datum_size(datum) }
}

fn too_large(what: &str, size: usize) -> ! {
    let limit = settings::MAX_REQUEST_BYTES.get();
    errors::error(
        Code::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
        format!("{what} is {size} bytes; the limit is {limit} bytes"),
    )
    .hint("The limit is pg_keypool.max_request_bytes.")
    .raise()
}

/// A jsonb argument passed on to SPI as it is (never parsed here).
unsafe fn jsonb_arg(datum: Option<pg_sys::Datum>) -> DatumWithOid<'static> {
    match datum {
        Some(d) => unsafe { DatumWithOid::new(d, pg_sys::JSONBOID) },
        None => DatumWithOid::null_oid(pg_sys::JSONBOID),
    }
}

fn role_arg(role: pg_sys::Oid) -> DatumWithOid<'static> {
    unsafe { DatumWithOid::new(pg_sys::Datum::from(role), pg_sys::REGROLEOID) }
}

crate::pg_finfo_v1!(pg_finfo_keypool_submit_c);

/// `keypool_submit(user_id, pool, request jsonb, max_wait, max_attempts) RETURNS bigint`:
/// enqueues a chat request for the workers. Needs `use` on the pool.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn keypool_submit_c(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    unsafe {
        let _path = privilege::pin_search_path();
        let user = check_user_id(pgrx::fcinfo::pg_getarg::<&str>(fcinfo, 0));
        let Some(pool) = pgrx::fcinfo::pg_getarg::<&str>(fcinfo, 1) else {
            errors::null_argument("pool").raise()
        };
        let request = pgrx::fcinfo::pg_getarg_datum(fcinfo, 2);
        let grants = access::grants();
        access::pool_id(&grants, pool, Privilege::Use);
        if let Some(d) = request {
            let size = raw_size(d);
            if size > settings::MAX_REQUEST_BYTES.get() as usize {
                too_large("the request", size);
            }
        }
        let max_wait = pgrx::fcinfo::pg_getarg::<Interval>(fcinfo, 3);
        let max_attempts = pgrx::fcinfo::pg_getarg::<i32>(fcinfo, 4);
        let caller = privilege::caller();
        let id: Option<i64> = privilege::spi_as_owner(grants.owner, |client| {
            errors::spi(client.update(
                "SELECT keypool.enqueue($1, $2, $3, $4, $5, $6)",
                None,
                &[
                    role_arg(caller),
                    user.into(),
                    pool.into(),
                    jsonb_arg(request),
                    max_wait.into(),
                    max_attempts.into(),
                ],
            ))
            .first()
            .get_one::<i64>()
            .ok()
            .flatten()
        });
        match id {
            Some(id) => pg_sys::Datum::from(id),
            None => errors::error(Code::ERRCODE_INTERNAL_ERROR, "pg_keypool: the request was not stored").raise(),
        }
    }
}

crate::pg_finfo_v1!(pg_finfo_keypool_result_c);

/// `keypool_result(id, OUT status, OUT response, OUT error)`: status ('queued', 'running',
/// 'done', 'failed'), response and error of a request the caller submitted (or of any request of
/// a pool it administers). Other requests do not exist for the caller.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn keypool_result_c(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    unsafe {
        let _path = privilege::pin_search_path();
        let Some(id) = pgrx::fcinfo::pg_getarg::<i64>(fcinfo, 0) else {
            errors::null_argument("id").raise()
        };
        let grants = access::grants();
        let caller = privilege::caller();
        // The response is copied out of SPI's memory as a datum, never parsed.
        let row = privilege::spi_as_owner(grants.owner, |client| {
            let t = errors::spi(client.select(
                "SELECT r.status, r.response, r.error, r.submitted_by::oid, p.id
                   FROM keypool.request r LEFT JOIN keypool.pool p ON p.name = r.pool
                  WHERE r.id = $1",
                None,
                &[id.into()],
            ));
            if t.is_empty() {
                return None;
            }
            let t = t.first();
            let response = t
                .get_datum_by_ordinal(2)
                .ok()
                .flatten()
                .map(|d| pg_sys::SPI_datumTransfer(d, false, -1));
            Some((
                t.get::<String>(1).ok().flatten().unwrap_or_default(),
                response,
                t.get::<String>(3).ok().flatten(),
                t.get::<pg_sys::Oid>(4).ok().flatten().unwrap_or(pg_sys::Oid::INVALID),
                t.get::<i64>(5).ok().flatten(),
            ))
        });
        match row {
            Some((status, response, error, submitter, pool))
                if pg_sys::has_privs_of_role(caller, submitter) || grants.allows(caller, pool, Privilege::Admin) =>
            {
                composite::form(
                    fcinfo,
                    &[
                        Value::Text(&status),
                        response.map_or(Value::Null, Value::Datum),
                        Value::opt_text(error.as_deref()),
                    ],
                )
            }
            _ => errors::undefined(format!("request {id} does not exist"))
                .hint("keypool_result answers about the requests this role submitted.")
                .raise(),
        }
    }
}

/// The names of the pools the caller may use (a worker claims only their requests).
fn usable_pool_names(grants: &Grants) -> Vec<String> {
    access::pools_with(grants, privilege::caller(), Privilege::Use)
        .into_iter()
        .map(|(_, name)| name)
        .collect()
}

/// `keypool_claim_requests(worker, max_n, lease)`: for workers: claims due requests of the pools
/// the caller may use, under a lease (FOR UPDATE SKIP LOCKED).
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)]
fn keypool_claim_requests(
    worker: Option<&str>,
    max_n: Option<i32>,
    lease: Option<Interval>,
) -> TableIterator<
    'static,
    (
        name!(id, i64),
        name!(user_id, String),
        name!(pool, String),
        name!(request, JsonB),
        name!(attempts, i32),
    ),
> {
    let _path = privilege::pin_search_path();
    let worker = text_arg("worker", worker, MAX_WORKER_ID);
    let max_n = max_n.unwrap_or(0).clamp(0, 1000);
    let Some(lease) = lease else {
        errors::null_argument("lease").raise()
    };
    let grants = access::grants();
    let pools = usable_pool_names(&grants);
    let caller = privilege::caller();
    let rows = privilege::spi_as_owner(grants.owner, |client| {
        let t = errors::spi(client.update(
            "SELECT id, user_id, pool, request, attempts FROM keypool.claim_requests($1, $2, $3, $4, $5)",
            None,
            &[
                role_arg(caller),
                pools.into(),
                worker.into(),
                max_n.into(),
                lease.into(),
            ],
        ));
        t.filter_map(|r| {
            Some((
                r.get::<i64>(1).ok().flatten()?,
                r.get::<String>(2).ok().flatten()?,
                r.get::<String>(3).ok().flatten()?,
                r.get::<JsonB>(4).ok().flatten()?,
                r.get::<i32>(5).ok().flatten()?,
            ))
        })
        .collect::<Vec<_>>()
    });
    TableIterator::new(rows)
}

crate::pg_finfo_v1!(pg_finfo_keypool_complete_request_c);

/// `keypool_complete_request(id, worker, outcome, response, error, retry_at) RETURNS boolean`:
/// for workers: records how a request this role claimed ended. An answer larger than
/// `pg_keypool.max_request_bytes` is not stored: the request fails and says so.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn keypool_complete_request_c(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    unsafe {
        let _path = privilege::pin_search_path();
        let Some(id) = pgrx::fcinfo::pg_getarg::<i64>(fcinfo, 0) else {
            errors::null_argument("id").raise()
        };
        let worker = text_arg("worker", pgrx::fcinfo::pg_getarg::<&str>(fcinfo, 1), MAX_WORKER_ID);
        let mut outcome = pgrx::fcinfo::pg_getarg::<&str>(fcinfo, 2).map(str::to_string);
        let mut response = pgrx::fcinfo::pg_getarg_datum(fcinfo, 3);
        let mut error = pgrx::fcinfo::pg_getarg::<&str>(fcinfo, 4).map(str::to_string);
        let retry_at = pgrx::fcinfo::pg_getarg::<TimestampWithTimeZone>(fcinfo, 5);
        if let Some(d) = response {
            let size = raw_size(d);
            let limit = settings::MAX_REQUEST_BYTES.get() as usize;
            if size > limit {
                response = None;
                if outcome.as_deref() == Some("done") {
                    outcome = Some("failed".into());
                    error = Some(format!(
                        "the answer is {size} bytes, more than pg_keypool.max_request_bytes ({limit})"
                    ));
                }
            }
        }
        if let Some(e) = error.as_mut() {
            if e.len() > MAX_ERROR {
                let mut cut = MAX_ERROR;
                while !e.is_char_boundary(cut) {
                    cut -= 1;
                }
                e.truncate(cut);
            }
        }
        let grants = access::grants();
        let caller = privilege::caller();
        let done: Option<bool> = privilege::spi_as_owner(grants.owner, |client| {
            errors::spi(client.update(
                "SELECT keypool.complete_request($1, $2, $3, $4, $5, $6, $7)",
                None,
                &[
                    role_arg(caller),
                    id.into(),
                    worker.into(),
                    outcome.into(),
                    jsonb_arg(response),
                    error.into(),
                    retry_at.into(),
                ],
            ))
            .first()
            .get_one::<bool>()
            .ok()
            .flatten()
        });
        pg_sys::Datum::from(done.unwrap_or(false))
    }
}

/// `keypool_queue_wake_at()`: for workers: when the next request of the pools this role may use
/// falls due or the next lease runs out (NULL: nothing pending).
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_queue_wake_at() -> Option<TimestampWithTimeZone> {
    let _path = privilege::pin_search_path();
    let grants = access::grants();
    let pools = usable_pool_names(&grants);
    privilege::spi_as_owner(grants.owner, |client| {
        errors::spi(client.select("SELECT keypool.queue_wake_at($1)", None, &[pools.into()]))
            .first()
            .get_one::<TimestampWithTimeZone>()
            .ok()
            .flatten()
    })
}

/// Checks that no other role reports for worker id `worker`.
fn check_worker_role(client: &mut pgrx::spi::SpiClient<'_>, worker: &str, caller: pg_sys::Oid) {
    let t = errors::spi(client.update(
        "SELECT role::oid FROM keypool.worker WHERE id = $1 FOR UPDATE",
        None,
        &[worker.into()],
    ));
    if let Some(role) = t
        .into_iter()
        .next()
        .and_then(|r| r.get::<pg_sys::Oid>(1).ok().flatten())
    {
        if !unsafe { pg_sys::has_privs_of_role(caller, role) } {
            errors::error(
                Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("permission denied for worker \"{worker}\""),
            )
            .detail("Another role reports the heartbeats of this worker id.")
            .hint("Give each worker role ids of its own (--worker-id).")
            .raise();
        }
    }
}

/// `keypool_worker_heartbeat(...)`: for workers: records a heartbeat, with counts since the
/// worker started.
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_worker_heartbeat(
    worker: Option<&str>,
    version: Option<&str>,
    host: Option<&str>,
    pid: Option<i32>,
    started_at: Option<TimestampWithTimeZone>,
    served: Option<i64>,
    failed: Option<i64>,
    queue_done: Option<i64>,
) {
    let _path = privilege::pin_search_path();
    let worker = text_arg("worker", worker, MAX_WORKER_ID);
    let version = text_arg("version", version, MAX_WORKER_ID);
    let host = host.map(|h| text_arg("host", Some(h), MAX_TEXT));
    let Some(started_at) = started_at else {
        errors::null_argument("started_at").raise()
    };
    let grants = access::grants();
    let caller = privilege::caller();
    privilege::spi_as_owner(grants.owner, |client| {
        check_worker_role(client, worker, caller);
        errors::spi(client.update(
            "INSERT INTO keypool.worker AS w (id, version, host, pid, started_at, last_seen, served, failed, queue_done, role)
             VALUES ($1, $2, $3, $4, $5, now(), coalesce($6, 0), coalesce($7, 0), coalesce($8, 0), $9)
             ON CONFLICT (id) DO UPDATE SET version = excluded.version, host = excluded.host, pid = excluded.pid,
                 started_at = excluded.started_at, last_seen = now(), served = excluded.served,
                 failed = excluded.failed, queue_done = excluded.queue_done, stopped_at = NULL",
            None,
            &[
                worker.into(),
                version.into(),
                host.into(),
                pid.into(),
                started_at.into(),
                served.into(),
                failed.into(),
                queue_done.into(),
                role_arg(caller),
            ],
        ));
    });
}

/// `keypool_worker_stopped(worker)`: for workers: records a clean stop.
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_worker_stopped(worker: Option<&str>) {
    let _path = privilege::pin_search_path();
    let worker = text_arg("worker", worker, MAX_WORKER_ID);
    let grants = access::grants();
    let caller = privilege::caller();
    privilege::spi_as_owner(grants.owner, |client| {
        check_worker_role(client, worker, caller);
        errors::spi(client.update(
            "UPDATE keypool.worker w SET stopped_at = now(), last_seen = now() WHERE w.id = $1",
            None,
            &[worker.into()],
        ));
    });
}
