//! Snapshot validation: pure functions from a snapshot folder to a [`Report`].
//!
//! A snapshot is an HF cache snapshot (`models--org--name/snapshots/<commit>/`, links into
//! `blobs/`) or any plain local folder. QUICK checks structure, index files, shard sets, weight
//! headers and sizes without reading tensor data; FULL also hashes every file whose expected hash
//! is known. [`is_snapshot_complete`] is the guard the download manager and the loader call before
//! any weight reaches the engine.
//!
//! This module knows nothing of the network, the engine or gRPC.

pub mod gguf;
mod hashing;
mod index;
pub mod partial;
mod report;
mod shards;
mod tree;
mod weights;

use std::{
    fs::File,
    io::BufReader,
    path::{Path, PathBuf},
};

pub use gguf::GgufFile;
pub use hashing::{git_sha1_hex, sha256_hex, BlobHasher, ExpectedHash};
pub use report::{Mode, Problem, ProblemKind, Report, Severity, WeightFormat};

use self::{
    index::Index,
    report::Problem as P,
    tree::{FileEntry, Tree},
    weights::SafetensorsInfo,
};

/// Why a folder could not be checked at all (as opposed to a check that found problems).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot folder {0} does not exist")]
    NotFound(PathBuf),
    #[error("{0} is not a folder")]
    NotADirectory(PathBuf),
    #[error("cannot read snapshot folder {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The check ran and found errors.
    #[error("snapshot {} is incomplete: {}", .0.path.display(), .0.summary)]
    Incomplete(Box<Report>),
}

/// The loader's and the download manager's guard: a QUICK check that succeeds only when the
/// snapshot is complete (warnings allowed). An incomplete snapshot is
/// [`SnapshotError::Incomplete`] carrying the whole report.
pub fn is_snapshot_complete(path: &Path) -> Result<Report, SnapshotError> {
    let report = verify(path, Mode::Quick)?;
    if report.complete {
        Ok(report)
    } else {
        Err(SnapshotError::Incomplete(Box::new(report)))
    }
}

/// Checks the snapshot folder at `path`.
pub fn verify(path: &Path, mode: Mode) -> Result<Report, SnapshotError> {
    let tree = tree::scan(path)?;
    let mut problems = tree.problems.clone();
    let mut notes = Vec::new();

    problems.extend(partial::problems(&tree));
    let indexes = index::check(&tree, &mut problems, &mut notes);
    let mut shard_paths: Vec<&String> = tree.files.keys().collect();
    // Shards an index references are members of their set even when missing from disk.
    shard_paths.extend(indexes.iter().flat_map(|i| i.files.keys()));
    shard_paths.sort();
    shard_paths.dedup();
    problems.extend(shards::check(shard_paths));

    let headers = check_headers(&tree, &indexes, &mut problems);
    cross_check_indexes(&indexes, &headers.safetensors, &mut problems);
    let config_architecture = check_json_files(&tree, headers.format, &mut problems);
    check_tokenizer(
        &tree,
        headers.gguf_tokenizer || headers.gguf_failed,
        &mut problems,
    );
    if headers.format.is_none() {
        problems.push(P::error(
            ProblemKind::NoWeights,
            "",
            "no weight file: expected *.safetensors, pytorch_model*.bin or *.gguf",
        ));
    }

    let bytes_hashed = if mode == Mode::Full {
        let (hash_problems, bytes) = hashing::check(&tree);
        problems.extend(hash_problems);
        bytes
    } else {
        0
    };

    let mut report = Report::new(tree.root.clone(), mode, problems, &notes);
    report.format = headers.format;
    report.architecture = config_architecture.or(headers.gguf_architecture);
    report.files_checked = u32::try_from(tree.files.len()).unwrap_or(u32::MAX);
    report.bytes_hashed = bytes_hashed;
    Ok(report)
}

