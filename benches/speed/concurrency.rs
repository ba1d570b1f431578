//! Concurrent streams: N clients at once, each with its own prompt, through the real `lmx serve`
//! (continuous batching), against llama.cpp's own batched decoding on the same weights.
//!
//! For N in LMX_BENCH_STREAMS (1,2,4,8,16): N greedy generations of LMX_BENCH_CONC_TOKENS (64)
//! new tokens, prompts of 64 tokens that differ from the first token on, started together.
//! The stream counts take turns (a round runs each once, in a rotated order; the first round
//! warms up), so every count is measured over the same stretch of time. Figures, medians over
//! the runs: aggregate decode tok/s = tokens that arrived while every
//! stream was decoding (from the last stream's first token to the first stream's last token) /
//! that time; output tok/s = Σ(tokens − 1) over the streams / (last token of any stream − first
//! token of any stream), prompts interleaved included; inter-token latency p50/p99 over every
//! gap of every stream; TTFT median and worst over the streams. The server runs with
//! `--max-concurrent 16` and no prefix cache (the runs repeat their prompts; reuse would
//! measure the cache, not the batching).
//!
//! Interference: 4 streams of 128 new tokens decode; once each has 8 tokens, a 2,000-token
//! prompt arrives. The streams' gaps between tokens while that prompt is processed (from its
//! arrival to its first token) against their median gap before it: chunked prefill keeps the
//! ratio small.

use std::path::Path;

use crate::{
    lmx_local::{ExactPrompt, Local},
    measure::{median, output_tps, percentile, steady_tps, Sample},
    peers::Peers,
    report::Weights,
    server::Server,
};

pub struct Settings {
    pub streams: Vec<usize>,
    pub new_tokens: usize,
    pub runs: usize,
    pub threads: usize,
}

impl Settings {
    pub fn from_env(runs: usize, threads: usize) -> Settings {
        let streams = std::env::var("LMX_BENCH_STREAMS")
            .ok()
            .map(|v| {
                v.split(',')
                    .filter_map(|n| n.trim().parse().ok())
                    .filter(|n| *n > 0)
                    .collect::<Vec<usize>>()
            })
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| vec![1, 2, 4, 8, 16]);
        Settings {
            streams,
            new_tokens: crate::env_usize("LMX_BENCH_CONC_TOKENS", 64),
            runs,
            threads,
        }
    }

    /// The server's `--max-concurrent`: the most streams measured, and at least the
    /// interference run's 4 streams plus its long prompt (fewer would queue the long prompt
    /// behind the streams and measure nothing).
    fn most(&self) -> usize {
        self.streams.iter().copied().max().unwrap_or(1).max(5)
    }
}

/// Prompt tokens of each concurrent stream.
const STREAM_PROMPT_TOKENS: usize = 64;
/// The long prompt of the interference run.
const LONG_PROMPT_TOKENS: usize = 2000;

/// The prompts: `n` different ones of exactly [`STREAM_PROMPT_TOKENS`], and the long one.
pub struct Prompts {
    pub streams: Vec<ExactPrompt>,
    pub long: ExactPrompt,
}

