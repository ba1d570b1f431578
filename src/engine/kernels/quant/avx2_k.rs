//! AVX2 flavour of the K kinds: 32 weights per 256-bit register.
//!
//! As `avx512_k`, at half the width: u8 weight values × i8 activations into i16 pairs
//! (`vpmaddubsw`), times the sub-block scales into i32 lanes (`vpdpwssd` with AVX-VNNI, else
//! `vpmaddwd` + add), one f32 scaling per super-block, and the mins and the Q6_K offset from
//! the activations' 16-value sums.

use std::{arch::x86_64::*, ops::Range};

use super::{
    avx2::{rows_plain, rows_vnni},
    tile::Kernel,
    Job, QuantKind, QuantScratch, SyncPtr,
};

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
    match (job.kind, vnni) {
        (QuantKind::Q4K, true) => rows_vnni::<Supers<Q4K>>(job, scratch, y, range),
        (QuantKind::Q4K, false) => rows_plain::<Supers<Q4K>>(job, scratch, y, range),
        (QuantKind::Q5K, true) => rows_vnni::<Supers<Q5K>>(job, scratch, y, range),
        (QuantKind::Q5K, false) => rows_plain::<Supers<Q5K>>(job, scratch, y, range),
        (QuantKind::Q6K, true) => rows_vnni::<Supers<Q6K>>(job, scratch, y, range),
        (QuantKind::Q6K, false) => rows_plain::<Supers<Q6K>>(job, scratch, y, range),
        _ => unreachable!("not a K kind"),
    }
}

/// One activation row: values, `d` per super-block and sums of 16.
#[derive(Clone, Copy)]
struct Act {
    qs: *const i8,
    d: *const f32,
    bsums: *const i16,
}

/// One K kind: a super-block of one weight row into the accumulators of `T` activation rows
/// (whose lanes sum to the outputs; mins and offsets included).
trait Super {
    const BYTES: usize;
    /// # Safety
    /// `p` holds one super-block; `a` rows hold super-block `sb`; AVX2 and F16C.
    unsafe fn superblock<const VNNI: bool, const T: usize>(
        p: *const u8,
        sb: usize,
        a: &[Act; T],
        acc: &mut [__m256; T],
    );
}

struct Q4K;
struct Q5K;
struct Q6K;

/// The kernel of one K kind.
struct Supers<K>(std::marker::PhantomData<K>);

impl<K: Super> Kernel for Supers<K> {
    const WIDE: bool = false;
    type Acc = __m256;
    type Act = Act;

    fn act(job: &Job<'_>, scratch: &QuantScratch, t: usize) -> Act {
        let blocks = job.cols / 256;
        let a = scratch.row_k(t);
        assert!(
            !a.swapped
                && a.qs.len() == blocks * 256
                && a.d.len() == blocks
                && a.bsums.len() == blocks * 16
        );
        Act {
            qs: a.qs.as_ptr(),
            d: a.d.as_ptr(),
            bsums: a.bsums.as_ptr(),
        }
    }

    #[inline(always)]
    unsafe fn tile<const VNNI: bool, const R: usize, const T: usize>(
        w: *const u8,
        row_bytes: usize,
        cols: usize,
        a: &[Act; T],
    ) -> [[__m256; T]; R] {
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        for sb in 0..cols / 256 {
            for (r, acc) in acc.iter_mut().enumerate() {
                K::superblock::<VNNI, T>(w.add(r * row_bytes + sb * K::BYTES), sb, a, acc);
            }
        }
        acc
    }
}

#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
        p.cast::<u16>().read_unaligned() as i32,
    )))
}

/// `acc += pairs · scales` summed pairwise into i32 lanes.
#[inline(always)]
unsafe fn scaled_add<const VNNI: bool>(acc: __m256i, pairs: __m256i, scales: __m256i) -> __m256i {
    if VNNI {
        _mm256_dpwssd_avx_epi32(acc, pairs, scales)
    } else {
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, scales))
    }
}

/// Words `k0` (low 128-bit lane) and `k1` (high lane) of `scales` (8 i16 in both lanes).
#[inline(always)]
unsafe fn pick_scales(scales: __m256i, k0: i8, k1: i8) -> __m256i {
    let lane = |k: i8| _mm_set1_epi16(((2 * k + 1) as i16) << 8 | (2 * k) as i16);
    _mm256_shuffle_epi8(scales, _mm256_set_m128i(lane(k1), lane(k0)))
}

/// The 8 six-bit scales and 8 mins of a Q4_K/Q5_K super-block (12 bytes at `s`) as bytes.
#[inline(always)]
unsafe fn scales_mins(s: *const u8) -> (u64, u64) {
    let lo = s.cast::<u64>().read_unaligned();
    let hi = s.add(8).cast::<u32>().read_unaligned() as u64;
    let (s0, s1, s2) = (lo & 0xFFFF_FFFF, lo >> 32, hi);
    const LOW6: u64 = 0x3F3F_3F3F;
    const LOW4: u64 = 0x0F0F_0F0F;
    const TOP2: u64 = 0x0303_0303;
    let scales = (s0 & LOW6) | ((s2 & LOW4) | ((s0 >> 6) & TOP2) << 4) << 32;
    let mins = (s1 & LOW6) | (((s2 >> 4) & LOW4) | ((s1 >> 6) & TOP2) << 4) << 32;
    (scales, mins)
}

