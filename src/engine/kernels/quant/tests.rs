//! Every kind and flavour against candle (its quantizer makes the weights, its `QMatMul` and
//! its dequantizer are the references), against exact f64 arithmetic, and against each other.

use candle_core::{
    quantized::{GgmlDType, QMatMul, QTensor},
    Device, Module, Tensor,
};

use super::*;

const KINDS: [(QuantKind, GgmlDType); 8] = [
    (QuantKind::Q4_0, GgmlDType::Q4_0),
    (QuantKind::Q4_1, GgmlDType::Q4_1),
    (QuantKind::Q5_0, GgmlDType::Q5_0),
    (QuantKind::Q5_1, GgmlDType::Q5_1),
    (QuantKind::Q8_0, GgmlDType::Q8_0),
    (QuantKind::Q4K, GgmlDType::Q4K),
    (QuantKind::Q5K, GgmlDType::Q5K),
    (QuantKind::Q6K, GgmlDType::Q6K),
];

/// xorshift64*: fixed seeds, no dependency.
struct Rng(u64);

impl Rng {
    /// Uniform in [-1, 1).
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
        bits as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn vec(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| self.next() * scale).collect()
    }
}

/// Every flavour this CPU runs: each ISA without extensions, and with VNNI where it has it.
fn flavours() -> Vec<(Isa, Extensions)> {
    let have = Extensions::detect();
    let mut out = Vec::new();
    for isa in Isa::all_supported() {
        out.push((isa, Extensions::default()));
        let vnni = match isa {
            Isa::Avx512 => have.avx512_vnni,
            Isa::Avx2 => have.avx_vnni,
            Isa::Scalar => false,
        };
        if vnni {
            out.push((isa, have));
        }
    }
    out
}

/// A random product: weights quantized by candle, activations with an all-zero row (t = 1)
/// and a few outliers, as real ones have.
struct Case {
    kind: QuantKind,
    rows: usize,
    cols: usize,
    n: usize,
    original: Tensor,
    qtensor: QTensor,
    bytes: Vec<u8>,
    x: Vec<f32>,
}

impl Case {
    fn new(
        kind: QuantKind,
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        n: usize,
        seed: u64,
    ) -> Case {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let w = rng.vec(rows * cols, 0.5);
        let mut x = rng.vec(n * cols, 1.0);
        if n > 1 {
            x[cols..2 * cols].fill(0.0);
        }
        for i in (0..x.len()).step_by(97) {
            x[i] *= 8.0;
        }
        let w = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        let qtensor = QTensor::quantize(&w, dtype).unwrap();
        let bytes = qtensor.data().unwrap().into_owned();
        assert_eq!(bytes.len(), rows * kind.row_bytes(cols));
        Case {
            original: w,
            kind,
            rows,
            cols,
            n,
            qtensor,
            bytes,
            x,
        }
    }

    fn run(&self, isa: Isa, ext: Extensions, scratch: &mut QuantScratch) -> Vec<f32> {
        let mut y = vec![f32::NAN; self.n * self.rows];
        matmul_with(
            isa,
            ext,
            self.kind,
            &self.bytes,
            self.rows,
            self.cols,
            &self.x,
            self.n,
            &mut y,
            scratch,
        );
        y
    }

    fn candle(&self) -> Vec<f32> {
        let q = QTensor::quantize(&self.original, self.qtensor.dtype()).unwrap();
        assert_eq!(q.data().unwrap().as_ref(), self.bytes.as_slice());
        let x = Tensor::from_vec(self.x.clone(), (self.n, self.cols), &Device::Cpu).unwrap();
        let y = QMatMul::from_qtensor(q).unwrap().forward(&x).unwrap();
        y.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn dequantized_tensor(&self) -> Tensor {
        self.qtensor.dequantize(&Device::Cpu).unwrap()
    }

    fn dequantized(&self) -> Vec<f32> {
        self.dequantized_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }
}

fn shapes(kind: QuantKind) -> impl Iterator<Item = (usize, usize)> {
    [
        (40, 256),
        (40, 512),
        (40, 576),
        (37, 544),
        (37, 768),
        (131, 256),
    ]
    .into_iter()
    .filter(move |&(_, cols)| cols % kind.block_elems() == 0)
}

/// For every output, with `W` candle's dequantized weights, `x̂` our quantized activations:
/// - exact arithmetic: |y - Σ W·x̂| ≤ 1e-5 · (1 + Σ|W·x̂|) (f64 reference; only f32 rounding);
/// - the real product: |y - Σ W·x| ≤ Σ |W| · step + the above, where `step` bounds the
///   quantization error of each activation (half a step `amax/127` of its block, plus the f16
///   rounding of the step);
/// - candle's `QMatMul`, which quantizes activations the same way (save ties and the f16 `s`,
///   see [`candle_s_rounding`]): |y - ref| ≤ 1e-3 · (1 + |ref|).
#[test]
fn every_kind_and_flavour_matches_candle_and_exact_arithmetic() {
    for (kind, dtype) in KINDS {
        for (rows, cols) in shapes(kind) {
            for n in [1, 3, 8] {
                let case = Case::new(kind, dtype, rows, cols, n, (rows * cols * n) as u64);
                let refs = References::new(&case);
                for (isa, ext) in flavours() {
                    let mut scratch = QuantScratch::default();
                    let ours = case.run(isa, ext, &mut scratch);
                    refs.check(&case, &ours, &scratch, &format!("{isa:?} {ext:?}"));
                }
            }
        }
    }
}

/// What a product is checked against: candle's dequantized weights and (where its product
/// takes the shape) candle's `QMatMul`.
struct References {
    w: Vec<f32>,
    candle: Option<Vec<f32>>,
}

impl References {
    fn new(case: &Case) -> References {
        let kind = case.kind;
        // candle's Q4_1, Q5_0 and Q5_1 products insist on an even number of blocks.
        let odd_blocks = (case.cols / kind.block_elems()) % 2 == 1;
        let even_only = matches!(kind, QuantKind::Q4_1 | QuantKind::Q5_0 | QuantKind::Q5_1);
        References {
            w: case.dequantized(),
            candle: (!(odd_blocks && even_only)).then(|| case.candle()),
        }
    }

