//! `lmx ls`, `lmx ps`, `lmx rm`, `lmx load`, `lmx unload`: the model catalog over gRPC.

use std::process::ExitCode;

use clap::Args;
use serde_json::json;

use super::client::{describe, ClientArgs};
use crate::pb;

/// Flags of `lmx ls` and `lmx ps`.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `lmx rm`, `lmx unload`.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Repository id (or, for unload, the folder path it was loaded from).
    pub model: String,

    /// Revision (rm: every revision when omitted; unload: main).
    #[arg(long, default_value = "")]
    pub revision: String,

    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `lmx load`.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// A model reference in the server's cache (org/name, org/name@rev, org/name:Q4_K_M,
    /// org/name/file.gguf), an alias, or an absolute folder path on the server.
    pub model: String,

    #[arg(long, default_value = "")]
    pub revision: String,

    /// Weight type in memory: f32, f16 or bf16 (default: the server's).
    #[arg(long)]
    pub dtype: Option<crate::config::DtypeArg>,

    /// Device: cpu, cuda or cuda:N (default: the server's).
    #[arg(long)]
    pub device: Option<String>,

    /// Unload after this much idle time (e.g. 10m; 0s: never).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub keep_alive: Option<std::time::Duration>,

    /// Name the model by this alias from now on (LoadModel.alias).
    #[arg(long, default_value = "")]
    pub alias: String,

    #[command(flatten)]
    pub client: ClientArgs,
}

fn failed(command: &str, status: &tonic::Status) -> ExitCode {
    eprintln!("lmx {command}: {}", describe(status));
    ExitCode::from(1)
}

fn state_name(m: &pb::ModelInfo) -> &'static str {
    m.state().as_str_name().trim_start_matches("MODEL_STATE_")
}

