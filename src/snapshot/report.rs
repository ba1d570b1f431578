//! The result of a snapshot check: problems with their kind, file, detail and severity, and a
//! report that is deterministic for the same folder (problems sorted by file, kind, detail).

use std::{collections::BTreeMap, fmt, path::PathBuf};

use serde::Serialize;

/// What is wrong with a snapshot. Mirrors `lmx.v1.SnapshotProblemKind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ProblemKind {
    /// config.json missing or unparsable where the weight format needs it.
    MissingConfig,
    /// No weight file in any supported format.
    NoWeights,
    /// An index file does not parse or has no usable `weight_map`.
    IndexUnreadable,
    /// A file an index references is missing.
    MissingIndexedFile,
    /// A shard set lacks members.
    MissingShard,
    /// Members of a shard set declare different totals, or an index outside 1..=total.
    ShardTotalMismatch,
    /// A file is shorter than its header says.
    TruncatedFile,
    /// A header does not parse or is inconsistent.
    InvalidHeader,
    /// A content hash differs from the expected one.
    ChecksumMismatch,
    /// A partial download is left behind.
    IncompleteFilePresent,
    /// A link points at nothing (or at itself).
    BrokenLink,
    /// A path leaves the snapshot or the cache.
    UnsafePath,
    /// No usable tokenizer.
    MissingTokenizer,
    /// A file or folder cannot be read (permissions, I/O error).
    Unreadable,
}

impl ProblemKind {
    /// The stable UPPER_SNAKE name (the proto enum value without its prefix).
    pub fn name(self) -> &'static str {
        match self {
            Self::MissingConfig => "MISSING_CONFIG",
            Self::NoWeights => "NO_WEIGHTS",
            Self::IndexUnreadable => "INDEX_UNREADABLE",
            Self::MissingIndexedFile => "MISSING_INDEXED_FILE",
            Self::MissingShard => "MISSING_SHARD",
            Self::ShardTotalMismatch => "SHARD_TOTAL_MISMATCH",
            Self::TruncatedFile => "TRUNCATED_FILE",
            Self::InvalidHeader => "INVALID_HEADER",
            Self::ChecksumMismatch => "CHECKSUM_MISMATCH",
            Self::IncompleteFilePresent => "INCOMPLETE_FILE_PRESENT",
            Self::BrokenLink => "BROKEN_LINK",
            Self::UnsafePath => "UNSAFE_PATH",
            Self::MissingTokenizer => "MISSING_TOKENIZER",
            Self::Unreadable => "UNREADABLE",
        }
    }
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether a problem makes the snapshot incomplete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The snapshot must not be loaded.
    Error,
    /// Worth knowing; the snapshot can be loaded.
    Warning,
}

/// One thing wrong with a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub kind: ProblemKind,
    /// Path relative to the snapshot folder ('/' separated); `blobs/<name>` for files in the
    /// repository's blob store; empty for the snapshot as a whole.
    pub file: String,
    /// What was expected and what was found.
    pub detail: String,
    pub severity: Severity,
}

impl Problem {
    /// An error.
    pub fn error(kind: ProblemKind, file: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            kind,
            file: file.into(),
            detail: detail.into(),
            severity: Severity::Error,
        }
    }

    /// A warning.
    pub fn warning(kind: ProblemKind, file: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            ..Self::error(kind, file, detail)
        }
    }
}

/// On-disk format of the weights. Mirrors `lmx.v1.WeightFormat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WeightFormat {
    Safetensors,
    PytorchBin,
    Gguf,
}

/// How thoroughly to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Mode {
    /// Structure, indexes, shard sets, headers and sizes; no tensor data is read.
    #[default]
    Quick,
    /// Quick plus content hashes of every file with a known expected hash.
    Full,
}

