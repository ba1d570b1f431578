//! The registry of loaded models: loads through the snapshot guard, a memory budget with LRU
//! eviction of idle models, per-model keep-alive, coalesced concurrent loads, and the readiness
//! signal the health service follows.
//!
//! Memory accounting: each engine's thread holds a [`Lease`] for the bytes its weights take; the
//! lease is released when the thread ends. Unloading a model with streams still running removes
//! it from the registry at once (new requests no longer find it) while those streams run to
//! completion on the engine thread; its memory counts against the budget until the last of them
//! ends.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    time::{Duration, Instant, SystemTime},
};

use candle_core::DType;
use tokio::sync::{watch, Notify};

use super::{
    cache::{self, Cache, ModelRef, ResolvedSnapshot},
    ManagerError,
};
use crate::{
    engine::{self, Engine, EngineError, LoadOptions},
    snapshot,
};

/// How long a load waits for evicted models' threads to release their memory.
const EVICTION_WAIT: Duration = Duration::from_secs(30);

/// Server-wide engine settings.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub load: LoadOptions,
    /// Bytes all loaded models may take together.
    pub memory_budget: u64,
    /// Idle time after which a model is unloaded; None: never.
    pub keep_alive: Option<Duration>,
    /// Whether an inference request on a cached, unloaded model loads it (`--load-on-demand`).
    /// Off by default here (an embedding program asks for it); `lmx serve` turns it on.
    pub load_on_demand: bool,
    /// Idle time after which a model loaded on demand is unloaded; None: never.
    pub on_demand_keep_alive: Option<Duration>,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            load: LoadOptions::default(),
            memory_budget: u64::MAX,
            keep_alive: None,
            load_on_demand: false,
            on_demand_keep_alive: None,
        }
    }
}

/// Per-request load options (unset: the server defaults).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadSpec {
    pub dtype: Option<DType>,
    pub device: Option<String>,
    /// Some(zero): never unload.
    pub keep_alive: Option<Duration>,
}

/// What names a loaded model: the model_id and revision it was loaded with.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelKey {
    pub model_id: String,
    pub revision: String,
}

impl ModelKey {
    /// Normalizes a request's names: an empty revision means "main" for repository ids and is
    /// ignored for folders.
    pub fn new(model_id: &str, revision: &str) -> Self {
        let revision = if model_id.starts_with('/') {
            String::new()
        } else if revision.is_empty() {
            cache::DEFAULT_REVISION.to_owned()
        } else {
            revision.to_owned()
        };
        Self {
            model_id: model_id.to_owned(),
            revision,
        }
    }
}

impl ModelKey {
    /// Whether this key names `repo_id` (with or without a GGUF selector).
    fn is_of_repo(&self, repo_id: &str) -> bool {
        self.model_id == repo_id
            || super::reference::Reference::parse(&self.model_id).is_ok_and(|r| r.repo == repo_id)
    }
}

impl std::fmt::Display for ModelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.revision.is_empty() {
            f.write_str(&self.model_id)
        } else {
            write!(f, "{}@{}", self.model_id, self.revision)
        }
    }
}

/// Bytes held by a loaded model's engine thread; released on drop.
pub struct Lease {
    bytes: u64,
    committed: Arc<AtomicU64>,
    released: Arc<Notify>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.committed.fetch_sub(self.bytes, Ordering::SeqCst);
        self.released.notify_waiters();
    }
}

/// A loaded model.
pub struct LoadedModel {
    pub key: ModelKey,
    pub engine: Arc<dyn Engine>,
    pub snapshot: ResolvedSnapshot,
    pub loaded_at: SystemTime,
    pub load_time: Duration,
    pub keep_alive: Option<Duration>,
    last_used: Mutex<(Instant, SystemTime)>,
    request_count: AtomicU64,
}

impl LoadedModel {
    /// When the model last served (started or finished) a request.
    pub fn last_used_at(&self) -> SystemTime {
        self.last_used
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1
    }

