//! `lmx.v1.ModelAdmin`: downloads, snapshot verification, load/unload, listing and deletion.

use std::{sync::Arc, time::Instant};

use tonic::{Request, Response, Status};

use super::{convert, ResponseStream};
use crate::{
    error::ApiError,
    manager::{LoadSpec, Manager},
    pb,
    snapshot::Mode,
};

/// Implementation of `lmx.v1.ModelAdmin`.
#[derive(Clone)]
pub struct AdminApi {
    manager: Arc<Manager>,
}

impl AdminApi {
    /// The admin API over `manager`.
    pub fn new(manager: Arc<Manager>) -> Self {
        Self { manager }
    }
}

fn load_spec(options: Option<pb::LoadOptions>) -> Result<LoadSpec, ApiError> {
    let Some(options) = options else {
        return Ok(LoadSpec::default());
    };
    let dtype = match pb::Dtype::try_from(options.dtype) {
        Ok(pb::Dtype::Unspecified) => None,
        Ok(pb::Dtype::F32) => Some(candle_core::DType::F32),
        Ok(pb::Dtype::F16) => Some(candle_core::DType::F16),
        Ok(pb::Dtype::Bf16) => Some(candle_core::DType::BF16),
        Err(_) => {
            return Err(ApiError::invalid_argument(
                "options.dtype",
                format!(
                    "`options.dtype` must be a Dtype value (1-3). Given: {}",
                    options.dtype
                ),
            ))
        }
    };
    let device = if options.device.is_empty() {
        None
    } else {
        Some(crate::config::parse_device(&options.device).map_err(|e| {
            ApiError::invalid_argument("options.device", format!("`options.device` {e}"))
        })?)
    };
    let keep_alive = match options.keep_alive {
        None => None,
        Some(d) => Some(std::time::Duration::try_from(d).map_err(|_| {
            ApiError::invalid_argument(
                "options.keep_alive",
                format!(
                    "`options.keep_alive` must be >= 0. Given: {}s {}ns",
                    d.seconds, d.nanos
                ),
            )
        })?),
    };
    Ok(LoadSpec {
        dtype,
        device,
        keep_alive,
    })
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
        let models = self
            .manager
            .models()
            .list()
            .iter()
            .map(convert::model_status)
            .collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
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
        request: Request<pb::LoadModelRequest>,
    ) -> Result<Response<pb::LoadModelResponse>, Status> {
        let request = request.into_inner();
        let spec = load_spec(request.options)?;
        let loaded = self
            .manager
            .models()
            .load(&request.model_id, &request.revision, spec)
            .await
            .map_err(|e| ApiError::from(&*e))?;
        let load_time = if loaded.already_loaded {
            std::time::Duration::ZERO
        } else {
            loaded.model.load_time
        };
        let status = crate::manager::models::ModelStatus::Loaded(loaded.model);
        Ok(Response::new(pb::LoadModelResponse {
            model: Some(convert::model_status(&status)),
            already_loaded: loaded.already_loaded,
            load_time: Some(convert::duration(load_time)),
        }))
    }

    async fn unload_model(
        &self,
        request: Request<pb::UnloadModelRequest>,
    ) -> Result<Response<pb::UnloadModelResponse>, Status> {
        let request = request.into_inner();
        let freed = self
            .manager
            .models()
            .unload(&request.model_id, &request.revision)
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::UnloadModelResponse {
            freed_memory_bytes: freed,
        }))
    }

    async fn delete_model(
        &self,
        _request: Request<pb::DeleteModelRequest>,
    ) -> Result<Response<pb::DeleteModelResponse>, Status> {
        Err(ApiError::unimplemented(CATALOG).into())
    }
}
