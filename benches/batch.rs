//! Continuous-batching decode on the native forward pass (a bench binary: `cargo bench --bench
//! batch`): N sequences each feed one token per step through one `Model::forward` call, for
//! N = 1, 2, 4, 8, 16, on SmolLM2-135M as Q4_1 GGUF and as F32 GGUF.
//!
//! Each sequence's KV cache is first filled with its own 32-token prompt (`BATCH_PROMPT`); every repetition then
//! runs `BATCH_STEPS` decode steps per configuration (configurations interleaved, in a rotated
//! order each repetition) and cuts the caches back to the prompt, so every configuration sees
//! the same context lengths. Printed per model and N: the median ms per step over
//! `BATCH_REPS` repetitions, the aggregate tokens/s, and its ratio to N = 1 (and the step time's
//! ratio to N = 1's). For Q4_1, also the integer kernels' ceiling measured in the same run (the
//! VNNI panel tile's instruction mix on data in L1, on every pool thread at once), the floor it
//! puts under a step of N tokens' weight products, and the best ratio to N = 1 that allows (a
//! step is never shorter than N = 1's either, which reading the weights bounds).
//!
//! Env: `BATCH_PROMPT` (default 32), `BATCH_CAPACITY` (cache positions; default what the run needs), `BATCH_REPS` (default 5), `BATCH_STEPS` (default 6), `BATCH_NS` (comma list, default
//! `1,2,4,8,16`), `BATCH_MODELS` (substring filter on `q4_1` / `f32`), `RAYON_NUM_THREADS`,
//! `LMX_KERNELS=scalar|avx2`. Models are read from `.cache/models/` (or `LMX_BENCH_MODELS`);
//! a missing file is skipped with a note.

use std::{
    fs::File,
    path::{Path, PathBuf},
    time::Instant,
};

use candle_core::quantized::gguf_file;
use lmx::engine::{
    kernels,
    native::{load_gguf, KvCache, Model, NativeConfig, Step, Workspace},
};

