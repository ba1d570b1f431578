//! The one place where a failure becomes a `tonic::Status`.
//!
//! Domain modules return their own `thiserror` enums with no tonic in them; this module maps each
//! kind to a gRPC code and attaches a `google.rpc.ErrorInfo` (domain [`DOMAIN`]) whose `reason` is a
//! stable UPPER_SNAKE name clients switch on. Invalid input also carries a `google.rpc.BadRequest`
//! naming the field; refused preconditions carry a `google.rpc.PreconditionFailure`.
//!
//! Code map: invalid input → INVALID_ARGUMENT; unknown model → NOT_FOUND; already running →
//! ALREADY_EXISTS; not loaded / snapshot incomplete → FAILED_PRECONDITION; queue full / memory
//! budget → RESOURCE_EXHAUSTED; draining / hub unreachable → UNAVAILABLE; checksum mismatch →
//! DATA_LOSS; cancelled → CANCELLED; anything else → INTERNAL with the cause logged and a sanitized
//! message sent.

use std::collections::HashMap;

use tonic::{Code, Status};

use crate::{
    engine::EngineError,
    manager::{
        download::{DownloadErrorCode, DownloadFailure},
        CacheError, ManagerError,
    },
    snapshot::{Report, SnapshotError},
};
use tonic_types::{ErrorDetails, StatusExt};

/// The `domain` of every ErrorInfo lmx sends.
pub const DOMAIN: &str = "lmx.v1";

/// Stable `ErrorInfo.reason` values that are not download error codes.
pub mod reason {
    pub const INVALID_ARGUMENT: &str = "INVALID_ARGUMENT";
    pub const DRAINING: &str = "DRAINING";
    pub const INTERNAL: &str = "INTERNAL";
    pub const MODEL_NOT_FOUND: &str = "MODEL_NOT_FOUND";
    /// The reference's GGUF selector (`:QUANT` or `/file.gguf`) names no file of the snapshot.
    pub const GGUF_FILE_NOT_FOUND: &str = "GGUF_FILE_NOT_FOUND";
    pub const REVISION_NOT_FOUND: &str = "REVISION_NOT_FOUND";
    pub const SNAPSHOT_NOT_FOUND: &str = "SNAPSHOT_NOT_FOUND";
    pub const SNAPSHOT_UNREADABLE: &str = "SNAPSHOT_UNREADABLE";
    pub const SNAPSHOT_INCOMPLETE: &str = "SNAPSHOT_INCOMPLETE";
    pub const UNSUPPORTED_ARCHITECTURE: &str = "UNSUPPORTED_ARCHITECTURE";
    pub const QUEUE_FULL: &str = "QUEUE_FULL";
    pub const NO_CHAT_TEMPLATE: &str = "NO_CHAT_TEMPLATE";
    pub const TEMPLATE_LIMIT: &str = "TEMPLATE_LIMIT";
    pub const WRONG_MODEL_KIND: &str = "WRONG_MODEL_KIND";
    pub const LOAD_FAILED: &str = "LOAD_FAILED";
    pub const DEVICE_UNAVAILABLE: &str = "DEVICE_UNAVAILABLE";
    pub const ENGINE_STOPPED: &str = "ENGINE_STOPPED";
    pub const MEMORY_BUDGET_EXCEEDED: &str = "MEMORY_BUDGET_EXCEEDED";
    pub const KV_CACHE_BUDGET_EXCEEDED: &str = "KV_CACHE_BUDGET_EXCEEDED";
    pub const MODEL_LOADING: &str = "MODEL_LOADING";
    pub const MODEL_NOT_LOADED: &str = "MODEL_NOT_LOADED";
    pub const DOWNLOAD_NOT_FOUND: &str = "DOWNLOAD_NOT_FOUND";
}

/// One violated precondition: (type, subject, description) as in google.rpc.PreconditionFailure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub kind: String,
    pub subject: String,
    pub description: String,
}

/// A failure as the API reports it. Build one from a domain error (`From` impls below) or with
/// the constructors, then convert it into a [`Status`].
#[derive(Debug, Clone)]
pub struct ApiError(Box<Inner>);

