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
    time::{Duration, Instant},
};

use tokenizers::Tokenizer;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use super::{
    arch::CausalLm,
    batch::{Buffers, Cache, Part, Shared},
    embed::{Embedder, Embeddings},
    native::candle_batched::BLOCK,
    prefix::{self, PrefixStore},
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
    /// KV cache bytes held by running sequences and kept prefixes.
    pub kv_used: AtomicU64,
    /// Prompt tokens whose KV came from the prefix cache, since load.
    pub cached_prompt_tokens: AtomicU64,
    /// Forward passes since load, by what they carried (indexed by [`StepKind`]).
    pub steps: [AtomicU64; 3],
    /// Nanoseconds those passes took, by the same kinds.
    pub step_nanos: [AtomicU64; 3],
    /// Sequences the passes carried, summed over the passes (over `steps`: the mean batch).
    pub step_sequences: AtomicU64,
    /// Prompt tokens run through the model (those not served from the prefix cache).
    pub prompt_tokens_computed: AtomicU64,
}

/// What a forward pass carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// A token of each decoding sequence, nothing else.
    Decode = 0,
    /// Decode tokens and prompt chunks together (continuous batching).
    Mixed = 1,
    /// Prompt tokens only.
    Prefill = 2,
}

impl StepKind {
    pub const ALL: [StepKind; 3] = [StepKind::Decode, StepKind::Mixed, StepKind::Prefill];

    fn of(decoding: usize, prompt_tokens: usize) -> StepKind {
        match (decoding, prompt_tokens) {
            (_, 0) => StepKind::Decode,
            (0, _) => StepKind::Prefill,
            _ => StepKind::Mixed,
        }
    }

    /// The metrics label.
    pub fn name(self) -> &'static str {
        match self {
            StepKind::Decode => "decode",
            StepKind::Mixed => "mixed",
            StepKind::Prefill => "prefill",
        }
    }
}

impl Counters {
    /// Counts a forward pass of `sequences` sequences, `decoding` of them past their prompts,
    /// with `prompt_tokens` prompt tokens in all, that took `elapsed`.
    fn record_step(
        &self,
        sequences: usize,
        decoding: usize,
        prompt_tokens: usize,
        elapsed: Duration,
    ) {
        let kind = StepKind::of(decoding, prompt_tokens) as usize;
        self.steps[kind].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.step_nanos[kind].fetch_add(nanos, Ordering::Relaxed);
        self.step_sequences
            .fetch_add(sequences as u64, Ordering::Relaxed);
        self.prompt_tokens_computed
            .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
    }
}

/// The KV cache budget the worker keeps to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KvBudget {
    /// Bytes all KV caches may take together.
    pub budget: u64,
    /// Bytes one cached token takes.
    pub per_token: u64,
    /// Keep finished sequences' caches for reuse.
    pub prefix_cache: bool,
}

/// KV memory in use: running sequences' caches (charged for their whole capacity when they
/// start) and the prefix store.
struct KvState {
    limits: KvBudget,
    running: u64,
    store: PrefixStore<Cache>,
}

impl KvState {
    fn used(&self) -> u64 {
        self.running + self.store.bytes()
    }

    fn publish(&self, counters: &Counters) {
        counters.kv_used.store(self.used(), Ordering::Relaxed);
    }

    /// Evicts kept prefixes (never `keep`) until `bytes` more fit; false when they cannot.
    fn make_room(&mut self, bytes: u64, keep: Option<u64>) -> bool {
        while self.used() + bytes > self.limits.budget {
            if self.store.evict_lru(keep).is_none() {
                return false;
            }
        }
        true
    }
}

