//! Settings (GUCs). Sizes are fixed when the server starts; the rest reload on SIGHUP.

use std::ffi::CString;

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};

pub static MAX_SCOPES: GucSetting<i32> = GucSetting::<i32>::new(4096);
pub static MAX_KEYS: GucSetting<i32> = GucSetting::<i32>::new(4096);
pub static MAX_POOLS: GucSetting<i32> = GucSetting::<i32>::new(256);
pub static MAX_RESERVATIONS: GucSetting<i32> = GucSetting::<i32>::new(131_072);
pub static MAX_MEMBERS: GucSetting<i32> = GucSetting::<i32>::new(1_048_576);
pub static MAX_CALLERS: GucSetting<i32> = GucSetting::<i32>::new(16_384);
pub static LEASE_MS: GucSetting<i32> = GucSetting::<i32>::new(600_000);
pub static DEFAULT_COOLDOWN_MS: GucSetting<i32> = GucSetting::<i32>::new(60_000);
pub static BREAKER_THRESHOLD: GucSetting<i32> = GucSetting::<i32>::new(5);
pub static BREAKER_COOLDOWN_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);
pub static STATE_SAVE_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1_000);
pub static FLUSH_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);
pub static EVENT_RETENTION_MIN: GucSetting<i32> = GucSetting::<i32>::new(30 * 24 * 60);
pub static WORKER_SILENCE_MS: GucSetting<i32> = GucSetting::<i32>::new(60_000);
pub static ALERT_THRESHOLD: GucSetting<f64> = GucSetting::<f64>::new(0.8);
pub static CONCURRENT_USER_RPM: GucSetting<f64> = GucSetting::<f64>::new(0.5);
/// Where the master keys live (keyring.rs); relative paths are in the data directory.
pub const DEFAULT_MASTER_KEY_FILE: &str = "pg_keypool.keyring";
pub static MASTER_KEY_FILE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"pg_keypool.keyring"));
pub static MAX_COOLDOWN_MS: GucSetting<i32> = GucSetting::<i32>::new(86_400_000);
pub static MAX_REQUEST_BYTES: GucSetting<i32> = GucSetting::<i32>::new(1 << 20);
pub static REQUEST_RETENTION_MIN: GucSetting<i32> = GucSetting::<i32>::new(7 * 24 * 60);
pub static MAX_OWNED_KEYS_PER_USER: GucSetting<i32> = GucSetting::<i32>::new(5);
pub static OWNED_KEY_SHARE: GucSetting<f64> = GucSetting::<f64>::new(0.5);
pub static ACTING_FOR_USER: GucSetting<bool> = GucSetting::<bool>::new(false);

/// Registers the settings. Called from `_PG_init`. The sizes of shared memory can only be
/// defined while the server starts (`preloading`); when the library is loaded later they would
/// have no effect, and PostgreSQL refuses to define them.
pub fn define(preloading: bool) {
    if preloading {
        define_sizes();
    }
    define_reloadable();
}

fn define_sizes() {
    let postmaster = |name, short, long, setting, min, max| {
        GucRegistry::define_int_guc(
            name,
            short,
            long,
            setting,
            min,
            max,
            GucContext::Postmaster,
            GucFlags::default(),
        )
    };
    postmaster(
        c"pg_keypool.max_scopes",
        c"Most quota scopes (accounts per model) kept in shared memory.",
        c"Each scope holds its rolling minute and day windows (about 1.7 kB). Needs a restart.",
        &MAX_SCOPES,
        16,
        1_000_000,
    );
    postmaster(
        c"pg_keypool.max_keys",
        c"Most keys kept in shared memory.",
        c"Each key holds its circuit breaker and unflushed usage counters. Needs a restart.",
        &MAX_KEYS,
        16,
        1_000_000,
    );
    postmaster(
        c"pg_keypool.max_pools",
        c"Most pools kept in shared memory.",
        c"Needs a restart.",
        &MAX_POOLS,
        4,
        100_000,
    );
    postmaster(
        c"pg_keypool.max_reservations",
        c"Size of the ring of open reservations.",
        c"A reservation still open when the ring wraps around to its slot is expired early (its \
          estimate stays charged). Size it above requests per second times the longest provider \
          call. Needs a restart.",
        &MAX_RESERVATIONS,
        1_024,
        16_777_216,
    );
    postmaster(
        c"pg_keypool.max_members",
        c"Entries of the shared-memory cache of pool members (user x pool) and guests of the day.",
        c"Members active recently are cached (64 bytes each; the default takes 64 MiB); the others \
          are read from keypool.member on their first reservation of the day and evicted again \
          when room is short. Keep it above the members active on a day (10 % of 5 million is \
          500,000). Needs a restart.",
        &MAX_MEMBERS,
        16_384,
        100_000_000,
    );
    postmaster(
        c"pg_keypool.max_callers",
        c"Entries for users of pools with limits per user and minute, granted within the last minute.",
        c"Only pools with minute_share, user_rpm, user_tpm or user_max_concurrent use them (about \
          460 bytes each; the default takes 7 MiB). A user granted when every entry near theirs \
          is live is served by the keys' limits alone, and counted in keypool_status. Needs a \
          restart.",
        &MAX_CALLERS,
        1_024,
        16_777_216,
    );
}

