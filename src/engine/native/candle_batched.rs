//! The batched llama-family forward pass of [`super::Model`], built from candle tensor ops so
//! that it runs on any candle [`Device`]: the CPU (tests) and CUDA (`--features cuda`), where
//! lmx's own kernels do not run.
//!
//! Same semantics as [`super::Model::forward`]: one call takes any number of sequences
//! ([`CandleStep`]s), each with its own new tokens at its own position and its own
//! [`CandleCache`]. The linear layers (q/k/v, o, gate/up, down, the head) run once over the
//! concatenation of every step's tokens; rope runs once too, each token at its own position.
//! The logits of each step's last token come back to the host as f32.
//!
//! Keys and values live in one [`KvPool`] per model, in blocks of [`BLOCK`] positions that the
//! sequences' caches own (a block table per sequence, as vLLM's paged cache). So attention of
//! the decoding sequences (one new token each) runs once for all of them: their cached rows are
//! gathered by one index into a padded batch, masked at each sequence's length (and sliding
//! window). Each GPU kernel then serves every sequence, and a step's launches do not grow with
//! the number of sequences. The prompt chunks of a step (sequences with several new tokens)
//! are one more batch: queries padded to the longest chunk, keys to the longest context, a
//! causal mask per chunk. Every new key and value of a layer is written by one scatter.
//!
//! Attention is computed in f32 whatever the weights' dtype (as candle-transformers' llama
//! does without flash attention); the KV cache keeps the activations' dtype.

use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use candle_core::{
    quantized::{gguf_file, QMatMul},
    DType, Device, Module, Tensor,
};
use candle_nn::VarBuilder;

use super::{config::NativeConfig, PREFILL_CHUNK};
use crate::engine::{arch::CausalLm, kernels::ops::RopeStyle};

