//! Continuous batching on a GPU (a bench binary: `cargo bench --features cuda --bench gpu`;
//! `scripts/gpu-check.sh` builds it on a machine without a GPU, for one with).
//!
//! lmx's engine in-process (the worker and the batched candle forward pass, no gRPC) on a
//! random model in a real model's shape (`GPU_BENCH_SHAPES`: `smollm2-135m`, the default, and
//! `tinyllama-1.1b`), bf16 (`GPU_BENCH_DTYPE=f32` for f32), against PyTorch + transformers on
//! the same safetensors in the same run (`scripts/gpu_peer.py`: one static batch of the same
//! prompts per stream count, greedy, `min_new_tokens` = `max_new_tokens`).
//!
//! For N in `GPU_BENCH_STREAMS` (default 1,4,8,16,32,64): N streams of `GPU_BENCH_TOKENS` (64)
//! new tokens, each after its own `GPU_BENCH_PROMPT`-token (32) prompt, started together.
//! The stream counts take turns in rotated rounds (`GPU_BENCH_ROUNDS`, default 3, after one
//! round to warm up). Figures, medians over the rounds: aggregate decode tok/s (tokens that
//! arrived while every stream was decoding, over that time; NaN when the streams never all
//! decoded at once), output tok/s (every token after each stream's first, from the first
//! token to the last, prompts interleaved included), inter-token latency p50/p99 over
//! every gap of every stream, TTFT median. The random weights have their end-of-sequence
//! logits pinned to 0 (`lmx::testing::tiny::write_shaped_model`), so every stream runs to its
//! `max_tokens`.
//!
//! Built without the `cuda` feature, or run where no GPU answers, it says so and exits 0.
//! `GPU_BENCH_DEVICE=cpu` runs it on lmx's CPU engine instead (a check of the bench itself).

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Barrier},
    time::Instant,
};

use candle_core::DType;
use lmx::engine::{self, Engine, LoadOptions, Prompt, RawParams, StreamEvent};
use serde_json::{json, Value};

// The speed bench's records and figures, so both benches define them alike.
#[allow(dead_code)]
#[path = "speed/measure.rs"]
mod measure;
use measure::{median, output_tps, percentile, steady_tps, Sample};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// config.json fields of the shapes this bench knows.
fn shape(name: &str) -> Option<Value> {
    match name {
        "smollm2-135m" => Some(json!({
            "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "max_position_embeddings": 8192, "rope_theta": 100000.0, "tie_word_embeddings": true
        })),
        "tinyllama-1.1b" => Some(json!({
            "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
            "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
            "max_position_embeddings": 2048, "tie_word_embeddings": false
        })),
        _ => None,
    }
}

/// A prompt of `len` lowercase letters, different for every `i` from the first letter on (the
/// tokenizer is byte-level without merges: one token a letter).
fn prompt(i: usize, len: usize) -> String {
    let mut s = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|k| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let c = if k == 0 { i % 26 } else { (s % 26) as usize };
            (b'a' + c as u8) as char
        })
        .collect()
}

