//! One download task: (repository, revision) → a complete snapshot in the cache.
//!
//! QUEUED → listing (commit, files, sizes and hashes: `total_bytes` is known before the first
//! byte) → free-space check → DOWNLOADING (several files at once, each through
//! [`super::transfer`]; a blob is linked into `snapshots/<commit>/` only once it is in place) →
//! VERIFYING (the snapshot guard, QUICK) → COMPLETED and `refs/<revision>` written, or FAILED
//! with a [`DownloadErrorCode`]. Then the optional auto-load. A repair task takes the other
//! road through [`super::repair`], sharing [`fetch`].

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{
    hub::{HubClient, Listing, RemoteFile},
    patterns::{GgufChoice, Patterns},
    progress::{
        AutoLoadState, DownloadErrorCode as Code, DownloadFailure, DownloadState, FileCounters,
        FileState, Tracker,
    },
    transfer::{Transfer, TransferSettings},
    BlobLocks,
};
use crate::{
    manager::{cache::repo_folder_name, models::Registry, LoadSpec},
    snapshot::{self, Severity},
};

/// What a task was asked to do.
#[derive(Debug, Clone)]
pub struct Request {
    pub repo_id: String,
    pub revision: String,
    pub patterns: Patterns,
    pub auto_load: Option<LoadSpec>,
    /// A RepairModel task: the snapshot to repair.
    pub repair: Option<super::repair::Target>,
    /// The reference's GGUF selector.
    pub gguf: Option<GgufChoice>,
}

impl Request {
    /// The model id an auto-load uses: the repository and the GGUF selector.
    fn model_id(&self) -> String {
        match &self.gguf {
            Some(choice) => format!("{}{}", self.repo_id, choice.0),
            None => self.repo_id.clone(),
        }
    }
}

/// What a task that completed did.
#[derive(Debug, Clone)]
pub struct Done {
    /// The snapshot folder.
    pub snapshot: PathBuf,
    /// Repository paths fetched again by a repair, sorted.
    pub repaired: Vec<String>,
    /// One line for humans.
    pub summary: String,
}

/// Task settings.
#[derive(Debug, Clone)]
pub struct TaskSettings {
    /// Files transferred at once.
    pub files_in_parallel: usize,
    pub transfer: TransferSettings,
    /// Free space to keep beyond what the download needs.
    pub disk_margin: u64,
}

/// Everything a task needs from the manager.
pub struct Context {
    pub hub: Arc<HubClient>,
    pub cache_dir: PathBuf,
    pub settings: TaskSettings,
    pub models: Registry,
    pub blob_locks: BlobLocks,
}

fn storage(what: &str, e: &std::io::Error) -> DownloadFailure {
    DownloadFailure::new(Code::StorageError, format!("{what}: {e}"))
}

/// Runs the task to its end, publishing progress on `tracker`.
pub async fn run(
    ctx: Arc<Context>,
    request: Request,
    tracker: Arc<Tracker>,
    cancel: CancellationToken,
) {
    // Cancellation is handled inside: transfers record their progress before they stop.
    let result = match &request.repair {
        Some(target) => super::repair::run(&ctx, &request, target, &tracker, &cancel).await,
        None => download(&ctx, &request, &tracker, &cancel).await,
    };
    match result {
        Ok(done) => {
            tracker.update(|p| {
                p.state = DownloadState::Completed;
                p.repaired_files = done.repaired.clone();
                p.summary = done.summary.clone();
            });
            metrics::counter!("lmx_downloads_completed_total").increment(1);
            tracing::info!(model = %request.repo_id, revision = %request.revision, summary = %done.summary, "download completed");
            if let Some(spec) = request.auto_load.clone() {
                auto_load(&ctx, &request, spec, &done.snapshot, &tracker).await;
            }
        }
        Err(failure) => {
            let cancelled = failure.code == Code::DownloadCancelled;
            metrics::counter!("lmx_download_failures_total", "code" => failure.code.name())
                .increment(1);
            tracing::warn!(model = %request.repo_id, code = failure.code.name(), error = %failure.message, "download ended");
            tracker.update(|p| {
                p.state = if cancelled {
                    DownloadState::Cancelled
                } else {
                    DownloadState::Failed
                };
                // A repair keeps the problems it found when it fails for another reason.
                if !p.repair || !failure.problems.is_empty() {
                    p.problems = failure.problems.clone();
                }
                p.summary = failure.to_string();
                p.failure = Some(failure);
                if p.auto_load != AutoLoadState::NotRequested {
                    p.auto_load = AutoLoadState::Failed;
                    p.auto_load_message = "the download did not complete".into();
                }
            });
        }
    }
}

