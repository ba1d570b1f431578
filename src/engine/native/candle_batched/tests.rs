//! The candle-op forward pass against the native one on the same tiny random weights (the
//! native pass is itself checked against candle-transformers in `native/tests.rs`), and the
//! properties batching relies on. The `cuda_` tests run on a GPU when the crate is built with
//! `--features cuda` and one is there; otherwise they say so and pass (set
//! `LMX_REQUIRE_CUDA=1` to make a missing GPU a failure).

use std::path::{Path, PathBuf};

use candle_core::{quantized::gguf_file, DType, Device};
use serde_json::Value;

use super::*;
use crate::engine::{
    arch::CausalLm,
    native::{self, KvCache, KvDtype, NativeConfig, NativeLm, Step, Workspace},
};
use crate::testing::tiny;

const PROMPT: &[u32] = &[257, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100];

fn read_config(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap()
}

fn weights(dir: &Path) -> Vec<PathBuf> {
    vec![dir.join("model.safetensors")]
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Logits for `prompt`, then for `decode` greedy steps.
fn run_on(model: &mut dyn CausalLm, prompt: &[u32], decode: usize) -> Vec<Vec<f32>> {
    let mut out = vec![model.forward(prompt, 0).unwrap().to_vec()];
    for step in 0..decode {
        let next = argmax(out.last().unwrap());
        out.push(
            model
                .forward(&[next], prompt.len() + step)
                .unwrap()
                .to_vec(),
        );
    }
    out
}

fn run(model: &mut dyn CausalLm, decode: usize) -> Vec<Vec<f32>> {
    run_on(model, PROMPT, decode)
}

/// max |a - b| / (1 + |b|) over every logit of every step.
fn worst(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs() / (1.0 + q.abs()))
        })
        .fold(0.0, f32::max)
}

fn native_lm(dir: &Path, capacity: usize) -> Box<dyn CausalLm> {
    let mut model = native::load_safetensors(&read_config(dir), &weights(dir), DType::F32)
        .unwrap()
        .expect("the native path runs this config");
    // candle's caches hold f32.
    model.config.kv_dtype = KvDtype::F32;
    NativeLm::base(model).fork(capacity).unwrap()
}

fn candle_model(dir: &Path, dtype: DType, device: &Device) -> CandleModel {
    let config = NativeConfig::from_hf(&read_config(dir)).unwrap();
    CandleModel::load_safetensors(config, &weights(dir), dtype, device).unwrap()
}

fn candle_lm(dir: &Path, dtype: DType, device: &Device, capacity: usize) -> Box<dyn CausalLm> {
    CandleLm::base(candle_model(dir, dtype, device))
        .fork(capacity)
        .unwrap()
}

