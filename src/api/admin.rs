//! `lmx.v1.ModelAdmin`: downloads, snapshot verification, load/unload, listing and deletion.

use std::{sync::Arc, time::Instant};

use tonic::{Request, Response, Status};

use super::{convert, ResponseStream};
use crate::{
    error::ApiError,
    manager::{
        download::{DownloadRequest, ProgressRx},
        LoadSpec, Manager,
    },
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

    /// The reference a request names, its alias resolved.
    fn resolve(&self, model_id: &str, revision: &str) -> Result<(String, String), ApiError> {
        self.manager
            .aliases()
            .resolve(model_id, revision)
            .map_err(ApiError::from)
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
        Some(
            crate::engine::validate_device(&options.device).map_err(|e| {
                ApiError::invalid_argument("options.device", format!("`options.device` {e}"))
            })?,
        )
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

fn unknown_download(id: &str) -> Status {
    ApiError::new(
        tonic::Code::NotFound,
        crate::error::reason::DOWNLOAD_NOT_FOUND,
        format!("no running or recent download has id {id:?}"),
    )
    .into()
}

/// Streams a download's progress until it is final: every publication while the client keeps
/// up, the latest state when it falls behind. A failed or cancelled download ends the stream with
/// its terminal message and then a status carrying the error code in ErrorInfo.
fn progress_stream<T: Send + 'static>(
    rx: ProgressRx,
    wrap: fn(pb::DownloadProgress) -> T,
) -> ResponseStream<T> {
    use futures::StreamExt;
    use tokio::sync::broadcast::error::RecvError;
    let first = rx.latest.borrow().clone();
    let state = (rx, Some(first), 0u64, false);
    let stream = futures::stream::unfold(
        state,
        move |(mut rx, mut pending, mut last_seq, done)| async move {
            if done {
                return None;
            }
            let progress = loop {
                if let Some(p) = pending.take() {
                    break p;
                }
                match rx.events.recv().await {
                    Ok(p) if p.seq <= last_seq => continue,
                    Ok(p) => break p,
                    Err(RecvError::Lagged(_)) => {
                        pending = Some(rx.latest.borrow().clone()).filter(|p| p.seq > last_seq)
                    }
                    Err(RecvError::Closed) => {
                        let latest = rx.latest.borrow().clone();
                        if latest.seq <= last_seq {
                            return None;
                        }
                        break latest;
                    }
                }
            };
            last_seq = progress.seq;
            let last = progress.is_final();
            let message = wrap(convert::progress(&progress));
            let items: Vec<Result<T, Status>> = match (&progress.failure, last) {
                (Some(failure), true) => vec![
                    Ok(message),
                    Err(ApiError::from(failure)
                        .with_metadata("download_id", progress.download_id.clone())
                        .into()),
                ],
                _ => vec![Ok(message)],
            };
            Some((futures::stream::iter(items), (rx, None, last_seq, last)))
        },
    )
    .flatten();
    Box::pin(stream)
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

#[tonic::async_trait]
impl pb::model_admin_server::ModelAdmin for AdminApi {
    type DownloadModelStream = ResponseStream<pb::DownloadModelResponse>;
    type WatchDownloadStream = ResponseStream<pb::WatchDownloadResponse>;
    type RepairModelStream = ResponseStream<pb::RepairModelResponse>;

    async fn download_model(
        &self,
        request: Request<pb::DownloadModelRequest>,
    ) -> Result<Response<Self::DownloadModelStream>, Status> {
        let mut r = request.into_inner();
        (r.model_id, r.revision) = self.resolve(&r.model_id, &r.revision)?;
        let reference =
            crate::manager::reference::Reference::parse(&r.model_id).map_err(ApiError::from)?;
        let auto_load = if r.auto_load {
            Some(load_spec(r.load_options)?)
        } else {
            None
        };
        let rx = self
            .manager
            .downloads()
            .start(DownloadRequest {
                repo_id: reference.repo,
                revision: r.revision,
                allow_patterns: r.allow_patterns,
                ignore_patterns: r.ignore_patterns,
                auto_load,
                repair: false,
                gguf: reference.selector,
            })
            .map_err(ApiError::from)?;
        Ok(Response::new(progress_stream(rx, |progress| {
            pb::DownloadModelResponse {
                progress: Some(progress),
            }
        })))
    }

    async fn watch_download(
        &self,
        request: Request<pb::WatchDownloadRequest>,
    ) -> Result<Response<Self::WatchDownloadStream>, Status> {
        let id = request.into_inner().download_id;
        let rx = self
            .manager
            .downloads()
            .watch(&id)
            .map_err(ApiError::from)?
            .ok_or_else(|| unknown_download(&id))?;
        Ok(Response::new(progress_stream(rx, |progress| {
            pb::WatchDownloadResponse {
                progress: Some(progress),
            }
        })))
    }

    async fn get_download(
        &self,
        request: Request<pb::GetDownloadRequest>,
    ) -> Result<Response<pb::GetDownloadResponse>, Status> {
        let id = request.into_inner().download_id;
        let progress = self
            .manager
            .downloads()
            .get(&id)
            .ok_or_else(|| unknown_download(&id))?;
        Ok(Response::new(pb::GetDownloadResponse {
            progress: Some(convert::progress(&progress)),
        }))
    }

    async fn list_downloads(
        &self,
        _request: Request<pb::ListDownloadsRequest>,
    ) -> Result<Response<pb::ListDownloadsResponse>, Status> {
        let downloads = self
            .manager
            .downloads()
            .list()
            .iter()
            .map(convert::progress)
            .collect();
        Ok(Response::new(pb::ListDownloadsResponse { downloads }))
    }

    async fn cancel_download(
        &self,
        request: Request<pb::CancelDownloadRequest>,
    ) -> Result<Response<pb::CancelDownloadResponse>, Status> {
        let id = request.into_inner().download_id;
        let progress = self
            .manager
            .downloads()
            .cancel(&id)
            .await
            .ok_or_else(|| unknown_download(&id))?;
        Ok(Response::new(pb::CancelDownloadResponse {
            progress: Some(convert::progress(&progress)),
        }))
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let mut models: Vec<pb::ModelInfo> = self
            .manager
            .models()
            .list()
            .iter()
            .map(convert::model_status)
            .collect();
        let loaded_only = request.into_inner().loaded_only;
        if loaded_only {
            // A failed load is not a loaded model.
            models.retain(|m| m.state != pb::ModelState::Failed as i32);
        } else {
            let snapshots = self.manager.snapshots().await.map_err(ApiError::from)?;
            for snapshot in &snapshots {
                let path = snapshot.path.display().to_string();
                let loaded_here: Vec<usize> = (0..models.len())
                    .filter(|&i| models[i].path == path)
                    .collect();
                for &i in &loaded_here {
                    models[i].size_on_disk_bytes = snapshot.size_on_disk;
                    models[i].refs = snapshot.refs.clone();
                }
                // A file of a GGUF snapshot that is loaded is listed once, loaded; its siblings
                // are listed as on disk.
                let entries = convert::snapshot_entries(snapshot, false);
                let multi_gguf = entries.len() > 1;
                if !loaded_here.is_empty() && !multi_gguf {
                    continue;
                }
                if multi_gguf {
                    let downloading = self.manager.downloads().is_downloading(&snapshot.repo_id)
                        && snapshot.report.as_ref().is_ok_and(|r| !r.complete);
                    for entry in convert::snapshot_entries(snapshot, downloading) {
                        let loaded = loaded_here
                            .iter()
                            .any(|&i| models[i].gguf_file == entry.gguf_file);
                        if !loaded {
                            models.push(entry);
                        }
                    }
                    continue;
                }
                // A snapshot whose last load failed is listed once, FAILED, with the error.
                let failed = models.iter_mut().find(|m| {
                    m.state == pb::ModelState::Failed as i32
                        && m.path.is_empty()
                        && m.model_id == snapshot.repo_id
                        && (snapshot.refs.contains(&m.revision) || m.revision == snapshot.commit)
                });
                if let Some(failed) = failed {
                    let on_disk = convert::snapshot_model(snapshot, false);
                    *failed = pb::ModelInfo {
                        revision: std::mem::take(&mut failed.revision),
                        state: failed.state,
                        state_message: std::mem::take(&mut failed.state_message),
                        ..on_disk
                    };
                    continue;
                }
                let downloading = self.manager.downloads().is_downloading(&snapshot.repo_id)
                    && snapshot.report.as_ref().is_ok_and(|r| !r.complete);
                models.extend(convert::snapshot_entries(snapshot, downloading));
            }
        }
        let aliases = self.manager.aliases();
        for m in &mut models {
            let mut revisions: Vec<&str> = vec![&m.revision, &m.commit_sha];
            revisions.extend(m.refs.iter().map(String::as_str));
            m.aliases = aliases.names_for(&m.model_id, &revisions);
        }
        models.sort_by(|a, b| (&a.model_id, &a.revision).cmp(&(&b.model_id, &b.revision)));
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    async fn verify_model(
        &self,
        request: Request<pb::VerifyModelRequest>,
    ) -> Result<Response<pb::VerifyModelResponse>, Status> {
        let mut request = request.into_inner();
        (request.model_id, request.revision) =
            self.resolve(&request.model_id, &request.revision)?;
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
        let mut request = request.into_inner();
        (request.model_id, request.revision) =
            self.resolve(&request.model_id, &request.revision)?;
        let aliases = self.manager.aliases();
        if !request.alias.is_empty() {
            crate::manager::aliases::validate_name(&request.alias).map_err(ApiError::from)?;
        }
        let spec = load_spec(request.options)?;
        let loaded = self
            .manager
            .models()
            .load(&request.model_id, &request.revision, spec)
            .await
            .map_err(|e| ApiError::from(&*e))?;
        if !request.alias.is_empty() {
            aliases
                .set(&request.alias, &request.model_id, &request.revision)
                .map_err(ApiError::from)?;
        }
        let load_time = if loaded.already_loaded {
            std::time::Duration::ZERO
        } else {
            loaded.model.load_time
        };
        let status = crate::manager::models::ModelStatus::Loaded(loaded.model);
        let mut model = convert::model_status(&status);
        model.aliases = aliases.names_for(&model.model_id, &[&model.revision]);
        Ok(Response::new(pb::LoadModelResponse {
            gguf_file: model.gguf_file.clone(),
            model: Some(model),
            already_loaded: loaded.already_loaded,
            load_time: Some(convert::duration(load_time)),
        }))
    }

    async fn unload_model(
        &self,
        request: Request<pb::UnloadModelRequest>,
    ) -> Result<Response<pb::UnloadModelResponse>, Status> {
        let request = request.into_inner();
        let (model_id, revision) = self.resolve(&request.model_id, &request.revision)?;
        let freed = self
            .manager
            .models()
            .unload(&model_id, &revision)
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::UnloadModelResponse {
            freed_memory_bytes: freed,
        }))
    }

    async fn delete_model(
        &self,
        request: Request<pb::DeleteModelRequest>,
    ) -> Result<Response<pb::DeleteModelResponse>, Status> {
        let r = request.into_inner();
        let (model_id, revision) = self.resolve(&r.model_id, &r.revision)?;
        let deleted = self
            .manager
            .delete_model(&model_id, &revision)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::DeleteModelResponse {
            deleted_commits: deleted.commits,
            freed_bytes: deleted.freed_bytes,
        }))
    }

    async fn repair_model(
        &self,
        request: Request<pb::RepairModelRequest>,
    ) -> Result<Response<Self::RepairModelStream>, Status> {
        let r = request.into_inner();
        if r.model_id.starts_with('/') {
            return Err(ApiError::invalid_argument(
                "model_id",
                format!(
                    "`model_id` must name a repository in the cache (repair fetches from the hub); \
                     a folder path cannot be repaired. Given: {:?}",
                    r.model_id
                ),
            )
            .into());
        }
        let (model_id, revision) = self.resolve(&r.model_id, &r.revision)?;
        // A repair works on the whole snapshot: a GGUF selector names it too.
        let reference =
            crate::manager::reference::Reference::parse(&model_id).map_err(ApiError::from)?;
        let rx = self
            .manager
            .downloads()
            .start(DownloadRequest {
                repo_id: reference.repo,
                revision,
                repair: true,
                ..Default::default()
            })
            .map_err(ApiError::from)?;
        Ok(Response::new(progress_stream(rx, |progress| {
            pb::RepairModelResponse {
                progress: Some(progress),
            }
        })))
    }
}
