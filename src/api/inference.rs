//! `lmx.v1.Inference`: token streaming, chat, tokenization and embeddings.

use tonic::{Request, Response, Status};

use super::ResponseStream;
use crate::{error::ApiError, pb};

/// Implementation of `lmx.v1.Inference`.
#[derive(Debug, Default, Clone)]
pub struct InferenceApi {}

impl InferenceApi {
    /// The inference API.
    pub fn new() -> Self {
        Self {}
    }
}

const ENGINE: &str = "the inference engine";

#[tonic::async_trait]
impl pb::inference_server::Inference for InferenceApi {
    type GenerateStream = ResponseStream<pb::GenerateResponse>;
    type ChatStream = ResponseStream<pb::ChatResponse>;

    async fn generate(
        &self,
        _request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        Err(ApiError::unimplemented(ENGINE).into())
    }

    async fn chat(
        &self,
        _request: Request<pb::ChatRequest>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        Err(ApiError::unimplemented(ENGINE).into())
    }

    async fn tokenize(
        &self,
        _request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        Err(ApiError::unimplemented(ENGINE).into())
    }

    async fn embed(
        &self,
        _request: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        Err(ApiError::unimplemented(ENGINE).into())
    }
}
