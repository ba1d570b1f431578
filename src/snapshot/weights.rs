//! Weight file headers, read without touching tensor data:
//! - safetensors: the 8-byte length and the JSON header must parse (the `safetensors` crate
//!   validates dtype × shape and that offsets are in order and contiguous); the file size must
//!   equal 8 + header length + end of the last tensor.
//! - PyTorch `.bin` (zip): the end-of-central-directory record and the central directory must
//!   be readable (the `zip` crate); a file cut short loses them.
//! - GGUF: magic, version, metadata and tensor infos must parse (candle's reader); the file must
//!   cover the last tensor.
//!
//! Every declared length is checked against the file size before anything is allocated, and
//! each parser runs under `catch_unwind`, so malformed input is a problem, never a panic.

use std::{
    collections::HashSet,
    io::{Read, Seek, SeekFrom},
    panic::{catch_unwind, AssertUnwindSafe},
};

use candle_core::quantized::gguf_file;

use super::report::{Problem, ProblemKind};

/// safetensors' own limit on the JSON header (the crate refuses larger ones).
pub(crate) const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// What a valid safetensors header declares.
#[derive(Debug, Clone, Default)]
pub(crate) struct SafetensorsInfo {
    pub tensors: HashSet<String>,
}

/// What a valid GGUF header declares.
#[derive(Debug, Clone, Default)]
pub(crate) struct GgufInfo {
    pub architecture: Option<String>,
    pub has_tokenizer: bool,
}

/// Runs a parser, turning a panic inside a dependency into an INVALID_HEADER problem.
fn guarded<T>(file: &str, parse: impl FnOnce() -> Result<T, Problem>) -> Result<T, Problem> {
    match catch_unwind(AssertUnwindSafe(parse)) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            Err(Problem::error(
                ProblemKind::InvalidHeader,
                file,
                format!("the header is malformed (parser failed: {message})"),
            ))
        }
    }
}

fn read_err(file: &str, err: std::io::Error) -> Problem {
    if err.kind() == std::io::ErrorKind::UnexpectedEof {
        Problem::error(
            ProblemKind::TruncatedFile,
            file,
            format!("the file ends inside its header: {err}"),
        )
    } else {
        Problem::error(ProblemKind::Unreadable, file, format!("cannot read: {err}"))
    }
}

