//! Real models for tests, prepared by `scripts/test-env.sh` under `.cache/models` (or
//! LMX_TEST_MODELS): SmolLM2-135M-Instruct (GGUF Q4_1) and all-MiniLM-L6-v2. A test that needs
//! one is skipped with a message when it is missing, unless LMX_REQUIRE_TOOLS=1 (CI), where it
//! fails.

use std::{
    path::PathBuf,
    sync::{Mutex, OnceLock},
};

pub fn models_dir() -> PathBuf {
    std::env::var_os("LMX_TEST_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| super::repo_root().join(".cache/models"))
}

fn required(path: PathBuf) -> Option<PathBuf> {
    if path.exists() {
        return Some(path);
    }
    let required = std::env::var("LMX_REQUIRE_TOOLS").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "LMX_REQUIRE_TOOLS=1 but {} is missing; run scripts/test-env.sh",
        path.display()
    );
    eprintln!(
        "skipped: {} is missing (scripts/test-env.sh fetches it)",
        path.display()
    );
    None
}

/// The SmolLM2-135M-Instruct Q4_1 GGUF file.
pub fn smollm2_gguf() -> Option<PathBuf> {
    required(models_dir().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

/// The all-MiniLM-L6-v2 folder (config.json, model.safetensors, tokenizer.json, 1_Pooling).
pub fn minilm() -> Option<PathBuf> {
    required(models_dir().join("all-minilm-l6-v2/model.safetensors"))
        .map(|p| p.parent().unwrap().to_owned())
}

/// SmolLM2 as an HF snapshot: f32 safetensors in 3 shards with an index, converted from the
/// GGUF once and kept.
pub fn smollm2_hf_sharded() -> Option<PathBuf> {
    static LOCK: OnceLock<Mutex<()>> = OnceLock::new();
    let gguf = smollm2_gguf()?;
    let _guard = LOCK.get_or_init(|| Mutex::new(())).lock().unwrap();
    let out = models_dir().join("smollm2-hf-f32-3shards");
    Some(
        lmx::testing::convert::gguf_llama_to_hf_once(&gguf, &out, 3)
            .expect("convert the GGUF to HF safetensors"),
    )
}

/// A folder holding only a link to the GGUF file, as a repository with just the GGUF would.
pub fn smollm2_gguf_folder(parent: &std::path::Path) -> Option<PathBuf> {
    let gguf = smollm2_gguf()?;
    let dir = parent.join("smollm2-gguf");
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(&gguf, dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    Some(dir)
}

/// A JSON test fixture under tests/data.
pub fn reference(name: &str) -> serde_json::Value {
    let path = super::repo_root().join("tests/data").join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}
