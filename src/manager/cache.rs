//! The Hugging Face cache layout, shared with Python's huggingface_hub:
//!
//! ```text
//! <cache>/models--<org>--<name>/
//!     blobs/<etag>                 file contents, named by the hub's etag (sha256 or git sha1)
//!     snapshots/<commit>/<path>    relative symlinks into ../../blobs
//!     refs/<revision>              the commit a branch or tag points at
//! ```
//!
//! Also validates what names a model (repo ids, revisions, local folder paths) before any I/O,
//! and keeps clients to the folders the operator allowed: a model named by absolute path must
//! resolve, symlinks followed, inside the cache or one of the model roots (`--model-root`).

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
};

use super::reference::{self, Reference, Selector};
use crate::snapshot::{gguf, GgufFile};

/// Default revision when a request leaves it empty.
pub const DEFAULT_REVISION: &str = "main";
/// Longest repo id part huggingface_hub accepts.
const MAX_NAME_LEN: usize = 96;
/// Longest revision accepted.
const MAX_REVISION_LEN: usize = 255;
/// Longest folder path accepted as a model id (Linux's PATH_MAX).
const MAX_PATH_LEN: usize = 4096;

/// What a request's `model_id` + `revision` name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// A folder on the server (an absolute path: model_id starting with '/').
    Local(PathBuf),
    /// A repository in the cache, and which of its GGUF files when it names one.
    Hub {
        repo_id: String,
        revision: String,
        selector: Option<Selector>,
    },
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
    #[error("`model_id` {} is outside the folders models may be loaded from: the model cache {} and the model roots ({}). Start the server with --model-root DIR to serve folders from DIR", path.display(), cache.display(), roots_list(roots))]
    OutsideModelRoots {
        path: PathBuf,
        cache: PathBuf,
        roots: Vec<PathBuf>,
    },
    #[error("model {model_id:?} at revision {revision:?} has no GGUF file {selector:?} (its GGUF files: {})", known_list(.available))]
    GgufNotFound {
        model_id: String,
        revision: String,
        selector: String,
        available: Vec<String>,
    },
    #[error("reading the cache at {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

