//! The portable flavour, and the block unpacking every flavour is checked against: each block
//! is widened to i8 values once and dotted with up to [`TOKENS_PER_TILE`] activation rows in
//! plain loops that the compiler vectorises. Also the dequantizers behind `dequantize_row`.

use std::ops::Range;

use super::{Job, QuantKind, QuantScratch, SyncPtr, TOKENS_PER_TILE};

/// A 32-block widened: weight `i` is `d · q[i] + m`.
pub(super) struct Block32 {
    pub q: [i8; 32],
    pub d: f32,
    pub m: f32,
}

/// A super-block widened: weight `i` is `d · sc[i / 16] · q[i] - dmin · mins[i / 16]`.
pub(super) struct BlockK {
    pub q: [i8; 256],
    pub sc: [i32; 16],
    pub mins: [i32; 16],
    pub d: f32,
    pub dmin: f32,
}

/// Unpacks one block of a 32-block kind (`b` holds exactly its bytes). Symmetric kinds come out
/// centred (`m = 0`).
#[inline(always)]
pub(super) fn unpack32(kind: QuantKind, b: &[u8]) -> Block32 {
    let mut q = [0i8; 32];
    let d = f16_at(b, 0);
    let nibbles = |q: &mut [i8; 32], qs: &[u8], high: u32, offset: i8| {
        for j in 0..16 {
            let h0 = (((high >> j) & 1) << 4) as i8;
            let h1 = (((high >> (j + 16)) & 1) << 4) as i8;
            q[j] = ((qs[j] & 0x0F) as i8 | h0) - offset;
            q[j + 16] = ((qs[j] >> 4) as i8 | h1) - offset;
        }
    };
    let qh = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let m = match kind {
        QuantKind::Q4_0 => {
            nibbles(&mut q, &b[2..18], 0, 8);
            0.0
        }
        QuantKind::Q4_1 => {
            nibbles(&mut q, &b[4..20], 0, 0);
            f16_at(b, 2)
        }
        QuantKind::Q5_0 => {
            nibbles(&mut q, &b[6..22], qh(2), 16);
            0.0
        }
        QuantKind::Q5_1 => {
            nibbles(&mut q, &b[8..24], qh(4), 0);
            f16_at(b, 2)
        }
        QuantKind::Q8_0 => {
            for (q, &v) in q.iter_mut().zip(&b[2..34]) {
                *q = v as i8;
            }
            0.0
        }
        QuantKind::Q4K | QuantKind::Q5K | QuantKind::Q6K => unreachable!("not a 32-block kind"),
    };
    Block32 { q, d, m }
}

/// Unpacks one super-block of a K kind (`b` holds exactly its bytes).
#[inline(always)]
pub(super) fn unpack_k(kind: QuantKind, b: &[u8]) -> BlockK {
    let mut out = BlockK {
        q: [0; 256],
        sc: [0; 16],
        mins: [0; 16],
        d: 0.0,
        dmin: 0.0,
    };
    match kind {
        QuantKind::Q4K | QuantKind::Q5K => {
            out.d = f16_at(b, 0);
            out.dmin = f16_at(b, 2);
            let (sc, m) = scales_mins_k4(&b[4..16]);
            for j in 0..16 {
                out.sc[j] = sc[j / 2] as i32;
                out.mins[j] = m[j / 2] as i32;
            }
            let (qh, qs) = if kind == QuantKind::Q5K {
                (Some(&b[16..48]), &b[48..176])
            } else {
                (None, &b[16..144])
            };
            for c in 0..4 {
                for l in 0..32 {
                    let v = qs[32 * c + l];
                    let (h0, h1) = qh.map_or((0, 0), |qh| {
                        ((qh[l] >> (2 * c)) & 1, (qh[l] >> (2 * c + 1)) & 1)
                    });
                    out.q[64 * c + l] = ((v & 0x0F) | (h0 << 4)) as i8;
                    out.q[64 * c + 32 + l] = ((v >> 4) | (h1 << 4)) as i8;
                }
            }
        }
        QuantKind::Q6K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            out.d = f16_at(b, 208);
            for (s, &v) in out.sc.iter_mut().zip(sc) {
                *s = v as i8 as i32;
            }
            for h in 0..2 {
                let (ql, qh, q) = (&ql[64 * h..], &qh[32 * h..], &mut out.q[128 * h..]);
                for l in 0..32 {
                    let six =
                        |low: u8, shift: u32| (low | (((qh[l] >> shift) & 3) << 4)) as i8 - 32;
                    q[l] = six(ql[l] & 0x0F, 0);
                    q[l + 32] = six(ql[l + 32] & 0x0F, 2);
                    q[l + 64] = six(ql[l] >> 4, 4);
                    q[l + 96] = six(ql[l + 32] >> 4, 6);
                }
            }
        }
        _ => unreachable!("not a K kind"),
    }
    out
}

