//! lmx against llama.cpp and transformers on the same weights (a bench binary:
//! `scripts/bench-speed.sh`, which prepares the peers' Python and runs `cargo bench --bench
//! speed`; needs `scripts/test-env.sh`'s SmolLM2 GGUF).
//!
//! For each weight set, in one run and one after the other (never two engines at once):
//! - f32: SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF, as HF safetensors for lmx and
//!   transformers and as an F32 GGUF (same tensors, same metadata) for llama.cpp;
//! - Q4_1: the original GGUF, loaded directly by lmx and llama.cpp (transformers: n/a);
//!
//! the engines are lmx in-process (`lmx::engine`), lmx through gRPC (the real `lmx serve` binary
//! as a separate process, whose idle CPU use is read from /proc), llama.cpp (llama-cpp-python)
//! and transformers (torch, f32). Every engine runs the same 128 prompt tokens (lmx gets a text
//! its tokenizer makes exactly those ids; the peers get the ids) and generates 128 tokens
//! greedily; figures are medians of LMX_BENCH_RUNS (3) runs after one warm-up:
//! TTFT, prompt tok/s = prompt tokens / TTFT, decode tok/s = (tokens - 1) / (t_last - t_first).
//! Environment: LMX_BENCH_PYTHON (a Python with the peers; unset: only lmx runs),
//! LMX_BENCH_RUNS, LMX_BENCH_NEW_TOKENS, LMX_BENCH_IDLE_SECS (5), LMX_BENCH_RETRIES (1),
//! LMX_TEST_MODELS.
//!
//! Every row also says how much of the machine other processes used while it ran; an engine
//! measured while they took more than 10% is measured again (once by default) and the least
//! disturbed attempt kept: figures taken next to a build are low, and the report says so
//! instead of printing them as if clean.
//!
//! Then concurrent streams (`concurrency.rs`): 1, 2, 4, 8 and 16 clients at once through `lmx
//! serve` against llama.cpp's batched decoding, and a 2,000-token prompt arriving while 4
//! streams decode. LMX_BENCH_ONLY=single or =concurrency runs one part; LMX_BENCH_STREAMS and
//! LMX_BENCH_CONC_TOKENS set the stream counts and the tokens each stream generates;
//! LMX_BENCH_WEIGHTS=f32 or =q4_1 measures one weight set.

mod concurrency;
mod lmx_local;
mod machine;
mod measure;
mod peers;
mod report;
mod server;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lmx_local::{ExactPrompt, Local};
use machine::LoadMeter;
use measure::{Figures, Sample};
use peers::Peers;
use report::{EngineKind, Idle, Report, Row, Weights};
use server::Server;

const PROMPT_TOKENS: usize = 128;
/// Share of the machine other processes may take while an engine runs before it is measured
/// again (LMX_BENCH_RETRIES times at most, 1 by default, and only in the first 6 minutes).
const OTHER_LOAD_LIMIT: f64 = 0.10;

struct Settings {
    runs: usize,
    new_tokens: usize,
    idle: Duration,
    threads: usize,
    retries: usize,
    /// No measuring again after this: a machine busy all along gets its figures flagged, not a
    /// run three times as long.
    retry_until: Instant,
}

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

/// One weight set as each engine loads it.
struct WeightSet {
    weights: Weights,
    /// A folder `lmx::engine::load` and LoadModel take.
    lmx_dir: PathBuf,
    /// The GGUF file llama.cpp loads.
    gguf: Result<PathBuf, String>,
    /// The HF snapshot transformers loads, if it can load these weights.
    hf_dir: Option<PathBuf>,
}

