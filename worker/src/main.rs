//! keypool-worker: reserves capacity through pg_keypool's SQL API, calls providers, and settles
//! the outcome. The provider calls, the OpenAI-compatible endpoint and the SQL request queue
//! arrive with the worker issue; policy never lives here.

fn main() {
    let version = env!("CARGO_PKG_VERSION");
    match std::env::args().nth(1).as_deref() {
        Some("--version") | Some("-V") => println!("keypool-worker {version}"),
        _ => {
            eprintln!("keypool-worker {version}: no subcommands yet (see README)");
            std::process::exit(2);
        }
    }
}
