//! The shape of a llama-family model, read from config.json (llama, mistral, qwen2, qwen3) or
//! from GGUF metadata (llama, qwen2, qwen3). One struct covers the family; the variants are
//! flags: q/k/v biases, per-head q/k norms, a sliding window, tied embeddings, rope scaling.

use candle_core::quantized::gguf_file;
use serde_json::Value;

use crate::engine::kernels::ops::RopeStyle;

/// Llama 3's frequency-dependent rope scaling (`rope_scaling.rope_type = "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NativeConfig {
    pub architecture: String,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub llama3_scaling: Option<Llama3Scaling>,
    /// Per-dimension-pair divisors of the rope frequencies (GGUF `rope_freqs.weight`).
    pub rope_freq_factors: Option<Vec<f32>>,
    pub qkv_bias: bool,
    pub qk_norm: bool,
    pub sliding_window: Option<usize>,
    pub tied_embeddings: bool,
    pub context_length: usize,
    /// What the KV caches store keys and values as (a serving choice, not the model's).
    pub kv_dtype: KvDtype,
}

/// The element type of the KV caches. f16 (llama.cpp's default too) halves their memory and
/// what attention reads per step; f32 keeps the values exactly as computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    F32,
    #[default]
    F16,
}

impl KvDtype {
    /// Bytes of one element.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

/// Why a config is not one this forward pass runs (the caller falls back to candle-transformers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported(pub String);

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn count(v: &Value, key: &str) -> Result<usize, Unsupported> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|n| n as usize)
        .ok_or_else(|| Unsupported(format!("config.json lacks {key}")))
}

