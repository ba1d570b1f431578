//! The batched llama-family forward pass of [`super::Model`], built from candle tensor ops so
//! that it runs on any candle [`Device`]: the CPU (tests) and CUDA (`--features cuda`), where
//! lmx's own kernels do not run.
//!
//! Same semantics as [`super::Model::forward`]: one call takes any number of sequences
//! ([`CandleStep`]s), each with its own new tokens at its own position and its own
//! [`CandleCache`]. The linear layers (q/k/v, o, gate/up, down, the head) run once over the
//! concatenation of every step's tokens; rope runs once too, each token at its own position;
//! attention runs per sequence against that sequence's cache, with a causal mask (and the
//! sliding window, as the native pass applies it). The logits of each step's last token come
//! back to the host as f32.
//!
//! Attention is computed in f32 whatever the weights' dtype (as candle-transformers' llama
//! does without flash attention); the KV cache keeps the activations' dtype.

use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::Arc,
};

use candle_core::{
    quantized::{gguf_file, QMatMul},
    DType, Device, Module, Tensor,
};
use candle_nn::VarBuilder;

use super::{config::NativeConfig, PREFILL_CHUNK};
use crate::engine::{arch::CausalLm, kernels::ops::RopeStyle};

/// A cache grows by at least this many positions at a time (and at least doubles), up to its
/// capacity: a sequence does not hold memory for the whole context from its first token.
const CACHE_CHUNK: usize = 128;

type CResult<T> = candle_core::Result<T>;

enum Weight {
    /// `rows × cols`, in the activations' dtype.
    Dense(Tensor),
    /// GGUF blocks on the device.
    Quant(QMatMul),
}