    /// Checks `ours` (with the activations quantized in `scratch`) as the test above says.
    fn check(&self, case: &Case, ours: &[f32], scratch: &QuantScratch, flavour: &str) {
        let (kind, rows, cols, n) = (case.kind, case.rows, case.cols, case.n);
        for t in 0..n {
            // Per-column quantization step of the activations: d/2 from rounding,
            // plus |q|·|d - f16(d)| ≤ 127·d·2⁻¹¹ where d was stored as f16.
            let step: Vec<f64> = (0..cols)
                .map(|c| {
                    let block = kind.block_elems();
                    let xb = &case.x[t * cols + c / block * block..][..block];
                    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                    amax / 127.0 * (0.5 + 127.0 / 2048.0)
                })
                .collect();
            for r in 0..rows {
                let wr = &self.w[r * cols..(r + 1) * cols];
                let xr = &case.x[t * cols..(t + 1) * cols];
                let (mut exact, mut exact_abs, mut real, mut bound) = (0f64, 0f64, 0f64, 0f64);
                for c in 0..cols {
                    let xq = scratch.dequantized(kind, t, c);
                    exact += wr[c] as f64 * xq;
                    exact_abs += (wr[c] as f64 * xq).abs();
                    real += wr[c] as f64 * xr[c] as f64;
                    bound += (wr[c] as f64).abs() * step[c];
                }
                let got = ours[t * rows + r] as f64;
                let what = format!("{kind:?} {flavour} {rows}×{cols} n={n} t={t} r={r}");
                let tol = 1e-5 * (1.0 + exact_abs);
                assert!(
                    (got - exact).abs() <= tol,
                    "{what}: {got} vs exact {exact} (tol {tol})"
                );
                let tol = bound + 1e-5 * (1.0 + exact_abs);
                assert!(
                    (got - real).abs() <= tol,
                    "{what}: {got} vs f64 {real} (tol {tol})"
                );
                let Some(candle) = &self.candle else { continue };
                let reference = candle[t * rows + r] as f64;
                let tol = 1e-3 * (1.0 + reference.abs());
                let tol = tol + candle_s_rounding(case, scratch, t, r);
                assert!(
                    (got - reference).abs() <= tol,
                    "{what}: {got} vs candle {reference} (tol {tol})"
                );
            }
        }
    }
}

/// candle keeps `s = d·Σq` of each activation block as f16 (f16(Σq)·d rounded to f16), so
/// its min terms Σ m·s of Q4_1 and Q5_1 are off by up to 2⁻¹⁰ of each |m·s|; ours keep f32.
fn candle_s_rounding(case: &Case, scratch: &QuantScratch, t: usize, r: usize) -> f64 {
    if !matches!(case.kind, QuantKind::Q4_1 | QuantKind::Q5_1) {
        return 0.0;
    }
    let (bytes, row) = (case.kind.block_bytes(), case.kind.row_bytes(case.cols));
    let a = scratch.row32(t);
    let blocks = case.bytes[r * row..(r + 1) * row].chunks_exact(bytes);
    let sum: f64 = blocks
        .enumerate()
        .map(|(b, blk)| (scalar::unpack32(case.kind, blk).m as f64 * a.ds[2 * b + 1] as f64).abs())
        .sum();
    sum / 1024.0
}

/// The flavours differ only in the order f32 sums are taken.
#[test]
fn all_flavours_agree() {
    for (kind, dtype) in KINDS {
        for (rows, cols) in shapes(kind) {
            for n in [1, 2, 5, 9] {
                let case = Case::new(kind, dtype, rows, cols, n, 7 + n as u64);
                let mut scratch = QuantScratch::default();
                let base = case.run(Isa::Scalar, Extensions::default(), &mut scratch);
                for (isa, ext) in flavours() {
                    let ours = case.run(isa, ext, &mut scratch);
                    for (i, (a, b)) in ours.iter().zip(&base).enumerate() {
                        let tol = 2e-5 * (1.0 + b.abs());
                        let what = format!("{kind:?} {isa:?} {ext:?} {rows}×{cols} n={n} at {i}");
                        assert!((a - b).abs() <= tol, "{what}: {a} vs scalar {b}");
                    }
                }
            }
        }
    }
}

/// Every flavour quantizes activations to the same values (in its own layout).
#[test]
fn activation_quantizers_agree() {
    let mut rng = Rng(5);
    let (n, cols) = (3, 768);
    let mut x = rng.vec(n * cols, 3.0);
    x[..256].fill(0.0);
    x[300] = -9.0;
    x[301] = 9.0;
    for kind in [QuantKind::Q4_0, QuantKind::Q4K] {
        let mut base = QuantScratch::default();
        base.quantize(kind, Isa::Scalar, &x, n, cols);
        for isa in Isa::all_supported() {
            let mut scratch = QuantScratch::default();
            scratch.quantize(kind, isa, &x, n, cols);
            for t in 0..n {
                for c in 0..cols {
                    let (a, b) = (
                        scratch.dequantized(kind, t, c),
                        base.dequantized(kind, t, c),
                    );
                    assert_eq!(a, b, "{kind:?} {isa:?} t={t} c={c}");
                }
                if kind.is_k() {
                    assert_eq!(scratch.row_k(t).bsums, base.row_k(t).bsums);
                } else {
                    assert_eq!(
                        scratch.row32(t).ds[..cols / 16],
                        base.row32(t).ds[..cols / 16]
                    );
                }
            }
        }
    }
}

#[test]
fn dequantize_row_matches_candle_exactly() {
    for (kind, dtype) in KINDS {
        for (rows, cols) in shapes(kind) {
            let case = Case::new(kind, dtype, rows, cols, 1, 3);
            let reference = case.dequantized();
            let mut out = vec![0f32; cols];
            for r in [0, rows / 2, rows - 1] {
                dequantize_row(kind, &case.bytes, cols, r, &mut out);
                assert_eq!(
                    out,
                    reference[r * cols..(r + 1) * cols],
                    "{kind:?} {cols} row {r}"
                );
            }
        }
    }
}

#[test]
fn kinds_have_candles_block_sizes() {
    for (kind, dtype) in KINDS {
        assert_eq!(QuantKind::from_ggml(dtype), Some(kind));
        assert_eq!(kind.block_elems(), dtype.block_size(), "{kind:?}");
        assert_eq!(kind.block_bytes(), dtype.type_size(), "{kind:?}");
    }
    for dtype in [
        GgmlDType::F32,
        GgmlDType::F16,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q8_1,
    ] {
        assert_eq!(QuantKind::from_ggml(dtype), None);
    }
}

/// A warm scratch is reused, not reallocated, for products no larger than before.
#[test]
fn warm_scratch_does_not_reallocate() {
    let case = Case::new(QuantKind::Q4_1, GgmlDType::Q4_1, 40, 576, 8, 1);
    let mut scratch = QuantScratch::default();
    case.run(Isa::detect(), Extensions::detect(), &mut scratch);
    let before = scratch.qs.as_ptr();
    let small = Case::new(QuantKind::Q4_1, GgmlDType::Q4_1, 40, 576, 1, 2);
    small.run(Isa::detect(), Extensions::detect(), &mut scratch);
    assert_eq!(scratch.qs.as_ptr(), before);
}

/// The kinds with an interleaved layout.
const INTERLEAVED: [(QuantKind, GgmlDType); 5] = [
    (QuantKind::Q4_0, GgmlDType::Q4_0),
    (QuantKind::Q4_1, GgmlDType::Q4_1),
    (QuantKind::Q5_0, GgmlDType::Q5_0),
    (QuantKind::Q5_1, GgmlDType::Q5_1),
    (QuantKind::Q8_0, GgmlDType::Q8_0),
];

/// Row counts around whole panels (16) and columns of even and odd block counts.
/// (candle's Q8_0 product is off for 256 columns and rows a multiple of 16: not used.)
const PANEL_SHAPES: [(usize, usize); 5] = [(16, 576), (37, 576), (48, 544), (64, 96), (131, 256)];

impl Case {
    fn interleaved(&self) -> Interleaved {
        Interleaved::pack(self.kind, &self.bytes, self.rows, self.cols)
    }

