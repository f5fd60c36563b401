//! The subcommands besides `validate`: `serve` (the endpoint and the queue consumer),
//! `import-env` and `mock-provider`.

pub mod import_env;
pub mod mock;
pub mod serve;