/// Takes a sequence out of the engine: counts its tokens and whether its client left, frees
/// its KV memory (keeping its cache as a reusable prefix when there is room) and its queue
/// slot, and only then sends its final event, so that a client that saw its stream end finds
/// the counters and the queue depth already settled. Returns what ran the sequence.
fn retire(counters: &Counters, kv: &mut KvState, seq: Sequence) -> Option<Box<dyn CausalLm>> {
    if !seq.ended {
        counters.cancelled.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(parent: &seq.span, generated = seq.generated, "client left; generation stopped");
    }
    counters
        .tokens_generated
        .fetch_add(seq.generated as u64, Ordering::Relaxed);
    counters.active.fetch_sub(1, Ordering::Relaxed);
    kv.running = kv.running.saturating_sub(seq.kv_bytes);
    let failed = matches!(seq.last, Some(StreamEvent::Failed(_)));
    let Sequence {
        model,
        mut tokens,
        events,
        last,
        permit,
        ..
    } = seq;
    let own = match model {
        SeqModel::Own(model) => Some(model),
        SeqModel::Batched(cache) => {
            if kv.limits.prefix_cache && !failed && !cache.is_empty() {
                let (cache, bytes) = cache.keep(kv.limits.per_token);
                if kv.make_room(bytes, None) {
                    tokens.truncate(cache.len());
                    kv.store.insert(tokens, cache, bytes);
                }
            }
            None
        }
    };
    kv.publish(counters);
    drop(permit);
    if let Some(event) = last {
        let _ = events.send(event);
    }
    own
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
    pub kv: KvBudget,
    pub counters: Arc<Counters>,
    /// Dropped when the thread ends (the memory lease of the loaded model).
    pub guard: Box<dyn Send>,
    /// Tests hold the worker between turns with this (see [`StepGate`]).
    #[cfg(test)]
    pub gate: Option<Arc<StepGate>>,
}

#[cfg(test)]
thread_local! {
    /// The gate the next engine loaded on this thread gets (tests).
    pub(crate) static NEXT_GATE: std::cell::RefCell<Option<Arc<StepGate>>> =
        const { std::cell::RefCell::new(None) };
}

/// Lets a test run the worker one turn at a time, so that what a client does between tokens
/// happens at a known point of a generation however fast the model is. Open (no limit) until
/// [`StepGate::close`].
#[cfg(test)]
#[derive(Default)]
pub(crate) struct StepGate {
    /// Turns the worker may still start (None: any number) and whether it waits at the gate.
    state: std::sync::Mutex<(Option<u64>, bool)>,
    changed: std::sync::Condvar,
}

#[cfg(test)]
impl StepGate {
    /// The worker stops before its next turn.
    pub fn close(&self) {
        self.state.lock().unwrap().0 = Some(0);
    }

    /// The worker runs freely again.
    pub fn open(&self) {
        self.state.lock().unwrap().0 = None;
        self.changed.notify_all();
    }

    /// Lets the (closed) worker run one turn and returns when it waits at the gate again.
    pub fn step(&self) {
        let mut state = self.state.lock().unwrap();
        let permits = state.0.as_mut().expect("step() on an open gate");
        *permits += 1;
        self.changed.notify_all();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !(state.0 == Some(0) && state.1) {
            let left = deadline
                .checked_duration_since(std::time::Instant::now())
                .expect("the worker did not come back to the gate within 10 s");
            state = self.changed.wait_timeout(state, left).unwrap().0;
        }
    }

    /// The worker's side: waits for a permit.
    fn pass(&self) {
        let mut state = self.state.lock().unwrap();
        while state.0 == Some(0) {
            state.1 = true;
            self.changed.notify_all();
            state = self.changed.wait(state).unwrap();
        }
        state.1 = false;
        if let Some(permits) = &mut state.0 {
            *permits -= 1;
        }
    }
}

