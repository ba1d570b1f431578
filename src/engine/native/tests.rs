//! The native forward pass against candle-transformers on the same tiny random weights (fixed
//! seeds): every llama-family variant, safetensors and GGUF, prompt then decode steps; plus the
//! properties batching relies on (a multi-sequence call equals separate calls; a chunked
//! prompt equals a whole one).

use std::path::{Path, PathBuf};

use candle_core::{quantized::gguf_file, DType, Device};
use serde_json::Value;

use super::*;
use crate::engine::arch::{self, CausalLm};
use crate::testing::tiny;

const PROMPT: &[u32] = &[257, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100];

fn read_config(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap()
}

fn weights(dir: &Path) -> Vec<PathBuf> {
    vec![dir.join("model.safetensors")]
}

/// Logits for the prompt, then for `decode` greedy steps, from one model.
fn run(model: &mut dyn CausalLm, decode: usize) -> Vec<Vec<f32>> {
    let mut out = vec![model.forward(PROMPT, 0).unwrap().to_vec()];
    for step in 0..decode {
        let next = argmax(out.last().unwrap());
        out.push(
            model
                .forward(&[next], PROMPT.len() + step)
                .unwrap()
                .to_vec(),
        );
    }
    out
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

fn native_and_candle(dir: &Path) -> (Box<dyn CausalLm>, Box<dyn CausalLm>) {
    let config = read_config(dir);
    let mut native = load_safetensors(&config, &weights(dir), DType::F32)
        .unwrap()
        .expect("the native path runs this config");
    // candle's caches hold f32.
    native.config.kv_dtype = KvDtype::F32;
    let candle = arch::load_candle_safetensors(&config, &weights(dir), DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    let native = NativeLm::base(native).fork(64).unwrap();
    let candle = candle.fork(64).unwrap_or(candle);
    (native, candle)
}

/// Tolerance 1e-4 relative: both run f32 end to end; only summation order and the exp/rope
/// formulas differ.
#[test]
fn every_llama_family_variant_matches_candle_transformers() {
    for arch in ["llama", "mistral", "qwen2", "qwen3"] {
        let dir = tempfile::tempdir().unwrap();
        tiny::write_model(dir.path(), arch, 11);
        let (mut native, mut candle) = native_and_candle(dir.path());
        let (a, b) = (run(native.as_mut(), 6), run(candle.as_mut(), 6));
        let err = worst(&a, &b);
        assert!(err < 1e-4, "{arch}: worst relative logit difference {err}");
    }
}

#[test]
fn llama3_rope_scaling_matches_candle() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write_model_with(dir.path(), "llama", 12, |c| {
        c["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16});
        c["rope_theta"] = serde_json::json!(500000.0);
    });
    let (mut native, mut candle) = native_and_candle(dir.path());
    let err = worst(&run(native.as_mut(), 4), &run(candle.as_mut(), 4));
    assert!(err < 1e-4, "worst relative logit difference {err}");
}

/// Transformers lets a token see the `sliding_window` positions up to and including its own;
/// candle's mistral lets it see one more, and applies the window to a prompt only. So the
/// comparison is native(window 4) against candle(window 3), on the prompt.
#[test]
fn a_sliding_window_shorter_than_the_prompt_masks_the_earliest_positions() {
    let ours = tempfile::tempdir().unwrap();
    tiny::write_model_with(ours.path(), "mistral", 13, |c| {
        c["sliding_window"] = 4.into()
    });
    let theirs = tempfile::tempdir().unwrap();
    tiny::write_model_with(theirs.path(), "mistral", 13, |c| {
        c["sliding_window"] = 3.into()
    });
    let (mut native, _) = native_and_candle(ours.path());
    let (_, mut candle) = native_and_candle(theirs.path());
    let err = worst(&run(native.as_mut(), 0), &run(candle.as_mut(), 0));
    assert!(err < 1e-4, "worst relative logit difference {err}");
    // And the window does change the answer.
    let full = tempfile::tempdir().unwrap();
    tiny::write_model(full.path(), "mistral", 13);
    let (mut unwindowed, _) = native_and_candle(full.path());
    assert!(worst(&run(native.as_mut(), 0), &run(unwindowed.as_mut(), 0)) > 1e-3);
}

/// Q8_0: both quantize the activations to Q8_0 blocks (tolerance 2e-3 relative). F16: lmx keeps
/// the f16 weights and widens them in registers; candle widens them once (same tolerance).
#[test]
fn gguf_llamas_match_candles_quantized_llama() {
    use candle_core::quantized::GgmlDType;
    for dtype in [GgmlDType::Q8_0, GgmlDType::F16] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        std::fs::write(&path, tiny::spm_llama_gguf_with(5, dtype)).unwrap();
        let content =
            || gguf_file::Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
        let config = NativeConfig::from_gguf(&content()).expect("native GGUF llama");
        assert_eq!(
            config.rope_style,
            crate::engine::kernels::ops::RopeStyle::Interleaved
        );
        let native = load_gguf(
            NativeConfig {
                kv_dtype: KvDtype::F32,
                ..config
            },
            &path,
            content(),
        )
        .unwrap();
        let mut native = NativeLm::base(native).fork(64).unwrap();
        let mut candle = arch::load_candle_gguf(&path, content(), &Device::Cpu)
            .unwrap()
            .model
            .fork(64)
            .unwrap();
        let err = worst(&run(native.as_mut(), 6), &run(candle.as_mut(), 6));
        assert!(
            err < 2e-3,
            "{dtype:?}: worst relative logit difference {err}"
        );
    }
}

fn tiny_model(arch: &str) -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().unwrap();
    tiny::write_model(dir.path(), arch, 21);
    let config = read_config(dir.path());
    let mut model = load_safetensors(&config, &weights(dir.path()), DType::F32)
        .unwrap()
        .unwrap();
    model.config.kv_dtype = KvDtype::F32;
    (dir, model)
}