/// The tiny models the comparisons cover: every variant of the family.
fn variants() -> Vec<(&'static str, tempfile::TempDir)> {
    let mut out = Vec::new();
    for arch in ["llama", "mistral", "qwen2", "qwen3"] {
        let dir = tempfile::tempdir().unwrap();
        tiny::write_model(dir.path(), arch, 11);
        out.push((arch, dir));
    }
    let dir = tempfile::tempdir().unwrap();
    tiny::write_model_with(dir.path(), "llama", 12, |c| {
        c["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16});
        c["rope_theta"] = serde_json::json!(500000.0);
    });
    out.push(("llama3 rope scaling", dir));
    let dir = tempfile::tempdir().unwrap();
    tiny::write_model_with(dir.path(), "mistral", 13, |c| {
        c["sliding_window"] = 4.into()
    });
    out.push(("mistral, window 4", dir));
    out
}

/// Tolerance 1e-4 relative: both run f32 end to end; only summation order and the exp/rope
/// formulas differ.
#[test]
fn every_llama_family_variant_matches_the_native_pass() {
    for (name, dir) in variants() {
        let mut native = native_lm(dir.path(), 64);
        let mut candle = candle_lm(dir.path(), DType::F32, &Device::Cpu, 64);
        let (ours, theirs) = (run(candle.as_mut(), 6), run(native.as_mut(), 6));
        let err = worst(&ours, &theirs);
        eprintln!(
            "{name}: worst relative logit difference {err}; logits span {}",
            theirs[0].iter().fold(0f32, |m, x| m.max(x.abs()))
        );
        assert!(err < 1e-4, "{name}: worst relative logit difference {err}");
    }
}

/// Prompt and decode steps past a window of 4 (the prompt has 13 tokens), and the window
/// changes the answer.
#[test]
fn a_sliding_window_shorter_than_the_prompt_masks_the_earliest_positions() {
    let windowed = tempfile::tempdir().unwrap();
    tiny::write_model_with(windowed.path(), "mistral", 13, |c| {
        c["sliding_window"] = 4.into()
    });
    let full = tempfile::tempdir().unwrap();
    tiny::write_model(full.path(), "mistral", 13);
    let mut native = native_lm(windowed.path(), 64);
    let mut candle = candle_lm(windowed.path(), DType::F32, &Device::Cpu, 64);
    let ours = run(candle.as_mut(), 4);
    let err = worst(&ours, &run(native.as_mut(), 4));
    assert!(err < 1e-4, "worst relative logit difference {err}");
    let mut unwindowed = candle_lm(full.path(), DType::F32, &Device::Cpu, 64);
    assert!(worst(&ours, &run(unwindowed.as_mut(), 4)) > 1e-3);
}

fn gguf_models(
    dtype: candle_core::quantized::GgmlDType,
    device: &Device,
) -> (tempfile::TempDir, Box<dyn CausalLm>, Box<dyn CausalLm>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    std::fs::write(&path, tiny::spm_llama_gguf_with(5, dtype)).unwrap();
    let content = || gguf_file::Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
    let config = NativeConfig::from_gguf(&content()).expect("native GGUF llama");
    assert_eq!(config.rope_style, RopeStyle::Interleaved);
    let native = native::load_gguf(
        NativeConfig {
            kv_dtype: KvDtype::F32,
            ..config.clone()
        },
        &path,
        content(),
    )
    .unwrap();
    let native = NativeLm::base(native).fork(64).unwrap();
    let candle = CandleModel::load_gguf(config, &path, content(), device).unwrap();
    let candle = CandleLm::base(candle).fork(64).unwrap();
    (dir, native, candle)
}

/// GGUF llama (interleaved rope). Q8_0: both quantize the activations to 8-bit blocks
/// (tolerance 2e-3 relative, as the native pass against candle-transformers); F16: both widen
/// the weights to f32.
#[test]
fn gguf_llamas_match_the_native_pass() {
    use candle_core::quantized::GgmlDType;
    for (dtype, tolerance) in [(GgmlDType::Q8_0, 2e-3), (GgmlDType::F16, 1e-4)] {
        let (_dir, mut native, mut candle) = gguf_models(dtype, &Device::Cpu);
        let err = worst(&run(candle.as_mut(), 6), &run(native.as_mut(), 6));
        assert!(
            err < tolerance,
            "{dtype:?}: worst relative logit difference {err}"
        );
    }
}

/// Logits of one call over `steps` (prompt or token, cache) pairs.
fn call(model: &CandleModel, steps: Vec<(&[u32], &mut CandleCache)>) -> Vec<Vec<f32>> {
    let mut steps: Vec<CandleStep> = steps
        .into_iter()
        .map(|(tokens, cache)| CandleStep { tokens, cache })
        .collect();
    let mut logits = Vec::new();
    model.forward(&mut steps, &mut logits).unwrap();
    assert_eq!(logits.len(), steps.len() * model.config.vocab);
    logits
        .chunks(model.config.vocab)
        .map(<[f32]>::to_vec)
        .collect()
}

/// Sequences of different lengths at different positions: all prompts in one call, then a
/// decode token each in one call, then one sequence's next prompt chunk alongside the others'
/// decode tokens. Each equals the same sequence run alone.
fn several_sequences_equal_separate_calls(model: &CandleModel, tolerance: f32) {
    let prompts: [&[u32]; 3] = [&PROMPT[..5], &PROMPT[2..], &PROMPT[..1]];
    let rounds: [[&[u32]; 3]; 3] = [prompts, [&[7], &[8], &[9]], [&PROMPT[3..9], &[10], &[11]]];
    let mut alone = Vec::new();
    for i in 0..3 {
        let mut cache = CandleCache::new(model, 64);
        let per_round: Vec<Vec<f32>> = rounds
            .iter()
            .map(|round| call(model, vec![(round[i], &mut cache)]).remove(0))
            .collect();
        alone.push(per_round);
    }
    let mut caches: Vec<CandleCache> = (0..3).map(|_| CandleCache::new(model, 64)).collect();
    for (r, round) in rounds.iter().enumerate() {
        let together = call(
            model,
            round.iter().copied().zip(caches.iter_mut()).collect(),
        );
        for (i, logits) in together.into_iter().enumerate() {
            let err = worst(&[logits], &[alone[i][r].clone()]);
            assert!(err < tolerance, "round {r}, sequence {i}: {err}");
        }
    }
    assert_eq!(caches[0].len(), 5 + 1 + 6);
    assert_eq!(caches[1].len(), PROMPT.len() - 2 + 2);
}

#[test]
fn one_call_over_several_sequences_equals_separate_calls() {
    for arch in ["qwen2", "qwen3"] {
        let dir = tempfile::tempdir().unwrap();
        tiny::write_model(dir.path(), arch, 21);
        several_sequences_equal_separate_calls(
            &candle_model(dir.path(), DType::F32, &Device::Cpu),
            1e-5,
        );
    }
}

/// Decoding sequences of different lengths in one batch, with their blocks interleaved in the
/// pool (their prompts went in by turns) and lengths on both sides of block edges: the batch
/// gathers each one's rows and masks its padding (and, with a sliding window, what the window
/// leaves out), so each equals the native pass run alone. A prompt chunk in the same call keeps
/// its own attention. Afterwards every block is back in the pool.
#[test]
fn batched_decoding_across_blocks_equals_each_sequence_alone() {
    batched_decoding_across_blocks(&Device::Cpu, 1e-4);
}

fn batched_decoding_across_blocks(device: &Device, tolerance: f32) {
    let lens = [1, 3, BLOCK - 1, BLOCK, BLOCK + 5, 2 * BLOCK + 1];
    let prompts: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| (0..n).map(|j| ((i * 31 + j * 7) % 250) as u32).collect())
        .collect();
    for (name, dir) in variants() {
        let model = candle_model(dir.path(), DType::F32, device);
        // Alone, on the native pass: the prompt, then three greedy tokens.
        let alone: Vec<Vec<Vec<f32>>> = prompts
            .iter()
            .map(|p| run_on(native_lm(dir.path(), 4 * BLOCK).as_mut(), p, 3))
            .collect();
        let mut caches: Vec<CandleCache> = lens
            .iter()
            .map(|_| CandleCache::new(&model, 4 * BLOCK))
            .collect();
        // Prompts by turns, 16 tokens a sequence a call; the logits of each one's last chunk.
        let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); lens.len()];
        for round in 0.. {
            let parts: Vec<(usize, &[u32])> = prompts
                .iter()
                .enumerate()
                .filter(|(_, p)| round * 16 < p.len())
                .map(|(i, p)| (i, &p[round * 16..((round + 1) * 16).min(p.len())]))
                .collect();
            if parts.is_empty() {
                break;
            }
            let mut steps: Vec<CandleStep> = Vec::new();
            let mut which = Vec::new();
            for (i, cache) in caches.iter_mut().enumerate() {
                if let Some(&(_, tokens)) = parts.iter().find(|(j, _)| *j == i) {
                    steps.push(CandleStep { tokens, cache });
                    which.push(i);
                }
            }
            let mut logits = Vec::new();
            model.forward(&mut steps, &mut logits).unwrap();
            for (k, &i) in which.iter().enumerate() {
                if (round + 1) * 16 >= prompts[i].len() {
                    let v = model.config.vocab;
                    got[i].push(logits[k * v..(k + 1) * v].to_vec());
                }
            }
        }
        // Three decode steps of every sequence in one call each; the last one also carries a
        // new sequence's prompt chunk.
        let mut extra = CandleCache::new(&model, 4 * BLOCK);
        for step in 0..3 {
            let next: Vec<[u32; 1]> = got.iter().map(|g| [argmax(g.last().unwrap())]).collect();
            let mut steps: Vec<CandleStep> = caches
                .iter_mut()
                .zip(&next)
                .map(|(cache, t)| CandleStep { tokens: t, cache })
                .collect();
            if step == 2 {
                steps.insert(
                    2,
                    CandleStep {
                        tokens: &PROMPT[..7],
                        cache: &mut extra,
                    },
                );
            }
            let mut logits = Vec::new();
            model.forward(&mut steps, &mut logits).unwrap();
            let v = model.config.vocab;
            let mut rows: Vec<Vec<f32>> = logits.chunks(v).map(<[f32]>::to_vec).collect();
            if step == 2 {
                let chunk = rows.remove(2);
                let expected = run_on(native_lm(dir.path(), 64).as_mut(), &PROMPT[..7], 0);
                let err = worst(&[chunk], &expected);
                assert!(
                    err < tolerance,
                    "{name}: the prompt chunk among decoding steps: {err}"
                );
            }
            for (g, row) in got.iter_mut().zip(rows) {
                g.push(row);
            }
        }
        for (i, (g, a)) in got.iter().zip(&alone).enumerate() {
            let err = worst(g, a);
            eprintln!(
                "{name}: sequence {i} ({} tokens): worst relative logit difference {err}",
                lens[i]
            );
            assert!(
                err < tolerance,
                "{name}: sequence {i} ({} tokens): {err}",
                lens[i]
            );
        }
        let pool = model.pool();
        assert!(pool.free_blocks() < pool.blocks());
        caches[5].truncate(BLOCK);
        assert_eq!(caches[5].allocated(), BLOCK);
        drop(caches);
        drop(extra);
        assert_eq!(
            pool.free_blocks(),
            pool.blocks(),
            "{name}: every block back"
        );
    }
}

