//! Dense weights repacked at load time into panels of [`PANEL`] rows stored column by column
//! (`[panel][col][16]`), the layout of a classic GEMM micro-kernel: for each column the kernel
//! loads 16 weights of consecutive rows as one vector and broadcasts one activation per token,
//! so a tile of `T` tokens × 32 rows accumulates in `2·T` registers with no horizontal sums,
//! and each weight vector loaded serves `T` tokens. Prompt processing (many tokens) runs near
//! the FMA units' peak; decode (one token) streams each panel once, sequentially.
//!
//! Rows past the last full panel are zero padding (never written to the output).

use half::{bf16, f16};

use super::{par_rows, Isa, SyncPtr};

/// Rows per panel: one AVX-512 vector of f32.
pub const PANEL: usize = 16;

/// Packed weights of one element type.
#[derive(Debug, Clone)]
pub struct Packed<E> {
    data: Vec<E>,
    rows: usize,
    cols: usize,
}

impl<E: Copy + Default> Packed<E> {
    /// Packs a row-major `rows × cols` matrix.
    pub fn pack(w: &[E], rows: usize, cols: usize) -> Self {
        assert_eq!(w.len(), rows * cols, "weights are {rows}×{cols}");
        let panels = rows.div_ceil(PANEL);
        let mut data = vec![E::default(); panels * cols * PANEL];
        for r in 0..rows {
            let (p, lane) = (r / PANEL, r % PANEL);
            let base = p * cols * PANEL;
            for (c, &v) in w[r * cols..(r + 1) * cols].iter().enumerate() {
                data[base + c * PANEL + lane] = v;
            }
        }
        Packed { data, rows, cols }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<E>()
    }
}

/// Borrowed packed weights.
#[derive(Debug, Clone, Copy)]
pub enum PackedWeights<'a> {
    F32(&'a Packed<f32>),
    F16(&'a Packed<f16>),
    Bf16(&'a Packed<bf16>),
}

impl PackedWeights<'_> {
    fn dims(&self) -> (usize, usize) {
        match self {
            PackedWeights::F32(p) => (p.rows, p.cols),
            PackedWeights::F16(p) => (p.rows, p.cols),
            PackedWeights::Bf16(p) => (p.rows, p.cols),
        }
    }
}

/// Panels per L2 block: each token tile passes over a block before the next one.
const PANEL_BLOCK: usize = 8;

/// `y[t·rows + r] = Σ_c W[r, c] · x[t·cols + c]` for `t < n`, `r < rows`.
pub fn matmul(w: PackedWeights<'_>, x: &[f32], n: usize, y: &mut [f32]) {
    matmul_with(Isa::detect(), w, x, n, y)
}

/// [`matmul`] with an explicit flavour (tests and benchmarks run each one).
pub fn matmul_with(isa: Isa, w: PackedWeights<'_>, x: &[f32], n: usize, y: &mut [f32]) {
    let (rows, cols) = w.dims();
    assert!(x.len() >= n * cols, "x holds {n} rows of {cols}");
    assert!(y.len() >= n * rows, "y holds {n} rows of {rows}");
    let isa = isa.min(Isa::best_supported());
    let panels = rows.div_ceil(PANEL);
    let out = SyncPtr(y.as_mut_ptr());
    // Work is split by pairs of panels (the micro-kernel's width).
    par_rows(panels, 2, PANEL * cols * n.max(1), |range| {
        let mut p = range.start;
        while p < range.end {
            let end = (p + PANEL_BLOCK).min(range.end);
            // SAFETY: sizes checked above; this writes only y[t·rows + r] for rows r of panels
            // p..end, which no other thread is given.
            unsafe { panels_block(isa, w, x, n, out, p..end) };
            p = end;
        }
    });
}

/// # Safety
/// As checked by `matmul_with`.
unsafe fn panels_block(
    isa: Isa,
    w: PackedWeights<'_>,
    x: &[f32],
    n: usize,
    y: SyncPtr<f32>,
    panels: std::ops::Range<usize>,
) {
    match (isa, w) {
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, PackedWeights::F32(w)) => avx512::block_f32(w, x, n, y, panels),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, PackedWeights::F16(w)) => avx512::block_f16(w, x, n, y, panels),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, PackedWeights::Bf16(w)) => avx512::block_bf16(w, x, n, y, panels),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, PackedWeights::F32(w)) => avx2::block_f32(w, x, n, y, panels),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, PackedWeights::F16(w)) => avx2::block_f16(w, x, n, y, panels),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, PackedWeights::Bf16(w)) => avx2::block_bf16(w, x, n, y, panels),
        (_, PackedWeights::F32(w)) => scalar_block(w, x, n, y, panels, |v| *v),
        (_, PackedWeights::F16(w)) => scalar_block(w, x, n, y, panels, |v| v.to_f32()),
        (_, PackedWeights::Bf16(w)) => scalar_block(w, x, n, y, panels, |v| v.to_f32()),
    }
}

