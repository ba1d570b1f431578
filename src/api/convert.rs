//! Conversions between domain types and the generated lmx.v1 messages.

use std::time::Duration;

use crate::{
    pb,
    snapshot::{Mode, Problem, ProblemKind, Severity, WeightFormat},
};

pub fn problem_kind(kind: ProblemKind) -> pb::SnapshotProblemKind {
    use pb::SnapshotProblemKind as K;
    match kind {
        ProblemKind::MissingConfig => K::MissingConfig,
        ProblemKind::NoWeights => K::NoWeights,
        ProblemKind::IndexUnreadable => K::IndexUnreadable,
        ProblemKind::MissingIndexedFile => K::MissingIndexedFile,
        ProblemKind::MissingShard => K::MissingShard,
        ProblemKind::ShardTotalMismatch => K::ShardTotalMismatch,
        ProblemKind::TruncatedFile => K::TruncatedFile,
        ProblemKind::InvalidHeader => K::InvalidHeader,
        ProblemKind::ChecksumMismatch => K::ChecksumMismatch,
        ProblemKind::IncompleteFilePresent => K::IncompleteFilePresent,
        ProblemKind::BrokenLink => K::BrokenLink,
        ProblemKind::UnsafePath => K::UnsafePath,
        ProblemKind::MissingTokenizer => K::MissingTokenizer,
        ProblemKind::Unreadable => K::Unreadable,
    }
}

pub fn problem(p: &Problem) -> pb::SnapshotProblem {
    pb::SnapshotProblem {
        kind: problem_kind(p.kind) as i32,
        file: p.file.clone(),
        detail: p.detail.clone(),
        severity: match p.severity {
            Severity::Error => pb::ProblemSeverity::Error,
            Severity::Warning => pb::ProblemSeverity::Warning,
        } as i32,
    }
}

pub fn weight_format(format: Option<WeightFormat>) -> pb::WeightFormat {
    match format {
        None => pb::WeightFormat::Unspecified,
        Some(WeightFormat::Safetensors) => pb::WeightFormat::Safetensors,
        Some(WeightFormat::PytorchBin) => pb::WeightFormat::PytorchBin,
        Some(WeightFormat::Gguf) => pb::WeightFormat::Gguf,
    }
}

pub fn verify_mode(mode: Mode) -> pb::VerifyMode {
    match mode {
        Mode::Quick => pb::VerifyMode::Quick,
        Mode::Full => pb::VerifyMode::Full,
    }
}

pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

