//! The tiling the x86 kernels share: which weight rows meet which activation rows in what
//! order, and the horizontal sums at the end.
//!
//! Rows go in blocks of [`ROW_BLOCK`] (a block's weights stay in L2 while every tile of up to
//! 8 activation rows passes over it). A kernel computes an `R × T` tile: one
//! accumulator register per output, whose lanes add up to it. Decoding (`T = 1`) takes four
//! rows at a time for independent chains; wider tiles share one unpacked weight row among
//! tokens. The accumulators are summed four at a time with a transposing `vhaddps` tree.

use std::{arch::x86_64::*, ops::Range};

use super::{Job, QuantScratch, SyncPtr};

/// Weight rows per block.
const ROW_BLOCK: usize = 64;

/// An accumulator register: 8 or 16 f32 lanes.
pub(super) trait Lanes: Copy {
    /// The sum of the lanes.
    ///
    /// # Safety
    /// AVX (AVX-512 F for 16 lanes) is available.
    unsafe fn sum(self) -> f32;
    /// The lanes folded to 8 (pairwise sums of the halves of 16). Safety as [`Lanes::sum`].
    unsafe fn half(self) -> __m256;
}

impl Lanes for __m256 {
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        let v = _mm_add_ps(
            _mm256_castps256_ps128(self),
            _mm256_extractf128_ps::<1>(self),
        );
        let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)))
    }
    #[inline(always)]
    unsafe fn half(self) -> __m256 {
        self
    }
}

impl Lanes for __m512 {
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        _mm512_reduce_add_ps(self)
    }
    #[inline(always)]
    unsafe fn half(self) -> __m256 {
        _mm256_add_ps(
            _mm512_castps512_ps256(self),
            _mm512_extractf32x8_ps::<1>(self),
        )
    }
}

/// One x86 kernel, as the tiling drives it.
pub(super) trait Kernel {
    /// Whether tiles of 8 activation rows pay (else 4): more work per unpacked weight against
    /// more registers (AVX2 has 16) and a longer tile setup.
    const WIDE: bool;
    /// The accumulator of one output.
    type Acc: Lanes;
    /// Pointers to one quantized activation row.
    type Act: Copy;

    /// Activation row `t` of `scratch`, checked against the sizes of `job` (panics when the
    /// scratch does not hold what this kernel reads).
    fn act(job: &Job<'_>, scratch: &QuantScratch, t: usize) -> Self::Act;

    /// `R` weight rows (the first at `w`, `row_bytes` apart, `cols` weights each) against `T`
    /// activation rows.
    ///
    /// # Safety
    /// The rows are in `job.w`, the activations from [`Kernel::act`] of the same job, and the
    /// CPU has the features the caller's `#[target_feature]` names (VNNI when `VNNI`).
    unsafe fn tile<const VNNI: bool, const R: usize, const T: usize>(
        w: *const u8,
        row_bytes: usize,
        cols: usize,
        a: &[Self::Act; T],
    ) -> [[Self::Acc; T]; R];
}

/// Rows `range` of the product with kernel `K`.
///
/// # Safety
/// As [`super::Flavour::run`]; the caller is a `#[target_feature]` function with the features
/// `K` needs (and VNNI when `VNNI`), which the CPU has.
#[inline(always)]
pub(super) unsafe fn rows<K: Kernel, const VNNI: bool>(
    job: &Job<'_>,
    scratch: &QuantScratch,
    y: SyncPtr<f32>,
    range: Range<usize>,
) {
    let row_bytes = job.kind.row_bytes(job.cols);
    assert!(range.end <= job.rows && range.end * row_bytes <= job.w.len());
    let mut start = range.start;
    while start < range.end {
        let block = start..(start + ROW_BLOCK).min(range.end);
        let mut t0 = 0;
        while t0 < job.n {
            let b = block.clone();
            t0 += match job.n - t0 {
                8.. if K::WIDE => {
                    block_rows::<K, VNNI, 1, 8>(job, scratch, y, b, t0);
                    8
                }
                4.. => {
                    block_rows::<K, VNNI, 1, 4>(job, scratch, y, b, t0);
                    4
                }
                2 | 3 => {
                    block_rows::<K, VNNI, 2, 2>(job, scratch, y, b, t0);
                    2
                }
                _ => {
                    block_rows::<K, VNNI, 4, 1>(job, scratch, y, b, t0);
                    1
                }
            };
        }
        start = block.end;
    }
}

/// Rows `rows` against activation rows `t0..t0 + T`, `R` rows at a time.
#[inline(always)]
unsafe fn block_rows<K: Kernel, const VNNI: bool, const R: usize, const T: usize>(
    job: &Job<'_>,
    scratch: &QuantScratch,
    y: SyncPtr<f32>,
    rows: Range<usize>,
    t0: usize,
) {
    let a: [K::Act; T] = std::array::from_fn(|i| K::act(job, scratch, t0 + i));
    let row_bytes = job.kind.row_bytes(job.cols);
    let w = |r: usize| job.w.as_ptr().add(r * row_bytes);
    let mut r = rows.start;
    while r + R <= rows.end {
        let acc = K::tile::<VNNI, R, T>(w(r), row_bytes, job.cols, &a);
        store(acc, y, job.rows, t0, r);
        r += R;
    }
    while r < rows.end {
        let acc = K::tile::<VNNI, 1, T>(w(r), row_bytes, job.cols, &a);
        store(acc, y, job.rows, t0, r);
        r += 1;
    }
}

/// Writes the sums of a tile's accumulators to `y[(t0 + t)·rows + r0 + r]`.
#[inline(always)]
unsafe fn store<A: Lanes, const R: usize, const T: usize>(
    acc: [[A; T]; R],
    y: SyncPtr<f32>,
    rows: usize,
    t0: usize,
    r0: usize,
) {
    let at = |i: usize| y.0.add((t0 + i % T) * rows + r0 + i / T);
    let get = |i: usize| acc[i / T][i % T];
    let mut i = 0;
    while i + 4 <= R * T {
        let v: [f32; 4] = std::mem::transmute(sum4([get(i), get(i + 1), get(i + 2), get(i + 3)]));
        for (j, v) in v.into_iter().enumerate() {
            *at(i + j) = v;
        }
        i += 4;
    }
    while i < R * T {
        *at(i) = get(i).sum();
        i += 1;
    }
}

/// The lane sums of four registers.
#[inline(always)]
unsafe fn sum4<A: Lanes>(a: [A; 4]) -> __m128 {
    let h01 = _mm256_hadd_ps(a[0].half(), a[1].half());
    let h23 = _mm256_hadd_ps(a[2].half(), a[3].half());
    let h = _mm256_hadd_ps(h01, h23);
    _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h))
}
