//! Architectures: one adapter per candle model behind [`CausalLm`], chosen from config.json
//! `model_type` (safetensors) or GGUF `general.architecture`.
//!
//! Each sequence runs on its own instance with its own KV cache. Models whose candle type is
//! `Clone` keep a pristine base instance and fork a cheap copy per sequence (the weights are
//! shared tensors); the one that is not (quantized qwen2) runs one sequence at a time.

use std::{path::Path, sync::Arc};

use candle_core::{quantized::gguf_file, DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{
    gemma2, gemma3, llama, mistral, phi3, quantized_gemma3, quantized_llama, quantized_phi3,
    quantized_qwen2, quantized_qwen3, qwen2, qwen3,
};
use serde_json::Value;

use super::{
    native::{self, NativeConfig},
    EngineError,
};

/// A causal language model with its KV cache.
pub trait CausalLm: Send {
    /// Logits (one per vocabulary entry) for the token after `input`, whose first token sits
    /// at position `pos`.
    fn forward(&mut self, input: &[u32], pos: usize) -> candle_core::Result<&[f32]>;
    /// A new instance with an empty KV cache for a sequence of at most `max_len` tokens,
    /// sharing this one's weights; None when the architecture cannot share weights.
    fn fork(&self, max_len: usize) -> Option<Box<dyn CausalLm>>;
    /// Empties the KV cache (for architectures that cannot fork).
    fn reset(&mut self);
    /// Whether [`CausalLm::fork`] works.
    fn forkable(&self) -> bool {
        true
    }
    /// The candle batched model this instance runs on (GPU devices), if any: its sequences
    /// are batched into one forward pass per step.
    fn candle(&self) -> Option<Arc<native::CandleModel>> {
        None
    }

    /// Sets what the native engine's KV caches store (right after loading); returns their
    /// bytes per token, or None for a model that is not on the native engine.
    fn set_kv_dtype(&mut self, _dtype: native::KvDtype) -> Option<u64> {
        None
    }

    /// The shared native model, when this is one: its sequences are batched into one forward
    /// pass per step instead of each running its own.
    fn native(&self) -> Option<Arc<native::Model>> {
        None
    }
}

/// Architectures the engine can build from safetensors.
pub const SAFETENSORS_ARCHITECTURES: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma2",
    "gemma3",
    "gemma3_text",
];
/// Architectures the engine can build from GGUF: the llama family (llama, qwen2, qwen3) on lmx's
/// own forward pass on the CPU, and all of them on candle-transformers' quantized models (GPUs,
/// `LMX_NATIVE=0`, and phi3 and gemma3 always).
pub const GGUF_ARCHITECTURES: &[&str] = &["llama", "qwen2", "qwen3", "phi3", "gemma3"];

/// The logits of the last position as a 1-D f32 tensor, whatever shape the model returns.
fn last_logits(logits: Tensor) -> candle_core::Result<Tensor> {
    let mut logits = logits;
    while logits.rank() > 1 {
        let rows = logits.dim(0)?;
        logits = logits.get(rows - 1)?;
    }
    logits.to_dtype(DType::F32)
}

/// [`last_logits`] copied into `out` (the candle adapters' answer to [`CausalLm::forward`]).
fn logits_into(logits: Tensor, out: &mut Vec<f32>) -> candle_core::Result<&[f32]> {
    *out = last_logits(logits)?.to_vec1()?;
    Ok(out)
}

fn input(tokens: &[u32], device: &Device) -> candle_core::Result<Tensor> {
    Tensor::new(tokens, device)?.unsqueeze(0)
}

struct Llama {
    model: Arc<llama::Llama>,
    config: Arc<llama::Config>,
    cache: llama::Cache,
    dtype: DType,
    device: Device,
    logits: Vec<f32>,
}

impl CausalLm for Llama {
    fn forward(&mut self, tokens: &[u32], pos: usize) -> candle_core::Result<&[f32]> {
        let logits = self
            .model
            .forward(&input(tokens, &self.device)?, pos, &mut self.cache)?;
        logits_into(logits, &mut self.logits)
    }
    fn fork(&self, _max_len: usize) -> Option<Box<dyn CausalLm>> {
        let cache = llama::Cache::new(true, self.dtype, &self.config, &self.device).ok()?;
        Some(Box::new(Self {
            model: self.model.clone(),
            config: self.config.clone(),
            cache,
            dtype: self.dtype,
            device: self.device.clone(),
            logits: Vec::new(),
        }))
    }
    fn reset(&mut self) {
        if let Ok(cache) = llama::Cache::new(true, self.dtype, &self.config, &self.device) {
            self.cache = cache;
        }
    }
}