/// What runs a sequence's forward passes.
enum SeqModel {
    /// Its own instance (candle-transformers models), one forward pass per turn.
    Own(Box<dyn CausalLm>),
    /// A KV cache on the worker's shared model: batched with the other sequences.
    Batched(Cache),
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
    /// KV cache bytes charged to it.
    kv_bytes: u64,
    /// Prompt tokens whose KV came from the prefix cache.
    cached_prompt_tokens: usize,
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
            } => Shared::of(base.as_ref()),
            _ => None,
        };
        if let Some(Shared::Candle(model)) = &batched {
            // The budget in positions, in blocks, plus each running sequence's last partial one.
            let positions = self.kv.budget / self.kv.per_token.max(1);
            let blocks = usize::try_from(positions)
                .unwrap_or(usize::MAX)
                .div_ceil(BLOCK)
                .saturating_add(self.max_concurrent);
            model.pool().cap_growth(blocks);
        }
        let mut batch = batched.map(|model| Batch {
            model,
            buffers: Buffers::default(),
            pacer: Pacer::default(),
        });
        let mut kv = KvState {
            limits: self.kv,
            running: 0,
            store: PrefixStore::default(),
        };
        let mut active: Vec<Sequence> = Vec::new();
        // A request that waits for KV memory; later ones wait behind it.
        let mut waiting: Option<Job> = None;
        let mut open = true;
        loop {
            let from_idle = active.is_empty() && waiting.is_none();
            if from_idle {
                if !open {
                    break;
                }
                match self.jobs.blocking_recv() {
                    Some(job) => waiting = Some(job),
                    None => break,
                }
            }
            while active.len() < self.capacity() {
                let job = match waiting.take() {
                    Some(job) => job,
                    None if !open => break,
                    None => match self.jobs.try_recv() {
                        Ok(job) => job,
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    },
                };
                if let Some(job) = self.admit(job, &mut active, &mut kv) {
                    waiting = Some(job);
                    break;
                }
            }
            if from_idle && batch.is_some() && waiting.is_none() && !active.is_empty() {
                self.gather(&mut active, &mut kv, &mut waiting, &mut open);
            }
            if active.is_empty() {
                // Nothing runs and the waiting request still does not fit: it never will
                // (the engine checks requests against the budget before queueing them).
                if let Some(Job::Generate(job)) = waiting.take() {
                    let _ = job.events.send(StreamEvent::Failed(format!(
                        "the request's KV cache does not fit in the model's budget of {} bytes",
                        kv.limits.budget
                    )));
                }
                continue;
            }
            #[cfg(test)]
            if let Some(gate) = &self.gate {
                gate.pass();
            }
            match &mut batch {
                Some(batch) => self.batched_turn(batch, &mut active, &mut kv),
                None => self.turn(&mut active, &mut kv),
            }
        }
        self.counters.active.store(0, Ordering::Relaxed);
        drop(self.guard);
    }

    /// Takes the requests of a burst that woke the worker (see [`ARRIVAL_GAP`]).
    fn gather(
        &mut self,
        active: &mut Vec<Sequence>,
        kv: &mut KvState,
        waiting: &mut Option<Job>,
        open: &mut bool,
    ) {
        let start = Instant::now();
        let mut last = start;
        while active.len() < self.capacity() && waiting.is_none() {
            match self.jobs.try_recv() {
                Ok(job) => {
                    *waiting = self.admit(job, active, kv);
                    last = Instant::now();
                }
                Err(mpsc::error::TryRecvError::Empty) => {
                    let now = Instant::now();
                    if now - last >= ARRIVAL_GAP || now - start >= ARRIVAL_WINDOW {
                        break;
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    *open = false;
                    break;
                }
            }
        }
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

    /// Starts a job: embeddings run at once; a generation becomes an active sequence, reusing
    /// the longest prompt prefix cached by a kept or a running sequence. Returns the job when
    /// its KV cache does not fit in the budget yet (it waits for running sequences to end).
    fn admit(&mut self, job: Job, active: &mut Vec<Sequence>, kv: &mut KvState) -> Option<Job> {
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
                    return None;
                }
                let native = base.as_ref().and_then(|b| Shared::of(b.as_ref()));
                let context = native
                    .as_ref()
                    .map_or(usize::MAX, |m| m.context_length().max(1));
                let capacity = (job.prompt.len() + job.params.max_tokens).min(context);
                let kv_bytes = capacity as u64 * kv.limits.per_token;
                // The longest prefix of the prompt that a kept or running sequence has cached
                // (at least the prompt's last token is computed again: its logits are needed).
                let reusable = job.prompt.len() - 1;
                let kept = native.as_ref().and(kv.store.best(&job.prompt[..reusable]));
                let running = native.as_ref().and_then(|_| {
                    active
                        .iter()
                        .enumerate()
                        .filter_map(|(i, seq)| {
                            let SeqModel::Batched(cache) = &seq.model else {
                                return None;
                            };
                            let n = cache.len().min(seq.tokens.len());
                            Some((
                                i,
                                prefix::common_prefix(&seq.tokens[..n], &job.prompt[..reusable]),
                            ))
                        })
                        .filter(|(_, n)| *n > 0)
                        .max_by_key(|(_, n)| *n)
                });
                if !kv.make_room(kv_bytes, kept.map(|h| h.id)) {
                    match kept {
                        // Give up the hit rather than wait for memory it holds.
                        Some(hit)
                            if kv.used() - kv.store.bytes() + kv_bytes <= kv.limits.budget =>
                        {
                            kv.store.remove(hit.id);
                            return self.admit(Job::Generate(job), active, kv);
                        }
                        _ => return Some(Job::Generate(job)),
                    }
                }
                let mut cached = 0;
                let model = match (base.as_ref(), native) {
                    (Some(_), Some(native)) => {
                        let mut cache = native.new_cache(capacity);
                        let from_running =
                            running.filter(|(_, n)| kept.is_none_or(|h| *n > h.common));
                        let copied = if let Some((i, n)) = from_running {
                            let SeqModel::Batched(source) = &active[i].model else {
                                unreachable!("filtered on batched sequences");
                            };
                            cache.copy_prefix_from(source, n).map(|()| n)
                        } else if let Some(hit) = kept {
                            cache
                                .copy_prefix_from(kv.store.take_hit(hit.id), hit.common)
                                .map(|()| hit.common)
                        } else {
                            Ok(0)
                        };
                        match copied {
                            Ok(n) => cached = n,
                            Err(e) => {
                                tracing::warn!(error = %e, "prefix cache not used");
                                cache = native.new_cache(capacity);
                            }
                        }
                        Some(SeqModel::Batched(cache))
                    }
                    (Some(b), None) if b.forkable() => b.fork(capacity).map(SeqModel::Own),
                    // Cannot fork: lend the base model to this one sequence.
                    (Some(_), None) => base.take().map(SeqModel::Own),
                    (None, _) => None,
                };
                let Some(model) = model else {
                    let _ = job.events.send(StreamEvent::Failed(
                        "the model could not start a sequence".into(),
                    ));
                    return None;
                };
                if cached > 0 {
                    tracing::debug!(parent: &job.span, cached, prompt = job.prompt.len(), "prompt prefix reused from the KV cache");
                    self.counters
                        .cached_prompt_tokens
                        .fetch_add(cached as u64, Ordering::Relaxed);
                }
                kv.running += kv_bytes;
                kv.publish(&self.counters);
                let prompt_len = job.prompt.len();
                active.push(Sequence {
                    model,
                    tokens: job.prompt,
                    fed: cached,
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
                    kv_bytes,
                    cached_prompt_tokens: cached,
                });
                self.counters.active.fetch_add(1, Ordering::Relaxed);
            }
            (Job::Generate(job), Runner::Embedder(_)) => {
                let _ = job.events.send(StreamEvent::Failed(
                    EngineError::NotAGenerativeModel.to_string(),
                ));
            }
        }
        None
    }

    /// One forward pass for every active sequence.
    fn turn(&mut self, active: &mut Vec<Sequence>, kv: &mut KvState) {
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
                // One pass of this sequence alone: its prompt (what is left of it), or a token.
                let pending = seq.tokens.len() - seq.fed;
                let prompt = if seq.fed < seq.prompt_len { pending } else { 0 };
                let started = Instant::now();
                let stepped = seq.step(tokenizer, eos_ids, special_ids);
                self.counters
                    .record_step(1, usize::from(prompt == 0), prompt, started.elapsed());
                match stepped {
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
                    let model = retire(&self.counters, kv, active.swap_remove(i));
                    if let (None, Some(mut model)) = (base.as_ref(), model) {
                        // Give the lent model back, with an empty cache.
                        model.reset();
                        *base = Some(model);
                    }
                }
            }
        }
    }
}

