//! AVX2 flavour of the 32-block kinds, two blocks (64 weights) at a time.
//!
//! As `avx512` at half the width: a pair of weight blocks becomes two registers of 32 bytes
//! (the first 16 values of each block, then the last 16 of each), the activations are grouped
//! by pairs the same way, and two `vpdpbusd` (AVX-VNNI; else `vpmaddubsw` + `vpmaddwd`) give
//! 8 i32 lanes, four per block, scaled lane-wise by `d_w · d_a` into one f32 accumulator per
//! output. Mins and offsets are the `m · s` terms described in `avx512`. Q8_0 moves the sign of
//! each weight onto the activation (`vpsignb`), so both fit the unsigned × signed product.

use std::{arch::x86_64::*, ops::Range};

use super::{
    tile::{self, Kernel},
    Job, QuantKind, QuantScratch, SyncPtr,
};

/// How to load one 32-block kind.
trait Pair {
    const BYTES: usize;
    /// Values are i8 (Q8_0), not u8.
    const SIGNED: bool = false;
    /// The offset subtracted from the stored values (0 where the block has a min).
    const OFFSET: f32;

    /// The `C` (1 or 2) blocks at `p`, a missing one as zeros: the first 16 values of each
    /// block in 16-byte lanes, the last 16 of each, and `[d0, m0, d1, m1]` with `m = d` for
    /// kinds without a min.
    ///
    /// # Safety
    /// `p` is readable for `C · BYTES` bytes; AVX2 and F16C are available.
    unsafe fn load<const C: usize>(p: *const u8) -> (__m256i, __m256i, __m128);
}

struct Q4_0;
struct Q4_1;
struct Q5_0;
struct Q5_1;
struct Q8_0;

#[inline(always)]
unsafe fn u16_at(p: *const u8) -> u64 {
    p.cast::<u16>().read_unaligned() as u64
}

#[inline(always)]
unsafe fn u32_at(p: *const u8) -> u64 {
    p.cast::<u32>().read_unaligned() as u64
}

/// `[d0, m0, d1, m1]` of `C` blocks of `bytes` at `p` as f32; `m = d` unless `with_min` (then
/// the f16 `m` follows `d`).
#[inline(always)]
unsafe fn d_and_m<const C: usize>(p: *const u8, bytes: usize, with_min: bool) -> __m128 {
    let pair = |at: *const u8| {
        if with_min {
            u32_at(at)
        } else {
            u16_at(at) * 0x1_0001
        }
    };
    let second = if C > 1 { pair(p.add(bytes)) } else { 0 };
    _mm_cvtph_ps(_mm_cvtsi64_si128((pair(p) | second << 32) as i64))
}

/// Two 16-byte parts at `p + at` and `p + bytes + at` (zeros for a missing second block).
#[inline(always)]
unsafe fn two<const C: usize>(p: *const u8, bytes: usize, at: usize) -> __m256i {
    let first = _mm_loadu_si128(p.add(at).cast());
    let second = if C > 1 {
        _mm_loadu_si128(p.add(bytes + at).cast())
    } else {
        _mm_setzero_si128()
    };
    _mm256_set_m128i(second, first)
}

/// The 16 packed bytes of each block as (low nibbles, high nibbles).
#[inline(always)]
unsafe fn nibbles<const C: usize>(p: *const u8, bytes: usize, at: usize) -> (__m256i, __m256i) {
    let v = two::<C>(p, bytes, at);
    let mask = _mm256_set1_epi8(0x0F);
    (
        _mm256_and_si256(v, mask),
        _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask),
    )
}

/// 16 in the bytes whose bit is set in `bits` (byte i: bit i), else 0.
#[inline(always)]
unsafe fn sixteen_where(bits: u32) -> __m256i {
    let v = _mm256_set1_epi32(bits as i32);
    // Byte i takes byte i / 8 of the word, then keeps bit i % 8.
    let bytes = _mm256_shuffle_epi8(
        v,
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(16))
}

/// Adds 16 to the values whose bit is set in each block's 32-bit `qh` at `p + at`.
#[inline(always)]
unsafe fn fifth_bits<const C: usize>(
    (lo, hi): (__m256i, __m256i),
    p: *const u8,
    bytes: usize,
    at: usize,
) -> (__m256i, __m256i) {
    let h0 = u32_at(p.add(at)) as u32;
    let h1 = if C > 1 {
        u32_at(p.add(bytes + at)) as u32
    } else {
        0
    };
    let low = (h0 & 0xFFFF) | h1 << 16;
    let high = h0 >> 16 | (h1 >> 16) << 16;
    (
        _mm256_or_si256(lo, sixteen_where(low)),
        _mm256_or_si256(hi, sixteen_where(high)),
    )
}

