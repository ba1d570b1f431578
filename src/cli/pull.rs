//! `lmx pull <repo>`: a download with an indicatif progress display (bytes, speed, ETA, one line
//! per file), ending with the final state. Through a server by default; `--local` runs the
//! download manager in this process (no server needed: for init containers and scripts).
//!
//! Exit code: 0 when COMPLETED, else 10 + the DownloadErrorCode number (11 INCOMPLETE_DOWNLOAD,
//! 12 DOWNLOAD_CANCELLED, 13 REPO_NOT_FOUND, ...), 1 for other failures. Ctrl-C asks the server
//! to cancel (or, with --detach, leaves the download running).

use std::{collections::HashMap, process::ExitCode, time::Duration};

use clap::Args;
use futures::{Stream, StreamExt};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::client::{describe, ClientArgs};
use crate::{
    config::HubArgs,
    manager::{
        download::{DownloadRequest, DownloadSettings, Downloads, Progress},
        models::Registry,
        Cache, EngineSettings,
    },
    pb,
};

/// Flags of `lmx pull`.
#[derive(Debug, Clone, Args)]
pub struct PullArgs {
    /// Model reference: a repository id (HuggingFaceTB/SmolLM2-135M-Instruct), optionally with
    /// @REVISION and, for GGUF repositories, :QUANT or /FILE.gguf (only that file and the
    /// metadata files are fetched).
    pub repo: String,

    /// Branch, tag or commit (default: main, or the reference's @REVISION).
    #[arg(long, default_value = "")]
    pub revision: String,

    /// Only files matching this glob (repeatable; huggingface_hub semantics).
    #[arg(long = "include")]
    pub include: Vec<String>,

    /// Skip files matching this glob (repeatable).
    #[arg(long = "exclude")]
    pub exclude: Vec<String>,

    /// Load the model once the download completed and verified.
    #[arg(long, conflicts_with = "local")]
    pub auto_load: bool,

    /// On Ctrl-C, leave the download running on the server instead of cancelling it.
    #[arg(long, conflicts_with = "local")]
    pub detach: bool,

    /// Download in this process into the cache, without a server.
    #[arg(long)]
    pub local: bool,

    /// Print each progress update as one JSON line instead of progress bars.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub client: ClientArgs,

    #[command(flatten)]
    pub hub: HubArgs,
}

type Updates =
    std::pin::Pin<Box<dyn Stream<Item = Result<pb::DownloadProgress, tonic::Status>> + Send>>;

/// How a local download's progress becomes the wire type the display reads: the gRPC edge's
/// own conversion, handed in by the composition root (`main`), so the two never differ and the
/// CLI does not reach into the API layer.
pub type ToWire = fn(&Progress) -> pb::DownloadProgress;

/// Runs the command; returns the process exit code.
pub async fn run(args: PullArgs, to_wire: ToWire) -> ExitCode {
    match pull(args, to_wire).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("lmx pull: {err:#}");
            ExitCode::from(1)
        }
    }
}

fn exit_code(progress: &pb::DownloadProgress) -> ExitCode {
    if progress.state() == pb::DownloadState::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(10 + progress.error_code as u8)
    }
}

async fn pull(args: PullArgs, to_wire: ToWire) -> anyhow::Result<ExitCode> {
    let request = pb::DownloadModelRequest {
        model_id: args.repo.clone(),
        revision: args.revision.clone(),
        allow_patterns: args.include.clone(),
        ignore_patterns: args.exclude.clone(),
        auto_load: args.auto_load,
        load_options: None,
    };
    // Ctrl-C is caught from here on (before the server starts the download), not from the
    // first poll of the loop below: a SIGINT in between would kill the process outright.
    let interrupt = Interrupt::new()?;
    let (updates, canceller): (Updates, Option<Canceller>) = if args.local {
        (local_updates(&args, &request, to_wire)?, None)
    } else {
        let client = args.client.connect().await?;
        let stream = client
            .admin()
            .download_model(client.request(request))
            .await
            .map_err(|s| anyhow::anyhow!("{}", describe(&s)))?
            .into_inner();
        (
            Box::pin(stream.map(|r| r.map(|m| m.progress.unwrap_or_default()))),
            Some(Canceller {
                client,
                detach: args.detach,
            }),
        )
    };
    follow(updates, canceller, interrupt, args.json).await
}

