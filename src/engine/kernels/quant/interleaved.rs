//! Weights of the 32-block kinds (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) repacked at load into panels of
//! [`PANEL`] rows whose blocks are interleaved, for the AVX-512 VNNI kernel in `avx512_panel`.
//!
//! Why: the row kernels (`tile`) give every output its own accumulator, four i32 lanes per
//! block, and pay a conversion, a scale and a min term in f32 for every (row, token, group of
//! four blocks): two `vpdpbusd` among about nine vector instructions. With 16 rows side by side
//! each i32 lane is one row: a block of 16 rows is 8 `vpdpbusd` against 4 broadcast activation
//! bytes each, and its f32 work (convert, scale, min) is shared by the 16 rows, so about two
//! thirds of the instructions are integer dot products. The unpacked weights of a block stay
//! in registers for up to 8 tokens. Decoding many sequences at once is this case.
//!
//! The repacking keeps every byte of the file (the same size, no copy kept): per panel and per
//! block, in this order,
//! - the 4-bit kinds: 256 bytes of nibbles, 4 chunks of 64 where chunk `c`, lane `r` (4
//!   bytes) holds bytes `4c..4c + 4` of row `r`'s packed values (low nibbles: values
//!   `4c + i`, high nibbles: values `16 + 4c + i`);
//! - Q5_0/Q5_1 then the fifth bits as 8 masks of 64 bits, mask `2c + h` holding at bit
//!   `4r + i` the fifth bit of value `16h + 4c + i` of row `r`;
//! - Q8_0: 512 bytes, 8 chunks of 64 where chunk `j`, lane `r` holds values `4j..4j + 4` of row
//!   `r`, plus 128 (sign bit flipped, so `vpdpbusd` takes them as unsigned);
//! - the 16 f16 `d`, then for Q4_1/Q5_1 the 16 f16 `m`.
//!
//! Rows past the last in a partial panel are zero blocks (`d = 0`).

use super::{par_rows, scalar, Extensions, Isa, QuantKind, QuantScratch, SyncPtr};

/// Rows per panel: one per i32 lane of an AVX-512 register.
pub const PANEL: usize = 16;

/// A `rows × cols` matrix of a 32-block kind in interleaved panels (see the module).
#[derive(Clone)]
pub struct Interleaved {
    kind: QuantKind,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

/// Where the parts of one panel block lie.
#[derive(Clone, Copy)]
pub(super) struct BlockLayout {
    /// Bytes of one panel block (16 GGUF blocks).
    pub bytes: usize,
    /// Offset of the fifth-bit masks (Q5 kinds).
    pub masks: usize,
    /// Offset of the 16 `d`.
    pub d: usize,
    /// Offset of the 16 `m` (kinds with a min).
    pub m: usize,
}

impl BlockLayout {
    #[inline(always)]
    pub(super) fn of(kind: QuantKind) -> BlockLayout {
        let (masks, d, m) = match kind {
            QuantKind::Q4_0 => (0, 256, 0),
            QuantKind::Q4_1 => (0, 256, 288),
            QuantKind::Q5_0 => (256, 320, 0),
            QuantKind::Q5_1 => (256, 320, 352),
            _ => (0, 512, 0),
        };
        BlockLayout {
            bytes: PANEL * kind.block_bytes(),
            masks,
            d,
            m,
        }
    }
}

/// Byte offsets of `d`, `m`, `qh` and the packed values within a GGUF block of `kind`.
fn gguf_offsets(kind: QuantKind) -> (Option<usize>, Option<usize>, usize) {
    match kind {
        QuantKind::Q4_0 => (None, None, 2),
        QuantKind::Q4_1 => (Some(2), None, 4),
        QuantKind::Q5_0 => (None, Some(2), 6),
        QuantKind::Q5_1 => (Some(2), Some(4), 8),
        _ => (None, None, 2),
    }
}

impl Interleaved {
    /// Whether `kind` has an interleaved layout.
    pub fn supports(kind: QuantKind) -> bool {
        matches!(
            kind,
            QuantKind::Q4_0 | QuantKind::Q4_1 | QuantKind::Q5_0 | QuantKind::Q5_1 | QuantKind::Q8_0
        )
    }

    /// Whether products of `kind` run faster interleaved on this CPU (with the detected
    /// flavour): AVX-512 with VNNI. Elsewhere the row kernels read the file's layout.
    pub fn pays(kind: QuantKind) -> bool {
        Self::supports(kind) && vnni512(Isa::detect(), Extensions::detect())
    }

