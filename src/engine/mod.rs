//! The inference engine: candle models on dedicated OS threads behind the [`Engine`] trait.
//!
//! [`load`] builds an engine from a snapshot folder that the snapshot guard has already passed
//! (the manager calls the guard; this module never looks at the hub, the cache layout or gRPC).
//! Requests are validated and tokenized on the caller's side, take a queue slot (none left:
//! [`EngineError::QueueFull`] at once) and go to the model's thread over a channel; tokens come
//! back on an unbounded per-request channel, so the engine thread never waits for a client.

mod arch;
mod batch;
mod chat;
mod device;
mod embed;
mod gguf_tokenizer;
pub mod kernels;
mod memory;
#[doc(hidden)]
pub mod native;
mod prefix;
mod sampling;
mod text;
mod tokenizer;
mod validation;
mod worker;

use std::{
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc},
    time::Instant,
};

use candle_core::{quantized::gguf_file, DType, Device};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, Semaphore};

pub use chat::{ChatMessage, ChatTemplate, TemplateLimits};
pub use device::validate_device;
pub use embed::Embeddings;
pub use memory::{estimate_memory, estimate_memory_of, MemoryEstimate};
pub use native::KvDtype;
pub use sampling::SamplingParams;
pub use text::{StopMatcher, StopOutcome, TextStream};
pub use validation::{Limits, RawParams, ValidParams};
pub use worker::{Counters, StepKind};

use crate::snapshot::WeightFormat;
use worker::{EmbedJob, GenerateJob, Job, Runner, Worker};

/// Why an engine operation failed. No tonic here: `crate::error` maps these to gRPC codes.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{message}")]
    Validation {
        field: &'static str,
        message: String,
    },
    #[error("unsupported architecture {model_type:?}; supported: {supported}")]
    UnsupportedArchitecture {
        model_type: String,
        supported: String,
    },
    #[error("the model has {limit} requests queued or running, its limit; retry later")]
    QueueFull { limit: usize },
    #[error("the request needs {needed} bytes of KV cache ({tokens} tokens of prompt and max_tokens × {per_token} bytes per token), more than this model's KV cache budget of {budget} bytes; lower max_tokens or the prompt, or load the model with a larger --memory-budget or --max-concurrent")]
    KvCacheBudget {
        tokens: usize,
        per_token: u64,
        needed: u64,
        budget: u64,
    },
    #[error("the model has no chat template (tokenizer_config.json chat_template, chat_template.jinja or GGUF tokenizer.chat_template)")]
    NoChatTemplate,
    #[error("the chat template failed: {0}")]
    Template(String),
    #[error("the model's chat template exceeded a limit: {0}")]
    TemplateLimit(String),
    #[error("this is an embedding model: use Embed, not Generate or Chat")]
    NotAGenerativeModel,
    #[error("this is a text generation model: Embed needs an embedding model (BERT family)")]
    NotAnEmbeddingModel,
    #[error("loading the model failed: {0}")]
    Load(String),
    #[error("device {0}")]
    Device(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("the model's engine thread has stopped")]
    Stopped,
}

/// What the engine loads and how.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// None: f32 (the CPU default; bf16 is several times slower on CPU with candle).
    pub dtype: Option<DType>,
    /// "cpu", "cuda" or "cuda:N".
    pub device: String,
    /// Requests queued or running per model.
    pub max_queue: usize,
    /// Sequences generated concurrently per model.
    pub max_concurrent: usize,
    /// Most prompt tokens one batched step processes (longer prompts go in chunks between the
    /// other sequences' decode steps).
    pub prefill_chunk: usize,
    /// Bytes the model's KV caches may take (running sequences and kept prefixes together);
    /// None: `max_concurrent` sequences at full context length.
    pub kv_budget: Option<u64>,
    /// Keep finished sequences' KV caches to reuse for prompts that start the same way.
    pub prefix_cache: bool,
    pub limits: Limits,
    /// Which GGUF file of the folder to load (a path relative to it); None: the first by name.
    pub gguf_file: Option<String>,
    /// The element type of the native engine's KV caches (candle's models keep their own).
    pub kv_cache_dtype: KvDtype,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: None,
            device: "cpu".into(),
            max_queue: 32,
            max_concurrent: 4,
            prefill_chunk: 256,
            kv_budget: None,
            prefix_cache: true,
            limits: Limits::default(),
            gguf_file: None,
            kv_cache_dtype: KvDtype::default(),
        }
    }
}

