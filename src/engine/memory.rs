//! What a model takes in memory before it is loaded: its weights, from the file headers, and
//! its KV cache per token, from its config. The manager reserves both against the memory budget;
//! the engine thread keeps the KV cache of its sequences (and of the prefixes it keeps for reuse)
//! within the KV share it was given.

use std::path::{Path, PathBuf};

use candle_core::{quantized::gguf_file, DType};
use serde_json::Value;

use super::{
    arch, gguf_file as find_gguf,
    native::{self, KvDtype, NativeConfig, Unsupported},
    pytorch_files, read_config, safetensors_files, EngineError,
};

/// A model's memory needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Bytes the weights take.
    pub weights: u64,
    /// Bytes one cached token takes (keys and values of every layer); 0 for embedding models.
    pub kv_bytes_per_token: u64,
    /// The model's context length (the longest sequence one KV cache holds).
    pub context_length: usize,
}

impl MemoryEstimate {
    /// The KV cache of `sequences` sequences at full context length.
    pub fn kv_for(&self, sequences: usize) -> u64 {
        self.kv_bytes_per_token
            .saturating_mul(self.context_length as u64)
            .saturating_mul(sequences as u64)
    }
}

/// Bytes of one cached token of a model whose KV cache has `layers × kv_heads × head_dim` keys
/// and as many values, of `elem` bytes each.
fn per_token(layers: u64, kv_heads: u64, head_dim: u64, elem: u64) -> u64 {
    2 * layers * kv_heads * head_dim * elem
}

/// Bytes of a KV cache element: lmx's CPU path and candle's quantized models keep f32;
/// candle-transformers' safetensors models keep the weights' dtype.
fn element_bytes(dtype: DType, cpu: bool) -> u64 {
    if cpu {
        4
    } else {
        dtype.size_in_bytes() as u64
    }
}

/// KV bytes per token from a Hugging Face config.json (0 when it names no decoder layers).
pub(crate) fn kv_bytes_per_token_hf(config: &Value, dtype: DType, cpu: bool) -> u64 {
    let field = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| config.get(*n).and_then(Value::as_u64))
    };
    if config.get("model_type").and_then(Value::as_str) == Some("bert") {
        return 0;
    }
    let Some(layers) = field(&["num_hidden_layers", "n_layer", "num_layers"]) else {
        return 0;
    };
    let heads = field(&["num_attention_heads", "n_head"])
        .unwrap_or(1)
        .max(1);
    let kv_heads = field(&["num_key_value_heads", "multi_query_group_num"]).unwrap_or(heads);
    let head_dim = field(&["head_dim"])
        .unwrap_or_else(|| field(&["hidden_size", "n_embd"]).unwrap_or(0) / heads);
    per_token(layers, kv_heads, head_dim, element_bytes(dtype, cpu))
}

/// KV bytes per token from a GGUF header (its caches are f32).
pub(crate) fn kv_bytes_per_token_gguf(content: &gguf_file::Content) -> u64 {
    let (arch, _) = arch::gguf_architecture(content);
    let get = |key: &str| {
        content
            .metadata
            .get(&format!("{arch}.{key}"))
            .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
    };
    let Some(layers) = get("block_count") else {
        return 0;
    };
    let heads = get("attention.head_count").unwrap_or(1).max(1);
    let kv_heads = get("attention.head_count_kv").unwrap_or(heads);
    let head_dim =
        get("attention.key_length").unwrap_or_else(|| get("embedding_length").unwrap_or(0) / heads);
    per_token(layers, kv_heads, head_dim, 4)
}

/// Bytes the weights take in memory at `dtype` (floating tensors are converted to it).
pub(crate) fn weights_memory(files: &[PathBuf], dtype: DType) -> Result<u64, EngineError> {
    // SAFETY: read-only mapping of verified files, only their headers are read here.
    let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }
        .map_err(|e| EngineError::Load(format!("reading the weight headers: {e}")))?;
    Ok(tensors
        .tensors()
        .iter()
        .map(|(_, view)| {
            let elems: usize = view.shape().iter().product();
            let size = match view.dtype() {
                safetensors::Dtype::F16
                | safetensors::Dtype::BF16
                | safetensors::Dtype::F32
                | safetensors::Dtype::F64 => dtype.size_in_bytes(),
                other => other.bitsize() / 8,
            };
            (elems * size) as u64
        })
        .sum())
}

