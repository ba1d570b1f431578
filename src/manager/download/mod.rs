//! The download manager: one task per (repository, revision) in a registry, pulling from the
//! configured hub into the Hugging Face cache layout shared with Python's huggingface_hub.
//!
//! `start` starts a task or joins the one running for the same (repo, revision); progress is a
//! `watch` channel per task (latest-state semantics: any number of watchers, a slow one never
//! slows the download, a watcher leaving cancels nothing). `cancel` stops every transfer of a
//! task at once; partial data stays for a resume and is never visible under `snapshots/`.
//! Finished tasks stay listed for a while (the most recent `history` of them).
//!
//! What comes from where: hf-hub builds the repository-info request and the file URLs, sends
//! them with its auth headers, reads file metadata and writes refs; reqwest (hf-hub's client)
//! streams ranged GETs; backon supplies the retry backoff; sha2/sha1 hash content; fs4 reads the
//! free space; globset matches the patterns. lmx adds the resumable partial format, parallel
//! parts, stall detection, cancellation, hashing and the error codes.

mod hub;
mod patterns;
mod progress;
mod repair;
mod task;
mod transfer;

use std::{
    collections::{HashMap, VecDeque},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio_util::sync::CancellationToken;

pub use hub::RetryPolicy;
pub use patterns::Patterns;
pub use progress::{
    AutoLoadState, DownloadErrorCode, DownloadFailure, DownloadState, FileProgress, FileState,
    Progress, ProgressRx,
};
pub use task::TaskSettings;
pub use transfer::TransferSettings;

use super::{
    cache::{validate_repo_id, validate_revision, DEFAULT_REVISION},
    models::Registry,
    LoadSpec, ManagerError,
};
use crate::secret::Secret;
use progress::Tracker;

/// Download manager settings.
#[derive(Debug, Clone)]
pub struct DownloadSettings {
    pub hub_endpoint: String,
    pub hf_token: Option<Secret>,
    pub task: TaskSettings,
    pub retry: RetryPolicy,
    /// Finished downloads kept for GetDownload / ListDownloads / WatchDownload.
    pub history: usize,
    /// Downloads running at once; more are refused (TOO_MANY_DOWNLOADS).
    pub max_active: usize,
    /// Progress streams open at once; more are refused (TOO_MANY_WATCHERS).
    pub max_watchers: usize,
}

impl DownloadSettings {
    /// Defaults for a hub endpoint.
    pub fn new(hub_endpoint: impl Into<String>) -> Self {
        Self {
            hub_endpoint: hub_endpoint.into(),
            hf_token: None,
            task: TaskSettings {
                files_in_parallel: 4,
                transfer: TransferSettings {
                    part_size: 64 << 20,
                    parts_in_parallel: 4,
                    stall_timeout: Duration::from_secs(30),
                },
                disk_margin: 512 << 20,
            },
            retry: RetryPolicy {
                attempts: 5,
                min_delay: Duration::from_millis(500),
                max_delay: Duration::from_secs(10),
            },
            history: 256,
            max_active: 4,
            max_watchers: 64,
        }
    }
}

/// A DownloadModel request.
#[derive(Debug, Clone, Default)]
pub struct DownloadRequest {
    pub repo_id: String,
    pub revision: String,
    pub allow_patterns: Vec<String>,
    pub ignore_patterns: Vec<String>,
    pub auto_load: Option<LoadSpec>,
    /// A RepairModel request: re-fetch only the files of the cached snapshot that fail the FULL
    /// check (the patterns are not used).
    pub repair: bool,
    /// The reference's GGUF selector: only that GGUF file and the non-weight files.
    pub gguf: Option<super::reference::Selector>,
}

/// One writer per blob at a time, across tasks.
#[derive(Default, Clone)]
pub struct BlobLocks(Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>);

impl BlobLocks {
    fn lock(&self, etag: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.retain(|_, m| Arc::strong_count(m) > 1);
        map.entry(etag.to_owned()).or_default().clone()
    }
}

struct Entry {
    key: (String, String),
    tracker: Arc<Tracker>,
    cancel: CancellationToken,
    /// What the task was asked for: a request to join it must ask for the same.
    asked: Asked,
}

/// The parts of a request that change what a task does (patterns in any order).
#[derive(Debug, Clone, PartialEq)]
struct Asked {
    allow_patterns: Vec<String>,
    ignore_patterns: Vec<String>,
    auto_load: Option<LoadSpec>,
    repair: bool,
    gguf: Option<super::reference::Selector>,
}

impl Asked {
    fn of(request: &DownloadRequest) -> Self {
        let sorted = |v: &[String]| {
            let mut v = v.to_vec();
            v.sort();
            v.dedup();
            v
        };
        Self {
            allow_patterns: sorted(&request.allow_patterns),
            ignore_patterns: sorted(&request.ignore_patterns),
            auto_load: request.auto_load.clone(),
            repair: request.repair,
            gguf: request.gguf.clone(),
        }
    }

    /// What differs from `running`, in words; None when nothing does.
    fn difference(&self, running: &Asked) -> Option<String> {
        let mut what = Vec::new();
        let kind = |repair: bool| if repair { "a repair" } else { "a download" };
        if self.repair != running.repair {
            what.push(format!(
                "kind: {} (running: {})",
                kind(self.repair),
                kind(running.repair)
            ));
        }
        if self.gguf != running.gguf {
            let show = |s: &Option<super::reference::Selector>| {
                s.as_ref().map_or("none".to_owned(), ToString::to_string)
            };
            what.push(format!(
                "GGUF selector {} (running: {})",
                show(&self.gguf),
                show(&running.gguf)
            ));
        }
        if self.allow_patterns != running.allow_patterns {
            what.push(format!(
                "allow_patterns {:?} (running: {:?})",
                self.allow_patterns, running.allow_patterns
            ));
        }
        if self.ignore_patterns != running.ignore_patterns {
            what.push(format!(
                "ignore_patterns {:?} (running: {:?})",
                self.ignore_patterns, running.ignore_patterns
            ));
        }
        if self.auto_load != running.auto_load {
            what.push(format!(
                "auto_load {:?} (running: {:?})",
                self.auto_load, running.auto_load
            ));
        }
        (!what.is_empty()).then(|| what.join(", "))
    }
}

#[derive(Default)]
struct Tasks {
    by_id: HashMap<String, Arc<Entry>>,
    running: HashMap<(String, String), String>,
    /// Ids, oldest first.
    order: VecDeque<String>,
}

/// See the module docs. Cheap to clone.
#[derive(Clone)]
pub struct Downloads {
    ctx: Arc<task::Context>,
    tasks: Arc<Mutex<Tasks>>,
    history: usize,
    max_active: usize,
    watchers: Arc<tokio::sync::Semaphore>,
}

fn new_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("dl-{nanos:x}-{n}")
}

