//! The model manager: resolves models in the cache, verifies snapshots, and (in later layers)
//! runs downloads and hands verified snapshots to the engine. Knows nothing of gRPC.

pub mod cache;
pub mod models;

use std::path::PathBuf;

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

/// Owns the cache and the registry of loaded models.
#[derive(Clone)]
pub struct Manager {
    cache: Cache,
    models: Registry,
}

impl Manager {
    /// A manager over `cache_dir`; `ready` follows "at least one model is loaded".
    pub fn new(
        cache_dir: impl Into<PathBuf>,
        settings: EngineSettings,
        ready: tokio::sync::watch::Sender<bool>,
    ) -> Self {
        let cache = Cache::new(cache_dir);
        Self {
            models: Registry::new(cache.clone(), settings, ready),
            cache,
        }
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The loaded models.
    pub fn models(&self) -> &Registry {
        &self.models
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