    /// Repacks `rows` rows of `cols` from GGUF blocks (`w`, as in the file).
    pub fn pack(kind: QuantKind, w: &[u8], rows: usize, cols: usize) -> Interleaved {
        assert!(Self::supports(kind), "{kind:?} has no interleaved layout");
        assert!(
            cols.is_multiple_of(32),
            "{cols} columns are not whole blocks"
        );
        let row_bytes = kind.row_bytes(cols);
        assert!(w.len() >= rows * row_bytes, "{kind:?} weights are short");
        let blocks = cols / 32;
        let bb = kind.block_bytes();
        let layout = BlockLayout::of(kind);
        let panels = rows.div_ceil(PANEL);
        let mut data = vec![0u8; panels * blocks * layout.bytes];
        let (min_at, qh_at, qs_at) = gguf_offsets(kind);
        for (i, dst) in data.chunks_exact_mut(layout.bytes).enumerate() {
            let (p, b) = (i / blocks, i % blocks);
            for lane in 0..PANEL.min(rows - p * PANEL) {
                let r = p * PANEL + lane;
                let src = &w[r * row_bytes + b * bb..][..bb];
                dst[layout.d + 2 * lane..][..2].copy_from_slice(&src[..2]);
                if kind == QuantKind::Q8_0 {
                    for j in 0..8 {
                        for i in 0..4 {
                            dst[64 * j + 4 * lane + i] = src[2 + 4 * j + i] ^ 0x80;
                        }
                    }
                    continue;
                }
                if let Some(at) = min_at {
                    dst[layout.m + 2 * lane..][..2].copy_from_slice(&src[at..at + 2]);
                }
                for c in 0..4 {
                    dst[64 * c + 4 * lane..][..4].copy_from_slice(&src[qs_at + 4 * c..][..4]);
                }
                if let Some(at) = qh_at {
                    let qh = u32::from_le_bytes(src[at..at + 4].try_into().unwrap());
                    for c in 0..4 {
                        for h in 0..2 {
                            let bits = (qh >> (16 * h + 4 * c)) as u64 & 0xF;
                            let at = layout.masks + 8 * (2 * c + h);
                            let mask = u64::from_le_bytes(dst[at..at + 8].try_into().unwrap());
                            let mask = mask | bits << (4 * lane);
                            dst[at..at + 8].copy_from_slice(&mask.to_le_bytes());
                        }
                    }
                }
            }
        }
        Interleaved {
            kind,
            rows,
            cols,
            data,
        }
    }

