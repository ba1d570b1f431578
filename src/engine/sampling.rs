//! Next-token selection: candle's LogitsProcessor (greedy, temperature, top-k, top-p, seeded)
//! plus a repetition penalty over the last N tokens, and the chosen token's log-probability.

use candle_core::{DType, Tensor, D};
use candle_transformers::generation::{LogitsProcessor, Sampling};

/// Validated sampling controls of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f64,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f64,
    /// 1 = off.
    pub repetition_penalty: f32,
    pub repetition_last_n: usize,
    pub seed: u64,
    pub logprobs: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            repetition_last_n: 64,
            seed: 0,
            logprobs: false,
        }
    }
}

/// Samples tokens for one sequence.
pub struct Sampler {
    processor: LogitsProcessor,
    params: SamplingParams,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let t = params.temperature;
        let sampling = if t <= 0.0 {
            Sampling::ArgMax
        } else {
            match (params.top_k > 0, params.top_p < 1.0) {
                (true, true) => Sampling::TopKThenTopP {
                    k: params.top_k,
                    p: params.top_p,
                    temperature: t,
                },
                (true, false) => Sampling::TopK {
                    k: params.top_k,
                    temperature: t,
                },
                (false, true) => Sampling::TopP {
                    p: params.top_p,
                    temperature: t,
                },
                (false, false) => Sampling::All { temperature: t },
            }
        };
        Self {
            processor: LogitsProcessor::from_sampling(params.seed, sampling),
            params,
        }
    }

    /// Picks the next token from `logits` given every token so far; returns the token and,
    /// when requested, its log-probability under the (penalised, temperature-scaled) distribution.
    /// Greedy decoding without a penalty works on the slice and allocates nothing.
    pub fn sample(
        &mut self,
        logits: &[f32],
        context: &[u32],
    ) -> candle_core::Result<(u32, Option<f32>)> {
        if logits.is_empty() {
            candle_core::bail!("no logits to sample from");
        }
        if self.params.temperature <= 0.0 && self.params.repetition_penalty == 1.0 {
            let best = argmax(logits);
            let logprob = self.params.logprobs.then(|| log_softmax_at(logits, best));
            return Ok((best as u32, logprob));
        }
        self.sample_tensor(&Tensor::new(logits, &candle_core::Device::Cpu)?, context)
    }

    fn sample_tensor(
        &mut self,
        logits: &Tensor,
        context: &[u32],
    ) -> candle_core::Result<(u32, Option<f32>)> {
        let mut logits = logits.to_dtype(DType::F32)?;
        if self.params.repetition_penalty != 1.0 {
            let start = context.len().saturating_sub(self.params.repetition_last_n);
            logits = candle_transformers::utils::apply_repeat_penalty(
                &logits,
                self.params.repetition_penalty,
                &context[start..],
            )?;
        }
        let token = self.processor.sample(&logits)?;
        let logprob = if self.params.logprobs {
            let scaled = if self.params.temperature > 0.0 {
                (&logits / self.params.temperature)?
            } else {
                logits
            };
            let logprobs = candle_nn::ops::log_softmax(&scaled, D::Minus1)?;
            Some(logprobs.get(token as usize)?.to_scalar::<f32>()?)
        } else {
            None
        };
        Ok((token, logprob))
    }
}

/// The first index of the largest value (NaNs ignored; 0 when there is none). Two passes that
/// vectorise, lane-wise maxima then the first run of 16 holding the maximum, instead of a
/// compare-and-branch per value: 49,152 logits take a few microseconds, and a batched step
/// samples one such row per sequence on the engine's thread.
fn argmax(values: &[f32]) -> usize {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = m.max(v);
        }
    }
    let max = tail
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let run = values
        .chunks(LANES)
        .position(|c| c.iter().fold(false, |hit, &v| hit | (v == max)))
        .unwrap_or(0);
    values
        .iter()
        .skip(run * LANES)
        .position(|&v| v == max)
        .map_or(0, |i| run * LANES + i)
}

/// log(softmax(logits)[i]).
fn log_softmax_at(logits: &[f32], i: usize) -> f32 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f64 = logits.iter().map(|&v| f64::from(v - max).exp()).sum();
    logits[i] - max - sum.ln() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(v: &[f32]) -> Vec<f32> {
        v.to_vec()
    }

    #[test]
    fn greedy_picks_the_largest_logit_with_its_logprob() {
        let mut s = Sampler::new(SamplingParams {
            logprobs: true,
            ..Default::default()
        });
        let (token, lp) = s.sample(&logits(&[0.0, 2.0, 1.0]), &[]).unwrap();
        assert_eq!(token, 1);
        let expected = 2.0 - (0f32.exp() + 2f32.exp() + 1f32.exp()).ln();
        assert!((lp.unwrap() - expected).abs() < 1e-5);
    }

    #[test]
    fn argmax_takes_the_first_largest_value() {
        let mut v: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32).collect();
        let naive = |v: &[f32]| {
            let mut best = 0;
            for (i, &x) in v.iter().enumerate() {
                if x > v[best] {
                    best = i;
                }
            }
            best
        };
        assert_eq!(argmax(&v), naive(&v));
        v[3] = 5000.0;
        v[700] = 5000.0;
        assert_eq!(argmax(&v), 3);
        v[999] = 9000.0;
        assert_eq!(argmax(&v), 999);
        v[10] = f32::NAN;
        assert_eq!(argmax(&v), 999);
        assert_eq!(argmax(&[f32::NAN, 1.0, 2.0, 2.0]), 2);
        assert_eq!(argmax(&[f32::NAN; 5]), 0);
        assert_eq!(argmax(&[-3.0]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    }

    #[test]
    fn repetition_penalty_discourages_recent_tokens() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 10.0,
            ..Default::default()
        });
        let (token, _) = s.sample(&logits(&[0.0, 2.0, 1.0]), &[1]).unwrap();
        assert_eq!(token, 2);
        // Outside the window the penalty does not apply.
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 10.0,
            repetition_last_n: 1,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits(&[0.0, 2.0, 1.0]), &[1, 0]).unwrap().0, 1);
    }

    #[test]
    fn the_same_seed_gives_the_same_samples() {
        let params = SamplingParams {
            temperature: 1.0,
            seed: 42,
            ..Default::default()
        };
        let l = logits(&[0.1, 0.2, 0.3, 0.25, 0.15]);
        let run = || {
            let mut s = Sampler::new(params.clone());
            (0..32)
                .map(|_| s.sample(&l, &[]).unwrap().0)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
        assert!(
            run().iter().any(|&t| t != run()[0]),
            "sampling varies within a run"
        );
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 5.0,
            top_k: 1,
            seed: 7,
            ..Default::default()
        });
        for _ in 0..10 {
            assert_eq!(s.sample(&logits(&[0.0, 2.0, 1.0]), &[]).unwrap().0, 1);
        }
    }
}
