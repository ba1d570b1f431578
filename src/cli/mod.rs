//! The `lmx` command line: the top-level parser and the subcommands other than `serve` (whose
//! flags live in `config`). Offline ones (`verify`) work on the cache directly; client ones talk
//! to a server over the same gRPC API as any other client. Nothing here names `api` or `server`.

pub mod client;
pub mod generate;
pub mod models;
pub mod pull;
pub mod run;
pub mod verify;

use clap::{Parser, Subcommand};

use crate::config::{LogFormat, ServeArgs};

/// lmx: pull, verify and serve language models over gRPC.
#[derive(Debug, Parser)]
#[command(name = "lmx", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Log output format.
    #[arg(long, env = "LMX_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty, global = true)]
    pub log_format: LogFormat,

    /// Log filter in tracing's EnvFilter syntax, e.g. `info` or `lmx=debug,tower=warn`.
    #[arg(long, env = "LMX_LOG", default_value = "info", global = true)]
    pub log_filter: String,
}

/// What lmx should do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC server.
    Serve(Box<ServeArgs>),
    /// Check that a model snapshot is complete, offline or on a server with --server (exit 0
    /// complete, 1 incomplete, 2 error).
    Verify(verify::VerifyArgs),
    /// Download a model with a progress display (exit 0, or 10 + the DownloadErrorCode).
    Pull(Box<pull::PullArgs>),
    /// Repair a model's snapshot on the server: re-fetch only the files that fail a FULL check
    /// (exit codes as for pull).
    Repair(Box<pull::RepairArgs>),
    /// List the models on disk and loaded.
    Ls(models::ListArgs),
    /// List the loaded models.
    Ps(models::ListArgs),
    /// Delete a model's snapshots from the server's cache.
    Rm(models::ModelArgs),
    /// Load a model into the engine.
    Load(models::LoadArgs),
    /// Unload a model.
    Unload(models::ModelArgs),
    /// Complete a prompt, printing tokens as they stream.
    Generate(generate::GenerateArgs),
    /// Chat with a model interactively.
    Chat(generate::ChatArgs),
    /// Answer one prompt (given after the model, or piped on stdin) and exit, or chat
    /// interactively when there is none (loads the model on demand).
    Run(run::RunArgs),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deploy_manifests_arguments_parse() {
        // deploy/k8s/base/deployment.yaml and components/prepull/init-container.yaml.
        let serve = [
            "lmx",
            "serve",
            "--listen",
            "0.0.0.0:50051",
            "--metrics-listen",
            "0.0.0.0:9090",
            "--cache-dir",
            "/models",
            "--drain-timeout",
            "30s",
            "--log-format",
            "json",
            "--admin-token-file",
            "/var/run/secrets/lmx/admin-token",
            "--inference-token-file",
            "/var/run/secrets/lmx/inference-token",
        ];
        Cli::try_parse_from(serve).unwrap();
        let pull = [
            "lmx",
            "pull",
            "--local",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "--cache-dir",
            "/models",
            "--include",
            "*.json",
            "--include",
            "*.safetensors",
            "--log-format",
            "json",
        ];
        Cli::try_parse_from(pull).unwrap();
    }

    #[test]
    fn serve_is_a_subcommand_with_its_flags() {
        let cli = Cli::try_parse_from(["lmx", "serve", "--model-root", "/m"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("expected serve");
        };
        assert_eq!(args.model_roots, [std::path::PathBuf::from("/m")]);
    }
}
