//! Lists the files of a snapshot folder without reading them.
//!
//! Two layouts: an HF cache snapshot (`models--org--name/snapshots/<commit>/`, whose entries are
//! relative symlinks into `../../blobs/`) and any plain folder. In the cache, every link is
//! resolved by hand: a link that leaves the cache is UNSAFE_PATH and never read; a link to a
//! missing blob is BROKEN_LINK (the classic full-disk case). In a plain folder, links are followed
//! (loops detected). Leftover partial downloads are collected for [`super::partial`].
//! Nothing here panics on odd trees: loops, unreadable folders and permission errors become
//! problems, the depth and the number of entries are bounded.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Component, Path, PathBuf},
};

use walkdir::WalkDir;

use super::{
    partial::{strip_partial_suffix, LMX_PARTIAL_META_SUFFIX},
    report::{Problem, ProblemKind},
    SnapshotError,
};

/// Deepest folder nesting walked.
const MAX_DEPTH: usize = 32;
/// Most entries walked; a folder with more is not a model snapshot.
const MAX_ENTRIES: usize = 100_000;
/// ELOOP on Linux: too many levels of symbolic links.
const ELOOP: i32 = 40;

/// Where the snapshot lives.
#[derive(Debug, Clone)]
pub(crate) enum Layout {
    /// Any folder.
    Plain,
    /// `<cache>/models--org--name/snapshots/<commit>`.
    Cache {
        /// `models--org--name`.
        repo_dir: PathBuf,
        /// The cache root; links must stay inside it.
        cache_dir: PathBuf,
        /// The snapshot folder's name.
        commit: String,
    },
}

/// A readable regular file of the snapshot.
#[derive(Debug, Clone)]
pub(crate) struct FileEntry {
    /// The real path to read (a link's resolved target).
    pub path: PathBuf,
    pub size: u64,
    /// In the cache: the blob's file name (the hub's etag, a content hash).
    pub blob: Option<String>,
}

/// A partial download found in the snapshot or in the repository's blob store.
#[derive(Debug, Clone)]
pub(crate) struct PartialFile {
    /// Path as reported (relative to the snapshot, or `blobs/<name>`).
    pub file: String,
    pub path: PathBuf,
    pub size: u64,
    /// True when the partial lies in the blob store.
    pub in_blobs: bool,
}

/// The listing of a snapshot folder.
#[derive(Debug)]
pub(crate) struct Tree {
    pub root: PathBuf,
    pub layout: Layout,
    /// Relative path ('/' separated) → file.
    pub files: BTreeMap<String, FileEntry>,
    pub partials: Vec<PartialFile>,
    pub problems: Vec<Problem>,
}

impl Tree {
    /// Files directly in the snapshot folder (not in subfolders).
    pub fn top_level(&self) -> impl Iterator<Item = (&String, &FileEntry)> {
        self.files.iter().filter(|(name, _)| !name.contains('/'))
    }

    /// The repository's blob store, in the cache layout.
    pub fn blobs_dir(&self) -> Option<PathBuf> {
        match &self.layout {
            Layout::Cache { repo_dir, .. } => Some(repo_dir.join("blobs")),
            Layout::Plain => None,
        }
    }

    /// The snapshot's commit, in the cache layout.
    pub fn commit(&self) -> Option<&str> {
        match &self.layout {
            Layout::Cache { commit, .. } => Some(commit),
            Layout::Plain => None,
        }
    }
}

