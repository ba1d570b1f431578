//! Sentence embeddings with BERT-family models (candle's `bert`): tokenize a batch with padding,
//! run the encoder, pool over the attention mask (mean, or CLS when the sentence-transformers
//! pooling config asks for it), and optionally scale to unit length.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use serde_json::Value;
use tokenizers::{PaddingParams, Tokenizer, TruncationParams};

use super::EngineError;

/// How token vectors become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
}

/// A loaded embedding model.
pub struct Embedder {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    pooling: Pooling,
    pub dimensions: usize,
    pub max_tokens: usize,
}

/// Embeddings of a batch.
#[derive(Debug, Clone)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    pub dimensions: usize,
    pub prompt_tokens: usize,
}

fn pooling(dir: &Path) -> Pooling {
    let config = std::fs::read(dir.join("1_Pooling/config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    match config {
        Some(c) if c.get("pooling_mode_cls_token").and_then(Value::as_bool) == Some(true) => {
            Pooling::Cls
        }
        _ => Pooling::Mean,
    }
}

impl Embedder {
    /// Loads a BERT model from a snapshot folder.
    pub fn load(
        dir: &Path,
        config: &Value,
        weights: &[std::path::PathBuf],
        tokenizer: Tokenizer,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, EngineError> {
        let cfg: Config = serde_json::from_value(config.clone()).map_err(|e| {
            EngineError::Load(format!("config.json is not a valid bert config: {e}"))
        })?;
        // SAFETY: as for causal LMs, the verified snapshot files are not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(weights, dtype, device) }
            .map_err(|e| EngineError::Load(format!("mapping the weights: {e}")))?;
        let model = BertModel::load(vb, &cfg)
            .map_err(|e| EngineError::Load(format!("loading bert weights: {e}")))?;
        let mut tokenizer = tokenizer;
        tokenizer.with_padding(Some(PaddingParams::default()));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: cfg.max_position_embeddings,
                ..Default::default()
            }))
            .map_err(|e| EngineError::Load(format!("tokenizer truncation: {e}")))?;
        Ok(Self {
            model,
            tokenizer,
            device: device.clone(),
            pooling: pooling(dir),
            dimensions: cfg.hidden_size,
            max_tokens: cfg.max_position_embeddings,
        })
    }

    /// Embeds `inputs` (a forward pass: call on the engine thread).
    pub fn embed(&self, inputs: &[String], normalize: bool) -> Result<Embeddings, EngineError> {
        let encodings = self
            .tokenizer
            .encode_batch(inputs.to_vec(), true)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let prompt_tokens = encodings
            .iter()
            .map(|e| e.get_attention_mask().iter().filter(|&&m| m == 1).count())
            .sum();
        let stack = |f: &dyn Fn(&tokenizers::Encoding) -> Vec<u32>| -> candle_core::Result<Tensor> {
            let rows = encodings
                .iter()
                .map(|e| Tensor::new(f(e).as_slice(), &self.device))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::stack(&rows, 0)
        };
        let run = || -> candle_core::Result<Vec<Vec<f32>>> {
            let ids = stack(&|e| e.get_ids().to_vec())?;
            let type_ids = stack(&|e| e.get_type_ids().to_vec())?;
            let mask = stack(&|e| e.get_attention_mask().to_vec())?;
            let hidden = self
                .model
                .forward(&ids, &type_ids, Some(&mask))?
                .to_dtype(DType::F32)?;
            let pooled = match self.pooling {
                Pooling::Cls => hidden.get_on_dim(1, 0)?,
                Pooling::Mean => {
                    let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
                    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
                    let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
                    summed.broadcast_div(&counts)?
                }
            };
            let pooled = if normalize {
                let norms = pooled
                    .sqr()?
                    .sum_keepdim(1)?
                    .sqrt()?
                    .clamp(1e-12, f64::MAX)?;
                pooled.broadcast_div(&norms)?
            } else {
                pooled
            };
            pooled.to_vec2()
        };
        let vectors = run().map_err(|e| EngineError::Inference(e.to_string()))?;
        Ok(Embeddings {
            vectors,
            dimensions: self.dimensions,
            prompt_tokens,
        })
    }
}
