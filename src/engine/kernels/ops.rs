//! Row-wise operations around the products: RMS normalisation, rotary position embeddings,
//! softmax and SwiGLU. Each is written once in plain Rust that the compiler vectorises, and
//! compiled a second time inside an AVX-512 (or AVX2) `#[target_feature]` wrapper so the same
//! code runs on wide registers where the CPU has them.
//!
//! `exp` is a polynomial (Cody–Waite range reduction, degree-6 minimax), within 2 ulp of libm
//! over the range softmax and SiLU use; it is branch-free so it vectorises.

use super::Isa;

/// e^x for finite x; 0 below -87.3, +inf above 88.7.
#[inline(always)]
#[allow(clippy::manual_clamp)] // `clamp` would keep NaN, which may not reach `to_int_unchecked`.
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.336_55, 88.722_83);
    let n = (x * LOG2E).round();
    let r = x - n * LN2_HI - n * LN2_LO;
    // e^r on [-ln2/2, ln2/2].
    let p = 1.987_569_1e-4_f32;
    let p = p.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 0.5);
    let p = (p * r).mul_add(r, r) + 1.0;
    // Not `n as i32`: its saturating conversion does not vectorise (one lane at a time).
    // SAFETY: `max` and `min` map NaN to -127 (the result stays NaN through `p`) and bound
    // the rest to [-127, 128], integers an i32 holds.
    let n = unsafe { n.max(-127.0).min(128.0).to_int_unchecked::<i32>() };
    let scale = f32::from_bits(((n + 127) as u32) << 23);
    p * scale
}

/// Calls `$body` through a `#[target_feature]` function of the detected flavour that takes
/// the arguments directly (a closure passed into such a function does not inherit its
/// features and stays on baseline SSE).
macro_rules! dispatch {
    ($body:ident ( $($arg:ident : $ty:ty),* )) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
            unsafe fn wide512($($arg: $ty),*) { $body($($arg),*) }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn wide256($($arg: $ty),*) { $body($($arg),*) }
            match Isa::detect() {
                // SAFETY: the CPU has these features (Isa::detect).
                Isa::Avx512 => unsafe { wide512($($arg),*) },
                // SAFETY: as above.
                Isa::Avx2 => unsafe { wide256($($arg),*) },
                Isa::Scalar => $body($($arg),*),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $body($($arg),*)
        }
    }};
}

#[inline(always)]
fn rms_norm_body(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] = c[i].mul_add(c[i], acc[i]);
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for v in chunks.remainder() {
        sum += v * v;
    }
    let scale = 1.0 / (sum / x.len() as f32 + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// `out = x / sqrt(mean(x²) + eps) · weight` (RMSNorm of llama and its family).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    debug_assert!(x.len() == weight.len() && x.len() == out.len());
    dispatch!(rms_norm_body(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]))
}

#[inline(always)]
fn rms_norm_in_place_body(x: &mut [f32], weight: &[f32], eps: f32) {
    let sum: f32 = x.iter().map(|v| v * v).sum();
    let scale = 1.0 / (sum / x.len() as f32 + eps).sqrt();
    for (v, w) in x.iter_mut().zip(weight) {
        *v = *v * scale * w;
    }
}

/// RMSNorm in place (Qwen3's per-head q/k norms).
pub fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    debug_assert_eq!(x.len(), weight.len());
    dispatch!(rms_norm_in_place_body(x: &mut [f32], weight: &[f32], eps: f32))
}