/// Lists `path`. Fails only when the folder itself cannot be used.
pub(crate) fn scan(path: &Path) -> Result<Tree, SnapshotError> {
    let root = match fs::canonicalize(path) {
        Ok(root) => root,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(SnapshotError::NotFound(path.to_owned()))
        }
        Err(source) => {
            return Err(SnapshotError::Unreadable {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !root.is_dir() {
        return Err(SnapshotError::NotADirectory(path.to_owned()));
    }
    if let Err(source) = fs::read_dir(&root) {
        return Err(SnapshotError::Unreadable {
            path: path.to_owned(),
            source,
        });
    }
    let layout = detect_layout(&root);
    let mut tree = Tree {
        root,
        layout,
        files: BTreeMap::new(),
        partials: Vec::new(),
        problems: Vec::new(),
    };
    walk(&mut tree);
    scan_blob_partials(&mut tree);
    Ok(tree)
}

fn detect_layout(root: &Path) -> Layout {
    let parent = root.parent();
    let repo_dir = parent.and_then(Path::parent);
    let in_snapshots = parent
        .and_then(Path::file_name)
        .is_some_and(|n| n == "snapshots");
    let repo_named = repo_dir
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
        .is_some_and(|n| {
            ["models--", "datasets--", "spaces--"]
                .iter()
                .any(|p| n.starts_with(p))
        });
    match (in_snapshots && repo_named, repo_dir) {
        (true, Some(repo_dir)) => Layout::Cache {
            repo_dir: repo_dir.to_owned(),
            cache_dir: repo_dir.parent().unwrap_or(repo_dir).to_owned(),
            commit: root
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        },
        _ => Layout::Plain,
    }
}

/// `a/./b/../c` → `a/c`, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

fn relative(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

fn is_loop(err: &io::Error) -> bool {
    err.raw_os_error() == Some(ELOOP)
}

fn io_problem(file: &str, err: &io::Error, what: &str) -> Problem {
    if err.kind() == io::ErrorKind::NotFound {
        Problem::error(
            ProblemKind::BrokenLink,
            file,
            format!("{what}: the link points at nothing"),
        )
    } else if is_loop(err) {
        Problem::error(
            ProblemKind::BrokenLink,
            file,
            format!("{what}: symlink loop"),
        )
    } else {
        Problem::error(ProblemKind::Unreadable, file, format!("{what}: {err}"))
    }
}

fn walk(tree: &mut Tree) {
    let follow = matches!(tree.layout, Layout::Plain);
    let walker = WalkDir::new(&tree.root)
        .follow_links(follow)
        .max_depth(MAX_DEPTH)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| e.depth() == 0 || e.file_name() != ".git");
    for (count, entry) in walker.enumerate() {
        if count > MAX_ENTRIES {
            tree.problems.push(Problem::error(
                ProblemKind::Unreadable,
                "",
                format!("the folder has more than {MAX_ENTRIES} entries; not a model snapshot"),
            ));
            return;
        }
        let entry = match entry {
            Ok(entry) => entry,
            Err(err) => {
                let file = err
                    .path()
                    .map(|p| relative(&tree.root, p))
                    .unwrap_or_default();
                let problem = if let Some(ancestor) = err.loop_ancestor() {
                    Problem::error(
                        ProblemKind::BrokenLink,
                        file,
                        format!("symlink loop back to {}", relative(&tree.root, ancestor)),
                    )
                } else if let Some(io) = err.io_error() {
                    io_problem(&file, io, "cannot read")
                } else {
                    Problem::error(ProblemKind::Unreadable, file, err.to_string())
                };
                tree.problems.push(problem);
                continue;
            }
        };
        if entry.depth() == 0 || entry.file_type().is_dir() {
            continue;
        }
        let rel = relative(&tree.root, entry.path());
        if entry.path_is_symlink() && !follow {
            add_cache_link(tree, rel, entry.path());
        } else if entry.file_type().is_file() {
            match entry.metadata() {
                Ok(meta) => add_file(tree, rel, entry.path().to_owned(), meta.len(), None),
                Err(err) => tree.problems.push(Problem::error(
                    ProblemKind::Unreadable,
                    rel,
                    format!("cannot read: {err}"),
                )),
            }
        }
    }
}

fn add_file(tree: &mut Tree, rel: String, path: PathBuf, size: u64, blob: Option<String>) {
    if strip_partial_suffix(&rel).is_some() {
        tree.partials.push(PartialFile {
            file: rel,
            path,
            size,
            in_blobs: false,
        });
        return;
    }
    // huggingface_hub's local-dir bookkeeping is not part of the model.
    if rel.starts_with(".cache/") {
        return;
    }
    tree.files.insert(rel, FileEntry { path, size, blob });
}

/// A link in a cache snapshot: must stay inside the cache and point at an existing file.
fn add_cache_link(tree: &mut Tree, rel: String, link: &Path) {
    let Layout::Cache {
        repo_dir,
        cache_dir,
        ..
    } = &tree.layout
    else {
        return;
    };
    let (repo_dir, cache_dir) = (repo_dir.clone(), cache_dir.clone());
    let target = match fs::read_link(link) {
        Ok(target) => target,
        Err(err) => {
            return tree
                .problems
                .push(io_problem(&rel, &err, "cannot read the link"))
        }
    };
    let resolved = normalize(&link.parent().unwrap_or(link).join(&target));
    if !resolved.starts_with(&cache_dir) {
        return tree.problems.push(Problem::error(
            ProblemKind::UnsafePath,
            rel,
            format!(
                "the link points outside the cache ({} → {})",
                target.display(),
                resolved.display()
            ),
        ));
    }
    // Follow the whole chain: a blob that is itself a link must not lead out of the cache.
    let real = match fs::canonicalize(link) {
        Ok(real) => real,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return tree.problems.push(Problem::error(
                ProblemKind::BrokenLink,
                rel,
                format!(
                    "the blob {} is missing (link target {})",
                    resolved.file_name().unwrap_or_default().to_string_lossy(),
                    target.display()
                ),
            ));
        }
        Err(err) => {
            return tree
                .problems
                .push(io_problem(&rel, &err, "cannot resolve the link"))
        }
    };
    if !real.starts_with(&cache_dir) {
        return tree.problems.push(Problem::error(
            ProblemKind::UnsafePath,
            rel,
            format!("the link resolves outside the cache, to {}", real.display()),
        ));
    }
    match fs::metadata(&real) {
        Ok(meta) if meta.is_file() => {
            let blob = (real.parent() == Some(repo_dir.join("blobs").as_path()))
                .then(|| real.file_name().map(|n| n.to_string_lossy().into_owned()))
                .flatten();
            add_file(tree, rel, real, meta.len(), blob);
        }
        Ok(_) => {} // a link to a folder: not a model file
        Err(err) => tree
            .problems
            .push(io_problem(&rel, &err, "cannot read the blob")),
    }
}

/// Partial downloads in the repository's blob store.
fn scan_blob_partials(tree: &mut Tree) {
    let Some(blobs) = tree.blobs_dir() else {
        return;
    };
    let entries = match fs::read_dir(&blobs) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return,
        Err(err) => {
            let problem = io_problem("blobs", &err, "cannot list the blob store");
            return tree.problems.push(problem);
        }
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(LMX_PARTIAL_META_SUFFIX) || strip_partial_suffix(&name).is_none() {
            continue;
        }
        let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
        found.push(PartialFile {
            file: format!("blobs/{name}"),
            path: entry.path(),
            size,
            in_blobs: true,
        });
    }
    found.sort_by(|a, b| a.file.cmp(&b.file));
    tree.partials.extend(found);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_resolves_dots_lexically() {
        assert_eq!(
            normalize(Path::new("/c/models--a--b/snapshots/x/../../blobs/./abc")),
            PathBuf::from("/c/models--a--b/blobs/abc")
        );
        assert_eq!(
            normalize(Path::new("/c/s/../../../../etc")),
            PathBuf::from("/etc")
        );
    }

    #[test]
    fn cache_layout_is_recognised_by_its_folder_names() {
        let layout = detect_layout(Path::new("/c/models--org--m/snapshots/abc123"));
        let Layout::Cache {
            repo_dir,
            cache_dir,
            commit,
        } = layout
        else {
            panic!("expected the cache layout");
        };
        assert_eq!(repo_dir, PathBuf::from("/c/models--org--m"));
        assert_eq!(cache_dir, PathBuf::from("/c"));
        assert_eq!(commit, "abc123");
        assert!(matches!(
            detect_layout(Path::new("/home/u/model")),
            Layout::Plain
        ));
        assert!(matches!(
            detect_layout(Path::new("/x/snapshots/abc")),
            Layout::Plain
        ));
    }
}