/// N streams at once; each thread waits at a barrier, then generates.
fn run_streams(engine: &Arc<dyn Engine>, prompts: &[String], tokens: usize) -> Vec<Sample> {
    let barrier = Arc::new(Barrier::new(prompts.len()));
    let start = Instant::now();
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (engine, barrier, p) = (engine.clone(), barrier.clone(), p.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let params = RawParams {
                    max_tokens: Some(tokens as i32),
                    temperature: Some(0.0),
                    ..Default::default()
                };
                let prompt = Prompt::Text {
                    text: p,
                    add_special_tokens: false,
                };
                let mut rx = engine.generate(prompt, &params).expect("generate");
                let (mut token_times, mut token_ids) = (Vec::new(), Vec::new());
                loop {
                    match rx.blocking_recv() {
                        Some(StreamEvent::Token(t)) => {
                            token_times.push(start.elapsed().as_secs_f64());
                            token_ids.push(t.id);
                        }
                        Some(StreamEvent::Done(done)) => {
                            break Sample {
                                token_times,
                                token_ids,
                                prompt_tokens: done.prompt_tokens,
                            }
                        }
                        Some(StreamEvent::Failed(e)) => panic!("stream failed: {e}"),
                        None => panic!("the engine dropped a stream"),
                    }
                }
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

struct Figures {
    tps: f64,
    /// Σ(tokens − 1) over the streams / (last token − first token): prompts interleaved included.
    output_tps: f64,
    itl_p50_ms: f64,
    itl_p99_ms: f64,
    ttft_ms: f64,
    tokens: usize,
}

fn figures(runs: &[Vec<Sample>]) -> Figures {
    let gaps: Vec<f64> = runs
        .iter()
        .flatten()
        .flat_map(|s| s.token_times.windows(2).map(|w| w[1] - w[0]))
        .collect();
    Figures {
        tps: median(runs.iter().map(|r| steady_tps(r)).collect()),
        output_tps: median(runs.iter().map(|r| output_tps(r)).collect()),
        itl_p50_ms: percentile(gaps.clone(), 50.0) * 1e3,
        itl_p99_ms: percentile(gaps, 99.0) * 1e3,
        ttft_ms: median(runs.iter().flatten().map(Sample::ttft).collect()) * 1e3,
        tokens: runs
            .iter()
            .flatten()
            .map(|s| s.token_times.len())
            .min()
            .unwrap_or(0),
    }
}

/// The peer's figures per stream count: decode tok/s of the whole batch and its TTFT.
fn peer(
    dir: &Path,
    ids: &[Vec<u32>],
    counts: &[usize],
    tokens: usize,
    dtype: &str,
) -> Vec<Option<(f64, f64)>> {
    let script = [
        "scripts/gpu_peer.py",
        concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/gpu_peer.py"),
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists());
    let python = std::env::var("LMX_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let none = vec![None; counts.len()];
    let Some(script) = script else {
        eprintln!("gpu: scripts/gpu_peer.py not found; no peer");
        return none;
    };
    let request = json!({"model": dir, "prompts": ids, "counts": counts, "tokens": tokens,
                         "dtype": dtype, "rounds": env_usize("GPU_BENCH_ROUNDS", 3)});
    let req_path = dir.join("peer-request.json");
    std::fs::write(&req_path, request.to_string()).unwrap();
    let out = match Command::new(&python).arg(&script).arg(&req_path).output() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("gpu: {python} did not start ({e}); no peer");
            return none;
        }
    };
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        eprintln!("gpu: the peer failed ({})", out.status);
        return none;
    }
    let mut got = none;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let n = v["n"].as_u64().unwrap_or(0) as usize;
        if let Some(i) = counts.iter().position(|&c| c == n) {
            got[i] = Some((
                v["decode_tps"].as_f64().unwrap_or(f64::NAN),
                v["ttft_ms"].as_f64().unwrap_or(f64::NAN),
            ));
        }
    }
    got
}

fn gpu_name() -> String {
    Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,driver_version,memory.total",
            "--format=csv,noheader",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown GPU (nvidia-smi did not answer)".into())
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or_else(
            || std::env::consts::ARCH.to_owned(),
            |(_, v)| v.trim().to_owned(),
        )
}

