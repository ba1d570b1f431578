//! `lmx.v1.ModelAdmin`: downloads, snapshot verification, load/unload, listing and deletion.

use std::{sync::Arc, time::Instant};

use tonic::{Request, Response, Status};

use super::{convert, ResponseStream};
use crate::{error::ApiError, manager::Manager, pb, snapshot::Mode};

/// Implementation of `lmx.v1.ModelAdmin`.
#[derive(Debug, Clone)]
pub struct AdminApi {
    manager: Arc<Manager>,
}

impl AdminApi {
    /// The admin API over `manager`.
    pub fn new(manager: Arc<Manager>) -> Self {
        Self { manager }
    }
}

fn verify_mode(mode: i32) -> Result<Mode, ApiError> {
    match pb::VerifyMode::try_from(mode) {
        Ok(pb::VerifyMode::Unspecified | pb::VerifyMode::Quick) => Ok(Mode::Quick),
        Ok(pb::VerifyMode::Full) => Ok(Mode::Full),
        Err(_) => Err(ApiError::invalid_argument(
            "mode",
            format!("`mode` must be VERIFY_MODE_QUICK (1) or VERIFY_MODE_FULL (2). Given: {mode}"),
        )),
    }
}

const DOWNLOADS: &str = "model downloads";
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
        request: Request<pb::VerifyModelRequest>,
    ) -> Result<Response<pb::VerifyModelResponse>, Status> {
        let request = request.into_inner();
        let mode = verify_mode(request.mode)?;
        let started = Instant::now();
        let verified = self
            .manager
            .verify(&request.model_id, &request.revision, mode)
            .await
            .map_err(ApiError::from)?;
        let report = verified.report;
        tracing::info!(
            model_id = %request.model_id,
            complete = report.complete,
            problems = report.problems.len(),
            "verified snapshot"
        );
        Ok(Response::new(pb::VerifyModelResponse {
            complete: report.complete,
            problems: report.problems.iter().map(convert::problem).collect(),
            path: report.path.display().to_string(),
            commit_sha: verified.snapshot.commit,
            format: convert::weight_format(report.format) as i32,
            files_checked: report.files_checked,
            bytes_hashed: report.bytes_hashed,
            summary: report.summary,
            elapsed: Some(convert::duration(started.elapsed())),
            mode: convert::verify_mode(mode) as i32,
            architecture: report.architecture.unwrap_or_default(),
        }))
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
