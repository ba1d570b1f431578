//! AVX-512 flavour of the K kinds (super-blocks of 256 with 6- or 8-bit sub-block scales).
//!
//! Each 64 weights of a super-block are widened to one register of u8 values in element order
//! (Q4_K/Q5_K: 32 packed bytes, low nibbles then high nibbles, plus the fifth bits of Q5_K;
//! Q6_K: low nibbles and two high bits), the activations' matching 64 bytes are multiplied in
//! with `vpmaddubsw` into i16 pairs, and those are multiplied by the sub-block scales and summed
//! into i32 lanes with `vpdpwssd` (VNNI) or `vpmaddwd` + add. The integer sum of a super-block
//! is scaled once by `d_w · d_a` in f32. Mins (Q4_K, Q5_K) and the offset 32 of Q6_K come from
//! the activations' 16-value sums: `Σ_j min_j · Σa_j` and `32 · Σ_j scale_j · Σa_j`.

use std::{arch::x86_64::*, ops::Range};

use super::{
    avx512::{rows_plain, rows_vnni},
    tile::Kernel,
    Job, QuantKind, QuantScratch, SyncPtr,
};

/// Rows `range` of the product.
///
/// # Safety
/// As [`super::Flavour::run`], with AVX-512 F/BW/VL/DQ and F16C (and VNNI when `vnni`)
/// available.
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
    /// Reads activations with the middle quarters of each 128 swapped.
    const SWAPPED: bool;
    /// # Safety
    /// `p` holds one super-block; `a` rows hold super-block `sb`; AVX-512 BW/VL and F16C.
    unsafe fn superblock<const VNNI: bool, const T: usize>(
        p: *const u8,
        sb: usize,
        a: &[Act; T],
        acc: &mut [__m512; T],
    );
}

struct Q4K;
struct Q5K;
struct Q6K;

/// The kernel of one K kind.
struct Supers<K>(std::marker::PhantomData<K>);

impl<K: Super> Kernel for Supers<K> {
    const WIDE: bool = true;
    type Acc = __m512;
    type Act = Act;

    fn act(job: &Job<'_>, scratch: &QuantScratch, t: usize) -> Act {
        let blocks = job.cols / 256;
        let a = scratch.row_k(t);
        assert!(
            a.swapped == K::SWAPPED
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
    ) -> [[__m512; T]; R] {
        let mut acc = [[_mm512_setzero_ps(); T]; R];
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
unsafe fn scaled_add<const VNNI: bool>(acc: __m512i, pairs: __m512i, scales: __m512i) -> __m512i {
    if VNNI {
        _mm512_dpwssd_epi32(acc, pairs, scales)
    } else {
        _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, scales))
    }
}

/// Per 128-bit lane `i` (16 values): word `k_i` of `scales`, in all 8 words.
#[inline(always)]
unsafe fn pick_scales(scales: __m512i, k: [i8; 4]) -> __m512i {
    let lane = |k: i8| _mm_set1_epi16(((2 * k + 1) as i16) << 8 | (2 * k) as i16);
    let idx = _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(_mm256_set_m128i(lane(k[1]), lane(k[0]))),
        _mm256_set_m128i(lane(k[3]), lane(k[2])),
    );
    _mm512_shuffle_epi8(scales, idx)
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
    acc: &mut [__m512; T],
) {
    let (qh, qs) = if FIVE {
        (
            _mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(16).cast())),
            p.add(48),
        )
    } else {
        (_mm512_setzero_si512(), p.add(16))
    };
    let d = f16_at(p);
    let dmin = f16_at(p.add(2));
    let (sc, mins) = scales_mins(p.add(4));
    let scales = _mm512_broadcast_i32x4(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
    // [m0, m0, m1, m1, ..] as i16 against the sixteen 16-value sums.
    let m = _mm_cvtsi64_si128(mins as i64);
    let mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m, m));
    let mut isum = [_mm512_setzero_si512(); T];
    let low4 = _mm512_set1_epi8(0x0F);
    for h in 0..2 {
        // 64 packed bytes: chunks 2h and 2h + 1, each 32 low nibbles then 32 high ones, so
        // the low nibbles hold sub-blocks 4h and 4h + 2, the high ones 4h + 1 and 4h + 3.
        let v = _mm512_loadu_si512(qs.add(64 * h).cast());
        let mut lo = _mm512_and_si512(v, low4);
        let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low4);
        let k = (4 * h) as i8;
        if FIVE {
            // Sub-block j takes bit j of each qh byte as its fifth bit.
            let bits = |j: i8| {
                _mm512_inserti64x4::<1>(_mm512_set1_epi8(1 << j), _mm256_set1_epi8(1 << (j + 2)))
            };
            let sixteen = _mm512_set1_epi8(16);
            lo = _mm512_mask_add_epi8(lo, _mm512_test_epi8_mask(qh, bits(k)), lo, sixteen);
            hi = _mm512_mask_add_epi8(hi, _mm512_test_epi8_mask(qh, bits(k + 1)), hi, sixteen);
        }
        let slo = pick_scales(scales, [k, k, k + 2, k + 2]);
        let shi = pick_scales(scales, [k + 1, k + 1, k + 3, k + 3]);
        for t in 0..T {
            // The activations come with the same order (quarters swapped).
            let at = a[t].qs.add(sb * 256 + h * 128);
            let alo = _mm512_loadu_si512(at.cast());
            let ahi = _mm512_loadu_si512(at.add(64).cast());
            isum[t] = scaled_add::<VNNI>(isum[t], _mm512_maddubs_epi16(lo, alo), slo);
            isum[t] = scaled_add::<VNNI>(isum[t], _mm512_maddubs_epi16(hi, ahi), shi);
        }
    }
    for t in 0..T {
        let da = *a[t].d.add(sb);
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t]), _mm512_set1_ps(d * da), acc[t]);
        let sums = _mm256_loadu_si256(a[t].bsums.add(sb * 16).cast());
        let ms = _mm512_zextps256_ps512(_mm256_cvtepi32_ps(_mm256_madd_epi16(mins, sums)));
        acc[t] = _mm512_fmadd_ps(ms, _mm512_set1_ps(-dmin * da), acc[t]);
    }
}