/// Prompt tokens per sequence: `BATCH_PROMPT` (default 32).
fn prompt_len() -> usize {
    env_usize("BATCH_PROMPT", 32)
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn load(path: &Path) -> Model {
    let read = || gguf_file::Content::read(&mut File::open(path).unwrap()).unwrap();
    let config = NativeConfig::from_gguf(&read()).expect("a native GGUF llama");
    load_gguf(config, path, read()).unwrap()
}

/// A deterministic token id for sequence `seq` at position `pos` (ids 100..20100).
fn token(seq: usize, pos: usize) -> u32 {
    let mut s = (seq as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (pos as u64 + 7) << 17;
    s ^= s >> 29;
    s = s.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    s ^= s >> 32;
    100 + (s % 20_000) as u32
}

/// The SIMD flags of /proc/cpuinfo that matter to the kernels.
fn simd_flags() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = info
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map_or("", |(_, v)| v);
    let keep = |f: &&str| {
        ["avx", "fma", "f16c", "amx"]
            .iter()
            .any(|p| f.starts_with(p))
    };
    let kept: Vec<&str> = flags.split_whitespace().filter(keep).collect();
    if kept.is_empty() {
        std::env::consts::ARCH.to_owned()
    } else {
        kept.join(" ")
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Multiply-adds of one token's pass through `c`'s weight products (the layers' and the head's;
/// attention over the cache not counted).
fn macs_per_token(c: &NativeConfig) -> f64 {
    let (q, kv) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
    let layer = c.hidden * (q + 2 * kv) + q * c.hidden + 3 * c.ffn * c.hidden;
    (c.layers * layer + c.vocab * c.hidden) as f64
}

/// The integer kernels' ceiling on this machine, in G multiply-adds per second over all the
/// kernel pool's threads at once: the instruction mix of the AVX-512 VNNI panel kernel's 8-token
/// Q4_1 tile (per 32-block of 16 weight rows: 4 loads and 8 ops unpacking nibbles, 64
/// `vpdpbusd`, and per token 4 f32 ops applying the block scales) on data that stays in L1, so
/// neither memory nor anything around the products counts. Whatever a batched step spends
/// above `tokens × macs_per_token / ceiling` goes elsewhere. None without AVX-512 VNNI.
fn vnni_ceiling() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        let ok = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        if !ok {
            return None;
        }
        let threads = kernels::pool::threads();
        let blocks = 4_000_000;
        let start = Instant::now();
        let sums: Vec<f32> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|i| {
                    scope.spawn(move || {
                        // SAFETY: the features were detected above.
                        unsafe { ceiling::q4_1_tile(blocks, i as u8) }
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(sums);
        Some((threads * blocks * ceiling::TOKENS * 512) as f64 / secs / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

#[cfg(target_arch = "x86_64")]
mod ceiling {
    use std::arch::x86_64::*;

    /// Tokens of the tile.
    pub const TOKENS: usize = 8;

    /// `blocks` 32-blocks of one 16-row panel against 8 tokens, cycling over 64 blocks of
    /// weights and activations (30 KiB: L1). Returns a sum of the outputs, to keep them live.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW and VNNI, FMA and F16C.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
    pub unsafe fn q4_1_tile(blocks: usize, seed: u8) -> f32 {
        const T: usize = TOKENS;
        let w: Vec<u8> = (0..320 * 64)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect();
        let a: Vec<i8> = (0..32 * T * 64)
            .map(|i| (i as u8).wrapping_mul(17) as i8)
            .collect();
        let ds: Vec<f32> = (0..2 * T * 64).map(|i| 1e-3 * (i % 7) as f32).collect();
        let low4 = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); T];
        for b in 0..blocks {
            let blk = w.as_ptr().add(320 * (b % 64));
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(256).cast()));
            let m = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(288).cast()));
            let act = a.as_ptr().add(32 * T * (b % 64));
            let mut sum = [_mm512_setzero_si512(); T];
            for c in 0..4 {
                let v = _mm512_loadu_si512(blk.add(64 * c).cast());
                let lo = _mm512_and_si512(v, low4);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low4);
                let bcast = |t: usize, at: usize| {
                    _mm512_set1_epi32(act.add(32 * t + at).cast::<i32>().read_unaligned())
                };
                for (t, s) in sum.iter_mut().enumerate() {
                    *s = _mm512_dpbusd_epi32(*s, lo, bcast(t, 4 * c));
                }
                for (t, s) in sum.iter_mut().enumerate() {
                    *s = _mm512_dpbusd_epi32(*s, hi, bcast(t, 16 + 4 * c));
                }
            }
            let scales = ds.as_ptr().add(2 * T * (b % 64));
            for (t, acc) in acc.iter_mut().enumerate() {
                let scale = _mm512_mul_ps(d, _mm512_set1_ps(*scales.add(2 * t)));
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[t]), scale, *acc);
                *acc = _mm512_fmadd_ps(m, _mm512_set1_ps(*scales.add(2 * t + 1)), *acc);
            }
        }
        acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
    }
}

