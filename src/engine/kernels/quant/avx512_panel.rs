//! The AVX-512 VNNI kernel of the interleaved panels (layout in `interleaved`).
//!
//! One i32 lane per row: for a block of a panel, each 64-byte chunk of weights (4 values of
//! each of 16 rows, nibbles unpacked with a mask and a shift) meets the 4 matching activation
//! bytes of a token broadcast to all lanes in one `vpdpbusd`; 8 of them make the block's
//! integer dot products of 16 rows. Then, shared by the 16 rows, the f32 part:
//! `acc += f32(isum) · (d · d_a) + m · s_a`, where `m` is the min (Q4_1, Q5_1) or `-offset · d`
//! (Q4_0: 8, Q5_0: 16, Q8_0: 128, its values being stored plus 128) and `s_a = d_a · Σa`.
//!
//! A tile is `P` panels × `T` tokens (T ≤ 8; the weights of a block are unpacked once per
//! tile). Decoding takes four panels at a time and splits each block's chain of `vpdpbusd` in
//! two, so that independent chains hide their latency. Outputs need no horizontal sums: lane
//! `r` of a token's accumulator is row `r`.

use std::{arch::x86_64::*, ops::Range};

use super::{
    interleaved::{BlockLayout, Interleaved, PanelJob, PANEL},
    QuantKind, QuantScratch, SyncPtr,
};

/// Tokens per tile at most: `2T` accumulator and sum registers plus the weights fit in 32.
const MAX_T: usize = 8;

/// Panels that every tile of tokens passes over before the next ones (in L1).
const PANEL_BLOCK: usize = 4;

/// Tiles of tokens whose activation rows are looked up once per call.
const CACHED_TILES: usize = 4;

/// One 32-block kind, as the panel kernel reads it.
trait Kind {
    const KIND: QuantKind;
    /// 8 chunks of bytes (Q8_0), not 4 of nibbles.
    const EIGHT: bool = false;
    /// Fifth-bit masks follow the nibbles (Q5_0, Q5_1).
    const FIFTH: bool = false;
    /// `m` is stored (Q4_1, Q5_1); else it is `-OFFSET · d`.
    const MIN: bool = false;
    const OFFSET: f32 = 0.0;
}

struct Q4_0;
struct Q4_1;
struct Q5_0;
struct Q5_1;
struct Q8_0;

impl Kind for Q4_0 {
    const KIND: QuantKind = QuantKind::Q4_0;
    const OFFSET: f32 = 8.0;
}
impl Kind for Q4_1 {
    const KIND: QuantKind = QuantKind::Q4_1;
    const MIN: bool = true;
}
impl Kind for Q5_0 {
    const KIND: QuantKind = QuantKind::Q5_0;
    const FIFTH: bool = true;
    const OFFSET: f32 = 16.0;
}
impl Kind for Q5_1 {
    const KIND: QuantKind = QuantKind::Q5_1;
    const FIFTH: bool = true;
    const MIN: bool = true;
}
impl Kind for Q8_0 {
    const KIND: QuantKind = QuantKind::Q8_0;
    const EIGHT: bool = true;
    const OFFSET: f32 = 128.0;
}

/// One activation row: values in element order and `[d, s]` per block.
#[derive(Clone, Copy)]
struct Act {
    qs: *const i8,
    ds: *const f32,
}