/// Q4_K, or with `FIVE` Q5_K (whose fifth bits come before the nibbles).
#[inline(always)]
unsafe fn q45<const VNNI: bool, const T: usize, const FIVE: bool>(
    p: *const u8,
    sb: usize,
    a: &[Act; T],
    acc: &mut [__m256; T],
) {
    let (qh, qs) = if FIVE {
        (_mm256_loadu_si256(p.add(16).cast()), p.add(48))
    } else {
        (_mm256_setzero_si256(), p.add(16))
    };
    // 16 where bit `bit` of the byte of qh is set.
    let high = |bit: usize| {
        let bit = _mm256_set1_epi8((1u8 << bit) as i8);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
        _mm256_and_si256(set, _mm256_set1_epi8(16))
    };
    let d = f16_at(p);
    let dmin = f16_at(p.add(2));
    let (sc, mins) = scales_mins(p.add(4));
    let scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
    let m = _mm_cvtsi64_si128(mins as i64);
    let mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m, m));
    let mut isum = [_mm256_setzero_si256(); T];
    for c in 0..4 {
        let (mut lo, mut hi) = nibbles(qs.add(32 * c));
        if FIVE {
            lo = _mm256_or_si256(lo, high(2 * c));
            hi = _mm256_or_si256(hi, high(2 * c + 1));
        }
        let k = (2 * c) as i8;
        let (slo, shi) = (pick_scales(scales, k, k), pick_scales(scales, k + 1, k + 1));
        for t in 0..T {
            let at = a[t].qs.add(sb * 256 + c * 64);
            let alo = _mm256_loadu_si256(at.cast());
            let ahi = _mm256_loadu_si256(at.add(32).cast());
            isum[t] = scaled_add::<VNNI>(isum[t], _mm256_maddubs_epi16(lo, alo), slo);
            isum[t] = scaled_add::<VNNI>(isum[t], _mm256_maddubs_epi16(hi, ahi), shi);
        }
    }
    for t in 0..T {
        let da = *a[t].d.add(sb);
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_set1_ps(d * da), acc[t]);
        let sums = _mm256_loadu_si256(a[t].bsums.add(sb * 16).cast());
        let ms = _mm256_cvtepi32_ps(_mm256_madd_epi16(mins, sums));
        acc[t] = _mm256_fmadd_ps(ms, _mm256_set1_ps(-dmin * da), acc[t]);
    }
}

/// 32 packed bytes as (low nibbles, high nibbles).
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> (__m256i, __m256i) {
    let q = _mm256_loadu_si256(p.cast());
    let mask = _mm256_set1_epi8(0x0F);
    (
        _mm256_and_si256(q, mask),
        _mm256_and_si256(_mm256_srli_epi16::<4>(q), mask),
    )
}

impl Super for Q4K {
    const BYTES: usize = 144;
    #[inline(always)]
    unsafe fn superblock<const VNNI: bool, const T: usize>(
        p: *const u8,
        sb: usize,
        a: &[Act; T],
        acc: &mut [__m256; T],
    ) {
        q45::<VNNI, T, false>(p, sb, a, acc)
    }
}

impl Super for Q5K {
    const BYTES: usize = 176;
    #[inline(always)]
    unsafe fn superblock<const VNNI: bool, const T: usize>(
        p: *const u8,
        sb: usize,
        a: &[Act; T],
        acc: &mut [__m256; T],
    ) {
        q45::<VNNI, T, true>(p, sb, a, acc)
    }
}

impl Super for Q6K {
    const BYTES: usize = 210;
    #[inline(always)]
    unsafe fn superblock<const VNNI: bool, const T: usize>(
        p: *const u8,
        sb: usize,
        a: &[Act; T],
        acc: &mut [__m256; T],
    ) {
        let d = f16_at(p.add(208));
        let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(192).cast()));
        let low4 = _mm256_set1_epi8(0x0F);
        let two = _mm256_set1_epi8(3);
        let mut isum = [_mm256_setzero_si256(); T];
        for h in 0..2 {
            let ql0 = _mm256_loadu_si256(p.add(64 * h).cast());
            let ql1 = _mm256_loadu_si256(p.add(64 * h + 32).cast());
            let qh = _mm256_loadu_si256(p.add(128 + 32 * h).cast());
            let high = |shift: i32| {
                let bits = match shift {
                    0 => qh,
                    2 => _mm256_srli_epi16::<2>(qh),
                    4 => _mm256_srli_epi16::<4>(qh),
                    _ => _mm256_srli_epi16::<6>(qh),
                };
                _mm256_slli_epi16::<4>(_mm256_and_si256(bits, two))
            };
            let values = [
                _mm256_or_si256(_mm256_and_si256(ql0, low4), high(0)),
                _mm256_or_si256(_mm256_and_si256(ql1, low4), high(2)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low4), high(4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low4), high(6)),
            ];
            let scales = _mm256_broadcastsi128_si256(if h == 0 {
                _mm256_castsi256_si128(sc16)
            } else {
                _mm256_extracti128_si256::<1>(sc16)
            });
            for (i, v) in values.into_iter().enumerate() {
                let k = (2 * i) as i8;
                let s = pick_scales(scales, k, k + 1);
                for t in 0..T {
                    let av = _mm256_loadu_si256(a[t].qs.add(sb * 256 + h * 128 + i * 32).cast());
                    isum[t] = scaled_add::<VNNI>(isum[t], _mm256_maddubs_epi16(v, av), s);
                }
            }
        }
        for t in 0..T {
            // The stored values are q + 32: take 32 · Σ_j scale_j · Σa_j back out.
            let sums = _mm256_loadu_si256(a[t].bsums.add(sb * 16).cast());
            let offset = _mm256_slli_epi32::<5>(_mm256_madd_epi16(sc16, sums));
            let da = *a[t].d.add(sb);
            let isum = _mm256_sub_epi32(isum[t], offset);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(d * da), acc[t]);
        }
    }
}