    fn idle_for(&self) -> Duration {
        self.last_used
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .elapsed()
    }

    fn touch(&self) {
        *self
            .last_used
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            (Instant::now(), SystemTime::now());
    }

    pub fn request_count(&self) -> u64 {
        self.request_count.load(Ordering::Relaxed)
    }

    fn is_idle(&self) -> bool {
        self.engine.stats().in_flight == 0
    }
}

/// Marks a model in use for the life of one request (touches it at both ends).
pub struct InUse(Arc<LoadedModel>);

impl InUse {
    pub fn model(&self) -> &Arc<LoadedModel> {
        &self.0
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        self.0.touch();
    }
}

/// A model being loaded or loaded.
#[derive(Clone)]
pub enum ModelStatus {
    Loading {
        key: ModelKey,
        started: SystemTime,
    },
    Loaded(Arc<LoadedModel>),
    /// The last load failed (kept until the next load or a delete).
    Failed {
        key: ModelKey,
        error: String,
    },
}

type LoadResult = Result<Arc<LoadedModel>, Arc<ManagerError>>;

enum Slot {
    Loading {
        done: watch::Receiver<Option<LoadResult>>,
        started: SystemTime,
    },
    Ready(Arc<LoadedModel>),
}

/// The outcome of a load.
pub struct Loaded {
    pub model: Arc<LoadedModel>,
    /// True when it was already loaded and nothing was done.
    pub already_loaded: bool,
}

struct Inner {
    cache: Cache,
    settings: EngineSettings,
    slots: Mutex<HashMap<ModelKey, Slot>>,
    /// Why the last load of a model failed, until it is loaded again or deleted.
    failed: Mutex<HashMap<ModelKey, String>>,
    committed: Arc<AtomicU64>,
    released: Arc<Notify>,
    ready: watch::Sender<bool>,
}

/// See the module docs. Cheap to clone.
#[derive(Clone)]
pub struct Registry(Arc<Inner>);

impl Registry {
    pub fn new(cache: Cache, settings: EngineSettings, ready: watch::Sender<bool>) -> Self {
        Self(Arc::new(Inner {
            cache,
            settings,
            slots: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            committed: Arc::new(AtomicU64::new(0)),
            released: Arc::new(Notify::new()),
            ready,
        }))
    }

