//! The `lmx` binary: parses configuration, sets up logging and hands off to the library.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use lmx::config::{Cli, Command, ServeArgs};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(err) = lmx::telemetry::init(cli.log_format, &cli.log_filter) {
        eprintln!("lmx: {err:#}");
        return ExitCode::from(2);
    }
    use lmx::cli::{generate, models, pull, verify};
    match cli.command {
        Command::Serve(args) => run_async(serve(*args)),
        Command::Verify(args) if args.client.server.is_none() => verify::run(&args),
        Command::Verify(args) => client(async move { Ok(verify::run_any(&args).await) }),
        Command::Pull(args) => client(async move { Ok(pull::run(*args).await) }),
        Command::Ls(args) => client(models::list(args, false)),
        Command::Ps(args) => client(models::list(args, true)),
        Command::Rm(args) => client(models::remove(args)),
        Command::Load(args) => client(models::load(args)),
        Command::Unload(args) => client(models::unload(args)),
        Command::Generate(args) => client(generate::generate(args)),
        Command::Chat(args) => client(generate::chat(args)),
    }
}

/// Runs a client command; its own errors (connection, bad flags) exit with code 2.
fn client(command: impl std::future::Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("lmx: starting the async runtime: {err}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(command) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("lmx: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs a command on a multi-threaded runtime; errors end the process with code 1.
fn run_async(command: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("lmx: starting the async runtime: {err}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "lmx failed");
            eprintln!("lmx: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args
        .resolve()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding --listen {}", args.listen))?;
    lmx::run(config, listener, shutdown_signal()).await
}

/// Resolves on the first SIGTERM or SIGINT; a second one ends the process at once.
async fn shutdown_signal() {
    wait_for_signal().await;
    tokio::spawn(async {
        wait_for_signal().await;
        tracing::warn!("second shutdown signal: exiting without draining");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(term) => term,
            Err(err) => {
                tracing::error!(%err, "cannot listen for SIGTERM; only Ctrl-C stops lmx");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
