//! The engine thread: a dedicated OS thread per loaded model, fed by a channel. The async runtime
//! never runs a forward pass.
//!
//! Scheduling: up to `max_concurrent` sequences are active at once, each with its own KV cache;
//! the thread gives each active sequence one forward pass in turn (prefill, then one token per
//! turn), so concurrent streams progress together. Before every forward pass it checks whether
//! the client is still there: a closed stream ends its sequence at once, freeing its KV cache and
//! its queue slot. Embedding jobs run between turns.

use std::{
    collections::{BTreeSet, HashSet},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Instant,
};

use tokenizers::Tokenizer;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use super::{
    arch::CausalLm,
    embed::{Embedder, Embeddings},
    kernels,
    native::{KvCache, Model, Step as NativeStep, Workspace},
    sampling::Sampler,
    text::{StopMatcher, StopOutcome, TextStream},
    validation::ValidParams,
    Completion, EngineError, FinishReason, StreamEvent, TokenEvent,
};

/// Work for the engine thread.
pub(crate) enum Job {
    Generate(GenerateJob),
    Embed(EmbedJob),
}

pub(crate) struct GenerateJob {
    pub prompt: Vec<u32>,
    pub params: ValidParams,
    pub events: mpsc::UnboundedSender<StreamEvent>,
    pub accepted_at: Instant,
    pub span: tracing::Span,
    pub permit: OwnedSemaphorePermit,
}

pub(crate) struct EmbedJob {
    pub inputs: Vec<String>,
    pub normalize: bool,
    pub reply: oneshot::Sender<Result<Embeddings, EngineError>>,
    pub span: tracing::Span,
    pub permit: OwnedSemaphorePermit,
}

/// Counters shared with the async side.
#[derive(Debug, Default)]
pub struct Counters {
    /// Sequences being generated right now.
    pub active: AtomicUsize,
    /// Tokens generated since load.
    pub tokens_generated: AtomicU64,
    /// Generations that ended because their client left.
    pub cancelled: AtomicU64,
}

impl Counters {
    /// Takes a sequence out of the engine: counts its tokens and whether its client left,
    /// frees its queue slot, and only then sends its final event, so that a client that saw
    /// its stream end finds the counters and the queue depth already settled. Returns what ran
    /// the sequence.
    fn retire(&self, seq: Sequence) -> SeqModel {
        if !seq.ended {
            self.cancelled.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(parent: &seq.span, generated = seq.generated, "client left; generation stopped");
        }
        self.tokens_generated
            .fetch_add(seq.generated as u64, Ordering::Relaxed);
        self.active.fetch_sub(1, Ordering::Relaxed);
        let Sequence {
            model,
            events,
            last,
            permit,
            ..
        } = seq;
        drop(permit);
        if let Some(event) = last {
            let _ = events.send(event);
        }
        model
    }
}

/// What the thread owns. One per engine thread, never moved around: the size difference between
/// the variants does not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Runner {
    Generator {
        base: Option<Box<dyn CausalLm>>,
        tokenizer: Tokenizer,
        eos_ids: BTreeSet<u32>,
        special_ids: HashSet<u32>,
    },
    Embedder(Embedder),
}

pub(crate) struct Worker {
    pub runner: Runner,
    pub jobs: mpsc::UnboundedReceiver<Job>,
    pub max_concurrent: usize,
    /// Most prompt tokens one batched step takes (a longer prompt is processed in chunks
    /// between decode steps of the other sequences).
    pub prefill_chunk: usize,
    pub counters: Arc<Counters>,
    /// Dropped when the thread ends (the memory lease of the loaded model).
    pub guard: Box<dyn Send>,
}

/// What runs a sequence's forward passes.
enum SeqModel {
    /// Its own instance (candle-transformers models), one forward pass per turn.
    Own(Box<dyn CausalLm>),
    /// A KV cache on the worker's shared native model: batched with the other sequences.
    Batched(KvCache),
}