#[derive(Debug, Clone)]
struct Inner {
    code: Code,
    reason: &'static str,
    message: String,
    metadata: HashMap<String, String>,
    field: Option<String>,
    preconditions: Vec<Violation>,
}

impl ApiError {
    /// An error with the given code, ErrorInfo reason and message.
    pub fn new(code: Code, reason: &'static str, message: impl Into<String>) -> Self {
        Self(Box::new(Inner {
            code,
            reason,
            message: message.into(),
            metadata: HashMap::new(),
            field: None,
            preconditions: Vec::new(),
        }))
    }

    /// INVALID_ARGUMENT for `field`, with a BadRequest field violation. The message should name
    /// the field, the limit and the given value.
    pub fn invalid_argument(field: &str, message: impl Into<String>) -> Self {
        let mut err = Self::new(Code::InvalidArgument, reason::INVALID_ARGUMENT, message);
        err.0.field = Some(field.to_owned());
        err.0.metadata.insert("field".into(), field.to_owned());
        err
    }

    /// INTERNAL: logs the full cause chain and sends a sanitized message.
    pub fn internal(context: &str, err: &(dyn std::error::Error + 'static)) -> Self {
        let chain = crate::util::error_chain(err);
        tracing::error!(error = %chain, "{context}");
        Self::new(
            Code::Internal,
            reason::INTERNAL,
            format!("{context}; see the server log for details"),
        )
    }

    /// Adds an ErrorInfo metadata entry.
    pub fn with_metadata(mut self, key: &str, value: impl Into<String>) -> Self {
        self.0.metadata.insert(key.to_owned(), value.into());
        self
    }

    /// Adds a PreconditionFailure violation.
    pub fn with_violation(mut self, violation: Violation) -> Self {
        self.0.preconditions.push(violation);
        self
    }

    /// The gRPC code.
    pub fn code(&self) -> Code {
        self.0.code
    }

    /// The ErrorInfo reason.
    pub fn reason(&self) -> &'static str {
        self.0.reason
    }

    /// The message sent to the client.
    pub fn message(&self) -> &str {
        &self.0.message
    }
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Self {
        let err = *err.0;
        let mut details = ErrorDetails::with_error_info(err.reason, DOMAIN, err.metadata);
        if let Some(field) = &err.field {
            details.add_bad_request_violation(field.clone(), err.message.clone());
        }
        for v in err.preconditions {
            details.add_precondition_failure_violation(v.kind, v.subject, v.description);
        }
        Status::with_error_details(err.code, err.message, details)
    }
}

impl From<&CacheError> for ApiError {
    fn from(err: &CacheError) -> Self {
        let message = err.to_string();
        match err {
            CacheError::InvalidModelId { .. } => Self::invalid_argument("model_id", message),
            CacheError::OutsideModelRoots { .. } => Self::invalid_argument("model_id", message),
            CacheError::InvalidRevision { .. } => Self::invalid_argument("revision", message),
            CacheError::ModelNotFound { model_id, .. } => {
                Self::new(Code::NotFound, reason::MODEL_NOT_FOUND, message)
                    .with_metadata("model_id", model_id)
            }
            CacheError::LocalNotFound(_) => {
                Self::new(Code::NotFound, reason::MODEL_NOT_FOUND, message)
            }
            CacheError::RevisionNotFound { revision, .. } => {
                Self::new(Code::NotFound, reason::REVISION_NOT_FOUND, message)
                    .with_metadata("revision", revision)
            }
            CacheError::SnapshotMissing { commit, .. } => {
                Self::new(Code::NotFound, reason::SNAPSHOT_NOT_FOUND, message)
                    .with_metadata("commit", commit)
            }
            CacheError::GgufNotFound { selector, .. } => {
                Self::new(Code::NotFound, reason::GGUF_FILE_NOT_FOUND, message)
                    .with_metadata("selector", selector)
            }
            CacheError::Io { .. } => Self::internal("reading the model cache failed", err),
        }
    }
}

