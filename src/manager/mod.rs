//! The model manager: resolves models in the cache, verifies snapshots, and (in later layers)
//! runs downloads and hands verified snapshots to the engine. Knows nothing of gRPC.

pub mod cache;

use std::path::PathBuf;

pub use cache::{Cache, CacheError, ModelRef, ResolvedSnapshot};

use crate::snapshot::{self, Mode, Report, SnapshotError};

/// Errors of manager operations.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
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

/// Owns the cache (and, as they land, downloads and the engine).
#[derive(Debug, Clone)]
pub struct Manager {
    cache: Cache,
}

impl Manager {
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache: Cache::new(cache_dir),
        }
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
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
