//! The Hugging Face cache layout, shared with Python's huggingface_hub:
//!
//! ```text
//! <cache>/models--<org>--<name>/
//!     blobs/<etag>                 file contents, named by the hub's etag (sha256 or git sha1)
//!     snapshots/<commit>/<path>    relative symlinks into ../../blobs
//!     refs/<revision>              the commit a branch or tag points at
//! ```
//!
//! Also validates what names a model (repo ids, revisions, local folder paths) before any I/O.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

/// Default revision when a request leaves it empty.
pub const DEFAULT_REVISION: &str = "main";
/// Longest repo id part huggingface_hub accepts.
const MAX_NAME_LEN: usize = 96;
/// Longest revision accepted.
const MAX_REVISION_LEN: usize = 255;

/// What a request's `model_id` + `revision` name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// A folder on the server (an absolute path: model_id starting with '/').
    Local(PathBuf),
    /// A repository in the cache.
    Hub { repo_id: String, revision: String },
}

/// Why a model could not be found or named.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("`model_id` {value:?} is invalid: {reason}")]
    InvalidModelId { value: String, reason: String },
    #[error("`revision` {value:?} is invalid: {reason}")]
    InvalidRevision { value: String, reason: String },
    #[error("model {model_id:?} is not in the cache {}", cache_dir.display())]
    ModelNotFound {
        model_id: String,
        cache_dir: PathBuf,
    },
    #[error("model {model_id:?} has no revision {revision:?} in the cache (known refs: {})", known_list(.known))]
    RevisionNotFound {
        model_id: String,
        revision: String,
        known: Vec<String>,
    },
    #[error("model {model_id:?} revision {revision:?} points at commit {commit}, whose snapshot folder is missing")]
    SnapshotMissing {
        model_id: String,
        revision: String,
        commit: String,
    },
    #[error("local model folder {} does not exist", .0.display())]
    LocalNotFound(PathBuf),
    #[error("reading the cache at {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

fn known_list(known: &[String]) -> String {
    if known.is_empty() {
        "none".to_owned()
    } else {
        known.join(", ")
    }
}

