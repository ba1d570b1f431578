//! Request validation before anything is queued (the TGI router's idea): raw parameters become a
//! [`ValidParams`] or an error naming the field, the limit and the given value, e.g.
//! "`max_tokens` must be <= 4096. Given: 10000".

use super::{sampling::SamplingParams, EngineError};

/// Server-wide limits (from configuration).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens_cap: usize,
    /// `max_tokens` when a request leaves it unset (further bounded by the context).
    pub default_max_tokens: usize,
    /// Most stop strings per request.
    pub max_stop_sequences: usize,
    /// Longest stop string, in bytes.
    pub max_stop_bytes: usize,
    /// Most prompt tokens (after the chat template); None: the model's context length.
    pub max_prompt_tokens: Option<usize>,
    /// Most messages of one chat request.
    pub max_messages: usize,
    /// Most strings of one embedding request.
    pub max_embed_inputs: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_tokens_cap: 4096,
            default_max_tokens: 256,
            max_stop_sequences: 4,
            max_stop_bytes: 256,
            max_prompt_tokens: None,
            max_messages: 256,
            max_embed_inputs: 128,
        }
    }
}

/// Generation controls as a client sent them (unset fields are None).
#[derive(Debug, Clone, Default)]
pub struct RawParams {
    pub max_tokens: Option<i32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub repetition_penalty: Option<f32>,
    pub repetition_penalty_last_n: Option<i32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub logprobs: bool,
}

/// Controls that passed validation.
#[derive(Debug, Clone)]
pub struct ValidParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
}

fn invalid(field: &'static str, message: String) -> EngineError {
    EngineError::Validation { field, message }
}

/// Checks a prompt's text before tokenization.
pub fn validate_prompt(field: &'static str, prompt: &str) -> Result<(), EngineError> {
    if prompt.is_empty() {
        return Err(invalid(field, format!("`{field}` must not be empty")));
    }
    Ok(())
}

/// A chat request's message count against `--max-messages`.
pub fn validate_messages(count: usize, limits: &Limits) -> Result<(), EngineError> {
    if count > limits.max_messages {
        return Err(invalid(
            "messages",
            format!(
                "`messages` must have at most {} messages. Given: {count}",
                limits.max_messages
            ),
        ));
    }
    Ok(())
}

/// A prompt's token count against `--max-prompt-tokens` (the context is checked separately).
pub fn validate_prompt_tokens(tokens: usize, limits: &Limits) -> Result<(), EngineError> {
    match limits.max_prompt_tokens {
        Some(max) if tokens > max => Err(invalid(
            "prompt",
            format!("`prompt` must have at most {max} tokens. Given: {tokens} tokens"),
        )),
        _ => Ok(()),
    }
}

/// An embedding request's input count against `--max-embed-inputs`.
pub fn validate_embed_inputs(count: usize, limits: &Limits) -> Result<(), EngineError> {
    if count > limits.max_embed_inputs {
        return Err(invalid(
            "inputs",
            format!(
                "`inputs` must have at most {} strings. Given: {count}",
                limits.max_embed_inputs
            ),
        ));
    }
    Ok(())
}

fn random_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
}