/// Generation model or embedding model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    Generator,
    Embedder,
}

/// Facts about a loaded model.
#[derive(Debug, Clone)]
pub struct ModelDescription {
    pub kind: ModelKind,
    pub architecture: String,
    pub format: WeightFormat,
    pub context_length: usize,
    /// Bytes held against the memory budget: the weights and `kv_cache_bytes`.
    pub memory_bytes: u64,
    /// Bytes reserved for KV caches.
    pub kv_cache_bytes: u64,
    /// Bytes one cached token takes.
    pub kv_bytes_per_token: u64,
    pub dtype: DType,
    pub device: String,
    pub has_chat_template: bool,
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub id: u32,
    pub text: String,
    pub logprob: Option<f32>,
    pub special: bool,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Length,
    EosToken,
    StopSequence,
}

/// The final item of a generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub time_to_first_token_ms: f64,
    pub tokens_per_second: f64,
    pub text: String,
    pub stop_sequence: Option<String>,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_prompt_tokens: usize,
}

/// What a generation stream carries.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    Token(TokenEvent),
    Done(Completion),
    Failed(String),
}

/// The prompt of a generation.
#[derive(Debug, Clone)]
pub enum Prompt {
    Text {
        text: String,
        add_special_tokens: bool,
    },
    Chat(Vec<ChatMessage>),
}

/// A token of a tokenized text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPiece {
    pub id: u32,
    pub piece: String,
    pub start: usize,
    pub end: usize,
    pub special: bool,
}

/// Queue and activity figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Requests waiting or running.
    pub in_flight: usize,
    /// Sequences being generated.
    pub active: usize,
    pub tokens_generated: u64,
    pub cancelled: u64,
    /// KV cache bytes in use (running sequences and kept prefixes).
    pub kv_cache_used_bytes: u64,
    /// Prompt tokens served from the prefix cache since load.
    pub cached_prompt_tokens: u64,
    /// Forward passes since load, by what they carried (indexed by [`StepKind`]).
    pub steps: [u64; 3],
    /// Nanoseconds those passes took, by the same kinds.
    pub step_nanos: [u64; 3],
    /// Sequences the passes carried, summed over the passes.
    pub step_sequences: u64,
    /// Prompt tokens run through the model since load (not served from the prefix cache).
    pub prompt_tokens_computed: u64,
}