/// The shared model of a batched worker and its buffers.
struct Batch {
    model: Shared,
    buffers: Buffers,
    pacer: Pacer,
}

/// How long a step that carries a chunk of a long prompt may take, in decode steps: running
/// streams see about this gap between two tokens while a long prompt is processed. (2.0 left
/// the p99 of those gaps at 3.8x their median on a noisy 2-core VM, whose decode steps alone
/// vary by 1.7x at p99; 1.6 keeps it under 3x, for a long prompt's TTFT 1.7 times longer.)
const STALL_FACTOR: f64 = 1.6;
/// The smallest prompt chunk.
const MIN_CHUNK: usize = 1;
/// Prompt tokens of all sequences together that one step carries while nobody decodes (each
/// sequence's part at most `--prefill-chunk`): a burst of clients starts in one step, and all
/// of them decode from the next, instead of the first ones decoding while the later ones'
/// prompts stall them. (It bounds the step's activations: 1,024 rows.)
const WAVE_TOKENS: usize = 1024;
/// A request that wakes an idle worker waits for the others of its burst: requests are taken
/// while they keep arriving within `ARRIVAL_GAP` of each other, for at most `ARRIVAL_WINDOW`.
const ARRIVAL_GAP: Duration = Duration::from_micros(1500);
const ARRIVAL_WINDOW: Duration = Duration::from_millis(10);

