//! AVX-512 flavour of the 32-block kinds, four blocks (128 weights) at a time.
//!
//! A group of four weight blocks becomes two registers of 64 bytes: the first 16 values of
//! each block, then the last 16 of each (for the nibble kinds: the four blocks' packed bytes,
//! masked, and shifted and masked). The activations are stored grouped the same way, so two
//! `vpdpbusd` (u8 × i8 → i32; `vpmaddubsw` + `vpmaddwd` without VNNI) give 16 i32 lanes, four
//! per block. The lanes become f32 and are scaled lane-wise by `d_w · d_a` (the activations
//! keep `d_a` once per lane), so partial sums of all blocks share one accumulator and the only
//! horizontal sum is per output.
//!
//! Offsets and mins come out of the integer product: for a block with values `q`, weights
//! `d·q + m` and activations `d_a·a`, the dot is `d·d_a·Σqa + m·s` with `s = d_a·Σa` kept per
//! activation block; the `m·s` terms go into the same accumulator. Kinds with an offset `o`
//! (Q4_0: 8, Q5_0: 16) have `m = -o·d`. Q8_0 under VNNI is made unsigned by flipping the sign
//! bit (`q + 128`, offset 128); without VNNI it moves the sign of each weight onto the
//! activation instead (`vpmaddubsw` would saturate on `q + 128`).

use std::{arch::x86_64::*, ops::Range};

use super::{
    tile::{self, Kernel},
    Job, QuantKind, QuantScratch, SyncPtr,
};

/// How to load one 32-block kind.
trait Group {
    const BYTES: usize;
    /// Values are i8 (Q8_0), not u8.
    const SIGNED: bool = false;
    /// The offset subtracted from the stored values (0 where the block has a min).
    const OFFSET: f32;

    /// The `C` (1..=4) blocks at `p`, missing ones as zeros: the first 16 values of each block
    /// in 16-byte lanes, the last 16 of each, and `[d0, m0, d1, m1, ..]` with `m = d` for kinds
    /// without a min.
    ///
    /// # Safety
    /// `p` is readable for `C · BYTES` bytes; AVX-512 F/BW/VL/DQ and F16C are available.
    unsafe fn load<const C: usize>(p: *const u8) -> (__m512i, __m512i, __m256);
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

/// `[d_j, m_j]` of `C` blocks of `bytes` at `p` as f32; `m_j = d_j` unless `with_min` (then
/// the f16 `m` follows `d`).
#[inline(always)]
unsafe fn d_and_m<const C: usize>(p: *const u8, bytes: usize, with_min: bool) -> __m256 {
    let mut pairs = [0u64; 4];
    for (j, pair) in pairs.iter_mut().enumerate().take(C) {
        let at = p.add(j * bytes);
        *pair = if with_min {
            u32_at(at)
        } else {
            u16_at(at) * 0x1_0001
        };
    }
    let lo = pairs[0] | pairs[1] << 32;
    let hi = pairs[2] | pairs[3] << 32;
    _mm256_cvtph_ps(_mm_set_epi64x(hi as i64, lo as i64))
}

/// The 16 packed bytes at `p + at + j·bytes` of `C` blocks as (low nibbles, high nibbles).
#[inline(always)]
unsafe fn nibbles<const C: usize>(p: *const u8, bytes: usize, at: usize) -> (__m512i, __m512i) {
    let part = |j: usize| _mm_loadu_si128(p.add(at + j * bytes).cast());
    let mut v = _mm512_zextsi128_si512(part(0));
    if C > 1 {
        v = _mm512_inserti32x4::<1>(v, part(1));
    }
    if C > 2 {
        v = _mm512_inserti32x4::<2>(v, part(2));
    }
    if C > 3 {
        v = _mm512_inserti32x4::<3>(v, part(3));
    }
    let mask = _mm512_set1_epi8(0x0F);
    (
        _mm512_and_si512(v, mask),
        _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask),
    )
}

