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
            // Many tokens' activations are split among rayon's threads (an exp and a division
            // per value: ~10 µs per layer for 16 tokens).
            let ffn = c.ffn;
            let (act, gate_up) = (&mut ws.act[..total * ffn], &ws.gate_up[..total * 2 * ffn]);
            let swiglu = |(out, gu): (&mut [f32], &[f32])| {
                let (g, u) = gu.split_at(ffn);
                ops::swiglu(g, u, out);
            };
            if total >= 8 {
                let mut rows: Vec<_> = act.chunks_mut(ffn).zip(gate_up.chunks(2 * ffn)).collect();
                kernels::pool::for_each_mut(&mut rows, |(out, gu)| swiglu((out, gu)));
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

    /// Attention of every step: stores the steps' new keys and values, then computes each
    /// step's attention as independent items, one per key/value head and block of at most
    /// [`ATTENTION_BLOCK`] of its tokens, shared among the kernel pool's threads. (Items, not
    /// whole sequences: a long prompt's chunk among decode steps is most of the work, and its
    /// heads and token blocks keep both cores busy.)
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
        let qkv_w = q_dim + 2 * kv_dim;
        let qkv = &ws.qkv[..total * qkv_w];
        // The new keys and values first: every item of a step reads them.
        let mut t = 0;
        for s in steps.iter_mut() {
            let start = s.cache.len;
            for i in 0..s.tokens.len() {
                let row = &qkv[(t + i) * qkv_w..(t + i + 1) * qkv_w];
                for g in 0..c.kv_heads {
                    let at = s.cache.head_offset(layer, g) + (start + i) * hd;
                    s.cache
                        .keys
                        .write(at, &row[q_dim + g * hd..q_dim + (g + 1) * hd]);
                    s.cache.values.write(
                        at,
                        &row[q_dim + kv_dim + g * hd..q_dim + kv_dim + (g + 1) * hd],
                    );
                }
            }
            t += s.tokens.len();
        }
        // The items and their buffers.
        let widen =
            matches!(self.config.kv_dtype, KvDtype::F16) && !ops::weighted_rows_f16_direct(hd);
        let mut shapes = Vec::new();
        let mut need = 0;
        let mut t = 0;
        for (si, s) in steps.iter().enumerate() {
            let n = s.tokens.len();
            for g in 0..c.kv_heads {
                let mut i0 = 0;
                while i0 < n {
                    let i1 = (i0 + ATTENTION_BLOCK).min(n);
                    let (rows, kv_len) = ((i1 - i0) * group, s.cache.len + i1);
                    let floats =
                        2 * rows * hd + rows * kv_len + if widen { kv_len * hd } else { 0 };
                    shapes.push((si, t, g, i0, i1, floats));
                    need += floats;
                    i0 = i1;
                }
            }
            t += n;
        }
        grow(&mut ws.tmp, need);
        let out = kernels::SyncPtr(ws.attn.as_mut_ptr());
        assert!(ws.attn.len() >= total * q_dim);
        let mut tmp = &mut ws.tmp[..need];
        let mut items = Vec::with_capacity(shapes.len());
        for &(si, t, g, i0, i1, floats) in &shapes {
            let (buf, rest) = std::mem::take(&mut tmp).split_at_mut(floats);
            tmp = rest;
            items.push(HeadItem {
                cache: &*steps[si].cache,
                qkv: &qkv[t * qkv_w..],
                first_token: t,
                g,
                tokens: i0..i1,
                buf,
            });
        }
        kernels::pool::for_each_mut(&mut items, |item| {
            // SAFETY: each item writes only its own tokens' columns of its own heads (see
            // `attend`), within `ws.attn`, whose length was checked above.
            unsafe { self.attend(layer, item, out) }
        });
    }

    /// One [`HeadItem`]: for its tokens, the scores of the group's query heads against the
    /// cached keys as one product, masked and softmaxed, then summed over the values as a
    /// second product, into the heads' columns of the tokens' attention rows.
    ///
    /// # Safety
    /// `out` points to the call's attention rows (`tokens × q_dim`); no other item has this
    /// item's (token, head) pairs.
    unsafe fn attend(&self, layer: usize, item: &mut HeadItem<'_>, out: kernels::SyncPtr<f32>) {
        let c = &self.config;
        let (hd, group) = (c.head_dim, c.heads / c.kv_heads);
        let (q_dim, kv_dim) = (c.heads * hd, c.kv_heads * hd);
        let qkv_w = q_dim + 2 * kv_dim;
        let cache = item.cache;
        let g = item.g;
        // Positions of this step's first token and of the block's tokens.
        let start = cache.len;
        let (i0, i1) = (item.tokens.start, item.tokens.end);
        let (n, kv_len) = (i1 - i0, start + i1);
        let rows = n * group;
        let (q, rest) = item.buf.split_at_mut(rows * hd);
        let (att_out, rest) = rest.split_at_mut(rows * hd);
        let (scores, vals) = rest.split_at_mut(rows * kv_len);
        // The queries of the group's heads, row (token i, head h) = i·group + h.
        for i in 0..n {
            let row = &item.qkv[(i0 + i) * qkv_w..];
            let heads = g * group * hd..(g + 1) * group * hd;
            q[i * group * hd..(i + 1) * group * hd].copy_from_slice(&row[heads]);
        }
        let off = cache.head_offset(layer, g);
        let keys = cache.keys.dense(off..off + kv_len * hd);
        dense::matmul(keys, kv_len, hd, q, rows, scores);
        let scale = 1.0 / (hd as f32).sqrt();
        for i in 0..n {
            let pos = start + i0 + i;
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
        cache
            .values
            .weighted_rows(off..off + kv_len * hd, scores, rows, hd, att_out, vals);
        for i in 0..n {
            let t = item.first_token + i0 + i;
            // SAFETY: row t's columns of heads g·group.. (g+1)·group belong to this item.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(out.at(t * q_dim + g * group * hd), group * hd)
            };
            dst.copy_from_slice(&att_out[i * group * hd..(i + 1) * group * hd]);
        }
    }
}

/// Tokens of one step whose attention one item computes at most: a prompt chunk splits into
/// several items per head (each reads the head's keys and values once).
const ATTENTION_BLOCK: usize = 16;

/// One item of [`Model::attention_all`]: one key/value head `g` of one step, for a block of
/// that step's tokens.
struct HeadItem<'a> {
    cache: &'a KvCache,
    /// The step's rows of q/k/v, from its first token on.
    qkv: &'a [f32],
    /// The step's first token's row among the call's.
    first_token: usize,
    g: usize,
    /// The block, as indices among the step's tokens.
    tokens: std::ops::Range<usize>,
    /// Queries, outputs and scores of the block's rows, then the head's values widened to f32
    /// where no kernel reads f16 directly.
    buf: &'a mut [f32],
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .finish()
    }
}