#[inline(always)]
fn softmax_body(x: &mut [f32]) {
    // 16 running maxima and sums (a single running one would keep every step in order,
    // one lane at a time); the tail goes through a padded block of 16.
    let mut m = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            m[i] = m[i].max(c[i]);
        }
    }
    let max = chunks.remainder().iter().fold(
        m.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)),
        |a, &b| a.max(b),
    );
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact_mut(16);
    for c in &mut chunks {
        for i in 0..16 {
            c[i] = exp(c[i] - max);
            acc[i] += c[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let mut block = [0f32; 16];
        block[..tail.len()].copy_from_slice(tail);
        for v in block.iter_mut() {
            *v = exp(*v - max);
        }
        for (v, e) in tail.iter_mut().zip(block) {
            *v = e;
            sum += e;
        }
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Softmax in place over a non-empty row.
pub fn softmax(x: &mut [f32]) {
    dispatch!(softmax_body(x: &mut [f32]))
}

#[inline(always)]
fn swiglu_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}

/// `out = silu(gate) · up` (the SwiGLU feed-forward's activation).
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    debug_assert!(gate.len() == up.len() && gate.len() == out.len());
    dispatch!(swiglu_body(gate: &[f32], up: &[f32], out: &mut [f32]))
}

/// Panics unless the shapes fit [`weighted_rows`] (and its f16 twin).
fn check_weighted(
    p: usize,
    stride: usize,
    rows: usize,
    v: usize,
    len: usize,
    width: usize,
    out: usize,
) {
    assert!(
        len <= stride || rows <= 1,
        "weights of {len} positions in rows of {stride}"
    );
    assert!(
        rows == 0 || p >= (rows - 1) * stride + len,
        "weights are short"
    );
    assert!(
        v >= len * width && out >= rows * width,
        "values or output short"
    );
}

/// `out[r] = Σ_j p[r·stride + j] · v[j]` for `r < rows`, `j < len`: the weighted sums of
/// attention, `v` holding `len` rows of `width` values (one per cached position, in order) and
/// `out` `rows` rows of `width`. Every value row is read once per four output rows, in order,
/// and each of its vectors meets four weights.
pub fn weighted_rows(
    p: &[f32],
    stride: usize,
    rows: usize,
    v: &[f32],
    len: usize,
    width: usize,
    out: &mut [f32],
) {
    check_weighted(p.len(), stride, rows, v.len(), len, width, out.len());
    dispatch!(weighted_rows_body(
        p: &[f32],
        stride: usize,
        rows: usize,
        v: &[f32],
        len: usize,
        width: usize,
        out: &mut [f32]
    ))
}

#[inline(always)]
fn weighted_rows_body(
    p: &[f32],
    stride: usize,
    rows: usize,
    v: &[f32],
    len: usize,
    width: usize,
    out: &mut [f32],
) {
    let mut r = 0;
    while r < rows {
        let n = (rows - r).min(4);
        let mut d = 0;
        // Columns in runs of 32 with the rows' sums in registers, then whatever is left.
        while d + 32 <= width {
            match n {
                1 => weighted_run::<1>(p, stride, r, v, len, width, d, out),
                2 => weighted_run::<2>(p, stride, r, v, len, width, d, out),
                3 => weighted_run::<3>(p, stride, r, v, len, width, d, out),
                _ => weighted_run::<4>(p, stride, r, v, len, width, d, out),
            }
            d += 32;
        }
        for i in r..r + n {
            let (w, o) = (&p[i * stride..i * stride + len], &mut out[i * width..]);
            o[d..width].fill(0.0);
            for (j, &w) in w.iter().enumerate() {
                for (o, &x) in o[d..width]
                    .iter_mut()
                    .zip(&v[j * width + d..(j + 1) * width])
                {
                    *o = w.mul_add(x, *o);
                }
            }
        }
        r += n;
    }
}

/// Columns `d..d + 32` of output rows `r..r + R` (see [`weighted_rows`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn weighted_run<const R: usize>(
    p: &[f32],
    stride: usize,
    r: usize,
    v: &[f32],
    len: usize,
    width: usize,
    d: usize,
    out: &mut [f32],
) {
    let mut acc = [[0f32; 32]; R];
    for j in 0..len {
        let x: &[f32; 32] = v[j * width + d..j * width + d + 32].try_into().unwrap();
        for (i, acc) in acc.iter_mut().enumerate() {
            let w = p[(r + i) * stride + j];
            for k in 0..32 {
                acc[k] = w.mul_add(x[k], acc[k]);
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        out[(r + i) * width + d..(r + i) * width + d + 32].copy_from_slice(acc);
    }
}

/// Whether [`weighted_rows_f16`] reads f16 values in rows of `width` here (AVX-512, `width` a
/// multiple of 16); elsewhere callers widen the values and call [`weighted_rows`].
pub fn weighted_rows_f16_direct(width: usize) -> bool {
    cfg!(target_arch = "x86_64") && Isa::detect() == Isa::Avx512 && width.is_multiple_of(16)
}

/// [`weighted_rows`] over f16 values (an f16 KV cache), each widened as it is read. Returns
/// false, doing nothing, where [`weighted_rows_f16_direct`] is false.
pub fn weighted_rows_f16(
    p: &[f32],
    stride: usize,
    rows: usize,
    v: &[half::f16],
    len: usize,
    width: usize,
    out: &mut [f32],
) -> bool {
    check_weighted(p.len(), stride, rows, v.len(), len, width, out.len());
    #[cfg(target_arch = "x86_64")]
    if weighted_rows_f16_direct(width) {
        // SAFETY: the CPU has AVX-512 F/BW/VL/DQ (Isa::detect), which implies F16C here
        // (detected with them); sizes were checked above.
        unsafe { weighted_f16::rows(p, stride, rows, v, len, width, out) };
        return true;
    }
    false
}

#[cfg(target_arch = "x86_64")]
mod weighted_f16 {
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512 F and F16C; `width % 16 == 0`; sizes as [`super::weighted_rows_f16`] checks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn rows(
        p: &[f32],
        stride: usize,
        rows: usize,
        v: &[half::f16],
        len: usize,
        width: usize,
        out: &mut [f32],
    ) {
        let mut r = 0;
        while r < rows {
            let n = (rows - r).min(4);
            let mut d = 0;
            while d < width {
                let c = ((width - d) / 16).min(4);
                macro_rules! go {
                    ($($n:literal $c:literal),*) => {
                        match (n, c) {
                            $(($n, $c) => run::<$n, $c>(p, stride, r, v, len, width, d, out),)*
                            _ => unreachable!(),
                        }
                    };
                }
                go!(1 1, 1 2, 1 3, 1 4, 2 1, 2 2, 2 3, 2 4, 3 1, 3 2, 3 3, 3 4, 4 1, 4 2, 4 3, 4 4);
                d += 16 * c;
            }
            r += n;
        }
    }

    /// Columns `d..d + 16C` of output rows `r..r + R`: the value rows read once, in order.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn run<const R: usize, const C: usize>(
        p: &[f32],
        stride: usize,
        r: usize,
        v: &[half::f16],
        len: usize,
        width: usize,
        d: usize,
        out: &mut [f32],
    ) {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let base = v.as_ptr().cast::<u16>();
        for j in 0..len {
            let row = base.add(j * width + d);
            let mut x = [_mm512_setzero_ps(); C];
            for (c, x) in x.iter_mut().enumerate() {
                *x = _mm512_cvtph_ps(_mm256_loadu_si256(row.add(16 * c).cast()));
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*p.get_unchecked((r + i) * stride + j));
                for (acc, x) in acc.iter_mut().zip(&x) {
                    *acc = _mm512_fmadd_ps(w, *x, *acc);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            let o = out.as_mut_ptr().add((r + i) * width + d);
            for (c, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(o.add(16 * c), *acc);
            }
        }
    }
}

/// How a model pairs the dimensions it rotates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Dimension i with i + d/2 (Hugging Face's `rotate_half`; GGUF qwen2/qwen3).
    Neox,
    /// Dimension 2i with 2i + 1 (GGUF llama, whose q/k rows llama.cpp permuted).
    Interleaved,
}

/// Rotates one head vector `x` (length `2 · cos.len()`) by the angles whose cosines and sines
/// are `cos` and `sin` (one per rotated pair).
#[inline]
pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], style: RopeStyle) {
    let half = cos.len();
    debug_assert_eq!(x.len(), 2 * half);
    match style {
        RopeStyle::Neox => {
            let (a, b) = x.split_at_mut(half);
            for i in 0..half {
                let (x0, x1) = (a[i], b[i]);
                a[i] = x0 * cos[i] - x1 * sin[i];
                b[i] = x0 * sin[i] + x1 * cos[i];
            }
        }
        RopeStyle::Interleaved => {
            for i in 0..half {
                let (x0, x1) = (x[2 * i], x[2 * i + 1]);
                x[2 * i] = x0 * cos[i] - x1 * sin[i];
                x[2 * i + 1] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, D};

    fn random(len: usize, seed: u64) -> Vec<f32> {
        crate::engine::kernels::test_values(len, seed, 4.0)
    }

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp(x), x.exp());
            assert!((a - b).abs() <= 2.5e-7 * b, "exp({x}) = {a}, libm {b}");
            x += 0.0137;
        }
        assert_eq!(exp(-200.0), 0.0f32.max(exp(-200.0)));
        assert!(exp(-200.0) < 1e-37);
    }

    /// Shapes around the runs of 32 columns (16 for f16) and of 4 rows.
    const WEIGHTED_SHAPES: [(usize, usize, usize); 7] = [
        (1, 1, 64),
        (3, 37, 64),
        (4, 5, 128),
        (5, 70, 80),
        (9, 16, 8),
        (9, 16, 16),
        (2, 133, 96),
    ];

    /// `out` against candle's matmul of the weights (rows of `stride`, the first `len` used)
    /// with the value rows `v`.
    fn assert_weighted_like_candle(
        out: &[f32],
        p: &[f32],
        stride: usize,
        rows: usize,
        v: Vec<f32>,
        len: usize,
        width: usize,
    ) {
        let used: Vec<f32> = (0..rows)
            .flat_map(|r| p[r * stride..r * stride + len].to_vec())
            .collect();
        let expected: Vec<f32> = Tensor::from_vec(used, (rows, len), &Device::Cpu)
            .unwrap()
            .matmul(&Tensor::from_vec(v, (len, width), &Device::Cpu).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (i, (a, b)) in out.iter().zip(&expected).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + b.abs()) * len as f32,
                "{rows}×{len}×{width} [{i}]: {a} vs {b}"
            );
        }
    }

    #[test]
    fn weighted_rows_match_candle() {
        for (rows, len, width) in WEIGHTED_SHAPES {
            let stride = len + 3;
            let p = random(rows * stride, 3);
            let v = random(len * width, 4);
            let mut out = vec![f32::NAN; rows * width];
            weighted_rows(&p, stride, rows, &v, len, width, &mut out);
            assert_weighted_like_candle(&out, &p, stride, rows, v, len, width);
        }
    }

    /// The f16 kernel against candle on the values widened, where it runs; elsewhere it
    /// declines and leaves the output alone.
    #[test]
    fn weighted_rows_f16_match_candle() {
        for (rows, len, width) in WEIGHTED_SHAPES {
            let stride = len + 3;
            let p = random(rows * stride, 5);
            let v: Vec<half::f16> = random(len * width, 6)
                .into_iter()
                .map(half::f16::from_f32)
                .collect();
            let mut out = vec![f32::NAN; rows * width];
            let ran = weighted_rows_f16(&p, stride, rows, &v, len, width, &mut out);
            assert_eq!(ran, weighted_rows_f16_direct(width));
            if !ran {
                assert!(out.iter().all(|v| v.is_nan()));
                continue;
            }
            let wide = v.iter().map(|v| v.to_f32()).collect();
            assert_weighted_like_candle(&out, &p, stride, rows, wide, len, width);
        }
    }

    /// Tolerance: 1e-6 relative to the largest magnitude (f32 rounding of the same formulas).
    #[test]
    fn softmax_rmsnorm_and_swiglu_match_candle() {
        for len in [1, 7, 64, 100, 576] {
            let x = random(len, 1);
            let w = random(len, 2);
            let mut s = x.clone();
            softmax(&mut s);
            let expected: Vec<f32> = candle_nn::ops::softmax(&t(&x), D::Minus1)
                .unwrap()
                .to_vec1()
                .unwrap();
            for (a, b) in s.iter().zip(&expected) {
                assert!((a - b).abs() <= 1e-6, "softmax {a} vs {b}");
            }
            let mut n = vec![0f32; len];
            rms_norm(&x, &w, 1e-5, &mut n);
            let expected: Vec<f32> = candle_nn::ops::rms_norm(&t(&x), &t(&w), 1e-5)
                .unwrap()
                .to_vec1()
                .unwrap();
            for (a, b) in n.iter().zip(&expected) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "rms_norm {a} vs {b}"
                );
            }
            let mut n2 = x.clone();
            rms_norm_in_place(&mut n2, &w, 1e-5);
            for (a, b) in n2.iter().zip(&expected) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "rms_norm_in_place {a} vs {b}"
                );
            }
            let mut out = vec![0f32; len];
            swiglu(&x, &w, &mut out);
            let expected: Vec<f32> = (candle_nn::ops::silu(&t(&x)).unwrap() * t(&w))
                .unwrap()
                .to_vec1()
                .unwrap();
            for (a, b) in out.iter().zip(&expected) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "swiglu {a} vs {b}");
            }
        }
    }

    #[test]
    fn rope_styles_match_candles_rope_ops() {
        let (half, heads) = (8, 2);
        let x = random(heads * 2 * half, 3);
        let angles: Vec<f32> = (0..half).map(|i| 0.3 * (i as f32 + 1.0)).collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let xt = Tensor::from_slice(&x, (1, heads, 1, 2 * half), &Device::Cpu).unwrap();
        let ct = Tensor::from_slice(&cos, (1, half), &Device::Cpu).unwrap();
        let st = Tensor::from_slice(&sin, (1, half), &Device::Cpu).unwrap();
        for (style, reference) in [
            (
                RopeStyle::Neox,
                candle_nn::rotary_emb::rope(&xt, &ct, &st).unwrap(),
            ),
            (
                RopeStyle::Interleaved,
                candle_nn::rotary_emb::rope_i(&xt, &ct, &st).unwrap(),
            ),
        ] {
            let expected: Vec<f32> = reference.flatten_all().unwrap().to_vec1().unwrap();
            let mut got = x.clone();
            for head in got.chunks_mut(2 * half) {
                rope(head, &cos, &sin, style);
            }
            for (a, b) in got.iter().zip(&expected) {
                assert!((a - b).abs() < 1e-6, "{style:?}: {a} vs {b}");
            }
        }
    }
}
