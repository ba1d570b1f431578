//! What a run found, printed as markdown: one row per (weights, engine), the ratios that answer
//! "how far is lmx from llama.cpp / transformers", and the idle server's CPU use.
//!
//! Later figures (concurrent streams: aggregate tok/s, inter-token latency percentiles) are one
//! more table over the same [`Row`]s keyed by stream count.

use crate::measure::{common_prefix, Figures};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// SmolLM2 dequantized to f32: HF safetensors for lmx and transformers, an F32 GGUF for
    /// llama.cpp.
    F32,
    /// The original Q4_1 GGUF, loaded as it is by lmx and llama.cpp.
    Q4_1,
}

impl Weights {
    pub fn label(self) -> &'static str {
        match self {
            Weights::F32 => "f32",
            Weights::Q4_1 => "Q4_1",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    LmxInProcess,
    LmxGrpc,
    LlamaCpp,
    Transformers,
}

impl EngineKind {
    pub fn label(self) -> &'static str {
        match self {
            EngineKind::LmxInProcess => "lmx in-process",
            EngineKind::LmxGrpc => "lmx via gRPC (lmx serve)",
            EngineKind::LlamaCpp => "llama.cpp",
            EngineKind::Transformers => "transformers",
        }
    }
}

pub struct Row {
    pub weights: Weights,
    pub engine: EngineKind,
    /// The figures and the first measured run's token ids, or why there are none.
    pub outcome: Result<(Figures, Vec<u32>), String>,
    /// Share of the machine (0..1) that processes other than the benchmark's used meanwhile.
    pub other_load: Option<f64>,
}

/// CPU use of the `lmx serve` process while no request is in flight, % of one core.
pub struct Idle {
    pub weights: Weights,
    pub after_load: Result<f64, String>,
    pub after_generating: Result<f64, String>,
    pub rss_mib: Option<f64>,
}

#[derive(Default)]
pub struct Report {
    pub header: Vec<String>,
    pub rows: Vec<Row>,
    pub idle: Vec<Idle>,
}

impl Report {
    fn figures(&self, weights: Weights, engine: EngineKind) -> Option<&(Figures, Vec<u32>)> {
        self.rows
            .iter()
            .find(|r| r.weights == weights && r.engine == engine)
            .and_then(|r| r.outcome.as_ref().ok())
    }

    pub fn print(&self) {
        for line in &self.header {
            println!("{line}");
        }
        let busiest = self
            .rows
            .iter()
            .filter_map(|r| r.other_load)
            .fold(0.0, f64::max);
        if busiest > 0.05 {
            println!(
                "WARNING: other processes used up to {:.0}% of the machine while an engine ran \
                 (column \"other load\"): those figures are low and not comparable.",
                busiest * 100.0
            );
        }
        println!();
        self.print_rows();
        println!();
        self.print_ratios();
        println!();
        self.print_idle();
    }

    fn print_rows(&self) {
        println!("| weights | engine | prompt tokens | new tokens | TTFT | prompt tok/s | decode tok/s | greedy tokens = lmx in-process | other load |");
        println!("|---|---|---:|---:|---:|---:|---:|---|---:|");
        for row in &self.rows {
            let (w, e) = (row.weights.label(), row.engine.label());
            match &row.outcome {
                Ok((f, tokens)) => {
                    let agree = match self.figures(row.weights, EngineKind::LmxInProcess) {
                        Some(_) if row.engine == EngineKind::LmxInProcess => "(reference)".into(),
                        Some((_, reference)) => {
                            let n = reference.len().min(tokens.len());
                            format!("{}/{n}", common_prefix(reference, tokens))
                        }
                        None => "?".into(),
                    };
                    let load = row
                        .other_load
                        .map_or("?".into(), |l| format!("{:.0}%", l * 100.0));
                    println!(
                        "| {w} | {e} | {} | {} | {:.1} ms | {:.0} | {:.1} | {agree} | {load} |",
                        f.prompt_tokens,
                        f.completion_tokens,
                        f.ttft_s * 1e3,
                        f.prompt_tps,
                        f.decode_tps
                    );
                }
                Err(why) => println!("| {w} | {e} | | | | | | n/a: {why} | |"),
            }
        }
    }

    fn print_ratios(&self) {
        println!("| weights | decode lmx / llama.cpp | prompt lmx / llama.cpp | decode gRPC / in-process | TTFT gRPC / in-process | decode lmx / transformers | prompt lmx / transformers |");
        println!("|---|---:|---:|---:|---:|---:|---:|");
        for weights in [Weights::F32, Weights::Q4_1] {
            let get = |engine| self.figures(weights, engine).map(|(f, _)| *f);
            let Some(lmx) = get(EngineKind::LmxInProcess) else {
                continue;
            };
            let ratio = |other: Option<Figures>, pick: fn(&Figures) -> f64, flip: bool| {
                other.map_or("n/a".to_owned(), |o| {
                    let (a, b) = if flip {
                        (pick(&o), pick(&lmx))
                    } else {
                        (pick(&lmx), pick(&o))
                    };
                    format!("{:.2}x", a / b)
                })
            };
            let decode = |f: &Figures| f.decode_tps;
            let prompt = |f: &Figures| f.prompt_tps;
            let ttft = |f: &Figures| f.ttft_s;
            let llama = get(EngineKind::LlamaCpp);
            let grpc = get(EngineKind::LmxGrpc);
            let hf = get(EngineKind::Transformers);
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                weights.label(),
                ratio(llama, decode, false),
                ratio(llama, prompt, false),
                ratio(grpc, decode, true),
                ratio(grpc, ttft, true),
                ratio(hf, decode, false),
                ratio(hf, prompt, false),
            );
        }
        println!("(lmx = lmx in-process; above 1x = lmx faster, except gRPC / in-process: the cost of the server)");
    }

    fn print_idle(&self) {
        println!("| weights | `lmx serve` idle CPU after load | idle CPU after generating | server RSS |");
        println!("|---|---:|---:|---:|");
        let pct = |r: &Result<f64, String>| match r {
            Ok(p) => format!("{p:.1}% of a core"),
            Err(e) => format!("n/a: {e}"),
        };
        for idle in &self.idle {
            println!(
                "| {} | {} | {} | {} |",
                idle.weights.label(),
                pct(&idle.after_load),
                pct(&idle.after_generating),
                idle.rss_mib
                    .map_or("?".to_owned(), |m| format!("{m:.0} MiB"))
            );
        }
    }
}
