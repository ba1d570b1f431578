//! The peers, llama.cpp (llama-cpp-python) and transformers (torch), driven through
//! scripts/bench/peers.py in the Python that LMX_BENCH_PYTHON names (scripts/bench-speed.sh
//! prepares .venv-bench for it). Each call prints one JSON object; its runs become [`Sample`]s.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

use crate::{lmx_local::ExactPrompt, measure::Sample};

pub struct Peers {
    python: PathBuf,
    script: PathBuf,
}

/// What a peer measured, and what it is.
pub struct PeerRun {
    pub samples: Vec<Sample>,
    /// Library versions, e.g. "llama-cpp-python 0.3.36".
    pub version: String,
    /// llama.cpp's system info line (its build's SIMD features); empty for transformers.
    pub system_info: String,
    /// Whether the peer's own tokenizer gives the same ids for the prompt text as lmx's.
    pub tokenizer_agrees: bool,
}

impl Peers {
    /// None when LMX_BENCH_PYTHON is unset: the peers are then reported as not run.
    pub fn from_env() -> Option<Peers> {
        let python = std::env::var_os("LMX_BENCH_PYTHON")?;
        Some(Peers {
            python: python.into(),
            script: Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench/peers.py"),
        })
    }

    fn call(&self, args: &[&std::ffi::OsStr]) -> Result<Value, String> {
        let out = Command::new(&self.python)
            .arg(&self.script)
            .args(args)
            .output()
            .map_err(|e| format!("running {}: {e}", self.python.display()))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
            return Err(format!(
                "peers.py {:?} failed: {}",
                args.first().unwrap_or(&std::ffi::OsStr::new("")),
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("peers.py output: {e}"))
    }

    /// `dst`: an F32 GGUF of every tensor of `src`, written once and kept.
    pub fn f32_gguf(&self, src: &Path, dst: &Path) -> Result<(), String> {
        if dst.exists() {
            return Ok(());
        }
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        self.call(&["f32-gguf".as_ref(), src.as_os_str(), dst.as_os_str()])
            .map(drop)
    }

    /// `engine` is "llama" (a GGUF file) or "transformers" (an HF snapshot folder).
    pub fn run(
        &self,
        engine: &str,
        model: &Path,
        prompt: &ExactPrompt,
        new_tokens: usize,
        runs: usize,
        threads: usize,
    ) -> Result<PeerRun, String> {
        let file = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
        let json = serde_json::json!({"ids": prompt.ids, "text": prompt.text});
        std::fs::write(file.path(), json.to_string()).map_err(|e| e.to_string())?;
        let (new_tokens, runs, threads) = (
            new_tokens.to_string(),
            runs.to_string(),
            threads.to_string(),
        );
        let v = self.call(&[
            engine.as_ref(),
            model.as_os_str(),
            file.path().as_os_str(),
            new_tokens.as_ref(),
            runs.as_ref(),
            threads.as_ref(),
        ])?;
        let prompt_tokens = v["prompt_tokens"].as_u64().unwrap_or(0) as usize;
        let samples = v["runs"]
            .as_array()
            .ok_or("peers.py: no runs")?
            .iter()
            .map(|run| Sample {
                token_times: floats(&run["token_times_s"]),
                token_ids: floats(&run["token_ids"])
                    .into_iter()
                    .map(|f| f as u32)
                    .collect(),
                prompt_tokens,
            })
            .collect();
        Ok(PeerRun {
            samples,
            version: v["version"].as_str().unwrap_or("?").to_owned(),
            system_info: v["system_info"].as_str().unwrap_or("").to_owned(),
            tokenizer_agrees: v["own_tokenizer_agrees"].as_bool().unwrap_or(false),
        })
    }
}

impl Peers {
    /// llama.cpp's batched decoding of the first `streams` of `prompts` at once: per measured
    /// run, one sample per stream.
    pub fn run_batched(
        &self,
        gguf: &Path,
        prompts: &[Vec<u32>],
        new_tokens: usize,
        runs: usize,
        threads: usize,
        streams: usize,
    ) -> Result<Vec<Vec<Sample>>, String> {
        let file = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
        std::fs::write(file.path(), serde_json::json!(prompts).to_string())
            .map_err(|e| e.to_string())?;
        let args = [
            new_tokens.to_string(),
            runs.to_string(),
            threads.to_string(),
            streams.to_string(),
        ];
        let v = self.call(&[
            "llama-batched".as_ref(),
            gguf.as_os_str(),
            file.path().as_os_str(),
            args[0].as_ref(),
            args[1].as_ref(),
            args[2].as_ref(),
            args[3].as_ref(),
        ])?;
        v["runs"]
            .as_array()
            .ok_or("peers.py: no runs")?
            .iter()
            .map(|run| {
                run["streams"]
                    .as_array()
                    .ok_or_else(|| "peers.py: a run without streams".to_owned())
                    .map(|streams| {
                        streams
                            .iter()
                            .zip(prompts)
                            .map(|(s, prompt)| Sample {
                                token_times: floats(&s["token_times_s"]),
                                token_ids: floats(&s["token_ids"])
                                    .into_iter()
                                    .map(|f| f as u32)
                                    .collect(),
                                prompt_tokens: prompt.len(),
                            })
                            .collect()
                    })
            })
            .collect()
    }
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}
