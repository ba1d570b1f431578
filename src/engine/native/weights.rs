//! Weight matrices of the native forward pass, read from safetensors or GGUF into the layout the
//! kernels take: dense rows (f32, f16, bf16), or GGUF blocks as they are in the file, or (32-block
//! kinds, on CPUs with AVX-512 VNNI) the same blocks reordered into interleaved panels of 16 rows.
//! Matrices that one input feeds (q, k, v; gate, up) are fused into one when their formats
//! match, so decode runs one product where it would run three.

use std::{fs::File, path::PathBuf};

use candle_core::{quantized::gguf_file, safetensors::MmapedSafetensors, DType, Device};
use half::{bf16, f16};

use crate::engine::kernels::{
    dense::{self, DenseWeights},
    packed::{self, Packed, PackedWeights},
    quant::{self, Interleaved, QuantKind, QuantScratch},
};

/// The values of a `rows × cols` matrix: row-major as in the file, or (dense types) repacked
/// into panels for the GEMM kernel once nothing more is fused into it, or (32-block GGUF kinds,
/// where the CPU runs their kernel) repacked at load into interleaved panels of 16 rows.
pub enum Matrix {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
    Quant(QuantKind, Vec<u8>),
    Interleaved(Interleaved),
    PackedF32(Packed<f32>),
    PackedF16(Packed<f16>),
    PackedBf16(Packed<bf16>),
}

impl Matrix {
    fn same_format(&self, other: &Matrix) -> bool {
        match (self, other) {
            (Matrix::F32(_), Matrix::F32(_))
            | (Matrix::F16(_), Matrix::F16(_))
            | (Matrix::Bf16(_), Matrix::Bf16(_)) => true,
            (Matrix::Quant(a, _), Matrix::Quant(b, _)) => a == b,
            (Matrix::Interleaved(a), Matrix::Interleaved(b)) => a.can_append(b),
            _ => false,
        }
    }

    /// Repacks dense row-major values into panels (others are left as they are).
    fn pack(self, rows: usize, cols: usize) -> Matrix {
        match self {
            Matrix::F32(v) => Matrix::PackedF32(Packed::pack(&v, rows, cols)),
            Matrix::F16(v) => Matrix::PackedF16(Packed::pack(&v, rows, cols)),
            Matrix::Bf16(v) => Matrix::PackedBf16(Packed::pack(&v, rows, cols)),
            other => other,
        }
    }

    fn append(&mut self, other: Matrix) {
        match (self, other) {
            (Matrix::F32(a), Matrix::F32(b)) => a.extend(b),
            (Matrix::F16(a), Matrix::F16(b)) => a.extend(b),
            (Matrix::Bf16(a), Matrix::Bf16(b)) => a.extend(b),
            (Matrix::Quant(_, a), Matrix::Quant(_, b)) => a.extend(b),
            (Matrix::Interleaved(a), Matrix::Interleaved(b)) => a.append(b),
            _ => unreachable!("append is called only on matrices of the same format"),
        }
    }
}

/// A linear layer `y = x · Wᵀ (+ b)`.
pub struct Linear {
    pub rows: usize,
    pub cols: usize,
    pub matrix: Matrix,
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    /// `y[t·rows + r]` for `n` input rows of `cols`.
    pub fn forward(&self, x: &[f32], n: usize, y: &mut [f32], scratch: &mut QuantScratch) {
        let y = &mut y[..n * self.rows];
        match &self.matrix {
            Matrix::F32(w) => dense::matmul(DenseWeights::F32(w), self.rows, self.cols, x, n, y),
            Matrix::F16(w) => dense::matmul(DenseWeights::F16(w), self.rows, self.cols, x, n, y),
            Matrix::Bf16(w) => dense::matmul(DenseWeights::Bf16(w), self.rows, self.cols, x, n, y),
            Matrix::Quant(kind, w) => {
                quant::matmul(*kind, w, self.rows, self.cols, x, n, y, scratch)
            }
            Matrix::Interleaved(w) => quant::matmul_interleaved(w, x, n, y, scratch),
            Matrix::PackedF32(p) => packed::matmul(PackedWeights::F32(p), x, n, y),
            Matrix::PackedF16(p) => packed::matmul(PackedWeights::F16(p), x, n, y),
            Matrix::PackedBf16(p) => packed::matmul(PackedWeights::Bf16(p), x, n, y),
        }
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(self.rows) {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
        }
    }

