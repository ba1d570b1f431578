//! AVX-512 versions of the two activation quantizers in `act`, with the same results: the
//! same `amax`, `d`, `1/d`, round-to-nearest-even (`vcvtps2dq`) and saturation to i8.

use std::arch::x86_64::*;

/// As `act::blocks_32`.
///
/// # Safety
/// AVX-512 F/BW/VL/DQ and F16C are available; the slices have `act::blocks_32`'s lengths.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub(super) unsafe fn blocks_32(
    x: &[f32],
    qs: &mut [i8],
    ds: &mut [f32],
    lanes: &mut [f32],
    group: usize,
) {
    let blocks = x.len() / 32;
    let padded = if group == 0 {
        blocks
    } else {
        blocks.div_ceil(group) * group
    };
    assert!(qs.len() >= 32 * padded && ds.len() >= 2 * padded);
    assert!(group == 0 || lanes.len() >= 4 * padded);
    let abs = _mm512_set1_epi32(0x7FFF_FFFF);
    for b in 0..blocks {
        let v0 = _mm512_loadu_ps(x.as_ptr().add(32 * b));
        let v1 = _mm512_loadu_ps(x.as_ptr().add(32 * b + 16));
        let a = _mm512_max_ps(
            _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v0), abs)),
            _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v1), abs)),
        );
        let d = _mm512_reduce_max_ps(a) / 127.0;
        let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id));
        let q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
        let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        let (lo, hi) = super::act::group_at(b, group);
        _mm_storeu_si128(qs.as_mut_ptr().add(lo).cast(), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128(qs.as_mut_ptr().add(hi).cast(), _mm512_cvtsepi32_epi8(q1));
        // Rounded to f16 as `act::to_f16_and_back` does (to nearest, ties to even).
        let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(
            _mm_set_ss(d),
        )));
        ds[2 * b] = d;
        ds[2 * b + 1] = d * sum as f32;
    }
    if group != 0 {
        super::act::pad_groups(blocks, group, qs, ds, lanes);
    }
}

/// As `act::super_blocks`.
///
/// # Safety
/// AVX-512 F/BW/VL/DQ are available; the slices have `act::super_blocks`'s lengths.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub(super) unsafe fn super_blocks(
    x: &[f32],
    qs: &mut [i8],
    d: &mut [f32],
    bsums: &mut [i16],
    swapped: bool,
) {
    let blocks = x.len() / 256;
    assert!(qs.len() >= blocks * 256 && d.len() >= blocks && bsums.len() >= blocks * 16);
    let abs = _mm512_set1_epi32(0x7FFF_FFFF);
    for (b, d) in d[..blocks].iter_mut().enumerate() {
        let x = x.as_ptr().add(256 * b);
        let v: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(x.add(16 * i)));
        let a: [__m512; 16] = std::array::from_fn(|i| {
            _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v[i]), abs))
        });
        let mut m = a[0];
        for a in &a[1..] {
            m = _mm512_max_ps(m, *a);
        }
        let amax = _mm512_reduce_max_ps(m);
        let sums = bsums.as_mut_ptr().add(16 * b);
        if amax == 0.0 {
            *d = 0.0;
            std::ptr::write_bytes(qs.as_mut_ptr().add(256 * b), 0, 256);
            std::ptr::write_bytes(sums, 0, 16);
            continue;
        }
        // The first value of largest magnitude, with its sign, maps to -127.
        let amax_v = _mm512_set1_ps(amax);
        let mut first = 0;
        for (i, a) in a.iter().enumerate() {
            let k = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(*a, amax_v);
            if k != 0 {
                first = 16 * i + k.trailing_zeros() as usize;
                break;
            }
        }
        let iscale = -127.0 / *x.add(first);
        let s = _mm512_set1_ps(iscale);
        for (i, v) in v.iter().enumerate() {
            let q = _mm512_cvtps_epi32(_mm512_mul_ps(*v, s));
            let q = _mm512_max_epi32(
                _mm512_min_epi32(q, _mm512_set1_epi32(127)),
                _mm512_set1_epi32(-128),
            );
            let at = if swapped {
                super::act::swap_quarters(16 * i)
            } else {
                16 * i
            };
            _mm_storeu_si128(
                qs.as_mut_ptr().add(256 * b + at).cast(),
                _mm512_cvtepi32_epi8(q),
            );
            *sums.add(i) = _mm512_reduce_add_epi32(q) as i16;
        }
        *d = 1.0 / iscale;
    }
}