/// The outcome of a check.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The folder that was checked.
    pub path: PathBuf,
    pub mode: Mode,
    /// True when no problem is an error.
    pub complete: bool,
    pub format: Option<WeightFormat>,
    /// config.json `model_type` or GGUF `general.architecture`.
    pub architecture: Option<String>,
    /// Files examined.
    pub files_checked: u32,
    /// Bytes hashed (FULL mode).
    pub bytes_hashed: u64,
    /// One line for humans.
    pub summary: String,
    /// Every problem, sorted by file, kind, detail.
    pub problems: Vec<Problem>,
}

impl Report {
    /// Builds the report: sorts problems and derives `complete` and `summary`. `notes` are
    /// counts worth a place in the summary (e.g. "2 of 5 files referenced by ... are missing").
    pub(crate) fn new(
        path: PathBuf,
        mode: Mode,
        mut problems: Vec<Problem>,
        notes: &[String],
    ) -> Self {
        problems.sort_by(|a, b| {
            (&a.file, a.kind, &a.detail, a.severity).cmp(&(&b.file, b.kind, &b.detail, b.severity))
        });
        problems.dedup();
        let errors = problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
            .count();
        let warnings = problems.len() - errors;
        let complete = errors == 0;
        let summary = summarize(complete, &problems, errors, warnings, notes);
        Self {
            path,
            mode,
            complete,
            format: None,
            architecture: None,
            files_checked: 0,
            bytes_hashed: 0,
            summary,
            problems,
        }
    }

    /// Problems that make the snapshot incomplete.
    pub fn errors(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
    }
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

fn summarize(
    complete: bool,
    problems: &[Problem],
    errors: usize,
    warnings: usize,
    notes: &[String],
) -> String {
    let mut by_kind: BTreeMap<ProblemKind, usize> = BTreeMap::new();
    for p in problems {
        *by_kind.entry(p.kind).or_default() += 1;
    }
    let mut out = match (complete, warnings) {
        (true, 0) => "complete: no problems".to_owned(),
        (true, w) => format!("complete with {}", plural(w, "warning")),
        (false, 0) => format!("incomplete: {}", plural(errors, "error")),
        (false, w) => format!(
            "incomplete: {}, {}",
            plural(errors, "error"),
            plural(w, "warning")
        ),
    };
    if !by_kind.is_empty() {
        let kinds: Vec<String> = by_kind.iter().map(|(k, n)| format!("{k} x{n}")).collect();
        out.push_str(&format!(" ({})", kinds.join(", ")));
    }
    for note in notes {
        out.push_str("; ");
        out.push_str(note);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_are_sorted_and_summarized_deterministically() {
        let problems = vec![
            Problem::error(ProblemKind::MissingShard, "b", "x"),
            Problem::warning(ProblemKind::IncompleteFilePresent, "a", "y"),
            Problem::error(ProblemKind::MissingIndexedFile, "b", "x"),
            Problem::error(ProblemKind::MissingShard, "b", "x"),
        ];
        let report = Report::new(
            "/s".into(),
            Mode::Quick,
            problems,
            &["2 of 5 missing".into()],
        );
        let order: Vec<_> = report
            .problems
            .iter()
            .map(|p| (p.file.as_str(), p.kind))
            .collect();
        assert_eq!(
            order,
            [
                ("a", ProblemKind::IncompleteFilePresent),
                ("b", ProblemKind::MissingIndexedFile),
                ("b", ProblemKind::MissingShard),
            ]
        );
        assert!(!report.complete);
        assert_eq!(
            report.summary,
            "incomplete: 2 errors, 1 warning (MISSING_INDEXED_FILE x1, MISSING_SHARD x1, \
             INCOMPLETE_FILE_PRESENT x1); 2 of 5 missing"
        );
    }

    #[test]
    fn warnings_alone_keep_a_snapshot_complete() {
        let problems = vec![Problem::warning(
            ProblemKind::IncompleteFilePresent,
            "a",
            "y",
        )];
        let report = Report::new("/s".into(), Mode::Quick, problems, &[]);
        assert!(report.complete);
        assert_eq!(
            report.summary,
            "complete with 1 warning (INCOMPLETE_FILE_PRESENT x1)"
        );
    }
}
