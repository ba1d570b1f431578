//! Products with dense weights (f32, f16, bf16): `y = x · Wᵀ` where `W` is `rows × cols` in
//! row-major order (the layout of safetensors and GGUF) and `x` holds `n` activation rows.
//!
//! One tiled kernel serves decode (`n = 1`, a matrix-vector product bound by memory bandwidth)
//! and prompt processing (`n > 1`, bound by arithmetic): a tile of `T` activation rows × `R`
//! weight rows keeps `T·R` accumulators in registers and streams both operands along `cols`
//! once, so each weight element loaded serves `T` tokens. Half-precision weights are widened to
//! f32 in registers; accumulation is always f32. Rows are split across cores by `par_rows`; a
//! block of weight rows stays in L2 while every activation tile passes over it.
//!
//! Flavours: AVX-512 (16 lanes, tiles up to 4×4), AVX2 + FMA (8 lanes, tiles up to 2×4), scalar.

use half::{bf16, f16};

use super::{par_rows, Isa, SyncPtr};

/// Weight element types the dense kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseKind {
    F32,
    F16,
    Bf16,
}

/// Borrowed dense weights.
#[derive(Debug, Clone, Copy)]
pub enum DenseWeights<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

impl DenseWeights<'_> {
    fn len(&self) -> usize {
        match self {
            DenseWeights::F32(w) => w.len(),
            DenseWeights::F16(w) => w.len(),
            DenseWeights::Bf16(w) => w.len(),
        }
    }

    /// Row `r` widened to f32 into `out` (embedding lookups).
    pub fn row_into(&self, cols: usize, r: usize, out: &mut [f32]) {
        let range = r * cols..(r + 1) * cols;
        match self {
            DenseWeights::F32(w) => out.copy_from_slice(&w[range]),
            DenseWeights::F16(w) => out
                .iter_mut()
                .zip(&w[range])
                .for_each(|(o, v)| *o = v.to_f32()),
            DenseWeights::Bf16(w) => out
                .iter_mut()
                .zip(&w[range])
                .for_each(|(o, v)| *o = v.to_f32()),
        }
    }
}

/// Weight rows per L2 block: each activation tile passes over a block before the next block.
const ROW_BLOCK: usize = 64;

/// `y[t·rows + r] = Σ_c W[r, c] · x[t·cols + c]` for `t < n`, `r < rows`, with the detected flavour.
pub fn matmul(w: DenseWeights<'_>, rows: usize, cols: usize, x: &[f32], n: usize, y: &mut [f32]) {
    matmul_with(Isa::detect(), w, rows, cols, x, n, y)
}

/// [`matmul`] over `rows` weight rows that lie `ldw` elements apart (a sub-matrix: attention
/// reads the first `cols` columns of a cache whose rows are `ldw` long).
pub fn matmul_strided(
    w: DenseWeights<'_>,
    rows: usize,
    cols: usize,
    ldw: usize,
    x: &[f32],
    n: usize,
    y: &mut [f32],
) {
    matmul_impl(Isa::detect(), w, rows, cols, ldw, x, n, y)
}

/// [`matmul`] with an explicit flavour (tests and benchmarks run each one).
pub fn matmul_with(
    isa: Isa,
    w: DenseWeights<'_>,
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    y: &mut [f32],
) {
    assert_eq!(w.len(), rows * cols, "weights are {rows}×{cols}");
    matmul_impl(isa, w, rows, cols, cols, x, n, y)
}

#[allow(clippy::too_many_arguments)]
fn matmul_impl(
    isa: Isa,
    w: DenseWeights<'_>,
    rows: usize,
    cols: usize,
    ldw: usize,
    x: &[f32],
    n: usize,
    y: &mut [f32],
) {
    assert!(ldw >= cols, "row stride {ldw} < {cols} columns");
    assert!(
        rows == 0 || w.len() >= (rows - 1) * ldw + cols,
        "weights hold {} elements, not {rows} rows of stride {ldw}",
        w.len()
    );
    assert!(x.len() >= n * cols, "x holds {n} rows of {cols}");
    assert!(y.len() >= n * rows, "y holds {n} rows of {rows}");
    let isa = isa.min(Isa::best_supported());
    let out = SyncPtr(y.as_mut_ptr());
    par_rows(rows, 4, cols * n.max(1), |range| {
        let mut start = range.start;
        while start < range.end {
            let end = (start + ROW_BLOCK).min(range.end);
            // SAFETY: `w`, `x` and `y` were checked above to hold rows×cols, n×cols and
            // n×rows elements; this call writes only y[t·rows + r] for r in start..end, a range
            // no other thread is given.
            unsafe { block(isa, w, rows, cols, ldw, x, n, out, start..end) };
            start = end;
        }
    });
}