impl Super for Q4K {
    const BYTES: usize = 144;
    const SWAPPED: bool = true;
    #[inline(always)]
    unsafe fn superblock<const VNNI: bool, const T: usize>(
        p: *const u8,
        sb: usize,
        a: &[Act; T],
        acc: &mut [__m512; T],
    ) {
        q45::<VNNI, T, false>(p, sb, a, acc)
    }
}

impl Super for Q5K {
    const BYTES: usize = 176;
    const SWAPPED: bool = true;
    #[inline(always)]
    unsafe fn superblock<const VNNI: bool, const T: usize>(
        p: *const u8,
        sb: usize,
        a: &[Act; T],
        acc: &mut [__m512; T],
    ) {
        q45::<VNNI, T, true>(p, sb, a, acc)
    }
}

impl Super for Q6K {
    const BYTES: usize = 210;
    const SWAPPED: bool = false;
    #[inline(always)]
    unsafe fn superblock<const VNNI: bool, const T: usize>(
        p: *const u8,
        sb: usize,
        a: &[Act; T],
        acc: &mut [__m512; T],
    ) {
        let d = f16_at(p.add(208));
        let sc = _mm_loadu_si128(p.add(192).cast());
        let sc16 = _mm256_cvtepi8_epi16(sc);
        let low4 = _mm512_set1_epi8(0x0F);
        let bits45 = _mm512_set1_epi8(0x30);
        let mut isum = [_mm512_setzero_si512(); T];
        for h in 0..2 {
            let ql = _mm512_loadu_si512(p.add(64 * h).cast());
            let qh = _mm256_loadu_si256(p.add(128 + 32 * h).cast());
            // Bytes 0..32: qh; 32..64: qh >> 2. Bits 0-1 then serve chunk 0, bits 4-5 chunk 1.
            let qh =
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(qh), _mm256_srli_epi16::<2>(qh));
            // (high << 4 & 0x30) | (ql & 0x0F), and (high & 0x30) | (ql >> 4 & 0x0F).
            let v0 = _mm512_ternarylogic_epi32::<0xEA>(
                _mm512_slli_epi16::<4>(qh),
                bits45,
                _mm512_and_si512(ql, low4),
            );
            let v1 = _mm512_ternarylogic_epi32::<0xEA>(
                qh,
                bits45,
                _mm512_and_si512(_mm512_srli_epi16::<4>(ql), low4),
            );
            let scales = _mm512_broadcast_i32x4(if h == 0 {
                _mm256_castsi256_si128(sc16)
            } else {
                _mm256_extracti128_si256::<1>(sc16)
            });
            for (c, v) in [v0, v1].into_iter().enumerate() {
                let k = (4 * c) as i8;
                let s = pick_scales(scales, [k, k + 1, k + 2, k + 3]);
                for t in 0..T {
                    let av = _mm512_loadu_si512(a[t].qs.add(sb * 256 + h * 128 + c * 64).cast());
                    isum[t] = scaled_add::<VNNI>(isum[t], _mm512_maddubs_epi16(v, av), s);
                }
            }
        }
        for t in 0..T {
            // The stored values are q + 32: take 32 · Σ_j scale_j · Σa_j back out.
            let sums = _mm256_loadu_si256(a[t].bsums.add(sb * 16).cast());
            let offset = _mm256_slli_epi32::<5>(_mm256_madd_epi16(sc16, sums));
            let isum = _mm512_sub_epi32(isum[t], _mm512_zextsi256_si512(offset));
            let da = *a[t].d.add(sb);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(d * da), acc[t]);
        }
    }
}