/// Dequantizes one row (`row` holds exactly its bytes) into `out`.
pub(super) fn dequantize(kind: QuantKind, row: &[u8], out: &mut [f32]) {
    let (elems, bytes) = (kind.block_elems(), kind.block_bytes());
    for (b, out) in row.chunks_exact(bytes).zip(out.chunks_exact_mut(elems)) {
        if kind.is_k() {
            let k = unpack_k(kind, b);
            for (i, o) in out.iter_mut().enumerate() {
                let (sc, m) = (k.sc[i / 16] as f32, k.mins[i / 16] as f32);
                *o = k.d * sc * k.q[i] as f32 - k.dmin * m;
            }
        } else {
            let k = unpack32(kind, b);
            for (o, &q) in out.iter_mut().zip(&k.q) {
                *o = k.d * q as f32 + k.m;
            }
        }
    }
}

#[inline(always)]
fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&a, &b)| a as i32 * b as i32).sum()
}

/// Rows `range` of the product, portable flavour.
///
/// # Safety
/// As [`super::Flavour::run`].
pub(super) unsafe fn rows(
    job: &Job<'_>,
    scratch: &QuantScratch,
    y: SyncPtr<f32>,
    range: Range<usize>,
) {
    let (kind, cols, n) = (job.kind, job.cols, job.n);
    let (row_bytes, bytes) = (kind.row_bytes(cols), kind.block_bytes());
    for r in range {
        let row = &job.w[r * row_bytes..(r + 1) * row_bytes];
        let mut t0 = 0;
        while t0 < n {
            let tn = (n - t0).min(TOKENS_PER_TILE);
            let mut acc = [0f32; TOKENS_PER_TILE];
            for (b, blk) in row.chunks_exact(bytes).enumerate() {
                if kind.is_k() {
                    let k = unpack_k(kind, blk);
                    for (i, acc) in acc[..tn].iter_mut().enumerate() {
                        let a = scratch.row_k(t0 + i);
                        assert!(!a.swapped, "activations quantized for another flavour");
                        let aq = &a.qs[256 * b..256 * (b + 1)];
                        let sums = &a.bsums[16 * b..16 * (b + 1)];
                        let mut isum = 0i32;
                        let mut msum = 0i32;
                        for j in 0..16 {
                            isum += k.sc[j]
                                * dot_i8(&k.q[16 * j..16 * j + 16], &aq[16 * j..16 * j + 16]);
                            msum += k.mins[j] * sums[j] as i32;
                        }
                        *acc += a.d[b] * (k.d * isum as f32 - k.dmin * msum as f32);
                    }
                } else {
                    let k = unpack32(kind, blk);
                    for (i, acc) in acc[..tn].iter_mut().enumerate() {
                        let a = scratch.row32(t0 + i);
                        assert!(a.group == 0, "activations quantized for another flavour");
                        let isum = dot_i8(&k.q, &a.qs[32 * b..32 * (b + 1)]);
                        *acc += k.d * a.ds[2 * b] * isum as f32 + k.m * a.ds[2 * b + 1];
                    }
                }
            }
            for (i, &v) in acc[..tn].iter().enumerate() {
                // SAFETY: (t0 + i, r) is in range and this thread's (Flavour::run's contract).
                unsafe { *y.0.add((t0 + i) * job.rows + r) = v };
            }
            t0 += tn;
        }
    }
}

/// Reads a little-endian f16 at `p[at..]` as f32.
#[inline(always)]
fn f16_at(p: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([p[at], p[at + 1]])).to_f32()
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K super-block's 12 scale bytes.
#[inline(always)]
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// All eight (scale, min) pairs of a Q4_K/Q5_K super-block, as two arrays of bytes.
#[inline(always)]
fn scales_mins_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    for j in 0..8 {
        (sc[j], m[j]) = scale_min_k4(j, s);
    }
    (sc, m)
}