    pub fn kind(&self) -> QuantKind {
        self.kind
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Whether `other`'s rows can follow this matrix's (the same kind and columns, and this
    /// one's rows whole panels).
    pub fn can_append(&self, other: &Interleaved) -> bool {
        self.kind == other.kind && self.cols == other.cols && self.rows.is_multiple_of(PANEL)
    }

    /// Appends `other`'s rows (see [`Interleaved::can_append`]).
    pub fn append(&mut self, other: Interleaved) {
        assert!(self.can_append(&other), "interleaved matrices do not fit");
        self.rows += other.rows;
        self.data.extend(other.data);
    }

    /// Bytes of one panel.
    fn panel_bytes(&self) -> usize {
        self.cols / 32 * BlockLayout::of(self.kind).bytes
    }

    /// Block `b` of row `r` in the file's layout.
    fn gguf_block(&self, r: usize, b: usize) -> [u8; 34] {
        let kind = self.kind;
        let layout = BlockLayout::of(kind);
        let (p, lane) = (r / PANEL, r % PANEL);
        let src = &self.data[p * self.panel_bytes() + b * layout.bytes..][..layout.bytes];
        let mut out = [0u8; 34];
        out[..2].copy_from_slice(&src[layout.d + 2 * lane..][..2]);
        if kind == QuantKind::Q8_0 {
            for j in 0..8 {
                for i in 0..4 {
                    out[2 + 4 * j + i] = src[64 * j + 4 * lane + i] ^ 0x80;
                }
            }
            return out;
        }
        let (min_at, qh_at, qs_at) = gguf_offsets(kind);
        if let Some(at) = min_at {
            out[at..at + 2].copy_from_slice(&src[layout.m + 2 * lane..][..2]);
        }
        for c in 0..4 {
            out[qs_at + 4 * c..][..4].copy_from_slice(&src[64 * c + 4 * lane..][..4]);
        }
        if let Some(at) = qh_at {
            let mut qh = 0u32;
            for c in 0..4 {
                for h in 0..2 {
                    let m = layout.masks + 8 * (2 * c + h);
                    let mask = u64::from_le_bytes(src[m..m + 8].try_into().unwrap());
                    qh |= ((mask >> (4 * lane)) as u32 & 0xF) << (16 * h + 4 * c);
                }
            }
            out[at..at + 4].copy_from_slice(&qh.to_le_bytes());
        }
        out
    }

    /// Row `r` in the file's layout (tests check the repacking round trip).
    pub fn gguf_row(&self, r: usize) -> Vec<u8> {
        assert!(r < self.rows);
        let bb = self.kind.block_bytes();
        (0..self.cols / 32)
            .flat_map(|b| self.gguf_block(r, b)[..bb].to_vec())
            .collect()
    }

    /// Dequantizes row `r` into `out[..cols]` (embedding lookups), exactly as the file's
    /// layout would.
    pub fn row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows && out.len() >= self.cols);
        let bb = self.kind.block_bytes();
        for (b, out) in out[..self.cols].chunks_exact_mut(32).enumerate() {
            let block = self.gguf_block(r, b);
            scalar::dequantize(self.kind, &block[..bb], out);
        }
    }
}

/// Whether `isa` and `ext` select the AVX-512 VNNI kernel on this CPU.
fn vnni512(isa: Isa, ext: Extensions) -> bool {
    isa.min(Isa::best_supported()) == Isa::Avx512
        && ext.avx512_vnni
        && Extensions::detect().avx512_vnni
}

/// `y[t·rows + r] = Σ_c W[r, c] · x[t·cols + c]` for `t < n`, `r < rows`, with the detected
/// flavour (see [`matmul_interleaved_with`]).
pub fn matmul_interleaved(
    w: &Interleaved,
    x: &[f32],
    n: usize,
    y: &mut [f32],
    scratch: &mut QuantScratch,
) {
    matmul_interleaved_with(Isa::detect(), Extensions::detect(), w, x, n, y, scratch)
}

/// [`matmul_interleaved`] with an explicit flavour: AVX-512 with VNNI runs the panel kernel;
/// every other flavour a portable one (correct, not fast: models keep the file's layout where
/// the panel kernel does not run, see [`Interleaved::pays`]).
pub fn matmul_interleaved_with(
    isa: Isa,
    ext: Extensions,
    w: &Interleaved,
    x: &[f32],
    n: usize,
    y: &mut [f32],
    scratch: &mut QuantScratch,
) {
    let (rows, cols) = (w.rows, w.cols);
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
    let fast = vnni512(isa, ext);
    // Activations in element order with [d, s] per block, as both kernels read them.
    scratch.quantize_in_order(w.kind, isa, &x[..n * cols], n, cols);
    let scratch = &*scratch;
    let out = SyncPtr(y.as_mut_ptr());
    let panels = rows.div_ceil(PANEL);
    // Ranges of whole panels; for decoding, pairs (its kernel takes four panels at a time,
    // then single ones; ranges of 4 would leave 576 rows, 36 panels, in 5 uneven ranges).
    let grain = if n == 1 { 2 } else { 1 };
    par_rows(panels, grain, PANEL * cols * n, |range| {
        #[cfg(target_arch = "x86_64")]
        if fast {
            // SAFETY: the CPU has AVX-512 F/BW/VL/DQ and VNNI (vnni512); sizes were checked
            // above; this range's panels' outputs belong to no other range.
            unsafe { super::avx512_panel::panels(w, n, scratch, out, range) };
            return;
        }
        let _ = fast;
        // SAFETY: as above.
        unsafe { portable(w, n, scratch, out, range) };
    });
}

/// The bytes and shape the panel kernel reads.
pub(super) struct PanelJob<'a> {
    pub kind: QuantKind,
    pub data: &'a [u8],
    pub rows: usize,
    pub cols: usize,
    pub panel_bytes: usize,
}

impl Interleaved {
    pub(super) fn job(&self) -> PanelJob<'_> {
        PanelJob {
            kind: self.kind,
            data: &self.data,
            rows: self.rows,
            cols: self.cols,
            panel_bytes: self.panel_bytes(),
        }
    }
}

/// Panels `range` with the portable kernel: each block of each row back in the file's layout,
/// unpacked as `scalar` does.
///
/// # Safety
/// `y` holds n × rows values; no other thread writes these panels' outputs.
unsafe fn portable(
    w: &Interleaved,
    n: usize,
    scratch: &QuantScratch,
    y: SyncPtr<f32>,
    range: std::ops::Range<usize>,
) {
    let bb = w.kind.block_bytes();
    for r in range.start * PANEL..(range.end * PANEL).min(w.rows) {
        let blocks: Vec<scalar::Block32> = (0..w.cols / 32)
            .map(|b| scalar::unpack32(w.kind, &w.gguf_block(r, b)[..bb]))
            .collect();
        for t in 0..n {
            let a = scratch.row32(t);
            assert!(a.group == 0, "activations quantized for another flavour");
            let mut acc = 0f32;
            for (b, k) in blocks.iter().enumerate() {
                let isum: i32 =
                    k.q.iter()
                        .zip(&a.qs[32 * b..32 * (b + 1)])
                        .map(|(&w, &a)| w as i32 * a as i32)
                        .sum();
                acc += k.d * a.ds[2 * b] * isum as f32 + k.m * a.ds[2 * b + 1];
            }
            // SAFETY: (t, r) is in range and this thread's (the caller's contract).
            unsafe { *y.0.add(t * w.rows + r) = acc };
        }
    }
}