fn invalid_id(value: &str, reason: impl Into<String>) -> CacheError {
    CacheError::InvalidModelId {
        value: value.to_owned(),
        reason: reason.into(),
    }
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// Validates a hub repository id ("org/name" or "name") the way huggingface_hub does.
pub fn validate_repo_id(id: &str) -> Result<(), CacheError> {
    if id.is_empty() {
        return Err(invalid_id(id, "must not be empty"));
    }
    if has_control(id) {
        return Err(invalid_id(id, "must not contain control characters"));
    }
    if id.starts_with('/') {
        return Err(invalid_id(id, "must not be an absolute path"));
    }
    if id.contains("..") || id.contains("--") {
        return Err(invalid_id(id, "must not contain \"..\" or \"--\""));
    }
    let parts: Vec<&str> = id.split('/').collect();
    if parts.len() > 2 {
        return Err(invalid_id(
            id,
            "must be \"name\" or \"org/name\" (at most one '/')",
        ));
    }
    for part in parts {
        if part.is_empty() || part.len() > MAX_NAME_LEN {
            return Err(invalid_id(
                id,
                format!(
                    "each part must have 1 to {MAX_NAME_LEN} characters; {part:?} has {}",
                    part.len()
                ),
            ));
        }
        if !part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        {
            return Err(invalid_id(
                id,
                "may only contain letters, digits, '_', '.', '-' and one '/'",
            ));
        }
        if part.starts_with(['-', '.']) || part.ends_with(['-', '.']) {
            return Err(invalid_id(
                id,
                "parts must not start or end with '-' or '.'",
            ));
        }
    }
    Ok(())
}

/// Validates a revision (branch, tag, commit sha or `refs/pr/N`).
pub fn validate_revision(rev: &str) -> Result<(), CacheError> {
    let invalid = |reason: &str| CacheError::InvalidRevision {
        value: rev.to_owned(),
        reason: reason.to_owned(),
    };
    if rev.len() > MAX_REVISION_LEN {
        return Err(invalid(&format!(
            "must have at most {MAX_REVISION_LEN} characters, has {}",
            rev.len()
        )));
    }
    if has_control(rev) {
        return Err(invalid("must not contain control characters"));
    }
    if rev.starts_with('/') || rev.contains('\\') {
        return Err(invalid("must not be an absolute path or contain '\\'"));
    }
    if rev
        .split('/')
        .any(|part| part == ".." || part == "." || part.is_empty())
    {
        return Err(invalid(
            "must not contain \"..\", \".\" or empty path segments",
        ));
    }
    Ok(())
}

/// Interprets a request's `model_id` and `revision` (empty revision: "main"): an absolute path
/// names a folder on the server, anything else must be a valid repository id.
pub fn parse_model_ref(model_id: &str, revision: &str) -> Result<ModelRef, CacheError> {
    if model_id.starts_with('/') {
        if has_control(model_id) {
            return Err(invalid_id(model_id, "must not contain control characters"));
        }
        return Ok(ModelRef::Local(PathBuf::from(model_id)));
    }
    if model_id.starts_with(['.', '~']) {
        return Err(invalid_id(
            model_id,
            "a folder on the server must be an absolute path (starting with '/'); \
             otherwise give a repository id like \"org/name\"",
        ));
    }
    validate_repo_id(model_id)?;
    let revision = if revision.is_empty() {
        DEFAULT_REVISION
    } else {
        revision
    };
    validate_revision(revision)?;
    Ok(ModelRef::Hub {
        repo_id: model_id.to_owned(),
        revision: revision.to_owned(),
    })
}

/// "org/name" → "models--org--name".
pub fn repo_folder_name(repo_id: &str) -> String {
    format!("models--{}", repo_id.replace('/', "--"))
}

/// True for a full 40-hex-digit commit sha.
pub fn is_commit_sha(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A snapshot found in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedSnapshot {
    /// Repository id, or the folder path for local models.
    pub model_id: String,
    /// The revision as requested (empty for local folders).
    pub revision: String,
    /// The commit sha (empty for local folders).
    pub commit: String,
    /// The snapshot folder.
    pub path: PathBuf,
}

/// The model cache folder.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The cache folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<cache>/models--org--name`.
    pub fn repo_dir(&self, repo_id: &str) -> PathBuf {
        self.root.join(repo_folder_name(repo_id))
    }

    /// Every ref (branch or tag name, may contain '/') of a repository → commit.
    pub fn refs(&self, repo_id: &str) -> BTreeMap<String, String> {
        let refs_dir = self.repo_dir(repo_id).join("refs");
        let mut out = BTreeMap::new();
        for entry in walkdir::WalkDir::new(&refs_dir)
            .max_depth(8)
            .into_iter()
            .flatten()
        {
            if !entry.file_type().is_file() {
                continue;
            }
            let Ok(name) = entry.path().strip_prefix(&refs_dir) else {
                continue;
            };
            if let Ok(commit) = fs::read_to_string(entry.path()) {
                out.insert(
                    name.to_string_lossy().replace('\\', "/"),
                    commit.trim().to_owned(),
                );
            }
        }
        out
    }

    /// Resolves a model reference to its snapshot folder.
    pub fn resolve(&self, model: &ModelRef) -> Result<ResolvedSnapshot, CacheError> {
        match model {
            ModelRef::Local(path) => {
                if !path.exists() {
                    return Err(CacheError::LocalNotFound(path.clone()));
                }
                Ok(ResolvedSnapshot {
                    model_id: path.display().to_string(),
                    revision: String::new(),
                    commit: String::new(),
                    path: path.clone(),
                })
            }
            ModelRef::Hub { repo_id, revision } => self.resolve_hub(repo_id, revision),
        }
    }

    fn resolve_hub(&self, repo_id: &str, revision: &str) -> Result<ResolvedSnapshot, CacheError> {
        let repo_dir = self.repo_dir(repo_id);
        if !repo_dir.is_dir() {
            return Err(CacheError::ModelNotFound {
                model_id: repo_id.to_owned(),
                cache_dir: self.root.clone(),
            });
        }
        let snapshots = repo_dir.join("snapshots");
        let commit = if is_commit_sha(revision) && snapshots.join(revision).is_dir() {
            revision.to_owned()
        } else {
            match fs::read_to_string(repo_dir.join("refs").join(revision)) {
                Ok(commit) => commit.trim().to_owned(),
                Err(e)
                    if e.kind() == io::ErrorKind::NotFound
                        || e.kind() == io::ErrorKind::NotADirectory =>
                {
                    return Err(CacheError::RevisionNotFound {
                        model_id: repo_id.to_owned(),
                        revision: revision.to_owned(),
                        known: self.refs(repo_id).into_keys().collect(),
                    })
                }
                Err(source) => {
                    return Err(CacheError::Io {
                        path: repo_dir.join("refs").join(revision),
                        source,
                    })
                }
            }
        };
        if !is_commit_sha(&commit) {
            return Err(CacheError::Io {
                path: repo_dir.join("refs").join(revision),
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("not a commit sha: {commit:?}"),
                ),
            });
        }
        let path = snapshots.join(&commit);
        if !path.is_dir() {
            return Err(CacheError::SnapshotMissing {
                model_id: repo_id.to_owned(),
                revision: revision.to_owned(),
                commit,
            });
        }
        Ok(ResolvedSnapshot {
            model_id: repo_id.to_owned(),
            revision: revision.to_owned(),
            commit,
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_validated_before_any_io() {
        let ok = [
            "gpt2",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "org/m_1.5b",
            "a/b",
        ];
        for id in ok {
            validate_repo_id(id).unwrap_or_else(|e| panic!("{id}: {e}"));
        }
        let bad = [
            ("", "must not be empty"),
            ("../etc", "\"..\""),
            ("org/../x", "\"..\""),
            ("/abs/path", "absolute"),
            ("a/b/c", "at most one '/'"),
            ("org--x/m", "\"--\""),
            ("org/na me", "may only contain"),
            ("org/m\n", "control characters"),
            ("-org/m", "must not start or end"),
        ];
        for (id, want) in bad {
            let err = validate_repo_id(id).unwrap_err().to_string();
            assert!(err.contains(want), "{id:?}: {err}");
            assert!(err.contains("`model_id`"), "{err}");
        }
    }

    #[test]
    fn revisions_are_validated() {
        for rev in ["main", "v1.0", "refs/pr/1", &"a".repeat(40)] {
            validate_revision(rev).unwrap();
        }
        for rev in [
            "../x",
            "/main",
            "a//b",
            "a\\b",
            "ma\u{7}in",
            &"x".repeat(300),
        ] {
            let err = validate_revision(rev).unwrap_err().to_string();
            assert!(err.contains("`revision`"), "{err}");
        }
    }

    #[test]
    fn model_refs_distinguish_folders_from_repo_ids() {
        assert_eq!(
            parse_model_ref("/models/x", "ignored").unwrap(),
            ModelRef::Local("/models/x".into())
        );
        assert_eq!(
            parse_model_ref("org/m", "").unwrap(),
            ModelRef::Hub {
                repo_id: "org/m".into(),
                revision: "main".into()
            }
        );
        assert!(parse_model_ref("org/m", "../x").is_err());
        let err = parse_model_ref("./relative", "").unwrap_err().to_string();
        assert!(err.contains("absolute path"), "{err}");
    }

    #[test]
    fn resolves_refs_and_commits() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let repo = cache.repo_dir("org/m");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        fs::create_dir_all(repo.join("snapshots").join(commit)).unwrap();
        fs::create_dir_all(repo.join("refs/refs/pr")).unwrap();
        fs::write(repo.join("refs/main"), commit).unwrap();
        fs::write(repo.join("refs/refs/pr/1"), format!("{commit}\n")).unwrap();

        let hub = |rev: &str| parse_model_ref("org/m", rev).unwrap();
        assert_eq!(cache.resolve(&hub("main")).unwrap().commit, commit);
        assert_eq!(cache.resolve(&hub("refs/pr/1")).unwrap().commit, commit);
        assert_eq!(
            cache.resolve(&hub(commit)).unwrap().path,
            repo.join("snapshots").join(commit)
        );
        match cache.resolve(&hub("dev")).unwrap_err() {
            CacheError::RevisionNotFound { known, .. } => assert_eq!(known, ["main", "refs/pr/1"]),
            other => panic!("{other}"),
        }
        assert!(matches!(
            cache.resolve(&parse_model_ref("org/other", "").unwrap()),
            Err(CacheError::ModelNotFound { .. })
        ));
        fs::write(repo.join("refs/gone"), "f".repeat(40)).unwrap();
        assert!(matches!(
            cache.resolve(&hub("gone")),
            Err(CacheError::SnapshotMissing { .. })
        ));
    }
}
