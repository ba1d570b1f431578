//! The model manager: resolves models in the cache, verifies snapshots, and (in later layers)
//! runs downloads and hands verified snapshots to the engine. Knows nothing of gRPC.

pub mod aliases;
pub mod cache;
pub mod catalog;
pub mod download;
pub mod models;
pub mod reference;

pub use cache::{Cache, CacheError, ModelRef, ResolvedSnapshot};
pub use models::{EngineSettings, LoadSpec, ModelKey, Registry};

use crate::{
    engine::EngineError,
    snapshot::{self, Mode, Report, SnapshotError},
};

/// Errors of manager operations.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("loading {model} needs {needed} bytes but {used} of the {budget}-byte memory budget are in use and no idle model can be evicted")]
    MemoryBudget {
        model: String,
        needed: u64,
        used: u64,
        budget: u64,
    },
    #[error("model {0} is still loading; retry when LoadModel has returned")]
    Loading(String),
    #[error("model {0} is not loaded; call LoadModel first")]
    NotLoaded(String),
    #[error("model {0} is neither loaded nor in the cache")]
    UnknownModel(String),
    #[error("{message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    #[error("{message}")]
    InUse {
        reason: &'static str,
        message: String,
    },
    /// A per-server limit on concurrent work (downloads, progress streams) is reached.
    #[error("{message}")]
    Exhausted {
        reason: &'static str,
        message: String,
    },
    #[error("a background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A verified snapshot: where it is and what the check found.
#[derive(Debug, Clone)]
pub struct Verified {
    pub snapshot: ResolvedSnapshot,
    pub report: Report,
}

/// Resolves `model_id` + `revision` in `cache` and checks the snapshot (blocking I/O).
pub fn verify_blocking(
    cache: &Cache,
    model_id: &str,
    revision: &str,
    mode: Mode,
) -> Result<Verified, ManagerError> {
    let model = cache::parse_model_ref(model_id, revision)?;
    let snapshot = cache.resolve(&model)?;
    let report = snapshot::verify(&snapshot.path, mode)?;
    Ok(Verified { snapshot, report })
}

/// Owns the cache, the registry of loaded models and the downloads.
#[derive(Clone)]
pub struct Manager {
    cache: Cache,
    models: Registry,
    downloads: download::Downloads,
    aliases: aliases::Aliases,
}

impl Manager {
    /// A manager over `cache` (its folder and model roots); `ready` follows "at least one model is loaded".
    pub fn new(
        cache: Cache,
        settings: EngineSettings,
        downloads: download::DownloadSettings,
        ready: tokio::sync::watch::Sender<bool>,
    ) -> Result<Self, String> {
        let cache_dir = cache.root().to_path_buf();
        let models = Registry::new(cache.clone(), settings, ready);
        let downloads = download::Downloads::new(cache_dir, downloads, models.clone())?;
        Ok(Self {
            cache,
            models,
            downloads,
            aliases: aliases::Aliases::default(),
        })
    }

    /// The model aliases.
    pub fn aliases(&self) -> &aliases::Aliases {
        &self.aliases
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The loaded models.
    pub fn models(&self) -> &Registry {
        &self.models
    }

    /// The downloads.
    pub fn downloads(&self) -> &download::Downloads {
        &self.downloads
    }

    /// Every snapshot in the cache, checked (QUICK).
    pub async fn snapshots(&self) -> Result<Vec<catalog::SnapshotInfo>, ManagerError> {
        let cache = self.cache.clone();
        Ok(tokio::task::spawn_blocking(move || catalog::scan(&cache)).await?)
    }

    /// Deletes a repository's snapshot at `revision` (every snapshot when empty) and the blobs
    /// nothing else references. Refused while the model is loaded or downloading.
    pub async fn delete_model(
        &self,
        repo_id: &str,
        revision: &str,
    ) -> Result<catalog::Deleted, ManagerError> {
        if reference::Reference::parse(repo_id).is_ok_and(|r| r.selector.is_some()) {
            return Err(ManagerError::InvalidArgument {
                field: "model_id",
                message: format!(
                    "`model_id` {repo_id:?} selects a GGUF file; DeleteModel deletes whole \
                     snapshots: give the repository id alone"
                ),
            });
        }
        cache::validate_repo_id(repo_id)?;
        if !revision.is_empty() {
            cache::validate_revision(revision)?;
        }
        if self.models.has_repo(repo_id) {
            return Err(ManagerError::InUse {
                reason: "MODEL_LOADED",
                message: format!("{repo_id} is loaded; unload it before deleting it"),
            });
        }
        if self.downloads.is_downloading(repo_id) {
            return Err(ManagerError::InUse {
                reason: "MODEL_DOWNLOADING",
                message: format!(
                    "{repo_id} is being downloaded; cancel the download before deleting it"
                ),
            });
        }
        let repo_id_owned = repo_id.to_owned();
        let (cache, repo_id, revision) =
            (self.cache.clone(), repo_id.to_owned(), revision.to_owned());
        let deleted =
            tokio::task::spawn_blocking(move || catalog::delete(&cache, &repo_id, &revision))
                .await??;
        self.models.forget_failures(&repo_id_owned);
        tracing::info!(commits = ?deleted.commits, freed_bytes = deleted.freed_bytes, "snapshots deleted");
        Ok(deleted)
    }

    /// Verifies a model's snapshot off the async runtime (the check does blocking file I/O).
    pub async fn verify(
        &self,
        model_id: &str,
        revision: &str,
        mode: Mode,
    ) -> Result<Verified, ManagerError> {
        let (cache, model_id, revision) =
            (self.cache.clone(), model_id.to_owned(), revision.to_owned());
        tokio::task::spawn_blocking(move || verify_blocking(&cache, &model_id, &revision, mode))
            .await?
    }
}
