//! `lmx verify <model-id | path> [--full] [--json]`: checks a snapshot offline, no server needed.
//! Model ids resolve in the same cache folder the server uses by default.
//! Exit code: 0 complete, 1 incomplete, 2 the check could not run (not found, bad arguments).

use std::{path::Path, process::ExitCode};

use clap::Args;
use serde::Serialize;

use super::client::ClientArgs;
use crate::{
    config::CacheArgs,
    manager::{self, Cache, ModelRef, ResolvedSnapshot},
    snapshot::{self, Mode, Report},
};

/// Flags of `lmx verify`.
#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// A repository id ("org/name", looked up in the cache) or a snapshot folder. An argument that
    /// names an existing folder, or starts with '/', '.' or '~', is a folder.
    pub model: String,

    /// Branch, tag or commit of a repository id.
    #[arg(long, default_value = "main")]
    pub revision: String,

    /// Also hash every file and compare with the hub's hashes (reads all data).
    #[arg(long)]
    pub full: bool,

    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub cache: CacheArgs,

    /// Verify on a server (--server / LMX_SERVER) instead of offline in the local cache.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// The JSON document `--json` prints.
#[derive(Debug, Serialize)]
struct JsonReport<'a> {
    model_id: &'a str,
    revision: &'a str,
    commit: &'a str,
    #[serde(flatten)]
    report: &'a Report,
}

/// Runs the command (against the server when --server is given); returns the exit code.
pub async fn run_any(args: &VerifyArgs) -> ExitCode {
    if args.client.server.is_none() {
        return run(args);
    }
    match remote(args).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("lmx verify: {err:#}");
            ExitCode::from(2)
        }
    }
}

async fn remote(args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    use crate::pb;
    let client = args.client.connect().await?;
    let mode = if args.full {
        pb::VerifyMode::Full
    } else {
        pb::VerifyMode::Quick
    };
    let request = client.request(pb::VerifyModelRequest {
        model_id: args.model.clone(),
        revision: args.revision.clone(),
        mode: mode as i32,
    });
    let r = match client.admin().verify_model(request).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            eprintln!("lmx verify: {}", super::client::describe(&status));
            return Ok(ExitCode::from(2));
        }
    };
    let problems: Vec<serde_json::Value> = r
        .problems
        .iter()
        .map(|p| {
            serde_json::json!({
                "kind": p.kind().as_str_name().trim_start_matches("SNAPSHOT_PROBLEM_KIND_"),
                "file": p.file,
                "detail": p.detail,
                "severity": p.severity().as_str_name().trim_start_matches("PROBLEM_SEVERITY_").to_lowercase(),
            })
        })
        .collect();
    if args.json {
        let doc = serde_json::json!({
            "model_id": args.model,
            "revision": args.revision,
            "commit": r.commit_sha,
            "path": r.path,
            "mode": r.mode().as_str_name().trim_start_matches("VERIFY_MODE_"),
            "complete": r.complete,
            "format": r.format().as_str_name().trim_start_matches("WEIGHT_FORMAT_"),
            "architecture": r.architecture,
            "files_checked": r.files_checked,
            "bytes_hashed": r.bytes_hashed,
            "summary": r.summary,
            "problems": problems,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "snapshot  {} (on {})",
            r.path,
            args.client.server.as_deref().unwrap_or_default()
        );
        for p in &problems {
            println!(
                "{:<8} {:<24} {} {}",
                p["severity"].as_str().unwrap_or(""),
                p["kind"].as_str().unwrap_or(""),
                p["file"].as_str().unwrap_or(""),
                p["detail"].as_str().unwrap_or("")
            );
        }
        println!("{}", r.summary);
    }
    Ok(ExitCode::from(if r.complete { 0 } else { 1 }))
}

/// Runs the command offline; returns the process exit code.
pub fn run(args: &VerifyArgs) -> ExitCode {
    let mode = if args.full { Mode::Full } else { Mode::Quick };
    // Offline: the user already holds the files, so any folder may be checked.
    let cache = Cache::new(args.cache.resolve_from_env()).allowing_any_folder();
    let result = resolve(&cache, args).and_then(|snapshot| {
        snapshot::verify(&snapshot.path, mode)
            .map(|report| (snapshot, report))
            .map_err(manager::ManagerError::from)
    });
    let (snapshot, report) = match result {
        Ok(found) => found,
        Err(err) => {
            eprintln!("lmx verify: {err}");
            return ExitCode::from(2);
        }
    };
    if args.json {
        let doc = JsonReport {
            model_id: &snapshot.model_id,
            revision: &snapshot.revision,
            commit: &snapshot.commit,
            report: &report,
        };
        match serde_json::to_string_pretty(&doc) {
            Ok(text) => println!("{text}"),
            Err(err) => {
                eprintln!("lmx verify: {err}");
                return ExitCode::from(2);
            }
        }
    } else {
        print!("{}", table(&snapshot, &report));
    }
    ExitCode::from(if report.complete { 0 } else { 1 })
}

fn resolve(cache: &Cache, args: &VerifyArgs) -> Result<ResolvedSnapshot, manager::ManagerError> {
    let looks_like_path = args.model.starts_with(['/', '.', '~']);
    let model = if looks_like_path || Path::new(&args.model).is_dir() {
        let path = match args.model.strip_prefix("~/") {
            Some(rest) => std::env::var_os("HOME")
                .map(|home| Path::new(&home).join(rest))
                .unwrap_or_else(|| args.model.clone().into()),
            None => args.model.clone().into(),
        };
        ModelRef::Local(path)
    } else {
        manager::cache::parse_model_ref(&args.model, &args.revision)?
    };
    Ok(cache.resolve(&model)?)
}

/// The human-readable report.
fn table(snapshot: &ResolvedSnapshot, report: &Report) -> String {
    let mut out = String::new();
    let what = if snapshot.commit.is_empty() {
        String::new()
    } else {
        format!(
            " ({}@{}, commit {})",
            snapshot.model_id, snapshot.revision, snapshot.commit
        )
    };
    out.push_str(&format!("snapshot  {}{what}\n", report.path.display()));
    let format = report
        .format
        .map(|f| format!("{f:?}").to_uppercase())
        .unwrap_or_else(|| "none".into());
    out.push_str(&format!(
        "checked   {:?} mode, {} files, format {format}, architecture {}{}\n",
        report.mode,
        report.files_checked,
        report.architecture.as_deref().unwrap_or("unknown"),
        if report.bytes_hashed > 0 {
            format!(", {} bytes hashed", report.bytes_hashed)
        } else {
            String::new()
        }
    ));
    if !report.problems.is_empty() {
        let kind_w = report
            .problems
            .iter()
            .map(|p| p.kind.name().len())
            .max()
            .unwrap_or(4);
        let file_w = report
            .problems
            .iter()
            .map(|p| p.file.len())
            .max()
            .unwrap_or(4)
            .max(4);
        out.push_str(&format!(
            "\n{:<8} {:<kind_w$} {:<file_w$} DETAIL\n",
            "SEVERITY", "KIND", "FILE"
        ));
        for p in &report.problems {
            let severity = format!("{:?}", p.severity).to_lowercase();
            out.push_str(&format!(
                "{severity:<8} {:<kind_w$} {:<file_w$} {}\n",
                p.kind.name(),
                p.file,
                p.detail
            ));
        }
        out.push('\n');
    }
    out.push_str(&report.summary);
    out.push('\n');
    out
}