fn bench(name: &str, model: &Model, ns: &[usize], reps: usize, steps: usize, ceiling: Option<f64>) {
    let most = *ns.iter().max().unwrap();
    let capacity = env_usize("BATCH_CAPACITY", prompt_len() + steps + 1);
    let mut caches: Vec<KvCache> = (0..most)
        .map(|_| KvCache::new(&model.config, capacity))
        .collect();
    let mut ws = Workspace::default();
    // Prefill: each sequence its own prompt, in one call per sequence.
    for (i, cache) in caches.iter_mut().enumerate() {
        let prompt: Vec<u32> = (0..prompt_len()).map(|p| token(i, p)).collect();
        model
            .forward(
                &mut [Step {
                    tokens: &prompt,
                    cache,
                }],
                &mut ws,
            )
            .unwrap();
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); ns.len()];
    let run = |n: usize, caches: &mut [KvCache], ws: &mut Workspace| -> f64 {
        let tokens: Vec<[u32; 1]> = (0..n).map(|i| [token(i, prompt_len() + 99)]).collect();
        let start = Instant::now();
        for _ in 0..steps {
            let mut batch: Vec<Step<'_>> = caches[..n]
                .iter_mut()
                .zip(&tokens)
                .map(|(cache, t)| Step { tokens: t, cache })
                .collect();
            model.forward(&mut batch, ws).unwrap();
        }
        let per_step = start.elapsed().as_secs_f64() / steps as f64;
        for cache in &mut caches[..n] {
            cache.truncate(prompt_len());
        }
        per_step
    };
    // Warm-up: one pass over every configuration.
    for &n in ns {
        run(n, &mut caches, &mut ws);
    }
    for rep in 0..reps {
        for k in 0..ns.len() {
            let i = (k + rep) % ns.len();
            times[i].push(run(ns[i], &mut caches, &mut ws));
        }
    }
    let med: Vec<f64> = times.into_iter().map(median).collect();
    if ceiling.is_some() {
        println!(
            "{name}: floor ms = N × {:.1} M multiply-adds per token / ceiling; \
             bound ×N1 = N × step(1) / max(floor, step(1))",
            macs_per_token(&model.config) / 1e6
        );
    }
    let base = ns.iter().position(|&n| n == 1).map(|i| med[i]);
    println!(
        "{:<6} {:>3}  {:>9}  {:>9}  {:>10}  {:>10}  {:>9}  {:>10}",
        name, "N", "ms/step", "tok/s", "tok/s ×N1", "step ×N1", "floor ms", "bound ×N1"
    );
    for (i, &n) in ns.iter().enumerate() {
        let tps = n as f64 / med[i];
        let (ratio, step) = match base {
            Some(b) => (format!("{:.2}x", tps * b), format!("{:.2}x", med[i] / b)),
            None => ("-".into(), "-".into()),
        };
        // The products alone at the ceiling; a step is never shorter than that, nor than
        // N = 1's (which reads every weight once too).
        let floor = ceiling.map(|g| n as f64 * macs_per_token(&model.config) / (g * 1e9));
        let (floor_ms, bound) = match (floor, base) {
            (Some(f), Some(b)) => (
                format!("{:.2}", f * 1e3),
                format!("{:.2}x", n as f64 * b / f.max(b)),
            ),
            (Some(f), None) => (format!("{:.2}", f * 1e3), "-".into()),
            _ => ("-".into(), "-".into()),
        };
        println!(
            "{:<6} {:>3}  {:>9.2}  {:>9.1}  {:>10}  {:>10}  {:>9}  {:>10}",
            name,
            n,
            med[i] * 1e3,
            tps,
            ratio,
            step,
            floor_ms,
            bound
        );
    }
}

fn main() {
    let reps = env_usize("BATCH_REPS", 5).max(1);
    let steps = env_usize("BATCH_STEPS", 6).max(1);
    let ns: Vec<usize> = std::env::var("BATCH_NS")
        .ok()
        .map(|s| s.split(',').filter_map(|v| v.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| vec![1, 2, 4, 8, 16]);
    let only = std::env::var("BATCH_MODELS").unwrap_or_default();
    let root = std::env::var("LMX_BENCH_MODELS").map_or_else(
        |_| Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/models"),
        PathBuf::from,
    );
    let models = [
        (
            "q4_1",
            root.join("smollm2-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"),
        ),
        (
            "f32",
            root.join("smollm2-f32-gguf/SmolLM2-135M-Instruct.F32.gguf"),
        ),
    ];
    println!("{}", kernels::describe_cpu());
    println!("SIMD flags: {}", simd_flags());
    println!(
        "{} prompt tokens per sequence, {steps} steps × {reps} repetitions per configuration (medians)",
        prompt_len()
    );
    let ceiling = vnni_ceiling();
    match ceiling {
        Some(g) => println!(
            "integer kernel ceiling (the Q4_1 VNNI op mix in L1, {} threads at once): {g:.0} G multiply-adds/s",
            kernels::pool::threads(),
        ),
        None => println!("integer kernel ceiling: n/a (no AVX-512 VNNI)"),
    }
    for (name, path) in models {
        if !name.contains(&only) {
            continue;
        }
        if !path.exists() {
            println!("{name}: {} not found, skipped", path.display());
            continue;
        }
        let start = Instant::now();
        let model = load(&path);
        println!("{name}: loaded in {:.2} s", start.elapsed().as_secs_f64());
        // The ceiling is the integer kernels' (Q4_1's op mix); f32 weights use others.
        let ceiling = if name == "q4_1" { ceiling } else { None };
        kernels::pool::session(|| bench(name, &model, &ns, reps, steps, ceiling));
    }
}
