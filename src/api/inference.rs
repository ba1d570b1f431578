//! `lmx.v1.Inference`: token streaming, chat, tokenization and embeddings. Each call finds the
//! loaded model, converts the request, and hands it to the engine (tokenization and validation
//! off the async runtime, generation on the model's own thread).

use std::sync::Arc;

use tokio_stream::{wrappers::UnboundedReceiverStream, StreamExt};
use tonic::{Request, Response, Status};

use super::ResponseStream;
use crate::{
    engine::{ChatMessage, Completion, FinishReason, Prompt, RawParams, StreamEvent, TokenEvent},
    error::ApiError,
    manager::{models::InUse, Manager},
    pb,
};

/// Implementation of `lmx.v1.Inference`.
#[derive(Clone)]
pub struct InferenceApi {
    manager: Arc<Manager>,
}

impl InferenceApi {
    /// The inference API over `manager`'s loaded models.
    pub fn new(manager: Arc<Manager>) -> Self {
        Self { manager }
    }

    /// The model a request names (its alias resolved), loaded on demand when that is on.
    async fn model(&self, model_id: &str, revision: &str) -> Result<InUse, ApiError> {
        let (model_id, revision) = self
            .manager
            .aliases()
            .resolve(model_id, revision)
            .map_err(ApiError::from)?;
        self.manager
            .models()
            .use_or_load(&model_id, &revision)
            .await
            .map_err(|e| ApiError::from(&*e))
    }

    /// Queues a generation and returns its events as messages built by `item`.
    async fn stream<T: Send + 'static>(
        &self,
        model: InUse,
        prompt: Prompt,
        params: RawParams,
        item: fn(Item) -> T,
    ) -> Result<ResponseStream<T>, Status> {
        let engine = model.model().engine.clone();
        let events = tokio::task::spawn_blocking(move || engine.generate(prompt, &params))
            .await
            .map_err(|e| ApiError::internal("queueing the generation failed", &e))?
            .map_err(ApiError::from)?;
        let key = model.model().key.to_string();
        let tokens = metrics::counter!("lmx_tokens_generated_total", "model" => key.clone());
        let latency = metrics::histogram!("lmx_token_latency_seconds", "model" => key.clone());
        let mut last_token: Option<std::time::Instant> = None;
        let stream = UnboundedReceiverStream::new(events).map(move |event| {
            // The stream keeps the model marked in use until the client has it all.
            let _in_use = &model;
            match event {
                StreamEvent::Token(token) => {
                    tokens.increment(1);
                    let now = std::time::Instant::now();
                    if let Some(previous) = last_token.replace(now) {
                        latency.record(now.duration_since(previous).as_secs_f64());
                    }
                    Ok(item(Item::Token(token_message(token))))
                }
                StreamEvent::Done(done) => {
                    metrics::histogram!("lmx_time_to_first_token_seconds", "model" => key.clone())
                        .record(done.time_to_first_token_ms / 1e3);
                    let reason = match done.finish_reason {
                        FinishReason::Length => "length",
                        FinishReason::EosToken => "eos_token",
                        FinishReason::StopSequence => "stop_sequence",
                    };
                    metrics::counter!("lmx_generations_total", "model" => key.clone(), "finish_reason" => reason).increment(1);
                    Ok(item(Item::Completion(completion_message(done))))
                }
                StreamEvent::Failed(message) => {
                    Err(Status::internal(format!("generation failed: {message}")))
                }
            }
        });
        Ok(Box::pin(stream))
    }
}

/// A streamed item before it is wrapped in a Generate or Chat response.
pub enum Item {
    Token(pb::Token),
    Completion(pb::Completion),
}

fn token_message(t: TokenEvent) -> pb::Token {
    pb::Token {
        id: t.id,
        text: t.text,
        logprob: t.logprob,
        special: t.special,
    }
}

fn completion_message(c: Completion) -> pb::Completion {
    pb::Completion {
        finish_reason: match c.finish_reason {
            FinishReason::Length => pb::FinishReason::Length,
            FinishReason::EosToken => pb::FinishReason::EosToken,
            FinishReason::StopSequence => pb::FinishReason::StopSequence,
        } as i32,
        prompt_tokens: c.prompt_tokens as u32,
        completion_tokens: c.completion_tokens as u32,
        time_to_first_token_ms: c.time_to_first_token_ms,
        tokens_per_second: c.tokens_per_second,
        text: c.text,
        stop_sequence: c.stop_sequence.unwrap_or_default(),
        cached_prompt_tokens: c.cached_prompt_tokens as u32,
    }
}