impl From<&SnapshotError> for ApiError {
    fn from(err: &SnapshotError) -> Self {
        let message = err.to_string();
        match err {
            SnapshotError::NotFound(_) => {
                Self::new(Code::NotFound, reason::SNAPSHOT_NOT_FOUND, message)
            }
            SnapshotError::NotADirectory(_) => Self::invalid_argument("model_id", message),
            SnapshotError::Unreadable { .. } => Self::new(
                Code::FailedPrecondition,
                reason::SNAPSHOT_UNREADABLE,
                message,
            ),
            SnapshotError::Incomplete(report) => snapshot_incomplete(report),
        }
    }
}

/// FAILED_PRECONDITION / SNAPSHOT_INCOMPLETE with one PreconditionFailure violation per error
/// (type: the problem kind, subject: the file, description: the detail).
pub fn snapshot_incomplete(report: &Report) -> ApiError {
    let errors: Vec<_> = report.errors().collect();
    let mut err = ApiError::new(
        Code::FailedPrecondition,
        reason::SNAPSHOT_INCOMPLETE,
        format!(
            "snapshot {} is incomplete: {}",
            report.path.display(),
            report.summary
        ),
    )
    .with_metadata("path", report.path.display().to_string())
    .with_metadata("errors", errors.len().to_string());
    for problem in errors {
        err = err.with_violation(Violation {
            kind: problem.kind.name().to_owned(),
            subject: problem.file.clone(),
            description: problem.detail.clone(),
        });
    }
    err
}

impl From<&EngineError> for ApiError {
    fn from(err: &EngineError) -> Self {
        let message = err.to_string();
        match err {
            EngineError::Validation { field, .. } => Self::invalid_argument(field, message),
            EngineError::UnsupportedArchitecture { model_type, .. } => Self::new(
                Code::FailedPrecondition,
                reason::UNSUPPORTED_ARCHITECTURE,
                message,
            )
            .with_metadata("model_type", model_type),
            EngineError::QueueFull { limit } => {
                Self::new(Code::ResourceExhausted, reason::QUEUE_FULL, message)
                    .with_metadata("limit", limit.to_string())
            }
            EngineError::KvCacheBudget { needed, budget, .. } => Self::new(
                Code::ResourceExhausted,
                reason::KV_CACHE_BUDGET_EXCEEDED,
                message,
            )
            .with_metadata("needed_bytes", needed.to_string())
            .with_metadata("budget_bytes", budget.to_string()),
            EngineError::NoChatTemplate => {
                Self::new(Code::FailedPrecondition, reason::NO_CHAT_TEMPLATE, message)
            }
            EngineError::TemplateLimit(_) => {
                Self::new(Code::FailedPrecondition, reason::TEMPLATE_LIMIT, message)
            }
            EngineError::NotAGenerativeModel | EngineError::NotAnEmbeddingModel => {
                Self::new(Code::FailedPrecondition, reason::WRONG_MODEL_KIND, message)
            }
            EngineError::Load(_) => {
                Self::new(Code::FailedPrecondition, reason::LOAD_FAILED, message)
            }
            EngineError::Device(_) => Self::new(
                Code::FailedPrecondition,
                reason::DEVICE_UNAVAILABLE,
                message,
            ),
            EngineError::Stopped => Self::new(Code::Unavailable, reason::ENGINE_STOPPED, message),
            EngineError::Template(_) | EngineError::Tokenizer(_) | EngineError::Inference(_) => {
                Self::internal("inference failed", err)
            }
        }
    }
}