/// Sizes prompt chunks from measured step times. With nobody decoding, the waiting prompts
/// go at once (up to [`WAVE_TOKENS`] in all, each at most the largest chunk). Otherwise a step
/// carrying prompt tokens may take about [`STALL_FACTOR`] times a decode-only step, so the
/// running streams keep their pace while new prompts, short or long, are read.
#[derive(Debug, Default)]
struct Pacer {
    /// Seconds of a step without prompt tokens (moving average).
    decode: Option<f64>,
    /// Seconds prompt tokens added to steps, and how many they were (moving sums): their
    /// ratio is the cost of one, each step weighing as many tokens as it carried. (A plain
    /// average of per-step ratios let steps of one or two tokens, whose extra time is mostly
    /// noise, set the chunk: occasional oversized chunks, the p99 of the running streams' gaps
    /// at 3.7x their median.)
    prompt: Option<(f64, f64)>,
}

impl Pacer {
    const ALPHA: f64 = 0.3;

    fn average(slot: &mut Option<f64>, sample: f64) {
        *slot = Some(match *slot {
            Some(old) => old + Self::ALPHA * (sample - old),
            None => sample,
        });
    }

    /// Seconds one prompt token adds to a step.
    fn per_token(&self) -> Option<f64> {
        self.prompt
            .and_then(|(secs, tokens)| (tokens > 0.0).then(|| secs / tokens))
    }

    fn add_prompt(&mut self, secs: f64, tokens: f64) {
        self.prompt = Some(match self.prompt {
            Some((s, t)) => (
                (1.0 - Self::ALPHA) * s + secs,
                (1.0 - Self::ALPHA) * t + tokens,
            ),
            None => (secs, tokens),
        });
    }

    /// Prompt tokens the next step may carry in all, `max` being the largest chunk, with
    /// `decoding` sequences past their prompts.
    fn chunk(&self, max: usize, decoding: usize) -> usize {
        if decoding == 0 {
            return max.max(WAVE_TOKENS);
        }
        let floor = MIN_CHUNK.min(max);
        match (self.decode, self.per_token()) {
            (Some(decode), Some(per_token)) if per_token > 0.0 => {
                let room = (STALL_FACTOR - 1.0) * decode / per_token;
                (room as usize).clamp(floor, max)
            }
            _ => floor,
        }
    }

    /// Learns from a step of `prompt_tokens` prompt tokens and `decoding` decode tokens that
    /// took `secs`.
    fn record(&mut self, prompt_tokens: usize, decoding: usize, secs: f64) {
        if prompt_tokens == 0 {
            if decoding > 0 {
                Self::average(&mut self.decode, secs);
            }
            return;
        }
        let p = prompt_tokens as f64;
        if decoding == 0 {
            self.add_prompt(secs, p);
            return;
        }
        match (self.decode, self.per_token()) {
            (Some(decode), _) => self.add_prompt((secs - decode).max(0.0), p),
            // Every step so far carried prompt tokens: the decode part is what they leave.
            (None, Some(per_token)) => {
                Self::average(&mut self.decode, (secs - p * per_token).max(0.1 * secs))
            }
            (None, None) => {}
        }
    }
}

/// Where a sequence stands: tokens fed to the model, its prompt's length, tokens it has.
#[derive(Debug, Clone, Copy)]
struct Progress {
    fed: usize,
    prompt_len: usize,
    tokens: usize,
}

