//! `lmx.v1.ModelAdmin`: downloads, snapshot verification, load/unload, listing and deletion.

use tonic::{Request, Response, Status};

use super::ResponseStream;
use crate::{error::ApiError, pb};

/// Implementation of `lmx.v1.ModelAdmin`.
#[derive(Debug, Default, Clone)]
pub struct AdminApi {}

impl AdminApi {
    /// The admin API.
    pub fn new() -> Self {
        Self {}
    }
}

const DOWNLOADS: &str = "model downloads";
const VERIFICATION: &str = "snapshot verification";
const ENGINE: &str = "the inference engine (model loading)";
const CATALOG: &str = "the model catalog";

#[tonic::async_trait]
impl pb::model_admin_server::ModelAdmin for AdminApi {
    type DownloadModelStream = ResponseStream<pb::DownloadModelResponse>;
    type WatchDownloadStream = ResponseStream<pb::WatchDownloadResponse>;

    async fn download_model(
        &self,
        _request: Request<pb::DownloadModelRequest>,
    ) -> Result<Response<Self::DownloadModelStream>, Status> {
        Err(ApiError::unimplemented(DOWNLOADS).into())
    }

    async fn watch_download(
        &self,
        _request: Request<pb::WatchDownloadRequest>,
    ) -> Result<Response<Self::WatchDownloadStream>, Status> {
        Err(ApiError::unimplemented(DOWNLOADS).into())
    }

    async fn get_download(
        &self,
        _request: Request<pb::GetDownloadRequest>,
    ) -> Result<Response<pb::GetDownloadResponse>, Status> {
        Err(ApiError::unimplemented(DOWNLOADS).into())
    }

    async fn list_downloads(
        &self,
        _request: Request<pb::ListDownloadsRequest>,
    ) -> Result<Response<pb::ListDownloadsResponse>, Status> {
        Err(ApiError::unimplemented(DOWNLOADS).into())
    }

    async fn cancel_download(
        &self,
        _request: Request<pb::CancelDownloadRequest>,
    ) -> Result<Response<pb::CancelDownloadResponse>, Status> {
        Err(ApiError::unimplemented(DOWNLOADS).into())
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        Err(ApiError::unimplemented(CATALOG).into())
    }

    async fn verify_model(
        &self,
        _request: Request<pb::VerifyModelRequest>,
    ) -> Result<Response<pb::VerifyModelResponse>, Status> {
        Err(ApiError::unimplemented(VERIFICATION).into())
    }

    async fn load_model(
        &self,
        _request: Request<pb::LoadModelRequest>,
    ) -> Result<Response<pb::LoadModelResponse>, Status> {
        Err(ApiError::unimplemented(ENGINE).into())
    }

    async fn unload_model(
        &self,
        _request: Request<pb::UnloadModelRequest>,
    ) -> Result<Response<pb::UnloadModelResponse>, Status> {
        Err(ApiError::unimplemented(ENGINE).into())
    }

    async fn delete_model(
        &self,
        _request: Request<pb::DeleteModelRequest>,
    ) -> Result<Response<pb::DeleteModelResponse>, Status> {
        Err(ApiError::unimplemented(CATALOG).into())
    }
}