impl Prompts {
    pub fn make(local: &Local, n: usize) -> Result<Prompts, String> {
        let streams = (0..n)
            .map(|i| {
                local.exact_prompt_from(
                    &format!("Request {} of the batch: {}", i + 1, crate::lmx_local::TEXT),
                    STREAM_PROMPT_TOKENS,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let long =
            local.exact_prompt_from(&crate::lmx_local::TEXT.repeat(24), LONG_PROMPT_TOKENS)?;
        Ok(Prompts { streams, long })
    }
}

/// Figures of one stream count.
#[derive(Debug, Clone, Copy)]
pub struct Figures {
    pub streams: usize,
    /// While every stream decodes.
    pub aggregate_tps: f64,
    /// From the first token of any stream to the last.
    pub output_tps: f64,
    pub itl_p50_ms: f64,
    pub itl_p99_ms: f64,
    pub ttft_median_ms: f64,
    pub ttft_max_ms: f64,
}

fn gaps(sample: &Sample) -> impl Iterator<Item = f64> + '_ {
    sample.token_times.windows(2).map(|w| w[1] - w[0])
}

impl Figures {
    /// From the runs of `streams` concurrent streams (each run: one sample per stream).
    pub fn from_runs(streams: usize, runs: &[Vec<Sample>]) -> Figures {
        let steady = runs.iter().map(|run| steady_tps(run)).collect();
        let output = runs.iter().map(|run| output_tps(run)).collect();
        let all_gaps: Vec<f64> = runs.iter().flatten().flat_map(gaps).collect();
        let ttfts: Vec<f64> = runs.iter().flatten().map(Sample::ttft).collect();
        Figures {
            streams,
            aggregate_tps: median(steady),
            output_tps: median(output),
            itl_p50_ms: percentile(all_gaps.clone(), 50.0) * 1e3,
            itl_p99_ms: percentile(all_gaps, 99.0) * 1e3,
            ttft_median_ms: median(ttfts.clone()) * 1e3,
            ttft_max_ms: ttfts.iter().copied().fold(0.0, f64::max) * 1e3,
        }
    }
}

/// One engine's figures for every stream count on one weight set.
pub struct Row {
    pub weights: Weights,
    pub engine: &'static str,
    pub outcome: Result<Vec<Figures>, String>,
}

/// The long prompt's effect on the running streams.
pub struct Interference {
    pub weights: Weights,
    pub outcome: Result<InterferenceFigures, String>,
}

pub struct InterferenceFigures {
    /// The streams' median gap before the long prompt arrived.
    pub before_p50_ms: f64,
    /// Their gaps that ended while it was processed.
    pub during_p50_ms: f64,
    pub during_p99_ms: f64,
    pub during_max_ms: f64,
    pub during_gaps: usize,
    /// The long prompt's time to first token, and how long it would take alone.
    pub long_ttft_ms: f64,
}

pub const LMX: &str = "lmx via gRPC (continuous batching)";
pub const LLAMA: &str = "llama.cpp batched (llama_decode, one sequence id per stream)";

/// lmx through `lmx serve`: every stream count, then the interference run.
pub fn lmx(
    weights: Weights,
    dir: &Path,
    prompts: &Prompts,
    settings: &Settings,
) -> (Row, Interference) {
    let failed = |e: String| {
        (
            Row {
                weights,
                engine: LMX,
                outcome: Err(e.clone()),
            },
            Interference {
                weights,
                outcome: Err(e),
            },
        )
    };
    let cache = tempfile::tempdir().expect("tempdir");
    let bin = Path::new(env!("CARGO_BIN_EXE_lmx"));
    let most = settings.most().to_string();
    let server = match Server::start_with(
        bin,
        cache.path(),
        &[
            "--max-concurrent",
            &most,
            "--max-queue",
            "256",
            "--prefix-cache",
            "false",
        ],
    ) {
        Ok(s) => s,
        Err(e) => return failed(e),
    };
    let model = match server.load(dir) {
        Ok(id) => id,
        Err(e) => return failed(e),
    };
    // The stream counts take turns, in a rotated order each round (round 0 warms up), so that
    // every count's runs spread over the same stretch of time: this host's speed drifts over
    // minutes, and the ratios to one stream would otherwise compare different moments.
    let counts = &settings.streams;
    let mut runs: Vec<Vec<Vec<Sample>>> = vec![Vec::new(); counts.len()];
    for round in 0..=settings.runs {
        for k in 0..counts.len() {
            let i = (k + round) % counts.len();
            let texts: Vec<&str> = prompts.streams[..counts[i]]
                .iter()
                .map(|p| p.text.as_str())
                .collect();
            match server.generate_many(&model, &texts, settings.new_tokens) {
                Ok(samples) if round > 0 => runs[i].push(samples),
                Ok(_) => {}
                Err(e) => return failed(e),
            }
        }
    }
    let mut figures = Vec::new();
    for (&n, runs) in counts.iter().zip(&runs) {
        let f = Figures::from_runs(n, runs);
        eprintln!(
            "speed: {} lmx {n} streams: {:.1} tok/s aggregate, ITL p50 {:.1} ms p99 {:.1} ms",
            weights.label(),
            f.aggregate_tps,
            f.itl_p50_ms,
            f.itl_p99_ms
        );
        figures.push(f);
    }
    let short: Vec<&str> = prompts.streams[..4]
        .iter()
        .map(|p| p.text.as_str())
        .collect();
    let interference = server
        .interfere(&model, &short, 128, 8, &prompts.long.text)
        .map(|(samples, sent, first)| interference_figures(&samples, sent, first));
    (
        Row {
            weights,
            engine: LMX,
            outcome: Ok(figures),
        },
        Interference {
            weights,
            outcome: interference,
        },
    )
}

fn interference_figures(samples: &[Sample], sent: f64, long_first: f64) -> InterferenceFigures {
    let mut before = Vec::new();
    let mut during = Vec::new();
    for s in samples {
        for w in s.token_times.windows(2) {
            let gap = w[1] - w[0];
            if w[1] <= sent {
                before.push(gap);
            } else if w[1] > sent && w[0] < long_first {
                during.push(gap);
            }
        }
    }
    InterferenceFigures {
        before_p50_ms: percentile(before, 50.0) * 1e3,
        during_p50_ms: percentile(during.clone(), 50.0) * 1e3,
        during_p99_ms: percentile(during.clone(), 99.0) * 1e3,
        during_max_ms: during.iter().copied().fold(0.0, f64::max) * 1e3,
        during_gaps: during.len(),
        long_ttft_ms: (long_first - sent) * 1e3,
    }
}

/// llama.cpp's batched decoding on `gguf`, every stream count.
pub fn llama(
    weights: Weights,
    gguf: &Result<std::path::PathBuf, String>,
    peers: Option<&Peers>,
    prompts: &Prompts,
    settings: &Settings,
) -> Row {
    let outcome = match (gguf, peers) {
        (Err(e), _) => Err(e.clone()),
        (Ok(_), None) => Err("LMX_BENCH_PYTHON is not set".to_owned()),
        (Ok(gguf), Some(peers)) => {
            let ids: Vec<Vec<u32>> = prompts.streams.iter().map(|p| p.ids.clone()).collect();
            settings
                .streams
                .iter()
                .map(|&n| {
                    let runs = peers.run_batched(
                        gguf,
                        &ids,
                        settings.new_tokens,
                        settings.runs,
                        settings.threads,
                        n,
                    )?;
                    let f = Figures::from_runs(n, &runs);
                    eprintln!(
                        "speed: {} llama.cpp {n} streams: {:.1} tok/s aggregate",
                        weights.label(),
                        f.aggregate_tps
                    );
                    Ok(f)
                })
                .collect()
        }
    };
    Row {
        weights,
        engine: LLAMA,
        outcome,
    }
}

/// Prints the concurrency tables.
pub fn print(rows: &[Row], interference: &[Interference], settings: &Settings) {
    println!();
    println!(
        "### Concurrent streams: {STREAM_PROMPT_TOKENS}-token prompts (different from the first token), {} new tokens each, greedy; medians of {} runs after 1 warm-up",
        settings.new_tokens, settings.runs
    );
    println!();
    println!("| weights | engine | streams | aggregate decode tok/s (all decoding) | vs 1 stream | output tok/s (first to last token) | vs 1 stream | ITL p50 | ITL p99 | ITL p99 / 1-stream p50 | TTFT median | TTFT worst |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        match &row.outcome {
            Ok(figures) => {
                let single = figures.iter().find(|f| f.streams == 1).copied();
                for f in figures {
                    let vs = single.map_or("?".into(), |s| {
                        format!("{:.2}x", f.aggregate_tps / s.aggregate_tps)
                    });
                    let vs_out = single.map_or("?".into(), |s| {
                        format!("{:.2}x", f.output_tps / s.output_tps)
                    });
                    let p99 = single.map_or("?".into(), |s| {
                        format!("{:.2}x", f.itl_p99_ms / s.itl_p50_ms)
                    });
                    println!(
                        "| {} | {} | {} | {:.1} | {vs} | {:.1} | {vs_out} | {:.1} ms | {:.1} ms | {p99} | {:.0} ms | {:.0} ms |",
                        row.weights.label(),
                        row.engine,
                        f.streams,
                        f.aggregate_tps,
                        f.output_tps,
                        f.itl_p50_ms,
                        f.itl_p99_ms,
                        f.ttft_median_ms,
                        f.ttft_max_ms
                    );
                }
            }
            Err(e) => println!(
                "| {} | {} | | | | | | | n/a: {e} | |",
                row.weights.label(),
                row.engine
            ),
        }
    }
    println!();
    println!("| weights | streams | aggregate decode lmx / llama.cpp batched |");
    println!("|---|---:|---:|");
    for weights in [Weights::F32, Weights::Q4_1] {
        let find = |engine: &str| {
            rows.iter()
                .find(|r| r.weights == weights && r.engine == engine)
                .and_then(|r| r.outcome.as_ref().ok())
        };
        let (Some(lmx), Some(llama)) = (find(LMX), find(LLAMA)) else {
            continue;
        };
        for (a, b) in lmx.iter().zip(llama) {
            println!(
                "| {} | {} | {:.2}x |",
                weights.label(),
                a.streams,
                a.aggregate_tps / b.aggregate_tps
            );
        }
    }
    println!();
    println!("### A {LONG_PROMPT_TOKENS}-token prompt arrives while 4 streams decode (lmx, chunked prefill)");
    println!();
    println!("| weights | streams' ITL p50 before | ITL p50 during its prefill | ITL p99 during | p99 during / p50 before | worst gap | gaps during | long prompt's TTFT |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for i in interference {
        match &i.outcome {
            Ok(f) => println!(
                "| {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.2}x | {:.1} ms | {} | {:.0} ms |",
                i.weights.label(),
                f.before_p50_ms,
                f.during_p50_ms,
                f.during_p99_ms,
                f.during_p99_ms / f.before_p50_ms,
                f.during_max_ms,
                f.during_gaps,
                f.long_ttft_ms
            ),
            Err(e) => println!("| {} | n/a: {e} | | | | | | |", i.weights.label()),
        }
    }
}