    fn run_interleaved(
        &self,
        w: &Interleaved,
        isa: Isa,
        ext: Extensions,
        scratch: &mut QuantScratch,
    ) -> Vec<f32> {
        let mut y = vec![f32::NAN; self.n * self.rows];
        matmul_interleaved_with(isa, ext, w, &self.x, self.n, &mut y, scratch);
        y
    }
}

#[test]
fn interleaving_keeps_every_byte_and_dequantizes_as_candle() {
    for (kind, dtype) in INTERLEAVED {
        assert!(Interleaved::supports(kind));
        for (rows, cols) in PANEL_SHAPES {
            let case = Case::new(kind, dtype, rows, cols, 1, 11);
            let w = case.interleaved();
            assert_eq!((w.rows(), w.cols(), w.kind()), (rows, cols, kind));
            let row_bytes = kind.row_bytes(cols);
            let reference = case.dequantized();
            let mut out = vec![0f32; cols];
            for r in 0..rows {
                assert_eq!(
                    w.gguf_row(r),
                    case.bytes[r * row_bytes..(r + 1) * row_bytes],
                    "{kind:?} {rows}×{cols} row {r}"
                );
                w.row(r, &mut out);
                assert_eq!(out, reference[r * cols..(r + 1) * cols], "{kind:?} row {r}");
            }
        }
    }
    for kind in [QuantKind::Q4K, QuantKind::Q5K, QuantKind::Q6K] {
        assert!(!Interleaved::supports(kind) && !Interleaved::pays(kind));
    }
}

/// The panel kernel (and the portable one behind the other flavours) as every row kernel is
/// checked, for token counts around its tiles of 8 and row counts around its panels of 16.
#[test]
fn interleaved_products_match_candle_and_exact_arithmetic() {
    for (kind, dtype) in INTERLEAVED {
        for (rows, cols) in PANEL_SHAPES {
            for n in [1, 2, 3, 8, 9, 16, 17] {
                let case = Case::new(kind, dtype, rows, cols, n, (rows * cols + n) as u64);
                let w = case.interleaved();
                let refs = References::new(&case);
                for (isa, ext) in flavours() {
                    let mut scratch = QuantScratch::default();
                    let ours = case.run_interleaved(&w, isa, ext, &mut scratch);
                    refs.check(
                        &case,
                        &ours,
                        &scratch,
                        &format!("interleaved {isa:?} {ext:?}"),
                    );
                }
            }
        }
    }
}

/// Interleaved products equal the row kernels' up to the order of f32 sums, and matrices
/// appended panel by panel (fused layers) equal the matrix of all their rows.
#[test]
fn interleaved_products_agree_with_the_row_kernels() {
    for (kind, dtype) in INTERLEAVED {
        for (rows, cols) in PANEL_SHAPES {
            for n in [1, 4, 16, 25] {
                let case = Case::new(kind, dtype, rows, cols, n, 3 + n as u64);
                let mut scratch = QuantScratch::default();
                let base = case.run(Isa::Scalar, Extensions::default(), &mut scratch);
                let w = case.interleaved();
                for (isa, ext) in flavours() {
                    let ours = case.run_interleaved(&w, isa, ext, &mut scratch);
                    for (i, (a, b)) in ours.iter().zip(&base).enumerate() {
                        let tol = 2e-5 * (1.0 + b.abs());
                        let what = format!("{kind:?} {isa:?} {ext:?} {rows}×{cols} n={n} at {i}");
                        assert!((a - b).abs() <= tol, "{what}: {a} vs rows {b}");
                    }
                }
            }
        }
        // 32 + 16 + 37 rows as three matrices appended, against all of them at once.
        let (cols, n) = (256, 3);
        let case = Case::new(kind, dtype, 85, cols, n, 5);
        let row_bytes = kind.row_bytes(cols);
        let part = |rows: std::ops::Range<usize>| {
            let bytes = &case.bytes[rows.start * row_bytes..rows.end * row_bytes];
            Interleaved::pack(kind, bytes, rows.len(), cols)
        };
        let mut fused = part(0..32);
        let (second, third) = (part(32..48), part(48..85));
        assert!(fused.can_append(&second));
        fused.append(second);
        fused.append(third);
        assert!(
            !fused.can_append(&part(0..16)),
            "37 rows are not whole panels"
        );
        let mut scratch = QuantScratch::default();
        let whole = case.interleaved();
        let (isa, ext) = (Isa::detect(), Extensions::detect());
        assert_eq!(
            case.run_interleaved(&fused, isa, ext, &mut scratch),
            case.run_interleaved(&whole, isa, ext, &mut scratch)
        );
    }
}