async fn download(
    ctx: &Context,
    request: &Request,
    tracker: &Arc<Tracker>,
    cancel: &CancellationToken,
) -> Result<Done, DownloadFailure> {
    let listing = tokio::select! {
        l = ctx.hub.listing(&request.repo_id, &request.revision) => l?,
        () = cancel.cancelled() => return Err(DownloadFailure::cancelled()),
    };
    let Listing { commit, files } = listing;
    let mut selected: Vec<RemoteFile> = files
        .iter()
        .filter(|f| request.patterns.selects(&f.path))
        .cloned()
        .collect();
    if let Some(choice) = &request.gguf {
        let paths: Vec<&str> = selected.iter().map(|f| f.path.as_str()).collect();
        let keep: Vec<String> = match choice.select(&paths) {
            Ok(keep) => keep.into_iter().map(str::to_owned).collect(),
            Err(gguf) => {
                return Err(DownloadFailure::new(
                    Code::FileNotFound,
                    format!(
                        "no GGUF file of {}@{commit} matches the selector {} (its GGUF files: {gguf:?})",
                        request.repo_id, choice.0
                    ),
                ))
            }
        };
        selected.retain(|f| keep.contains(&f.path));
    }
    if selected.is_empty() {
        return Err(DownloadFailure::new(
            Code::FileNotFound,
            format!(
                "no file of {}@{commit} matches the patterns ({} files in the repository)",
                request.repo_id,
                files.len()
            ),
        ));
    }
    let snapshot = fetch(ctx, request, tracker, cancel, &commit, &selected).await?;
    let cached = tracker
        .current()
        .files
        .iter()
        .filter(|f| f.state == FileState::Cached)
        .count();

    if cancel.is_cancelled() {
        return Err(DownloadFailure::cancelled());
    }
    tracker.update(|p| p.state = DownloadState::Verifying);
    let check_path = snapshot.clone();
    let report =
        tokio::task::spawn_blocking(move || snapshot::verify(&check_path, snapshot::Mode::Quick))
            .await
            .map_err(|e| DownloadFailure::new(Code::Internal, e.to_string()))?
            .map_err(|e| DownloadFailure::new(Code::StorageError, e.to_string()))?;
    // Problems with files this download was asked to fetch fail it; problems that only come from
    // files the patterns left out leave a completed download whose snapshot is incomplete.
    let selected_paths: std::collections::HashSet<&str> =
        selected.iter().map(|f| f.path.as_str()).collect();
    let ours = |p: &snapshot::Problem| {
        !request.patterns.is_filtering()
            || selected_paths.contains(p.file.as_str())
            || p.file.starts_with("blobs/")
    };
    let errors: Vec<snapshot::Problem> = report
        .problems
        .iter()
        .filter(|p| p.severity == Severity::Error && ours(p))
        .cloned()
        .collect();
    tracker.update(|p| p.problems = report.problems.clone());
    if !errors.is_empty() {
        let summary: Vec<String> = errors
            .iter()
            .map(|p| format!("{} {}: {}", p.kind, p.file, p.detail))
            .collect();
        return Err(DownloadFailure {
            code: Code::IncompleteDownload,
            message: format!(
                "the snapshot is incomplete after the transfer: {}",
                summary.join("; ")
            ),
            problems: report.problems.clone(),
        });
    }
    write_ref(ctx, request, &commit)?;
    Ok(Done {
        snapshot,
        repaired: Vec::new(),
        summary: format!(
            "{} files of {}@{} ({commit}) in the cache, {cached} of them already there",
            selected.len(),
            request.repo_id,
            request.revision
        ),
    })
}