/// Adapter for candle models that own their KV cache and are `Clone`: the base instance stays
/// pristine and every sequence runs on a clone.
struct Cloneable<M> {
    model: M,
    device: Device,
    forward: fn(&mut M, &Tensor, usize) -> candle_core::Result<Tensor>,
    /// Feed the prompt one token at a time: candle 0.11.1's gemma3 appends non-contiguous value
    /// states to its KV cache and fails on a multi-token prefill.
    token_by_token: bool,
    logits: Vec<f32>,
}

impl<M: Clone + Send + 'static> CausalLm for Cloneable<M> {
    fn forward(&mut self, tokens: &[u32], pos: usize) -> candle_core::Result<&[f32]> {
        if self.token_by_token && tokens.len() > 1 {
            let mut logits = None;
            for (i, token) in tokens.iter().enumerate() {
                logits = Some((self.forward)(
                    &mut self.model,
                    &input(&[*token], &self.device)?,
                    pos + i,
                )?);
            }
            let logits = logits.ok_or_else(|| candle_core::Error::Msg("no input tokens".into()))?;
            return logits_into(logits, &mut self.logits);
        }
        let logits = (self.forward)(&mut self.model, &input(tokens, &self.device)?, pos)?;
        logits_into(logits, &mut self.logits)
    }
    fn fork(&self, _max_len: usize) -> Option<Box<dyn CausalLm>> {
        Some(Box::new(Self {
            model: self.model.clone(),
            device: self.device.clone(),
            forward: self.forward,
            token_by_token: self.token_by_token,
            logits: Vec::new(),
        }))
    }
    fn reset(&mut self) {}
}

/// Quantized qwen2 is not `Clone`: one sequence at a time, cache cleared between sequences.
struct QuantizedQwen2 {
    model: quantized_qwen2::ModelWeights,
    device: Device,
    logits: Vec<f32>,
}

impl CausalLm for QuantizedQwen2 {
    fn forward(&mut self, tokens: &[u32], pos: usize) -> candle_core::Result<&[f32]> {
        let logits = self.model.forward(&input(tokens, &self.device)?, pos)?;
        logits_into(logits, &mut self.logits)
    }
    fn fork(&self, _max_len: usize) -> Option<Box<dyn CausalLm>> {
        None
    }
    fn reset(&mut self) {
        self.model.clear_kv_cache();
    }
    fn forkable(&self) -> bool {
        false
    }
}

fn cloneable<M: Clone + Send + 'static>(
    model: M,
    device: &Device,
    forward: fn(&mut M, &Tensor, usize) -> candle_core::Result<Tensor>,
) -> Box<dyn CausalLm> {
    Box::new(Cloneable {
        model,
        device: device.clone(),
        forward,
        token_by_token: false,
        logits: Vec::new(),
    })
}

/// A causal LM ready to fork sequences from.
pub struct LoadedLm {
    pub model: Box<dyn CausalLm>,
    pub architecture: String,
    pub context_length: usize,
}

fn parse<T: serde::de::DeserializeOwned>(config: &Value, what: &str) -> Result<T, EngineError> {
    serde_json::from_value(config.clone())
        .map_err(|e| EngineError::Load(format!("config.json is not a valid {what} config: {e}")))
}

fn candle(context: &str) -> impl Fn(candle_core::Error) -> EngineError + '_ {
    move |e| EngineError::Load(format!("{context}: {e}"))
}

