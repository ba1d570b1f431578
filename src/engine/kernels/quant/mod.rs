//! Products with weights in GGUF block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 in blocks of 32;
//! Q4_K, Q5_K, Q6_K in super-blocks of 256), read in place from the bytes candle loaded: no
//! copy, so a model's memory is its file's size. Where the CPU has AVX-512 VNNI, the 32-block
//! kinds are instead repacked once at load into [`Interleaved`] panels of 16 rows (the same
//! bytes, reordered), whose kernel keeps one row per i32 lane: several times faster when many
//! tokens meet each weight, as when decoding many sequences at once (see `interleaved`).
//!
//! As in llama.cpp, the activations are quantized once per call (to 8-bit blocks of 32 for the
//! 32-block kinds, to 8-bit super-blocks of 256 with 16-value sums for the K kinds), and every
//! dot product is an integer one per block, scaled in f32. The integer work runs on `vpdpbusd`
//! (u8 × i8 → i32) where the CPU has VNNI, else on `vpmaddubsw` + `vpmaddwd`. Partial sums of
//! all blocks stay in the lanes of one register per output until a single horizontal sum.
//!
//! One row of weights is unpacked once for up to 4 or 8 activation rows, so prompt processing
//! reads each weight block once per tile instead of once per token; decoding (one activation
//! row) takes four rows at a time. Rows are split across cores by `par_rows`.
//!
//! Layout of the code: `act` (and `act_avx512`) quantize activations into [`QuantScratch`], in
//! the order each flavour's kernels read them; `scalar` holds the portable kernels, the block
//! unpacking the tests check against, and the dequantizers; `tile` is the row and token
//! tiling the x86 kernels share; `avx512`/`avx2` (32-block kinds) and `avx512_k`/`avx2_k`
//! (K kinds) are those kernels; `interleaved` is the panel layout (repacking, dequantizing,
//! its portable kernel and dispatch) and `avx512_panel` its VNNI kernel. This module only
//! checks sizes and dispatches.

mod act;
#[cfg(target_arch = "x86_64")]
mod act_avx512;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx2_k;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512_k;
#[cfg(target_arch = "x86_64")]
mod avx512_panel;
mod interleaved;
mod scalar;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod tile;

use candle_core::quantized::GgmlDType;

use super::{par_rows, Extensions, Isa, SyncPtr};
pub use act::QuantScratch;
pub use interleaved::{matmul_interleaved, matmul_interleaved_with, Interleaved, PANEL};

/// Activation rows one unpacked weight row serves in the portable kernels.
const TOKENS_PER_TILE: usize = 4;

/// A GGUF block format these kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantKind {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl QuantKind {
    /// The kind for a candle block type; `None` for types without kernels here (the caller
    /// widens those to f32 or keeps candle's own product).
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::Q4_0 => QuantKind::Q4_0,
            GgmlDType::Q4_1 => QuantKind::Q4_1,
            GgmlDType::Q5_0 => QuantKind::Q5_0,
            GgmlDType::Q5_1 => QuantKind::Q5_1,
            GgmlDType::Q8_0 => QuantKind::Q8_0,
            GgmlDType::Q4K => QuantKind::Q4K,
            GgmlDType::Q5K => QuantKind::Q5K,
            GgmlDType::Q6K => QuantKind::Q6K,
            _ => return None,
        })
    }

    /// Weights per block: 32, or 256 for the K kinds.
    pub fn block_elems(self) -> usize {
        if self.is_k() {
            256
        } else {
            32
        }
    }

    /// Bytes per block, as in GGUF (and in candle's `QTensor::data()`).
    pub fn block_bytes(self) -> usize {
        match self {
            QuantKind::Q4_0 => 18,
            QuantKind::Q4_1 => 20,
            QuantKind::Q5_0 => 22,
            QuantKind::Q5_1 => 24,
            QuantKind::Q8_0 => 34,
            QuantKind::Q4K => 144,
            QuantKind::Q5K => 176,
            QuantKind::Q6K => 210,
        }
    }

    /// Bytes of one row of `cols` weights (`cols` a multiple of [`Self::block_elems`]).
    pub fn row_bytes(self, cols: usize) -> usize {
        debug_assert!(cols.is_multiple_of(self.block_elems()));
        cols / self.block_elems() * self.block_bytes()
    }

    /// Whether activations are quantized to 256-element super-blocks (else to blocks of 32).
    fn is_k(self) -> bool {
        matches!(self, QuantKind::Q4K | QuantKind::Q5K | QuantKind::Q6K)
    }
}

