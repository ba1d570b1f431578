//! The GGUF files of a snapshot and their quantization: what a GGUF repository offers (one entry
//! per file in the catalog), which file a quant selector names, and which file a reference
//! without a selector gets.
//!
//! The quantization of a file comes from its header's `general.file_type` (llama.cpp's
//! `llama_ftype`) when present, else from its name (`...-Q4_K_M.gguf`), else from the tensor
//! type holding most of its elements. Reads headers only.

use std::{path::Path, sync::LazyLock};

use candle_core::quantized::{gguf_file, GgmlDType};
use regex::Regex;

/// One GGUF file of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufFile {
    /// Path relative to the snapshot folder.
    pub path: String,
    /// Bytes on disk.
    pub size: u64,
    /// Quantization type in llama.cpp's spelling (`Q4_K_M`, `Q8_0`, `F16`); None when unknown.
    pub quantization: Option<String>,
}

/// llama.cpp's `llama_ftype` values, as names.
fn file_type_name(value: u32) -> Option<&'static str> {
    Some(match value {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        _ => return None,
    })
}

static QUANT_IN_NAME: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)(?:^|[-_.])((?:I?Q[1-8]_(?:K(?:_[SML])?|[01]|XXS|XS|NL|S|M|L))|TQ[12]_0|BF16|F16|F32)(?:[-_.]|$)",
    )
    .expect("static regex")
});

/// The quantization a file name states (`model-q4_k_m.gguf` → `Q4_K_M`), upper case.
pub fn quantization_from_name(name: &str) -> Option<String> {
    let base = name.rsplit('/').next().unwrap_or(name);
    let stem = base.strip_suffix(".gguf").unwrap_or(base);
    QUANT_IN_NAME
        .captures_iter(stem)
        .last()
        .map(|c| c[1].to_ascii_uppercase())
}

fn dtype_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// The quantization a header states (`general.file_type`), or else the tensor type holding most
/// elements (quantized types first: norms stay F32 in any quantization).
fn quantization_from_header(content: &gguf_file::Content) -> Option<String> {
    content
        .metadata
        .get("general.file_type")
        .and_then(|v| {
            v.to_u32()
                .ok()
                .or_else(|| v.to_i32().ok().map(|i| i as u32))
        })
        .and_then(file_type_name)
        .map(str::to_owned)
}

fn quantization_from_tensors(content: &gguf_file::Content) -> Option<String> {
    let mut elements: Vec<(GgmlDType, u64)> = Vec::new();
    for info in content.tensor_infos.values() {
        let n = info.shape.elem_count() as u64;
        match elements.iter_mut().find(|(d, _)| *d == info.ggml_dtype) {
            Some((_, total)) => *total += n,
            None => elements.push((info.ggml_dtype, n)),
        }
    }
    let float = |d: GgmlDType| matches!(d, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
    elements
        .iter()
        .filter(|(d, _)| !float(*d))
        .max_by_key(|(_, n)| *n)
        .or_else(|| elements.iter().max_by_key(|(_, n)| *n))
        .map(|(d, _)| dtype_name(*d).to_owned())
}

/// Bits per weight of a quantization family (`Q4_K_M` → 4, `F16` → 16); None when unknown.
pub fn quantization_bits(quantization: &str) -> Option<u32> {
    let q = quantization.to_ascii_uppercase();
    match q.as_str() {
        "F32" => return Some(32),
        "F16" | "BF16" => return Some(16),
        _ => {}
    }
    let digits = q.trim_start_matches('I').trim_start_matches('T');
    digits
        .strip_prefix('Q')
        .and_then(|rest| rest.chars().next())
        .and_then(|c| c.to_digit(10))
}

/// The top-level GGUF files of the snapshot at `dir`, sorted by path, with their quantization.
/// A file whose header does not parse is listed with what its name says.
pub fn gguf_files(dir: &Path) -> Vec<GgufFile> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<GgufFile> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            if !name.ends_with(".gguf") {
                return None;
            }
            let path = e.path();
            let size = std::fs::metadata(&path).ok()?.len();
            let content = std::fs::File::open(&path)
                .ok()
                .and_then(|mut f| gguf_file::Content::read(&mut f).ok());
            let from_header = content.as_ref().and_then(quantization_from_header);
            let quantization = from_header
                .or_else(|| quantization_from_name(&name))
                .or_else(|| content.as_ref().and_then(quantization_from_tensors));
            Some(GgufFile {
                path: name,
                size,
                quantization,
            })
        })
        .collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    files
}

/// The file a reference without a selector gets: `Q4_K_M`, else the smallest file of 4 bits or
/// more, else the one with the most bits (ties: the smaller), else the first by name.
pub fn default_file(files: &[GgufFile]) -> Option<&GgufFile> {
    let quant = |f: &GgufFile| f.quantization.clone().unwrap_or_default();
    if let Some(f) = files.iter().find(|f| quant(f) == "Q4_K_M") {
        return Some(f);
    }
    let bits = |f: &GgufFile| f.quantization.as_deref().and_then(quantization_bits);
    if let Some(f) = files
        .iter()
        .filter(|f| bits(f).is_some_and(|b| b >= 4))
        .min_by_key(|f| (f.size, f.path.clone()))
    {
        return Some(f);
    }
    files
        .iter()
        .filter(|f| bits(f).is_some())
        .max_by_key(|f| (bits(f), std::cmp::Reverse(f.size)))
        .or_else(|| files.first())
}

