//! Quantized activations: the rows of `x` as 8-bit integers with f32 scales, the form every
//! block dot product reads. Two formats, as in llama.cpp:
//!
//! - for the 32-block kinds, blocks of 32 with `d = amax / 127` (rounded to f16, as ggml and
//!   candle store it) and `s = d · Σq`, which the kinds with a min or an offset need;
//! - for the K kinds, super-blocks of 256 with `d = -max / 127` (f32) and the sums of each 16
//!   values, which carry the mins and offsets of the sub-blocks.
//!
//! Values are rounded to nearest, ties to even, as llama.cpp's SIMD quantizers do (candle's
//! scalar one rounds ties away from zero; exact ties are rare and cost one step at most).
//!
//! The SIMD kernels of the 32-block kinds take their activations *grouped*: `G` blocks at a
//! time (4 for AVX-512, 2 for AVX2), the first 16 values of each block, then the last 16 of
//! each, so that the low and the high nibbles of `G` weight blocks meet their activations
//! without shuffles; a short last group is padded with zeros. The AVX-512 kernels of Q4_K and
//! Q5_K take each 128 values with their middle quarters *swapped* (values 0..32, 64..96,
//! 32..64, 96..128), the order of the low and high nibbles of 64 packed bytes. Everything else
//! reads values in element order.

use half::f16;

use super::{par_rows, Isa, QuantKind, SyncPtr};

/// Reused buffers for quantized activations: no allocation once warmed up.
#[derive(Default)]
pub struct QuantScratch {
    /// n × cols quantized values.
    pub(super) qs: Vec<i8>,
    /// 32-blocks: `[d, s]` per block. Super-blocks: `d` per super-block.
    scales: Vec<f32>,
    /// Grouped 32-blocks: `d` once per i32 lane of a group's dot product (4 per block).
    lanes: Vec<f32>,
    /// Super-blocks: Σq of each 16 values.
    bsums: Vec<i16>,
    /// Per row: values, scale entries and lanes.
    strides: (usize, usize, usize),
    /// Blocks per group of the 32-block layout (0: element order).
    group: usize,
    swapped: bool,
    n: usize,
}

/// One quantized activation row in 32-blocks.
pub(super) struct Row32<'a> {
    /// In element order, or grouped (then padded to whole groups).
    pub qs: &'a [i8],
    /// `[d, s]` per block (grouped: padded with zeros to whole groups).
    pub ds: &'a [f32],
    /// Grouped only: `d` of each block 4 times, one per i32 lane of its dot product.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub lanes: &'a [f32],
    /// Blocks per group (0: element order).
    pub group: usize,
}

/// One quantized activation row in super-blocks of 256.
pub(super) struct RowK<'a> {
    /// In element order, or with the middle quarters of each 128 swapped.
    pub qs: &'a [i8],
    pub swapped: bool,
    pub d: &'a [f32],
    pub bsums: &'a [i16],
}

impl QuantScratch {
    /// Quantizes `n` rows of `cols` for `kind`'s dot products, laid out for `isa`'s kernels.
    pub(super) fn quantize(&mut self, kind: QuantKind, isa: Isa, x: &[f32], n: usize, cols: usize) {
        let group = match isa {
            _ if kind.is_k() => 0,
            Isa::Avx512 => 4,
            Isa::Avx2 => 2,
            Isa::Scalar => 0,
        };
        self.quantize_grouped(kind, isa, group, x, n, cols)
    }

    /// Quantizes `n` rows of `cols` for a 32-block `kind` in element order (the layout of the
    /// portable kernels and of the interleaved panels), with `isa`'s quantizer.
    pub(super) fn quantize_in_order(
        &mut self,
        kind: QuantKind,
        isa: Isa,
        x: &[f32],
        n: usize,
        cols: usize,
    ) {
        assert!(!kind.is_k(), "{kind:?} is not a 32-block kind");
        self.quantize_grouped(kind, isa, 0, x, n, cols)
    }