/// Adds 16 to the values whose bit is set in each block's 32-bit `qh` at `p + at`.
#[inline(always)]
unsafe fn fifth_bits<const C: usize>(
    (lo, hi): (__m512i, __m512i),
    p: *const u8,
    bytes: usize,
    at: usize,
) -> (__m512i, __m512i) {
    let (mut mlo, mut mhi) = (0u64, 0u64);
    for j in 0..C {
        let qh = u32_at(p.add(at + j * bytes));
        mlo |= (qh & 0xFFFF) << (16 * j);
        mhi |= (qh >> 16) << (16 * j);
    }
    let sixteen = _mm512_set1_epi8(16);
    (
        _mm512_mask_add_epi8(lo, mlo, lo, sixteen),
        _mm512_mask_add_epi8(hi, mhi, hi, sixteen),
    )
}

impl Group for Q4_0 {
    const BYTES: usize = 18;
    const OFFSET: f32 = 8.0;
    #[inline(always)]
    unsafe fn load<const C: usize>(p: *const u8) -> (__m512i, __m512i, __m256) {
        let (lo, hi) = nibbles::<C>(p, 18, 2);
        (lo, hi, d_and_m::<C>(p, 18, false))
    }
}

impl Group for Q4_1 {
    const BYTES: usize = 20;
    const OFFSET: f32 = 0.0;
    #[inline(always)]
    unsafe fn load<const C: usize>(p: *const u8) -> (__m512i, __m512i, __m256) {
        let (lo, hi) = nibbles::<C>(p, 20, 4);
        (lo, hi, d_and_m::<C>(p, 20, true))
    }
}

impl Group for Q5_0 {
    const BYTES: usize = 22;
    const OFFSET: f32 = 16.0;
    #[inline(always)]
    unsafe fn load<const C: usize>(p: *const u8) -> (__m512i, __m512i, __m256) {
        let (lo, hi) = fifth_bits::<C>(nibbles::<C>(p, 22, 6), p, 22, 2);
        (lo, hi, d_and_m::<C>(p, 22, false))
    }
}

impl Group for Q5_1 {
    const BYTES: usize = 24;
    const OFFSET: f32 = 0.0;
    #[inline(always)]
    unsafe fn load<const C: usize>(p: *const u8) -> (__m512i, __m512i, __m256) {
        let (lo, hi) = fifth_bits::<C>(nibbles::<C>(p, 24, 8), p, 24, 4);
        (lo, hi, d_and_m::<C>(p, 24, true))
    }
}

impl Group for Q8_0 {
    const BYTES: usize = 34;
    const SIGNED: bool = true;
    const OFFSET: f32 = 128.0;
    #[inline(always)]
    unsafe fn load<const C: usize>(p: *const u8) -> (__m512i, __m512i, __m256) {
        let block = |j: usize| {
            if j < C {
                _mm256_loadu_si256(p.add(2 + j * 34).cast())
            } else {
                _mm256_setzero_si256()
            }
        };
        let v01 = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(block(0)), block(1));
        let v23 = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(block(2)), block(3));
        // Quad-words 0-1 of each block are its first 16 values, 2-3 its last 16.
        let lo = _mm512_set_epi64(13, 12, 9, 8, 5, 4, 1, 0);
        let hi = _mm512_set_epi64(15, 14, 11, 10, 7, 6, 3, 2);
        (
            _mm512_permutex2var_epi64(v01, lo, v23),
            _mm512_permutex2var_epi64(v01, hi, v23),
            d_and_m::<C>(p, 34, false),
        )
    }
}

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

/// [`tile::rows`] with VNNI.
///
/// # Safety
/// As [`tile::rows`]; the CPU has AVX-512 F/BW/VL/DQ/VNNI, AVX2, FMA and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
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
/// As [`tile::rows`]; the CPU has AVX-512 F/BW/VL/DQ, AVX2, FMA and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub(super) unsafe fn rows_plain<K: Kernel>(
    job: &Job<'_>,
    scratch: &QuantScratch,
    y: SyncPtr<f32>,
    range: Range<usize>,
) {
    tile::rows::<K, false>(job, scratch, y, range)
}

/// One grouped activation row: values, per-lane `d` and `[d, s]` pairs.
#[derive(Clone, Copy)]
struct Act {
    qs: *const i8,
    lanes: *const f32,
    ds: *const f32,
}

/// The kernel of one 32-block kind.
struct Blocks<K>(std::marker::PhantomData<K>);

impl<K: Group> Kernel for Blocks<K> {
    const WIDE: bool = false;
    type Acc = __m512;
    type Act = Act;

