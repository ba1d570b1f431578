//! lmx in-process: the engine API (`lmx::engine`) with no server in between, and the prompt
//! every engine is given, cut from a longer text to an exact token count with lmx's tokenizer.

use std::{path::Path, sync::Arc, time::Instant};

use lmx::engine::{self, Engine, LoadOptions, Prompt, RawParams, StreamEvent};

use crate::measure::Sample;

/// The source of the prompt: plain prose whose first 128 tokens end in "step by", where every
/// engine's greedy choice is clear (" step", ahead by 6 logits in f32 and Q4_1), so the token
/// agreement column means something; the continuation runs past 128 tokens without an
/// end-of-sequence token, which lmx cannot ignore.
pub const TEXT: &str =
    "Large language models are neural networks trained on vast amounts of written \
text. They predict the next token given the previous ones, and by repeating that prediction they \
can write essays, answer questions, translate between human languages and produce useful computer \
programs. Serving them efficiently requires careful management of memory, batching of requests \
and attention to latency. The first token of an answer costs a pass over the whole prompt, which \
is a matrix product and keeps every core busy; every later token costs a pass over one token, \
which reads all the weights from memory to do very little arithmetic. In this short essay we \
explain how a model server works, step by step, starting with the way a request arrives.";

pub struct Local {
    engine: Arc<dyn Engine>,
}

/// A prompt and the ids lmx's tokenizer gives it (without special tokens).
pub struct ExactPrompt {
    pub text: String,
    pub ids: Vec<u32>,
}

impl Local {
    pub fn load(dir: &Path) -> Result<Local, String> {
        // No prefix cache: every run computes its whole prompt (the runs repeat it).
        let options = LoadOptions {
            prefix_cache: false,
            ..LoadOptions::default()
        };
        let engine = engine::load(dir, &options, Box::new(()))
            .map_err(|e| format!("loading {}: {e}", dir.display()))?;
        Ok(Local { engine })
    }

    fn ids(&self, text: &str) -> Result<Vec<u32>, String> {
        let pieces = self
            .engine
            .tokenize(text, false)
            .map_err(|e| e.to_string())?;
        Ok(pieces.iter().map(|p| p.id).collect())
    }

    /// A prefix of [`TEXT`] that tokenizes to exactly `tokens` tokens: cut at a token boundary
    /// and checked by tokenizing the cut text again (a cut inside a word may tokenize otherwise).
    pub fn exact_prompt(&self, tokens: usize) -> Result<ExactPrompt, String> {
        self.exact_prompt_from(TEXT, tokens)
    }

    /// A prefix of `source` that tokenizes to exactly `tokens` tokens.
    pub fn exact_prompt_from(&self, source: &str, tokens: usize) -> Result<ExactPrompt, String> {
        let pieces = self
            .engine
            .tokenize(source, false)
            .map_err(|e| e.to_string())?;
        for end in (tokens..=pieces.len()).chain((1..tokens).rev()) {
            let text = &source[..pieces[end - 1].end];
            let ids = self.ids(text)?;
            if ids.len() == tokens {
                return Ok(ExactPrompt {
                    text: text.to_owned(),
                    ids,
                });
            }
        }
        Err(format!(
            "no prefix of the prompt text is {tokens} tokens long"
        ))
    }

    /// One greedy generation of up to `new_tokens`, timed from the call.
    pub fn generate(&self, prompt: &str, new_tokens: usize) -> Result<Sample, String> {
        let params = RawParams {
            max_tokens: Some(new_tokens as i32),
            temperature: Some(0.0),
            ..Default::default()
        };
        let start = Instant::now();
        let mut rx = self
            .engine
            .generate(
                Prompt::Text {
                    text: prompt.into(),
                    add_special_tokens: false,
                },
                &params,
            )
            .map_err(|e| e.to_string())?;
        let (mut token_times, mut token_ids) = (Vec::new(), Vec::new());
        loop {
            match rx.blocking_recv() {
                Some(StreamEvent::Token(t)) => {
                    token_times.push(start.elapsed().as_secs_f64());
                    token_ids.push(t.id);
                }
                Some(StreamEvent::Done(done)) => {
                    return Ok(Sample {
                        token_times,
                        token_ids,
                        prompt_tokens: done.prompt_tokens,
                    })
                }
                Some(StreamEvent::Failed(e)) => return Err(e),
                None => return Err("the engine dropped the stream".into()),
            }
        }
    }
}