/// A loaded model.
pub trait Engine: Send + Sync {
    fn description(&self) -> &ModelDescription;
    fn stats(&self) -> EngineStats;
    /// Validates `params`, tokenizes the prompt (blocking: call off the async runtime), takes a
    /// queue slot and queues the generation. Events arrive on the returned channel; dropping it
    /// cancels the generation before its next forward pass.
    fn generate(
        &self,
        prompt: Prompt,
        params: &RawParams,
    ) -> Result<mpsc::UnboundedReceiver<StreamEvent>, EngineError>;
    /// Splits text into tokens (blocking).
    fn tokenize(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<TokenPiece>, EngineError>;
    /// Queues an embedding job; the answer arrives on the returned channel.
    fn embed(
        &self,
        inputs: Vec<String>,
        normalize: bool,
    ) -> Result<oneshot::Receiver<Result<Embeddings, EngineError>>, EngineError>;
    /// Renders a conversation with the model's chat template.
    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, EngineError>;
}

/// The candle implementation of [`Engine`].
pub struct CandleEngine {
    description: ModelDescription,
    tokenizer: tokenizers::Tokenizer,
    special_ids: std::collections::HashSet<u32>,
    chat_template: Option<ChatTemplate>,
    jobs: mpsc::UnboundedSender<Job>,
    slots: Arc<Semaphore>,
    max_queue: usize,
    limits: Limits,
    counters: Arc<Counters>,
}

fn parse_device(spec: &str) -> Result<Device, EngineError> {
    match spec {
        "" | "cpu" => Ok(Device::Cpu),
        cuda if cuda == "cuda" || cuda.starts_with("cuda:") => {
            let ordinal = cuda
                .strip_prefix("cuda:")
                .map(|n| n.parse::<usize>())
                .transpose()
                .map_err(|_| EngineError::Device(format!("{cuda:?}: expected cuda:N")))?
                .unwrap_or(0);
            if !candle_core::utils::cuda_is_available() {
                return Err(EngineError::Device(format!(
                    "{cuda:?} is not available: this lmx was built without the `cuda` feature or no GPU is present"
                )));
            }
            Device::new_cuda(ordinal).map_err(|e| EngineError::Device(format!("{cuda:?}: {e}")))
        }
        other => Err(EngineError::Device(format!(
            "{other:?} is unknown; use cpu, cuda or cuda:N"
        ))),
    }
}

/// The files an index (`model.safetensors.index.json`, `pytorch_model.bin.index.json`) in
/// `dir` names in its `weight_map`, sorted and deduplicated; None when there is no index.
fn indexed_files(dir: &Path, index: &str) -> Result<Option<Vec<PathBuf>>, EngineError> {
    let Ok(bytes) = std::fs::read(dir.join(index)) else {
        return Ok(None);
    };
    let value: Value =
        serde_json::from_slice(&bytes).map_err(|e| EngineError::Load(format!("{index}: {e}")))?;
    let mut files: Vec<PathBuf> = value
        .get("weight_map")
        .and_then(Value::as_object)
        .map(|m| {
            m.values()
                .filter_map(Value::as_str)
                .map(|f| dir.join(f))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files.dedup();
    Ok(Some(files))
}

/// Weight files of a safetensors snapshot: those the index names, else every top-level file.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, EngineError> {
    if let Some(files) = indexed_files(dir, "model.safetensors.index.json")? {
        return Ok(files);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| EngineError::Load(format!("listing {}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    Ok(files)
}

/// Weight files of a PyTorch snapshot: those `pytorch_model.bin.index.json` names, else the
/// top-level `pytorch_model*.bin` files.
fn pytorch_files(dir: &Path) -> Result<Vec<PathBuf>, EngineError> {
    if let Some(files) = indexed_files(dir, "pytorch_model.bin.index.json")? {
        return Ok(files);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| EngineError::Load(format!("listing {}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "bin")
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("pytorch_model"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The GGUF file to load from `dir`: `chosen` (relative to it) when given, else the first by name.
fn gguf_file(dir: &Path, chosen: Option<&str>) -> Option<PathBuf> {
    if let Some(chosen) = chosen {
        return Some(dir.join(chosen));
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    files.sort();
    files.into_iter().next()
}

fn read_config(dir: &Path) -> Result<Value, EngineError> {
    let bytes = std::fs::read(dir.join("config.json"))
        .map_err(|e| EngineError::Load(format!("reading config.json: {e}")))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| EngineError::Load(format!("config.json does not parse: {e}")))
}

/// A causal LM loaded from a Hugging Face folder (config.json), with its description.
fn hf_generator(
    mut lm: arch::LoadedLm,
    format: WeightFormat,
    memory_bytes: u64,
    config: &Value,
    options: &LoadOptions,
    device: &Device,
    info: tokenizer::TokenizerInfo,
) -> (Runner, ModelDescription, tokenizer::TokenizerInfo) {
    let dtype = options.dtype.unwrap_or(DType::F32);
    let kv_bytes_per_token = lm
        .model
        .set_kv_dtype(options.kv_cache_dtype)
        .unwrap_or_else(|| memory::kv_bytes_per_token_hf(config, dtype, device.is_cpu()));
    let description = ModelDescription {
        kind: ModelKind::Generator,
        architecture: lm.architecture,
        format,
        context_length: lm.context_length,
        memory_bytes,
        kv_cache_bytes: 0,
        kv_bytes_per_token,
        dtype,
        device: options.device.clone(),
        has_chat_template: info.chat_template.is_some(),
    };
    (generator(lm.model, &info), description, info)
}

/// Loads the model in `dir` (a snapshot the guard passed). Blocking: run it off the async
/// runtime. `guard` is kept by the model's thread and dropped when it ends.
pub fn load(
    dir: &Path,
    options: &LoadOptions,
    guard: Box<dyn Send>,
) -> Result<Arc<dyn Engine>, EngineError> {
    let device = parse_device(&options.device)?;
    let dtype = options.dtype.unwrap_or(DType::F32);
    let no_safetensors = safetensors_files(dir).map(|f| f.is_empty()).unwrap_or(true);
    let pytorch = if no_safetensors {
        pytorch_files(dir)?
    } else {
        Vec::new()
    };
    let (runner, description, tokenizer_info) = if !pytorch.is_empty() {
        let config = read_config(dir)?;
        let memory = memory::pytorch_memory(&pytorch, dtype)?;
        let info = tokenizer::load(dir, Some(&config), None)?;
        let lm = arch::load_pytorch(&config, &pytorch, dtype, &device)?;
        hf_generator(
            lm,
            WeightFormat::PytorchBin,
            memory,
            &config,
            options,
            &device,
            info,
        )
    } else if let Some(path) =
        gguf_file(dir, options.gguf_file.as_deref()).filter(|_| no_safetensors)
    {
        let mut file = std::fs::File::open(&path)
            .map_err(|e| EngineError::Load(format!("opening {}: {e}", path.display())))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| EngineError::Load(format!("reading the GGUF header: {e}")))?;
        let info = tokenizer::load(dir, None, Some(&content))?;
        let memory = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let gguf_kv_bytes = memory::kv_bytes_per_token_gguf(&content);
        let mut lm = arch::load_gguf(&path, content, &device)?;
        let kv_bytes_per_token = lm
            .model
            .set_kv_dtype(options.kv_cache_dtype)
            .unwrap_or(gguf_kv_bytes);
        let description = ModelDescription {
            kind: ModelKind::Generator,
            architecture: lm.architecture,
            format: WeightFormat::Gguf,
            context_length: lm.context_length,
            memory_bytes: memory,
            kv_cache_bytes: 0,
            kv_bytes_per_token,
            dtype: DType::F32,
            device: options.device.clone(),
            has_chat_template: info.chat_template.is_some(),
        };
        (generator(lm.model, &info), description, info)
    } else {
        let config = read_config(dir)?;
        let files = safetensors_files(dir)?;
        if files.is_empty() {
            return Err(EngineError::Load(
                "no safetensors, PyTorch or GGUF weights in the snapshot".into(),
            ));
        }
        let memory = memory::weights_memory(&files, dtype)?;
        let info = tokenizer::load(dir, Some(&config), None)?;
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("");
        if model_type == "bert" {
            let embedder = embed::Embedder::load(
                dir,
                &config,
                &files,
                info.tokenizer.clone(),
                dtype,
                &device,
            )?;
            let description = ModelDescription {
                kind: ModelKind::Embedder,
                architecture: model_type.to_owned(),
                format: WeightFormat::Safetensors,
                context_length: embedder.max_tokens,
                memory_bytes: memory,
                kv_cache_bytes: 0,
                kv_bytes_per_token: 0,
                dtype,
                device: options.device.clone(),
                has_chat_template: false,
            };
            (Runner::Embedder(embedder), description, info)
        } else {
            let lm = arch::load_safetensors(&config, &files, dtype, &device)?;
            hf_generator(
                lm,
                WeightFormat::Safetensors,
                memory,
                &config,
                options,
                &device,
                info,
            )
        }
    };

    let chat_template = match tokenizer_info.chat_template.clone() {
        Some(source) => Some(ChatTemplate::new(
            source,
            tokenizer_info.bos_token.clone(),
            tokenizer_info.eos_token.clone(),
        )?),
        None => None,
    };
    let mut description = description;
    if description.kv_bytes_per_token > 0 {
        description.kv_cache_bytes = options.kv_budget.unwrap_or_else(|| {
            MemoryEstimate {
                weights: 0,
                kv_bytes_per_token: description.kv_bytes_per_token,
                context_length: description.context_length,
            }
            .kv_for(options.max_concurrent.max(1))
        });
        description.memory_bytes += description.kv_cache_bytes;
    }
    let counters = Arc::new(Counters::default());
    let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
    let worker = Worker {
        runner,
        jobs: jobs_rx,
        max_concurrent: options.max_concurrent,
        prefill_chunk: options.prefill_chunk,
        kv: worker::KvBudget {
            budget: description.kv_cache_bytes,
            per_token: description.kv_bytes_per_token,
            prefix_cache: options.prefix_cache,
        },
        counters: counters.clone(),
        guard,
        #[cfg(test)]
        gate: worker::NEXT_GATE.with(|g| g.borrow_mut().take()),
    };
    std::thread::Builder::new()
        .name(format!("lmx-engine-{}", description.architecture))
        .spawn(move || worker.run())
        .map_err(|e| EngineError::Load(format!("starting the engine thread: {e}")))?;
    Ok(Arc::new(CandleEngine {
        description,
        special_ids: tokenizer_info.special_ids,
        tokenizer: tokenizer_info.tokenizer,
        chat_template,
        jobs: jobs_tx,
        slots: Arc::new(Semaphore::new(options.max_queue.max(1))),
        max_queue: options.max_queue.max(1),
        limits: options.limits.clone(),
        counters,
    }))
}

/// Builds a `tokenizers` tokenizer from a GGUF file's metadata (byte-level BPE models).
pub fn tokenizer_from_gguf(
    content: &gguf_file::Content,
) -> Result<tokenizers::Tokenizer, EngineError> {
    gguf_tokenizer::build(content)
}

fn generator(model: Box<dyn arch::CausalLm>, info: &tokenizer::TokenizerInfo) -> Runner {
    Runner::Generator {
        base: Some(model),
        tokenizer: info.tokenizer.clone(),
        eos_ids: info.eos_ids.clone(),
        special_ids: info.special_ids.clone(),
    }
}

impl CandleEngine {
    fn slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, EngineError> {
        self.slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| EngineError::QueueFull {
                limit: self.max_queue,
            })
    }

    fn encode(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<tokenizers::Encoding, EngineError> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }
}

impl Engine for CandleEngine {
    fn description(&self) -> &ModelDescription {
        &self.description
    }

    fn stats(&self) -> EngineStats {
        EngineStats {
            in_flight: self.max_queue - self.slots.available_permits(),
            active: self.counters.active.load(Ordering::Relaxed),
            tokens_generated: self.counters.tokens_generated.load(Ordering::Relaxed),
            cancelled: self.counters.cancelled.load(Ordering::Relaxed),
            kv_cache_used_bytes: self.counters.kv_used.load(Ordering::Relaxed),
            cached_prompt_tokens: self.counters.cached_prompt_tokens.load(Ordering::Relaxed),
            steps: self
                .counters
                .steps
                .each_ref()
                .map(|c| c.load(Ordering::Relaxed)),
            step_nanos: self
                .counters
                .step_nanos
                .each_ref()
                .map(|c| c.load(Ordering::Relaxed)),
            step_sequences: self.counters.step_sequences.load(Ordering::Relaxed),
            prompt_tokens_computed: self.counters.prompt_tokens_computed.load(Ordering::Relaxed),
        }
    }

    fn generate(
        &self,
        prompt: Prompt,
        params: &RawParams,
    ) -> Result<mpsc::UnboundedReceiver<StreamEvent>, EngineError> {
        let accepted_at = Instant::now();
        if self.description.kind != ModelKind::Generator {
            return Err(EngineError::NotAGenerativeModel);
        }
        let ids = match prompt {
            Prompt::Text {
                text,
                add_special_tokens,
            } => {
                validation::validate_prompt("prompt", &text)?;
                self.encode(&text, add_special_tokens)?.get_ids().to_vec()
            }
            Prompt::Chat(messages) => {
                if messages.is_empty() {
                    return Err(EngineError::Validation {
                        field: "messages",
                        message: "`messages` must not be empty".into(),
                    });
                }
                validation::validate_messages(messages.len(), &self.limits)?;
                let rendered = self.render_chat(&messages)?;
                self.encode(&rendered, false)?.get_ids().to_vec()
            }
        };
        if ids.is_empty() {
            return Err(EngineError::Validation {
                field: "prompt",
                message: "`prompt` must produce at least one token. Given: 0 tokens".into(),
            });
        }
        validation::validate_prompt_tokens(ids.len(), &self.limits)?;
        let params = validation::validate(
            params,
            ids.len(),
            self.description.context_length,
            &self.limits,
        )?;
        let d = &self.description;
        let tokens = (ids.len() + params.max_tokens).min(d.context_length.max(1));
        let needed = tokens as u64 * d.kv_bytes_per_token;
        if needed > d.kv_cache_bytes {
            return Err(EngineError::KvCacheBudget {
                tokens,
                per_token: d.kv_bytes_per_token,
                needed,
                budget: d.kv_cache_bytes,
            });
        }
        let permit = self.slot()?;
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        self.jobs
            .send(Job::Generate(GenerateJob {
                prompt: ids,
                params,
                events: events_tx,
                accepted_at,
                span: tracing::Span::current(),
                permit,
            }))
            .map_err(|_| EngineError::Stopped)?;
        Ok(events_rx)
    }

    fn tokenize(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<TokenPiece>, EngineError> {
        let encoding = self.encode(text, add_special_tokens)?;
        Ok(encoding
            .get_ids()
            .iter()
            .zip(encoding.get_tokens())
            .zip(encoding.get_offsets())
            .map(|((&id, piece), &(start, end))| TokenPiece {
                id,
                piece: piece.clone(),
                start,
                end,
                special: self.special_ids.contains(&id),
            })
            .collect())
    }

    fn embed(
        &self,
        inputs: Vec<String>,
        normalize: bool,
    ) -> Result<oneshot::Receiver<Result<Embeddings, EngineError>>, EngineError> {
        if self.description.kind != ModelKind::Embedder {
            return Err(EngineError::NotAnEmbeddingModel);
        }
        if inputs.is_empty() {
            return Err(EngineError::Validation {
                field: "inputs",
                message: "`inputs` must have at least 1 string. Given: 0".into(),
            });
        }
        validation::validate_embed_inputs(inputs.len(), &self.limits)?;
        let permit = self.slot()?;
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job::Embed(EmbedJob {
                inputs,
                normalize,
                reply,
                span: tracing::Span::current(),
                permit,
            }))
            .map_err(|_| EngineError::Stopped)?;
        Ok(answer)
    }

    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        self.chat_template
            .as_ref()
            .ok_or(EngineError::NoChatTemplate)?
            .render(messages, true)
    }
}

#[cfg(test)]
mod tests;
