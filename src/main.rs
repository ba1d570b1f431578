//! The `lmx` binary: parses configuration, sets up logging and hands off to the library.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use lmx::{
    cli::{Cli, Command},
    config::ServeArgs,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(err) = lmx::telemetry::init(cli.log_format, &cli.log_filter) {
        eprintln!("lmx: {err:#}");
        return ExitCode::from(2);
    }
    use lmx::cli::{generate, models, pull, run, verify};
    match cli.command {
        Command::Serve(args) => run_async(serve(*args)),
        Command::Verify(args) if args.client.server.is_none() => verify::run(&args),
        Command::Verify(args) => client(async move { Ok(verify::run_any(&args).await) }),
        Command::Pull(args) => {
            client(async move { Ok(pull::run(*args, lmx::api::convert::progress).await) })
        }
        Command::Repair(args) => client(async move { Ok(pull::repair(*args).await) }),
        Command::Ls(args) => client(models::list(args, false)),
        Command::Ps(args) => client(models::list(args, true)),
        Command::Rm(args) => client(models::remove(args)),
        Command::Load(args) => client(models::load(args)),
        Command::Unload(args) => client(models::unload(args)),
        Command::Generate(args) => client(generate::generate(args)),
        Command::Chat(args) => client(generate::chat(args)),
        Command::Run(args) => client(run::run(args)),
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
    let config =
        lmx::Config::from_args(&args).map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    // Signal handlers go in before the port opens: a SIGTERM that follows the first call must
    // drain, not kill the process with the default action.
    let shutdown = shutdown_signal().context("installing the SIGTERM/SIGINT handlers")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding --listen {}", args.listen))?;
    lmx::run(config, listener, shutdown).await
}

/// Resolves on the first SIGTERM or SIGINT; a second one ends the process at once. The handlers
/// are installed when this is called, not when the future is first polled.
#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::warn!("second shutdown signal: exiting without draining");
            std::process::exit(130);
        });
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
        tokio::spawn(async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::warn!("second shutdown signal: exiting without draining");
            std::process::exit(130);
        });
    })
}