struct Sequence {
    model: SeqModel,
    tokens: Vec<u32>,
    /// Tokens already in the KV cache.
    fed: usize,
    /// Logits copied out of an own model (unused by batched sequences).
    logits_buf: Vec<f32>,
    prompt_len: usize,
    generated: usize,
    max_tokens: usize,
    sampler: Sampler,
    text: TextStream,
    stops: StopMatcher,
    output: String,
    events: mpsc::UnboundedSender<StreamEvent>,
    accepted_at: Instant,
    first_token_at: Option<Instant>,
    span: tracing::Span,
    /// The sequence reached its end (completion or failure); its final event is in `last`.
    ended: bool,
    /// The final event, sent when the sequence is retired.
    last: Option<StreamEvent>,
    /// Its place in the model's queue.
    permit: OwnedSemaphorePermit,
}

enum Step {
    Continue,
    Done,
}

impl Worker {
    /// Runs until the job channel closes and every sequence has ended.
    pub fn run(mut self) {
        let batched = match &self.runner {
            Runner::Generator {
                base: Some(base), ..
            } => base.native(),
            _ => None,
        };
        let mut batch = batched.map(|model| Batch {
            model,
            ws: Workspace::default(),
        });
        let mut active: Vec<Sequence> = Vec::new();
        let mut open = true;
        loop {
            if active.is_empty() {
                if !open {
                    break;
                }
                match self.jobs.blocking_recv() {
                    Some(job) => self.admit(job, &mut active),
                    None => break,
                }
            }
            while open && active.len() < self.capacity() {
                match self.jobs.try_recv() {
                    Ok(job) => self.admit(job, &mut active),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            match &mut batch {
                Some(batch) => self.batched_turn(batch, &mut active),
                None => self.turn(&mut active),
            }
        }
        self.counters.active.store(0, Ordering::Relaxed);
        drop(self.guard);
    }

    /// How many sequences may be active: one for architectures that cannot fork.
    fn capacity(&self) -> usize {
        match &self.runner {
            Runner::Generator {
                base: Some(base), ..
            } if base.forkable() => self.max_concurrent.max(1),
            Runner::Generator { .. } => 1,
            Runner::Embedder(_) => 1,
        }
    }

    fn admit(&mut self, job: Job, active: &mut Vec<Sequence>) {
        match (job, &mut self.runner) {
            (Job::Embed(job), Runner::Embedder(embedder)) => {
                let _enter = job.span.enter();
                let result = embedder.embed(&job.inputs, job.normalize);
                let _ = job.reply.send(result);
                drop(job.permit);
            }
            (Job::Embed(job), Runner::Generator { .. }) => {
                let _ = job.reply.send(Err(EngineError::NotAnEmbeddingModel));
            }
            (Job::Generate(job), Runner::Generator { base, .. }) => {
                if job.events.is_closed() {
                    self.counters.cancelled.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let max_len = job.prompt.len() + job.params.max_tokens;
                let model = match base.as_ref() {
                    Some(b) => match b.native() {
                        Some(native) => Some(SeqModel::Batched(KvCache::new(
                            &native.config,
                            max_len.min(native.config.context_length.max(1)),
                        ))),
                        None if b.forkable() => b.fork(max_len).map(SeqModel::Own),
                        // Cannot fork: lend the base model to this one sequence.
                        None => base.take().map(SeqModel::Own),
                    },
                    None => None,
                };
                let Some(model) = model else {
                    let _ = job.events.send(StreamEvent::Failed(
                        "the model could not start a sequence".into(),
                    ));
                    return;
                };
                let prompt_len = job.prompt.len();
                active.push(Sequence {
                    model,
                    tokens: job.prompt,
                    fed: 0,
                    logits_buf: Vec::new(),
                    prompt_len,
                    generated: 0,
                    max_tokens: job.params.max_tokens,
                    sampler: Sampler::new(job.params.sampling),
                    text: TextStream::new(),
                    stops: StopMatcher::new(job.params.stop),
                    output: String::new(),
                    events: job.events,
                    accepted_at: job.accepted_at,
                    first_token_at: None,
                    span: job.span,
                    ended: false,
                    last: None,
                    permit: job.permit,
                });
                self.counters.active.fetch_add(1, Ordering::Relaxed);
            }
            (Job::Generate(job), Runner::Embedder(_)) => {
                let _ = job.events.send(StreamEvent::Failed(
                    EngineError::NotAGenerativeModel.to_string(),
                ));
            }
        }
    }

    /// One forward pass for every active sequence.
    fn turn(&mut self, active: &mut Vec<Sequence>) {
        let Runner::Generator {
            base,
            tokenizer,
            eos_ids,
            special_ids,
        } = &mut self.runner
        else {
            return;
        };
        let mut i = 0;
        while i < active.len() {
            let seq = &mut active[i];
            let outcome = if seq.events.is_closed() {
                Step::Done
            } else {
                let _enter = seq.span.clone().entered();
                match seq.step(tokenizer, eos_ids, special_ids) {
                    Ok(step) => step,
                    Err(message) => {
                        tracing::error!(error = %message, "generation failed");
                        seq.conclude(StreamEvent::Failed(message));
                        Step::Done
                    }
                }
            };
            match outcome {
                Step::Continue => i += 1,
                Step::Done => {
                    let model = self.counters.retire(active.swap_remove(i));
                    if let (None, SeqModel::Own(mut model)) = (base.as_ref(), model) {
                        // Give the lent model back, with an empty cache.
                        model.reset();
                        *base = Some(model);
                    }
                }
            }
        }
    }
}

/// The shared native model of a batched worker and its buffers.
struct Batch {
    model: Arc<Model>,
    ws: Workspace,
}

impl Worker {
    /// One forward pass over every active sequence: a decode token for each sequence past its
    /// prompt, and prompt chunks (at most `prefill_chunk` tokens in all) for the others; then
    /// a token is sampled for every sequence whose prompt is now fully in its cache.
    fn batched_turn(&mut self, batch: &mut Batch, active: &mut Vec<Sequence>) {
        let Runner::Generator {
            tokenizer,
            eos_ids,
            special_ids,
            ..
        } = &mut self.runner
        else {
            return;
        };
        // Clients that left end before any work is spent on them.
        let mut i = 0;
        while i < active.len() {
            if active[i].events.is_closed() {
                self.counters.retire(active.swap_remove(i));
            } else {
                i += 1;
            }
        }
        if active.is_empty() {
            return;
        }
        // How many new tokens each sequence feeds this step.
        let mut feed = vec![0usize; active.len()];
        let mut prompt_budget = self.prefill_chunk.max(1);
        for (f, seq) in feed.iter_mut().zip(active.iter()) {
            let pending = seq.tokens.len() - seq.fed;
            if seq.fed >= seq.prompt_len {
                *f = pending;
            } else if prompt_budget > 0 {
                *f = pending.min(prompt_budget);
                prompt_budget -= *f;
            }
        }
        let mut steps: Vec<NativeStep<'_>> = Vec::with_capacity(active.len());
        let mut rows: Vec<usize> = Vec::with_capacity(active.len());
        for (i, (seq, &n)) in active.iter_mut().zip(&feed).enumerate() {
            if n == 0 {
                continue;
            }
            let SeqModel::Batched(cache) = &mut seq.model else {
                continue;
            };
            steps.push(NativeStep {
                tokens: &seq.tokens[seq.fed..seq.fed + n],
                cache,
            });
            rows.push(i);
        }
        let Batch { model, ws } = batch;
        let result = kernels::in_pool(|| model.forward(&mut steps, ws));
        drop(steps);
        let vocab = model.config.vocab;
        let mut ended = vec![false; active.len()];
        for (row, &i) in rows.iter().enumerate() {
            let seq = &mut active[i];
            let _enter = seq.span.clone().entered();
            let outcome = match &result {
                Err(message) => Err(format!("forward pass: {message}")),
                Ok(()) => {
                    seq.fed += feed[i];
                    if seq.fed < seq.tokens.len() {
                        // Still in its prompt: no token yet.
                        Ok(Step::Continue)
                    } else {
                        let logits = &ws.logits[row * vocab..(row + 1) * vocab];
                        seq.accept(logits, tokenizer, eos_ids, special_ids)
                    }
                }
            };
            match outcome {
                Ok(Step::Continue) => {}
                Ok(Step::Done) => ended[i] = true,
                Err(message) => {
                    tracing::error!(error = %message, "generation failed");
                    seq.conclude(StreamEvent::Failed(message));
                    ended[i] = true;
                }
            }
        }
        for i in (0..active.len()).rev() {
            if ended[i] {
                self.counters.retire(active.swap_remove(i));
            }
        }
    }
}

impl Sequence {
    /// One forward pass on the sequence's own model, then the next token.
    fn step(
        &mut self,
        tokenizer: &Tokenizer,
        eos_ids: &BTreeSet<u32>,
        special_ids: &HashSet<u32>,
    ) -> Result<Step, String> {
        let SeqModel::Own(model) = &mut self.model else {
            return Err("a batched sequence was run on its own".into());
        };
        let logits = model
            .forward(&self.tokens[self.fed..], self.fed)
            .map_err(|e| format!("forward pass: {e}"))?;
        // `accept` needs `self` mutably: copy the logits out of the model's buffer.
        let mut buf = std::mem::take(&mut self.logits_buf);
        buf.clear();
        buf.extend_from_slice(logits);
        self.fed = self.tokens.len();
        let step = self.accept(&buf, tokenizer, eos_ids, special_ids);
        self.logits_buf = buf;
        step
    }

    /// Marks the sequence ended; `event` goes out when it is retired.
    fn conclude(&mut self, event: StreamEvent) {
        self.ended = true;
        self.last = Some(event);
    }

    /// Samples the next token from `logits` (those of the last fed token) and emits it.
    fn accept(
        &mut self,
        logits: &[f32],
        tokenizer: &Tokenizer,
        eos_ids: &BTreeSet<u32>,
        special_ids: &HashSet<u32>,
    ) -> Result<Step, String> {
        let (token, logprob) = self
            .sampler
            .sample(logits, &self.tokens)
            .map_err(|e| format!("sampling: {e}"))?;
        self.tokens.push(token);
        self.generated += 1;
        self.first_token_at.get_or_insert_with(Instant::now);
        let special = special_ids.contains(&token);

        if eos_ids.contains(&token) {
            let (text, stop) = self.finish_text(tokenizer)?;
            return Ok(self.end(token, text, logprob, special, stop, FinishReason::EosToken));
        }
        let piece = self
            .text
            .push(tokenizer, token)
            .map_err(|e| format!("decoding: {e}"))?;
        match self.stops.push(&piece) {
            StopOutcome::Stop { text, stop } => Ok(self.end(
                token,
                text,
                logprob,
                special,
                Some(stop),
                FinishReason::StopSequence,
            )),
            StopOutcome::Continue(text) if self.generated >= self.max_tokens => {
                let (rest, stop) = self.finish_text(tokenizer)?;
                let reason = if stop.is_some() {
                    FinishReason::StopSequence
                } else {
                    FinishReason::Length
                };
                Ok(self.end(token, text + &rest, logprob, special, stop, reason))
            }
            StopOutcome::Continue(text) => {
                self.output.push_str(&text);
                let event = StreamEvent::Token(TokenEvent {
                    id: token,
                    text,
                    logprob,
                    special,
                });
                Ok(if self.events.send(event).is_ok() {
                    Step::Continue
                } else {
                    Step::Done
                })
            }
        }
    }

    /// Flushes the detokenizer and the stop matcher at the end of a sequence: the remaining text
    /// and the stop string it completed, if any.
    fn finish_text(&mut self, tokenizer: &Tokenizer) -> Result<(String, Option<String>), String> {
        let rest = self
            .text
            .flush(tokenizer)
            .map_err(|e| format!("decoding: {e}"))?;
        Ok(match self.stops.push(&rest) {
            StopOutcome::Stop { text, stop } => (text, Some(stop)),
            StopOutcome::Continue(text) => (text + &self.stops.flush(), None),
        })
    }

    fn end(
        &mut self,
        token: u32,
        text: String,
        logprob: Option<f32>,
        special: bool,
        stop: Option<String>,
        reason: FinishReason,
    ) -> Step {
        self.output.push_str(&text);
        let _ = self.events.send(StreamEvent::Token(TokenEvent {
            id: token,
            text,
            logprob,
            special,
        }));
        let now = Instant::now();
        let first = self.first_token_at.unwrap_or(now);
        let decode_secs = now.duration_since(first).as_secs_f64();
        let tokens_per_second = if self.generated > 1 && decode_secs > 0.0 {
            (self.generated - 1) as f64 / decode_secs
        } else {
            0.0
        };
        let done = StreamEvent::Done(Completion {
            finish_reason: reason,
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated,
            time_to_first_token_ms: first.duration_since(self.accepted_at).as_secs_f64() * 1e3,
            tokens_per_second,
            text: std::mem::take(&mut self.output),
            stop_sequence: stop,
        });
        self.conclude(done);
        Step::Done
    }
}