impl NativeConfig {
    /// From a Hugging Face config.json.
    pub fn from_hf(config: &Value) -> Result<Self, Unsupported> {
        let architecture = config
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let (qkv_bias, qk_norm) = match architecture.as_str() {
            "llama" | "mistral" => (
                config
                    .get("attention_bias")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                false,
            ),
            "qwen2" => (true, false),
            "qwen3" => (
                config
                    .get("attention_bias")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                true,
            ),
            other => return Err(Unsupported(format!("architecture {other:?}"))),
        };
        if config.get("mlp_bias").and_then(Value::as_bool) == Some(true) {
            return Err(Unsupported("mlp_bias".into()));
        }
        if let Some(act) = config.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(Unsupported(format!("hidden_act {act:?}")));
            }
        }
        let hidden = count(config, "hidden_size")?;
        let heads = count(config, "num_attention_heads")?;
        let kv_heads = config
            .get("num_key_value_heads")
            .and_then(Value::as_u64)
            .map(|n| n as usize)
            .unwrap_or(heads);
        let head_dim = config
            .get("head_dim")
            .and_then(Value::as_u64)
            .map(|n| n as usize)
            .unwrap_or(hidden / heads.max(1));
        let llama3_scaling = match config.get("rope_scaling").filter(|v| !v.is_null()) {
            None => None,
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                match kind {
                    "default" => None,
                    "llama3" => Some(Llama3Scaling {
                        factor: num(s, "factor").unwrap_or(8.0) as f32,
                        low_freq_factor: num(s, "low_freq_factor").unwrap_or(1.0) as f32,
                        high_freq_factor: num(s, "high_freq_factor").unwrap_or(4.0) as f32,
                        original_max_position_embeddings: s
                            .get("original_max_position_embeddings")
                            .and_then(Value::as_u64)
                            .unwrap_or(8192)
                            as usize,
                    }),
                    other => return Err(Unsupported(format!("rope_scaling {other:?}"))),
                }
            }
        };
        let use_window = match architecture.as_str() {
            "mistral" => true,
            _ => config
                .get("use_sliding_window")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        };
        let sliding_window = use_window
            .then(|| config.get("sliding_window").and_then(Value::as_u64))
            .flatten()
            .map(|n| n as usize);
        let cfg = NativeConfig {
            hidden,
            layers: count(config, "num_hidden_layers")?,
            heads,
            kv_heads,
            head_dim,
            ffn: count(config, "intermediate_size")?,
            vocab: count(config, "vocab_size")?,
            rms_eps: num(config, "rms_norm_eps").unwrap_or(1e-6) as f32,
            rope_theta: num(config, "rope_theta").unwrap_or(10_000.0) as f32,
            rope_style: RopeStyle::Neox,
            llama3_scaling,
            rope_freq_factors: None,
            qkv_bias,
            qk_norm,
            sliding_window,
            tied_embeddings: config
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            context_length: config
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .map(|n| n as usize)
                .unwrap_or(2048),
            kv_dtype: KvDtype::default(),
            architecture,
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// From GGUF metadata (`general.architecture` llama, qwen2 or qwen3). `vocab` and whether
    /// an output tensor exists come from the tensor table.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self, Unsupported> {
        let md = &content.metadata;
        let architecture = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let (rope_style, qkv_bias, qk_norm) = match architecture.as_str() {
            "llama" => (RopeStyle::Interleaved, false, false),
            "qwen2" => (RopeStyle::Neox, true, false),
            "qwen3" => (RopeStyle::Neox, false, true),
            other => return Err(Unsupported(format!("GGUF architecture {other:?}"))),
        };
        let get = |key: &str| md.get(&format!("{architecture}.{key}"));
        let int = |key: &str| -> Result<usize, Unsupported> {
            get(key)
                .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
                .map(|n| n as usize)
                .ok_or_else(|| Unsupported(format!("GGUF metadata lacks {architecture}.{key}")))
        };
        let float = |key: &str| get(key).and_then(|v| v.to_f32().ok());
        let hidden = int("embedding_length")?;
        let heads = int("attention.head_count")?;
        let kv_heads = int("attention.head_count_kv").unwrap_or(heads);
        let head_dim = int("attention.key_length").unwrap_or(hidden / heads.max(1));
        let vocab = content
            .tensor_infos
            .get("token_embd.weight")
            .map(|t| t.shape.dims()[0])
            .ok_or_else(|| Unsupported("GGUF has no token_embd.weight".into()))?;
        let cfg = NativeConfig {
            hidden,
            layers: int("block_count")?,
            heads,
            kv_heads,
            head_dim,
            ffn: int("feed_forward_length")?,
            vocab,
            rms_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: float("rope.freq_base").unwrap_or(10_000.0),
            rope_style,
            llama3_scaling: None,
            rope_freq_factors: None,
            qkv_bias: qkv_bias && content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            qk_norm,
            sliding_window: None,
            tied_embeddings: !content.tensor_infos.contains_key("output.weight"),
            context_length: int("context_length").unwrap_or(2048),
            kv_dtype: KvDtype::default(),
            architecture,
        };
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), Unsupported> {
        if self.heads == 0 || self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(Unsupported(format!(
                "{} attention heads cannot share {} key/value heads",
                self.heads, self.kv_heads
            )));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(Unsupported(format!("head_dim {}", self.head_dim)));
        }
        if self.hidden == 0 || self.layers == 0 || self.ffn == 0 || self.vocab == 0 {
            return Err(Unsupported("an empty dimension".into()));
        }
        Ok(())
    }

    /// The rotation frequency of each dimension pair.
    pub fn inv_freqs(&self) -> Vec<f32> {
        let half = self.head_dim / 2;
        (0..half)
            .map(|i| {
                let base = 1.0 / self.rope_theta.powf(2.0 * i as f32 / self.head_dim as f32);
                let mut f = base;
                if let Some(s) = self.llama3_scaling {
                    let low_wavelen = s.original_max_position_embeddings as f32 / s.low_freq_factor;
                    let high_wavelen =
                        s.original_max_position_embeddings as f32 / s.high_freq_factor;
                    let wavelen = 2.0 * std::f32::consts::PI / base;
                    f = if wavelen < high_wavelen {
                        base
                    } else if wavelen > low_wavelen {
                        base / s.factor
                    } else {
                        let smooth = (s.original_max_position_embeddings as f32 / wavelen
                            - s.low_freq_factor)
                            / (s.high_freq_factor - s.low_freq_factor);
                        (1.0 - smooth) * base / s.factor + smooth * base
                    };
                }
                if let Some(factors) = &self.rope_freq_factors {
                    f /= factors.get(i).copied().unwrap_or(1.0);
                }
                f
            })
            .collect()
    }
}