    /// Row `r` as f32 (embedding lookup).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        match &self.matrix {
            Matrix::F32(w) => DenseWeights::F32(w).row_into(self.cols, r, out),
            Matrix::F16(w) => DenseWeights::F16(w).row_into(self.cols, r, out),
            Matrix::Bf16(w) => DenseWeights::Bf16(w).row_into(self.cols, r, out),
            Matrix::Quant(kind, w) => quant::dequantize_row(*kind, w, self.cols, r, out),
            Matrix::Interleaved(w) => w.row(r, out),
            Matrix::PackedF32(_) | Matrix::PackedF16(_) | Matrix::PackedBf16(_) => {
                unreachable!("embeddings are never packed")
            }
        }
    }

    /// This layer with its dense weights in panels (see [`Matrix`]).
    pub fn packed(self) -> Linear {
        Linear {
            matrix: self.matrix.pack(self.rows, self.cols),
            ..self
        }
    }
}

/// Linear layers that read the same input: fused into one when their formats match, else run
/// one after the other.
pub struct Fused {
    pub parts: Vec<Linear>,
    /// Output width of each original layer, in order.
    pub widths: Vec<usize>,
}

impl Fused {
    pub fn new(layers: Vec<Linear>) -> Self {
        let widths: Vec<usize> = layers.iter().map(|l| l.rows).collect();
        let mut parts: Vec<Linear> = Vec::new();
        for layer in layers {
            match parts.last_mut() {
                Some(last)
                    if last.matrix.same_format(&layer.matrix)
                        && last.cols == layer.cols
                        && last.bias.is_some() == layer.bias.is_some() =>
                {
                    last.rows += layer.rows;
                    last.matrix.append(layer.matrix);
                    if let (Some(a), Some(b)) = (&mut last.bias, layer.bias) {
                        a.extend(b);
                    }
                }
                _ => parts.push(layer),
            }
        }
        let parts = parts.into_iter().map(Linear::packed).collect();
        Fused { parts, widths }
    }

    pub fn width(&self) -> usize {
        self.widths.iter().sum()
    }

    /// `y` gets `n` rows of [`Fused::width`]; `tmp` is scratch for unfused products.
    pub fn forward(
        &self,
        x: &[f32],
        n: usize,
        y: &mut [f32],
        tmp: &mut Vec<f32>,
        scratch: &mut QuantScratch,
    ) {
        if let [only] = self.parts.as_slice() {
            return only.forward(x, n, y, scratch);
        }
        let width = self.width();
        let mut offset = 0;
        for part in &self.parts {
            if n == 1 {
                part.forward(x, 1, &mut y[offset..offset + part.rows], scratch);
            } else {
                if tmp.len() < n * part.rows {
                    tmp.resize(n * part.rows, 0.0);
                }
                part.forward(x, n, tmp, scratch);
                for t in 0..n {
                    y[t * width + offset..t * width + offset + part.rows]
                        .copy_from_slice(&tmp[t * part.rows..(t + 1) * part.rows]);
                }
            }
            offset += part.rows;
        }
    }
}

/// Where weights come from.
pub enum Source {
    Safetensors {
        tensors: MmapedSafetensors,
        dtype: DType,
    },
    Gguf {
        content: gguf_file::Content,
        file: File,
    },
}

fn to_f32s(bytes: &[u8], dtype: safetensors::Dtype) -> Result<Vec<f32>, String> {
    Ok(match dtype {
        safetensors::Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        safetensors::Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        safetensors::Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => return Err(format!("weights of type {other:?} are not supported")),
    })
}

impl Source {
    pub fn safetensors(files: &[PathBuf], dtype: DType) -> Result<Self, String> {
        // SAFETY: the snapshot guard verified these files; the cache never rewrites a blob in
        // place while it is mapped (new blobs are written aside and renamed).
        let tensors = unsafe { MmapedSafetensors::multi(files) }
            .map_err(|e| format!("mapping the weights: {e}"))?;
        Ok(Source::Safetensors { tensors, dtype })
    }

    pub fn gguf(content: gguf_file::Content, file: File) -> Self {
        Source::Gguf { content, file }
    }

    pub fn has(&self, name: &str) -> bool {
        match self {
            Source::Safetensors { tensors, .. } => tensors.get(name).is_ok(),
            Source::Gguf { content, .. } => content.tensor_infos.contains_key(name),
        }
    }