impl From<&ManagerError> for ApiError {
    fn from(err: &ManagerError) -> Self {
        let message = err.to_string();
        match err {
            ManagerError::Cache(e) => e.into(),
            ManagerError::Snapshot(e) => e.into(),
            ManagerError::Engine(e) => e.into(),
            ManagerError::MemoryBudget { needed, budget, .. } => Self::new(
                Code::ResourceExhausted,
                reason::MEMORY_BUDGET_EXCEEDED,
                message,
            )
            .with_metadata("needed_bytes", needed.to_string())
            .with_metadata("budget_bytes", budget.to_string()),
            ManagerError::Loading(_) => {
                Self::new(Code::FailedPrecondition, reason::MODEL_LOADING, message)
            }
            ManagerError::NotLoaded(_) => {
                Self::new(Code::FailedPrecondition, reason::MODEL_NOT_LOADED, message)
            }
            ManagerError::UnknownModel(_) => {
                Self::new(Code::NotFound, reason::MODEL_NOT_FOUND, message)
            }
            ManagerError::InvalidArgument { field, .. } => Self::invalid_argument(field, message),
            ManagerError::InUse { reason, .. } => {
                Self::new(Code::FailedPrecondition, reason, message)
            }
            ManagerError::Exhausted { reason, .. } => {
                Self::new(Code::ResourceExhausted, reason, message)
            }
            ManagerError::Task(e) => Self::internal("a background task failed", e),
        }
    }
}

impl From<&DownloadFailure> for ApiError {
    fn from(f: &DownloadFailure) -> Self {
        use DownloadErrorCode as C;
        let code = match f.code {
            C::RepoNotFound | C::RevisionNotFound | C::FileNotFound => Code::NotFound,
            C::AccessDenied => Code::PermissionDenied,
            C::HubUnavailable => Code::Unavailable,
            C::ChecksumMismatch | C::IncompleteDownload => Code::DataLoss,
            C::InsufficientDiskSpace => Code::ResourceExhausted,
            C::DownloadCancelled => Code::Cancelled,
            C::StorageError | C::Internal => Code::Internal,
        };
        let mut err = Self::new(code, f.code.name(), f.message.clone());
        for p in f
            .problems
            .iter()
            .filter(|p| p.severity == crate::snapshot::Severity::Error)
        {
            err = err.with_violation(Violation {
                kind: p.kind.name().to_owned(),
                subject: p.file.clone(),
                description: p.detail.clone(),
            });
        }
        err
    }
}

/// By-value conversions of domain errors, through their by-reference ones.
macro_rules! by_value {
    ($($ty:ty),*) => {$(
        impl From<$ty> for ApiError {
            fn from(err: $ty) -> Self {
                (&err).into()
            }
        }
    )*};
}
by_value!(CacheError, SnapshotError, EngineError, ManagerError);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_carries_error_info_with_stable_reason_and_domain() {
        let status: Status =
            ApiError::new(Code::NotFound, reason::MODEL_NOT_FOUND, "no such model")
                .with_metadata("model_id", "org/m")
                .into();
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), "no such model");
        let info = status.get_details_error_info().expect("ErrorInfo attached");
        assert_eq!(info.reason, "MODEL_NOT_FOUND");
        assert_eq!(info.domain, DOMAIN);
        assert_eq!(info.metadata["model_id"], "org/m");
    }

    #[test]
    fn invalid_argument_names_the_field_in_bad_request() {
        let status: Status =
            ApiError::invalid_argument("max_tokens", "`max_tokens` must be >= 1. Given: 0").into();
        assert_eq!(status.code(), Code::InvalidArgument);
        let bad = status
            .get_details_bad_request()
            .expect("BadRequest attached");
        assert_eq!(bad.field_violations[0].field, "max_tokens");
    }

    #[test]
    fn internal_errors_hide_the_cause_from_clients() {
        let io = std::io::Error::other("secret path /root/x");
        let status: Status = ApiError::internal("reading the cache failed", &io).into();
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("/root/x"));
    }

    #[test]
    fn preconditions_become_precondition_failure_details() {
        let status: Status = ApiError::new(Code::FailedPrecondition, "SNAPSHOT_INCOMPLETE", "x")
            .with_violation(Violation {
                kind: "MISSING_SHARD".into(),
                subject: "model-00002-of-00003.safetensors".into(),
                description: "missing".into(),
            })
            .into();
        let pf = status.get_details_precondition_failure().unwrap();
        assert_eq!(pf.violations[0].r#type, "MISSING_SHARD");
    }
}
