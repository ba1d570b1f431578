//! The forward pass: one call runs any number of sequences, each with its own new tokens (a
//! prompt chunk or one decode token) at its own position, over one shared set of weights.
//! Every linear layer runs once over all the call's tokens (decode of many sequences reads the
//! weights once); attention runs per sequence against that sequence's [`KvCache`].

use super::{
    config::NativeConfig,
    weights::{Fused, Linear, Source},
};
use half::{f16, slice::HalfFloatSliceExt};

use super::config::KvDtype;
use crate::engine::kernels::{
    self,
    dense::{self, DenseWeights},
    ops,
    quant::QuantScratch,
};

struct Layer {
    attn_norm: Vec<f32>,
    qkv: Fused,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    o: Linear,
    ffn_norm: Vec<f32>,
    gate_up: Fused,
    down: Linear,
}

/// A loaded llama-family model.
pub struct Model {
    pub config: NativeConfig,
    embed: Linear,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    /// None: tied to the embedding.
    head: Option<Linear>,
    inv_freqs: Vec<f32>,
}

/// Keys and values of one sequence, allocated once for its whole length.
///
/// Layout per layer and key/value head: keys and values as `[capacity][head_dim]`, one row per
/// position, so that a step reads each of them front to back.
pub struct KvCache {
    capacity: usize,
    len: usize,
    keys: KvData,
    values: KvData,
    head_dim: usize,
    kv_heads: usize,
    layers: usize,
}

impl KvCache {
    pub fn new(config: &NativeConfig, capacity: usize) -> Self {
        let size = config.layers * config.kv_heads * capacity * config.head_dim;
        KvCache {
            capacity,
            len: 0,
            // Zeroed pages from the OS: memory beyond what the sequence reaches stays untouched.
            keys: KvData::zeroed(config.kv_dtype, size),
            values: KvData::zeroed(config.kv_dtype, size),
            head_dim: config.head_dim,
            kv_heads: config.kv_heads,
            layers: config.layers,
        }
    }

    /// Tokens cached so far (the position of the next one).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets everything from position `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Positions it has room for.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes its buffers take (allocated for the whole capacity).
    pub fn bytes(&self) -> u64 {
        (self.keys.bytes() + self.values.bytes()) as u64
    }

    /// Bytes one cached position takes for `config`.
    pub fn bytes_per_token(config: &NativeConfig) -> u64 {
        (2 * config.layers * config.kv_heads * config.head_dim * config.kv_dtype.bytes()) as u64
    }

    /// Replaces this cache's contents with the first `n` positions of `other` (a prefix that
    /// both sequences share: their keys and values there are the same).
    ///
    /// # Panics
    /// When `n` exceeds what `other` holds or what this cache has room for, or the two caches
    /// belong to models of different shapes.
    pub fn copy_prefix_from(&mut self, other: &KvCache, n: usize) {
        assert!(
            n <= other.len && n <= self.capacity,
            "copying {n} positions: the source holds {}, the destination has room for {}",
            other.len,
            self.capacity
        );
        assert_eq!(
            (self.layers, self.kv_heads, self.head_dim),
            (other.layers, other.kv_heads, other.head_dim),
            "caches of different model shapes"
        );
        let hd = self.head_dim;
        let heads = self.layers * self.kv_heads;
        for h in 0..heads {
            let (dst, src) = (h * self.capacity * hd, h * other.capacity * hd);
            self.keys.copy_from(dst, &other.keys, src, n * hd);
            self.values.copy_from(dst, &other.values, src, n * hd);
        }
        self.len = n;
    }

    /// A copy of what it holds, with no spare room (for keeping a finished sequence's prefix).
    pub fn compact(&self) -> KvCache {
        let size = self.layers * self.kv_heads * self.head_dim * self.len;
        let mut out = KvCache {
            capacity: self.len,
            len: 0,
            keys: KvData::zeroed(self.keys.dtype(), size),
            values: KvData::zeroed(self.values.dtype(), size),
            head_dim: self.head_dim,
            kv_heads: self.kv_heads,
            layers: self.layers,
        };
        out.copy_prefix_from(self, self.len);
        out
    }