    /// A 1-D tensor as f32 (norm weights, biases).
    pub fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>, String> {
        let v = match self {
            Source::Safetensors { tensors, .. } => {
                let view = tensors.get(name).map_err(|e| format!("{name}: {e}"))?;
                to_f32s(view.data(), view.dtype()).map_err(|e| format!("{name}: {e}"))?
            }
            Source::Gguf { content, file } => content
                .tensor(file, name, &Device::Cpu)
                .and_then(|q| q.dequantize(&Device::Cpu))
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| format!("{name}: {e}"))?,
        };
        if v.len() != len {
            return Err(format!(
                "{name} has {} values; the config says {len}",
                v.len()
            ));
        }
        Ok(v)
    }

    /// A `rows × cols` matrix (with an optional bias named `bias`).
    pub fn linear(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
        bias: Option<&str>,
    ) -> Result<Linear, String> {
        let matrix = match self {
            Source::Safetensors { tensors, dtype } => {
                let view = tensors.get(name).map_err(|e| format!("{name}: {e}"))?;
                check_shape(name, view.shape(), rows, cols)?;
                let (bytes, from) = (view.data(), view.dtype());
                match (dtype, from) {
                    (DType::F16, safetensors::Dtype::F16) => Matrix::F16(
                        bytes
                            .chunks_exact(2)
                            .map(|b| f16::from_le_bytes([b[0], b[1]]))
                            .collect(),
                    ),
                    (DType::BF16, safetensors::Dtype::BF16) => Matrix::Bf16(
                        bytes
                            .chunks_exact(2)
                            .map(|b| bf16::from_le_bytes([b[0], b[1]]))
                            .collect(),
                    ),
                    (DType::F16, _) => Matrix::F16(
                        to_f32s(bytes, from)?
                            .into_iter()
                            .map(f16::from_f32)
                            .collect(),
                    ),
                    (DType::BF16, _) => Matrix::Bf16(
                        to_f32s(bytes, from)?
                            .into_iter()
                            .map(bf16::from_f32)
                            .collect(),
                    ),
                    _ => Matrix::F32(to_f32s(bytes, from).map_err(|e| format!("{name}: {e}"))?),
                }
            }
            Source::Gguf { content, file } => {
                let q = content
                    .tensor(file, name, &Device::Cpu)
                    .map_err(|e| format!("{name}: {e}"))?;
                check_shape(name, q.shape().dims(), rows, cols)?;
                use candle_core::quantized::GgmlDType;
                let bytes = || q.data().map_err(|e| format!("{name}: {e}"));
                let widened = || {
                    q.dequantize(&Device::Cpu)
                        .and_then(|t| t.flatten_all())
                        .and_then(|t| t.to_vec1::<f32>())
                        .map_err(|e| format!("{name}: {e}"))
                };
                match q.dtype() {
                    GgmlDType::F16 => Matrix::F16(
                        bytes()?
                            .chunks_exact(2)
                            .map(|b| f16::from_le_bytes([b[0], b[1]]))
                            .collect(),
                    ),
                    GgmlDType::BF16 => Matrix::Bf16(
                        bytes()?
                            .chunks_exact(2)
                            .map(|b| bf16::from_le_bytes([b[0], b[1]]))
                            .collect(),
                    ),
                    GgmlDType::F32 => Matrix::F32(widened()?),
                    other => match QuantKind::from_ggml(other)
                        .filter(|k| cols.is_multiple_of(k.block_elems()))
                    {
                        Some(kind) if Interleaved::pays(kind) => {
                            Matrix::Interleaved(Interleaved::pack(kind, &bytes()?, rows, cols))
                        }
                        Some(kind) => Matrix::Quant(kind, bytes()?.into_owned()),
                        // No kernel for this block format: widen it once, at load.
                        None => Matrix::F32(widened()?),
                    },
                }
            }
        };
        let bias = match bias {
            Some(b) => Some(self.vector(b, rows)?),
            None => None,
        };
        Ok(Linear {
            rows,
            cols,
            matrix,
            bias,
        })
    }
}

fn check_shape(name: &str, dims: &[usize], rows: usize, cols: usize) -> Result<(), String> {
    if dims != [rows, cols] {
        return Err(format!(
            "{name} has shape {dims:?}; the config says [{rows}, {cols}]"
        ));
    }
    Ok(())
}