/// `y = x · Wᵀ (+ b)`.
struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let y = match &self.weight {
            Weight::Dense(w) => x.matmul(&w.t()?)?,
            Weight::Quant(q) => q.forward(x)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Linear layers that read the same input (q, k, v; gate, up): one product when their weights
/// are dense (concatenated at load), one each when they are quantized.
struct Group {
    parts: Vec<Linear>,
    widths: Vec<usize>,
}

impl Group {
    fn new(layers: Vec<(Linear, usize)>) -> CResult<Group> {
        let widths: Vec<usize> = layers.iter().map(|(_, w)| *w).collect();
        let dense = layers
            .iter()
            .all(|(l, _)| matches!(l.weight, Weight::Dense(_)));
        let biased = layers.iter().filter(|(l, _)| l.bias.is_some()).count();
        if !dense || layers.len() < 2 || (biased != 0 && biased != layers.len()) {
            return Ok(Group {
                parts: layers.into_iter().map(|(l, _)| l).collect(),
                widths,
            });
        }
        let weights: Vec<&Tensor> = layers
            .iter()
            .map(|(l, _)| match &l.weight {
                Weight::Dense(w) => w,
                Weight::Quant(_) => unreachable!("checked dense above"),
            })
            .collect();
        let weight = Tensor::cat(&weights, 0)?;
        let bias = if biased == 0 {
            None
        } else {
            let biases: Vec<&Tensor> = layers.iter().filter_map(|(l, _)| l.bias.as_ref()).collect();
            Some(Tensor::cat(&biases, 0)?)
        };
        Ok(Group {
            parts: vec![Linear {
                weight: Weight::Dense(weight),
                bias,
            }],
            widths,
        })
    }

    /// One output per original layer, `n × width` each.
    fn forward(&self, x: &Tensor) -> CResult<Vec<Tensor>> {
        if self.parts.len() == self.widths.len() {
            return self.parts.iter().map(|p| p.forward(x)).collect();
        }
        let y = self.parts[0].forward(x)?;
        let mut offset = 0;
        let mut out = Vec::with_capacity(self.widths.len());
        for &w in &self.widths {
            out.push(y.narrow(1, offset, w)?);
            offset += w;
        }
        Ok(out)
    }
}

struct Layer {
    attn_norm: Tensor,
    qkv: Group,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    o: Linear,
    ffn_norm: Tensor,
    gate_up: Group,
    down: Linear,
}

/// A llama-family model on a candle device.
pub struct CandleModel {
    pub config: NativeConfig,
    device: Device,
    /// The activations' (and KV cache's) dtype.
    dtype: DType,
    /// `vocab × hidden`, in `dtype`.
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    head: Linear,
    inv_freqs: Vec<f32>,
}

/// Where the weights come from while loading.
enum Source<'a> {
    Safetensors(VarBuilder<'a>),
    Gguf {
        content: gguf_file::Content,
        file: File,
    },
}

impl Source<'_> {
    fn has(&self, name: &str) -> bool {
        match self {
            Source::Safetensors(vb) => vb.contains_tensor(name),
            Source::Gguf { content, .. } => content.tensor_infos.contains_key(name),
        }
    }

    /// A 1-D tensor in `dtype` (norm weights, biases).
    fn vector(&mut self, name: &str, len: usize, dtype: DType, device: &Device) -> CResult<Tensor> {
        match self {
            Source::Safetensors(vb) => vb.get(len, name)?.to_dtype(dtype),
            Source::Gguf { content, file } => {
                let t = content
                    .tensor(file, name, device)?
                    .dequantize(device)?
                    .flatten_all()?;
                if t.dims1()? != len {
                    candle_core::bail!("{name} has {} values; the config says {len}", t.dims1()?);
                }
                t.to_dtype(dtype)
            }
        }
    }

    /// A `rows × cols` matrix: dense in `dtype`, or GGUF blocks kept quantized.
    fn matrix(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
        dtype: DType,
        device: &Device,
    ) -> CResult<Weight> {
        match self {
            Source::Safetensors(vb) => Ok(Weight::Dense(vb.get((rows, cols), name)?)),
            Source::Gguf { content, file } => {
                let q = content.tensor(file, name, device)?;
                if q.shape().dims() != [rows, cols] {
                    candle_core::bail!(
                        "{name} has shape {:?}; the config says [{rows}, {cols}]",
                        q.shape().dims()
                    );
                }
                use candle_core::quantized::GgmlDType;
                match q.dtype() {
                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                        Ok(Weight::Dense(q.dequantize(device)?.to_dtype(dtype)?))
                    }
                    _ => Ok(Weight::Quant(QMatMul::from_qtensor(q)?)),
                }
            }
        }
    }

    fn linear(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
        bias: Option<&str>,
        dtype: DType,
        device: &Device,
    ) -> CResult<Linear> {
        let weight = self.matrix(name, rows, cols, dtype, device)?;
        let bias = match bias {
            Some(b) => Some(self.vector(b, rows, dtype, device)?),
            None => None,
        };
        Ok(Linear { weight, bias })
    }
}

impl CandleModel {
    /// The model in the safetensors `files` (Hugging Face tensor names), with weights and
    /// activations in `dtype`, on `device`.
    pub fn load_safetensors(
        config: NativeConfig,
        files: &[PathBuf],
        dtype: DType,
        device: &Device,
    ) -> Result<CandleModel, String> {
        // SAFETY: the snapshot guard verified these files; the cache never rewrites a blob in
        // place while it is mapped (new blobs are written aside and renamed).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }
            .map_err(|e| format!("mapping the weights: {e}"))?;
        Self::load(config, Source::Safetensors(vb), dtype, device).map_err(|e| e.to_string())
    }

    /// The model in the GGUF file at `path`, whose header `content` gave `config`
    /// ([`NativeConfig::from_gguf`]): quantized matrices stay quantized on `device`
    /// (candle's `QMatMul`), activations are f32.
    pub fn load_gguf(
        config: NativeConfig,
        path: &Path,
        content: gguf_file::Content,
        device: &Device,
    ) -> Result<CandleModel, String> {
        let file = File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
        Self::load(config, Source::Gguf { content, file }, DType::F32, device)
            .map_err(|e| e.to_string())
    }