#[test]
fn one_call_over_several_sequences_equals_separate_calls() {
    let (_dir, model) = tiny_model("qwen2");
    let vocab = model.config.vocab;
    let prompts: [&[u32]; 3] = [&PROMPT[..5], &PROMPT[2..], &PROMPT[..1]];
    // Separate: each sequence alone.
    let mut alone = Vec::new();
    for p in prompts {
        let mut cache = KvCache::new(&model.config, 32);
        let mut ws = Workspace::default();
        model
            .forward(
                &mut [Step {
                    tokens: p,
                    cache: &mut cache,
                }],
                &mut ws,
            )
            .unwrap();
        let first = ws.logits[..vocab].to_vec();
        model
            .forward(
                &mut [Step {
                    tokens: &[7],
                    cache: &mut cache,
                }],
                &mut ws,
            )
            .unwrap();
        alone.push((first, ws.logits[..vocab].to_vec()));
    }
    // Together: all prompts in one call, then one decode token each in one call.
    let mut caches: Vec<KvCache> = prompts
        .iter()
        .map(|_| KvCache::new(&model.config, 32))
        .collect();
    let mut ws = Workspace::default();
    let mut steps: Vec<Step> = prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(p, cache)| Step { tokens: p, cache })
        .collect();
    model.forward(&mut steps, &mut ws).unwrap();
    let firsts: Vec<Vec<f32>> = ws
        .logits
        .chunks(vocab)
        .take(3)
        .map(<[f32]>::to_vec)
        .collect();
    let mut steps: Vec<Step> = caches
        .iter_mut()
        .map(|cache| Step {
            tokens: &[7],
            cache,
        })
        .collect();
    model.forward(&mut steps, &mut ws).unwrap();
    for (i, (first, second)) in alone.iter().enumerate() {
        let together = [
            firsts[i].clone(),
            ws.logits[i * vocab..(i + 1) * vocab].to_vec(),
        ];
        let err = worst(&together, &[first.clone(), second.clone()]);
        assert!(err < 1e-5, "sequence {i}: {err}");
    }
}

#[test]
fn a_prompt_in_chunks_equals_the_prompt_at_once() {
    let (_dir, model) = tiny_model("llama");
    let vocab = model.config.vocab;
    let mut ws = Workspace::default();
    let mut whole = KvCache::new(&model.config, 32);
    model
        .forward(
            &mut [Step {
                tokens: PROMPT,
                cache: &mut whole,
            }],
            &mut ws,
        )
        .unwrap();
    let expected = ws.logits[..vocab].to_vec();
    let mut chunked = KvCache::new(&model.config, 32);
    for chunk in PROMPT.chunks(4) {
        model
            .forward(
                &mut [Step {
                    tokens: chunk,
                    cache: &mut chunked,
                }],
                &mut ws,
            )
            .unwrap();
    }
    assert_eq!(chunked.len(), PROMPT.len());
    let err = worst(&[ws.logits[..vocab].to_vec()], &[expected]);
    assert!(err < 1e-5, "{err}");
}

#[test]
fn overflowing_the_cache_or_the_vocabulary_is_an_error_not_a_panic() {
    let (_dir, model) = tiny_model("llama");
    let mut ws = Workspace::default();
    let mut cache = KvCache::new(&model.config, 4);
    let err = model
        .forward(
            &mut [Step {
                tokens: &PROMPT[..5],
                cache: &mut cache,
            }],
            &mut ws,
        )
        .unwrap_err();
    assert!(err.contains("cache holds 4"), "{err}");
    assert_eq!(cache.len(), 0);
    let err = model
        .forward(
            &mut [Step {
                tokens: &[100_000],
                cache: &mut cache,
            }],
            &mut ws,
        )
        .unwrap_err();
    assert!(err.contains("outside the vocabulary"), "{err}");
}

