//! Test harness: private PostgreSQL clusters and fresh databases for integration tests.