/// How many new tokens each sequence feeds the next step: every decoding sequence its token,
/// and the waiting prompts, in order, what the pacer's budget allows (each at most
/// `prefill_chunk`).
fn plan_feed(seqs: &[Progress], pacer: &Pacer, prefill_chunk: usize) -> Vec<usize> {
    let decoding = seqs.iter().filter(|s| s.fed >= s.prompt_len).count();
    let max_chunk = prefill_chunk.max(1);
    let mut budget = pacer.chunk(max_chunk, decoding);
    seqs.iter()
        .map(|s| {
            let pending = s.tokens - s.fed;
            if s.fed >= s.prompt_len {
                pending
            } else {
                let n = pending.min(budget).min(max_chunk);
                budget -= n;
                n
            }
        })
        .collect()
}

impl Worker {
    /// One forward pass over every active sequence: a decode token for each sequence past its
    /// prompt, and prompt chunks (at most `prefill_chunk` tokens in all) for the others; then
    /// a token is sampled for every sequence whose prompt is now fully in its cache.
    fn batched_turn(&mut self, batch: &mut Batch, active: &mut Vec<Sequence>, kv: &mut KvState) {
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
                retire(&self.counters, kv, active.swap_remove(i));
            } else {
                i += 1;
            }
        }
        if active.is_empty() {
            return;
        }
        // How many new tokens each sequence feeds this step.
        let decoding = active.iter().filter(|s| s.fed >= s.prompt_len).count();
        let progress: Vec<Progress> = active
            .iter()
            .map(|s| Progress {
                fed: s.fed,
                prompt_len: s.prompt_len,
                tokens: s.tokens.len(),
            })
            .collect();
        let feed = plan_feed(&progress, &batch.pacer, self.prefill_chunk);
        let mut parts: Vec<Part<'_>> = Vec::with_capacity(active.len());
        let mut rows: Vec<usize> = Vec::with_capacity(active.len());
        for (i, (seq, &n)) in active.iter_mut().zip(&feed).enumerate() {
            if n == 0 {
                continue;
            }
            let SeqModel::Batched(cache) = &mut seq.model else {
                continue;
            };
            parts.push(Part {
                tokens: &seq.tokens[seq.fed..seq.fed + n],
                cache,
            });
            rows.push(i);
        }
        let prompt_tokens: usize = feed.iter().sum::<usize>() - decoding;
        let Batch {
            model,
            buffers,
            pacer,
        } = batch;
        let started = Instant::now();
        let result = model.forward(&mut parts, buffers);
        let elapsed = started.elapsed();
        pacer.record(prompt_tokens, decoding, elapsed.as_secs_f64());
        self.counters
            .record_step(parts.len(), decoding, prompt_tokens, elapsed);
        drop(parts);
        let vocab = model.vocab();
        let mut ended = vec![false; active.len()];
        for (row, &i) in rows.iter().enumerate() {
            let seq = &mut active[i];
            let _enter = seq.span.clone().entered();
            let outcome = match &result {
                Err(message) => Err(format!("forward pass: {message}")),
                Ok(all) => {
                    seq.fed += feed[i];
                    if seq.fed < seq.tokens.len() {
                        // Still in its prompt: no token yet.
                        Ok(Step::Continue)
                    } else {
                        let logits = &all[row * vocab..(row + 1) * vocab];
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
                retire(&self.counters, kv, active.swap_remove(i));
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
            cached_prompt_tokens: self.cached_prompt_tokens,
        });
        self.conclude(done);
        Step::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(prompt_len: usize) -> Progress {
        Progress {
            fed: 0,
            prompt_len,
            tokens: prompt_len,
        }
    }

    fn running(len: usize) -> Progress {
        Progress {
            fed: len,
            prompt_len: len,
            tokens: len + 1,
        }
    }

    #[test]
    fn a_burst_of_prompts_goes_in_one_step_while_nobody_decodes() {
        let pacer = Pacer::default();
        // 8 clients of 64-token prompts: one step, all of them (they decode from the next).
        assert_eq!(plan_feed(&[waiting(64); 8], &pacer, 256), vec![64; 8]);
        // 16 of them still fit the wave's 1,024 tokens.
        assert_eq!(plan_feed(&[waiting(64); 16], &pacer, 256), vec![64; 16]);
        // Each prompt at most one chunk; the wave at most WAVE_TOKENS in all.
        assert_eq!(
            plan_feed(&[waiting(2000), waiting(300)], &pacer, 256),
            vec![256, 256]
        );
        let long = plan_feed(&[waiting(900); 3], &pacer, 900);
        assert_eq!(long, vec![900, WAVE_TOKENS - 900, 0]);
    }

    #[test]
    fn prompts_arriving_among_running_streams_are_paced_short_ones_too() {
        let mut pacer = Pacer::default();
        // Decode steps of 40 ms; a prompt token adds 1 ms: room for (1.6 - 1) · 40 tokens.
        for _ in 0..20 {
            pacer.record(0, 4, 0.040);
            pacer.record(64, 4, 0.040 + 0.064);
        }
        let room = pacer.chunk(256, 4);
        assert!(room < 64, "{room}");
        let feed = plan_feed(
            &[running(20), running(30), waiting(64), waiting(64)],
            &pacer,
            256,
        );
        // Every running stream gets its token; the new prompts share the room, in order.
        assert_eq!(feed[..2], [1, 1]);
        assert_eq!(feed[2] + feed[3], room);
        assert_eq!(feed[2], room.min(64));
        // Nothing measured yet: the smallest chunk.
        let fresh = plan_feed(&[running(5), waiting(64)], &Pacer::default(), 256);
        assert_eq!(fresh, vec![1, MIN_CHUNK]);
    }

    #[test]
    fn forward_passes_are_counted_by_what_they_carried() {
        let counters = Counters::default();
        counters.record_step(8, 8, 0, Duration::from_micros(5));
        counters.record_step(5, 4, 40, Duration::from_micros(7));
        counters.record_step(2, 0, 128, Duration::from_micros(11));
        counters.record_step(1, 1, 0, Duration::from_micros(3));
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let by_kind = |of: &[AtomicU64; 3]| StepKind::ALL.map(|k| load(&of[k as usize]));
        assert_eq!(by_kind(&counters.steps), [2, 1, 1]);
        assert_eq!(by_kind(&counters.step_nanos), [8_000, 7_000, 11_000]);
        assert_eq!(load(&counters.step_sequences), 16);
        assert_eq!(load(&counters.prompt_tokens_computed), 168);
        assert_eq!(
            StepKind::ALL.map(StepKind::name),
            ["decode", "mixed", "prefill"]
        );
    }

    #[test]
    fn the_pacer_sizes_chunks_to_keep_decode_steps_within_the_stall_factor() {
        let mut pacer = Pacer::default();
        // Nobody decoding: a wave's prompts together. Nothing measured yet: the smallest.
        assert_eq!(pacer.chunk(256, 0), WAVE_TOKENS);
        assert_eq!(pacer.chunk(4096, 0), 4096);
        assert_eq!(pacer.chunk(256, 4), MIN_CHUNK);
        // Decode steps of 40 ms; a prompt token adds 1 ms.
        for _ in 0..20 {
            pacer.record(0, 4, 0.040);
            pacer.record(64, 4, 0.040 + 0.064);
        }
        let chunk = pacer.chunk(256, 4);
        let expected = ((STALL_FACTOR - 1.0) * 40.0) as usize;
        assert!(chunk.abs_diff(expected) <= 1, "{chunk} vs {expected}");
        // The chunk's step stays within the stall factor of a decode step.
        assert!(0.040 + chunk as f64 * 0.001 <= STALL_FACTOR * 0.040 + 1e-3);
        // Faster prompt tokens: bigger chunks, up to the configured maximum.
        for _ in 0..20 {
            pacer.record(64, 4, 0.040 + 0.0016);
        }
        assert_eq!(pacer.chunk(256, 4), 256);
        assert_eq!(pacer.chunk(100, 4), 100);
        // Prompt-only steps teach the per-token cost too.
        let mut fresh = Pacer::default();
        fresh.record(100, 0, 0.5);
        fresh.record(0, 2, 0.05);
        let expected = ((STALL_FACTOR - 1.0) * 0.05 / 0.005) as usize;
        assert_eq!(fresh.chunk(256, 3), expected);
        // Steps that all carry prompt tokens still teach the decode part.
        let mut busy = Pacer::default();
        busy.record(100, 0, 0.5);
        busy.record(10, 2, 0.05 + 0.05);
        assert_eq!(busy.chunk(256, 3), expected);
    }
}