/// One block of weight rows against every activation row.
///
/// # Safety
/// Sizes as checked by `matmul_with`; `rows` in range; `y` writable at the block's indices.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    isa: Isa,
    w: DenseWeights<'_>,
    rows: usize,
    cols: usize,
    ldw: usize,
    x: &[f32],
    n: usize,
    y: SyncPtr<f32>,
    range: std::ops::Range<usize>,
) {
    match (isa, w) {
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, DenseWeights::F32(w)) => {
            avx512::block_f32(w, rows, cols, ldw, x, n, y, range)
        }
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, DenseWeights::F16(w)) => {
            avx512::block_f16(w, rows, cols, ldw, x, n, y, range)
        }
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, DenseWeights::Bf16(w)) => {
            avx512::block_bf16(w, rows, cols, ldw, x, n, y, range)
        }
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, DenseWeights::F32(w)) => avx2::block_f32(w, rows, cols, ldw, x, n, y, range),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, DenseWeights::F16(w)) => avx2::block_f16(w, rows, cols, ldw, x, n, y, range),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, DenseWeights::Bf16(w)) => avx2::block_bf16(w, rows, cols, ldw, x, n, y, range),
        (_, DenseWeights::F32(w)) => scalar_block(w, rows, cols, ldw, x, n, y, range, |v| *v),
        (_, DenseWeights::F16(w)) => {
            scalar_block(w, rows, cols, ldw, x, n, y, range, |v| v.to_f32())
        }
        (_, DenseWeights::Bf16(w)) => {
            scalar_block(w, rows, cols, ldw, x, n, y, range, |v| v.to_f32())
        }
    }
}