    fn act(job: &Job<'_>, scratch: &QuantScratch, t: usize) -> Act {
        let groups = (job.cols / 32).div_ceil(4);
        let a = scratch.row32(t);
        assert!(
            a.group == 4
                && a.qs.len() == groups * 128
                && a.lanes.len() == groups * 16
                && a.ds.len() == groups * 8
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
    ) -> [[__m512; T]; R] {
        let blocks = cols / 32;
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        let full = blocks / 4;
        for g in 0..full {
            group::<K, VNNI, R, T, 4>(w, row_bytes, g, a, &mut acc);
        }
        match blocks % 4 {
            1 => group::<K, VNNI, R, T, 1>(w, row_bytes, full, a, &mut acc),
            2 => group::<K, VNNI, R, T, 2>(w, row_bytes, full, a, &mut acc),
            3 => group::<K, VNNI, R, T, 3>(w, row_bytes, full, a, &mut acc),
            _ => {}
        }
        acc
    }
}

/// What the accumulated `m·s` terms are multiplied by: 1 for kinds with a min, `-offset` for
/// the others, 0 for Q8_0 without VNNI (kept signed, no offset).
#[inline(always)]
fn m_factor<K: Group, const VNNI: bool>() -> f32 {
    if K::OFFSET == 0.0 {
        1.0
    } else if K::SIGNED && !VNNI {
        0.0
    } else {
        -K::OFFSET
    }
}

/// Group `g` (`C` blocks) of `R` rows into the accumulators of `T` activation rows.
#[inline(always)]
unsafe fn group<K: Group, const VNNI: bool, const R: usize, const T: usize, const C: usize>(
    w: *const u8,
    row_bytes: usize,
    g: usize,
    a: &[Act; T],
    acc: &mut [[__m512; T]; R],
) {
    let f = m_factor::<K, VNNI>();
    // Keeps the m of [d, m, ..] (times the factor) to multiply the s of [d, s, ..].
    let only_m = _mm256_set_ps(f, 0.0, f, 0.0, f, 0.0, f, 0.0);
    let spread = _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0);
    for (r, acc) in acc.iter_mut().enumerate() {
        let (lo, hi, dm) = K::load::<C>(w.add(r * row_bytes + g * 4 * K::BYTES));
        let (lo, hi) = if K::SIGNED && VNNI {
            let flip = _mm512_set1_epi8(-128);
            (_mm512_xor_si512(lo, flip), _mm512_xor_si512(hi, flip))
        } else {
            (lo, hi)
        };
        let d = _mm512_permutexvar_ps(spread, _mm512_castps256_ps512(dm));
        let m = _mm512_zextps256_ps512(_mm256_mul_ps(dm, only_m));
        for (t, acc) in acc.iter_mut().enumerate() {
            let alo = _mm512_loadu_si512(a[t].qs.add(g * 128).cast());
            let ahi = _mm512_loadu_si512(a[t].qs.add(g * 128 + 64).cast());
            let dot = if VNNI {
                _mm512_dpbusd_epi32(
                    _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, alo),
                    hi,
                    ahi,
                )
            } else if K::SIGNED {
                let ones = _mm512_set1_epi16(1);
                let zero = _mm512_setzero_si512();
                let slo = _mm512_mask_sub_epi8(alo, _mm512_movepi8_mask(lo), zero, alo);
                let shi = _mm512_mask_sub_epi8(ahi, _mm512_movepi8_mask(hi), zero, ahi);
                let plo = _mm512_madd_epi16(_mm512_maddubs_epi16(_mm512_abs_epi8(lo), slo), ones);
                let phi = _mm512_madd_epi16(_mm512_maddubs_epi16(_mm512_abs_epi8(hi), shi), ones);
                _mm512_add_epi32(plo, phi)
            } else {
                // Values below 32: each pair sum of both halves stays within i16.
                let p =
                    _mm512_add_epi16(_mm512_maddubs_epi16(lo, alo), _mm512_maddubs_epi16(hi, ahi));
                _mm512_madd_epi16(p, _mm512_set1_epi16(1))
            };
            let scale = _mm512_mul_ps(d, _mm512_loadu_ps(a[t].lanes.add(g * 16)));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, *acc);
            if f != 0.0 {
                let ds = _mm512_zextps256_ps512(_mm256_loadu_ps(a[t].ds.add(g * 8)));
                *acc = _mm512_fmadd_ps(m, ds, *acc);
            }
        }
    }
}