#[test]
fn configs_outside_the_family_fall_back_to_candle() {
    for arch in ["phi3", "gemma2", "gemma3_text"] {
        let config = tiny::config(arch);
        assert!(NativeConfig::from_hf(&config).is_err(), "{arch}");
    }
    let mut odd = tiny::config("llama");
    odd["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    assert!(NativeConfig::from_hf(&odd).is_err());
}

/// `--dtype f16|bf16` keeps half-precision weights (widened in registers): the logits stay
/// within the weights' rounding of the f32 run (5e-2 relative), and differ from it at all.
#[test]
fn half_precision_weights_track_the_f32_run() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write_model(dir.path(), "qwen2", 23);
    let config = read_config(dir.path());
    let load = |dtype| {
        let model = load_safetensors(&config, &weights(dir.path()), dtype)
            .unwrap()
            .unwrap();
        NativeLm::base(model).fork(64).unwrap()
    };
    let reference = run(load(DType::F32).as_mut(), 4);
    for dtype in [DType::F16, DType::BF16] {
        let half = run(load(dtype).as_mut(), 4);
        let err = worst(&half, &reference);
        assert!(err < 5e-2 && err > 0.0, "{dtype:?}: {err}");
    }
}

/// Many sequences in one call (the quantized kernels' tiles of up to 8 tokens, attention shared
/// among threads, SwiGLU split) equal each sequence alone, on a Q4_1 GGUF: prompts in one
/// call, then decode steps of one token each.
#[test]
fn many_sequences_of_a_quantized_gguf_in_one_call_equal_separate_calls() {
    use candle_core::quantized::GgmlDType;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    std::fs::write(&path, tiny::spm_llama_gguf_with(9, GgmlDType::Q4_1)).unwrap();
    let content = || gguf_file::Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
    let config = NativeConfig::from_gguf(&content()).unwrap();
    let model = load_gguf(config, &path, content()).unwrap();
    let vocab = model.config.vocab;
    let (count, decode_steps) = (11, 3);
    let prompt = |i: usize| &PROMPT[i % 5..PROMPT.len() - i % 3];
    let token = |i: usize, step: usize| [PROMPT[(i + 3 * step) % PROMPT.len()]];
    let mut alone = Vec::new();
    for i in 0..count {
        let mut cache = KvCache::new(&model.config, 32);
        let mut ws = Workspace::default();
        let mut logits = Vec::new();
        for step in 0..=decode_steps {
            let tokens = if step == 0 {
                prompt(i).to_vec()
            } else {
                token(i, step).to_vec()
            };
            let cache = &mut cache;
            model
                .forward(
                    &mut [Step {
                        tokens: &tokens,
                        cache,
                    }],
                    &mut ws,
                )
                .unwrap();
            logits.push(ws.logits[..vocab].to_vec());
        }
        alone.push(logits);
    }
    let mut caches: Vec<KvCache> = (0..count)
        .map(|_| KvCache::new(&model.config, 32))
        .collect();
    let mut ws = Workspace::default();
    let mut together = vec![Vec::new(); count];
    for step in 0..=decode_steps {
        let tokens: Vec<Vec<u32>> = (0..count)
            .map(|i| {
                if step == 0 {
                    prompt(i).to_vec()
                } else {
                    token(i, step).to_vec()
                }
            })
            .collect();
        let mut batch: Vec<Step> = caches
            .iter_mut()
            .zip(&tokens)
            .map(|(cache, tokens)| Step { tokens, cache })
            .collect();
        model.forward(&mut batch, &mut ws).unwrap();
        for (i, logits) in together.iter_mut().enumerate() {
            logits.push(ws.logits[i * vocab..(i + 1) * vocab].to_vec());
        }
    }
    for i in 0..count {
        let err = worst(&together[i], &alone[i]);
        assert!(err < 1e-5, "sequence {i}: {err}");
    }
}

/// An f16 KV cache (the serving default) against an f32 one on the same weights: half the
/// bytes, logits within f16 rounding of the keys and values, and the same greedy tokens.
#[test]
fn an_f16_kv_cache_halves_the_memory_and_keeps_the_logits() {
    for arch in ["llama", "qwen2"] {
        let dir = tempfile::tempdir().unwrap();
        tiny::write_model(dir.path(), arch, 31);
        let config = read_config(dir.path());
        let load = |kv| {
            let mut model = load_safetensors(&config, &weights(dir.path()), DType::F32)
                .unwrap()
                .unwrap();
            model.config.kv_dtype = kv;
            let bytes = KvCache::bytes_per_token(&model.config);
            (NativeLm::base(model).fork(64).unwrap(), bytes)
        };
        let ((mut wide, wide_bytes), (mut half, half_bytes)) =
            (load(KvDtype::F32), load(KvDtype::F16));
        assert_eq!(wide_bytes, 2 * half_bytes);
        let (a, b) = (run(wide.as_mut(), 8), run(half.as_mut(), 8));
        let err = worst(&a, &b);
        assert!(err < 1e-2, "{arch}: worst relative logit difference {err}");
        let tokens = |l: &[Vec<f32>]| l.iter().map(|r| argmax(r)).collect::<Vec<_>>();
        assert_eq!(tokens(&a), tokens(&b), "{arch}");
    }
}