/// Points `refs/<revision>` at `commit` (nothing to do when the revision is the commit).
fn write_ref(ctx: &Context, request: &Request, commit: &str) -> Result<(), DownloadFailure> {
    if request.revision == commit {
        return Ok(());
    }
    let cache = hf_hub::Cache::new(ctx.cache_dir.clone());
    let repo = hf_hub::Repo::with_revision(
        request.repo_id.clone(),
        hf_hub::RepoType::Model,
        request.revision.clone(),
    );
    cache
        .repo(repo)
        .create_ref(commit)
        .map_err(|e| storage("writing the ref", &e))
}

/// Brings `selected` (files of `commit`) into the blob store, verified by hash, and links them
/// into `snapshots/<commit>/`; returns the snapshot folder. DOWNLOADING while it runs.
pub(super) async fn fetch(
    ctx: &Context,
    request: &Request,
    tracker: &Arc<Tracker>,
    cancel: &CancellationToken,
    commit: &str,
    selected: &[RemoteFile],
) -> Result<PathBuf, DownloadFailure> {
    for f in selected {
        if let Some(reason) = unsafe_repo_path(&f.path) {
            return Err(DownloadFailure::new(
                Code::Internal,
                format!("the hub listed an unsafe path {:?}: {reason}", f.path),
            ));
        }
    }
    let commit = commit.to_owned();
    let counters: Vec<Arc<FileCounters>> = selected
        .iter()
        .map(|f| Arc::new(FileCounters::new(f.path.clone(), f.size)))
        .collect();
    tracker.set_files(counters.clone());
    tracker.update(|p| {
        p.commit = commit.clone();
        p.total_bytes = selected.iter().map(|f| f.size).sum();
    });

    let repo_dir = ctx.cache_dir.join(repo_folder_name(&request.repo_id));
    let blobs = repo_dir.join("blobs");
    let snapshot = repo_dir.join("snapshots").join(&commit);
    std::fs::create_dir_all(&blobs).map_err(|e| storage("creating the cache folders", &e))?;
    check_disk_space(&blobs, selected, ctx.settings.disk_margin)?;

    tracker.update(|p| p.state = DownloadState::Downloading);
    let ticker = {
        let tracker = tracker.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(super::progress::TICK);
            loop {
                interval.tick().await;
                tracker.tick();
            }
        })
    };
    let slots = Semaphore::new(ctx.settings.files_in_parallel.max(1));
    let failed = CancellationToken::new();
    let transfers = selected.iter().zip(&counters).map(|(file, counters)| {
        let (slots, failed, blobs, snapshot, commit) = (&slots, &failed, &blobs, &snapshot, &commit);
        async move {
            let _slot = slots.acquire().await.expect("semaphore open");
            // One writer per blob across tasks (two revisions may share blobs).
            let lock = ctx.blob_locks.lock(&file.etag);
            let _blob = lock.lock().await;
            let stop = cancel.child_token();
            let transfer = Transfer {
                hub: &ctx.hub,
                repo_id: &request.repo_id,
                commit,
                blobs,
                file,
                counters: counters.clone(),
                settings: &ctx.settings.transfer,
                cancel: &stop,
            };
            let result = tokio::select! {
                r = transfer.run() => r,
                () = failed.cancelled() => {
                    stop.cancel();
                    Err(DownloadFailure::new(Code::DownloadCancelled, "stopped: another file failed"))
                }
            };
            let result = result.and_then(|blob| link(snapshot, &file.path, &blob));
            if let Err(e) = &result {
                if e.code != Code::DownloadCancelled {
                    counters.set_state(FileState::Failed);
                    failed.cancel();
                }
            }
            result
        }
    });
    let results = futures::future::join_all(transfers).await;
    ticker.abort();
    tracker.tick();
    // The first real failure wins over the cancellations it caused.
    if let Some(failure) = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .find(|e| e.code != Code::DownloadCancelled)
        .or_else(|| results.iter().find_map(|r| r.as_ref().err()))
    {
        return Err(failure.clone());
    }

    Ok(snapshot)
}