impl Downloads {
    pub fn new(
        cache_dir: PathBuf,
        settings: DownloadSettings,
        models: Registry,
    ) -> Result<Self, String> {
        let hub = hub::HubClient::new(
            &settings.hub_endpoint,
            settings.hf_token.as_ref(),
            settings.retry.clone(),
        )?;
        Ok(Self {
            ctx: Arc::new(task::Context {
                hub: Arc::new(hub),
                cache_dir,
                settings: settings.task,
                models,
                blob_locks: BlobLocks::default(),
            }),
            tasks: Arc::new(Mutex::new(Tasks::default())),
            history: settings.history,
            max_active: settings.max_active.max(1),
            watchers: Arc::new(tokio::sync::Semaphore::new(settings.max_watchers.max(1))),
        })
    }

    /// A new watcher's place, or a refusal when `max_watchers` streams are open.
    fn watcher_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ManagerError> {
        self.watchers
            .clone()
            .try_acquire_owned()
            .map_err(|_| ManagerError::Exhausted {
                reason: "TOO_MANY_WATCHERS",
                message: "too many download progress streams are open (--max-watchers); \
                          close one, or poll GetDownload instead"
                    .to_owned(),
            })
    }

    fn watcher(&self, mut rx: ProgressRx) -> Result<ProgressRx, ManagerError> {
        rx.slot = Some(self.watcher_slot()?);
        Ok(rx)
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, Tasks> {
        self.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts a download, or joins the one running for the same (repo, revision). Names and
    /// patterns are validated before any I/O.
    pub fn start(&self, request: DownloadRequest) -> Result<ProgressRx, ManagerError> {
        validate_repo_id(&request.repo_id)?;
        let revision = if request.revision.is_empty() {
            DEFAULT_REVISION.to_owned()
        } else {
            request.revision.clone()
        };
        validate_revision(&revision)?;
        let patterns = Patterns::new(&request.allow_patterns, &request.ignore_patterns)
            .map_err(|(field, message)| ManagerError::InvalidArgument { field, message })?;
        let key = (request.repo_id.clone(), revision.clone());
        // A repair works on the snapshot in the cache: one that is not there is NOT_FOUND now.
        let repair = if request.repair {
            let cache = super::Cache::new(self.ctx.cache_dir.clone());
            let snapshot = cache.resolve(&super::ModelRef::Hub {
                repo_id: request.repo_id.clone(),
                revision: revision.clone(),
                selector: None,
            })?;
            Some(repair::Target {
                commit: snapshot.commit,
                path: snapshot.path,
            })
        } else {
            None
        };

        let mut tasks = self.tasks();
        let asked = Asked::of(&request);
        if let Some((id, entry)) = tasks
            .running
            .get(&key)
            .and_then(|id| tasks.by_id.get(id).map(|e| (id, e)))
        {
            if let Some(difference) = asked.difference(&entry.asked) {
                return Err(ManagerError::InUse {
                    reason: "DOWNLOAD_CONFLICT",
                    message: format!(
                        "download {id} of {}@{} is running with other options; this request \
                         differs in {difference}: watch {id}, or cancel it and start again",
                        key.0, key.1
                    ),
                });
            }
            let rx = entry.tracker.subscribe();
            drop(tasks);
            return self.watcher(rx);
        }
        if tasks.running.len() >= self.max_active {
            return Err(ManagerError::Exhausted {
                reason: "TOO_MANY_DOWNLOADS",
                message: format!(
                    "{} downloads are running, the limit (--max-downloads); retry when one has finished",
                    tasks.running.len()
                ),
            });
        }
        // The watcher's place first: a refused caller starts nothing.
        let slot = self.watcher_slot()?;
        let id = new_id();
        let now = SystemTime::now();
        let tracker = Tracker::new(Progress {
            download_id: id.clone(),
            model_id: request.repo_id.clone(),
            revision: revision.clone(),
            commit: String::new(),
            state: DownloadState::Queued,
            failure: None,
            downloaded_bytes: 0,
            total_bytes: 0,
            files_completed: 0,
            files_total: 0,
            current_file: String::new(),
            bytes_per_second: 0.0,
            eta_seconds: 0.0,
            auto_load: if request.auto_load.is_some() {
                AutoLoadState::Pending
            } else {
                AutoLoadState::NotRequested
            },
            auto_load_message: String::new(),
            files: Vec::new(),
            problems: Vec::new(),
            resumed_bytes: 0,
            started_at: now,
            updated_at: now,
            finished_at: None,
            allow_patterns: request.allow_patterns.clone(),
            ignore_patterns: request.ignore_patterns.clone(),
            repair: request.repair,
            repaired_files: Vec::new(),
            summary: String::new(),
            seq: 0,
        });
        let mut rx = tracker.subscribe();
        rx.slot = Some(slot);
        let entry = Arc::new(Entry {
            key: key.clone(),
            tracker: tracker.clone(),
            cancel: CancellationToken::new(),
            asked,
        });
        tasks.by_id.insert(id.clone(), entry.clone());
        tasks.running.insert(key, id.clone());
        tasks.order.push_back(id.clone());
        self.trim(&mut tasks);
        drop(tasks);

        let this = self.clone();
        let task_request = task::Request {
            gguf: request.gguf.map(patterns::GgufChoice),
            repo_id: request.repo_id,
            revision,
            patterns,
            auto_load: request.auto_load,
            repair,
        };
        tracing::info!(download_id = %id, model = %task_request.repo_id, revision = %task_request.revision, "download started");
        tokio::spawn(async move {
            task::run(
                this.ctx.clone(),
                task_request,
                entry.tracker.clone(),
                entry.cancel.clone(),
            )
            .await;
            let mut tasks = this.tasks();
            if tasks.running.get(&entry.key) == Some(&id) {
                tasks.running.remove(&entry.key);
            }
        });
        Ok(rx)
    }

    /// Drops the oldest finished tasks beyond the history size.
    fn trim(&self, tasks: &mut Tasks) {
        while tasks.order.len() > self.history.max(1) {
            let Some(oldest) = tasks
                .order
                .iter()
                .position(|id| !tasks.running.values().any(|r| r == id))
            else {
                return;
            };
            if let Some(id) = tasks.order.remove(oldest) {
                tasks.by_id.remove(&id);
            }
        }
    }

    /// Follows a download by id.
    /// None for an unknown id; an error when `max_watchers` streams are open.
    pub fn watch(&self, id: &str) -> Result<Option<ProgressRx>, ManagerError> {
        let rx = self.tasks().by_id.get(id).map(|e| e.tracker.subscribe());
        rx.map(|rx| self.watcher(rx)).transpose()
    }

    /// The current progress of a download.
    pub fn get(&self, id: &str) -> Option<Progress> {
        self.tasks().by_id.get(id).map(|e| e.tracker.current())
    }

    /// Running and recently finished downloads, newest first.
    pub fn list(&self) -> Vec<Progress> {
        let tasks = self.tasks();
        tasks
            .order
            .iter()
            .rev()
            .filter_map(|id| tasks.by_id.get(id))
            .map(|e| e.tracker.current())
            .collect()
    }

    /// Whether a download of `repo_id` (any revision) is running.
    pub fn is_downloading(&self, repo_id: &str) -> bool {
        self.tasks().running.keys().any(|(repo, _)| repo == repo_id)
    }

    /// Cancels a download and waits (up to 5 s) for its transfers to stop. Returns the progress
    /// after the cancel, or None for an unknown id.
    pub async fn cancel(&self, id: &str) -> Option<Progress> {
        let entry = self.tasks().by_id.get(id).cloned()?;
        entry.cancel.cancel();
        let mut rx = entry.tracker.latest();
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|p| p.state.is_terminal()),
        )
        .await;
        Some(entry.tracker.current())
    }
}