pub fn timestamp(t: std::time::SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

pub fn dtype(d: candle_core::DType) -> pb::Dtype {
    match d {
        candle_core::DType::F32 => pb::Dtype::F32,
        candle_core::DType::F16 => pb::Dtype::F16,
        candle_core::DType::BF16 => pb::Dtype::Bf16,
        _ => pb::Dtype::Unspecified,
    }
}

/// A model the registry knows (loading or loaded).
pub fn model_status(status: &crate::manager::models::ModelStatus) -> pb::ModelInfo {
    use crate::manager::models::ModelStatus;
    match status {
        ModelStatus::Loading { key, .. } => pb::ModelInfo {
            model_id: key.model_id.clone(),
            revision: key.revision.clone(),
            state: pb::ModelState::Loading as i32,
            ..Default::default()
        },
        ModelStatus::Failed { key, error } => pb::ModelInfo {
            model_id: key.model_id.clone(),
            revision: key.revision.clone(),
            state: pb::ModelState::Failed as i32,
            state_message: error.clone(),
            ..Default::default()
        },
        ModelStatus::Loaded(model) => {
            let d = model.engine.description();
            let stats = model.engine.stats();
            // The GGUF choice only applies when the engine loaded GGUF weights.
            let gguf = model
                .snapshot
                .gguf
                .as_ref()
                .filter(|_| d.format == crate::snapshot::WeightFormat::Gguf);
            pb::ModelInfo {
                model_id: model.key.model_id.clone(),
                revision: model.key.revision.clone(),
                commit_sha: model.snapshot.commit.clone(),
                state: pb::ModelState::Loaded as i32,
                format: weight_format(Some(d.format)) as i32,
                architecture: d.architecture.clone(),
                size_on_disk_bytes: 0,
                path: model.snapshot.path.display().to_string(),
                refs: Vec::new(),
                memory_bytes: d.memory_bytes,
                loaded_at: Some(timestamp(model.loaded_at)),
                last_used_at: Some(timestamp(model.last_used_at())),
                request_count: model.request_count(),
                dtype: dtype(d.dtype) as i32,
                device: d.device.clone(),
                keep_alive: model.keep_alive.map(duration),
                context_length: d.context_length as u32,
                state_message: String::new(),
                requests_in_flight: stats.in_flight as u32,
                tokens_generated: stats.tokens_generated,
                kv_cache_bytes: d.kv_cache_bytes,
                kv_cache_used_bytes: stats.kv_cache_used_bytes,
                aliases: Vec::new(),
                gguf_file: gguf.map(|f| f.path.clone()).unwrap_or_default(),
                quantization: gguf
                    .and_then(|f| f.quantization.clone())
                    .unwrap_or_default(),
                gguf_file_bytes: gguf.map_or(0, |f| f.size),
            }
        }
    }
}

use crate::manager::{
    catalog::SnapshotInfo,
    download::{self as dl, Progress},
};

fn download_state(s: dl::DownloadState) -> pb::DownloadState {
    match s {
        dl::DownloadState::Queued => pb::DownloadState::Queued,
        dl::DownloadState::Downloading => pb::DownloadState::Downloading,
        dl::DownloadState::Verifying => pb::DownloadState::Verifying,
        dl::DownloadState::Completed => pb::DownloadState::Completed,
        dl::DownloadState::Failed => pb::DownloadState::Failed,
        dl::DownloadState::Cancelled => pb::DownloadState::Cancelled,
    }
}

pub fn download_error_code(c: dl::DownloadErrorCode) -> pb::DownloadErrorCode {
    use dl::DownloadErrorCode as C;
    match c {
        C::IncompleteDownload => pb::DownloadErrorCode::IncompleteDownload,
        C::DownloadCancelled => pb::DownloadErrorCode::DownloadCancelled,
        C::RepoNotFound => pb::DownloadErrorCode::RepoNotFound,
        C::RevisionNotFound => pb::DownloadErrorCode::RevisionNotFound,
        C::FileNotFound => pb::DownloadErrorCode::FileNotFound,
        C::AccessDenied => pb::DownloadErrorCode::AccessDenied,
        C::HubUnavailable => pb::DownloadErrorCode::HubUnavailable,
        C::ChecksumMismatch => pb::DownloadErrorCode::ChecksumMismatch,
        C::InsufficientDiskSpace => pb::DownloadErrorCode::InsufficientDiskSpace,
        C::StorageError => pb::DownloadErrorCode::StorageError,
        C::Internal => pb::DownloadErrorCode::Internal,
    }
}

fn auto_load_state(s: dl::AutoLoadState) -> pb::AutoLoadState {
    match s {
        dl::AutoLoadState::NotRequested => pb::AutoLoadState::NotRequested,
        dl::AutoLoadState::Pending => pb::AutoLoadState::Pending,
        dl::AutoLoadState::Loading => pb::AutoLoadState::Loading,
        dl::AutoLoadState::Loaded => pb::AutoLoadState::Loaded,
        dl::AutoLoadState::SkippedSnapshotIncomplete => {
            pb::AutoLoadState::SkippedSnapshotIncomplete
        }
        dl::AutoLoadState::Failed => pb::AutoLoadState::Failed,
    }
}

fn file_state(s: dl::FileState) -> pb::FileState {
    match s {
        dl::FileState::Pending => pb::FileState::Pending,
        dl::FileState::Downloading => pb::FileState::Downloading,
        dl::FileState::Verifying => pb::FileState::Verifying,
        dl::FileState::Completed => pb::FileState::Completed,
        dl::FileState::Cached => pb::FileState::Cached,
        dl::FileState::Failed => pb::FileState::Failed,
    }
}

pub fn progress(p: &Progress) -> pb::DownloadProgress {
    pb::DownloadProgress {
        download_id: p.download_id.clone(),
        model_id: p.model_id.clone(),
        revision: p.revision.clone(),
        commit_sha: p.commit.clone(),
        state: download_state(p.state) as i32,
        error_code: p
            .failure
            .as_ref()
            .map_or(pb::DownloadErrorCode::None, |f| download_error_code(f.code))
            as i32,
        error_message: p
            .failure
            .as_ref()
            .map(|f| f.message.clone())
            .unwrap_or_default(),
        downloaded_bytes: p.downloaded_bytes,
        total_bytes: p.total_bytes,
        files_completed: p.files_completed,
        files_total: p.files_total,
        current_file: p.current_file.clone(),
        bytes_per_second: p.bytes_per_second,
        eta_seconds: p.eta_seconds,
        auto_load_state: auto_load_state(p.auto_load) as i32,
        auto_load_message: p.auto_load_message.clone(),
        files: p
            .files
            .iter()
            .map(|f| pb::FileProgress {
                path: f.path.clone(),
                downloaded_bytes: f.downloaded_bytes,
                total_bytes: f.total_bytes,
                state: file_state(f.state) as i32,
                resumed_bytes: f.resumed_bytes,
            })
            .collect(),
        problems: p.problems.iter().map(problem).collect(),
        resumed_bytes: p.resumed_bytes,
        started_at: Some(timestamp(p.started_at)),
        updated_at: Some(timestamp(p.updated_at)),
        finished_at: p.finished_at.map(timestamp),
        allow_patterns: p.allow_patterns.clone(),
        ignore_patterns: p.ignore_patterns.clone(),
        repair: p.repair,
        repaired_files: p.repaired_files.clone(),
        summary: p.summary.clone(),
    }
}

/// A snapshot on disk that is not loaded.
pub fn snapshot_model(s: &SnapshotInfo, downloading: bool) -> pb::ModelInfo {
    let (state, format, architecture, message) = match (&s.report, downloading) {
        (_, true) => (
            pb::ModelState::Downloading,
            pb::WeightFormat::Unspecified,
            String::new(),
            String::new(),
        ),
        (Ok(r), false) => (
            if r.complete {
                pb::ModelState::Available
            } else {
                pb::ModelState::Incomplete
            },
            weight_format(r.format),
            r.architecture.clone().unwrap_or_default(),
            if r.complete {
                String::new()
            } else {
                r.summary.clone()
            },
        ),
        (Err(e), false) => (
            pb::ModelState::Incomplete,
            pb::WeightFormat::Unspecified,
            String::new(),
            e.clone(),
        ),
    };
    pb::ModelInfo {
        model_id: s.repo_id.clone(),
        revision: s.refs.first().cloned().unwrap_or_else(|| s.commit.clone()),
        commit_sha: s.commit.clone(),
        state: state as i32,
        format: format as i32,
        architecture,
        size_on_disk_bytes: s.size_on_disk,
        path: s.path.display().to_string(),
        refs: s.refs.clone(),
        state_message: message,
        ..Default::default()
    }
}

/// A snapshot on disk as catalog entries: one per GGUF file when it has several (each
/// model_id selecting its file: `org/name:QUANT` when the quantization tells the files apart,
/// else `org/name/file.gguf`), else one.
pub fn snapshot_entries(s: &SnapshotInfo, downloading: bool) -> Vec<pb::ModelInfo> {
    let base = snapshot_model(s, downloading);
    let gguf_weights = s
        .report
        .as_ref()
        .is_ok_and(|r| r.format == Some(crate::snapshot::WeightFormat::Gguf));
    if !gguf_weights || s.gguf_files.is_empty() {
        return vec![base];
    }
    let with = |f: &crate::snapshot::GgufFile, model_id: String| pb::ModelInfo {
        model_id,
        gguf_file: f.path.clone(),
        quantization: f.quantization.clone().unwrap_or_default(),
        gguf_file_bytes: f.size,
        ..base.clone()
    };
    if let [only] = s.gguf_files.as_slice() {
        return vec![with(only, s.repo_id.clone())];
    }
    s.gguf_files
        .iter()
        .map(|f| {
            let unique = f.quantization.as_ref().filter(|q| {
                s.gguf_files
                    .iter()
                    .filter(|g| g.quantization.as_ref() == Some(*q))
                    .count()
                    == 1
            });
            let model_id = match unique {
                Some(q) => format!("{}:{q}", s.repo_id),
                None => format!("{}/{}", s.repo_id, f.path),
            };
            with(f, model_id)
        })
        .collect()
}