impl Pair for Q4_0 {
    const BYTES: usize = 18;
    const OFFSET: f32 = 8.0;
    #[inline(always)]
    unsafe fn load<const C: usize>(p: *const u8) -> (__m256i, __m256i, __m128) {
        let (lo, hi) = nibbles::<C>(p, 18, 2);
        (lo, hi, d_and_m::<C>(p, 18, false))
    }
}

impl Pair for Q4_1 {
    const BYTES: usize = 20;
    const OFFSET: f32 = 0.0;
    #[inline(always)]
    unsafe fn load<const C: usize>(p: *const u8) -> (__m256i, __m256i, __m128) {
        let (lo, hi) = nibbles::<C>(p, 20, 4);
        (lo, hi, d_and_m::<C>(p, 20, true))
    }
}

impl Pair for Q5_0 {
    const BYTES: usize = 22;
    const OFFSET: f32 = 16.0;
    #[inline(always)]
    unsafe fn load<const C: usize>(p: *const u8) -> (__m256i, __m256i, __m128) {
        let (lo, hi) = fifth_bits::<C>(nibbles::<C>(p, 22, 6), p, 22, 2);
        (lo, hi, d_and_m::<C>(p, 22, false))
    }
}

impl Pair for Q5_1 {
    const BYTES: usize = 24;
    const OFFSET: f32 = 0.0;
    #[inline(always)]
    unsafe fn load<const C: usize>(p: *const u8) -> (__m256i, __m256i, __m128) {
        let (lo, hi) = fifth_bits::<C>(nibbles::<C>(p, 24, 8), p, 24, 4);
        (lo, hi, d_and_m::<C>(p, 24, true))
    }
}

impl Pair for Q8_0 {
    const BYTES: usize = 34;
    const SIGNED: bool = true;
    const OFFSET: f32 = 0.0;
    #[inline(always)]
    unsafe fn load<const C: usize>(p: *const u8) -> (__m256i, __m256i, __m128) {
        (
            two::<C>(p, 34, 2),
            two::<C>(p, 34, 18),
            d_and_m::<C>(p, 34, false),
        )
    }
}

/// Rows `range` of the product.
///
/// # Safety
/// As [`super::Flavour::run`], with AVX2, FMA and F16C (and AVX-VNNI when `vnni`) available.
pub(super) unsafe fn rows(
    vnni: bool,
    job: &Job<'_>,
    scratch: &QuantScratch,
    y: SyncPtr<f32>,
    range: Range<usize>,
) {
    macro_rules! go {
        ($k:ty) => {
            if vnni {
                rows_vnni::<Blocks<$k>>(job, scratch, y, range)
            } else {
                rows_plain::<Blocks<$k>>(job, scratch, y, range)
            }
        };
    }
    match job.kind {
        QuantKind::Q4_0 => go!(Q4_0),
        QuantKind::Q4_1 => go!(Q4_1),
        QuantKind::Q5_0 => go!(Q5_0),
        QuantKind::Q5_1 => go!(Q5_1),
        QuantKind::Q8_0 => go!(Q8_0),
        _ => unreachable!("not a 32-block kind"),
    }
}

/// [`tile::rows`] with AVX-VNNI.
///
/// # Safety
/// As [`tile::rows`]; the CPU has AVX2, FMA, F16C and AVX-VNNI.
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
pub(super) unsafe fn rows_vnni<K: Kernel>(
    job: &Job<'_>,
    scratch: &QuantScratch,
    y: SyncPtr<f32>,
    range: Range<usize>,
) {
    tile::rows::<K, true>(job, scratch, y, range)
}

/// [`tile::rows`] without VNNI.
///
/// # Safety
/// As [`tile::rows`]; the CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn rows_plain<K: Kernel>(
    job: &Job<'_>,
    scratch: &QuantScratch,
    y: SyncPtr<f32>,
    range: Range<usize>,
) {
    tile::rows::<K, false>(job, scratch, y, range)
}

/// One activation row grouped by pairs: values, per-lane `d` and `[d, s]` pairs.
#[derive(Clone, Copy)]
struct Act {
    qs: *const i8,
    lanes: *const f32,
    ds: *const f32,
}

/// The kernel of one 32-block kind.
struct Blocks<K>(std::marker::PhantomData<K>);

