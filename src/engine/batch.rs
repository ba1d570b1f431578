//! The models continuous batching runs on: lmx's CPU forward pass ([`Model`]) or its candle
//! counterpart on any device ([`CandleModel`], for GPUs), behind one interface for the worker:
//! a shared model, one KV cache per sequence, and a forward call over all of them.

use std::sync::Arc;

use super::{
    arch::CausalLm,
    kernels,
    native::{CandleCache, CandleModel, CandleStep, KvCache, Model, Step, Workspace},
};

/// The model every batched sequence of a worker runs on.
#[derive(Clone)]
pub(crate) enum Shared {
    Native(Arc<Model>),
    Candle(Arc<CandleModel>),
}

/// A batched sequence's KV cache, of its worker's kind.
pub(crate) enum Cache {
    Native(KvCache),
    Candle(CandleCache),
}

/// One sequence's part of a batched forward call.
pub(crate) struct Part<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut Cache,
}

/// Buffers reused across steps.
#[derive(Default)]
pub(crate) struct Buffers {
    ws: Workspace,
    logits: Vec<f32>,
}

impl Shared {
    /// The batched model behind `lm`, if it has one.
    pub fn of(lm: &dyn CausalLm) -> Option<Shared> {
        lm.native()
            .map(Shared::Native)
            .or_else(|| lm.candle().map(Shared::Candle))
    }

    pub fn context_length(&self) -> usize {
        match self {
            Shared::Native(m) => m.config.context_length,
            Shared::Candle(m) => m.config.context_length,
        }
    }

    pub fn vocab(&self) -> usize {
        match self {
            Shared::Native(m) => m.config.vocab,
            Shared::Candle(m) => m.config.vocab,
        }
    }

    /// An empty cache with room for `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> Cache {
        match self {
            Shared::Native(m) => Cache::Native(KvCache::new(&m.config, capacity)),
            Shared::Candle(m) => Cache::Candle(CandleCache::new(m, capacity)),
        }
    }

    /// One forward pass over `parts`; returns the logits of each part's last token,
    /// `parts × vocab`.
    pub fn forward<'b>(
        &self,
        parts: &mut [Part<'_>],
        buffers: &'b mut Buffers,
    ) -> Result<&'b [f32], String> {
        match self {
            Shared::Native(model) => {
                let mut steps = Vec::with_capacity(parts.len());
                for part in parts.iter_mut() {
                    let Cache::Native(cache) = &mut *part.cache else {
                        return Err("a cache of another kind of model".into());
                    };
                    steps.push(Step {
                        tokens: part.tokens,
                        cache,
                    });
                }
                let ws = &mut buffers.ws;
                kernels::pool::session(|| model.forward(&mut steps, ws))?;
                Ok(&buffers.ws.logits)
            }
            Shared::Candle(model) => {
                let mut steps = Vec::with_capacity(parts.len());
                for part in parts.iter_mut() {
                    let Cache::Candle(cache) = &mut *part.cache else {
                        return Err("a cache of another kind of model".into());
                    };
                    steps.push(CandleStep {
                        tokens: part.tokens,
                        cache,
                    });
                }
                model.forward(&mut steps, &mut buffers.logits)?;
                Ok(&buffers.logits)
            }
        }
    }
}

impl Cache {
    /// Positions it holds.
    pub fn len(&self) -> usize {
        match self {
            Cache::Native(c) => c.len(),
            Cache::Candle(c) => c.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replaces its contents with the first `n` positions of `other`.
    pub fn copy_prefix_from(&mut self, other: &Cache, n: usize) -> Result<(), String> {
        match (self, other) {
            (Cache::Native(to), Cache::Native(from)) => {
                to.copy_prefix_from(from, n);
                Ok(())
            }
            (Cache::Candle(to), Cache::Candle(from)) => to.copy_prefix_from(from, n),
            _ => Err("copying between caches of different kinds".into()),
        }
    }

    /// The cache as it is worth keeping once its sequence ended, and the bytes it then holds
    /// at `per_token` bytes a position: a native cache allocated for far more than it holds is
    /// copied to its size; a candle cache, which holds blocks of its model's pool, is kept as
    /// it is (charged for its blocks).
    pub fn keep(self, per_token: u64) -> (Cache, u64) {
        match self {
            Cache::Native(c) => {
                let c = if c.len() * 4 >= c.capacity() * 3 {
                    c
                } else {
                    c.compact()
                };
                let bytes = c.capacity() as u64 * per_token;
                (Cache::Native(c), bytes)
            }
            Cache::Candle(c) => {
                let held = c.allocated() as u64 * per_token;
                (Cache::Candle(c), held)
            }
        }
    }
}
