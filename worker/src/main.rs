//! keypool-worker's command line; see the library's modules for what each command does.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use keypool_worker::config::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

fn init_logging(cli: &Cli) -> Result<(), String> {
    let filter = EnvFilter::try_new(&cli.log).map_err(|e| format!("KEYPOOL_LOG / --log \"{}\": {e}", cli.log))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli) {
        eprintln!("keypool-worker: {e}");
        return ExitCode::from(2);
    }
    if let Command::Serve(args) = &cli.command {
        if let Err(e) = args.validate() {
            eprintln!("keypool-worker serve: {e}");
            return ExitCode::from(2);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keypool-worker: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => keypool_worker::commands::serve::run(args)
                .await
                .map(|_| ExitCode::SUCCESS),
            Command::ImportEnv(args) => keypool_worker::commands::import_env::run(args)
                .await
                .map(|_| ExitCode::SUCCESS),
            Command::Validate(args) => keypool_worker::gateway::validate::run(args).await,
            Command::MockProvider(args) => keypool_worker::commands::mock::run(args)
                .await
                .map(|_| ExitCode::SUCCESS),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keypool-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}