    fn load(
        config: NativeConfig,
        mut src: Source<'_>,
        dtype: DType,
        device: &Device,
    ) -> CResult<CandleModel> {
        let mut config = config;
        let c = &config;
        let gguf = matches!(src, Source::Gguf { .. });
        let (q_dim, kv_dim) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let name = |hf: &str, gg: &str| if gguf { gg.to_owned() } else { hf.to_owned() };
        let embed_name = name("model.embed_tokens.weight", "token_embd.weight");
        let embed = match src.matrix(&embed_name, c.vocab, c.hidden, dtype, device)? {
            Weight::Dense(w) => w,
            Weight::Quant(QMatMul::QTensor(q)) => q.dequantize(device)?.to_dtype(dtype)?,
            Weight::Quant(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.to_dtype(dtype)?,
        };
        let mut layers = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let n = |h: &str, g: &str| {
                if gguf {
                    format!("blk.{i}.{g}")
                } else {
                    format!("model.layers.{i}.{h}")
                }
            };
            let bias = |h: &str, g: &str| c.qkv_bias.then(|| n(h, g));
            let mut linear = |h: &str, g: &str, rows: usize, cols: usize, b: Option<String>| {
                src.linear(&n(h, g), rows, cols, b.as_deref(), dtype, device)
            };
            let q = linear(
                "self_attn.q_proj.weight",
                "attn_q.weight",
                q_dim,
                c.hidden,
                bias("self_attn.q_proj.bias", "attn_q.bias"),
            )?;
            let k = linear(
                "self_attn.k_proj.weight",
                "attn_k.weight",
                kv_dim,
                c.hidden,
                bias("self_attn.k_proj.bias", "attn_k.bias"),
            )?;
            let v = linear(
                "self_attn.v_proj.weight",
                "attn_v.weight",
                kv_dim,
                c.hidden,
                bias("self_attn.v_proj.bias", "attn_v.bias"),
            )?;
            let o = linear(
                "self_attn.o_proj.weight",
                "attn_output.weight",
                c.hidden,
                q_dim,
                None,
            )?;
            let gate = linear(
                "mlp.gate_proj.weight",
                "ffn_gate.weight",
                c.ffn,
                c.hidden,
                None,
            )?;
            let up = linear("mlp.up_proj.weight", "ffn_up.weight", c.ffn, c.hidden, None)?;
            let down = linear(
                "mlp.down_proj.weight",
                "ffn_down.weight",
                c.hidden,
                c.ffn,
                None,
            )?;
            let (q_norm, k_norm) = if c.qk_norm {
                (
                    Some(src.vector(
                        &n("self_attn.q_norm.weight", "attn_q_norm.weight"),
                        c.head_dim,
                        dtype,
                        device,
                    )?),
                    Some(src.vector(
                        &n("self_attn.k_norm.weight", "attn_k_norm.weight"),
                        c.head_dim,
                        dtype,
                        device,
                    )?),
                )
            } else {
                (None, None)
            };
            layers.push(Layer {
                attn_norm: src.vector(
                    &n("input_layernorm.weight", "attn_norm.weight"),
                    c.hidden,
                    dtype,
                    device,
                )?,
                qkv: Group::new(vec![(q, q_dim), (k, kv_dim), (v, kv_dim)])?,
                q_norm,
                k_norm,
                o,
                ffn_norm: src.vector(
                    &n("post_attention_layernorm.weight", "ffn_norm.weight"),
                    c.hidden,
                    dtype,
                    device,
                )?,
                gate_up: Group::new(vec![(gate, c.ffn), (up, c.ffn)])?,
                down,
            });
        }
        let norm = src.vector(
            &name("model.norm.weight", "output_norm.weight"),
            c.hidden,
            dtype,
            device,
        )?;
        let head_name = name("lm_head.weight", "output.weight");
        let head = if src.has(&head_name) && (gguf || !c.tied_embeddings) {
            src.linear(&head_name, c.vocab, c.hidden, None, dtype, device)?
        } else if gguf {
            // Tied: the quantized embedding is the head's matrix (as llama.cpp runs it).
            src.linear(&embed_name, c.vocab, c.hidden, None, dtype, device)?
        } else if c.tied_embeddings {
            Linear {
                weight: Weight::Dense(embed.clone()),
                bias: None,
            }
        } else {
            candle_core::bail!("{head_name} is missing and tie_word_embeddings is false");
        };
        if gguf && src.has("rope_freqs.weight") {
            let factors = src
                .vector(
                    "rope_freqs.weight",
                    config.head_dim / 2,
                    DType::F32,
                    &Device::Cpu,
                )?
                .to_vec1::<f32>()?;
            config.rope_freq_factors = Some(factors);
        }
        Ok(CandleModel {
            inv_freqs: config.inv_freqs(),
            config,
            device: device.clone(),
            dtype,
            embed,
            layers,
            norm,
            head,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The activations' and the KV cache's dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes of KV cache one token of a sequence takes on the device.
    pub fn kv_bytes_per_token(&self) -> usize {
        let c = &self.config;
        2 * c.layers * c.kv_heads * c.head_dim * self.dtype.size_in_bytes()
    }

    /// Runs every step's new tokens; afterwards `logits` holds one row of `vocab` f32 logits
    /// per step, for its last token. Fails (changing no cache's length) when a step has no
    /// tokens, its tokens would overflow its cache, or a token id is outside the vocabulary.
    pub fn forward(
        &self,
        steps: &mut [CandleStep<'_>],
        logits: &mut Vec<f32>,
    ) -> Result<(), String> {
        let c = &self.config;
        for s in steps.iter() {
            if s.tokens.is_empty() {
                return Err("a step has no tokens".into());
            }
            if s.cache.len + s.tokens.len() > s.cache.capacity {
                return Err(format!(
                    "the sequence would reach {} tokens; its cache holds {}",
                    s.cache.len + s.tokens.len(),
                    s.cache.capacity
                ));
            }
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= c.vocab) {
                return Err(format!(
                    "token id {bad} is outside the vocabulary of {}",
                    c.vocab
                ));
            }
            if s.cache.n_layers != c.layers
                || s.cache.kv_heads != c.kv_heads
                || s.cache.head_dim != c.head_dim
                || s.cache.dtype != self.dtype
                || !s.cache.device.same_device(&self.device)
            {
                return Err("a step's cache was made for another model".into());
            }
        }
        if steps.is_empty() {
            logits.clear();
            return Ok(());
        }
        self.run(steps, logits).map_err(|e| e.to_string())
    }

    fn run(&self, steps: &mut [CandleStep<'_>], logits: &mut Vec<f32>) -> CResult<()> {
        let c = &self.config;
        let dev = &self.device;
        let (hd, half) = (c.head_dim, c.head_dim / 2);
        let total: usize = steps.iter().map(|s| s.tokens.len()).sum();
        for s in steps.iter_mut() {
            let need = s.cache.len + s.tokens.len();
            s.cache.reserve(need)?;
        }

        // Token ids, the rotation of each token's position, each step's mask and last row.
        let mut ids = Vec::with_capacity(total);
        let mut cos = Vec::with_capacity(total * half);
        let mut sin = Vec::with_capacity(total * half);
        let mut masks = Vec::with_capacity(steps.len());
        let mut last = Vec::with_capacity(steps.len());
        for s in steps.iter() {
            let start = s.cache.len;
            for (i, &token) in s.tokens.iter().enumerate() {
                ids.push(token);
                let pos = (start + i) as f32;
                for f in &self.inv_freqs {
                    let angle = pos * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
            masks.push(self.mask(start, s.tokens.len())?);
            last.push((ids.len() - 1) as u32);
        }
        let ids = Tensor::from_vec(ids, total, dev)?;
        let cos = Tensor::from_vec(cos, (total, 1, half), dev)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (total, 1, half), dev)?.to_dtype(self.dtype)?;

        let mut x = self.embed.index_select(&ids, 0)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let xn = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let qkv = layer.qkv.forward(&xn)?;
            let q = self.rotate(&qkv[0], c.heads, layer.q_norm.as_ref(), &cos, &sin)?;
            let k = self.rotate(&qkv[1], c.kv_heads, layer.k_norm.as_ref(), &cos, &sin)?;
            let v = qkv[2].reshape((total, c.kv_heads, hd))?;
            let mut outs = Vec::with_capacity(steps.len());
            let mut first = 0;
            for (s, mask) in steps.iter_mut().zip(&masks) {
                let n = s.tokens.len();
                outs.push(self.attention(
                    li,
                    &q.narrow(0, first, n)?,
                    &k.narrow(0, first, n)?,
                    &v.narrow(0, first, n)?,
                    s.cache,
                    mask.as_ref(),
                )?);
                first += n;
            }
            let attn = if outs.len() == 1 {
                outs.pop().expect("one output")
            } else {
                Tensor::cat(&outs, 0)?
            };
            x = (x + layer.o.forward(&attn)?)?;
            let xn = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let gu = layer.gate_up.forward(&xn)?;
            let act = (candle_nn::ops::silu(&gu[0])? * &gu[1])?;
            x = (x + layer.down.forward(&act)?)?;
        }

        let count = last.len();
        let last = Tensor::from_vec(last, count, dev)?;
        let last = x.index_select(&last, 0)?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, c.rms_eps)?;
        *logits = self
            .head
            .forward(&last)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for s in steps.iter_mut() {
            s.cache.len += s.tokens.len();
        }
        Ok(())
    }

    /// `n × heads·head_dim` projections → `n × heads × head_dim`, per-head normed (qwen3) and
    /// rotated, each token at its own position.
    fn rotate(
        &self,
        x: &Tensor,
        heads: usize,
        norm: Option<&Tensor>,
        cos: &Tensor,
        sin: &Tensor,
    ) -> CResult<Tensor> {
        let c = &self.config;
        let n = x.dim(0)?;
        let mut x = x.reshape((n, heads, c.head_dim))?;
        if let Some(w) = norm {
            x = candle_nn::ops::rms_norm(&x, w, c.rms_eps)?;
        }
        // One "batch" entry per token, with its own cos/sin row.
        let x = x.reshape((n, heads, 1, c.head_dim))?;
        let x = match c.rope_style {
            RopeStyle::Neox => candle_nn::rotary_emb::rope(&x, cos, sin)?,
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, cos, sin)?,
        };
        x.reshape((n, heads, c.head_dim))
    }

    /// The additive mask (0 or -inf, `n × (start + n)`, f32) of `n` new tokens after `start`
    /// cached ones; None when nothing is masked (one token, no window in the way).
    fn mask(&self, start: usize, n: usize) -> CResult<Option<Tensor>> {
        let kv_len = start + n;
        let window = self.config.sliding_window;
        if n == 1 && window.is_none_or(|w| w >= kv_len) {
            return Ok(None);
        }
        let mut mask = vec![f32::NEG_INFINITY; n * kv_len];
        for i in 0..n {
            let pos = start + i;
            let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            mask[i * kv_len + lo..=i * kv_len + pos]
                .iter_mut()
                .for_each(|v| *v = 0.0);
        }
        Tensor::from_vec(mask, (n, kv_len), &self.device).map(Some)
    }

    /// Attention of one sequence's `n` new tokens (`q`: `n × heads × head_dim`; `k`, `v`:
    /// `n × kv_heads × head_dim`) against its cache, after storing their keys and values.
    /// Returns `n × heads·head_dim`.
    fn attention(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: &mut CandleCache,
        mask: Option<&Tensor>,
    ) -> CResult<Tensor> {
        let c = &self.config;
        let (hd, kvh) = (c.head_dim, c.kv_heads);
        let group = c.heads / kvh;
        let n = q.dim(0)?;
        let start = cache.len;
        let kv_len = start + n;
        let (keys, values) = &cache.layers[layer];
        keys.slice_set(&k.transpose(0, 1)?.contiguous()?, 1, start)?;
        values.slice_set(&v.transpose(0, 1)?.contiguous()?, 1, start)?;
        // kv_heads × kv_len × head_dim views of the cache (rows of head_dim, batch stride of
        // the capacity): both the CPU and the cuBLAS products take them as they are.
        let keys = keys.narrow(1, 0, kv_len)?.to_dtype(DType::F32)?;
        let values = values.narrow(1, 0, kv_len)?.to_dtype(DType::F32)?;
        // Rows (head h of group g, token i) = (g, h·n + i): each key/value head's queries.
        let q = q
            .reshape((n, kvh, group, hd))?
            .permute((1, 2, 0, 3))?
            .to_dtype(DType::F32)?
            .contiguous()?
            .reshape((kvh, group * n, hd))?;
        let q = (q * (1.0 / (hd as f64).sqrt()))?;
        let scores = q.matmul(&keys.t()?)?;
        let scores = match mask {
            Some(m) => scores
                .reshape((kvh, group, n, kv_len))?
                .broadcast_add(m)?
                .reshape((kvh, group * n, kv_len))?,
            None => scores,
        };
        let p = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = p.matmul(&values)?; // kv_heads × group·n × head_dim
        out.reshape((kvh, group, n, hd))?
            .permute((2, 0, 1, 3))?
            .to_dtype(self.dtype)?
            .contiguous()?
            .reshape((n, c.heads * hd))
    }
}

impl std::fmt::Debug for CandleModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CandleModel")
            .field("config", &self.config)
            .field("device", &self.device)
            .field("dtype", &self.dtype)
            .finish()
    }
}