/// The file of `files` with quantization `quantization` (case-insensitive), the first by name
/// when several have it.
pub fn file_with_quantization<'a>(
    files: &'a [GgufFile],
    quantization: &str,
) -> Option<&'a GgufFile> {
    files.iter().find(|f| {
        f.quantization
            .as_deref()
            .is_some_and(|q| q.eq_ignore_ascii_case(quantization))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantization_is_read_from_names() {
        for (name, want) in [
            ("qwen2.5-0.5b-instruct-q4_k_m.gguf", Some("Q4_K_M")),
            ("Llama-3.2-1B-Instruct-Q8_0.gguf", Some("Q8_0")),
            ("model.Q5_K_S.gguf", Some("Q5_K_S")),
            ("model-IQ4_XS.gguf", Some("IQ4_XS")),
            ("model-f16.gguf", Some("F16")),
            ("model-bf16.gguf", Some("BF16")),
            ("tiny-Q6_K.gguf", Some("Q6_K")),
            ("model.gguf", None),
            ("q4_0fancy.gguf", None),
        ] {
            assert_eq!(quantization_from_name(name).as_deref(), want, "{name}");
        }
    }

    #[test]
    fn bits_per_family() {
        assert_eq!(quantization_bits("Q4_K_M"), Some(4));
        assert_eq!(quantization_bits("iq3_xxs"), Some(3));
        assert_eq!(quantization_bits("Q8_0"), Some(8));
        assert_eq!(quantization_bits("F16"), Some(16));
        assert_eq!(quantization_bits("TQ2_0"), Some(2));
        assert_eq!(quantization_bits("weird"), None);
    }

    #[test]
    fn the_header_then_the_name_then_the_tensors_tell_the_quantization() {
        use candle_core::{quantized::QTensor, Device, Tensor};
        let dir = tempfile::tempdir().unwrap();
        // One Q8_0 tensor and no general.file_type, no quant in the name: from the tensors.
        std::fs::write(
            dir.path().join("model.gguf"),
            crate::testing::gguf_file(true),
        )
        .unwrap();
        // general.file_type 15 (Q4_K_M) wins over the name.
        let t = Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let file_type = gguf_file::Value::U32(15);
        let mut bytes = std::io::Cursor::new(Vec::new());
        gguf_file::write(
            &mut bytes,
            &[("general.file_type", &file_type)],
            &[("w", &q)],
        )
        .unwrap();
        std::fs::write(dir.path().join("x-Q8_0.gguf"), bytes.into_inner()).unwrap();
        // A header that does not parse: the name.
        std::fs::write(dir.path().join("y-Q5_K_M.gguf"), b"not a gguf").unwrap();
        std::fs::write(dir.path().join("config.json"), b"{}").unwrap();
        let found: Vec<(String, Option<String>)> = gguf_files(dir.path())
            .into_iter()
            .map(|f| (f.path, f.quantization))
            .collect();
        assert_eq!(
            found,
            [
                ("model.gguf".to_owned(), Some("Q8_0".to_owned())),
                ("x-Q8_0.gguf".to_owned(), Some("Q4_K_M".to_owned())),
                ("y-Q5_K_M.gguf".to_owned(), Some("Q5_K_M".to_owned())),
            ]
        );
    }

    fn file(path: &str, size: u64) -> GgufFile {
        GgufFile {
            path: path.into(),
            size,
            quantization: quantization_from_name(path),
        }
    }

    #[test]
    fn the_default_file_follows_the_rule() {
        let pick = |files: &[GgufFile]| default_file(files).map(|f| f.path.clone());
        let all = [
            file("m-Q2_K.gguf", 10),
            file("m-Q4_0.gguf", 20),
            file("m-Q4_K_M.gguf", 25),
            file("m-Q8_0.gguf", 40),
        ];
        assert_eq!(pick(&all).as_deref(), Some("m-Q4_K_M.gguf"));
        assert_eq!(
            pick(&[all[0].clone(), all[1].clone(), all[3].clone()]).as_deref(),
            Some("m-Q4_0.gguf")
        );
        assert_eq!(
            pick(&[all[0].clone(), all[3].clone()]).as_deref(),
            Some("m-Q8_0.gguf")
        );
        assert_eq!(pick(&[all[0].clone()]).as_deref(), Some("m-Q2_K.gguf"));
        assert_eq!(pick(&[file("a.gguf", 5)]).as_deref(), Some("a.gguf"));
        assert_eq!(pick(&[]), None);
        assert_eq!(
            file_with_quantization(&all, "q8_0").map(|f| f.path.as_str()),
            Some("m-Q8_0.gguf")
        );
        assert!(file_with_quantization(&all, "Q9_X").is_none());
    }
}