/// Shows `updates` until the final one (Ctrl-C: the canceller's choice); the exit code. Shared
/// by `lmx pull` and `lmx repair`.
async fn follow(
    updates: Updates,
    canceller: Option<Canceller>,
    mut interrupt: Interrupt,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut display = Display::new(json);
    let mut updates = updates;
    let mut last: Option<pb::DownloadProgress> = None;
    let mut cancel_sent = false;
    loop {
        let next = tokio::select! {
            next = updates.next() => next,
            _ = interrupt.recv(), if !cancel_sent => {
                cancel_sent = true;
                match (&canceller, &last) {
                    (Some(c), Some(p)) if c.detach => {
                        display.finish_message(&format!("detached: the download continues as {} (lmx pull again, or WatchDownload, to follow it)", p.download_id));
                        return Ok(ExitCode::SUCCESS);
                    }
                    (Some(c), Some(p)) => {
                        display.note("cancelling...");
                        c.cancel(&p.download_id).await;
                    }
                    _ => {
                        display.finish_message("interrupted");
                        return Ok(ExitCode::from(10 + pb::DownloadErrorCode::DownloadCancelled as u8));
                    }
                }
                continue;
            }
        };
        match next {
            Some(Ok(progress)) => {
                display.show(&progress);
                let done = is_final(&progress);
                last = Some(progress);
                if done {
                    break;
                }
            }
            // The terminal message came first; the status repeats its code.
            Some(Err(status)) => {
                if last.as_ref().is_none_or(|p| !is_terminal(p.state())) {
                    display.finish_message(&format!("failed: {}", describe(&status)));
                    return Ok(ExitCode::from(1));
                }
                break;
            }
            None => break,
        }
    }
    let last = last.ok_or_else(|| anyhow::anyhow!("the server sent no progress"))?;
    display.finish(&last);
    Ok(exit_code(&last))
}

/// Flags of `lmx repair`.
#[derive(Debug, Clone, Args)]
pub struct RepairArgs {
    /// Repository id in the server's cache (or an alias), e.g. HuggingFaceTB/SmolLM2-135M.
    pub model: String,

    /// Branch, tag or commit.
    #[arg(long, default_value = "")]
    pub revision: String,

    /// On Ctrl-C, leave the repair running on the server instead of cancelling it.
    #[arg(long)]
    pub detach: bool,

    /// Print each progress update as one JSON line instead of progress bars.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub client: ClientArgs,
}

/// `lmx repair`: RepairModel with the pull display; the same exit codes.
pub async fn repair(args: RepairArgs) -> ExitCode {
    let result = async {
        let (model_id, revision) = (args.model.clone(), args.revision.clone());
        let interrupt = Interrupt::new()?;
        let client = args.client.connect().await?;
        let stream = client
            .admin()
            .repair_model(client.request(pb::RepairModelRequest { model_id, revision }))
            .await
            .map_err(|s| anyhow::anyhow!("{}", describe(&s)))?
            .into_inner();
        let updates: Updates = Box::pin(stream.map(|r| r.map(|m| m.progress.unwrap_or_default())));
        let canceller = Canceller {
            client,
            detach: args.detach,
        };
        follow(updates, Some(canceller), interrupt, args.json).await
    };
    match result.await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("lmx repair: {err:#}");
            ExitCode::from(1)
        }
    }
}

/// Nothing more will change: a terminal state with the auto-load settled.
fn is_final(p: &pb::DownloadProgress) -> bool {
    is_terminal(p.state())
        && !matches!(
            p.auto_load_state(),
            pb::AutoLoadState::Pending | pb::AutoLoadState::Loading
        )
}

fn is_terminal(state: pb::DownloadState) -> bool {
    matches!(
        state,
        pb::DownloadState::Completed | pb::DownloadState::Failed | pb::DownloadState::Cancelled
    )
}

