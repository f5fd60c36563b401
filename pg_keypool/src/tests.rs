//! `#[pg_test]`s for internals that need a running server (shared memory, SPI, the config cache).
//! Each test runs in a transaction that is rolled back.

use pgrx::prelude::*;

fn setup_pool(name: &str, keys: usize, rpm: i32) {
    Spi::run(&format!("SELECT keypool_create_pool('{name}')")).unwrap();
    for i in 0..keys {
        Spi::run(&format!("SELECT keypool_add_key('{name}', 'openai', 'sk-{name}-secret-{i:04}', 'gpt-4o-mini', rpm => {rpm})"))
            .unwrap();
    }
}

#[pg_test]
fn reserve_round_robins_over_the_pool() {
    setup_pool("rr", 3, 100);
    let keys: Vec<i64> = (0..6)
        .map(|_| {
            Spi::get_one::<i64>("SELECT key_id FROM keypool_reserve('u', 'rr')")
                .unwrap()
                .unwrap()
        })
        .collect();
    // Consecutive reservations walk the keys in order.
    assert_ne!(keys[0], keys[1]);
    assert_ne!(keys[1], keys[2]);
    assert_eq!(keys[0], keys[3]);
    assert_eq!(keys[1], keys[4]);
}