    fn quantize_grouped(
        &mut self,
        kind: QuantKind,
        isa: Isa,
        group: usize,
        x: &[f32],
        n: usize,
        cols: usize,
    ) {
        assert_eq!(x.len(), n * cols);
        let is_k = kind.is_k();
        let swapped = isa == Isa::Avx512 && matches!(kind, QuantKind::Q4K | QuantKind::Q5K);
        let blocks = cols / kind.block_elems();
        self.n = n;
        self.group = group;
        self.swapped = swapped;
        self.strides = match (is_k, group) {
            (true, _) => (cols, blocks, 16 * blocks),
            (false, 0) => (cols, 2 * blocks, 0),
            (false, g) => {
                let padded = blocks.div_ceil(g) * g;
                (32 * padded, 2 * padded, 4 * padded)
            }
        };
        let (sq, ss, sl) = self.strides;
        let qs = grown(&mut self.qs, n * sq);
        let scales = grown(&mut self.scales, n * ss);
        let lanes = grown(&mut self.lanes, if is_k { 0 } else { n * sl });
        let bsums = grown(&mut self.bsums, if is_k { n * sl } else { 0 });
        // (A few rows run on the calling thread: waking another costs more than they do.)
        par_rows(n, 1, cols, |range| {
            // Whole pointers, not their fields, are what the closure may share.
            let (qs, scales, lanes, bsums) = (qs, scales, lanes, bsums);
            for t in range {
                let x = &x[t * cols..(t + 1) * cols];
                // SAFETY: each buffer was grown above to n rows of its stride (those unused by
                // this layout have stride 0); row t is written by this range alone.
                unsafe {
                    let q = std::slice::from_raw_parts_mut(qs.0.add(t * sq), sq);
                    let s = std::slice::from_raw_parts_mut(scales.0.add(t * ss), ss);
                    if is_k {
                        let b = std::slice::from_raw_parts_mut(bsums.0.add(t * sl), sl);
                        quantize_k_row(isa, x, q, s, b, swapped);
                    } else {
                        let l = std::slice::from_raw_parts_mut(lanes.0.add(t * sl), sl);
                        quantize_32_row(isa, x, q, s, l, group);
                    }
                }
            }
        });
    }

    /// Row `t` as quantized for a 32-block kind.
    pub(super) fn row32(&self, t: usize) -> Row32<'_> {
        let (sq, ss, sl) = self.strides;
        debug_assert!(t < self.n);
        Row32 {
            qs: &self.qs[t * sq..(t + 1) * sq],
            ds: &self.scales[t * ss..(t + 1) * ss],
            lanes: &self.lanes[t * sl..(t + 1) * sl],
            group: self.group,
        }
    }

    /// Row `t` as quantized for a K kind.
    pub(super) fn row_k(&self, t: usize) -> RowK<'_> {
        let (sq, ss, sl) = self.strides;
        debug_assert!(t < self.n);
        RowK {
            qs: &self.qs[t * sq..(t + 1) * sq],
            swapped: self.swapped,
            d: &self.scales[t * ss..(t + 1) * ss],
            bsums: &self.bsums[t * sl..(t + 1) * sl],
        }
    }

    /// The value row `t`, column `c` was quantized to (tests compare against exact arithmetic).
    #[cfg(test)]
    pub(super) fn dequantized(&self, kind: QuantKind, t: usize, c: usize) -> f64 {
        if kind.is_k() {
            let a = self.row_k(t);
            let at = if a.swapped { swap_quarters(c) } else { c };
            return a.qs[at] as f64 * a.d[c / 256] as f64;
        }
        let a = self.row32(t);
        let (b, i) = (c / 32, c % 32);
        let (lo, hi) = group_at(b, a.group);
        let at = if i < 16 { lo + i } else { hi + i - 16 };
        a.qs[at] as f64 * a.ds[2 * b] as f64
    }
}

/// `v` grown to at least `len` (never shrunk, so a warm scratch does not allocate), as a pointer
/// that threads may write disjoint parts of.
fn grown<T: Default + Clone>(v: &mut Vec<T>, len: usize) -> SyncPtr<T> {
    if v.len() < len {
        v.resize(len, T::default());
    }
    SyncPtr(v.as_mut_ptr())
}

/// Defines `$name(isa, ..)`, which runs `$body` as written for AVX-512 in `act_avx512`, or
/// its plain loops compiled for AVX2 (so that they vectorise), or as they are.
macro_rules! with_isa {
    ($name:ident, $body:ident ( $($arg:ident : $ty:ty),* )) => {
        fn $name(isa: Isa, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn wide256($($arg: $ty),*) {
                    $body($($arg),*)
                }
                match isa.min(Isa::best_supported()) {
                    // SAFETY: the CPU has these features (best_supported).
                    Isa::Avx512 => unsafe { super::act_avx512::$body($($arg),*) },
                    // SAFETY: as above.
                    Isa::Avx2 => unsafe { wide256($($arg),*) },
                    Isa::Scalar => $body($($arg),*),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = isa;
                $body($($arg),*)
            }
        }
    };
}

with_isa!(
    quantize_32_row,
    blocks_32(x: &[f32], qs: &mut [i8], ds: &mut [f32], lanes: &mut [f32], group: usize)
);

/// Where the first and the last 16 values of block `b` go in groups of `g` blocks (0: in
/// element order).
#[inline(always)]
pub(super) fn group_at(b: usize, g: usize) -> (usize, usize) {
    match b.checked_div(g) {
        None => (32 * b, 32 * b + 16),
        Some(group) => {
            let at = group * 32 * g + b % g * 16;
            (at, at + 16 * g)
        }
    }
}
with_isa!(
    quantize_k_row,
    super_blocks(x: &[f32], qs: &mut [i8], d: &mut [f32], bsums: &mut [i16], swapped: bool)
);

