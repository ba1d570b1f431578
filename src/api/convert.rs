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