/// The pool grows by half ahead of need, within the cap the worker sets from its KV budget,
/// and always by what is asked; blocks come back when caches drop.
#[test]
fn the_pool_grows_by_half_ahead_of_need_within_its_cap() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write_model(dir.path(), "llama", 23);
    let model = candle_model(dir.path(), DType::F32, &Device::Cpu);
    let pool = model.pool();
    let tokens = |n: usize| -> Vec<u32> { (0..n).map(|i| (i * 13 % 250) as u32).collect() };
    let mut caches: Vec<CandleCache> = (0..4)
        .map(|_| CandleCache::new(&model, 8 * BLOCK))
        .collect();
    let grow = |i: usize, n: usize, caches: &mut [CandleCache]| {
        call(&model, vec![(&tokens(n), &mut caches[i])]);
        (pool.blocks(), pool.free_blocks())
    };
    assert_eq!(
        grow(0, 4 * BLOCK, &mut caches),
        (4, 0),
        "exactly what is asked first"
    );
    assert_eq!(grow(1, 1, &mut caches), (6, 1), "then by half");
    pool.cap_growth(7);
    assert_eq!(
        grow(2, 2 * BLOCK, &mut caches),
        (7, 0),
        "by half, but not past the cap"
    );
    assert_eq!(
        grow(3, 1, &mut caches),
        (8, 0),
        "past the cap only by what is asked"
    );
    drop(caches);
    assert_eq!((pool.blocks(), pool.free_blocks()), (8, 8));
}

