//! Download progress as state, not events: every task owns a `watch` channel holding its latest
//! [`Progress`]. Transfers bump atomic counters; a ticker folds them into the published state at
//! least every 250 ms while bytes move (smoothed rate, ETA), and state changes publish at once.
//! Every publication also goes to a bounded broadcast, so a watcher that keeps up sees every
//! state change; one that falls behind skips to the latest state. Neither ever slows the download.

use std::{
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::{broadcast, watch};

use crate::snapshot::Problem;

/// How often progress is published while bytes move.
pub const TICK: Duration = Duration::from_millis(250);

/// Where a download stands. Mirrors `lmx.v1.DownloadState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownloadState {
    Queued,
    Downloading,
    Verifying,
    Completed,
    Failed,
    Cancelled,
}

impl DownloadState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// Why a download failed. Mirrors `lmx.v1.DownloadErrorCode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DownloadErrorCode {
    IncompleteDownload,
    DownloadCancelled,
    RepoNotFound,
    RevisionNotFound,
    FileNotFound,
    AccessDenied,
    HubUnavailable,
    ChecksumMismatch,
    InsufficientDiskSpace,
    StorageError,
    Internal,
}

impl DownloadErrorCode {
    /// The stable name (the proto value without its prefix), used as ErrorInfo reason.
    pub fn name(self) -> &'static str {
        match self {
            Self::IncompleteDownload => "INCOMPLETE_DOWNLOAD",
            Self::DownloadCancelled => "DOWNLOAD_CANCELLED",
            Self::RepoNotFound => "REPO_NOT_FOUND",
            Self::RevisionNotFound => "REVISION_NOT_FOUND",
            Self::FileNotFound => "FILE_NOT_FOUND",
            Self::AccessDenied => "ACCESS_DENIED",
            Self::HubUnavailable => "HUB_UNAVAILABLE",
            Self::ChecksumMismatch => "CHECKSUM_MISMATCH",
            Self::InsufficientDiskSpace => "INSUFFICIENT_DISK_SPACE",
            Self::StorageError => "STORAGE_ERROR",
            Self::Internal => "INTERNAL",
        }
    }
}

/// A download failure: the code clients switch on and the details for humans.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {message}", code.name())]
pub struct DownloadFailure {
    pub code: DownloadErrorCode,
    pub message: String,
    /// Snapshot problems, for INCOMPLETE_DOWNLOAD.
    pub problems: Vec<Problem>,
}

impl DownloadFailure {
    pub fn new(code: DownloadErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            problems: Vec::new(),
        }
    }

    /// The failure of a download (or repair) that was cancelled.
    pub fn cancelled() -> Self {
        Self::new(
            DownloadErrorCode::DownloadCancelled,
            "the download was cancelled",
        )
    }
}

/// What happened to the load requested with `auto_load`. Mirrors `lmx.v1.AutoLoadState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoLoadState {
    NotRequested,
    Pending,
    Loading,
    Loaded,
    SkippedSnapshotIncomplete,
    Failed,
}

impl AutoLoadState {
    fn is_settled(self) -> bool {
        !matches!(self, Self::Pending | Self::Loading)
    }
}

/// Where one file stands. Mirrors `lmx.v1.FileState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileState {
    Pending,
    Downloading,
    Verifying,
    Completed,
    Cached,
    Failed,
}

/// Progress of one file.
#[derive(Debug, Clone, PartialEq)]
pub struct FileProgress {
    pub path: String,
    pub downloaded_bytes: u64,
    pub total_bytes: u64,
    pub state: FileState,
    pub resumed_bytes: u64,
}

/// A snapshot of a download's progress.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub download_id: String,
    pub model_id: String,
    pub revision: String,
    pub commit: String,
    pub state: DownloadState,
    pub failure: Option<DownloadFailure>,
    pub downloaded_bytes: u64,
    pub total_bytes: u64,
    pub files_completed: u32,
    pub files_total: u32,
    pub current_file: String,
    pub bytes_per_second: f64,
    pub eta_seconds: f64,
    pub auto_load: AutoLoadState,
    pub auto_load_message: String,
    pub files: Vec<FileProgress>,
    pub problems: Vec<Problem>,
    pub resumed_bytes: u64,
    pub started_at: SystemTime,
    pub updated_at: SystemTime,
    pub finished_at: Option<SystemTime>,
    pub allow_patterns: Vec<String>,
    pub ignore_patterns: Vec<String>,
    /// A RepairModel task.
    pub repair: bool,
    /// Repository paths a repair fetched again, sorted (set when it ends).
    pub repaired_files: Vec<String>,
    /// One line saying what the task did (set when it ends).
    pub summary: String,
    /// Publication number, increasing (not sent to clients).
    pub seq: u64,
}

impl Progress {
    /// True when nothing more will change: a terminal state with auto-load settled.
    pub fn is_final(&self) -> bool {
        self.state.is_terminal() && self.auto_load.is_settled()
    }
}

/// Live counters of one file, shared with its transfer.
#[derive(Debug)]
pub struct FileCounters {
    pub path: String,
    pub total: u64,
    pub downloaded: AtomicU64,
    pub resumed: AtomicU64,
    state: AtomicU8,
}

impl FileCounters {
    pub fn new(path: String, total: u64) -> Self {
        Self {
            path,
            total,
            downloaded: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
            state: AtomicU8::new(FileState::Pending as u8),
        }
    }

    pub fn set_state(&self, state: FileState) {
        self.state.store(state as u8, Ordering::SeqCst);
    }