/// Panels `range` of the product of `w` with the `n` activation rows in `scratch`.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/DQ, VNNI, AVX2, FMA and F16C; `scratch` holds `n` rows quantized
/// in element order for `w`'s columns; `y` holds `n × rows` values, and no other thread writes
/// the outputs of these panels.
pub(super) unsafe fn panels(
    w: &Interleaved,
    n: usize,
    scratch: &QuantScratch,
    y: SyncPtr<f32>,
    range: Range<usize>,
) {
    let job = w.job();
    assert!(range.end * job.panel_bytes <= job.data.len());
    match job.kind {
        QuantKind::Q4_0 => run::<Q4_0>(&job, n, scratch, y, range),
        QuantKind::Q4_1 => run::<Q4_1>(&job, n, scratch, y, range),
        QuantKind::Q5_0 => run::<Q5_0>(&job, n, scratch, y, range),
        QuantKind::Q5_1 => run::<Q5_1>(&job, n, scratch, y, range),
        QuantKind::Q8_0 => run::<Q8_0>(&job, n, scratch, y, range),
        other => unreachable!("{other:?} has no interleaved layout"),
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn run<K: Kind>(
    job: &PanelJob<'_>,
    n: usize,
    scratch: &QuantScratch,
    y: SyncPtr<f32>,
    range: Range<usize>,
) {
    let blocks = job.cols / 32;
    let act = |t: usize| {
        let a = scratch.row32(t);
        assert!(a.group == 0 && a.qs.len() >= job.cols && a.ds.len() >= 2 * blocks);
        Act {
            qs: a.qs.as_ptr(),
            ds: a.ds.as_ptr(),
        }
    };
    let mut p = range.start;
    if n == 1 {
        let a = [act(0)];
        while p + 4 <= range.end {
            tile::<K, 4, 1>(job, p, &a, y, 0);
            p += 4;
        }
        while p < range.end {
            tile::<K, 1, 1>(job, p, &a, y, 0);
            p += 1;
        }
        return;
    }
    // Tiles of equal width (9 tokens: 5 + 4, not 8 + 1).
    let width = n.div_ceil(n.div_ceil(MAX_T));
    // The activation rows of the first tiles, looked up once (later ones per use).
    let none = Act {
        qs: std::ptr::null(),
        ds: std::ptr::null(),
    };
    let mut first = [[none; MAX_T]; CACHED_TILES];
    for (k, tile) in first.iter_mut().enumerate() {
        for (i, a) in tile.iter_mut().enumerate().take(width) {
            if k * width + i < n {
                *a = act(k * width + i);
            }
        }
    }
    macro_rules! tokens {
        ($panels:expr, $t0:expr, $($t:literal)*) => {
            match (n - $t0).min(width) {
                $($t => {
                    let fresh: [Act; $t];
                    let a: &[Act; $t] = match first.get($t0 / width) {
                        Some(tile) => tile[..$t].try_into().unwrap(),
                        None => {
                            fresh = std::array::from_fn(|i| act($t0 + i));
                            &fresh
                        }
                    };
                    for p in $panels {
                        tile::<K, 1, $t>(job, p, a, y, $t0);
                    }
                    $t
                })*
                _ => unreachable!(),
            }
        };
    }
    while p < range.end {
        // A few panels' weights stay in L1 while every tile of tokens passes over them.
        let end = (p + PANEL_BLOCK).min(range.end);
        let mut t0 = 0;
        while t0 < n {
            t0 += tokens!(p..end, t0, 1 2 3 4 5 6 7 8);
        }
        p = end;
    }
}

/// Panels `p0..p0 + P` against activation rows `t0..t0 + T`.
#[inline(always)]
unsafe fn tile<K: Kind, const P: usize, const T: usize>(
    job: &PanelJob<'_>,
    p0: usize,
    a: &[Act; T],
    y: SyncPtr<f32>,
    t0: usize,
) {
    let layout = BlockLayout::of(K::KIND);
    let blocks = job.cols / 32;
    // Short tiles split each block's chain of dot products in two.
    let split = T <= 2;
    let low4 = _mm512_set1_epi8(0x0F);
    let sixteen = _mm512_set1_epi8(16);
    let mut acc = [[_mm512_setzero_ps(); T]; P];
    let data = job.data.as_ptr();
    // The same block of the panels after this tile's, fetched into L1 ahead of time: the
    // weights stream from L3 or memory, which the hardware prefetchers alone do not hide.
    // (Once per panel: later tiles of tokens find it in L1 already.)
    let ahead = P * job.panel_bytes;
    let first = t0 == 0;
    let end = data.wrapping_add(job.data.len());
    for b in 0..blocks {
        for (p, acc) in acc.iter_mut().enumerate() {
            let blk = data.add((p0 + p) * job.panel_bytes + b * layout.bytes);
            let next = blk.wrapping_add(ahead);
            if first && next.wrapping_add(layout.bytes) <= end {
                for line in (0..layout.bytes).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(next.add(line).cast());
                }
            }
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(layout.d).cast()));
            let m = if K::MIN {
                _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(layout.m).cast()))
            } else {
                _mm512_mul_ps(d, _mm512_set1_ps(-K::OFFSET))
            };
            let mut sum = [_mm512_setzero_si512(); T];
            let mut sum2 = [_mm512_setzero_si512(); T];
            let bcast = |t: usize, at: usize| {
                _mm512_set1_epi32(a[t].qs.add(32 * b + at).cast::<i32>().read_unaligned())
            };
            if K::EIGHT {
                for j in 0..8 {
                    let wv = _mm512_loadu_si512(blk.add(64 * j).cast());
                    let into = if split && j % 2 == 1 {
                        &mut sum2
                    } else {
                        &mut sum
                    };
                    for (t, s) in into.iter_mut().enumerate() {
                        *s = _mm512_dpbusd_epi32(*s, wv, bcast(t, 4 * j));
                    }
                }
            } else {
                for c in 0..4 {
                    let v = _mm512_loadu_si512(blk.add(64 * c).cast());
                    let mut lo = _mm512_and_si512(v, low4);
                    let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low4);
                    if K::FIFTH {
                        let masks = blk.add(layout.masks + 16 * c).cast::<u64>();
                        lo = _mm512_mask_add_epi8(lo, masks.read_unaligned(), lo, sixteen);
                        hi = _mm512_mask_add_epi8(hi, masks.add(1).read_unaligned(), hi, sixteen);
                    }
                    for (t, s) in sum.iter_mut().enumerate() {
                        *s = _mm512_dpbusd_epi32(*s, lo, bcast(t, 4 * c));
                    }
                    let into = if split { &mut sum2 } else { &mut sum };
                    for (t, s) in into.iter_mut().enumerate() {
                        *s = _mm512_dpbusd_epi32(*s, hi, bcast(t, 16 + 4 * c));
                    }
                }
            }
            for (t, acc) in acc.iter_mut().enumerate() {
                let s = if split {
                    _mm512_add_epi32(sum[t], sum2[t])
                } else {
                    sum[t]
                };
                let ds = a[t].ds.add(2 * b);
                let scale = _mm512_mul_ps(d, _mm512_set1_ps(*ds));
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, *acc);
                *acc = _mm512_fmadd_ps(m, _mm512_set1_ps(*ds.add(1)), *acc);
            }
        }
    }
    for (p, acc) in acc.iter().enumerate() {
        let r0 = (p0 + p) * PANEL;
        let live = job.rows.saturating_sub(r0).min(PANEL);
        let mask: __mmask16 = if live == PANEL {
            0xFFFF
        } else {
            (1u16 << live) - 1
        };
        for (t, acc) in acc.iter().enumerate() {
            let out = y.0.add((t0 + t) * job.rows + r0);
            _mm512_mask_storeu_ps(out, mask, *acc);
        }
    }
}
