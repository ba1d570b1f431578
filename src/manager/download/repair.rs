//! RepairModel: a snapshot in the cache brought back, in place, to what the hub published.
//!
//! FULL check (content hashes) → the files its errors name (missing, truncated, content that does
//! not match its hash, links to missing blobs) → the hub's listing at the snapshot's commit → only
//! those files through [`super::task::fetch`] (a blob whose content does not match its name is
//! replaced, never served; partial data resumes) → FULL check again. A snapshot that verifies
//! clean ends at once, without contacting the hub.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use tokio_util::sync::CancellationToken;

use super::{
    hub::RemoteFile,
    progress::{DownloadErrorCode as Code, DownloadFailure, DownloadState, Tracker},
    task::{fetch, Context, Done, Request},
};
use crate::snapshot::{self, ProblemKind, Report, Severity};

/// The snapshot a repair works on, resolved in the cache before the task starts.
#[derive(Debug, Clone)]
pub struct Target {
    pub commit: String,
    pub path: PathBuf,
}

async fn full_check(path: &std::path::Path) -> Result<Report, DownloadFailure> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || snapshot::verify(&path, snapshot::Mode::Full))
        .await
        .map_err(|e| DownloadFailure::new(Code::Internal, e.to_string()))?
        .map_err(|e| DownloadFailure::new(Code::StorageError, e.to_string()))
}

/// The repository paths a report's errors name, each with the first kind found: what a fetch can
/// repair. Blob-store entries, unsafe paths and whole-snapshot problems are not files to fetch.
pub(super) fn broken_files(report: &Report) -> BTreeMap<String, ProblemKind> {
    let mut files = BTreeMap::new();
    for p in &report.problems {
        let fetchable = p.severity == Severity::Error
            && !p.file.is_empty()
            && !p.file.starts_with("blobs/")
            && snapshot::unsafe_path_reason(&p.file).is_none()
            && !matches!(
                p.kind,
                ProblemKind::UnsafePath
                    | ProblemKind::IncompleteFilePresent
                    | ProblemKind::ShardTotalMismatch
                    | ProblemKind::NoWeights
            );
        if fetchable {
            files.entry(p.file.clone()).or_insert(p.kind);
        }
    }
    files
}

fn errors_line(report: &Report) -> String {
    report
        .errors()
        .map(|p| format!("{} {}: {}", p.kind, p.file, p.detail))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Runs a repair; see the module docs.
pub(super) async fn run(
    ctx: &Context,
    request: &Request,
    target: &Target,
    tracker: &Arc<Tracker>,
    cancel: &CancellationToken,
) -> Result<Done, DownloadFailure> {
    let name = format!(
        "{}@{} (commit {})",
        request.repo_id, request.revision, target.commit
    );
    tracker.update(|p| {
        p.state = DownloadState::Verifying;
        p.commit = target.commit.clone();
    });
    let before = full_check(&target.path).await?;
    if before.complete {
        return Ok(Done {
            snapshot: target.path.clone(),
            repaired: Vec::new(),
            summary: format!(
                "nothing to repair: {name} verifies clean (FULL: {} files, {} bytes hashed)",
                before.files_checked, before.bytes_hashed
            ),
        });
    }
    tracker.update(|p| p.problems = before.problems.clone());
    let broken = broken_files(&before);
    if broken.is_empty() {
        return Err(DownloadFailure {
            code: Code::IncompleteDownload,
            message: format!(
                "{name} has problems that no single file explains ({}); pull the model again",
                errors_line(&before)
            ),
            problems: before.problems.clone(),
        });
    }
    tracing::info!(model = %request.repo_id, commit = %target.commit, files = ?broken.keys().collect::<Vec<_>>(), "repairing");
    let listing = tokio::select! {
        l = ctx.hub.listing(&request.repo_id, &target.commit) => l?,
        () = cancel.cancelled() => {
            return Err(DownloadFailure::cancelled())
        }
    };
    let selected: Vec<RemoteFile> = listing
        .files
        .iter()
        .filter(|f| broken.contains_key(&f.path))
        .cloned()
        .collect();
    let absent: Vec<&String> = broken
        .keys()
        .filter(|path| !selected.iter().any(|f| &f.path == *path))
        .collect();
    if selected.is_empty() {
        return Err(DownloadFailure {
            code: Code::FileNotFound,
            message: format!(
                "none of the broken files of {name} is on the hub at that commit ({absent:?}): \
                 {}",
                errors_line(&before)
            ),
            problems: before.problems.clone(),
        });
    }
    fetch(ctx, request, tracker, cancel, &target.commit, &selected).await?;
    if cancel.is_cancelled() {
        return Err(DownloadFailure::cancelled());
    }
    tracker.update(|p| p.state = DownloadState::Verifying);
    let after = full_check(&target.path).await?;
    tracker.update(|p| p.problems = after.problems.clone());
    let mut repaired: Vec<String> = selected.iter().map(|f| f.path.clone()).collect();
    repaired.sort();
    if !after.complete {
        return Err(DownloadFailure {
            code: Code::IncompleteDownload,
            message: format!(
                "{name} is still incomplete after fetching {repaired:?} again: {}",
                errors_line(&after)
            ),
            problems: after.problems.clone(),
        });
    }
    let what: Vec<String> = selected
        .iter()
        .map(|f| format!("{} ({})", f.path, broken[&f.path]))
        .collect();
    Ok(Done {
        snapshot: target.path.clone(),
        summary: format!(
            "repaired {} file(s) of {name}: {}; the snapshot verifies clean (FULL)",
            repaired.len(),
            what.join(", ")
        ),
        repaired,
    })
}