impl<K: Pair> Kernel for Blocks<K> {
    const WIDE: bool = false;
    type Acc = __m256;
    type Act = Act;

    fn act(job: &Job<'_>, scratch: &QuantScratch, t: usize) -> Act {
        let padded = (job.cols / 32).div_ceil(2) * 2;
        let a = scratch.row32(t);
        assert!(
            a.group == 2
                && a.qs.len() == padded * 32
                && a.lanes.len() == padded * 4
                && a.ds.len() == padded * 2
        );
        Act {
            qs: a.qs.as_ptr(),
            lanes: a.lanes.as_ptr(),
            ds: a.ds.as_ptr(),
        }
    }

    #[inline(always)]
    unsafe fn tile<const VNNI: bool, const R: usize, const T: usize>(
        w: *const u8,
        row_bytes: usize,
        cols: usize,
        a: &[Act; T],
    ) -> [[__m256; T]; R] {
        let blocks = cols / 32;
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        for g in 0..blocks / 2 {
            pair::<K, VNNI, R, T, 2>(w, row_bytes, g, a, &mut acc);
        }
        if blocks % 2 == 1 {
            pair::<K, VNNI, R, T, 1>(w, row_bytes, blocks / 2, a, &mut acc);
        }
        acc
    }
}

/// u8 × i8 products of two pairs of registers summed into 8 i32 lanes; `SMALL` when the u8
/// values are below 32 (then the i16 pair sums of both products may be added first).
#[inline(always)]
unsafe fn dot<const VNNI: bool, const SMALL: bool>(
    u0: __m256i,
    s0: __m256i,
    u1: __m256i,
    s1: __m256i,
) -> __m256i {
    let ones = _mm256_set1_epi16(1);
    if VNNI {
        _mm256_dpbusd_avx_epi32(
            _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u0, s0),
            u1,
            s1,
        )
    } else if SMALL {
        let p = _mm256_add_epi16(_mm256_maddubs_epi16(u0, s0), _mm256_maddubs_epi16(u1, s1));
        _mm256_madd_epi16(p, ones)
    } else {
        _mm256_add_epi32(
            _mm256_madd_epi16(_mm256_maddubs_epi16(u0, s0), ones),
            _mm256_madd_epi16(_mm256_maddubs_epi16(u1, s1), ones),
        )
    }
}

/// Pair `g` (`C` blocks) of `R` rows into the accumulators of `T` activation rows.
#[inline(always)]
unsafe fn pair<K: Pair, const VNNI: bool, const R: usize, const T: usize, const C: usize>(
    w: *const u8,
    row_bytes: usize,
    g: usize,
    a: &[Act; T],
    acc: &mut [[__m256; T]; R],
) {
    // The m·s terms: 1 for kinds with a min, -offset for the others, none for Q8_0.
    let f = if K::OFFSET == 0.0 { 1.0 } else { -K::OFFSET };
    let only_m = _mm_set_ps(f, 0.0, f, 0.0);
    let spread = _mm256_set_epi32(2, 2, 2, 2, 0, 0, 0, 0);
    for (r, acc) in acc.iter_mut().enumerate() {
        let (lo, hi, dm) = K::load::<C>(w.add(r * row_bytes + g * 2 * K::BYTES));
        let d = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(dm), spread);
        let m = _mm256_zextps128_ps256(_mm_mul_ps(dm, only_m));
        for (t, acc) in acc.iter_mut().enumerate() {
            let alo = _mm256_loadu_si256(a[t].qs.add(g * 64).cast());
            let ahi = _mm256_loadu_si256(a[t].qs.add(g * 64 + 32).cast());
            let dot = if K::SIGNED {
                let (ulo, uhi) = (_mm256_sign_epi8(lo, lo), _mm256_sign_epi8(hi, hi));
                let (slo, shi) = (_mm256_sign_epi8(alo, lo), _mm256_sign_epi8(ahi, hi));
                dot::<VNNI, false>(ulo, slo, uhi, shi)
            } else {
                dot::<VNNI, true>(lo, alo, hi, ahi)
            };
            let scale = _mm256_mul_ps(d, _mm256_loadu_ps(a[t].lanes.add(g * 8)));
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, *acc);
            if !K::SIGNED {
                let ds = _mm256_zextps128_ps256(_mm_loadu_ps(a[t].ds.add(g * 4)));
                *acc = _mm256_fmadd_ps(m, ds, *acc);
            }
        }
    }
}
