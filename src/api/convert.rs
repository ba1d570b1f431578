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
        ModelStatus::Loaded(model) => {
            let d = model.engine.description();
            let stats = model.engine.stats();
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
            }
        }
    }
}