#[test]
fn a_prompt_in_chunks_equals_the_prompt_at_once() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write_model(dir.path(), "llama", 21);
    let model = candle_model(dir.path(), DType::F32, &Device::Cpu);
    let mut whole = CandleCache::new(&model, 32);
    let expected = call(&model, vec![(PROMPT, &mut whole)]);
    let mut chunked = CandleCache::new(&model, 32);
    let mut last = Vec::new();
    for chunk in PROMPT.chunks(4) {
        last = call(&model, vec![(chunk, &mut chunked)]);
    }
    assert_eq!(chunked.len(), PROMPT.len());
    let err = worst(&last, &expected);
    assert!(err < 1e-5, "{err}");
}

/// Prefix caching: a new sequence copies the first tokens of another's cache and computes only
/// the rest.
#[test]
fn copying_a_prefix_then_continuing_equals_computing_from_scratch() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write_model(dir.path(), "qwen2", 22);
    let model = candle_model(dir.path(), DType::F32, &Device::Cpu);
    let mut donor = CandleCache::new(&model, 64);
    call(&model, vec![(PROMPT, &mut donor)]);
    call(&model, vec![(&[5, 6], &mut donor)]);
    let mut scratch = CandleCache::new(&model, 64);
    let expected = call(
        &model,
        vec![(&[&PROMPT[..8], &[42, 43]].concat(), &mut scratch)],
    );
    // Into a fresh cache, and into one that already held (more) other tokens.
    let mut fresh = CandleCache::new(&model, 64);
    let mut used = CandleCache::new(&model, 64);
    call(&model, vec![(&[1; 20], &mut used)]);
    for cache in [&mut fresh, &mut used] {
        cache.copy_prefix_from(&donor, 8).unwrap();
        assert_eq!(cache.len(), 8);
        let got = call(&model, vec![(&[42, 43], &mut *cache)]);
        let err = worst(&got, &expected);
        assert!(err < 1e-5, "{err}");
    }
    // The donor is untouched.
    let mut again = CandleCache::new(&model, 64);
    call(&model, vec![(PROMPT, &mut again)]);
    let a = call(&model, vec![(&[5, 6], &mut again)]);
    donor.truncate(PROMPT.len());
    let b = call(&model, vec![(&[5, 6], &mut donor)]);
    assert!(worst(&a, &b) < 1e-6);
    assert!(fresh.copy_prefix_from(&donor, 100).is_err());
}