/// Relative link `snapshots/<commit>/<path>` → `../../blobs/<etag>` (deeper for nested paths).
fn link(snapshot: &Path, path: &str, blob: &Path) -> Result<(), DownloadFailure> {
    let link = snapshot.join(path);
    let parent = link.parent().unwrap_or(snapshot);
    std::fs::create_dir_all(parent).map_err(|e| storage("creating the snapshot folder", &e))?;
    let depth = path.matches('/').count() + 2;
    let target = PathBuf::from("../".repeat(depth))
        .join("blobs")
        .join(blob.file_name().unwrap_or_default());
    if std::fs::read_link(&link).is_ok_and(|t| t == target) {
        return Ok(());
    }
    let tmp = parent.join(format!(
        ".{}.lmxlink",
        link.file_name().unwrap_or_default().to_string_lossy()
    ));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&target, &tmp)
        .and_then(|()| std::fs::rename(&tmp, &link))
        .map_err(|e| storage("linking the blob into the snapshot", &e))
}

fn unsafe_repo_path(path: &str) -> Option<&'static str> {
    crate::snapshot::unsafe_path_reason(path)
}

fn check_disk_space(
    blobs: &Path,
    files: &[RemoteFile],
    margin: u64,
) -> Result<(), DownloadFailure> {
    let mut remaining = 0u64;
    for f in files {
        if std::fs::metadata(blobs.join(&f.etag)).is_ok_and(|m| m.len() == f.size) {
            continue;
        }
        remaining += f.size;
    }
    let available =
        fs4::available_space(blobs).map_err(|e| storage("reading the free disk space", &e))?;
    if available < remaining.saturating_add(margin) {
        return Err(DownloadFailure::new(
            Code::InsufficientDiskSpace,
            format!(
                "{remaining} bytes remain to download plus a {margin}-byte margin, but only {available} bytes are free in {}",
                blobs.display()
            ),
        ));
    }
    Ok(())
}

async fn auto_load(
    ctx: &Context,
    request: &Request,
    spec: LoadSpec,
    snapshot: &Path,
    tracker: &Tracker,
) {
    let path = snapshot.to_owned();
    let guard = tokio::task::spawn_blocking(move || snapshot::is_snapshot_complete(&path)).await;
    if let Ok(Err(snapshot::SnapshotError::Incomplete(report))) = &guard {
        let reasons: Vec<String> = report
            .errors()
            .map(|p| format!("{} {}: {}", p.kind, p.file, p.detail))
            .collect();
        tracing::warn!(
            model = %request.repo_id,
            revision = %request.revision,
            reasons = %reasons.join("; "),
            "auto_load_skipped_snapshot_incomplete"
        );
        tracker.update(|p| {
            p.auto_load = AutoLoadState::SkippedSnapshotIncomplete;
            p.auto_load_message = format!("the snapshot is incomplete: {}", report.summary);
        });
        return;
    }
    tracker.update(|p| p.auto_load = AutoLoadState::Loading);
    match ctx
        .models
        .load(&request.model_id(), &request.revision, spec)
        .await
    {
        Ok(_) => tracker.update(|p| p.auto_load = AutoLoadState::Loaded),
        Err(e) => tracker.update(|p| {
            p.auto_load = AutoLoadState::Failed;
            p.auto_load_message = e.to_string();
        }),
    }
}