/// Positions in a block of the KV pool: a cache grows a block at a time, up to its capacity,
/// so a sequence does not hold memory for the whole context from its first token.
pub const BLOCK: usize = 64;

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
    /// Every sequence's keys and values.
    pool: Arc<KvPool>,
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
            pool: Arc::new(KvPool::new(&config, dtype, device)),
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

    /// The pool every cache of this model takes its blocks from.
    pub fn pool(&self) -> &KvPool {
        &self.pool
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
            if !Arc::ptr_eq(&s.cache.pool, &self.pool) {
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
        let (kvh, group) = (c.kv_heads, c.heads / c.kv_heads);
        let total: usize = steps.iter().map(|s| s.tokens.len()).sum();
        let mut pool = self.pool.lock();
        for s in steps.iter_mut() {
            let need = s.cache.len + s.tokens.len();
            s.cache.reserve(&mut pool, need)?;
        }

        // The decoding steps (one new token) come first in the pass, in their order, then the
        // others: the decoding ones' attention is one batch. `last[i]` is where step i's last
        // token is in that order.
        let order: Vec<usize> = (0..steps.len())
            .filter(|&i| steps[i].tokens.len() == 1)
            .chain((0..steps.len()).filter(|&i| steps[i].tokens.len() != 1))
            .collect();
        let decoding = order
            .iter()
            .take_while(|&&i| steps[i].tokens.len() == 1)
            .count();
        let mut ids = Vec::with_capacity(total);
        let mut cos = Vec::with_capacity(total * half);
        let mut sin = Vec::with_capacity(total * half);
        let mut last = vec![0u32; steps.len()];
        for &i in &order {
            let s = &steps[i];
            let start = s.cache.len;
            for (j, &token) in s.tokens.iter().enumerate() {
                ids.push(token);
                let pos = (start + j) as f32;
                for f in &self.inv_freqs {
                    let angle = pos * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
            last[i] = (ids.len() - 1) as u32;
        }
        let ids = Tensor::from_vec(ids, total, dev)?;
        let cos = Tensor::from_vec(cos, (total, 1, half), dev)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (total, 1, half), dev)?.to_dtype(self.dtype)?;

        // Where the new keys and values go, and what each attention reads (the same for every
        // layer): the decoding tokens' rows (one scatter), their padded gather and mask; per
        // other step, its block segments, its rows and its causal mask.
        let batch = if decoding > 0 {
            let seqs: Vec<&CandleCache> = order[..decoding]
                .iter()
                .map(|&i| &*steps[i].cache)
                .collect();
            Some(DecodeBatch::new(&seqs, c.sliding_window, dev)?)
        } else {
            None
        };
        let chunks = if decoding < order.len() {
            let parts: Vec<(usize, &CandleCache)> = order[decoding..]
                .iter()
                .map(|&i| (steps[i].tokens.len(), &*steps[i].cache))
                .collect();
            Some(ChunkBatch::new(&parts, decoding, c.sliding_window, dev)?)
        } else {
            None
        };
        // Every new token's row, repeated over `kv_heads × head_dim` (scatter indices have the
        // source's shape).
        let mut write = Vec::with_capacity(total);
        for &i in &order {
            let s = &steps[i];
            let (start, n) = (s.cache.len, s.tokens.len());
            write.extend(s.cache.rows(start..start + n));
        }
        let write = Tensor::from_vec(write, (total, 1, 1), dev)?
            .broadcast_as((total, kvh, hd))?
            .contiguous()?;

        let mut x = self.embed.index_select(&ids, 0)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let xn = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let qkv = layer.qkv.forward(&xn)?;
            let q = self.rotate(&qkv[0], c.heads, layer.q_norm.as_ref(), &cos, &sin)?;
            let k = self.rotate(&qkv[1], kvh, layer.k_norm.as_ref(), &cos, &sin)?;
            let v = qkv[2].reshape((total, kvh, hd))?;
            let (keys, values) = &pool.layers[li];
            keys.scatter_set(&write, &k.contiguous()?, 0)?;
            values.scatter_set(&write, &v.contiguous()?, 0)?;
            let mut outs = Vec::with_capacity(2);
            if let Some(b) = &batch {
                let q = q.narrow(0, 0, decoding)?;
                outs.push(self.decode_attention(&q, keys, values, b, kvh, group)?);
            }
            if let Some(b) = &chunks {
                outs.push(self.chunk_attention(&q, keys, values, b, kvh, group)?);
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
        drop(pool);

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

    /// Attention of one decoding token of each of `b`'s sequences (`q`: `seqs × heads ×
    /// head_dim`), all at once: their rows gathered from the pool into `seqs × kv_heads × longest
    /// × head_dim`, the padding (and what a sliding window leaves out) masked. Returns `seqs ×
    /// heads·head_dim`.
    fn decode_attention(
        &self,
        q: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        b: &DecodeBatch,
        kvh: usize,
        group: usize,
    ) -> CResult<Tensor> {
        let hd = self.config.head_dim;
        let seqs = q.dim(0)?;
        let gather = |t| gather_rows(t, &b.read, (seqs, b.longest, kvh, hd));
        let (keys, values) = (gather(keys)?, gather(values)?);
        let q = (q.reshape((seqs, kvh, group, hd))?.to_dtype(DType::F32)?
            * (1.0 / (hd as f64).sqrt()))?;
        let scores = q.matmul(&keys.t()?)?; // seqs × kv_heads × group × longest
        let scores = match &b.mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let p = candle_nn::ops::softmax_last_dim(&scores)?;
        p.matmul(&values)? // seqs × kv_heads × group × head_dim
            .reshape((seqs, self.config.heads * hd))?
            .to_dtype(self.dtype)
    }

    /// Attention of the prompt chunks of `b` (their rows of `q`: `tokens × heads × head_dim`,
    /// after the decoding ones), all at once: each chunk's queries padded to the longest chunk,
    /// its keys and values gathered from the pool and padded to the longest context, a causal
    /// mask (and the sliding window) per chunk. Returns the chunks' rows, `tokens × heads·
    /// head_dim`, in the pass's order.
    fn chunk_attention(
        &self,
        q: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        b: &ChunkBatch,
        kvh: usize,
        group: usize,
    ) -> CResult<Tensor> {
        let hd = self.config.head_dim;
        let (chunks, n, len) = (b.chunks, b.longest_chunk, b.longest_context);
        let gather = |t| gather_rows(t, &b.read, (chunks, len, kvh, hd));
        let (keys, values) = (gather(keys)?, gather(values)?);
        // Rows (key/value head h, group g, query i) of each chunk.
        let q = q
            .index_select(&b.queries, 0)?
            .reshape((chunks, n, kvh, group, hd))?
            .permute((0, 2, 3, 1, 4))?
            .to_dtype(DType::F32)?
            .contiguous()?
            .reshape((chunks, kvh, group * n, hd))?;
        let q = (q * (1.0 / (hd as f64).sqrt()))?;
        let scores = q
            .matmul(&keys.t()?)? // chunks × kv_heads × group·n × len
            .reshape((chunks, kvh, group, n, len))?
            .broadcast_add(&b.mask)?
            .reshape((chunks, kvh, group * n, len))?;
        let p = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = p
            .matmul(&values)? // chunks × kv_heads × group·n × head_dim
            .reshape((chunks, kvh, group, n, hd))?
            .permute((0, 3, 1, 2, 4))?
            .to_dtype(self.dtype)?
            .contiguous()?
            .reshape((chunks * n, self.config.heads * hd))?;
        match &b.keep {
            Some(keep) => out.index_select(keep, 0),
            None => Ok(out),
        }
    }
}

/// `batch × len` pool rows of `t` (`read`, flat) as `batch × kv_heads × len × head_dim`, in
/// f32: one sequence's (or chunk's) keys or values a batch entry.
fn gather_rows(
    t: &Tensor,
    read: &Tensor,
    (batch, len, kvh, hd): (usize, usize, usize, usize),
) -> CResult<Tensor> {
    t.index_select(read, 0)?
        .reshape((batch, len, kvh, hd))?
        .to_dtype(DType::F32)?
        .transpose(1, 2)?
        .contiguous()
}

/// What the decoding sequences of a step read and write, the same in every layer.
struct DecodeBatch {
    /// `seqs × longest` rows to gather (a sequence's own row 0 pads it).
    read: Tensor,
    longest: usize,
    /// `seqs × 1 × 1 × longest`: -inf past each sequence's length and before its window.
    mask: Option<Tensor>,
}

impl DecodeBatch {
    fn new(seqs: &[&CandleCache], window: Option<usize>, dev: &Device) -> CResult<DecodeBatch> {
        let longest = seqs.iter().map(|c| c.len + 1).max().unwrap_or(1);
        let mut read = Vec::with_capacity(seqs.len() * longest);
        let mut mask = vec![0f32; seqs.len() * longest];
        let mut masked = false;
        for (i, cache) in seqs.iter().enumerate() {
            let kv_len = cache.len + 1;
            let rows: Vec<u32> = cache.rows(0..kv_len).collect();
            read.extend_from_slice(&rows);
            read.extend(std::iter::repeat_n(rows[0], longest - kv_len));
            let lo = window.map_or(0, |w| kv_len.saturating_sub(w));
            for (j, m) in mask[i * longest..(i + 1) * longest].iter_mut().enumerate() {
                if j < lo || j >= kv_len {
                    *m = f32::NEG_INFINITY;
                    masked = true;
                }
            }
        }
        let n = seqs.len();
        Ok(DecodeBatch {
            read: Tensor::from_vec(read, n * longest, dev)?,
            longest,
            mask: if masked {
                Some(Tensor::from_vec(mask, (n, 1, 1, longest), dev)?)
            } else {
                None
            },
        })
    }
}

/// What the prompt chunks (steps of several new tokens) of a step read, the same in every
/// layer.
struct ChunkBatch {
    chunks: usize,
    longest_chunk: usize,
    longest_context: usize,
    /// `chunks × longest_chunk` rows of the pass's queries (a chunk's last one pads it).
    queries: Tensor,
    /// `chunks × longest_context` pool rows (a sequence's row 0 pads it).
    read: Tensor,
    /// `chunks × 1 × 1 × longest_chunk × longest_context`: 0 where a query sees a key, -inf
    /// elsewhere (a padding query sees the first key, so that its softmax stays finite).
    mask: Tensor,
    /// The real rows among `chunks × longest_chunk`, in order; None when nothing pads.
    keep: Option<Tensor>,
}

impl ChunkBatch {
    /// `parts`: each chunk's new tokens and cache, in the pass's order from row `first`.
    fn new(
        parts: &[(usize, &CandleCache)],
        first: usize,
        window: Option<usize>,
        dev: &Device,
    ) -> CResult<ChunkBatch> {
        let chunks = parts.len();
        let n = parts.iter().map(|p| p.0).max().unwrap_or(1);
        let len = parts.iter().map(|(k, c)| c.len + k).max().unwrap_or(1);
        let mut queries = Vec::with_capacity(chunks * n);
        let mut read = Vec::with_capacity(chunks * len);
        let mut mask = vec![f32::NEG_INFINITY; chunks * n * len];
        let mut keep = Vec::new();
        let mut offset = first;
        for (c, &(k, cache)) in parts.iter().enumerate() {
            let start = cache.len;
            let rows: Vec<u32> = cache.rows(0..start + k).collect();
            read.extend_from_slice(&rows);
            read.extend(std::iter::repeat_n(rows[0], len - rows.len()));
            for i in 0..n {
                let m = &mut mask[(c * n + i) * len..(c * n + i + 1) * len];
                if i < k {
                    queries.push((offset + i) as u32);
                    keep.push((c * n + i) as u32);
                    let pos = start + i;
                    let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                    m[lo..=pos].iter_mut().for_each(|v| *v = 0.0);
                } else {
                    queries.push((offset + k - 1) as u32);
                    m[0] = 0.0;
                }
            }
            offset += k;
        }
        let padded = keep.len() < chunks * n;
        Ok(ChunkBatch {
            chunks,
            longest_chunk: n,
            longest_context: len,
            queries: Tensor::from_vec(queries, chunks * n, dev)?,
            read: Tensor::from_vec(read, chunks * len, dev)?,
            mask: Tensor::from_vec(mask, (chunks, 1, 1, n, len), dev)?,
            keep: if padded {
                let count = keep.len();
                Some(Tensor::from_vec(keep, count, dev)?)
            } else {
                None
            },
        })
    }
}

/// The keys and values of every sequence of a model, on its device: per layer two tensors of
/// `rows × kv_heads × head_dim`, row `b·BLOCK + i` being position `i` of block `b`. Blocks are
/// handed to caches and taken back when they shrink or drop. The pool grows (by half, or by
/// what is asked) when no block is free, copying what it holds, and keeps its size until the
/// model is unloaded; the worker's KV budget bounds what the caches hold at once.
pub struct KvPool {
    inner: Mutex<PoolInner>,
}

struct PoolInner {
    layers: Vec<(Tensor, Tensor)>,
    blocks: usize,
    /// Free block ids, a stack (the last one given back is taken first).
    free: Vec<u32>,
    /// The most blocks growing ahead of need may reach (what the KV budget can ever ask).
    cap: Option<usize>,
    n_layers: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
}

impl KvPool {
    fn new(config: &NativeConfig, dtype: DType, device: &Device) -> Self {
        KvPool {
            inner: Mutex::new(PoolInner {
                layers: Vec::new(),
                blocks: 0,
                free: Vec::new(),
                cap: None,
                n_layers: config.layers,
                kv_heads: config.kv_heads,
                head_dim: config.head_dim,
                dtype,
                device: device.clone(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PoolInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps the pool's growth ahead of need within `blocks` (the caches can still take more
    /// when they ask for it): the worker sets what its KV budget can hold, so a pool grown by
    /// half does not take device memory the budget never grants.
    pub fn cap_growth(&self, blocks: usize) {
        self.lock().cap = Some(blocks);
    }

    /// Blocks in the pool (free or not).
    pub fn blocks(&self) -> usize {
        self.lock().blocks
    }

    /// Blocks no cache holds.
    pub fn free_blocks(&self) -> usize {
        self.lock().free.len()
    }
}

impl PoolInner {
    /// `n` blocks, growing the pool when fewer are free.
    fn take(&mut self, n: usize) -> CResult<Vec<u32>> {
        if self.free.len() < n {
            let need = self.blocks + n - self.free.len();
            let ahead = (self.blocks + self.blocks / 2).min(self.cap.unwrap_or(usize::MAX));
            self.grow(need.max(ahead))?;
        }
        Ok((0..n)
            .map(|_| self.free.pop().expect("grown to fit"))
            .collect())
    }

    fn grow(&mut self, blocks: usize) -> CResult<()> {
        let rows = blocks * BLOCK;
        let grown = |old: Option<&Tensor>| -> CResult<Tensor> {
            let new = Tensor::zeros(
                (rows, self.kv_heads, self.head_dim),
                self.dtype,
                &self.device,
            )?;
            if let Some(old) = old {
                new.slice_set(old, 0, 0)?;
            }
            Ok(new)
        };
        let mut layers = Vec::with_capacity(self.n_layers);
        for i in 0..self.n_layers {
            let old = self.layers.get(i);
            layers.push((grown(old.map(|l| &l.0))?, grown(old.map(|l| &l.1))?));
        }
        self.layers = layers;
        self.free.extend((self.blocks as u32..blocks as u32).rev());
        self.blocks = blocks;
        Ok(())
    }

    fn give(&mut self, blocks: impl IntoIterator<Item = u32>) {
        self.free.extend(blocks);
    }
}

/// One sequence's keys and values: the [`KvPool`] blocks it holds, in position order (its block
/// table). It takes blocks as it grows, up to `capacity` positions, and gives back those it no
/// longer needs when it is cut back or dropped.
pub struct CandleCache {
    pool: Arc<KvPool>,
    blocks: Vec<u32>,
    capacity: usize,
    len: usize,
}

impl CandleCache {
    /// An empty cache for a sequence of at most `capacity` tokens (no block taken yet).
    pub fn new(model: &CandleModel, capacity: usize) -> Self {
        CandleCache {
            pool: model.pool.clone(),
            blocks: Vec::new(),
            capacity,
            len: 0,
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

    /// Positions its blocks hold (what it takes of the pool).
    pub fn allocated(&self) -> usize {
        self.blocks.len() * BLOCK
    }

    /// Forgets everything from position `len` on, and gives back the blocks past it.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        let keep = self.len.div_ceil(BLOCK);
        if self.blocks.len() > keep {
            let spare = self.blocks.split_off(keep);
            self.pool.lock().give(spare);
        }
    }

    /// The pool rows of `positions`.
    fn rows(&self, positions: std::ops::Range<usize>) -> impl Iterator<Item = u32> + '_ {
        positions.map(|p| self.blocks[p / BLOCK] * BLOCK as u32 + (p % BLOCK) as u32)
    }

    /// Positions `start..start + n` as runs of consecutive rows: `(first row, offset from
    /// start, length)`, one per block they touch.
    fn segments(&self, start: usize, n: usize) -> Vec<(usize, usize, usize)> {
        let mut out = Vec::new();
        let mut p = start;
        while p < start + n {
            let len = (BLOCK - p % BLOCK).min(start + n - p);
            out.push((
                self.blocks[p / BLOCK] as usize * BLOCK + p % BLOCK,
                p - start,
                len,
            ));
            p += len;
        }
        out
    }

    /// Takes the blocks for `need` positions (at most the capacity), keeping what is cached.
    fn reserve(&mut self, pool: &mut PoolInner, need: usize) -> CResult<()> {
        let want = need.min(self.capacity).div_ceil(BLOCK);
        if want > self.blocks.len() {
            let more = pool.take(want - self.blocks.len())?;
            self.blocks.extend(more);
        }
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
        if !Arc::ptr_eq(&self.pool, &other.pool) {
            return Err("the caches belong to different models".into());
        }
        self.truncate(0);
        if n == 0 {
            return Ok(());
        }
        let pool = self.pool.clone();
        let mut pool = pool.lock();
        let copy = |this: &mut Self, pool: &mut PoolInner| -> CResult<()> {
            this.reserve(pool, n)?;
            let from = Tensor::from_vec(other.rows(0..n).collect(), n, &pool.device)?;
            let segments = this.segments(0, n);
            for (k, v) in &pool.layers {
                for t in [k, v] {
                    let prefix = t.index_select(&from, 0)?;
                    for &(row, at, len) in &segments {
                        t.slice_set(&prefix.narrow(0, at, len)?.contiguous()?, 0, row)?;
                    }
                }
            }
            Ok(())
        };
        copy(self, &mut pool).map_err(|e| e.to_string())?;
        self.len = n;
        Ok(())
    }
}

impl Drop for CandleCache {
    fn drop(&mut self) {
        if !self.blocks.is_empty() {
            let blocks = std::mem::take(&mut self.blocks);
            self.pool.lock().give(blocks);
        }
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
