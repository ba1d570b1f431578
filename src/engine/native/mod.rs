//! lmx's own CPU forward pass for the llama family (Llama 2/3, SmolLM, TinyLlama, Mistral,
//! Qwen2, Qwen3), from safetensors or GGUF, on the kernels of [`crate::engine::kernels`].
//!
//! Why not candle-transformers here: its CPU decode runs the matrix-vector products of a token
//! on one core without AVX-512, its quantized path uses scalar code unless built for the host
//! CPU, and its KV cache grows by concatenation every token. This module keeps weights in the
//! kernels' layouts, a KV cache allocated once per sequence, and buffers reused across tokens.
//! Other architectures, and every model on a GPU, stay on candle-transformers (`arch.rs`).
//! `LMX_NATIVE=0` in the environment turns this path off (for comparisons).
//!
//! The model runs any number of sequences in one call ([`Model::forward`] takes a slice of
//! [`Step`]s), which is what continuous batching builds on.

pub mod candle_batched;
mod config;
mod model;
mod weights;

use std::{fs::File, path::Path, sync::Arc};

use candle_core::{quantized::gguf_file, DType};
use serde_json::Value;

pub use candle_batched::{CandleCache, CandleLm, CandleModel, CandleStep};
pub use config::{KvDtype, NativeConfig, Unsupported};
pub use model::{KvCache, Model, Step, Workspace};

use super::{arch::CausalLm, kernels, EngineError};
use weights::Source;

/// Longest prompt chunk one forward call takes (bounds the workspace).
const PREFILL_CHUNK: usize = 512;

/// Whether the native path may be used (`LMX_NATIVE=0` turns it off).
pub fn enabled() -> bool {
    std::env::var("LMX_NATIVE").map_or(true, |v| v != "0" && v != "false")
}

/// The model in `files` with `config`, or None when its config is one this path does not run.
pub fn load_safetensors(
    config: &Value,
    files: &[std::path::PathBuf],
    dtype: DType,
) -> Result<Option<Model>, EngineError> {
    let cfg = match NativeConfig::from_hf(config) {
        Ok(cfg) => cfg,
        Err(why) => {
            tracing::info!(reason = %why.0, "native forward pass not used; candle-transformers runs this model");
            return Ok(None);
        }
    };
    let source = Source::safetensors(files, dtype).map_err(EngineError::Load)?;
    Model::load(cfg, source)
        .map(Some)
        .map_err(EngineError::Load)
}

/// The model in the GGUF file at `path`, whose header `content` gave `config`
/// ([`NativeConfig::from_gguf`]).
pub fn load_gguf(
    config: NativeConfig,
    path: &Path,
    content: gguf_file::Content,
) -> Result<Model, EngineError> {
    let file = File::open(path)
        .map_err(|e| EngineError::Load(format!("opening {}: {e}", path.display())))?;
    Model::load(config, Source::gguf(content, file)).map_err(EngineError::Load)
}

/// One sequence on a shared [`Model`]: its KV cache and its buffers.
pub struct NativeLm {
    model: Arc<Model>,
    cache: KvCache,
    ws: Workspace,
}

impl NativeLm {
    /// The base instance the engine forks sequences from (an empty cache).
    pub fn base(model: Model) -> Self {
        let model = Arc::new(model);
        NativeLm {
            cache: KvCache::new(&model.config, 0),
            model,
            ws: Workspace::default(),
        }
    }
}

impl CausalLm for NativeLm {
    fn forward(&mut self, input: &[u32], pos: usize) -> candle_core::Result<&[f32]> {
        if pos > self.cache.len() {
            candle_core::bail!(
                "position {pos} is past the {} cached tokens",
                self.cache.len()
            );
        }
        self.cache.truncate(pos);
        let (model, cache, ws) = (&self.model, &mut self.cache, &mut self.ws);
        kernels::pool::session(|| {
            for chunk in input.chunks(PREFILL_CHUNK) {
                model.forward(
                    &mut [Step {
                        tokens: chunk,
                        cache: &mut *cache,
                    }],
                    ws,
                )?;
            }
            Ok::<_, String>(())
        })
        .map_err(candle_core::Error::Msg)?;
        Ok(&self.ws.logits[..self.model.config.vocab])
    }

    fn fork(&self, max_len: usize) -> Option<Box<dyn CausalLm>> {
        let capacity = max_len.clamp(1, self.model.config.context_length.max(1));
        Some(Box::new(NativeLm {
            model: self.model.clone(),
            cache: KvCache::new(&self.model.config, capacity),
            ws: Workspace::default(),
        }))
    }

    fn reset(&mut self) {
        self.cache.truncate(0);
    }

    fn set_kv_dtype(&mut self, dtype: KvDtype) -> Option<u64> {
        // Unshared right after loading; otherwise the caches keep the type they have.
        if let Some(model) = Arc::get_mut(&mut self.model) {
            model.config.kv_dtype = dtype;
            self.cache = KvCache::new(&model.config, 0);
        }
        Some(KvCache::bytes_per_token(&self.model.config))
    }

    fn native(&self) -> Option<Arc<Model>> {
        Some(self.model.clone())
    }
}

#[cfg(test)]
mod tests;