fn roots_list(roots: &[PathBuf]) -> String {
    if roots.is_empty() {
        return "none configured".to_owned();
    }
    roots
        .iter()
        .map(|r| r.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
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
        if model_id.len() > MAX_PATH_LEN {
            return Err(invalid_id(
                model_id,
                format!("a folder path must have at most {MAX_PATH_LEN} bytes"),
            ));
        }
        if model_id.split('/').any(|part| part == "." || part == "..") {
            return Err(invalid_id(
                model_id,
                "a folder path must not contain \".\" or \"..\" segments",
            ));
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
    let (canonical, revision) = reference::normalize(model_id, revision)?;
    let parsed = Reference::parse(&canonical)?;
    let revision = if revision.is_empty() {
        DEFAULT_REVISION.to_owned()
    } else {
        revision
    };
    validate_revision(&revision)?;
    Ok(ModelRef::Hub {
        repo_id: parsed.repo,
        revision,
        selector: parsed.selector,
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
    /// The GGUF file to load, for a snapshot with GGUF files: the one the reference selects, or
    /// by the default rule ([`gguf::default_file`]).
    pub gguf: Option<GgufFile>,
}

/// Which folders a model may be named by absolute path from.
#[derive(Debug, Clone)]
enum Folders {
    /// The cache and these roots, each as given and canonical (symlinks resolved).
    Roots(Arc<[(PathBuf, PathBuf)]>),
    /// Any folder: the offline `lmx verify PATH`, where the user already holds the files.
    Any,
}

/// The model cache folder and the folders besides it that models may be loaded from.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
    folders: Folders,
}

impl Cache {
    /// The cache at `root`; folders outside it are refused until [`Cache::with_model_roots`].
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            folders: Folders::Roots(Arc::from(Vec::new())),
        }
    }

    /// Also allows model folders inside `roots` (each must be an existing folder).
    pub fn with_model_roots(mut self, roots: &[PathBuf]) -> Result<Self, CacheError> {
        let mut resolved = Vec::with_capacity(roots.len());
        for root in roots {
            if !root.is_absolute() {
                return Err(CacheError::Io {
                    path: root.clone(),
                    source: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "a model root must be an absolute path",
                    ),
                });
            }
            let canonical = fs::canonicalize(root).map_err(|source| CacheError::Io {
                path: root.clone(),
                source,
            })?;
            if !canonical.is_dir() {
                return Err(CacheError::Io {
                    path: root.clone(),
                    source: io::Error::new(io::ErrorKind::InvalidInput, "not a folder"),
                });
            }
            resolved.push((root.clone(), canonical));
        }
        self.folders = Folders::Roots(Arc::from(resolved));
        Ok(self)
    }

    /// Allows a model folder anywhere: for offline tools run by the owner of the files only.
    pub fn allowing_any_folder(mut self) -> Self {
        self.folders = Folders::Any;
        self
    }

    /// The model roots as configured (the cache is always allowed besides them).
    pub fn model_roots(&self) -> Vec<PathBuf> {
        match &self.folders {
            Folders::Roots(roots) => roots.iter().map(|(given, _)| given.clone()).collect(),
            Folders::Any => Vec::new(),
        }
    }

    /// Checks a request's names without loading anything: a folder must lie inside the allowed
    /// folders (when it exists: a missing one is reported when it is resolved).
    pub fn check_model_ref(&self, model_id: &str, revision: &str) -> Result<(), CacheError> {
        if let ModelRef::Local(path) = parse_model_ref(model_id, revision)? {
            match self.admit(&path) {
                Err(CacheError::LocalNotFound(_)) => {}
                other => {
                    other?;
                }
            }
        }
        Ok(())
    }

    /// The canonical path of a local model folder, if it lies inside an allowed folder. The
    /// literal path is checked before the file system is touched, so a client cannot probe
    /// which paths exist outside the roots; the canonical one after, so a symlink cannot leave.
    fn admit(&self, path: &Path) -> Result<PathBuf, CacheError> {
        let roots = match &self.folders {
            Folders::Any => {
                return fs::canonicalize(path).map_err(|_| CacheError::LocalNotFound(path.into()))
            }
            Folders::Roots(roots) => roots,
        };
        let cache_canonical = fs::canonicalize(&self.root).ok();
        let candidates = || {
            roots
                .iter()
                .flat_map(|(given, canonical)| [given.as_path(), canonical.as_path()])
                .chain([self.root.as_path()])
                .chain(cache_canonical.as_deref())
        };
        let outside = || CacheError::OutsideModelRoots {
            path: path.to_path_buf(),
            cache: self.root.clone(),
            roots: self.model_roots(),
        };
        if !candidates().any(|root| path.starts_with(root)) {
            return Err(outside());
        }
        let real = match fs::canonicalize(path) {
            Ok(real) => real,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(CacheError::LocalNotFound(path.to_path_buf()))
            }
            Err(source) => {
                return Err(CacheError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let inside = roots
            .iter()
            .map(|(_, canonical)| canonical.as_path())
            .chain(cache_canonical.as_deref())
            .any(|root| real.starts_with(root));
        if inside {
            Ok(real)
        } else {
            Err(outside())
        }
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
                // The canonical path is what gets read: a symlink swapped after the check
                // cannot redirect the load outside the roots.
                let real = self.admit(path)?;
                Ok(ResolvedSnapshot {
                    model_id: path.display().to_string(),
                    revision: String::new(),
                    commit: String::new(),
                    path: real,
                    gguf: None,
                })
            }
            ModelRef::Hub {
                repo_id,
                revision,
                selector,
            } => {
                let mut snapshot = self.resolve_hub(repo_id, revision)?;
                snapshot.gguf = choose_gguf(&snapshot, selector.as_ref())?;
                if selector.is_some() {
                    snapshot.model_id = Reference {
                        repo: repo_id.clone(),
                        revision: None,
                        selector: selector.clone(),
                    }
                    .model_id();
                }
                Ok(snapshot)
            }
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
            gguf: None,
        })
    }
}

