//! Leftover partial downloads: huggingface_hub's `*.incomplete`, the Rust hf-hub crate's `*.part`
//! and `*.sync.part`, and lmx's own `*.lmxpart` (with a JSON sidecar naming what it belongs to).
//!
//! A partial whose complete file also exists is only a warning (a leftover). Otherwise it is an
//! error: a file of this snapshot is not finished. The one exception is an lmx partial whose
//! sidecar says it belongs to another commit's download: that does not concern this snapshot.

use serde::{Deserialize, Serialize};

use super::{
    report::{Problem, ProblemKind},
    tree::Tree,
};

/// File name suffix of lmx's own partial downloads (`blobs/<etag>.lmxpart`).
pub const LMX_PARTIAL_SUFFIX: &str = ".lmxpart";
/// Suffix of the sidecar next to an lmx partial (`blobs/<etag>.lmxpart.json`).
pub const LMX_PARTIAL_META_SUFFIX: &str = ".lmxpart.json";

/// Suffixes of partial downloads, longest first (".sync.part" before ".part").
const PARTIAL_SUFFIXES: &[&str] = &[".sync.part", ".incomplete", LMX_PARTIAL_SUFFIX, ".part"];

/// What an lmx partial download is, written beside it by the download manager.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialMeta {
    /// Repository id.
    pub repo: String,
    /// The commit being downloaded.
    pub commit: String,
    /// The file's path in the repository.
    pub path: String,
    /// The file's full size.
    pub size: u64,
    /// The hub's sha256 of the content, when it is an LFS file.
    #[serde(default)]
    pub sha256: Option<String>,
}

/// `name` without its partial suffix, or None when it is not a partial download.
pub fn strip_partial_suffix(name: &str) -> Option<&str> {
    PARTIAL_SUFFIXES
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .filter(|stem| !stem.is_empty() && !stem.ends_with('/'))
}

fn read_meta(partial: &std::path::Path) -> Option<PartialMeta> {
    let mut sidecar = partial.as_os_str().to_owned();
    sidecar.push(".json");
    let text = std::fs::read(sidecar).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Problems for every partial download in the tree.
pub(crate) fn problems(tree: &Tree) -> Vec<Problem> {
    let mut out = Vec::new();
    let blobs = tree.blobs_dir();
    for partial in &tree.partials {
        let name = partial.file.rsplit('/').next().unwrap_or(&partial.file);
        let Some(stem) = strip_partial_suffix(name) else {
            continue;
        };
        let complete_exists = if partial.in_blobs {
            blobs.as_ref().is_some_and(|b| b.join(stem).is_file())
        } else {
            let full = strip_partial_suffix(&partial.file).unwrap_or(stem);
            tree.files.contains_key(full)
        };
        if complete_exists {
            out.push(Problem::warning(
                ProblemKind::IncompleteFilePresent,
                &partial.file,
                format!(
                    "leftover partial download ({} bytes); the complete file is present",
                    partial.size
                ),
            ));
            continue;
        }
        let meta = name
            .ends_with(LMX_PARTIAL_SUFFIX)
            .then(|| read_meta(&partial.path))
            .flatten();
        match (meta, tree.commit()) {
            (Some(meta), Some(commit)) if meta.commit != commit => {
                out.push(Problem::warning(
                    ProblemKind::IncompleteFilePresent,
                    &partial.file,
                    format!(
                        "partial download of {} for another commit ({}): {} of {} bytes",
                        meta.path, meta.commit, partial.size, meta.size
                    ),
                ));
            }
            (Some(meta), _) => out.push(Problem::error(
                ProblemKind::IncompleteFilePresent,
                &partial.file,
                format!(
                    "unfinished download of {}: {} of {} bytes",
                    meta.path, partial.size, meta.size
                ),
            )),
            (None, _) => out.push(Problem::error(
                ProblemKind::IncompleteFilePresent,
                &partial.file,
                format!(
                    "unfinished download ({} bytes so far) and no complete {stem}",
                    partial.size
                ),
            )),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_suffixes_are_recognised_longest_first() {
        let cases = [
            ("abc.incomplete", Some("abc")),
            ("abc.sync.part", Some("abc")),
            ("abc.part", Some("abc")),
            ("abc.lmxpart", Some("abc")),
            ("model.safetensors", None),
            (".part", None),
            ("abc.lmxpart.json", None),
        ];
        for (name, want) in cases {
            assert_eq!(strip_partial_suffix(name), want, "{name}");
        }
    }
}