fn main() {
    let settings = Settings {
        runs: env_usize("LMX_BENCH_RUNS", 3),
        new_tokens: env_usize("LMX_BENCH_NEW_TOKENS", 128),
        idle: Duration::from_secs(env_usize("LMX_BENCH_IDLE_SECS", 5) as u64),
        threads: machine::cores(),
        retries: std::env::var("LMX_BENCH_RETRIES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1),
        retry_until: Instant::now() + Duration::from_secs(6 * 60),
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let models = std::env::var_os("LMX_TEST_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".cache/models"));
    let gguf = models.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.exists() {
        eprintln!(
            "{} is missing: run scripts/test-env.sh first",
            gguf.display()
        );
        std::process::exit(2);
    }
    let peers = Peers::from_env();
    let mut sets = prepare(&models, &gguf, peers.as_ref());
    if let Ok(only) = std::env::var("LMX_BENCH_WEIGHTS") {
        sets.retain(|s| s.weights.label().eq_ignore_ascii_case(&only));
    }

    let machine = machine::Machine::detect();
    let mut report = Report::default();
    let mut versions = Vec::new();
    let only = std::env::var("LMX_BENCH_ONLY").unwrap_or_default();
    let conc = concurrency::Settings::from_env(settings.runs, settings.threads);
    let mut conc_rows = Vec::new();
    let mut interference = Vec::new();
    for set in &sets {
        let local = Local::load(&set.lmx_dir);
        let prompts = local.as_ref().map_err(Clone::clone).and_then(|l| {
            concurrency::Prompts::make(l, conc.streams.iter().copied().max().unwrap_or(1).max(4))
        });
        drop(local);
        if only != "concurrency" {
            bench_weights(set, &settings, peers.as_ref(), &mut report, &mut versions);
        }
        if only == "single" {
            continue;
        }
        match prompts {
            Ok(prompts) => {
                eprintln!("speed: {} concurrent streams ...", set.weights.label());
                let (row, inter) = concurrency::lmx(set.weights, &set.lmx_dir, &prompts, &conc);
                conc_rows.push(row);
                interference.push(inter);
                conc_rows.push(concurrency::llama(
                    set.weights,
                    &set.gguf,
                    peers.as_ref(),
                    &prompts,
                    &conc,
                ));
            }
            Err(e) => conc_rows.push(concurrency::Row {
                weights: set.weights,
                engine: concurrency::LMX,
                outcome: Err(e),
            }),
        }
    }

    println!();
    println!("## lmx vs llama.cpp vs transformers: SmolLM2-135M-Instruct on the same weights");
    println!();
    machine.print();
    for version in &versions {
        println!("  {version}");
    }
    println!(
        "{} new tokens, greedy; medians of {} runs after 1 warm-up; {} threads per engine.",
        settings.new_tokens, settings.runs, settings.threads
    );
    if only != "concurrency" {
        report.print();
    }
    if only != "single" {
        concurrency::print(&conc_rows, &interference, &conc);
    }
}

/// The folders and files every engine loads, converted once and kept under `models`.
fn prepare(models: &Path, gguf: &Path, peers: Option<&Peers>) -> Vec<WeightSet> {
    let hf = lmx::testing::convert::gguf_llama_to_hf_once(
        gguf,
        &models.join("smollm2-hf-f32-3shards"),
        3,
    )
    .expect("convert the GGUF to HF safetensors");
    let f32_gguf = match peers {
        Some(p) => {
            let dst = models.join("smollm2-f32-gguf/SmolLM2-135M-Instruct.F32.gguf");
            p.f32_gguf(gguf, &dst).map(|()| dst)
        }
        None => Err("LMX_BENCH_PYTHON is not set".into()),
    };
    // A folder holding only the GGUF, as a repository with just that file would.
    let q4_dir = models.join("smollm2-q4_1");
    let link = q4_dir.join(gguf.file_name().expect("a file name"));
    if !link.exists() {
        std::fs::create_dir_all(&q4_dir).expect("create the Q4_1 folder");
        std::os::unix::fs::symlink(gguf, &link).expect("link the GGUF");
    }
    vec![
        WeightSet {
            weights: Weights::F32,
            lmx_dir: hf.clone(),
            gguf: f32_gguf,
            hf_dir: Some(hf),
        },
        WeightSet {
            weights: Weights::Q4_1,
            lmx_dir: q4_dir,
            gguf: Ok(gguf.to_owned()),
            hf_dir: None,
        },
    ]
}

/// Warm-up, then `runs` measured runs.
fn measured(
    runs: usize,
    mut once: impl FnMut() -> Result<Sample, String>,
) -> Result<Vec<Sample>, String> {
    once()?;
    (0..runs).map(|_| once()).collect()
}

/// Runs `measure` with a [`LoadMeter`] around it; while other processes took more than
/// [`OTHER_LOAD_LIMIT`] of the machine, measures again, up to `retries` more times, and keeps
/// the least disturbed attempt. `ours`: CPU seconds of our processes this one does not wait for.
fn least_disturbed<T>(
    settings: &Settings,
    ours: impl Fn() -> f64,
    mut measure: impl FnMut() -> Result<T, String>,
) -> (Result<T, String>, Option<f64>) {
    let mut best: Option<(T, Option<f64>)> = None;
    for attempt in 0..=settings.retries {
        let meter = LoadMeter::start(ours());
        let result = match measure() {
            Ok(r) => r,
            Err(e) => return (Err(e), None),
        };
        let other = meter.and_then(|m| m.other_share(ours()));
        let load = other.unwrap_or(0.0);
        if best.as_ref().is_none_or(|(_, b)| load < b.unwrap_or(0.0)) {
            best = Some((result, other));
        }
        let last = attempt == settings.retries || Instant::now() > settings.retry_until;
        if load <= OTHER_LOAD_LIMIT || last {
            break;
        }
        eprintln!(
            "speed: other processes took {:.0}% of the machine meanwhile; measuring again",
            load * 100.0
        );
    }
    let (result, other) = best.expect("at least one attempt");
    (Ok(result), other)
}

/// Announces the next engine on stderr.
fn begin(weights: Weights, engine: EngineKind) {
    eprintln!("speed: {} {} ...", weights.label(), engine.label());
}

/// A row of the report; `other_load`: share of the machine that other work used meanwhile.
fn row(
    weights: Weights,
    engine: EngineKind,
    samples: Result<Vec<Sample>, String>,
    other_load: Option<f64>,
) -> Row {
    let outcome = samples.map(|s| {
        let f = Figures::from_samples(&s);
        eprintln!(
            "speed: {} {}: TTFT {:.1} ms, prompt {:.0} tok/s, decode {:.1} tok/s ({} prompt / {} new tokens; other load {})",
            weights.label(),
            engine.label(),
            f.ttft_s * 1e3,
            f.prompt_tps,
            f.decode_tps,
            f.prompt_tokens,
            f.completion_tokens,
            other_load.map_or("?".into(), |l| format!("{:.0}%", l * 100.0)),
        );
        (f, s[0].token_ids.clone())
    });
    if let Err(e) = &outcome {
        eprintln!("speed: {} {}: {e}", weights.label(), engine.label());
    }
    Row {
        weights,
        engine,
        outcome,
        other_load,
    }
}

fn bench_weights(
    set: &WeightSet,
    settings: &Settings,
    peers: Option<&Peers>,
    report: &mut Report,
    versions: &mut Vec<String>,
) {
    let w = set.weights;
    let (n, runs) = (settings.new_tokens, settings.runs);
    begin(w, EngineKind::LmxInProcess);
    let local = Local::load(&set.lmx_dir);
    let prompt = local
        .as_ref()
        .map_err(Clone::clone)
        .and_then(|l| l.exact_prompt(PROMPT_TOKENS));
    let prompt = match prompt {
        Ok(p) => p,
        Err(e) => {
            eprintln!("speed: {}: {e}", w.label());
            report
                .rows
                .push(row(w, EngineKind::LmxInProcess, Err(e), None));
            return;
        }
    };
    let local = local.expect("loaded above");
    let (samples, other) = least_disturbed(
        settings,
        || 0.0,
        || measured(runs, || local.generate(&prompt.text, n)),
    );
    report
        .rows
        .push(row(w, EngineKind::LmxInProcess, samples, other));
    drop(local);

    begin(w, EngineKind::LmxGrpc);
    let (grpc, idle, other) = over_grpc(set, settings, &prompt);
    report.rows.push(row(w, EngineKind::LmxGrpc, grpc, other));
    report.idle.push(idle);

    let mut seen = vec![format!("lmx {}", prompt.ids.len())];
    let peer_runs = [
        (EngineKind::LlamaCpp, "llama", set.gguf.clone()),
        (
            EngineKind::Transformers,
            "transformers",
            set.hf_dir
                .clone()
                .ok_or_else(|| "no Q4_1 path in transformers".to_owned()),
        ),
    ];
    for (engine, name, model) in peer_runs {
        let (result, other) = match (model, peers) {
            (Err(e), _) => (Err(e), None),
            (Ok(_), None) => (Err("LMX_BENCH_PYTHON is not set".to_owned()), None),
            (Ok(model), Some(peers)) => {
                begin(w, engine);
                least_disturbed(
                    settings,
                    || 0.0,
                    || peers.run(name, &model, &prompt, n, runs, settings.threads),
                )
            }
        };
        let samples = result.map(|r| {
            let info = if r.system_info.is_empty() {
                String::new()
            } else {
                format!("; {}", r.system_info)
            };
            let version = format!("{}: {}{info}", engine.label(), r.version);
            if !versions.contains(&version) {
                versions.push(version);
            }
            seen.push(format!(
                "{} {} (its own tokenizer {})",
                engine.label(),
                r.samples.first().map_or(0, |s| s.prompt_tokens),
                if r.tokenizer_agrees {
                    "agrees"
                } else {
                    "DIFFERS"
                }
            ));
            r.samples
        });
        report.rows.push(row(w, engine, samples, other));
    }
    report.header.push(format!(
        "{} prompt: {PROMPT_TOKENS} tokens of prose by lmx's tokenizer; prompt tokens each engine saw: {}",
        w.label(),
        seen.join(", ")
    ));
}

/// The gRPC runs against a fresh `lmx serve`, its idle CPU use around them, and the share of
/// the machine other work used during the runs.
fn over_grpc(
    set: &WeightSet,
    settings: &Settings,
    prompt: &ExactPrompt,
) -> (Result<Vec<Sample>, String>, Idle, Option<f64>) {
    let mut idle = Idle {
        weights: set.weights,
        after_load: Err("not measured".into()),
        after_generating: Err("not measured".into()),
        rss_mib: None,
    };
    let cache = tempfile::tempdir().expect("tempdir");
    let bin = Path::new(env!("CARGO_BIN_EXE_lmx"));
    let server = match Server::start_with(bin, cache.path(), &["--prefix-cache", "false"]) {
        Ok(s) => s,
        Err(e) => return (Err(e), idle, None),
    };
    let model_id = match server.load(&set.lmx_dir) {
        Ok(id) => id,
        Err(e) => return (Err(e), idle, None),
    };
    idle.rss_mib = server.rss_mib();
    idle.after_load = server.idle_cpu_percent(settings.idle);
    let server_cpu = || server.cpu_seconds().unwrap_or(0.0);
    let (samples, other) = least_disturbed(settings, server_cpu, || {
        measured(settings.runs, || {
            server.generate(&model_id, &prompt.text, settings.new_tokens)
        })
    });
    idle.after_generating = server.idle_cpu_percent(settings.idle);
    (samples, idle, other)
}