/// A sequence longer than a cache's first allocation: the cache grows and keeps what it held;
/// going back to an earlier position (CausalLm::forward with a smaller pos) recomputes from
/// there.
#[test]
fn a_cache_grows_in_chunks_and_keeps_its_contents() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write_model(dir.path(), "qwen3", 24);
    let long: Vec<u32> = (0..3 * BLOCK + 5).map(|i| (i * 7 % 250) as u32).collect();
    let mut native = native_lm(dir.path(), 512);
    let mut candle = candle_lm(dir.path(), DType::F32, &Device::Cpu, 512);
    let mut a = Vec::new();
    let mut b = Vec::new();
    for (i, chunk) in long.chunks(50).enumerate() {
        a.push(candle.forward(chunk, i * 50).unwrap().to_vec());
        b.push(native.forward(chunk, i * 50).unwrap().to_vec());
    }
    a.push(candle.forward(&[3, 4], 100).unwrap().to_vec());
    b.push(native.forward(&[3, 4], 100).unwrap().to_vec());
    let err = worst(&a, &b);
    assert!(err < 1e-4, "{err}");
}

#[test]
fn overflowing_the_cache_or_the_vocabulary_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write_model(dir.path(), "llama", 21);
    let model = candle_model(dir.path(), DType::F32, &Device::Cpu);
    let mut logits = Vec::new();
    let mut cache = CandleCache::new(&model, 4);
    let err = model
        .forward(
            &mut [CandleStep {
                tokens: &PROMPT[..5],
                cache: &mut cache,
            }],
            &mut logits,
        )
        .unwrap_err();
    assert!(err.contains("cache holds 4"), "{err}");
    assert_eq!(cache.len(), 0);
    let err = model
        .forward(
            &mut [CandleStep {
                tokens: &[100_000],
                cache: &mut cache,
            }],
            &mut logits,
        )
        .unwrap_err();
    assert!(err.contains("outside the vocabulary"), "{err}");
    let err = model
        .forward(
            &mut [CandleStep {
                tokens: &[],
                cache: &mut cache,
            }],
            &mut logits,
        )
        .unwrap_err();
    assert!(err.contains("no tokens"), "{err}");
    // The native cache type and this one agree on what a full cache is.
    let mut native_cache = KvCache::new(&model.config, 4);
    let native =
        native::load_safetensors(&read_config(dir.path()), &weights(dir.path()), DType::F32)
            .unwrap()
            .unwrap();
    assert!(native
        .forward(
            &mut [Step {
                tokens: &PROMPT[..5],
                cache: &mut native_cache,
            }],
            &mut Workspace::default(),
        )
        .is_err());
}

