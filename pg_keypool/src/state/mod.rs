//! Shared memory: the region and its slots, the member cache, open reservations, the clock, and
//! the state file that carries them across a restart.

pub mod breaker;
pub mod callers;
pub mod clock;
pub mod lock;
pub mod members;
pub mod open_count;
pub mod persist;
pub mod provider_hold;
pub mod registry;
pub mod reservation;
pub mod shmem;
pub mod slots;
pub mod txn;