/// Checks a safetensors file of `size` bytes; reads only the length prefix and the header.
pub(crate) fn check_safetensors(
    file: &str,
    reader: &mut impl Read,
    size: u64,
) -> Result<SafetensorsInfo, Problem> {
    guarded(file, || {
        let truncated = |detail: String| Problem::error(ProblemKind::TruncatedFile, file, detail);
        let invalid = |detail: String| Problem::error(ProblemKind::InvalidHeader, file, detail);
        if size < 8 {
            return Err(truncated(format!(
                "expected at least 8 bytes (the header length), found {size}"
            )));
        }
        let mut prefix = [0u8; 8];
        reader
            .read_exact(&mut prefix)
            .map_err(|e| read_err(file, e))?;
        let header_len = u64::from_le_bytes(prefix);
        if header_len > MAX_SAFETENSORS_HEADER {
            return Err(invalid(format!(
                "declares a {header_len}-byte header, above safetensors' {MAX_SAFETENSORS_HEADER}-byte limit"
            )));
        }
        if header_len > size - 8 {
            return Err(truncated(format!(
                "declares a {header_len}-byte header but only {} bytes follow the length prefix",
                size - 8
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        reader
            .read_exact(&mut header)
            .map_err(|e| read_err(file, e))?;
        let metadata: safetensors::tensor::Metadata = serde_json::from_slice(&header)
            .map_err(|e| invalid(format!("the JSON header is invalid: {e}")))?;
        let data_len = metadata.data_len() as u64;
        let expected = 8 + header_len + data_len;
        if size < expected {
            return Err(truncated(format!(
                "expected {expected} bytes (8 + {header_len}-byte header + {data_len} bytes of tensor data), \
                 found {size}: {} bytes short",
                expected - size
            )));
        }
        if size > expected {
            return Err(invalid(format!(
                "expected {expected} bytes (8 + {header_len}-byte header + {data_len} bytes of tensor data), \
                 found {size}: {} bytes beyond the last tensor",
                size - expected
            )));
        }
        Ok(SafetensorsInfo {
            tensors: metadata.tensors().into_keys().collect(),
        })
    })
}

/// Checks a PyTorch zip archive: its central directory must be found and readable.
pub(crate) fn check_pytorch_zip(file: &str, reader: impl Read + Seek) -> Result<(), Problem> {
    guarded(file, || {
        let archive = zip::ZipArchive::new(reader).map_err(|e| {
            Problem::error(
                ProblemKind::TruncatedFile,
                file,
                format!("no readable end-of-central-directory record (file cut short or not a zip archive): {e}"),
            )
        })?;
        if archive.is_empty() {
            return Err(Problem::error(
                ProblemKind::InvalidHeader,
                file,
                "the zip archive holds no entries",
            ));
        }
        Ok(())
    })
}

/// Checks a GGUF file: header, metadata and tensor infos parse, and the file covers every tensor.
pub(crate) fn check_gguf(
    file: &str,
    reader: &mut (impl Read + Seek),
    size: u64,
) -> Result<GgufInfo, Problem> {
    guarded(file, || {
        let truncated = |detail: String| Problem::error(ProblemKind::TruncatedFile, file, detail);
        let invalid = |detail: String| Problem::error(ProblemKind::InvalidHeader, file, detail);
        reader
            .seek(SeekFrom::Start(0))
            .map_err(|e| read_err(file, e))?;
        let content = gguf_file::Content::read(reader).map_err(|e| {
            let message = e.to_string();
            let eof = matches!(&e, candle_core::Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof);
            if eof || message.contains("remaining") {
                truncated(format!("the header is cut short: {message}"))
            } else {
                invalid(format!("the GGUF header does not parse: {message}"))
            }
        })?;

        let mut ranges = Vec::with_capacity(content.tensor_infos.len());
        for (name, info) in &content.tensor_infos {
            let elems = info
                .shape
                .dims()
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
                .ok_or_else(|| invalid(format!("tensor {name}: element count overflows")))?;
            let block = info.ggml_dtype.block_size() as u64;
            if elems % block != 0 {
                return Err(invalid(format!(
                    "tensor {name}: {elems} elements are not a multiple of the {:?} block size {block}",
                    info.ggml_dtype
                )));
            }
            let bytes = (elems / block).checked_mul(info.ggml_dtype.type_size() as u64);
            let start = content.tensor_data_offset.checked_add(info.offset);
            let end = start.zip(bytes).and_then(|(s, b)| s.checked_add(b));
            let (Some(start), Some(end)) = (start, end) else {
                return Err(invalid(format!("tensor {name}: data range overflows")));
            };
            ranges.push((start, end, name.as_str()));
        }
        ranges.sort();
        for pair in ranges.windows(2) {
            let ((_, end_a, a), (start_b, _, b)) = (pair[0], pair[1]);
            if start_b < end_a {
                return Err(invalid(format!("tensors {a} and {b} overlap")));
            }
        }
        if let Some(&(_, end, name)) = ranges.iter().max_by_key(|r| r.1) {
            if end > size {
                return Err(truncated(format!(
                    "tensor {name} ends at byte {end}, but the file has {size} bytes: {} bytes short",
                    end - size
                )));
            }
        }
        let architecture = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned();
        Ok(GgufInfo {
            architecture,
            has_tokenizer: content.metadata.contains_key("tokenizer.ggml.tokens"),
        })
    })
}

/// A small JSON file (config, tokenizer): must parse. Returns the value when asked.
pub(crate) fn check_json(file: &str, bytes: &[u8]) -> Result<serde_json::Value, Problem> {
    serde_json::from_slice(bytes).map_err(|e| {
        if e.classify() == serde_json::error::Category::Eof {
            Problem::error(
                ProblemKind::TruncatedFile,
                file,
                format!("the JSON ends early: {e}"),
            )
        } else {
            Problem::error(
                ProblemKind::InvalidHeader,
                file,
                format!("not valid JSON: {e}"),
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn safetensors_bytes() -> Vec<u8> {
        let data: Vec<u8> = (0..24u8).collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 3], &data)
            .unwrap();
        safetensors::serialize([("w", view)], None).unwrap()
    }

    fn st(bytes: &[u8]) -> Result<SafetensorsInfo, Problem> {
        check_safetensors("m.safetensors", &mut Cursor::new(bytes), bytes.len() as u64)
    }

    #[test]
    fn safetensors_rules() {
        let good = safetensors_bytes();
        assert!(st(&good).unwrap().tensors.contains("w"));

        let short = &good[..good.len() - 1];
        let p = st(short).unwrap_err();
        assert_eq!(p.kind, ProblemKind::TruncatedFile);
        assert!(p.detail.contains("1 bytes short"), "{}", p.detail);

        let mut long = good.clone();
        long.push(0);
        assert_eq!(st(&long).unwrap_err().kind, ProblemKind::InvalidHeader);

        assert_eq!(st(&good[..5]).unwrap_err().kind, ProblemKind::TruncatedFile);

        let mut garbage = 16u64.to_le_bytes().to_vec();
        garbage.extend_from_slice(b"this is not json");
        assert_eq!(st(&garbage).unwrap_err().kind, ProblemKind::InvalidHeader);

        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert_eq!(st(&huge).unwrap_err().kind, ProblemKind::InvalidHeader);

        let mut past_end = 1000u64.to_le_bytes().to_vec();
        past_end.extend_from_slice(b"{}");
        let p = st(&past_end).unwrap_err();
        assert_eq!(p.kind, ProblemKind::TruncatedFile);
        assert!(p.detail.contains("1000-byte header"), "{}", p.detail);

        // Offsets that overlap or disagree with dtype x shape.
        let header = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
        let mut overlap = (header.len() as u64).to_le_bytes().to_vec();
        overlap.extend_from_slice(header);
        overlap.extend_from_slice(&[0; 12]);
        assert_eq!(st(&overlap).unwrap_err().kind, ProblemKind::InvalidHeader);
        let header = br#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        let mut mismatch = (header.len() as u64).to_le_bytes().to_vec();
        mismatch.extend_from_slice(header);
        mismatch.extend_from_slice(&[0; 8]);
        assert_eq!(st(&mismatch).unwrap_err().kind, ProblemKind::InvalidHeader);
    }

    #[test]
    fn zip_rules() {
        let mut buf = Cursor::new(Vec::new());
        {
            let mut w = zip::ZipWriter::new(&mut buf);
            w.start_file("archive/data.pkl", zip::write::SimpleFileOptions::default())
                .unwrap();
            std::io::Write::write_all(&mut w, &[7u8; 300]).unwrap();
            w.finish().unwrap();
        }
        let bytes = buf.into_inner();
        check_pytorch_zip("p.bin", Cursor::new(&bytes)).unwrap();
        let cut = &bytes[..bytes.len() - 10];
        let p = check_pytorch_zip("p.bin", Cursor::new(cut)).unwrap_err();
        assert_eq!(p.kind, ProblemKind::TruncatedFile);
        let p = check_pytorch_zip("p.bin", Cursor::new(b"not a zip at all")).unwrap_err();
        assert_eq!(p.kind, ProblemKind::TruncatedFile);
    }

    fn gguf_bytes() -> Vec<u8> {
        use candle_core::{quantized::QTensor, Device, Tensor};
        let t = Tensor::arange(0f32, 64., &Device::Cpu)
            .unwrap()
            .reshape((2, 32))
            .unwrap();
        let q = QTensor::quantize(&t, candle_core::quantized::GgmlDType::Q8_0).unwrap();
        let arch = gguf_file::Value::String("llama".into());
        let tokens = gguf_file::Value::Array(vec![gguf_file::Value::String("a".into())]);
        let mut out = Cursor::new(Vec::new());
        gguf_file::write(
            &mut out,
            &[
                ("general.architecture", &arch),
                ("tokenizer.ggml.tokens", &tokens),
            ],
            &[("w", &q)],
        )
        .unwrap();
        out.into_inner()
    }

    #[test]
    fn gguf_rules() {
        let good = gguf_bytes();
        let g = |b: &[u8]| check_gguf("m.gguf", &mut Cursor::new(b), b.len() as u64);
        let info = g(&good).unwrap();
        assert_eq!(info.architecture.as_deref(), Some("llama"));
        assert!(info.has_tokenizer);
        // The writer pads the data section to its alignment: cut into the tensor itself.
        let p = g(&good[..good.len() - 40]).unwrap_err();
        assert_eq!(p.kind, ProblemKind::TruncatedFile, "{}", p.detail);
        assert!(p.detail.contains("bytes short"), "{}", p.detail);
        assert_eq!(g(&good[..40]).unwrap_err().kind, ProblemKind::TruncatedFile);
        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        assert_eq!(g(&bad_magic).unwrap_err().kind, ProblemKind::InvalidHeader);
    }

    #[test]
    fn json_rules() {
        assert!(check_json("c.json", br#"{"a":1}"#).is_ok());
        assert_eq!(
            check_json("c.json", br#"{"a":"#).unwrap_err().kind,
            ProblemKind::TruncatedFile
        );
        assert_eq!(
            check_json("c.json", b"nope").unwrap_err().kind,
            ProblemKind::InvalidHeader
        );
    }
}