fn raw_params(p: Option<pb::GenerationParameters>) -> RawParams {
    let p = p.unwrap_or_default();
    RawParams {
        max_tokens: p.max_tokens,
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k,
        repetition_penalty: p.repetition_penalty,
        repetition_penalty_last_n: p.repetition_penalty_last_n,
        seed: p.seed,
        stop: p.stop,
        logprobs: p.logprobs,
    }
}

fn generate_item(item: Item) -> pb::GenerateResponse {
    pb::GenerateResponse {
        item: Some(match item {
            Item::Token(t) => pb::generate_response::Item::Token(t),
            Item::Completion(c) => pb::generate_response::Item::Completion(c),
        }),
    }
}

fn chat_item(item: Item) -> pb::ChatResponse {
    pb::ChatResponse {
        item: Some(match item {
            Item::Token(t) => pb::chat_response::Item::Token(t),
            Item::Completion(c) => pb::chat_response::Item::Completion(c),
        }),
    }
}

#[tonic::async_trait]
impl pb::inference_server::Inference for InferenceApi {
    type GenerateStream = ResponseStream<pb::GenerateResponse>;
    type ChatStream = ResponseStream<pb::ChatResponse>;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let r = request.into_inner();
        if r.prompt.is_empty() {
            return Err(ApiError::invalid_argument("prompt", "`prompt` must not be empty").into());
        }
        let model = self.model(&r.model_id, &r.revision).await?;
        let prompt = Prompt::Text {
            text: r.prompt,
            add_special_tokens: r.add_special_tokens,
        };
        let stream = self
            .stream(model, prompt, raw_params(r.parameters), generate_item)
            .await?;
        Ok(Response::new(stream))
    }

    async fn chat(
        &self,
        request: Request<pb::ChatRequest>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        let r = request.into_inner();
        if r.messages.is_empty() {
            return Err(
                ApiError::invalid_argument("messages", "`messages` must not be empty").into(),
            );
        }
        if let Some(i) = r.messages.iter().position(|m| m.role.is_empty()) {
            return Err(ApiError::invalid_argument(
                "messages",
                format!("`messages[{i}].role` must not be empty"),
            )
            .into());
        }
        let model = self.model(&r.model_id, &r.revision).await?;
        let messages = r
            .messages
            .into_iter()
            .map(|m| ChatMessage {
                role: m.role,
                content: m.content,
            })
            .collect();
        let stream = self
            .stream(
                model,
                Prompt::Chat(messages),
                raw_params(r.parameters),
                chat_item,
            )
            .await?;
        Ok(Response::new(stream))
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let r = request.into_inner();
        let model = self.model(&r.model_id, &r.revision).await?;
        let engine = model.model().engine.clone();
        let pieces =
            tokio::task::spawn_blocking(move || engine.tokenize(&r.text, r.add_special_tokens))
                .await
                .map_err(|e| ApiError::internal("tokenization failed", &e))?
                .map_err(ApiError::from)?;
        Ok(Response::new(pb::TokenizeResponse {
            tokens: pieces
                .into_iter()
                .map(|p| pb::TokenPiece {
                    id: p.id,
                    piece: p.piece,
                    start: p.start as u32,
                    end: p.end as u32,
                    special: p.special,
                })
                .collect(),
        }))
    }

    async fn embed(
        &self,
        request: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        let r = request.into_inner();
        let model = self.model(&r.model_id, &r.revision).await?;
        let answer = model
            .model()
            .engine
            .embed(r.inputs, r.normalize.unwrap_or(true))
            .map_err(ApiError::from)?;
        let embeddings = answer
            .await
            .map_err(|_| ApiError::from(crate::engine::EngineError::Stopped))?
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::EmbedResponse {
            dimensions: embeddings.dimensions as u32,
            prompt_tokens: embeddings.prompt_tokens as u32,
            embeddings: embeddings
                .vectors
                .into_iter()
                .map(|values| pb::Embedding { values })
                .collect(),
        }))
    }
}