/// Where value `i` goes when the middle quarters of each 128 are swapped (its own inverse).
#[inline(always)]
#[cfg_attr(not(any(test, target_arch = "x86_64")), allow(dead_code))]
pub(super) fn swap_quarters(i: usize) -> usize {
    const TO: [usize; 4] = [0, 2, 1, 3];
    i / 128 * 128 + TO[i % 128 / 32] * 32 + i % 32
}

/// One row into blocks of 32: values in `qs`, `[d, s]` per block in `ds`, and grouped by
/// `group` blocks (not 0) `d` per i32 lane in `lanes`, padded with zeros to whole groups.
#[inline(always)]
fn blocks_32(x: &[f32], qs: &mut [i8], ds: &mut [f32], lanes: &mut [f32], group: usize) {
    let blocks = x.len() / 32;
    let mut q = [0i8; 32];
    for (b, x) in x.chunks_exact(32).enumerate() {
        let d = amax(x) / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut wide = [0i32; 32];
        for (q, &v) in wide.iter_mut().zip(x) {
            *q = to_int(v * id);
        }
        let sum: i32 = wide.iter().sum();
        for (q, &v) in q.iter_mut().zip(&wide) {
            *q = v as i8;
        }
        let d = to_f16_and_back(d);
        ds[2 * b] = d;
        ds[2 * b + 1] = d * sum as f32;
        let (lo, hi) = group_at(b, group);
        qs[lo..lo + 16].copy_from_slice(&q[..16]);
        qs[hi..hi + 16].copy_from_slice(&q[16..]);
    }
    if group != 0 {
        pad_groups(blocks, group, qs, ds, lanes);
    }
}

/// Completes a row of `blocks` blocks grouped by `group`: `d` per lane, and zeros up to whole
/// groups.
pub(super) fn pad_groups(
    blocks: usize,
    group: usize,
    qs: &mut [i8],
    ds: &mut [f32],
    lanes: &mut [f32],
) {
    for (b, l) in lanes.chunks_exact_mut(4).enumerate() {
        l.fill(if b < blocks { ds[2 * b] } else { 0.0 });
    }
    ds[2 * blocks..].fill(0.0);
    for b in blocks..blocks.div_ceil(group) * group {
        let (lo, hi) = group_at(b, group);
        qs[lo..lo + 16].fill(0);
        qs[hi..hi + 16].fill(0);
    }
}

/// `d` as ggml and candle store it: rounded to f16.
#[inline(always)]
pub(super) fn to_f16_and_back(d: f32) -> f32 {
    f16::from_f32(d).to_f32()
}

/// The largest |v| (16 running maxima folded in halves, so that it vectorises).
#[inline(always)]
fn amax(x: &[f32]) -> f32 {
    let mut m = [0f32; 16];
    for c in x.chunks_exact(16) {
        for (m, &v) in m.iter_mut().zip(c) {
            *m = m.max(v.abs());
        }
    }
    for half in [8, 4, 2, 1] {
        for i in 0..half {
            m[i] = m[i].max(m[i + half]);
        }
    }
    m[0]
}

/// `v` rounded (ties to even) and clamped to [-128, 127]; NaN becomes -128.
#[inline(always)]
#[allow(clippy::manual_clamp)] // `clamp` would keep NaN, which may not reach `to_int_unchecked`.
fn to_int(v: f32) -> i32 {
    let v = v.round_ties_even().max(-128.0).min(127.0);
    // SAFETY: `max` and `min` leave a finite value in [-128, 127] (`max` drops NaN).
    unsafe { v.to_int_unchecked() }
}

/// One row into super-blocks of 256: `qs`, `d` per super-block and the sums of each 16 values.
#[inline(always)]
fn super_blocks(x: &[f32], qs: &mut [i8], d: &mut [f32], bsums: &mut [i16], swapped: bool) {
    let blocks = x.chunks_exact(256).zip(qs.chunks_exact_mut(256));
    for (b, (x, q)) in blocks.enumerate() {
        let amax = amax(x);
        let sums = &mut bsums[16 * b..16 * b + 16];
        if amax == 0.0 {
            d[b] = 0.0;
            q.fill(0);
            sums.fill(0);
            continue;
        }
        // The signed value of largest magnitude (the first, as candle takes) maps to -127.
        let max = x.iter().copied().find(|v| v.abs() == amax).unwrap_or(amax);
        let iscale = -127.0 / max;
        for ((q, x), s) in q
            .chunks_exact_mut(16)
            .zip(x.chunks_exact(16))
            .zip(sums.iter_mut())
        {
            let mut wide = [0i32; 16];
            for (w, &v) in wide.iter_mut().zip(x) {
                *w = to_int(iscale * v);
            }
            *s = wide.iter().sum::<i32>() as i16;
            for (q, &w) in q.iter_mut().zip(&wide) {
                *q = w as i8;
            }
        }
        if swapped {
            for half in q.chunks_exact_mut(128) {
                let (first, second) = half.split_at_mut(64);
                first[32..].swap_with_slice(&mut second[..32]);
            }
        }
        d[b] = 1.0 / iscale;
    }
}