unsafe fn scalar_block<E>(
    w: &Packed<E>,
    x: &[f32],
    n: usize,
    y: SyncPtr<f32>,
    panels: std::ops::Range<usize>,
    widen: impl Fn(&E) -> f32,
) {
    let (rows, cols) = (w.rows, w.cols);
    for p in panels {
        let panel = &w.data[p * cols * PANEL..(p + 1) * cols * PANEL];
        for t in 0..n {
            let xt = &x[t * cols..(t + 1) * cols];
            let mut acc = [0f32; PANEL];
            for (c, &xv) in xt.iter().enumerate() {
                for (a, wv) in acc.iter_mut().zip(&panel[c * PANEL..(c + 1) * PANEL]) {
                    *a += widen(wv) * xv;
                }
            }
            for (lane, a) in acc.iter().enumerate() {
                let r = p * PANEL + lane;
                if r < rows {
                    // SAFETY: the caller owns the rows of these panels.
                    *y.0.add(t * rows + r) = *a;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Packed, SyncPtr, PANEL};
    use half::{bf16, f16};

    #[inline(always)]
    unsafe fn load_f32(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const f16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const bf16) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
            _mm256_loadu_si256(p as *const __m256i),
        )))
    }

    /// Stores one 16-row result vector, the lanes past `rows` left out.
    #[inline(always)]
    unsafe fn store(y: SyncPtr<f32>, rows: usize, t: usize, r0: usize, v: __m512) {
        let live = rows.saturating_sub(r0).min(PANEL);
        let dst = y.0.add(t * rows + r0);
        if live == PANEL {
            _mm512_storeu_ps(dst, v);
        } else {
            _mm512_mask_storeu_ps(dst, ((1u32 << live) - 1) as u16, v);
        }
    }

    macro_rules! kernels {
        ($tile:ident, $block:ident, $ty:ty, $load:ident) => {
            /// T tokens × P panels: acc[t][p] += x[t][c] · W[panel p][c][..].
            #[inline(always)]
            unsafe fn $tile<const T: usize, const P: usize>(
                w: &Packed<$ty>,
                p0: usize,
                x: *const f32,
                t0: usize,
                y: SyncPtr<f32>,
            ) {
                let (rows, cols) = (w.rows, w.cols);
                // One pointer per panel and per token row, advanced together: the loop body is
                // loads, broadcasts and FMAs with no index arithmetic.
                let mut wp = [w.data.as_ptr(); P];
                for p in 0..P {
                    wp[p] = w.data.as_ptr().add((p0 + p) * cols * PANEL);
                }
                let mut xp = [x; T];
                for t in 0..T {
                    xp[t] = x.add((t0 + t) * cols);
                }
                let mut acc = [[_mm512_setzero_ps(); P]; T];
                for _ in 0..cols {
                    let mut wv = [_mm512_setzero_ps(); P];
                    for p in 0..P {
                        wv[p] = $load(wp[p]);
                        wp[p] = wp[p].add(PANEL);
                    }
                    for t in 0..T {
                        let xv = _mm512_set1_ps(*xp[t]);
                        xp[t] = xp[t].add(1);
                        for p in 0..P {
                            acc[t][p] = _mm512_fmadd_ps(xv, wv[p], acc[t][p]);
                        }
                    }
                }
                for t in 0..T {
                    for p in 0..P {
                        store(y, rows, t0 + t, (p0 + p) * PANEL, acc[t][p]);
                    }
                }
            }

            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
            pub(super) unsafe fn $block(
                w: &Packed<$ty>,
                x: &[f32],
                n: usize,
                y: SyncPtr<f32>,
                panels: std::ops::Range<usize>,
            ) {
                let x = x.as_ptr();
                if n == 1 {
                    // Decode: four panels at a time for independent FMA chains.
                    let mut p = panels.start;
                    while p + 4 <= panels.end {
                        $tile::<1, 4>(w, p, x, 0, y);
                        p += 4;
                    }
                    while p < panels.end {
                        $tile::<1, 1>(w, p, x, 0, y);
                        p += 1;
                    }
                    return;
                }
                let mut t = 0;
                while t < n {
                    let tn = (n - t).min(8);
                    let mut p = panels.start;
                    while p < panels.end {
                        let pn = (panels.end - p).min(2);
                        macro_rules! run {
                            ($t:literal) => {
                                if pn == 2 {
                                    $tile::<$t, 2>(w, p, x, t, y)
                                } else {
                                    $tile::<$t, 1>(w, p, x, t, y)
                                }
                            };
                        }
                        match tn {
                            8 => run!(8),
                            7 => run!(7),
                            6 => run!(6),
                            5 => run!(5),
                            4 => run!(4),
                            3 => run!(3),
                            2 => run!(2),
                            _ => run!(1),
                        }
                        p += pn;
                    }
                    t += tn;
                }
            }
        };
    }
    kernels!(tile_f32, block_f32, f32, load_f32);
    kernels!(tile_f16, block_f16, f16, load_f16);
    kernels!(tile_bf16, block_bf16, bf16, load_bf16);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! A 16-row panel as two 8-lane halves.
    use std::arch::x86_64::*;

    use super::{Packed, SyncPtr, PANEL};
    use half::{bf16, f16};

    #[inline(always)]
    unsafe fn load_f32(p: *const f32) -> [__m256; 2] {
        [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))]
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const f16) -> [__m256; 2] {
        let v = _mm256_loadu_si256(p as *const __m256i);
        [
            _mm256_cvtph_ps(_mm256_castsi256_si128(v)),
            _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(v)),
        ]
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const bf16) -> [__m256; 2] {
        let widen =
            |h: __m128i| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)));
        let v = _mm256_loadu_si256(p as *const __m256i);
        [
            widen(_mm256_castsi256_si128(v)),
            widen(_mm256_extracti128_si256::<1>(v)),
        ]
    }

    macro_rules! kernels {
        ($tile:ident, $block:ident, $ty:ty, $load:ident) => {
            #[inline(always)]
            unsafe fn $tile<const T: usize>(
                w: &Packed<$ty>,
                p0: usize,
                x: *const f32,
                t0: usize,
                y: SyncPtr<f32>,
            ) {
                let (rows, cols) = (w.rows, w.cols);
                let base = w.data.as_ptr().add(p0 * cols * PANEL);
                let mut acc = [[_mm256_setzero_ps(); 2]; T];
                for c in 0..cols {
                    let wv = $load(base.add(c * PANEL));
                    for t in 0..T {
                        let xv = _mm256_set1_ps(*x.add((t0 + t) * cols + c));
                        acc[t][0] = _mm256_fmadd_ps(xv, wv[0], acc[t][0]);
                        acc[t][1] = _mm256_fmadd_ps(xv, wv[1], acc[t][1]);
                    }
                }
                for t in 0..T {
                    let mut lanes = [0f32; PANEL];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), acc[t][0]);
                    _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[t][1]);
                    for (lane, v) in lanes.iter().enumerate() {
                        let r = p0 * PANEL + lane;
                        if r < rows {
                            *y.0.add((t0 + t) * rows + r) = *v;
                        }
                    }
                }
            }

            #[target_feature(enable = "avx2,fma,f16c")]
            pub(super) unsafe fn $block(
                w: &Packed<$ty>,
                x: &[f32],
                n: usize,
                y: SyncPtr<f32>,
                panels: std::ops::Range<usize>,
            ) {
                let x = x.as_ptr();
                for p in panels {
                    let mut t = 0;
                    while t < n {
                        let tn = (n - t).min(6);
                        match tn {
                            6 => $tile::<6>(w, p, x, t, y),
                            5 => $tile::<5>(w, p, x, t, y),
                            4 => $tile::<4>(w, p, x, t, y),
                            3 => $tile::<3>(w, p, x, t, y),
                            2 => $tile::<2>(w, p, x, t, y),
                            _ => $tile::<1>(w, p, x, t, y),
                        }
                        t += tn;
                    }
                }
            }
        };
    }
    kernels!(tile_f32, block_f32, f32, load_f32);
    kernels!(tile_f16, block_f16, f16, load_f16);
    kernels!(tile_bf16, block_bf16, bf16, load_bf16);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(len: usize, seed: u64) -> Vec<f32> {
        crate::engine::kernels::test_values(len, seed, 1.0)
    }

    use crate::engine::kernels::candle_product as reference;

    /// Every flavour and type against candle's f32 matmul of the same (widened) values:
    /// |error| ≤ 1e-5 · cols (summation order only).
    #[test]
    fn packed_products_match_candles_matmul_for_every_flavour() {
        for &(rows, cols, n) in &[
            (1, 1, 1),
            (16, 8, 1),
            (17, 5, 2),
            (40, 64, 1),
            (33, 100, 9),
            (64, 576, 3),
            (100, 37, 17),
        ] {
            let w32 = random(rows * cols, 7);
            let x = random(n * cols, 8);
            let w16: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
            let wb: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
            let p32 = Packed::pack(&w32, rows, cols);
            let p16 = Packed::pack(&w16, rows, cols);
            let pb = Packed::pack(&wb, rows, cols);
            let r32 = reference(&w32, rows, cols, &x, n);
            let r16 = reference(
                &w16.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
                rows,
                cols,
                &x,
                n,
            );
            let rb = reference(
                &wb.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
                rows,
                cols,
                &x,
                n,
            );
            for isa in Isa::all_supported() {
                for (name, w, expected) in [
                    ("f32", PackedWeights::F32(&p32), &r32),
                    ("f16", PackedWeights::F16(&p16), &r16),
                    ("bf16", PackedWeights::Bf16(&pb), &rb),
                ] {
                    // A guard element after the output must stay untouched.
                    let mut y = vec![f32::NAN; n * rows + 1];
                    y[n * rows] = 42.0;
                    matmul_with(isa, w, &x, n, &mut y);
                    assert_eq!(y[n * rows], 42.0, "{isa:?} {name} wrote past the output");
                    for (i, (a, b)) in y.iter().zip(expected.iter()).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-5 * cols as f32,
                            "{isa:?} {name} {rows}x{cols} n={n} [{i}]: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn large_products_split_across_threads_agree_with_the_reference() {
        let (rows, cols, n) = (1536, 576, 20);
        let w = random(rows * cols, 9);
        let x = random(n * cols, 10);
        let expected = reference(&w, rows, cols, &x, n);
        let mut y = vec![0f32; n * rows];
        matmul(
            PackedWeights::F32(&Packed::pack(&w, rows, cols)),
            &x,
            n,
            &mut y,
        );
        for (a, b) in y.iter().zip(&expected) {
            assert!((a - b).abs() <= 1e-5 * cols as f32, "{a} vs {b}");
        }
    }
}