/// `y[t·rows + r] = Σ_c W[r, c] · x[t·cols + c]` for `t < n`, `r < rows`, with the detected
/// flavour. `w` holds `rows` rows of `kind` blocks; `x` is quantized into `scratch` first.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    kind: QuantKind,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    y: &mut [f32],
    scratch: &mut QuantScratch,
) {
    let (isa, ext) = (Isa::detect(), Extensions::detect());
    matmul_with(isa, ext, kind, w, rows, cols, x, n, y, scratch)
}

/// [`matmul`] with an explicit flavour (tests and benchmarks run each one). A flavour or
/// extension the CPU lacks is lowered to one it has.
#[allow(clippy::too_many_arguments)]
pub fn matmul_with(
    isa: Isa,
    ext: Extensions,
    kind: QuantKind,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    y: &mut [f32],
    scratch: &mut QuantScratch,
) {
    assert!(
        cols.is_multiple_of(kind.block_elems()),
        "{cols} columns are not whole {kind:?} blocks"
    );
    assert!(
        w.len() >= rows * kind.row_bytes(cols),
        "{kind:?} weights hold {} bytes, not {rows} rows of {cols}",
        w.len()
    );
    assert!(
        x.len() >= n * cols,
        "x holds {} values, not {n}×{cols}",
        x.len()
    );
    assert!(
        y.len() >= n * rows,
        "y holds {} values, not {n}×{rows}",
        y.len()
    );
    if rows == 0 || n == 0 {
        return;
    }
    let flavour = Flavour::new(isa, ext);
    scratch.quantize(kind, flavour.isa, &x[..n * cols], n, cols);
    let scratch = &*scratch;
    let out = SyncPtr(y.as_mut_ptr());
    let job = Job {
        kind,
        w,
        rows,
        cols,
        n,
    };
    par_rows(rows, 4, cols * n, |range| {
        // SAFETY: sizes were checked above and `scratch` holds n quantized rows of `cols`;
        // this range's outputs y[t·rows + r], r in range, belong to no other range.
        unsafe { flavour.run(&job, scratch, out, range) }
    });
}

/// Dequantizes row `r` of `w` (rows of `cols` weights) into `out[..cols]`: embedding lookups.
pub fn dequantize_row(kind: QuantKind, w: &[u8], cols: usize, r: usize, out: &mut [f32]) {
    assert!(
        cols.is_multiple_of(kind.block_elems()),
        "{cols} columns are not whole {kind:?} blocks"
    );
    let row_bytes = kind.row_bytes(cols);
    let row = &w[r * row_bytes..(r + 1) * row_bytes];
    scalar::dequantize(kind, row, &mut out[..cols]);
}

/// One product, as the kernels see it.
struct Job<'a> {
    kind: QuantKind,
    w: &'a [u8],
    rows: usize,
    cols: usize,
    n: usize,
}

/// The kernels a call runs with: an [`Isa`] the CPU has and whether VNNI is used.
#[derive(Clone, Copy)]
struct Flavour {
    isa: Isa,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    vnni: bool,
}

impl Flavour {
    fn new(isa: Isa, ext: Extensions) -> Flavour {
        let isa = isa.min(Isa::best_supported());
        let have = Extensions::detect();
        let vnni = match isa {
            Isa::Avx512 => ext.avx512_vnni && have.avx512_vnni,
            Isa::Avx2 => ext.avx_vnni && have.avx_vnni,
            Isa::Scalar => false,
        };
        Flavour { isa, vnni }
    }

    /// Rows `range` of the product.
    ///
    /// # Safety
    /// As `matmul_with` checked: `job.w`, `scratch` (quantized for `job.kind` and this flavour's
    /// isa) and `y` (n×rows) are large enough; no other thread writes these rows' outputs.
    unsafe fn run(
        self,
        job: &Job<'_>,
        scratch: &QuantScratch,
        y: SyncPtr<f32>,
        range: std::ops::Range<usize>,
    ) {
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if job.kind.is_k() => avx512_k::rows(self.vnni, job, scratch, y, range),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512::rows(self.vnni, job, scratch, y, range),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 if job.kind.is_k() => avx2_k::rows(self.vnni, job, scratch, y, range),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2::rows(self.vnni, job, scratch, y, range),
            _ => scalar::rows(job, scratch, y, range),
        }
    }
}