/// Which files hold weights, and what their headers said.
#[derive(Default)]
struct Headers {
    format: Option<WeightFormat>,
    safetensors: std::collections::HashMap<String, SafetensorsInfo>,
    gguf_architecture: Option<String>,
    gguf_tokenizer: bool,
    /// A GGUF header did not parse: whether it carries a tokenizer is unknown.
    gguf_failed: bool,
}

fn is_top_level(name: &str) -> bool {
    !name.contains('/')
}

fn is_pytorch_weight(name: &str, indexed: &std::collections::HashSet<&str>) -> bool {
    name.ends_with(".bin")
        && ((is_top_level(name) && name.starts_with("pytorch_model")) || indexed.contains(name))
}

fn open(file: &str, entry: &FileEntry) -> Result<BufReader<File>, P> {
    File::open(&entry.path)
        .map(BufReader::new)
        .map_err(|e| P::error(ProblemKind::Unreadable, file, format!("cannot open: {e}")))
}

fn check_headers(tree: &Tree, indexes: &[Index], problems: &mut Vec<P>) -> Headers {
    let indexed: std::collections::HashSet<&str> = indexes
        .iter()
        .flat_map(|i| i.files.keys().map(String::as_str))
        .collect();
    let mut headers = Headers::default();
    let (mut safetensors, mut pytorch, mut gguf) = (false, false, false);
    for (name, entry) in &tree.files {
        if name.ends_with(".safetensors") {
            safetensors |= is_top_level(name) || indexed.contains(name.as_str());
            let result = open(name, entry)
                .and_then(|mut r| weights::check_safetensors(name, &mut r, entry.size));
            match result {
                Ok(info) => {
                    headers.safetensors.insert(name.clone(), info);
                }
                Err(p) => problems.push(p),
            }
        } else if is_pytorch_weight(name, &indexed) {
            pytorch = true;
            if let Err(p) = open(name, entry).and_then(|r| weights::check_pytorch_zip(name, r)) {
                problems.push(p);
            }
        } else if name.ends_with(".gguf") {
            gguf |= is_top_level(name);
            match open(name, entry).and_then(|mut r| weights::check_gguf(name, &mut r, entry.size))
            {
                Ok(info) => {
                    headers.gguf_tokenizer |= info.has_tokenizer;
                    if headers.gguf_architecture.is_none() {
                        headers.gguf_architecture = info.architecture;
                    }
                }
                Err(p) => {
                    headers.gguf_failed = true;
                    problems.push(p);
                }
            }
        }
    }
    // Indexes whose files are all missing still tell the format.
    for index in indexes {
        safetensors |= index.name.contains(".safetensors.");
        pytorch |= index.name.contains(".bin.");
    }
    headers.format = if safetensors {
        Some(WeightFormat::Safetensors)
    } else if pytorch {
        Some(WeightFormat::PytorchBin)
    } else if gguf {
        Some(WeightFormat::Gguf)
    } else {
        None
    };
    headers
}

/// Every tensor an index maps to a safetensors file must be in that file's header.
fn cross_check_indexes(
    indexes: &[Index],
    safetensors: &std::collections::HashMap<String, SafetensorsInfo>,
    problems: &mut Vec<P>,
) {
    for index in indexes {
        for (file, tensors) in &index.files {
            let Some(info) = safetensors.get(file) else {
                continue;
            };
            let absent: Vec<&String> = tensors
                .iter()
                .filter(|t| !info.tensors.contains(*t))
                .collect();
            if let Some(first) = absent.first() {
                problems.push(P::error(
                    ProblemKind::InvalidHeader,
                    file,
                    format!(
                        "{} maps {} tensors to this file that its header does not contain (e.g. {first})",
                        index.name,
                        absent.len()
                    ),
                ));
            }
        }
    }
}