/// Keys and values of one sequence on the model's device: per layer, two tensors of
/// `kv_heads × allocated × head_dim`. They grow in chunks (at least [`CACHE_CHUNK`] positions,
/// at least doubling) up to `capacity`; new tokens are written in place.
pub struct CandleCache {
    capacity: usize,
    len: usize,
    allocated: usize,
    /// Per layer, keys and values; empty until the first token.
    layers: Vec<(Tensor, Tensor)>,
    n_layers: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
}

impl CandleCache {
    /// An empty cache for a sequence of at most `capacity` tokens (nothing allocated yet).
    pub fn new(model: &CandleModel, capacity: usize) -> Self {
        let c = &model.config;
        CandleCache {
            capacity,
            len: 0,
            allocated: 0,
            layers: Vec::new(),
            n_layers: c.layers,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            dtype: model.dtype,
            device: model.device.clone(),
        }
    }

    /// Tokens cached so far (the position of the next one).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most tokens this cache takes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets everything from position `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Makes room for `need` positions (at most the capacity), keeping what is cached.
    fn reserve(&mut self, need: usize) -> CResult<()> {
        if need <= self.allocated {
            return Ok(());
        }
        let target = need
            .next_multiple_of(CACHE_CHUNK)
            .max(2 * self.allocated)
            .min(self.capacity)
            .max(need);
        let zeros = |len| {
            Tensor::zeros(
                (self.kv_heads, len, self.head_dim),
                self.dtype,
                &self.device,
            )
        };
        if self.allocated == 0 {
            self.layers = (0..self.n_layers)
                .map(|_| Ok((zeros(target)?, zeros(target)?)))
                .collect::<CResult<_>>()?;
        } else {
            let more = zeros(target - self.allocated)?;
            for (k, v) in &mut self.layers {
                *k = Tensor::cat(&[&*k, &more], 1)?;
                *v = Tensor::cat(&[&*v, &more], 1)?;
            }
        }
        self.allocated = target;
        Ok(())
    }