/// Bytes the tensors of PyTorch checkpoints take at `dtype` (floats) or their own type, from
/// the pickled headers only.
pub(crate) fn pytorch_memory(files: &[PathBuf], dtype: DType) -> Result<u64, EngineError> {
    let mut total = 0u64;
    for file in files {
        let infos = candle_core::pickle::read_pth_tensor_info(file, false, None)
            .map_err(|e| EngineError::Load(format!("reading {}: {e}", file.display())))?;
        for info in infos {
            let size = if info.dtype.is_float() {
                dtype.size_in_bytes()
            } else {
                info.dtype.size_in_bytes()
            };
            total += (info.layout.shape().elem_count() * size) as u64;
        }
    }
    Ok(total)
}

/// What the model in `dir` will take in memory at `dtype` (None: f32) on `device` ("cpu",
/// "cuda", …), from the weight headers and the config only: what the manager checks against
/// its memory budget before loading.
pub fn estimate_memory(
    dir: &Path,
    dtype: Option<DType>,
    device: &str,
) -> Result<MemoryEstimate, EngineError> {
    estimate_memory_of(dir, dtype, device, None, KvDtype::default())
}

/// KV bytes per token when the native engine runs a model of this config (its caches hold
/// `kv`), else None.
fn native_kv(config: Result<NativeConfig, Unsupported>, cpu: bool, kv: KvDtype) -> Option<u64> {
    let mut config = config.ok().filter(|_| cpu && native::enabled())?;
    config.kv_dtype = kv;
    Some(native::KvCache::bytes_per_token(&config))
}

/// [`estimate_memory`] of the GGUF file `gguf_file` (relative to `dir`) when the model is GGUF.
pub fn estimate_memory_of(
    dir: &Path,
    dtype: Option<DType>,
    device: &str,
    gguf_file: Option<&str>,
    kv: KvDtype,
) -> Result<MemoryEstimate, EngineError> {
    let cpu = device == "cpu";
    let files = safetensors_files(dir)?;
    let pytorch = if files.is_empty() {
        pytorch_files(dir)?
    } else {
        Vec::new()
    };
    if !pytorch.is_empty() {
        let dtype = dtype.unwrap_or(DType::F32);
        let config = read_config(dir)?;
        return Ok(MemoryEstimate {
            weights: pytorch_memory(&pytorch, dtype)?,
            kv_bytes_per_token: native_kv(NativeConfig::from_hf(&config), cpu, kv)
                .unwrap_or_else(|| kv_bytes_per_token_hf(&config, dtype, cpu)),
            context_length: arch::context_length(&config),
        });
    }
    if files.is_empty() {
        let Some(path) = find_gguf(dir, gguf_file) else {
            return Err(EngineError::Load(
                "no safetensors, PyTorch or GGUF weights in the snapshot".into(),
            ));
        };
        let weights = std::fs::metadata(&path)
            .map(|m| m.len())
            .map_err(|e| EngineError::Load(format!("reading {}: {e}", path.display())))?;
        let mut file = std::fs::File::open(&path)
            .map_err(|e| EngineError::Load(format!("opening {}: {e}", path.display())))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| EngineError::Load(format!("reading the GGUF header: {e}")))?;
        return Ok(MemoryEstimate {
            weights,
            kv_bytes_per_token: native_kv(NativeConfig::from_gguf(&content), cpu, kv)
                .unwrap_or_else(|| kv_bytes_per_token_gguf(&content)),
            context_length: arch::gguf_architecture(&content).1,
        });
    }
    let dtype = dtype.unwrap_or(DType::F32);
    let config = read_config(dir)?;
    Ok(MemoryEstimate {
        weights: weights_memory(&files, dtype)?,
        kv_bytes_per_token: native_kv(NativeConfig::from_hf(&config), cpu, kv)
            .unwrap_or_else(|| kv_bytes_per_token_hf(&config, dtype, cpu)),
        context_length: arch::context_length(&config),
    })
}