fn define_reloadable() {
    let sighup_ms = |name, short, long, setting, min, max| {
        GucRegistry::define_int_guc(
            name,
            short,
            long,
            setting,
            min,
            max,
            GucContext::Sighup,
            GucFlags::UNIT_MS,
        )
    };
    sighup_ms(
        c"pg_keypool.lease",
        c"How long a reservation may stay open before it expires.",
        c"An expired reservation keeps its estimate charged and can no longer be settled or released.",
        &LEASE_MS,
        1_000,
        86_400_000,
    );
    sighup_ms(
        c"pg_keypool.default_cooldown",
        c"How long a scope cools down after a rate-limit answer that carried no retry-after.",
        c"",
        &DEFAULT_COOLDOWN_MS,
        1,
        86_400_000,
    );
    sighup_ms(
        c"pg_keypool.breaker_cooldown",
        c"How long a key stays out after its circuit breaker opens, before one trial request.",
        c"",
        &BREAKER_COOLDOWN_MS,
        1,
        86_400_000,
    );
    sighup_ms(
        c"pg_keypool.state_save_interval",
        c"How often the launcher saves rate-window state to disk.",
        c"After a crash, state since the last save is assumed to have been used up to the limits.",
        &STATE_SAVE_INTERVAL_MS,
        100,
        3_600_000,
    );
    sighup_ms(
        c"pg_keypool.flush_interval",
        c"How often usage counters are written to the hourly history.",
        c"",
        &FLUSH_INTERVAL_MS,
        100,
        3_600_000,
    );
    sighup_ms(
        c"pg_keypool.worker_silence",
        c"A worker whose last heartbeat is older than this is reported in keypool_alerts.",
        c"",
        &WORKER_SILENCE_MS,
        1_000,
        86_400_000,
    );
    GucRegistry::define_string_guc(
        c"pg_keypool.master_key_file",
        c"The keyring file holding the master keys that seal provider secrets.",
        c"Relative paths are in the data directory. Mode 0600; standbys and restores need it too. \
          Only the server's configuration can set it.",
        &MASTER_KEY_FILE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    sighup_ms(
        c"pg_keypool.max_cooldown",
        c"Longest cooldown a settled rate-limit answer can put on an account.",
        c"A retry_after_ms above it is cut to it, so that no report takes an account out for long.",
        &MAX_COOLDOWN_MS,
        1_000,
        604_800_000,
    );
    GucRegistry::define_int_guc(
        c"pg_keypool.max_request_bytes",
        c"Largest request keypool_submit accepts, in bytes.",
        c"Larger requests are refused with SQLSTATE 54000 before anything is stored.",
        &MAX_REQUEST_BYTES,
        1_024,
        1 << 30,
        GucContext::Sighup,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_int_guc(
        c"pg_keypool.request_retention",
        c"How long finished queue requests are kept; older ones are deleted in the background.",
        c"",
        &REQUEST_RETENTION_MIN,
        1,
        100 * 365 * 24 * 60,
        GucContext::Sighup,
        GucFlags::UNIT_MIN,
    );
    GucRegistry::define_int_guc(
        c"pg_keypool.event_retention",
        c"How long keypool_events keeps events; older ones are deleted in the background.",
        c"",
        &EVENT_RETENTION_MIN,
        1,
        100 * 365 * 24 * 60,
        GucContext::Sighup,
        GucFlags::UNIT_MIN,
    );
    GucRegistry::define_float_guc(
        c"pg_keypool.alert_threshold",
        c"Fraction of a limit at which a scope is reported in keypool_alerts.",
        c"",
        &ALERT_THRESHOLD,
        0.01,
        1.0,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_float_guc(
        c"pg_keypool.concurrent_user_rpm",
        c"Requests per minute one concurrently active user sends (keypool_health's estimate).",
        c"",
        &CONCURRENT_USER_RPM,
        0.001,
        1_000_000.0,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_keypool.max_owned_keys_per_user",
        c"Most own keys one user may have in one pool (bring your own key).",
        c"keypool_add_key(..., owner => ...) beyond it is refused with SQLSTATE 53400.",
        &MAX_OWNED_KEYS_PER_USER,
        0,
        10_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_float_guc(
        c"pg_keypool.owned_key_share",
        c"Fraction of pg_keypool.max_keys and pg_keypool.max_scopes that users' own keys may take.",
        c"Counted over every database of the server; the rest is kept for the pools' shared keys. \
          An own key beyond it is refused with SQLSTATE 53400 when it is added.",
        &OWNED_KEY_SHARE,
        0.0,
        1.0,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_keypool.acting_for_user",
        c"The session adds keys for an end user: users' rules for own keys apply, whatever its role may do.",
        c"keypool-worker sets it (SET LOCAL) on its users' key routes, so that an end user never gets \
          an administrator's latitude through the worker's role. It only restricts: anyone may set it.",
        &ACTING_FOR_USER,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_keypool.breaker_threshold",
        c"Consecutive server errors (5xx, timeouts) that take a key out of rotation.",
        c"",
        &BREAKER_THRESHOLD,
        1,
        1_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
}

pub fn lease_ms() -> i64 {
    LEASE_MS.get() as i64
}

pub fn max_cooldown_ms() -> i64 {
    MAX_COOLDOWN_MS.get() as i64
}
