//! Fixture builders for tests and benchmarks: repository contents (sharded safetensors, PyTorch
//! zip shards, GGUF) and writers for a plain folder or the HF cache layout (blobs named by their
//! hash, relative snapshot links, refs). Deterministic: the same arguments give the same bytes.
//!
//! Not used by the server itself.

pub mod convert;
pub mod pytorch;
pub mod tiny;

use std::{
    collections::BTreeMap,
    fs,
    io::{Cursor, Write},
    path::{Path, PathBuf},
};

use crate::{
    manager::cache::repo_folder_name,
    snapshot::{git_sha1_hex, sha256_hex},
};

/// A repository's files: path → content.
#[derive(Debug, Clone, Default)]
pub struct RepoFiles(pub BTreeMap<String, Vec<u8>>);

impl RepoFiles {
    pub fn insert(&mut self, path: &str, bytes: impl Into<Vec<u8>>) {
        self.0.insert(path.to_owned(), bytes.into());
    }

    pub fn remove(&mut self, path: &str) -> Option<Vec<u8>> {
        self.0.remove(path)
    }

    pub fn get(&self, path: &str) -> Option<&Vec<u8>> {
        self.0.get(path)
    }

    /// Total bytes.
    pub fn size(&self) -> u64 {
        self.0.values().map(|v| v.len() as u64).sum()
    }

    /// Every file under `dir` (recursively), by relative path.
    pub fn from_dir(dir: &Path) -> Self {
        let mut files = Self::default();
        for entry in walkdir::WalkDir::new(dir).into_iter().flatten() {
            if entry.file_type().is_file() {
                let rel = entry.path().strip_prefix(dir).expect("under dir");
                let rel = rel.to_string_lossy().replace('\\', "/");
                files.insert(&rel, fs::read(entry.path()).expect("read fixture file"));
            }
        }
        files
    }
}

/// A tiny random model of `arch` (see [`tiny`]) as repository files.
pub fn tiny_repo(arch: &str, seed: u64) -> RepoFiles {
    let dir = tempfile::tempdir().expect("tempdir");
    tiny::write_model(dir.path(), arch, seed);
    RepoFiles::from_dir(dir.path())
}

/// Deterministic pseudo-random bytes (xorshift), for tensor data.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A safetensors file with the given f32 tensors (name, element count), deterministic data.
pub fn safetensors_file(tensors: &[(String, usize)], seed: u64) -> Vec<u8> {
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .enumerate()
        .map(|(i, (_, n))| {
            // Small finite floats, so the data is also valid when read back as f32.
            pseudo_random_bytes(seed + i as u64, *n)
                .into_iter()
                .flat_map(|b| (b as f32 / 255.0 - 0.5).to_le_bytes())
                .collect()
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&data)
        .map(|((name, n), bytes)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*n], bytes)
                    .expect("consistent fixture tensor");
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize(views, None).expect("serialize fixture")
}

/// A minimal valid tokenizer.json (word level, whitespace split).
pub fn tokenizer_json() -> Vec<u8> {
    br#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
"model":{"type":"WordLevel","vocab":{"[UNK]":0,"hello":1,"world":2},"unk_token":"[UNK]"}}"#
        .to_vec()
}

/// config.json for a llama-type model.
pub fn config_json() -> Vec<u8> {
    br#"{"model_type":"llama","architectures":["LlamaForCausalLM"],"hidden_size":64}"#.to_vec()
}

/// `model-0000K-of-0000N.safetensors` shards (two f32 tensors of `floats` elements each), their
/// index, config.json and tokenizer.json.
pub fn sharded_safetensors_repo(shards: usize, floats: usize) -> RepoFiles {
    let mut files = RepoFiles::default();
    let mut weight_map = serde_json::Map::new();
    for k in 1..=shards {
        let name = format!("model-{k:05}-of-{shards:05}.safetensors");
        let tensors = vec![
            (format!("layers.{k}.a"), floats),
            (format!("layers.{k}.b"), floats),
        ];
        for (tensor, _) in &tensors {
            weight_map.insert(tensor.clone(), name.clone().into());
        }
        files.insert(&name, safetensors_file(&tensors, k as u64));
    }
    let index = serde_json::json!({
        "metadata": {"total_size": shards * 2 * floats * 4},
        "weight_map": weight_map,
    });
    files.insert(
        "model.safetensors.index.json",
        serde_json::to_vec_pretty(&index).unwrap(),
    );
    files.insert("config.json", config_json());
    files.insert("tokenizer.json", tokenizer_json());
    files
}