#[cfg(test)]
thread_local! {
    /// Tests: load the llama family on the candle batched model (the GPU path) on the CPU, for
    /// models loaded on this thread.
    pub(crate) static CANDLE_ON_CPU: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn candle_on_cpu() -> bool {
    #[cfg(test)]
    {
        CANDLE_ON_CPU.with(|c| c.get())
    }
    #[cfg(not(test))]
    {
        false
    }
}

pub(crate) fn context_length(config: &Value) -> usize {
    config
        .get("max_position_embeddings")
        .and_then(Value::as_u64)
        .map(|n| n as usize)
        .unwrap_or(2048)
}

/// Builds a causal LM from safetensors `weights` and its config.json.
pub fn load_safetensors(
    config: &Value,
    weights: &[std::path::PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<LoadedLm, EngineError> {
    let model_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    if device.is_cpu() && native::enabled() && !candle_on_cpu() {
        if let Some(model) = native::load_safetensors(config, weights, dtype)? {
            return Ok(LoadedLm {
                architecture: model_type,
                context_length: model.config.context_length,
                model: Box::new(native::NativeLm::base(model)),
            });
        }
    }
    if (!device.is_cpu() || candle_on_cpu()) && native::enabled() {
        // GPUs: the llama family on lmx's batched candle model.
        if let Ok(cfg) = NativeConfig::from_hf(config) {
            let model = native::CandleModel::load_safetensors(cfg, weights, dtype, device)
                .map_err(EngineError::Load)?;
            return Ok(LoadedLm {
                architecture: model_type,
                context_length: model.config.context_length,
                model: Box::new(native::CandleLm::base(model)),
            });
        }
    }
    load_candle_safetensors(config, weights, dtype, device)
}

/// [`load_safetensors`] on candle-transformers' model code only.
pub(crate) fn load_candle_safetensors(
    config: &Value,
    weights: &[std::path::PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<LoadedLm, EngineError> {
    // SAFETY: the snapshot guard has verified these files; they are not modified while mapped
    // (the cache only ever adds new blobs and replaces links, never rewrites a blob in place).
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(weights, dtype, device) }
        .map_err(candle("mapping the weights"))?;
    load_candle(config, vb, dtype, device)
}

/// Builds a causal LM from PyTorch checkpoints (`pytorch_model*.bin`, zip archives of pickled
/// tensors) and its config.json, on candle-transformers' model code: the architectures of
/// [`SAFETENSORS_ARCHITECTURES`]. Pickled tensors cannot be mapped, so they are read whole.
pub fn load_pytorch(
    config: &Value,
    weights: &[std::path::PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<LoadedLm, EngineError> {
    let mut tensors = std::collections::HashMap::new();
    for file in weights {
        let read = candle_core::pickle::read_all(file).map_err(|e| {
            EngineError::Load(format!(
                "reading the PyTorch checkpoint {}: {e}",
                file.display()
            ))
        })?;
        tensors.extend(read);
    }
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    load_candle(config, vb, dtype, device)
}

/// The candle-transformers model of config.json's `model_type` over `vb`.
fn load_candle(
    config: &Value,
    vb: VarBuilder,
    dtype: DType,
    device: &Device,
) -> Result<LoadedLm, EngineError> {
    let model_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let mut context = context_length(config);
    let model: Box<dyn CausalLm> = match model_type.as_str() {
        "llama" => {
            let cfg: llama::LlamaConfig = parse(config, "llama")?;
            let cfg = Arc::new(cfg.into_config(false));
            context = cfg.max_position_embeddings;
            let model = llama::Llama::load(vb, &cfg).map_err(candle("loading llama weights"))?;
            let cache = llama::Cache::new(true, dtype, &cfg, device)
                .map_err(candle("allocating the KV cache"))?;
            Box::new(Llama {
                model: Arc::new(model),
                config: cfg,
                cache,
                dtype,
                device: device.clone(),
                logits: Vec::new(),
            })
        }
        "mistral" => {
            let cfg: mistral::Config = parse(config, "mistral")?;
            let model = mistral::Model::new(&cfg, vb).map_err(candle("loading mistral weights"))?;
            cloneable(model, device, mistral::Model::forward)
        }
        "qwen2" => {
            let cfg: qwen2::Config = parse(config, "qwen2")?;
            let model =
                qwen2::ModelForCausalLM::new(&cfg, vb).map_err(candle("loading qwen2 weights"))?;
            cloneable(model, device, qwen2::ModelForCausalLM::forward)
        }
        "qwen3" => {
            let cfg: qwen3::Config = parse(config, "qwen3")?;
            let model =
                qwen3::ModelForCausalLM::new(&cfg, vb).map_err(candle("loading qwen3 weights"))?;
            cloneable(model, device, qwen3::ModelForCausalLM::forward)
        }
        "phi3" => {
            let cfg: phi3::Config = parse(config, "phi3")?;
            let model = phi3::Model::new(&cfg, vb).map_err(candle("loading phi3 weights"))?;
            cloneable(model, device, phi3::Model::forward)
        }
        "gemma2" => {
            let cfg: gemma2::Config = parse(config, "gemma2")?;
            let model =
                gemma2::Model::new(false, &cfg, vb).map_err(candle("loading gemma2 weights"))?;
            cloneable(model, device, gemma2::Model::forward)
        }
        "gemma3" | "gemma3_text" => {
            // Multimodal gemma3 configs nest the language model's config in text_config.
            let text = config.get("text_config").unwrap_or(config);
            context = context_length(text);
            let cfg: gemma3::Config = parse(text, "gemma3")?;
            let vb = if config.get("text_config").is_some() {
                vb.pp("language_model")
            } else {
                vb
            };
            let model =
                gemma3::Model::new(false, &cfg, vb).map_err(candle("loading gemma3 weights"))?;
            Box::new(Cloneable {
                model,
                device: device.clone(),
                forward: gemma3::Model::forward,
                token_by_token: true,
                logits: Vec::new(),
            })
        }
        other => {
            return Err(EngineError::UnsupportedArchitecture {
                model_type: other.to_owned(),
                supported: SAFETENSORS_ARCHITECTURES.join(", "),
            })
        }
    };
    Ok(LoadedLm {
        model,
        architecture: model_type,
        context_length: context,
    })
}

/// `general.architecture` and its context length (2048 when the file does not say).
pub(crate) fn gguf_architecture(content: &gguf_file::Content) -> (String, usize) {
    let architecture = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    let context_length = content
        .metadata
        .get(&format!("{architecture}.context_length"))
        .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
        .map(|n| n as usize)
        .unwrap_or(2048);
    (architecture, context_length)
}

/// Builds a quantized causal LM from a GGUF file whose header is `content`.
pub fn load_gguf(
    path: &Path,
    content: gguf_file::Content,
    device: &Device,
) -> Result<LoadedLm, EngineError> {
    let (architecture, context_length) = gguf_architecture(&content);
    if native::enabled() {
        match NativeConfig::from_gguf(&content) {
            Ok(config) if device.is_cpu() && !candle_on_cpu() => {
                let model = native::load_gguf(config, path, content)?;
                return Ok(LoadedLm {
                    model: Box::new(native::NativeLm::base(model)),
                    architecture,
                    context_length,
                });
            }
            Ok(config) => {
                // GPUs: the llama family on lmx's batched candle model.
                let model = native::CandleModel::load_gguf(config, path, content, device)
                    .map_err(EngineError::Load)?;
                return Ok(LoadedLm {
                    model: Box::new(native::CandleLm::base(model)),
                    architecture,
                    context_length,
                });
            }
            Err(why) => {
                tracing::info!(reason = %why.0, "native forward pass not used; candle-transformers runs this model")
            }
        }
    }
    load_candle_gguf(path, content, device)
}

/// [`load_gguf`] on candle-transformers' quantized model code only.
pub(crate) fn load_candle_gguf(
    path: &Path,
    content: gguf_file::Content,
    device: &Device,
) -> Result<LoadedLm, EngineError> {
    let (architecture, context_length) = gguf_architecture(&content);
    let mut file = std::fs::File::open(path)
        .map_err(|e| EngineError::Load(format!("opening {}: {e}", path.display())))?;
    let model: Box<dyn CausalLm> = match architecture.as_str() {
        "llama" => {
            let model = quantized_llama::ModelWeights::from_gguf(content, &mut file, device)
                .map_err(candle("loading GGUF llama weights"))?;
            cloneable(model, device, quantized_llama::ModelWeights::forward)
        }
        "qwen2" => {
            let model = quantized_qwen2::ModelWeights::from_gguf(content, &mut file, device)
                .map_err(candle("loading GGUF qwen2 weights"))?;
            Box::new(QuantizedQwen2 {
                model,
                device: device.clone(),
                logits: Vec::new(),
            })
        }
        "qwen3" => {
            let model = quantized_qwen3::ModelWeights::from_gguf(content, &mut file, device)
                .map_err(candle("loading GGUF qwen3 weights"))?;
            cloneable(model, device, quantized_qwen3::ModelWeights::forward)
        }
        "phi3" => {
            let model = quantized_phi3::ModelWeights::from_gguf(false, content, &mut file, device)
                .map_err(candle("loading GGUF phi3 weights"))?;
            cloneable(model, device, quantized_phi3::ModelWeights::forward)
        }
        "gemma3" => {
            let model = quantized_gemma3::ModelWeights::from_gguf(content, &mut file, device)
                .map_err(candle("loading GGUF gemma3 weights"))?;
            cloneable(model, device, quantized_gemma3::ModelWeights::forward)
        }
        other => {
            return Err(EngineError::UnsupportedArchitecture {
                model_type: other.to_owned(),
                supported: GGUF_ARCHITECTURES.join(", "),
            })
        }
    };
    Ok(LoadedLm {
        model,
        architecture,
        context_length,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_logits_flattens_any_leading_dims() {
        let t = Tensor::arange(0f32, 12., &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 6))
            .unwrap();
        let v: Vec<f32> = last_logits(t).unwrap().to_vec1().unwrap();
        assert_eq!(v, [6., 7., 8., 9., 10., 11.]);
    }
}