/// Top-level JSON files must parse; config.json must exist where the format needs it. Returns
/// config.json's `model_type`.
fn check_json_files(
    tree: &Tree,
    format: Option<WeightFormat>,
    problems: &mut Vec<P>,
) -> Option<String> {
    const MAX_JSON: u64 = 64 << 20;
    let mut model_type = None;
    let mut config_ok = false;
    for (name, entry) in tree.top_level() {
        if !name.ends_with(".json") || name.ends_with(".index.json") {
            continue;
        }
        if entry.size > MAX_JSON {
            problems.push(P::warning(
                ProblemKind::InvalidHeader,
                name,
                format!(
                    "{} bytes: too large to check (limit {MAX_JSON})",
                    entry.size
                ),
            ));
            continue;
        }
        let parsed = std::fs::read(&entry.path)
            .map_err(|e| P::error(ProblemKind::Unreadable, name, format!("cannot read: {e}")))
            .and_then(|bytes| weights::check_json(name, &bytes));
        match (name.as_str(), parsed) {
            ("config.json", Ok(value)) if value.is_object() => {
                config_ok = true;
                model_type = value
                    .get("model_type")
                    .and_then(|v| v.as_str())
                    .map(str::to_owned);
            }
            ("config.json", Ok(_)) => problems.push(P::error(
                ProblemKind::MissingConfig,
                name,
                "config.json is not a JSON object",
            )),
            ("config.json", Err(p)) => problems.push(P::error(
                ProblemKind::MissingConfig,
                name,
                format!("config.json is unusable: {}", p.detail),
            )),
            ("tokenizer.json", Err(p)) => problems.push(P::error(
                ProblemKind::MissingTokenizer,
                name,
                format!("tokenizer.json is unusable: {}", p.detail),
            )),
            (_, Err(p)) => problems.push(p),
            (_, Ok(_)) => {}
        }
    }
    let needs_config = matches!(
        format,
        Some(WeightFormat::Safetensors | WeightFormat::PytorchBin)
    );
    if needs_config && !config_ok && !tree.files.contains_key("config.json") {
        problems.push(P::error(
            ProblemKind::MissingConfig,
            "config.json",
            "config.json is missing; safetensors and PyTorch weights need it to be loaded",
        ));
    }
    model_type
}

fn check_tokenizer(tree: &Tree, gguf_tokenizer: bool, problems: &mut Vec<P>) {
    if tree.files.contains_key("tokenizer.json") || gguf_tokenizer {
        return;
    }
    problems.push(P::error(
        ProblemKind::MissingTokenizer,
        "tokenizer.json",
        "no tokenizer: tokenizer.json is missing and no GGUF file carries tokenizer metadata",
    ));
}

/// Why a repository path is unsafe to create under a snapshot folder (absolute, `..`, ...), if
/// it is.
pub fn unsafe_path_reason(path: &str) -> Option<&'static str> {
    index::unsafe_reason(path)
}

/// Checks one file's bytes in memory, by its name: `*.safetensors`, `*.gguf`, `*.bin` (zip),
/// `*.index.json`, other `*.json`. The entry point for property tests and fuzzing: whatever the
/// bytes, it returns, without panicking and without allocating more than the input justifies.
pub fn check_file_bytes(name: &str, bytes: &[u8]) -> Result<(), Problem> {
    use std::io::Cursor;
    let size = bytes.len() as u64;
    if name.ends_with(".safetensors") {
        weights::check_safetensors(name, &mut Cursor::new(bytes), size).map(drop)
    } else if name.ends_with(".gguf") {
        weights::check_gguf(name, &mut Cursor::new(bytes), size).map(drop)
    } else if name.ends_with(".bin") {
        weights::check_pytorch_zip(name, Cursor::new(bytes))
    } else if name.ends_with(".index.json") {
        index::parse(bytes)
            .map(drop)
            .map_err(|detail| P::error(ProblemKind::IndexUnreadable, name, detail))
    } else {
        weights::check_json(name, bytes).map(drop)
    }
}

#[cfg(test)]
mod tests;