/// The GGUF file a reference gets in `snapshot`: the one its selector names (NOT_FOUND when
/// there is none), else the default choice; None when the snapshot has no GGUF file and no
/// selector was given.
fn choose_gguf(
    snapshot: &ResolvedSnapshot,
    selector: Option<&Selector>,
) -> Result<Option<GgufFile>, CacheError> {
    let files = gguf::gguf_files(&snapshot.path);
    let found = match selector {
        None => return Ok(gguf::default_file(&files).cloned()),
        Some(Selector::Quant(q)) => gguf::file_with_quantization(&files, q),
        Some(Selector::File(path)) => files.iter().find(|f| &f.path == path),
    };
    match found {
        Some(f) => Ok(Some(f.clone())),
        None => Err(CacheError::GgufNotFound {
            model_id: snapshot.model_id.clone(),
            revision: snapshot.revision.clone(),
            selector: selector.map(ToString::to_string).unwrap_or_default(),
            available: files
                .iter()
                .map(|f| match &f.quantization {
                    Some(q) => format!("{} ({q})", f.path),
                    None => f.path.clone(),
                })
                .collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_folders_must_resolve_inside_the_cache_or_a_model_root() {
        let dir = tempfile::tempdir().unwrap();
        let (cache_dir, root, outside) = (
            dir.path().join("hub"),
            dir.path().join("models"),
            dir.path().join("elsewhere"),
        );
        for d in [&cache_dir, &root.join("m"), &outside.join("m")] {
            fs::create_dir_all(d).unwrap();
        }
        std::os::unix::fs::symlink(outside.join("m"), root.join("escape")).unwrap();
        std::os::unix::fs::symlink(root.join("m"), outside.join("alias")).unwrap();
        let local = |p: &Path| ModelRef::Local(p.to_path_buf());

        let closed = Cache::new(&cache_dir);
        let err = closed.resolve(&local(&root.join("m"))).unwrap_err();
        assert!(
            matches!(&err, CacheError::OutsideModelRoots { roots, .. } if roots.is_empty()),
            "{err}"
        );
        assert!(err.to_string().contains("--model-root"), "{err}");
        let err = closed.resolve(&local(Path::new("/etc"))).unwrap_err();
        assert!(matches!(err, CacheError::OutsideModelRoots { .. }), "{err}");
        // Outside the roots, a missing folder and an existing one answer alike.
        let err = closed
            .resolve(&local(Path::new("/no/such/folder")))
            .unwrap_err();
        assert!(matches!(err, CacheError::OutsideModelRoots { .. }), "{err}");

        let open = Cache::new(&cache_dir)
            .with_model_roots(std::slice::from_ref(&root))
            .unwrap();
        let ok = open.resolve(&local(&root.join("m"))).unwrap();
        assert_eq!(ok.path, fs::canonicalize(root.join("m")).unwrap());
        assert!(matches!(
            open.resolve(&local(&root.join("gone"))),
            Err(CacheError::LocalNotFound(_))
        ));
        // A link inside a root that leads out of it is refused; one outside that leads in is
        // refused too (the literal path names a folder outside every root).
        for path in [
            root.join("escape"),
            outside.join("alias"),
            outside.join("m"),
        ] {
            let err = open.resolve(&local(&path)).unwrap_err();
            assert!(
                matches!(&err, CacheError::OutsideModelRoots { roots, .. } if roots == std::slice::from_ref(&root)),
                "{}: {err}",
                path.display()
            );
        }
        // The cache is always allowed.
        fs::create_dir_all(cache_dir.join("local-model")).unwrap();
        closed
            .resolve(&local(&cache_dir.join("local-model")))
            .unwrap();
        // The offline CLI may name any folder.
        let any = Cache::new(&cache_dir).allowing_any_folder();
        any.resolve(&local(&outside.join("m"))).unwrap();
        // Roots must exist and be absolute.
        assert!(Cache::new(&cache_dir)
            .with_model_roots(&[dir.path().join("missing")])
            .is_err());
        assert!(Cache::new(&cache_dir)
            .with_model_roots(&[PathBuf::from("relative")])
            .is_err());
    }

    #[test]
    fn folder_paths_with_dot_segments_are_refused_before_any_io() {
        for id in ["/models/../etc", "/models/./m", "/a/.."] {
            let err = parse_model_ref(id, "").unwrap_err();
            assert!(
                matches!(err, CacheError::InvalidModelId { .. }),
                "{id}: {err}"
            );
        }
        let long = format!("/{}", "a".repeat(5000));
        assert!(parse_model_ref(&long, "").is_err());
    }

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
                revision: "main".into(),
                selector: None,
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