/// The portable flavour: eight partial sums per dot product so the compiler can vectorise.
#[allow(clippy::too_many_arguments)]
unsafe fn scalar_block<E>(
    w: &[E],
    rows: usize,
    cols: usize,
    ldw: usize,
    x: &[f32],
    n: usize,
    y: SyncPtr<f32>,
    range: std::ops::Range<usize>,
    widen: impl Fn(&E) -> f32,
) {
    for t in 0..n {
        let xt = &x[t * cols..(t + 1) * cols];
        for r in range.clone() {
            let wr = &w[r * ldw..r * ldw + cols];
            let mut acc = [0f32; 8];
            let mut chunks_w = wr.chunks_exact(8);
            let mut chunks_x = xt.chunks_exact(8);
            for (cw, cx) in (&mut chunks_w).zip(&mut chunks_x) {
                for i in 0..8 {
                    acc[i] += widen(&cw[i]) * cx[i];
                }
            }
            let mut sum: f32 = acc.iter().sum();
            for (a, b) in chunks_w.remainder().iter().zip(chunks_x.remainder()) {
                sum += widen(a) * b;
            }
            // SAFETY: the caller owns y[t·rows + r] for r in range.
            *y.0.add(t * rows + r) = sum;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! 16-lane flavour. Tails shorter than 16 use masked loads.
    use std::arch::x86_64::*;

    use super::SyncPtr;
    use half::{bf16, f16};

    /// Widens 16 weight elements at `p` (or the first `k` of them, `k < 16`) to f32.
    macro_rules! loaders {
        ($name:ident, $masked:ident, $ty:ty, $full:expr, $part:expr) => {
            #[inline(always)]
            unsafe fn $name(p: *const $ty) -> __m512 {
                $full(p)
            }
            #[inline(always)]
            unsafe fn $masked(p: *const $ty, k: usize) -> __m512 {
                $part(p, ((1u32 << k) - 1) as u16)
            }
        };
    }
    loaders!(
        load_f32,
        load_f32_part,
        f32,
        |p: *const f32| _mm512_loadu_ps(p),
        |p: *const f32, m: u16| _mm512_maskz_loadu_ps(m, p)
    );
    loaders!(
        load_f16,
        load_f16_part,
        f16,
        |p: *const f16| _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
        |p: *const f16, m: u16| _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p as *const i16))
    );
    loaders!(
        load_bf16,
        load_bf16_part,
        bf16,
        |p: *const bf16| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
            _mm256_loadu_si256(p as *const __m256i)
        ))),
        |p: *const bf16, m: u16| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p as *const i16))
        ))
    );

    /// The lane sums of 16 registers, lane `4q + i` holding the sum of register `4i + q`: a
    /// tree of 128-bit and 32-bit shuffles (15 pairs), about two shuffles per sum where one
    /// `_mm512_reduce_add_ps` takes four.
    #[inline(always)]
    unsafe fn sums16(v: [__m512; 16]) -> __m512 {
        // 16 → 8: each 256-bit half holds 8 lanes of one register.
        let u: [__m512; 8] = std::array::from_fn(|k| {
            let (x, y) = (v[2 * k], v[2 * k + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b01_00_01_00>(x, y),
                _mm512_shuffle_f32x4::<0b11_10_11_10>(x, y),
            )
        });
        // 8 → 4: each 128-bit quarter holds 4 lanes of one register.
        let w: [__m512; 4] = std::array::from_fn(|k| {
            let (x, y) = (u[2 * k], u[2 * k + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
            )
        });
        // 4 → 2 → 1 within each quarter.
        let pair = |x: __m512, y: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_ps::<0b10_00_10_00>(x, y),
                _mm512_shuffle_ps::<0b11_01_11_01>(x, y),
            )
        };
        pair(pair(w[0], w[1]), pair(w[2], w[3]))
    }

    /// A T×R tile: out[t][r] = dot(x row t, w row r) over `cols`.
    macro_rules! tile {
        ($name:ident, $ty:ty, $load:ident, $load_part:ident) => {
            #[inline(always)]
            unsafe fn $name<const T: usize, const R: usize>(
                w: *const $ty,
                ldw: usize,
                x: *const f32,
                cols: usize,
                out: &mut [[f32; R]; T],
            ) {
                let mut acc = [[_mm512_setzero_ps(); R]; T];
                let mut c = 0;
                while c + 16 <= cols {
                    let mut wv = [_mm512_setzero_ps(); R];
                    for r in 0..R {
                        wv[r] = $load(w.add(r * ldw + c));
                    }
                    for t in 0..T {
                        let xv = _mm512_loadu_ps(x.add(t * cols + c));
                        for r in 0..R {
                            acc[t][r] = _mm512_fmadd_ps(xv, wv[r], acc[t][r]);
                        }
                    }
                    c += 16;
                }
                if c < cols {
                    let k = cols - c;
                    let m = ((1u32 << k) - 1) as u16;
                    let mut wv = [_mm512_setzero_ps(); R];
                    for r in 0..R {
                        wv[r] = $load_part(w.add(r * ldw + c), k);
                    }
                    for t in 0..T {
                        let xv = _mm512_maskz_loadu_ps(m, x.add(t * cols + c));
                        for r in 0..R {
                            acc[t][r] = _mm512_fmadd_ps(xv, wv[r], acc[t][r]);
                        }
                    }
                }
                if T * R >= 8 {
                    // One transposing reduction for the whole tile (padded to 16).
                    let mut v = [_mm512_setzero_ps(); 16];
                    for t in 0..T {
                        for r in 0..R {
                            let k = t * R + r;
                            v[4 * (k % 4) + k / 4] = acc[t][r];
                        }
                    }
                    let sums: [f32; 16] = std::mem::transmute(sums16(v));
                    for t in 0..T {
                        for r in 0..R {
                            out[t][r] = sums[t * R + r];
                        }
                    }
                } else {
                    for t in 0..T {
                        for r in 0..R {
                            out[t][r] = _mm512_reduce_add_ps(acc[t][r]);
                        }
                    }
                }
            }
        };
    }
    tile!(tile_f32, f32, load_f32, load_f32_part);
    tile!(tile_f16, f16, load_f16, load_f16_part);
    tile!(tile_bf16, bf16, load_bf16, load_bf16_part);

    /// A block of weight rows against all `n` activation rows, in tiles of up to 4×4.
    macro_rules! block {
        ($name:ident, $ty:ty, $tile:ident) => {
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn $name(
                w: &[$ty],
                rows: usize,
                cols: usize,
                ldw: usize,
                x: &[f32],
                n: usize,
                y: SyncPtr<f32>,
                range: std::ops::Range<usize>,
            ) {
                let (w, x) = (w.as_ptr(), x.as_ptr());
                let mut t = 0;
                while t < n {
                    let tn = (n - t).min(4);
                    let mut r = range.start;
                    while r < range.end {
                        let rn = (range.end - r).min(4);
                        let wp = w.add(r * ldw);
                        let xp = x.add(t * cols);
                        macro_rules! run {
                            ($t:literal, $r:literal) => {{
                                let mut out = [[0f32; $r]; $t];
                                $tile::<$t, $r>(wp, ldw, xp, cols, &mut out);
                                for i in 0..$t {
                                    for j in 0..$r {
                                        *y.0.add((t + i) * rows + r + j) = out[i][j];
                                    }
                                }
                            }};
                        }
                        match (tn, rn) {
                            (4, 4) => run!(4, 4),
                            (4, 3) => run!(4, 3),
                            (4, 2) => run!(4, 2),
                            (4, _) => run!(4, 1),
                            (3, 4) => run!(3, 4),
                            (3, 3) => run!(3, 3),
                            (3, 2) => run!(3, 2),
                            (3, _) => run!(3, 1),
                            (2, 4) => run!(2, 4),
                            (2, 3) => run!(2, 3),
                            (2, 2) => run!(2, 2),
                            (2, _) => run!(2, 1),
                            (_, 4) => run!(1, 4),
                            (_, 3) => run!(1, 3),
                            (_, 2) => run!(1, 2),
                            (_, _) => run!(1, 1),
                        }
                        r += rn;
                    }
                    t += tn;
                }
            }
        };
    }
    block!(block_f32, f32, tile_f32);
    block!(block_f16, f16, tile_f16);
    block!(block_bf16, bf16, tile_bf16);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! 8-lane flavour. Tails shorter than 8 are summed in scalar code.
    use std::arch::x86_64::*;

    use super::SyncPtr;
    use half::{bf16, f16};

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[inline(always)]
    unsafe fn load_f32(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const bf16) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
            _mm_loadu_si128(p as *const __m128i),
        )))
    }

    macro_rules! tile {
        ($name:ident, $ty:ty, $load:ident) => {
            #[inline(always)]
            unsafe fn $name<const T: usize, const R: usize>(
                w: *const $ty,
                ldw: usize,
                x: *const f32,
                cols: usize,
                out: &mut [[f32; R]; T],
            ) {
                let mut acc = [[_mm256_setzero_ps(); R]; T];
                let mut c = 0;
                while c + 8 <= cols {
                    let mut wv = [_mm256_setzero_ps(); R];
                    for r in 0..R {
                        wv[r] = $load(w.add(r * ldw + c));
                    }
                    for t in 0..T {
                        let xv = _mm256_loadu_ps(x.add(t * cols + c));
                        for r in 0..R {
                            acc[t][r] = _mm256_fmadd_ps(xv, wv[r], acc[t][r]);
                        }
                    }
                    c += 8;
                }
                for t in 0..T {
                    for r in 0..R {
                        let mut s = hsum(acc[t][r]);
                        for k in c..cols {
                            s += (*w.add(r * ldw + k)).to_f32_lossless() * *x.add(t * cols + k);
                        }
                        out[t][r] = s;
                    }
                }
            }
        };
    }

    /// Widening of one weight element, for the scalar tails.
    trait Widen {
        fn to_f32_lossless(self) -> f32;
    }
    impl Widen for f32 {
        fn to_f32_lossless(self) -> f32 {
            self
        }
    }
    impl Widen for f16 {
        fn to_f32_lossless(self) -> f32 {
            self.to_f32()
        }
    }
    impl Widen for bf16 {
        fn to_f32_lossless(self) -> f32 {
            self.to_f32()
        }
    }

    tile!(tile_f32, f32, load_f32);
    tile!(tile_f16, f16, load_f16);
    tile!(tile_bf16, bf16, load_bf16);

    macro_rules! block {
        ($name:ident, $ty:ty, $tile:ident) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn $name(
                w: &[$ty],
                rows: usize,
                cols: usize,
                ldw: usize,
                x: &[f32],
                n: usize,
                y: SyncPtr<f32>,
                range: std::ops::Range<usize>,
            ) {
                let (w, x) = (w.as_ptr(), x.as_ptr());
                let mut t = 0;
                while t < n {
                    let tn = (n - t).min(2);
                    let mut r = range.start;
                    while r < range.end {
                        let rn = (range.end - r).min(4);
                        let wp = w.add(r * ldw);
                        let xp = x.add(t * cols);
                        macro_rules! run {
                            ($t:literal, $r:literal) => {{
                                let mut out = [[0f32; $r]; $t];
                                $tile::<$t, $r>(wp, ldw, xp, cols, &mut out);
                                for i in 0..$t {
                                    for j in 0..$r {
                                        *y.0.add((t + i) * rows + r + j) = out[i][j];
                                    }
                                }
                            }};
                        }
                        match (tn, rn) {
                            (2, 4) => run!(2, 4),
                            (2, 3) => run!(2, 3),
                            (2, 2) => run!(2, 2),
                            (2, _) => run!(2, 1),
                            (_, 4) => run!(1, 4),
                            (_, 3) => run!(1, 3),
                            (_, 2) => run!(1, 2),
                            (_, _) => run!(1, 1),
                        }
                        r += rn;
                    }
                    t += tn;
                }
            }
        };
    }
    block!(block_f32, f32, tile_f32);
    block!(block_f16, f16, tile_f16);
    block!(block_bf16, bf16, tile_bf16);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(len: usize, seed: u64) -> Vec<f32> {
        crate::engine::kernels::test_values(len, seed, 1.0)
    }

    use crate::engine::kernels::candle_product as reference;

    /// Every flavour and weight type against candle's f32 matmul of the same values: relative
    /// error ≤ 1e-5 of the sum of |products| (only the summation order differs).
    #[test]
    fn every_flavour_matches_candles_matmul() {
        for &(rows, cols, n) in &[
            (1, 1, 1),
            (7, 5, 1),
            (13, 33, 3),
            (40, 576, 1),
            (37, 100, 9),
            (64, 64, 4),
            // Attention's shapes: scores against 40 keys, values of 64 dimensions.
            (40, 64, 3),
            (64, 40, 3),
            (45, 64, 2),
            (64, 45, 6),
        ] {
            let w32 = random(rows * cols, 1);
            let x = random(n * cols, 2);
            let w16: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
            let wb16: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
            let widened16: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
            let widenedb16: Vec<f32> = wb16.iter().map(|v| v.to_f32()).collect();
            let cases = [
                (DenseWeights::F32(&w32), reference(&w32, rows, cols, &x, n)),
                (
                    DenseWeights::F16(&w16),
                    reference(&widened16, rows, cols, &x, n),
                ),
                (
                    DenseWeights::Bf16(&wb16),
                    reference(&widenedb16, rows, cols, &x, n),
                ),
            ];
            for isa in Isa::all_supported() {
                for (w, expected) in &cases {
                    let mut y = vec![f32::NAN; n * rows];
                    matmul_with(isa, *w, rows, cols, &x, n, &mut y);
                    let bound = 1e-5 * cols as f32;
                    for (i, (a, b)) in y.iter().zip(expected).enumerate() {
                        assert!(
                            (a - b).abs() <= bound,
                            "{isa:?} {w:?} {rows}x{cols} n={n} [{i}]: {a} vs {b}",
                            w = std::mem::discriminant(w)
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn large_products_split_across_threads_agree_with_the_reference() {
        let (rows, cols, n) = (1536, 576, 5);
        let w = random(rows * cols, 3);
        let x = random(n * cols, 4);
        let expected = reference(&w, rows, cols, &x, n);
        let mut y = vec![0f32; n * rows];
        matmul(DenseWeights::F32(&w), rows, cols, &x, n, &mut y);
        for (a, b) in y.iter().zip(&expected) {
            assert!((a - b).abs() <= 1e-5 * cols as f32, "{a} vs {b}");
        }
    }
}
