//! One generation as every engine reports it, and the figures derived from it: the same
//! definitions for lmx, llama.cpp and transformers, so a ratio compares like with like.
//!
//! A [`Sample`] keeps the arrival time of every token, not just totals, so that later figures
//! (inter-token latency percentiles, concurrent streams) come from the same records.

/// One generation: when each token arrived, counted from the start of the call.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Seconds from the start of the call to each generated token.
    pub token_times: Vec<f64>,
    pub token_ids: Vec<u32>,
    /// Prompt tokens the engine reports having seen.
    pub prompt_tokens: usize,
}

impl Sample {
    /// Time to first token: the prompt's forward pass plus the first sampling.
    pub fn ttft(&self) -> f64 {
        self.token_times.first().copied().unwrap_or(f64::NAN)
    }

    /// Tokens per second after the first: (n - 1) / (t_last - t_first).
    pub fn decode_tps(&self) -> f64 {
        match (self.token_times.first(), self.token_times.last()) {
            (Some(first), Some(last)) if self.token_times.len() > 1 && last > first => {
                (self.token_times.len() - 1) as f64 / (last - first)
            }
            _ => f64::NAN,
        }
    }
}

/// The `p`th percentile (nearest rank) of `values`; NaN when there are none.
pub fn percentile(mut values: Vec<f64>, p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[rank.min(values.len() - 1)]
}

/// Tokens per second while every stream of `run` was decoding: tokens that arrived after the
/// last stream's first token, up to the first stream's last token, over that time.
pub fn steady_tps(run: &[Sample]) -> f64 {
    let start = run
        .iter()
        .filter_map(|s| s.token_times.first())
        .fold(0.0, |a: f64, &b| a.max(b));
    let end = run
        .iter()
        .filter_map(|s| s.token_times.last())
        .fold(f64::INFINITY, |a, &b| a.min(b));
    if end <= start {
        return f64::NAN;
    }
    let tokens = run
        .iter()
        .flat_map(|s| &s.token_times)
        .filter(|&&t| t > start && t <= end)
        .count();
    tokens as f64 / (end - start)
}

/// Every token after each stream's first, over the time from the run's first token to its last
/// (prompts that arrived meanwhile included).
pub fn output_tps(run: &[Sample]) -> f64 {
    let tokens: usize = run
        .iter()
        .map(|s| s.token_times.len().saturating_sub(1))
        .sum();
    let first = run
        .iter()
        .filter_map(|s| s.token_times.first())
        .fold(f64::INFINITY, |a, &b| a.min(b));
    let last = run
        .iter()
        .filter_map(|s| s.token_times.last())
        .fold(0.0, |a: f64, &b| a.max(b));
    tokens as f64 / (last - first)
}

/// Medians over the measured runs of one engine on one weight set.
#[derive(Debug, Clone, Copy)]
pub struct Figures {
    pub ttft_s: f64,
    /// Prompt tokens / TTFT (TTFT's median).
    pub prompt_tps: f64,
    pub decode_tps: f64,
    pub prompt_tokens: usize,
    /// Tokens generated (the median run's; every run of a greedy engine gives the same).
    pub completion_tokens: usize,
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

impl Figures {
    pub fn from_samples(samples: &[Sample]) -> Figures {
        let ttft_s = median(samples.iter().map(Sample::ttft).collect());
        let prompt_tokens = samples.first().map_or(0, |s| s.prompt_tokens);
        let mut lengths: Vec<usize> = samples.iter().map(|s| s.token_times.len()).collect();
        lengths.sort_unstable();
        Figures {
            ttft_s,
            prompt_tps: prompt_tokens as f64 / ttft_s,
            decode_tps: median(samples.iter().map(Sample::decode_tps).collect()),
            prompt_tokens,
            completion_tokens: lengths.get(lengths.len() / 2).copied().unwrap_or(0),
        }
    }
}

/// How far two greedy outputs agree: the length of their common prefix.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