    /// Replaces this cache's contents with the first `n` positions of `other` (a cached
    /// prefix shared by another sequence of the same model).
    pub fn copy_prefix_from(&mut self, other: &CandleCache, n: usize) -> Result<(), String> {
        if n > other.len {
            return Err(format!(
                "the other cache holds {} tokens, not {n}",
                other.len
            ));
        }
        if n > self.capacity {
            return Err(format!(
                "{n} tokens do not fit a cache of {}",
                self.capacity
            ));
        }
        if other.n_layers != self.n_layers
            || other.kv_heads != self.kv_heads
            || other.head_dim != self.head_dim
            || other.dtype != self.dtype
            || !other.device.same_device(&self.device)
        {
            return Err("the caches belong to different models".into());
        }
        self.len = 0;
        if n == 0 {
            return Ok(());
        }
        let copy = |this: &mut Self| -> CResult<()> {
            this.reserve(n)?;
            for ((k, v), (ok, ov)) in this.layers.iter().zip(&other.layers) {
                k.slice_set(&ok.narrow(1, 0, n)?.contiguous()?, 1, 0)?;
                v.slice_set(&ov.narrow(1, 0, n)?.contiguous()?, 1, 0)?;
            }
            Ok(())
        };
        copy(self).map_err(|e| e.to_string())?;
        self.len = n;
        Ok(())
    }
}