/// The GPU, or None (with a note) when this build or machine has none.
fn cuda_device() -> Option<Device> {
    let required = std::env::var("LMX_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    if !candle_core::utils::cuda_is_available() {
        assert!(
            !required,
            "LMX_REQUIRE_CUDA=1 but this build has no cuda feature"
        );
        eprintln!("skipped: built without the cuda feature");
        return None;
    }
    match Device::new_cuda(0) {
        Ok(device) => Some(device),
        Err(e) => {
            assert!(!required, "LMX_REQUIRE_CUDA=1 but no CUDA device: {e}");
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// On the GPU: f32 within 1e-3 of the native CPU pass (cuBLAS sums in another order), bf16
/// within 0.1 (bf16 weights and activations against f32 ones).
#[test]
fn cuda_matches_the_native_pass_in_f32_and_bf16() {
    let Some(gpu) = cuda_device() else { return };
    for (name, dir) in variants() {
        let reference = run(native_lm(dir.path(), 64).as_mut(), 6);
        let f32_run = run(candle_lm(dir.path(), DType::F32, &gpu, 64).as_mut(), 6);
        let err = worst(&f32_run, &reference);
        eprintln!("{name}: f32 on CUDA, worst relative logit difference {err}");
        assert!(err < 1e-3, "{name}: f32 on CUDA: {err}");
        // bf16: the prompt alone (greedy decode may pick other tokens than the f32 run).
        let bf16_run = run(candle_lm(dir.path(), DType::BF16, &gpu, 64).as_mut(), 0);
        let err = worst(&bf16_run, &reference[..1]);
        eprintln!("{name}: bf16 on CUDA, worst relative logit difference {err}");
        assert!(err < 1e-1, "{name}: bf16 on CUDA: {err}");
    }
}

#[test]
fn cuda_several_sequences_equal_separate_calls() {
    let Some(gpu) = cuda_device() else { return };
    let dir = tempfile::tempdir().unwrap();
    tiny::write_model(dir.path(), "qwen2", 21);
    several_sequences_equal_separate_calls(&candle_model(dir.path(), DType::F32, &gpu), 1e-4);
    several_sequences_equal_separate_calls(&candle_model(dir.path(), DType::BF16, &gpu), 5e-2);
}

/// The batched decoding of sequences whose blocks are spread over the pool, on the GPU (f32,
/// within 1e-3 of the native CPU pass, as the single-sequence comparison).
#[test]
fn cuda_batched_decoding_across_blocks_equals_each_sequence_alone() {
    let Some(gpu) = cuda_device() else { return };
    batched_decoding_across_blocks(&gpu, 1e-3);
}

/// Quantized GGUF matrices on the GPU. Both models are fed the same tokens (the native pass's
/// greedy choices), so a near tie that one breaks the other way does not make them diverge.
/// Q8_0 tolerance 8e-2: candle's CUDA QMatMul quantizes the activations to Q8_1 blocks, the
/// native pass to Q8_0 blocks, each rounding on its own (the CPU passes share one Q8_0 rounding,
/// hence 2e-3 there); on an H200 the steps differed by 0.034 to 0.055, the prompt step by
/// 0.043, so the gap is the two roundings, not a drift. F16: 1e-3.
#[test]
fn cuda_gguf_llama_matches_the_native_pass() {
    use candle_core::quantized::GgmlDType;
    let Some(gpu) = cuda_device() else { return };
    for (dtype, tolerance) in [(GgmlDType::Q8_0, 8e-2), (GgmlDType::F16, 1e-3)] {
        let (_dir, mut native, mut candle) = gguf_models(dtype, &gpu);
        let theirs = run(native.as_mut(), 6);
        let forced: Vec<u32> = theirs[..6].iter().map(|l| argmax(l)).collect();
        let mut ours = vec![candle.forward(PROMPT, 0).unwrap().to_vec()];
        for (i, &t) in forced.iter().enumerate() {
            ours.push(candle.forward(&[t], PROMPT.len() + i).unwrap().to_vec());
        }
        for (step, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            let err = worst(std::slice::from_ref(a), std::slice::from_ref(b));
            eprintln!("GGUF {dtype:?} on CUDA, step {step}: worst relative logit difference {err}");
        }
        let err = worst(&ours, &theirs);
        assert!(err < tolerance, "{dtype:?}: {err}");
    }
}