/// Validates `raw` for a prompt of `prompt_tokens` tokens on a model with `context` positions.
pub fn validate(
    raw: &RawParams,
    prompt_tokens: usize,
    context: usize,
    limits: &Limits,
) -> Result<ValidParams, EngineError> {
    if prompt_tokens >= context {
        return Err(invalid(
            "prompt",
            format!(
                "`prompt` must have fewer tokens than the model's context length ({context}). Given: {prompt_tokens} tokens"
            ),
        ));
    }
    let room = context - prompt_tokens;
    let max_tokens = match raw.max_tokens {
        None => limits.default_max_tokens.min(room).min(limits.max_tokens_cap),
        Some(n) if n < 1 => {
            return Err(invalid("max_tokens", format!("`max_tokens` must be >= 1. Given: {n}")))
        }
        Some(n) if n as usize > limits.max_tokens_cap => {
            return Err(invalid(
                "max_tokens",
                format!("`max_tokens` must be <= {}. Given: {n}", limits.max_tokens_cap),
            ))
        }
        Some(n) if n as usize > room => {
            return Err(invalid(
                "max_tokens",
                format!(
                    "`prompt` tokens + `max_tokens` must be <= {context} (the model's context length). \
                     Given: {prompt_tokens} + {n} = {}",
                    prompt_tokens + n as usize
                ),
            ))
        }
        Some(n) => n as usize,
    };

    let any_sampling = raw.top_p.is_some() || raw.top_k.is_some() || raw.seed.is_some();
    let temperature = match raw.temperature {
        Some(t) if !t.is_finite() || t < 0.0 => {
            return Err(invalid(
                "temperature",
                format!("`temperature` must be >= 0. Given: {t}"),
            ))
        }
        Some(t) => t as f64,
        None if any_sampling => 1.0,
        None => 0.0,
    };
    let top_p = match raw.top_p {
        Some(p) if !(p > 0.0 && p <= 1.0) => {
            return Err(invalid(
                "top_p",
                format!("`top_p` must be > 0 and <= 1. Given: {p}"),
            ))
        }
        Some(p) => p as f64,
        None => 1.0,
    };
    let top_k = match raw.top_k {
        Some(k) if k < 0 => {
            return Err(invalid(
                "top_k",
                format!("`top_k` must be >= 0. Given: {k}"),
            ))
        }
        Some(k) => k as usize,
        None => 0,
    };
    let repetition_penalty = match raw.repetition_penalty {
        Some(r) if !r.is_finite() || r <= 0.0 => {
            return Err(invalid(
                "repetition_penalty",
                format!("`repetition_penalty` must be > 0. Given: {r}"),
            ))
        }
        Some(r) => r,
        None => 1.0,
    };
    let repetition_last_n = match raw.repetition_penalty_last_n {
        Some(n) if n < 1 => {
            return Err(invalid(
                "repetition_penalty_last_n",
                format!("`repetition_penalty_last_n` must be >= 1. Given: {n}"),
            ))
        }
        Some(n) => n as usize,
        None => 64,
    };
    if raw.stop.len() > limits.max_stop_sequences {
        return Err(invalid(
            "stop",
            format!(
                "`stop` must have at most {} strings. Given: {}",
                limits.max_stop_sequences,
                raw.stop.len()
            ),
        ));
    }
    for s in &raw.stop {
        if s.is_empty() {
            return Err(invalid(
                "stop",
                "`stop` strings must not be empty. Given: \"\"".into(),
            ));
        }
        if s.len() > limits.max_stop_bytes {
            return Err(invalid(
                "stop",
                format!(
                    "`stop` strings must be at most {} bytes. Given: {} bytes",
                    limits.max_stop_bytes,
                    s.len()
                ),
            ));
        }
    }
    Ok(ValidParams {
        max_tokens,
        sampling: SamplingParams {
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            repetition_last_n,
            seed: raw.seed.unwrap_or_else(random_seed),
            logprobs: raw.logprobs,
        },
        stop: raw.stop.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: RawParams) -> Result<ValidParams, (String, String)> {
        validate(&raw, 10, 100, &Limits::default()).map_err(|e| match e {
            EngineError::Validation { field, message } => (field.to_owned(), message),
            other => panic!("{other}"),
        })
    }

    #[test]
    fn invalid_parameters_name_field_limit_and_value() {
        let cases: Vec<(RawParams, &str, &str)> = vec![
            (RawParams { max_tokens: Some(0), ..Default::default() }, "max_tokens", "`max_tokens` must be >= 1. Given: 0"),
            (RawParams { max_tokens: Some(5000), ..Default::default() }, "max_tokens", "`max_tokens` must be <= 4096. Given: 5000"),
            (
                RawParams { max_tokens: Some(95), ..Default::default() },
                "max_tokens",
                "`prompt` tokens + `max_tokens` must be <= 100 (the model's context length). Given: 10 + 95 = 105",
            ),
            (RawParams { temperature: Some(-0.5), ..Default::default() }, "temperature", "`temperature` must be >= 0. Given: -0.5"),
            (RawParams { temperature: Some(f32::NAN), ..Default::default() }, "temperature", "Given: NaN"),
            (RawParams { top_p: Some(0.0), ..Default::default() }, "top_p", "`top_p` must be > 0 and <= 1. Given: 0"),
            (RawParams { top_p: Some(1.5), ..Default::default() }, "top_p", "Given: 1.5"),
            (RawParams { top_k: Some(-1), ..Default::default() }, "top_k", "`top_k` must be >= 0. Given: -1"),
            (RawParams { repetition_penalty: Some(0.0), ..Default::default() }, "repetition_penalty", "`repetition_penalty` must be > 0. Given: 0"),
            (RawParams { repetition_penalty_last_n: Some(0), ..Default::default() }, "repetition_penalty_last_n", "Given: 0"),
            (
                RawParams { stop: vec!["a".into(), "b".into(), "c".into(), "d".into(), "e".into()], ..Default::default() },
                "stop",
                "`stop` must have at most 4 strings. Given: 5",
            ),
            (RawParams { stop: vec![String::new()], ..Default::default() }, "stop", "must not be empty"),
            (RawParams { stop: vec!["x".repeat(300)], ..Default::default() }, "stop", "at most 256 bytes. Given: 300 bytes"),
        ];
        for (raw, field, message) in cases {
            let (got_field, got) = check(raw).unwrap_err();
            assert_eq!(got_field, field);
            assert!(got.contains(message), "{got:?} lacks {message:?}");
        }
    }

    #[test]
    fn counts_beyond_the_limits_name_field_limit_and_value() {
        let limits = Limits {
            max_prompt_tokens: Some(10),
            max_messages: 2,
            max_embed_inputs: 3,
            ..Limits::default()
        };
        let message = |r: Result<(), EngineError>| match r {
            Err(EngineError::Validation { field, message }) => format!("{field}: {message}"),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            message(validate_messages(3, &limits)),
            "messages: `messages` must have at most 2 messages. Given: 3"
        );
        assert_eq!(
            message(validate_prompt_tokens(11, &limits)),
            "prompt: `prompt` must have at most 10 tokens. Given: 11 tokens"
        );
        assert_eq!(
            message(validate_embed_inputs(4, &limits)),
            "inputs: `inputs` must have at most 3 strings. Given: 4"
        );
        assert!(validate_messages(2, &limits).is_ok());
        assert!(validate_prompt_tokens(10, &limits).is_ok());
        assert!(validate_prompt_tokens(1 << 20, &Limits::default()).is_ok());
        assert!(validate_embed_inputs(3, &limits).is_ok());
    }

    #[test]
    fn defaults_are_greedy_and_bounded_by_the_context() {
        let v = check(RawParams::default()).unwrap();
        assert_eq!(v.sampling.temperature, 0.0);
        assert_eq!(v.max_tokens, 90, "default 256 bounded by 100 - 10");
        let v = check(RawParams {
            seed: Some(3),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            v.sampling.temperature, 1.0,
            "a seed alone asks for sampling"
        );
        let v = check(RawParams {
            temperature: Some(0.0),
            top_k: Some(0),
            ..Default::default()
        })
        .unwrap();
        assert_eq!((v.sampling.temperature, v.sampling.top_k), (0.0, 0));
    }

    #[test]
    fn prompts_that_fill_the_context_are_refused() {
        let err = validate(&RawParams::default(), 100, 100, &Limits::default()).unwrap_err();
        assert!(
            err.to_string()
                .contains("fewer tokens than the model's context length (100). Given: 100"),
            "{err}"
        );
        assert!(validate_prompt("prompt", "").is_err());
    }
}