/// A PyTorch-style zip archive with one entry.
pub fn torch_zip(seed: u64) -> Vec<u8> {
    let mut buf = Cursor::new(Vec::new());
    let mut w = zip::ZipWriter::new(&mut buf);
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    w.start_file("archive/data.pkl", options)
        .expect("zip entry");
    w.write_all(&pseudo_random_bytes(seed, 256))
        .expect("zip write");
    w.finish().expect("zip finish");
    buf.into_inner()
}

/// `pytorch_model-0000K-of-0000N.bin` shards with their index, config.json and tokenizer.json.
pub fn sharded_pytorch_repo(shards: usize) -> RepoFiles {
    let mut files = RepoFiles::default();
    let mut weight_map = serde_json::Map::new();
    for k in 1..=shards {
        let name = format!("pytorch_model-{k:05}-of-{shards:05}.bin");
        weight_map.insert(format!("layers.{k}.weight"), name.clone().into());
        files.insert(&name, torch_zip(k as u64));
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    files.insert(
        "pytorch_model.bin.index.json",
        serde_json::to_vec(&index).unwrap(),
    );
    files.insert("config.json", config_json());
    files.insert("tokenizer.json", tokenizer_json());
    files
}

/// A GGUF file with one Q8_0 tensor, `general.architecture` = llama and, when asked, tokenizer
/// metadata.
pub fn gguf_file(with_tokenizer: bool) -> Vec<u8> {
    use candle_core::{
        quantized::{gguf_file, GgmlDType, QTensor},
        Device, Tensor,
    };
    let t = Tensor::arange(0f32, 64., &Device::Cpu)
        .and_then(|t| t.reshape((2, 32)))
        .expect("fixture tensor");
    let q = QTensor::quantize(&t, GgmlDType::Q8_0).expect("quantize fixture");
    let arch = gguf_file::Value::String("llama".into());
    let tokens = gguf_file::Value::Array(vec![gguf_file::Value::String("a".into())]);
    let mut metadata = vec![("general.architecture", &arch)];
    if with_tokenizer {
        metadata.push(("tokenizer.ggml.tokens", &tokens));
    }
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(&mut out, &metadata, &[("w", &q)]).expect("write gguf");
    out.into_inner()
}

/// Writes `files` into a plain folder.
pub fn write_plain(dir: &Path, files: &RepoFiles) {
    for (path, bytes) in &files.0 {
        let dest = dir.join(path);
        fs::create_dir_all(dest.parent().unwrap()).expect("create folder");
        fs::write(dest, bytes).expect("write fixture file");
    }
}

/// Whether the hub stores `path` with LFS (its etag is then the sha256 of the content).
pub fn is_lfs(path: &str) -> bool {
    [".safetensors", ".bin", ".gguf", ".pt", ".pth", ".onnx"]
        .iter()
        .any(|ext| path.ends_with(ext))
}

/// The etag the hub reports for a file: sha256 for LFS files, git blob sha1 otherwise.
pub fn etag(path: &str, bytes: &[u8]) -> String {
    if is_lfs(path) {
        sha256_hex(bytes).expect("hash in memory").0
    } else {
        git_sha1_hex(bytes, bytes.len() as u64)
            .expect("hash in memory")
            .0
    }
}

/// Writes `files` as snapshot `commit` of `repo_id` in the HF cache at `cache_dir`, like
/// huggingface_hub does: blobs named by etag, relative links, and `refs/<ref_name>` when given.
/// Returns the snapshot folder.
pub fn write_hf_cache(
    cache_dir: &Path,
    repo_id: &str,
    commit: &str,
    ref_name: Option<&str>,
    files: &RepoFiles,
) -> PathBuf {
    let repo = cache_dir.join(repo_folder_name(repo_id));
    let blobs = repo.join("blobs");
    let snapshot = repo.join("snapshots").join(commit);
    fs::create_dir_all(&blobs).expect("blobs folder");
    fs::create_dir_all(&snapshot).expect("snapshot folder");
    for (path, bytes) in &files.0 {
        let blob = blobs.join(etag(path, bytes));
        fs::write(&blob, bytes).expect("write blob");
        let link = snapshot.join(path);
        fs::create_dir_all(link.parent().unwrap()).expect("link folder");
        let depth = path.matches('/').count();
        let target = format!(
            "{}../../blobs/{}",
            "../".repeat(depth),
            blob.file_name().unwrap().to_string_lossy()
        );
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(target, &link).expect("symlink");
    }
    if let Some(name) = ref_name {
        let ref_path = repo.join("refs").join(name);
        fs::create_dir_all(ref_path.parent().unwrap()).expect("refs folder");
        fs::write(ref_path, commit).expect("write ref");
    }
    snapshot
}

/// The blob a snapshot entry links to.
pub fn blob_of(snapshot: &Path, path: &str) -> PathBuf {
    fs::canonicalize(snapshot.join(path)).expect("resolve snapshot link")
}