    /// Bytes the loaded models' threads hold, plus loads in progress.
    pub fn committed_bytes(&self) -> u64 {
        self.0.committed.load(Ordering::SeqCst)
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<ModelKey, Slot>> {
        self.0
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn failed(&self) -> std::sync::MutexGuard<'_, HashMap<ModelKey, String>> {
        self.0
            .failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets the failed loads of `repo_id` (all revisions): its snapshots were deleted.
    pub fn forget_failures(&self, repo_id: &str) {
        self.failed().retain(|k, _| !k.is_of_repo(repo_id));
    }

    fn publish_readiness(&self, slots: &HashMap<ModelKey, Slot>) {
        let ready = slots.values().any(|s| matches!(s, Slot::Ready(_)));
        self.0.ready.send_replace(ready);
    }

    /// Loads a model, or joins a load of the same model in progress, or finds it loaded.
    pub async fn load(
        &self,
        model_id: &str,
        revision: &str,
        spec: LoadSpec,
    ) -> Result<Loaded, Arc<ManagerError>> {
        let model_ref =
            cache::parse_model_ref(model_id, revision).map_err(|e| Arc::new(e.into()))?;
        let key = ModelKey::new(model_id, revision);
        let mut done = {
            let mut slots = self.slots();
            match slots.get(&key) {
                Some(Slot::Ready(model)) => {
                    check_same_options(model, &spec).map_err(Arc::new)?;
                    model.touch();
                    return Ok(Loaded {
                        model: model.clone(),
                        already_loaded: true,
                    });
                }
                Some(Slot::Loading { done, .. }) => done.clone(),
                None => {
                    self.failed().remove(&key);
                    let (tx, rx) = watch::channel(None);
                    slots.insert(
                        key.clone(),
                        Slot::Loading {
                            done: rx.clone(),
                            started: SystemTime::now(),
                        },
                    );
                    let registry = self.clone();
                    let key = key.clone();
                    // The load runs on its own task: callers that give up do not abandon it.
                    tokio::spawn(async move {
                        let result = registry
                            .do_load(&key, model_ref, spec)
                            .await
                            .map_err(Arc::new);
                        registry.finish_load(&key, &result);
                        let _ = tx.send(Some(result));
                    });
                    rx
                }
            }
        };
        let result = done
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Arc::new(ManagerError::Engine(EngineError::Stopped)))?
            .clone()
            .expect("checked by wait_for");
        result.map(|model| Loaded {
            model,
            already_loaded: false,
        })
    }

    fn finish_load(&self, key: &ModelKey, result: &LoadResult) {
        let mut slots = self.slots();
        match result {
            Ok(model) => {
                self.failed().remove(key);
                slots.insert(key.clone(), Slot::Ready(model.clone()));
                if let Some(keep_alive) = model.keep_alive {
                    self.spawn_keep_alive(Arc::downgrade(model), keep_alive);
                }
            }
            Err(e) => {
                self.failed().insert(key.clone(), e.to_string());
                slots.remove(key);
            }
        }
        self.publish_readiness(&slots);
    }

    async fn do_load(
        &self,
        key: &ModelKey,
        model_ref: ModelRef,
        spec: LoadSpec,
    ) -> Result<Arc<LoadedModel>, ManagerError> {
        let started = Instant::now();
        let cache = self.0.cache.clone();
        let dtype = spec.dtype.or(self.0.settings.load.dtype);
        let device = spec
            .device
            .clone()
            .unwrap_or_else(|| self.0.settings.load.device.clone());
        let estimate_device = device.clone();
        let kv = self.0.settings.load.kv_cache_dtype;
        // Resolve, guard, and size the snapshot off the runtime (blocking file I/O).
        let (snapshot, estimate) =
            tokio::task::spawn_blocking(move || -> Result<_, ManagerError> {
                let snapshot = cache.resolve(&model_ref)?;
                let report = snapshot::is_snapshot_complete(&snapshot.path)?;
                for warning in &report.problems {
                    tracing::warn!(file = %warning.file, kind = %warning.kind, detail = %warning.detail, "snapshot warning");
                }
                let gguf = snapshot.gguf.as_ref().map(|f| f.path.as_str());
                let estimate =
                    engine::estimate_memory_of(&snapshot.path, dtype, &estimate_device, gguf, kv)?;
                Ok((snapshot, estimate))
            })
            .await??;
        // The weights, and KV caches for --max-concurrent sequences at full context length
        // (less when the whole budget cannot hold that: requests then wait for room, and one
        // that can never fit is refused with the numbers).
        let settings = &self.0.settings;
        let kv_bytes = estimate
            .kv_for(settings.load.max_concurrent.max(1))
            .min(settings.memory_budget.saturating_sub(estimate.weights));
        let bytes = estimate.weights + kv_bytes;
        let lease = self.reserve(key, bytes).await?;
        let mut options = self.0.settings.load.clone();
        options.dtype = dtype;
        options.device = device;
        options.kv_budget = Some(kv_bytes);
        options.gguf_file = snapshot.gguf.as_ref().map(|f| f.path.clone());
        let path = snapshot.path.clone();
        let engine =
            tokio::task::spawn_blocking(move || engine::load(&path, &options, Box::new(lease)))
                .await??;
        let keep_alive = match spec.keep_alive.or(self.0.settings.keep_alive) {
            Some(d) if d.is_zero() => None,
            other => other,
        };
        let load_time = started.elapsed();
        tracing::info!(model = %key, ?load_time, memory_bytes = bytes, kv_cache_bytes = kv_bytes, architecture = %engine.description().architecture, "model loaded");
        Ok(Arc::new(LoadedModel {
            key: key.clone(),
            engine,
            snapshot,
            loaded_at: SystemTime::now(),
            load_time,
            keep_alive,
            last_used: Mutex::new((Instant::now(), SystemTime::now())),
            request_count: AtomicU64::new(0),
        }))
    }

    /// Reserves `bytes` of the budget, evicting least recently used idle models if needed.
    async fn reserve(&self, key: &ModelKey, bytes: u64) -> Result<Lease, ManagerError> {
        let budget = self.0.settings.memory_budget;
        let deadline = Instant::now() + EVICTION_WAIT;
        loop {
            let released = self.0.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            {
                let mut slots = self.slots();
                let used = self.committed_bytes();
                if used.saturating_add(bytes) <= budget {
                    self.0.committed.fetch_add(bytes, Ordering::SeqCst);
                    return Ok(Lease {
                        bytes,
                        committed: self.0.committed.clone(),
                        released: self.0.released.clone(),
                    });
                }
                let victim = slots
                    .iter()
                    .filter_map(|(k, slot)| match slot {
                        Slot::Ready(model) if model.is_idle() => {
                            Some((model.idle_for(), k.clone()))
                        }
                        _ => None,
                    })
                    .max_by_key(|(idle, _)| *idle)
                    .map(|(_, k)| k);
                match victim {
                    Some(victim) => {
                        tracing::info!(evicted = %victim, for_model = %key, needed = bytes, used, budget, "evicting the least recently used idle model");
                        slots.remove(&victim);
                        self.publish_readiness(&slots);
                    }
                    None => {
                        return Err(ManagerError::MemoryBudget {
                            model: key.to_string(),
                            needed: bytes,
                            used,
                            budget,
                        })
                    }
                }
            }
            // Wait for the evicted model's thread to let go of its memory.
            if tokio::time::timeout_at(deadline.into(), released)
                .await
                .is_err()
            {
                return Err(ManagerError::MemoryBudget {
                    model: key.to_string(),
                    needed: bytes,
                    used: self.committed_bytes(),
                    budget,
                });
            }
        }
    }

    fn spawn_keep_alive(&self, model: Weak<LoadedModel>, keep_alive: Duration) {
        let registry = self.clone();
        tokio::spawn(async move {
            loop {
                let Some(loaded) = model.upgrade() else {
                    return;
                };
                let wait = if loaded.is_idle() {
                    keep_alive.saturating_sub(loaded.idle_for())
                } else {
                    keep_alive
                };
                if wait.is_zero() {
                    let mut slots = registry.slots();
                    let current = matches!(slots.get(&loaded.key), Some(Slot::Ready(m)) if Arc::ptr_eq(m, &loaded));
                    if current {
                        tracing::info!(model = %loaded.key, ?keep_alive, "unloading idle model (keep_alive)");
                        slots.remove(&loaded.key);
                        registry.publish_readiness(&slots);
                    }
                    return;
                }
                drop(loaded);
                tokio::time::sleep(wait).await;
            }
        });
    }

    /// Unloads a model; returns the bytes its weights take (freed once running streams end).
    pub fn unload(&self, model_id: &str, revision: &str) -> Result<u64, ManagerError> {
        let key = ModelKey::new(model_id, revision);
        let mut slots = self.slots();
        match slots.get(&key) {
            Some(Slot::Ready(model)) => {
                let bytes = model.engine.description().memory_bytes;
                let in_flight = model.engine.stats().in_flight;
                slots.remove(&key);
                self.publish_readiness(&slots);
                tracing::info!(model = %key, in_flight, "model unloaded");
                Ok(bytes)
            }
            Some(Slot::Loading { .. }) => Err(ManagerError::Loading(key.to_string())),
            None => Err(ManagerError::NotLoaded(key.to_string())),
        }
    }

    /// A loaded model for a request: counts the request and keeps the model's last-use time.
    pub fn use_model(&self, model_id: &str, revision: &str) -> Result<InUse, ManagerError> {
        let key = ModelKey::new(model_id, revision);
        let slots = self.slots();
        match slots.get(&key) {
            Some(Slot::Ready(model)) => {
                model.touch();
                model.request_count.fetch_add(1, Ordering::Relaxed);
                Ok(InUse(model.clone()))
            }
            Some(Slot::Loading { .. }) => Err(ManagerError::Loading(key.to_string())),
            None => {
                drop(slots);
                // Say whether the model exists at all.
                let exists = cache::parse_model_ref(model_id, revision)
                    .ok()
                    .is_some_and(|r| self.0.cache.resolve(&r).is_ok());
                if exists {
                    Err(ManagerError::NotLoaded(key.to_string()))
                } else {
                    Err(ManagerError::UnknownModel(key.to_string()))
                }
            }
        }
    }

    /// [`Registry::use_model`], loading the model first when it is in the cache but not loaded
    /// and load on demand is on: the snapshot guard, the memory budget and LRU eviction apply,
    /// concurrent first requests share one load, and the model unloads after the on-demand
    /// keep-alive of idle time.
    pub async fn use_or_load(
        &self,
        model_id: &str,
        revision: &str,
    ) -> Result<InUse, Arc<ManagerError>> {
        match self.use_model(model_id, revision) {
            Err(ManagerError::NotLoaded(_) | ManagerError::Loading(_))
                if self.0.settings.load_on_demand =>
            {
                let spec = LoadSpec {
                    // Some(zero): never unload.
                    keep_alive: Some(self.0.settings.on_demand_keep_alive.unwrap_or_default()),
                    ..LoadSpec::default()
                };
                let loaded = self.load(model_id, revision, spec).await?;
                if !loaded.already_loaded {
                    tracing::info!(model = %loaded.model.key, "loaded on demand");
                }
                self.use_model(model_id, revision).map_err(Arc::new)
            }
            other => other.map_err(Arc::new),
        }
    }

    /// Whether any revision of `repo_id` is loaded or loading.
    pub fn has_repo(&self, repo_id: &str) -> bool {
        self.slots().keys().any(|k| k.is_of_repo(repo_id))
    }

    /// Every model loading or loaded, ordered by key.
    pub fn list(&self) -> Vec<ModelStatus> {
        let slots = self.slots();
        let mut out: Vec<(ModelKey, ModelStatus)> = slots
            .iter()
            .map(|(key, slot)| {
                let status = match slot {
                    Slot::Ready(model) => ModelStatus::Loaded(model.clone()),
                    Slot::Loading { started, .. } => ModelStatus::Loading {
                        key: key.clone(),
                        started: *started,
                    },
                };
                (key.clone(), status)
            })
            .collect();
        for (key, error) in self.failed().iter() {
            if !slots.contains_key(key) {
                let status = ModelStatus::Failed {
                    key: key.clone(),
                    error: error.clone(),
                };
                out.push((key.clone(), status));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.into_iter().map(|(_, s)| s).collect()
    }
}

/// Refuses a load of a loaded model with another dtype or device than it has: the request
/// would otherwise be answered with an instance other than the one it asked for.
fn check_same_options(model: &LoadedModel, spec: &LoadSpec) -> Result<(), ManagerError> {
    let d = model.engine.description();
    let dtype_differs = spec.dtype.is_some_and(|dtype| dtype != d.dtype);
    let device_differs = spec
        .device
        .as_ref()
        .is_some_and(|device| *device != d.device);
    if !dtype_differs && !device_differs {
        return Ok(());
    }
    let asked_dtype = spec.dtype.unwrap_or(d.dtype);
    let asked_device = spec.device.clone().unwrap_or_else(|| d.device.clone());
    Err(ManagerError::InUse {
        reason: "LOAD_OPTIONS_CONFLICT",
        message: format!(
            "{} is loaded with dtype {:?} on device {}; the request asks for dtype {:?} on \
             device {}: unload it first to load it differently",
            model.key, d.dtype, d.device, asked_dtype, asked_device
        ),
    })
}