fn bench_shape(name: &str, overrides: &Value, counts: &[usize]) {
    let (tokens, prompt_len) = (
        env_usize("GPU_BENCH_TOKENS", 64),
        env_usize("GPU_BENCH_PROMPT", 32),
    );
    let rounds = env_usize("GPU_BENCH_ROUNDS", 3);
    let f32_run = std::env::var("GPU_BENCH_DTYPE").is_ok_and(|d| d == "f32");
    let (dtype, dtype_name) = if f32_run {
        (DType::F32, "f32")
    } else {
        (DType::BF16, "bf16")
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Instant::now();
    lmx::testing::tiny::write_shaped_model(dir.path(), "llama", 7, overrides);
    eprintln!(
        "gpu: {name}: random weights written in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let most = counts.iter().copied().max().unwrap_or(1);
    let device = std::env::var("GPU_BENCH_DEVICE").unwrap_or_else(|_| "cuda".into());
    let options = LoadOptions {
        device: device.clone(),
        dtype: Some(dtype),
        max_concurrent: most,
        max_queue: 4 * most,
        prefix_cache: false,
        ..LoadOptions::default()
    };
    let t = Instant::now();
    let engine = match engine::load(dir.path(), &options, Box::new(())) {
        Ok(e) => e,
        Err(e) => {
            println!("gpu: {name}: loading on {device} failed: {e}");
            return;
        }
    };
    eprintln!(
        "gpu: {name}: loaded on {device} in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let prompts: Vec<String> = (0..most).map(|i| prompt(i, prompt_len)).collect();
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            engine
                .tokenize(p, false)
                .unwrap()
                .iter()
                .map(|t| t.id)
                .collect()
        })
        .collect();
    assert!(
        ids.iter().all(|i| i.len() == prompt_len),
        "one token a letter"
    );
    let mut runs: Vec<Vec<Vec<Sample>>> = (0..counts.len()).map(|_| Vec::new()).collect();
    for round in 0..=rounds {
        for k in 0..counts.len() {
            let i = (k + round) % counts.len();
            let run = run_streams(&engine, &prompts[..counts[i]], tokens);
            if round > 0 {
                runs[i].push(run);
            }
        }
    }
    drop(engine);
    let ours: Vec<Figures> = runs.iter().map(|r| figures(r)).collect();
    let theirs = peer(dir.path(), &ids, counts, tokens, dtype_name);
    println!();
    println!(
        "## {name} ({dtype_name} on {device}, random weights), {prompt_len}-token prompts, {tokens} new tokens a stream, {rounds} rounds"
    );
    println!();
    println!("| streams | lmx tok/s | vs 1 | output tok/s | ITL p50 / p99 | p99 / 1-stream p50 | TTFT | transformers tok/s | vs 1 | transformers TTFT | lmx / transformers |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let (one, peer_one) = (ours[0].tps, theirs[0].map(|p| p.0));
    let one_p50 = ours[0].itl_p50_ms;
    for (i, (n, f)) in counts.iter().zip(&ours).enumerate() {
        let short = if f.tokens < tokens {
            format!(" (a stream stopped at {})", f.tokens)
        } else {
            String::new()
        };
        let (peer_tps, peer_vs, peer_ttft, vs_peer) = match (theirs[i], peer_one) {
            (Some((p, ttft)), Some(p1)) => (
                format!("{p:.1}"),
                format!("{:.2}x", p / p1),
                format!("{ttft:.0} ms"),
                format!("{:.2}x", f.tps / p),
            ),
            _ => ("n/a".into(), "n/a".into(), "n/a".into(), "n/a".into()),
        };
        println!(
            "| {n} | {:.1}{short} | {:.2}x | {:.1} | {:.1} / {:.1} ms | {:.2}x | {:.0} ms | {peer_tps} | {peer_vs} | {peer_ttft} | {vs_peer} |",
            f.tps,
            f.tps / one,
            f.output_tps,
            f.itl_p50_ms,
            f.itl_p99_ms,
            f.itl_p99_ms / one_p50,
            f.ttft_ms,
        );
    }
}

fn main() {
    println!("# GPU continuous batching");
    println!(
        "GPU: {}; CPU: {} ({} threads)",
        gpu_name(),
        cpu_name(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let on_cpu = std::env::var("GPU_BENCH_DEVICE").is_ok_and(|d| d == "cpu");
    if on_cpu {
        println!("gpu: GPU_BENCH_DEVICE=cpu: lmx's CPU engine instead (a check of this bench)");
    } else if !candle_core::utils::cuda_is_available() {
        println!("gpu: skipped: built without the cuda feature (cargo bench --features cuda --bench gpu)");
        return;
    } else if let Err(e) = candle_core::Device::new_cuda(0) {
        println!("gpu: skipped: no CUDA device ({e})");
        return;
    }
    let counts: Vec<usize> = std::env::var("GPU_BENCH_STREAMS")
        .ok()
        .map(|v| {
            v.split(',')
                .filter_map(|n| n.trim().parse().ok())
                .filter(|&n| n > 0)
                .collect::<Vec<usize>>()
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| vec![1, 4, 8, 16, 32, 64]);
    let shapes = std::env::var("GPU_BENCH_SHAPES").unwrap_or_else(|_| "smollm2-135m".into());
    for name in shapes.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match shape(name) {
            Some(overrides) => bench_shape(name, &overrides, &counts),
            None => println!("gpu: unknown shape {name:?}; known: smollm2-135m, tinyllama-1.1b"),
        }
    }
}