    pub fn state(&self) -> FileState {
        match self.state.load(Ordering::SeqCst) {
            x if x == FileState::Downloading as u8 => FileState::Downloading,
            x if x == FileState::Verifying as u8 => FileState::Verifying,
            x if x == FileState::Completed as u8 => FileState::Completed,
            x if x == FileState::Cached as u8 => FileState::Cached,
            x if x == FileState::Failed as u8 => FileState::Failed,
            _ => FileState::Pending,
        }
    }
}

/// What a watcher holds: the latest state, and every publication while it keeps up.
pub struct ProgressRx {
    pub latest: watch::Receiver<Progress>,
    pub events: broadcast::Receiver<Progress>,
    /// The watcher's place among `max_watchers`, released when it is dropped.
    pub(super) slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Publications a watcher may fall behind by before it skips to the latest state.
const EVENT_BACKLOG: usize = 256;

/// The publishing side of a task's progress.
pub struct Tracker {
    tx: watch::Sender<Progress>,
    events: broadcast::Sender<Progress>,
    files: Mutex<Vec<Arc<FileCounters>>>,
    rate: Mutex<RateEstimate>,
}

struct RateEstimate {
    last_bytes: u64,
    last_at: Instant,
    /// Exponentially smoothed bytes per second.
    smoothed: f64,
}

impl Tracker {
    pub fn new(initial: Progress) -> Arc<Self> {
        let (tx, _) = watch::channel(initial);
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        Arc::new(Self {
            tx,
            events,
            files: Mutex::new(Vec::new()),
            rate: Mutex::new(RateEstimate {
                last_bytes: 0,
                last_at: Instant::now(),
                smoothed: 0.0,
            }),
        })
    }

    /// A new watcher.
    pub fn subscribe(&self) -> ProgressRx {
        // Events first, so nothing published after the snapshot of `latest` is missed.
        let events = self.events.subscribe();
        ProgressRx {
            latest: self.tx.subscribe(),
            events,
            slot: None,
        }
    }

    /// The latest state only.
    pub fn latest(&self) -> watch::Receiver<Progress> {
        self.tx.subscribe()
    }

    fn publish(&self, edit: impl FnOnce(&mut Progress)) {
        self.tx.send_modify(|p| {
            edit(p);
            p.seq += 1;
        });
        let _ = self.events.send(self.tx.borrow().clone());
    }

    pub fn current(&self) -> Progress {
        self.tx.borrow().clone()
    }

    /// Registers the files of the plan.
    pub fn set_files(&self, files: Vec<Arc<FileCounters>>) {
        *self
            .files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = files;
    }

    /// Applies `edit` and publishes at once (state changes).
    pub fn update(&self, edit: impl FnOnce(&mut Progress)) {
        let files = self
            .files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        self.publish(|p| {
            edit(p);
            fold(p, &files, None);
            p.updated_at = SystemTime::now();
            if p.state.is_terminal() && p.finished_at.is_none() {
                p.finished_at = Some(p.updated_at);
            }
        });
    }

    /// Folds the counters in, with a new rate estimate (the 250 ms ticker).
    pub fn tick(&self) {
        let files = self
            .files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let downloaded: u64 = files
            .iter()
            .map(|f| f.downloaded.load(Ordering::Relaxed))
            .sum();
        let resumed: u64 = files
            .iter()
            .map(|f| f.resumed.load(Ordering::Relaxed))
            .sum();
        let rate = {
            let mut r = self
                .rate
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = Instant::now();
            let dt = now.duration_since(r.last_at).as_secs_f64();
            if dt > 0.0 {
                let transferred = downloaded
                    .saturating_sub(resumed)
                    .saturating_sub(r.last_bytes);
                let instant = transferred as f64 / dt;
                // Smooth over roughly the last two seconds.
                let alpha = (dt / 2.0).min(1.0);
                r.smoothed = if r.smoothed == 0.0 {
                    instant
                } else {
                    r.smoothed + alpha * (instant - r.smoothed)
                };
                r.last_bytes = downloaded.saturating_sub(resumed);
                r.last_at = now;
            }
            r.smoothed
        };
        self.publish(|p| {
            fold(p, &files, Some(rate));
            p.updated_at = SystemTime::now();
        });
    }
}

/// Recomputes the aggregate fields from the file counters.
fn fold(p: &mut Progress, files: &[Arc<FileCounters>], rate: Option<f64>) {
    if files.is_empty() {
        return;
    }
    p.files = files
        .iter()
        .map(|f| FileProgress {
            path: f.path.clone(),
            downloaded_bytes: f.downloaded.load(Ordering::Relaxed),
            total_bytes: f.total,
            state: f.state(),
            resumed_bytes: f.resumed.load(Ordering::Relaxed),
        })
        .collect();
    p.downloaded_bytes = p.files.iter().map(|f| f.downloaded_bytes).sum();
    p.resumed_bytes = p.files.iter().map(|f| f.resumed_bytes).sum();
    p.files_total = p.files.len() as u32;
    p.files_completed = p
        .files
        .iter()
        .filter(|f| matches!(f.state, FileState::Completed | FileState::Cached))
        .count() as u32;
    if let Some(f) = p
        .files
        .iter()
        .rev()
        .find(|f| f.state == FileState::Downloading)
    {
        p.current_file = f.path.clone();
    } else if p.state != DownloadState::Downloading {
        p.current_file.clear();
    }
    if let Some(rate) = rate {
        p.bytes_per_second = rate;
    }
    let remaining = p.total_bytes.saturating_sub(p.downloaded_bytes);
    p.eta_seconds = if remaining == 0 || p.bytes_per_second <= 0.0 {
        0.0
    } else {
        remaining as f64 / p.bytes_per_second
    };
    if p.state.is_terminal() {
        p.bytes_per_second = 0.0;
        p.eta_seconds = 0.0;
    }
}