    fn head_offset(&self, layer: usize, head: usize) -> usize {
        (layer * self.kv_heads + head) * self.capacity * self.head_dim
    }
}

/// The keys or the values of a cache, in its element type.
enum KvData {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl KvData {
    fn zeroed(dtype: KvDtype, len: usize) -> KvData {
        match dtype {
            KvDtype::F32 => KvData::F32(vec![0.0; len]),
            KvDtype::F16 => KvData::F16(vec![f16::ZERO; len]),
        }
    }

    fn dtype(&self) -> KvDtype {
        match self {
            KvData::F32(_) => KvDtype::F32,
            KvData::F16(_) => KvDtype::F16,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            KvData::F32(v) => std::mem::size_of_val(v.as_slice()),
            KvData::F16(v) => std::mem::size_of_val(v.as_slice()),
        }
    }

    /// Stores `row` from element `at` on.
    fn write(&mut self, at: usize, row: &[f32]) {
        match self {
            KvData::F32(v) => v[at..at + row.len()].copy_from_slice(row),
            KvData::F16(v) => v[at..at + row.len()].convert_from_f32_slice(row),
        }
    }

    /// Copies `len` elements of `other` from `src` to `dst` (caches of one model: one type).
    fn copy_from(&mut self, dst: usize, other: &KvData, src: usize, len: usize) {
        match (self, other) {
            (KvData::F32(a), KvData::F32(b)) => {
                a[dst..dst + len].copy_from_slice(&b[src..src + len])
            }
            (KvData::F16(a), KvData::F16(b)) => {
                a[dst..dst + len].copy_from_slice(&b[src..src + len])
            }
            _ => panic!("copying between caches of different element types"),
        }
    }

    /// `range` as the dense kernels read it.
    fn dense(&self, range: std::ops::Range<usize>) -> DenseWeights<'_> {
        match self {
            KvData::F32(v) => DenseWeights::F32(&v[range]),
            KvData::F16(v) => DenseWeights::F16(&v[range]),
        }
    }

    /// `out = P · V` ([`ops::weighted_rows`]) for the `rows` rows of `p` (each as long as the
    /// `range` holds rows of `width`) and the values in `range`; f16 ones read directly where a
    /// kernel does, else widened into `buf` first.
    fn weighted_rows(
        &self,
        range: std::ops::Range<usize>,
        p: &[f32],
        rows: usize,
        width: usize,
        out: &mut [f32],
        buf: &mut [f32],
    ) {
        let len = range.len() / width;
        match self {
            KvData::F32(v) => ops::weighted_rows(p, len, rows, &v[range], len, width, out),
            KvData::F16(v) => {
                let v = &v[range];
                if !ops::weighted_rows_f16(p, len, rows, v, len, width, out) {
                    let wide = &mut buf[..v.len()];
                    v.convert_to_f32_slice(wide);
                    ops::weighted_rows(p, len, rows, wide, len, width, out);
                }
            }
        }
    }

    fn prefetch(&self, range: std::ops::Range<usize>) {
        match self {
            KvData::F32(v) => kernels::prefetch(&v[range]),
            KvData::F16(v) => kernels::prefetch(&v[range]),
        }
    }
}

/// One sequence's part of a forward call.
pub struct Step<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

/// Buffers of a forward pass, grown to the largest call and then reused: a decode step
/// allocates nothing.
#[derive(Default)]
pub struct Workspace {
    x: Vec<f32>,
    xn: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    att_q: Vec<f32>,
    scores: Vec<f32>,
    att_out: Vec<f32>,
    last: Vec<f32>,
    tmp: Vec<f32>,
    /// Logits of each step's last token, `steps × vocab`.
    pub logits: Vec<f32>,
    scratch: QuantScratch,
}

fn grow(v: &mut Vec<f32>, len: usize) {
    if v.len() < len {
        v.resize(len, 0.0);
    }
}

