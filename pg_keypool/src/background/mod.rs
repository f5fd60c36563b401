//! Work outside callers' statements: the launcher, the usage flusher, and the hooks that create
//! shared memory and save it when the server stops.

pub mod history;
pub mod launcher;
pub mod startup;