/// One sequence's part of a forward call.
pub struct CandleStep<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut CandleCache,
}

/// One sequence on a shared [`CandleModel`]: its cache and its logits (the single-sequence
/// [`CausalLm`] face of the model, as [`super::NativeLm`] is for the native one).
pub struct CandleLm {
    model: Arc<CandleModel>,
    cache: CandleCache,
    logits: Vec<f32>,
}

impl CandleLm {
    /// The base instance the engine forks sequences from (an empty cache of no capacity).
    pub fn base(model: CandleModel) -> Self {
        let model = Arc::new(model);
        CandleLm {
            cache: CandleCache::new(&model, 0),
            model,
            logits: Vec::new(),
        }
    }

    /// The shared model (to batch this instance's sequences into one forward call).
    pub fn model(&self) -> &Arc<CandleModel> {
        &self.model
    }
}

impl CausalLm for CandleLm {
    fn forward(&mut self, input: &[u32], pos: usize) -> candle_core::Result<&[f32]> {
        if input.is_empty() {
            candle_core::bail!("no input tokens");
        }
        if pos > self.cache.len() {
            candle_core::bail!(
                "position {pos} is past the {} cached tokens",
                self.cache.len()
            );
        }
        self.cache.truncate(pos);
        for chunk in input.chunks(PREFILL_CHUNK) {
            self.model
                .forward(
                    &mut [CandleStep {
                        tokens: chunk,
                        cache: &mut self.cache,
                    }],
                    &mut self.logits,
                )
                .map_err(candle_core::Error::Msg)?;
        }
        Ok(&self.logits[..self.model.config.vocab])
    }

    fn fork(&self, max_len: usize) -> Option<Box<dyn CausalLm>> {
        let capacity = max_len.clamp(1, self.model.config.context_length.max(1));
        Some(Box::new(CandleLm {
            model: self.model.clone(),
            cache: CandleCache::new(&self.model, capacity),
            logits: Vec::new(),
        }))
    }

    fn reset(&mut self) {
        self.cache.truncate(0);
    }

    fn candle(&self) -> Option<Arc<CandleModel>> {
        Some(self.model.clone())
    }
}

#[cfg(test)]
mod tests;
