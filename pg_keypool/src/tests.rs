//! `#[pg_test]`s for internals that need a running server: the reservation ring, slot binding,
//! shared accounts. Each test runs in a transaction that is rolled back, concurrently with the
//! others in one database, so none of them sets the (per-database) test clock: time-dependent
//! behaviour is tested in the sequential pg_regress suite. The test cluster uses a small
//! reservation ring (see `pg_test::postgresql_conf_options` in lib.rs).

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn run(sql: &str) {
        Spi::run(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn one<T: pgrx::FromDatum + pgrx::IntoDatum>(sql: &str) -> T {
        Spi::get_one::<T>(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .unwrap_or_else(|| panic!("{sql}: NULL"))
    }

    #[pg_test]
    fn full_ring_expires_the_oldest_open_reservations_early() {
        run("SELECT keypool_create_pool('ring')");
        run("SELECT keypool_add_key('ring', 'openai', 'sk-ring-key-000000001')");
        let capacity = one::<i32>("SELECT reservation_capacity FROM keypool_status()") as i64;
        run(&format!(
            "CREATE TEMP TABLE opened AS
             SELECT i, (keypool_reserve('u' || i, 'ring')).reservation_id AS id FROM generate_series(1, {}) i",
            2 * capacity
        ));
        run(
            "CREATE OR REPLACE FUNCTION pg_temp.settle_outcome(id bigint) RETURNS text LANGUAGE plpgsql AS $$
             BEGIN RETURN keypool_settle(id, 200);
             EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE || ' ' || regexp_replace(SQLERRM, '[0-9]+', 'N'); END $$",
        );
        run("CREATE TEMP TABLE settled AS SELECT i, pg_temp.settle_outcome(id) AS outcome FROM opened ORDER BY i");
        // The ring holds at most `capacity` open reservations: the others ended early, and say so.
        let still_open = one::<i64>("SELECT count(*) FROM settled WHERE outcome = 'success'");
        assert!(still_open <= capacity, "{still_open} open in a ring of {capacity}");
        let unexpected = one::<String>(
            "SELECT coalesce(string_agg(DISTINCT outcome, '; '), '') FROM settled
              WHERE outcome NOT IN ('success', '55000 reservation N is no longer open')",
        );
        assert_eq!(unexpected, "");
        // The newest reservation is never the one expired.
        assert_eq!(
            one::<String>("SELECT outcome FROM settled ORDER BY i DESC LIMIT 1"),
            "success"
        );
        assert!(one::<i64>("SELECT reservations_expired_early FROM keypool_status()") >= capacity);
    }

    #[pg_test]
    fn keys_and_scopes_get_slots_when_first_used() {
        run("SELECT keypool_create_pool('slots')");
        run("SELECT keypool_add_key('slots', 'openai', 'sk-slot-key-' || i || '-000000', account => 'shared') FROM generate_series(1, 3) i");
        run("SELECT keypool_add_key('slots', 'openai', 'sk-slot-own-key-0000001')");
        assert!(one::<bool>("SELECT granted FROM keypool_reserve('u', 'slots')"));
        // Every key has a live slot (key_state lists only bound keys) ...
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM keypool.key_state() s JOIN keypool_keys k USING (key_id) WHERE k.pool = 'slots'"
            ),
            4
        );
        // ... and three keys share one account: two scopes, holding the one request.
        assert_eq!(
            one::<i64>("SELECT count(*) FROM keypool_scopes WHERE scope_id IN (SELECT scope_id FROM keypool_keys WHERE pool = 'slots')"),
            2
        );
        assert_eq!(
            one::<i64>("SELECT sum(requests_this_minute)::bigint FROM keypool_scopes WHERE scope_id IN (SELECT scope_id FROM keypool_keys WHERE pool = 'slots')"),
            1
        );
    }

    #[pg_test]
    fn requests_of_a_shared_account_count_once_for_all_its_keys() {
        run("SELECT keypool_create_pool('project')");
        // Gemini limits are per project: two keys of one project add no capacity.
        run("SELECT keypool_add_key('project', 'gemini', 'AIzaSy-project-key-' || i || '-0000', 'gemini-2.5-pro', account => 'proj-1', rpm => 2) FROM generate_series(1, 2) i");
        assert_eq!(
            one::<i64>("SELECT count(*) FILTER (WHERE (r).granted) FROM (SELECT keypool_reserve('u' || i, 'project') r FROM generate_series(1, 5) i) s"),
            2
        );
    }
}