struct Canceller {
    client: super::client::Client,
    detach: bool,
}

impl Canceller {
    async fn cancel(&self, id: &str) {
        let request = self.client.request(pb::CancelDownloadRequest {
            download_id: id.to_owned(),
        });
        if let Err(status) = self.client.admin().cancel_download(request).await {
            eprintln!("lmx pull: cancelling failed: {}", describe(&status));
        }
    }
}

/// Runs the download manager here and adapts its progress to the wire type.
fn local_updates(
    args: &PullArgs,
    request: &pb::DownloadModelRequest,
    to_wire: ToWire,
) -> anyhow::Result<Updates> {
    let hub = args.hub.resolve(&crate::config::process_env);
    let mut settings = DownloadSettings::new(hub.hub_endpoint);
    settings.hf_token = hub.hf_token;
    let cache = Cache::new(hub.cache_dir.clone());
    let (ready, _) = tokio::sync::watch::channel(false);
    let registry = Registry::new(cache, EngineSettings::default(), ready);
    let downloads =
        Downloads::new(hub.cache_dir, settings, registry).map_err(|e| anyhow::anyhow!(e))?;
    let (model_id, revision) =
        crate::manager::reference::normalize(&request.model_id, &request.revision)?;
    let reference = crate::manager::reference::Reference::parse(&model_id)?;
    let rx = downloads
        .start(DownloadRequest {
            repo_id: reference.repo,
            revision,
            allow_patterns: request.allow_patterns.clone(),
            ignore_patterns: request.ignore_patterns.clone(),
            auto_load: None,
            repair: false,
            gguf: reference.selector,
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let latest = tokio_stream::wrappers::WatchStream::new(rx.latest);
    // Keep the manager alive for as long as the stream is read.
    let stream = latest
        .map(move |p| {
            let _keep = &downloads;
            p
        })
        .map(move |p| Ok(to_wire(&p)));
    Ok(Box::pin(stream))
}

/// Progress bars on a terminal, plain lines otherwise, or JSON lines.
struct Display {
    json: bool,
    multi: MultiProgress,
    total: Option<ProgressBar>,
    files: HashMap<String, ProgressBar>,
    last_state: Option<pb::DownloadState>,
    plain: bool,
}

fn human(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}

impl Display {
    fn new(json: bool) -> Self {
        let plain = !std::io::IsTerminal::is_terminal(&std::io::stderr());
        let multi = MultiProgress::with_draw_target(if json || plain {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        });
        Self {
            json,
            multi,
            total: None,
            files: HashMap::new(),
            last_state: None,
            plain,
        }
    }

    fn note(&self, text: &str) {
        let _ = self.multi.println(text);
        if self.plain || self.json {
            eprintln!("{text}");
        }
    }

    fn show(&mut self, p: &pb::DownloadProgress) {
        if self.json {
            println!("{}", progress_json(p));
            return;
        }
        let state = p.state();
        if self.last_state != Some(state) {
            self.last_state = Some(state);
            let name = state.as_str_name().trim_start_matches("DOWNLOAD_STATE_");
            let line = format!(
                "{name} {}@{} {}/{} files, {} of {}",
                p.model_id,
                p.revision,
                p.files_completed,
                p.files_total,
                human(p.downloaded_bytes),
                human(p.total_bytes)
            );
            self.note(&line);
        }
        if p.total_bytes == 0 {
            return;
        }
        let total = self.total.get_or_insert_with(|| {
            let bar = self.multi.add(ProgressBar::new(p.total_bytes));
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg:<28} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            bar.set_message(p.model_id.clone());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        total.set_length(p.total_bytes);
        total.set_position(p.downloaded_bytes);
        for f in &p.files {
            let bar = self.files.entry(f.path.clone()).or_insert_with(|| {
                let bar = self.multi.add(ProgressBar::new(f.total_bytes));
                bar.set_style(
                    ProgressStyle::with_template(
                        "  {msg:<40} {bytes:>10}/{total_bytes:<10} {wide_msg}",
                    )
                    .expect("static template"),
                );
                bar.set_message(f.path.clone());
                bar
            });
            bar.set_position(f.downloaded_bytes);
            if matches!(f.state(), pb::FileState::Completed | pb::FileState::Cached)
                && !bar.is_finished()
            {
                bar.finish();
            }
        }
    }

    fn finish_message(&self, text: &str) {
        if let Some(t) = &self.total {
            t.abandon();
        }
        self.note(text);
    }

    fn finish(&mut self, p: &pb::DownloadProgress) {
        if self.json {
            return;
        }
        if let Some(t) = &self.total {
            t.finish();
        }
        let state = p
            .state()
            .as_str_name()
            .trim_start_matches("DOWNLOAD_STATE_");
        let mut line = format!("{state} {}@{}", p.model_id, p.revision);
        if !p.commit_sha.is_empty() {
            line.push_str(&format!(
                " (commit {})",
                &p.commit_sha[..p.commit_sha.len().min(12)]
            ));
        }
        if p.repair && !p.summary.is_empty() {
            line.push_str(&format!(": {}", p.summary));
        } else if p.state() == pb::DownloadState::Completed {
            line.push_str(&format!(
                ": {} files, {}",
                p.files_total,
                human(p.total_bytes)
            ));
            if p.resumed_bytes > 0 {
                line.push_str(&format!(" ({} resumed)", human(p.resumed_bytes)));
            }
        } else {
            let code = p
                .error_code()
                .as_str_name()
                .trim_start_matches("DOWNLOAD_ERROR_CODE_");
            line.push_str(&format!(": {code}: {}", p.error_message));
        }
        if p.auto_load_state() != pb::AutoLoadState::NotRequested {
            let auto = p
                .auto_load_state()
                .as_str_name()
                .trim_start_matches("AUTO_LOAD_STATE_");
            line.push_str(&format!("; auto-load {auto}"));
            if !p.auto_load_message.is_empty() {
                line.push_str(&format!(": {}", p.auto_load_message));
            }
        }
        self.note(&line);
    }
}

fn progress_json(p: &pb::DownloadProgress) -> serde_json::Value {
    serde_json::json!({
        "download_id": p.download_id,
        "model_id": p.model_id,
        "revision": p.revision,
        "commit_sha": p.commit_sha,
        "state": p.state().as_str_name(),
        "error_code": p.error_code().as_str_name(),
        "error_message": p.error_message,
        "downloaded_bytes": p.downloaded_bytes,
        "total_bytes": p.total_bytes,
        "files_completed": p.files_completed,
        "files_total": p.files_total,
        "current_file": p.current_file,
        "bytes_per_second": p.bytes_per_second,
        "eta_seconds": p.eta_seconds,
        "resumed_bytes": p.resumed_bytes,
        "auto_load_state": p.auto_load_state().as_str_name(),
        "auto_load_message": p.auto_load_message,
        "repair": p.repair,
        "repaired_files": p.repaired_files,
        "summary": p.summary,
    })
}

/// SIGINT (Ctrl-C), listened for from its creation on.
struct Interrupt {
    #[cfg(unix)]
    signal: tokio::signal::unix::Signal,
}

impl Interrupt {
    fn new() -> anyhow::Result<Interrupt> {
        Ok(Interrupt {
            #[cfg(unix)]
            signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        self.signal.recv().await;
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_download_error_code() {
        let p = |state: pb::DownloadState, code: pb::DownloadErrorCode| pb::DownloadProgress {
            state: state as i32,
            error_code: code as i32,
            ..Default::default()
        };
        assert_eq!(
            exit_code(&p(
                pb::DownloadState::Completed,
                pb::DownloadErrorCode::None
            )),
            ExitCode::SUCCESS
        );
        assert_eq!(
            exit_code(&p(
                pb::DownloadState::Failed,
                pb::DownloadErrorCode::RepoNotFound
            )),
            ExitCode::from(13)
        );
        assert_eq!(
            exit_code(&p(
                pb::DownloadState::Cancelled,
                pb::DownloadErrorCode::DownloadCancelled
            )),
            ExitCode::from(12)
        );
    }
}