impl Model {
    pub fn load(config: NativeConfig, mut src: Source) -> Result<Model, String> {
        let c = &config;
        let gguf = matches!(src, Source::Gguf { .. });
        let (q_dim, kv_dim) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let name = |hf: &str, gg: &str| if gguf { gg.to_owned() } else { hf.to_owned() };
        let embed = src.linear(
            &name("model.embed_tokens.weight", "token_embd.weight"),
            c.vocab,
            c.hidden,
            None,
        )?;
        let mut layers = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let hf = |s: &str| format!("model.layers.{i}.{s}");
            let gg = |s: &str| format!("blk.{i}.{s}");
            let n = |h: &str, g: &str| if gguf { gg(g) } else { hf(h) };
            let bias = |h: &str, g: &str| c.qkv_bias.then(|| n(h, g));
            let q = src.linear(
                &n("self_attn.q_proj.weight", "attn_q.weight"),
                q_dim,
                c.hidden,
                bias("self_attn.q_proj.bias", "attn_q.bias").as_deref(),
            )?;
            let k = src.linear(
                &n("self_attn.k_proj.weight", "attn_k.weight"),
                kv_dim,
                c.hidden,
                bias("self_attn.k_proj.bias", "attn_k.bias").as_deref(),
            )?;
            let v = src.linear(
                &n("self_attn.v_proj.weight", "attn_v.weight"),
                kv_dim,
                c.hidden,
                bias("self_attn.v_proj.bias", "attn_v.bias").as_deref(),
            )?;
            let (q_norm, k_norm) = if c.qk_norm {
                (
                    Some(src.vector(
                        &n("self_attn.q_norm.weight", "attn_q_norm.weight"),
                        c.head_dim,
                    )?),
                    Some(src.vector(
                        &n("self_attn.k_norm.weight", "attn_k_norm.weight"),
                        c.head_dim,
                    )?),
                )
            } else {
                (None, None)
            };
            let gate = src.linear(
                &n("mlp.gate_proj.weight", "ffn_gate.weight"),
                c.ffn,
                c.hidden,
                None,
            )?;
            let up = src.linear(
                &n("mlp.up_proj.weight", "ffn_up.weight"),
                c.ffn,
                c.hidden,
                None,
            )?;
            layers.push(Layer {
                attn_norm: src
                    .vector(&n("input_layernorm.weight", "attn_norm.weight"), c.hidden)?,
                qkv: Fused::new(vec![q, k, v]),
                q_norm,
                k_norm,
                o: src
                    .linear(
                        &n("self_attn.o_proj.weight", "attn_output.weight"),
                        c.hidden,
                        q_dim,
                        None,
                    )?
                    .packed(),
                ffn_norm: src.vector(
                    &n("post_attention_layernorm.weight", "ffn_norm.weight"),
                    c.hidden,
                )?,
                gate_up: Fused::new(vec![gate, up]),
                down: src
                    .linear(
                        &n("mlp.down_proj.weight", "ffn_down.weight"),
                        c.hidden,
                        c.ffn,
                        None,
                    )?
                    .packed(),
            });
        }
        let norm = src.vector(&name("model.norm.weight", "output_norm.weight"), c.hidden)?;
        let head_name = name("lm_head.weight", "output.weight");
        let head = if src.has(&head_name) && (gguf || !c.tied_embeddings) {
            Some(src.linear(&head_name, c.vocab, c.hidden, None)?.packed())
        } else if c.tied_embeddings || gguf {
            None
        } else {
            return Err(format!(
                "{head_name} is missing and tie_word_embeddings is false"
            ));
        };
        let mut config = config;
        if gguf && src.has("rope_freqs.weight") {
            config.rope_freq_factors = Some(src.vector("rope_freqs.weight", config.head_dim / 2)?);
        }
        Ok(Model {
            inv_freqs: config.inv_freqs(),
            config,
            embed,
            layers,
            norm,
            head,
        })
    }

    /// Runs every step's new tokens; afterwards `ws.logits` holds one row of `vocab` logits per
    /// step, for its last token. Fails (changing nothing) when a step's tokens would overflow
    /// its cache or a token id is outside the vocabulary.
    pub fn forward(&self, steps: &mut [Step<'_>], ws: &mut Workspace) -> Result<(), String> {
        let c = &self.config;
        let total: usize = steps.iter().map(|s| s.tokens.len()).sum();
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
        }
        let (hd, half) = (c.head_dim, c.head_dim / 2);
        let (q_dim, kv_dim) = (c.heads * hd, c.kv_heads * hd);
        let qkv_w = q_dim + 2 * kv_dim;
        grow(&mut ws.x, total * c.hidden);
        grow(&mut ws.xn, total * c.hidden);
        grow(&mut ws.qkv, total * qkv_w);
        grow(&mut ws.attn, total * q_dim);
        grow(&mut ws.proj, total * c.hidden);
        grow(&mut ws.gate_up, total * 2 * c.ffn);
        grow(&mut ws.act, total * c.ffn);
        grow(&mut ws.cos, total * half);
        grow(&mut ws.sin, total * half);

        // Embeddings and the rotation of each token's position.
        let mut t = 0;
        for s in steps.iter() {
            for (i, &token) in s.tokens.iter().enumerate() {
                self.embed
                    .row(token as usize, &mut ws.x[t * c.hidden..(t + 1) * c.hidden]);
                let pos = (s.cache.len + i) as f32;
                for (j, f) in self.inv_freqs.iter().enumerate() {
                    let angle = pos * f;
                    ws.cos[t * half + j] = angle.cos();
                    ws.sin[t * half + j] = angle.sin();
                }
                t += 1;
            }
        }

        for (li, layer) in self.layers.iter().enumerate() {
            for t in 0..total {
                let r = t * c.hidden..(t + 1) * c.hidden;
                ops::rms_norm(&ws.x[r.clone()], &layer.attn_norm, c.rms_eps, &mut ws.xn[r]);
            }
            layer
                .qkv
                .forward(&ws.xn, total, &mut ws.qkv, &mut ws.tmp, &mut ws.scratch);
            for t in 0..total {
                let row = &mut ws.qkv[t * qkv_w..(t + 1) * qkv_w];
                let (cos, sin) = (
                    &ws.cos[t * half..(t + 1) * half],
                    &ws.sin[t * half..(t + 1) * half],
                );
                let (q, rest) = row.split_at_mut(q_dim);
                let k = &mut rest[..kv_dim];
                for head in q.chunks_exact_mut(hd) {
                    if let Some(w) = &layer.q_norm {
                        ops::rms_norm_in_place(head, w, c.rms_eps);
                    }
                    ops::rope(head, cos, sin, c.rope_style);
                }
                for head in k.chunks_exact_mut(hd) {
                    if let Some(w) = &layer.k_norm {
                        ops::rms_norm_in_place(head, w, c.rms_eps);
                    }
                    ops::rope(head, cos, sin, c.rope_style);
                }
            }
            self.attention_all(li, steps, total, ws);
            layer
                .o
                .forward(&ws.attn, total, &mut ws.proj, &mut ws.scratch);
            for (x, p) in ws.x[..total * c.hidden].iter_mut().zip(&ws.proj) {
                *x += p;
            }
            for t in 0..total {
                let r = t * c.hidden..(t + 1) * c.hidden;
                ops::rms_norm(&ws.x[r.clone()], &layer.ffn_norm, c.rms_eps, &mut ws.xn[r]);
            }
            layer
                .gate_up
                .forward(&ws.xn, total, &mut ws.gate_up, &mut ws.tmp, &mut ws.scratch);
            // Many tokens' activations are split among the kernel pool's threads (an exp and a
            // division per value: ~10 µs per layer for 16 tokens).
            let ffn = c.ffn;
            let (act, gate_up) = (&mut ws.act[..total * ffn], &ws.gate_up[..total * 2 * ffn]);
            let swiglu = |(out, gu): (&mut [f32], &[f32])| {
                let (g, u) = gu.split_at(ffn);
                ops::swiglu(g, u, out);
            };
            if total >= 8 {
                kernels::pool::for_each_chunk_mut(act, ffn, |t, out| {
                    swiglu((out, &gate_up[t * 2 * ffn..(t + 1) * 2 * ffn]))
                });
            } else {
                act.chunks_mut(ffn)
                    .zip(gate_up.chunks(2 * ffn))
                    .for_each(swiglu);
            }
            layer
                .down
                .forward(&ws.act, total, &mut ws.proj, &mut ws.scratch);
            for (x, p) in ws.x[..total * c.hidden].iter_mut().zip(&ws.proj) {
                *x += p;
            }
        }

        // Logits of each step's last token.
        let count = steps.len();
        grow(&mut ws.last, count * c.hidden);
        grow(&mut ws.logits, count * c.vocab);
        let mut end = 0;
        for (i, s) in steps.iter_mut().enumerate() {
            end += s.tokens.len();
            let t = end - 1;
            ops::rms_norm(
                &ws.x[t * c.hidden..(t + 1) * c.hidden],
                &self.norm,
                c.rms_eps,
                &mut ws.last[i * c.hidden..(i + 1) * c.hidden],
            );
            s.cache.len += s.tokens.len();
        }
        let head = self.head.as_ref().unwrap_or(&self.embed);
        head.forward(&ws.last, count, &mut ws.logits, &mut ws.scratch);
        Ok(())
    }

    /// Attention of every step (see [`Model::attention`]). One step runs on the calling thread
    /// with the workspace's buffers; several are shared among the kernel pool's threads in runs of
    /// consecutive steps (each sequence's attention is a chain of small products, too small to
    /// split further), each step with its own part of `ws.tmp` as buffers.
    fn attention_all(
        &self,
        layer: usize,
        steps: &mut [Step<'_>],
        total: usize,
        ws: &mut Workspace,
    ) {
        let c = &self.config;
        let (hd, group) = (c.head_dim, c.heads / c.kv_heads);
        let (q_dim, kv_dim) = (c.heads * hd, c.kv_heads * hd);
        let qkv = &ws.qkv[..total * (q_dim + 2 * kv_dim)];
        let attn = &mut ws.attn[..total * q_dim];
        if let [s] = steps {
            let n = s.tokens.len();
            let (rows, kv_len) = (n * group, s.cache.len + n);
            grow(&mut ws.att_q, rows * hd);
            grow(&mut ws.scores, rows * kv_len);
            grow(&mut ws.att_out, rows * hd);
            let widened = self.widened(s);
            grow(&mut ws.tmp, widened);
            let bufs = AttentionBuffers {
                q: &mut ws.att_q[..rows * hd],
                scores: &mut ws.scores[..rows * kv_len],
                out: &mut ws.att_out[..rows * hd],
                vals: &mut ws.tmp[..widened],
            };
            self.prefetch_cache(layer, s);
            self.attention(layer, s.cache, qkv, attn, bufs);
            return;
        }
        let need: usize = steps.iter().map(|s| self.attention_floats(s)).sum();
        grow(&mut ws.tmp, need);
        // Runs of consecutive steps, about two per thread, each with its rows of q/k/v, of the
        // outputs and of `tmp`.
        let run = steps.len().div_ceil(2 * kernels::pool::threads()).max(1);
        let qkv_w = q_dim + 2 * kv_dim;
        let mut runs = Vec::with_capacity(steps.len().div_ceil(run));
        let (mut qkv, mut attn, mut tmp) = (qkv, attn, &mut ws.tmp[..need]);
        for part in steps.chunks_mut(run) {
            let tokens: usize = part.iter().map(|s| s.tokens.len()).sum();
            let floats: usize = part.iter().map(|s| self.attention_floats(s)).sum();
            let (q, rest) = qkv.split_at(tokens * qkv_w);
            qkv = rest;
            let (a, rest) = std::mem::take(&mut attn).split_at_mut(tokens * q_dim);
            attn = rest;
            let (t, rest) = std::mem::take(&mut tmp).split_at_mut(floats);
            tmp = rest;
            runs.push((part, q, a, t));
        }
        kernels::pool::for_each_mut(&mut runs, |(part, q, a, t)| {
            self.attention_run(layer, part, q, a, t)
        });
    }

    /// The f32 values [`Model::attention`] widens a key/value head's values to for step `s`
    /// (an f16 cache where no kernel reads it directly).
    fn widened(&self, s: &Step<'_>) -> usize {
        let hd = self.config.head_dim;
        match s.cache.values.dtype() {
            KvDtype::F16 if !ops::weighted_rows_f16_direct(hd) => {
                (s.cache.len + s.tokens.len()) * hd
            }
            _ => 0,
        }
    }

    /// The buffers [`Model::attention`] takes for step `s`.
    fn attention_floats(&self, s: &Step<'_>) -> usize {
        let c = &self.config;
        let n = s.tokens.len();
        n * (c.heads / c.kv_heads) * (2 * c.head_dim + s.cache.len + n) + self.widened(s)
    }

    /// [`Model::attention`] of consecutive `steps`, whose rows of the call's q/k/v and
    /// attention outputs are `qkv` and `attn`, with buffers from `tmp`
    /// ([`Model::attention_floats`] per step), one after the other, each step's keys and
    /// values fetched while the one before computes.
    fn attention_run(
        &self,
        layer: usize,
        steps: &mut [Step<'_>],
        qkv: &[f32],
        attn: &mut [f32],
        mut tmp: &mut [f32],
    ) {
        let c = &self.config;
        let (hd, group) = (c.head_dim, c.heads / c.kv_heads);
        let (q_dim, kv_dim) = (c.heads * hd, c.kv_heads * hd);
        let qkv_w = q_dim + 2 * kv_dim;
        if let Some(s) = steps.first() {
            self.prefetch_cache(layer, s);
        }
        let (mut qkv, mut attn) = (qkv, attn);
        for i in 0..steps.len() {
            if let Some(next) = steps.get(i + 1) {
                self.prefetch_cache(layer, next);
            }
            let s = &mut steps[i];
            let n = s.tokens.len();
            let (rows, kv_len) = (n * group, s.cache.len + n);
            let (q, rest) = std::mem::take(&mut tmp).split_at_mut(rows * hd);
            let (out, rest) = rest.split_at_mut(rows * hd);
            let (scores, rest) = rest.split_at_mut(rows * kv_len);
            let (vals, rest) = rest.split_at_mut(self.widened(s));
            tmp = rest;
            let (step_qkv, rest) = qkv.split_at(n * qkv_w);
            qkv = rest;
            let (step_attn, rest) = std::mem::take(&mut attn).split_at_mut(n * q_dim);
            attn = rest;
            let bufs = AttentionBuffers {
                q,
                scores,
                out,
                vals,
            };
            self.attention(layer, s.cache, step_qkv, step_attn, bufs);
        }
    }

    /// Asks for the keys and values that step `s`'s attention reads at `layer` (its cached
    /// positions and the new ones, up to 64 KiB) to be brought into L2: each sequence's are read
    /// once per step, from memory or L3.
    fn prefetch_cache(&self, layer: usize, s: &Step<'_>) {
        let cache = &*s.cache;
        let hd = cache.head_dim;
        let kv_len = cache.len + s.tokens.len();
        let mut budget = 64 * 1024 / cache.keys.dtype().bytes();
        for g in 0..cache.kv_heads {
            let off = cache.head_offset(layer, g);
            let live = (kv_len * hd).min(budget / 2);
            cache.keys.prefetch(off..off + live);
            cache.values.prefetch(off..off + live);
            budget -= 2 * live;
            if budget < 2 {
                break;
            }
        }
    }

    /// Attention of one step's tokens (`qkv`: their rows of q, k and v; `attn`: their output
    /// rows) against its cache: stores their keys and values, then for each key/value head
    /// computes the scores of all the heads that share it as one product, masks, softmaxes and
    /// sums the values as a second product.
    fn attention(
        &self,
        layer: usize,
        cache: &mut KvCache,
        qkv: &[f32],
        attn: &mut [f32],
        bufs: AttentionBuffers<'_>,
    ) {
        let c = &self.config;
        let hd = c.head_dim;
        let (q_dim, kv_dim) = (c.heads * hd, c.kv_heads * hd);
        let qkv_w = q_dim + 2 * kv_dim;
        let n = qkv.len() / qkv_w;
        let group = c.heads / c.kv_heads;
        let start = cache.len;
        let kv_len = start + n;
        for i in 0..n {
            let row = &qkv[i * qkv_w..(i + 1) * qkv_w];
            for g in 0..c.kv_heads {
                let off = cache.head_offset(layer, g);
                let k = &row[q_dim + g * hd..q_dim + (g + 1) * hd];
                let v = &row[q_dim + kv_dim + g * hd..q_dim + kv_dim + (g + 1) * hd];
                let at = off + (start + i) * hd..off + (start + i + 1) * hd;
                cache.keys.write(at.start, k);
                cache.values.write(at.start, v);
            }
        }
        let rows = n * group;
        let AttentionBuffers {
            q: att_q,
            scores,
            out: att_out,
            vals,
        } = bufs;
        let scale = 1.0 / (hd as f32).sqrt();
        for g in 0..c.kv_heads {
            // The queries of the group's heads, row (token i, head h) = i·group + h: for one
            // token, the group's heads as they lie in its row of q.
            let heads = g * group * hd..(g + 1) * group * hd;
            let q = if n == 1 {
                &qkv[heads.clone()]
            } else {
                for i in 0..n {
                    let row = &qkv[i * qkv_w..];
                    for h in 0..group {
                        let head = g * group + h;
                        att_q[(i * group + h) * hd..(i * group + h + 1) * hd]
                            .copy_from_slice(&row[head * hd..(head + 1) * hd]);
                    }
                }
                &att_q[..rows * hd]
            };
            let off = cache.head_offset(layer, g);
            let keys = cache.keys.dense(off..off + kv_len * hd);
            dense::matmul(keys, kv_len, hd, q, rows, scores);
            for i in 0..n {
                let pos = start + i;
                let lo = c.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
                for h in 0..group {
                    let row = &mut scores[(i * group + h) * kv_len..(i * group + h + 1) * kv_len];
                    row[..lo].iter_mut().for_each(|v| *v = 0.0);
                    row[pos + 1..].iter_mut().for_each(|v| *v = 0.0);
                    let live = &mut row[lo..=pos];
                    live.iter_mut().for_each(|v| *v *= scale);
                    ops::softmax(live);
                }
            }
            // out = P · V, the values read once, front to back.
            let out = if n == 1 {
                &mut attn[heads]
            } else {
                &mut att_out[..]
            };
            let values = off..off + kv_len * hd;
            cache
                .values
                .weighted_rows(values, scores, rows, hd, out, vals);
            if n == 1 {
                continue;
            }
            for i in 0..n {
                let dst = &mut attn[i * q_dim..(i + 1) * q_dim];
                for h in 0..group {
                    let head = g * group + h;
                    dst[head * hd..(head + 1) * hd]
                        .copy_from_slice(&att_out[(i * group + h) * hd..(i * group + h + 1) * hd]);
                }
            }
        }
    }
}

/// The buffers of one step's attention: queries of a key/value head's group, their scores,
/// and their outputs.
struct AttentionBuffers<'a> {
    q: &'a mut [f32],
    scores: &'a mut [f32],
    out: &'a mut [f32],
    /// A key/value head's values widened to f32 (an f16 cache; empty for an f32 one).
    vals: &'a mut [f32],
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .finish()
    }
}