fn model_json(m: &pb::ModelInfo) -> serde_json::Value {
    json!({
        "model_id": m.model_id,
        "revision": m.revision,
        "commit_sha": m.commit_sha,
        "state": state_name(m),
        "format": m.format().as_str_name().trim_start_matches("WEIGHT_FORMAT_"),
        "architecture": m.architecture,
        "size_on_disk_bytes": m.size_on_disk_bytes,
        "memory_bytes": m.memory_bytes,
        "refs": m.refs,
        "path": m.path,
        "request_count": m.request_count,
        "requests_in_flight": m.requests_in_flight,
        "tokens_generated": m.tokens_generated,
        "context_length": m.context_length,
        "device": m.device,
        "state_message": m.state_message,
        "aliases": m.aliases,
        "gguf_file": m.gguf_file,
        "quantization": m.quantization,
        "gguf_file_bytes": m.gguf_file_bytes,
    })
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

fn table(rows: Vec<Vec<String>>) -> String {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            r.iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `lmx ls` (every model on disk and loaded) or `lmx ps` (loaded only).
pub async fn list(args: ListArgs, loaded_only: bool) -> anyhow::Result<ExitCode> {
    let command = if loaded_only { "ps" } else { "ls" };
    let client = args.client.connect().await?;
    let response = client
        .admin()
        .list_models(client.request(pb::ListModelsRequest { loaded_only }))
        .await;
    let models = match response {
        Ok(r) => r.into_inner().models,
        Err(status) => return Ok(failed(command, &status)),
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&models.iter().map(model_json).collect::<Vec<_>>())?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let human = |b: u64| {
        if b == 0 {
            "-".to_owned()
        } else {
            indicatif::HumanBytes(b).to_string()
        }
    };
    let mut rows = vec![if loaded_only {
        [
            "MODEL",
            "REVISION",
            "ARCH",
            "MEMORY",
            "REQUESTS",
            "IN FLIGHT",
            "DEVICE",
        ]
        .map(String::from)
        .to_vec()
    } else {
        [
            "MODEL", "REVISION", "STATE", "FORMAT", "QUANT", "ARCH", "SIZE", "ALIASES", "COMMIT",
        ]
        .map(String::from)
        .to_vec()
    }];
    for m in &models {
        rows.push(if loaded_only {
            vec![
                m.model_id.clone(),
                m.revision.clone(),
                m.architecture.clone(),
                human(m.memory_bytes),
                m.request_count.to_string(),
                m.requests_in_flight.to_string(),
                m.device.clone(),
            ]
        } else {
            vec![
                m.model_id.clone(),
                m.revision.clone(),
                state_name(m).to_owned(),
                m.format()
                    .as_str_name()
                    .trim_start_matches("WEIGHT_FORMAT_")
                    .to_owned(),
                dash(&m.quantization),
                m.architecture.clone(),
                // A GGUF file's own size; other formats: the snapshot's.
                human(if m.gguf_file.is_empty() {
                    m.size_on_disk_bytes
                } else {
                    m.gguf_file_bytes
                }),
                dash(&m.aliases.join(",")),
                m.commit_sha.chars().take(12).collect(),
            ]
        });
    }
    println!("{}", table(rows));
    Ok(ExitCode::SUCCESS)
}

/// `lmx rm`.
pub async fn remove(args: ModelArgs) -> anyhow::Result<ExitCode> {
    let client = args.client.connect().await?;
    let request = client.request(pb::DeleteModelRequest {
        model_id: args.model.clone(),
        revision: args.revision,
    });
    match client.admin().delete_model(request).await {
        Ok(r) => {
            let r = r.into_inner();
            println!(
                "deleted {} ({} snapshot(s), {} freed)",
                args.model,
                r.deleted_commits.len(),
                indicatif::HumanBytes(r.freed_bytes)
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(status) => Ok(failed("rm", &status)),
    }
}

/// `lmx load`.
pub async fn load(args: LoadArgs) -> anyhow::Result<ExitCode> {
    let client = args.client.connect().await?;
    let options = pb::LoadOptions {
        dtype: match args.dtype {
            None => pb::Dtype::Unspecified,
            Some(crate::config::DtypeArg::F32) => pb::Dtype::F32,
            Some(crate::config::DtypeArg::F16) => pb::Dtype::F16,
            Some(crate::config::DtypeArg::Bf16) => pb::Dtype::Bf16,
        } as i32,
        device: args.device.unwrap_or_default(),
        keep_alive: args.keep_alive.map(|d| prost_types::Duration {
            seconds: d.as_secs() as i64,
            nanos: d.subsec_nanos() as i32,
        }),
    };
    let request = client.request(pb::LoadModelRequest {
        model_id: args.model.clone(),
        revision: args.revision,
        options: Some(options),
        alias: args.alias,
    });
    match client.admin().load_model(request).await {
        Ok(r) => {
            let r = r.into_inner();
            let m = r.model.unwrap_or_default();
            if r.already_loaded {
                println!("{} was already loaded", args.model);
            } else {
                let took = r
                    .load_time
                    .map(|d| d.seconds as f64 + d.nanos as f64 / 1e9)
                    .unwrap_or(0.0);
                let mut format = m
                    .format()
                    .as_str_name()
                    .trim_start_matches("WEIGHT_FORMAT_")
                    .to_owned();
                if !m.gguf_file.is_empty() {
                    format.push_str(&format!(" {}", m.gguf_file));
                    if !m.quantization.is_empty() {
                        format.push_str(&format!(" [{}]", m.quantization));
                    }
                }
                println!(
                    "loaded {} ({}, {format}, {} in memory) in {took:.2}s",
                    args.model,
                    m.architecture,
                    indicatif::HumanBytes(m.memory_bytes)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(status) => Ok(failed("load", &status)),
    }
}

/// `lmx unload`.
pub async fn unload(args: ModelArgs) -> anyhow::Result<ExitCode> {
    let client = args.client.connect().await?;
    let request = client.request(pb::UnloadModelRequest {
        model_id: args.model.clone(),
        revision: args.revision,
    });
    match client.admin().unload_model(request).await {
        Ok(r) => {
            println!(
                "unloaded {} ({} freed)",
                args.model,
                indicatif::HumanBytes(r.into_inner().freed_memory_bytes)
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(status) => Ok(failed("unload", &status)),
    }
}
